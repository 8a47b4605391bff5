//! Plain-HTTP forwarding (absolute-form `GET http://host/path HTTP/1.1`): what the links
//! hand each other, and the pure functions over bytes that decide what is forwarded.
//!
//! - tcpsplice-auth parses the client's request head ([`rewrite_request`]), refuses what
//!   could be read two ways (400), checks the login as for CONNECT, and exports the
//!   rewritten origin-form head ([`HEAD_VAR`]) and the body's framing ([`BODY_VAR`]);
//!   the body stays unread in the socket.
//! - tcpsplice-dial connects under the same rules as for CONNECT, answers failures with
//!   403/502/504, and on success writes the head to the origin.
//! - tcpsplice forwards exactly the body ([`chunk_size_line`] and friends for a chunked
//!   one), rewrites the response head ([`rewrite_response`]) and moves the response body
//!   until the origin's end of file; whatever the client sent after its request is
//!   never forwarded.
//!
//! Heads are parsed with `httparse`; the chunked framing is a few line parsers here.

use std::net::Ipv6Addr;

/// `TCPSPLICE_REPLY` for a forwarded request.
pub const REPLY: &str = "http-forward";
/// The head to send to the origin: origin-form request line, `Host` from the URI, the
/// client's end-to-end headers, the body's framing header, `Connection: close`.
pub const HEAD_VAR: &str = "TCPSPLICE_HTTP_HEAD";
/// The body's framing: `none`, a decimal length, or `chunked`.
pub const BODY_VAR: &str = "TCPSPLICE_HTTP_BODY";
/// Set to `1` when the client waits for `100 Continue` before sending its body: the
/// expectation is not forwarded, tcpsplice-dial answers it once connected.
pub const CONTINUE_VAR: &str = "TCPSPLICE_HTTP_CONTINUE";

/// The longest chunk-size or trailer line accepted.
pub const MAX_LINE: usize = 4096;

/// How the request body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
}

impl Body {
    pub fn text(self) -> String {
        match self {
            Body::None => "none".into(),
            Body::Length(n) => n.to_string(),
            Body::Chunked => "chunked".into(),
        }
    }

    pub fn parse(s: &str) -> Option<Body> {
        match s {
            "none" => Some(Body::None),
            "chunked" => Some(Body::Chunked),
            _ if !s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()) => {
                s.parse().ok().map(Body::Length)
            }
            _ => None,
        }
    }
}

/// A complete response from the proxy itself: `status`, a line of text, and the
/// connection closed after it.
pub fn error_response(status: &str, text: &str) -> Vec<u8> {
    let body = format!("{text}\n");
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// An absolute-form request made ready for the origin.
#[derive(Debug, PartialEq, Eq)]
pub struct Forward {
    /// `host:port`, `[v6]:port`: what tcpsplice-dial connects to.
    pub target: String,
    /// The head to send, ending in CRLF CRLF.
    pub head: Vec<u8>,
    pub body: Body,
    /// The client sent `Expect: 100-continue` (and a body).
    pub expect_continue: bool,
    /// The value of the first `Proxy-Authorization`, if any (not in `head`).
    pub authorization: Option<Vec<u8>>,
}

/// Whether the request-target of `head` is in absolute form (`scheme:...`), the form
/// a client uses toward a proxy for everything but CONNECT.
pub fn is_absolute_form(head: &[u8]) -> bool {
    let line = head.split(|&b| b == b'\r').next().unwrap_or(&[]);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return false;
    };
    if method == b"CONNECT" {
        return false;
    }
    let scheme_len = target
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || b == b'+' || b == b'-' || b == b'.'))
        .unwrap_or(target.len());
    scheme_len > 0 && target[0].is_ascii_alphabetic() && target.get(scheme_len) == Some(&b':')
}

/// Hop-by-hop request headers, never forwarded (RFC 9110 §7.6.1), and the ones we write
/// ourselves (`Host`, the framing).
const DROPPED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
    "host",
    "content-length",
    "transfer-encoding",
];

/// The comma-separated elements of a list-valued field, trimmed, lowercased.
fn list_elements(value: &[u8]) -> Vec<String> {
    value
        .split(|&b| b == b',')
        .map(|e| {
            String::from_utf8_lossy(e)
                .trim_matches([' ', '\t'])
                .to_ascii_lowercase()
        })
        .collect()
}

