//! tcpsplice-auth under tcpsplice-listen: the verified-login cache (a second login
//! skips the hash, a changed users-file entry is checked again, failures are never
//! cached) and the bound on password checks running at once (-j), which a process
//! killed in the middle of its check does not keep.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util;

const LISTEN: &str = env!("CARGO_BIN_EXE_tcpsplice-listen");
const AUTH: &str = env!("CARGO_BIN_EXE_tcpsplice-auth");
const DIAL: &str = env!("CARGO_BIN_EXE_tcpsplice-dial");
const SPLICE: &str = env!("CARGO_BIN_EXE_tcpsplice");
const PW: &str = "correct horse";

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tcpsplice-logins-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn yescrypt(pw: &str) -> String {
    util::mkpasswd("yescrypt", pw)
}

/// A target that echoes each connection's bytes until EOF, for as long as the test runs.
fn echo_target() -> u16 {
    let (l, a) = util::listener();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
                let mut b = [0u8; 4096];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    a.port()
}

/// tcpsplice-listen running the authenticated chain, with its log lines collected as
/// they come.
struct Proxy {
    p: util::Logged,
    port: u16,
}

impl Proxy {
    fn start(auth_opts: &[&str], target: u16, env: &[(&str, &str)]) -> Proxy {
        let rule = format!("127.0.0.1/32:{target}");
        let (p, out) = util::Logged::spawn(
            Command::new(LISTEN)
                .args(["-1", "127.0.0.1", "0", AUTH])
                .args(auth_opts)
                .args([DIAL, "-a", &rule, SPLICE])
                .env("TCPSPLICE_LOG", "stderr")
                .envs(env.iter().copied()),
            "tcpsplice-listen",
        );
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).expect("read port");
        Proxy {
            p,
            port: line.trim().parse().expect("bound port"),
        }
    }

    fn lines(&self, pat: &str) -> Vec<String> {
        self.p.lines(pat)
    }

    /// Waits until `n` relay end lines were logged; returns their `login=` values.
    fn logins(&self, n: usize) -> Vec<String> {
        self.p
            .wait_lines("tcpsplice: info: end ", n)
            .iter()
            .map(|l| {
                l.split(' ')
                    .find_map(|w| w.strip_prefix("login="))
                    .unwrap_or("-")
                    .to_string()
            })
            .collect()
    }

    fn show(&self) -> String {
        self.p.show()
    }
}

/// One SOCKS5 user/password login and CONNECT to the echo target, then a round trip.
/// Ok(()) when it all worked; Err(the RFC 1929 status) when the login was refused.
fn login(port: u16, user: &str, pw: &str, target: u16) -> Result<(), u8> {
    login_from("127.0.0.1", port, user, pw, target)
}

/// As [`login`], from the loopback address `src`.
fn login_from(src: &str, port: u16, user: &str, pw: &str, target: u16) -> Result<(), u8> {
    match util::socks5(src, port, Some((user, pw)), target) {
        Ok(_) => Ok(()),
        Err(util::Socks5Error::Auth(st)) => Err(st),
        Err(e) => panic!("SOCKS5 login of {user}: {e:?}"),
    }
}

fn write_users(path: &Path, text: &str) {
    // Written beside and renamed, as an editor or a deployment would.
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).expect("write users");
    std::fs::rename(&tmp, path).expect("rename users");
}

