//! The supervisor of tcpsplice-listen: accepts connections and starts `PROG...` once per
//! connection with the client socket on fds 0 and 1 and the UCSPI variables set.
//!
//! One single-threaded poll loop watches a signalfd (SIGCHLD, SIGTERM, SIGINT, SIGHUP)
//! and the listening sockets. Limits are kept by not polling the listeners: at the
//! global limit new clients wait in the kernel's backlog instead of being accepted and
//! dropped. Between accept and exec the parent only forks and closes; the child does
//! the rest (descriptors, environment, signal mask) and execs.
//!
//! When PROG... continues in the forked process (our own chain, see `chain`), that
//! process is reused for up to `-r` connections, one after another (see `worker`): the
//! supervisor hands an accepted socket to an idle one if it has one, and forks only
//! when it has none. Limits count connections, not processes.
//!
//! Behind a load balancer (`-P`), a connection from a balancer starts with a PROXY
//! header, which the supervisor takes off the socket itself before any process gets
//! the connection: the per-source limit, the log lines and the UCSPI variables then
//! see the client it names. The supervisor never waits for it: the header is taken
//! with non-blocking reads as its bytes come (`proxy::header::Reader`), each such
//! connection polled beside the listeners until its header is whole or its deadline
//! (`-t`) has passed, holding one of the `-c` slots meanwhile. A balancer sends it at
//! once, so a connection almost always goes on right after its accept.

use std::collections::hash_map::RandomState;
use std::ffi::OsString;
use std::io;
use std::mem::ManuallyDrop;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::io::RawFd;
use std::time::{Duration, Instant};

use super::pool::{Pool, Refused};
use super::sockets;
use super::worker::{self, Peer};
use crate::proxy::header::{self, Header, Step};
use crate::rules::Rule;
use crate::sys::NotForked;
use crate::{chain, conninfo, diag, environ, exit, sys};

/// How long accepting pauses after the process or system ran out of descriptors or
/// memory, or could not fork: long enough not to spin, short enough to catch up.
const PAUSE: Duration = Duration::from_millis(100);

/// The longest a poll waits: a safety net for reaping, not a deadline.
const TICK: Duration = Duration::from_secs(1);

/// How long a connection process may wait for its next connection before it is let go:
/// a burst leaves no crowd of idle processes behind for long.
const IDLE_MAX: Duration = Duration::from_secs(10);

/// Most connections accepted from one listener per wakeup, so signals and the other
/// listeners get their turn under a flood.
const BATCH: usize = 32;

/// Variables that describe one connection. Inherited by the supervisor from wherever it
/// was started, they would describe no connection of ours, so they are removed.
const STALE_VARS: [&str; 8] = [
    "TCPSPLICE_CLIENT",
    "TCPSPLICE_LOGIN",
    "TCPSPLICE_TARGET",
    "TCPSPLICE_USER",
    "TCPSPLICE_REPLY",
    "TCPREMOTEHOST",
    "TCPREMOTEINFO",
    "TCPLOCALHOST",
];

/// What the supervisor is told to do.
#[derive(Clone, Debug)]
pub struct Config {
    /// Most connections served at once (`-c`).
    pub max_conns: usize,
    /// Most connections served at once per client IP address (`-C`), if limited.
    pub max_per_ip: Option<usize>,
    /// Set TCP_NODELAY on every connection (`-D`).
    pub nodelay: bool,
    /// No per-connection log lines (`-q`).
    pub quiet: bool,
    /// Most connections one process serves one after another (`-r`), when PROG... runs
    /// in it without an exec; 1 forks a process for every connection.
    pub max_use: usize,
    /// The program to run per connection and its arguments.
    pub prog: Vec<OsString>,
    /// Connections come through load balancers that send a PROXY header (`-P`).
    pub proxy: Option<ProxyIn>,
    /// The listeners are systemd's (`- -`), which keeps them open across our restarts.
    pub listeners_shared: bool,
}

/// PROXY protocol in (`-P`, `-t`).
#[derive(Clone, Debug)]
pub struct ProxyIn {
    /// The balancers: only their connections are served, and each must start with a
    /// valid header.
    pub from: Vec<Rule>,
    /// How long a header may take to come whole.
    pub timeout: Duration,
}

struct Conn {
    client: SocketAddr,
    /// The address the client connected to, when a PROXY header named it.
    local: Option<SocketAddr>,
    /// The balancer it came through.
    via: Option<SocketAddr>,
    ip: IpAddr,
    start: Instant,
}

/// A connection from a balancer whose PROXY header has not all come yet.
struct Awaiting {
    fd: RawFd,
    balancer: SocketAddr,
    reader: header::Reader,
    deadline: Instant,
}

/// A connection process.
struct Child {
    /// The connection it serves; None while it waits for the next one.
    conn: Option<Conn>,
    /// Our end of its socketpair while it may be given connections (reuse only).
    chan: Option<RawFd>,
    /// Our copy of the socket handed to it over the socketpair, kept until it says it
    /// took it: if it dies first, the connection goes to another process.
    pending: Option<RawFd>,
    /// When it last finished a connection.
    idle_since: Instant,
    /// Its slot in the shared books, when it accepts for itself.
    slot: Option<usize>,
}

/// Most connections at once the supervisor's books are sized for from the start (beyond,
/// they grow as needed).
const BOOKS_SIZED_FOR: usize = 4096;

/// The shared pipe on which reused connection processes report ended connections.
struct Done {
    read: RawFd,
    write: RawFd,
}

