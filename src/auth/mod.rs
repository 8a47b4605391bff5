//! tcpsplice-auth: reads a SOCKS5, SOCKS4a or HTTP CONNECT request on fds 0/1, checks
//! the client's credentials, exports the target and the user, and execs the rest of its
//! command line (normally tcpsplice-dial). See man/tcpsplice-auth.1.

use std::ffi::OsString;
use std::time::Duration;

pub mod checkpassword;
pub mod handshake;
pub mod httpconnect;
pub mod httpforward;
pub mod password;
pub mod request;
pub mod socks4;
pub mod socks5;
pub mod users;

pub mod loginstate;

use std::cell::Cell;
use std::time::Instant;

use checkpassword::CheckPassword;
use loginstate::Gate;
use password::Secret;
use request::MAX_PASSWORD;
use request::{Checker, Client, Policy};

use crate::{args, chain, conninfo, diag, exit, sys};
use users::Users;

const USAGE: &str = "tcpsplice-auth [-n] [-f users | -c checkpassword] [-p socks5,socks4,http] \
[-t timeout] [-d faildelay] [-T checktimeout] [-m headsize] prog...
       tcpsplice-auth -H  (reads a password on stdin, prints its hash)";

/// Says how the user's login went (`cached` or `verified`) for the relay's log line;
/// removed for no-auth.
pub const LOGIN_VAR: &str = "TCPSPLICE_LOGIN";