#[test]
fn a_second_login_skips_the_hash_until_the_entry_changes() {
    let target = echo_target();
    let dir = scratch("cache");
    let users = dir.join("users");
    write_users(&users, &format!("alice:{}\n", yescrypt(PW)));
    let f = users.to_string_lossy().into_owned();
    let proxy = Proxy::start(&["-d", "0.5", "-f", &f], target, &[]);
    let port = proxy.port;

    // Each login's end line is awaited before the next login, so the lines come in
    // the order of the logins.
    let ok = |n: usize| {
        assert_eq!(login(port, "alice", PW, target), Ok(()), "{}", proxy.show());
        proxy.logins(n)
    };
    ok(1);
    assert_eq!(ok(2), ["verified", "cached"], "{}", proxy.show());

    // A wrong password after a cached success is checked in full and waits.
    let t = Instant::now();
    assert_eq!(login(port, "alice", "wrong", target), Err(1));
    assert!(
        t.elapsed() >= Duration::from_millis(450),
        "a refused login answered after {:?}, before the fail delay",
        t.elapsed()
    );

    // The same password under a new hash (a new salt): the entry changed, so the next
    // login is checked again, and the one after it comes from the cache once more.
    write_users(&users, &format!("alice:{}\n", yescrypt(PW)));
    ok(3);
    assert_eq!(
        ok(4),
        ["verified", "cached", "verified", "cached"],
        "{}",
        proxy.show()
    );

    // A new password: the old one no longer gets in, cached or not.
    write_users(&users, &format!("alice:{}\n", yescrypt("another one")));
    assert_eq!(login(port, "alice", PW, target), Err(1), "{}", proxy.show());
    assert_eq!(login(port, "alice", "another one", target), Ok(()));
    // The user removed: refused at once.
    write_users(&users, &format!("bob:{}\n", yescrypt(PW)));
    assert_eq!(login(port, "alice", "another one", target), Err(1));
    assert_eq!(
        proxy.logins(5)[4],
        "verified",
        "the new password was checked in full\n{}",
        proxy.show()
    );
}

#[test]
fn k0_turns_the_cache_off() {
    let target = echo_target();
    let dir = scratch("nocache");
    let users = dir.join("users");
    write_users(&users, &format!("alice:{}\n", yescrypt(PW)));
    let f = users.to_string_lossy().into_owned();
    let proxy = Proxy::start(&["-K", "0", "-f", &f], target, &[]);
    for _ in 0..3 {
        assert_eq!(login(proxy.port, "alice", PW, target), Ok(()));
    }
    assert_eq!(proxy.logins(3), ["verified"; 3], "{}", proxy.show());
    // The users file is readable by all (0644 here): said once, by the check at start,
    // not once per connection.
    assert_eq!(
        proxy.lines("readable by every user").len(),
        1,
        "{}",
        proxy.show()
    );
}

#[test]
fn an_execd_authenticator_checks_every_login() {
    // TCPSPLICE_EXEC=always: every link is exec'd, as under inetd or systemd, so no
    // process keeps anything from one login to the next.
    let target = echo_target();
    let dir = scratch("exec");
    let users = dir.join("users");
    write_users(&users, &format!("alice:{}\n", yescrypt(PW)));
    let f = users.to_string_lossy().into_owned();
    let proxy = Proxy::start(&["-f", &f], target, &[("TCPSPLICE_EXEC", "always")]);
    for _ in 0..2 {
        assert_eq!(login(proxy.port, "alice", PW, target), Ok(()));
    }
    assert_eq!(proxy.logins(2), ["verified"; 2], "{}", proxy.show());
}

/// A checkpassword program that records when each check starts and ends (with its
/// parent, the authenticating process) in `record`, takes `secs` for each check (30 s
/// for the user `slow`), and accepts the password `pw`.
fn recording_checker(dir: &Path, secs: f64) -> (PathBuf, PathBuf) {
    let record = dir.join("checks");
    let prog = dir.join("checker");
    let script = format!(
        r#"#!/usr/bin/python3
import os, sys, time
f = os.fdopen(3, "rb").read().split(b"\0")
user = f[0].decode()
with open("{rec}", "a") as r:
    r.write("start %s %f %d %d\n" % (user, time.monotonic(), os.getppid(), os.getpid()))
time.sleep(30 if user == "slow" else {secs})
with open("{rec}", "a") as r:
    r.write("end %s %f\n" % (user, time.monotonic()))
sys.exit(0 if f[1] == b"pw" else 1)
"#,
        rec = record.display()
    );
    std::fs::write(&prog, script).expect("write checker");
    std::process::Command::new("chmod")
        .args(["755", &prog.to_string_lossy()])
        .status()
        .expect("chmod");
    (prog, record)
}

