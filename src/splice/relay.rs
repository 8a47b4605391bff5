//! The splicer's data path: two directions, client→target ("up", fd 0 → fd 7 by
//! default) and target→client ("down", fd 6 → fd 1), each moved by the kernel with
//! splice(2) and watched by one level-triggered poll loop.
//!
//! Per direction the bytes take one of three paths:
//! - `Direct`: one end already is a pipe, so one splice moves src→dst;
//! - `Piped`: socket to socket through a pipe of our own (splice needs a pipe on one
//!   side), two splices per chunk and no copy;
//! - `Copy`: read/write through a user buffer, for what cannot be spliced (/dev/null,
//!   ttys, O_APPEND files: the first splice fails with EINVAL) and for when the per-user
//!   pipe budget is exhausted (the kernel then grants 2-page pipes, which would crawl).
//!
//! A direction that reads end of file delivers what is in flight, then ends its write
//! side: `shutdown(SHUT_WR)` on a socket (a close would send nothing while fd 0/1 or 6/7
//! hold a dup), close on anything else. The other direction goes on. A reset is passed on
//! as a reset.

use std::io;
use std::os::unix::io::RawFd;
use std::time::{Duration, Instant};

use crate::chain;
use crate::sys::{self, FdKind};

/// What the relay is told to do.
#[derive(Clone, Debug)]
pub struct Config {
    /// Read the client from here (fd 0).
    pub client_in: RawFd,
    /// Write to the client here (fd 1).
    pub client_out: RawFd,
    /// Read the target from here (fd 6).
    pub target_in: RawFd,
    /// Write to the target here (fd 7).
    pub target_out: RawFd,
    /// End the relay when no byte has moved for this long.
    pub idle: Option<Duration>,
    /// After SIGTERM, how long in-flight bytes may take to drain.
    pub grace: Duration,
    /// The pipe size asked for per direction.
    pub pipe_size: usize,
    /// Never splice; copy through user space (for comparisons and odd kernels).
    pub copy_only: bool,
    /// The keepalive timers of TCP sockets; None keeps the kernel's
    /// (net.ipv4.tcp_keepalive_*: 2 h 11 min).
    pub keepalive: Option<Keepalive>,
    /// TCP_USER_TIMEOUT of TCP sockets, in milliseconds: how long sent data (or a
    /// keepalive probe) may go unanswered. 0 keeps the kernel's (tcp_retries2: ~15 min).
    pub user_timeout_ms: u32,
}

/// When to probe a quiet TCP peer and when to give it up: the first probe after `idle`
/// seconds without a packet from it, then one every `interval` seconds, and the
/// connection ends after `count` unanswered probes (TCP_KEEPIDLE, TCP_KEEPINTVL,
/// TCP_KEEPCNT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: u32,
    pub interval: u32,
    pub count: u32,
}

impl Keepalive {
    /// The kernel's limits on the three values (MAX_TCP_KEEPIDLE and friends).
    pub const MAX_IDLE: u32 = 32767;
    pub const MAX_INTERVAL: u32 = 32767;
    pub const MAX_COUNT: u32 = 127;

    /// How long after the peer's last packet a vanished peer is given up: the user
    /// timeout that agrees with these timers (see `DEFAULT_KEEPALIVE`).
    pub fn give_up_secs(&self) -> u32 {
        self.idle + self.interval * self.count
    }
}

/// The default keepalive: a peer that vanished without a word (a machine gone, a NAT
/// that forgot us) ends its relay 5 minutes after its last packet, where the kernel's
/// own timers would take 2 h 11 min. A live peer costs one probe and its ACK per two
/// minutes of silence. Not shorter, because the user timeout (which must agree, below)
/// also gives up a live client that keeps its window shut that long while we hold bytes
/// for it (a paused download). The user timeout defaults to the same 5 minutes: once TCP_USER_TIMEOUT
/// is set it also decides when keepalive gives up (at the first probe that finds it
/// passed, whatever the count), so it must agree for the count to mean what it says;
/// and it bounds the wait on a peer that stops ACKing what we send, which keepalive
/// never probes (it only runs when nothing is in flight).
pub const DEFAULT_KEEPALIVE: Keepalive = Keepalive {
    idle: 120,
    interval: 30,
    count: 6,
};

/// The default pipe size: see README "Pipe size" for the measurements behind it.
pub const DEFAULT_PIPE_SIZE: usize = 1 << 20;

/// Below this a granted pipe means the per-user pipe budget is exhausted: a 2-page pipe
/// would need a pair of syscalls per 8 KiB, so the direction copies instead.
const MIN_PIPE: usize = 64 * 1024;

/// The user buffer of a copying direction is allocated at its first read, at
/// `COPY_BUF_START`, and doubles after each read that fills it, up to `COPY_BUF`: an
/// idle connection costs no buffer, an interactive one 16 KiB a direction, and a bulk
/// one has the 256 KiB reads of full-speed copying after four full reads. (Zero-filled
/// at setup, the two buffers made each idle connection past the pipe budget cost
/// 592 KiB of private memory under tcpsplice-listen instead of 76 KiB.)
const COPY_BUF_START: usize = 16 * 1024;
const COPY_BUF: usize = 256 * 1024;

/// A direction between two sockets copies through a buffer this large until a read
/// fills it, and only then takes a pipe and splices: a short connection (a request and
/// a reply of a few KiB) spends no pipe of the user's budget and no pipe2, F_GETPIPE_SZ
/// or close on it, and an idle one holds no pipe at all. splice only pays for itself
/// on bulk, where it moves a pipe's worth per call.
const FIRST_READ: usize = 4 * 1024;

/// Most bytes asked of one direct splice; splice refuses lengths near SIZE_MAX.
const DIRECT_CHUNK: usize = 1 << 20;

/// Which peer something happened to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Target,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Target => "target",
        }
    }
}

