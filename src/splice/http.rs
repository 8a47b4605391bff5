//! tcpsplice for a forwarded plain-HTTP request (`TCPSPLICE_HTTP_BODY` set by
//! tcpsplice-auth; tcpsplice-dial has sent the rewritten head to the origin).
//!
//! One request per connection, in order: the request body is moved to the origin, and
//! exactly the body (a `Content-Length` moved with splice; a chunked body line by line
//! for its framing, each chunk's data with splice, to its last chunk and trailers), so
//! whatever the client sent after it (a pipelined request) is never forwarded. Then the
//! origin's response head is read, interim (1xx) heads passed on, the final head
//! rewritten (`Connection: close`, hop-by-hop headers removed), and the response body
//! moved with splice until the origin's end of file. Last the client's side is shut
//! down and what it still sends is read and dropped for a short while, so that no reset
//! destroys the response's tail in its buffer.

use std::cell::Cell;
use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::relay::{self, Config, End, Outcome, Side};
use crate::http::{self, Body, Response, MAX_LINE};
use crate::sys::{self, FdKind};

/// The largest response head taken from the origin.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// How long, and how much, the client's leftovers are read after the response.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// Why moving stopped.
#[derive(Debug)]
enum Stop {
    /// End of file from this side where more was due.
    Eof(Side),
    Err(Side, io::Error),
    Idle,
    /// The client's chunked framing is broken.
    Bad(&'static str),
    /// The origin answered (or closed) before the request body was all sent.
    Early,
    /// The grace after this signal ran out.
    Signal(i32),
}

/// Bytes between descriptors: splice through one pipe, or a copy where splice cannot.
struct Mover {
    idle: Option<Duration>,
    pipe_size: usize,
    pipe: Option<(RawFd, RawFd, usize)>,
    copy: bool,
    buf: Vec<u8>,
    pipe_seen: usize,
    /// While the request body moves: the origin's read side, watched with every wait,
    /// so that an early response (a 413 to an upload it will not read) ends the body.
    early: Option<RawFd>,
    /// SIGTERM, SIGINT, SIGHUP: the request goes on for `grace`, then ends.
    signals: relay::Signals,
    grace: Duration,
    stop_at: Cell<Option<Instant>>,
    signo: Cell<i32>,
    /// When the request has lasted long enough to give back the memory its set-up no
    /// longer uses, as the plain relay does (`relay::LIVENESS_AFTER`); None once done.
    release_at: Cell<Option<Instant>>,
}

fn side_of(cfg: &Config, fd: RawFd) -> Side {
    if fd == cfg.client_in || fd == cfg.client_out {
        Side::Client
    } else {
        Side::Target
    }
}

impl Mover {
    /// Waits for `events` on `fd`, and for an early answer of the origin while the body
    /// moves; bounded by the idle timeout and, after a signal, by the grace.
    fn wait(&self, fd: RawFd, events: i16) -> Result<(), Stop> {
        let pfd = |fd, events| libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let mut p = [
            pfd(fd, events),
            pfd(self.early.unwrap_or(-1), libc::POLLIN),
            pfd(self.signals.fd(), libc::POLLIN),
        ];
        // What is left of the idle timeout when a wait is woken for the release alone.
        let mut idle_left = self.idle;
        loop {
            let to_stop = self
                .stop_at
                .get()
                .map(|d| d.saturating_duration_since(Instant::now()));
            if to_stop.is_some_and(|d| d.is_zero()) {
                return Err(Stop::Signal(self.signo.get()));
            }
            let to_release = self
                .release_at
                .get()
                .map(|d| d.saturating_duration_since(Instant::now()));
            if to_release.is_some_and(|d| d.is_zero()) {
                // A request that lasts: a long poll, a download.
                self.release_at.set(None);
                relay::give_back_set_up_memory();
                continue;
            }
            let timeout = match (idle_left, to_stop) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let waited = Instant::now();
            // The release comes first: a timeout now is its, not the idle one's.
            let for_release = to_release.is_some_and(|r| timeout.is_none_or(|t| r < t));
            let timeout = if for_release { to_release } else { timeout };
            p.iter_mut().for_each(|x| x.revents = 0);
            match sys::poll(&mut p, timeout) {
                Ok(0) if self.stop_at.get().is_some_and(|d| Instant::now() >= d) => {
                    return Err(Stop::Signal(self.signo.get()))
                }
                // Woken for the release only: the idle timeout has not run out.
                Ok(0) if for_release => {
                    idle_left = idle_left.map(|d| d.saturating_sub(waited.elapsed()));
                    continue;
                }
                Ok(0) => return Err(Stop::Idle),
                Ok(_) => {
                    if p[2].revents != 0 {
                        while let Some(s) = self.signals.take() {
                            self.signo.set(s);
                            if self.stop_at.get().is_none() {
                                self.stop_at.set(Some(Instant::now() + self.grace));
                            }
                        }
                    }
                    if p[1].revents != 0 {
                        return Err(Stop::Early);
                    }
                    if p[0].revents != 0 {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Stop::Err(Side::Client, e)),
            }
        }
    }

    fn write_all(&self, fd: RawFd, side: Side, mut bytes: &[u8]) -> Result<(), Stop> {
        while !bytes.is_empty() {
            match sys::write(fd, bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(fd, libc::POLLOUT)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Stop::Err(side, e)),
            }
        }
        Ok(())
    }

