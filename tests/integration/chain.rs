//! The chain as a whole: a sibling program continues in the same process instead of
//! being exec'd (chain::exec), and must then look exactly as if it had been exec'd; and
//! tcpsplice-listen reuses such a process for the next connection (worker), which must
//! then find it exactly as a fresh fork would be.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// The descriptors of `pid` that refer to one of `links` (as /proc/PID/fd shows them).
fn fds_on(pid: u32, links: &[String]) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read fds")
        .flatten()
    {
        if let Ok(l) = std::fs::read_link(e.path()) {
            if links.contains(&l.to_string_lossy().into_owned()) {
                v.extend(e.file_name().to_string_lossy().parse::<i32>());
            }
        }
    }
    v
}

/// The inodes of the TCP sockets the kernel lists but the listening ones (state 0A),
/// to tell connections from unix sockets and from the listeners, which processes that
/// accept for themselves hold too.
fn tcp_socket_inodes() -> Vec<String> {
    tcp_inodes(false)
}

/// The inodes of the listening TCP sockets (`listening`) or of all the others.
fn tcp_inodes(listening: bool) -> Vec<String> {
    let mut v = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(f) {
            for line in text.lines().skip(1) {
                let w: Vec<&str> = line.split_whitespace().collect();
                if let (Some(&state), Some(inode)) = (w.get(3), w.get(9)) {
                    if (state == "0A") == listening {
                        v.push(format!("socket:[{inode}]"));
                    }
                }
            }
        }
    }
    v
}

/// The TCP connections among `pid`'s descriptors.
fn tcp_sockets_of(pid: u32) -> Vec<String> {
    let tcp = tcp_socket_inodes();
    socket_inodes(pid)
        .into_iter()
        .filter(|s| tcp.contains(s))
        .collect()
}

/// Starts tcpsplice-listen on an ephemeral loopback port running `prog` per connection;
/// returns it with the port it printed.
fn start_listen(prog: &[&str], env: &[(&str, &str)]) -> (Child, u16) {
    start_listen_with(&[], prog, env, Command::new(LISTEN))
}

/// As [`start_listen`], with options before HOST PORT, from a prepared command.
fn start_listen_with(
    opts: &[&str],
    prog: &[&str],
    env: &[(&str, &str)],
    mut cmd: Command,
) -> (Child, u16) {
    let mut listen = cmd
        .args(opts)
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

/// The listener's live connection processes (a process that served its last connection
/// may linger as a zombie for a moment).
fn live_children(listen: &Child) -> Vec<u32> {
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", listen.id()))
        .unwrap_or_default();
    children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .is_ok_and(|st| st.rsplit(") ").next().is_some_and(|r| !r.starts_with('Z')))
        })
        .collect()
}

/// The listener's one live connection process.
fn live_relay_of(listen: &Child) -> u32 {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let live = live_children(listen);
        if live.len() == 1 {
            return live[0];
        }
        assert!(
            Instant::now() < end,
            "live children of the listener: {live:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ends the listener with SIGTERM and waits for it.
fn stop(listen: Child) -> util::Ran {
    // SAFETY: kill with a pid we spawned.
    unsafe { libc::kill(listen.id() as i32, libc::SIGTERM) };
    util::finish(listen, "tcpsplice-listen", Duration::from_secs(20))
}

/// The relay's name, image, sockets, the listener's sockets, the TCP connections of the
/// machine, and the relay's descriptors on the listener's sockets.
type Image = (
    String,
    String,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<i32>,
);

/// Runs listen → dial → splice for one connection and returns what /proc says of the
/// relay process while the connection is open: (comm, exe, its sockets), plus the
/// listener's sockets and all TCP sockets of the system then.
fn inspect_relay(exec_always: bool) -> Image {
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
    let on_listener = fds_on(relay, &listen_socks);
    let tcp = tcp_socket_inodes();
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
        tcp,
        on_listener,
    )
}

#[test]
fn a_sibling_continues_in_process_as_if_exec_had_run() {
    let (comm, exe, relay_socks, listen_socks, tcp, on_listener) = inspect_relay(false);
    assert_eq!(
        comm, "tcpsplice",
        "the relay is named after the program it runs"
    );
    assert!(
        exe.ends_with("/tcpsplice-listen"),
        "no exec: still the listener's image, got {exe}"
    );
    // The process accepts its next connection itself: it holds the listening socket
    // (close-on-exec, as an exec would close it), but only among its own descriptors,
    // out of the chain's way (10 and up), never where a program of the chain looks.
    assert!(
        on_listener.len() == 1 && on_listener[0] >= 10,
        "relay holds the listening socket on {on_listener:?}"
    );
    // Two TCP connections: the client's (fds 0/1) and the target's (fds 6/7); beside
    // them only the unix socket on which the listener would hand over a connection.
    let mut uniq = relay_socks.clone();
    uniq.sort();
    uniq.dedup();
    uniq.retain(|s| !listen_socks.contains(s));
    let (tcp_socks, other): (Vec<_>, Vec<_>) = uniq.iter().partition(|s| tcp.contains(s));
    assert_eq!(tcp_socks.len(), 2, "relay sockets: {relay_socks:?}");
    assert!(other.len() <= 1, "relay sockets: {relay_socks:?}");
}

#[test]
fn tcpsplice_exec_always_forces_real_execs() {
    let (comm, exe, relay_socks, listen_socks, _, _) = inspect_relay(true);
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

/// Runs one no-auth SOCKS5 connection through tcpsplice-auth → dial → splice, started
/// by `start` (given the chain's command line, it returns the pid that will relay and
/// the client's socket); returns the relay's image while the connection is open.
fn auth_chain_image(start: impl FnOnce(&[&str]) -> (u32, TcpStream)) -> String {
    const AUTH: &str = env!("CARGO_BIN_EXE_tcpsplice-auth");
    let (target_l, target_a) = util::listener();
    let rule = format!("127.0.0.1/32:{}", target_a.port());
    let (pid, mut client) = start(&[AUTH, "-n", DIAL, "-a", &rule, SPLICE]);
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
    let exe = exe_of(pid);
    drop((client, target));
    exe
}

#[test]
fn the_authenticator_continues_in_the_listeners_process_and_is_execd_elsewhere() {
    // Under tcpsplice-listen: auth, dial and splice all run in the connection process.
    let mut listen = None;
    let exe = auth_chain_image(|prog| {
        let (l, port) = start_listen(prog, &[]);
        let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let pid = live_relay_of(&l);
        listen = Some(l);
        (pid, c)
    });
    let ran = stop(listen.expect("listener"));
    assert!(
        exe.ends_with("/tcpsplice-listen"),
        "relay image {exe:?}{}",
        ran.show()
    );
    // As inetd runs it (the client on 0/1, no listener): the dialer is exec'd, a fresh
    // image with nothing of the authenticator's memory, and the splicer continues in it.
    let mut child = None;
    let exe = auth_chain_image(|prog| {
        let (mine, theirs) = util::tcp_pair();
        let c = Command::new(prog[0])
            .args(&prog[1..])
            .stdin(std::os::fd::OwnedFd::from(theirs.try_clone().unwrap()))
            .stdout(std::os::fd::OwnedFd::from(theirs))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tcpsplice-auth");
        let pid = c.id();
        child = Some(c);
        (pid, mine)
    });
    let mut child = child.expect("child");
    let _ = util::wait_timeout(&mut child, Duration::from_secs(10));
    assert!(exe.ends_with("/tcpsplice-dial"), "relay image {exe:?}");
}

// ---------------------------------------------------------------- reused processes

/// How many connections a target had open at once, at most.
type Peak = std::sync::Arc<std::sync::atomic::AtomicUsize>;

/// A target that serves `count` connections, each in its own thread: reads everything,
/// waits `hold`, answers with what it read reversed, closes. Returns how many it served,
/// and keeps the most it had open at once in `peak`.
fn reversing_target(
    l: TcpListener,
    count: usize,
    hold: Duration,
    peak: Peak,
) -> std::thread::JoinHandle<usize> {
    use std::sync::atomic::Ordering::SeqCst;
    std::thread::spawn(move || {
        let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let served: Vec<_> = (0..count)
            .map(|_| {
                let mut s = util::accept_timeout(&l, Duration::from_secs(20));
                let (open, peak) = (open.clone(), peak.clone());
                peak.fetch_max(open.fetch_add(1, SeqCst) + 1, SeqCst);
                std::thread::spawn(move || {
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    let mut got = Vec::new();
                    let ok = s.read_to_end(&mut got).is_ok() && {
                        std::thread::sleep(hold);
                        got.reverse();
                        s.write_all(&got).is_ok()
                    };
                    // Counted out before the close, which is what lets the relay
                    // end and the next connection in.
                    open.fetch_sub(1, SeqCst);
                    drop(s);
                    ok
                })
            })
            .collect();
        served
            .into_iter()
            .filter_map(|t| t.join().ok())
            .filter(|&ok| ok)
            .count()
    })
}

/// A port forwarder, tcpsplice-listen (`opts`, `env`, started from `cmd`) →
/// tcpsplice-dial → tcpsplice, in front of a reversing target that serves `count`
/// connections.
struct Forwarder {
    /// Taken by [`Forwarder::finish`]; killed on drop when a test failed before it.
    listen: Option<Child>,
    port: u16,
    target: Option<std::thread::JoinHandle<usize>>,
    peak: Peak,
}

fn forwarder(opts: &[&str], env: &[(&str, &str)], cmd: Command, count: usize) -> Forwarder {
    forwarder_holding(opts, env, cmd, count, Duration::ZERO)
}

/// As [`forwarder`], with a target that holds each connection for `hold` before it
/// answers.
fn forwarder_holding(
    opts: &[&str],
    env: &[(&str, &str)],
    cmd: Command,
    count: usize,
    hold: Duration,
) -> Forwarder {
    let (target_l, target_a) = util::listener();
    let peak = Peak::default();
    let target = reversing_target(target_l, count, hold, peak.clone());
    let tport = target_a.port().to_string();
    let (listen, port) = start_listen_with(opts, &[DIAL, "127.0.0.1", &tport, SPLICE], env, cmd);
    Forwarder {
        listen: Some(listen),
        port,
        target: Some(target),
        peak,
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Some(mut l) = self.listen.take() {
            let _ = l.kill();
            let _ = l.wait();
        }
    }
}

impl Forwarder {
    fn listen(&self) -> &Child {
        self.listen.as_ref().expect("not finished yet")
    }

    /// Checks that the target served `served` connections, stops the listener, checks it
    /// exited 0, and returns its run with the pid of each `accept` line.
    fn finish(mut self, served: usize) -> (util::Ran, Vec<u32>) {
        let target = self.target.take().expect("not finished yet");
        assert_eq!(target.join().unwrap(), served, "connections served");
        let ran = stop(self.listen.take().expect("not finished yet"));
        ran.expect_code(0);
        let pids = accepting_pids(&ran.stderr_text());
        (ran, pids)
    }
}

/// One whole connection through the chain: sends `data`, half-closes, returns what came
/// back and the client's own port.
fn round_trip(port: u16, data: &[u8]) -> (Vec<u8>, u16) {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let me = c.local_addr().unwrap().port();
    c.write_all(data).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    (back, me)
}

fn reversed(data: &[u8]) -> Vec<u8> {
    data.iter().rev().copied().collect()
}

/// The pid named by each `accept pid=` line of the listener's log, in order.
fn accepting_pids(log: &str) -> Vec<u32> {
    log.lines()
        .filter_map(|l| l.split("info: accept pid=").nth(1))
        .filter_map(|r| r.split_whitespace().next())
        .map(|p| p.parse().expect("pid"))
        .collect()
}

/// The descriptors from 3 up that `pid` would pass on through an exec.
fn inherited_fds(pid: u32) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let info = std::fs::read_to_string(e.path()).unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        if name.parse::<u32>().is_ok_and(|n| n >= 3) && flags & 0o2000000 == 0 {
            v.push(name);
        }
    }
    v
}

