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
use request::{Checker, Client, Policy, Verdict};

use crate::dial::reply;
use crate::rules::Rule;
use crate::{args, chain, conninfo, diag, environ, exit, sys};
use users::Users;

const USAGE: &str = "tcpsplice-auth [-n] [-N cidr]... [-B] [-U] [-f users | -c checkpassword] \
[-p socks5,socks4,http] [-t timeout] [-d faildelay] [-T checktimeout] [-m headsize] \
[-K cachettl] [-j checks] [-l conns_per_user] prog...
       tcpsplice-auth -H  (reads a password on stdin, prints its hash)";

/// The checker when the users file could not be loaded at run time: every login is a
/// temporary failure (SOCKS5 status 1 and exit 111, HTTP 503), with the reason logged.
struct Unavailable(String);

impl Checker for Unavailable {
    fn check(&self, _user: &[u8], _password: &Secret) -> Verdict {
        Verdict::Temporary(self.0.clone())
    }
}

/// Says how the user's login went (`cached` or `verified`) for the relay's log line;
/// removed for no-auth.
pub const LOGIN_VAR: &str = "TCPSPLICE_LOGIN";

/// Who checks the logins, as the command line says.
enum Logins {
    /// `-f`: the users file, loaded (or found unchanged) at each connection.
    Users(String),
    /// `-c`: a checkpassword program.
    Program(CheckPassword),
    /// Neither: only clients without credentials (`-n`, `-N`).
    Nobody,
}

/// Everything the command line says that depends on nothing else. A reused connection
/// process of tcpsplice-listen runs this program with the same words for every
/// connection: querying getopts' matches (a search of the option table and a copy of
/// the value each time) and parsing every value again was a third of the handshake's
/// instructions.
struct Config {
    timeout: Duration,
    fail_delay: Duration,
    head_cap: usize,
    cache_ttl: Duration,
    slots: usize,
    per_user: Option<usize>,
    socks5: bool,
    socks4: bool,
    http: bool,
    /// `-n`: every client may go on without credentials.
    anonymous: bool,
    /// `-N`: clients from these addresses may.
    anon_from: Vec<Rule>,
    logins: Logins,
    bind: bool,
    udp: bool,
    /// The rest of the command line. Empty is a usage error, but reported where it
    /// always was, after the users file is loaded: a broken file is said first.
    next: Vec<OsString>,
}

/// [`config`], once per process for the same words (`args::ParsedOnce`).
fn config_kept(argv: &[OsString]) -> args::Parse<Config> {
    static KEPT: args::ParsedOnce<(), Config> = args::ParsedOnce::new();
    KEPT.get(argv, (), || config(argv))
}

/// The parse ahead of tcpsplice-listen (`chain::parse_ahead`). Not with -H, which
/// is a command of its own (it reads a password on stdin), not a link of a chain.
pub fn parse_ahead(argv: &[OsString], ahead: &mut chain::Ahead) -> Option<Vec<OsString>> {
    if matches(argv).opt_present("H") {
        return None;
    }
    let cfg = config_kept(argv);
    // Every handshake it passes exports the client's choice (handshake::export).
    ahead.target_chosen = true;
    Some(cfg.next.clone())
}

fn matches(argv: &[OsString]) -> getopts::Matches {
    let mut o = args::options();
    o.optflag("H", "", "print a hash of the password read on stdin");
    o.optflag("n", "", "allow clients without credentials");
    o.optmulti(
        "N",
        "",
        "allow clients from this network without credentials",
        "CIDR",
    );
    o.optflag("B", "", "serve SOCKS5 BIND");
    o.optflag("U", "", "serve SOCKS5 UDP ASSOCIATE");
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
    o.optopt("l", "", "most connections at once per user", "N");
    args::parse(&o, argv, USAGE)
}

