//! tcpsplice-listen's connection process when it is reused: after a connection has
//! ended normally it puts itself back as a fresh fork would be and waits for the next
//! connection from the supervisor, up to `-r` connections (postfix's `max_use`).
//!
//! Why: when PROG... is our own chain, it runs in the forked process without an exec
//! (see `chain`), and what a short connection then costs is mostly the fork, the
//! copy-on-write faults that follow it and the teardown at exit. A reused process pays
//! them once per `-r` connections.
//!
//! One connection at a time, as before: a process holds one client, and what the chain
//! left behind is undone before the next one: every descriptor the process did not have
//! at the fork is closed, fds 0 and 1 go back to /dev/null, the environment is put back
//! as it was at the fork, the signal mask is emptied, the process name and the message
//! prefix are the supervisor's again. A process ended by a signal, by a failure (any
//! `die`), by a real exec, or in which fd 2 or a descriptor inherited from the
//! supervisor's parent was closed or replaced, is not reused: it exits as before.
//!
//! The wire: the supervisor passes each accepted socket over a SOCK_SEQPACKET socketpair
//! (SCM_RIGHTS) with the client's address as text ([`Peer`]: and the address it
//! connected to, when a PROXY header named it); the process reports that it took the
//! connection, and later its end, as 8 bytes (pid, [`TOOK`] or the exit status) on a pipe
//! shared by all connection processes, where a write that small is atomic. The process waits for its next
//! connection until the supervisor closes its end of the socketpair (idle too long,
//! stopping, or gone), which it sees as end of file.

use std::net::SocketAddr;
use std::os::unix::io::RawFd;
use std::time::{Duration, Instant};

use super::pool::Pool;
use crate::{chain, diag, environ, exit, sys};

/// Reserved descriptors go this high (see `chain::RESERVED_MIN`).
pub const RESERVED_MIN: RawFd = chain::RESERVED_MIN;

/// A report on the shared pipe: (pid, status) of an ended connection, or (pid, TOOK).
pub const DONE_SIZE: usize = 8;

/// The status word of the report that a connection sent over the socketpair was taken:
/// until then the supervisor keeps its copy, to hand the connection to another process
/// should this one die first (killed while idle, say). Exit statuses are 0 to 255.
pub const TOOK: i32 = -1;

/// Encodes the report that process `pid` ended a connection with status `code`.
pub fn done_message(pid: libc::pid_t, code: i32) -> [u8; DONE_SIZE] {
    let mut m = [0u8; DONE_SIZE];
    m[..4].copy_from_slice(&pid.to_ne_bytes());
    m[4..].copy_from_slice(&code.to_ne_bytes());
    m
}

/// Decodes a report made by [`done_message`].
pub fn parse_done(m: &[u8]) -> Option<(libc::pid_t, i32)> {
    let pid = libc::pid_t::from_ne_bytes(m.get(..4)?.try_into().ok()?);
    let code = i32::from_ne_bytes(m.get(4..8)?.try_into().ok()?);
    Some((pid, code))
}

/// Who a connection is with: the client, and the address it connected to when that is
/// not the socket's own (a balancer's PROXY header named it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub client: SocketAddr,
    pub local: Option<SocketAddr>,
}

impl Peer {
    /// The text sent with the socket: `client` or `client local`.
    pub fn encode(&self) -> String {
        match self.local {
            Some(l) => format!("{} {l}", self.client),
            None => self.client.to_string(),
        }
    }

    pub fn decode(text: &str) -> Option<Peer> {
        let mut w = text.split(' ');
        let client = w.next()?.parse().ok()?;
        let local = match w.next() {
            Some(l) => Some(l.parse().ok()?),
            None => None,
        };
        w.next().is_none().then_some(Peer { client, local })
    }
}

/// The longest [`Peer::encode`]: two bracketed IPv6 addresses with ports and a space.
const PEER_TEXT_MAX: usize = 128;

/// What a fresh fork had, to put back between connections.
struct Fresh {
    env: environ::Fork,
    /// fd 2 and the descriptors passed on to PROG... from the supervisor's parent, with
    /// what they referred to.
    fds: Vec<(RawFd, Option<(u64, u64)>)>,
    /// What [`restore`] keeps open, refilled each time in the same allocation.
    keep: Vec<RawFd>,
}

