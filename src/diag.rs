//! Diagnostics and the per-connection log line.
//!
//! Under inetd, xinetd and systemd with `StandardInput=socket`, fd 2 may be the client's
//! socket: a message written there would be read by the client as data. So messages go
//! to syslog when `/dev/log` exists, and to stderr only when fd 2 is not a TCP socket nor
//! the same socket as a data descriptor (0, 1, 6, 7) — a terminal excepted, where the
//! user reading it is the point. `TCPSPLICE_LOG=syslog|stderr|both|none` overrides the choice.

use std::ffi::{CStr, CString};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use nix::syslog::{Facility, LogFlags, Severity};

use crate::environ;
use crate::exit;
use crate::sys;

static PROG: Mutex<&'static str> = Mutex::new("tcpsplice");
// Worked out at the first message, from the descriptors as they are then; forgotten by
// `init`, because a sibling program continuing in this process (chain::exec) has other
// descriptors and another name.
static SINKS: Mutex<Option<Sinks>> = Mutex::new(None);

#[derive(Clone, Copy, Debug)]
struct Sinks {
    syslog: bool,
    stderr: bool,
}

/// Whether fds 0 and 1 carry a connection's data, as they do for every link of a chain.
static STDIO_IS_DATA: AtomicBool = AtomicBool::new(true);