/// How the relay ended.
#[derive(Debug)]
pub enum End {
    /// Both streams ended and everything was delivered.
    Clean,
    /// No byte moved for the idle timeout.
    Idle,
    /// A signal asked us to stop; `drained` says whether everything in flight got out.
    Signal { signo: i32, drained: bool },
    /// A peer reset the connection, or was lost (our kernel gave it up: ETIMEDOUT,
    /// EHOSTUNREACH); the other peer was reset too.
    Reset { side: Side, err: io::Error },
    /// A local failure (a descriptor gone bad, out of memory).
    Failed { what: String, err: io::Error },
    /// A forwarded HTTP request refused on the way (a broken chunked body).
    Refused { why: String },
}

impl End {
    /// The exit status DESIGN.md gives this ending.
    pub fn exit_code(&self) -> i32 {
        match self {
            End::Clean => crate::exit::OK,
            End::Idle | End::Signal { .. } | End::Reset { .. } | End::Refused { .. } => {
                crate::exit::POLICY
            }
            End::Failed { .. } => crate::exit::TEMP,
        }
    }

    /// A word or two for the log line.
    pub fn describe(&self) -> String {
        match self {
            End::Clean => "eof".into(),
            End::Idle => "idle-timeout".into(),
            End::Signal { signo, drained } => format!(
                "signal-{}{}",
                signo,
                if *drained { "" } else { "-undrained" }
            ),
            End::Reset { side, err } => {
                // Our kernel gave the peer up (keepalive, user timeout, retransmissions)
                // or heard it is unreachable: not a reset the peer sent.
                let lost = matches!(
                    err.raw_os_error(),
                    Some(libc::ETIMEDOUT) | Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH)
                );
                let word = if lost { "lost-" } else { "reset-by-" };
                format!("{word}{} ({})", side.name(), sys::strerror(err))
            }
            End::Failed { what, err } => format!("error ({what}: {})", sys::strerror(err)),
            End::Refused { why } => format!("refused ({why})"),
        }
    }
}

/// What the relay did, for the log line.
#[derive(Debug)]
pub struct Outcome {
    pub end: End,
    /// Bytes delivered client→target.
    pub up: u64,
    /// Bytes delivered target→client.
    pub down: u64,
    /// The path each direction ended on: "splice", "copy", ...
    pub up_path: &'static str,
    pub down_path: &'static str,
    /// The largest pipe each direction had (0: none of its own).
    pub up_pipe: usize,
    pub down_pipe: usize,
    /// The largest copy buffer each direction had (0: it never copied).
    pub up_buf: usize,
    pub down_buf: usize,
    pub elapsed: Duration,
}

#[derive(Debug)]
enum Path {
    Direct,
    Piped { r: RawFd, w: RawFd, cap: usize },
    Copy,
}

/// One direction's error, with the side whose descriptor failed.
struct DirError {
    side: Side,
    read: bool,
    err: io::Error,
}

struct Dir {
    src: RawFd,
    dst: RawFd,
    src_side: Side,
    dst_side: Side,
    src_kind: FdKind,
    dst_kind: FdKind,
    path: Path,
    /// Bytes sitting in our pipe (Piped).
    in_pipe: usize,
    /// Bytes read into user space and not yet written: all of Copy's traffic, a pipe
    /// drained on fallback, or a read past an urgent mark. They go out before anything
    /// else is read, so order is kept. Empty until needed (see `COPY_BUF_START`).
    buf: Vec<u8>,
    /// Copy: the last read filled the buffer, so the next one gets a larger one.
    buf_filled: bool,
    bstart: usize,
    bend: usize,
    /// The source ended (or we stopped reading it on a signal).
    eof: bool,
    /// The write side has been ended: the direction is finished.
    done: bool,
    /// Piped: src→pipe said EAGAIN while the pipe held data; its slots may be full, so
    /// do not poll src until the pipe drains (else poll would report src ready for ever).
    src_blocked: bool,
    /// Direct: the last EAGAIN came with src readable, so wait for dst.
    wait_dst: bool,
    /// dst reported a hang-up without an error while we had nothing for it: its peer
    /// closed (a Unix-domain socket says so at once, TCP at the next write). Not a
    /// reset: what the peer sent may still be read from it. No longer watched; a write
    /// to it will say EPIPE.
    dst_hup: bool,
    /// Readiness seen in rounds that moved nothing, to recognise a splice stuck at an
    /// urgent mark: poll says ready, splice says EAGAIN, for ever.
    stuck_src: bool,
    stuck_dst: bool,
    /// Whether the first splice of each kind has succeeded: a later EINVAL is an error,
    /// not "this fd cannot be spliced".
    spliced_in: bool,
    spliced_out: bool,
    /// The pipe size to grow to at the first burst; 0 once tried.
    grow_to: usize,
    /// Copying for now, and to take a pipe at the first read that fills the buffer
    /// (`FIRST_READ`): a direction between sockets.
    promote: bool,
    /// The largest size our pipe had, for the log line.
    pipe_seen: usize,
    /// The largest copy buffer, for the log line.
    buf_seen: usize,
    bytes: u64,
}

/// Rounds of one direction's pump before poll is asked again, so a fast direction
/// cannot starve the other one or a pending signal.
const MAX_ROUNDS: usize = 64;

fn is_again(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EAGAIN)
}