    /// Reads at most `buf.len()` bytes, waiting for some; Ok(0) at end of file.
    fn read(&self, fd: RawFd, side: Side, buf: &mut [u8]) -> Result<usize, Stop> {
        loop {
            match sys::read(fd, buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(fd, libc::POLLIN)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Stop::Err(side, e)),
            }
        }
    }

    /// One line (to its LF) of the client's chunked framing, read a byte at a time so
    /// that not a byte past it is taken.
    fn read_line(&self, fd: RawFd) -> Result<Vec<u8>, Stop> {
        let mut line = Vec::with_capacity(16);
        let mut b = [0u8];
        loop {
            if self.read(fd, Side::Client, &mut b)? == 0 {
                return Err(Stop::Eof(Side::Client));
            }
            line.push(b[0]);
            if b[0] == b'\n' {
                return Ok(line);
            }
            if line.len() >= MAX_LINE {
                return Err(Stop::Bad("chunk framing line too long"));
            }
        }
    }

    fn pipe(&mut self) -> io::Result<(RawFd, RawFd, usize)> {
        if let Some(p) = self.pipe {
            return Ok(p);
        }
        let (r, w) = sys::pipe_nonblocking()?;
        let cap = sys::pipe_resize(w, self.pipe_size).max(4096);
        self.pipe_seen = cap;
        self.pipe = Some((r, w, cap));
        Ok((r, w, cap))
    }

