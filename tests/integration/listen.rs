//! tcpsplice-listen: the real binary over loopback TCP with simple programs per
//! connection (`cat` as an echo server, `sh -c` printing its environment, `sleep`).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::io::FromRawFd;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util;

const BIN: &str = env!("CARGO_BIN_EXE_tcpsplice-listen");
const LIMIT: Duration = Duration::from_secs(20);

/// A running tcpsplice-listen: its port (from `-1`) and its log as it grows.
struct Server {
    child: Option<Child>,
    pid: i32,
    port: u16,
    log: Arc<Mutex<String>>,
    log_reader: Option<std::thread::JoinHandle<()>>,
    desc: String,
}

impl Server {
    /// Starts `tcpsplice-listen -1 ARGS...` and waits for the port it prints.
    fn start(args: &[&str]) -> Server {
        Server::start_cmd(Command::new(BIN).arg("-1").args(args))
    }

    fn start_cmd(cmd: &mut Command) -> Server {
        cmd.env("TCPSPLICE_LOG", "stderr")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let desc = format!("{cmd:?}");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {desc}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("stderr");
        let log2 = log.clone();
        let log_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                log2.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut out = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while let Ok(1) = out.read(&mut b) {
                if b[0] == b'\n' {
                    let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
                    line.clear();
                } else {
                    line.push(b[0]);
                }
            }
        });
        let pid = child.id() as i32;
        let mut s = Server {
            child: Some(child),
            pid,
            port: 0,
            log,
            log_reader: Some(log_reader),
            desc,
        };
        match rx.recv_timeout(LIMIT) {
            Ok(line) => {
                s.port = line
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("not a port: {line:?}{}", s.show()))
            }
            Err(_) => panic!("no port printed{}", s.show()),
        }
        assert_ne!(s.port, 0, "printed port 0{}", s.show());
        s
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn show(&self) -> String {
        format!(
            "\n--- command: {}\n--- log so far:\n{}",
            self.desc,
            self.log()
        )
    }

    /// Waits (bounded) until the log holds `needle` at least `times` times.
    fn wait_log(&self, needle: &str, times: usize) {
        let end = Instant::now() + LIMIT;
        while self.log().matches(needle).count() < times {
            assert!(
                Instant::now() < end,
                "log never had {times} x {needle:?}{}",
                self.show()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill takes integers; the pid is our unreaped child.
        assert_eq!(unsafe { libc::kill(self.pid, sig) }, 0, "kill");
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port))
            .unwrap_or_else(|e| panic!("connect: {e}{}", self.show()));
        s.set_read_timeout(Some(LIMIT)).unwrap();
        s
    }

    fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits (bounded) for the listener to exit.
    /// Waits (bounded) for the listener to exit, then for its log to be read whole.
    fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("already waited");
        let status = match util::wait_timeout(&mut child, LIMIT) {
            Some(s) => s,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("listener did not exit{}", self.show());
            }
        };
        // Every line is in the pipe once the server is gone; wait (bounded) until the
        // reader has it all, i.e. until end of file unless a child still holds stderr.
        if let Some(h) = self.log_reader.take() {
            let end = Instant::now() + Duration::from_secs(5);
            while !h.is_finished() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        status
    }

    /// SIGTERM, then the exit status, which must be 0, and the whole log.
    fn stop(mut self) -> String {
        self.signal(libc::SIGTERM);
        let st = self.wait();
        assert_eq!(st.code(), Some(0), "exit status {st:?}{}", self.show());
        self.log()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends `msg` and reads back exactly as many bytes.
fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).expect("write");
    let mut back = vec![0; msg.len()];
    s.read_exact(&mut back).expect("read echo");
    back
}

fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).expect("read to end of file");
    v
}

/// A client connection from a chosen loopback source address (127.0.0.2 is as local as
/// 127.0.0.1 on Linux), for the per-source limit.
fn connect_from(src: Ipv4Addr, port: u16) -> TcpStream {
    let to = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    // SAFETY: plain socket calls on a descriptor we own, then handed to TcpStream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket");
        let mut sin: libc::sockaddr_in = std::mem::zeroed();
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_addr.s_addr = u32::from(src).to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(
            libc::bind(fd, (&sin as *const libc::sockaddr_in).cast(), len),
            0,
            "bind {src}"
        );
        let s = TcpStream::from_raw_fd(fd);
        let SocketAddr::V4(t) = to else {
            unreachable!()
        };
        sin.sin_addr.s_addr = u32::from(*t.ip()).to_be();
        sin.sin_port = t.port().to_be();
        assert_eq!(
            libc::connect(fd, (&sin as *const libc::sockaddr_in).cast(), len),
            0,
            "connect from {src}: {}",
            std::io::Error::last_os_error()
        );
        s.set_read_timeout(Some(LIMIT)).unwrap();
        s
    }
}

