//! tcpsplice-dial: the chain `tcpsplice-dial HOST PORT tcpsplice` as a port forwarder
//! (pipes, a socket, xinetd, systemd-socket-activate, tcpserver), the target rules, the
//! replies a waiting SOCKS/HTTP client gets, PROXY headers and the environment.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::util::{self, Ran};

const DIAL: &str = env!("CARGO_BIN_EXE_tcpsplice-dial");
const SPLICE: &str = env!("CARGO_BIN_EXE_tcpsplice");
const LIMIT: Duration = Duration::from_secs(30);
const UP: u64 = 1 << 20;
const DOWN: u64 = 3 << 19;

/// tcpsplice-dial with logs on stderr and none of the variables a caller might leak in.
fn dial() -> Command {
    let mut c = Command::new(DIAL);
    c.env("TCPSPLICE_LOG", "stderr");
    for v in [
        "TCPSPLICE_TARGET",
        "TCPSPLICE_REPLY",
        "TCPSPLICE_RULES",
        "TCPSPLICE_CLIENT",
        "TCPSPLICE_USER",
        "PROTO",
        "TCPREMOTEIP",
        "TCPREMOTEPORT",
        "TCPLOCALIP",
        "TCPLOCALPORT",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
    ] {
        c.env_remove(v);
    }
    c
}

fn stdio(s: &TcpStream) -> Stdio {
    Stdio::from(OwnedFd::from(s.try_clone().expect("dup socket")))
}

/// What a target saw of one connection.
struct Seen {
    data: Vec<u8>,
    peer: SocketAddr,
}

/// A target that reads until end of file, then answers `DOWN` bytes of pattern 2 and
/// closes. Answering only after the client's end of file checks that the half-close went
/// through and that the answer still comes back.
fn target() -> (SocketAddr, JoinHandle<Seen>) {
    let (l, addr) = util::listener();
    let h = std::thread::spawn(move || {
        let mut s = util::accept_timeout(&l, LIMIT);
        s.set_read_timeout(Some(LIMIT)).expect("read timeout");
        let peer = s.peer_addr().expect("peer");
        let mut data = Vec::new();
        s.read_to_end(&mut data).expect("target read");
        // A client that has gone makes this fail; the client's own check then tells.
        let _ = util::send_pattern(&mut s, 2, DOWN);
        Seen { data, peer }
    });
    (addr, h)
}

/// A port on which nothing listens (bound and closed at once).
fn closed_port() -> u16 {
    let (l, a) = util::listener();
    drop(l);
    a.port()
}

/// The client's side over a socket: send `UP` bytes of pattern 1, half-close, read all.
fn talk(c: TcpStream) -> (u64, u64) {
    try_talk(c).expect("client")
}

fn try_talk(mut c: TcpStream) -> std::io::Result<(u64, u64)> {
    c.set_read_timeout(Some(LIMIT))?;
    let w = c.try_clone()?;
    let writer = std::thread::spawn(move || {
        let mut w = w;
        let h = util::send_pattern(&mut w, 1, UP)?;
        w.shutdown(Shutdown::Write)?;
        Ok::<_, std::io::Error>(h)
    });
    let got = util::recv_hash(&mut c);
    let sent = writer.join().expect("writer");
    let got = got?;
    assert_eq!(sent?, util::hash_of(&util::pattern(1, UP as usize)));
    Ok(got)
}

fn check_seen(seen: Seen) {
    assert_eq!(
        util::hash_of(&seen.data),
        util::hash_of(&util::pattern(1, UP as usize)),
        "the target did not receive the client's bytes"
    );
}

fn down_hash() -> (u64, u64) {
    util::hash_of(&util::pattern(2, DOWN as usize))
}

/// Runs tcpsplice-dial with `args` and stdin on /dev/null, and checks its exit code.
fn run_dial<S: AsRef<std::ffi::OsStr>>(args: impl IntoIterator<Item = S>, code: i32) -> Ran {
    let mut cmd = dial();
    cmd.args(args).stdin(Stdio::null());
    let ran = util::run(&mut cmd, LIMIT);
    ran.expect_code(code);
    ran
}