/// Every LF preceded by CR and every CR followed by LF: httparse also takes bare LF,
/// which another parser might not read the same way.
fn strict_line_ends(head: &[u8]) -> bool {
    head.iter().enumerate().all(|(i, &b)| match b {
        b'\n' => i > 0 && head[i - 1] == b'\r',
        b'\r' => head.get(i + 1) == Some(&b'\n'),
        _ => true,
    })
}

/// Parses the client's head (ending in CRLF CRLF) and builds the request for the origin.
/// Err says why it is refused with 400.
pub fn rewrite_request(head: &[u8]) -> Result<Forward, String> {
    if !strict_line_ends(head) {
        return Err("bare CR or LF in the request head".into());
    }
    // httparse skips empty lines before the request line; whoever read the head decides
    // whether one is allowed, and hands over the head from its request line.
    if head.starts_with(b"\r\n") {
        return Err("empty line before the request line".into());
    }
    // httparse refuses control characters in values already; the head goes into the
    // environment, where a NUL could not be.
    if head.contains(&0) {
        return Err("NUL in the request head".into());
    }
    let mut headers = vec![httparse::EMPTY_HEADER; 512];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Ok(_) => return Err("incomplete request head".into()),
        Err(e) => return Err(format!("unparsable request head ({e})")),
    }
    let (Some(method), Some(uri), Some(version)) = (req.method, req.path, req.version) else {
        return Err("incomplete request line".into());
    };
    let u = parse_uri(uri)?;
    let path = if u.path.is_empty() && method == "OPTIONS" {
        "*".to_string()
    } else if u.path.is_empty() || u.path.starts_with('?') {
        format!("/{}", u.path)
    } else {
        u.path.to_string()
    };
    let mut connection_listed = Vec::new();
    let mut lengths = Vec::new();
    let mut codings = Vec::new();
    let mut has_te = false;
    let mut authorization = None;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        match name.as_str() {
            "connection" => connection_listed.extend(list_elements(h.value)),
            "content-length" => {
                for e in list_elements(h.value) {
                    if e.is_empty() || e.len() > 19 || !e.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(format!(
                            "bad Content-Length {}",
                            crate::auth::request::escape(h.value)
                        ));
                    }
                    let n: u64 = e.parse().map_err(|_| "bad Content-Length".to_string())?;
                    lengths.push(n);
                }
            }
            "transfer-encoding" => {
                has_te = true;
                codings.extend(list_elements(h.value));
            }
            "proxy-authorization" if authorization.is_none() => {
                authorization = Some(h.value.to_vec());
            }
            "expect" if list_elements(h.value) == ["100-continue"] => expect_continue = true,
            _ => {}
        }
    }
    let body = match (has_te, lengths.first()) {
        (true, Some(_)) => return Err("both Content-Length and Transfer-Encoding".into()),
        (true, None) if codings == ["chunked"] && version == 1 => Body::Chunked,
        (true, None) => {
            return Err(format!(
                "Transfer-Encoding other than chunked ({})",
                codings.join(",")
            ))
        }
        (false, Some(&n)) if lengths.iter().all(|&l| l == n) => Body::Length(n),
        (false, Some(_)) => return Err("several different Content-Lengths".into()),
        (false, None) => Body::None,
    };
    let expect_continue = expect_continue && body != Body::None && body != Body::Length(0);
    let mut out = Vec::with_capacity(head.len() + 64);
    out.extend_from_slice(format!("{method} {path} HTTP/1.{version}\r\n").as_bytes());
    out.extend_from_slice(format!("Host: {}\r\n", u.host_header).as_bytes());
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        if DROPPED.contains(&name.as_str())
            || connection_listed.contains(&name)
            || (name == "expect" && expect_continue)
        {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    match body {
        Body::None => {}
        Body::Length(n) => out.extend_from_slice(format!("Content-Length: {n}\r\n").as_bytes()),
        Body::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(Forward {
        target: u.target,
        head: out,
        body,
        expect_continue,
        authorization,
    })
}

/// The parts of an `http://` URI a proxy needs.
#[derive(Debug, PartialEq, Eq)]
struct Uri<'a> {
    target: String,
    host_header: String,
    /// Path and query as sent, possibly empty.
    path: &'a str,
}