/// The command line as a [`Config`]; a usage error exits, in the order the options are
/// checked in (`-H` before any). Never inlined, so that what parsing needs is off the
/// stack while the next program runs in this process (see `dial::options`).
#[inline(never)]
fn config(argv: &[OsString]) -> Config {
    let m = matches(argv);
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
    let per_user = m.opt_str("l").map(|s| {
        args::number(&s, 1, users::MAX_CONNS).unwrap_or_else(|| {
            diag::usage(&format!(
                "-l: not a number from 1 to {}: {s}",
                users::MAX_CONNS
            ))
        })
    });
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
    // -N: no-auth for clients from these addresses only (the microsocks -w use: some
    // clients cannot send SOCKS5 passwords at all).
    let anon_from: Vec<Rule> = m
        .opt_strs("N")
        .iter()
        .map(|r| match Rule::parse(r) {
            Ok(rule) if !rule.has_ports() => rule,
            Ok(_) => diag::usage(&format!("-N: a client address or network, no port: {r}")),
            Err(e) => diag::usage(&format!("-N: {e}")),
        })
        .collect();
    let anonymous = m.opt_present("n");
    let logins = match (m.opt_str("f"), m.opt_str("c")) {
        (Some(_), Some(_)) => diag::usage("-f and -c exclude each other"),
        (Some(f), None) => Logins::Users(f),
        (None, Some(c)) => Logins::Program(CheckPassword {
            prog: OsString::from(c),
            timeout: check_timeout,
        }),
        (None, None) if anonymous || !anon_from.is_empty() => Logins::Nobody,
        (None, None) => diag::usage(&format!(
            "give -f users or -c checkpassword, or -n (or -N) to allow clients without credentials: {USAGE}"
        )),
    };
    Config {
        timeout,
        fail_delay,
        head_cap,
        cache_ttl,
        slots,
        per_user,
        socks5,
        socks4,
        http,
        anonymous,
        anon_from,
        logins,
        bind: m.opt_present("B"),
        udp: m.opt_present("U"),
        next: m.free.into_iter().map(OsString::from).collect(),
    }
}

/// The program: `argv` is its command line without the program name.
pub fn main(argv: &[OsString]) -> i32 {
    match handshake_step(argv) {
        Ok(cfg) => chain::exec(&cfg.next),
        Err(code) => code,
    }
}

