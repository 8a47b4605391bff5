//! SOCKS5 (RFC 1928) CONNECT, and BIND and UDP ASSOCIATE when they are enabled (`-B`,
//! `-U`), with the no-auth and username/password (RFC 1929) methods. Every field has a
//! length we know before reading it, so exactly the request's bytes are read.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::password::Secret;
use super::request::{self, Client, Failure, Policy, Request};
use crate::exit;

const NO_AUTH: u8 = 0x00;
const USER_PASS: u8 = 0x02;
const NO_METHOD: &[u8] = &[0x05, 0xFF];
const AUTH_OK: &[u8] = &[0x01, 0x00];
const AUTH_FAIL: &[u8] = &[0x01, 0x01];

/// REP codes of a refusal sent by us rather than by the dialer.
pub const REP_GENERAL: u8 = 0x01;
pub const REP_NOT_ALLOWED: u8 = 0x02;
pub const REP_COMMAND: u8 = 0x07;
pub const REP_ADDRESS: u8 = 0x08;

/// A reply with REP `rep` and an all-zero IPv4 bound address.
pub fn reply(rep: u8) -> Vec<u8> {
    reply_bytes(rep).to_vec()
}

/// [`reply`] without an allocation, for a refusal that is only made ready.
const fn reply_bytes(rep: u8) -> [u8; 10] {
    [0x05, rep, 0x00, 0x01, 0, 0, 0, 0, 0, 0]
}

fn fail(reply: &[u8], code: i32, why: impl Into<String>) -> Failure {
    Failure::new("socks5", reply, code, why)
}

/// Runs the handshake after the version byte 0x05 has been read.
pub fn handshake(c: &mut Client, policy: &Policy) -> Result<Request, Failure> {
    if !policy.socks5 {
        return Err(fail(NO_METHOD, exit::POLICY, "socks5 is not enabled"));
    }
    let n = c.read_byte().map_err(|e| e.fail("socks5", b""))?;
    let mut offered = [0u8; 255];
    let methods = &mut offered[..usize::from(n)];
    c.read_exact(methods).map_err(|e| e.fail("socks5", b""))?;
    // Credentials first when we have a checker: then per-user rules and the user name
    // apply even where no-auth is allowed too.
    let method = if policy.checker.is_some() && methods.contains(&USER_PASS) {
        USER_PASS
    } else if policy.anonymous && methods.contains(&NO_AUTH) {
        NO_AUTH
    } else {
        return Err(fail(
            NO_METHOD,
            exit::POLICY,
            format!(
                "no acceptable authentication method (offered {})",
                hex(methods)
            ),
        ));
    };
    send(c, &[0x05, method])?;
    let mut user = None;
    let mut rules = None;
    if method == USER_PASS {
        let (name, password) = read_credentials(c)?;
        match request::authenticate(policy, &name, &password) {
            Ok(r) => {
                rules = r;
                // Checked printable ASCII (request::user_name_ok): no copy is needed.
                user = Some(
                    String::from_utf8(name)
                        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
                );
            }
            Err(Ok(())) => {
                return Err(fail(
                    AUTH_FAIL,
                    exit::POLICY,
                    format!("auth failed user={}", request::escape(&name)),
                ))
            }
            Err(Err(why)) => return Err(fail(AUTH_FAIL, exit::TEMP, why)),
        }
        send(c, AUTH_OK)?;
    }
    let (command, target) = read_request(c, policy)?;
    Ok(Request {
        target,
        user,
        rules,
        reply: "socks5",
        command,
    })
}

fn send(c: &Client, bytes: &[u8]) -> Result<(), Failure> {
    c.send(bytes).map_err(|e| {
        fail(
            b"",
            exit::POLICY,
            format!(
                "unable to write to the client: {}",
                crate::sys::strerror(&e)
            ),
        )
    })
}