/// One connection through `fw` carrying `data`; returns the process that served it,
/// once it waits for the next one (holding no TCP socket).
fn serve_and_find_idle(fw: &Forwarder, data: &[u8]) -> u32 {
    assert_eq!(round_trip(fw.port, data).0, reversed(data));
    let idle = live_relay_of(fw.listen());
    wait_no_tcp(idle);
    wait_restored(idle);
    idle
}

/// Waits until a connection process has put itself back (it takes the listener's name
/// again last): the peers' sockets may leave the kernel's TCP table before the process
/// has closed them.
fn wait_restored(pid: u32) {
    let end = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|c| c.trim() != "tcpsplice-liste")
    {
        assert!(Instant::now() < end, "process {pid} never became idle");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A signal set of `pid` from /proc/PID/status (`SigBlk:`, `SigIgn:`).
fn signal_mask(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let v = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in\n{status}"));
    u64::from_str_radix(v.trim(), 16).unwrap()
}

/// Waits until `pid` holds no TCP socket (a reused process between connections).
fn wait_no_tcp(pid: u32) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let held = tcp_sockets_of(pid);
        if held.is_empty() {
            return;
        }
        assert!(Instant::now() < end, "pid {pid} still holds {held:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_process_serves_up_to_r_connections_and_each_finds_a_fresh_fork() {
    let fw = forwarder(&["-r", "3"], &[], Command::new(LISTEN), 5);
    let (listen, port) = (fw.listen(), fw.port);
    let mut ports = Vec::new();
    for i in 0..5u64 {
        let data = util::pattern(i, 1000 + i as usize * 4099);
        let (back, me) = round_trip(port, &data);
        assert_eq!(
            util::hash_of(&back),
            util::hash_of(&reversed(&data)),
            "connection {i}"
        );
        ports.push(me);
        if i == 2 {
            // Its third: that process exits rather than wait for a fourth.
            continue;
        }
        // Between connections the process holds neither the client's socket nor the
        // target's: both peers have seen the connection end for good.
        let relay = live_relay_of(listen);
        wait_no_tcp(relay);
        wait_restored(relay);
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{relay}/fd"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        // 0-2, what the listener was given, and the seven the process keeps for itself
        // (its channel, the report pipe, /dev/null; the listener it accepts from, its
        // epoll set, the supervisor's eventfd; the relay's signalfd, made once for all
        // its connections); nothing a connection opened.
        let given = inherited_fds(listen.id());
        assert_eq!(
            fds.len(),
            10 + given.len(),
            "fds of an idle process: {fds:?}, given {given:?}"
        );
        // No signal blocked (SIGTERM ends it at once), and ignored what the listener
        // ignores (SIGPIPE among them), nothing more.
        assert_eq!(
            signal_mask(relay, "SigBlk:"),
            0,
            "blocked in an idle process"
        );
        let ignored = signal_mask(relay, "SigIgn:");
        assert_eq!(ignored, signal_mask(listen.id(), "SigIgn:"));
        assert_ne!(ignored & 1 << (libc::SIGPIPE - 1), 0);
        let comm = std::fs::read_to_string(format!("/proc/{relay}/comm")).unwrap();
        assert_eq!(
            comm.trim(),
            "tcpsplice-liste",
            "an idle process is the listener's again"
        );
    }
    let (ran, pids) = fw.finish(5);
    let log = ran.stderr_text();
    assert!(log.contains(" reuse=3"), "{}", ran.show());
    assert_eq!(pids.len(), 5, "{}", ran.show());
    assert!(
        pids[0] == pids[1] && pids[1] == pids[2],
        "three in one process{}",
        ran.show()
    );
    assert!(
        pids[3] != pids[2] && pids[3] == pids[4],
        "then a new one{}",
        ran.show()
    );
    // The environment is the fork's again: each connection's log names its own client
    // (tcpsplice-dial keeps a TCPSPLICE_CLIENT it finds set).
    for p in &ports {
        assert!(
            log.contains(&format!("tcpsplice: info: end client=127.0.0.1:{p} ")),
            "client port {p} in the relay's log{}",
            ran.show()
        );
    }
    assert_eq!(log.matches(" status=0 ").count(), 5, "{}", ran.show());
    assert!(
        log.contains("stopped: all connections ended"),
        "{}",
        ran.show()
    );
}

#[test]
fn r1_or_exec_always_fork_a_process_per_connection() {
    for (opts, env) in [
        (&["-r", "1"][..], &[][..]),
        (&[][..], &[("TCPSPLICE_EXEC", "always")][..]),
    ] {
        let fw = forwarder(opts, env, Command::new(LISTEN), 2);
        for i in 0..2u64 {
            let data = util::pattern(i, 777);
            assert_eq!(round_trip(fw.port, &data).0, reversed(&data));
        }
        let (ran, pids) = fw.finish(2);
        assert!(ran.stderr_text().contains(" reuse=1"), "{}", ran.show());
        assert!(pids.len() == 2 && pids[0] != pids[1], "{}", ran.show());
    }
}

#[test]
fn a_connection_handed_to_a_process_that_dies_before_taking_it_goes_to_another() {
    // Behind a balancer (-P) the supervisor reads each PROXY header and hands the
    // connection over: processes do not accept for themselves.
    let fw = forwarder(&["-P", "127.0.0.1/32"], &[], Command::new(LISTEN), 2);
    let data = util::pattern(1, 5000);
    let proxied = |d: &[u8]| {
        let mut m = b"PROXY TCP4 192.0.2.7 127.0.0.1 4321 80\r\n".to_vec();
        m.extend_from_slice(d);
        m
    };
    assert_eq!(round_trip(fw.port, &proxied(&data)).0, reversed(&data));
    let first = live_relay_of(fw.listen());
    wait_no_tcp(first);
    wait_restored(first);
    // Stopped, the idle process cannot take the next connection: the listener hands it
    // over anyway and keeps its own copy of the socket until told it was taken.
    // SAFETY: kill with a pid we found among the listener's children.
    unsafe { libc::kill(first as i32, libc::SIGSTOP) };
    let held_before = tcp_sockets_of(fw.listen().id()).len();
    let port = fw.port;
    let sent = proxied(&data);
    let client = std::thread::spawn(move || round_trip(port, &sent).0);
    let end = Instant::now() + Duration::from_secs(10);
    while tcp_sockets_of(fw.listen().id()).len() <= held_before {
        assert!(
            Instant::now() < end,
            "the listener never held the handed-over socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: as above.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    assert_eq!(
        client.join().unwrap(),
        reversed(&data),
        "the client was served"
    );
    let (ran, pids) = fw.finish(2);
    let log = ran.stderr_text();
    assert!(
        log.contains(&format!(
            "connection process pid={first} ended (signal=9) before it took client="
        )) && log.contains("handing the connection on"),
        "{}",
        ran.show()
    );
    assert!(
        pids.len() == 3 && pids[0] == first && pids[1] == first && pids[2] != first,
        "{}",
        ran.show()
    );
    // One end line per connection: the first one's, and the handed-on one's.
    assert_eq!(log.matches(" status=0 ").count(), 2, "{}", ran.show());
}

/// Waits (up to 10 s) until connecting to loopback `port` is refused; `what` names
/// the failure otherwise.
fn wait_refused(port: u16, what: &str) {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            other => {
                assert!(Instant::now() < end, "{what}: {other:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A forwarder (listen → dial → splice) with one connection up and held open: the
/// listener, its port, the client's socket and the target's ("ping" gone through), and
/// the target's listening socket for more.
fn held_connection() -> (Child, u16, TcpStream, TcpStream, TcpListener) {
    let (target_l, target_a) = util::listener();
    let tport = target_a.port().to_string();
    let (listen, port) = start_listen(&[DIAL, "127.0.0.1", &tport, SPLICE], &[]);
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut target = util::accept_timeout(&target_l, Duration::from_secs(10));
    client.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    target.read_exact(&mut b).unwrap();
    (listen, port, client, target, target_l)
}

#[test]
fn a_stop_refuses_new_clients_although_connection_processes_hold_the_listener() {
    // The target holds the connection open until told: a busy process, which also holds
    // the listening socket it accepts from, keeps running through the stop.
    let (listen, port, mut client, mut target, _target_l) = held_connection();
    let mut b = [0u8; 4];
    // SAFETY: kill with a pid we spawned.
    unsafe { libc::kill(listen.id() as i32, libc::SIGTERM) };
    // Refused, not left waiting in a backlog that a busy process still holds open.
    wait_refused(port, "a connection after SIGTERM");
    // The running connection goes on to its end, both ways.
    target.write_all(b"pong").unwrap();
    client.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");
    client.shutdown(Shutdown::Write).unwrap();
    target.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    let ran = util::finish(listen, "tcpsplice-listen", Duration::from_secs(20));
    ran.expect_code(0);
    assert!(
        ran.stderr_text().contains("stopped: all connections ended"),
        "{}",
        ran.show()
    );
}

#[test]
fn a_killed_supervisor_leaves_no_port_listening_for_nobody() {
    let mut fw = forwarder(&[], &[], Command::new(LISTEN), 2);
    // One connection held open (its process holds the listener too, unseen while it
    // serves), and a second process waiting after serving one.
    let mut held = TcpStream::connect(("127.0.0.1", fw.port)).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    held.write_all(b"held").unwrap();
    let data = util::pattern(4, 100);
    assert_eq!(round_trip(fw.port, &data).0, reversed(&data));
    let end = Instant::now() + Duration::from_secs(10);
    let idle = loop {
        // The one of two that holds no connection and has taken the listener's name.
        let waiting = live_children(fw.listen()).into_iter().find(|&p| {
            tcp_sockets_of(p).is_empty()
                && std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "tcpsplice-liste")
        });
        if let Some(p) = waiting {
            break p;
        }
        assert!(Instant::now() < end, "no process waits");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut listen = fw.listen.take().expect("running");
    let _ = listen.kill();
    let _ = listen.wait();
    // The waiting process sees the supervisor gone and shuts the listener for every
    // process holding it: clients are refused, not left in a backlog nobody serves.
    wait_refused(fw.port, "the port still takes connections");
    // The held connection is still served to its end.
    held.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    held.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"dleh");
    let end = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{idle}/stat")).is_ok_and(|st| !st.contains(") Z"))
    {
        assert!(Instant::now() < end, "the waiting process {idle} stayed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn waiting_processes_accept_for_themselves_and_one_stopped_or_killed_loses_nothing() {
    let fw = forwarder(&[], &[], Command::new(LISTEN), 4);
    let data = util::pattern(2, 3000);
    let first = serve_and_find_idle(&fw, &data);
    // With the supervisor stopped, the waiting process takes the next connection
    // itself: it logs the accept (and the end) under its own pid.
    let sup = fw.listen().id() as i32;
    // SAFETY: kill with the pid of the listener we started.
    unsafe { libc::kill(sup, libc::SIGSTOP) };
    assert_eq!(round_trip(fw.port, &data).0, reversed(&data));
    // SAFETY: as above.
    unsafe { libc::kill(sup, libc::SIGCONT) };
    wait_no_tcp(first);
    wait_restored(first);
    // Stopped, the waiting process is no longer in its wait, so the kernel wakes no
    // one for the next connection: the supervisor finds it left behind at its next
    // quiet second and forks a process for it.
    // SAFETY: kill with a pid we found among the listener's children.
    unsafe { libc::kill(first as i32, libc::SIGSTOP) };
    let t = Instant::now();
    assert_eq!(round_trip(fw.port, &data).0, reversed(&data));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "served after {:?}",
        t.elapsed()
    );
    // Killed while waiting, it takes nothing with it.
    // SAFETY: as above.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    assert_eq!(round_trip(fw.port, &data).0, reversed(&data));
    let (ran, pids) = fw.finish(4);
    assert!(
        pids.len() == 4 && pids[0] == first && pids[1] == first && pids[2] != first,
        "{}",
        ran.show()
    );
    let log = ran.stderr_text();
    // The default cap on connections per process, as the man page gives it.
    assert!(log.contains(" reuse=10000"), "{}", ran.show());
    // The process it was forked for logs the end of each connection it finished.
    assert_eq!(log.matches(" status=0 ").count(), 4, "{}", ran.show());
    assert!(!log.contains("signal=9 secs"), "{}", ran.show());
}

#[test]
fn an_idle_process_is_killed_and_the_next_connection_still_served() {
    let fw = forwarder(&[], &[], Command::new(LISTEN), 2);
    let data = util::pattern(1, 5000);
    let first = serve_and_find_idle(&fw, &data);
    // Whether the listener reaps it before the next connection or hands that one to
    // it and sees it die: the connection must be served.
    // SAFETY: kill with a pid we found among the listener's children.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    assert_eq!(round_trip(fw.port, &data).0, reversed(&data));
    let (ran, pids) = fw.finish(2);
    assert!(
        pids[0] == first && pids[pids.len() - 1] != first,
        "{}",
        ran.show()
    );
}

#[test]
fn a_process_ended_by_a_signal_is_not_reused() {
    let (listen, port, mut client, t, target_l) = held_connection();
    let relay = relay_of(&listen);
    // SAFETY: kill with a pid we found among the listener's children.
    unsafe { libc::kill(relay as i32, libc::SIGTERM) };
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest);
    drop((client, t));
    let target = reversing_target(target_l, 1, Duration::ZERO, Peak::default());
    let data = util::pattern(2, 3000);
    assert_eq!(round_trip(port, &data).0, reversed(&data));
    assert_eq!(target.join().unwrap(), 1);
    let ran = stop(listen);
    ran.expect_code(0);
    let log = ran.stderr_text();
    let pids = accepting_pids(&log);
    assert!(pids.len() == 2 && pids[0] != pids[1], "{}", ran.show());
    assert!(log.contains("how=signal-15"), "{}", ran.show());
    assert!(log.contains(&format!("end pid={relay} ")), "{}", ran.show());
}

/// A tcpsplice-listen command that passes a pipe's write end on `fd` (not close-on-exec)
/// to the listener; the pipe's two ends are returned too, to keep it open.
fn listen_with_inherited_fd(fd: i32) -> (Command, [std::fs::File; 2]) {
    use std::os::unix::io::FromRawFd;
    let mut p = [0; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let w = p[1];
    let mut cmd = Command::new(LISTEN);
    // SAFETY: dup2 and fcntl are async-signal-safe; they run in the child between fork
    // and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself would leave close-on-exec set: clear it instead.
            let rc = if w == fd {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(w, fd)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // SAFETY: both descriptors are open and ours from here on.
    let ends = unsafe {
        [
            std::fs::File::from_raw_fd(p[0]),
            std::fs::File::from_raw_fd(w),
        ]
    };
    (cmd, ends)
}

#[test]
fn a_descriptor_inherited_by_the_listener_is_passed_on_to_every_connection() {
    let (cmd, _pipe) = listen_with_inherited_fd(9);
    let fw = forwarder(&[], &[], cmd, 3);
    let mut seen = Vec::new();
    for i in 0..3u64 {
        let data = util::pattern(i, 100);
        assert_eq!(round_trip(fw.port, &data).0, reversed(&data));
        let relay = live_relay_of(fw.listen());
        wait_no_tcp(relay);
        // Waiting again before the next client comes: the client sees its end while the
        // process is still winding down, and one that came then could find none waiting
        // and be given a fresh process.
        wait_restored(relay);
        seen.push(std::fs::read_link(format!("/proc/{relay}/fd/9")).expect("fd 9 kept"));
    }
    assert!(seen
        .iter()
        .all(|l| l == &seen[0] && l.to_string_lossy().starts_with("pipe:")));
    let (ran, pids) = fw.finish(3);
    assert!(
        pids.len() == 3 && pids.iter().all(|&p| p == pids[0]),
        "{}",
        ran.show()
    );
}

#[test]
fn a_process_whose_inherited_descriptor_was_replaced_is_not_reused() {
    // tcpsplice-dial puts the target's socket on fd 6, over the inherited pipe: the
    // process cannot give the next connection what a fork would, so it exits.
    let (cmd, _pipe) = listen_with_inherited_fd(6);
    let fw = forwarder(&[], &[], cmd, 2);
    for i in 0..2u64 {
        let data = util::pattern(i, 100);
        assert_eq!(round_trip(fw.port, &data).0, reversed(&data));
    }
    let (ran, pids) = fw.finish(2);
    assert!(pids.len() == 2 && pids[0] != pids[1], "{}", ran.show());
}

#[test]
fn reused_processes_keep_the_connection_limit_under_concurrent_clients() {
    const CLIENTS: u64 = 8;
    // The target holds every connection a while, so that without the limit all eight
    // would be open at once.
    let fw = forwarder_holding(
        &["-c", "2", "-r", "3"],
        &[],
        Command::new(LISTEN),
        CLIENTS as usize,
        Duration::from_millis(100),
    );
    let (port, peak) = (fw.port, fw.peak.clone());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            std::thread::spawn(move || {
                let data = util::pattern(100 + i, 200_000 + i as usize);
                let (back, _) = round_trip(port, &data);
                util::hash_of(&back) == util::hash_of(&reversed(&data))
            })
        })
        .collect();
    for c in clients {
        assert!(c.join().unwrap(), "a client got other bytes back");
    }
    let (ran, pids) = fw.finish(CLIENTS as usize);
    let log = ran.stderr_text();
    assert_eq!(pids.len(), CLIENTS as usize, "{}", ran.show());
    let mut distinct = pids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    // Eight connections, three per process at most: three processes at least; and
    // fewer than eight, or nothing was reused.
    assert!((3..8).contains(&distinct.len()), "{}", ran.show());
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=2).contains(&peak),
        "{peak} connections at once{}",
        ran.show()
    );
    assert_eq!(
        log.matches(" status=0 ").count(),
        CLIENTS as usize,
        "{}",
        ran.show()
    );
}

#[test]
fn an_idle_process_is_let_go_and_the_listener_serves_on() {
    let fw = forwarder(&[], &[], Command::new(LISTEN), 2);
    let data = util::pattern(7, 1000);
    let idle = serve_and_find_idle(&fw, &data);
    // Let go after 10 s of waiting (listen::IDLE_MAX): it exits and is reaped.
    let end = Instant::now() + Duration::from_secs(30);
    while std::path::Path::new(&format!("/proc/{idle}")).exists() {
        assert!(Instant::now() < end, "idle process {idle} still there");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(round_trip(fw.port, &data).0, reversed(&data));
    let (ran, pids) = fw.finish(2);
    assert!(
        pids.len() == 2 && pids[0] == idle && pids[1] != idle,
        "{}",
        ran.show()
    );
}

#[test]
fn the_per_source_limit_counts_connections_of_reused_processes() {
    let fw = forwarder(&["-C", "1"], &[], Command::new(LISTEN), 2);
    // One connection open; a second from the same address is turned away.
    let mut held = TcpStream::connect(("127.0.0.1", fw.port)).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    held.write_all(b"first").unwrap();
    let mut extra = TcpStream::connect(("127.0.0.1", fw.port)).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(
        matches!(extra.read(&mut b), Ok(0) | Err(_)),
        "the second connection was served"
    );
    held.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    held.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"tsrif");
    // Ended, it no longer counts: the next one is served, by the same process (the
    // supervisor turned the second away itself, in the order of the accepts).
    let relay = live_relay_of(fw.listen());
    wait_no_tcp(relay);
    wait_restored(relay);
    let data = util::pattern(3, 999);
    assert_eq!(round_trip(fw.port, &data).0, reversed(&data));
    let (ran, pids) = fw.finish(2);
    assert_eq!(
        ran.stderr_text().matches("reject client=").count(),
        1,
        "{}",
        ran.show()
    );
    assert!(pids.len() == 2 && pids[0] == pids[1], "{}", ran.show());
}

#[test]
fn running_short_of_descriptors_drops_no_client() {
    // Each busy or idle process costs the listener a descriptor (its channel). Near the
    // limit, processes are forked without one (not reused) and accepting pauses; no
    // client that was accepted may be lost.
    const CLIENTS: usize = 40;
    let fw = forwarder_holding(
        &[],
        &[],
        Command::new(LISTEN),
        CLIENTS,
        Duration::from_millis(300),
    );
    let open = std::fs::read_dir(format!("/proc/{}/fd", fw.listen().id()))
        .unwrap()
        .count() as u64;
    util::set_nofile(fw.listen().id() as i32, open + 10);
    let port = fw.port;
    let clients: Vec<_> = (0..CLIENTS as u64)
        .map(|i| {
            std::thread::spawn(move || {
                let data = util::pattern(200 + i, 3000);
                round_trip(port, &data).0 == reversed(&data)
            })
        })
        .collect();
    for c in clients {
        assert!(c.join().unwrap(), "a client was not served");
    }
    let (ran, pids) = fw.finish(CLIENTS);
    let log = ran.stderr_text();
    assert_eq!(pids.len(), CLIENTS, "{}", ran.show());
    assert_eq!(log.matches(" status=0 ").count(), CLIENTS, "{}", ran.show());
    assert!(!log.contains("fatal"), "{}", ran.show());
    // It did run short: more processes were needed than the channels it could hold.
    let mut distinct = pids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() > 10, "{}", ran.show());
}