/// Set by [`keep_decisions`]: the sinks worked out for a program are kept for the next
/// time the same program runs in this process, by (program, whether fds 0 and 1 are
/// data).
static KEEP: AtomicBool = AtomicBool::new(false);
static KEPT: Mutex<Vec<(&'static str, bool, Sinks)>> = Mutex::new(Vec::new());

/// Names the program for every message. Call first thing in `main`.
pub fn init(prog: &'static str) {
    *PROG.lock().unwrap_or_else(|e| e.into_inner()) = prog;
    STDIO_IS_DATA.store(true, Ordering::Relaxed);
    reuse_kept();
}

/// Says that this program's fds 0 and 1 carry no connection's data (tcpsplice-listen:
/// its clients are on the sockets it accepts), so that fd 2 may be the same file as
/// them, as `2>&1`, runit's and daemontools' `exec 2>&1` and nohup make it.
pub fn stdio_is_not_data() {
    STDIO_IS_DATA.store(false, Ordering::Relaxed);
    reuse_kept();
}

/// Says that where messages go will not change for the life of this process, whichever
/// connection it serves: a reused connection process of tcpsplice-listen, whose fd 2 is
/// the supervisor's (it exits if that is closed or replaced), whose environment is put
/// back after every connection, and whose data descriptors are sockets made after fd 2,
/// so never fd 2 itself. Each link of each connection then skips the half-dozen
/// syscalls of the decision (is /dev/log there, what is fd 2).
pub fn keep_decisions() {
    KEEP.store(true, Ordering::Relaxed);
}

/// Sets the sinks to those kept for the current program, or to be worked out anew.
fn reuse_kept() {
    let prog = prog();
    let data = STDIO_IS_DATA.load(Ordering::Relaxed);
    let kept = KEEP
        .load(Ordering::Relaxed)
        .then(|| {
            let kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
            kept.iter()
                .find(|&&(p, d, _)| p == prog && d == data)
                .map(|&(_, _, s)| s)
        })
        .flatten();
    if kept.is_some_and(|s| s.syslog) {
        // The C library's connection was closed with the last program (forget_syslog);
        // openlog only names the next one, it connects at the first message.
        let ident = syslog_ident(prog);
        let _ = nix::syslog::openlog(Some(ident), LogFlags::LOG_PID, Facility::LOG_DAEMON);
    }
    *SINKS.lock().unwrap_or_else(|e| e.into_inner()) = kept;
}

/// The program name given to [`init`].
pub fn prog() -> &'static str {
    *PROG.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether fd 2 may be written to: not a TCP socket, not the same socket as a data
/// descriptor (0, 1, 6, 7), or else a terminal. The same file or pipe as fd 1 is fine:
/// that is `>log 2>&1`, `2>&1 | less`, cron's capture, where the user asked for the
/// messages beside the output; only a socket shared with the data is a peer reading
/// them as data (inetd, xinetd, systemd `StandardInput=socket`). Programs a link runs
/// (checkpassword) inherit fd 2 only when it is safe.
pub fn stderr_is_safe() -> bool {
    if !sys::fd_is_open(2) {
        return false;
    }
    if sys::isatty(2) {
        return true;
    }
    if sys::is_inet_socket(2) {
        return false;
    }
    let Ok((kind, err)) = sys::fd_identity(2) else {
        return false;
    };
    if kind != sys::FdKind::Socket {
        return true;
    }
    let data: &[i32] = if STDIO_IS_DATA.load(Ordering::Relaxed) {
        &[0, 1, 6, 7]
    } else {
        &[]
    };
    !data
        .iter()
        .any(|&fd| sys::fd_identity(fd).is_ok_and(|(_, id)| id == err))
}

fn sinks() -> Sinks {
    let mut cached = SINKS.lock().unwrap_or_else(|e| e.into_inner());
    *cached.get_or_insert_with(|| {
        let mode = environ::var("TCPSPLICE_LOG").unwrap_or_default();
        let (syslog, stderr) = match mode.as_str() {
            "syslog" => (true, false),
            "stderr" => (false, true),
            "both" => (true, true),
            "none" => (false, false),
            _ if std::path::Path::new("/dev/log").exists() => (true, sys::isatty(2)),
            _ => (false, true),
        };
        let stderr = stderr && stderr_is_safe();
        if syslog {
            let ident = syslog_ident(prog());
            let _ = nix::syslog::openlog(Some(ident), LogFlags::LOG_PID, Facility::LOG_DAEMON);
        }
        let s = Sinks { syslog, stderr };
        if KEEP.load(Ordering::Relaxed) {
            let data = STDIO_IS_DATA.load(Ordering::Relaxed);
            KEPT.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((prog(), data, s));
        }
        s
    })
}

/// Closes the C library's connection to syslog, as an exec would (it is close-on-exec);
/// the next message opens a new one. Call before closing descriptors wholesale: a
/// number closed behind syslog's back and reused by a connection would receive the
/// next message.
pub fn forget_syslog() {
    nix::syslog::closelog();
}

/// openlog keeps the pointer it is given, so the ident must live for the whole process;
/// one per program name, since a reused connection process names itself again for every
/// connection.
fn syslog_ident(prog: &'static str) -> &'static CStr {
    static IDENTS: Mutex<Vec<(&'static str, &'static CStr)>> = Mutex::new(Vec::new());
    let mut idents = IDENTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&(_, ident)) = idents.iter().find(|(p, _)| *p == prog) {
        return ident;
    }
    let ident: &'static CStr = Box::leak(CString::new(prog).unwrap_or_default().into_boxed_c_str());
    idents.push((prog, ident));
    ident
}

/// Sends one message with the C library's syslog(3): its connection to /dev/log is made
/// again when a send fails (the log daemon restarted), which the `syslog` crate's is not
/// (see Cargo.toml).
fn emit(severity: Severity, kind: &str, msg: &str) {
    let s = sinks();
    if s.syslog {
        let body = if kind.is_empty() {
            msg.to_string()
        } else {
            format!("{kind}: {msg}")
        };
        // A NUL inside a message would truncate it (nix refuses it); it can only come
        // from outside input. The facility is openlog's.
        let _ = nix::syslog::syslog(severity, &body.replace('\0', "\\0"));
    }
    if s.stderr {
        // One allocation, of the right size: a connection's line is written here for
        // every connection.
        let p = prog();
        let mut line = String::with_capacity(p.len() + kind.len() + msg.len() + 5);
        line.push_str(p);
        line.push_str(": ");
        if !kind.is_empty() {
            line.push_str(kind);
            line.push_str(": ");
        }
        line.push_str(msg);
        line.push('\n');
        let _ = sys::write_all(2, line.as_bytes());
    }
}

/// `prog: warning: MSG`.
pub fn warn(msg: &str) {
    emit(Severity::LOG_WARNING, "warning", msg);
}

/// `prog: info: MSG`, for the one line per connection and per event worth keeping.
pub fn info(msg: &str) {
    emit(Severity::LOG_INFO, "info", msg);
}

/// `prog: fatal: MSG`, then exit with `code`.
pub fn die(code: i32, msg: &str) -> ! {
    emit(Severity::LOG_ERR, "fatal", msg);
    std::process::exit(code)
}

/// `prog: fatal: unable to WHAT: REASON`, then exit with `code`.
pub fn die_sys(code: i32, what: &str, err: &io::Error) -> ! {
    die(code, &format!("unable to {what}: {}", sys::strerror(err)))
}

/// `prog: usage: USAGE`, then exit 100. Also on a safe stderr when the messages go to
/// syslog: a usage error is for whoever typed the command, wherever they read it.
pub fn usage(usage: &str) -> ! {
    emit(Severity::LOG_ERR, "usage", usage);
    let s = sinks();
    if !s.stderr && stderr_is_safe() && environ::var("TCPSPLICE_LOG").as_deref() != Ok("none") {
        let line = format!("{}: usage: {usage}\n", prog());
        let _ = sys::write_all(2, line.as_bytes());
    }
    std::process::exit(exit::USAGE)
}

/// Prints `text` on stdout for `-h`: the user asked for it, so it goes where they look.
pub fn help(text: &str) -> ! {
    let _ = sys::write_all(1, text.as_bytes());
    std::process::exit(exit::OK)
}