#[test]
fn pipeline_with_pipes_moves_both_ways_with_half_close() {
    let (addr, seen) = target();
    let mut child = dial()
        .args(["127.0.0.1", &addr.port().to_string(), SPLICE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || util::send_pattern(&mut stdin, 1, UP));
    let mut out = child.stdout.take().expect("stdout");
    let got = util::recv_hash(&mut out).expect("read stdout");
    writer.join().expect("writer").expect("write stdin");
    let ran = util::finish(child, "tcpsplice-dial 127.0.0.1 PORT tcpsplice", LIMIT);
    ran.expect_code(0);
    assert_eq!(got, down_hash(), "{}", ran.show());
    check_seen(seen.join().expect("target"));
    // No client address in a pipeline: the splicer must not log the target as the client.
    assert!(ran.stderr_text().contains("client=-"), "{}", ran.show());
}

#[test]
fn socket_on_0_1_2_moves_both_ways_and_carries_no_log_text() {
    // As inetd does: fd 0, 1 and 2 are all the client's socket. Logging to stderr is
    // asked for, so only the guard against writing on a socket keeps it off the stream.
    let (addr, seen) = target();
    let (mine, theirs) = util::tcp_pair();
    let child = dial()
        .args(["127.0.0.1", &addr.port().to_string(), SPLICE])
        .stdin(stdio(&theirs))
        .stdout(stdio(&theirs))
        .stderr(stdio(&theirs))
        .spawn()
        .expect("spawn");
    drop(theirs);
    let got = talk(mine);
    let ran = util::finish(child, "tcpsplice-dial (inetd style)", LIMIT);
    ran.expect_code(0);
    assert_eq!(
        got,
        down_hash(),
        "the client got other bytes than the target's"
    );
    check_seen(seen.join().expect("target"));
}

#[test]
fn failure_under_inetd_style_writes_nothing_to_the_client() {
    let (mine, theirs) = util::tcp_pair();
    let child = dial()
        .args(["127.0.0.1", &closed_port().to_string(), SPLICE])
        .stdin(stdio(&theirs))
        .stdout(stdio(&theirs))
        .stderr(stdio(&theirs))
        .spawn()
        .expect("spawn");
    drop(theirs);
    let ran = util::finish(child, "tcpsplice-dial to a closed port", LIMIT);
    ran.expect_code(111);
    let mut mine = mine;
    mine.set_read_timeout(Some(LIMIT)).expect("timeout");
    let mut got = Vec::new();
    mine.read_to_end(&mut got).expect("read");
    assert!(
        got.is_empty(),
        "the client received {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// Runs `prog` (a shell script) after tcpsplice-dial with the client socket on 0/1 and
/// returns the variables it saw, one `NAME=value` per line, and what the target saw.
fn env_after_dial(
    extra: &[(&str, &str)],
    args: &[&str],
) -> (Vec<String>, Seen, SocketAddr, SocketAddr, Ran) {
    let (addr, seen) = target();
    let (mine, theirs) = util::tcp_pair();
    let client_addr = mine.local_addr().expect("local");
    let dir = tempdir("env");
    let envfile = dir.join("env");
    let mut cmd = dial();
    cmd.envs(extra.iter().copied())
        .args(args)
        .args(["127.0.0.1", &addr.port().to_string()])
        .args([
            "sh",
            "-c",
            // The connection must be on 6 (read) and 7 (write), kept across exec.
            "env > \"$0\"; printf ping >&7; exec 7>&-; exec 6<&-",
        ])
        .arg(&envfile)
        .stdin(stdio(&theirs))
        .stdout(stdio(&theirs))
        .stderr(Stdio::piped());
    drop(theirs);
    let child = cmd.spawn().expect("spawn");
    let ran = util::finish(child, "tcpsplice-dial ... sh -c env", LIMIT);
    ran.expect_code(0);
    drop(mine);
    let seen = seen.join().expect("target");
    let text = std::fs::read_to_string(&envfile).expect("env file");
    let _ = std::fs::remove_dir_all(&dir);
    (
        text.lines().map(String::from).collect(),
        seen,
        client_addr,
        addr,
        ran,
    )
}

fn has(env: &[String], line: &str) -> bool {
    env.iter().any(|l| l == line)
}

#[test]
fn environment_describes_the_upstream_and_keeps_the_client() {
    let (env, seen, client, target, ran) = env_after_dial(
        &[
            ("LISTEN_FDS", "1"),
            ("LISTEN_PID", "1"),
            ("LISTEN_FDNAMES", "x"),
            ("TCPREMOTEHOST", "client.example"),
        ],
        &[],
    );
    assert_eq!(
        seen.data,
        b"ping",
        "fd 7 is not the connection{}",
        ran.show()
    );
    let want = [
        "PROTO=TCP".to_string(),
        format!("TCPSPLICE_CLIENT=127.0.0.1:{}", client.port()),
        "TCPREMOTEIP=127.0.0.1".to_string(),
        format!("TCPREMOTEPORT={}", target.port()),
        "TCPLOCALIP=127.0.0.1".to_string(),
        format!("TCPLOCALPORT={}", seen.peer.port()),
    ];
    for w in &want {
        assert!(has(&env, w), "missing {w} in {env:#?}");
    }
    for gone in [
        "LISTEN_FDS=",
        "LISTEN_PID=",
        "LISTEN_FDNAMES=",
        "TCPREMOTEHOST=",
        "TCPSPLICE_REPLY=",
    ] {
        assert!(
            !env.iter().any(|l| l.starts_with(gone)),
            "{gone} still set: {env:#?}"
        );
    }
}

#[test]
fn client_from_the_supervisor_variables_survives() {
    let (env, _, _, _, _) = env_after_dial(
        &[
            ("PROTO", "TCP"),
            ("TCPREMOTEIP", "192.0.2.9"),
            ("TCPREMOTEPORT", "4321"),
            ("TCPLOCALIP", "192.0.2.1"),
            ("TCPLOCALPORT", "1080"),
        ],
        &[],
    );
    assert!(has(&env, "TCPSPLICE_CLIENT=192.0.2.9:4321"), "{env:#?}");
    assert!(has(&env, "TCPREMOTEIP=127.0.0.1"), "{env:#?}");
}

#[test]
fn source_address_and_family_options() {
    let (env, seen, _, _, ran) = env_after_dial(&[], &["-4", "-D", "-k", "-s", "127.0.0.2"]);
    assert_eq!(seen.peer.ip().to_string(), "127.0.0.2", "{}", ran.show());
    assert!(has(&env, "TCPLOCALIP=127.0.0.2"), "{env:#?}");
    let ran = run_dial(["-6", "127.0.0.1", "1", "true"], 111);
    assert!(
        ran.stderr_text().contains("no IPv6 address"),
        "{}",
        ran.show()
    );
}

#[test]
fn nodelay_and_keepalive_are_set_on_fd_6() {
    let (addr, _seen) = target();
    let script = "import socket; s = socket.socket(fileno=6); \
                  print(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0, \
                  s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0); s.detach()";
    let port = addr.port().to_string();
    let mut with = dial();
    with.args(["-D", "-k", "127.0.0.1", &port, "python3", "-c", script])
        .stdin(Stdio::null());
    let ran = util::run(&mut with, LIMIT);
    ran.expect_code(0);
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout).trim(),
        "True True",
        "{}",
        ran.show()
    );
    // And not by default.
    let (addr, _seen) = target();
    let port = addr.port().to_string();
    let mut without = dial();
    without
        .args(["127.0.0.1", &port, "python3", "-c", script])
        .stdin(Stdio::null());
    let ran = util::run(&mut without, LIMIT);
    ran.expect_code(0);
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout).trim(),
        "False False",
        "{}",
        ran.show()
    );
}

#[test]
fn source_auto_uses_the_address_the_client_connected_to() {
    let (addr, seen) = target();
    let l = TcpListener::bind("127.0.0.3:0").expect("bind 127.0.0.3");
    let mine = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let theirs = util::accept_timeout(&l, LIMIT);
    let child = dial()
        .args(["-s", "auto", "127.0.0.1", &addr.port().to_string(), SPLICE])
        .stdin(stdio(&theirs))
        .stdout(stdio(&theirs))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(theirs);
    assert_eq!(talk(mine), down_hash());
    util::finish(child, "tcpsplice-dial -s auto", LIMIT).expect_code(0);
    let seen = seen.join().expect("target");
    assert_eq!(seen.peer.ip().to_string(), "127.0.0.3");
}

// --- supervisors -----------------------------------------------------------------------

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "tcpsplice-dial-{tag}-{}-{:?}",
        std::process::id(),
        Instant::now()
    ));
    let d = PathBuf::from(d.to_string_lossy().replace([' ', '{', '}', ':', ','], ""));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn free_port() -> u16 {
    closed_port()
}

