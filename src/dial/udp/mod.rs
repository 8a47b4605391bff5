//! SOCKS5 UDP ASSOCIATE (`TCPSPLICE_COMMAND=udp`): tcpsplice-dial is the datagram relay
//! of one association, for as long as its TCP control connection (fds 0/1) lives.
//!
//! - The relay socket is bound to the address the client reached (getsockname of fd 0)
//!   with a port of the kernel's choosing; the success reply carries it, or `-A`'s
//!   address with its port, always as an IP.
//! - Client datagrams are taken only from the control connection's client IP (`-m`:
//!   from any), and the client's port is learned from its first datagram; everything
//!   from elsewhere is dropped and counted (`foreign`).
//! - Each datagram's destination, an IP or a name resolved here (bounded cache), passes
//!   the same checks as a TCP target ([`super::dialer::judge`]: `-a`, the deny list,
//!   this host's addresses and local routes, the user's rules) before anything is sent;
//!   a refused one is dropped and counted. Verdicts are cached per destination.
//! - Datagrams leave from one socket per family, so every destination sees the same
//!   source port; what comes back is relayed only from a destination the client sent
//!   to (at most [`MAX_DESTS`] remembered; when full, the less recent half is
//!   forgotten), with its source as an IP in the header.
//! - It ends at the control connection's end of file or reset, after `-i` seconds
//!   without a datagram relayed either way, or on SIGTERM, SIGINT or SIGHUP; one log
//!   line then says what it did.
//!
//! Datagrams move in batches of up to [`BATCH`] per system call (recvmmsg/sendmmsg);
//! memory is bounded whatever the peers send: two sets of [`BATCH`] 64 KiB buffers
//! (their pages touched only by datagrams that large) and bounded tables.

pub mod header;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::io::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use super::connect;
use super::dialer::{self, Dial, Family};
use super::reply::{self, Failure, Style};
use crate::dgram::{self, Received};
use crate::rules::{self, Policy, Rule};
use crate::{conninfo, diag, environ, exit, sys};
use header::Dest;

/// Datagrams per system call.
const BATCH: usize = 8;
/// Room for the largest UDP payload there is.
const DGRAM_ROOM: usize = 65536;
/// Destinations whose replies are let through, and whose verdicts are cached, at most.
pub const MAX_DESTS: usize = 4096;
/// Host names whose addresses are cached, at most.
const MAX_NAMES: usize = 256;
/// How long a name's addresses, a failed lookup and a verdict are kept.
const NAME_TTL: Duration = Duration::from_secs(60);
const NEGATIVE_TTL: Duration = Duration::from_secs(10);
const VERDICT_TTL: Duration = Duration::from_secs(60);
/// Refused destinations named in the log one by one, at most (the end line counts all).
const REFUSALS_LOGGED: u32 = 8;

/// What the association needs besides the dialer's configuration.
struct Setup<'a> {
    pub allow: &'a [Rule],
    pub user: Option<Vec<Rule>>,
    pub family: Family,
    /// Where datagrams leave from (`-s`), port 0 for any.
    pub source: Option<SocketAddr>,
    /// Bounds a name lookup (`-t`).
    pub lookup: Duration,
    /// `-i`.
    pub idle: Duration,
    /// `-m`: datagrams from any address may be the client's.
    pub any_source: bool,
    /// The control connection's client, whose IP client datagrams must come from.
    pub client: SocketAddr,
    /// The bound relay socket.
    pub relay: UdpSocket,
    /// SIGTERM, SIGINT and SIGHUP, blocked before the reply so that none is missed.
    pub signals: sys::SignalFd,
}

/// How the association ended.
#[derive(Debug)]
enum End {
    Eof,
    Reset,
    Idle,
    Signal(i32),
    Failed(String),
}

impl End {
    fn describe(&self) -> String {
        match self {
            End::Eof => "eof".into(),
            End::Reset => "reset-by-client".into(),
            End::Idle => "idle-timeout".into(),
            End::Signal(s) => format!("signal-{s}"),
            End::Failed(why) => format!("failed({why})"),
        }
    }

    fn code(&self) -> i32 {
        match self {
            End::Eof => exit::OK,
            End::Reset | End::Idle | End::Signal(_) => exit::POLICY,
            End::Failed(_) => exit::TEMP,
        }
    }
}

