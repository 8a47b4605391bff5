//! tcpsplice-listen: accepts TCP connections and runs PROG... for each one with the
//! connection on fds 0 and 1. See man/tcpsplice-listen.1.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::io::RawFd;

pub mod pool;
pub mod privdrop;
pub mod sockets;
pub mod supervisor;
pub mod worker;

use supervisor::{Config, ProxyIn};

use crate::{args, chain, diag, environ, exit, sys};

const USAGE: &str = "tcpsplice-listen [-1Dhq] [-b backlog] [-c max] [-C max_per_ip] \
                     [-r max_use] [-P cidr]... [-t seconds] [-u user] [-g group] [-U] \
                     HOST PORT PROG...
       tcpsplice-listen [options] - - PROG...  (listening sockets from systemd, Accept=no)";

/// The program: `argv` is its command line without the program name.
pub fn main(argv: &[OsString]) -> ! {
    let (listeners, cfg, bound, print_port) = setup(argv);
    serve(listeners, cfg, bound, print_port)
}

/// Everything before serving: options, listening sockets, privileges, the check of
/// PROG... Never inlined, for [`serve`].
#[inline(never)]
fn setup(argv: &[OsString]) -> (Vec<RawFd>, Config, Vec<SocketAddr>, bool) {
    diag::init("tcpsplice-listen");
    diag::stdio_is_not_data();
    // A forked child holds nothing secret: the first link may continue in it.
    chain::allow_in_process(true);
    supervisor::ensure_std_fds();
    let mut o = args::options();
    o.optflag("1", "", "print the bound port on stdout");
    o.optflag("D", "", "set TCP_NODELAY on every connection");
    o.optflag("q", "", "no per-connection log lines");
    o.optopt("b", "", "listen backlog", "N");
    o.optopt("c", "", "most connections at once", "N");
    o.optopt("C", "", "most connections at once per client IP", "N");
    o.optopt("r", "", "most connections one process serves in turn", "N");
    o.optopt("u", "", "run as this user (name or uid)", "USER");
    o.optopt("g", "", "run as this group (name or gid)", "GROUP");
    o.optflag("U", "", "run as $UID and $GID");
    crate::proxy::add_options(&mut o, "P");
    let m = args::parse(&o, argv, USAGE);
    if m.free.len() < 3 {
        diag::usage(USAGE);
    }
    let num = |name: &str, default: usize, min: usize, max: usize| match m.opt_str(name) {
        None => default,
        Some(s) => args::number(&s, min, max).unwrap_or_else(|| {
            diag::usage(&format!("-{name}: not a number from {min} to {max}: {s}"))
        }),
    };
    let backlog = num("b", 128, 1, 65535) as i32;
    let max_conns = num("c", 100, 1, 100_000);
    let prog_start = argv.len() - (m.free.len() - 2);
    let authenticates = argv
        .get(prog_start)
        .and_then(|p| std::path::Path::new(p).file_name())
        .is_some_and(|n| n == "tcpsplice-auth");
    // An authenticating chain gets a per-source limit unless told otherwise: a failed
    // login holds its connection for the failure delay, so a flood of them from one
    // address would otherwise take every -c slot and keep everyone else waiting.
    let max_per_ip = match m.opt_str("C") {
        Some(_) => Some(num("C", 0, 0, 100_000)).filter(|&n| n > 0),
        None if authenticates => Some((max_conns / 4).max(1)),
        None => None,
    };
    // A reused process no longer grows (the environment overlay gave the C library no
    // strings per connection): measured flat at 92 KiB private over 15,000 connections.
    // So the default cap only bounds a leak nobody has found, and a fork and exit per
    // 100 connections (200-270 µs of CPU, README's earlier measurement) is, by estimate,
    // 2 % of a short connection's.
    let max_use = num("r", 10_000, 1, 10_000);
    let proxy =
        crate::proxy::from_options(&m, "P").map(|(from, timeout)| ProxyIn { from, timeout });
    // Looked up before binding, so that a typo fails before anything happens.
    let ids = privdrop::identity(
        m.opt_str("u").as_deref(),
        m.opt_str("g").as_deref(),
        m.opt_present("U"),
    )
    .unwrap_or_else(|(code, msg)| diag::die(code, &msg));
    let (host, port) = (m.free[0].as_str(), m.free[1].as_str());
    // PROG... is the tail of the command line, kept as given (it need not be UTF-8).
    let prog: Vec<OsString> = argv[prog_start..].to_vec();
    let listeners = if host == "-" && port == "-" {
        sockets::from_systemd()
    } else if host == "-" || port == "-" {
        diag::usage(&format!(
            "HOST and PORT must both be - for socket activation: {USAGE}"
        ))
    } else {
        let port: u16 = args::number(port, 0, 65535)
            .unwrap_or_else(|| diag::usage(&format!("not a port number: {port}")));
        let passed = sockets::close_activation_fds();
        if passed > 0 {
            diag::warn(&format!(
                "closed {passed} sockets passed by systemd: HOST PORT were given, not - -"
            ));
        }
        sockets::resolve(host)
            .and_then(|mut addr| {
                addr.set_port(port);
                sockets::bind(&addr, backlog)
            })
            .map(|fd| vec![fd])
    };
    let listeners = listeners.unwrap_or_else(|f| diag::die(f.code, &f.msg));
    supervisor::clean_environment();

    let mut bound = Vec::new();
    for &fd in &listeners {
        match sys::local_addr(fd) {
            Ok(Some(a)) => bound.push(a),
            Ok(None) => diag::die(exit::USAGE, &format!("fd {fd} is not a TCP/IP socket")),
            Err(e) => diag::die_sys(exit::TEMP, "get the bound address", &e),
        }
    }
    if let Some(ids) = ids {
        if let Err((step, e)) = privdrop::drop_to(ids) {
            // EINVAL: an id the kernel cannot take ((uid_t)-1, say), as permanent as
            // EPERM.
            let code = if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EINVAL)) {
                exit::USAGE
            } else {
                exit::TEMP
            };
            diag::die_sys(
                code,
                &format!(
                    "drop privileges to uid {} gid {} ({step})",
                    ids.uid, ids.gid
                ),
                &e,
            );
        }
    }
    // Decided once here rather than in every forked child; after the privilege drop,
    // so that a sibling the new user may not execute is exec'd, and refused, as an exec
    // would be.
    chain::resolve_ahead(&prog);
    // Mistakes in PROG... (a bad rule, a broken users file, a program not there) show
    // now, with the link's own message, not as a bare close at the first client.
    check_chain_apart(&prog);
    // Passed: each link's parse of its command line is made once, here, for all the
    // connection processes to read (`chain::parse_ahead`).
    chain::parse_ahead(&prog);
    // tcpsplice-auth continuing in the connection processes shares its login cache and
    // its bound on password checks through memory mapped here, before any fork.
    if prog.first().and_then(|p| chain::continues_as(p)) == Some("tcpsplice-auth") {
        if let Err(e) = crate::auth::loginstate::create() {
            diag::warn(&format!(
                "unable to map the shared login state: {}: every login is checked in full",
                sys::strerror(&e)
            ));
        }
    }
    let cfg = Config {
        max_conns,
        max_per_ip,
        nodelay: m.opt_present("D"),
        quiet: m.opt_present("q"),
        max_use,
        prog,
        proxy,
        listeners_shared: host == "-",
    };
    (listeners, cfg, bound, m.opt_present("1"))
}

