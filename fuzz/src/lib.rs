//! The harnesses of tcpsplice's fuzz targets, one module per parser, each with a
//! `run(&[u8])` that panics when an invariant fails. The binaries in `src/bin` hand
//! them AFL++'s inputs (`afl::fuzz!`); scripts/fuzz builds and runs them.
//!
//! - [`handshake`]: tcpsplice-auth's handshake on a socketpair or on pipes, checked
//!   against a model of the three protocols written here.
//! - [`users`]: the users file.
//! - [`hash`]: each hash format's parser, the input spelled in the format's alphabet.
//! - [`rules`]: target rules and the deny list, against a list of dangerous addresses
//!   kept here.
//! - [`proxy`]: the PROXY header, read back by a parser written here.
//! - [`proxyin`]: the PROXY header received from a load balancer, against a reference
//!   reading, and taken off a socketpair or a pipe without a byte past it.
//! - [`udp`]: the SOCKS5 UDP datagram header, against a reference reading.
//! - [`http`]: plain-HTTP forwarding's request and response heads and chunked framing.

pub mod bytes;
pub mod handshake;
pub mod hash;
pub mod http;
pub mod proxy;
pub mod proxyin;
pub mod rules;
pub mod udp;
pub mod users;

/// A user name tcpsplice may export and log: 1 to 255 printable ASCII bytes, no colon
/// (the users file's separator). Written here rather than taken from the crate.
pub fn user_name_ok(name: &[u8]) -> bool {
    (1..=255).contains(&name.len()) && name.iter().all(|&b| (0x20..0x7f).contains(&b) && b != b':')
}