impl Fresh {
    /// Has `sys` watch the kept descriptors, when all are open: whether one may have
    /// changed is then known without asking each what it is.
    fn watch(&self) {
        if self.fds.iter().all(|&(_, id)| id.is_some()) {
            let fds: Vec<RawFd> = self.fds.iter().map(|&(fd, _)| fd).collect();
            sys::watch_fds(&fds);
        }
    }

    /// Whether fd 2 and the inherited descriptors are what they were at the fork: asked
    /// of each only when one was closed or replaced since they were last found so (a
    /// relay told to write to fd 2 closes it at the end, say), or one was not open.
    fn unchanged(&self) -> bool {
        if sys::watched_untouched() {
            return true;
        }
        let changed = |&(fd, id): &(RawFd, Option<(u64, u64)>)| {
            sys::fd_identity(fd).ok().map(|(_, now)| now) != id
        };
        if self.fds.iter().any(changed) {
            return false;
        }
        self.watch();
        true
    }
}

/// What a connection process needs to accept for itself (see the module's doc).
pub struct Accepting<'a> {
    pub pool: Pool,
    /// This process's slot in `pool`.
    pub slot: usize,
    /// Its first connection (the supervisor accepted it) is booked in the slot already.
    pub first_booked: bool,
    /// The listening sockets, already out of the chain's way (the supervisor moved
    /// them to [`RESERVED_MIN`] and up before its first fork, so that no process writes
    /// a copy of the list).
    pub listeners: &'a [RawFd],
    /// Most connections at once (`-c`), for the log lines.
    pub max_conns: usize,
    /// No per-connection log lines (`-q`).
    pub quiet: bool,
    /// How long it waits for a connection before it exits.
    pub idle_max: Duration,
    /// How long it waits after accepting failed for want of descriptors or memory.
    pub pause: Duration,
    /// The listeners are systemd's, which keeps them listening (never shut here).
    pub listeners_shared: bool,
}

/// An [`Accepting`] process's wait: its channel and the listeners in one epoll set.
struct Waiting<'a> {
    how: Accepting<'a>,
    epoll: sys::Epoll,
}

struct Channel<'a> {
    /// This process's end of the socketpair: next connections arrive here (or, for a
    /// process that accepts for itself, only its end of file).
    conns: RawFd,
    /// The write end of the shared pipe: ends are reported here.
    done: RawFd,
    /// Put on fds 0 and 1 between connections.
    devnull: RawFd,
    /// Set when the process accepts for itself.
    waiting: Option<Waiting<'a>>,
}

/// Serves `first` and then, while the connections end normally and fewer than
/// `max_use` were served, the next ones: sent by the supervisor on `conns`, or, with
/// `accepting`, accepted by this process itself from the listeners while it waits.
/// `serve` handles one connection (socket, client) and returns the exit status at a
/// normal end. Never returns. Runs in the forked child; `conns` is its end of the
/// socketpair, `done` the write end of the shared pipe; every other close-on-exec
/// descriptor inherited from the supervisor (the other processes' channels, and the
/// listeners unless it accepts) is closed here.
pub fn run<'a>(
    conns: RawFd,
    done: RawFd,
    max_use: usize,
    first: (RawFd, Peer),
    accepting: Option<Accepting<'a>>,
    serve: impl Fn(RawFd, Peer) -> i32,
) -> ! {
    let pid = sys::getpid();
    let booked = accepting
        .as_ref()
        .is_none_or(|a| book_first(a, pid, first.0, first.1.client));
    let ch = match reserve(conns, done, first.0, accepting) {
        Ok(ch) => ch,
        // Out of descriptors, say: serve this connection without reuse.
        Err(_) if booked => std::process::exit(serve(first.0, first.1)),
        Err(_) => std::process::exit(exit::OK),
    };
    let mut fresh = Fresh {
        env: environ::Fork::now(),
        fds: kept_fds(),
        keep: Vec::new(),
    };
    fresh.watch();
    diag::keep_decisions();
    let (mut fd, mut client) = first;
    if let (Some(w), false) = (&ch.waiting, booked) {
        (fd, client) = accept_next(ch.conns, w, pid, None);
    }
    let mut served = 0;
    loop {
        let start = Instant::now();
        // Beside the reserved descriptors, only `fd` is close-on-exec, and serving moves
        // it to 0 and 1 before the chain goes on: no need to look for others.
        chain::nothing_to_close();
        let code = serve(fd, client);
        // The connection has ended: it no longer counts against its user's limit
        // (before the end is reported, so that the user's next connection finds it so).
        crate::auth::loginstate::end_connection();
        served += 1;
        if served >= max_use {
            std::process::exit(code);
        }
        let ended = Ended {
            code,
            client: client.client,
            secs: start.elapsed().as_secs_f64(),
        };
        (fd, client) = next_connection(&ch, &mut fresh, pid, ended);
    }
}

