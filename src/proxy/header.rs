//! The PROXY protocol header (haproxy's doc/proxy-protocol.txt) that a load balancer
//! sends before the client's first byte, versions 1 and 2, as tcpsplice-proxy and
//! `tcpsplice-listen -P` receive it.
//!
//! [`parse`] is a pure function over the bytes received so far: it says whether they
//! hold a whole header (and its length), a valid beginning of one (and how many more
//! bytes surely belong to it), or no header at all. It is network input from a peer we
//! only partly trust, so it is small, allocates nothing and is fuzzed (fuzz/).
//!
//! [`Reader`] takes a header off a socket without a byte past it: it looks with
//! `MSG_PEEK` and takes only the bytes [`parse`] says are the header's. While a header
//! is incomplete, every byte received belongs to it (its end has not come), so those
//! are taken too, and a poll waiting for the rest does not wake for them again.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::io::RawFd;

use crate::sys;

/// The longest version 1 header, CRLF included (the spec's 107 bytes).
pub const V1_MAX: usize = 107;
/// The longest version 2 address block and TLVs accepted: room for both addresses and
/// the TLVs balancers send (AWS, GCP, Azure and haproxy send tens of bytes).
pub const V2_MAX_LEN: usize = 2048;
/// The longest header of either version.
pub const MAX: usize = 16 + V2_MAX_LEN;

const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// What a header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// The balancer relays a client: `client` is its address, `local` the address the
    /// client connected to (the balancer's front end).
    Proxied {
        client: SocketAddr,
        local: SocketAddr,
    },
    /// The balancer's own connection (v2 LOCAL: its health checks), or one whose client
    /// it cannot name (v1 UNKNOWN, v2 UNSPEC): the connection's own addresses stand.
    Local,
}

/// What [`parse`] found at the start of its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parse {
    /// A whole header of `.1` bytes.
    Done(Header, usize),
    /// A valid beginning of a header: at least this many more bytes belong to it.
    More(usize),
    /// Not a header, or a malformed or oversize one: why.
    Bad(&'static str),
}

/// Parses the header at the start of `b` (see [`Parse`]). Never looks past the header:
/// what follows it is the client's and may be anything.
pub fn parse(b: &[u8]) -> Parse {
    match b.first() {
        None => Parse::More(1),
        Some(b'P') => v1(b),
        Some(b'\r') => v2(b),
        Some(_) => Parse::Bad("no PROXY header"),
    }
}

fn v1(b: &[u8]) -> Parse {
    let n = b.len().min(V1_PREFIX.len());
    if b[..n] != V1_PREFIX[..n] {
        return Parse::Bad("no PROXY header");
    }
    let window = &b[..b.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&c| c == b'\n') else {
        return if b.len() >= V1_MAX {
            Parse::Bad("v1 header longer than 107 bytes")
        } else {
            Parse::More(1)
        };
    };
    if lf < V1_PREFIX.len() + 1 || b[lf - 1] != b'\r' {
        return Parse::Bad("v1 header not ended by CRLF");
    }
    let line = &b[V1_PREFIX.len()..lf - 1];
    if !line.iter().all(|&c| (0x20..0x7f).contains(&c)) {
        return Parse::Bad("v1 header is not printable ASCII");
    }
    let Ok(line) = std::str::from_utf8(line) else {
        return Parse::Bad("v1 header is not printable ASCII");
    };
    // UNKNOWN: the rest of the line is to be ignored (the spec).
    if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
        return Parse::Done(Header::Local, lf + 1);
    }
    let f: Vec<&str> = line.split(' ').collect();
    let [proto, src, dst, sport, dport] = f[..] else {
        return Parse::Bad("v1 header has not 5 fields");
    };
    let ips = match proto {
        "TCP4" => src
            .parse::<Ipv4Addr>()
            .ok()
            .zip(dst.parse::<Ipv4Addr>().ok())
            .map(|(s, d)| (IpAddr::V4(s), IpAddr::V4(d))),
        "TCP6" => src
            .parse::<Ipv6Addr>()
            .ok()
            .zip(dst.parse::<Ipv6Addr>().ok())
            .map(|(s, d)| (IpAddr::V6(s), IpAddr::V6(d))),
        _ => return Parse::Bad("v1 header for a protocol other than TCP4, TCP6, UNKNOWN"),
    };
    let Some((s, d)) = ips else {
        return Parse::Bad("v1 header with a bad address");
    };
    let (Some(sp), Some(dp)) = (port(sport), port(dport)) else {
        return Parse::Bad("v1 header with a bad port");
    };
    Parse::Done(
        Header::Proxied {
            client: SocketAddr::new(s, sp),
            local: SocketAddr::new(d, dp),
        },
        lf + 1,
    )
}