/// The user+system CPU time of a process, in seconds.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // After "pid (comm) ": state is field 3 of proc(5), so utime (14) is at 11.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

/// Children of `pid` in zombie state (exited, not reaped).
fn zombies_of(pid: i32) -> Vec<String> {
    let mut z = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        if f.len() > 1 && f[1] == pid.to_string() && f[0] == "Z" {
            z.push(stat.clone());
        }
    }
    z
}

#[test]
fn echo_keeps_data_intact_through_half_close() {
    let srv = Server::start(&["127.0.0.1", "0", "cat"]);
    let mut c = srv.connect();
    let mut w = c.try_clone().unwrap();
    let len = 8 << 20;
    let writer = std::thread::spawn(move || {
        let h = util::send_pattern(&mut w, 7, len).expect("send");
        util::half_close(&w);
        h
    });
    let got = util::recv_hash(&mut c).expect("receive the echo");
    let sent = writer.join().unwrap();
    assert_eq!(got, sent, "echo differs{}", srv.show());
    srv.wait_log(" status=0 ", 1);
    let log = srv.stop();
    assert!(log.contains("accept pid="), "{log}");
}

#[test]
fn child_gets_ucspi_variables_and_only_its_own_output() {
    let srv = Server::start(&[
        "127.0.0.1",
        "0",
        "sh",
        "-c",
        "printf '%s %s %s %s %s|%s' \"$PROTO\" \"$TCPREMOTEIP\" \"$TCPREMOTEPORT\" \
         \"$TCPLOCALIP\" \"$TCPLOCALPORT\" \"${LISTEN_FDS-}${TCPSPLICE_CLIENT-}\"",
    ]);
    let mut c = srv.connect();
    let me = c.local_addr().unwrap().port();
    let got = String::from_utf8(read_all(&mut c)).unwrap();
    assert_eq!(
        got,
        format!("TCP 127.0.0.1 {me} 127.0.0.1 {}|", srv.port),
        "{}",
        srv.show()
    );
    srv.wait_log(" status=0 ", 1);
    let log = srv.stop();
    assert!(
        log.contains(&format!("listening on 127.0.0.1:{}", log_port(&log))),
        "{log}"
    );
    assert!(log.contains(&format!("client=127.0.0.1:{me} ")), "{log}");
}

