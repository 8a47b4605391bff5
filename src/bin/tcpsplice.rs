//! tcpsplice: moves bytes between two descriptor pairs with splice(2) until both streams
//! have ended. See man/tcpsplice.1.

fn main() {
    std::process::exit(tcpsplice::cli::splice::main(
        std::env::args_os().skip(1).collect(),
    ))
}
