//! tcpsplice-dial's work: resolve the target, check client-chosen addresses against the
//! rules, connect with a bound, put the connection on fds 6 and 7, describe it in the
//! UCSPI variables (keeping the client in `TCPSPLICE_CLIENT`), answer a waiting SOCKS or
//! HTTP client, and exec the next program. A SOCKS5 BIND accepts the connection instead
//! of making it (`bind`); a UDP ASSOCIATE makes this process the datagram relay (`udp`).

use std::ffi::{OsStr, OsString};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::connect::{self, connect_any, resolve};
use super::proxyproto;
use super::reply::{self, Failure, Style};
use crate::rules::{self, Policy, Rule};
use crate::{chain, conninfo, diag, environ, exit, sys};

/// The variable naming a client-chosen target, `host:port` or `[v6addr]:port`.
pub const TARGET_VAR: &str = "TCPSPLICE_TARGET";
/// The variable naming the reply a client waits for.
pub const REPLY_VAR: &str = "TCPSPLICE_REPLY";
/// The variable carrying the user's own target rules.
pub const RULES_VAR: &str = "TCPSPLICE_RULES";
/// The variable naming what the client asked for: `connect`, `bind` or `udp`.
pub const COMMAND_VAR: &str = "TCPSPLICE_COMMAND";

/// What a client-chosen target is for (`TCPSPLICE_COMMAND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Connect,
    /// SOCKS5 BIND: accept one connection from the target.
    Bind,
    /// SOCKS5 UDP ASSOCIATE: relay datagrams.
    Udp,
}

/// Which address families to try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Any,
    V4,
    V6,
}

/// Where outgoing connections come from (`-s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Let the kernel choose.
    Kernel,
    /// This address (port 0 = any port).
    Addr(SocketAddr),
    /// The local address of the client's connection on fd 0, any port.
    Auto,
}

/// Everything the command line says.
pub struct Config {
    /// HOST and PORT from the command line: a trusted target. None: TCPSPLICE_TARGET.
    pub fixed: Option<(String, u16)>,
    pub allow: Vec<Rule>,
    pub family: Family,
    /// Bounds the name lookup, and each connection attempt separately.
    pub timeout: Duration,
    pub source: Source,
    pub nodelay: bool,
    pub keepalive: bool,
    /// PROXY protocol version to send first, if any.
    pub proxy: Option<u8>,
    pub prog: Vec<OsString>,
    /// BIND: how long to wait for the peer's connection (`-b`).
    pub bind_timeout: Duration,
    /// UDP ASSOCIATE: the idle timeout (`-i`).
    pub udp_idle: Duration,
    /// BIND and UDP ASSOCIATE: datagrams from any address may be the client's (`-m`).
    pub udp_any_source: bool,
    /// BIND and UDP ASSOCIATE: the address put in the reply instead of the bound one
    /// (`-A`, behind NAT).
    pub advertise: Option<IpAddr>,
}

/// Parses a port number (1 to 65535).
pub fn parse_port(s: &str) -> Option<u16> {
    s.parse::<u16>().ok().filter(|&p| p > 0)
}

/// Splits `host:port` or `[v6addr]:port`.
pub fn split_target(s: &str) -> Result<(String, u16), String> {
    let (host, port) = split_endpoint(s)?;
    if port == 0 {
        return Err("not a port from 1 to 65535: 0".into());
    }
    Ok((host, port))
}

/// Splits `host:port` or `[v6addr]:port` where the port may be 0: the peer a BIND
/// expects, or the address a UDP ASSOCIATE names, often all zeros.
pub fn split_endpoint(s: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("no closing ]")?;
        let port = after.strip_prefix(':').ok_or("no :PORT after ]")?;
        (host, port)
    } else {
        let (host, port) = s.rsplit_once(':').ok_or("no :PORT")?;
        if host.contains(':') {
            return Err("an IPv6 address needs brackets: [addr]:port".into());
        }
        (host, port)
    };
    let host = parse_host(host)?;
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("not a port from 0 to 65535: {port}"))?;
    Ok((host, port))
}