/// A client through the supervisor on `port`; `log` tells the supervisor's side of a
/// failure.
fn forward_through(port: u16, log: impl Fn() -> String) {
    let got = TcpStream::connect(("127.0.0.1", port)).and_then(try_talk);
    match got {
        Ok(h) => assert_eq!(
            h,
            down_hash(),
            "the client got other bytes than the target's"
        ),
        Err(e) => panic!(
            "client through port {port}: {e}\n--- supervisor log:\n{}",
            log()
        ),
    }
}

/// An example file of the repository with its paths, host and ports put on loopback.
fn example(name: &str, target: SocketAddr, edits: &[(&str, &str)]) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    let mut text = std::fs::read_to_string(&path).expect("example file");
    let t = format!("127.0.0.1 {}", target.port());
    let mut all: Vec<(&str, &str)> = vec![
        ("db.internal 5432", &t),
        ("/usr/local/bin/tcpsplice-dial", DIAL),
        ("/usr/local/bin/tcpsplice", SPLICE),
    ];
    all.extend_from_slice(edits);
    for (from, to) in all {
        assert!(text.contains(from), "{name} has no {from:?}");
        text = text.replace(from, to);
    }
    text
}

#[test]
fn forwarder_as_inetd_runs_it() {
    // The line of examples/inetd.conf, run as inetd runs a nowait service: environment
    // cleared, fds 0, 1 and 2 all the accepted socket. (openbsd-inetd itself conflicts
    // with the xinetd package that the next test drives.) With no /dev/log and no
    // TCPSPLICE_LOG the messages have nowhere safe to go, and must not go onto the stream.
    use std::os::unix::process::CommandExt;
    let (addr, seen) = target();
    let line = example("inetd.conf", addr, &[]);
    let fields: Vec<&str> = line
        .lines()
        .find(|l| !l.starts_with('#') && !l.trim().is_empty())
        .expect("a service line")
        .split_whitespace()
        .collect();
    assert_eq!(&fields[1..4], ["stream", "tcp", "nowait"], "{fields:?}");
    let (path, argv0, args) = (fields[5], fields[6], &fields[7..]);
    let (mine, theirs) = util::tcp_pair();
    let child = Command::new(path)
        .arg0(argv0)
        .args(args)
        .env_clear()
        .stdin(stdio(&theirs))
        .stdout(stdio(&theirs))
        .stderr(stdio(&theirs))
        .spawn()
        .expect("spawn the inetd.conf line");
    drop(theirs);
    assert_eq!(
        talk(mine),
        down_hash(),
        "the client got other bytes than the target's"
    );
    util::finish(child, "examples/inetd.conf line", LIMIT).expect_code(0);
    check_seen(seen.join().expect("target"));
}

