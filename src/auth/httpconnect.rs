//! HTTP CONNECT (RFC 9110 §9.3.6) with `Proxy-Authorization: Basic` (RFC 7617).
//!
//! The request head ends at the first CRLF CRLF; the tunnel starts right after it, so
//! the head is read exactly: on a socket, `recv(MSG_PEEK)` shows what is waiting, and
//! only bytes that are surely part of the head are taken; on anything else, one byte at
//! a time. The head is capped, and it is wiped after use as it may carry a password.

use std::net::Ipv6Addr;

use super::password::Secret;
use super::request::{self, Client, Failure, Policy, ReadError, Request};
use crate::exit;

pub const REALM: &str = "tcpsplice";

/// What a refused client should do instead, one line for each refusal: the body a
/// person sees when a browser or `curl -v` shows it.
const NOT_CONNECT: &str = "This is a proxy, not a web server: ask it for a whole URL (curl -x \
                           http://HOST:PORT http://SITE/), tunnel with CONNECT (curl -p -x \
                           http://HOST:PORT), or use SOCKS5 (curl -x socks5h://HOST:PORT).";
const NO_CREDENTIALS: &str = "This proxy needs a user name and password: put them in the proxy \
                              URL (curl -p -x http://USER:PASSWORD@HOST:PORT).";
const MALFORMED: &str = "Malformed request: send \"CONNECT host:port HTTP/1.1\", header lines, \
                         then an empty line, each ending in CRLF.";
const TOO_BIG: &str = "The request head is too large: send the CONNECT with fewer or shorter \
                       headers.";
const TOO_SLOW: &str = "The request came too slowly: send the whole CONNECT request at once \
                        after connecting.";
const HTTP_OFF: &str = "This proxy does not take HTTP CONNECT on this port: use SOCKS5 \
                        (curl -x socks5h://HOST:PORT).";
const CHECK_FAILED: &str = "The proxy could not check the password just now: try again later.";

/// A complete refusal closing the connection, with `advice` as its one-line body.
pub fn response(status: &str, extra: &str, advice: &str) -> Vec<u8> {
    let body = format!("{advice}\n");
    format!(
        "HTTP/1.1 {status}\r\n{extra}Content-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

pub(super) fn fail(
    status: &str,
    extra: &str,
    advice: &str,
    code: i32,
    why: impl Into<String>,
) -> Failure {
    Failure::new("http", &response(status, extra, advice), code, why)
}

pub(super) fn bad_request(why: impl Into<String>) -> Failure {
    fail("400 Bad Request", "", MALFORMED, exit::POLICY, why)
}

fn challenge(why: impl Into<String>) -> Failure {
    fail(
        "407 Proxy Authentication Required",
        &format!("Proxy-Authenticate: Basic realm=\"{REALM}\"\r\n"),
        NO_CREDENTIALS,
        exit::POLICY,
        why,
    )
}

fn read_failed(e: ReadError) -> Failure {
    match e {
        ReadError::Timeout => fail(
            "408 Request Timeout",
            "",
            TOO_SLOW,
            exit::POLICY,
            e.describe(),
        ),
        ReadError::Eof => bad_request(e.describe()),
        ReadError::Io(_) => e.fail("http", b""),
    }
}

/// Runs the handshake after the first byte (a letter) has been read.
pub fn handshake(c: &mut Client, policy: &Policy, first: u8) -> Result<Request, Failure> {
    if !policy.http {
        return Err(fail(
            "403 Forbidden",
            "",
            HTTP_OFF,
            exit::POLICY,
            "http is not enabled",
        ));
    }
    let head = read_head(c, first, policy.head_cap)?;
    // A NUL is no character of HTTP (RFC 9110 5.5): a field holding one is refused
    // rather than passed on to programs that would read it as the end of a string.
    if head.as_bytes().contains(&0) {
        return Err(bad_request("NUL in the request head"));
    }
    if crate::http::is_absolute_form(head.as_bytes()) {
        return super::httpforward::handshake(policy, head.as_bytes());
    }
    let Ok(text) = std::str::from_utf8(head.as_bytes()) else {
        return Err(bad_request("request head is not UTF-8"));
    };
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let parts: Vec<&str> = request_line.split(' ').collect();
    if parts.len() != 3 || !parts[2].starts_with("HTTP/1.") {
        return Err(bad_request(format!(
            "malformed request line {}",
            request::escape(request_line.as_bytes())
        )));
    }
    if parts[0] != "CONNECT" {
        return Err(fail(
            "405 Method Not Allowed",
            "Allow: CONNECT\r\n",
            NOT_CONNECT,
            exit::POLICY,
            format!(
                "method {} not supported",
                request::escape(parts[0].as_bytes())
            ),
        ));
    }
    let target = parse_authority(parts[1]).ok_or_else(|| {
        bad_request(format!(
            "bad CONNECT target {}",
            request::escape(parts[1].as_bytes())
        ))
    })?;
    let mut authorization = None;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad_request("malformed header line"));
        };
        if name.is_empty() || name.starts_with([' ', '\t']) || name.ends_with([' ', '\t']) {
            return Err(bad_request("malformed header line"));
        }
        if authorization.is_none() && name.eq_ignore_ascii_case("proxy-authorization") {
            authorization = Some(value.trim_matches([' ', '\t']));
        }
    }
    let (user, rules) = login(policy, authorization)?;
    Ok(Request {
        target,
        user,
        rules,
        reply: "http",
        command: "connect",
    })
}