fn cannot_splice(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

impl Dir {
    fn new(
        (src, src_kind): (RawFd, FdKind),
        (dst, dst_kind): (RawFd, FdKind),
        src_side: Side,
        dst_side: Side,
        cfg: &Config,
    ) -> io::Result<Dir> {
        let mut d = Dir {
            src,
            dst,
            src_side,
            dst_side,
            src_kind,
            dst_kind,
            path: Path::Copy,
            in_pipe: 0,
            buf: Vec::new(),
            buf_filled: false,
            bstart: 0,
            bend: 0,
            eof: false,
            done: false,
            src_blocked: false,
            dst_hup: false,
            wait_dst: false,
            stuck_src: false,
            stuck_dst: false,
            spliced_in: false,
            spliced_out: false,
            grow_to: cfg.pipe_size,
            promote: false,
            pipe_seen: 0,
            buf_seen: 0,
            bytes: 0,
        };
        if cfg.copy_only {
            d.fall_back_to_copy();
        } else if src_kind == FdKind::Pipe || dst_kind == FdKind::Pipe {
            d.path = Path::Direct;
        } else {
            // Copy until the first burst (see `FIRST_READ` and `take_pipe`).
            d.promote = true;
        }
        Ok(d)
    }

    /// A read filled the first buffer: this direction carries more than a short
    /// exchange, so it gets a pipe (bytes still in the buffer go out first, as after
    /// a fallback). The pipe starts at the kernel's default size and grows when a burst
    /// fills half of it (see `grow_pipe`). A pipe that cannot be had, or a tiny one (the
    /// user's pipe budget is spent), leaves the direction copying.
    fn take_pipe(&mut self) {
        self.promote = false;
        let Ok((r, w)) = sys::pipe_nonblocking() else {
            return;
        };
        let cap = sys::pipe_size(w);
        if cap < MIN_PIPE {
            sys::close(r);
            sys::close(w);
            return;
        }
        self.path = Path::Piped { r, w, cap };
        self.pipe_seen = cap;
    }

    /// Switches to copying. Bytes already in our pipe are read back into the buffer
    /// first, so they go out before anything read later; the buffer for what is read
    /// next is left to the first read (`size_copy_buf`).
    fn fall_back_to_copy(&mut self) {
        if let Path::Piped { r, w, .. } = self.path {
            let need = self.bend + self.in_pipe;
            if self.buf.len() < need {
                self.buf.resize(need, 0);
            }
            while self.in_pipe > 0 {
                let end = self.bend;
                match sys::read(r, &mut self.buf[end..]) {
                    Ok(n) if n > 0 => {
                        self.bend += n;
                        self.in_pipe = self.in_pipe.saturating_sub(n);
                    }
                    _ => break,
                }
            }
            sys::close(r);
            sys::close(w);
        }
        self.path = Path::Copy;
    }

    /// A burst filled half the pipe: this is a bulk direction, so ask once for the
    /// full size (fewer, larger splices). Over the user's pipe budget the kernel
    /// refuses, and the pipe keeps its size.
    fn grow_pipe(&mut self) {
        if self.grow_to == 0 {
            return;
        }
        if let Path::Piped { w, ref mut cap, .. } = self.path {
            let got = sys::pipe_resize(w, self.grow_to);
            *cap = (*cap).max(got);
            self.pipe_seen = *cap;
        }
        self.grow_to = 0;
    }

    /// Copy: sizes the (empty) buffer for the next read: `COPY_BUF_START` at the first,
    /// twice the size after a read that filled it, never above `COPY_BUF` (a buffer
    /// left larger by a fallback that drained a big pipe is given back).
    fn size_copy_buf(&mut self) {
        debug_assert!(self.bstart == self.bend);
        let len = self.buf.len();
        let want = if self.promote {
            FIRST_READ
        } else if len == 0 {
            COPY_BUF_START
        } else if self.buf_filled {
            (len * 2).clamp(COPY_BUF_START, COPY_BUF)
        } else {
            len.clamp(COPY_BUF_START, COPY_BUF)
        };
        if want != len {
            // Nothing in it to keep: a fresh buffer spares copying stale bytes.
            give_buf(std::mem::replace(&mut self.buf, take_buf(want)));
            self.bstart = 0;
            self.bend = 0;
            self.buf_seen = self.buf_seen.max(want);
        }
        self.buf_filled = false;
    }

    fn pending(&self) -> bool {
        self.bend > self.bstart || self.in_pipe > 0
    }

    /// Poll events wanted on src and dst.
    fn interest(&self) -> (i16, i16) {
        if self.done {
            return (0, 0);
        }
        let mut src_ev = 0;
        let mut dst_ev = 0;
        let buffered = self.bend > self.bstart;
        match self.path {
            Path::Direct => {
                if buffered {
                    dst_ev = libc::POLLOUT;
                } else if !self.eof {
                    if self.wait_dst {
                        dst_ev = libc::POLLOUT;
                    } else {
                        src_ev = libc::POLLIN;
                    }
                }
            }
            Path::Piped { cap, .. } => {
                if buffered || self.in_pipe > 0 {
                    dst_ev = libc::POLLOUT;
                }
                if !self.eof && !buffered && self.in_pipe < cap && !self.src_blocked {
                    src_ev = libc::POLLIN;
                }
            }
            Path::Copy => {
                if buffered {
                    dst_ev = libc::POLLOUT;
                } else if !self.eof {
                    src_ev = libc::POLLIN;
                }
            }
        }
        (src_ev, dst_ev)
    }

    fn read_err(&self, err: io::Error) -> DirError {
        DirError {
            side: self.src_side,
            read: true,
            err,
        }
    }

    fn write_err(&self, err: io::Error) -> DirError {
        DirError {
            side: self.dst_side,
            read: false,
            err,
        }
    }

    /// Writes out the user buffer. Ok(true) when something was written.
    fn flush_buf(&mut self) -> Result<bool, DirError> {
        let mut moved = false;
        while self.bend > self.bstart {
            match sys::write(self.dst, &self.buf[self.bstart..self.bend]) {
                Ok(n) => {
                    self.bstart += n;
                    self.bytes += n as u64;
                    moved = true;
                }
                Err(e) if is_again(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.write_err(e)),
            }
        }
        if self.bstart == self.bend {
            self.bstart = 0;
            self.bend = 0;
            if !matches!(self.path, Path::Copy) && self.buf.len() > COPY_BUF {
                // A fallback drained a big pipe into the buffer: give the memory back.
                self.buf = Vec::new();
            }
        }
        Ok(moved)
    }

    /// Reads past an urgent mark where splice is stuck: a recv moves on where
    /// tcp_read_sock stops. The bytes join the buffer and go out before the next splice.
    fn rescue_read(&mut self) -> Result<bool, DirError> {
        if self.buf.len() < 64 * 1024 {
            self.buf.resize(64 * 1024, 0);
        }
        match sys::read(self.src, &mut self.buf[..]) {
            Ok(0) => {
                self.eof = true;
                Ok(true)
            }
            Ok(n) => {
                self.bstart = 0;
                self.bend = n;
                Ok(true)
            }
            Err(e) if is_again(&e) || e.kind() == io::ErrorKind::Interrupted => Ok(false),
            Err(e) => Err(self.read_err(e)),
        }
    }

    /// Moves what can be moved without blocking. `src_ready`/`dst_ready` are what poll
    /// reported this round.
    fn pump(&mut self, src_ready: bool, dst_ready: bool) -> Result<bool, DirError> {
        let mut moved = false;
        if self.done {
            return Ok(moved);
        }
        let mut read_any = false;
        // A read that came back short (or EAGAIN) drained the source for now: asking
        // again before poll says more has come would only earn an EAGAIN.
        let mut src_dry = false;
        for _ in 0..MAX_ROUNDS {
            let mut progress = self.flush_buf()?;
            if self.bend > self.bstart {
                break; // dst is full; wait for POLLOUT
            }
            match self.path {
                Path::Copy => {
                    if !self.eof && !src_dry {
                        self.size_copy_buf();
                        match sys::read(self.src, &mut self.buf[..]) {
                            Ok(0) => {
                                self.eof = true;
                                progress = true;
                            }
                            Ok(n) => {
                                self.bstart = 0;
                                self.bend = n;
                                progress = true;
                                src_dry = n < self.buf.len();
                                self.buf_filled = !src_dry;
                                if self.promote && self.buf_filled {
                                    self.take_pipe();
                                }
                            }
                            Err(e) if is_again(&e) => src_dry = true,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                            Err(e) => return Err(self.read_err(e)),
                        }
                    }
                }
                Path::Direct => {
                    if !self.eof && !src_dry {
                        match sys::splice(self.src, self.dst, DIRECT_CHUNK) {
                            Ok(0) => {
                                self.eof = true;
                                progress = true;
                            }
                            Ok(n) => {
                                self.bytes += n as u64;
                                self.spliced_in = true;
                                progress = true;
                                read_any = true;
                                self.wait_dst = false;
                                src_dry = n < DIRECT_CHUNK;
                            }
                            Err(e) if is_again(&e) => {
                                src_dry = true;
                                if !read_any {
                                    self.stuck_src |= src_ready;
                                    self.stuck_dst |= dst_ready;
                                }
                                if self.stuck_src && self.stuck_dst {
                                    // Both ends said ready and splice still refuses.
                                    self.stuck_src = false;
                                    self.stuck_dst = false;
                                    progress |= self.rescue_read()?;
                                } else {
                                    self.wait_dst = src_ready && !read_any;
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                            Err(e) if !self.spliced_in && cannot_splice(&e) => {
                                self.fall_back_to_copy();
                                progress = true;
                            }
                            Err(e) => {
                                // Which end failed? A dead reader shows as EPIPE.
                                let write_side = matches!(e.raw_os_error(), Some(libc::EPIPE))
                                    || (self.dst_kind == FdKind::Socket
                                        && sys::socket_error(self.dst).is_some());
                                return Err(if write_side {
                                    self.write_err(e)
                                } else {
                                    self.read_err(e)
                                });
                            }
                        }
                    }
                }
                Path::Piped { r, w, cap } => {
                    if self.in_pipe > 0 {
                        match sys::splice(r, self.dst, self.in_pipe) {
                            Ok(n) => {
                                self.in_pipe -= n;
                                self.bytes += n as u64;
                                self.spliced_out = true;
                                self.src_blocked = false;
                                progress |= n > 0;
                            }
                            Err(e) if is_again(&e) => {}
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                            Err(e) if !self.spliced_out && cannot_splice(&e) => {
                                self.fall_back_to_copy();
                                continue;
                            }
                            Err(e) => return Err(self.write_err(e)),
                        }
                    }
                    if !self.eof && !src_dry && self.in_pipe < cap {
                        let want = cap - self.in_pipe;
                        match sys::splice(self.src, w, want) {
                            Ok(0) => {
                                self.eof = true;
                                progress = true;
                            }
                            Ok(n) => {
                                src_dry = n < want;
                                self.in_pipe += n;
                                self.spliced_in = true;
                                progress = true;
                                read_any = true;
                                if n >= cap / 2 {
                                    self.grow_pipe();
                                }
                            }
                            Err(e) if is_again(&e) => {
                                src_dry = true;
                                if self.in_pipe > 0 {
                                    self.src_blocked = true;
                                } else if src_ready && !read_any {
                                    // The pipe is empty, src said readable, splice says
                                    // EAGAIN: stuck at an urgent mark.
                                    progress |= self.rescue_read()?;
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => progress = true,
                            Err(e) if !self.spliced_in && cannot_splice(&e) => {
                                self.fall_back_to_copy();
                                continue;
                            }
                            Err(e) => return Err(self.read_err(e)),
                        }
                    }
                }
            }
            if progress {
                moved = true;
                self.stuck_src = false;
                self.stuck_dst = false;
            } else {
                break;
            }
        }
        Ok(moved)
    }

    /// Ends the write side once everything read has been delivered. Returns true when
    /// the caller must close `dst` (not a socket, not used by the other direction);
    /// the caller closes it, after putting back the flags it shares with others.
    fn finish_if_drained(&mut self, shared_with_other: bool) -> bool {
        if self.done || !self.eof || self.pending() {
            return false;
        }
        self.done = true;
        self.release_pipe();
        if self.dst_kind == FdKind::Socket {
            // ENOTCONN: the peer is already gone; nothing more to tell it.
            let _ = sys::shutdown(self.dst, libc::SHUT_WR);
            false
        } else {
            !shared_with_other
        }
    }

    fn release_pipe(&mut self) {
        if let Path::Piped { r, w, .. } = self.path {
            sys::close(r);
            sys::close(w);
            self.path = Path::Direct; // nothing left to close; keeps the path name sane
            self.in_pipe = 0;
        }
    }
}

/// Tells the peer on `fd` that the connection is over: a reset on a socket (so a reset
/// reaches the other side as a reset, not as a clean end), a close on anything else.
fn abort_peer(fd: RawFd, kind: FdKind) {
    if kind == FdKind::Socket {
        let _ = sys::reset_connection(fd);
    } else {
        sys::close(fd);
    }
}

/// Puts back the O_NONBLOCK state we found on each descriptor: a tty or pipe shares it
/// with the shell that started us. Each entry: the fd, its flags as found before any fd
/// was changed, the file's identity.
pub(super) struct FlagGuard {
    saved: Vec<(RawFd, libc::c_int, (u64, u64))>,
    /// The files made non-blocking here, whether or not their flags are put back.
    nonblocking: Vec<(u64, u64)>,
}

impl FlagGuard {
    pub(super) fn new() -> FlagGuard {
        FlagGuard {
            saved: Vec::new(),
            nonblocking: Vec::with_capacity(4),
        }
    }

    /// Puts back the flags of `fd` now, before it is closed; unless another fd still in
    /// use is the same file (a terminal on 0 and 1 is one open file, whose flag the
    /// other fd still needs): that one puts them back at the end.
    fn restore(&mut self, fd: RawFd) {
        if let Some(i) = self.saved.iter().position(|&(f, _, _)| f == fd) {
            let (_, flags, id) = self.saved.remove(i);
            if !self.saved.iter().any(|&(_, _, other)| other == id) {
                let _ = sys::set_fl(fd, flags);
            }
        }
    }
}

impl Drop for FlagGuard {
    fn drop(&mut self) {
        for &(fd, flags, _) in &self.saved {
            let _ = sys::set_fl(fd, flags);
        }
    }
}

/// How long a relay runs before its sockets get the keepalive timers and the user
/// timeout: both matter only to a connection that lives for minutes, and a short one
/// (most of them, for a proxy) is spared ten setsockopt calls.
pub const LIVENESS_AFTER: Duration = Duration::from_secs(1);

/// For a relay that has lasted [`LIVENESS_AFTER`]: what its set-up wrote and no longer
/// uses need not stay its own memory for as long as it lasts (see
/// sys::release_stack_below and sys::release_free_heap). Called from the relay's own
/// frames, which the stack release keeps.
pub(super) fn give_back_set_up_memory() {
    sys::release_stack_below();
    sys::release_free_heap();
}

/// Makes the four descriptors ready for the loop and returns their kinds (see
/// [`prepare_fd`]). The flags of all are read before any is changed: two of them may be
/// one open file (a terminal on 0 and 1), and the second would otherwise be found with
/// our O_NONBLOCK. A descriptor this process alone holds (`chain::private`) is a socket
/// its link described: nothing is asked of it. Also returns what `chain::private` said
/// of each (for [`poll_aliases`]).
pub(super) fn prepare_all(
    cfg: &Config,
    fds: [RawFd; 4],
    guard: &mut FlagGuard,
    seen: &mut Vec<((u64, u64), RawFd)>,
    defer_liveness: bool,
) -> io::Result<([FdKind; 4], [Option<chain::Private>; 4])> {
    let private = fds.map(chain::private);
    let mut found = [0; 4];
    for ((f, &fd), p) in found.iter_mut().zip(&fds).zip(&private) {
        if p.is_none() {
            *f = sys::get_fl(fd)?;
        }
    }
    let mut kind = [FdKind::Other; 4];
    for i in 0..4 {
        kind[i] = match private[i] {
            Some(p) => prepare_private(cfg, fds[i], p, guard, seen, defer_liveness)?,
            None => prepare_fd(cfg, fds[i], found[i], guard, seen, defer_liveness)?,
        };
    }
    Ok((kind, private))
}

/// Makes `fd` ready for the loop and returns its kind. O_NONBLOCK belongs to the open
/// file description, which two fds on one file need not share, so it is set per file
/// (`found` is what the fd had before any of ours was changed) and put back at the end.
/// Socket options belong to the socket: `seen` holds those already set (and a
/// descriptor of each), as fds 0/1 and 6/7 are usually one socket each; with
/// `defer_liveness`, the liveness options are left to [`set_liveness`] (the relay's
/// loop calls it after [`LIVENESS_AFTER`]).
fn prepare_fd(
    cfg: &Config,
    fd: RawFd,
    found: libc::c_int,
    guard: &mut FlagGuard,
    seen: &mut Vec<((u64, u64), RawFd)>,
    defer_liveness: bool,
) -> io::Result<FdKind> {
    let (kind, id) = sys::fd_identity(fd)?;
    if kind != FdKind::Regular {
        if !guard.nonblocking.contains(&id) {
            if found & libc::O_NONBLOCK == 0 {
                sys::set_fl(fd, found | libc::O_NONBLOCK)?;
            }
            guard.nonblocking.push(id);
        }
        if !guard.saved.iter().any(|&(f, _, _)| f == fd) {
            guard.saved.push((fd, found, id));
        }
    }
    if kind == FdKind::Socket {
        socket_options(cfg, fd, id, seen, defer_liveness);
    }
    Ok(kind)
}

/// [`prepare_fd`] for a socket this process alone holds: its flags are not put back
/// (nobody else can see them, and it is closed after us), and what it is was said by
/// the link that made it its own: one socket per [`chain::Private::socket`], blocking
/// unless said otherwise. Its identity is one no file has (the device of a real one is
/// never all ones), so that only its own descriptors match it.
fn prepare_private(
    cfg: &Config,
    fd: RawFd,
    p: chain::Private,
    guard: &mut FlagGuard,
    seen: &mut Vec<((u64, u64), RawFd)>,
    defer_liveness: bool,
) -> io::Result<FdKind> {
    let id = (u64::MAX, u64::from(p.socket));
    if !guard.nonblocking.contains(&id) {
        if !p.nonblocking {
            // A socket we accepted or made has no status flag but O_NONBLOCK that
            // F_SETFL changes (O_APPEND, O_ASYNC, O_DIRECT and O_NOATIME are never set
            // on one here), so nothing need be read first.
            sys::set_fl(fd, libc::O_RDWR | libc::O_NONBLOCK)?;
        }
        guard.nonblocking.push(id);
    }
    socket_options(cfg, fd, id, seen, defer_liveness);
    Ok(FdKind::Socket)
}

/// The socket options of the relay, once per socket (`seen`, by identity).
fn socket_options(
    cfg: &Config,
    fd: RawFd,
    id: (u64, u64),
    seen: &mut Vec<((u64, u64), RawFd)>,
    defer_liveness: bool,
) {
    if !seen.iter().any(|&(s, _)| s == id) {
        seen.push((id, fd));
        // Urgent data stays in the stream (nothing is lost), and our own writes add no
        // Nagle delay to what the peer sent. None matters enough to fail for (a
        // Unix-domain socket refuses the TCP ones).
        let _ = sys::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_OOBINLINE, 1);
        let _ = sys::setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
        if !defer_liveness {
            set_liveness(cfg, fd);
        }
    }
}

/// Keepalive bounds the wait on a quiet peer that vanished without a word (a machine
/// gone, a NAT that forgot us), the user timeout the wait on one that stops ACKing what
/// we send; -t, off by default, would bound neither.
pub(super) fn set_liveness(cfg: &Config, fd: RawFd) {
    let _ = sys::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    if let Some(k) = cfg.keepalive {
        for (name, v) in [
            (libc::TCP_KEEPIDLE, k.idle),
            (libc::TCP_KEEPINTVL, k.interval),
            (libc::TCP_KEEPCNT, k.count),
        ] {
            let _ = sys::setsockopt_int(fd, libc::IPPROTO_TCP, name, v as libc::c_int);
        }
    }
    if cfg.user_timeout_ms > 0 {
        let ms = cfg.user_timeout_ms as libc::c_int;
        let _ = sys::setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms);
    }
}

/// The signals that stop the relay, after a grace (`Config::grace`).
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// The relay's signalfd: its own in a tcpsplice that was exec'd, closed at the end as
/// its process ends; the process's kept one when tcpsplice continues a link in this
/// process (`chain::continued_in_process`), which under tcpsplice-listen relays one
/// connection after another: made and closed per connection, it cost two syscalls of
/// each. Kept above the chain's numbers and reserved (`chain::reserve_more`), it is
/// hidden from the programs as an exec would have closed it (it is close-on-exec), and
/// kept between connections; the mask is emptied between them as before, so that what
/// the next link finds is what an exec would have left.
pub(super) enum Signals {
    Own(sys::SignalFd),
    Kept(&'static sys::SignalFd),
}

impl std::ops::Deref for Signals {
    type Target = sys::SignalFd;
    fn deref(&self) -> &sys::SignalFd {
        match self {
            Signals::Own(s) => s,
            Signals::Kept(s) => s,
        }
    }
}

pub(super) fn signals() -> io::Result<Signals> {
    if !chain::continued_in_process() {
        return sys::SignalFd::new(&STOP_SIGNALS).map(Signals::Own);
    }
    let s = sys::SignalFd::kept(&STOP_SIGNALS, chain::RESERVED_MIN)?;
    chain::reserve_more(s.fd());
    Ok(Signals::Kept(s))
}

/// Copy buffers given back by directions that ended, for the next relay of this
/// process (see [`take_buf`]).
static SPARE_BUFS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// Most buffers kept, and the largest: a short connection's two directions use one of
/// `FIRST_READ` each, and a larger one is a bulk connection's, rare enough to allocate.
const SPARE_MAX: usize = 2;
const SPARE_LEN_MAX: usize = COPY_BUF_START;

/// A buffer of `len` bytes for reading into: one kept from an earlier relay of this
/// process when there is one, else a new one. A process that relays one connection
/// after another (under tcpsplice-listen) otherwise allocated and zero-filled two per
/// connection: 9k of the 72k instructions of a short SOCKS5 connection (callgrind,
/// 2026-12-01). What a kept buffer holds of the last client's
/// bytes is never read (only what a read put there is written out), and it is no more
/// than the heap's freed chunks held before: the buffers never leave the process, which
/// serves one client after another as the same user, and no code of the chain can read
/// a buffer it was not handed. Nor do they hold more memory: the pages of a freed chunk
/// stay the process's own (malloc gives back only the heap's top), and the next
/// connection's buffers would mostly land on them again (reasoned, not measured).
fn take_buf(len: usize) -> Vec<u8> {
    let mut spare = SPARE_BUFS.lock().unwrap_or_else(|e| e.into_inner());
    match spare.iter().position(|b| b.capacity() >= len) {
        Some(i) => {
            let mut b = spare.swap_remove(i);
            b.resize(len, 0);
            b
        }
        None => vec![0; len],
    }
}

/// Gives back a buffer for [`take_buf`], unless it is large or enough are kept.
fn give_buf(b: Vec<u8>) {
    if b.capacity() == 0 || b.capacity() > SPARE_LEN_MAX {
        return;
    }
    let mut spare = SPARE_BUFS.lock().unwrap_or_else(|e| e.into_inner());
    if spare.len() < SPARE_MAX {
        spare.push(b);
    }
}

/// The descriptors poll may watch in place of others, as (instead of, watched): the
/// output descriptor of a side that is the same socket as its input, as tcpsplice-listen's
/// chain says of fds 0/1 and 6/7 (`chain::private`). One socket is then one entry of the
/// poll set, its events merged (`watch`), where two cost the kernel a second look at the
/// socket at every poll (three or four polls per short connection). What poll reports is
/// the socket's: the same through either descriptor, and each direction reads only the
/// bits it asked for.
fn poll_aliases(fds: [RawFd; 4], private: &[Option<chain::Private>; 4]) -> [(RawFd, RawFd); 2] {
    // fds is client in, client out, target in, target out.
    let alias = |input: usize, output: usize| match (private[input], private[output]) {
        (Some(x), Some(y)) if x.socket == y.socket && fds[input] != fds[output] => {
            (fds[output], fds[input])
        }
        _ => (-1, -1),
    };
    [alias(0, 1), alias(2, 3)]
}

/// The descriptor poll watches for `fd` (see [`poll_aliases`]).
fn polled(aliases: &[(RawFd, RawFd); 2], fd: RawFd) -> RawFd {
    aliases
        .iter()
        .find(|&&(from, _)| from == fd && fd >= 0)
        .map_or(fd, |&(_, to)| to)
}

/// Adds `fd` with `events` to the poll set (merging with an entry for the same fd) and
/// returns its index.
fn watch(set: &mut Vec<libc::pollfd>, fd: RawFd, events: i16) -> usize {
    if let Some(i) = set.iter().position(|p| p.fd == fd) {
        set[i].events |= events;
        return i;
    }
    set.push(libc::pollfd {
        fd,
        events,
        revents: 0,
    });
    set.len() - 1
}

/// Runs the relay until both directions have ended, or it is ended. Errors only when
/// setting up (a descriptor not open, no pipes).
pub fn run(cfg: &Config) -> io::Result<Outcome> {
    let start = Instant::now();
    let mut guard = FlagGuard::new();
    let mut seen = Vec::with_capacity(4);
    let fds = [cfg.client_in, cfg.client_out, cfg.target_in, cfg.target_out];
    let (kind, private) = prepare_all(cfg, fds, &mut guard, &mut seen, true)?;
    // `seen` holds a descriptor of each socket, for the liveness options once the relay
    // has lasted.
    let mut liveness_due = (!seen.is_empty()).then(|| start + LIVENESS_AFTER);
    let signals = signals()?;
    let mut dirs = [
        Dir::new(
            (cfg.client_in, kind[0]),
            (cfg.target_out, kind[3]),
            Side::Client,
            Side::Target,
            cfg,
        )?,
        Dir::new(
            (cfg.target_in, kind[2]),
            (cfg.client_out, kind[1]),
            Side::Target,
            Side::Client,
            cfg,
        )?,
    ];
    let mut last_activity = Instant::now();
    let mut deadline: Option<Instant> = None; // set by a signal: drain until then
    let mut signo = 0;
    let mut set: Vec<libc::pollfd> = Vec::with_capacity(6);
    let aliases = poll_aliases(fds, &private);

    let end = loop {
        // Finish what has drained; a direction whose dst is also a descriptor of the
        // other direction (one fd for both ways) must not close it.
        for i in 0..2 {
            let other = &dirs[1 - i];
            let shared = dirs[i].dst == other.src || dirs[i].dst == other.dst;
            if dirs[i].finish_if_drained(shared) {
                guard.restore(dirs[i].dst);
                sys::close(dirs[i].dst);
            }
        }
        if dirs.iter().all(|d| d.done) {
            break if deadline.is_some() {
                End::Signal {
                    signo,
                    drained: true,
                }
            } else {
                End::Clean
            };
        }

        set.clear();
        let sig_idx = watch(&mut set, signals.fd(), libc::POLLIN);
        let mut idx = [(usize::MAX, usize::MAX); 2];
        for (i, d) in dirs.iter().enumerate() {
            if d.done {
                continue;
            }
            let (mut se, mut de) = d.interest();
            if d.dst_hup && !d.pending() {
                // Waiting for room at a dst that hung up would spin: read instead, and
                // learn at the write.
                de = 0;
                if !d.eof {
                    se = libc::POLLIN;
                }
            }
            // A dst socket is watched even with no events, so that a reset of a peer we
            // are not writing to is seen at once (poll always reports POLLERR/POLLHUP).
            // A src is not: a half-closed socket reports POLLHUP for ever, which would
            // spin while we wait for dst to drain; its reset shows at the next read.
            let s = if se != 0 {
                watch(&mut set, polled(&aliases, d.src), se)
            } else {
                usize::MAX
            };
            let t = if de != 0 || (d.dst_kind == FdKind::Socket && !d.dst_hup) {
                watch(&mut set, polled(&aliases, d.dst), de)
            } else {
                usize::MAX
            };
            idx[i] = (s, t);
        }

        let now = Instant::now();
        let mut timeout: Option<Duration> = None;
        if let Some(idle) = cfg.idle {
            timeout = Some((last_activity + idle).saturating_duration_since(now));
        }
        if let Some(dl) = deadline {
            let left = dl.saturating_duration_since(now);
            timeout = Some(timeout.map_or(left, |t| t.min(left)));
        }
        if let Some(due) = liveness_due {
            if now >= due {
                for &(_, fd) in &seen {
                    set_liveness(cfg, fd);
                }
                liveness_due = None;
                give_back_set_up_memory();
            } else {
                let left = due.saturating_duration_since(now);
                timeout = Some(timeout.map_or(left, |t| t.min(left)));
            }
        }
        let n = match sys::poll(&mut set, timeout) {
            Ok(n) => n,
            Err(err) => {
                break End::Failed {
                    what: "poll".into(),
                    err,
                }
            }
        };
        if n == 0 {
            if let Some(dl) = deadline {
                if Instant::now() >= dl {
                    break End::Signal {
                        signo,
                        drained: false,
                    };
                }
            }
            if let Some(idle) = cfg.idle {
                if last_activity.elapsed() >= idle {
                    break End::Idle;
                }
            }
            continue;
        }

        if set[sig_idx].revents != 0 {
            while let Some(s) = signals.take() {
                if deadline.is_none() {
                    signo = s;
                    deadline = Some(Instant::now() + cfg.grace);
                    // Stop reading; what is in flight still goes out.
                    for d in dirs.iter_mut() {
                        d.eof = true;
                    }
                }
            }
        }

        let mut failure: Option<DirError> = None;
        for i in 0..2 {
            let (s, t) = idx[i];
            if s == usize::MAX && t == usize::MAX {
                continue;
            }
            let rev = |k: usize| if k == usize::MAX { 0 } else { set[k].revents };
            let (srev, drev) = (rev(s), rev(t));
            let bad = libc::POLLERR | libc::POLLNVAL;
            let d = &mut dirs[i];
            // Trouble on a descriptor we are not reading or writing right now: find out
            // what it is; for a socket that is a reset or a vanished peer.
            if drev & (bad | libc::POLLHUP) != 0
                && !d.pending()
                && (d.dst_kind == FdKind::Socket || drev & bad != 0)
            {
                let err = if d.dst_kind == FdKind::Socket {
                    sys::socket_error(d.dst)
                } else {
                    None
                };
                if err.is_none() && drev & bad == 0 {
                    d.dst_hup = true;
                    continue;
                }
                let fallback = if d.dst_kind == FdKind::Socket {
                    libc::ECONNRESET
                } else {
                    libc::EPIPE
                };
                failure = Some(
                    d.write_err(err.unwrap_or_else(|| io::Error::from_raw_os_error(fallback))),
                );
                break;
            }
            let src_ready = srev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
            if srev & (libc::POLLERR | libc::POLLNVAL) != 0 && d.src_kind == FdKind::Socket {
                if let Some(err) = sys::socket_error(d.src) {
                    failure = Some(d.read_err(err));
                    break;
                }
            }
            let dst_ready = drev & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0;
            if !src_ready && !dst_ready {
                continue;
            }
            match d.pump(src_ready, dst_ready) {
                Ok(moved) => {
                    if moved {
                        last_activity = Instant::now();
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(f) = failure {
            // Tell the other peer: a reset if it is a socket.
            let (cause, innocent, innocent_kind) = match f.side {
                Side::Client => (Side::Client, cfg.target_out, dirs[0].dst_kind),
                Side::Target => (Side::Target, cfg.client_out, dirs[1].dst_kind),
            };
            let peer_error = matches!(
                f.err.raw_os_error(),
                Some(libc::ECONNRESET)
                    | Some(libc::EPIPE)
                    | Some(libc::ETIMEDOUT)
                    | Some(libc::EHOSTUNREACH)
                    | Some(libc::ENETUNREACH)
                    | Some(libc::ECONNABORTED)
                    | Some(libc::ENOTCONN)
            );
            // A peer that sent its whole stream, saw it delivered, and then reset what
            // came after (a TLS server that closes without waiting for close_notify):
            // its end was clean; it only declined the rest. Not a reset to pass on.
            let finished = match cause {
                Side::Client => dirs[0].done,
                Side::Target => dirs[1].done,
            };
            if peer_error && finished {
                break End::Clean;
            }
            if peer_error {
                abort_peer(innocent, innocent_kind);
                break End::Reset {
                    side: cause,
                    err: f.err,
                };
            }
            abort_peer(innocent, innocent_kind);
            let what = format!(
                "{} {}",
                if f.read { "read from" } else { "write to" },
                f.side.name()
            );
            break End::Failed { what, err: f.err };
        }
    };

    if matches!(end, End::Idle | End::Signal { drained: false, .. }) {
        // Let both peers see an end instead of hanging on a connection we dropped. A
        // peer whose bytes we are throwing away hears a reset: a FIN would pass the
        // cut-off stream for a whole one.
        for d in &dirs {
            if d.dst_kind == FdKind::Socket && !d.done {
                if d.pending() {
                    let _ = sys::reset_connection(d.dst);
                } else {
                    let _ = sys::shutdown(d.dst, libc::SHUT_RDWR);
                }
            }
        }
    }
    for d in dirs.iter_mut() {
        d.release_pipe();
        give_buf(std::mem::take(&mut d.buf));
    }
    drop(guard);
    Ok(Outcome {
        up: dirs[0].bytes,
        down: dirs[1].bytes,
        up_path: dirs[0].path_name_final(),
        down_path: dirs[1].path_name_final(),
        up_pipe: dirs[0].pipe_seen,
        down_pipe: dirs[1].pipe_seen,
        up_buf: dirs[0].buf_seen,
        down_buf: dirs[1].buf_seen,
        elapsed: start.elapsed(),
        end,
    })
}

impl Dir {
    fn path_name_final(&self) -> &'static str {
        if matches!(self.path, Path::Copy) {
            "copy"
        } else if self.src_kind == FdKind::Pipe || self.dst_kind == FdKind::Pipe {
            "splice-direct"
        } else {
            "splice"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_watches_an_aliased_descriptor_through_its_socket_and_others_as_they_are() {
        let aliases = [(1, 0), (-1, -1)];
        assert_eq!(polled(&aliases, 1), 0);
        assert_eq!(polled(&aliases, 0), 0);
        assert_eq!(polled(&aliases, 7), 7);
        assert_eq!(polled(&aliases, 6), 6);
        // The unused slot matches nothing, not even a descriptor numbered -1.
        assert_eq!(polled(&aliases, -1), -1);
        // Watched through the alias, both directions' events land on one entry.
        let mut set = Vec::new();
        let a = watch(&mut set, polled(&aliases, 0), libc::POLLIN);
        let b = watch(&mut set, polled(&aliases, 1), libc::POLLOUT);
        assert_eq!((a, b, set.len()), (0, 0, 1));
        assert_eq!(set[0].events, libc::POLLIN | libc::POLLOUT);
    }
}