// ---------------------------------------------------------------- an installation

/// A directory of our own holding copies of the programs, as an installation would;
/// removed when dropped.
struct Install {
    dir: std::path::PathBuf,
}

impl Install {
    fn new(name: &str) -> Install {
        let dir =
            std::env::temp_dir().join(format!("tcpsplice-chain-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for bin in [LISTEN, DIAL, SPLICE] {
            let to = dir.join(std::path::Path::new(bin).file_name().unwrap());
            std::fs::copy(bin, to).unwrap();
        }
        Install { dir }
    }

    /// The path of program `name` in it, as text for a command line.
    fn bin(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for Install {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn exe_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[test]
fn after_an_upgrade_connections_run_the_new_programs() {
    let inst = Install::new("upgrade");
    let dir = &inst.dir;
    let bin = |n: &str| inst.bin(n);
    let (target_l, target_a) = util::listener();
    let target = reversing_target(target_l, 2, Duration::ZERO, Peak::default());
    let tport = target_a.port().to_string();
    let (listen, port) = start_listen_with(
        &[],
        &[
            &bin("tcpsplice-dial"),
            "127.0.0.1",
            &tport,
            &bin("tcpsplice"),
        ],
        &[],
        Command::new(bin("tcpsplice-listen")),
    );
    let data = util::pattern(4, 2000);
    assert_eq!(round_trip(port, &data).0, reversed(&data));
    // Replaced the way package managers do it: a new file renamed over the old one.
    for n in ["tcpsplice-listen", "tcpsplice-dial", "tcpsplice"] {
        let new = dir.join(format!("{n}.new"));
        std::fs::copy(dir.join(n), &new).unwrap();
        std::fs::rename(&new, dir.join(n)).unwrap();
    }
    // A connection process looks at its image at most once a second.
    std::thread::sleep(Duration::from_millis(1100));
    // The next connection, held open to look at it: the old image must not run it.
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"abc").unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let relay_exe = loop {
        let relay = live_relay_of(&listen);
        let exe = exe_of(relay);
        if !exe.contains("tcpsplice-listen") || Instant::now() > end {
            break exe;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    c.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"cba");
    assert_eq!(target.join().unwrap(), 2);
    let ran = stop(listen);
    ran.expect_code(0);
    assert!(
        relay_exe.ends_with("/tcpsplice-dial") && !relay_exe.contains("deleted"),
        "the relay ran from {relay_exe}{}",
        ran.show()
    );
}

#[test]
fn a_wrapper_script_named_like_a_sibling_is_run_not_skipped() {
    let inst = Install::new("wrapper");
    let dir = &inst.dir;
    let real_dial = dir.join("tcpsplice-dial.real");
    std::fs::rename(dir.join("tcpsplice-dial"), &real_dial).unwrap();
    let mark = dir.join("wrapper-ran");
    let wrapper = dir.join("tcpsplice-dial");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ntouch '{}'\nexec '{}' \"$@\"\n",
            mark.display(),
            real_dial.display()
        ),
    )
    .unwrap();
    let mut perm = std::fs::metadata(&wrapper).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&wrapper, perm).unwrap();
    let bin = |n: &str| inst.bin(n);
    let (target_l, target_a) = util::listener();
    let target = reversing_target(target_l, 1, Duration::ZERO, Peak::default());
    let tport = target_a.port().to_string();
    let (listen, port) = start_listen_with(
        &[],
        &[&bin("tcpsplice-dial"), "127.0.0.1", &tport, SPLICE],
        &[],
        Command::new(bin("tcpsplice-listen")),
    );
    let data = util::pattern(5, 100);
    assert_eq!(round_trip(port, &data).0, reversed(&data));
    assert_eq!(target.join().unwrap(), 1);
    let ran = stop(listen);
    ran.expect_code(0);
    assert!(mark.exists(), "the wrapper was skipped{}", ran.show());
    assert!(ran.stderr_text().contains(" reuse=1"), "{}", ran.show());
}

#[test]
fn a_sibling_the_dropped_user_may_not_execute_is_refused_as_by_exec() {
    if !util::is_root() {
        eprintln!("skipped: needs root to drop privileges");
        return;
    }
    let inst = Install::new("perm");
    let dir = &inst.dir;
    // The directory must be searchable by nobody; the dialer executable by root only.
    let mut perm = std::fs::metadata(dir).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(dir, perm).unwrap();
    let dial = dir.join("tcpsplice-dial");
    let mut perm = std::fs::metadata(&dial).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o700);
    std::fs::set_permissions(&dial, perm).unwrap();
    let bin = |n: &str| inst.bin(n);
    // Nothing listens there: the test needs no target, and the old mistake (the
    // dialer running in-process anyway) shows as a refused connect, status 111.
    let tport = util::listener().1.port().to_string();
    // The listener's check of its chain, made as nobody, meets what a connection's exec
    // would: it refuses to start, with exec's code and words.
    let ran = util::run(
        Command::new(bin("tcpsplice-listen"))
            .args(["-u", "nobody", "-1", "127.0.0.1", "0"])
            .args([&bin("tcpsplice-dial"), "127.0.0.1", &tport, SPLICE])
            .env("TCPSPLICE_LOG", "stderr"),
        Duration::from_secs(20),
    );
    ran.expect_code(126);
    assert!(
        ran.stderr_text().contains("Permission denied"),
        "{}",
        ran.show()
    );
}

