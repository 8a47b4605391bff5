//! Plain-HTTP forwarding in the handshake: an absolute-form request (`GET
//! http://host/path HTTP/1.1`) whose head `httpconnect` has read, exactly, as for
//! CONNECT. The head is parsed and rewritten for the origin (`crate::http`), refused
//! with 400 when its framing could be read two ways, and the login is checked as for
//! CONNECT. The rewritten head and the body's framing go to the next programs in the
//! environment (`TCPSPLICE_HTTP_HEAD`, `TCPSPLICE_HTTP_BODY`, `TCPSPLICE_HTTP_CONTINUE`);
//! the body and whatever the client sent after it stay unread in the socket.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use super::httpconnect::{fail, login};
use super::password::Secret;
use super::request::{Failure, Policy, Request};
use crate::http::{self, BODY_VAR, CONTINUE_VAR, HEAD_VAR};
use crate::{environ, exit};

/// The body of a 400 for a request that is not forwarded.
const REFUSED: &str = "Not forwarded: the request could be read more than one way, or asks \
                       for what this proxy does not forward (an https:// URL: use CONNECT; \
                       another scheme; a user name in the URL).";

/// The handshake of a forwarded request, from its complete head.
pub fn handshake(policy: &Policy, head: &[u8]) -> Result<Request, Failure> {
    let mut fwd = http::rewrite_request(head)
        .map_err(|why| fail("400 Bad Request", "", REFUSED, exit::POLICY, why))?;
    let authorization = fwd.authorization.take().map(Secret::new);
    let value = authorization
        .as_ref()
        .map(|a| std::str::from_utf8(a.as_bytes()).unwrap_or(""));
    let (user, rules) = login(policy, value.map(|v| v.trim_matches([' ', '\t'])))?;
    environ::set_var(HEAD_VAR, OsStr::from_bytes(&fwd.head));
    environ::set_var(BODY_VAR, fwd.body.text());
    if fwd.expect_continue {
        environ::set_var(CONTINUE_VAR, "1");
    } else {
        environ::remove_var(CONTINUE_VAR);
    }
    Ok(Request {
        target: fwd.target,
        user,
        rules,
        reply: http::REPLY,
        command: "connect",
    })
}

/// Removes the forwarding variables: for any request but a forwarded one, nothing
/// inherited may pass for them.
pub fn clear_env() {
    for v in [HEAD_VAR, BODY_VAR, CONTINUE_VAR] {
        environ::remove_var(v);
    }
}