/// (user, start, end) of each check the recording checker finished.
fn checks(record: &Path) -> Vec<(String, f64, f64)> {
    let text = std::fs::read_to_string(record).unwrap_or_default();
    let mut starts = std::collections::HashMap::new();
    let mut done = Vec::new();
    for l in text.lines() {
        let w: Vec<&str> = l.split(' ').collect();
        match w.as_slice() {
            ["start", u, t, ..] => {
                starts.insert(u.to_string(), t.parse::<f64>().unwrap_or(0.0));
            }
            ["end", u, t] => {
                let s = starts.get(*u).copied().unwrap_or(0.0);
                done.push((u.to_string(), s, t.parse().unwrap_or(0.0)));
            }
            _ => {}
        }
    }
    done
}

fn overlapping(c: &[(String, f64, f64)]) -> bool {
    c.iter()
        .enumerate()
        .any(|(i, a)| c[i + 1..].iter().any(|b| a.1 < b.2 && b.1 < a.2))
}

/// Concurrent logins of `clients` (source address, user) under `-j j`, through a
/// checker taking `secs` each; all must succeed. The proxy, the checks the checker
/// recorded, the target, the record.
fn concurrent_logins(
    name: &str,
    j: &str,
    secs: f64,
    clients: &[(&'static str, &'static str)],
) -> (Proxy, Vec<(String, f64, f64)>, u16, PathBuf) {
    let target = echo_target();
    let dir = scratch(name);
    let (prog, record) = recording_checker(&dir, secs);
    let proxy = Proxy::start(&["-j", j, "-c", &prog.to_string_lossy()], target, &[]);
    let port = proxy.port;
    let threads: Vec<_> = clients
        .iter()
        .map(|&(src, u)| std::thread::spawn(move || login_from(src, port, u, "pw", target)))
        .collect();
    for t in threads {
        assert_eq!(t.join().expect("client thread"), Ok(()), "{}", proxy.show());
    }
    let c = checks(&record);
    assert_eq!(c.len(), clients.len(), "checks: {c:?}\n{}", proxy.show());
    (proxy, c, target, record)
}

/// Three concurrent logins of three users from three addresses (so that no address
/// holds its share of the slots) through a checker taking 0.4 s each.
fn three_concurrent_logins(j: &str) -> (Proxy, Vec<(String, f64, f64)>, u16, PathBuf) {
    concurrent_logins(
        &format!("slots{j}"),
        j,
        0.4,
        &[
            ("127.0.0.11", "u1"),
            ("127.0.0.12", "u2"),
            ("127.0.0.13", "u3"),
        ],
    )
}

#[test]
fn j1_runs_one_password_check_at_a_time_and_checkpassword_logins_are_cached() {
    let (proxy, c, target, record) = three_concurrent_logins("1");
    assert!(!overlapping(&c), "checks overlapped under -j 1: {c:?}");
    // The checker's verdict is cached too: a repeated login does not run it.
    assert_eq!(login(proxy.port, "u2", "pw", target), Ok(()));
    assert_eq!(checks(&record).len(), 3, "the checker ran again");
    // (The end lines of concurrent connections come in any order.)
    let mut l = proxy.logins(4);
    l.sort();
    assert_eq!(
        l,
        ["cached", "verified", "verified", "verified"],
        "{}",
        proxy.show()
    );
    // A wrong password is not cached away: the checker runs and refuses.
    assert_eq!(login(proxy.port, "u2", "nope", target), Err(1));
    assert_eq!(checks(&record).len(), 4);
}

