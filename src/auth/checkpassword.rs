//! Delegating the password check to a program of the checkpassword interface
//! (https://cr.yp.to/checkpwd/interface.html): it reads `user\0password\0timestamp\0`
//! from fd 3 and exits 0 (accepted), 1 (refused) or 111 (temporary failure).
//!
//! SOCKS5 answers the check before it reads the request, so the checker cannot sit in
//! the exec chain: it is run as a child, as `PROG true`, and waited for with a bound.
//! Its stdin and stdout are /dev/null, never the client.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::password::Secret;
use super::request::{Checker, Verdict};
use crate::{diag, sys};

/// A checkpassword program and how long it may take.
pub struct CheckPassword {
    pub prog: OsString,
    pub timeout: Duration,
}

impl CheckPassword {
    fn run(&self, user: &[u8], password: &Secret) -> Result<i32, String> {
        let mut msg = Secret::new(Vec::with_capacity(
            user.len() + password.as_bytes().len() + 16,
        ));
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let v = msg.vec_mut();
        v.extend_from_slice(user);
        v.push(0);
        v.extend_from_slice(password.as_bytes());
        v.push(0);
        v.extend_from_slice(stamp.to_string().as_bytes());
        v.push(0);

        let (rfd, wfd) = sys::pipe_nonblocking()
            .map_err(|e| format!("unable to create a pipe: {}", sys::strerror(&e)))?;
        let _ = sys::set_nonblocking(rfd, false);
        let _ = sys::set_nonblocking(wfd, false);
        let stderr_ok = diag::stderr_is_safe();
        let mut cmd = Command::new(&self.prog);
        cmd.arg("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if stderr_ok {
                Stdio::inherit()
            } else {
                Stdio::null()
            });
        // The read end of the pipe becomes the child's fd 3 with close-on-exec cleared.
        sys::pass_fd_to_child(&mut cmd, rfd, 3);
        let spawned = cmd.spawn();
        sys::close(rfd);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                sys::close(wfd);
                return Err(format!(
                    "unable to run {}: {}",
                    self.prog.to_string_lossy(),
                    sys::strerror(&e)
                ));
            }
        };
        // The message is far smaller than a pipe buffer: this write cannot block. A
        // checker that exits without reading gives EPIPE, which its exit status explains.
        let _ = sys::write_all(wfd, msg.as_bytes());
        sys::close(wfd);
        drop(msg);
        let end = Instant::now() + self.timeout;
        loop {
            match child.try_wait() {
                Ok(Some(st)) => {
                    return Ok(st.code().unwrap_or(-1));
                }
                Ok(None) if Instant::now() >= end => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "{} did not answer within {:?}",
                        self.prog.to_string_lossy(),
                        self.timeout
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(format!("unable to wait for the checker: {e}")),
            }
        }
    }
}

impl Checker for CheckPassword {
    fn cache_key(&self, _user: &[u8]) -> Option<(Vec<u8>, Option<String>)> {
        Some((self.prog.as_bytes().to_vec(), None))
    }

    fn check(&self, user: &[u8], password: &Secret) -> Verdict {
        match self.run(user, password) {
            Ok(0) => Verdict::Accept { rules: None },
            Ok(1) => Verdict::Reject,
            Ok(code) => {
                Verdict::Temporary(format!("{} exited {code}", self.prog.to_string_lossy()))
            }
            Err(why) => Verdict::Temporary(why),
        }
    }
}
