//! tcpsplice-dial's work: resolve the target, check client-chosen addresses against the
//! rules, connect with a bound, put the connection on fds 6 and 7, describe it in the
//! UCSPI variables (keeping the client in `TCPSPLICE_CLIENT`), answer a waiting SOCKS or
//! HTTP client, and exec the next program.

use std::ffi::OsString;
use std::io;
use std::mem::size_of;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::io::RawFd;
use std::time::{Duration, Instant};

use crate::reply::{self, Failure, Style};
use crate::rules::{self, Policy, Rule};
use crate::{chain, conninfo, diag, exit, proxyproto, sys};

/// The variable naming a client-chosen target, `host:port` or `[v6addr]:port`.
pub const TARGET_VAR: &str = "TCPSPLICE_TARGET";
/// The variable naming the reply a client waits for.
pub const REPLY_VAR: &str = "TCPSPLICE_REPLY";
/// The variable carrying the user's own target rules.
pub const RULES_VAR: &str = "TCPSPLICE_RULES";

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
}

/// Parses a port number (1 to 65535).
pub fn parse_port(s: &str) -> Option<u16> {
    s.parse::<u16>().ok().filter(|&p| p > 0)
}

/// Splits `host:port` or `[v6addr]:port`.
pub fn split_target(s: &str) -> Result<(String, u16), String> {
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
    let port = parse_port(port).ok_or_else(|| format!("not a port from 1 to 65535: {port}"))?;
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

/// Resolves `host` with getaddrinfo, bounded by `limit`: the lookup runs on a thread so
/// that a stuck resolver cannot hold the client past the connect timeout.
fn resolve(host: &str, port: u16, limit: Duration) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let name = host.to_string();
    std::thread::spawn(move || {
        let r = (name.as_str(), port)
            .to_socket_addrs()
            .map(|it| it.collect::<Vec<_>>());
        let _ = tx.send(r);
    });
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the name lookup timed out",
        )),
    }
}

/// This host's addresses, from getifaddrs(3): a client-chosen target must not be the
/// proxy itself under one of its public addresses.
pub fn own_addresses() -> io::Result<Vec<IpAddr>> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a pointer to a list it allocated into `ifap`.
    sys::cvt(unsafe { libc::getifaddrs(&mut ifap) })?;
    let mut out = Vec::new();
    let mut p = ifap;
    while !p.is_null() {
        // SAFETY: p is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*p };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family field is valid.
            let family = libc::c_int::from(unsafe { (*ifa.ifa_addr).sa_family });
            let len = match family {
                libc::AF_INET => size_of::<libc::sockaddr_in>(),
                libc::AF_INET6 => size_of::<libc::sockaddr_in6>(),
                _ => 0,
            };
            if len > 0 {
                // SAFETY: all-zero is a valid sockaddr_storage.
                let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
                // SAFETY: the family says ifa_addr holds `len` bytes, and
                // sockaddr_storage is larger than either sockaddr.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        ifa.ifa_addr.cast::<u8>(),
                        (&mut ss as *mut libc::sockaddr_storage).cast::<u8>(),
                        len,
                    )
                };
                if let Some(a) = sys::sockaddr_to_std(&ss) {
                    out.push(a.ip());
                }
            }
        }
        p = ifa.ifa_next;
    }
    // SAFETY: ifap came from getifaddrs and is freed once; no reference into it remains.
    unsafe { libc::freeifaddrs(ifap) };
    Ok(out)
}

fn socket(addr: &SocketAddr) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let ty = libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
    // SAFETY: socket takes three integers.
    let fd = sys::cvt(unsafe { libc::socket(domain, ty, 0) })?;
    // SAFETY: fd is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind(fd: RawFd, addr: &SocketAddr) -> io::Result<()> {
    let (ss, len) = sys::std_to_sockaddr(addr);
    // SAFETY: we pass a sockaddr we own and its length.
    sys::cvt(unsafe { libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len) })
        .map(drop)
}

fn connect_start(fd: RawFd, addr: &SocketAddr) -> io::Result<()> {
    let (ss, len) = sys::std_to_sockaddr(addr);
    // SAFETY: we pass a sockaddr we own and its length.
    sys::cvt(unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_storage).cast(), len) })
        .map(drop)
}

