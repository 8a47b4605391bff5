//! tcpsplice-dial: connects to the target, puts the connection on fds 6 and 7 and execs
//! the rest of its command line. See man/tcpsplice-dial.1.

fn main() {
    std::process::exit(tcpsplice::cli::dial::main(
        std::env::args_os().skip(1).collect(),
    ))
}