fn parse_uri(uri: &str) -> Result<Uri<'_>, String> {
    let shown = || crate::auth::request::escape(uri.as_bytes());
    let (scheme, rest) = uri
        .split_once(':')
        .ok_or_else(|| format!("not an absolute URI {}", shown()))?;
    if scheme.eq_ignore_ascii_case("https") {
        return Err(format!("https in absolute form (use CONNECT) {}", shown()));
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(format!("scheme other than http {}", shown()));
    }
    let rest = rest
        .strip_prefix("//")
        .ok_or_else(|| format!("no authority in {}", shown()))?;
    if rest.contains('#') {
        return Err(format!("fragment in the URI {}", shown()));
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.contains('@') {
        return Err(format!("userinfo in the URI {}", shown()));
    }
    let (host, port) = if let Some(r) = authority.strip_prefix('[') {
        let (h, after) = r
            .split_once(']')
            .ok_or_else(|| format!("bad authority in {}", shown()))?;
        h.parse::<Ipv6Addr>()
            .map_err(|_| format!("bad IPv6 address in {}", shown()))?;
        let port = match after {
            "" => None,
            a => Some(
                a.strip_prefix(':')
                    .ok_or_else(|| format!("bad authority in {}", shown()))?,
            ),
        };
        (h, port)
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if !host.contains(':') && !crate::auth::request::valid_name(host.as_bytes()) {
        return Err(format!("bad host in {}", shown()));
    }
    let port = match port {
        None | Some("") => 80,
        Some(p) if p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("bad port in {}", shown()))?,
        Some(_) => return Err(format!("bad port in {}", shown())),
    };
    let host_header = match authority.strip_suffix(':') {
        Some(a) => a.to_string(),
        None => authority.to_string(),
    };
    Ok(Uri {
        target: crate::auth::request::target_text(host, port),
        host_header,
        path,
    })
}

/// A chunk-size line (`1*HEXDIG [chunk-ext] CRLF`, the CRLF included): the size.
/// Extensions are checked for control characters and dropped when forwarding.
pub fn chunk_size_line(line: &[u8]) -> Result<u64, &'static str> {
    let body = line
        .strip_suffix(b"\r\n")
        .ok_or("chunk-size line without CRLF")?;
    let digits = body
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(body.len());
    if digits == 0 {
        return Err("chunk size is not hexadecimal");
    }
    let mut size: u64 = 0;
    for &d in &body[..digits] {
        let v = (d as char)
            .to_digit(16)
            .ok_or("chunk size is not hexadecimal")?;
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(v)))
            .ok_or("chunk size too large")?;
    }
    let ext = &body[digits..];
    let ext_start = ext.iter().position(|&b| b != b' ' && b != b'\t');
    match ext_start {
        None if ext.is_empty() => {}
        Some(i) if ext[i] == b';' => {}
        _ => return Err("junk after the chunk size"),
    }
    if ext.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err("control character in a chunk extension");
    }
    Ok(size)
}

/// The line after a chunk's data: exactly CRLF.
pub fn chunk_data_end(line: &[u8]) -> Result<(), &'static str> {
    if line == b"\r\n" {
        Ok(())
    } else {
        Err("chunk data not followed by CRLF")
    }
}

