//! tcpsplice: small programs that make an authenticating TCP proxy when a supervisor
//! chains them per connection (see DESIGN.md in the shared notes and README.md).
//!
//! Each program in `src/bin` is a thin `main` calling its [`cli`] module, over these
//! modules:
//! - [`exit`]: the one exit-code table of the suite;
//! - [`diag`]: `prog: fatal: unable to ...` messages and the per-connection log line,
//!   sent to syslog or to stderr but never onto the data stream;
//! - [`sys`]: the few syscall wrappers, with errno turned into `io::Error`;
//! - [`chain`]: exec'ing the rest of the command line;
//! - [`args`]: option values shared by the programs (durations, fds, sizes);
//! - [`conninfo`]: who is on each end, from the UCSPI environment;
//! - [`relay`]: the splicer's data path;
//! - [`rules`]: which client-chosen targets may be reached (allow rules, deny list);
//! - [`dial`], [`connect`], [`reply`], [`proxyproto`]: the dialer, its Happy Eyeballs
//!   connect, the SOCKS/HTTP answer it sends a waiting client, and the PROXY protocol
//!   header it can send the target;
//! - tcpsplice-auth's: [`handshake`] (protocol detection, the request, the environment),
//!   [`socks5`], [`socks4`], [`httpconnect`], [`users`] (the users file), [`password`]
//!   (hash formats, verification) and [`checkpassword`] (delegating the check);
//! - [`listen`], [`worker`], [`listensock`], [`privdrop`]: tcpsplice-listen's supervisor
//!   loop, its reused connection processes, its listening sockets (bound or from
//!   systemd) and its drop of privileges.

pub mod args;
pub mod chain;
pub mod checkpassword;
pub mod cli;
pub mod connect;
pub mod conninfo;
pub mod diag;
pub mod dial;
pub mod exit;
pub mod handshake;
pub mod httpconnect;
pub mod listen;
pub mod listensock;
pub mod password;
pub mod privdrop;
pub mod proxyproto;
pub mod relay;
pub mod reply;
pub mod rules;
pub mod socks4;
pub mod socks5;
pub mod sys;
pub mod users;
pub mod worker;
