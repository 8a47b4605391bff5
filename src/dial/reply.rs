//! The proxy's answer to a client that is still waiting for it (`TCPSPLICE_REPLY`).
//!
//! tcpsplice-auth reads the client's SOCKS or HTTP CONNECT request and execs the dialer
//! without answering, because only the dialer learns whether the target could be reached.
//! The dialer then writes the success reply (with the local address of its upstream
//! socket, as RFC 1928 asks) or the failure that matches what went wrong.

use std::io;
use std::net::{IpAddr, SocketAddr};

use crate::exit;

/// The protocol the client is waiting in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    Socks5,
    Socks4,
    Http,
    /// A forwarded plain-HTTP request (`http-forward`): failures are answered as for
    /// CONNECT; success is the request sent on, and the origin's response.
    HttpForward,
}

impl Style {
    /// Parses the value of `TCPSPLICE_REPLY`: `socks5`, `socks4`, `http`; empty or `none`
    /// means nobody waits for a reply.
    pub fn parse(s: &str) -> Result<Option<Style>, String> {
        match s {
            "" | "none" => Ok(None),
            "socks5" => Ok(Some(Style::Socks5)),
            "socks4" => Ok(Some(Style::Socks4)),
            "http" => Ok(Some(Style::Http)),
            crate::http::REPLY => Ok(Some(Style::HttpForward)),
            other => Err(format!(
                "TCPSPLICE_REPLY must be socks5, socks4, http, http-forward or none, not {other:?}"
            )),
        }
    }
}

/// Why the target could not be reached, as far as a client can be told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The rules or the deny list refused every address.
    NotAllowed,
    NetworkUnreachable,
    /// Also a name that does not resolve.
    HostUnreachable,
    Refused,
    Timeout,
    General,
}

impl Failure {
    /// The failure that a connect(2) error means.
    pub fn from_io(e: &io::Error) -> Failure {
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => Failure::Refused,
            Some(libc::ENETUNREACH) | Some(libc::ENETDOWN) => Failure::NetworkUnreachable,
            Some(libc::EHOSTUNREACH) | Some(libc::EHOSTDOWN) => Failure::HostUnreachable,
            Some(libc::ETIMEDOUT) => Failure::Timeout,
            _ => Failure::General,
        }
    }

    /// The exit status: a policy refusal is final (1), the rest may work later (111).
    pub fn exit_code(self) -> i32 {
        match self {
            Failure::NotAllowed => exit::POLICY,
            _ => exit::TEMP,
        }
    }

    fn socks5_code(self) -> u8 {
        match self {
            Failure::General => 0x01,
            Failure::NotAllowed => 0x02,
            Failure::NetworkUnreachable => 0x03,
            Failure::HostUnreachable => 0x04,
            Failure::Refused => 0x05,
            Failure::Timeout => 0x06,
        }
    }

    /// The status, and the one-line body: what went wrong and what to do instead.
    fn http(self) -> (&'static str, &'static str) {
        match self {
            Failure::NotAllowed => (
                "403 Forbidden",
                "Target not allowed: this proxy's rules do not let it reach that address \
                 and port (private, loopback and link-local ones need a rule); ask for \
                 another target.",
            ),
            Failure::NetworkUnreachable => (
                "502 Bad Gateway",
                "Network unreachable: the proxy has no route to that address; check it.",
            ),
            Failure::HostUnreachable => (
                "502 Bad Gateway",
                "Host unknown or unreachable: check the target's name or address.",
            ),
            Failure::Refused => (
                "502 Bad Gateway",
                "Connection refused by the target: check the port, and that its service \
                 runs.",
            ),
            Failure::Timeout => (
                "504 Gateway Timeout",
                "Connection timed out: the target did not answer; check its address and \
                 port, or try again later.",
            ),
            Failure::General => (
                "502 Bad Gateway",
                "Connection failed: the proxy could not reach the target; try again later.",
            ),
        }
    }
}

/// A success reply, on the stack: written at every connection, where a Vec was an
/// allocation and a free. Reads as its bytes.
pub struct Reply {
    buf: [u8; REPLY_MAX],
    len: usize,
}