/// One connection attempt: a non-blocking connect that poll bounds by `limit`. Returns
/// the connected socket, back in blocking mode for the programs after us.
fn connect_one(cfg: &Config, addr: &SocketAddr, source: Option<SocketAddr>) -> io::Result<OwnedFd> {
    let sock = socket(addr)?;
    let fd = sock.as_raw_fd();
    if cfg.nodelay {
        sys::setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    }
    if cfg.keepalive {
        sys::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    }
    if let Some(src) = source {
        if src.port() == 0 {
            // Choose the port at connect time, not bind time, so that many connections
            // from one source address do not run out of ports. Best effort: old kernels.
            let _ = sys::setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1);
        } else {
            sys::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        }
        bind(fd, &src)?;
    }
    match connect_start(fd, addr) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            let deadline = Instant::now() + cfg.timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT));
                }
                let mut p = [libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                }];
                if sys::poll(&mut p, Some(left))? > 0 {
                    break;
                }
            }
            if let Some(e) = sys::socket_error(fd) {
                return Err(e);
            }
        }
        Err(e) => return Err(e),
    }
    sys::set_nonblocking(fd, false)?;
    Ok(sock)
}

/// The client's address and the address it connected to, saved before the `TCP*`
/// variables are rewritten: `TCPSPLICE_CLIENT` keeps the client for the programs after
/// us. Under inetd, xinetd and systemd nothing set them, so they come from fd 0.
fn save_client() -> (Option<SocketAddr>, Option<SocketAddr>) {
    conninfo::fill_from_socket(0);
    let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
    if var(conninfo::CLIENT_VAR).is_none() {
        // `-` when no one knows (a shell pipeline): left unset, the log line of the
        // splicer would take the upstream address we are about to set for the client's.
        let client = match (var("TCPREMOTEIP"), var("TCPREMOTEPORT")) {
            (Some(ip), Some(port)) => conninfo::join_host_port(&ip, &port),
            _ => "-".to_string(),
        };
        std::env::set_var(conninfo::CLIENT_VAR, client);
    }
    let client = var(conninfo::CLIENT_VAR).and_then(|s| proxyproto::parse_addr(&s));
    let local = match (var("TCPLOCALIP"), var("TCPLOCALPORT")) {
        (Some(ip), Some(port)) => proxyproto::parse_addr(&conninfo::join_host_port(&ip, &port)),
        _ => None,
    };
    (client, local)
}