#[derive(Default)]
struct Counts {
    up: u64,
    up_bytes: u64,
    down: u64,
    down_bytes: u64,
    refused: u64,
    foreign: u64,
    dropped: u64,
    dests: u64,
}

/// A socket datagrams leave from, one per family, made at the first datagram for it.
struct Out {
    sock: Option<UdpSocket>,
    /// Could not be made: datagrams of this family are dropped.
    failed: bool,
}

struct Relay<'a> {
    s: Setup<'a>,
    /// The client's UDP address, once its first datagram came.
    client: Option<SocketAddr>,
    out4: Out,
    out6: Out,
    /// Destinations sent to, and when last: what replies may come from.
    dests: HashMap<SocketAddr, Instant>,
    /// Checked destinations: allowed or not, and when checked.
    verdicts: HashMap<SocketAddr, (bool, Instant)>,
    names: HashMap<String, (Vec<IpAddr>, Instant)>,
    counts: Counts,
    refusals_logged: u32,
    last_activity: Instant,
}

/// Opens the relay socket where the client reached us, answers the client, and relays
/// until the association ends; then logs and exits.
pub(super) fn start(d: &Dial, client: Option<SocketAddr>) -> ! {
    let signals =
        sys::SignalFd::new(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP]).unwrap_or_else(|e| {
            d.fail(
                Failure::General,
                exit::TEMP,
                &format!("unable to make a signalfd: {}", sys::strerror(&e)),
            )
        });
    let local = match sys::local_addr(0) {
        Ok(Some(a)) => canonical(a),
        _ => d.usage_fail("unable to serve UDP ASSOCIATE: fd 0 is not a TCP connection"),
    };
    let Some(client) = client
        .or_else(|| sys::peer_addr(0).ok().flatten())
        .map(canonical)
    else {
        d.usage_fail("unable to serve UDP ASSOCIATE: the client's address is not known")
    };
    // Before the reply: a failure here is still answered as one.
    let user = d.user_rules();
    let mut at = local;
    at.set_port(0);
    let relay = UdpSocket::bind(at).unwrap_or_else(|e| {
        d.fail(
            Failure::General,
            exit::TEMP,
            &format!(
                "unable to open the UDP relay at {at}: {}",
                sys::strerror(&e)
            ),
        )
    });
    let bound = relay.local_addr().unwrap_or(at);
    let shown = SocketAddr::new(d.cfg.advertise.unwrap_or(bound.ip()), bound.port());
    if let Err(e) = sys::write_all(1, &reply::success(Style::Socks5, Some(shown))) {
        diag::die_sys(exit::POLICY, "send the reply to the client", &e);
    }
    environ::remove_var(dialer::REPLY_VAR);
    run(Setup {
        allow: &d.cfg.allow,
        user,
        family: d.cfg.family,
        source: d.source(Some(local)),
        lookup: d.cfg.timeout,
        idle: d.cfg.udp_idle,
        any_source: d.cfg.udp_any_source,
        client,
        relay,
        signals,
    })
}

/// Runs the association until it ends, logs its line and exits.
fn run(s: Setup) -> ! {
    let started = Instant::now();
    let relay_addr = s.relay.local_addr().ok();
    let mut r = Relay {
        s,
        client: None,
        out4: Out {
            sock: None,
            failed: false,
        },
        out6: Out {
            sock: None,
            failed: false,
        },
        dests: HashMap::new(),
        verdicts: HashMap::new(),
        names: HashMap::new(),
        counts: Counts::default(),
        refusals_logged: 0,
        last_activity: Instant::now(),
    };
    let end = r.relay();
    let c = &r.counts;
    let user = environ::var("TCPSPLICE_USER").unwrap_or_else(|_| "-".into());
    diag::info(&format!(
        "end client={} user={} udp={} client_udp={} up_dgrams={} up_bytes={} down_dgrams={} \
         down_bytes={} refused={} foreign={} dropped={} dests={} secs={:.3} how={}",
        conninfo::client().unwrap_or_else(|| "-".into()),
        user,
        relay_addr.map_or("-".into(), |a| a.to_string()),
        r.client.map_or("-".into(), |a| a.to_string()),
        c.up,
        c.up_bytes,
        c.down,
        c.down_bytes,
        c.refused,
        c.foreign,
        c.dropped,
        c.dests,
        started.elapsed().as_secs_f64(),
        end.describe(),
    ));
    std::process::exit(end.code())
}

