fn main() {
    std::process::exit(tcpsplice::run(tcpsplice::auth::main))
}
