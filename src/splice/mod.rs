//! tcpsplice: moves bytes between two descriptor pairs with splice(2) until both streams
//! have ended. See man/tcpsplice.1.

pub mod http;
pub mod relay;

use crate::{args, chain, conninfo, diag, environ, exit, sys};
use relay::Config;
use relay::End;
use std::ffi::OsString;

const USAGE: &str = "tcpsplice [-cq] [-t idle] [-g grace] [-k idle[,interval[,count]]] \
     [-u timeout] [-p pipesize] [-R fd] [-W fd] [-r fd] [-w fd]";

/// The program: `argv` is its command line without the program name. Returns the exit
/// status at a normal end (see `chain`); a failure or a signal exits at once.
pub fn main(argv: &[OsString]) -> i32 {
    diag::init("tcpsplice");
    sys::signal_ignore(libc::SIGPIPE, true);
    let kept = options_kept(argv);
    let (cfg, quiet) = (&kept.0, kept.1);
    if chain::checking() {
        // The last link: its options are all there is to check.
        return exit::OK;
    }
    let fds = [cfg.client_in, cfg.client_out, cfg.target_in, cfg.target_out];
    // A descriptor that is not open fails the relay's first fcntl, before anything is
    // changed: asked then, not each time beforehand.
    if let Some(f) = chain::with_reserved(|r| fds.into_iter().find(|f| r.contains(f))) {
        not_open(f);
    }
    // For the log line, asked of the sockets now, while both ends are connected.
    let (client, target) = match quiet {
        true => (None, None),
        false => conninfo::ends(cfg.client_in, cfg.target_in),
    };
    let out = match http_body() {
        Some(body) => http::run(cfg, body),
        None => relay::run(cfg),
    };
    let out = match out {
        Ok(out) => out,
        Err(e) => {
            if e.raw_os_error() == Some(libc::EBADF) {
                if let Some(&f) = fds.iter().find(|&&f| !sys::fd_is_open(f)) {
                    not_open(f);
                }
            }
            diag::die_sys(exit::TEMP, "set up the relay", &e)
        }
    };
    if !quiet {
        log_end(&out, client.as_deref(), target.as_deref());
    }
    match out.end {
        // Told to stop, or broken here: this process must not go on to other work.
        End::Signal { .. } | End::Failed { .. } => std::process::exit(out.end.exit_code()),
        _ => out.end.exit_code(),
    }
}

/// [`options`], once per process for the same words (`args::ParsedOnce`).
fn options_kept(argv: &[OsString]) -> args::Parse<(Config, bool)> {
    KEPT.get(argv, (), || options(argv))
}

static KEPT: args::ParsedOnce<(), (Config, bool)> = args::ParsedOnce::new();

/// The parse ahead of tcpsplice-listen (`chain::parse_ahead`): the last link, it runs
/// no program after it.
pub fn parse_ahead(argv: &[OsString], _: &mut chain::Ahead) -> Option<Vec<OsString>> {
    options_kept(argv);
    None
}