#[test]
fn forwarder_under_xinetd() {
    let (addr, seen) = target();
    let dir = tempdir("xinetd");
    let port = free_port();
    let listen =
        format!("port           = {port}\n    bind = 127.0.0.1\n    env = TCPSPLICE_LOG=stderr");
    let conf_text = example(
        "tcpsplice-forward.xinetd",
        addr,
        &[
            ("port           = 5432", &listen),
            ("user           = nobody", "user = root"),
        ],
    );
    let conf = dir.join("xinetd.conf");
    std::fs::write(&conf, conf_text).expect("write conf");
    let log = dir.join("log");
    let mut sup = util::Supervisor(
        Command::new("xinetd")
            .arg("-dontfork")
            .arg("-f")
            .arg(&conf)
            .arg("-filelog")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn xinetd (apt-get install xinetd)"),
    );
    util::wait_listening(port, &mut sup.0, "xinetd");
    // Listening is not enough: the port may be someone else's if xinetd could not bind.
    let ready = "Started working: 1 available service";
    let end = Instant::now() + LIMIT;
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    while !read_log().contains(ready) {
        assert!(Instant::now() < end, "xinetd not ready:\n{}", read_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    forward_through(port, read_log);
    check_seen(seen.join().expect("target"));
    drop(sup);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn forwarder_under_systemd_socket_activate() {
    // The ExecStart= of the example unit, under systemd's own helper for Accept=yes.
    let (addr, seen) = target();
    let port = free_port();
    let dir = tempdir("systemd");
    let log = dir.join("log");
    let unit = example("tcpsplice-forward@.service", addr, &[]);
    let exec: Vec<&str> = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart=")
        .split_whitespace()
        .collect();
    let mut sup = util::Supervisor(
        Command::new("systemd-socket-activate")
            .args(["--inetd", "-a", "-l", &format!("127.0.0.1:{port}")])
            .args(["-E", "TCPSPLICE_LOG=stderr"])
            .args(&exec)
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).expect("log file")))
            .spawn()
            .expect("spawn systemd-socket-activate"),
    );
    util::wait_listening(port, &mut sup.0, "systemd-socket-activate");
    // Its stderr is where the programs' messages go (fd 2 is not the socket here).
    forward_through(port, || std::fs::read_to_string(&log).unwrap_or_default());
    check_seen(seen.join().expect("target"));
    drop(sup);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn forwarder_under_tcpserver_keeps_the_client_address() {
    let (addr, seen) = target();
    let dir = tempdir("tcpserver");
    let envfile = dir.join("env");
    let mut child = Command::new("tcpserver")
        .args(["-1", "-R", "-H", "-l0", "127.0.0.1", "0"])
        .args([DIAL, "127.0.0.1", &addr.port().to_string()])
        .args(["sh", "-c", "env > \"$0\"; exec \"$1\""])
        .arg(&envfile)
        .arg(SPLICE)
        .env("TCPSPLICE_LOG", "stderr")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tcpserver (apt-get install ucspi-tcp)");
    let mut out = child.stdout.take().expect("stdout");
    let sup = util::Supervisor(child);
    // -1: tcpserver prints the port it bound, then serves.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while out.read(&mut b).map(|n| n == 1).unwrap_or(false) && b[0] != b'\n' {
            line.push(b[0]);
        }
        let _ = tx.send(String::from_utf8_lossy(&line).trim().to_string());
    });
    let port: u16 = rx
        .recv_timeout(LIMIT)
        .expect("tcpserver printed no port")
        .parse()
        .expect("tcpserver port");
    let c = TcpStream::connect(("127.0.0.1", port)).expect("connect tcpserver");
    let client = c.local_addr().expect("local");
    assert_eq!(talk(c), down_hash());
    check_seen(seen.join().expect("target"));
    drop(sup);
    let env = std::fs::read_to_string(&envfile).expect("env file");
    let want = format!("TCPSPLICE_CLIENT=127.0.0.1:{}", client.port());
    assert!(env.lines().any(|l| l == want), "no {want} in {env}");
    assert!(
        env.lines()
            .any(|l| l == format!("TCPREMOTEPORT={}", addr.port())),
        "TCPREMOTEPORT does not describe the target: {env}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// --- client-chosen targets --------------------------------------------------------------

/// Runs the dialer for a client-chosen target with stdin/stdout piped (no reply style),
/// `prog` = `true`.
fn run_target(target: &str, args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut cmd = dial();
    cmd.env("TCPSPLICE_TARGET", target)
        .envs(env.iter().copied())
        .args(args)
        .arg("true")
        .stdin(Stdio::null());
    util::run(&mut cmd, LIMIT)
}

/// Whether a connection is waiting on `l` (checked without blocking).
fn has_connection(l: &TcpListener) -> bool {
    l.set_nonblocking(true).expect("nonblocking");
    l.accept().is_ok()
}

#[test]
fn loopback_target_is_denied_by_default_and_never_connected() {
    let (l, addr) = util::listener();
    let ran = run_target(&format!("127.0.0.1:{}", addr.port()), &[], &[]);
    ran.expect_code(1);
    assert!(ran.stderr_text().contains("loopback"), "{}", ran.show());
    assert!(!has_connection(&l), "a denied address was connected to");
    // A rule for another port does not lift it either.
    let other = format!("127.0.0.0/8:{}", addr.port() ^ 1);
    let ran = run_target(&format!("127.0.0.1:{}", addr.port()), &["-a", &other], &[]);
    ran.expect_code(1);
    assert!(!has_connection(&l), "a denied address was connected to");
    // Names are checked after resolution, as IPv4-mapped literals are.
    let ran = run_target(&format!("localhost:{}", addr.port()), &[], &[]);
    ran.expect_code(1);
    let ran = run_target(&format!("[::ffff:127.0.0.1]:{}", addr.port()), &[], &[]);
    ran.expect_code(1);
    assert!(!has_connection(&l), "a denied address was connected to");
}

#[test]
fn rules_for_most_of_the_address_space_open_no_denied_range() {
    // 0.0.0.0/1 holds 0/8, 10/8 and 127/8, ::/1 holds ::1: like 0.0.0.0/0 they lift
    // none of them, and neither do the user's rules on top.
    let (l, addr) = util::listener();
    let l6 = TcpListener::bind(("::1", addr.port())).expect("bind ::1 on the same port");
    let port = addr.port();
    for (target, rules, user) in [
        (format!("127.0.0.1:{port}"), &["-a", "0.0.0.0/1"][..], None),
        (format!("0.0.0.0:{port}"), &["-a", "0.0.0.0/1"], None),
        (format!("[::1]:{port}"), &["-a", "::/1"], None),
        (format!("127.0.0.1:{port}"), &["-a", "96.0.0.0/3"], None),
        (
            format!("127.0.0.1:{port}"),
            &["-a", "0.0.0.0/1"],
            Some("127.0.0.0/8"),
        ),
        (format!("127.0.0.1:{port}"), &["-a", "*"], Some("127.0.0.1")),
        (format!("[::1]:{port}"), &["-a", "*"], Some("[::1]:1-65535")),
    ] {
        let env: Vec<(&str, &str)> = user.iter().map(|u| ("TCPSPLICE_RULES", *u)).collect();
        let ran = run_target(&target, rules, &env);
        ran.expect_code(1);
        assert!(
            ran.stderr_text().contains("default deny list"),
            "{target} {rules:?} {user:?}{}",
            ran.show()
        );
        assert!(
            !has_connection(&l) && !has_connection(&l6),
            "{target} with {rules:?} and user rules {user:?} was connected to"
        );
    }
    // A rule inside the denied range still opens it.
    run_target(&format!("127.0.0.1:{port}"), &["-a", "127.0.0.0/8"], &[]).expect_code(0);
    assert!(
        has_connection(&l),
        "-a 127.0.0.0/8 no longer opens loopback"
    );
}

#[test]
fn ipv4_translated_addresses_are_denied() {
    // ::ffff:0:a.b.c.d (SIIT, RFC 2765) is not the mapped ::ffff:a.b.c.d: refused
    // outright, before any connect(), with or without a rule for every address.
    let (l, addr) = util::listener();
    let port = addr.port();
    let target = format!("[::ffff:0:127.0.0.1]:{port}");
    let any = format!("*:{port}");
    for rules in [&[][..], &["-a", &any]] {
        let (got, ran) = reply_run("socks5", &target, rules);
        ran.expect_code(1);
        assert_eq!(got, [5, 2, 0, 1, 0, 0, 0, 0, 0, 0], "{}", ran.show());
        assert!(
            ran.stderr_text()
                .contains("not allowed: ::ffff:0:7f00:1 is IPv4-translated"),
            "{}",
            ran.show()
        );
    }
    assert!(!has_connection(&l), "a denied address was connected to");
}

#[test]
fn a_refused_target_is_a_warning_naming_the_client_and_the_user() {
    let (l, addr) = util::listener();
    let target = format!("127.0.0.1:{}", addr.port());
    let (got, ran) = reply_run_with(
        "socks5",
        &target,
        &[],
        &[
            ("TCPSPLICE_USER", "alice"),
            ("TCPREMOTEIP", "192.0.2.9"),
            ("TCPREMOTEPORT", "4711"),
        ],
    );
    ran.expect_code(1);
    assert_eq!(&got[..2], &[5, 2], "{}", ran.show());
    let log = ran.stderr_text();
    assert!(
        log.contains("tcpsplice-dial: warning: refused client=192.0.2.9:4711 user=alice: "),
        "{}",
        ran.show()
    );
    assert!(
        !log.contains("fatal"),
        "a refusal logged as fatal{}",
        ran.show()
    );
    assert!(!has_connection(&l));
}

#[test]
fn allow_rule_lets_a_loopback_target_through() {
    let (addr, seen) = target();
    let rule = format!("127.0.0.0/8:{}", addr.port());
    let (mine, theirs) = util::tcp_pair();
    let child = dial()
        .env("TCPSPLICE_TARGET", format!("127.0.0.1:{}", addr.port()))
        .args(["-a", &rule, SPLICE])
        .stdin(stdio(&theirs))
        .stdout(stdio(&theirs))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(theirs);
    assert_eq!(talk(mine), down_hash());
    util::finish(child, "tcpsplice-dial -a RULE", LIMIT).expect_code(0);
    check_seen(seen.join().expect("target"));
}

#[test]
fn user_rules_restrict_further() {
    let (l, addr) = util::listener();
    let target = format!("127.0.0.1:{}", addr.port());
    let ran = run_target(
        &target,
        &["-a", "127.0.0.0/8"],
        &[("TCPSPLICE_RULES", "192.0.2.0/24 [::1]:22")],
    );
    ran.expect_code(1);
    assert!(
        ran.stderr_text().contains("TCPSPLICE_RULES"),
        "{}",
        ran.show()
    );
    assert!(!has_connection(&l), "connected despite the user's rules");
    let mine = format!("192.0.2.0/24 127.0.0.1:{}", addr.port());
    run_target(
        &target,
        &["-a", "127.0.0.0/8"],
        &[("TCPSPLICE_RULES", &mine)],
    )
    .expect_code(0);
    assert!(
        has_connection(&l),
        "the user's rule did not let the target through"
    );
    // A broken rule is a configuration error.
    run_target(
        &target,
        &["-a", "127.0.0.0/8"],
        &[("TCPSPLICE_RULES", "10.0.0.1/8")],
    )
    .expect_code(100);
}

#[test]
fn ipv6_target_in_brackets_needs_a_bracketed_rule() {
    let l = TcpListener::bind("[::1]:0").expect("bind ::1");
    let port = l.local_addr().expect("addr").port();
    let target = format!("[::1]:{port}");
    run_target(&target, &[], &[]).expect_code(1);
    assert!(!has_connection(&l), "::1 connected without a rule");
    run_target(&target, &["-a", &format!("[::1]:{port}")], &[]).expect_code(0);
    assert!(
        has_connection(&l),
        "the rule [::1]:PORT did not let ::1 through"
    );
}

#[test]
fn only_the_allowed_addresses_of_a_name_are_used() {
    let names = TwoFamilies::new();
    let name = &names.name;
    // The same port on both; only 127.0.0.1 is allowed, and ::1 must stay untouched.
    let (v4, v6) = (0..50)
        .find_map(|_| {
            let a = TcpListener::bind("127.0.0.1:0").ok()?;
            let port = a.local_addr().ok()?.port();
            let b = TcpListener::bind(("::1", port)).ok()?;
            Some((a, b))
        })
        .expect("no port free on both addresses");
    let port = v4.local_addr().expect("addr").port();
    let h = std::thread::spawn(move || {
        let mut s = util::accept_timeout(&v4, LIMIT);
        s.write_all(b"reached").expect("write");
    });
    let mut cmd = dial();
    cmd.env("TCPSPLICE_TARGET", format!("{name}:{port}"))
        .args(["-a", &format!("127.0.0.1:{port}"), SPLICE])
        .stdin(Stdio::null());
    let ran = util::run(names.apply(&mut cmd), LIMIT);
    ran.expect_code(0);
    h.join().expect("listener");
    assert_eq!(ran.stdout, b"reached", "{}", ran.show());
    assert!(
        ran.stderr_text()
            .contains(&format!("not connecting to [::1]:{port}")),
        "{}",
        ran.show()
    );
    assert!(!has_connection(&v6), "a denied address was connected to");
}

// --- every address, timeouts ------------------------------------------------------------

/// A name that resolves to ::1 and 127.0.0.1 for the dialers a test runs, and its
/// addresses in the order they get them. `localhost` does on many systems; elsewhere the
/// name is one of our own, in a hosts file that only the dialer sees (a mount namespace
/// of its own, as root): the machine's /etc/hosts is never changed.
struct TwoFamilies {
    name: String,
    addrs: Vec<SocketAddr>,
    hosts: Option<PathBuf>,
}

const TWO_FAMILY_NAME: &str = "two-families.tcpsplice.test";

impl TwoFamilies {
    fn new() -> TwoFamilies {
        let two = |v: &[SocketAddr]| v.iter().any(|a| a.is_ipv4()) && v.iter().any(|a| a.is_ipv6());
        let a: Vec<SocketAddr> = ("localhost", 1)
            .to_socket_addrs()
            .map(|a| a.collect())
            .unwrap_or_default();
        if two(&a) {
            return TwoFamilies {
                name: "localhost".into(),
                addrs: a,
                hosts: None,
            };
        }
        assert!(
            util::is_root(),
            "localhost resolves to one family, and a hosts file of our own needs root"
        );
        let hosts = tempdir("hosts").join("hosts");
        let text = format!("::1 {TWO_FAMILY_NAME}\n127.0.0.1 {TWO_FAMILY_NAME}\n");
        std::fs::write(&hosts, text).expect("write hosts file");
        let mut t = TwoFamilies {
            name: TWO_FAMILY_NAME.into(),
            addrs: Vec::new(),
            hosts: Some(hosts),
        };
        // The order is getaddrinfo's (RFC 6724 sorting, /etc/gai.conf), as the dialer
        // will get it: asked in the same namespace.
        let mut cmd = Command::new("python3");
        cmd.args([
            "-c",
            "import socket, sys\n\
             for a in socket.getaddrinfo(sys.argv[1], 1, type=socket.SOCK_STREAM):\n\
             \tprint(a[4][0])",
            TWO_FAMILY_NAME,
        ]);
        let ran = util::run(t.apply(&mut cmd), LIMIT);
        ran.expect_code(0);
        t.addrs = String::from_utf8_lossy(&ran.stdout)
            .lines()
            .map(|ip| SocketAddr::new(ip.parse().expect("an address"), 1))
            .collect();
        assert!(two(&t.addrs), "{TWO_FAMILY_NAME} resolves to {:?}", t.addrs);
        t
    }

    /// Makes `cmd` see the name.
    fn apply<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        if let Some(h) = &self.hosts {
            util::with_hosts_file(cmd, h);
        }
        cmd
    }
}