/// A line of the trailer section: Ok(true) for the empty line that ends the body,
/// Ok(false) for a field line (forwarded as it is).
pub fn trailer_line(line: &[u8]) -> Result<bool, &'static str> {
    let body = line
        .strip_suffix(b"\r\n")
        .ok_or("trailer line without CRLF")?;
    if body.is_empty() {
        return Ok(true);
    }
    let colon = body
        .iter()
        .position(|&b| b == b':')
        .ok_or("trailer line without a colon")?;
    let name_ok = colon > 0 && body[..colon].iter().all(|&b| is_tchar(b));
    let value_ok = body[colon + 1..]
        .iter()
        .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f));
    if name_ok && value_ok {
        Ok(false)
    } else {
        Err("malformed trailer line")
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Scans a whole chunked body from the start of `input` with the line parsers above:
/// Ok(Some(n)) when it ends after `n` bytes, Ok(None) when more is needed. What the
/// relay does incrementally, in one function that can be fuzzed and tested.
pub fn scan_chunked(input: &[u8]) -> Result<Option<usize>, &'static str> {
    let mut pos = 0;
    let line = |pos: usize| -> Result<Option<&[u8]>, &'static str> {
        let rest = &input[pos..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) if i < MAX_LINE => Ok(Some(&rest[..=i])),
            Some(_) => Err("line too long"),
            None if rest.len() >= MAX_LINE => Err("line too long"),
            None => Ok(None),
        }
    };
    loop {
        let Some(l) = line(pos)? else { return Ok(None) };
        pos += l.len();
        let size = chunk_size_line(l)?;
        if size == 0 {
            break;
        }
        let left = (input.len() - pos) as u64;
        if left < size {
            return Ok(None);
        }
        pos += size as usize;
        let Some(l) = line(pos)? else { return Ok(None) };
        pos += l.len();
        chunk_data_end(l)?;
    }
    loop {
        let Some(l) = line(pos)? else { return Ok(None) };
        pos += l.len();
        if trailer_line(l)? {
            return Ok(Some(pos));
        }
    }
}

/// A response head from the origin, parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum Response {
    /// More bytes are needed.
    Partial,
    /// An interim response (1xx but 101) of `len` bytes, forwarded as it is.
    Interim { len: usize },
    /// The final response head of `len` bytes, rewritten.
    Final { len: usize, head: Vec<u8> },
}

/// Hop-by-hop response headers, not forwarded; `Connection: close` replaces them.
const DROPPED_RESPONSE: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "upgrade",
];