/// Checks the `Proxy-Authorization` value (if any) against the policy: Ok(user, rules),
/// or the 407 (or 503) to answer.
pub(super) fn login(
    policy: &Policy,
    authorization: Option<&str>,
) -> Result<(Option<String>, Option<String>), Failure> {
    let mut user = None;
    let mut rules = None;
    match (policy.checker.is_some(), authorization) {
        (true, Some(value)) => {
            let (name, password) = basic_credentials(value)
                .ok_or_else(|| challenge("Proxy-Authorization is not valid Basic"))?;
            match request::authenticate(policy, &name, &password) {
                Ok(r) => {
                    rules = r;
                    user = Some(String::from_utf8_lossy(&name).into_owned());
                }
                Err(Ok(())) => {
                    return Err(challenge(format!(
                        "auth failed user={}",
                        request::escape(&name)
                    )))
                }
                Err(Err(why)) => {
                    return Err(fail(
                        "503 Service Unavailable",
                        "",
                        CHECK_FAILED,
                        exit::TEMP,
                        why,
                    ))
                }
            }
        }
        (_, _) if policy.anonymous => {}
        (_, _) => return Err(challenge("no credentials")),
    }
    Ok((user, rules))
}

/// Reads the head up to and including its CRLF CRLF, never further.
fn read_head(c: &mut Client, first: u8, cap: usize) -> Result<Secret, Failure> {
    let mut head = Secret::new(Vec::with_capacity(512));
    head.vec_mut().push(first);
    let too_big = || {
        fail(
            "431 Request Header Fields Too Large",
            "",
            TOO_BIG,
            exit::POLICY,
            format!("request head larger than {cap} bytes"),
        )
    };
    let mut peeked = Secret::new(Vec::new());
    loop {
        if head.as_bytes().ends_with(b"\r\n\r\n") {
            return Ok(head);
        }
        let room = cap.saturating_sub(head.as_bytes().len());
        if room == 0 {
            return Err(too_big());
        }
        if !c.is_socket() {
            let b = c.read_byte().map_err(read_failed)?;
            head.vec_mut().push(b);
            continue;
        }
        let buf = peeked.vec_mut();
        buf.clear();
        buf.resize(room, 0);
        let n = c.peek(buf).map_err(read_failed)?;
        // Where would the head end, counting the bytes we already have?
        let have = head.as_bytes();
        let tail = &have[have.len().saturating_sub(3)..];
        let mut window: Vec<u8> = tail.to_vec();
        let mut take = n;
        for (i, &b) in buf[..n].iter().enumerate() {
            window.push(b);
            if window.ends_with(b"\r\n\r\n") {
                take = i + 1;
                break;
            }
        }
        window.iter_mut().for_each(|b| *b = 0);
        // Every byte up to `take` belongs to the head: no terminator ends before it.
        let start = head.as_bytes().len();
        head.vec_mut().resize(start + take, 0);
        c.read_exact(&mut head.vec_mut()[start..])
            .map_err(read_failed)?;
    }
}

/// `host:port` or `[v6]:port` -> the target text.
fn parse_authority(a: &str) -> Option<String> {
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        h.parse::<Ipv6Addr>().ok()?;
        (h, p)
    } else {
        let (h, p) = a.rsplit_once(':')?;
        if !request::valid_name(h.as_bytes()) {
            return None;
        }
        (h, p)
    };
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok().filter(|&p| p != 0)?;
    Some(request::target_text(host, port))
}

/// `Basic base64(user:password)`, scheme matched case-insensitively, split at the first
/// colon as RFC 7617 says the user-id has none.
fn basic_credentials(value: &str) -> Option<(Vec<u8>, Secret)> {
    let (scheme, token) = value.split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = Secret::new(base64_decode(token.trim_matches([' ', '\t']))?);
    let bytes = decoded.as_bytes();
    let colon = bytes.iter().position(|&b| b == b':')?;
    Some((
        bytes[..colon].to_vec(),
        Secret::new(bytes[colon + 1..].to_vec()),
    ))
}

/// Standard base64 with optional padding.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for b in s.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes() {
        assert_eq!(
            base64_decode("YWxpY2U6czNjcmV0").as_deref(),
            Some(&b"alice:s3cret"[..])
        );
        assert_eq!(base64_decode("YQ==").as_deref(), Some(&b"a"[..]));
        assert_eq!(base64_decode("Y*"), None);
        assert_eq!(parse_authority("[::1]:80").as_deref(), Some("[::1]:80"));
        assert_eq!(parse_authority("a.b:443").as_deref(), Some("a.b:443"));
        assert_eq!(parse_authority("a.b:0"), None);
        assert_eq!(parse_authority("a.b"), None);
        assert_eq!(parse_authority("a:b:1"), None);
    }
}
