//! tcpsplice-auth's handshake, the real code (`auth::handshake::run`) on a socketpair or
//! on a pair of pipes in this process.
//!
//! Input: one byte of configuration (which protocols, credentials or no-auth, the head
//! cap, and the transport: bit 7 set = pipes), one byte of piece size, then the client's
//! bytes. The client's bytes and [`TRAILER`] (what a client pipelines behind its request)
//! are written to the handshake's input, at once (piece size 0) or in pieces, each when
//! the handshake has read the one before (so that a peek sees part of an HTTP head), and
//! the input is then closed; what the handshake left unread and what it answered are read
//! back.
//!
//! Checked, against a model of SOCKS5 (RFC 1928/1929), SOCKS4/4a and HTTP CONNECT
//! written here:
//! - exactly the request is consumed, nothing past it: on success the handshake read
//!   up to the request's end and not one byte further; on a refusal, never past it;
//!   what it left is the stream's tail, unchanged;
//! - for SOCKS, success exactly when the model accepts, with the model's target, user
//!   and intermediate replies; for HTTP, success only for a whole head whose request
//!   line names the target exported: a CONNECT's authority, or the host and port of
//!   an `http://` URI in absolute form (then forwarded);
//! - what is exported (target, user, rules, reply) has no NUL; the target parses in the
//!   dialer (`split_target`) back to itself; the user is a name the checker accepted;
//! - the checker never sees a password or user name that should not be checked.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tcpsplice::auth::handshake;
use tcpsplice::auth::password::Secret;
use tcpsplice::auth::request::{Checker, Client, Failure, Policy, Request, Verdict};
use tcpsplice::dial::dialer::split_target;
use tcpsplice::{exit, rules};

use crate::user_name_ok;

/// Bytes a client sends behind its request: they belong to the programs after the exec.
pub const TRAILER: &[u8] = b"\x00PIPELINED\r\n\r\n\x05\x01\x00\x01bytes";

/// Client input beyond this is cut, so that a write never fills a pipe.
const MAX_CLIENT: usize = 16 * 1024;

/// Bytes sent in pieces at most this many pieces, then the rest at once.
const MAX_PIECES: usize = 64;

/// Head caps a configuration byte picks from (tcpsplice-auth -m takes 256 to 1m).
const CAPS: [usize; 4] = [8192, 256, 1024, 20000];

/// Rules the checker gives the user `bob`.
const BOB_RULES: &str = "10.0.0.0/8 *:443";

