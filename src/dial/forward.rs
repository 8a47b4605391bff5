//! A forwarded plain-HTTP request (`TCPSPLICE_REPLY=http-forward`): once connected, the
//! dialer sends the head tcpsplice-auth rewrote (`TCPSPLICE_HTTP_HEAD`) to the origin and,
//! when the client waits for it (`TCPSPLICE_HTTP_CONTINUE`), tells the client to send
//! its body. The body's framing (`TCPSPLICE_HTTP_BODY`) stays for tcpsplice.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;

use crate::http::{BODY_VAR, CONTINUE_VAR, HEAD_VAR};
use crate::{environ, sys};

/// Sends the head on `origin` and answers `100 Continue` on fd 1 if asked to.
pub fn send_head(origin: RawFd) -> io::Result<()> {
    let head = environ::var_os(HEAD_VAR).unwrap_or_default();
    if head.is_empty() || environ::var_os(BODY_VAR).is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{HEAD_VAR} or {BODY_VAR} is not set"),
        ));
    }
    sys::write_all(origin, head.as_bytes())?;
    if environ::var_os(CONTINUE_VAR).is_some_and(|v| v == "1") {
        sys::write_all(1, b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    environ::remove_var(HEAD_VAR);
    environ::remove_var(CONTINUE_VAR);
    Ok(())
}

/// For any other reply: no stale forwarding variable may reach the relay.
pub fn clear_env() {
    for v in [HEAD_VAR, BODY_VAR, CONTINUE_VAR] {
        environ::remove_var(v);
    }
}