/// Serves with what [`setup`] made, which is off the stack by then: every connection
/// process is forked from below this frame and keeps the stack above it private to it
/// once the supervisor writes there (see ARCHITECTURE.md).
fn serve(listeners: Vec<RawFd>, cfg: Config, bound: Vec<SocketAddr>, print_port: bool) -> ! {
    supervisor::serve(listeners, &cfg, |max_use| {
        if print_port {
            let text: String = bound.iter().map(|a| format!("{}\n", a.port())).collect();
            if let Err(e) = sys::write_all(1, text.as_bytes()) {
                diag::die_sys(exit::TEMP, "print the bound port", &e);
            }
        }
        if !cfg.quiet {
            let addrs: Vec<String> = bound.iter().map(|a| a.to_string()).collect();
            diag::info(&format!(
                "listening on {} max={}{} reuse={max_use}{}",
                addrs.join(" "),
                cfg.max_conns,
                cfg.max_per_ip
                    .map(|n| format!(" max_per_ip={n}"))
                    .unwrap_or_default(),
                cfg.proxy
                    .as_ref()
                    .map(|p| format!(" proxy_from={}", crate::proxy::show_balancers(&p.from)))
                    .unwrap_or_default()
            ));
        }
    })
}

/// Runs [`check_chain`] in a child of its own and waits for it. What the check
/// allocates (the spawn of PROG..., a copy of the environment) would otherwise leave free
/// chunks all over the heap that every connection process inherits, and a connection
/// process's own allocations land in them, a private page each: 11 KiB per idle
/// connection (ARCHITECTURE.md, "Memory of an idle connection").
fn check_chain_apart(prog: &[OsString]) {
    // Inherited as ignored, SIGCHLD would have the kernel reap the child before it can be
    // waited for; `supervisor::serve` sets the default again anyway.
    sys::signal_ignore(libc::SIGCHLD, false);
    match sys::fork_single_threaded() {
        Ok(sys::Forked::Child) => {
            check_chain(prog);
            std::process::exit(exit::OK)
        }
        Ok(sys::Forked::Parent(pid)) => match sys::wait_child(pid) {
            Ok(sys::ChildEnd::Exited(0)) => {}
            // The child said why, with the code the check failed with.
            Ok(sys::ChildEnd::Exited(code)) => std::process::exit(code),
            Ok(sys::ChildEnd::Signaled(sig)) => diag::die(
                exit::TEMP,
                &format!("not starting: the check of the chain ended by signal {sig}"),
            ),
            Err(e) => diag::die_sys(exit::TEMP, "wait for the check of the chain", &e),
        },
        // No process to spare: checked here, holes and all.
        Err(_) => check_chain(prog),
    }
}