fn log_port(log: &str) -> String {
    log.split("listening on 127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap_or("")
        .to_string()
}

#[test]
fn stale_connection_variables_are_not_passed_on() {
    let mut cmd = Command::new(BIN);
    cmd.args(["-1", "127.0.0.1", "0", "sh", "-c"])
        .arg("printf '%s|%s|%s' \"${TCPSPLICE_CLIENT-unset}\" \"${LISTEN_PID-unset}\" \"$TCPREMOTEIP\"")
        .env("TCPSPLICE_CLIENT", "192.0.2.1:1")
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .env("TCPREMOTEIP", "192.0.2.9");
    let srv = Server::start_cmd(&mut cmd);
    let mut c = srv.connect();
    let got = String::from_utf8(read_all(&mut c)).unwrap();
    assert_eq!(got, "unset|unset|127.0.0.1", "{}", srv.show());
    srv.stop();
}

#[test]
fn ipv6_loopback() {
    let srv = Server::start(&[
        "::1",
        "0",
        "sh",
        "-c",
        "printf '%s %s %s %s' \"$PROTO\" \"$TCPREMOTEIP\" \"$TCPLOCALIP\" \"$TCPLOCALPORT\"",
    ]);
    let mut c = TcpStream::connect(("::1", srv.port)).expect("connect ::1");
    c.set_read_timeout(Some(LIMIT)).unwrap();
    let got = String::from_utf8(read_all(&mut c)).unwrap();
    assert_eq!(got, format!("TCP ::1 ::1 {}", srv.port), "{}", srv.show());
    srv.wait_log("client=[::1]:", 2);
    srv.stop();
}

#[test]
fn dual_stack_wildcard_shows_ipv4_clients_as_ipv4() {
    let v6only = std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").unwrap_or_default();
    if v6only.trim() != "0" {
        // `::` takes no IPv4 clients on this host: nothing to check.
        return;
    }
    let srv = Server::start(&[
        "::",
        "0",
        "sh",
        "-c",
        "printf '%s %s %s' \"$TCPREMOTEIP\" \"$TCPREMOTEPORT\" \"$TCPLOCALIP\"",
    ]);
    let mut c = srv.connect();
    let me = c.local_addr().unwrap().port();
    let got = String::from_utf8(read_all(&mut c)).unwrap();
    assert_eq!(got, format!("127.0.0.1 {me} 127.0.0.1"), "{}", srv.show());
    srv.wait_log(&format!("client=127.0.0.1:{me} status=0"), 1);
    srv.stop();
}

#[test]
fn host_name_is_resolved() {
    let srv = Server::start(&["localhost", "0", "sh", "-c", "printf '%s' \"$TCPLOCALIP\""]);
    srv.wait_log("listening on ", 1);
    let log = srv.log();
    let addr: SocketAddr = log
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in the log{}", srv.show()));
    assert!(addr.ip().is_loopback(), "{addr}");
    let mut c = TcpStream::connect(addr).expect("connect to what localhost resolved to");
    c.set_read_timeout(Some(LIMIT)).unwrap();
    let got = String::from_utf8(read_all(&mut c)).unwrap();
    assert_eq!(got, addr.ip().to_string(), "{}", srv.show());
    srv.stop();
}

#[test]
fn children_hold_no_listener_or_signalfd() {
    // Every descriptor of the program, as `fd -> target`; only 0 and 1 may be sockets,
    // and no signalfd may leak (its signals would stay blocked elsewhere).
    let srv = Server::start(&[
        "127.0.0.1",
        "0",
        "sh",
        "-c",
        "for f in /proc/$$/fd/*; do printf '%s -> %s\\n' \"${f##*/}\" \"$(readlink $f)\"; done; \
         exec grep -E '^Sig(Blk|Ign)' /proc/self/status",
    ]);
    let mut c = srv.connect();
    let got = String::from_utf8(read_all(&mut c)).unwrap();
    let sockets: Vec<&str> = got.lines().filter(|l| l.contains("socket:")).collect();
    assert_eq!(sockets.len(), 2, "{got}{}", srv.show());
    assert!(
        sockets
            .iter()
            .all(|l| l.starts_with("0 ->") || l.starts_with("1 ->")),
        "{got}"
    );
    assert!(!got.contains("signalfd"), "{got}");
    assert!(
        got.contains("SigBlk:\t0000000000000000"),
        "signals still blocked: {got}"
    );
    srv.stop();
}

#[test]
fn global_limit_defers_the_third_connection() {
    let srv = Server::start(&["-c", "2", "127.0.0.1", "0", "cat"]);
    let mut c1 = srv.connect();
    let mut c2 = srv.connect();
    assert_eq!(roundtrip(&mut c1, b"one"), b"one");
    assert_eq!(roundtrip(&mut c2, b"two"), b"two");
    let mut c3 = srv.connect();
    let p1 = c1.local_addr().unwrap().port();
    let p3 = c3.local_addr().unwrap().port();
    c3.write_all(b"three").unwrap();
    // While two connections run, the third waits in the backlog: not accepted, no echo.
    assert_eq!(roundtrip(&mut c2, b"again"), b"again");
    c3.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 5];
    let early = c3.read(&mut b);
    assert!(
        early.is_err(),
        "third client served early: {early:?}{}",
        srv.show()
    );
    assert!(
        !srv.log().contains(&format!("client=127.0.0.1:{p3} ")),
        "third connection accepted over the limit{}",
        srv.show()
    );
    util::half_close(&c1);
    assert!(read_all(&mut c1).is_empty());
    c3.set_read_timeout(Some(LIMIT)).unwrap();
    c3.read_exact(&mut b)
        .expect("third client echoed after the first ended");
    assert_eq!(&b, b"three");
    srv.wait_log(&format!("client=127.0.0.1:{p3} count="), 1);
    let log = srv.log();
    let end1 = log
        .find(&format!("client=127.0.0.1:{p1} status="))
        .expect("end of the first connection logged");
    let acc3 = log
        .find(&format!("client=127.0.0.1:{p3} count="))
        .expect("third connection accepted");
    assert!(end1 < acc3, "accepted before a slot was free:\n{log}");
    drop((c2, c3));
    srv.wait_log(" status=0 ", 3);
    srv.stop();
}

