fn main() {
    std::process::exit(tcpsplice::run(|argv| tcpsplice::listen::main(argv)))
}
