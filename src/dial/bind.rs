//! SOCKS5 BIND (`TCPSPLICE_COMMAND=bind`): instead of connecting to the target, listen
//! where the client reached us, tell the client where (first reply), accept one
//! connection from the address the client named (within `-b`), tell the client who
//! connected (second reply), and hand that connection over on fds 6/7 as for CONNECT.
//!
//! The named peer is a client-chosen target like any other: its addresses pass the
//! rules, the deny list and the user's rules first, and a connection from any other
//! address is reset (the wait goes on for the right one).

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::dialer::{Command, Dial};
use super::reply::{self, Failure, Style};
use crate::{chain, diag, exit, rules, sys};

/// A peer from a wrong address is reset; after this many the BIND fails.
const MAX_WRONG_PEERS: u32 = 64;

/// Does the whole BIND and execs the next program; returns only what it returns.
pub(super) fn run(d: &Dial, client: Option<SocketAddr>, client_local: Option<SocketAddr>) -> i32 {
    let local = match sys::local_addr(0) {
        Ok(Some(a)) => SocketAddr::new(rules::canonical(a.ip()), 0),
        _ => d.usage_fail("unable to serve BIND: fd 0 is not a TCP connection"),
    };
    let target = d.target(Command::Bind);
    // Only peers of the listener's family can reach it.
    let peers = d.candidates(&target, Some(local));
    let listener = TcpListener::bind(local)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .unwrap_or_else(|e| {
            d.fail(
                Failure::General,
                exit::TEMP,
                &format!("unable to listen at {local}: {}", sys::strerror(&e)),
            )
        });
    let bound = listener.local_addr().unwrap_or(local);
    let shown = SocketAddr::new(d.cfg.advertise.unwrap_or(bound.ip()), bound.port());
    if let Err(e) = sys::write_all(1, &reply::success(Style::Socks5, Some(shown))) {
        diag::die_sys(exit::POLICY, "send the first reply to the client", &e);
    }
    let (sock, peer) = accept_from(d, &listener, &peers, &target.shown);
    // Before the next program runs, perhaps in this process: nothing of ours may stay.
    drop(listener);
    let fd = sock.as_raw_fd();
    if let Err(e) = sys::set_nonblocking(fd, false) {
        d.fail(
            Failure::General,
            exit::TEMP,
            &format!(
                "unable to use the connection from {peer}: {}",
                sys::strerror(&e)
            ),
        );
    }
    for (on, opt, level) in [
        (d.cfg.nodelay, libc::TCP_NODELAY, libc::IPPROTO_TCP),
        (d.cfg.keepalive, libc::SO_KEEPALIVE, libc::SOL_SOCKET),
    ] {
        if on {
            let _ = sys::setsockopt_int(fd, level, opt, 1);
        }
    }
    diag::info(&format!(
        "bind: {peer} connected to {bound} for {}",
        target.shown
    ));
    d.hand_over(sock, peer, client, client_local, Some(peer), false);
    chain::exec(&d.cfg.prog)
}

/// Whether the client on fd 0, which poll found readable, has closed or reset its
/// connection, rather than sent bytes (which are left where they are, for the peer).
fn client_left() -> bool {
    let mut b = [0u8; 1];
    match sys::recv(0, &mut b, libc::MSG_PEEK | libc::MSG_DONTWAIT) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ),
    }
}

/// Waits for a connection from one of `peers`' addresses (any port), resetting any
/// other; fails with the second reply at the deadline, and exits without one when the
/// client closes its connection first.
fn accept_from(
    d: &Dial,
    l: &TcpListener,
    peers: &[SocketAddr],
    shown: &str,
) -> (OwnedFd, SocketAddr) {
    let deadline = Instant::now() + d.cfg.bind_timeout;
    let mut wrong = 0;
    // Whether to watch the client for its end of file: not once it has sent bytes,
    // which are for the peer and stay unread (fd 0 would then be readable for ever);
    // such a client's leaving is noticed at the deadline.
    let mut watch_client = true;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            d.fail(
                Failure::Timeout,
                exit::TEMP,
                &format!(
                    "unable to bind for {shown}: no connection from it within {:?}",
                    d.cfg.bind_timeout
                ),
            );
        }
        let mut fds = [
            libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if watch_client { 0 } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if let Err(e) = sys::poll(&mut fds, Some(left.min(Duration::from_secs(3600)))) {
            d.fail(
                Failure::General,
                exit::TEMP,
                &format!("unable to wait for the peer: {}", sys::strerror(&e)),
            );
        }
        if fds[1].revents != 0 && client_left() {
            diag::die(
                exit::POLICY,
                &format!("bind for {shown}: the client closed its connection before a peer came"),
            );
        }
        if fds[1].revents != 0 {
            watch_client = false;
        }
        if fds[0].revents == 0 {
            continue;
        }
        let (stream, from) = match l.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
            Err(e) => d.fail(
                Failure::General,
                exit::TEMP,
                &format!("unable to accept the peer: {}", sys::strerror(&e)),
            ),
        };
        let ip = rules::canonical(from.ip());
        if peers.iter().any(|p| rules::canonical(p.ip()) == ip) {
            return (OwnedFd::from(stream), from);
        }
        let _ = sys::reset_connection(stream.as_raw_fd());
        drop(stream);
        wrong += 1;
        diag::warn(&format!(
            "bind for {shown}: refused a connection from {from}: not the peer the client named"
        ));
        if wrong >= MAX_WRONG_PEERS {
            d.fail(
                Failure::NotAllowed,
                exit::POLICY,
                &format!("unable to bind for {shown}: {wrong} connections from other addresses"),
            );
        }
    }
}