/// RFC 1929: `01 ULEN UNAME PLEN PASSWD`.
fn read_credentials(c: &mut Client) -> Result<(Vec<u8>, Secret), Failure> {
    let trunc = |e: request::ReadError| e.fail("socks5", AUTH_FAIL);
    let ver = c.read_byte().map_err(trunc)?;
    if ver != 0x01 {
        return Err(fail(
            AUTH_FAIL,
            exit::POLICY,
            format!("bad username/password version 0x{ver:02x}"),
        ));
    }
    let ulen = c.read_byte().map_err(trunc)?;
    let mut name = vec![0u8; ulen as usize];
    c.read_exact(&mut name).map_err(trunc)?;
    let plen = c.read_byte().map_err(trunc)?;
    let mut password = Secret::new(vec![0u8; plen as usize]);
    c.read_exact(password.vec_mut()).map_err(trunc)?;
    Ok((name, password))
}

/// `05 CMD 00 ATYP DST.ADDR DST.PORT` -> the command and the target text. For BIND the
/// target is the peer expected to connect; for UDP ASSOCIATE what the client said it
/// would send from, often all zeros (port 0 is accepted for both).
fn read_request(c: &mut Client, policy: &Policy) -> Result<(&'static str, String), Failure> {
    let general = reply_bytes(REP_GENERAL);
    let trunc = |e: request::ReadError| e.fail("socks5", &general);
    let mut head = [0u8; 4];
    c.read_exact(&mut head).map_err(trunc)?;
    let [ver, cmd, _rsv, atyp] = head;
    if ver != 0x05 {
        return Err(fail(
            &general,
            exit::POLICY,
            format!("bad request version 0x{ver:02x}"),
        ));
    }
    let command = match cmd {
        0x01 => "connect",
        0x02 if policy.bind => "bind",
        0x03 if policy.udp => "udp",
        _ => {
            let why = match cmd {
                0x02 => "command BIND not enabled (-B)".to_string(),
                0x03 => "command UDP ASSOCIATE not enabled (-U)".to_string(),
                _ => format!("command 0x{cmd:02x} not supported"),
            };
            return Err(fail(&reply(REP_COMMAND), exit::POLICY, why));
        }
    };
    let host = match atyp {
        0x01 => {
            let mut a = [0u8; 4];
            c.read_exact(&mut a).map_err(trunc)?;
            Host::V4(Ipv4Addr::from(a))
        }
        0x04 => {
            let mut a = [0u8; 16];
            c.read_exact(&mut a).map_err(trunc)?;
            Host::Text(Ipv6Addr::from(a).to_string())
        }
        0x03 => {
            let n = c.read_byte().map_err(trunc)?;
            let mut name = vec![0u8; n as usize];
            c.read_exact(&mut name).map_err(trunc)?;
            let text = String::from_utf8_lossy(&name).into_owned();
            if text.parse::<Ipv6Addr>().is_ok() || request::valid_name(&name) {
                Host::Text(text)
            } else {
                // Read the port too so the refusal is not lost to a reset.
                let mut p = [0u8; 2];
                let _ = c.read_exact(&mut p);
                return Err(fail(
                    &general,
                    exit::POLICY,
                    format!("invalid host name {}", request::escape(&name)),
                ));
            }
        }
        other => {
            return Err(fail(
                &reply(REP_ADDRESS),
                exit::POLICY,
                format!("address type 0x{other:02x} not supported"),
            ))
        }
    };
    let mut p = [0u8; 2];
    c.read_exact(&mut p).map_err(trunc)?;
    let port = u16::from_be_bytes(p);
    if port == 0 && command == "connect" {
        return Err(fail(&general, exit::POLICY, "target port 0"));
    }
    let target = match host {
        Host::V4(ip) => request::ipv4_target(ip, port),
        Host::Text(host) => request::target_text(&host, port),
    };
    Ok((command, target))
}

/// The target's host as the request names it.
enum Host {
    /// The usual case, written out without the formatting machinery.
    V4(Ipv4Addr),
    /// An IPv6 address or a host name.
    Text(String),
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
