//! Chain loading: the last thing a link of the chain does is exec the rest of its
//! command line, so that no code of its own stays on the connection.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;

use crate::{diag, exit, sys};

/// Execs `argv` (searching PATH for `argv[0]`) with SIGPIPE back at its default and no
/// signal blocked, as the next program expects to inherit them (a signal mask survives
/// exec, and a signalfd user blocks what it reads). Never returns: a failure exits 127 when the
/// program was not found and 126 otherwise.
pub fn exec(argv: &[OsString]) -> ! {
    let Some(first) = argv.first() else {
        diag::die(exit::USAGE, "no program to run");
    };
    let cargs: Result<Vec<CString>, _> = argv
        .iter()
        .map(|a| CString::new(a.as_bytes().to_vec()))
        .collect();
    let Ok(cargs) = cargs else {
        diag::die(exit::USAGE, "a program argument contains a NUL byte");
    };
    let mut ptrs: Vec<*const libc::c_char> = cargs.iter().map(|c| c.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    sys::signal_ignore(libc::SIGPIPE, false);
    sys::unblock_all_signals();
    // SAFETY: ptrs is a NULL-terminated array of pointers into `cargs`, which outlive
    // the call; execvp only returns on failure.
    unsafe { libc::execvp(ptrs[0], ptrs.as_ptr()) };
    let err = std::io::Error::last_os_error();
    let code = if err.raw_os_error() == Some(libc::ENOENT) {
        exit::NOTFOUND
    } else {
        exit::NOEXEC
    };
    diag::die_sys(code, &format!("run {}", first.to_string_lossy()), &err)
}
