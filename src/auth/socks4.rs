//! SOCKS4 and SOCKS4a CONNECT. Its USERID is not a secret, so SOCKS4 is no-auth only:
//! it is served when no-auth is allowed (`-n`) and refused with 0x5B otherwise. The
//! NUL-terminated fields are read one byte at a time, so nothing past them is taken.

use std::net::Ipv4Addr;

use super::request::{self, Client, Failure, Policy, Request};
use crate::exit;

/// The 8-byte "request rejected or failed" reply.
pub const REJECTED: &[u8] = &[0x00, 0x5B, 0, 0, 0, 0, 0, 0];

fn fail(code: i32, why: impl Into<String>) -> Failure {
    Failure::new("socks4", REJECTED, code, why)
}

/// Runs the handshake after the version byte 0x04 has been read.
pub fn handshake(c: &mut Client, policy: &Policy) -> Result<Request, Failure> {
    let trunc = |e: request::ReadError| e.fail("socks4", REJECTED);
    let mut head = [0u8; 7];
    c.read_exact(&mut head).map_err(trunc)?;
    let cd = head[0];
    let port = u16::from_be_bytes([head[1], head[2]]);
    let ip = Ipv4Addr::new(head[3], head[4], head[5], head[6]);
    let userid = read_cstring(c).map_err(|e| e.fail("socks4", REJECTED))?;
    let Some(userid) = userid else {
        return Err(fail(exit::POLICY, "user id longer than 255 bytes"));
    };
    // 0.0.0.x with x != 0: SOCKS4a, the host name follows the user id.
    let o = ip.octets();
    let host = if o[0] == 0 && o[1] == 0 && o[2] == 0 && o[3] != 0 {
        match read_cstring(c).map_err(trunc)? {
            Some(name) if request::valid_name(&name) => String::from_utf8_lossy(&name).into_owned(),
            Some(name) => {
                return Err(fail(
                    exit::POLICY,
                    format!("invalid host name {}", request::escape(&name)),
                ))
            }
            None => return Err(fail(exit::POLICY, "host name longer than 255 bytes")),
        }
    } else {
        ip.to_string()
    };
    if !policy.socks4 {
        return Err(fail(exit::POLICY, "socks4 is not enabled"));
    }
    if !policy.anonymous {
        return Err(fail(
            exit::POLICY,
            format!(
                "socks4 has no authentication and no-auth is not allowed (userid {})",
                request::escape(&userid)
            ),
        ));
    }
    if cd != 0x01 {
        return Err(fail(
            exit::POLICY,
            format!("command 0x{cd:02x} not supported"),
        ));
    }
    if port == 0 {
        return Err(fail(exit::POLICY, "target port 0"));
    }
    Ok(Request {
        target: request::target_text(&host, port),
        user: None,
        rules: None,
        reply: "socks4",
        command: "connect",
    })
}

/// Reads up to and including a NUL; None when no NUL comes within 256 bytes.
fn read_cstring(c: &mut Client) -> Result<Option<Vec<u8>>, request::ReadError> {
    let mut v = Vec::new();
    loop {
        let b = c.read_byte()?;
        if b == 0 {
            return Ok(Some(v));
        }
        if v.len() == 255 {
            return Ok(None);
        }
        v.push(b);
    }
}