/// What the harness's checker answers: a password starting `pw` is right, `tmp` makes
/// the check fail, anything else is wrong; any user name.
fn checker_says(password: &[u8]) -> Answer {
    if password.starts_with(b"pw") {
        Answer::Accept
    } else if password.starts_with(b"tmp") {
        Answer::Temporary
    } else {
        Answer::Reject
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Answer {
    Accept,
    Reject,
    Temporary,
}

/// The checker tcpsplice-auth is given. It also checks what it is asked.
#[derive(Default)]
struct Harness {
    accepted: RefCell<Vec<Vec<u8>>>,
    temporary: Cell<bool>,
}

impl Checker for Harness {
    fn check(&self, user: &[u8], password: &Secret) -> Verdict {
        let pw = password.as_bytes();
        assert!(
            pw.len() <= 4096 && !pw.contains(&0),
            "the checker was asked about a password that must not be checked ({} bytes)",
            pw.len()
        );
        assert!(
            user_name_ok(user),
            "the checker was asked about the user name {user:?}"
        );
        match checker_says(pw) {
            Answer::Accept => {
                self.accepted.borrow_mut().push(user.to_vec());
                Verdict::Accept {
                    rules: (user == b"bob").then(|| BOB_RULES.to_string()),
                }
            }
            Answer::Reject => Verdict::Reject,
            Answer::Temporary => {
                self.temporary.set(true);
                Verdict::Temporary("the harness says so".into())
            }
        }
    }
}

/// What the configuration byte says, as the model reads it.
#[derive(Clone, Copy, Debug)]
struct Config {
    socks5: bool,
    socks4: bool,
    http: bool,
    anonymous: bool,
    checker: bool,
    head_cap: usize,
    pipes: bool,
    /// The client's bytes come in pieces of this size, each once the one before is
    /// read; 0: all at once.
    chunk: usize,
}

impl Config {
    fn new(b: u8, chunk: u8) -> Config {
        Config {
            socks5: b & 0x01 == 0,
            socks4: b & 0x02 == 0,
            http: b & 0x04 == 0,
            anonymous: b & 0x08 != 0,
            checker: b & 0x10 == 0,
            head_cap: CAPS[usize::from(b >> 5) & 3],
            pipes: b & 0x80 != 0,
            chunk: usize::from(chunk),
        }
    }
}

/// A request the model accepts: what the handshake must report.
#[derive(Debug)]
struct Accepted {
    target: String,
    user: Option<Vec<u8>>,
    reply: &'static str,
    /// What the handshake itself sends (SOCKS5's method choice and auth status).
    sent: Vec<u8>,
}

/// The model's reading of the stream.
#[derive(Debug)]
enum Model {
    /// The stream ends before the request does: the handshake must fail.
    Truncated,
    /// The request, or what is read of it before a refusal, ends at `end`. `accept`:
    /// what the handshake must report, or None when it must fail.
    Whole {
        end: usize,
        accept: Option<Accepted>,
    },
    /// An HTTP head that ends at `end` (its acceptance is not modelled); a success must
    /// name `target` with `reply`: the authority of a `CONNECT target HTTP/1.x` request
    /// line (`http`), or of an absolute-form `http://` request (`http-forward`).
    Head {
        end: usize,
        target: Option<(String, &'static str)>,
    },
}

fn refused(end: usize) -> Model {
    Model::Whole { end, accept: None }
}

/// The bytes of the stream from `at`, `n` of them, or None when it is shorter.
fn field(s: &[u8], at: usize, n: usize) -> Option<&[u8]> {
    s.get(at..at.checked_add(n)?)
}

/// A host name tcpsplice passes to the resolver: 1 to 255 letters, digits, `-`, `.`,
/// `_` (DESIGN.md's rule for names from clients).
fn name_ok(name: &[u8]) -> bool {
    (1..=255).contains(&name.len())
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

fn target_of(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The checker's answer as tcpsplice-auth must get it: passwords over 4096 bytes or
/// with a NUL, and bad user names, are refused without asking.
fn login(cfg: &Config, user: &[u8], password: &[u8]) -> Answer {
    if !cfg.checker || password.len() > 4096 || password.contains(&0) || !user_name_ok(user) {
        return Answer::Reject;
    }
    checker_says(password)
}

fn model_socks5(s: &[u8], cfg: &Config) -> Model {
    if !cfg.socks5 {
        return refused(1);
    }
    let Some(&n) = s.get(1) else {
        return Model::Truncated;
    };
    let Some(methods) = field(s, 2, usize::from(n)) else {
        return Model::Truncated;
    };
    let mut at = 2 + usize::from(n);
    let method = if cfg.checker && methods.contains(&0x02) {
        0x02
    } else if cfg.anonymous && methods.contains(&0x00) {
        0x00
    } else {
        return refused(at);
    };
    let mut sent = vec![0x05, method];
    let mut user = None;
    if method == 0x02 {
        let Some(&ver) = s.get(at) else {
            return Model::Truncated;
        };
        at += 1;
        if ver != 0x01 {
            return refused(at);
        }
        let Some(&ulen) = s.get(at) else {
            return Model::Truncated;
        };
        let Some(name) = field(s, at + 1, usize::from(ulen)) else {
            return Model::Truncated;
        };
        at += 1 + usize::from(ulen);
        let Some(&plen) = s.get(at) else {
            return Model::Truncated;
        };
        let Some(password) = field(s, at + 1, usize::from(plen)) else {
            return Model::Truncated;
        };
        at += 1 + usize::from(plen);
        if login(cfg, name, password) != Answer::Accept {
            return refused(at);
        }
        user = Some(name.to_vec());
        sent.extend_from_slice(&[0x01, 0x00]);
    }
    let Some(head) = field(s, at, 4) else {
        return Model::Truncated;
    };
    at += 4;
    // RSV (head[2]) is not checked.
    if head[0] != 0x05 || head[1] != 0x01 {
        return refused(at);
    }
    let host = match head[3] {
        0x01 => {
            let Some(a) = field(s, at, 4) else {
                return Model::Truncated;
            };
            at += 4;
            Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string()
        }
        0x04 => {
            let Some(a) = field(s, at, 16) else {
                return Model::Truncated;
            };
            at += 16;
            Ipv6Addr::from(<[u8; 16]>::try_from(a).unwrap()).to_string()
        }
        0x03 => {
            let Some(&len) = s.get(at) else {
                return Model::Truncated;
            };
            let Some(name) = field(s, at + 1, usize::from(len)) else {
                return Model::Truncated;
            };
            at += 1 + usize::from(len);
            let v6 = std::str::from_utf8(name)
                .ok()
                .is_some_and(|t| t.parse::<Ipv6Addr>().is_ok());
            if !v6 && !name_ok(name) {
                // The port is read too, so that the refusal is not lost to a reset.
                return refused(at + 2);
            }
            String::from_utf8(name.to_vec()).unwrap()
        }
        _ => return refused(at),
    };
    let Some(p) = field(s, at, 2) else {
        return Model::Truncated;
    };
    at += 2;
    let port = u16::from_be_bytes([p[0], p[1]]);
    if port == 0 {
        return refused(at);
    }
    Model::Whole {
        end: at,
        accept: Some(Accepted {
            target: target_of(&host, port),
            user,
            reply: "socks5",
            sent,
        }),
    }
}

/// A NUL-terminated SOCKS4 field from `at`: Ok((bytes, end)), or Err(end) when no NUL
/// comes within 256 bytes (then 256 bytes are read), or None when the stream ends first.
fn cstring(s: &[u8], at: usize) -> Option<Result<(&[u8], usize), usize>> {
    let tail = s.get(at..).unwrap_or(&[]);
    match tail.iter().position(|&b| b == 0) {
        Some(i) if i <= 255 => Some(Ok((&tail[..i], at + i + 1))),
        _ if tail.len() >= 256 => Some(Err(at + 256)),
        _ => None,
    }
}

fn model_socks4(s: &[u8], cfg: &Config) -> Model {
    let Some(head) = field(s, 1, 7) else {
        return Model::Truncated;
    };
    let (cd, port) = (head[0], u16::from_be_bytes([head[1], head[2]]));
    let ip = Ipv4Addr::new(head[3], head[4], head[5], head[6]);
    let at = match cstring(s, 8) {
        None => return Model::Truncated,
        Some(Err(end)) => return refused(end),
        Some(Ok((_userid, end))) => end,
    };
    let o = ip.octets();
    let (host, at) = if o[..3] == [0, 0, 0] && o[3] != 0 {
        match cstring(s, at) {
            None => return Model::Truncated,
            Some(Err(end)) => return refused(end),
            Some(Ok((name, end))) if name_ok(name) => {
                (String::from_utf8(name.to_vec()).unwrap(), end)
            }
            Some(Ok((_, end))) => return refused(end),
        }
    } else {
        (ip.to_string(), at)
    };
    // SOCKS4 has no authentication: served only to no-auth clients.
    if !cfg.socks4 || !cfg.anonymous || cd != 0x01 || port == 0 {
        return refused(at);
    }
    Model::Whole {
        end: at,
        accept: Some(Accepted {
            target: target_of(&host, port),
            user: None,
            reply: "socks4",
            sent: Vec::new(),
        }),
    }
}

/// The target a `CONNECT host:port HTTP/1.x` request line names, as it is exported:
/// an IPv6 address in brackets as written, a name, the port as a number.
fn connect_target(head: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(head).ok()?;
    let line = text.split("\r\n").next()?;
    let mut parts = line.split(' ');
    let (method, authority, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || method != "CONNECT" || !version.starts_with("HTTP/1.") {
        return None;
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        h.parse::<Ipv6Addr>().ok()?;
        (h, p)
    } else {
        let (h, p) = authority.rsplit_once(':')?;
        if !name_ok(h.as_bytes()) {
            return None;
        }
        (h, p)
    };
    if !(1..=5).contains(&port.len()) || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u32 = port.parse().ok()?;
    if port == 0 || port > 65535 {
        return None;
    }
    Some(target_of(host, port as u16))
}

/// The target of a forwarded request (`GET http://host[:port]/... HTTP/1.x`, any method
/// but CONNECT): the URI's host, the port 80 unless given.
fn forward_target(head: &[u8]) -> Option<String> {
    // Only the request line need be text: header values may hold obs-text.
    let line = head.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let (method, uri, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || method == "CONNECT" || !version.starts_with("HTTP/1.") {
        return None;
    }
    if !uri.as_bytes().get(..7)?.eq_ignore_ascii_case(b"http://") {
        return None;
    }
    let authority = uri[7..].split(['/', '?']).next()?;
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, p) = rest.split_once(']')?;
        h.parse::<Ipv6Addr>().ok()?;
        (h, p.strip_prefix(':').unwrap_or(p))
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, p),
            None => (authority, ""),
        }
    };
    if !host.contains(':') && !name_ok(host.as_bytes()) {
        return None;
    }
    let port: u32 = if port.is_empty() {
        80
    } else {
        port.parse().ok()?
    };
    if port == 0 || port > 65535 {
        return None;
    }
    Some(target_of(host, port as u16))
}

fn model_http(s: &[u8], cfg: &Config) -> Model {
    if !cfg.http {
        return refused(1);
    }
    let cap = cfg.head_cap;
    match s.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) if i + 4 <= cap => Model::Head {
            end: i + 4,
            target: connect_target(&s[..i + 4])
                .map(|t| (t, "http"))
                .or_else(|| forward_target(&s[..i + 4]).map(|t| (t, "http-forward"))),
        },
        // Too long: refused once the cap is read.
        _ if s.len() >= cap => refused(cap),
        _ => Model::Truncated,
    }
}

fn model(s: &[u8], cfg: &Config) -> Model {
    match s[0] {
        0x05 => model_socks5(s, cfg),
        0x04 => model_socks4(s, cfg),
        b if b.is_ascii_alphabetic() => model_http(s, cfg),
        b'\r' | b'\n' => model_after_empty_line(s, cfg),
        _ => refused(1),
    }
}

/// One empty line (CRLF or LF) before an HTTP request line is ignored (RFC 9112 2.2):
/// the HTTP model, `skip` bytes later; anything else after it is refused at once.
fn model_after_empty_line(s: &[u8], cfg: &Config) -> Model {
    let skip = match (s[0], s.get(1)) {
        (b'\r', Some(b'\n')) => 2,
        (b'\r', None) => return Model::Truncated,
        (b'\r', Some(_)) => return refused(2),
        _ => 1,
    };
    match s.get(skip) {
        None => Model::Truncated,
        Some(b) if b.is_ascii_alphabetic() => match model_http(&s[skip..], cfg) {
            Model::Truncated => Model::Truncated,
            Model::Whole { end, accept } => Model::Whole {
                end: end + skip,
                accept,
            },
            Model::Head { end, target } => Model::Head {
                end: end + skip,
                target,
            },
        },
        Some(_) => refused(skip + 1),
    }
}

pub fn check<T>(r: io::Result<T>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("harness: unable to {what}: {e}"))
}