/// The longest success reply: HTTP's.
const REPLY_MAX: usize = HTTP_SUCCESS.len();

const HTTP_SUCCESS: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

impl Reply {
    fn push(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
}

impl std::ops::Deref for Reply {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The success reply; `bound` is the local address of the upstream socket.
pub fn success(style: Style, bound: Option<SocketAddr>) -> Reply {
    let mut v = Reply {
        buf: [0; REPLY_MAX],
        len: 0,
    };
    match style {
        Style::Socks5 => {
            v.push(&[5, 0, 0]);
            match bound.map(|b| (crate::rules::canonical(b.ip()), b.port())) {
                Some((IpAddr::V6(a), port)) => {
                    v.push(&[4]);
                    v.push(&a.octets());
                    v.push(&port.to_be_bytes());
                }
                Some((IpAddr::V4(a), port)) => {
                    v.push(&[1]);
                    v.push(&a.octets());
                    v.push(&port.to_be_bytes());
                }
                None => v.push(&[1, 0, 0, 0, 0, 0, 0]),
            }
        }
        Style::Socks4 => {
            v.push(&[0, 0x5a]);
            // SOCKS4 has no room for IPv6: an IPv6 upstream is reported as 0.0.0.0:0,
            // which clients ignore anyway.
            match bound.map(|b| (crate::rules::canonical(b.ip()), b.port())) {
                Some((IpAddr::V4(a), port)) => {
                    v.push(&port.to_be_bytes());
                    v.push(&a.octets());
                }
                _ => v.push(&[0; 6]),
            }
        }
        Style::Http => v.push(HTTP_SUCCESS),
        Style::HttpForward => {}
    }
    v
}

/// The failure reply for `f`.
pub fn failure(style: Style, f: Failure) -> Vec<u8> {
    match style {
        Style::Socks5 => vec![5, f.socks5_code(), 0, 1, 0, 0, 0, 0, 0, 0],
        Style::Socks4 => vec![0, 0x5b, 0, 0, 0, 0, 0, 0],
        Style::Http | Style::HttpForward => {
            let (status, text) = f.http();
            crate::http::error_response(status, text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        let b4: SocketAddr = "192.0.2.1:4660".parse().unwrap();
        let b6: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        assert_eq!(
            &success(Style::Socks5, Some(b4))[..],
            [5, 0, 0, 1, 192, 0, 2, 1, 0x12, 0x34]
        );
        let s6 = success(Style::Socks5, Some(b6));
        assert_eq!(s6.len(), 22);
        assert_eq!(
            &success(Style::Socks5, None)[..],
            [5, 0, 0, 1, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&success(Style::Http, None)[..], HTTP_SUCCESS);
        assert!(success(Style::HttpForward, None).is_empty());
        assert_eq!(&s6[..4], &[5, 0, 0, 4]);
        assert_eq!(&s6[20..], &[0, 80]);
        assert_eq!(
            &success(Style::Socks4, Some(b4))[..],
            [0, 0x5a, 0x12, 0x34, 192, 0, 2, 1]
        );
        assert_eq!(
            &success(Style::Socks4, Some(b6))[..],
            [0, 0x5a, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            failure(Style::Socks5, Failure::Refused),
            [5, 5, 0, 1, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(failure(Style::Socks5, Failure::NotAllowed)[1], 2);
        assert_eq!(failure(Style::Socks5, Failure::Timeout)[1], 6);
        let h = String::from_utf8(failure(Style::Http, Failure::Timeout)).unwrap();
        assert!(h.starts_with("HTTP/1.1 504 Gateway Timeout\r\n"), "{h}");
        assert!(h.ends_with("\r\n\r\nConnection timed out: the target did not answer; check its address and port, or try again later.\n"), "{h}");
        assert_eq!(Failure::NotAllowed.exit_code(), exit::POLICY);
        assert_eq!(Failure::Refused.exit_code(), exit::TEMP);
        assert_eq!(Style::parse("socks4"), Ok(Some(Style::Socks4)));
        assert!(Style::parse("socks6").is_err());
    }
}