/// The handshake and the exported request: Ok with the parsed command line, whose
/// `next` is the program to run, or Err with the exit status (a check run). Never inlined, like
/// `dial::options`: under tcpsplice-listen the next links run nested below `main`, and
/// what this held on the stack would stay there, private memory of an idle connection
/// (ARCHITECTURE.md).
#[inline(never)]
fn handshake_step(argv: &[OsString]) -> Result<args::Parse<Config>, i32> {
    diag::init("tcpsplice-auth");
    // Whether the next program may continue in this process is left as it was found:
    // so only under tcpsplice-listen, whose connection process ran us in-process. The
    // checker and the client's bytes are dropped (passwords wiped) before the chain
    // goes on; what stays is the shared login state (loginstate), the parsed users
    // file, hashes the process could read from the file anyway (Users::load_kept),
    // and the parsed command line (config_kept).
    sys::signal_ignore(libc::SIGPIPE, true);
    let cfg = config_kept(argv);
    // Who is on the other end, before anything reads the environment for it (inetd and
    // systemd set none of the UCSPI names).
    conninfo::fill_from_socket(0);
    let checking = chain::checking();
    // Looked up only when -N or a login's check slot needs it.
    let client_ip = || {
        environ::with_var("TCPREMOTEIP", |v| {
            v.and_then(|v| v.to_str()).and_then(|ip| ip.parse().ok())
        })
    };
    let anonymous = cfg.anonymous
        || (!cfg.anon_from.is_empty()
            && client_ip().is_some_and(|ip| {
                let a = std::net::SocketAddr::new(ip, 0);
                cfg.anon_from.iter().any(|r| r.matches(&a))
            }));
    let mut broken = None;
    let (users, cp) = match &cfg.logins {
        Logins::Users(f) => match Users::load_kept(
            std::path::Path::new(f),
            // Under tcpsplice-listen its check at start said it already.
            checking || loginstate::region().is_none(),
        ) {
            Ok(users) => {
                if users.is_empty() {
                    diag::warn(&format!("{f} has no users: every login will fail"));
                }
                (Some(users), None)
            }
            Err(why) if checking => diag::die(exit::USAGE, &format!("unable to load users: {why}")),
            // Broken since the check at start (an edit, a permission), or run by a
            // supervisor that checks nothing: still a configuration error (exit 100),
            // but the client first gets its protocol's answer, not a bare close.
            Err(why) => {
                broken = Some(Unavailable(format!("unable to load users: {why}")));
                (None, None)
            }
        },
        Logins::Program(c) => (None, Some(c)),
        Logins::Nobody => (None, None),
    };
    // Counting a user's connections needs the memory tcpsplice-listen shares between
    // its processes; a process of its own per connection cannot know the others.
    let limits_asked =
        cfg.per_user.is_some() || users.as_ref().is_some_and(|u| u.has_conn_limits());
    // (Not in tcpsplice-listen's check run, a process of its own: its connections
    // will have the memory.)
    if limits_asked && loginstate::region().is_none() && !checking {
        diag::warn(
            "per-user connection limits (-l, conns=) are not enforced: they need \
             tcpsplice-listen running this program in its processes",
        );
    }
    let checker: Option<&dyn Checker> = match (&users, cp, &broken) {
        (Some(u), _, _) => Some(&**u),
        (_, Some(c), _) => Some(c),
        (_, _, Some(b)) => Some(b),
        _ => None,
    };
    if cfg.next.is_empty() {
        diag::usage(USAGE);
    }
    // tcpsplice-listen's connection socket, put on 0 and 1 before the chain began in
    // this process: open, and a socket, without asking the kernel.
    let accepted = chain::is_private(0) && chain::is_private(1);
    if !accepted {
        for fd in [0, 1] {
            if !sys::fd_is_open(fd) {
                diag::die(
                    exit::USAGE,
                    &format!("unable to use fd {fd}: it is not open"),
                );
            }
        }
    }
    if checking {
        if let Some(c) = cp {
            if chain::check(std::slice::from_ref(&c.prog)) != exit::OK {
                return Err(exit::USAGE);
            }
        }
        // What a request would leave for the next link, so that it checks itself as it
        // will run: a client-chosen target, a client waiting for the answer.
        environ::set_var("TCPSPLICE_TARGET", "check.invalid:1");
        environ::set_var("TCPSPLICE_REPLY", "socks5");
        return Err(chain::check(&cfg.next));
    }
    let gate = checker.map(|inner| Gate {
        inner,
        region: loginstate::region(),
        ttl: cfg.cache_ttl,
        slots: cfg.slots,
        deadline: Instant::now() + cfg.timeout,
        source: client_ip(),
        outcome: Cell::new(None),
    });
    let policy = Policy {
        socks5: cfg.socks5,
        socks4: cfg.socks4,
        http: cfg.http,
        anonymous,
        checker: gate.as_ref().map(|g| g as &dyn Checker),
        head_cap: cfg.head_cap,
        fail_delay: cfg.fail_delay,
        bind: cfg.bind,
        udp: cfg.udp,
    };
    let mut client = if accepted {
        Client::on_socket(0, 1, cfg.timeout)
    } else {
        Client::new(0, 1, cfg.timeout)
    };
    let result = handshake::run(&mut client, &policy);
    if let Some(Unavailable(why)) = &broken {
        if let Ok(req) = &result {
            // A client let in without credentials (-n): it still waits for an answer.
            if let Ok(Some(style)) = reply::Style::parse(req.reply) {
                let _ = client.send(&reply::failure(style, reply::Failure::General));
            }
        } else if let Err(f) = &result {
            if !f.reply.is_empty() {
                let _ = client.send(&f.reply);
            }
        }
        client.close_gently(Duration::from_millis(200));
        diag::die(exit::USAGE, why);
    }
    match result {
        Ok(req) => {
            // The handshake's bytes off the socket, the client's data left on it.
            if let Err(e) = client.settle() {
                diag::die(exit::TEMP, &e.describe());
            }
            if let Some(user) = &req.user {
                // conns=N of the user's line, else -l; conns=0 lifts -l for the user.
                let max = match users.as_ref().and_then(|u| u.conn_limit(user.as_bytes())) {
                    Some(0) => None,
                    Some(n) => Some(n),
                    None => cfg.per_user,
                };
                if let (Some(max), Some(r)) = (max, loginstate::region()) {
                    if let Err(over) = r.count_user(user.as_bytes(), max) {
                        over_limit(&mut client, &req, user, max, over);
                    }
                }
            }
            let login = gate.as_ref().and_then(|g| g.outcome.get());
            // The checker goes before the next program runs (in this process,
            // perhaps); the passwords were wiped as they were dropped. The parsed
            // users file stays kept for the next connection (Users::load_kept).
            drop(users);
            handshake::export(&req);
            match login.filter(|_| req.user.is_some()) {
                Some(l) => environ::set_var(LOGIN_VAR, l.as_str()),
                None => environ::remove_var(LOGIN_VAR),
            }
            if let Ok(Some(style)) = reply::Style::parse(req.reply) {
                chain::reply_on_exec_failure(reply::failure(style, reply::Failure::General));
            }
            // Everything this program opened (the users file, a checker's pipes) is
            // closed by now, so a sibling continuing here need not scan for more.
            chain::nothing_to_close();
            Ok(cfg)
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

/// Refuses a user who has `max` connections already: the protocol's refusal (SOCKS5
/// REP 02, SOCKS4 5B, HTTP 429), a `reject` line, exit 1. Without an entry to count the
/// connection in (more connections than tcpsplice-listen allows), a temporary failure.
fn over_limit(
    client: &mut Client,
    req: &request::Request,
    user: &str,
    max: usize,
    over: loginstate::Over,
) -> ! {
    let who = conninfo::client().unwrap_or_else(|| "-".into());
    let (reply, code) = match over {
        loginstate::Over::Limit(held) => {
            diag::info(&format!(
                "reject client={who} user={} proto={} per-user limit {held}/{max}",
                request::escape(user.as_bytes()),
                req.reply
            ));
            (handshake::over_limit(req.reply), exit::POLICY)
        }
        loginstate::Over::Full => {
            diag::warn(&format!(
                "unable to count the connection of user={} client={who}: every entry is taken",
                request::escape(user.as_bytes())
            ));
            (handshake::unavailable(req.reply), exit::TEMP)
        }
    };
    let _ = client.send(&reply);
    client.close_gently(Duration::from_secs(1));
    std::process::exit(code)
}

/// `-H`: hashes the first line of stdin (without its newline) and prints the hash. On a
/// terminal it asks on the terminal itself, without echo, twice, and refuses two
/// different answers.
fn print_hash() -> ! {
    use std::io::IsTerminal;
    let pw = if std::io::stdin().is_terminal() {
        ask_twice()
    } else {
        read_line(0)
    };
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

/// Asks for the password on the terminal (/dev/tty, not stdout, which may be where the
/// hash goes), with echo off, and once more to confirm.
fn ask_twice() -> Secret {
    use std::os::unix::io::AsRawFd;
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .unwrap_or_else(|e| diag::die_sys(exit::TEMP, "open /dev/tty", &e));
    let fd = tty.as_raw_fd();
    let saved = sys::tty_echo_off(fd)
        .unwrap_or_else(|e| diag::die_sys(exit::TEMP, "turn off the echo of the terminal", &e));
    let ask = |prompt: &str| {
        let _ = sys::write_all(fd, prompt.as_bytes());
        let pw = read_line(fd);
        // The newline typed was not echoed either.
        let _ = sys::write_all(fd, b"\n");
        pw
    };
    let first = ask("Password: ");
    let second = ask("Password again: ");
    let _ = sys::tty_restore(fd, &saved);
    if first.as_bytes() != second.as_bytes() {
        diag::die(exit::USAGE, "unable to hash: the two passwords differ");
    }
    first
}

/// Reads `fd` up to the first newline (or the end), without it or a CR before it.
fn read_line(fd: i32) -> Secret {
    let mut pw = Secret::new(Vec::new());
    let mut buf = [0u8; 1024];
    while !pw.as_bytes().contains(&b'\n') {
        match sys::read(fd, &mut buf) {
            Ok(0) => break,
            Ok(n) => pw.vec_mut().extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => diag::die_sys(exit::TEMP, "read the password", &e),
        }
        if pw.as_bytes().len() > MAX_PASSWORD + 2 {
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
    if v.len() > MAX_PASSWORD {
        diag::die(
            exit::USAGE,
            "unable to hash: the password is longer than 4096 bytes",
        );
    }
    pw
}