/// The options: the relay's configuration, and whether not to log (`-q`). A function of
/// its own, never inlined, so that what parsing needs is off the stack while the relay
/// sleeps: under tcpsplice-listen the stack the chain holds is private memory of its
/// connection's process, a page per 4 KiB (see ARCHITECTURE.md,
/// "Memory of an idle connection").
#[inline(never)]
fn options(argv: &[OsString]) -> (Config, bool) {
    let mut o = args::options();
    o.optflag("c", "", "copy through user space, never splice");
    o.optflag("q", "", "no log line at the end");
    o.optopt("t", "", "idle timeout", "SECONDS");
    o.optopt("g", "", "drain time after SIGTERM", "SECONDS");
    o.optopt(
        "k",
        "",
        "TCP keepalive timers, 0: the kernel's",
        "IDLE[,INTERVAL[,COUNT]]",
    );
    o.optopt("u", "", "TCP user timeout, 0: none", "SECONDS");
    o.optopt("p", "", "pipe size", "BYTES");
    o.optopt("R", "", "read the client from FD", "FD");
    o.optopt("W", "", "write to the client on FD", "FD");
    o.optopt("r", "", "read the target from FD", "FD");
    o.optopt("w", "", "write to the target on FD", "FD");
    let m = args::parse(&o, argv, USAGE);
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
    let keepalive = match m.opt_str("k") {
        None => Some(relay::DEFAULT_KEEPALIVE),
        Some(s) => parse_keepalive(&s).unwrap_or_else(|| {
            diag::usage(&format!(
                "-k: not 0 or idle[,interval[,count]] in seconds (count 1-127): {s}"
            ))
        }),
    };
    // The user timeout that agrees with the keepalive timers (see DEFAULT_KEEPALIVE);
    // none where the kernel's timers are kept.
    let user_timeout_ms = match secs("u") {
        None => keepalive.map_or(0, |k| {
            (u64::from(k.give_up_secs()) * 1000).min(i32::MAX as u64) as u32
        }),
        Some(d) => u32::try_from(d.as_millis())
            .ok()
            .filter(|&ms| ms <= i32::MAX as u32 && (ms > 0 || d.is_zero()))
            .unwrap_or_else(|| diag::usage("-u: not a timeout from 0.001 to 2147483 seconds")),
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
        keepalive,
        user_timeout_ms,
    };
    (cfg, m.opt_present("q"))
}

#[inline(never)]
fn not_open(f: i32) -> ! {
    diag::die(
        exit::USAGE,
        &format!("unable to use fd {f}: it is not open"),
    )
}

/// The one log line at the end; never inlined, for the same reason as [`options`].
/// Put together piece by piece: through `format_args!`, its fourteen fields were a
/// tenth of the instructions of a short relay (callgrind, 2026-12-01).
#[inline(never)]
fn log_end(out: &relay::Outcome, client: Option<&str>, target: Option<&str>) {
    // Bytes, made text once at the end: a String checks its capacity and encodes at
    // every char pushed, and the numbers are pushed a digit at a time. Sized once for
    // the usual line.
    let mut line: Vec<u8> = Vec::with_capacity(256);
    let put = |line: &mut Vec<u8>, s: &str| line.extend_from_slice(s.as_bytes());
    put(&mut line, "end client=");
    put(&mut line, client.unwrap_or("-"));
    put(&mut line, " user=");
    // Read in place: a copy of each variable was an allocation per connection.
    environ::with_var("TCPSPLICE_USER", |v| {
        put(&mut line, v.and_then(|v| v.to_str()).unwrap_or("-"));
    });
    put(&mut line, " target=");
    put(&mut line, target.unwrap_or("-"));
    push_count(&mut line, " up=", out.up);
    push_count(&mut line, " down=", out.down);
    push_secs(&mut line, out.elapsed);
    put(&mut line, " path=");
    put(&mut line, out.up_path);
    put(&mut line, "/");
    put(&mut line, out.down_path);
    push_count(&mut line, " pipes=", out.up_pipe as u64);
    push_count(&mut line, "/", out.down_pipe as u64);
    push_count(&mut line, " bufs=", out.up_buf as u64);
    push_count(&mut line, "/", out.down_buf as u64);
    put(&mut line, " how=");
    match out.end {
        End::Clean => put(&mut line, "eof"),
        End::Idle => put(&mut line, "idle-timeout"),
        _ => put(&mut line, &out.end.describe()),
    }
    // How tcpsplice-auth checked the user (cached or verified), when it says.
    environ::with_var(crate::auth::LOGIN_VAR, |v| {
        if let Some(l) = v.and_then(|v| v.to_str()) {
            put(&mut line, " login=");
            put(&mut line, l);
        }
    });
    // Every piece was text: the lossy branch is never taken.
    let line = String::from_utf8(line)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    diag::info(&line);
}