pub fn cvt(r: libc::c_int, what: &str) -> libc::c_int {
    if r < 0 {
        check::<()>(Err(io::Error::last_os_error()), what);
    }
    r
}

pub fn write_all(fd: RawFd, mut b: &[u8]) {
    while !b.is_empty() {
        // SAFETY: writes from memory we own, at most b.len() bytes.
        let n = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        b = &b[cvt(n as libc::c_int, "write") as usize..];
    }
}

fn read_to_end(fd: RawFd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: reads into memory we own, at most buf.len() bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        match cvt(n as libc::c_int, "read") {
            0 => return out,
            n => out.extend_from_slice(&buf[..n as usize]),
        }
    }
}

pub fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: fd was just returned to us by the kernel and is owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A connected pair of Unix stream sockets, close-on-exec.
pub fn socket_pair() -> (OwnedFd, OwnedFd) {
    let (a, b) = check(std::os::unix::net::UnixStream::pair(), "socketpair");
    (a.into(), b.into())
}

/// A pipe, close-on-exec: (read end, write end).
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let (r, w) = check(std::io::pipe(), "pipe");
    (r.into(), w.into())
}

/// Both ends of the client's connection.
struct Wires {
    /// The client's end: writes its bytes, reads the answers.
    client_out: Option<OwnedFd>,
    client_in: OwnedFd,
    /// tcpsplice-auth's fds 0 and 1.
    server_in: OwnedFd,
    server_out: Option<OwnedFd>,
    socket: bool,
}

