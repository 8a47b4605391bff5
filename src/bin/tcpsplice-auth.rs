//! tcpsplice-auth: reads a SOCKS5, SOCKS4a or HTTP CONNECT request on fds 0/1, checks
//! the client's credentials, exports the target and the user, and execs the rest of its
//! command line (normally tcpsplice-dial). See man/tcpsplice-auth.1.

fn main() {
    std::process::exit(tcpsplice::cli::auth::main(
        std::env::args_os().skip(1).collect(),
    ))
}