/// The supervisor's books of its connection processes, in memory they do not get
/// (`sys::NotForked`): it writes them after each fork. Never touched in a child, not
/// even dropped: a panic that unwinds there (debug builds) must not unmap what the
/// child may have mapped at those addresses since, hence `ManuallyDrop` (the
/// supervisor's `serve` never returns, so they are never dropped by it either).
type Books<K, V> = ManuallyDrop<hashbrown::HashMap<K, V, RandomState, NotForked>>;
type BookList<T> = ManuallyDrop<allocator_api2::vec::Vec<T, NotForked>>;

struct Supervisor<'a> {
    cfg: &'a Config,
    listeners: Vec<RawFd>,
    signals: sys::SignalFd,
    children: Books<libc::pid_t, Child>,
    /// Connections being served (children with a connection).
    busy: usize,
    /// Children waiting for a connection, the longest waiting first.
    idle: BookList<libc::pid_t>,
    /// Set when connection processes are reused.
    done: Option<Done>,
    /// Connections per client address, kept for -C only.
    per_ip: Books<IpAddr, usize>,
    /// Connections waiting for their PROXY header, each holding a `-c` slot.
    awaiting: Vec<Awaiting>,
    /// Accepting is paused until then (out of fds, memory or processes).
    paused_until: Option<Instant>,
    /// A shortage was already reported and has not ended yet: warn once per episode.
    shortage_warned: bool,
    stopping: bool,
    /// Set when reused connection processes accept for themselves (see `worker`).
    pool: Option<Pool>,
    /// When to look next for connections left in the backlog (see
    /// `accept_left_behind`), and whether a listener was readable at the last look.
    next_backlog_look: Instant,
    backlog_seen: bool,
    /// The local address of every connection, when it is known ahead ([`fixed_local`]).
    fixed_local: Option<SocketAddr>,
}

/// The local address every connection on `listeners` has: that of the one listener we
/// bound ourselves to a specific address and port. None when it is per connection: a
/// wildcard address, several listeners, systemd's sockets (which may be transparent
/// ones, whose connections have the address the client asked for).
fn fixed_local(listeners: &[RawFd], cfg: &Config) -> Option<SocketAddr> {
    let [fd] = listeners else {
        return None;
    };
    if cfg.listeners_shared {
        return None;
    }
    sys::local_addr(*fd)
        .ok()
        .flatten()
        .filter(|a| !a.ip().is_unspecified() && a.port() != 0)
}

/// Seconds since `start_ms` (`shm::monotonic_ms`).
fn shm_secs_since(start_ms: u64) -> f64 {
    crate::shm::monotonic_ms().saturating_sub(start_ms) as f64 / 1000.0
}

/// Makes sure fds 0, 1 and 2 are open, on /dev/null if need be: otherwise a listening
/// socket could land on one of them and be clobbered by a child's dup2.
pub fn ensure_std_fds() {
    for fd in 0..3 {
        if !sys::fd_is_open(fd) {
            // The lowest free descriptor, which is `fd` since the ones below are open.
            let _ = sys::open_devnull(false);
        }
    }
}

/// Removes the variables that would mislead the programs run per connection.
pub fn clean_environment() {
    for v in STALE_VARS {
        environ::remove_var(v);
    }
    sockets::unset_activation_env();
    // Once, here: the connection processes then fork from a real environment, and an
    // overlay without changes is what each connection starts from.
    environ::make_real();
}

/// An IPv4 client reached through an IPv6 socket (`::ffff:a.b.c.d`) is counted, logged
/// and exported as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// [`canonical`] for a whole socket address.
pub fn canonical_addr(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical(a.ip()), a.port())
}

fn show(addr: &SocketAddr) -> String {
    conninfo::join_host_port(&conninfo::ip_text(addr.ip()), &addr.port().to_string())
}

fn via_text(via: Option<&SocketAddr>) -> String {
    via.map(|v| format!(" via={}", show(v))).unwrap_or_default()
}

/// The log line of an accepted connection; `count` includes it. The same from the
/// supervisor and from a process that accepted for itself.
pub fn accept_line(
    pid: libc::pid_t,
    client: &SocketAddr,
    via: Option<&SocketAddr>,
    count: usize,
    max: usize,
) -> String {
    format!(
        "accept pid={pid} client={}{} count={count}/{max}",
        show(client),
        via_text(via)
    )
}

/// The log line of an ended connection; `count` no longer includes it.
pub fn end_line(
    pid: libc::pid_t,
    client: &SocketAddr,
    how: &str,
    secs: f64,
    count: usize,
    max: usize,
) -> String {
    format!(
        "end pid={pid} client={} {how} secs={secs:.3} count={count}/{max}",
        show(client)
    )
}

/// The log line of a connection refused at `-C`.
pub fn reject_line(
    client: &SocketAddr,
    via: Option<&SocketAddr>,
    held: usize,
    max: usize,
) -> String {
    format!(
        "reject client={}{} per-source limit {held}/{max}",
        show(client),
        via_text(via)
    )
}

/// Whether connection processes can be reused: PROG... must continue in the forked
/// process and be able to come back to it, as our own forwarding chain does.
fn reusable(cfg: &Config) -> bool {
    cfg.max_use > 1
        && cfg
            .prog
            .first()
            .is_some_and(|p| chain::continues_as(p).is_some())
}

fn done_pipe() -> io::Result<Done> {
    let (read, write) = sys::pipe_cloexec()?;
    // Only our end is non-blocking: a child reporting to a full pipe waits its turn.
    sys::set_nonblocking(read, true)?;
    Ok(Done { read, write })
}