impl Wires {
    fn new(pipes: bool) -> Wires {
        if pipes {
            let (server_in, client_out) = pipe();
            let (client_in, server_out) = pipe();
            Wires {
                client_out: Some(client_out),
                server_in,
                server_out: Some(server_out),
                client_in,
                socket: false,
            }
        } else {
            let (client, server) = socket_pair();
            Wires {
                client_out: Some(check(client.try_clone(), "dup")),
                client_in: client,
                server_out: Some(check(server.try_clone(), "dup")),
                server_in: server,
                socket: true,
            }
        }
    }

    /// After the handshake: what it left unread, and what it sent the client.
    fn finish(mut self) -> (Vec<u8>, Vec<u8>) {
        let left = read_to_end(self.server_in.as_raw_fd());
        let out = self.server_out.take().unwrap();
        if self.socket {
            // SAFETY: shutdown takes no pointer.
            cvt(
                unsafe { libc::shutdown(out.as_raw_fd(), libc::SHUT_WR) },
                "shutdown",
            );
        }
        drop(out);
        (left, read_to_end(self.client_in.as_raw_fd()))
    }
}

/// Bytes waiting to be read on `fd`.
fn unread(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the address given.
    cvt(unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) }, "ioctl");
    n as usize
}

/// The client sends `bytes` on `out`, then ends its direction: `chunk` bytes at a time,
/// each once the handshake has taken all of the one before from `server_in` (at most
/// MAX_PIECES pieces, then the rest), or all at once for chunk 0; all that is left once
/// `done` says the handshake has returned.
fn send(out: OwnedFd, bytes: &[u8], chunk: usize, server_in: RawFd, done: &AtomicBool) {
    let mut rest = bytes;
    let mut pieces = 0;
    while chunk > 0 && !rest.is_empty() && pieces < MAX_PIECES {
        let mut spins = 0u32;
        while unread(server_in) > 0 && !done.load(Ordering::Acquire) {
            if spins < 1000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
            spins += 1;
        }
        if done.load(Ordering::Acquire) {
            break;
        }
        let n = chunk.min(rest.len());
        write_all(out.as_raw_fd(), &rest[..n]);
        rest = &rest[n..];
        pieces += 1;
    }
    write_all(out.as_raw_fd(), rest);
    // Ends the direction: a socket's other fd stays open, so shutdown.
    // SAFETY: shutdown takes no pointer; on a pipe it fails with ENOTSOCK, ignored.
    unsafe { libc::shutdown(out.as_raw_fd(), libc::SHUT_WR) };
}

