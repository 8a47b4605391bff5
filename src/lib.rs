//! tcpsplice: small programs that make an authenticating TCP proxy when a supervisor
//! chains them per connection (see ARCHITECTURE.md and README.md).
//!
//! A folder per program, each holding its whole logic, its `mod.rs` being the program's
//! `main` (parse the command line, do the one step, chain-load the rest):
//! - [`listen`]: tcpsplice-listen, the supervisor: listening sockets, the accept loop,
//!   reused connection processes, the drop of privileges;
//! - [`auth`]: tcpsplice-auth: the SOCKS5, SOCKS4a and HTTP CONNECT handshakes, the
//!   users file, password hashes, checkpassword;
//! - [`dial`]: tcpsplice-dial: resolve, Happy Eyeballs connect, the answer a waiting
//!   client gets, the PROXY header sent onward;
//! - [`splice`]: tcpsplice, the relay's data path;
//! - [`proxy`]: tcpsplice-proxy: the PROXY protocol header a load balancer sends
//!   first, taken off the connection (its parser is also tcpsplice-listen's, `-P`).
//!
//! and a few shared modules beside them:
//! - [`chain`]: running the rest of the command line (exec, or a sibling in-process);
//! - [`rules`]: which client-chosen targets may be reached (read by tcpsplice-auth in
//!   the users file, enforced by tcpsplice-dial);
//! - [`conninfo`]: who is on each end, from the UCSPI environment;
//! - [`environ`]: the environment variables every program reads and sets, changed in
//!   an overlay that becomes real only where something else reads it (an exec, a child);
//! - [`diag`]: `prog: fatal: unable to ...` messages and the per-connection log line,
//!   sent to syslog or to stderr but never onto the data stream;
//! - [`exit`]: the one exit-code table of the suite;
//! - [`http`]: plain-HTTP forwarding: what the links hand each other, the request and
//!   response head rewriting and the chunked framing, pure functions over bytes;
//! - [`args`]: option values shared by the programs (durations, fds, sizes);
//! - [`sys`]: the syscall layer, errno turned into `io::Error`;
//! - [`dgram`]: datagrams in batches (recvmmsg, sendmmsg), for the UDP relay;
//! - [`shm`]: memory shared by tcpsplice-listen's process tree (mapping, futex).

pub mod args;
pub mod auth;
pub mod chain;
pub mod conninfo;
pub mod dgram;
pub mod diag;
pub mod dial;
pub mod environ;
pub mod exit;
pub mod http;
pub mod listen;
pub mod proxy;
pub mod rules;
pub mod shm;
pub mod splice;
pub mod sys;

use std::ffi::OsString;

/// The programs a link may continue with in its own process (see [`chain::exec`]): the
/// one place that knows them all, handed to [`chain`] by [`run`].
pub const SIBLINGS: &[chain::Program] = &[
    chain::Program {
        name: "tcpsplice",
        main: splice::main,
        parse_ahead: Some(splice::parse_ahead),
    },
    chain::Program {
        name: "tcpsplice-dial",
        main: dial::main,
        parse_ahead: Some(dial::parse_ahead),
    },
    chain::Program {
        name: "tcpsplice-auth",
        main: auth::main,
        parse_ahead: Some(auth::parse_ahead),
    },
    chain::Program {
        name: "tcpsplice-proxy",
        main: proxy::main,
        parse_ahead: None,
    },
];

/// What every `src/bin` main does: tell [`chain`] about the sibling programs, then run
/// `program` with the command line after its name, returning its exit status.
pub fn run(program: fn(&[OsString]) -> i32) -> i32 {
    sys::mark_stack_top();
    chain::set_siblings(SIBLINGS);
    let argv: Vec<OsString> = std::env::args_os().skip(1).collect();
    program(&argv)
}