/// Appends ` secs=` and `d` in seconds to the millisecond, an exact half rounded up
/// (`{:.3}` of the nearest double, as before, could round it either way): float
/// formatting was a third of the line's cost.
fn push_secs(line: &mut Vec<u8>, d: std::time::Duration) {
    let ms = (d.as_nanos() + 500_000) / 1_000_000;
    push_count(line, " secs=", u64::try_from(ms / 1000).unwrap_or(u64::MAX));
    let frac = (ms % 1000) as u16;
    line.push(b'.');
    for digit in [frac / 100, frac / 10 % 10, frac % 10] {
        line.push(b'0' + digit as u8);
    }
}

/// Appends `word` and `n` in decimal.
fn push_count(line: &mut Vec<u8>, word: &str, n: u64) {
    line.extend_from_slice(word.as_bytes());
    crate::conninfo::push_decimal_bytes(line, n);
}

/// The request body's framing when tcpsplice-dial forwarded a plain-HTTP request
/// (`TCPSPLICE_HTTP_BODY`); None for a plain relay.
fn http_body() -> Option<crate::http::Body> {
    let v = environ::var(crate::http::BODY_VAR).ok()?;
    match crate::http::Body::parse(&v) {
        Some(b) => Some(b),
        None => diag::die(
            exit::USAGE,
            &format!("unable to use {}: {v:?}", crate::http::BODY_VAR),
        ),
    }
}

/// `-k`: `0` (the kernel's timers) or `idle[,interval[,count]]`, whole seconds and a
/// count, each within the kernel's limits; what is left out keeps its default.
fn parse_keepalive(s: &str) -> Option<Option<relay::Keepalive>> {
    use relay::Keepalive;
    if s.trim() == "0" {
        return Some(None);
    }
    let mut k = relay::DEFAULT_KEEPALIVE;
    let mut parts = s.split(',');
    let limits = [
        (&mut k.idle, Keepalive::MAX_IDLE),
        (&mut k.interval, Keepalive::MAX_INTERVAL),
        (&mut k.count, Keepalive::MAX_COUNT),
    ];
    for (field, max) in limits {
        match parts.next() {
            None => break,
            Some(p) => *field = args::number(p.trim(), 1, max)?,
        }
    }
    if parts.next().is_some() {
        return None;
    }
    Some(Some(k))
}

#[cfg(test)]
mod tests {
    use super::parse_keepalive;
    use super::relay::{Keepalive, DEFAULT_KEEPALIVE};

    #[test]
    fn counts_in_decimal() {
        for n in [0, 7, 10, 65535, u64::MAX] {
            let mut line = b"x".to_vec();
            super::push_count(&mut line, " n=", n);
            assert_eq!(line, format!("x n={n}").as_bytes());
        }
    }

    #[test]
    fn seconds_shown_as_the_float_format_shows_them() {
        for ns in [
            0u64,
            1,
            499_999,
            500_001,
            999_999,
            1_000_000,
            12_345_678,
            1_999_600_000,
            86_400_000_000_123,
        ] {
            let d = std::time::Duration::from_nanos(ns);
            let mut s = Vec::new();
            super::push_secs(&mut s, d);
            assert_eq!(
                s,
                format!(" secs={:.3}", d.as_secs_f64()).as_bytes(),
                "{ns}"
            );
        }
    }

    #[test]
    fn keepalive_option() {
        let k = |idle, interval, count| {
            Some(Some(Keepalive {
                idle,
                interval,
                count,
            }))
        };
        assert_eq!(parse_keepalive("0"), Some(None));
        assert_eq!(parse_keepalive("30"), k(30, 30, 6));
        assert_eq!(parse_keepalive("30,5"), k(30, 5, 6));
        assert_eq!(parse_keepalive("1,1,2"), k(1, 1, 2));
        assert_eq!(parse_keepalive("32767,32767,127"), k(32767, 32767, 127));
        for bad in [
            "", "x", "1,,2", "1,1,128", "32768", "1,0", "-1", "1,1,2,3", "0,1",
        ] {
            assert_eq!(parse_keepalive(bad), None, "{bad:?}");
        }
        assert_eq!(DEFAULT_KEEPALIVE.give_up_secs(), 300);
    }
}