/// Checks a host name or address literal; brackets around an IPv6 address are removed.
/// Names are held to letters, digits, `-`, `.` and `_` so that nothing odd reaches the
/// resolver or a log line.
pub fn parse_host(s: &str) -> Result<String, String> {
    let s = s
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(s);
    if s.parse::<IpAddr>().is_ok() {
        return Ok(s.to_string());
    }
    // A link-local IPv6 address needs its interface (fe80::1%eth0); getaddrinfo reads it.
    if let Some((ip, zone)) = s.split_once('%') {
        let zone_ok = !zone.is_empty()
            && zone
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if ip.parse::<std::net::Ipv6Addr>().is_ok() && zone_ok {
            return Ok(s.to_string());
        }
    }
    let ok = !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("not a host name or IP address: {s:?}"))
    }
}

/// What a failed attempt says in a message.
fn why(cfg: &Config, e: &io::Error) -> String {
    if e.raw_os_error() == Some(libc::ETIMEDOUT) {
        format!("timed out after {:?}", cfg.timeout)
    } else {
        sys::strerror(e)
    }
}

/// The client's address and the address it connected to, saved before the `TCP*`
/// variables are rewritten: `TCPSPLICE_CLIENT` keeps the client for the programs after
/// us. Under inetd, xinetd and systemd nothing set them, so they come from fd 0.
fn save_client() -> (Option<SocketAddr>, Option<SocketAddr>) {
    conninfo::fill_from_socket(0);
    let saved = environ::with_var(conninfo::CLIENT_VAR, |v| {
        v.and_then(OsStr::to_str)
            .filter(|v| !v.is_empty())
            .map(proxyproto::parse_addr)
    });
    let client = match saved {
        Some(c) => c,
        None => {
            // `-` when no one knows (a shell pipeline): left unset, the log line of the
            // splicer would take the upstream address we are about to set for the
            // client's.
            let j = conninfo::joined("TCPREMOTEIP", "TCPREMOTEPORT");
            environ::set_var(conninfo::CLIENT_VAR, j.as_deref().unwrap_or("-"));
            j.and_then(|j| proxyproto::parse_addr(&j))
        }
    };
    let local =
        conninfo::joined("TCPLOCALIP", "TCPLOCALPORT").and_then(|j| proxyproto::parse_addr(&j));
    (client, local)
}

/// Ends the connection with the failure reply the client waits for, if it waits for one,
/// then logs and exits. A refusal by policy is the client's doing, not a fault of ours:
/// a warning that names the client and the user, as tcpsplice-auth's refusals do.
fn fail(style: Option<Style>, f: Failure, code: i32, msg: &str) -> ! {
    if let Some(style) = style {
        if sys::write_all(1, &reply::failure(style, f)).is_ok() {
            linger();
        }
    }
    if code == exit::POLICY {
        let client = conninfo::client().unwrap_or_else(|| "-".into());
        let user = environ::var("TCPSPLICE_USER").unwrap_or_else(|_| "-".into());
        diag::warn(&format!("refused client={client} user={user}: {msg}"));
        std::process::exit(code)
    }
    diag::die(code, msg)
}

/// After a failure reply: close our sending side, then read and drop whatever the client
/// still sends until it closes, for at most a second. Exiting with unread input would
/// make the kernel answer with a reset, which can destroy the reply before it is read.
fn linger() {
    if sys::fd_kind(1).ok() == Some(sys::FdKind::Socket) {
        let _ = sys::shutdown(1, libc::SHUT_WR);
    }
    if sys::fd_kind(0).ok() != Some(sys::FdKind::Socket) {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let mut p = [libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        }];
        match sys::poll(&mut p, Some(left)) {
            Ok(n) if n > 0 => {}
            _ => return,
        }
        match sys::read(0, &mut buf) {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
}

/// The target as the command line or the client named it.
pub(super) struct Target {
    host: String,
    pub(super) port: u16,
    /// From the command line: connected to without checks.
    trusted: bool,
    /// `host:port` for messages.
    pub(super) shown: String,
}

/// Judges one address of a client-chosen target: the rules and the deny list, then
/// whether the routing table delivers it to this host (an address of one of its
/// interfaces, each of which has a local route from the moment it is added, or a whole
/// prefix routed to it, `ip route add local 203.0.113.0/24 dev lo`), which is judged as
/// one of this host's own addresses, so an `-a` rule for it can still lift it.
/// `from`: the source the connection will be bound to, which the routing table is
/// asked with (a table chosen by source). Ok(Err(why)) refuses it; Err: the routing
/// table could not be asked.
///
/// The table is the one answer asked: the interface list (getifaddrs(3), a netlink dump
/// of every link and address and 8 KiB of the C library's allocations) would name only
/// addresses the table has, and an IPv6 one on an interface that is down, which
/// nothing reaches.
pub(super) fn judge(
    policy: &Policy,
    a: &SocketAddr,
    from: Option<IpAddr>,
) -> io::Result<Result<(), String>> {
    if let Err(why) = policy.check(a) {
        return Ok(Err(why));
    }
    // A loopback address is this host's whatever the table says (and denied unless a
    // rule lifted it): the netlink round trip (a socket of its own, five calls) would
    // tell nothing new.
    let ip = a.ip();
    if ip.is_loopback() || !connect::routes_to_this_host(a, from)? {
        return Ok(Ok(()));
    }
    Ok(Policy {
        allow: policy.allow,
        user: policy.user,
        own: &[ip],
    }
    .check(a)
    .map_err(|why| format!("{why} (a local route delivers it to this host)")))
}

/// One run: the configuration and the reply style, which every failure needs.
pub(super) struct Dial<'a> {
    pub(super) cfg: &'a Config,
    pub(super) style: Option<Style>,
}