impl Drop for TwoFamilies {
    fn drop(&mut self) {
        let etc = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        if let Some(h) = self.hosts.take() {
            let _ = std::fs::remove_dir_all(h.parent().expect("temp dir"));
        }
        if !std::thread::panicking() {
            assert!(
                !etc.contains(TWO_FAMILY_NAME),
                "/etc/hosts of the machine was changed:\n{etc}"
            );
        }
    }
}

/// `run_dial` for a target named by `names`.
fn run_dial_named<S: AsRef<std::ffi::OsStr>>(
    names: &TwoFamilies,
    args: impl IntoIterator<Item = S>,
    code: i32,
) -> Ran {
    let mut cmd = dial();
    cmd.args(args).stdin(Stdio::null());
    let ran = util::run(names.apply(&mut cmd), LIMIT);
    ran.expect_code(code);
    ran
}

#[test]
fn every_address_is_tried_when_the_first_refuses() {
    let names = TwoFamilies::new();
    let (name, addrs) = (&names.name, &names.addrs);
    // Listen on the address tried last, on a port where the first one refuses.
    let last = addrs[addrs.len() - 1];
    let first = addrs[0];
    let l = TcpListener::bind(SocketAddr::new(last.ip(), 0)).expect("bind last family");
    let port = l.local_addr().expect("addr").port();
    assert!(
        TcpStream::connect(SocketAddr::new(first.ip(), port)).is_err(),
        "something listens on {first} port {port}"
    );
    let h = std::thread::spawn(move || {
        let mut s = util::accept_timeout(&l, LIMIT);
        s.write_all(b"reached").expect("write");
    });
    let ran = run_dial_named(&names, [name, &port.to_string(), SPLICE], 0);
    h.join().expect("listener");
    assert_eq!(ran.stdout, b"reached", "{}", ran.show());
    let refused = format!("unable to connect to {}", SocketAddr::new(first.ip(), port));
    assert!(
        ran.stderr_text().contains(&refused),
        "the first address was not tried{}",
        ran.show()
    );
}

