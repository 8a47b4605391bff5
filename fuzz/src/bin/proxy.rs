//! AFL++ target: see tcpsplice_fuzz::proxy.
fn main() {
    afl::fuzz!(|data: &[u8]| tcpsplice_fuzz::proxy::run(data));
}