/// The program: `argv` is its command line without the program name.
pub fn main(argv: Vec<OsString>) -> i32 {
    diag::init("tcpsplice-auth");
    // Whether the next program may continue in this process is left as it was found:
    // so only under tcpsplice-listen, whose connection process ran us in-process. The
    // users file, the checker and the client's bytes are dropped (passwords wiped)
    // before the chain goes on; what stays is the shared login state (loginstate).
    sys::signal_ignore(libc::SIGPIPE, true);
    let mut o = args::options();
    o.optflag("H", "", "print a hash of the password read on stdin");
    o.optflag("n", "", "allow clients without credentials");
    o.optopt("f", "", "users file", "FILE");
    o.optopt("c", "", "checkpassword program", "PROG");
    o.optopt("p", "", "protocols", "LIST");
    o.optopt("t", "", "handshake timeout", "SECONDS");
    o.optopt("d", "", "delay before a failed login's answer", "SECONDS");
    o.optopt("T", "", "checkpassword timeout", "SECONDS");
    o.optopt("m", "", "largest HTTP request head", "BYTES");
    o.optopt(
        "K",
        "",
        "how long a verified login is remembered",
        "SECONDS",
    );
    o.optopt("j", "", "most password checks at once", "N");
    let m = args::parse(&o, &argv, USAGE);
    if m.opt_present("H") {
        print_hash();
    }
    let secs = |name: &str, default: f64| match m.opt_str(name) {
        None => Duration::from_secs_f64(default),
        Some(s) => args::seconds(&s)
            .unwrap_or_else(|| diag::usage(&format!("-{name}: not a number of seconds: {s}"))),
    };
    let timeout = secs("t", 10.0);
    if timeout.is_zero() {
        diag::usage("-t: the handshake timeout cannot be 0");
    }
    let fail_delay = secs("d", 1.0);
    let check_timeout = secs("T", 5.0);
    let head_cap = match m.opt_str("m") {
        None => 8192,
        Some(s) => args::size(&s)
            .filter(|&n| (256..=1 << 20).contains(&n))
            .unwrap_or_else(|| diag::usage(&format!("-m: not a size from 256 to 1m: {s}"))),
    };
    let cache_ttl = secs("K", 300.0);
    let slots = match m.opt_str("j") {
        // Worked out when a check first needs a slot: it reads cgroup files, a dozen
        // system calls that a cached login need not pay.
        None => 0,
        Some(s) => args::number(&s, 1, loginstate::MAX_SLOTS).unwrap_or_else(|| {
            diag::usage(&format!(
                "-j: not a number from 1 to {}: {s}",
                loginstate::MAX_SLOTS
            ))
        }),
    };
    let (mut socks5, mut socks4, mut http) = (true, true, true);
    if let Some(list) = m.opt_str("p") {
        (socks5, socks4, http) = (false, false, false);
        for p in list.split(',') {
            match p {
                "socks5" => socks5 = true,
                "socks4" => socks4 = true,
                "http" => http = true,
                _ => diag::usage(&format!(
                    "-p: unknown protocol {p}: use socks5, socks4, http"
                )),
            }
        }
    }
    let anonymous = m.opt_present("n");
    let (users, cp) = match (m.opt_str("f"), m.opt_str("c")) {
        (Some(_), Some(_)) => diag::usage("-f and -c exclude each other"),
        (Some(f), None) => {
            let users = Users::load(std::path::Path::new(&f)).unwrap_or_else(|why| {
                diag::die(exit::USAGE, &format!("unable to load users: {why}"))
            });
            if users.is_empty() {
                diag::warn(&format!("{f} has no users: every login will fail"));
            }
            (Some(users), None)
        }
        (None, Some(c)) => (
            None,
            Some(CheckPassword {
                prog: OsString::from(c),
                timeout: check_timeout,
            }),
        ),
        (None, None) if anonymous => (None, None),
        (None, None) => diag::usage(&format!(
            "give -f users or -c checkpassword, or -n to allow clients without credentials: {USAGE}"
        )),
    };
    let checker: Option<&dyn Checker> = match (&users, &cp) {
        (Some(u), _) => Some(u),
        (_, Some(c)) => Some(c),
        _ => None,
    };
    if m.free.is_empty() {
        diag::usage(USAGE);
    }
    for fd in [0, 1] {
        if !sys::fd_is_open(fd) {
            diag::die(
                exit::USAGE,
                &format!("unable to use fd {fd}: it is not open"),
            );
        }
    }
    let gate = checker.map(|inner| Gate {
        inner,
        region: loginstate::region(),
        ttl: cache_ttl,
        slots,
        deadline: Instant::now() + timeout,
        source: std::env::var("TCPREMOTEIP").ok(),
        outcome: Cell::new(None),
    });
    let policy = Policy {
        socks5,
        socks4,
        http,
        anonymous,
        checker: gate.as_ref().map(|g| g as &dyn Checker),
        head_cap,
        fail_delay,
    };
    conninfo::fill_from_socket(0);
    let mut client = Client::new(0, 1, timeout);
    let result = handshake::run(&mut client, &policy);
    match result {
        Ok(req) => {
            let login = gate.as_ref().and_then(|g| g.outcome.get());
            // The parsed users file goes before the next program runs (in this
            // process, perhaps); the passwords were wiped as they were dropped.
            drop((users, cp));
            handshake::export(&req);
            match login.filter(|_| req.user.is_some()) {
                Some(l) => std::env::set_var(LOGIN_VAR, l.as_str()),
                None => std::env::remove_var(LOGIN_VAR),
            }
            let next: Vec<OsString> = m.free.iter().map(OsString::from).collect();
            drop(m);
            // Everything this program opened (the users file, a checker's pipes) is
            // closed by now, so a sibling continuing here need not scan for more.
            chain::nothing_to_close();
            chain::exec(&next)
        }
        Err(f) => {
            let who = conninfo::client().unwrap_or_else(|| "-".into());
            diag::warn(&format!("{} client={who} proto={}", f.why, f.proto));
            if !f.reply.is_empty() {
                let _ = client.send(&f.reply);
            }
            client.close_gently(Duration::from_secs(1));
            std::process::exit(f.code)
        }
    }
}

/// `-H`: hashes the first line of stdin (without its newline) and prints the hash.
fn print_hash() -> ! {
    let mut pw = Secret::new(Vec::new());
    let mut buf = [0u8; 1024];
    loop {
        match sys::read(0, &mut buf) {
            Ok(0) => break,
            Ok(n) => pw.vec_mut().extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => diag::die_sys(exit::TEMP, "read the password", &e),
        }
        if pw.as_bytes().len() > MAX_PASSWORD {
            diag::die(
                exit::USAGE,
                "unable to hash: the password is longer than 4096 bytes",
            );
        }
    }
    buf.iter_mut().for_each(|b| *b = 0);
    let v = pw.vec_mut();
    if let Some(nl) = v.iter().position(|&b| b == b'\n') {
        v[nl..].iter_mut().for_each(|b| *b = 0);
        v.truncate(nl);
    }
    if v.last() == Some(&b'\r') {
        v.pop();
    }
    if pw.as_bytes().is_empty() {
        diag::die(exit::USAGE, "unable to hash: the password is empty");
    }
    match password::hash_new(pw.as_bytes()) {
        Ok(h) => {
            let _ = sys::write_all(1, format!("{h}\n").as_bytes());
            std::process::exit(exit::OK)
        }
        Err(e) => diag::die(exit::TEMP, &format!("unable to hash: {e}")),
    }
}