/// Serves connections on `listeners` until stopped by signals; exits the process.
/// `ready` runs once everything is set up, just before the first poll, with the number
/// of connections a process serves (1 when processes are not reused): whoever waits for
/// the port it prints may then count on a complete supervisor.
pub fn serve(listeners: Vec<RawFd>, cfg: &Config, ready: impl FnOnce(usize)) -> ! {
    // A client that vanishes must not kill the supervisor; children get SIGPIPE back
    // (chain::exec restores it).
    sys::signal_ignore(libc::SIGPIPE, true);
    // Inherited as ignored, SIGCHLD would have the kernel reap our children by itself:
    // waitpid would never name one, no connection would ever end for the limits, and
    // a stop would wait for ever. The programs run per connection inherit the default.
    sys::signal_ignore(libc::SIGCHLD, false);
    let signals =
        match sys::SignalFd::new(&[libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP]) {
            Ok(s) => s,
            Err(e) => diag::die_sys(exit::TEMP, "create a signalfd", &e),
        };
    let done = if reusable(cfg) {
        match done_pipe() {
            Ok(d) => Some(d),
            Err(e) => diag::die_sys(exit::TEMP, "create a pipe", &e),
        }
    } else {
        None
    };
    let max_use = if done.is_some() { cfg.max_use } else { 1 };
    // Behind balancers the supervisor reads each PROXY header before any process gets
    // the connection: there, processes keep being handed their connections.
    let mut listeners = listeners;
    let pool = if done.is_some() && cfg.proxy.is_none() {
        // The listeners go where the connection processes that accept from them keep
        // them, once here: no process then writes a list of its own.
        let moved = listeners
            .iter_mut()
            .try_for_each(|fd| sys::fd_move_up(*fd, worker::RESERVED_MIN).map(|to| *fd = to));
        match moved.and_then(|()| Pool::new(cfg.max_conns, cfg.max_per_ip)) {
            Ok(p) => Some(p),
            Err(e) => {
                diag::warn(&format!(
                    "unable to set up the shared books of the connection processes (a shared \
                     mapping, an eventfd, the listeners' descriptors): {}: handing each \
                     connection over instead",
                    sys::strerror(&e)
                ));
                None
            }
        }
    } else {
        None
    };
    let fixed_local = fixed_local(&listeners, cfg);
    // The books are sized for the connections allowed at once, now, so that serving
    // does not stop to grow them. They are not in the children's memory (`Books`): on
    // the heap, a table grown while serving left its old one free in the middle of it,
    // which the processes forked next allocated from and so copied, and each insert
    // wrote a page whose old copy stayed with the process forked just before.
    let expected = cfg.max_conns.min(BOOKS_SIZED_FOR);
    let mut sup = Supervisor {
        cfg,
        listeners,
        signals,
        children: ManuallyDrop::new(hashbrown::HashMap::with_capacity_and_hasher_in(
            expected,
            RandomState::new(),
            NotForked,
        )),
        busy: 0,
        idle: ManuallyDrop::new(allocator_api2::vec::Vec::with_capacity_in(
            expected, NotForked,
        )),
        done,
        per_ip: ManuallyDrop::new(hashbrown::HashMap::with_capacity_and_hasher_in(
            if cfg.max_per_ip.is_some() {
                expected
            } else {
                0
            },
            RandomState::new(),
            NotForked,
        )),
        awaiting: if cfg.proxy.is_some() {
            Vec::with_capacity(expected)
        } else {
            Vec::new()
        },
        paused_until: None,
        shortage_warned: false,
        stopping: false,
        pool,
        next_backlog_look: Instant::now() + TICK,
        backlog_seen: false,
        fixed_local,
    };
    // Each connection process that lasts gives back the stack its set-up wrote and its
    // heap's free pages; where the stack's and the heap's mappings start is learnt here
    // once, for all of them. Before saying ready: it opens a file, and a descriptor that
    // comes and goes after would show.
    sys::learn_stack_mapping();
    sys::learn_heap_mapping();
    ready(max_use);
    // The environment they fork with is read from here, not copied by each of them.
    environ::remember_for_forks();
    // Last, after start-up's allocations: the free chunks it left are held, and
    // connection processes allocate past them.
    sys::hold_heap_holes();
    sup.run()
}

impl Conn {
    fn peer(&self) -> Peer {
        Peer {
            client: self.client,
            local: self.local,
        }
    }
}

/// The descriptors of one poll, in an array in [`Supervisor::run`]'s frame while they
/// fit (the signalfd, the pipe, the listeners and a few connections awaiting a PROXY
/// header), in a Vec beyond. Why: poll writes every entry back, after each fork; a heap
/// page so written is a private page of the connection process forked just before
/// (its copy from the fork), where the stack page of the loop is written anyway.
struct PollSet {
    fixed: [libc::pollfd; POLL_FIXED],
    len: usize,
    more: Vec<libc::pollfd>,
}

/// Entries of [`PollSet`] on the stack: 128 bytes.
const POLL_FIXED: usize = 16;

impl PollSet {
    fn new() -> PollSet {
        let none = libc::pollfd {
            fd: -1,
            events: 0,
            revents: 0,
        };
        PollSet {
            fixed: [none; POLL_FIXED],
            len: 0,
            more: Vec::new(),
        }
    }

    fn clear(&mut self) {
        self.len = 0;
        self.more.clear();
    }

    fn push(&mut self, p: libc::pollfd) {
        if self.more.is_empty() && self.len < POLL_FIXED {
            self.fixed[self.len] = p;
            self.len += 1;
            return;
        }
        if self.more.is_empty() {
            self.more.extend_from_slice(&self.fixed[..self.len]);
        }
        self.more.push(p);
    }