// ---------------------------------------------------------------- checked at start

const AUTH: &str = env!("CARGO_BIN_EXE_tcpsplice-auth");

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tcpsplice-check-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// tcpsplice-listen with `prog`, expected to refuse to start: its result.
fn refused_start(prog: &[&str]) -> util::Ran {
    util::run(
        Command::new(LISTEN)
            .args(["-1", "127.0.0.1", "0"])
            .args(prog)
            .env("TCPSPLICE_LOG", "stderr"),
        Duration::from_secs(30),
    )
}

#[test]
fn mistakes_in_the_chain_show_at_start_with_the_links_own_message() {
    let dir = scratch("mistakes");
    let users = dir.join("users");
    // A bad rule of the dialer's.
    let ran = refused_start(&[AUTH, "-n", DIAL, "-a", "10.0.0.0/33", SPLICE]);
    ran.expect_code(100);
    assert!(ran.stdout.is_empty(), "a port was printed{}", ran.show());
    assert!(
        ran.stderr_text()
            .contains("tcpsplice-dial: usage: -a: bad rule"),
        "{}",
        ran.show()
    );
    // A users file with an empty hash, which would refuse every login.
    std::fs::write(&users, "alice:\n").unwrap();
    let f = users.to_str().unwrap();
    let ran = refused_start(&[AUTH, "-f", f, DIAL, "-a", "127.0.0.1/32", SPLICE]);
    ran.expect_code(100);
    assert!(
        ran.stderr_text()
            .contains("tcpsplice-auth: fatal: unable to load users"),
        "{}",
        ran.show()
    );
    // A users file that is not there.
    let gone = dir.join("nothing").to_string_lossy().into_owned();
    let ran = refused_start(&[AUTH, "-f", &gone, DIAL, SPLICE]);
    ran.expect_code(100);
    // A checkpassword program, or the next program, that is not there.
    let ran = refused_start(&[AUTH, "-c", "/nonexistent/checkpassword", DIAL, SPLICE]);
    ran.expect_code(127);
    assert!(
        ran.stderr_text()
            .contains("unable to run /nonexistent/checkpassword"),
        "{}",
        ran.show()
    );
    let ran = refused_start(&[AUTH, "-n", "/nonexistent/dial", SPLICE]);
    ran.expect_code(127);
    assert!(
        ran.stderr_text()
            .contains("unable to run /nonexistent/dial"),
        "{}",
        ran.show()
    );
    // A bad option of the splicer's, two links down.
    let ran = refused_start(&[AUTH, "-n", DIAL, "-a", "127.0.0.1/32", SPLICE, "-t", "x"]);
    ran.expect_code(100);
    assert!(
        ran.stderr_text().contains("tcpsplice: usage: -t"),
        "{}",
        ran.show()
    );
    // -h in a link: it would print the usage to every client, and the supervisor's
    // parse ahead would print it and end the server. Each link's own -h.
    for prog in [
        &[AUTH, "-h", DIAL, SPLICE][..],
        &[DIAL, "-h", "127.0.0.1", "9", SPLICE],
        &[DIAL, "127.0.0.1", "9", SPLICE, "--help"],
    ] {
        let ran = refused_start(prog);
        ran.expect_code(100);
        assert!(
            ran.stdout.is_empty()
                && ran
                    .stderr_text()
                    .contains(": usage: -h asks for the usage, in a chain"),
            "{prog:?}{}",
            ran.show()
        );
    }
}

