//! What the three protocols share: the client's bytes read under one deadline
//! ([`Client`]), what it asks for ([`Request`]), how a refusal is answered
//! ([`Failure`]), what the handshake allows and who checks a login ([`Policy`],
//! [`Checker`]), and the checks every protocol makes of names and passwords.
//! The protocol modules and the dispatcher in `handshake` both build on it.

use std::io;
use std::os::unix::io::RawFd;
use std::time::{Duration, Instant};

use super::password::Secret;
use crate::{diag, exit, sys};

/// The answer of a credential check.
pub enum Verdict {
    /// The user may go on; `rules` is the users file's third field, if any.
    Accept { rules: Option<String> },
    /// Wrong password or unknown user: the same answer for both.
    Reject,
    /// The check itself failed (checkpassword timed out, an unusable hash): why.
    Temporary(String),
}

/// Checks a user name and password.
pub trait Checker {
    fn check(&self, user: &[u8], password: &Secret) -> Verdict;
    /// Spends the time of a check without making one, for a user name that cannot
    /// exist: the answer must not come sooner than a real refusal.
    fn waste_time(&self, _password: &Secret) {}
    /// What a verified login of `user` is tied to in the login cache, and the rules a
    /// cached login gets: the users-file entry's hash string and rules, or the checker
    /// program. None (the default) when nothing may be cached, as for an unknown user.
    fn cache_key(&self, _user: &[u8]) -> Option<(&[u8], Option<&str>)> {
        None
    }
}

/// What the handshake allows.
pub struct Policy<'a> {
    pub socks5: bool,
    pub socks4: bool,
    pub http: bool,
    /// Clients may go on without credentials (`-n`).
    pub anonymous: bool,
    /// Credentials are checked by this; None when only no-auth is offered.
    pub checker: Option<&'a dyn Checker>,
    /// The largest HTTP request head, in bytes.
    pub head_cap: usize,
    /// How long after its check began a failed login is answered.
    pub fail_delay: Duration,
    /// SOCKS5 BIND is served (`-B`); otherwise it is answered REP 07.
    pub bind: bool,
    /// SOCKS5 UDP ASSOCIATE is served (`-U`); otherwise it is answered REP 07.
    pub udp: bool,
}

/// What the client asked for and who it is: becomes the next program's environment.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// `host:port`, `[v6]:port` for IPv6 literals.
    pub target: String,
    /// The authenticated user; None for no-auth.
    pub user: Option<String>,
    /// Per-user target rules, space-separated.
    pub rules: Option<String>,
    /// `socks5`, `socks4` or `http`: how tcpsplice-dial must answer.
    pub reply: &'static str,
    /// `connect`, `bind` or `udp` (SOCKS5 UDP ASSOCIATE): what tcpsplice-dial must do.
    pub command: &'static str,
}

/// A handshake that ends here: what to send the client, what to log, how to exit.
#[derive(Debug)]
pub struct Failure {
    pub reply: Vec<u8>,
    pub why: String,
    pub code: i32,
    pub proto: &'static str,
}

impl Failure {
    pub fn new(proto: &'static str, reply: &[u8], code: i32, why: impl Into<String>) -> Failure {
        Failure {
            reply: reply.to_vec(),
            why: why.into(),
            code,
            proto,
        }
    }
}

/// Why reading from the client stopped.
#[derive(Debug)]
pub enum ReadError {
    Timeout,
    Eof,
    Io(io::Error),
}

impl ReadError {
    pub fn describe(&self) -> String {
        match self {
            ReadError::Timeout => "handshake timed out".into(),
            ReadError::Eof => "client closed the connection in the handshake".into(),
            ReadError::Io(e) => format!("unable to read from the client: {}", sys::strerror(e)),
        }
    }

    /// The failure for a read error: a truncated or slow handshake is the client's
    /// doing (exit 1) with `reply` as the protocol's refusal; an I/O error is ours.
    pub fn fail(self, proto: &'static str, reply: &[u8]) -> Failure {
        let code = match self {
            ReadError::Io(_) => exit::TEMP,
            _ => exit::POLICY,
        };
        Failure::new(proto, reply, code, self.describe())
    }
}