/// The address as it is judged and sent to: an IPv4-mapped address becomes IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    match rules::canonical(a.ip()) {
        ip @ IpAddr::V4(_) => SocketAddr::new(ip, a.port()),
        IpAddr::V6(_) => a,
    }
}

/// What one client datagram is to become.
struct Plan {
    slot: usize,
    offset: usize,
    to: SocketAddr,
}

impl Relay<'_> {
    fn relay(&mut self) -> End {
        if let Err(e) = self.s.relay.set_nonblocking(true) {
            return End::Failed(sys::strerror(&e));
        }
        let mut up_bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; DGRAM_ROOM]).collect();
        let mut down_bufs: Vec<Vec<u8>> = (0..BATCH)
            .map(|_| vec![0u8; header::MAX_IP_HEADER + DGRAM_ROOM])
            .collect();
        let mut meta = [Received::default(); BATCH];
        let mut scratch = [0u8; 4096];
        loop {
            let deadline = self.last_activity + self.s.idle;
            let now = Instant::now();
            if now >= deadline {
                return End::Idle;
            }
            let mut fds = vec![
                pollfd(0, libc::POLLIN),
                pollfd(self.s.signals.fd(), libc::POLLIN),
                pollfd(self.s.relay.as_raw_fd(), libc::POLLIN),
            ];
            for o in [&self.out4, &self.out6] {
                if let Some(s) = &o.sock {
                    fds.push(pollfd(s.as_raw_fd(), libc::POLLIN));
                }
            }
            if let Err(e) = sys::poll(&mut fds, Some(deadline - now)) {
                return End::Failed(format!("poll: {}", sys::strerror(&e)));
            }
            if fds[1].revents != 0 {
                if let Some(sig) = self.s.signals.take() {
                    return End::Signal(sig);
                }
            }
            if fds[0].revents != 0 {
                match sys::read(0, &mut scratch) {
                    Ok(0) => return End::Eof,
                    // The control connection carries nothing after the reply; whatever
                    // the client sends on it is dropped.
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => return End::Reset,
                    Err(e) => return End::Failed(format!("read fd 0: {}", sys::strerror(&e))),
                }
            }
            if fds[2].revents != 0 {
                if let Err(e) = self.upstream(&mut up_bufs, &mut meta) {
                    return End::Failed(format!("relay socket: {}", sys::strerror(&e)));
                }
            }
            for f in &fds[3..] {
                if f.revents != 0 {
                    if let Err(e) = self.downstream(f.fd, &mut down_bufs, &mut meta) {
                        return End::Failed(format!("outbound socket: {}", sys::strerror(&e)));
                    }
                }
            }
        }
    }

    /// Takes what the client sent (one batch), and sends on what may go.
    fn upstream(&mut self, bufs: &mut [Vec<u8>], meta: &mut [Received]) -> io::Result<()> {
        let n = dgram::recv_batch(self.s.relay.as_raw_fd(), bufs, 0, meta)?;
        let mut plans: Vec<Plan> = Vec::with_capacity(n);
        for (slot, m) in meta.iter().take(n).enumerate() {
            let Some(from) = m.from.map(canonical) else {
                self.counts.dropped += 1;
                continue;
            };
            if !self.is_client(from) {
                self.counts.foreign += 1;
                continue;
            }
            if m.truncated {
                self.counts.dropped += 1;
                continue;
            }
            let d = &bufs[slot][..m.len];
            let (h, offset) = match header::parse(d) {
                // Fragments are not reassembled (RFC 1928 lets a relay drop them).
                Ok((h, off)) if h.frag == 0 => (h, off),
                _ => {
                    self.counts.dropped += 1;
                    continue;
                }
            };
            let dest = match h.dest {
                Dest::Ip(a) => Ok(vec![canonical(a)]),
                Dest::Name(name, port) => self.lookup(name, port),
            };
            let addrs = match dest {
                Ok(a) if a.iter().all(|a| a.port() != 0) => a,
                _ => {
                    self.counts.dropped += 1;
                    continue;
                }
            };
            match self.choose(&addrs) {
                Some(to) => plans.push(Plan { slot, offset, to }),
                None => self.counts.refused += 1,
            }
        }
        for v6 in [false, true] {
            if !plans.iter().any(|p| p.to.is_ipv6() == v6) {
                continue;
            }
            let sock = match self.out(v6) {
                Some(s) => s.as_raw_fd(),
                None => {
                    let lost = plans.iter().filter(|p| p.to.is_ipv6() == v6).count();
                    self.counts.dropped += lost as u64;
                    continue;
                }
            };
            let msgs: Vec<(&[u8], SocketAddr)> = plans
                .iter()
                .filter(|p| p.to.is_ipv6() == v6)
                .map(|p| (&bufs[p.slot][p.offset..meta[p.slot].len], p.to))
                .collect();
            let now = Instant::now();
            let sent = send_all(sock, &msgs);
            for (i, (data, to)) in msgs.iter().enumerate() {
                if !sent[i] {
                    self.counts.dropped += 1;
                    continue;
                }
                self.counts.up += 1;
                self.counts.up_bytes += data.len() as u64;
                self.last_activity = now;
                self.remember(*to, now);
            }
        }
        Ok(())
    }

    /// Takes what came back on an outbound socket (one batch) and relays what comes
    /// from a destination the client sent to.
    fn downstream(
        &mut self,
        fd: RawFd,
        bufs: &mut [Vec<u8>],
        meta: &mut [Received],
    ) -> io::Result<()> {
        let room = header::MAX_IP_HEADER;
        let n = dgram::recv_batch(fd, bufs, room, meta)?;
        let Some(client) = self.client else {
            self.counts.dropped += n as u64;
            return Ok(());
        };
        let mut spans: Vec<(usize, usize, usize)> = Vec::with_capacity(n);
        for (slot, m) in meta.iter().take(n).enumerate() {
            let from = m.from.map(canonical);
            match from {
                Some(f) if !m.truncated && self.dests.contains_key(&f) => {
                    let (h, len) = header::encode(f);
                    bufs[slot][room - len..room].copy_from_slice(&h[..len]);
                    spans.push((slot, room - len, room + m.len));
                }
                _ => self.counts.dropped += 1,
            }
        }
        let msgs: Vec<(&[u8], SocketAddr)> = spans
            .iter()
            .map(|&(slot, a, b)| (&bufs[slot][a..b], client))
            .collect();
        let sent = send_all(self.s.relay.as_raw_fd(), &msgs);
        let now = Instant::now();
        for (i, (data, _)) in msgs.iter().enumerate() {
            if sent[i] {
                self.counts.down += 1;
                self.counts.down_bytes += (data.len() - (room - spans[i].1)) as u64;
                self.last_activity = now;
            } else {
                self.counts.dropped += 1;
            }
        }
        Ok(())
    }

    /// Whether a datagram from `from` is the client's; the first one that may be fixes
    /// the client's address.
    fn is_client(&mut self, from: SocketAddr) -> bool {
        match self.client {
            Some(c) => c == from,
            None if self.s.any_source || from.ip() == rules::canonical(self.s.client.ip()) => {
                self.client = Some(from);
                true
            }
            None => false,
        }
    }

    /// The addresses of a name in a datagram, from the cache or the resolver.
    fn lookup(&mut self, name: &str, port: u16) -> Result<Vec<SocketAddr>, ()> {
        let now = Instant::now();
        if let Some((ips, until)) = self.names.get(name) {
            if now < *until {
                return if ips.is_empty() {
                    Err(())
                } else {
                    Ok(ips
                        .iter()
                        .map(|&ip| canonical(SocketAddr::new(ip, port)))
                        .collect())
                };
            }
        }
        if self.names.len() >= MAX_NAMES {
            self.names.retain(|_, (_, until)| now < *until);
            if self.names.len() >= MAX_NAMES {
                self.names.clear();
            }
        }
        // Only this association waits for it: each is a process of its own.
        let found = connect::resolve(name, port, self.s.lookup);
        let ips: Vec<IpAddr> = match &found {
            Ok(a) => a.iter().map(|a| canonical(*a).ip()).collect(),
            Err(_) => Vec::new(),
        };
        let ttl = if ips.is_empty() {
            NEGATIVE_TTL
        } else {
            NAME_TTL
        };
        self.names
            .insert(name.to_string(), (ips.clone(), now + ttl));
        if ips.is_empty() {
            return Err(());
        }
        Ok(ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect())
    }

    /// The first of `addrs` that may be sent to, or None when every one is refused.
    fn choose(&mut self, addrs: &[SocketAddr]) -> Option<SocketAddr> {
        addrs.iter().copied().find(|&a| self.allowed(a))
    }

    /// Whether datagrams may go to `a`: the family options and the policy, cached.
    fn allowed(&mut self, a: SocketAddr) -> bool {
        let now = Instant::now();
        if let Some(&(ok, at)) = self.verdicts.get(&a) {
            if now.duration_since(at) < VERDICT_TTL {
                return ok;
            }
        }
        let family_ok = match self.s.family {
            Family::Any => true,
            Family::V4 => a.is_ipv4(),
            Family::V6 => a.is_ipv6(),
        } && self.s.source.is_none_or(|s| s.is_ipv4() == a.is_ipv4());
        let policy = Policy {
            allow: self.s.allow,
            user: self.s.user.as_deref(),
            own: &[],
        };
        let verdict = if !family_ok {
            Err("not of the family datagrams may leave in (-4, -6, -s)".to_string())
        } else {
            match dialer::judge(&policy, &a, self.s.source.map(|s| s.ip())) {
                Ok(v) => v,
                Err(e) => Err(format!(
                    "unable to ask the routing table about it: {}",
                    sys::strerror(&e)
                )),
            }
        };
        if let Err(why) = &verdict {
            if self.refusals_logged < REFUSALS_LOGGED {
                self.refusals_logged += 1;
                diag::warn(&format!("udp: not sending to {a}: {why}"));
            }
        }
        if self.verdicts.len() >= MAX_DESTS {
            self.verdicts.clear();
        }
        self.verdicts.insert(a, (verdict.is_ok(), now));
        verdict.is_ok()
    }

    /// Records that the client sent to `to`, so its replies may come back.
    fn remember(&mut self, to: SocketAddr, now: Instant) {
        if let Some(t) = self.dests.get_mut(&to) {
            *t = now;
            return;
        }
        if self.dests.len() >= MAX_DESTS {
            // The older half goes, in one pass: a client that sends to ever new
            // destinations costs O(1) per datagram, not a scan of the table each.
            let mut times: Vec<Instant> = self.dests.values().copied().collect();
            let mid = times.len() / 2;
            let (_, &mut cut, _) = times.select_nth_unstable(mid);
            self.dests.retain(|_, t| *t > cut);
        }
        self.dests.insert(to, now);
        self.counts.dests += 1;
    }

    /// The outbound socket of a family, made at first use: bound to `-s` (or the
    /// address the client reached, for `-s auto`), else to any address, port 0.
    fn out(&mut self, v6: bool) -> Option<&UdpSocket> {
        let source = self.s.source;
        let o = if v6 { &mut self.out6 } else { &mut self.out4 };
        if o.sock.is_none() && !o.failed {
            let any: SocketAddr = if v6 {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            };
            let at = source.filter(|s| s.is_ipv6() == v6).unwrap_or(any);
            match UdpSocket::bind(at).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
                Ok(s) => o.sock = Some(s),
                Err(e) => {
                    o.failed = true;
                    diag::warn(&format!(
                        "udp: unable to open a socket at {at}: {}",
                        sys::strerror(&e)
                    ));
                }
            }
        }
        o.sock.as_ref()
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// Sends every one of `msgs` that the kernel takes, in batches; one it refuses (full
/// buffer, too long, unreachable) is dropped and the rest go on. Says which went.
fn send_all(fd: RawFd, msgs: &[(&[u8], SocketAddr)]) -> Vec<bool> {
    let mut sent = vec![false; msgs.len()];
    let mut i = 0;
    while i < msgs.len() {
        match dgram::send_batch(fd, &msgs[i..]) {
            Ok(0) => break,
            Ok(k) => {
                sent[i..i + k].iter_mut().for_each(|s| *s = true);
                i += k;
            }
            Err(_) => i += 1,
        }
    }
    sent
}
