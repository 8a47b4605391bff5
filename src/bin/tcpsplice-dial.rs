fn main() {
    std::process::exit(tcpsplice::run(tcpsplice::dial::main))
}