/// A SOCKS5 client of `port`: a no-auth greeting when `pw` is None, else a login; then a
/// CONNECT to 127.0.0.1:9. Returns every byte the proxy sent until it closed.
fn socks5_exchange(port: u16, pw: Option<&str>) -> Vec<u8> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    match pw {
        None => c.write_all(&[5, 1, 0]).unwrap(),
        Some(pw) => {
            let mut m = vec![5, 1, 2, 1, 5];
            m.extend_from_slice(b"alice");
            m.push(pw.len() as u8);
            m.extend_from_slice(pw.as_bytes());
            c.write_all(&m).unwrap();
        }
    }
    let _ = c.write_all(&[5, 1, 0, 1, 127, 0, 0, 1, 0, 9]);
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    got
}

#[test]
fn a_link_that_fails_after_the_start_answers_in_the_clients_protocol() {
    let dir = scratch("later");
    // The dialer, a copy outside the installation (so exec'd for real), is removed
    // after the check: the client gets SOCKS5's general failure, not a bare close.
    let dial = dir.join("tcpsplice-dial");
    std::fs::copy(DIAL, &dial).unwrap();
    let d = dial.to_str().unwrap();
    let (listen, port) = start_listen(&[AUTH, "-n", d, "-a", "127.0.0.1/32", SPLICE], &[]);
    std::fs::remove_file(&dial).unwrap();
    let got = socks5_exchange(port, None);
    assert_eq!(got, [5, 0, 5, 1, 0, 1, 0, 0, 0, 0, 0, 0], "reply");
    let ran = stop(listen);
    assert!(ran.stderr_text().contains(" status=127 "), "{}", ran.show());
    // The users file broken after the start: a login is answered as failed, and the
    // link exits as for a configuration error.
    let users = dir.join("users");
    let f = users.to_str().unwrap();
    let good = "alice:$6$FoNTQ3k2T6n5EFVn$8Iz9IbgBpwhDuPm8YZhLl0cnEyZbI4WFPXyGI1sd0MwhN13DXFqmsEmHnKPw5nvxUWh7iEVGv61J/P/9VMtD/1\n";
    std::fs::write(&users, good).unwrap();
    let (listen, port) = start_listen(&[AUTH, "-f", f, DIAL, "-a", "127.0.0.1/32", SPLICE], &[]);
    std::fs::write(&users, "alice:\n").unwrap();
    let got = socks5_exchange(port, Some("pw"));
    assert_eq!(got, [5, 2, 1, 1], "reply");
    let ran = stop(listen);
    assert!(ran.stderr_text().contains(" status=100 "), "{}", ran.show());
    assert!(
        ran.stderr_text().contains("fatal: unable to load users"),
        "{}",
        ran.show()
    );
}

