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

use crate::{chain, diag, environ, exit, sys};

/// Reserved descriptors go this high, out of the way of the fixed numbers a chain uses
/// (0, 1, 2, 6, 7) and of the low numbers its sockets and pipes get.
const RESERVED_MIN: RawFd = 10;

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
}

struct Channel {
    /// This process's end of the socketpair: next connections arrive here.
    conns: RawFd,
    /// The write end of the shared pipe: ends are reported here.
    done: RawFd,
    /// Put on fds 0 and 1 between connections.
    devnull: RawFd,
}

/// Serves `first` and then, while the connections end normally and fewer than
/// `max_use` were served, the connections the supervisor sends on `conns`. `serve`
/// handles one connection (socket, client) and returns the exit status at a normal end.
/// Never returns. Runs in the forked child; `conns` is its end of the socketpair, `done`
/// the write end of the shared pipe; every other close-on-exec descriptor inherited from
/// the supervisor (listeners, the other processes' channels) is closed here.
pub fn run(
    conns: RawFd,
    done: RawFd,
    max_use: usize,
    first: (RawFd, Peer),
    serve: impl Fn(RawFd, Peer) -> i32,
) -> ! {
    let ch = match reserve(conns, done, first.0) {
        Ok(ch) => ch,
        // Out of descriptors, say: serve this connection without reuse.
        Err(_) => std::process::exit(serve(first.0, first.1)),
    };
    let mut fresh = Fresh {
        env: environ::Fork::now(),
        fds: kept_fds(),
    };
    diag::keep_decisions();
    let pid = sys::getpid();
    let (mut fd, mut client) = first;
    let mut served = 0;
    loop {
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
        (fd, client) = next_connection(&ch, &mut fresh, pid, code);
    }
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
/// the last one (status `code`) and waits for the next; exits when there is none. Never
/// inlined: the chain runs below [`run`]'s frame, and under tcpsplice-listen what it
/// holds on the stack while a connection is idle is private memory of its process.
#[inline(never)]
fn next_connection(ch: &Channel, fresh: &mut Fresh, pid: libc::pid_t, code: i32) -> (RawFd, Peer) {
    if !restore(ch, fresh) {
        std::process::exit(code);
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

/// Moves the process's own descriptors out of the chain's way and closes what it must
/// not hold: the listeners, and the other connection processes' channels, which would
/// keep them from seeing the supervisor go. `client` is the first connection's socket.
fn reserve(conns: RawFd, done: RawFd, client: RawFd) -> std::io::Result<Channel> {
    let conns = sys::fd_move_up(conns, RESERVED_MIN)?;
    let done = sys::fd_move_up(done, RESERVED_MIN)?;
    let devnull = sys::open_devnull(true)?;
    let devnull = sys::fd_move_up(devnull, RESERVED_MIN)?;
    let keep = [conns, done, devnull];
    sys::close_cloexec_fds(&[conns, done, devnull, client]);
    chain::reserve_fds(&keep);
    Ok(Channel {
        conns,
        done,
        devnull,
    })
}

/// Puts the process back as the fork left it; false when that cannot be done and the
/// process must exit instead.
fn restore(ch: &Channel, fresh: &mut Fresh) -> bool {
    let mut keep = vec![ch.conns, ch.done, ch.devnull];
    keep.extend(fresh.fds.iter().map(|&(fd, _)| fd));
    diag::forget_syslog();
    chain::forget_private();
    sys::close_fds_from(3, &keep);
    // The client's socket leaves 0 and 1 here, so the client sees the end now.
    if sys::fd_copy(0, ch.devnull)
        .and_then(|()| sys::fd_copy(1, ch.devnull))
        .is_err()
    {
        return false;
    }
    let changed = |&(fd, id): &(RawFd, Option<(u64, u64)>)| {
        sys::fd_identity(fd).ok().map(|(_, now)| now) != id
    };
    if fresh.fds.iter().any(changed) {
        return false;
    }
    // The chain's variables were only ever in the overlay (`environ`): dropped here.
    fresh.env.restore();
    sys::unblock_all_signals();
    sys::signal_ignore(libc::SIGPIPE, true);
    sys::set_process_name(c"tcpsplice-listen");
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
