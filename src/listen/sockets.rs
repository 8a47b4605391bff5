//! The listening sockets of tcpsplice-listen: bound here from HOST PORT, or handed over
//! by systemd socket activation (`LISTEN_FDS`, `Accept=no`). Every listening socket is
//! non-blocking (the supervisor polls it) and close-on-exec (no child ever holds it, so
//! closing it really refuses new connections).

use std::ffi::CString;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::io::{IntoRawFd, RawFd};

use crate::{environ, exit, sys};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const SD_LISTEN_FDS_START: RawFd = 3;

/// The variables of the activation protocol; whoever consumes the sockets unsets them,
/// since exec keeps the pid and every later link would otherwise believe them.
pub const ACTIVATION_VARS: [&str; 3] = ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];

/// A failure with the exit code it deserves and the message that explains it.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub msg: String,
}

impl Failure {
    fn new(code: i32, msg: String) -> Failure {
        Failure { code, msg }
    }
}

/// The address to bind for HOST, port 0: an IP literal as is (brackets allowed around
/// IPv6), a name through getaddrinfo, whose first IP address wins. A link-local IPv6
/// literal with its zone (`fe80::1%eth0`) goes through getaddrinfo too, which keeps it.
pub fn resolve(host: &str) -> Result<SocketAddr, Failure> {
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = literal.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 0));
    }
    let Ok(name) = CString::new(literal) else {
        return Err(Failure::new(
            exit::USAGE,
            "unable to resolve a host name containing a NUL byte".into(),
        ));
    };
    let found = sys::lookup_first(&name).map_err(|e| {
        // A DNS server that cannot be reached now may answer later; a name that does
        // not exist will not.
        let code = match e.code {
            libc::EAI_AGAIN | libc::EAI_SYSTEM | libc::EAI_MEMORY => exit::TEMP,
            _ => exit::USAGE,
        };
        Failure::new(code, format!("unable to resolve {host}: {}", e.text))
    })?;
    found.ok_or_else(|| Failure::new(exit::USAGE, format!("no IP address for {host}")))
}

/// Binds a listening TCP socket on `addr` with SO_REUSEADDR (so a restart does not wait
/// for old connections in TIME_WAIT). A port already in use or a shortage of resources
/// may go away: 111; a forbidden port or an address that is not ours will not: 100.
pub fn bind(addr: &SocketAddr, backlog: i32) -> Result<RawFd, Failure> {
    let fail = |what: &str, e: io::Error| {
        let code = match e.raw_os_error() {
            // EINVAL: an address bind cannot take at all (a link-local one without its
            // zone, say): as permanent as one that is not ours.
            Some(
                libc::EACCES
                | libc::EPERM
                | libc::EADDRNOTAVAIL
                | libc::EAFNOSUPPORT
                | libc::EINVAL,
            ) => exit::USAGE,
            _ => exit::TEMP,
        };
        Failure::new(
            code,
            format!("unable to {what} {addr}: {}", sys::strerror(&e)),
        )
    };
    let fd = sys::tcp_socket(addr)
        .map_err(|e| fail("create a socket for", e))?
        .into_raw_fd();
    let done = (|| {
        sys::setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)
            .map_err(|e| fail("set SO_REUSEADDR on", e))?;
        sys::bind(fd, addr).map_err(|e| fail("bind to", e))?;
        sys::listen(fd, backlog).map_err(|e| fail("listen on", e))?;
        Ok(())
    })();
    match done {
        Ok(()) => Ok(fd),
        Err(f) => {
            sys::close(fd);
            Err(f)
        }
    }
}

/// Whether systemd passed sockets to this very process: `LISTEN_PID` is our pid.
pub fn activation_is_ours() -> bool {
    let pid = environ::var("LISTEN_PID").ok();
    let me = nix::unistd::getpid().as_raw();
    pid.and_then(|p| p.parse::<libc::pid_t>().ok()) == Some(me)
}

/// The number of sockets systemd says it passed (0 when the variables are not ours).
fn activation_count() -> Result<RawFd, Failure> {
    if !activation_is_ours() {
        return Ok(0);
    }
    let n = environ::var("LISTEN_FDS").unwrap_or_default();
    n.parse::<RawFd>()
        .ok()
        .filter(|&n| (0..=4096).contains(&n))
        .ok_or_else(|| Failure::new(exit::USAGE, format!("LISTEN_FDS is not a count: {n:?}")))
}

/// Takes the listening sockets systemd passed (fds 3 onwards), checks that each one is a
/// listening stream socket (`Accept=no`), makes them non-blocking and close-on-exec.
pub fn from_systemd() -> Result<Vec<RawFd>, Failure> {
    let n = activation_count()?;
    if n == 0 {
        return Err(Failure::new(
            exit::USAGE,
            "HOST PORT are - - but systemd passed no socket to this process \
             (LISTEN_PID/LISTEN_FDS missing or not ours)"
                .into(),
        ));
    }
    let mut fds = Vec::new();
    for fd in SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + n {
        let stream = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE);
        let listening = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN);
        if stream.ok() != Some(libc::SOCK_STREAM) || listening.ok() != Some(1) {
            return Err(Failure::new(
                exit::USAGE,
                format!(
                    "fd {fd} from systemd is not a listening stream socket \
                     (the socket unit needs Accept=no and ListenStream=)"
                ),
            ));
        }
        let setup = sys::set_cloexec(fd, true).and_then(|()| sys::set_nonblocking(fd, true));
        if let Err(e) = setup {
            return Err(Failure::new(
                exit::TEMP,
                format!(
                    "unable to set up fd {fd} from systemd: {}",
                    sys::strerror(&e)
                ),
            ));
        }
        fds.push(fd);
    }
    Ok(fds)
}

/// Closes the sockets systemd passed when HOST PORT were given instead, so that no
/// child inherits them. Returns how many there were.
pub fn close_activation_fds() -> RawFd {
    let n = activation_count().unwrap_or(0);
    for fd in SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + n {
        sys::close(fd);
    }
    n
}

/// Removes the activation variables: the sockets are consumed, and a child (same or
/// another pid) must not believe it was passed any.
pub fn unset_activation_env() {
    for v in ACTIVATION_VARS {
        environ::remove_var(v);
    }
}

/// accept4 with close-on-exec: the new socket and the client's address. The new socket
/// is blocking, as the programs of the chain expect.
pub fn accept(fd: RawFd) -> io::Result<(RawFd, Option<SocketAddr>)> {
    sys::accept_cloexec(fd)
}

/// Whether an accept error is about that one connection only, gone before it could be
/// taken: Linux reports the new connection's pending network errors through accept
/// (accept(2), "Error handling"), and a firewall may refuse it. The next one may come.
pub fn connection_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::ENETDOWN
                | libc::EPROTO
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
                | libc::ECONNRESET
                | libc::ETIMEDOUT
                | libc::EPERM
        )
    )
}