/// The client end: fd 0 to read, fd 1 to write, one deadline over the whole handshake.
///
/// On a socket, what the client sent is looked at with MSG_PEEK, a whole message at a
/// time (`ahead`), and taken off the socket only when the handshake goes past it
/// ([`Client::settle`]): a SOCKS5 login costs two syscalls per message instead of one
/// per field, and not a byte beyond the handshake is ever taken, since what follows it
/// is the client's data for the target, left on the socket for the relay.
pub struct Client {
    pub rfd: RawFd,
    pub wfd: RawFd,
    deadline: Instant,
    socket: bool,
    /// Bytes peeked and not yet taken off the socket; a password may be among them.
    ahead: Secret,
    /// How many of them the handshake has read.
    used: usize,
    /// Whether a message went to the client since the last peek: a client that waits
    /// for it sends nothing before it has it, so the next peek waits first (see
    /// [`Client::look_further`]).
    replied: std::cell::Cell<bool>,
}

/// The most looked at in one peek: more than a SOCKS5 message can be (a name and a
/// password of 255 bytes each come in one), and all a typical HTTP CONNECT head needs.
const AHEAD: usize = 1024;

impl Client {
    pub fn new(rfd: RawFd, wfd: RawFd, timeout: Duration) -> Client {
        let socket = matches!(sys::fd_kind(rfd), Ok(sys::FdKind::Socket));
        Client::of_kind(rfd, wfd, timeout, socket)
    }

    /// [`Client::new`] for a caller that knows `rfd` is a socket.
    pub fn on_socket(rfd: RawFd, wfd: RawFd, timeout: Duration) -> Client {
        Client::of_kind(rfd, wfd, timeout, true)
    }

    fn of_kind(rfd: RawFd, wfd: RawFd, timeout: Duration, socket: bool) -> Client {
        Client {
            rfd,
            wfd,
            deadline: Instant::now() + timeout,
            socket,
            // All a peek takes, at once: no reallocation leaves a copy of a password
            // behind. (No more than malloc's per-thread cache serves: a larger block
            // costs hundreds of instructions more to take and give back.)
            ahead: Secret::new(Vec::with_capacity(if socket { AHEAD } else { 0 })),
            used: 0,
            replied: std::cell::Cell::new(false),
        }
    }

    /// Takes off the socket what the handshake has read of the bytes peeked, and
    /// forgets the rest (it stays on the socket). Call before anything else reads fd
    /// 0: the next program, a relay.
    pub fn settle(&mut self) -> Result<(), ReadError> {
        // Peeked, so there: recv returns it without waiting, whatever the handshake's
        // deadline (which may have passed since).
        let (fd, deadline) = (self.rfd, Instant::now() + Duration::from_secs(1));
        let mut left = self.used;
        while left > 0 {
            left -= recv(fd, deadline, &mut self.ahead.vec_mut()[..left], 0)?;
        }
        zeroize::Zeroize::zeroize(self.ahead.vec_mut());
        self.used = 0;
        Ok(())
    }

    /// Serves `buf` from the bytes peeked, peeking again (a whole message, as a client
    /// sends it) when they are all read.
    fn read_ahead(&mut self, buf: &mut [u8]) -> Result<usize, ReadError> {
        if self.used == self.ahead.as_bytes().len() {
            self.look_further()?;
        }
        let have = &self.ahead.as_bytes()[self.used..];
        let n = have.len().min(buf.len());
        buf[..n].copy_from_slice(&have[..n]);
        self.used += n;
        Ok(n)
    }