#[test]
fn per_source_limit_rejects_only_that_source() {
    let srv = Server::start(&["-C", "1", "127.0.0.1", "0", "cat"]);
    let mut a1 = connect_from(Ipv4Addr::new(127, 0, 0, 1), srv.port);
    assert_eq!(roundtrip(&mut a1, b"a1"), b"a1");
    let mut a2 = connect_from(Ipv4Addr::new(127, 0, 0, 1), srv.port);
    let _ = a2.write_all(b"a2");
    let mut v = Vec::new();
    // Closed without a byte: end of file, or a reset if our data arrived first.
    let r = a2.read_to_end(&mut v);
    assert!(
        v.is_empty(),
        "second client of 127.0.0.1 got data: {r:?} {v:?}"
    );
    srv.wait_log("reject client=127.0.0.1:", 1);
    let mut b1 = connect_from(Ipv4Addr::new(127, 0, 0, 2), srv.port);
    assert_eq!(roundtrip(&mut b1, b"b1"), b"b1", "{}", srv.show());
    util::half_close(&a1);
    assert!(read_all(&mut a1).is_empty());
    srv.wait_log(" status=0 ", 1);
    let mut a3 = connect_from(Ipv4Addr::new(127, 0, 0, 1), srv.port);
    assert_eq!(
        roundtrip(&mut a3, b"a3"),
        b"a3",
        "slot not freed{}",
        srv.show()
    );
    drop((a3, b1));
    srv.wait_log(" status=0 ", 3);
    srv.stop();
}

#[test]
fn sigterm_drains_running_connections_and_refuses_new_ones() {
    let mut srv = Server::start(&["127.0.0.1", "0", "cat"]);
    let mut c = srv.connect();
    assert_eq!(roundtrip(&mut c, b"before"), b"before");
    srv.signal(libc::SIGTERM);
    srv.wait_log("stopping:", 1);
    let refused = TcpStream::connect(("127.0.0.1", srv.port));
    assert!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "connection after SIGTERM: {refused:?}{}",
        srv.show()
    );
    // The running connection still works to its end, in both directions.
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let h = util::send_pattern(&mut w, 3, 1 << 20).expect("send");
        util::half_close(&w);
        h
    });
    let got = util::recv_hash(&mut c).expect("echo after SIGTERM");
    assert_eq!(got, writer.join().unwrap(), "{}", srv.show());
    let st = srv.wait();
    assert_eq!(st.code(), Some(0), "{st:?}{}", srv.show());
    let log = srv.log();
    assert!(log.contains("stopped: all connections ended"), "{log}");
}

#[test]
fn second_sigterm_terminates_connections() {
    let mut srv = Server::start(&["127.0.0.1", "0", "sleep", "60"]);
    let mut c = srv.connect();
    srv.wait_log("accept pid=", 1);
    srv.signal(libc::SIGTERM);
    srv.wait_log("stopping:", 1);
    assert!(
        srv.running(),
        "exited with a connection running{}",
        srv.show()
    );
    srv.signal(libc::SIGTERM);
    let st = srv.wait();
    assert_eq!(st.code(), Some(0), "{st:?}{}", srv.show());
    assert!(
        srv.log().contains("terminating: sent SIGTERM to 1"),
        "{}",
        srv.show()
    );
    // sleep died of the SIGTERM: the client sees the end long before 60 s.
    assert!(read_all(&mut c).is_empty());
}

#[test]
fn children_are_reaped() {
    let srv = Server::start(&["127.0.0.1", "0", "sh", "-c", "echo hi"]);
    for _ in 0..6 {
        let mut c = srv.connect();
        assert_eq!(read_all(&mut c), b"hi\n");
    }
    srv.wait_log(" status=0 ", 6);
    let end = Instant::now() + LIMIT;
    loop {
        let z = zombies_of(srv.pid);
        if z.is_empty() {
            break;
        }
        assert!(Instant::now() < end, "zombies: {z:?}{}", srv.show());
        std::thread::sleep(Duration::from_millis(20));
    }
    srv.stop();
}