    fn extend(&mut self, ps: impl Iterator<Item = libc::pollfd>) {
        ps.for_each(|p| self.push(p));
    }

    fn as_mut(&mut self) -> &mut [libc::pollfd] {
        if self.more.is_empty() {
            &mut self.fixed[..self.len]
        } else {
            &mut self.more
        }
    }
}

impl std::ops::Deref for PollSet {
    type Target = [libc::pollfd];

    fn deref(&self) -> &[libc::pollfd] {
        if self.more.is_empty() {
            &self.fixed[..self.len]
        } else {
            &self.more
        }
    }
}

impl Supervisor<'_> {
    fn run(&mut self) -> ! {
        let mut pfds = PollSet::new();
        loop {
            if self.stopping && self.children.is_empty() {
                if !self.cfg.quiet {
                    diag::info("stopped: all connections ended");
                }
                std::process::exit(exit::OK);
            }
            let now = Instant::now();
            if self.paused_until.is_some_and(|t| now >= t) {
                self.paused_until = None;
            }
            // Processes that wait for a connection accept it themselves: the supervisor
            // accepts (and forks) only when none waits.
            let accepting = !self.stopping
                && self.paused_until.is_none()
                && self.has_room()
                && !self.pool.as_ref().is_some_and(Pool::any_idle);
            pfds.clear();
            pfds.push(libc::pollfd {
                fd: self.signals.fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            // Polled always, with a placeholder (-1, ignored by poll) when unused, so
            // the listeners start at index 2.
            let reports = match &self.pool {
                Some(p) => p.wake_fd(),
                None => self.done.as_ref().map_or(-1, |d| d.read),
            };
            pfds.push(libc::pollfd {
                fd: reports,
                events: libc::POLLIN,
                revents: 0,
            });
            if accepting {
                pfds.extend(self.listeners.iter().map(|&fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                }));
            }
            let first_awaiting = pfds.len();
            pfds.extend(self.awaiting.iter().map(|a| libc::pollfd {
                fd: a.fd,
                events: libc::POLLIN,
                revents: 0,
            }));
            let mut timeout = match self.paused_until {
                Some(t) if !self.stopping => t.saturating_duration_since(now).min(TICK),
                _ => TICK,
            };
            if let Some(t) = self.awaiting.iter().map(|a| a.deadline).min() {
                timeout = timeout.min(t.saturating_duration_since(now));
            }
            let ready = match sys::poll(pfds.as_mut(), Some(timeout)) {
                Ok(n) => n,
                Err(e) => diag::die_sys(exit::TEMP, "poll", &e),
            };
            // Noted now: handling a signal may close them (a stop).
            let headers: Vec<RawFd> = pfds[first_awaiting..]
                .iter()
                .filter(|p| p.revents != 0)
                .map(|p| p.fd)
                .collect();
            let signalled = pfds[0].revents != 0;
            if signalled {
                self.take_signals();
            }
            // Before reaping: a child reports an end before it can exit.
            if pfds[1].revents != 0 {
                match &self.pool {
                    Some(p) => p.take_wake(),
                    None => self.take_done(),
                }
            }
            // Reaped when the signalfd says a child changed (SIGCHLD is blocked, so it
            // waits there and is never lost), and at every quiet tick besides: not at
            // every wakeup, as a waitpid walks the list of all children.
            if signalled || ready == 0 {
                self.reap();
            }
            self.let_go_idle(Instant::now());
            self.take_headers(&headers, Instant::now());
            // A process that began to wait meanwhile takes the connection itself.
            let accepting = accepting && !self.pool.as_ref().is_some_and(Pool::any_idle);
            if accepting && !self.stopping {
                for p in &pfds[2..first_awaiting] {
                    if p.revents != 0 {
                        self.accept_from(p.fd);
                    }
                }
            } else if !accepting && Instant::now() >= self.next_backlog_look {
                self.next_backlog_look = Instant::now() + TICK;
                self.accept_left_behind();
            }
        }
    }

    /// Once a second, with processes that accept for themselves and one waiting: a
    /// connection that woke one of them just as it died, was stopped or left wakes no
    /// other, and would wait in the backlog for the next connection. A listener found
    /// readable at two looks in a row has such a connection (a waiting process takes
    /// one within microseconds): taken here.
    fn accept_left_behind(&mut self) {
        if self.pool.is_none() || self.stopping || self.paused_until.is_some() || !self.has_room() {
            self.backlog_seen = false;
            return;
        }
        let mut readable = Vec::new();
        for &lfd in &self.listeners {
            let mut p = [libc::pollfd {
                fd: lfd,
                events: libc::POLLIN,
                revents: 0,
            }];
            if sys::poll(&mut p, Some(Duration::ZERO)).is_ok_and(|n| n > 0) {
                readable.push(lfd);
            }
        }
        let seen_before = std::mem::replace(&mut self.backlog_seen, !readable.is_empty());
        if seen_before {
            for lfd in readable {
                self.accept_from(lfd);
            }
        }
    }

    /// Connections being served.
    fn busy_now(&self) -> usize {
        self.pool.as_ref().map_or(self.busy, Pool::busy)
    }

    fn take_signals(&mut self) {
        while let Some(sig) = self.signals.take() {
            match sig {
                libc::SIGTERM | libc::SIGINT if !self.stopping => self.stop(),
                libc::SIGTERM | libc::SIGINT => self.terminate(),
                // SIGCHLD: reaped by the caller. SIGHUP: nothing to reload.
                _ => {}
            }
        }
    }

    /// First SIGTERM/SIGINT: refuse new connections (closing the listeners resets the
    /// clients waiting in the backlog) and let the running ones finish.
    fn stop(&mut self) {
        self.stopping = true;
        for fd in self.listeners.drain(..) {
            // Processes that accept for themselves hold the listeners too: shut, the
            // socket stops listening for all of them, and its backlog is reset. Not
            // systemd's, which it keeps listening for our next start.
            if self.pool.is_some() && !self.cfg.listeners_shared {
                let _ = sys::shutdown(fd, libc::SHUT_RD);
            }
            sys::close(fd);
        }
        // Not started yet: refused like those of the backlog.
        for a in self.awaiting.drain(..) {
            sys::close(a.fd);
        }
        for pid in std::mem::replace(&mut *self.idle, allocator_api2::vec::Vec::new_in(NotForked)) {
            self.let_go(pid);
        }
        // Those that accept for themselves see their channel close and leave, now or
        // at the end of the connection they serve.
        if self.pool.is_some() {
            let pids: Vec<libc::pid_t> = self.children.keys().copied().collect();
            for pid in pids {
                self.let_go(pid);
            }
        }
        if !self.cfg.quiet {
            diag::info(&format!(
                "stopping: no longer accepting, waiting for {} connections",
                self.busy_now()
            ));
        }
    }

    /// Second SIGTERM/SIGINT: pass SIGTERM on to every connection and leave.
    fn terminate(&mut self) -> ! {
        for &pid in self.children.keys() {
            // SIGCONT too, as s6 does: a stopped program would not act on SIGTERM.
            // The pid is a child not yet reaped, so it cannot have been reused.
            sys::kill(pid, nix::sys::signal::SIGTERM);
            sys::kill(pid, nix::sys::signal::SIGCONT);
        }
        if !self.cfg.quiet {
            diag::info(&format!(
                "terminating: sent SIGTERM to {} connections",
                self.busy_now()
            ));
        }
        std::process::exit(exit::OK)
    }

    fn reap(&mut self) {
        loop {
            // None: children still running, none left, or EINTR, all fine to leave to
            // the next wakeup.
            let Some((pid, end)) = sys::reap_child() else {
                return;
            };
            // What it wrote before it exited is in the pipe by now: read it first, so
            // that a connection it took is not taken for one it never took, nor one it
            // ended booked by how it died, nor its report left for a later pid.
            self.take_done();
            // A process that died serving a connection never said it ended: what it
            // counted against its user's limit is given back here.
            crate::auth::loginstate::release_pid(pid);
            let Some(child) = self.children.remove(&pid) else {
                continue;
            };
            if let Some(chan) = child.chan {
                sys::close(chan);
                self.idle.retain(|&p| p != pid);
            }
            let how = match end {
                sys::ChildEnd::Exited(code) => format!("status={code}"),
                sys::ChildEnd::Signaled(sig) => format!("signal={sig}"),
            };
            if let Some(i) = child.slot {
                self.release_slot(pid, i, &how);
                continue;
            }
            let Some(conn) = child.conn else {
                continue;
            };
            if let Some(fd) = child.pending {
                diag::warn(&format!(
                    "connection process pid={pid} ended ({how}) before it took client={}; \
                     handing the connection on",
                    show(&conn.client)
                ));
                if let Some(next) = self.dispatch(fd, conn.peer()) {
                    self.log_accept(next, &conn);
                    if let Some(c) = self.children.get_mut(&next) {
                        c.conn = Some(conn);
                    }
                    continue;
                }
            }
            self.ended(pid, conn, &how);
        }
    }

    /// Gives back slot `i` of process `pid`, which has ended (`how`), and logs the end of
    /// the connection it was serving, if any: those it finished, it logged itself.
    fn release_slot(&mut self, pid: libc::pid_t, i: usize, how: &str) {
        let Some(pool) = self.pool.clone() else {
            return;
        };
        let booked = pool.release(i);
        if let (Some(b), false) = (booked, self.cfg.quiet) {
            let secs = shm_secs_since(b.start_ms);
            diag::info(&end_line(
                pid,
                &b.client,
                how,
                secs,
                pool.busy(),
                self.cfg.max_conns,
            ));
        }
    }

    /// Books the end of the connection `pid` served, and logs it.
    fn ended(&mut self, pid: libc::pid_t, conn: Conn, how: &str) {
        self.busy -= 1;
        if let Some(n) = self.per_ip.get_mut(&conn.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&conn.ip);
            }
        }
        if !self.cfg.quiet {
            diag::info(&end_line(
                pid,
                &conn.client,
                how,
                conn.start.elapsed().as_secs_f64(),
                self.busy,
                self.cfg.max_conns,
            ));
        }
    }

    /// Reads the ends reported by reused children; each becomes idle.
    fn take_done(&mut self) {
        // Processes that accept for themselves report nothing here (the pool's slots
        // say it): no read at every reaping.
        if self.pool.is_some() {
            return;
        }
        let Some(fd) = self.done.as_ref().map(|d| d.read) else {
            return;
        };
        let mut buf = [0u8; 64 * worker::DONE_SIZE];
        loop {
            // Every report is one atomic write of DONE_SIZE bytes, so a read returns
            // whole reports.
            let n = match sys::read(fd, &mut buf) {
                Ok(n) if n > 0 => n,
                _ => return,
            };
            // A pipe read takes all there is up to the buffer's size: less means the
            // pipe was empty then, and asking again would only meet EAGAIN.
            let drained = n < buf.len();
            let now = Instant::now();
            for m in buf[..n].chunks_exact(worker::DONE_SIZE) {
                let Some((pid, code)) = worker::parse_done(m) else {
                    continue;
                };
                let Some(child) = self.children.get_mut(&pid) else {
                    continue;
                };
                if let Some(fd) = child.pending.take() {
                    sys::close(fd);
                }
                if code == worker::TOOK {
                    continue;
                }
                let Some(conn) = child.conn.take() else {
                    continue;
                };
                self.ended(pid, conn, &format!("status={code}"));
                if self.stopping {
                    self.let_go(pid);
                } else if let Some(c) = self.children.get_mut(&pid) {
                    c.idle_since = now;
                    self.idle.push(pid);
                }
            }
            if drained {
                return;
            }
        }
    }

    /// Closes our end of the socketpair of child `pid`, which then exits (it sees end of
    /// file) unless it is serving a connection: then it exits after it.
    fn let_go(&mut self, pid: libc::pid_t) {
        if let Some(chan) = self.children.get_mut(&pid).and_then(|c| c.chan.take()) {
            // A process that accepts for itself is told it is let go, so that it leaves
            // the listeners to the others; an end without a word means we stop or died.
            if self.pool.is_some() && !self.stopping {
                let _ = sys::send(chan, b"L", libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
            }
            sys::close(chan);
        }
    }

    /// Lets go of the processes that wait for a connection in the pool.
    fn let_go_waiting(&mut self) {
        let Some(pool) = self.pool.clone() else {
            return;
        };
        let waiting: Vec<libc::pid_t> = self
            .children
            .iter()
            .filter(|(_, c)| c.slot.is_some_and(|i| pool.is_idle(i)))
            .map(|(&pid, _)| pid)
            .collect();
        for pid in waiting {
            self.let_go(pid);
        }
    }

    /// Lets go of the children idle for longer than IDLE_MAX.
    fn let_go_idle(&mut self, now: Instant) {
        while let Some(&pid) = self.idle.first() {
            let since = self.children.get(&pid).map(|c| c.idle_since);
            if since.is_some_and(|t| now.duration_since(t) < IDLE_MAX) {
                return;
            }
            self.idle.remove(0);
            self.let_go(pid);
        }
    }

    /// Gives the connection to the child that finished last, if any is idle; returns it.
    fn hand_to_idle(&mut self, fd: RawFd, peer: &Peer) -> Option<libc::pid_t> {
        // Nothing allocated when none is idle: see `start` on the supervisor's writes.
        if self.idle.is_empty() {
            return None;
        }
        let text = peer.encode();
        while let Some(pid) = self.idle.pop() {
            let Some(chan) = self.children.get(&pid).and_then(|c| c.chan) else {
                continue;
            };
            match sys::send_fd(chan, fd, text.as_bytes()) {
                Ok(()) => return Some(pid),
                // Gone (not reaped yet) or not listening: not to be used again.
                Err(_) => self.let_go(pid),
            }
        }
        None
    }

    fn pause(&mut self, what: &str, e: &io::Error) {
        if !self.shortage_warned {
            diag::warn(&format!(
                "unable to {what}: {}; pausing accepts for {} ms at a time until it works",
                sys::strerror(e),
                PAUSE.as_millis()
            ));
            self.shortage_warned = true;
        }
        self.paused_until = Some(Instant::now() + PAUSE);
    }

    /// Whether a connection may be accepted under `-c`: those waiting for their PROXY
    /// header count.
    /// Processes that accept for themselves serve one connection each at most: then
    /// the processes are counted.
    fn has_room(&self) -> bool {
        if self.pool.is_some() {
            return self.children.len() < self.cfg.max_conns;
        }
        self.busy + self.awaiting.len() < self.cfg.max_conns
    }

    fn accept_from(&mut self, lfd: RawFd) {
        for _ in 0..BATCH {
            if !self.has_room() || self.paused_until.is_some() {
                return;
            }
            match sockets::accept(lfd) {
                Ok((fd, Some(peer))) => {
                    self.shortage_warned = false;
                    let peer = canonical_addr(peer);
                    match &self.cfg.proxy {
                        Some(p) => {
                            let a = Awaiting {
                                fd,
                                balancer: peer,
                                reader: header::Reader::new(),
                                deadline: Instant::now() + p.timeout,
                            };
                            self.accepted_from_balancer(a);
                        }
                        None => self.start(fd, peer, None, None),
                    }
                }
                // Not an IP peer: cannot happen on a TCP listener; drop it.
                Ok((fd, None)) => sys::close(fd),
                // That one connection is gone: try the next one.
                Err(e) if sockets::connection_gone(&e) => continue,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EAGAIN) => return,
                    Some(libc::EINTR | libc::ECONNABORTED) => continue,
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                        // Each idle child holds a descriptor of ours: give them back.
                        for pid in std::mem::replace(
                            &mut *self.idle,
                            allocator_api2::vec::Vec::new_in(NotForked),
                        ) {
                            self.let_go(pid);
                        }
                        self.let_go_waiting();
                        self.pause("accept", &e);
                        return;
                    }
                    // Descriptor-level errors mean the listener itself is gone.
                    Some(libc::EBADF | libc::ENOTSOCK | libc::EINVAL | libc::EFAULT) => {
                        diag::die_sys(exit::TEMP, "accept", &e)
                    }
                    // Anything else might not consume the pending connection, and
                    // retrying at once could spin: pause as for a shortage.
                    _ => {
                        self.pause("accept", &e);
                        return;
                    }
                },
            }
        }
    }

    /// A connection that must start with a PROXY header: refused at once unless it
    /// comes from a balancer, started when its header is whole, else left waiting.
    fn accepted_from_balancer(&mut self, mut a: Awaiting) {
        let trusted = self
            .cfg
            .proxy
            .as_ref()
            .is_some_and(|p| crate::proxy::trusted(&p.from, &a.balancer));
        if !trusted {
            self.drop_conn(a, "not a trusted balancer (-P)");
            return;
        }
        match a.reader.step(a.fd, true) {
            Step::Done(h) => self.start_proxied(a, h),
            Step::Wait => self.awaiting.push(a),
            Step::Fail(why) => self.drop_conn(a, &why),
        }
    }

    /// Takes what came of the headers awaited on `ready`, and drops those whose
    /// deadline has passed.
    fn take_headers(&mut self, ready: &[RawFd], now: Instant) {
        if self.awaiting.is_empty() {
            return;
        }
        for mut a in std::mem::take(&mut self.awaiting) {
            if ready.contains(&a.fd) {
                match a.reader.step(a.fd, true) {
                    Step::Done(h) => {
                        self.start_proxied(a, h);
                        continue;
                    }
                    Step::Fail(why) => {
                        self.drop_conn(a, &why);
                        continue;
                    }
                    Step::Wait => {}
                }
            }
            if now >= a.deadline {
                let why = format!(
                    "no whole PROXY header within {:?} ({} bytes came)",
                    self.cfg
                        .proxy
                        .as_ref()
                        .map_or(Duration::ZERO, |p| p.timeout),
                    a.reader.taken()
                );
                self.drop_conn(a, &why);
            } else {
                self.awaiting.push(a);
            }
        }
    }

    fn start_proxied(&mut self, a: Awaiting, h: Header) {
        match h {
            Header::Proxied { client, local } => {
                let client = canonical_addr(client);
                let local = canonical_addr(local);
                self.start(a.fd, client, Some(local), Some(a.balancer));
            }
            // The balancer's own connection (a health check): served as one from it.
            Header::Local => self.start(a.fd, a.balancer, None, None),
        }
    }

    fn drop_conn(&mut self, a: Awaiting, why: &str) {
        sys::close(a.fd);
        if !self.cfg.quiet {
            diag::info(&format!(
                "drop client={} proxy header: {why}",
                show(&a.balancer)
            ));
        }
    }

    fn start(
        &mut self,
        fd: RawFd,
        client: SocketAddr,
        local: Option<SocketAddr>,
        via: Option<SocketAddr>,
    ) {
        if self.pool.is_some() {
            self.start_in_pool(fd, client);
            return;
        }
        let ip = client.ip();
        let here = self.per_ip.get(&ip).copied().unwrap_or(0);
        if let Some(max) = self.cfg.max_per_ip {
            if here >= max {
                sys::close(fd);
                if !self.cfg.quiet {
                    diag::info(&reject_line(&client, via.as_ref(), here, max));
                }
                return;
            }
        }
        let conn = Conn {
            client,
            local,
            via,
            ip,
            start: Instant::now(),
        };
        let Some(pid) = self.dispatch(fd, conn.peer()) else {
            return;
        };
        self.busy += 1;
        // Counted only for -C, which alone reads it: each heap page the supervisor
        // writes between two forks is a private page of the process forked first, its
        // copy from the fork (ARCHITECTURE.md, "Memory of an idle connection").
        if self.cfg.max_per_ip.is_some() {
            *self.per_ip.entry(ip).or_insert(0) += 1;
        }
        self.log_accept(pid, &conn);
        if let Some(c) = self.children.get_mut(&pid) {
            c.conn = Some(conn);
        }
    }

    /// With processes that accept for themselves: forks a process for the connection
    /// with a free slot, which books it and goes on accepting.
    fn start_in_pool(&mut self, fd: RawFd, client: SocketAddr) {
        let Some(pool) = self.pool.clone() else {
            return;
        };
        // has_room() said a slot is free: one per process, at most -c of them.
        let Some(i) = pool.give() else {
            sys::close(fd);
            return;
        };
        let peer = Peer {
            client,
            local: None,
        };
        // Booked here, in the order of the accepts, so that -C turns away the later of
        // two; unless the pool's lock is held too long (a holder stopped, or killed in
        // it and a zombie until we reap it): then the child books it. The child logs it.
        let booked = match pool.admit_soon(i, client) {
            Ok(()) => true,
            Err(Refused::Full(held)) => {
                pool.release(i);
                sys::close(fd);
                if !self.cfg.quiet {
                    let max = self.cfg.max_per_ip.unwrap_or(0);
                    diag::info(&reject_line(&client, None, held, max));
                }
                return;
            }
            Err(Refused::Busy) => false,
        };
        if let Err((what, e)) = self.fork_child(fd, peer, Some((i, booked))) {
            pool.release(i);
            self.pause(what, &e);
        }
    }

    fn log_accept(&self, pid: libc::pid_t, conn: &Conn) {
        if !self.cfg.quiet {
            diag::info(&accept_line(
                pid,
                &conn.client,
                conn.via.as_ref(),
                self.busy,
                self.cfg.max_conns,
            ));
        }
    }

    /// Gives the connection on `fd` to an idle child, or else to a new one; returns the
    /// child, or None when none could be had (the connection is closed, accepting pauses).
    fn dispatch(&mut self, fd: RawFd, peer: Peer) -> Option<libc::pid_t> {
        if let Some(pid) = self.hand_to_idle(fd, &peer) {
            if let Some(c) = self.children.get_mut(&pid) {
                c.pending = Some(fd);
            }
            return Some(pid);
        }
        match self.fork_child(fd, peer, None) {
            Ok(pid) => Some(pid),
            Err((what, e)) => {
                self.pause(what, &e);
                None
            }
        }
    }

    /// Forks a child for the connection on `fd` (which is closed here) and books it
    /// without a connection; the caller books the connection.
    /// `slot`: its slot in the shared books, when it is to accept for itself, and
    /// whether this connection is booked there already.
    fn fork_child(
        &mut self,
        fd: RawFd,
        peer: Peer,
        slot: Option<(usize, bool)>,
    ) -> Result<libc::pid_t, (&'static str, io::Error)> {
        // Out of descriptors, the child is forked without a channel: it serves this
        // connection only, as with -r 1, rather than the client being dropped.
        let pair = self.done.as_ref().and_then(|_| sys::seqpacket_pair().ok());
        // The supervisor is single-threaded, so the child is a complete copy and may run
        // ordinary code until it execs.
        let forked = sys::fork_single_threaded();
        if matches!(forked, Ok(sys::Forked::Child)) {
            let accepting = match (&self.pool, slot) {
                (Some(pool), Some((slot, first_booked))) => Some(worker::Accepting {
                    pool: pool.clone(),
                    slot,
                    first_booked,
                    listeners: &self.listeners,
                    max_conns: self.cfg.max_conns,
                    quiet: self.cfg.quiet,
                    idle_max: IDLE_MAX,
                    pause: PAUSE,
                    listeners_shared: self.cfg.listeners_shared,
                }),
                _ => None,
            };
            // Ours first: forked with a full descriptor table, the child needs room
            // (the other processes' descriptors go at its scan, after that room is used).
            self.close_own_fds(accepting.is_some() && pair.is_some());
            match (pair, &self.done) {
                (Some((ours, theirs)), Some(done)) => {
                    sys::close(ours);
                    let first = (fd, peer);
                    worker::run(
                        theirs,
                        done.write,
                        self.cfg.max_use,
                        first,
                        accepting,
                        |fd, p| self.serve_one(fd, p),
                    )
                }
                _ => {
                    // No channel: this one connection only, booked like any other.
                    if let Some(a) = &accepting {
                        if !worker::book_first(a, sys::getpid(), fd, peer.client) {
                            std::process::exit(exit::OK);
                        }
                    }
                    std::process::exit(self.serve_one(fd, peer))
                }
            }
        }
        sys::close(fd);
        if let Some((_, theirs)) = pair {
            sys::close(theirs);
        }
        let pid = match forked {
            Ok(sys::Forked::Parent(pid)) => pid,
            Ok(sys::Forked::Child) => unreachable!("the child never gets here"),
            Err(e) => {
                if let Some((ours, _)) = pair {
                    sys::close(ours);
                }
                return Err(("fork", e));
            }
        };
        self.children.insert(
            pid,
            Child {
                conn: None,
                chan: pair.map(|(ours, _)| ours),
                pending: None,
                idle_since: Instant::now(),
                slot: slot.map(|(i, _)| i),
            },
        );
        Ok(pid)
    }

    /// In a forked child: closes the supervisor's own descriptors (they are
    /// close-on-exec, but a child that is reused needs the room before it would exec),
    /// but for the listeners and the pool's eventfd when it is to accept for itself. Those
    /// of the other children (our ends of their channels, sockets being handed to them)
    /// and the connections awaiting a PROXY header are close-on-exec too, and are closed
    /// by the scan for such descriptors that comes next: the reused process's
    /// (`worker::reserve`), or the first link's (`chain::exec`, in-process or exec). Not
    /// looked up here: the books are not in a child's memory (`Books`).
    fn close_own_fds(&self, accepting: bool) {
        if !accepting {
            for &fd in &self.listeners {
                sys::close(fd);
            }
            if let Some(p) = &self.pool {
                sys::close(p.wake_fd());
            }
        }
        sys::close(self.signals.fd());
        if let Some(d) = &self.done {
            sys::close(d.read);
        }
    }

    /// In the child: the socket onto 0 and 1, the environment, default signals, exec.
    /// Returns only when PROG... ran in this process and ended normally.
    fn serve_one(&self, fd: RawFd, peer: Peer) -> i32 {
        if let Err(e) = sys::fd_copy(0, fd).and_then(|()| sys::fd_copy(1, fd)) {
            diag::die_sys(exit::TEMP, "move the connection to fds 0 and 1", &e);
        }
        if fd > 1 {
            sys::close(fd);
        }
        // Ours alone once the supervisor has closed its copy, which it does when we
        // say we took it (reused) or at once (forked for it): the relay need not put
        // its flags back.
        chain::private_fds(&[0, 1]);
        if self.cfg.nodelay {
            let _ = sys::setsockopt_int(0, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
        }
        // Behind a balancer, the one the client connected to, from the PROXY header;
        // else the listener's, when it is bound to one; asked of the kernel per
        // connection when bound to a wildcard address.
        match peer
            .local
            .or(self.fixed_local)
            .map(Some)
            .map_or_else(|| sys::local_addr(0), Ok)
        {
            Ok(Some(local)) => {
                let local = SocketAddr::new(canonical(local.ip()), local.port());
                conninfo::set_ucspi(&local, &peer.client);
            }
            Ok(None) => diag::die(exit::TEMP, "connection is not an IP socket"),
            Err(e) => diag::die_sys(exit::TEMP, "get the local address", &e),
        }
        // chain::exec unblocks the signals the signalfd blocked: a program that
        // inherited the mask would never see SIGTERM or SIGCHLD.
        chain::exec(&self.cfg.prog)
    }
}
