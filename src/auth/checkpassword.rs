//! Delegating the password check to a program of the checkpassword interface
//! (https://cr.yp.to/checkpwd/interface.html): it reads `user\0password\0timestamp\0`
//! from fd 3 and exits 0 (accepted), 1 (refused) or 111 (temporary failure).
//!
//! SOCKS5 answers the check before it reads the request, so the checker cannot sit in
//! the exec chain: it is run as a child, as `PROG true`, and waited for with a bound.
//! Its stdin and stdout are /dev/null, never the client.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::password::Secret;
use super::request::{Checker, Verdict};
use crate::{diag, environ, sys};

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
        // What it would see had the links before this one exec'd: TCPREMOTEIP, say.
        environ::pass_to(&mut cmd);
        // A group of its own, so that a timeout can end all it started.
        cmd.process_group(0);
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
        let answered = self.wait_exit(&mut child);
        if !matches!(answered, Ok(Some(_))) {
            // The whole group goes, while its leader is not yet reaped (so the group id
            // cannot be anyone else's): a shell script checker's children (a sleep, a
            // helper it waits for) would outlive it otherwise, one per attempt.
            sys::kill_group(child.id());
        }
        match answered {
            Ok(Some(code)) => Ok(code),
            Ok(None) => {
                let _ = child.wait();
                Err(format!(
                    "{} did not answer within {:?}",
                    self.prog.to_string_lossy(),
                    self.timeout
                ))
            }
            Err(e) => {
                let _ = child.wait();
                Err(format!("unable to wait for the checker: {e}"))
            }
        }
    }

    /// Waits for the checker to exit, at most the timeout: its exit code (-1 for a
    /// signal), or None when time ran out. Sleeps in poll on a pidfd, woken by the exit.
    fn wait_exit(&self, child: &mut std::process::Child) -> std::io::Result<Option<i32>> {
        let end = Instant::now() + self.timeout;
        let pidfd = sys::pidfd_open(child.id());
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(Some(st.code().unwrap_or(-1)));
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match &pidfd {
                Ok(fd) => {
                    let mut p = [libc::pollfd {
                        fd: std::os::fd::AsRawFd::as_raw_fd(fd),
                        events: libc::POLLIN,
                        revents: 0,
                    }];
                    sys::poll(&mut p, Some(left))?;
                }
                // A kernel without pidfds (before 5.3): look again in a while.
                Err(_) => std::thread::sleep(left.min(Duration::from_millis(10))),
            }
        }
    }
}

impl Checker for CheckPassword {
    fn cache_key(&self, _user: &[u8]) -> Option<(&[u8], Option<&str>)> {
        Some((self.prog.as_bytes(), None))
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