#[test]
fn exec_failure_is_logged_not_sent_to_the_client() {
    // Missing at start: the listener refuses to start, with exec's message and code.
    let ran = util::run(
        Command::new(BIN)
            .args(["-1", "127.0.0.1", "0", "/nonexistent/prog"])
            .env("TCPSPLICE_LOG", "stderr"),
        Duration::from_secs(20),
    );
    ran.expect_code(127);
    assert!(
        ran.stderr_text()
            .contains("unable to run /nonexistent/prog"),
        "{}",
        ran.show()
    );
    assert!(ran.stdout.is_empty(), "a port printed{}", ran.show());
    // Gone after the start: logged, and nothing sent to the client.
    let dir = std::env::temp_dir().join(format!("tcpsplice-listen-gone-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let prog = dir.join("prog");
    std::fs::copy("/bin/true", &prog).unwrap();
    let srv = Server::start(&["127.0.0.1", "0", prog.to_str().unwrap()]);
    std::fs::remove_file(&prog).unwrap();
    let mut c = srv.connect();
    assert_eq!(read_all(&mut c), b"", "{}", srv.show());
    srv.wait_log(" status=127 ", 1);
    let log = srv.stop();
    assert!(
        log.contains(&format!("unable to run {}", prog.display())),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn out_of_descriptors_pauses_without_spinning_and_recovers() {
    let mut srv = Server::start(&["127.0.0.1", "0", "cat"]);
    let open: Vec<u64> = std::fs::read_dir(format!("/proc/{}/fd", srv.pid))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    let lowest_free = (0..).find(|n| !open.contains(n)).unwrap();
    // accept takes the lowest free descriptor, which is now over the limit: EMFILE.
    util::set_nofile(srv.pid, lowest_free);
    let mut clients: Vec<TcpStream> = (0..4).map(|_| srv.connect()).collect();
    for c in &mut clients {
        c.write_all(b"x").unwrap();
    }
    srv.wait_log("warning: unable to accept: ", 1);
    let before = cpu_seconds(srv.pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_seconds(srv.pid) - before;
    assert!(
        used < 0.5,
        "listener used {used} s of CPU in 1 s{}",
        srv.show()
    );
    assert!(srv.running(), "listener died{}", srv.show());
    assert_eq!(
        srv.log().matches("unable to accept").count(),
        1,
        "{}",
        srv.show()
    );
    util::set_nofile(srv.pid, 1024);
    for c in &mut clients {
        let mut b = [0u8; 1];
        c.read_exact(&mut b)
            .expect("served once descriptors are back");
        assert_eq!(&b, b"x");
    }
    drop(clients);
    srv.wait_log(" status=0 ", 4);
    srv.stop();
}

#[test]
fn drops_privileges_after_binding() {
    let script = "printf '%s %s %s' \"$(id -u)\" \"$(id -g)\" \"$(id -G)\"";
    if !util::is_root() {
        let r = util::run(
            Command::new(BIN)
                .args(["-u", "65534", "-g", "65534", "127.0.0.1", "0", "true"])
                .env("TCPSPLICE_LOG", "stderr"),
            LIMIT,
        );
        r.expect_code(100);
        return;
    }
    for args in [
        vec!["-u", "65534", "-g", "65534"],
        vec!["-u", "nobody"],
        vec!["-U"],
    ] {
        let mut cmd = Command::new(BIN);
        cmd.arg("-1")
            .args(&args)
            .args(["127.0.0.1", "0", "sh", "-c", script])
            .env("UID", "65534")
            .env("GID", "65534");
        let srv = Server::start_cmd(&mut cmd);
        let mut c = srv.connect();
        let got = String::from_utf8(read_all(&mut c)).unwrap();
        assert_eq!(got, "65534 65534 65534", "{args:?}{}", srv.show());
        let status = std::fs::read_to_string(format!("/proc/{}/status", srv.pid)).unwrap();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert_eq!(
            uid_line.split_whitespace().skip(1).collect::<Vec<_>>(),
            ["65534"; 4],
            "listener itself kept root"
        );
        srv.stop();
    }
}

#[test]
fn usage_and_bind_errors() {
    let run = |args: &[&str]| {
        util::run(
            Command::new(BIN).args(args).env("TCPSPLICE_LOG", "stderr"),
            LIMIT,
        )
    };
    run(&["127.0.0.1", "0"]).expect_code(100);
    run(&["-c", "0", "127.0.0.1", "0", "cat"]).expect_code(100);
    run(&["-r", "0", "127.0.0.1", "0", "cat"]).expect_code(100);
    run(&["-r", "10001", "127.0.0.1", "0", "cat"]).expect_code(100);
    // An id the kernel cannot take ((uid_t)-1): as permanent as a bad name.
    run(&[
        "-u",
        "4294967295",
        "-g",
        "4294967295",
        "127.0.0.1",
        "0",
        "cat",
    ])
    .expect_code(100);
    run(&["127.0.0.1", "70000", "cat"]).expect_code(100);
    run(&["-", "0", "cat"]).expect_code(100);
    run(&["-g", "65534", "127.0.0.1", "0", "cat"]).expect_code(100);
    run(&["-u", "no-such-user-here", "127.0.0.1", "0", "cat"]).expect_code(100);
    run(&["no-such-host.invalid", "0", "cat"]).expect_code(100);
    // Not an address of this host (TEST-NET-1): permanent.
    run(&["192.0.2.1", "0", "cat"]).expect_code(100);
    // -U without the variables it reads.
    util::run(
        Command::new(BIN)
            .args(["-U", "127.0.0.1", "0", "cat"])
            .env_remove("UID")
            .env_remove("GID")
            .env("TCPSPLICE_LOG", "stderr"),
        LIMIT,
    )
    .expect_code(100);
    let r = run(&["-", "-", "cat"]);
    r.expect_code(100);
    assert!(r.stderr_text().contains("systemd"), "{}", r.show());
    let (_taken, addr) = util::listener();
    let r = run(&["127.0.0.1", &addr.port().to_string(), "cat"]);
    r.expect_code(111);
    assert!(
        r.stderr_text()
            .contains("tcpsplice-listen: fatal: unable to bind to"),
        "{}",
        r.show()
    );
}

#[test]
fn systemd_socket_activation() {
    // systemd-socket-activate refuses port 0: pick a free port, retry if it was taken.
    for _attempt in 0..5 {
        let port = util::listener().1.port();
        let mut cmd = Command::new("systemd-socket-activate");
        cmd.args([
            "-l",
            &format!("127.0.0.1:{port}"),
            "-E",
            "TCPSPLICE_LOG=stderr",
        ])
        .arg(BIN)
        .args(["-1", "-", "-", "sh", "-c"])
        .arg(
            "printf '%s %s %s %s %s' \"${LISTEN_FDS-unset}\" \"${LISTEN_PID-unset}\" \
                 \"${LISTEN_FDNAMES-unset}\" \"$PROTO\" \"$TCPLOCALPORT\"",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let child = cmd.spawn().expect("spawn systemd-socket-activate");
        let pid = child.id() as i32;
        // It execs tcpsplice-listen on the first connection; until then it may still be
        // binding.
        let end = Instant::now() + LIMIT;
        let mut conn = None;
        while Instant::now() < end {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(c) => {
                    conn = Some(c);
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let Some(mut c) = conn else {
            let r = util::finish(child, "systemd-socket-activate", LIMIT);
            if r.stderr_text().contains("in use") {
                continue;
            }
            panic!("never connected{}", r.show());
        };
        c.set_read_timeout(Some(LIMIT)).unwrap();
        let got = String::from_utf8(read_all(&mut c)).unwrap();
        let mut c2 = TcpStream::connect(("127.0.0.1", port)).expect("second connection");
        c2.set_read_timeout(Some(LIMIT)).unwrap();
        let got2 = String::from_utf8(read_all(&mut c2)).unwrap();
        // SAFETY: kill takes integers; pid is our child (now tcpsplice-listen).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let r = util::finish(child, "systemd-socket-activate tcpsplice-listen - -", LIMIT);
        r.expect_code(0);
        let want = format!("unset unset unset TCP {port}");
        assert_eq!(got, want, "{}", r.show());
        assert_eq!(got2, want, "{}", r.show());
        assert_eq!(
            String::from_utf8_lossy(&r.stdout).trim(),
            port.to_string(),
            "{}",
            r.show()
        );
        return;
    }
    panic!("no free port for systemd-socket-activate in 5 attempts");
}

#[test]
fn chain_with_dial_and_splice_moves_both_ways_with_half_close() {
    let (target, taddr) = util::listener();
    let up_len = 4 << 20;
    let down_len = 3 << 20;
    let server = std::thread::spawn(move || {
        let mut s = util::accept_timeout(&target, LIMIT);
        s.set_read_timeout(Some(LIMIT)).unwrap();
        // Reads to end of file first: the reply is sent only after the client's half-close
        // came through, so it must travel back over a half-closed connection.
        let up = util::recv_hash(&mut s).expect("target reads the upload");
        let down = util::send_pattern(&mut s, 22, down_len).expect("target replies");
        util::half_close(&s);
        (up, down)
    });
    let srv = Server::start(&[
        "127.0.0.1",
        "0",
        env!("CARGO_BIN_EXE_tcpsplice-dial"),
        "127.0.0.1",
        &taddr.port().to_string(),
        env!("CARGO_BIN_EXE_tcpsplice"),
    ]);
    let mut c = srv.connect();
    let me = c.local_addr().unwrap().port();
    let sent = util::send_pattern(&mut c, 11, up_len).expect("client uploads");
    util::half_close(&c);
    let got = util::recv_hash(&mut c).expect("client reads the reply");
    let (up, down) = server.join().expect("target thread");
    assert_eq!(up, sent, "upload differs at the target{}", srv.show());
    assert_eq!(got, down, "reply differs at the client{}", srv.show());
    srv.wait_log(" status=0 ", 1);
    let log = srv.stop();
    // The splicer's own end line still names the client, through the dialer.
    assert!(
        log.contains(&format!("tcpsplice: info: end client=127.0.0.1:{me} ")),
        "{log}"
    );
}

#[test]
fn dial_in_process_hands_a_program_not_ours_a_blocking_socket() {
    // tcpsplice-dial runs in the connection process and leaves the target non-blocking
    // only for a tcpsplice continuing there; a program it execs gets fds 6 and 7 as
    // DESIGN.md says, blocking (O_NONBLOCK is 04000 in fdinfo's octal flags).
    let (target, taddr) = util::listener();
    let srv = Server::start(&[
        "-r",
        "2",
        "127.0.0.1",
        "0",
        env!("CARGO_BIN_EXE_tcpsplice-dial"),
        "127.0.0.1",
        &taddr.port().to_string(),
        "sh",
        "-c",
        "grep -h '^flags:' /proc/self/fdinfo/6 /proc/self/fdinfo/7",
    ]);
    for _ in 0..2 {
        let mut c = srv.connect();
        let _peer = util::accept_timeout(&target, LIMIT);
        let got = String::from_utf8(read_all(&mut c)).unwrap();
        let flags: Vec<u32> = got
            .lines()
            .filter_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).expect("octal flags"))
            .collect();
        assert_eq!(flags.len(), 2, "{got}{}", srv.show());
        assert!(
            flags.iter().all(|f| f & 0o4000 == 0),
            "fds 6/7 left non-blocking: {got}{}",
            srv.show()
        );
    }
    srv.stop();
}

#[test]
fn nodelay_option_and_quiet_mode() {
    let script = "import socket; s = socket.socket(fileno=0); \
                  print(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0, end='')";
    for (flag, want) in [("-D", "True"), ("-q", "False")] {
        let srv = Server::start(&[flag, "127.0.0.1", "0", "python3", "-c", script]);
        let mut c = srv.connect();
        let got = String::from_utf8(read_all(&mut c)).unwrap();
        assert_eq!(got, want, "{flag}{}", srv.show());
        if flag == "-q" {
            // The connection has ended; a quiet server logged nothing about it.
            let log = srv.stop();
            assert!(!log.contains("info:"), "-q still logs:\n{log}");
        } else {
            srv.wait_log(" status=0 ", 1);
            srv.stop();
        }
    }
}

#[test]
fn sighup_is_ignored_and_sigint_stops_like_sigterm() {
    let mut srv = Server::start(&["127.0.0.1", "0", "cat"]);
    let mut c = srv.connect();
    assert_eq!(roundtrip(&mut c, b"one"), b"one");
    srv.signal(libc::SIGHUP);
    // Still serving, the running connection and a new one alike.
    let mut c2 = srv.connect();
    assert_eq!(roundtrip(&mut c2, b"two"), b"two", "{}", srv.show());
    assert_eq!(roundtrip(&mut c, b"three"), b"three");
    assert!(srv.running(), "SIGHUP ended the server{}", srv.show());
    srv.signal(libc::SIGINT);
    srv.wait_log("stopping:", 1);
    assert_eq!(roundtrip(&mut c, b"four"), b"four");
    drop((c, c2));
    let st = srv.wait();
    assert_eq!(st.code(), Some(0), "{st:?}{}", srv.show());
}

#[test]
fn man_page_documents_every_option() {
    let r = util::run(Command::new(BIN).arg("-h"), LIMIT);
    r.expect_code(0);
    let usage = String::from_utf8_lossy(&r.stdout).into_owned();
    let man = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/man/tcpsplice-listen.1"
    ))
    .expect("man page");
    // Every letter after a `-` in the usage line: flags like [-1Dhq] and [-b backlog].
    let mut letters = Vec::new();
    for word in usage.split(['[', ']', ' ']) {
        if let Some(opts) = word.strip_prefix('-') {
            letters.extend(opts.chars().filter(|c| c.is_ascii_alphanumeric()));
        }
    }
    assert!(letters.len() >= 10, "usage parsed badly: {usage}");
    for l in letters {
        let entry = [
            format!(".B \\-{l}\n"),
            format!(".BI \\-{l} "),
            format!(".BR \\-{l} "),
        ];
        assert!(
            entry.iter().any(|e| man.contains(e.as_str())),
            "man page has no entry for -{l}"
        );
    }
}

#[test]
fn an_inherited_ignored_sigchld_does_not_wedge_the_limits_or_the_stop() {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(BIN);
    cmd.args(["-1", "-c", "1", "127.0.0.1", "0", "cat"]);
    // SAFETY: signal is async-signal-safe; it runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGCHLD, libc::SIG_IGN);
            Ok(())
        });
    }
    let srv = Server::start_cmd(&mut cmd);
    // With SIGCHLD ignored the kernel would reap the first connection's process by
    // itself, and the second, over -c 1, would never be accepted.
    for msg in [&b"one"[..], b"two", b"three"] {
        let mut c = TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
        c.set_read_timeout(Some(LIMIT)).unwrap();
        assert_eq!(roundtrip(&mut c, msg), msg, "{}", srv.show());
    }
    srv.wait_log("end pid=", 3);
    srv.stop();
}

#[test]
fn messages_reach_a_stderr_that_is_also_stdout() {
    // `tcpsplice-listen ... >log 2>&1`, runit's `exec 2>&1`: the supervisor's own 0 and 1
    // carry no client's data, so its messages must not be held back.
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors we then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fresh descriptors from pipe().
    let (mut r, w) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let mut child = Command::new(BIN)
        .args(["192.0.2.1", "0", "cat"])
        .env("TCPSPLICE_LOG", "stderr")
        .stdin(Stdio::null())
        .stdout(Stdio::from(w.try_clone().unwrap()))
        .stderr(Stdio::from(w))
        .spawn()
        .unwrap();
    let status = util::wait_timeout(&mut child, LIMIT).expect("it exits");
    let mut text = String::new();
    r.read_to_string(&mut text).unwrap();
    assert_eq!(status.code(), Some(100));
    assert!(
        text.contains("tcpsplice-listen: fatal: unable to bind"),
        "got {text:?}"
    );
}

#[test]
fn a_link_local_address_with_its_zone_is_bound_and_without_it_refused() {
    // A link-local address of our own: a network namespace (root).
    if !util::is_root() {
        eprintln!("skipped: needs root for a network namespace");
        return;
    }
    let script = format!(
        "ip link set lo up && ip -6 addr add fe80::1/64 dev lo nodad || exit 99\n\
         '{BIN}' -1 'fe80::1%lo' 0 cat > port & l=$!\n\
         i=0; while [ ! -s port ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done\n\
         printf hello | timeout 10 python3 -c \"import socket,sys;\n\
s=socket.create_connection(('fe80::1%lo',int(open('port').read())));\n\
s.sendall(sys.stdin.buffer.read());s.shutdown(socket.SHUT_WR);\n\
print(s.recv(100).decode())\"\n\
         '{BIN}' fe80::1 0 cat; echo \"rc=$?\"; kill $l"
    );
    let dir = std::env::temp_dir().join(format!("tcpsplice-ll-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ran = util::run(
        Command::new("unshare")
            .args(["-n", "sh", "-c", &script])
            .current_dir(&dir)
            .env("TCPSPLICE_LOG", "stderr"),
        LIMIT,
    );
    let _ = std::fs::remove_dir_all(&dir);
    ran.expect_code(0);
    let out = String::from_utf8_lossy(&ran.stdout);
    assert!(out.contains("hello"), "{}", ran.show());
    // Without the zone bind says EINVAL: a configuration error, not a retry.
    assert!(out.contains("rc=100"), "{}", ran.show());
}

/// The writable data of the binary a connection process runs (.data and .bss, whose
/// pages the process writes after the fork and so owns privately) starts on a page of
/// its own and fits in one: `.cargo/config.toml` has the linker start each segment on a
/// page, and the statics must stay under 4 KiB, or every idle connection pays a page
/// more (ARCHITECTURE.md, "Memory of an idle connection"). Where the config's linker
/// flag applies: x86_64 Linux with glibc, rust-lld.
#[test]
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
fn the_writable_data_of_the_binary_is_one_page() {
    // Rust flags from the environment replace the config's (coverage, -C target-cpu):
    // the binaries were then linked without the flag this test is about. (The test
    // process only reads its own environment; the rule against std::env is the
    // programs'.)
    #[allow(clippy::disallowed_methods)]
    for v in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS"] {
        if std::env::var_os(v).is_some_and(|f| !f.is_empty()) {
            eprintln!("skipped: {v} is set, which replaces .cargo/config.toml's rustflags");
            return;
        }
    }
    let elf = std::fs::read(BIN).expect("read the binary");
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    assert_eq!(&elf[..5], b"\x7fELF\x02", "a 64-bit ELF file");
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36) as usize, u16_at(0x38));
    // The last writable PT_LOAD: .data and .bss (the one before it is RELRO, written
    // only by the dynamic loader at start, before any fork).
    let (vaddr, memsz) = (0..usize::from(phnum))
        .map(|i| phoff + i * phentsize)
        .filter(|&h| u32_at(h) == 1 && u32_at(h + 4) & 2 != 0)
        .map(|h| (u64_at(h + 0x10), u64_at(h + 0x28)))
        .next_back()
        .expect("a writable loadable segment");
    assert_eq!(
        vaddr % 4096,
        0,
        "the data segment does not start at a page ({vaddr:#x}): was the linker flag of \
         .cargo/config.toml in effect? (a RUSTFLAGS variable overrides it)"
    );
    // The size is the release build's concern (a debug build's statics are larger).
    if !cfg!(debug_assertions) {
        assert!(
            memsz <= 4096,
            "the data segment takes more than a page: {memsz} bytes"
        );
    }
}