/// A listener whose accept queue is full, so that further SYNs go unanswered: a target
/// that never answers, on loopback. Keep the returned streams alive.
fn unanswering_target() -> (TcpListener, SocketAddr, Vec<TcpStream>) {
    unanswering_on(TcpListener::bind("127.0.0.1:0").expect("bind"))
}

fn unanswering_on(l: TcpListener) -> (TcpListener, SocketAddr, Vec<TcpStream>) {
    let addr = l.local_addr().expect("addr");
    // SAFETY: listen on a descriptor the TcpListener owns; only the backlog changes.
    let r = unsafe { libc::listen(l.as_raw_fd(), 0) };
    assert_eq!(r, 0, "listen(0)");
    let mut fill = Vec::new();
    for _ in 0..3 {
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            fill.push(s);
        }
    }
    (l, addr, fill)
}

#[test]
fn a_silent_first_address_does_not_hold_up_the_next() {
    let names = TwoFamilies::new();
    let (name, addrs) = (&names.name, &names.addrs);
    let (first, last) = (addrs[0].ip(), addrs[addrs.len() - 1].ip());
    // The first address never answers; the last one, on the same port, does.
    let (silent, good) = (0..50)
        .find_map(|_| {
            let s = TcpListener::bind(SocketAddr::new(first, 0)).ok()?;
            let port = s.local_addr().ok()?.port();
            let g = TcpListener::bind(SocketAddr::new(last, port)).ok()?;
            Some((s, g))
        })
        .expect("no port free on both addresses");
    let port = good.local_addr().expect("addr").port();
    let (_silent, _, _fill) = unanswering_on(silent);
    let h = std::thread::spawn(move || {
        let mut s = util::accept_timeout(&good, LIMIT);
        s.write_all(b"reached").expect("write");
    });
    let ran = run_dial_named(&names, ["-t", "5", name, &port.to_string(), SPLICE], 0);
    h.join().expect("listener");
    assert_eq!(ran.stdout, b"reached", "{}", ran.show());
    // Tried in turn, the first address would have timed out before the second was tried.
    assert!(
        !ran.stderr_text().contains("timed out"),
        "the second address waited for the first{}",
        ran.show()
    );
}

#[test]
fn connect_timeout_is_bounded_and_exits_111() {
    let (_l, addr, _fill) = unanswering_target();
    let mut cmd = dial();
    cmd.args(["-t", "0.5", "127.0.0.1", &addr.port().to_string(), "true"])
        .stdin(Stdio::null());
    // The run limit bounds the time; the status and message say it was our timeout.
    let ran = util::run(&mut cmd, Duration::from_secs(10));
    ran.expect_code(111);
    assert!(ran.stderr_text().contains("timed out"), "{}", ran.show());
}

// --- replies to a waiting client ---------------------------------------------------------

/// Runs the dialer for a client-chosen target with a reply style, the client socket on
/// 0/1; returns what the client read (all of it: the dialer closes on failure) and the
/// result. On success the chain goes on to tcpsplice, and `after` talks through it.
fn reply_run(style: &str, target: &str, args: &[&str]) -> (Vec<u8>, Ran) {
    reply_run_with(style, target, args, &[])
}

/// [`reply_run`] with more variables in the dialer's environment (the client, the user).
fn reply_run_with(
    style: &str,
    target: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Vec<u8>, Ran) {
    let (mut mine, theirs) = util::tcp_pair();
    let child = dial()
        .env("TCPSPLICE_TARGET", target)
        .env("TCPSPLICE_REPLY", style)
        .envs(env.iter().copied())
        .args(args)
        .arg(SPLICE)
        .stdin(stdio(&theirs))
        .stdout(stdio(&theirs))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(theirs);
    mine.set_read_timeout(Some(LIMIT)).expect("timeout");
    mine.shutdown(Shutdown::Write).expect("half-close");
    let mut got = Vec::new();
    mine.read_to_end(&mut got).expect("read reply");
    (
        got,
        util::finish(
            child,
            &format!("tcpsplice-dial reply={style} {target}"),
            LIMIT,
        ),
    )
}

/// The bodies of the HTTP failures: what went wrong, and what to do instead.
const REFUSED: &str =
    "Connection refused by the target: check the port, and that its service runs.\n";
const NOT_ALLOWED: &str = "Target not allowed: this proxy's rules do not let it reach that \
    address and port (private, loopback and link-local ones need a rule); ask for another \
    target.\n";
const TIMED_OUT: &str = "Connection timed out: the target did not answer; check its address \
    and port, or try again later.\n";