/// The handshake as tcpsplice-auth runs it: on success, the bytes it read are taken
/// off the socket (`Client::settle`) before the next program would read fd 0.
fn run_and_settle(c: &mut Client, policy: &Policy) -> Result<Request, Failure> {
    let result = handshake::run(c, policy);
    if result.is_ok() {
        c.settle().expect("settle what the handshake read");
    }
    result
}

fn no_nul(what: &str, v: &str) {
    assert!(!v.contains('\0'), "exported {what} {v:?} has a NUL");
}

pub fn run(data: &[u8]) {
    let [cfg_byte, chunk, client @ ..] = data else {
        return;
    };
    let cfg = Config::new(*cfg_byte, *chunk);
    let client = &client[..client.len().min(MAX_CLIENT)];
    let mut stream = client.to_vec();
    stream.extend_from_slice(TRAILER);

    let harness = Harness::default();
    let policy = Policy {
        socks5: cfg.socks5,
        socks4: cfg.socks4,
        http: cfg.http,
        anonymous: cfg.anonymous,
        checker: cfg.checker.then_some(&harness as &dyn Checker),
        head_cap: cfg.head_cap,
        fail_delay: Duration::ZERO,
        // BIND and UDP ASSOCIATE off, as by default: the model refuses every command
        // but CONNECT (REP 07 after the request's first 4 bytes).
        bind: false,
        udp: false,
    };
    let mut wires = Wires::new(cfg.pipes);
    let mut c = Client::new(
        wires.server_in.as_raw_fd(),
        wires.server_out.as_ref().unwrap().as_raw_fd(),
        Duration::from_secs(10),
    );
    assert_eq!(c.is_socket(), !cfg.pipes);
    let (out, server_in) = (
        wires.client_out.take().unwrap(),
        wires.server_in.as_raw_fd(),
    );
    let done = AtomicBool::new(false);
    let result = if cfg.chunk == 0 {
        send(out, &stream, 0, server_in, &done);
        run_and_settle(&mut c, &policy)
    } else {
        std::thread::scope(|s| {
            s.spawn(|| send(out, &stream, cfg.chunk, server_in, &done));
            let result = run_and_settle(&mut c, &policy);
            done.store(true, Ordering::Release);
            result
        })
    };
    let (left, sent) = wires.finish();

    assert!(
        stream.ends_with(&left),
        "what the handshake left is not the stream's tail"
    );
    let read = stream.len() - left.len();
    let m = model(&stream, &cfg);
    match (&result, &m) {
        (Ok(req), _) => {
            no_nul("target", &req.target);
            no_nul("reply", req.reply);
            let (host, port) = split_target(&req.target).unwrap_or_else(|e| {
                panic!(
                    "the exported target {:?} does not parse in the dialer: {e}",
                    req.target
                )
            });
            assert_eq!(
                target_of(&host, port),
                req.target,
                "the dialer reads another target"
            );
            if let Some(u) = &req.user {
                no_nul("user", u);
                assert!(
                    harness.accepted.borrow().iter().any(|a| a == u.as_bytes()),
                    "exported user {u:?} was not accepted by the checker"
                );
            }
            match &req.rules {
                Some(r) => {
                    no_nul("rules", r);
                    assert_eq!(req.user.as_deref(), Some("bob"), "rules for another user");
                    assert_eq!(r, BOB_RULES);
                    assert!(rules::parse_list(r).is_ok());
                }
                None => assert_ne!(req.user.as_deref(), Some("bob"), "bob's rules lost"),
            }
        }
        (Err(f), _) => {
            let code_ok =
                f.code == exit::POLICY || (f.code == exit::TEMP && harness.temporary.get());
            assert!(code_ok, "refusal with exit code {}: {}", f.code, f.why);
        }
    }
    match (&result, m) {
        (Ok(req), Model::Truncated) => {
            panic!("accepted {req:?} from a stream that ends before the request")
        }
        (Err(_), Model::Truncated) => {}
        (Ok(req), Model::Whole { accept: None, end }) => {
            panic!("accepted {req:?}, the model refuses (after {end} bytes)")
        }
        (
            Err(f),
            Model::Whole {
                accept: Some(a), ..
            },
        ) => {
            panic!("refused ({}), the model accepts {a:?}", f.why)
        }
        (
            Ok(req),
            Model::Whole {
                end,
                accept: Some(a),
            },
        ) => {
            assert_eq!(read, end, "read {read} bytes of a {end}-byte request");
            assert_eq!(req.target, a.target);
            assert_eq!(req.reply, a.reply);
            let user = a.user.map(|u| String::from_utf8(u).unwrap());
            assert_eq!(req.user, user);
            assert_eq!(sent, a.sent, "intermediate replies");
        }
        (Err(f), Model::Whole { end, accept: None }) => {
            assert!(
                read <= end,
                "read {read} bytes, past the {end} of the request ({})",
                f.why
            );
        }
        (Ok(req), Model::Head { end, target }) => {
            assert_eq!(read, end, "read {read} bytes of a {end}-byte head");
            let Some((target, reply)) = target else {
                panic!("accepted a head whose request line names no target")
            };
            assert_eq!(req.target, target, "target of the request line");
            assert_eq!(req.reply, reply);
            assert!(sent.is_empty(), "sent {sent:?} before the dialer's answer");
            if req.user.is_none() {
                assert!(cfg.anonymous, "no user, but no-auth is not allowed");
            }
        }
        (Err(f), Model::Head { end, .. }) => {
            assert!(
                read <= end,
                "read {read} bytes, past the {end}-byte head ({})",
                f.why
            );
        }
    }
}