/// Ends the connection with the failure reply the client waits for, if it waits for one,
/// then logs and exits.
fn fail(style: Option<Style>, f: Failure, code: i32, msg: &str) -> ! {
    if let Some(style) = style {
        if sys::write_all(1, &reply::failure(style, f)).is_ok() {
            linger();
        }
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

fn family_name(a: &SocketAddr) -> &'static str {
    if a.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// Does the whole job and execs `cfg.prog`; never returns.
pub fn run(cfg: &Config) -> ! {
    let style = match Style::parse(&std::env::var(REPLY_VAR).unwrap_or_default()) {
        Ok(s) => s,
        Err(e) => diag::die(exit::USAGE, &e),
    };
    let usage_fail = |msg: &str| -> ! { fail(style, Failure::General, exit::USAGE, msg) };
    let (client, client_local) = save_client();
    // exec keeps our pid, so LISTEN_PID would still name the programs after us.
    for v in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        std::env::remove_var(v);
    }

    let (host, port, trusted) = match &cfg.fixed {
        Some((h, p)) => (h.clone(), *p, true),
        None => {
            let t = std::env::var(TARGET_VAR).unwrap_or_default();
            match split_target(&t) {
                Ok((h, p)) => (h, p, false),
                Err(e) => usage_fail(&format!("unable to use {TARGET_VAR} {t:?}: {e}")),
            }
        }
    };
    let shown = conninfo::join_host_port(&host, &port.to_string());

    let user_rules = match std::env::var(RULES_VAR) {
        Ok(s) if !s.trim().is_empty() && !trusted => match rules::parse_list(&s) {
            Ok(r) => Some(r),
            Err(e) => usage_fail(&format!("unable to use {RULES_VAR}: {e}")),
        },
        _ => None,
    };
    let own = if trusted {
        Vec::new()
    } else {
        match own_addresses() {
            Ok(o) => o,
            Err(e) => fail(
                style,
                Failure::General,
                exit::TEMP,
                &format!(
                    "unable to list this host's addresses: {}",
                    sys::strerror(&e)
                ),
            ),
        }
    };
    let policy = Policy {
        allow: &cfg.allow,
        user: user_rules.as_deref(),
        own: &own,
    };

    let source = match cfg.source {
        Source::Kernel => None,
        Source::Addr(a) => Some(a),
        Source::Auto => match client_local.or_else(|| sys::local_addr(0).ok().flatten()) {
            Some(a) => Some(SocketAddr::new(rules::canonical(a.ip()), 0)),
            None => usage_fail("unable to use -s auto: fd 0 is not a TCP connection"),
        },
    };

    let addrs = match resolve(&host, port, cfg.timeout) {
        Ok(a) => a,
        Err(e) => fail(
            style,
            Failure::HostUnreachable,
            exit::TEMP,
            &format!(
                "unable to find the IP address of {host}: {}",
                sys::strerror(&e)
            ),
        ),
    };
    let mut candidates = Vec::new();
    let mut refusals = Vec::new();
    for a in addrs {
        let a = SocketAddr::new(rules::canonical(a.ip()), a.port());
        let fam_ok = match cfg.family {
            Family::Any => true,
            Family::V4 => a.is_ipv4(),
            Family::V6 => a.is_ipv6(),
        };
        let src_ok = source.map_or(true, |s| s.is_ipv4() == a.is_ipv4());
        if !fam_ok || !src_ok || candidates.contains(&a) {
            continue;
        }
        if !trusted {
            if let Err(why) = policy.check(&a) {
                diag::warn(&format!("target {shown}: not connecting to {a}: {why}"));
                refusals.push(why);
                continue;
            }
        }
        candidates.push(a);
    }
    if candidates.is_empty() {
        if let Some(why) = refusals.first() {
            fail(
                style,
                Failure::NotAllowed,
                exit::POLICY,
                &format!("unable to connect to {shown}: target not allowed: {why}"),
            );
        }
        let what = match (cfg.family, source) {
            (Family::V4, _) => "IPv4 address".to_string(),
            (Family::V6, _) => "IPv6 address".to_string(),
            (Family::Any, Some(s)) => format!("{} address", family_name(&s)),
            (Family::Any, None) => "IP address".to_string(),
        };
        fail(
            style,
            Failure::HostUnreachable,
            exit::TEMP,
            &format!("unable to connect to {shown}: no {what} for {host}"),
        );
    }

    let mut last: Option<(SocketAddr, io::Error)> = None;
    let mut conn = None;
    for (i, a) in candidates.iter().enumerate() {
        match connect_one(cfg, a, source) {
            Ok(s) => {
                conn = Some((s, *a));
                break;
            }
            Err(e) => {
                if i + 1 < candidates.len() {
                    diag::warn(&format!(
                        "unable to connect to {a}: {}; trying the next address",
                        sys::strerror(&e)
                    ));
                }
                last = Some((*a, e));
            }
        }
    }
    let Some((sock, peer)) = conn else {
        let (a, e) = last.unwrap_or_else(|| {
            (
                candidates[0],
                io::Error::from_raw_os_error(libc::EHOSTUNREACH),
            )
        });
        let f = Failure::from_io(&e);
        let why = if f == Failure::Timeout {
            format!("timed out after {:?}", cfg.timeout)
        } else {
            sys::strerror(&e)
        };
        let target = if a.to_string() == shown {
            shown.clone()
        } else {
            format!("{shown} ({a})")
        };
        fail(
            style,
            f,
            f.exit_code(),
            &format!("unable to connect to {target}: {why}"),
        );
    };

    let fd = sock.as_raw_fd();
    if let Some(v) = cfg.proxy {
        let header = if v == 1 {
            proxyproto::v1(client, client_local)
        } else {
            proxyproto::v2(client, client_local)
        };
        if let Err(e) = sys::write_all(fd, &header) {
            fail(
                style,
                Failure::General,
                exit::TEMP,
                &format!(
                    "unable to send the PROXY header to {peer}: {}",
                    sys::strerror(&e)
                ),
            );
        }
    }
    let local = sys::local_addr(fd).ok().flatten();
    let fd = sock.into_raw_fd();
    // Like tcpclient: read on 6, write on 7, both the one socket, both kept across exec.
    let moved = if fd == 7 {
        sys::fd_move(7, 7).and_then(|()| sys::fd_copy(6, 7))
    } else {
        sys::fd_move(6, fd).and_then(|()| sys::fd_copy(7, 6))
    };
    if let Err(e) = moved {
        fail(
            style,
            Failure::General,
            exit::TEMP,
            &format!(
                "unable to move the connection to fds 6 and 7: {}",
                sys::strerror(&e)
            ),
        );
    }
    if let Some(l) = local {
        conninfo::set_ucspi(&l, &peer);
    }
    // They described the client; a stale value would now be read as the target's.
    for v in ["TCPLOCALHOST", "TCPREMOTEHOST", "TCPREMOTEINFO"] {
        std::env::remove_var(v);
    }
    if let Some(style) = style {
        if let Err(e) = sys::write_all(1, &reply::success(style, local)) {
            diag::die_sys(exit::TEMP, "send the reply to the client", &e);
        }
    }
    std::env::remove_var(REPLY_VAR);
    chain::exec(&cfg.prog)
}