fn http_failure(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn replies_on_success() {
    for style in ["socks5", "socks4", "http"] {
        let (addr, seen) = {
            // This target sends nothing: the client must see the reply and then end of file.
            let (l, addr) = util::listener();
            let h = std::thread::spawn(move || {
                let mut s = util::accept_timeout(&l, LIMIT);
                s.set_read_timeout(Some(LIMIT)).expect("timeout");
                let peer = s.peer_addr().expect("peer");
                let mut data = Vec::new();
                s.read_to_end(&mut data).expect("read");
                Seen { data, peer }
            });
            (addr, h)
        };
        let rule = format!("127.0.0.1:{}", addr.port());
        let (got, ran) = reply_run(style, &rule, &["-a", &rule]);
        ran.expect_code(0);
        let bound = seen.join().expect("target").peer;
        let ip = match bound {
            SocketAddr::V4(a) => a.ip().octets(),
            SocketAddr::V6(_) => panic!("IPv6 upstream for 127.0.0.1"),
        };
        let p = bound.port().to_be_bytes();
        let want: Vec<u8> = match style {
            "socks5" => [&[5, 0, 0, 1][..], &ip, &p].concat(),
            "socks4" => [&[0, 0x5a][..], &p, &ip].concat(),
            _ => b"HTTP/1.1 200 Connection established\r\n\r\n".to_vec(),
        };
        assert_eq!(got, want, "{style} success reply{}", ran.show());
    }
}

#[test]
fn socks5_reply_for_an_ipv6_upstream() {
    let l = TcpListener::bind("[::1]:0").expect("bind ::1");
    let port = l.local_addr().expect("addr").port();
    let h = std::thread::spawn(move || {
        let s = util::accept_timeout(&l, LIMIT);
        s.peer_addr().expect("peer")
    });
    let target = format!("[::1]:{port}");
    let (got, ran) = reply_run("socks5", &target, &["-a", &target]);
    ran.expect_code(0);
    let bound = h.join().expect("listener");
    let mut want = vec![5, 0, 0, 4];
    want.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    want.extend_from_slice(&bound.port().to_be_bytes());
    assert_eq!(got, want, "{}", ran.show());
}

#[test]
fn replies_on_refusal_denial_and_timeout() {
    let refused = format!("127.0.0.1:{}", closed_port());
    let refused_rule = ["-a", "127.0.0.0/8"];
    let (_l, slow, _fill) = unanswering_target();
    let slow = slow.to_string();
    let slow_args = ["-a", "127.0.0.0/8", "-t", "0.5"];
    type Case<'a> = (&'a str, &'a [&'a str], i32, Vec<u8>, Vec<u8>, Vec<u8>);
    let cases: [Case; 3] = [
        (
            &refused,
            &refused_rule,
            111,
            vec![5, 5, 0, 1, 0, 0, 0, 0, 0, 0],
            vec![0, 0x5b, 0, 0, 0, 0, 0, 0],
            http_failure("502 Bad Gateway", REFUSED),
        ),
        (
            &refused,
            &[],
            1,
            vec![5, 2, 0, 1, 0, 0, 0, 0, 0, 0],
            vec![0, 0x5b, 0, 0, 0, 0, 0, 0],
            http_failure("403 Forbidden", NOT_ALLOWED),
        ),
        (
            &slow,
            &slow_args,
            111,
            vec![5, 6, 0, 1, 0, 0, 0, 0, 0, 0],
            vec![0, 0x5b, 0, 0, 0, 0, 0, 0],
            http_failure("504 Gateway Timeout", TIMED_OUT),
        ),
    ];
    for (target, args, code, s5, s4, http) in cases {
        for (style, want) in [("socks5", s5), ("socks4", s4), ("http", http)] {
            let (got, ran) = reply_run(style, target, args);
            ran.expect_code(code);
            assert_eq!(
                got,
                want,
                "{style} reply for {target} {args:?}: got {:?}{}",
                String::from_utf8_lossy(&got),
                ran.show()
            );
        }
    }
}

#[test]
fn failure_reply_is_all_the_client_gets_when_fd_2_is_its_socket() {
    // inetd style plus a waiting HTTP client: the warning and the fatal message must not
    // be mixed into the answer.
    let (mut mine, theirs) = util::tcp_pair();
    let child = dial()
        .env("TCPSPLICE_TARGET", format!("127.0.0.1:{}", closed_port()))
        .env("TCPSPLICE_REPLY", "http")
        .args(["-a", "127.0.0.0/8", SPLICE])
        .stdin(stdio(&theirs))
        .stdout(stdio(&theirs))
        .stderr(stdio(&theirs))
        .spawn()
        .expect("spawn");
    drop(theirs);
    mine.set_read_timeout(Some(LIMIT)).expect("timeout");
    let mut got = Vec::new();
    mine.read_to_end(&mut got).expect("read");
    util::finish(child, "tcpsplice-dial reply=http, fd 2 = client", LIMIT).expect_code(111);
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&http_failure("502 Bad Gateway", REFUSED))
    );
}

// --- PROXY protocol ----------------------------------------------------------------------

/// The dialer with `-p version` and the client socket on 0/1 (inetd style); returns the
/// bytes the target received, the client's address and the address it connected to.
fn proxy_header(version: &str) -> (Vec<u8>, SocketAddr, SocketAddr) {
    let (addr, seen) = target();
    let (l, laddr) = util::listener();
    let mine = TcpStream::connect(laddr).expect("connect");
    let theirs = util::accept_timeout(&l, LIMIT);
    let child = dial()
        .args(["-p", version, "127.0.0.1", &addr.port().to_string(), SPLICE])
        .stdin(stdio(&theirs))
        .stdout(stdio(&theirs))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(theirs);
    let client = mine.local_addr().expect("local");
    let mut mine = mine;
    mine.write_all(b"DATA").expect("write");
    mine.shutdown(Shutdown::Write).expect("half-close");
    let mut sink = Vec::new();
    mine.set_read_timeout(Some(LIMIT)).expect("timeout");
    mine.read_to_end(&mut sink).expect("read");
    util::finish(child, "tcpsplice-dial -p", LIMIT).expect_code(0);
    (seen.join().expect("target").data, client, laddr)
}

#[test]
fn proxy_v1_header_byte_for_byte() {
    let (data, client, local) = proxy_header("1");
    let want = format!(
        "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\nDATA",
        client.port(),
        local.port()
    );
    assert_eq!(String::from_utf8_lossy(&data), want);
}

#[test]
fn proxy_v2_header_byte_for_byte() {
    let (data, client, local) = proxy_header("2");
    let mut want = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    want.extend_from_slice(&[0x21, 0x11, 0, 12, 127, 0, 0, 1, 127, 0, 0, 1]);
    want.extend_from_slice(&client.port().to_be_bytes());
    want.extend_from_slice(&local.port().to_be_bytes());
    want.extend_from_slice(b"DATA");
    assert_eq!(data, want);
}