/// The connection a process just finished.
struct Ended {
    code: i32,
    client: SocketAddr,
    secs: f64,
}

/// fd 2 and the descriptors inherited from the supervisor's parent, with what they
/// refer to. Never inlined, like [`next_connection`].
#[inline(never)]
fn kept_fds() -> Vec<(RawFd, Option<(u64, u64)>)> {
    let identity = |fd| sys::fd_identity(fd).ok().map(|(_, id)| id);
    let mut fds = vec![(2, identity(2))];
    fds.extend(
        sys::inherited_fds(3)
            .into_iter()
            .map(|fd| (fd, identity(fd))),
    );
    fds
}

/// Between connections: puts the process back as the fork left it, reports the end of
/// the last one and waits for the next; exits when there is none. Never inlined: the
/// chain runs below [`run`]'s frame, and under tcpsplice-listen what it holds on the
/// stack while a connection is idle is private memory of its process.
#[inline(never)]
fn next_connection(
    ch: &Channel<'_>,
    fresh: &mut Fresh,
    pid: libc::pid_t,
    ended: Ended,
) -> (RawFd, Peer) {
    let code = ended.code;
    if let Some(w) = &ch.waiting {
        // Waiting already, before the client sees the end: its next connection, made
        // at once, is then left to this process, rather than the supervisor finding none
        // waiting and forking another. The count of its source drops a moment early.
        w.how.pool.set_idle(w.how.slot);
    }
    if !restore(ch, fresh) {
        if let Some(w) = &ch.waiting {
            // Serving still, for the books: the supervisor logs the end at reaping.
            w.how.pool.set_busy(w.how.slot);
        }
        std::process::exit(code);
    }
    if let Some(w) = &ch.waiting {
        return accept_next(ch.conns, w, pid, Some(ended));
    }
    // A supervisor that is gone cannot hand out more work: EPIPE ends us.
    if sys::write_all(ch.done, &done_message(pid, code)).is_err() {
        std::process::exit(code);
    }
    let mut buf = [0u8; PEER_TEXT_MAX];
    match sys::recv_fd(ch.conns, &mut buf) {
        Ok(Some((next, n))) => {
            // If the supervisor is gone, serving the client is still the best.
            let _ = sys::write_all(ch.done, &done_message(pid, TOOK));
            let addr = std::str::from_utf8(&buf[..n]).ok().and_then(Peer::decode);
            let Some(addr) = addr else {
                diag::die(
                    exit::TEMP,
                    "the supervisor sent a connection without an address",
                );
            };
            (next, addr)
        }
        Ok(None) => std::process::exit(exit::OK),
        Err(e) => diag::die_sys(exit::TEMP, "receive the next connection", &e),
    }
}

