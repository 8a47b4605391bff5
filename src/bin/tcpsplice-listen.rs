//! tcpsplice-listen: accepts TCP connections and runs PROG... for each one with the
//! connection on fds 0 and 1. See man/tcpsplice-listen.1.

fn main() {
    tcpsplice::cli::listen::main(std::env::args_os().skip(1).collect())
}