#[test]
fn proxy_headers_without_a_known_client() {
    for (version, want) in [
        ("1", b"PROXY UNKNOWN\r\n".to_vec()),
        (
            "2",
            [&b"\r\n\r\n\0\r\nQUIT\n"[..], &[0x20, 0, 0, 0]].concat(),
        ),
    ] {
        let (addr, seen) = target();
        run_dial(
            ["-p", version, "127.0.0.1", &addr.port().to_string(), SPLICE],
            0,
        );
        assert_eq!(seen.join().expect("target").data, want, "-p {version}");
    }
}

#[test]
fn usage_errors_exit_100() {
    for args in [
        &["127.0.0.1", "1"][..],
        &["127.0.0.1", "0", "true"],
        &["-a", "10.1.2.3/8", "127.0.0.1", "1", "true"],
        &["-p", "3", "127.0.0.1", "1", "true"],
        &["-t", "0", "127.0.0.1", "1", "true"],
    ] {
        let ran = run_dial(args, 100);
        assert!(
            ran.stderr_text().contains("tcpsplice-dial: "),
            "{}",
            ran.show()
        );
    }
}

#[test]
fn exec_failure_exits_127() {
    let (l, addr) = util::listener();
    run_dial(
        ["127.0.0.1", &addr.port().to_string(), "/nonexistent/prog"],
        127,
    );
    assert!(has_connection(&l), "exec was tried before connecting");
}

#[test]
fn an_address_local_only_for_the_bound_source_is_this_hosts_own() {
    // A rule that picks a table by source can make an address local for connections
    // from one source only (`-s`): the routing table is asked with that source, as the
    // connect will follow it. Needs a network namespace of our own: root.
    if !util::is_root() {
        eprintln!("skipped: needs root for a network namespace");
        return;
    }
    const LISTEN: &str = env!("CARGO_BIN_EXE_tcpsplice-listen");
    let dir = tempdir("srcroute");
    let d = dir.display();
    let script = format!(
        "ip link set lo up && ip addr add 10.9.9.9/32 dev lo && \
         ip rule add from 10.9.9.9 lookup 100 pref 50 && \
         ip route add local 45.30.0.0/24 dev lo table 100 || exit 99\n\
         '{LISTEN}' -1 0.0.0.0 5557 echo SELF > '{d}/p' & l=$!\n\
         n=0; while [ $n -lt 200 ] && ! [ -s '{d}/p' ]; do sleep 0.05; n=$((n+1)); done\n\
         dial() {{ t=$1; shift; TCPSPLICE_TARGET=$t '{DIAL}' \"$@\" sh -c 'head -c 4 <&6; echo'; printf '%s,' $?; }}\n\
         dial 45.30.0.7:5557 -s 10.9.9.9\n\
         sleep 0.2; kill $l; wait; echo end"
    );
    let ran = util::run(
        Command::new("unshare")
            .args(["-n", "sh", "-c", &script])
            .env("TCPSPLICE_LOG", "stderr")
            .env_remove("TCPSPLICE_RULES"),
        LIMIT,
    );
    let _ = std::fs::remove_dir_all(&dir);
    ran.expect_code(0);
    let out = String::from_utf8_lossy(&ran.stdout);
    // Refused from that source (exit 1), before any SYN: asked without the source, the
    // table has no route for it, and the connect from 10.9.9.9 was tried (and timed
    // out, 111: the kernel cannot answer from an address local in table 100 only).
    assert!(out.contains("1,end"), "{}", ran.show());
    let err = ran.stderr_text();
    assert!(
        err.contains("a local route delivers it to this host"),
        "{}",
        ran.show()
    );
    assert_eq!(
        err.matches(": accept ").count(),
        0,
        "the canary listener accepted a refused connection{}",
        ran.show()
    );
}

#[test]
fn an_address_reached_through_a_local_route_is_this_hosts_own() {
    // A local route makes a whole prefix this host's without an interface address for
    // getifaddrs to show (AnyIP). Needs a network namespace of our own: root. Canary
    // listeners on such addresses must never accept a refused connection: the route is
    // asked before connecting.
    if !util::is_root() {
        eprintln!("skipped: needs root for a network namespace");
        return;
    }
    const LISTEN: &str = env!("CARGO_BIN_EXE_tcpsplice-listen");
    let dir = tempdir("localroute");
    let d = dir.display();
    let script = format!(
        "ip link set lo up && ip route add local 45.10.20.0/24 dev lo && \
         ip -6 route add local 2a01:4f8:dead::/64 dev lo || exit 99\n\
         '{LISTEN}' -1 45.10.20.7 5555 echo SELF > '{d}/p4' & l4=$!\n\
         '{LISTEN}' -1 :: 5556 echo SELF > '{d}/p6' & l6=$!\n\
         n=0; while [ $n -lt 200 ] && ! [ -s '{d}/p4' -a -s '{d}/p6' ]; do sleep 0.05; n=$((n+1)); done\n\
         dial() {{ t=$1; shift; TCPSPLICE_TARGET=$t '{DIAL}' \"$@\" sh -c 'head -c 4 <&6; echo'; printf '%s,' $?; }}\n\
         dial 45.10.20.7:5555\n\
         dial '[2a01:4f8:dead::7]:5556'\n\
         dial 45.10.20.7:5555 -a 45.10.20.0/24\n\
         dial 45.10.20.7:5555 -a 45.10.20.7\n\
         dial '[2a01:4f8:dead::7]:5556' -a 2a01:4f8:dead::7\n\
         sleep 0.2; kill $l4 $l6; wait; echo end"
    );
    let ran = util::run(
        Command::new("unshare")
            .args(["-n", "sh", "-c", &script])
            .env("TCPSPLICE_LOG", "stderr")
            .env_remove("TCPSPLICE_RULES"),
        LIMIT,
    );
    let _ = std::fs::remove_dir_all(&dir);
    ran.expect_code(0);
    let out = String::from_utf8_lossy(&ran.stdout);
    // Refused without a rule naming the address (a rule for its /24 is not one); with
    // one, reached (the listener says SELF).
    assert!(out.contains("1,1,1,SELF\n0,SELF\n0,end"), "{}", ran.show());
    let err = ran.stderr_text();
    assert_eq!(
        err.matches("a local route delivers it to this host")
            .count(),
        3,
        "{}",
        ran.show()
    );
    assert_eq!(
        err.matches(": accept ").count(),
        2,
        "a canary listener accepted a refused connection{}",
        ran.show()
    );
}
