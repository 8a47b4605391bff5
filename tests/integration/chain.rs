//! The chain as a whole: a sibling program continues in the same process instead of
//! being exec'd (chain::exec), and must then look exactly as if it had been exec'd.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::util;

const LISTEN: &str = env!("CARGO_BIN_EXE_tcpsplice-listen");
const DIAL: &str = env!("CARGO_BIN_EXE_tcpsplice-dial");
const SPLICE: &str = env!("CARGO_BIN_EXE_tcpsplice");

/// The socket inode behind each descriptor of `pid`.
fn socket_inodes(pid: u32) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read fds")
        .flatten()
    {
        if let Ok(l) = std::fs::read_link(e.path()) {
            let l = l.to_string_lossy().into_owned();
            if l.starts_with("socket:") {
                v.push(l);
            }
        }
    }
    v
}

/// Starts tcpsplice-listen on an ephemeral loopback port running `prog` per connection;
/// returns it with the port it printed.
fn start_listen(prog: &[&str], env: &[(&str, &str)]) -> (Child, u16) {
    let mut listen = Command::new(LISTEN)
        .args(["-1", "127.0.0.1", "0"])
        .args(prog)
        .env("TCPSPLICE_LOG", "stderr")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tcpsplice-listen");
    let mut line = String::new();
    BufReader::new(listen.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (listen, line.trim().parse().expect("bound port"))
}

/// The pid of the listener's (only) connection process.
fn relay_of(listen: &Child) -> u32 {
    let children =
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", listen.id())).unwrap();
    children
        .split_whitespace()
        .next()
        .expect("a child")
        .parse()
        .unwrap()
}

/// Ends the listener with SIGTERM and waits for it.
fn stop(listen: Child) -> util::Ran {
    // SAFETY: kill with a pid we spawned.
    unsafe { libc::kill(listen.id() as i32, libc::SIGTERM) };
    util::finish(listen, "tcpsplice-listen", Duration::from_secs(20))
}

/// Runs listen → dial → splice for one connection and returns what /proc says of the
/// relay process while the connection is open: (comm, exe, its sockets), plus the
/// listener's sockets.
fn inspect_relay(exec_always: bool) -> (String, String, Vec<String>, Vec<String>) {
    let (target_l, target_a) = util::listener();
    let tport = target_a.port().to_string();
    let env: &[(&str, &str)] = if exec_always {
        &[("TCPSPLICE_EXEC", "always")]
    } else {
        &[]
    };
    let (listen, port) = start_listen(&[DIAL, "127.0.0.1", &tport, SPLICE], env);
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut target = util::accept_timeout(&target_l, Duration::from_secs(10));
    // The connection is up through the relay: find it among the listener's children.
    client.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    target.read_exact(&mut b).unwrap();
    let relay = relay_of(&listen);
    let comm = std::fs::read_to_string(format!("/proc/{relay}/comm")).unwrap();
    let exe = std::fs::read_link(format!("/proc/{relay}/exe")).unwrap();
    let relay_socks = socket_inodes(relay);
    let listen_socks = socket_inodes(listen.id());
    client.shutdown(Shutdown::Write).unwrap();
    target.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    let ran = stop(listen);
    ran.expect_code(0);
    assert!(
        ran.stderr_text()
            .contains("tcpsplice: info: end client=127.0.0.1:"),
        "the relay's own log line, under its own name{}",
        ran.show()
    );
    (
        comm.trim().to_string(),
        exe.to_string_lossy().into_owned(),
        relay_socks,
        listen_socks,
    )
}

#[test]
fn a_sibling_continues_in_process_as_if_exec_had_run() {
    let (comm, exe, relay_socks, listen_socks) = inspect_relay(false);
    assert_eq!(
        comm, "tcpsplice",
        "the relay is named after the program it runs"
    );
    assert!(
        exe.ends_with("/tcpsplice-listen"),
        "no exec: still the listener's image, got {exe}"
    );
    // The listener's socket is close-on-exec: the relay must not hold it.
    for s in &listen_socks {
        assert!(
            !relay_socks.contains(s),
            "relay holds the listening socket {s}"
        );
    }
    // Exactly two sockets: the client's (fds 0/1) and the target's (fds 6/7).
    let mut uniq = relay_socks.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 2, "relay sockets: {relay_socks:?}");
}

#[test]
fn tcpsplice_exec_always_forces_real_execs() {
    let (comm, exe, relay_socks, listen_socks) = inspect_relay(true);
    assert_eq!(comm, "tcpsplice");
    assert!(
        exe.ends_with("/tcpsplice"),
        "a real exec of the splicer, got {exe}"
    );
    for s in &listen_socks {
        assert!(
            !relay_socks.contains(s),
            "relay holds the listening socket {s}"
        );
    }
}

#[test]
fn the_authenticator_always_execs_for_real() {
    const AUTH: &str = env!("CARGO_BIN_EXE_tcpsplice-auth");
    let (target_l, target_a) = util::listener();
    let rule = format!("127.0.0.1/32:{}", target_a.port());
    let (listen, port) = start_listen(&[AUTH, "-n", DIAL, "-a", &rule, SPLICE], &[]);
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0u8; 2];
    client.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0]);
    let p = target_a.port().to_be_bytes();
    client
        .write_all(&[5, 1, 0, 1, 127, 0, 0, 1, p[0], p[1]])
        .unwrap();
    let mut reply = [0u8; 10];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..2], &[5, 0], "SOCKS5 success");
    let mut target = util::accept_timeout(&target_l, Duration::from_secs(10));
    client.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    target.read_exact(&mut b).unwrap();
    let relay = relay_of(&listen);
    let exe = std::fs::read_link(format!("/proc/{relay}/exe")).unwrap();
    drop((client, target));
    let ran = stop(listen);
    // The dialer was exec'd (a fresh image, nothing of the authenticator's memory), and
    // the splicer continued in the dialer's process.
    assert!(
        exe.to_string_lossy().ends_with("/tcpsplice-dial"),
        "relay image {exe:?}{}",
        ran.show()
    );
}
