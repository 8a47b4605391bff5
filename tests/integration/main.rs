//! One integration-test binary (as ripgrep does): each module is the suite of one
//! program, and every test spawns the real binaries over real loopback TCP and pipes.

mod util;

mod auth;
mod chain;
mod dial;
mod docs;
mod http;
mod listen;
mod logins;
mod proxy;
mod proxyin;
mod splice;
mod udp;