impl Dial<'_> {
    pub(super) fn fail(&self, f: Failure, code: i32, msg: &str) -> ! {
        fail(self.style, f, code, msg)
    }

    pub(super) fn usage_fail(&self, msg: &str) -> ! {
        self.fail(Failure::General, exit::USAGE, msg)
    }

    /// What the client asked for: `TCPSPLICE_COMMAND` for a client-chosen target (unset:
    /// connect); a target on the command line is always connected to.
    fn command(&self) -> Command {
        if self.cfg.fixed.is_some() {
            return Command::Connect;
        }
        let c = environ::with_var(COMMAND_VAR, |v| match v.map(OsStr::to_str) {
            None | Some(None) | Some(Some("" | "connect")) => Ok(Command::Connect),
            Some(Some("bind")) => Ok(Command::Bind),
            Some(Some("udp")) => Ok(Command::Udp),
            Some(Some(other)) => Err(format!(
                "{COMMAND_VAR} must be connect, bind or udp, not {other:?}"
            )),
        })
        .unwrap_or_else(|why| self.usage_fail(&why));
        if c != Command::Connect && self.style != Some(Style::Socks5) {
            self.usage_fail(&format!(
                "{COMMAND_VAR}={}: only a SOCKS5 client (TCPSPLICE_REPLY=socks5) can ask for it",
                if c == Command::Bind { "bind" } else { "udp" }
            ));
        }
        c
    }

    pub(super) fn target(&self, command: Command) -> Target {
        let (host, port, trusted) = match &self.cfg.fixed {
            Some((h, p)) => (h.clone(), *p, true),
            None => {
                let parsed = environ::with_var(TARGET_VAR, |v| {
                    let t = v.and_then(OsStr::to_str).unwrap_or_default();
                    match command {
                        Command::Connect => split_target(t),
                        _ => split_endpoint(t),
                    }
                    .map_err(|e| format!("unable to use {TARGET_VAR} {t:?}: {e}"))
                });
                match parsed {
                    Ok((h, p)) => (h, p, false),
                    Err(why) => self.usage_fail(&why),
                }
            }
        };
        let shown = conninfo::join_host_port_number(&host, port);
        Target {
            host,
            port,
            trusted,
            shown,
        }
    }

    pub(super) fn source(&self, client_local: Option<SocketAddr>) -> Option<SocketAddr> {
        match self.cfg.source {
            Source::Kernel => None,
            Source::Addr(a) => Some(a),
            Source::Auto => match client_local.or_else(|| sys::local_addr(0).ok().flatten()) {
                Some(a) => Some(SocketAddr::new(rules::canonical(a.ip()), 0)),
                None => self.usage_fail("unable to use -s auto: fd 0 is not a TCP connection"),
            },
        }
    }

    /// The user's rules (`TCPSPLICE_RULES`), if any.
    pub(super) fn user_rules(&self) -> Option<Vec<Rule>> {
        match environ::var(RULES_VAR) {
            Ok(s) if !s.trim().is_empty() => match rules::parse_list(&s) {
                Ok(r) => Some(r),
                Err(e) => self.usage_fail(&format!("unable to use {RULES_VAR}: {e}")),
            },
            _ => None,
        }
    }

    /// The addresses to try: resolved, of the wanted family, and for a client-chosen
    /// target allowed by the policy. Exits when none is left.
    pub(super) fn candidates(&self, t: &Target, source: Option<SocketAddr>) -> Vec<SocketAddr> {
        let user = if t.trusted { None } else { self.user_rules() };
        let policy = Policy {
            allow: &self.cfg.allow,
            user: user.as_deref(),
            own: &[],
        };
        let addrs = resolve(&t.host, t.port, self.cfg.timeout).unwrap_or_else(|e| {
            self.fail(
                Failure::HostUnreachable,
                exit::TEMP,
                &format!(
                    "unable to find the IP address of {}: {}",
                    t.host,
                    sys::strerror(&e)
                ),
            )
        });
        let mut out = Vec::new();
        let mut refusals = Vec::new();
        for a in addrs {
            // A mapped address is connected to over IPv4; any other keeps its scope id.
            let a = match rules::canonical(a.ip()) {
                ip @ IpAddr::V4(_) => SocketAddr::new(ip, a.port()),
                IpAddr::V6(_) => a,
            };
            let family_ok = match self.cfg.family {
                Family::Any => true,
                Family::V4 => a.is_ipv4(),
                Family::V6 => a.is_ipv6(),
            };
            let source_ok = source.is_none_or(|s| s.is_ipv4() == a.is_ipv4());
            if !family_ok || !source_ok || out.contains(&a) {
                continue;
            }
            if !t.trusted {
                match judge(&policy, &a, source.map(|s| s.ip())) {
                    Ok(Ok(())) => {}
                    Ok(Err(why)) => {
                        refusals.push((a, why));
                        continue;
                    }
                    Err(e) => self.fail(
                        Failure::General,
                        exit::TEMP,
                        &format!(
                            "unable to ask the routing table about {}: {}",
                            a.ip(),
                            sys::strerror(&e)
                        ),
                    ),
                }
            }
            out.push(a);
        }
        // One line per refused address; when all were, the last one is the fatal line.
        let last = if out.is_empty() { refusals.pop() } else { None };
        for (a, why) in &refusals {
            diag::warn(&format!("target {}: not connecting to {a}: {why}", t.shown));
        }
        if !out.is_empty() {
            return out;
        }
        if let Some((_, why)) = last {
            self.fail(
                Failure::NotAllowed,
                exit::POLICY,
                &format!(
                    "unable to connect to {}: target not allowed: {why}",
                    t.shown
                ),
            );
        }
        let what = match (self.cfg.family, source) {
            (Family::V4, _) => "IPv4 address",
            (Family::V6, _) => "IPv6 address",
            (Family::Any, Some(s)) if s.is_ipv4() => "IPv4 address",
            (Family::Any, Some(_)) => "IPv6 address",
            (Family::Any, None) => "IP address",
        };
        self.fail(
            Failure::HostUnreachable,
            exit::TEMP,
            &format!("unable to connect to {}: no {what} for {}", t.shown, t.host),
        )
    }

    /// Connects to one of `addrs`, or exits with the failure of the last attempt.
    fn connect(
        &self,
        t: &Target,
        addrs: &[SocketAddr],
        source: Option<SocketAddr>,
    ) -> (OwnedFd, SocketAddr) {
        let opts = connect::Options {
            timeout: self.cfg.timeout,
            nodelay: self.cfg.nodelay,
            keepalive: self.cfg.keepalive,
            source,
        };
        let (conn, failed) = connect_any(&opts, addrs);
        if let Some((sock, peer)) = conn {
            for (a, e) in &failed {
                diag::warn(&format!(
                    "unable to connect to {a}: {}; connected to {peer} instead",
                    why(self.cfg, e)
                ));
            }
            return (sock, peer);
        }
        let Some(((a, e), earlier)) = failed.split_last() else {
            self.fail(
                Failure::General,
                exit::TEMP,
                "unable to connect: no attempt made",
            );
        };
        for (a, e) in earlier {
            diag::warn(&format!("unable to connect to {a}: {}", why(self.cfg, e)));
        }
        let f = Failure::from_io(e);
        let target = if a.to_string() == t.shown {
            t.shown.clone()
        } else {
            format!("{} ({a})", t.shown)
        };
        self.fail(
            f,
            f.exit_code(),
            &format!("unable to connect to {target}: {}", why(self.cfg, e)),
        )
    }

    /// Sends the PROXY header, puts the connection on fds 6 and 7, sets the environment
    /// and answers the client; the caller then execs the next program (`chain::exec`,
    /// from a frame of its own: see `connect_target`). `accepted`: the connection is a
    /// BIND's, from that peer, which the reply names (and no PROXY header is sent).
    /// `nonblocking`: the socket is as `sys::tcp_socket` made it, O_NONBLOCK and no
    /// other status flag; otherwise blocking.
    pub(super) fn hand_over(
        &self,
        sock: OwnedFd,
        peer: SocketAddr,
        client: Option<SocketAddr>,
        client_local: Option<SocketAddr>,
        accepted: Option<SocketAddr>,
        nonblocking: bool,
    ) {
        let fd = sock.as_raw_fd();
        // The next program gets the blocking socket DESIGN.md promises, but for a
        // tcpsplice continuing in this process, which would only set O_NONBLOCK again
        // first thing: the socket is then left as it is (and said so, so that the relay
        // asks nothing of it, and a real exec after all still gets it blocking). Not when
        // we write to it first, which wants it blocking.
        let keep_nonblocking = nonblocking
            && self.cfg.proxy.is_none()
            && self.style != Some(Style::HttpForward)
            && self.cfg.prog.first().and_then(|p| chain::continues_as(p)) == Some("tcpsplice");
        if nonblocking && !keep_nonblocking {
            // Nothing to read first: see `nonblocking`.
            if let Err(e) = sys::set_fl(fd, libc::O_RDWR) {
                self.fail(
                    Failure::General,
                    exit::TEMP,
                    &format!(
                        "unable to use the connection to {peer}: {}",
                        sys::strerror(&e)
                    ),
                );
            }
        }
        if let Some(v) = self.cfg.proxy.filter(|_| accepted.is_none()) {
            let header = if v == 1 {
                proxyproto::v1(client, client_local)
            } else {
                proxyproto::v2(client, client_local)
            };
            if let Err(e) = sys::write_all(fd, &header) {
                self.fail(
                    Failure::General,
                    exit::TEMP,
                    &format!(
                        "unable to send the PROXY header to {peer}: {}",
                        sys::strerror(&e)
                    ),
                );
            }
        }
        if self.style == Some(Style::HttpForward) {
            if let Err(e) = super::forward::send_head(fd) {
                self.fail(
                    Failure::General,
                    exit::TEMP,
                    &format!(
                        "unable to send the request head to {peer}: {}",
                        sys::strerror(&e)
                    ),
                );
            }
        } else {
            super::forward::clear_env();
        }
        let local = sys::local_addr(fd).ok().flatten();
        let fd = sock.into_raw_fd();
        // Like tcpclient: read on 6, write on 7, both the one socket, both kept across
        // exec. fd_move(n, n) clears close-on-exec where dup2 would not.
        let moved = if fd == 7 {
            sys::fd_move(7, 7).and_then(|()| sys::fd_copy(6, 7))
        } else {
            sys::fd_move(6, fd).and_then(|()| sys::fd_copy(7, 6))
        };
        if let Err(e) = moved {
            self.fail(
                Failure::General,
                exit::TEMP,
                &format!(
                    "unable to move the connection to fds 6 and 7: {}",
                    sys::strerror(&e)
                ),
            );
        }
        if keep_nonblocking {
            chain::private_nonblocking_fds(&[6, 7]);
        } else {
            chain::private_fds(&[6, 7]);
        }
        if let Some(l) = local {
            conninfo::set_ucspi(&l, &peer);
        }
        // They described the client; a stale value would now be read as the target's.
        for v in ["TCPLOCALHOST", "TCPREMOTEHOST", "TCPREMOTEINFO"] {
            environ::remove_var(v);
        }
        if let Some(style) = self.style {
            if let Err(e) = sys::write_all(1, &reply::success(style, accepted.or(local))) {
                diag::die_sys(exit::TEMP, "send the reply to the client", &e);
            }
        }
        environ::remove_var(REPLY_VAR);
        // Every descriptor this link opened is closed by now but the connection, which
        // is on 6 and 7 without close-on-exec: a sibling continuing in this process
        // need not look through the descriptor table for what an exec would close.
        chain::nothing_to_close();
    }
}

