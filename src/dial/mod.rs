//! tcpsplice-dial: connects to the target, puts the connection on fds 6 and 7 and execs
//! the rest of its command line. See man/tcpsplice-dial.1.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

mod bind;
pub mod connect;
pub mod dialer;
pub mod forward;
pub mod proxyproto;
pub mod reply;
pub mod udp;

use crate::rules::Rule;
use crate::{args, chain, diag, environ, sys};
use dialer::{Config, Family, Source};

const USAGE: &str = "tcpsplice-dial [-46Dkm] [-a rule]... [-t seconds] [-s addr|auto] [-p 1|2] \
                     [-b seconds] [-i seconds] [-A addr] \
                     host port prog... (or prog... with TCPSPLICE_TARGET set)";

fn parse_source(s: &str) -> Option<Source> {
    if s == "auto" {
        return Some(Source::Auto);
    }
    if let Ok(ip) = dialer::parse_host(s).and_then(|h| h.parse().map_err(|_| String::new())) {
        return Some(Source::Addr(SocketAddr::new(ip, 0)));
    }
    s.parse::<SocketAddr>().ok().map(Source::Addr)
}

/// The program: `argv` is its command line without the program name. Returns only
/// when the next program ran in this process and ended normally (see `chain`).
pub fn main(argv: &[OsString]) -> i32 {
    diag::init("tcpsplice-dial");
    // Nothing here is secret: the next link may continue in this process.
    chain::allow_in_process(true);
    sys::signal_ignore(libc::SIGPIPE, true);
    let cfg = options_kept(argv);
    if chain::checking() {
        return chain::check(&cfg.prog);
    }
    dialer::run(&cfg)
}

/// [`options`], once per process for the same words (`args::ParsedOnce`). Whether
/// TCPSPLICE_TARGET is set changes what the words mean, so it is part of the key.
fn options_kept(argv: &[OsString]) -> args::Parse<Config> {
    let chosen = environ::with_var(dialer::TARGET_VAR, |v| v.is_some_and(|v| !v.is_empty()));
    kept(argv, chosen)
}

/// [`options`] with TCPSPLICE_TARGET set (`chosen`) or not, parsed once for the same words.
fn kept(argv: &[OsString], chosen: bool) -> args::Parse<Config> {
    static KEPT: args::ParsedOnce<bool, Config> = args::ParsedOnce::new();
    KEPT.get(argv, chosen, || options(argv, chosen))
}

/// The parse ahead of tcpsplice-listen (`chain::parse_ahead`), with TCPSPLICE_TARGET
/// as the links before will have left it.
pub fn parse_ahead(argv: &[OsString], ahead: &mut chain::Ahead) -> Option<Vec<OsString>> {
    Some(kept(argv, ahead.target_chosen).prog.clone())
}

/// The options, as a [`Config`]; `chosen`: TCPSPLICE_TARGET is set, so the command
/// line has no HOST PORT. Never inlined, so that what parsing needs is off the stack
/// while the next program runs in this process (see `splice::options`).
#[inline(never)]
fn options(argv: &[OsString], chosen: bool) -> Config {
    let mut o = args::options();
    o.optflag("4", "", "IPv4 only");
    o.optflag("6", "", "IPv6 only");
    o.optflag("D", "", "TCP_NODELAY");
    o.optflag("k", "", "SO_KEEPALIVE");
    o.optmulti("a", "", "allow client-chosen targets matching RULE", "RULE");
    o.optopt("t", "", "connect timeout", "SECONDS");
    o.optopt("s", "", "source address", "ADDR");
    o.optopt("p", "", "send a PROXY protocol header", "1|2");
    o.optopt("b", "", "BIND: how long to wait for the peer", "SECONDS");
    o.optopt("i", "", "UDP ASSOCIATE: idle timeout", "SECONDS");
    o.optflag("m", "", "UDP ASSOCIATE: client datagrams from any address");
    o.optopt(
        "A",
        "",
        "BIND, UDP ASSOCIATE: the address in the reply",
        "IP",
    );
    let m = args::parse(&o, argv, USAGE);
    let family = match (m.opt_present("4"), m.opt_present("6")) {
        (true, true) => diag::usage("-4 and -6 exclude each other"),
        (true, false) => Family::V4,
        (false, true) => Family::V6,
        _ => Family::Any,
    };
    let allow: Vec<Rule> = m
        .opt_strs("a")
        .iter()
        .map(|r| Rule::parse(r).unwrap_or_else(|e| diag::usage(&format!("-a: {e}"))))
        .collect();
    let positive = |name: &str, default: u64| match m.opt_str(name) {
        None => Duration::from_secs(default),
        Some(s) => args::seconds(&s)
            .filter(|d| !d.is_zero())
            .unwrap_or_else(|| {
                diag::usage(&format!("-{name}: not a number of seconds above 0: {s}"))
            }),
    };
    let timeout = positive("t", 10);
    let bind_timeout = positive("b", 60);
    let udp_idle = positive("i", 60);
    let advertise = m.opt_str("A").map(|s| {
        dialer::parse_host(&s)
            .ok()
            .and_then(|h| h.parse::<std::net::IpAddr>().ok())
            .unwrap_or_else(|| diag::usage(&format!("-A: not an IP address: {s}")))
    });
    let source = match m.opt_str("s") {
        None => Source::Kernel,
        Some(s) => parse_source(&s).unwrap_or_else(|| {
            diag::usage(&format!("-s: not an address, address:port or auto: {s}"))
        }),
    };
    let proxy = match m.opt_str("p").as_deref() {
        None => None,
        Some("1") => Some(1),
        Some("2") => Some(2),
        Some(s) => diag::usage(&format!("-p: PROXY protocol version must be 1 or 2: {s}")),
    };
    let (nodelay, keepalive) = (m.opt_present("D"), m.opt_present("k"));
    let udp_any_source = m.opt_present("m");
    let mut free = m.free;
    let fixed = if chosen {
        None
    } else {
        if free.len() < 3 {
            diag::usage(USAGE);
        }
        let rest = free.split_off(2);
        let host = dialer::parse_host(&free[0]).unwrap_or_else(|e| diag::usage(&e));
        let port = dialer::parse_port(&free[1])
            .unwrap_or_else(|| diag::usage(&format!("not a port from 1 to 65535: {}", free[1])));
        free = rest;
        Some((host, port))
    };
    if free.is_empty() {
        diag::usage(USAGE);
    }
    Config {
        fixed,
        allow,
        family,
        timeout,
        source,
        nodelay,
        keepalive,
        proxy,
        prog: free.into_iter().map(OsString::from).collect(),
        bind_timeout,
        udp_idle,
        udp_any_source,
        advertise,
    }
}