#[test]
fn with_no_path_a_sibling_named_bare_is_the_one_beside_the_running_binary() {
    // inetd starts services with no PATH at all: `tcpsplice-dial HOST PORT tcpsplice`
    // must still find tcpsplice, whether it continues in-process or is exec'd.
    for exec in ["", "always"] {
        let (l, addr) = util::listener();
        let t = std::thread::spawn(move || {
            let mut s = util::accept_timeout(&l, Duration::from_secs(30));
            s.write_all(b"from the target").expect("write");
        });
        let mut cmd = Command::new(DIAL);
        cmd.env_clear()
            .env("TCPSPLICE_LOG", "stderr")
            .env("TCPSPLICE_EXEC", exec)
            .args(["127.0.0.1", &addr.port().to_string(), "tcpsplice"])
            .stdin(Stdio::null());
        let ran = util::run(&mut cmd, Duration::from_secs(30));
        ran.expect_code(0);
        t.join().expect("target");
        assert_eq!(ran.stdout, b"from the target", "{}", ran.show());
    }
}

const PROXY: &str = env!("CARGO_BIN_EXE_tcpsplice-proxy");

/// What the program at the end of listen → tcpsplice-proxy → tcpsplice-dial → sh finds in
/// its environment for one connection whose PROXY header names 192.0.2.9:4242, one
/// `NAME=value` a line, sorted; `env` is given to the listener beside a stale
/// TCPSPLICE_USER (which it removes) and a variable of the user's (which it keeps).
fn environment_at_the_end(env: &[(&str, &str)]) -> Vec<String> {
    let (target_l, target_a) = util::listener();
    let tport = target_a.port().to_string();
    let mut env = env.to_vec();
    env.extend([
        ("TCPSPLICE_USER", "stale"),
        ("TCPSPLICE_TEST_GIVEN", "kept"),
    ]);
    let prog = [
        PROXY,
        "-a",
        "127.0.0.1/32",
        DIAL,
        "127.0.0.1",
        &tport,
        "sh",
        "-c",
        "env",
    ];
    let (listen, port) = start_listen(&prog, &env);
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"PROXY TCP4 192.0.2.9 198.51.100.1 4242 443\r\n")
        .unwrap();
    let _target = util::accept_timeout(&target_l, Duration::from_secs(10));
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    stop(listen).expect_code(0);
    let mut lines: Vec<String> = out.lines().map(String::from).collect();
    lines.sort();
    lines
}

#[test]
fn what_each_link_sets_reaches_the_next_and_an_execd_program_as_through_real_execs() {
    // proxy and dial continue in the listener's process, sh is exec'd: the variables
    // proxy sets are read by dial in-process, and both links' reach sh.
    let in_process = environment_at_the_end(&[]);
    let execs = environment_at_the_end(&[("TCPSPLICE_EXEC", "always")]);
    let tport_line = in_process
        .iter()
        .find(|l| l.starts_with("TCPREMOTEPORT="))
        .cloned()
        .unwrap_or_default();
    for want in [
        "TCPSPLICE_CLIENT=192.0.2.9:4242",
        "PROTO=TCP",
        "TCPREMOTEIP=127.0.0.1",
        "TCPLOCALIP=127.0.0.1",
        "TCPSPLICE_TEST_GIVEN=kept",
    ] {
        assert!(
            in_process.iter().any(|l| l == want),
            "{want} in {in_process:#?}"
        );
    }
    assert!(tport_line.len() > "TCPREMOTEPORT=".len(), "{in_process:#?}");
    for gone in ["TCPSPLICE_USER=", "TCPSPLICE_CHECK=", "LISTEN_PID="] {
        assert!(
            !in_process.iter().any(|l| l.starts_with(gone)),
            "{gone} in {in_process:#?}"
        );
    }
    // The same environment either way, but for what differs per connection (dial's own
    // port, the target's) and the variable that asked for the execs.
    let per_run = |v: &[String]| -> Vec<String> {
        v.iter()
            .filter(|l| {
                !["TCPLOCALPORT=", "TCPREMOTEPORT=", "TCPSPLICE_EXEC="]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
            .cloned()
            .collect()
    };
    assert_eq!(per_run(&in_process), per_run(&execs));
    assert!(execs.iter().any(|l| l == "TCPSPLICE_EXEC=always"));
}

#[test]
fn a_reused_process_leaks_no_variable_of_one_connection_into_the_next() {
    let (target_l, target_a) = util::listener();
    let target = reversing_target(target_l, 3, Duration::ZERO, Peak::default());
    let tport = target_a.port().to_string();
    let prog = [
        PROXY,
        "-a",
        "127.0.0.1/32",
        DIAL,
        "127.0.0.1",
        &tport,
        SPLICE,
    ];
    let (listen, port) = start_listen_with(&["-r", "3"], &prog, &[], Command::new(LISTEN));
    // A v2 LOCAL header: the balancer's own connection, so TCP* stay the listener's
    // and tcpsplice-dial sets TCPSPLICE_CLIENT unless one is left over (it keeps one it
    // finds set).
    let local = [b"\r\n\r\n\0\r\nQUIT\n".as_slice(), &[0x20, 0x00, 0, 0]].concat();
    let headers: [&[u8]; 3] = [
        b"PROXY TCP4 192.0.2.9 198.51.100.1 4242 443\r\n",
        &local,
        b"PROXY TCP4 192.0.2.10 198.51.100.1 4343 443\r\n",
    ];
    let mut ports = Vec::new();
    for (i, h) in headers.iter().enumerate() {
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        ports.push(c.local_addr().unwrap().port());
        let data = util::pattern(i as u64, 100);
        c.write_all(&[*h, &data].concat()).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        assert_eq!(back, reversed(&data), "connection {i}");
        // Idle again before the next one comes, so that it is this process's (the
        // third is its last: it exits).
        if i < 2 {
            let relay = live_relay_of(&listen);
            wait_no_tcp(relay);
            wait_restored(relay);
        }
    }
    assert_eq!(target.join().unwrap(), 3);
    let ran = stop(listen);
    ran.expect_code(0);
    let log = ran.stderr_text();
    let pids = accepting_pids(&log);
    assert!(
        pids.len() == 3 && pids.iter().all(|&p| p == pids[0]),
        "three connections in one process{}",
        ran.show()
    );
    let ends: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("tcpsplice: info: end client=").nth(1))
        .filter_map(|r| r.split_whitespace().next())
        .collect();
    let second = format!("127.0.0.1:{}", ports[1]);
    assert_eq!(
        ends,
        ["192.0.2.9:4242", second.as_str(), "192.0.2.10:4343"],
        "{}",
        ran.show()
    );
}

// ---------------------------------------------------------------- memory of a lasting connection

/// The stack pointer of `pid` while it waits in poll (/proc/PID/syscall), and the
/// range of its main stack (/proc/PID/maps).
fn stack_of(pid: u32) -> (u64, u64, u64) {
    let sp = loop {
        util::wait_until_polling(pid, Duration::from_secs(10));
        // Still in poll when read again, or looked for once more.
        let s = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap();
        let f: Vec<&str> = s.split_whitespace().collect();
        if f.len() >= 3 {
            break u64::from_str_radix(f[f.len() - 2].trim_start_matches("0x"), 16).unwrap();
        }
    };
    let (lo, hi) = mapping_of(pid, "[stack]");
    (sp, lo, hi)
}

/// The range of the mapping of `pid` named `name` ("[stack]", "[heap]").
fn mapping_of(pid: u32, name: &str) -> (u64, u64) {
    mapping_where(pid, |l| l.ends_with(name))
}

/// The address range of the first line of `pid`'s maps that `pick` takes.
fn mapping_where(pid: u32, pick: impl Fn(&str) -> bool) -> (u64, u64) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let line = maps
        .lines()
        .find(|l| pick(l))
        .unwrap_or_else(|| panic!("no such mapping in {maps}"));
    let range = line.split_whitespace().next().unwrap();
    let (lo, hi) = range.split_once('-').unwrap();
    let hex = |x: &str| u64::from_str_radix(x, 16).unwrap();
    (hex(lo), hex(hi))
}