/// Parses a response head at the start of `buf`. The final one is rewritten for the
/// client: HTTP/1.1, hop-by-hop headers removed, `Connection: close` added; the framing
/// headers stay (the body is forwarded as it is, until the origin closes).
pub fn rewrite_response(buf: &[u8]) -> Result<Response, String> {
    let mut headers = vec![httparse::EMPTY_HEADER; 512];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Response::Partial),
        Err(e) => return Err(format!("unparsable response head ({e})")),
    };
    let code = resp.code.unwrap_or(0);
    if (100..200).contains(&code) && code != 101 {
        return Ok(Response::Interim { len });
    }
    let mut listed = Vec::new();
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            listed.extend(list_elements(h.value));
        }
    }
    let mut out = Vec::with_capacity(len + 32);
    let reason = resp.reason.unwrap_or("");
    out.extend_from_slice(format!("HTTP/1.1 {code:03} {reason}\r\n").as_bytes());
    for h in resp.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        let framing = name == "content-length" || name == "transfer-encoding";
        if DROPPED_RESPONSE.contains(&name.as_str()) || (listed.contains(&name) && !framing) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    Ok(Response::Final { len, head: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(head: &str) -> Result<Forward, String> {
        rewrite_request(head.as_bytes())
    }

    fn head_of(head: &str) -> String {
        String::from_utf8(fwd(head).expect(head).head).expect("utf-8")
    }

    #[test]
    fn absolute_form() {
        assert!(is_absolute_form(b"GET http://a/ HTTP/1.1\r\n"));
        assert!(is_absolute_form(b"GET ftp://a/ HTTP/1.1\r\n"));
        assert!(!is_absolute_form(b"GET / HTTP/1.1\r\n"));
        assert!(!is_absolute_form(b"GET /a:b HTTP/1.1\r\n"));
        assert!(!is_absolute_form(b"CONNECT a:443 HTTP/1.1\r\n"));
        assert!(!is_absolute_form(b"GET * HTTP/1.1\r\n"));
    }

    #[test]
    fn rewrites_the_request() {
        let h = head_of(
            "GET http://Example.com:8080/a/b?c=d HTTP/1.1\r\nHost: evil\r\nUser-Agent: t\r\n\
             Proxy-Authorization: Basic eDp5\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\
             Keep-Alive: 5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X\r\n\
             Upgrade: h2c\r\nAccept: */*\r\n\r\n",
        );
        assert_eq!(
            h,
            "GET /a/b?c=d HTTP/1.1\r\nHost: Example.com:8080\r\nUser-Agent: t\r\n\
             Accept: */*\r\nConnection: close\r\n\r\n"
        );
        let f =
            fwd("GET http://a.b HTTP/1.0\r\nProxy-Authorization: Basic eDp5\r\n\r\n").expect("ok");
        assert_eq!(f.target, "a.b:80");
        assert_eq!(f.authorization.as_deref(), Some(&b"Basic eDp5"[..]));
        assert_eq!(
            String::from_utf8_lossy(&f.head),
            "GET / HTTP/1.0\r\nHost: a.b\r\nConnection: close\r\n\r\n"
        );
        assert!(head_of("OPTIONS http://a HTTP/1.1\r\n\r\n").starts_with("OPTIONS * HTTP/1.1\r\n"));
        assert!(head_of("OPTIONS http://a/ HTTP/1.1\r\n\r\n").starts_with("OPTIONS / HTTP/1.1\r\n"));
        assert!(head_of("GET http://a?x HTTP/1.1\r\n\r\n").starts_with("GET /?x HTTP/1.1\r\n"));
        assert_eq!(
            fwd("GET http://[::1]:81/ HTTP/1.1\r\n\r\n")
                .expect("v6")
                .target,
            "[::1]:81"
        );
        assert_eq!(
            fwd("GET http://a:/ HTTP/1.1\r\n\r\n").expect("a:").target,
            "a:80"
        );
    }

    #[test]
    fn framing() {
        let body = |h: &str| fwd(h).map(|f| f.body);
        assert_eq!(
            body("POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\n\r\n"),
            Ok(Body::Length(5))
        );
        assert_eq!(
            body("POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5, 5\r\n\r\n"),
            Ok(Body::Length(5))
        );
        assert_eq!(
            body("POST http://a/ HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Ok(Body::Chunked)
        );
        for bad in [
            "POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nContent-Length: \r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked,\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
            "POST http://a/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\n Transfer-Encoding: chunked\r\n\r\n",
            "POST http://a/ HTTP/1.1\r\nX: y\nTransfer-Encoding: chunked\r\n\r\n",
            "GET http://a/  HTTP/1.1\r\n\r\n",
            "GET https://a/ HTTP/1.1\r\n\r\n",
            "GET ftp://a/ HTTP/1.1\r\n\r\n",
            "GET http://u:p@a/ HTTP/1.1\r\n\r\n",
            "GET http://a/#f HTTP/1.1\r\n\r\n",
            "GET http:///x HTTP/1.1\r\n\r\n",
            "GET http://a:0/ HTTP/1.1\r\n\r\n",
            "GET http://a:65536/ HTTP/1.1\r\n\r\n",
            "GET http://a b/ HTTP/1.1\r\n\r\n",
            "GET http://[::1/ HTTP/1.1\r\n\r\n",
            "GET http://a/ HTTP/2.0\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nX: a\0b\r\n\r\n",
            "GET http://a/\0 HTTP/1.1\r\n\r\n",
            "\r\nGET http://a/ HTTP/1.1\r\n\r\n",
        ] {
            assert!(fwd(bad).is_err(), "{bad:?}");
        }
        // Connection cannot take the framing away, and what it names is dropped.
        let h = head_of(
            "POST http://a/ HTTP/1.1\r\nConnection: Content-Length, Host\r\nContent-Length: 3\r\n\r\n",
        );
        assert!(h.contains("\r\nContent-Length: 3\r\n"), "{h}");
        assert!(h.contains("\r\nHost: a\r\n"), "{h}");
        let f = fwd("PUT http://a/ HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
            .expect("ok");
        assert!(f.expect_continue);
        assert!(!String::from_utf8_lossy(&f.head)
            .to_ascii_lowercase()
            .contains("expect"));
        let f = fwd("GET http://a/ HTTP/1.1\r\nExpect: 100-continue\r\n\r\n").expect("ok");
        assert!(!f.expect_continue);
    }

    #[test]
    fn chunked_lines() {
        assert_eq!(chunk_size_line(b"1a\r\n"), Ok(26));
        assert_eq!(chunk_size_line(b"0\r\n"), Ok(0));
        assert_eq!(chunk_size_line(b"A;name=val\r\n"), Ok(10));
        assert_eq!(chunk_size_line(b"A ; x\r\n"), Ok(10));
        for bad in [
            &b"\r\n"[..],
            b"0x1\r\n",
            b"-1\r\n",
            b" 1\r\n",
            b"1\n",
            b"1 2\r\n",
            b"10000000000000000\r\n",
            b"1;\x01\r\n",
        ] {
            assert!(chunk_size_line(bad).is_err(), "{bad:?}");
        }
        assert_eq!(scan_chunked(b"3\r\nabc\r\n0\r\n\r\nGET"), Ok(Some(13)));
        assert_eq!(
            scan_chunked(b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"),
            Ok(Some(21))
        );
        assert_eq!(scan_chunked(b"3\r\nabc\r\n0\r\n"), Ok(None));
        assert_eq!(scan_chunked(b"3\r\nab"), Ok(None));
        assert!(scan_chunked(b"3\r\nabcd\r\n").is_err());
        assert!(scan_chunked(b"3\r\nabc\r\n0\r\nbad\r\n\r\n").is_err());
    }

    #[test]
    fn rewrites_the_response() {
        let r = rewrite_response(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive, X-H, Content-Length\r\nX-H: 1\r\n\
              Keep-Alive: t=5\r\nContent-Length: 2\r\n\r\nhi",
        )
        .expect("ok");
        let Response::Final { len, head } = r else {
            panic!("{r:?}")
        };
        assert_eq!(len, 108);
        assert_eq!(
            String::from_utf8_lossy(&head),
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(
            rewrite_response(b"HTTP/1.1 100 Continue\r\n\r\nHTTP"),
            Ok(Response::Interim { len: 25 })
        );
        assert_eq!(
            rewrite_response(b"HTTP/1.1 200 OK\r\n"),
            Ok(Response::Partial)
        );
        assert!(rewrite_response(b"HTTP/1.1 2000 OK\r\n\r\n").is_err());
    }

    /// Mutated requests, responses and bodies (a fixed-seed generator, so a failure
    /// repeats): nothing panics, and whatever is accepted is a head with one reading.
    #[test]
    fn mutations_never_panic_and_accepted_heads_are_unambiguous() {
        let seeds: [&[u8]; 4] = [
            b"POST http://a.b:81/p?q HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\
              Connection: te, x-a\r\nX-A: 1\r\nProxy-Authorization: Basic eDp5\r\n\r\n",
            b"PUT http://[::1]/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: close, x\r\nContent-Length: 2\r\n\r\nhi",
            b"5;a=b\r\nhello\r\n0\r\nT: 1\r\n\r\n",
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"\r\n :;,0aAzZ9-\t\x00\x7f\xff/?#@[]chunkedContent-Length";
        for round in 0..20_000 {
            let mut v = seeds[round % seeds.len()].to_vec();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % (v.len() + 1);
                let b = alphabet[(next() as usize) % alphabet.len()];
                match next() % 3 {
                    0 if at < v.len() => v[at] = b,
                    1 if at < v.len() => {
                        v.remove(at);
                    }
                    _ => v.insert(at, b),
                }
            }
            let _ = rewrite_response(&v);
            let _ = scan_chunked(&v);
            if let Ok(f) = rewrite_request(&v) {
                let mut h = [httparse::EMPTY_HEADER; 64];
                let mut r = httparse::Request::new(&mut h);
                assert_eq!(
                    r.parse(&f.head),
                    Ok(httparse::Status::Complete(f.head.len())),
                    "{:?}",
                    String::from_utf8_lossy(&v)
                );
                let framing = r
                    .headers
                    .iter()
                    .filter(|h| {
                        h.name.eq_ignore_ascii_case("content-length")
                            || h.name.eq_ignore_ascii_case("transfer-encoding")
                    })
                    .count();
                assert!(framing <= 1, "{:?}", String::from_utf8_lossy(&f.head));
                assert!(
                    !String::from_utf8_lossy(&f.head)
                        .to_ascii_lowercase()
                        .contains("\nproxy-authorization:"),
                    "{:?}",
                    String::from_utf8_lossy(&f.head)
                );
            }
        }
    }
}
