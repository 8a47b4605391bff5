//! Connecting: name lookup with a bound, this host's addresses (those its routing table
//! delivers locally), and Happy Eyeballs over every address of a target with
//! non-blocking connects that poll bounds.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::sys;

/// How each connection is made.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Bounds each attempt.
    pub timeout: Duration,
    pub nodelay: bool,
    pub keepalive: bool,
    /// Bind to this address first (port 0 = any port).
    pub source: Option<SocketAddr>,
}

/// Resolves `host` with getaddrinfo, bounded by `limit`: the lookup runs on a thread so
/// that a stuck resolver cannot hold the client past the connect timeout.
pub fn resolve(host: &str, port: u16, limit: Duration) -> io::Result<Vec<SocketAddr>> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let name = host.to_string();
    std::thread::Builder::new().spawn(move || {
        let r = (name.as_str(), port)
            .to_socket_addrs()
            .map(|it| it.collect::<Vec<_>>());
        let _ = tx.send(r);
    })?;
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the name lookup timed out",
        )),
    }
}

/// Whether the routing table delivers `addr` to this host: a route of type local (an
/// address of one of its interfaces, or a whole prefix routed to it without one,
/// `ip route add local 203.0.113.0/24 dev lo`), broadcast or
/// anycast. Asked before anything connects, so that a listener on such an address never
/// sees the connection: one RTM_GETROUTE request on a netlink socket, the lookup
/// `ip route get ADDR` makes, tens of microseconds. The route's type is the answer
/// itself; a UDP connect() and getsockname() would only give the source address the
/// kernel picks, which equals the target on a local route only for IPv4 and only
/// without a preferred source (`src`). No route at all (unreachable, prohibited) is
/// not this host: connect() then fails the same way.
///
/// `from`, the source address the connection will be bound to (`-s`), is asked with
/// (RTA_SRC, as `ip route get ADDR from SRC`): a rule that picks a table by source
/// (`ip rule add from SRC lookup T`) can make an address local for that source only,
/// and the connect would follow it. One of the other family is left out (it is never
/// used for this address).
pub fn routes_to_this_host(addr: &SocketAddr, from: Option<IpAddr>) -> io::Result<bool> {
    const NLMSG_HDR: usize = 16;
    let (family, dst, oif) = match addr {
        SocketAddr::V4(a) => (libc::AF_INET, a.ip().octets().to_vec(), 0),
        SocketAddr::V6(a) => (libc::AF_INET6, a.ip().octets().to_vec(), a.scope_id()),
    };
    let src = match (addr, from) {
        (SocketAddr::V4(_), Some(IpAddr::V4(s))) if !s.is_unspecified() => s.octets().to_vec(),
        (SocketAddr::V6(_), Some(IpAddr::V6(s))) if !s.is_unspecified() => s.octets().to_vec(),
        _ => Vec::new(),
    };
    // struct nlmsghdr, struct rtmsg, then RTA_DST (and RTA_SRC for a bound source,
    // RTA_OIF for a scoped address), each attribute 4 + its data, in 4-byte units.
    let mut req = Vec::with_capacity(64);
    req.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set below
    req.extend_from_slice(&libc::RTM_GETROUTE.to_ne_bytes());
    req.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // nlmsg_seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel
                                                // rtm_family, rtm_dst_len, rtm_src_len, then tos, table, protocol, scope, type.
    let prefix = |a: &[u8]| (a.len() * 8) as u8;
    req.extend_from_slice(&[family as u8, prefix(&dst), prefix(&src), 0, 0, 0, 0, 0]);
    req.extend_from_slice(&0u32.to_ne_bytes()); // rtm_flags
    let mut attr = |kind: u16, data: &[u8]| {
        req.extend_from_slice(&(4 + data.len() as u16).to_ne_bytes());
        req.extend_from_slice(&kind.to_ne_bytes());
        req.extend_from_slice(data);
    };
    attr(libc::RTA_DST, &dst);
    if !src.is_empty() {
        attr(libc::RTA_SRC, &src);
    }
    if oif != 0 {
        attr(libc::RTA_OIF, &oif.to_ne_bytes());
    }
    let len = req.len() as u32;
    req[..4].copy_from_slice(&len.to_ne_bytes());

    let sock = sys::netlink_route_socket()?;
    let fd = sock.as_raw_fd();
    // An unbound netlink socket sends to the kernel, which answers before send returns;
    // the poll only bounds a kernel that would not.
    sys::send(fd, &req, 0)?;
    let mut buf = [0u8; 4096];
    let mut p = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    if sys::poll(&mut p, Some(Duration::from_secs(1)))? == 0 {
        return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT));
    }
    let n = sys::recv(fd, &mut buf, 0)?;
    let msg = &buf[..n];
    let u16_at = |i: usize| msg.get(i..i + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let i32_at = |i: usize| {
        msg.get(i..i + 4)
            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unexpected netlink answer");
    match u16_at(4).ok_or_else(bad)? {
        t if t == libc::RTM_NEWROUTE => {
            // rtm_type, the last byte of struct rtmsg before its flags.
            let kind = *msg.get(NLMSG_HDR + 7).ok_or_else(bad)?;
            Ok(matches!(
                kind,
                libc::RTN_LOCAL | libc::RTN_BROADCAST | libc::RTN_ANYCAST
            ))
        }
        // The errors of a lookup that found no way out (none, unreachable, blackhole,
        // prohibit, throw): anything else would be a request the kernel did not take.
        t if i32::from(t) == libc::NLMSG_ERROR => match -i32_at(NLMSG_HDR).ok_or_else(bad)? {
            libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EINVAL | libc::EACCES | libc::EAGAIN => {
                Ok(false)
            }
            0 => Err(bad()),
            e => Err(io::Error::from_raw_os_error(e)),
        },
        _ => Err(bad()),
    }
}

/// How long an attempt has alone before the next address is tried beside it (RFC 8305's
/// "Connection Attempt Delay"): an address that silently drops SYNs (a broken IPv6
/// route) then costs a quarter second, not the whole timeout.
const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Starts a non-blocking connection to `addr`: Ok(true) connected at once, Ok(false) in
/// progress.
fn start(opts: &Options, addr: &SocketAddr) -> io::Result<(OwnedFd, bool)> {
    let sock = sys::tcp_socket(addr)?;
    let fd = sock.as_raw_fd();
    if opts.nodelay {
        sys::setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    }
    if opts.keepalive {
        sys::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    }
    if let Some(src) = opts.source {
        if src.port() == 0 {
            // Choose the port at connect time, not bind time, so that many connections
            // from one source address do not run out of ports. Best effort: old kernels.
            let _ = sys::setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1);
        } else {
            sys::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        }
        sys::bind(fd, &src)?;
    }
    match sys::connect(fd, addr) {
        Ok(()) => Ok((sock, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok((sock, false)),
        Err(e) => Err(e),
    }
}

/// The addresses in the order to try them: families alternating, starting with the
/// family of the resolver's first choice (RFC 8305, section 4), each family in the
/// resolver's order.
fn interleave(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let Some(first) = addrs.first() else {
        return Vec::new();
    };
    let (mut a, mut b): (Vec<SocketAddr>, Vec<SocketAddr>) =
        addrs.iter().partition(|x| x.is_ipv4() == first.is_ipv4());
    a.reverse();
    b.reverse();
    let mut out = Vec::with_capacity(addrs.len());
    while !a.is_empty() || !b.is_empty() {
        out.extend(a.pop());
        out.extend(b.pop());
    }
    out
}

struct Attempt {
    sock: OwnedFd,
    addr: SocketAddr,
    deadline: Instant,
}

/// Connects to the first of `addrs` that answers, Happy Eyeballs style: attempts start
/// `ATTEMPT_DELAY` apart (at once when the previous one failed) and run side by side,
/// each bounded by `opts.timeout`. Returns the connected socket, still non-blocking as
/// `sys::tcp_socket` made it (the caller decides its mode for the programs after us), and
/// every failed attempt in the order they failed; or, when none connected, only the
/// failures (never empty).
#[allow(clippy::type_complexity)]
pub fn connect_any(
    opts: &Options,
    addrs: &[SocketAddr],
) -> (Option<(OwnedFd, SocketAddr)>, Vec<(SocketAddr, io::Error)>) {
    let order = interleave(addrs);
    let mut next = 0;
    let mut pending: Vec<Attempt> = Vec::new();
    let mut failed = Vec::new();
    let mut next_start = Instant::now();
    loop {
        let now = Instant::now();
        if next < order.len() && (pending.is_empty() || now >= next_start) {
            let addr = order[next];
            next += 1;
            match start(opts, &addr) {
                Ok((sock, true)) => return (Some((sock, addr)), failed),
                Ok((sock, false)) => {
                    pending.push(Attempt {
                        sock,
                        addr,
                        deadline: now + opts.timeout,
                    });
                    next_start = now + ATTEMPT_DELAY;
                }
                Err(e) => failed.push((addr, e)),
            }
            continue;
        }
        if pending.is_empty() {
            if failed.is_empty() {
                failed.push((
                    SocketAddr::from(([0, 0, 0, 0], 0)),
                    io::Error::from_raw_os_error(libc::EHOSTUNREACH),
                ));
            }
            return (None, failed);
        }
        let mut wake = pending.iter().map(|p| p.deadline).min().unwrap_or(now);
        if next < order.len() {
            wake = wake.min(next_start);
        }
        let mut fds: Vec<libc::pollfd> = pending
            .iter()
            .map(|p| libc::pollfd {
                fd: p.sock.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            })
            .collect();
        if let Err(e) = sys::poll(&mut fds, Some(wake.saturating_duration_since(now))) {
            for p in pending.drain(..) {
                failed.push((p.addr, io::Error::new(e.kind(), e.to_string())));
            }
            continue;
        }
        let now = Instant::now();
        let mut i = 0;
        let mut freed = false;
        for pfd in &fds {
            let ready = pfd.revents != 0;
            let result = if ready && pfd.revents & (libc::POLLERR | libc::POLLHUP) == 0 {
                // Writable without an error or a hang-up: Linux's tcp_poll says POLLOUT
                // only once the handshake is done (never in SYN_SENT), and a failed
                // attempt always comes with POLLERR (and POLLHUP): connected, and
                // SO_ERROR would say 0. An error that comes later is the relay's.
                Ok(())
            } else if ready {
                match sys::socket_error(pfd.fd) {
                    None => Ok(()),
                    Some(e) => Err(e),
                }
            } else if now >= pending[i].deadline {
                Err(io::Error::from_raw_os_error(libc::ETIMEDOUT))
            } else {
                i += 1;
                continue;
            };
            let p = pending.remove(i);
            match result {
                Ok(()) => return (Some((p.sock, p.addr)), failed),
                Err(e) => {
                    failed.push((p.addr, e));
                    freed = true;
                }
            }
        }
        if freed {
            // A failure frees the slot: the next address need not wait out the delay.
            next_start = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_the_routing_table_which_addresses_are_this_hosts() {
        let local = |s: &str| routes_to_this_host(&s.parse().unwrap(), None).unwrap();
        assert!(local("127.0.0.1:1"));
        assert!(local("127.1.2.3:1"));
        assert!(local("[::1]:1"));
        for ip in sys::interface_addresses().unwrap() {
            // Link-local ones would need their interface.
            let scoped = matches!(ip, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80);
            if !scoped {
                assert!(local(&SocketAddr::new(ip, 1).to_string()), "{ip}");
            }
        }
        assert!(!local("192.0.2.1:1"));
        assert!(!local("[2001:db8::1]:1"));
    }

    #[test]
    fn alternates_families() {
        let a: Vec<SocketAddr> = ["[::1]:1", "[::2]:1", "[::3]:1", "1.0.0.1:1", "1.0.0.2:1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let order: Vec<String> = interleave(&a).iter().map(|s| s.to_string()).collect();
        assert_eq!(
            order,
            ["[::1]:1", "1.0.0.1:1", "[::2]:1", "1.0.0.2:1", "[::3]:1"]
        );
    }
}
