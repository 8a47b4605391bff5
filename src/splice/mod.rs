//! tcpsplice: moves bytes between two descriptor pairs with splice(2) until both streams
//! have ended. See man/tcpsplice.1.

pub mod relay;

use crate::{args, chain, conninfo, diag, exit, sys};
use relay::Config;
use relay::End;
use std::ffi::OsString;

const USAGE: &str =
    "tcpsplice [-cq] [-t idle] [-g grace] [-p pipesize] [-R fd] [-W fd] [-r fd] [-w fd]";

/// The program: `argv` is its command line without the program name. Returns the exit
/// status at a normal end (see `chain`); a failure or a signal exits at once.
pub fn main(argv: Vec<OsString>) -> i32 {
    diag::init("tcpsplice");
    sys::signal_ignore(libc::SIGPIPE, true);
    let mut o = args::options();
    o.optflag("c", "", "copy through user space, never splice");
    o.optflag("q", "", "no log line at the end");
    o.optopt("t", "", "idle timeout", "SECONDS");
    o.optopt("g", "", "drain time after SIGTERM", "SECONDS");
    o.optopt("p", "", "pipe size", "BYTES");
    o.optopt("R", "", "read the client from FD", "FD");
    o.optopt("W", "", "write to the client on FD", "FD");
    o.optopt("r", "", "read the target from FD", "FD");
    o.optopt("w", "", "write to the target on FD", "FD");
    let m = args::parse(&o, &argv, USAGE);
    if !m.free.is_empty() {
        diag::usage(USAGE);
    }
    let fd = |name: &str, default| match m.opt_str(name) {
        None => default,
        Some(s) => {
            args::fd(&s).unwrap_or_else(|| diag::usage(&format!("-{name}: not a descriptor: {s}")))
        }
    };
    let secs = |name: &str| {
        m.opt_str(name).map(|s| {
            args::seconds(&s)
                .unwrap_or_else(|| diag::usage(&format!("-{name}: not a number of seconds: {s}")))
        })
    };
    let pipe_size = match m.opt_str("p") {
        None => relay::DEFAULT_PIPE_SIZE,
        Some(s) => args::size(&s)
            .filter(|&n| (4096..=1 << 30).contains(&n))
            .unwrap_or_else(|| diag::usage(&format!("-p: not a size from 4k to 1024m: {s}"))),
    };
    let cfg = Config {
        client_in: fd("R", 0),
        client_out: fd("W", 1),
        target_in: fd("r", 6),
        target_out: fd("w", 7),
        idle: secs("t").filter(|d| !d.is_zero()),
        grace: secs("g").unwrap_or(std::time::Duration::from_secs(5)),
        pipe_size,
        copy_only: m.opt_present("c"),
    };
    for f in [cfg.client_in, cfg.client_out, cfg.target_in, cfg.target_out] {
        if !sys::fd_is_open(f) || chain::is_reserved(f) {
            diag::die(
                exit::USAGE,
                &format!("unable to use fd {f}: it is not open"),
            );
        }
    }
    let out = match relay::run(&cfg) {
        Ok(out) => out,
        Err(e) => diag::die_sys(exit::TEMP, "set up the relay", &e),
    };
    if !m.opt_present("q") {
        let user = std::env::var("TCPSPLICE_USER").unwrap_or_else(|_| "-".into());
        // How tcpsplice-auth checked the user (cached or verified), when it says.
        let login = std::env::var(crate::auth::LOGIN_VAR)
            .map(|l| format!(" login={l}"))
            .unwrap_or_default();
        diag::info(&format!(
            "end client={} user={} target={} up={} down={} secs={:.3} path={}/{} pipes={}/{} how={}{}",
            conninfo::client().unwrap_or_else(|| "-".into()),
            user,
            conninfo::target().unwrap_or_else(|| "-".into()),
            out.up,
            out.down,
            out.elapsed.as_secs_f64(),
            out.up_path,
            out.down_path,
            out.up_pipe,
            out.down_pipe,
            out.end.describe(),
            login,
        ));
    }
    match out.end {
        // Told to stop, or broken here: this process must not go on to other work.
        End::Signal { .. } | End::Failed { .. } => std::process::exit(out.end.exit_code()),
        _ => out.end.exit_code(),
    }
}