/// A decimal port: digits only (no sign, no space, no leading zero), at most 65535.
fn port(s: &str) -> Option<u16> {
    let canonical = s == "0" || !s.starts_with('0');
    if s.is_empty() || s.len() > 5 || !canonical || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn v2(b: &[u8]) -> Parse {
    let n = b.len().min(V2_SIGNATURE.len());
    if b[..n] != V2_SIGNATURE[..n] {
        return Parse::Bad("no PROXY header");
    }
    if b.len() < 16 {
        return Parse::More(16 - b.len());
    }
    let (ver, cmd) = (b[12] >> 4, b[12] & 0x0f);
    if ver != 2 {
        return Parse::Bad("v2 header of an unknown version");
    }
    if cmd > 1 {
        return Parse::Bad("v2 header with an unknown command");
    }
    let len = usize::from(u16::from_be_bytes([b[14], b[15]]));
    if len > V2_MAX_LEN {
        return Parse::Bad("v2 header longer than 2064 bytes");
    }
    let total = 16 + len;
    if b.len() < total {
        return Parse::More(total - b.len());
    }
    // LOCAL: the address block is to be ignored (the spec), whatever it holds.
    if cmd == 0 {
        return Parse::Done(Header::Local, total);
    }
    let a = &b[16..total];
    let header = match b[13] {
        // Family UNSPEC: the balancer does not know; the connection's own addresses
        // stand.
        0x00..=0x0f => Header::Local,
        0x11 if len >= 12 => {
            let ip = |i: usize| IpAddr::V4(Ipv4Addr::new(a[i], a[i + 1], a[i + 2], a[i + 3]));
            Header::Proxied {
                client: SocketAddr::new(ip(0), u16::from_be_bytes([a[8], a[9]])),
                local: SocketAddr::new(ip(4), u16::from_be_bytes([a[10], a[11]])),
            }
        }
        0x21 if len >= 36 => {
            let ip = |i: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&a[i..i + 16]);
                IpAddr::V6(Ipv6Addr::from(o))
            };
            Header::Proxied {
                client: SocketAddr::new(ip(0), u16::from_be_bytes([a[32], a[33]])),
                local: SocketAddr::new(ip(16), u16::from_be_bytes([a[34], a[35]])),
            }
        }
        0x11 | 0x21 => return Parse::Bad("v2 header too short for its addresses"),
        _ => return Parse::Bad("v2 header for a protocol other than TCP"),
    };
    Parse::Done(header, total)
}

/// What one [`Reader::step`] came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The whole header was taken off the connection; its next byte is the client's.
    Done(Header),
    /// The rest has not come yet: poll for more, within the deadline.
    Wait,
    /// Not a valid header, or the connection ended or failed first: why.
    Fail(String),
}

/// Takes a header off a connection, over as many calls as its bytes take to come.
#[derive(Debug, Default)]
pub struct Reader {
    got: Vec<u8>,
}

impl Reader {
    pub fn new() -> Reader {
        Reader::default()
    }

    /// How many bytes of the header were taken so far.
    pub fn taken(&self) -> usize {
        self.got.len()
    }

    /// Takes what has come of the header from `fd` without waiting. On a socket,
    /// `MSG_PEEK` shows what is there and only the header's bytes are taken; on
    /// anything else (a pipe), only as many bytes as surely belong to it are read, in
    /// one read: call it when `fd` is readable.
    pub fn step(&mut self, fd: RawFd, socket: bool) -> Step {
        let mut buf = [0u8; MAX];
        loop {
            let need = match parse(&self.got) {
                Parse::Done(h, _) => return Step::Done(h),
                Parse::More(n) => n,
                Parse::Bad(why) => return Step::Fail(why.into()),
            };
            let room = MAX - self.got.len();
            let got = if socket {
                sys::recv(fd, &mut buf[..room], libc::MSG_PEEK | libc::MSG_DONTWAIT)
            } else {
                sys::read(fd, &mut buf[..need.min(room)])
            };
            let n = match got {
                Ok(0) => return Step::Fail(self.ended("closed")),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Step::Fail(self.ended(&sys::strerror(&e))),
            };
            if !socket {
                self.got.extend_from_slice(&buf[..n]);
                if matches!(parse(&self.got), Parse::More(_)) {
                    return Step::Wait;
                }
                continue;
            }
            // What of the peeked bytes is the header's: up to its end when it is all
            // there, else all of them.
            let before = self.got.len();
            self.got.extend_from_slice(&buf[..n]);
            let keep = match parse(&self.got) {
                Parse::Done(_, len) => len - before,
                Parse::More(_) => n,
                Parse::Bad(why) => return Step::Fail(why.into()),
            };
            self.got.truncate(before);
            match sys::recv(fd, &mut buf[..keep], libc::MSG_DONTWAIT) {
                Ok(0) => return Step::Fail(self.ended("closed")),
                // The same bytes as peeked: a stream gives them in order.
                Ok(k) => self.got.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Step::Fail(self.ended(&sys::strerror(&e))),
            }
        }
    }

