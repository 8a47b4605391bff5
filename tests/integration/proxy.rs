//! scripts/proxy, the quick start: usage, the banner only once the proxy listens, one
//! demo password however many first runs race, its printed lines work as pasted, and
//! the defaults that protect a proxy left running.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::auth::{self, Target};
use super::util;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/proxy");
const AUTH: &str = env!("CARGO_BIN_EXE_tcpsplice-auth");
const LIMIT: Duration = Duration::from_secs(30);

/// scripts/proxy with the built programs and a state folder of the test's own.
fn script(state: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(SCRIPT);
    cmd.args(args)
        .env("TCPSPLICE_BIN", Path::new(AUTH).parent().expect("bin dir"))
        .env("XDG_STATE_HOME", state)
        .env("TCPSPLICE_LOG", "stderr")
        .stdin(Stdio::null());
    cmd
}

/// A running scripts/proxy (its process group: the listener and its connections),
/// killed when dropped, and the lines of its stderr.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn start(state: &Path, args: &[&str]) -> Running {
        let mut child = script(state, args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("scripts/proxy");
        let err = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line (trimmed) that starts with `prefix`, waiting for it.
    fn line(&mut self, prefix: &str) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
            return l.clone();
        }
        loop {
            let l = self.lines.recv_timeout(LIMIT).unwrap_or_else(|_| {
                panic!("no line {prefix:?} from scripts/proxy: {:#?}", self.seen)
            });
            let l = l.trim().to_string();
            self.seen.push(l.clone());
            if l.starts_with(prefix) {
                return l;
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: killpg takes a number; the group is the one the child leads.
        unsafe { libc::killpg(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    util::listener().1.port()
}

fn listening(port: u16) -> bool {
    let needle = format!("0100007F:{port:04X} 00000000:0000 0A");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| t.contains(&needle))
}

/// A curl line as printed (`curl [-p] -x PROXY URL`), sent to the test's target.
fn paste_curl(line: &str, t: &Target) -> util::Ran {
    let words: Vec<&str> = line.split_whitespace().collect();
    let tunnel = words.contains(&"-p");
    let proxy = words[words.iter().position(|w| *w == "-x").expect("-x") + 1];
    auth::curl(tunnel, proxy, &format!("http://127.0.0.1:{}/", t.port))
}

fn state(tag: &str) -> PathBuf {
    auth::scratch(&format!("proxy-{tag}"))
}

#[test]
fn help_prints_the_usage_and_exits_0_and_a_bad_option_exits_100() {
    let st = state("help");
    {
        let r = util::run(&mut script(&st, &["-h"]), LIMIT);
        r.expect_code(0);
        assert!(
            String::from_utf8_lossy(&r.stdout).starts_with("usage: scripts/proxy "),
            "{}",
            r.show()
        );
    }
    util::run(&mut script(&st, &["-x"]), LIMIT).expect_code(100);
}

#[test]
fn on_a_port_in_use_it_says_so_and_prints_no_banner() {
    let (_taken, addr) = util::listener();
    let st = state("in-use");
    let r = util::run(&mut script(&st, &["-p", &addr.port().to_string()]), LIMIT);
    r.expect_code(111);
    let err = r.stderr_text();
    assert!(err.contains("Address already in use"), "{}", r.show());
    assert!(
        !err.contains("password:") && !err.contains("curl"),
        "a banner for a proxy that does not run{}",
        r.show()
    );
}

#[test]
fn the_banner_comes_once_it_listens_and_its_lines_work_as_pasted() {
    let t = auth::target();
    let st = state("banner");
    let port = free_port();
    let rule = format!("127.0.0.1/32:{}", t.port);
    // Two rules: the first allows nothing here, the second the target.
    let mut p = Running::start(
        &st,
        &["-p", &port.to_string(), "-a", "192.0.2.0/24", "-a", &rule],
    );
    let socks = p.line("curl -x socks5h://");
    assert!(listening(port), "the banner came before the proxy listened");
    t.expect_body(&paste_curl(&socks, &t));
    t.expect_body(&paste_curl(&p.line("curl -p -x http://"), &t));
    // The protection defaults: at most 20 per client, idle connections ended.
    let listening_line = p.line("tcpsplice-listen: info: listening");
    assert!(listening_line.contains("max_per_ip=20"), "{listening_line}");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", p.child.id())).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.ends_with(" tcpsplice -t 3600 "), "{cmdline}");
    // The hint, followed as written with a name and password put in.
    let hint = p.line("add a user: ");
    let cmd = hint
        .trim_start_matches("add a user: ")
        .replace("NAME", "bob")
        .replace("PASSWORD", "bobs-password");
    util::run(Command::new("sh").args(["-euc", &cmd]), LIMIT).expect_code(0);
    let users = std::fs::read_to_string(st.join("tcpsplice/users")).expect("users");
    assert!(users.lines().all(|l| !l.ends_with(':')), "{users}");
    let bob = socks.replace(
        &socks["curl -x socks5h://".len()..socks.find('@').expect("@")],
        "bob:bobs-password",
    );
    t.expect_body(&paste_curl(&bob, &t));
}

#[test]
fn two_first_runs_at_once_make_one_password() {
    let st = state("race");
    let mut a = Running::start(&st, &["-p", &free_port().to_string()]);
    let mut b = Running::start(&st, &["-p", &free_port().to_string()]);
    let pa = a.line("password: ");
    let pb = b.line("password: ");
    assert_eq!(pa, pb, "two runs printed two passwords");
    let users = std::fs::read_to_string(st.join("tcpsplice/users")).expect("users");
    assert_eq!(
        users.lines().filter(|l| l.starts_with("demo:")).count(),
        1,
        "{users}"
    );
    let pw = pa.trim_start_matches("password: ");
    let line = a.line("curl -x socks5h://");
    assert!(line.contains(&format!("demo:{pw}@")), "{line}");
}

#[test]
fn a_rule_with_a_space_reaches_the_dialer_as_one_word() {
    // Word-split, "127.0.0.1/32:1 x" would become the rule 127.0.0.1/32:1 and a program
    // named x; whole, it is a bad rule, and the check at start says so.
    let st = state("rule-words");
    let r = util::run(
        &mut script(
            &st,
            &["-p", &free_port().to_string(), "-a", "127.0.0.1/32:1 x"],
        ),
        LIMIT,
    );
    r.expect_code(100);
    assert!(
        r.stderr_text().contains("bad rule \"127.0.0.1/32:1 x\""),
        "{}",
        r.show()
    );
}