/// Runs PROG... once in check mode (`chain::CHECK_VAR`), as the user connections will run
/// as, with /dev/null on fds 0 and 1, and refuses to start when it fails. A first
/// program that is not ours has no check mode: it is only looked for, as exec would.
fn check_chain(prog: &[OsString]) {
    let Some(first) = prog.first() else {
        return;
    };
    if !chain::is_sibling(first) {
        chain::check(&prog[..1]);
        return;
    }
    let shown = first.to_string_lossy();
    let mut cmd = std::process::Command::new(first);
    environ::pass_to(&mut cmd);
    let mut child = match cmd
        .args(&prog[1..])
        .env(chain::CHECK_VAR, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        // As exec would fail for a connection (as the same user): its code and words.
        Err(e) => {
            let code = match e.raw_os_error() {
                Some(libc::ENOENT) => exit::NOTFOUND,
                Some(libc::EACCES) | Some(libc::ENOEXEC) => exit::NOEXEC,
                _ => exit::TEMP,
            };
            diag::die_sys(code, &format!("run {shown}"), &e)
        }
    };
    let end = std::time::Instant::now() + CHECK_LIMIT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if std::time::Instant::now() < end => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                diag::die(
                    exit::TEMP,
                    &format!("unable to check {shown}: no answer within {CHECK_LIMIT:?}"),
                );
            }
            Err(e) => diag::die_sys(exit::TEMP, &format!("check {shown}"), &e),
        }
    };
    match status.code() {
        Some(0) => {}
        Some(code) => diag::die(
            code,
            &format!("not starting: the chain fails its check ({shown} exited {code}; its message says why)"),
        ),
        None => diag::die(
            exit::TEMP,
            &format!("not starting: the check of {shown} ended by a signal"),
        ),
    }
}

/// How long the check run of PROG... may take (it loads files, it does not connect).
const CHECK_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);