    /// Moves exactly `want` bytes from `from` to `to`, or everything until end of file
    /// when `want` is None. Returns the bytes delivered.
    fn relay(
        &mut self,
        cfg: &Config,
        from: RawFd,
        to: RawFd,
        want: Option<u64>,
    ) -> Result<u64, Stop> {
        let (fs, ts) = (side_of(cfg, from), side_of(cfg, to));
        let mut left = want.unwrap_or(u64::MAX);
        let mut moved = 0u64;
        if !self.copy {
            let (pr, pw, cap) = self.pipe().map_err(|e| Stop::Err(Side::Client, e))?;
            let mut inpipe = 0usize;
            let mut eof = false;
            loop {
                if inpipe == 0 && (eof || left == 0) {
                    return Ok(moved);
                }
                if !eof && left > 0 && inpipe < cap {
                    let n = (cap - inpipe).min(usize::try_from(left).unwrap_or(usize::MAX));
                    match sys::splice(from, pw, n) {
                        Ok(0) if want.is_some() => return Err(Stop::Eof(fs)),
                        Ok(0) => eof = true,
                        Ok(k) => {
                            inpipe += k;
                            left -= k as u64;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if inpipe == 0 {
                                self.wait(from, libc::POLLIN)?;
                                continue;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) && inpipe == 0 => {
                            // Not a splice-able descriptor (a regular file, a tty).
                            self.copy = true;
                            break;
                        }
                        Err(e) => return Err(Stop::Err(fs, e)),
                    }
                }
                if inpipe > 0 {
                    match sys::splice(pr, to, inpipe) {
                        Ok(k) => {
                            inpipe -= k;
                            moved += k as u64;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.wait(to, libc::POLLOUT)?
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(Stop::Err(ts, e)),
                    }
                }
            }
        }
        if self.buf.is_empty() {
            self.buf = vec![0u8; 64 * 1024];
        }
        let mut buf = std::mem::take(&mut self.buf);
        let result = (|| {
            while left > 0 {
                let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let got = self.read(from, fs, &mut buf[..n])?;
                if got == 0 {
                    return match want {
                        Some(_) => Err(Stop::Eof(fs)),
                        None => Ok(moved),
                    };
                }
                self.write_all(to, ts, &buf[..got])?;
                left -= got as u64;
                moved += got as u64;
            }
            Ok(moved)
        })();
        self.buf = buf;
        result
    }
}

impl Mover {
    fn drop_pipe(&mut self) {
        if let Some((r, w, _)) = self.pipe.take() {
            sys::close(r);
            sys::close(w);
        }
    }
}

impl Drop for Mover {
    fn drop(&mut self) {
        self.drop_pipe();
    }
}

/// Moves the request body; `up` counts the bytes delivered to the origin.
fn forward_body(m: &mut Mover, cfg: &Config, body: Body, up: &mut u64) -> Result<(), Stop> {
    let (from, to) = (cfg.client_in, cfg.target_out);
    match body {
        Body::None => Ok(()),
        Body::Length(n) => {
            *up += m.relay(cfg, from, to, Some(n))?;
            Ok(())
        }
        Body::Chunked => {
            loop {
                let line = m.read_line(from)?;
                let size = http::chunk_size_line(&line).map_err(Stop::Bad)?;
                let framing = format!("{size:x}\r\n");
                m.write_all(to, Side::Target, framing.as_bytes())?;
                *up += framing.len() as u64;
                if size == 0 {
                    break;
                }
                *up += m.relay(cfg, from, to, Some(size))?;
                let line = m.read_line(from)?;
                http::chunk_data_end(&line).map_err(Stop::Bad)?;
                m.write_all(to, Side::Target, b"\r\n")?;
                *up += 2;
            }
            loop {
                let line = m.read_line(from)?;
                let end = http::trailer_line(&line).map_err(Stop::Bad)?;
                m.write_all(to, Side::Target, &line)?;
                *up += line.len() as u64;
                if end {
                    return Ok(());
                }
            }
        }
    }
}

/// Reads the origin's response head(s), passing interim ones on; sends the rewritten
/// final head and the body bytes read with it. Returns the bytes sent to the client.
fn forward_head(m: &mut Mover, cfg: &Config) -> Result<u64, (Stop, &'static str)> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut sent = 0u64;
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match http::rewrite_response(&buf) {
            Ok(Response::Partial) => {}
            Ok(Response::Interim { len }) => {
                m.write_all(cfg.client_out, Side::Client, &buf[..len])
                    .map_err(|s| (s, ""))?;
                sent += len as u64;
                buf.drain(..len);
                continue;
            }
            Ok(Response::Final { len, head }) => {
                m.write_all(cfg.client_out, Side::Client, &head)
                    .and_then(|()| m.write_all(cfg.client_out, Side::Client, &buf[len..]))
                    .map_err(|s| (s, ""))?;
                return Ok(sent + (head.len() + buf.len() - len) as u64);
            }
            Err(_) => return Err((Stop::Bad("unparsable response head"), "502 Bad Gateway")),
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err((Stop::Bad("response head too large"), "502 Bad Gateway"));
        }
        let room = (MAX_RESPONSE_HEAD - buf.len()).min(chunk.len());
        match m.read(cfg.target_in, Side::Target, &mut chunk[..room]) {
            Ok(0) => {
                return Err((
                    Stop::Bad("the origin closed before its response"),
                    "502 Bad Gateway",
                ))
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(Stop::Idle) => return Err((Stop::Idle, "504 Gateway Timeout")),
            Err(s) => return Err((s, "502 Bad Gateway")),
        }
    }
}

fn end_of(stop: Stop) -> End {
    match stop {
        Stop::Idle => End::Idle,
        Stop::Bad(why) => End::Refused { why: why.into() },
        Stop::Eof(side) => End::Reset {
            side,
            err: io::Error::new(io::ErrorKind::UnexpectedEof, "end of file in a message"),
        },
        Stop::Err(side, err) => End::Reset { side, err },
        Stop::Early => End::Clean,
        Stop::Signal(signo) => End::Signal {
            signo,
            drained: false,
        },
    }
}

/// Ends our side toward the client and reads what it still sends for a while, so that
/// closing with unread input does not reset the connection under the response.
fn linger(cfg: &Config, kind: FdKind) {
    if kind == FdKind::Socket {
        let _ = sys::shutdown(cfg.client_out, libc::SHUT_WR);
    } else {
        sys::close(cfg.client_out);
    }
    let deadline = Instant::now() + LINGER;
    let mut budget = LINGER_BYTES;
    let mut buf = [0u8; 16 * 1024];
    while budget > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let mut p = [libc::pollfd {
            fd: cfg.client_in,
            events: libc::POLLIN,
            revents: 0,
        }];
        match sys::poll(&mut p, Some(left)) {
            Ok(n) if n > 0 => {}
            _ => return,
        }
        match sys::read(cfg.client_in, &mut buf) {
            Ok(n) if n > 0 => budget = budget.saturating_sub(n),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            _ => return,
        }
    }
}

/// Runs one forwarded request's body and response.
pub fn run(cfg: &Config, body: Body) -> io::Result<Outcome> {
    let start = Instant::now();
    let mut guard = relay::FlagGuard::new();
    let mut seen = Vec::with_capacity(4);
    let fds = [cfg.client_in, cfg.client_out, cfg.target_in, cfg.target_out];
    let (kind, _) = relay::prepare_all(cfg, fds, &mut guard, &mut seen, false)?;
    let mut m = Mover {
        idle: cfg.idle,
        pipe_size: cfg.pipe_size,
        pipe: None,
        copy: cfg.copy_only,
        buf: Vec::new(),
        pipe_seen: 0,
        early: Some(cfg.target_in),
        signals: relay::signals()?,
        grace: cfg.grace,
        stop_at: Cell::new(None),
        signo: Cell::new(0),
        release_at: Cell::new(Some(start + relay::LIVENESS_AFTER)),
    };
    let (mut up, mut down) = (0u64, 0u64);
    let mut end = End::Clean;
    let sent = forward_body(&mut m, cfg, body, &mut up);
    m.early = None;
    if sent.is_err() {
        // It may hold the client's bytes that never went out: not for the response.
        m.drop_pipe();
    }
    match sent {
        Ok(()) => {}
        // The origin answered early or stopped reading: its response may say why.
        Err(Stop::Early) | Err(Stop::Eof(Side::Target)) | Err(Stop::Err(Side::Target, _)) => {}
        Err(stop) => {
            // The request cannot be completed: the origin must not take a part of it
            // for the whole, and the client learns of it if it still listens.
            let _ = sys::reset_connection(cfg.target_out);
            let text = match &stop {
                Stop::Bad(why) => Some(("400 Bad Request", *why)),
                Stop::Idle => Some(("408 Request Timeout", "request body timed out")),
                _ => None,
            };
            if let Some((status, why)) = text {
                let reply = http::error_response(status, why);
                if m.write_all(cfg.client_out, Side::Client, &reply).is_ok() {
                    down += reply.len() as u64;
                    linger(cfg, kind[1]);
                }
            }
            return Ok(outcome(&m, end_of(stop), up, down, start));
        }
    }
    match forward_head(&mut m, cfg) {
        Ok(n) => {
            down += n;
            match m.relay(cfg, cfg.target_in, cfg.client_out, None) {
                Ok(n) => down += n,
                Err(stop) => {
                    // A response cut short must not look complete to the client (its
                    // body may be delimited by the close): it gets a reset.
                    let _ = sys::reset_connection(cfg.client_out);
                    return Ok(outcome(&m, end_of(stop), up, down, start));
                }
            }
        }
        Err((stop, status)) => {
            if down == 0 && !status.is_empty() {
                let (status, why) = match &stop {
                    Stop::Bad(why) => (status, *why),
                    Stop::Idle => (status, "the origin timed out"),
                    Stop::Signal(_) => ("503 Service Unavailable", "the proxy is stopping"),
                    _ => (status, "the origin failed"),
                };
                let reply = http::error_response(status, why);
                if m.write_all(cfg.client_out, Side::Client, &reply).is_ok() {
                    down += reply.len() as u64;
                }
            }
            end = match stop {
                Stop::Bad(why) => End::Failed {
                    what: why.into(),
                    err: io::Error::new(io::ErrorKind::InvalidData, "bad response"),
                },
                s => end_of(s),
            };
        }
    }
    linger(cfg, kind[1]);
    if matches!(end, End::Clean) && m.stop_at.get().is_some() {
        end = End::Signal {
            signo: m.signo.get(),
            drained: true,
        };
    }
    Ok(outcome(&m, end, up, down, start))
}

fn outcome(m: &Mover, end: End, up: u64, down: u64, start: Instant) -> Outcome {
    let path = if m.copy { "copy" } else { "splice" };
    let buf = m.buf.len();
    Outcome {
        end,
        up,
        down,
        up_path: path,
        down_path: path,
        up_pipe: m.pipe_seen,
        down_pipe: m.pipe_seen,
        up_buf: buf,
        down_buf: buf,
        elapsed: start.elapsed(),
    }
}