#[test]
fn logins_that_waited_for_a_check_slot_take_the_one_verified_meanwhile() {
    // The same login three times at once, from three addresses (no address holds its
    // share of the one slot): one check runs, and the two that waited for the slot find
    // its verdict in the cache instead of running the checker again.
    let target = echo_target();
    let dir = scratch("waited");
    let (prog, record) = recording_checker(&dir, 0.4);
    let proxy = Proxy::start(&["-j", "1", "-c", &prog.to_string_lossy()], target, &[]);
    let port = proxy.port;
    let threads: Vec<_> = ["127.0.0.21", "127.0.0.22", "127.0.0.23"]
        .into_iter()
        .map(|src| std::thread::spawn(move || login_from(src, port, "u1", "pw", target)))
        .collect();
    for t in threads {
        assert_eq!(t.join().expect("client thread"), Ok(()), "{}", proxy.show());
    }
    assert_eq!(checks(&record).len(), 1, "{}", proxy.show());
    let mut l = proxy.logins(3);
    l.sort();
    assert_eq!(l, ["cached", "cached", "verified"], "{}", proxy.show());
    // A wrong password meanwhile is still checked in full.
    assert_eq!(login(port, "u1", "nope", target), Err(1));
    assert_eq!(checks(&record).len(), 2);
}

#[test]
fn j3_lets_three_checks_run_at_once() {
    // The counterpart of the test above: with room for all three, they do overlap, so
    // the non-overlap seen under -j 1 is the bound's doing.
    let (_proxy, c, _, _) = three_concurrent_logins("3");
    assert!(
        overlapping(&c),
        "no two checks overlapped under -j 3: {c:?}"
    );
}

#[test]
fn a_process_killed_during_its_check_gives_its_slot_back() {
    let target = echo_target();
    let dir = scratch("killed");
    let (prog, record) = recording_checker(&dir, 0.0);
    let proxy = Proxy::start(&["-j", "1", "-c", &prog.to_string_lossy()], target, &[]);
    let port = proxy.port;
    let slow = std::thread::spawn(move || {
        let _ = std::panic::catch_unwind(|| login(port, "slow", "pw", target));
    });
    // The slow check has started: its parent is the process holding the only slot.
    let end = Instant::now() + Duration::from_secs(20);
    let (holder, checker) = loop {
        let text = std::fs::read_to_string(&record).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.starts_with("start slow ")) {
            let w: Vec<&str> = l.split(' ').collect();
            break (
                w[3].parse::<i32>().expect("ppid"),
                w[4].parse::<i32>().expect("pid"),
            );
        }
        assert!(Instant::now() < end, "the slow check never started");
        std::thread::sleep(Duration::from_millis(10));
    };
    // SAFETY: kill with pids read from the checker's record.
    unsafe {
        libc::kill(holder, libc::SIGKILL);
        libc::kill(checker, libc::SIGKILL);
    }
    let t = Instant::now();
    assert_eq!(
        login(port, "fast", "pw", target),
        Ok(()),
        "{}",
        proxy.show()
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the next login waited {:?} for the dead process's slot",
        t.elapsed()
    );
    let _ = slow.join();
}

#[test]
fn one_address_holds_at_most_half_of_the_check_slots() {
    // -j 2: two checks at once, at most one for 127.0.0.2; a client from 127.0.0.3
    // gets the other slot while 127.0.0.2's logins wait for each other.
    let (_proxy, c, _, _) = concurrent_logins(
        "share",
        "2",
        0.5,
        &[
            ("127.0.0.2", "a1"),
            ("127.0.0.2", "a2"),
            ("127.0.0.3", "b1"),
        ],
    );
    let of = |u: &str| c.iter().filter(|x| x.0 == u).cloned().collect::<Vec<_>>();
    let (a1, a2, b1) = (of("a1"), of("a2"), of("b1"));
    assert!(
        !overlapping(&[a1.clone(), a2.clone()].concat()),
        "one address's checks overlapped: {c:?}"
    );
    assert!(
        overlapping(&[a1, b1.clone()].concat()) || overlapping(&[a2, b1].concat()),
        "the other address waited for the first one's checks: {c:?}"
    );
}

