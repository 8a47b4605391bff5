//! tcpsplice, the splicer: integrity, half-close, resets, timeouts, signals, odd
//! descriptors and the per-user pipe budget, over real loopback TCP and pipes.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::{self, Ran};

const BIN: &str = env!("CARGO_BIN_EXE_tcpsplice");
const LIMIT: Duration = Duration::from_secs(60);

/// A descriptor number high enough not to collide with what the child sets up.
fn high_dup(fd: RawFd) -> OwnedFd {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we then own.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100) };
    assert!(n >= 0, "dup: {}", std::io::Error::last_os_error());
    // SAFETY: n is a fresh descriptor owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(n) }
}

/// Gives the child `fd` as its fds 6 and 7.
fn target_fds(cmd: &mut Command, fd: OwnedFd) {
    let raw = fd.as_raw_fd();
    // SAFETY: between fork and exec we only call dup2, which is async-signal-safe. The
    // parent keeps `fd` open until spawn returns (the closure owns it).
    unsafe {
        cmd.pre_exec(move || {
            let _keep = &fd;
            for to in [6, 7] {
                if libc::dup2(raw, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// A running relay between a client socket and a target socket, both ends of which
/// the test holds.
struct Relay {
    child: Child,
    client: TcpStream,
    target: TcpStream,
    desc: String,
}

impl Relay {
    fn start(args: &[&str]) -> Relay {
        Relay::start_with(args, |_| {})
    }

    fn start_with(args: &[&str], tweak: impl FnOnce(&mut Command)) -> Relay {
        let (client, client_peer) = util::tcp_pair();
        let (target, target_peer) = util::tcp_pair();
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("TCPSPLICE_LOG", "stderr")
            .env("TCPREMOTEIP", "192.0.2.7")
            .env("TCPREMOTEPORT", "4711")
            .stdin(Stdio::from(OwnedFd::from(client_peer.try_clone().unwrap())))
            .stdout(Stdio::from(OwnedFd::from(client_peer)))
            .stderr(Stdio::piped());
        target_fds(&mut cmd, high_dup(target_peer.as_raw_fd()));
        tweak(&mut cmd);
        let desc = format!("{cmd:?}");
        let child = cmd.spawn().expect("spawn tcpsplice");
        // The test must not hold the relay's ends, or FIN and RST would never travel.
        drop(cmd);
        drop(target_peer);
        Relay {
            child,
            client,
            target,
            desc,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn finish(self) -> Ran {
        let Relay {
            child,
            client,
            target,
            desc,
        } = self;
        let ran = util::finish(child, &desc, LIMIT);
        drop((client, target));
        ran
    }
}

/// CPU time (user + system) of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Sends `up` bytes client→target and `down` bytes target→client through `r` at the
/// same time, each side half-closing when done, and checks both arrive whole; returns
/// the relay's run, ended.
fn flood(r: Relay, up: u64, down: u64) -> Ran {
    let mut c_w = r.client.try_clone().unwrap();
    let mut t_w = r.target.try_clone().unwrap();
    let mut c_r = r.client.try_clone().unwrap();
    let mut t_r = r.target.try_clone().unwrap();
    let send_up = thread::spawn(move || {
        let h = util::send_pattern(&mut c_w, 1, up).unwrap();
        c_w.shutdown(Shutdown::Write).unwrap();
        h
    });
    let send_down = thread::spawn(move || {
        let h = util::send_pattern(&mut t_w, 2, down).unwrap();
        t_w.shutdown(Shutdown::Write).unwrap();
        h
    });
    let recv_up = thread::spawn(move || util::recv_hash(&mut t_r).unwrap());
    let recv_down = thread::spawn(move || util::recv_hash(&mut c_r).unwrap());
    let (su, sd) = (send_up.join().unwrap(), send_down.join().unwrap());
    let (ru, rd) = (recv_up.join().unwrap(), recv_down.join().unwrap());
    let ran = r.finish();
    assert_eq!(su, ru, "client→target stream differs{}", ran.show());
    assert_eq!(sd, rd, "target→client stream differs{}", ran.show());
    ran
}

/// `flood` through a relay with no options, which must end cleanly and count it all.
fn both_ways(up: u64, down: u64) {
    let ran = flood(Relay::start(&[]), up, down);
    ran.expect_code(0);
    let log = ran.stderr_text();
    assert!(
        log.contains(&format!("up={up} down={down}")) && log.contains("how=eof"),
        "log line lacks the byte counts or the ending{}",
        ran.show()
    );
}

#[test]
fn empty_streams_end_cleanly() {
    both_ways(0, 0);
}

#[test]
fn one_byte_each_way() {
    both_ways(1, 1);
}

#[test]
fn around_64k() {
    both_ways(65535, 65537);
    both_ways(65536, 65536);
}

#[test]
fn a_mebibyte_and_seven() {
    both_ways((1 << 20) + 7, (1 << 20) + 7);
}

#[test]
fn two_hundred_mib_both_ways_at_once() {
    both_ways(200 << 20, (200 << 20) + 3);
}

#[test]
fn client_half_closes_first_and_the_reply_arrives_whole() {
    let mut r = Relay::start(&[]);
    let req = util::pattern(3, 100_000);
    r.client.write_all(&req).unwrap();
    r.client.shutdown(Shutdown::Write).unwrap();
    // The target reads the whole request up to EOF, and only then answers.
    let mut got = Vec::new();
    r.target.read_to_end(&mut got).unwrap();
    assert_eq!(util::hash_of(&got), util::hash_of(&req), "request damaged");
    let reply = util::pattern(4, (1 << 20) + 7);
    r.target.write_all(&reply).unwrap();
    r.target.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    r.client.read_to_end(&mut back).unwrap();
    assert_eq!(util::hash_of(&back), util::hash_of(&reply), "reply damaged");
    r.finish().expect_code(0);
}

#[test]
fn target_half_closes_first_and_the_client_keeps_sending() {
    let mut r = Relay::start(&[]);
    let banner = b"220 hello, then nothing more from me\r\n";
    r.target.write_all(banner).unwrap();
    r.target.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    r.client.read_to_end(&mut got).unwrap();
    assert_eq!(&got[..], &banner[..]);
    // The client hears EOF and keeps talking; all of it must still arrive.
    let mut c = r.client.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let h = util::send_pattern(&mut c, 5, 3 << 20).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        h
    });
    let recv = util::recv_hash(&mut r.target).unwrap();
    assert_eq!(sender.join().unwrap(), recv);
    r.finish().expect_code(0);
}

#[test]
fn pipes_on_0_and_1_as_in_a_shell_pipeline() {
    let (target, target_peer) = util::tcp_pair();
    // Our own pipe as fd 1, whose write end we keep too: the relay must put back the
    // O_NONBLOCK flag it sets on this shared open file description.
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors we then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fresh descriptors from pipe().
    let (out_r, out_w) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut cmd = Command::new(BIN);
    cmd.env("TCPSPLICE_LOG", "stderr")
        .stdin(Stdio::piped())
        .stdout(Stdio::from(out_w.try_clone().unwrap()))
        .stderr(Stdio::piped());
    target_fds(&mut cmd, high_dup(target_peer.as_raw_fd()));
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    drop(target_peer);
    let mut stdin = child.stdin.take().unwrap();
    let input = util::pattern(6, 5 << 20);
    let inp = input.clone();
    let feeder = thread::spawn(move || {
        stdin.write_all(&inp).unwrap();
        // dropping stdin closes the pipe: EOF for the relay
    });
    let mut t = target.try_clone().unwrap();
    let reply = util::pattern(7, 3 << 20);
    let rep = reply.clone();
    let answer = thread::spawn(move || {
        t.write_all(&rep).unwrap();
        t.shutdown(Shutdown::Write).unwrap();
    });
    let mut out_r = out_r;
    let reader = thread::spawn(move || {
        let mut v = Vec::new();
        out_r.read_to_end(&mut v).unwrap();
        v
    });
    let mut got = Vec::new();
    (&target).read_to_end(&mut got).unwrap();
    feeder.join().unwrap();
    answer.join().unwrap();
    let ran = util::finish(child, "tcpsplice (pipes on 0/1)", LIMIT);
    // SAFETY: F_GETFL on a descriptor we own.
    let flags = unsafe { libc::fcntl(out_w.as_raw_fd(), libc::F_GETFL) };
    drop(out_w);
    let back = reader.join().unwrap();
    ran.expect_code(0);
    assert_eq!(
        util::hash_of(&got),
        util::hash_of(&input),
        "stdin→target damaged"
    );
    assert_eq!(
        util::hash_of(&back),
        util::hash_of(&reply),
        "target→stdout damaged"
    );
    assert_eq!(
        flags & libc::O_NONBLOCK,
        0,
        "O_NONBLOCK left set on the shared pipe"
    );
    assert!(
        ran.stderr_text()
            .contains("path=splice-direct/splice-direct"),
        "{}",
        ran.show()
    );
}

#[test]
fn dev_null_and_regular_files_fall_back_to_copying() {
    let dir = std::env::temp_dir().join(format!("tcpsplice-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in");
    let output = dir.join("out");
    let data = util::pattern(8, (1 << 20) + 7);
    std::fs::write(&input, &data).unwrap();
    std::fs::write(&output, b"kept:").unwrap();
    // fd 0 a regular file, fd 7 a file opened O_APPEND (splice refuses it), fd 6
    // /dev/null (splice refuses it too), fd 1 /dev/null.
    let out = std::fs::OpenOptions::new()
        .append(true)
        .open(&output)
        .unwrap();
    let null = File::open("/dev/null").unwrap();
    let out_fd = high_dup(out.as_raw_fd());
    let null_fd = high_dup(null.as_raw_fd());
    let (o, n) = (out_fd.as_raw_fd(), null_fd.as_raw_fd());
    let mut cmd = Command::new(BIN);
    cmd.env("TCPSPLICE_LOG", "stderr")
        .stdin(File::open(&input).unwrap())
        .stdout(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .unwrap(),
        );
    // SAFETY: only dup2 between fork and exec; the closure keeps the fds alive.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = (&out_fd, &null_fd);
            if libc::dup2(n, 6) < 0 || libc::dup2(o, 7) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let ran = util::run(&mut cmd, LIMIT);
    ran.expect_code(0);
    let got = std::fs::read(&output).unwrap();
    assert_eq!(&got[..5], b"kept:");
    assert_eq!(
        util::hash_of(&got[5..]),
        util::hash_of(&data),
        "file copy damaged{}",
        ran.show()
    );
    assert!(
        ran.stderr_text().contains("path=copy/copy"),
        "{}",
        ran.show()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dev_null_client_with_a_socket_target() {
    let (target, target_peer) = util::tcp_pair();
    let mut cmd = Command::new(BIN);
    cmd.env("TCPSPLICE_LOG", "stderr")
        .stdin(File::open("/dev/null").unwrap())
        .stdout(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/null")
                .unwrap(),
        )
        .stderr(Stdio::piped());
    target_fds(&mut cmd, high_dup(target_peer.as_raw_fd()));
    let child = cmd.spawn().unwrap();
    drop(cmd);
    drop(target_peer);
    // The target hears EOF at once, answers, and its answer is swallowed by /dev/null.
    let mut got = Vec::new();
    (&target).read_to_end(&mut got).unwrap();
    assert!(got.is_empty());
    let answer = util::pattern(9, 1 << 20);
    (&target).write_all(&answer).unwrap();
    target.shutdown(Shutdown::Write).unwrap();
    let ran = util::finish(child, "tcpsplice </dev/null >/dev/null", LIMIT);
    ran.expect_code(0);
    assert!(
        ran.stderr_text()
            .contains(&format!("up=0 down={}", 1 << 20)),
        "{}",
        ran.show()
    );
}

/// Closes a socket with a reset instead of a FIN.
pub(crate) fn reset(s: TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid linger struct and its size, on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    drop(s);
}

/// Reads until EOF or error, and returns the error kind at the end (None for a FIN).
fn read_until_end(s: &mut TcpStream) -> Option<std::io::ErrorKind> {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return None,
            Ok(_) => continue,
            Err(e) => return Some(e.kind()),
        }
    }
}

/// The target sends its whole reply and closes (a FIN); what the client sends after
/// that is answered with a reset by the target's kernel (a TLS server that does not
/// wait for close_notify). The target's end was clean: so is the relay's.
#[test]
fn a_reset_after_the_targets_complete_stream_is_a_clean_end() {
    let Relay {
        child,
        mut client,
        target,
        desc,
    } = Relay::start(&[]);
    (&target).write_all(b"the whole reply").unwrap();
    drop(target);
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"the whole reply");
    // close_notify, say: it reaches a closed socket, whose kernel resets.
    let _ = (&client).write_all(b"\x15\x03\x03\x00\x02\x01\x00");
    let ran = util::finish(child, &desc, LIMIT);
    ran.expect_code(0);
    assert!(ran.stderr_text().contains("how=eof"), "{}", ran.show());
}

/// One peer resets after some data; the other must see a reset, not a clean end.
fn reset_travels(from_client: bool) {
    let Relay {
        child,
        client,
        target,
        desc,
    } = Relay::start(&[]);
    let (culprit, mut other, name) = if from_client {
        (client, target, "client")
    } else {
        (target, client, "target")
    };
    (&culprit).write_all(b"some data first").unwrap();
    let mut buf = [0u8; 15];
    other.read_exact(&mut buf).unwrap();
    reset(culprit);
    let end = read_until_end(&mut other);
    let ran = util::finish(child, &desc, LIMIT);
    assert_eq!(
        end,
        Some(std::io::ErrorKind::ConnectionReset),
        "{}",
        ran.show()
    );
    ran.expect_code(1);
    assert!(
        ran.stderr_text().contains(&format!("how=reset-by-{name}")),
        "{}",
        ran.show()
    );
}

#[test]
fn a_client_reset_reaches_the_target_as_a_reset() {
    reset_travels(true);
}

#[test]
fn a_target_reset_reaches_the_client_as_a_reset() {
    reset_travels(false);
}

#[test]
fn idle_timeout_ends_the_relay_and_both_peers_hear_the_end() {
    let mut r = Relay::start(&["-t", "0.3"]);
    // Traffic keeps it alive past the timeout...
    for _ in 0..4 {
        r.client.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        r.target.read_exact(&mut b).unwrap();
        thread::sleep(Duration::from_millis(150));
    }
    assert!(
        r.child.try_wait().unwrap().is_none(),
        "ended while traffic flowed"
    );
    // ...silence ends it.
    let c = read_until_end(&mut r.client);
    let t = read_until_end(&mut r.target);
    let ran = r.finish();
    ran.expect_code(1);
    assert_eq!(
        (c, t),
        (None, None),
        "peers should see a clean end{}",
        ran.show()
    );
    assert!(
        ran.stderr_text().contains("how=idle-timeout"),
        "{}",
        ran.show()
    );
}

#[test]
fn sigterm_delivers_what_is_in_flight_then_ends() {
    // A target that reads nothing yet: what the client sends piles up in the relay's
    // pipe. After SIGTERM the relay stops reading, drains its pipe, sends FIN, exits 1.
    let mut r = Relay::start(&["-g", "20"]);
    let mut c = r.client.try_clone().unwrap();
    let sender = thread::spawn(move || {
        // Blocks once every buffer is full; ends with an error when the relay is gone.
        let _ = util::send_pattern(&mut c, 10, 64 << 20);
    });
    thread::sleep(Duration::from_millis(500));
    // SAFETY: kill with a pid we spawned.
    assert_eq!(unsafe { libc::kill(r.pid() as i32, libc::SIGTERM) }, 0);
    let mut got = Vec::new();
    r.target
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    r.target.read_to_end(&mut got).unwrap();
    let ran = r.finish();
    drop(sender);
    ran.expect_code(1);
    assert!(!got.is_empty(), "nothing arrived");
    assert_eq!(
        util::hash_of(&got),
        util::hash_of(&util::pattern(10, got.len())),
        "what arrived is not the start of what was sent{}",
        ran.show()
    );
    let log = ran.stderr_text();
    assert!(
        log.contains("how=signal-15") && !log.contains("undrained"),
        "{}",
        ran.show()
    );
    assert!(
        log.contains(&format!("up={} ", got.len())),
        "relay delivered a different count{}",
        ran.show()
    );
}

#[test]
fn an_idle_relay_uses_no_cpu() {
    let r = Relay::start(&[]);
    thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(r.pid());
    thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(r.pid()) - before;
    // 10 ms ticks: a spinning relay burns ~100 a second; an idle one none.
    assert!(used <= 2, "idle relay used {used} ticks in 1 s");
    r.client.shutdown(Shutdown::Write).unwrap();
    r.target.shutdown(Shutdown::Write).unwrap();
    r.finish().expect_code(0);
}

/// Sends `lead`, then an urgent byte, then more, and checks that everything arrives in
/// order without the relay spinning; returns the relay's log.
fn urgent_after(lead: &[u8]) -> String {
    let mut r = Relay::start(&[]);
    let mut sent = lead.to_vec();
    sent.extend_from_slice(b"before");
    (&r.client).write_all(&sent).unwrap();
    // SAFETY: send one byte flagged MSG_OOB on a socket we own.
    let n = unsafe { libc::send(r.client.as_raw_fd(), b"!".as_ptr().cast(), 1, libc::MSG_OOB) };
    assert_eq!(n, 1);
    let mut got = vec![0u8; sent.len() + 1];
    r.target
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    r.target
        .read_exact(&mut got)
        .expect("bytes up to the urgent byte must arrive");
    let before = cpu_ticks(r.pid());
    (&r.client).write_all(b"after").unwrap();
    r.client.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    r.target.read_to_end(&mut rest).unwrap();
    thread::sleep(Duration::from_millis(500));
    let used = cpu_ticks(r.pid()) - before;
    r.target.shutdown(Shutdown::Write).unwrap();
    let ran = r.finish();
    ran.expect_code(0);
    got.extend_from_slice(&rest);
    sent.extend_from_slice(b"!after");
    assert!(
        got == sent,
        "urgent byte kept inline, order kept{}",
        ran.show()
    );
    assert!(
        used <= 10,
        "relay spun on urgent data: {used} ticks{}",
        ran.show()
    );
    ran.stderr_text()
}

#[test]
fn urgent_data_neither_spins_nor_stalls_nor_is_lost() {
    // A short exchange: the direction is still copying when the urgent byte comes.
    let log = urgent_after(b"");
    assert!(log.contains("path=copy/"), "{log}");
    // After a burst: the direction splices, and splice stops at the urgent mark.
    let log = urgent_after(&util::pattern(3, 64 * 1024));
    assert!(log.contains("path=splice/"), "{log}");
}

/// The per-user pipe budget (fs.pipe-user-pages-soft) is exhausted by another process
/// of the same user: the relay must notice the tiny pipes it gets and copy instead.
#[test]
fn exhausted_pipe_budget_falls_back_to_copying() {
    let uid = if util::is_root() {
        65534
    } else {
        unsafe_getuid()
    };
    // Control: the same user without the hog splices.
    let ran = budget_run(uid);
    ran.expect_code(0);
    assert!(
        ran.stderr_text().contains("path=splice/splice"),
        "control run{}",
        ran.show()
    );

    let hog_py = r#"
import fcntl, os, sys
if os.getuid() == 0:
    os.setgroups([]); os.setgid(int(sys.argv[1])); os.setuid(int(sys.argv[1]))
pipes = []
while True:
    r, w = os.pipe()
    pipes.append((r, w))
    try:
        fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
    except OSError:
        break
print(len(pipes), flush=True)
sys.stdin.read()
"#;
    let mut hog = Command::new("python3")
        .args(["-c", hog_py, &uid.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is needed for the pipe-budget test");
    let mut line = String::new();
    let mut out = hog.stdout.take().unwrap();
    let mut b = [0u8; 1];
    while out.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
        line.push(b[0] as char);
    }
    assert!(
        line.trim().parse::<u32>().is_ok(),
        "hog did not start: {line:?}"
    );
    let ran = budget_run(uid);
    drop(hog.stdin.take());
    let _ = hog.wait();
    ran.expect_code(0);
    copied_with_grown_buffers(&ran);
}

/// Both directions copied (no pipe of their own), and their buffers, allocated at the
/// first bytes, grew to 256 KiB for the bulk.
fn copied_with_grown_buffers(ran: &Ran) {
    assert!(
        ran.stderr_text()
            .contains("path=copy/copy pipes=0/0 bufs=262144/262144"),
        "{}",
        ran.show()
    );
}

fn unsafe_getuid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// 8 MiB each way through a relay running as `uid`.
fn budget_run(uid: u32) -> Ran {
    let r = Relay::start_with(&[], |cmd| {
        if util::is_root() {
            cmd.uid(uid).gid(uid);
        }
    });
    flood(r, 8 << 20, 8 << 20)
}

#[test]
fn bad_usage_exits_100_and_help_exits_0() {
    let ran = util::run(Command::new(BIN).arg("-x"), LIMIT);
    ran.expect_code(100);
    assert!(
        ran.stderr_text().contains("tcpsplice: usage:"),
        "{}",
        ran.show()
    );
    util::run(Command::new(BIN).args(["-t", "soon"]), LIMIT).expect_code(100);
    util::run(Command::new(BIN).arg("extra"), LIMIT).expect_code(100);
    let ran = util::run(Command::new(BIN).arg("-h"), LIMIT);
    ran.expect_code(0);
    assert!(String::from_utf8_lossy(&ran.stdout).contains("usage: tcpsplice"));
    // fd 6 closed: a configuration error, not a crash.
    let ran = util::run(Command::new(BIN).env("TCPSPLICE_LOG", "stderr"), LIMIT);
    ran.expect_code(100);
    assert!(
        ran.stderr_text().contains("fatal: unable to use fd 6"),
        "{}",
        ran.show()
    );
}

#[test]
fn one_socket_on_fd_6_for_both_directions() {
    // ucspi-proxy style: -r 6 -w 6.
    let mut r = Relay::start(&["-w", "6"]);
    r.client.write_all(b"question").unwrap();
    r.client.shutdown(Shutdown::Write).unwrap();
    let mut q = Vec::new();
    r.target.read_to_end(&mut q).unwrap();
    assert_eq!(q, b"question");
    r.target.write_all(b"answer").unwrap();
    r.target.shutdown(Shutdown::Write).unwrap();
    let mut a = Vec::new();
    r.client.read_to_end(&mut a).unwrap();
    assert_eq!(a, b"answer");
    let ran = r.finish();
    ran.expect_code(0);
    assert!(
        ran.stderr_text().contains("client=192.0.2.7:4711"),
        "{}",
        ran.show()
    );
}

#[test]
fn a_vanished_stdout_reader_is_an_error_not_a_sigpipe_death() {
    let (target, target_peer) = util::tcp_pair();
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors we then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fresh descriptors from pipe(); the read end is closed at once.
    let out_w = unsafe {
        libc::close(fds[0]);
        OwnedFd::from_raw_fd(fds[1])
    };
    let mut cmd = Command::new(BIN);
    cmd.env("TCPSPLICE_LOG", "stderr")
        .stdin(Stdio::piped())
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::piped());
    target_fds(&mut cmd, high_dup(target_peer.as_raw_fd()));
    let child = cmd.spawn().unwrap();
    drop(cmd);
    drop(target_peer);
    (&target).write_all(b"nobody will read this").unwrap();
    let mut t = target.try_clone().unwrap();
    let end = read_until_end(&mut t);
    let ran = util::finish(child, "tcpsplice >closed-pipe", LIMIT);
    ran.expect_code(1);
    assert!(
        ran.stderr_text().contains("how=reset-by-client"),
        "{}",
        ran.show()
    );
    assert_eq!(
        end,
        Some(std::io::ErrorKind::ConnectionReset),
        "{}",
        ran.show()
    );
}

/// The pipes among a process's descriptors that are its own: not its stderr (ours to
/// read) nor one it inherited from whatever runs the tests (this process holds those
/// too).
fn pipe_fds(pid: u32) -> usize {
    let pipes = |pid: &str, from: i32| -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) >= Some(from)
                    })
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .map(|l| l.to_string_lossy().into_owned())
                    .filter(|l| l.starts_with("pipe:"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let ours = pipes("self", 0);
    pipes(&pid.to_string(), 3)
        .iter()
        .filter(|p| !ours.contains(p))
        .count()
}

#[test]
fn an_idle_or_short_connection_holds_no_pipe() {
    let mut r = Relay::start(&[]);
    // Idle: asleep in poll, no pipe of the user's budget taken.
    thread::sleep(Duration::from_millis(200));
    assert_eq!(pipe_fds(r.pid()), 0, "pipes held by an idle relay");
    // A short exchange each way is copied; still no pipe.
    r.target
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    r.client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (&r.client).write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut req = [0u8; 18];
    r.target.read_exact(&mut req).unwrap();
    (&r.target).write_all(&[7u8; 3000]).unwrap();
    let mut reply = vec![0u8; 3000];
    r.client.read_exact(&mut reply).unwrap();
    assert_eq!(pipe_fds(r.pid()), 0, "pipes held after a short exchange");
    r.client.shutdown(Shutdown::Write).unwrap();
    r.target.shutdown(Shutdown::Write).unwrap();
    let ran = r.finish();
    ran.expect_code(0);
    assert!(
        ran.stderr_text().contains("path=copy/copy pipes=0/0"),
        "{}",
        ran.show()
    );
}

#[test]
fn a_bulk_direction_grows_its_pipe_and_a_quiet_one_takes_none() {
    let r = Relay::start(&[]);
    let mut c_w = r.client.try_clone().unwrap();
    let mut t_w = r.target.try_clone().unwrap();
    let mut c_r = r.client.try_clone().unwrap();
    let mut t_r = r.target.try_clone().unwrap();
    let bulk = thread::spawn(move || {
        let h = util::send_pattern(&mut c_w, 13, 16 << 20).unwrap();
        c_w.shutdown(Shutdown::Write).unwrap();
        h
    });
    let got = util::recv_hash(&mut t_r).unwrap();
    t_w.write_all(b"ok").unwrap();
    t_w.shutdown(Shutdown::Write).unwrap();
    let back = util::recv_hash(&mut c_r).unwrap();
    assert_eq!(bulk.join().unwrap(), got);
    assert_eq!(back, util::hash_of(b"ok"));
    let ran = r.finish();
    ran.expect_code(0);
    // 1 MiB is the default -p; the 2 bytes of the quiet direction were copied, and it
    // never took a pipe.
    assert!(
        ran.stderr_text()
            .contains("path=splice/copy pipes=1048576/0"),
        "{}",
        ran.show()
    );
}

/// Starts the relay with the client on fds 0/1 and the target on fds 6/7 given as
/// descriptors (any kind of socket), with `args`; the test keeps the other ends.
fn spawn_between(args: &[&str], client: OwnedFd, target: OwnedFd) -> (Child, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("TCPSPLICE_LOG", "stderr")
        .stdin(Stdio::from(client.try_clone().unwrap()))
        .stdout(Stdio::from(client))
        .stderr(Stdio::piped());
    target_fds(&mut cmd, high_dup(target.as_raw_fd()));
    let child = cmd.spawn().expect("spawn tcpsplice");
    let desc = format!("{cmd:?}");
    drop(cmd);
    drop(target);
    (child, desc)
}

#[test]
fn a_unix_socket_target_that_answers_and_closes_is_not_a_reset() {
    // As s6-ipcclient or unixclient would give it: a Unix-domain socket on 6/7. Its
    // close shows as POLLHUP on our end at once, which TCP never does.
    use std::os::unix::net::UnixStream;
    let (mut client, client_peer) = util::tcp_pair();
    let (mut target, target_peer) = UnixStream::pair().unwrap();
    let (child, desc) = spawn_between(&[], OwnedFd::from(client_peer), OwnedFd::from(target_peer));
    let reply = util::pattern(8, 100_000);
    target.write_all(&reply).unwrap();
    drop(target);
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut back = Vec::new();
    client
        .read_to_end(&mut back)
        .expect("a clean end, not a reset");
    assert_eq!(util::hash_of(&back), util::hash_of(&reply));
    client.shutdown(Shutdown::Write).unwrap();
    let ran = util::finish(child, &desc, LIMIT);
    ran.expect_code(0);
    assert!(ran.stderr_text().contains("how=eof"), "{}", ran.show());
}

#[test]
fn a_unix_socket_client_that_sends_and_closes_is_not_a_reset() {
    // As a systemd Accept=yes unit on a ListenStream= path would give it.
    use std::os::unix::net::UnixStream;
    let (mut client, client_peer) = UnixStream::pair().unwrap();
    let (mut target, target_peer) = util::tcp_pair();
    let (child, desc) = spawn_between(&[], OwnedFd::from(client_peer), OwnedFd::from(target_peer));
    let request = util::pattern(9, 3 << 20);
    let req = request.clone();
    let sender = thread::spawn(move || {
        client.write_all(&req).unwrap();
        // Closed whole, not half-closed.
    });
    target
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut got = Vec::new();
    target
        .read_to_end(&mut got)
        .expect("a clean end, not a reset");
    sender.join().unwrap();
    assert_eq!(util::hash_of(&got), util::hash_of(&request));
    target.shutdown(Shutdown::Write).unwrap();
    let ran = util::finish(child, &desc, LIMIT);
    ran.expect_code(0);
}

#[test]
fn a_terminal_on_0_and_1_gets_its_flags_back_after_an_idle_end() {
    let (_master, slave) = util::openpty();
    let (_target, target_peer) = util::tcp_pair();
    let mut cmd = Command::new(BIN);
    cmd.args(["-t", "0.3"])
        .env("TCPSPLICE_LOG", "stderr")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::piped());
    target_fds(&mut cmd, high_dup(target_peer.as_raw_fd()));
    let child = cmd.spawn().unwrap();
    drop(cmd);
    drop(target_peer);
    let ran = util::finish(child, "tcpsplice -t 0.3 on a pty", LIMIT);
    ran.expect_code(1);
    assert!(
        ran.stderr_text().contains("how=idle-timeout"),
        "{}",
        ran.show()
    );
    // The child's 0 and 1 were dups of our slave: one open file, whose flags the
    // shell would find again.
    // SAFETY: F_GETFL on a descriptor we own.
    let flags = unsafe { libc::fcntl(slave.as_raw_fd(), libc::F_GETFL) };
    assert_eq!(
        flags & libc::O_NONBLOCK,
        0,
        "the terminal was left non-blocking"
    );
}

#[test]
fn an_idle_end_that_drops_bytes_resets_the_peer_they_were_for() {
    // The client reads nothing while the target sends: our pipe fills, nothing moves,
    // the idle timeout ends the relay with bytes for the client still in hand.
    let mut r = Relay::start(&["-t", "0.5"]);
    let mut t = r.target.try_clone().unwrap();
    let writer = thread::spawn(move || {
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..64 {
            if t.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let status = util::wait_timeout(&mut r.child, LIMIT).expect("the relay ended");
    assert_eq!(status.code(), Some(1));
    // The client: a reset, not a clean end after a truncated stream. The target, owed
    // nothing (the client sent nothing): a clean end.
    assert_eq!(
        read_until_end(&mut r.client),
        Some(std::io::ErrorKind::ConnectionReset),
        "the client must not take the cut-off stream for a whole one"
    );
    assert_eq!(read_until_end(&mut r.target), None);
    drop(writer);
    let ran = r.finish();
    assert!(
        ran.stderr_text().contains("how=idle-timeout"),
        "{}",
        ran.show()
    );
}

/// The liveness options of one socket: SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL,
/// TCP_KEEPCNT and TCP_USER_TIMEOUT (ms).
fn liveness(s: &TcpStream) -> [libc::c_int; 5] {
    let get = |level, name| {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes one int into `v` we own.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                level,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
        v
    };
    [
        get(libc::SOL_SOCKET, libc::SO_KEEPALIVE),
        get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
        get(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
        get(libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
        get(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
    ]
}

/// Runs a relay with `args` and returns the liveness options it left on its client
/// socket and on its target socket.
fn liveness_set_by(args: &[&str]) -> [[libc::c_int; 5]; 2] {
    let (mut client, client_peer) = util::tcp_pair();
    let (mut target, target_peer) = util::tcp_pair();
    // Our own handles on the relay's sockets, to read their options.
    let (c_view, t_view) = (
        client_peer.try_clone().unwrap(),
        target_peer.try_clone().unwrap(),
    );
    let started = Instant::now();
    let (child, desc) = spawn_between(args, OwnedFd::from(client_peer), target_peer.into());
    // A byte through shows the relay is past its setup; the liveness options come
    // when it has lasted a second (a short connection is spared them).
    client.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    target.read_exact(&mut b).unwrap();
    if started.elapsed() < Duration::from_millis(800) {
        assert_eq!(
            liveness(&c_view)[0],
            0,
            "SO_KEEPALIVE already set on a relay younger than a second"
        );
    }
    let end = Instant::now() + Duration::from_secs(5);
    while (liveness(&c_view)[0] == 0 || liveness(&t_view)[0] == 0) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    // The last option set comes after SO_KEEPALIVE: let the relay finish setting them.
    std::thread::sleep(Duration::from_millis(50));
    let seen = [liveness(&c_view), liveness(&t_view)];
    drop((c_view, t_view));
    client.shutdown(Shutdown::Write).unwrap();
    target.shutdown(Shutdown::Write).unwrap();
    util::finish(child, &desc, LIMIT).expect_code(0);
    seen
}

fn sysctl(name: &str) -> libc::c_int {
    let path = format!("/proc/sys/net/ipv4/{name}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {text:?}: {e}"))
}

#[test]
fn keepalive_and_user_timeout_reach_both_sockets() {
    // The defaults: a first probe after 120 s of silence, 6 more 30 s apart, and the
    // user timeout that agrees with them, 5 minutes.
    let want = [1, 120, 30, 6, 300_000];
    assert_eq!(liveness_set_by(&[]), [want, want], "defaults");
    // The user timeout follows -k unless given.
    let want = [1, 5, 2, 3, 11_000];
    assert_eq!(liveness_set_by(&["-k", "5,2,3"]), [want, want], "-k 5,2,3");
    let want = [1, 5, 2, 3, 1_500];
    assert_eq!(
        liveness_set_by(&["-k", "5,2,3", "-u", "1.5"]),
        [want, want],
        "-k 5,2,3 -u 1.5"
    );
    // The kernel's largest timers; TCP_USER_TIMEOUT is an int of milliseconds.
    let want = [1, 32767, 32767, 127, i32::MAX];
    assert_eq!(
        liveness_set_by(&["-k", "32767,32767,127"]),
        [want, want],
        "-k 32767,32767,127"
    );
    let want = [1, 30, 30, 6, 0];
    assert_eq!(
        liveness_set_by(&["-k", "30", "-u", "0"]),
        [want, want],
        "-u 0"
    );
    // -k 0: the kernel's timers, and no user timeout.
    let kernel = [
        1,
        sysctl("tcp_keepalive_time"),
        sysctl("tcp_keepalive_intvl"),
        sysctl("tcp_keepalive_probes"),
        0,
    ];
    assert_eq!(liveness_set_by(&["-k", "0"]), [kernel, kernel], "-k 0");
    for bad in [
        &["-k", "1,0"][..],
        &["-k", "1,1,128"],
        &["-u", "x"],
        &["-k", "9,9,9,9"],
    ] {
        util::run(Command::new(BIN).args(bad), LIMIT).expect_code(100);
    }
}

/// Moves the calling thread (libtest runs each test in a thread of its own) into a new
/// network namespace with its loopback up: the sockets it makes and the processes it
/// spawns from then on live there, and so may be cut off without touching the host.
fn private_network() {
    assert!(
        util::is_root(),
        "the vanished-peer tests need root, for a network namespace"
    );
    // SAFETY: unshare takes no pointers; CLONE_NEWNET changes the network namespace of
    // the calling thread only.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    util::run(Command::new("ip").args(["link", "set", "lo", "up"]), LIMIT).expect_code(0);
}

/// Drops every packet to or from local TCP port `port` (nftables, in the namespace of
/// `private_network`): its peer vanishes without a FIN or a reset, as a machine that
/// lost its power or its network would.
fn black_hole(port: u16) {
    let rules = format!(
        "add table inet vanish; \
         add chain inet vanish input {{ type filter hook input priority 0; }}; \
         add rule inet vanish input tcp sport {port} drop; \
         add rule inet vanish input tcp dport {port} drop"
    );
    let ran = util::run(Command::new("nft").arg(&rules), LIMIT);
    ran.expect_code(0);
}

/// The client of a relay started with `args` vanishes (its packets dropped) after a
/// byte each way; if `then_send`, the target then sends it 64 KiB, which the relay can
/// never deliver. The relay must end within `within` (and not before `not_before`)
/// with exit 1, `how=lost-client`, and the target must hear a reset.
fn vanished_client(args: &[&str], then_send: bool, not_before: Duration, within: Duration) {
    private_network();
    let mut r = Relay::start(args);
    r.client.write_all(b"?").unwrap();
    let mut b = [0u8; 1];
    r.target.read_exact(&mut b).unwrap();
    r.target.write_all(b"!").unwrap();
    r.client.read_exact(&mut b).unwrap();
    black_hole(r.client.local_addr().unwrap().port());
    let t0 = std::time::Instant::now();
    if then_send {
        r.target.write_all(&util::pattern(15, 64 << 10)).unwrap();
    }
    let status = util::wait_timeout(&mut r.child, within + Duration::from_secs(10));
    let took = t0.elapsed();
    let target_end = match status {
        Some(_) => Some(read_until_end(&mut r.target)),
        None => {
            let _ = r.child.kill();
            None
        }
    };
    let ran = r.finish();
    assert!(
        status.is_some(),
        "the relay outlived its vanished client{}",
        ran.show()
    );
    ran.expect_code(1);
    assert!(
        ran.stderr_text()
            .contains("how=lost-client (Connection timed out)"),
        "{}",
        ran.show()
    );
    assert!(
        took >= not_before && took <= within,
        "ended after {took:?}, not within {not_before:?}..{within:?}{}",
        ran.show()
    );
    assert_eq!(
        target_end,
        Some(Some(std::io::ErrorKind::ConnectionReset)),
        "the target must hear a reset{}",
        ran.show()
    );
}

#[test]
fn keepalive_ends_the_relay_of_a_client_that_vanished_while_quiet() {
    // Keepalive alone (-u 0): probes 1 s after the client's last packet and 1 s later
    // go unanswered; the second one's interval ends it, 3 s after that packet.
    let s = Duration::from_secs;
    vanished_client(&["-k", "1,1,2", "-u", "0"], false, s(2), s(10));
}

#[test]
fn a_user_timeout_decides_when_keepalive_gives_up() {
    // 100 probes would take 101 s; a 3 s user timeout ends it at the first probe after
    // 3 s of silence.
    let s = Duration::from_secs;
    vanished_client(&["-k", "1,1,100", "-u", "3"], false, s(2), s(10));
}

#[test]
fn the_user_timeout_ends_the_relay_of_a_client_that_stopped_acking() {
    // Data in flight: keepalive (60 s by default) never probes; without a user timeout
    // the kernel would retransmit for ~15 minutes (tcp_retries2).
    let s = Duration::from_secs;
    vanished_client(&["-u", "3"], true, s(2), s(10));
}

// The defaults (-k 120,30,6 and a 300 s user timeout), for the figures in README: five
// minutes each, so run by hand: cargo test --test integration -- --ignored vanished.
#[test]
#[ignore]
fn vanished_quiet_client_with_the_defaults() {
    let s = Duration::from_secs;
    vanished_client(&[], false, s(280), s(330));
}

#[test]
#[ignore]
fn vanished_client_with_bytes_in_flight_with_the_defaults() {
    let s = Duration::from_secs;
    vanished_client(&[], true, s(280), s(330));
}

/// Private dirty memory of `pid` outside its files (heap, anonymous mappings, stack), in
/// KiB: what one more connection costs, where the program's own pages are the same for
/// every connection.
fn anon_private_dirty_kib(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/smaps");
    let smaps = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut anon = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // A mapping's header: range perms offset dev inode [path].
            let path = f.nth(4).unwrap_or("");
            anon = path.is_empty() || path.starts_with('[');
        } else if anon && first == "Private_Dirty:" {
            kib += f.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    kib
}

#[test]
fn a_copying_relay_allocates_its_buffers_when_bytes_come_and_grows_them_for_bulk() {
    // -c takes the path of every connection past the per-user pipe budget (see
    // exhausted_pipe_budget_falls_back_to_copying): copying from the setup on.
    let mut r = Relay::start(&["-c"]);
    util::wait_until_polling(r.pid(), LIMIT);
    // Allocated at setup, the 2 × 256 KiB buffers were 580 KiB here.
    let idle = anon_private_dirty_kib(r.pid());
    assert!(idle < 200, "an idle copying relay holds {idle} KiB");
    r.client.write_all(b"?").unwrap();
    let mut b = [0u8; 1];
    r.target.read_exact(&mut b).unwrap();
    r.target.write_all(b"!").unwrap();
    r.client.read_exact(&mut b).unwrap();
    util::wait_until_polling(r.pid(), LIMIT);
    let small = anon_private_dirty_kib(r.pid());
    assert!(
        small < 200,
        "after a byte each way the relay holds {small} KiB"
    );
    // Bulk both ways: every byte arrives in order, and the buffers grow to the 256 KiB
    // that keep copying fast.
    let ran = flood(r, 16 << 20, (16 << 20) + 5);
    ran.expect_code(0);
    copied_with_grown_buffers(&ran);
}

#[test]
fn after_tcpclient_the_log_names_the_client_and_the_target() {
    // `tcpserver ... tcpclient HOST PORT tcpsplice` (in place of ucspi-proxy): tcpclient
    // rewrites TCPREMOTEIP/PORT to the backend and keeps nothing of the client, so the
    // relay must ask the sockets who is who.
    use std::io::BufRead;
    let (l, target) = util::listener();
    let t = thread::spawn(move || {
        let mut s = util::accept_timeout(&l, LIMIT);
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("target read");
        s.write_all(b"pong").expect("target write");
        got
    });
    let mut child = Command::new("tcpserver")
        .args(["-1", "-R", "-H", "-l0", "127.0.0.1", "0"])
        .args(["tcpclient", "-R", "-H", "-l0", "127.0.0.1"])
        .arg(target.port().to_string())
        .arg(BIN)
        .env("TCPSPLICE_LOG", "stderr")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpserver and tcpclient (package ucspi-tcp)");
    let out = child.stdout.take().expect("stdout");
    let err = child.stderr.take().expect("stderr");
    let _sup = util::Supervisor(child);
    let (tx, rx) = std::sync::mpsc::channel();
    let tx2 = tx.clone();
    thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx2.send(l);
        }
    });
    thread::spawn(move || {
        for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let port: u16 = rx
        .recv_timeout(LIMIT)
        .expect("tcpserver printed no port")
        .trim()
        .parse()
        .expect("a port");
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect to tcpserver");
    let client = c.local_addr().expect("client address");
    c.write_all(b"ping").expect("write");
    c.shutdown(Shutdown::Write).expect("shutdown");
    let mut back = Vec::new();
    c.set_read_timeout(Some(LIMIT)).expect("timeout");
    c.read_to_end(&mut back).expect("read");
    assert_eq!(back, b"pong");
    assert_eq!(t.join().expect("target"), b"ping");
    let mut seen = Vec::new();
    let end = loop {
        let l = rx
            .recv_timeout(LIMIT)
            .unwrap_or_else(|_| panic!("no end line: {seen:?}"));
        if l.starts_with("tcpsplice: info: end ") {
            break l;
        }
        seen.push(l);
    };
    assert!(
        end.contains(&format!(" client={client} ")) && end.contains(&format!(" target={target} ")),
        "the log line names the client {client} and the target {target}: {end}"
    );
}

#[test]
fn usage_errors_reach_a_stderr_that_is_the_same_file_as_stdout() {
    // `prog 2>&1 | less`, `$(prog 2>&1)`, cron: fd 2 is fd 1's pipe; not a socket, so
    // the message is for the user, not data for a peer.
    // With the messages going to syslog too (TCPSPLICE_LOG=syslog, as when /dev/log
    // exists): a usage error is still shown to whoever ran the command.
    let progs = [
        BIN,
        env!("CARGO_BIN_EXE_tcpsplice-dial"),
        env!("CARGO_BIN_EXE_tcpsplice-auth"),
    ];
    for (prog, log) in progs.iter().flat_map(|p| [(p, None), (p, Some("syslog"))]) {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "\"$0\" -Z 2>&1", prog]);
        match log {
            None => cmd.env_remove("TCPSPLICE_LOG"),
            Some(l) => cmd.env("TCPSPLICE_LOG", l),
        };
        let ran = util::run(&mut cmd, LIMIT);
        ran.expect_code(100);
        let out = String::from_utf8_lossy(&ran.stdout);
        assert!(out.contains("usage"), "{prog}: nothing said{}", ran.show());
    }
}