/// The C library's writable data mapping of `pid` (its file-backed rw-p range).
fn libc_data_of(pid: u32) -> (u64, u64) {
    mapping_where(pid, |l| l.contains(" rw-p ") && l.contains("/libc.so"))
}

/// The pages of `pid` in [from, to) whose /proc/PID/pagemap entry has all of `bits`.
fn pages_with(pid: u32, from: u64, to: u64, bits: u64) -> Vec<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(format!("/proc/{pid}/pagemap")).unwrap();
    f.seek(SeekFrom::Start(from / 4096 * 8)).unwrap();
    let mut buf = vec![0u8; ((to - from) / 4096 * 8) as usize];
    f.read_exact(&mut buf).unwrap();
    buf.chunks_exact(8)
        .enumerate()
        .filter(|(_, e)| u64::from_le_bytes((*e).try_into().unwrap()) & bits == bits)
        .map(|(i, _)| from + i as u64 * 4096)
        .collect()
}

/// The pages of `pid` in [from, to) that are present and its own (/proc/PID/pagemap:
/// bit 63 present, bit 56 exclusively mapped).
fn own_pages(pid: u32, from: u64, to: u64) -> Vec<u64> {
    pages_with(pid, from, to, 1 << 63 | 1 << 56)
}

/// The pages of `pid` in [from, to) that are present (bit 63).
fn present_pages(pid: u32, from: u64, to: u64) -> Vec<u64> {
    pages_with(pid, from, to, 1 << 63)
}

/// Asserts that `relay`, waiting in poll, has the page it waits on and none of its own
/// wholly below `room` bytes under its stack pointer (poll's frame and what the release
/// keeps).
fn assert_no_stack_below(relay: u32, room: u64) {
    let (sp, lo, hi) = stack_of(relay);
    assert!(
        lo <= sp && sp < hi,
        "sp {sp:#x} outside the stack {lo:#x}-{hi:#x}"
    );
    let sp_page = sp & !4095;
    // The page the relay waits on is there (so the pagemap is being read right) ...
    assert_eq!(
        own_pages(relay, sp_page, sp_page + 4096),
        [sp_page],
        "the relay's own page"
    );
    // ... and none below.
    let floor = (sp.saturating_sub(room) & !4095).max(lo);
    let below = own_pages(relay, lo, floor);
    assert!(
        below.is_empty(),
        "stack pages below the relay's frame at sp {sp:#x}: {:?}",
        below.iter().map(|p| format!("{p:#x}")).collect::<Vec<_>>()
    );
}

/// A connection that lasts keeps no stack pages below its relay's frame: the SOCKS5
/// handshake and the dial's check of this host's addresses run deeper than the relay
/// waits, and what they wrote there was each idle connection's own memory
/// (`sys::release_stack_below`, after the relay's first second).
#[test]
fn a_lasting_connection_keeps_no_stack_below_its_relay() {
    let (target_l, target_a) = util::listener();
    let (listen, port) = start_listen(&[AUTH, "-n", DIAL, "-a", "127.0.0.1/32", SPLICE], &[]);
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut req = vec![5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&target_a.port().to_be_bytes());
    client.write_all(&req).unwrap();
    let mut reply = [0u8; 12];
    client.read_exact(&mut reply).unwrap();
    assert_eq!(
        &reply[..4],
        &[5, 0, 5, 0],
        "method choice and success: {reply:?}"
    );
    let target = util::accept_timeout(&target_l, Duration::from_secs(10));
    let relay = live_relay_of(&listen);
    // Past the relay's first second, idle.
    std::thread::sleep(Duration::from_millis(1800));
    // The room the release keeps is half a KiB under a marker a few hundred bytes below
    // the relay's frame. Without the release, the set-up's deepest page was 6-10 KiB
    // below sp in every layout seen (13 runs, debug and release builds), so below this
    // bound.
    assert_no_stack_below(relay, 2048);
    drop((client, target));
    stop(listen);
}

/// A forwarded plain-HTTP request that lasts (a long poll, a slow origin) keeps no stack
/// pages below its relay's frame either: the request head's parsing and the dial ran
/// deeper than the HTTP relay waits (`splice::http`, after the first second).
#[test]
fn a_lasting_forwarded_request_keeps_no_stack_below_its_relay() {
    let (origin_l, origin_a) = util::listener();
    let (listen, port) = start_listen(&[AUTH, "-n", DIAL, "-a", "127.0.0.1/32", SPLICE], &[]);
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let req = format!(
        "GET http://127.0.0.1:{0}/slow HTTP/1.1\r\nHost: 127.0.0.1:{0}\r\n\r\n",
        origin_a.port()
    );
    client.write_all(req.as_bytes()).unwrap();
    // The origin takes the request and holds its answer.
    let mut origin = util::accept_timeout(&origin_l, Duration::from_secs(10));
    origin
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && origin.read(&mut b).unwrap_or(0) == 1 {
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"GET /slow HTTP/1.1\r\n"),
        "the origin got: {:?}",
        String::from_utf8_lossy(&head)
    );
    let relay = live_relay_of(&listen);
    std::thread::sleep(Duration::from_millis(1800));
    // The set-up's deepest page here is the one right under the relay's, so the bound
    // is tighter than the SOCKS5 test's: with 2 KiB it passed without the release in a
    // quarter of the layouts; with 1 KiB it failed 7 of 7 without and passed 8 of 8
    // with.
    assert_no_stack_below(relay, 1024);
    // And the request still completes.
    origin
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"slow") && client.read(&mut b).unwrap_or(0) == 1 {
        got.push(b[0]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200 OK\r\n") && got.ends_with(b"slow"),
        "the client got: {:?}",
        String::from_utf8_lossy(&got)
    );
    drop((client, origin));
    stop(listen);
}

