//! tcpsplice-proxy: takes the PROXY protocol header a load balancer sends first off the
//! connection on fd 0, makes the `TCP*` variables describe the client it names, and
//! execs the rest of its command line. See man/tcpsplice-proxy.1.
//!
//! The link for inetd, xinetd, systemd and tcpserver; tcpsplice-listen reads the header
//! itself (`-P`), so that its per-source limit and its log lines see the client too.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub mod header;

use header::{Header, Reader, Step};

use crate::rules::Rule;
use crate::{args, chain, conninfo, diag, environ, exit, sys};

const USAGE: &str = "tcpsplice-proxy -a cidr [-a cidr]... [-t seconds] prog...";

/// How long a balancer may take to send its header, unless told otherwise: it sends it
/// at once, before any byte of the client's.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses the balancers' addresses given to `-a` (tcpsplice-proxy) or `-P`
/// (tcpsplice-listen): CIDRs or addresses, several per option if separated by commas.
pub fn parse_balancers(opts: &[String]) -> Result<Vec<Rule>, String> {
    let mut out = Vec::new();
    for s in opts.iter().flat_map(|o| o.split(',')).map(str::trim) {
        let ip = s.split('/').next().unwrap_or("");
        if ip.parse::<std::net::IpAddr>().is_err() {
            return Err(format!("not an address or CIDR: {s:?}"));
        }
        out.push(Rule::parse(s)?);
    }
    if out.is_empty() {
        return Err("no balancer address".into());
    }
    Ok(out)
}

/// Adds the options that turn PROXY protocol in on: `-LETTER CIDR` (several times, or
/// comma-separated), the balancers, and `-t SECONDS`, the header's deadline.
pub fn add_options(o: &mut getopts::Options, letter: &str) {
    o.optmulti(
        letter,
        "",
        "believe PROXY headers from these balancers, and serve only them",
        "CIDR",
    );
    o.optopt("t", "", "how long a PROXY header may take", "SECONDS");
}

/// The balancers and the header's deadline given by the options of [`add_options`];
/// None without `-LETTER`. Bad values are usage errors (exit 100).
pub fn from_options(m: &getopts::Matches, letter: &str) -> Option<(Vec<Rule>, Duration)> {
    let given = m.opt_strs(letter);
    if given.is_empty() {
        if m.opt_present("t") {
            diag::usage(&format!("-t: the PROXY header deadline needs -{letter}"));
        }
        return None;
    }
    let balancers =
        parse_balancers(&given).unwrap_or_else(|e| diag::usage(&format!("-{letter}: {e}")));
    let timeout = match m.opt_str("t") {
        None => DEFAULT_TIMEOUT,
        Some(s) => args::seconds(&s)
            .filter(|d| !d.is_zero())
            .unwrap_or_else(|| diag::usage(&format!("-t: not a number of seconds above 0: {s}"))),
    };
    Some((balancers, timeout))
}

/// Whether `peer` is one of the balancers, whose headers are believed.
pub fn trusted(balancers: &[Rule], peer: &SocketAddr) -> bool {
    balancers.iter().any(|r| r.matches(peer))
}

/// The balancers as the log line shows them.
pub fn show_balancers(balancers: &[Rule]) -> String {
    let v: Vec<String> = balancers.iter().map(Rule::to_string).collect();
    v.join(",")
}

/// Variables that described the balancer's connection and say nothing of the client.
pub const BALANCER_VARS: [&str; 4] = [
    "TCPREMOTEHOST",
    "TCPREMOTEINFO",
    "TCPLOCALHOST",
    conninfo::CLIENT_VAR,
];

/// The program: `argv` is its command line without the program name. Returns only
/// when the next program ran in this process and ended normally (see `chain`).
pub fn main(argv: &[OsString]) -> i32 {
    diag::init("tcpsplice-proxy");
    // Whether the next program may continue in this process is left as it was found,
    // as tcpsplice-auth leaves it: only under tcpsplice-listen.
    sys::signal_ignore(libc::SIGPIPE, true);
    let mut o = args::options();
    add_options(&mut o, "a");
    let m = args::parse(&o, argv, USAGE);
    let Some((balancers, timeout)) = from_options(&m, "a") else {
        diag::usage(&format!(
            "-a: which balancers to believe is required: {USAGE}"
        ))
    };
    if m.free.is_empty() {
        diag::usage(USAGE);
    }
    let next: Vec<OsString> = m.free.iter().map(OsString::from).collect();
    if chain::checking() {
        // tcpsplice-listen checking its chain at start: no connection to read from;
        // the rest of the command line checks itself as it will run.
        return chain::check(&next);
    }
    if !sys::fd_is_open(0) {
        diag::die(exit::USAGE, "unable to use fd 0: it is not open");
    }
    // Who sent the header: the socket's peer, which no environment can fake; the
    // supervisor's TCPREMOTEIP when fd 0 is not a socket.
    let peer = match sys::peer_addr(0) {
        Ok(Some(a)) => Some(a),
        _ => var_addr("TCPREMOTEIP", "TCPREMOTEPORT"),
    };
    let Some(peer) = peer else {
        drop_it(
            "-",
            "the connection's peer is not known, so not a trusted balancer",
        )
    };
    let shown = conninfo::join_host_port(&conninfo::ip_text(peer.ip()), &peer.port().to_string());
    if !trusted(&balancers, &peer) {
        drop_it(&shown, "not a trusted balancer (-a)");
    }
    let socket = matches!(sys::fd_kind(0), Ok(sys::FdKind::Socket));
    let deadline = Instant::now() + timeout;
    let mut reader = Reader::new();
    let header = loop {
        match reader.step(0, socket) {
            Step::Done(h) => break h,
            Step::Fail(why) => drop_it(&shown, &why),
            Step::Wait => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            drop_it(
                &shown,
                &format!(
                    "no whole PROXY header within {:?} ({} bytes came)",
                    timeout,
                    reader.taken()
                ),
            );
        }
        let mut p = [libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Err(e) = sys::poll(&mut p, Some(left)) {
            diag::die_sys(exit::TEMP, "poll", &e);
        }
    };
    match header {
        Header::Proxied { client, local } => {
            conninfo::set_ucspi(&local, &client);
            for v in BALANCER_VARS {
                environ::remove_var(v);
            }
        }
        // The balancer's own connection: described as any connection is.
        Header::Local => conninfo::fill_from_socket(0),
    }
    chain::exec(&next)
}

fn var_addr(ip: &str, port: &str) -> Option<SocketAddr> {
    let ip = environ::var(ip).ok()?;
    let port = environ::var(port).ok()?;
    conninfo::join_host_port(&ip, &port).parse().ok()
}

/// A connection that must not be served: logged, and closed by the exit.
fn drop_it(client: &str, why: &str) -> ! {
    diag::warn(&format!("drop client={client} proxy header: {why}"));
    std::process::exit(exit::POLICY)
}