/// A process that accepts for itself, its slot booked as waiting: logs the end of the
/// last connection (if one ended), then waits on the listeners (the kernel wakes one
/// waiting process per connection) until it accepts one it may serve. Exits when the
/// supervisor closes the channel (stopping, or letting it go) or is gone, and when no
/// connection came for `idle_max`.
fn accept_next(
    conns: RawFd,
    w: &Waiting<'_>,
    pid: libc::pid_t,
    ended: Option<Ended>,
) -> (RawFd, Peer) {
    let a = &w.how;
    if let (Some(e), false) = (ended, a.quiet) {
        diag::info(&super::supervisor::end_line(
            pid,
            &e.client,
            &format!("status={}", e.code),
            e.secs,
            a.pool.busy(),
            a.max_conns,
        ));
    }
    let mut ready = [0; 4];
    loop {
        let n = match w.epoll.wait(&mut ready, Some(a.idle_max)) {
            Ok(0) => std::process::exit(exit::OK),
            Ok(n) => n,
            Err(e) => diag::die_sys(exit::TEMP, "wait for the next connection", &e),
        };
        // With many listeners ready the channel may not be among the events returned.
        if ready[..n].contains(&conns) || (n == ready.len() && channel_closed(conns)) {
            let mut b = [0u8; 1];
            match sys::recv(conns, &mut b, libc::MSG_DONTWAIT) {
                // Let go (idle, or short of descriptors): the others go on accepting.
                Ok(1) => std::process::exit(exit::OK),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                // The end without a word: the supervisor stops, or is gone.
                _ => leave(a),
            }
        }
        for &l in &ready[..n] {
            if let Some(next) = accept_from(l, a, pid) {
                return next;
            }
        }
    }
}

/// Whether the channel `conns` has reached its end (or has anything to read: the
/// supervisor sends nothing to a process that accepts for itself).
fn channel_closed(conns: RawFd) -> bool {
    let mut p = [libc::pollfd {
        fd: conns,
        events: libc::POLLIN,
        revents: 0,
    }];
    sys::poll(&mut p, Some(Duration::ZERO)).is_ok_and(|n| n > 0)
}

/// The channel has closed without a word: the supervisor stops (and has shut the
/// listeners it bound already), or is gone (killed), and then nobody would accept from
/// them any more while they stay open in the processes still serving. They are shut
/// here either way, so that clients are refused, as they were when the supervisor alone
/// held them. systemd's are left listening for the next start. (The parent's pid would
/// not tell: a dying supervisor's descriptors close before its children are given to
/// another parent.)
fn leave(a: &Accepting<'_>) -> ! {
    if !a.listeners_shared {
        for &l in a.listeners {
            let _ = sys::shutdown(l, libc::SHUT_RD);
        }
    }
    std::process::exit(exit::OK)
}

/// Accepts a connection from listener `l` and books it, or returns None (none was
/// there, it failed on its own, or its source is at `-C`).
fn accept_from(l: RawFd, a: &Accepting<'_>, pid: libc::pid_t) -> Option<(RawFd, Peer)> {
    let (fd, peer) = match sys::accept_cloexec(l) {
        Ok((fd, Some(peer))) => (fd, peer),
        Ok((fd, None)) => {
            sys::close(fd);
            return None;
        }
        // Another process was quicker, or the connection is already gone.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => return None,
        Err(e) if super::sockets::connection_gone(&e) => return None,
        Err(e) => match e.raw_os_error() {
            // Shut by a stopping supervisor: nothing more to accept here.
            Some(libc::EINVAL | libc::EBADF | libc::ENOTSOCK) => leave(a),
            // Short of descriptors or memory, or anything else: waiting a while, still
            // booked as waiting (the supervisor would meet the same shortage), rather
            // than spinning or leaving the pool to drain.
            _ => {
                std::thread::sleep(a.pause);
                return None;
            }
        },
    };
    let client = super::supervisor::canonical_addr(peer);
    book(a, pid, fd, client).then_some((
        fd,
        Peer {
            client,
            local: None,
        },
    ))
}

/// The first connection, which the supervisor accepted: booked by it already (and only
/// logged here, by the process that serves it, so that its line comes before its
/// end), or booked here as [`book`] does when the supervisor could not take the lock.
pub fn book_first(a: &Accepting<'_>, pid: libc::pid_t, fd: RawFd, client: SocketAddr) -> bool {
    if !a.first_booked {
        return book(a, pid, fd, client);
    }
    log_accept(a, pid, &client);
    true
}

/// Books the connection on `fd` from `client` in this process's slot and logs it; or,
/// when its source is at `-C`, closes it, logs that, and returns false.
fn book(a: &Accepting<'_>, pid: libc::pid_t, fd: RawFd, client: SocketAddr) -> bool {
    if let Err(refused) = a.pool.admit(a.slot, client) {
        // Busy is the supervisor's only: this process waits for the lock.
        let held = match refused {
            super::pool::Refused::Full(held) => held,
            super::pool::Refused::Busy => 0,
        };
        sys::close(fd);
        if !a.quiet {
            diag::info(&super::supervisor::reject_line(
                &client,
                None,
                held,
                a.pool.max_per_ip().unwrap_or(0),
            ));
        }
        return false;
    }
    a.pool.took();
    log_accept(a, pid, &client);
    true
}