/// Does the whole job and execs `cfg.prog`; returns only what [`chain::exec`] returns.
pub fn run(cfg: &Config) -> i32 {
    match connect_target(cfg) {
        Some(code) => code,
        None => chain::exec(&cfg.prog),
    }
}

/// All of [`run`] but the exec: None once the connection is handed over, the status of
/// a BIND's next program otherwise. Never inlined, so that the connect's locals are off
/// the stack while the next program runs in this process (see `splice::options`).
#[inline(never)]
fn connect_target(cfg: &Config) -> Option<i32> {
    let style = match environ::with_var(REPLY_VAR, |v| {
        Style::parse(v.and_then(OsStr::to_str).unwrap_or_default())
    }) {
        Ok(s) => s,
        Err(e) => diag::die(exit::USAGE, &e),
    };
    let d = Dial { cfg, style };
    let (client, client_local) = save_client();
    // exec keeps our pid, so LISTEN_PID would still name the programs after us.
    for v in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        environ::remove_var(v);
    }
    match d.command() {
        Command::Connect => {}
        Command::Bind => return Some(super::bind::run(&d, client, client_local)),
        Command::Udp => super::udp::start(&d, client),
    }
    let target = d.target(Command::Connect);
    let source = d.source(client_local);
    let addrs = d.candidates(&target, source);
    let (sock, peer) = d.connect(&target, &addrs, source);
    d.hand_over(sock, peer, client, client_local, None, true);
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn addresses_joined_from_the_environment_as_join_host_port_joins_them() {
        let long6 = "fe80:1234:5678:9abc:def0:1234:5678:9abc%eth0-with-a-long-name";
        let cases = [
            ("127.0.0.1", "80"),
            ("::1", "65535"),
            ("::ffff:192.0.2.1", "1"),
            (long6, "8080"),
            (&long6[..40], "1"),
            ("x", &"9".repeat(70)[..]),
            (&"1".repeat(63)[..], "2"),
            (&"1".repeat(61)[..], "2"),
            (&"1".repeat(60)[..], &"3".repeat(64)[..]),
            (&"1".repeat(200)[..], "2"),
        ];
        for (ip, port) in cases {
            environ::set_var("TCPSPLICE_T_JOIN_IP", ip);
            environ::set_var("TCPSPLICE_T_JOIN_PORT", port);
            let got = conninfo::joined("TCPSPLICE_T_JOIN_IP", "TCPSPLICE_T_JOIN_PORT");
            assert_eq!(
                got.as_deref(),
                Some(conninfo::join_host_port(ip, port).as_str()),
                "{ip} {port}"
            );
        }
        // Not text, in either place, whole or split by the join.
        for (ip, port) in [
            (&b"1.2\xff"[..], &b"80"[..]),
            (b"\xce", b"\x80"),
            (b"::1", b"\xff"),
        ] {
            environ::set_var("TCPSPLICE_T_JOIN_IP", OsStr::from_bytes(ip));
            environ::set_var("TCPSPLICE_T_JOIN_PORT", OsStr::from_bytes(port));
            let got = conninfo::joined("TCPSPLICE_T_JOIN_IP", "TCPSPLICE_T_JOIN_PORT");
            assert_eq!(got, None, "{ip:?} {port:?}");
        }
        environ::set_var("TCPSPLICE_T_JOIN_PORT", "");
        assert_eq!(
            conninfo::joined("TCPSPLICE_T_JOIN_IP", "TCPSPLICE_T_JOIN_PORT"),
            None
        );
        environ::remove_var("TCPSPLICE_T_JOIN_IP");
        environ::remove_var("TCPSPLICE_T_JOIN_PORT");
    }

    #[test]
    fn targets() {
        assert_eq!(split_target("[::1]:22"), Ok(("::1".into(), 22)));
        assert_eq!(
            split_target("db.internal:5432"),
            Ok(("db.internal".into(), 5432))
        );
        assert!(split_target("::1:22").is_err());
        assert!(split_target("a b:22").is_err());
        assert!(split_target("host:0").is_err());
        assert!(split_target("host").is_err());
        assert_eq!(
            split_target("[fe80::1%eth0]:22"),
            Ok(("fe80::1%eth0".into(), 22))
        );
        assert!(split_target("[fe80::1%et h0]:22").is_err());
        assert!(split_target("[1.2.3.4%eth0]:22").is_err());
    }
}