    /// Peeks at what follows the bytes read so far. Those stay on the socket meanwhile:
    /// a peek returns them again with what came after, so the messages of a handshake
    /// (a SOCKS5 greeting and request) are taken off in one recv at its end. Only when
    /// nothing came after them yet are they taken off, for the peek to wait for more.
    ///
    /// After a reply the client waits for (a SOCKS5 method choice or login status),
    /// what it has read is taken off and the peek waits first: looking before waiting
    /// found nothing new but from a client that sends ahead, and cost a peek, a recv
    /// that found nothing and the poll (5 syscalls at each such turn, now 3).
    fn look_further(&mut self) -> Result<(), ReadError> {
        let (fd, deadline, used) = (self.rfd, self.deadline, self.used);
        let replied = self.replied.replace(false);
        if used > 0 && used < AHEAD && !replied {
            let space = self.ahead.vec_mut();
            // Within the capacity reserved: no reallocation leaves a copy behind.
            space.resize(AHEAD, 0);
            let peeked = recv(fd, deadline, space, libc::MSG_PEEK);
            // The first `used` bytes come back as they were: the socket is ours alone.
            let n = match peeked {
                Ok(n) => n.max(used),
                Err(e) => {
                    space.truncate(used);
                    return Err(e);
                }
            };
            space.truncate(n);
            if n > used {
                return Ok(());
            }
        }
        self.settle()?;
        let (fd, deadline) = (self.rfd, self.deadline);
        if replied {
            wait_readable(fd, deadline)?;
        }
        let space = self.ahead.vec_mut();
        space.resize(AHEAD, 0);
        match recv(fd, deadline, space, libc::MSG_PEEK) {
            Ok(n) => {
                space.truncate(n);
                Ok(())
            }
            Err(e) => {
                space.clear();
                Err(e)
            }
        }
    }

    pub fn is_socket(&self) -> bool {
        self.socket
    }

    fn wait_readable(&self) -> Result<(), ReadError> {
        wait_readable(self.rfd, self.deadline)
    }

    /// Reads at most `buf.len()` bytes; never returns 0.
    pub fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, ReadError> {
        if self.socket {
            return self.read_ahead(buf);
        }
        loop {
            self.wait_readable()?;
            match sys::read(self.rfd, buf) {
                Ok(0) => return Err(ReadError::Eof),
                Ok(n) => return Ok(n),
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.kind() == io::ErrorKind::WouldBlock =>
                {
                    continue
                }
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8], flags: libc::c_int) -> Result<usize, ReadError> {
        recv(self.rfd, self.deadline, buf, flags)
    }

    /// Reads exactly `buf.len()` bytes.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ReadError> {
        let mut got = 0;
        while got < buf.len() {
            got += self.read_some(&mut buf[got..])?;
        }
        Ok(())
    }

    pub fn read_byte(&mut self) -> Result<u8, ReadError> {
        let mut b = [0u8];
        self.read_exact(&mut b)?;
        Ok(b[0])
    }

    /// Looks at what is waiting on the socket without taking it; never returns 0.
    pub fn peek(&mut self, buf: &mut [u8]) -> Result<usize, ReadError> {
        self.settle()?;
        self.recv(buf, libc::MSG_PEEK)
    }

    /// Sends an intermediate message of the handshake (SOCKS5 method choice, auth
    /// status). A client that does not read cannot block us: these are a few bytes.
    pub fn send(&self, bytes: &[u8]) -> io::Result<()> {
        self.replied.set(self.socket);
        sys::write_all(self.wfd, bytes)
    }

    /// After a refusal: ends our direction and reads what the client still sends for a
    /// short while, so that closing with unread input does not reset the connection and
    /// destroy the reply before the client has read it.
    pub fn close_gently(&mut self, limit: Duration) {
        if matches!(sys::fd_kind(self.wfd), Ok(sys::FdKind::Socket)) {
            let _ = sys::shutdown(self.wfd, libc::SHUT_WR);
        } else {
            sys::close(self.wfd);
        }
        self.deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        let mut budget = 256 * 1024usize;
        while budget > 0 {
            match self.read_some(&mut buf) {
                Ok(n) => budget = budget.saturating_sub(n),
                Err(_) => break,
            }
        }
    }
}