fn log_accept(a: &Accepting<'_>, pid: libc::pid_t, client: &SocketAddr) {
    if !a.quiet {
        diag::info(&super::supervisor::accept_line(
            pid,
            client,
            None,
            a.pool.busy(),
            a.max_conns,
        ));
    }
}

/// Moves the process's own descriptors out of the chain's way and closes what it must
/// not hold: the other connection processes' channels, which would keep them from
/// seeing the supervisor go, and the listeners unless it accepts for itself. `client` is
/// the first connection's socket.
fn reserve<'a>(
    conns: RawFd,
    done: RawFd,
    client: RawFd,
    accepting: Option<Accepting<'a>>,
) -> std::io::Result<Channel<'a>> {
    let conns = sys::fd_move_up(conns, RESERVED_MIN)?;
    let done = sys::fd_move_up(done, RESERVED_MIN)?;
    let devnull = sys::open_devnull(true)?;
    let devnull = sys::fd_move_up(devnull, RESERVED_MIN)?;
    let mut keep = vec![conns, done, devnull];
    let waiting = match accepting {
        Some(how) => {
            keep.push(how.pool.wake_fd());
            let epoll = sys::Epoll::new(RESERVED_MIN)?;
            epoll.add(conns, false)?;
            for &l in how.listeners {
                epoll.add(l, true)?;
            }
            keep.push(epoll.fd());
            keep.extend(how.listeners);
            Some(Waiting { how, epoll })
        }
        None => None,
    };
    let mut closing = keep.clone();
    closing.push(client);
    sys::close_cloexec_fds(&closing);
    chain::reserve_fds(&keep);
    Ok(Channel {
        conns,
        done,
        devnull,
        waiting,
    })
}

/// Puts the process back as the fork left it; false when that cannot be done and the
/// process must exit instead.
fn restore(ch: &Channel<'_>, fresh: &mut Fresh) -> bool {
    // The channel's descriptors (`reserve` reserved them all), what a program of the
    // chain reserved to keep for the next connection, and the inherited ones.
    let keep = &mut fresh.keep;
    keep.clear();
    chain::with_reserved(|r| keep.extend_from_slice(r));
    keep.extend(fresh.fds.iter().map(|&(fd, _)| fd));
    diag::forget_syslog();
    chain::forget_private();
    sys::close_fds_from(3, keep);
    // The client's socket leaves 0 and 1 here, so the client sees the end now.
    if sys::fd_copy(0, ch.devnull)
        .and_then(|()| sys::fd_copy(1, ch.devnull))
        .is_err()
    {
        return false;
    }
    if !fresh.unchanged() {
        return false;
    }
    // The chain's variables were only ever in the overlay (`environ`): dropped here.
    fresh.env.restore();
    sys::unblock_all_signals();
    sys::signal_ignore(libc::SIGPIPE, true);
    sys::set_process_name("tcpsplice-listen");
    diag::init("tcpsplice-listen");
    chain::allow_in_process(true);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_round_trip() {
        let c: SocketAddr = "[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
            .parse()
            .unwrap();
        for p in [
            Peer {
                client: c,
                local: None,
            },
            Peer {
                client: "192.0.2.1:5".parse().unwrap(),
                local: Some(c),
            },
            Peer {
                client: c,
                local: Some(c),
            },
        ] {
            assert!(p.encode().len() <= PEER_TEXT_MAX);
            assert_eq!(Peer::decode(&p.encode()), Some(p));
        }
        assert_eq!(Peer::decode("1.2.3.4:5 x"), None);
        assert_eq!(Peer::decode("1.2.3.4:5 1.2.3.4:5 1.2.3.4:5"), None);
    }

    #[test]
    fn done_messages_round_trip() {
        assert_eq!(parse_done(&done_message(4242, 1)), Some((4242, 1)));
        assert_eq!(parse_done(&done_message(-1, -7)), Some((-1, -7)));
        assert_eq!(parse_done(&[0u8; 5]), None);
    }
}
