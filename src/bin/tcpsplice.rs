fn main() {
    std::process::exit(tcpsplice::run(tcpsplice::splice::main))
}