/// Idle connection processes leave the supervisor's heap pages shared: they allocate
/// from the top of the heap, not from the free chunks the supervisor's start-up left on
/// every page (`sys::hold_heap_holes`; its books are not on the heap, see
/// [`connection_processes_have_neither_the_supervisors_books_nor_each_others_channels`]);
/// they read the supervisor's copy of the environment instead
/// of making their own (`environ::remember_for_forks`), and the supervisor's parse of
/// each link's command line instead of parsing it again (`chain::parse_ahead`). Each
/// page one wrote there was a copy, private memory of every idle connection.
#[test]
fn idle_connection_processes_leave_the_supervisors_heap_shared() {
    let (target_l, target_a) = util::listener();
    let tport = target_a.port().to_string();
    assert_idle_heaps_shared(&[DIAL, "127.0.0.1", &tport, SPLICE], &target_l, None);
}

/// As [`idle_connection_processes_leave_the_supervisors_heap_shared`], for the SOCKS5
/// chain: tcpsplice-auth's command line too is parsed ahead, and the target comes
/// from the client.
#[test]
fn idle_socks5_connection_processes_leave_the_supervisors_heap_shared() {
    let (target_l, target_a) = util::listener();
    let chain = [AUTH, "-n", DIAL, "-a", "127.0.0.1/32", SPLICE];
    assert_idle_heaps_shared(&chain, &target_l, Some(target_a.port()));
}

/// The supervisor's books of its connection processes are not in their memory: it
/// writes them after each fork, and a page it wrote there was a copy for the process
/// forked before (`sys::NotForked`). So a process cannot close the other processes'
/// channels from the books: its scan of close-on-exec descriptors does, and none holds
/// another's.
#[test]
fn connection_processes_have_neither_the_supervisors_books_nor_each_others_channels() {
    const CONNS: usize = 3;
    let (target_l, target_a) = util::listener();
    let tport = target_a.port().to_string();
    let (listen, port) = start_listen(&[DIAL, "127.0.0.1", &tport, SPLICE], &[]);
    // Its anonymous private mappings, before any process is forked.
    let anonymous = |pid: u32| -> Vec<String> {
        std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .unwrap()
            .lines()
            .filter(|l| l.split_whitespace().count() == 5 && l.contains(" rw-p 00000000 00:00 0"))
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .collect()
    };
    let before = anonymous(listen.id());
    // The supervisor's mappings marked not to be copied at a fork (VmFlags "dc"): its
    // books, whatever else it holds.
    let not_forked: Vec<String> = {
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", listen.id())).unwrap();
        let mut range = String::new();
        let mut v = Vec::new();
        for l in smaps.lines() {
            let first = l.split_whitespace().next().unwrap_or("");
            if first.contains('-') && !first.ends_with(':') {
                range = first.to_string();
            } else if first == "VmFlags:" && l.split_whitespace().any(|f| f == "dc") {
                v.push(range.clone());
            }
        }
        v
    };
    assert!(
        !not_forked.is_empty(),
        "the supervisor has no mapping kept from its children"
    );
    let mut held = Vec::new();
    for _ in 0..CONNS {
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        held.push((
            client,
            util::accept_timeout(&target_l, Duration::from_secs(10)),
        ));
    }
    let end = Instant::now() + Duration::from_secs(10);
    let relays = loop {
        let live = live_children(&listen);
        if live.len() >= CONNS || Instant::now() > end {
            break live;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(relays.len(), CONNS, "connection processes: {relays:?}");
    let listening = tcp_inodes(true);
    for &relay in &relays {
        util::wait_until_polling(relay, Duration::from_secs(10));
        let theirs = anonymous(relay);
        let inherited: Vec<&String> = not_forked.iter().filter(|m| theirs.contains(m)).collect();
        assert!(
            inherited.is_empty() && not_forked.iter().all(|m| before.contains(m)),
            "process {relay} has the supervisor's books {inherited:?} (of {not_forked:?}, \
             mapped before it forked: {before:?})"
        );
        // Its descriptors but the connection's (0, 1, 6, 7: the supervisor may not have
        // closed its copy of a socket it handed over yet) on a socket the supervisor
        // holds: the listeners only.
        let supervisors: Vec<String> = socket_inodes(listen.id())
            .into_iter()
            .filter(|l| !listening.contains(l))
            .collect();
        let shared: Vec<i32> = fds_on(relay, &supervisors)
            .into_iter()
            .filter(|fd| ![0, 1, 6, 7].contains(fd))
            .collect();
        assert!(
            shared.is_empty(),
            "process {relay} holds the supervisor's sockets on {shared:?}"
        );
    }
    drop(held);
    stop(listen);
}

/// Holds idle connections through `chain` (SOCKS5 to `socks_to` when Some) and asserts
/// each connection process's own heap pages are few, and copies of the supervisor's.
fn assert_idle_heaps_shared(chain: &[&str], target_l: &TcpListener, socks_to: Option<u16>) {
    const CONNS: usize = 24;
    // A few pages of start-up data, whatever the environment the tests run in.
    let filler: Vec<(String, String)> = (0..48)
        .map(|i| (format!("TCPSPLICE_TEST_FILLER_{i}"), "x".repeat(300)))
        .collect();
    let env: Vec<(&str, &str)> = filler
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (listen, port) = start_listen(chain, &env);
    let mut held = Vec::new();
    for _ in 0..CONNS {
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        if let Some(tp) = socks_to {
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let p = tp.to_be_bytes();
            client
                .write_all(&[5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, p[0], p[1]])
                .unwrap();
            let mut replies = [0u8; 12];
            client.read_exact(&mut replies).unwrap();
            assert_eq!(replies[..4], [5, 0, 5, 0], "method choice, then success");
        }
        let target = util::accept_timeout(target_l, Duration::from_secs(10));
        held.push((client, target));
    }
    let end = Instant::now() + Duration::from_secs(10);
    let mut relays = loop {
        let live = live_children(&listen);
        if live.len() >= CONNS || Instant::now() > end {
            break live;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(relays.len(), CONNS, "connection processes: {relays:?}");
    relays.sort_unstable();
    for &r in &relays {
        util::wait_until_polling(r, Duration::from_secs(10));
    }
    // Past the relays' first second, when they give back what they no longer use.
    std::thread::sleep(Duration::from_millis(1500));
    let (lo, hi) = mapping_of(listen.id(), "[heap]");
    let theirs = present_pages(listen.id(), lo, hi);
    let show = |ps: &[u64]| ps.iter().map(|p| (p - lo) / 4096).collect::<Vec<_>>();
    // The test's own: the filler alone is three and a half pages.
    assert!(
        theirs.len() >= 8,
        "the supervisor's heap pages: {:?}",
        show(&theirs)
    );
    for &relay in &relays {
        let (clo, chi) = mapping_of(relay, "[heap]");
        assert_eq!(lo, clo, "the heap starts where the supervisor's does");
        // Its first second's give-back left the heap as long (`sys::release_free_heap`):
        // moving the break down writes malloc's state and the C library's break, on
        // the C library's data pages, which then stop being shared.
        assert!(
            chi >= hi,
            "connection process {relay}'s heap ends at {chi:#x}, the supervisor's at {hi:#x}"
        );
        let (dlo, dhi) = libc_data_of(relay);
        let data = own_pages(relay, dlo, dhi);
        // Measured (glibc 2.36): one page of the two, malloc's state written by its own
        // allocations; with the heap trimmed, both.
        assert!(
            data.len() <= 1,
            "connection process {relay}'s own pages of the C library's data: {} of {}",
            data.len(),
            (dhi - dlo) / 4096
        );
        // All of its heap, up to its own top: what it grew past the supervisor's counts.
        let own = own_pages(relay, clo, chi);
        let copied: Vec<u64> = theirs.iter().copied().filter(|p| own.contains(p)).collect();
        // Measured (2026-12-02, release and debug builds): 4 or 5 pages of its own, all
        // of them the supervisor's: malloc's per-thread cache on the first page, and
        // those where its allocations after start-up sit (then the supervisor's books
        // were still on the heap: those it wrote after this fork and before the next were
        // one or two of them). With the links' command lines parsed
        // in each process rather than ahead by the supervisor, 6 or 7; with the
        // supervisor's free chunks left to them, 16; with those held but each process's
        // own copy of the environment, 10.
        assert!(
            own.len() <= 5 && copied.len() <= 5,
            "connection process {relay}'s own heap pages: {:?}, of which copies of the \
             supervisor's: {:?}, of its {:?}",
            show(&own),
            show(&copied),
            show(&theirs)
        );
    }
    drop(held);
    stop(listen);
}
