fn main() {
    std::process::exit(tcpsplice::run(tcpsplice::proxy::main))
}
