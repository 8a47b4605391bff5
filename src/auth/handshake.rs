//! The proxy handshake on fds 0/1: which protocol the client speaks, reading its request
//! without ever reading a byte past it, and what tcpsplice-auth tells the next program.
//!
//! The first byte decides: 0x05 SOCKS5, 0x04 SOCKS4/4a, an ASCII letter HTTP CONNECT. It
//! is the first byte of the request in every protocol, so it is simply read. SOCKS
//! messages have lengths that can be computed, so exactly their bytes are read; the HTTP
//! head is found with `recv(MSG_PEEK)` on a socket, one byte at a time on anything else.
//! Whatever the client pipelines behind its request stays in the kernel for the programs
//! after the exec.

use super::request::{Client, Failure, Policy, Request};
use super::{httpconnect, socks4, socks5};
use crate::{environ, exit};

/// Reads the client's request and checks its credentials. Ok is the request to pass on;
/// Err says what to answer before exiting. Replies of the handshake's middle steps are
/// sent here; the final answer is tcpsplice-dial's.
pub fn run(c: &mut Client, policy: &Policy) -> Result<Request, Failure> {
    let mut first = match c.read_byte() {
        Ok(b) => b,
        Err(e) => return Err(e.fail("-", b"")),
    };
    // One empty line before an HTTP request line is ignored (RFC 9112 2.2): some
    // clients send a CRLF after a previous request's body.
    if first == b'\r' || first == b'\n' {
        let next = match c.read_byte() {
            Ok(b) => b,
            Err(e) => return Err(e.fail("-", b"")),
        };
        first = match (first, next) {
            (b'\r', b'\n') => match c.read_byte() {
                Ok(b) => b,
                Err(e) => return Err(e.fail("-", b"")),
            },
            (b'\n', b) => b,
            // A CR alone is no empty line.
            _ => 0,
        };
        if !first.is_ascii_alphabetic() {
            return Err(Failure::new(
                "-",
                b"",
                exit::POLICY,
                String::from("unknown protocol (an empty line, then no request line)"),
            ));
        }
    }
    match first {
        0x05 => socks5::handshake(c, policy),
        0x04 => socks4::handshake(c, policy),
        b if b.is_ascii_alphabetic() => httpconnect::handshake(c, policy, b),
        b => Err(Failure::new(
            "-",
            b"",
            exit::POLICY,
            format!("unknown protocol (first byte 0x{b:02x})"),
        )),
    }
}

/// Sets the environment the next programs read (DESIGN.md): `TCPSPLICE_TARGET`,
/// `TCPSPLICE_REPLY`, `TCPSPLICE_COMMAND`, `TCPSPLICE_USER` and `TCPSPLICE_RULES` (both removed when they do
/// not apply, so nothing inherited can pass for them), and systemd's socket-passing
/// variables unset, as we consumed the socket. The UCSPI names of the client were
/// filled in before the handshake (`conninfo::fill_from_socket`), when no supervisor set
/// them.
pub fn export(req: &Request) {
    environ::set_var("TCPSPLICE_TARGET", &req.target);
    environ::set_var("TCPSPLICE_REPLY", req.reply);
    environ::set_var("TCPSPLICE_COMMAND", req.command);
    match &req.user {
        Some(u) => environ::set_var("TCPSPLICE_USER", u),
        None => environ::remove_var("TCPSPLICE_USER"),
    }
    match &req.rules {
        Some(r) => environ::set_var("TCPSPLICE_RULES", r),
        None => environ::remove_var("TCPSPLICE_RULES"),
    }
    for v in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        environ::remove_var(v);
    }
    if req.reply != crate::http::REPLY {
        super::httpforward::clear_env();
    }
}

/// The refusal of a user over their limit of connections, in the protocol the client
/// waits for its answer in: SOCKS5 REP 02 "connection not allowed by ruleset", SOCKS4
/// 5B, HTTP 429 Too Many Requests.
pub fn over_limit(reply: &str) -> Vec<u8> {
    match reply {
        "socks5" => socks5::reply(socks5::REP_NOT_ALLOWED),
        "socks4" => socks4::REJECTED.to_vec(),
        _ => httpconnect::response(
            "429 Too Many Requests",
            "",
            "This user has as many connections open as allowed: try again when one has ended.",
        ),
    }
}

/// A temporary failure after the request was read: SOCKS5 REP 01, SOCKS4 5B, HTTP 503.
pub fn unavailable(reply: &str) -> Vec<u8> {
    match reply {
        "socks5" => socks5::reply(socks5::REP_GENERAL),
        "socks4" => socks4::REJECTED.to_vec(),
        _ => httpconnect::response(
            "503 Service Unavailable",
            "",
            "The proxy cannot take more connections just now: try again later.",
        ),
    }
}