/// Waits until `fd` is readable (or at end of file), or `deadline` passes.
fn wait_readable(fd: RawFd, deadline: Instant) -> Result<(), ReadError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadError::Timeout);
        }
        let mut p = [libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }];
        match sys::poll(&mut p, Some(left)) {
            Ok(0) => continue,
            Ok(_) => return Ok(()),
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// recv on the socket, polled for only when nothing is there yet: a client sends
/// its request at once, so most reads of a handshake need no poll before them.
fn recv(
    fd: RawFd,
    deadline: Instant,
    buf: &mut [u8],
    flags: libc::c_int,
) -> Result<usize, ReadError> {
    loop {
        if Instant::now() >= deadline {
            return Err(ReadError::Timeout);
        }
        match sys::recv(fd, buf, flags | libc::MSG_DONTWAIT) {
            Ok(0) => return Err(ReadError::Eof),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_readable(fd, deadline)?,
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// Checks that a host name from a client is one a resolver may be asked about: 1 to 255
/// bytes of letters, digits, `-`, `.` and `_` (an IPv4 literal is such a name).
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// `host:port`, with brackets around an IPv6 address.
pub fn target_text(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// [`target_text`] for an IPv4 address, written digit by digit: the usual request
/// names one, and the formatting machinery costs several times more.
pub fn ipv4_target(ip: std::net::Ipv4Addr, port: u16) -> String {
    let mut s = String::with_capacity(21);
    crate::conninfo::push_ipv4(&mut s, ip);
    s.push(':');
    crate::conninfo::push_decimal(&mut s, port.into());
    s
}

/// Client-supplied text made safe for a log line: printable ASCII kept, the rest escaped.
pub fn escape(bytes: &[u8]) -> String {
    let mut s = String::new();
    for &b in bytes.iter().take(256) {
        if (0x21..0x7f).contains(&b) && b != b'\\' {
            s.push(b as char);
        } else {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

/// Checks credentials with the policy's checker; a failure is answered `fail_delay`
/// after the check began, so that guessing is slow and the time of the answer does not
/// tell an unknown user from a wrong password, nor one user from another. Ok(rules) on
/// success, Err(Ok(())) for a rejection after the delay, Err(Err(why)) when the check
/// itself failed.
pub fn authenticate(
    policy: &Policy,
    user: &[u8],
    password: &Secret,
) -> Result<Option<String>, Result<(), String>> {
    let Some(checker) = policy.checker else {
        return Err(Ok(()));
    };
    let started = Instant::now();
    let verdict = if !password_ok(password.as_bytes()) {
        // Not worth a hash: a long password costs sha-crypt more than linearly (minutes
        // of CPU for hundreds of KiB), and a NUL would cut a checkpassword field short.
        Verdict::Reject
    } else if user_name_ok(user) {
        checker.check(user, password)
    } else {
        checker.waste_time(password);
        Verdict::Reject
    };
    match verdict {
        Verdict::Accept { rules } => Ok(rules),
        Verdict::Reject => {
            answer_at(started, policy.fail_delay);
            Err(Ok(()))
        }
        Verdict::Temporary(why) => Err(Err(why)),
    }
}

/// Waits until `delay` has passed since `started`. A check's time differs by user
/// (bcrypt cost 12 costs 60 times sha-crypt's default; an unknown user costs the file's
/// costliest hash): measured from the start, the delay covers them all, and every
/// failure takes `delay`. A check that took longer sets its login apart: said in the
/// log, for `-d` to be raised.
fn answer_at(started: Instant, delay: Duration) {
    let took = started.elapsed();
    match delay.checked_sub(took) {
        Some(left) => std::thread::sleep(left),
        None if !delay.is_zero() => diag::warn(&format!(
            "a failed login's check took {} ms, longer than the fail delay of {} ms: its \
             answer came later than others' (raise -d)",
            took.as_millis(),
            delay.as_millis()
        )),
        None => {}
    }
}

/// A password worth checking: at most MAX_PASSWORD bytes, no NUL.
pub fn password_ok(password: &[u8]) -> bool {
    password.len() <= MAX_PASSWORD && !password.contains(&0)
}

/// The longest password checked; `tcpsplice-auth -H` hashes no longer one.
pub const MAX_PASSWORD: usize = 4096;

/// A user name we are willing to put in the environment and in logs: printable, no `:`
/// (the users file's separator), 1 to 255 bytes.
pub fn user_name_ok(user: &[u8]) -> bool {
    !user.is_empty()
        && user.len() <= 255
        && user.iter().all(|&b| (0x20..0x7f).contains(&b) && b != b':')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn an_ipv4_target_reads_as_the_formatted_one() {
        for (ip, port) in [
            (Ipv4Addr::new(0, 0, 0, 0), 0),
            (Ipv4Addr::new(127, 0, 0, 1), 80),
            (Ipv4Addr::new(255, 255, 255, 255), 65535),
            (Ipv4Addr::new(10, 200, 9, 100), 1080),
        ] {
            assert_eq!(ipv4_target(ip, port), target_text(&ip.to_string(), port));
        }
    }
}