    fn ended(&self, how: &str) -> String {
        match self.got.len() {
            0 => format!("connection {how} before a PROXY header"),
            n => format!("connection {how} after {n} bytes of a PROXY header"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn proxied(c: &str, l: &str) -> Header {
        Header::Proxied {
            client: sa(c),
            local: sa(l),
        }
    }

    #[test]
    fn v1_headers() {
        let h = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET /";
        assert_eq!(
            parse(h),
            Parse::Done(proxied("192.0.2.1:56324", "198.51.100.2:443"), h.len() - 5)
        );
        let h = b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n";
        assert_eq!(
            parse(h),
            Parse::Done(proxied("[2001:db8::1]:1", "[::1]:65535"), h.len())
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Parse::Done(Header::Local, 15));
        assert_eq!(
            parse(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\nxx"),
            Parse::Done(Header::Local, 31)
        );
        // Every prefix of a valid header asks for more.
        let h = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n";
        for i in 0..h.len() {
            assert_eq!(parse(&h[..i]), Parse::More(1), "prefix {i}");
        }
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\x05\x01\x00",
            b"PROXX",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY \r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xff\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY UNKNOWN \x01\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r2\r\n",
        ] {
            assert!(
                matches!(parse(bad), Parse::Bad(_)),
                "{:?}: {:?}",
                String::from_utf8_lossy(bad),
                parse(bad)
            );
        }
        // No CRLF within 107 bytes: oversize, even before the 108th byte is there.
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 96]].concat();
        assert_eq!(long.len(), V1_MAX);
        assert!(matches!(parse(&long), Parse::Bad(_)));
        assert_eq!(parse(&long[..106]), Parse::More(1));
    }

    fn v2h(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.extend_from_slice(&[0x20 | cmd, fam]);
        v.extend_from_slice(&(body.len() as u16).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn v2_headers() {
        // What haproxy's send-proxy-v2 sent for a client 127.0.0.5:53993 of 127.0.0.1:19100.
        let h = v2h(
            1,
            0x11,
            &[127, 0, 0, 5, 127, 0, 0, 1, 0xd2, 0xe9, 0x4a, 0x9c],
        );
        let with_data = [h.as_slice(), b"hello"].concat();
        assert_eq!(
            parse(&with_data),
            Parse::Done(proxied("127.0.0.5:53993", "127.0.0.1:19100"), 28)
        );
        // (Nothing at all cannot tell the version yet: one byte more.)
        assert_eq!(parse(&h[..0]), Parse::More(1));
        for i in 1..h.len() {
            let want = if i < 16 { 16 - i } else { 28 - i };
            assert_eq!(parse(&h[..i]), Parse::More(want), "prefix {i}");
        }
        // Its health checks: LOCAL, no address.
        assert_eq!(parse(&v2h(0, 0, &[])), Parse::Done(Header::Local, 16));
        // LOCAL ignores whatever address block comes with it.
        assert_eq!(
            parse(&v2h(0, 0x11, &[1; 12])),
            Parse::Done(Header::Local, 28)
        );
        let mut six = Vec::new();
        six.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        six.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        six.extend_from_slice(&[0, 80, 1, 187]);
        // TLVs after the addresses are skipped.
        six.extend_from_slice(&[0x04, 0, 3, 1, 2, 3]);
        let h = v2h(1, 0x21, &six);
        assert_eq!(
            parse(&h),
            Parse::Done(proxied("[2001:db8::7]:80", "[::1]:443"), h.len())
        );
        assert_eq!(parse(&v2h(1, 0x00, &[])), Parse::Done(Header::Local, 16));
        for bad in [
            v2h(1, 0x11, &[1; 11]),
            v2h(1, 0x21, &[1; 35]),
            v2h(1, 0x12, &[1; 12]),
            v2h(1, 0x31, &[1; 216]),
            v2h(2, 0x11, &[1; 12]),
            {
                let mut v = v2h(1, 0x11, &[1; 12]);
                v[12] = 0x11;
                v
            },
            {
                let mut v = v2h(1, 0x11, &[]);
                v[14..16].copy_from_slice(&(V2_MAX_LEN as u16 + 1).to_be_bytes());
                v
            },
            b"\r\n\r\n\0\r\nQUIX\n\x21\x11\x00\x0c".to_vec(),
        ] {
            assert!(matches!(parse(&bad), Parse::Bad(_)), "{bad:?}");
        }
        // The largest accepted length is waited for.
        let mut v = v2h(1, 0x11, &[]);
        v[14..16].copy_from_slice(&(V2_MAX_LEN as u16).to_be_bytes());
        assert_eq!(parse(&v), Parse::More(V2_MAX_LEN));
    }

    #[test]
    fn never_a_byte_past_the_header() {
        // Whatever follows a header, the length is the header's.
        let h = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n";
        for tail in [&b""[..], b"\r\n", b"PROXY TCP4", b"\0\0\0"] {
            let b = [h.as_slice(), tail].concat();
            assert!(matches!(parse(&b), Parse::Done(_, n) if n == h.len()));
        }
    }
}