#[test]
fn an_authenticating_chain_gets_a_per_source_limit_unless_told() {
    let target = echo_target();
    let dir = scratch("persource");
    let users = dir.join("users");
    write_users(&users, &format!("alice:{}\n", yescrypt(PW)));
    let f = users.to_string_lossy().into_owned();
    for (opts, want) in [
        (&[][..], Some(" max_per_ip=25 ")),
        (&["-c", "8"][..], Some(" max_per_ip=2 ")),
        (&["-C", "0"][..], None),
        (&["-C", "7"][..], Some(" max_per_ip=7 ")),
    ] {
        let rule = format!("127.0.0.1/32:{target}");
        let mut child = Command::new(LISTEN)
            .args(opts)
            .args([
                "-1",
                "127.0.0.1",
                "0",
                AUTH,
                "-f",
                &f,
                DIAL,
                "-a",
                &rule,
                SPLICE,
            ])
            .env("TCPSPLICE_LOG", "stderr")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tcpsplice-listen");
        let err = BufReader::new(child.stderr.take().expect("stderr"));
        // The check run's warnings (a world-readable users file) come first.
        let line = err
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("listening on"))
            .unwrap_or_default();
        let _ = child.kill();
        let _ = child.wait();
        assert!(line.contains("listening on"), "{opts:?}: {line}");
        match want {
            Some(w) => assert!(line.contains(w), "{opts:?}: {line}"),
            None => assert!(!line.contains("max_per_ip"), "{opts:?}: {line}"),
        }
    }
}

/// The bytes process `pid` has read so far (read, recv, pread), from /proc/PID/io.
fn bytes_read(pid: &str) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("read /proc/PID/io");
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("rchar in /proc/PID/io")
}

#[test]
fn a_settled_users_file_is_read_once_per_process_and_again_when_it_changes() {
    let target = echo_target();
    let dir = scratch("kept");
    let users = dir.join("users");
    // Big enough that a read of it shows among the few bytes of a login.
    let padding = "# padding\n".repeat(20_000);
    let size = padding.len() as u64;
    write_users(&users, &format!("{padding}alice:{}\n", yescrypt(PW)));
    // Kept only once its times have settled (two seconds).
    std::thread::sleep(Duration::from_millis(2500));
    let f = users.to_string_lossy().into_owned();
    let proxy = Proxy::start(&["-f", &f], target, &[]);
    let port = proxy.port;
    let pid_of = |n: usize| -> String {
        let accepts = proxy.lines("accept pid=");
        let l = accepts
            .get(n - 1)
            .unwrap_or_else(|| panic!("{}", proxy.show()));
        l.split(' ')
            .find_map(|w| w.strip_prefix("pid="))
            .expect("pid=")
            .to_string()
    };
    let login_n = |n: usize| {
        assert_eq!(login(port, "alice", PW, target), Ok(()), "{}", proxy.show());
        proxy.logins(n);
        let pid = pid_of(n);
        // Waiting again (it takes the listener's name back last) before the next login:
        // a client that came while it was still winding down could find no process
        // waiting and be given a fresh one.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() != "tcpsplice-liste")
        {
            assert!(
                std::time::Instant::now() < end,
                "process {pid} never waited again"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        pid
    };
    let pid = login_n(1);
    let before = bytes_read(&pid);
    assert_eq!(
        login_n(2),
        pid,
        "one process serves logins one after another"
    );
    let read = bytes_read(&pid) - before;
    assert!(
        read < size,
        "the second login read {read} bytes: the file again"
    );

    // Replaced: read again, and (not settled yet) at every login until it settles.
    write_users(&users, &format!("{padding}alice:{}\n", yescrypt(PW)));
    for n in [3, 4] {
        let before = bytes_read(&pid);
        assert_eq!(login_n(n), pid);
        let read = bytes_read(&pid) - before;
        assert!(
            read >= size,
            "login {n} read {read} bytes: not the changed file"
        );
    }
    assert_eq!(
        proxy.logins(4),
        ["verified", "cached", "verified", "cached"],
        "{}",
        proxy.show()
    );
}
