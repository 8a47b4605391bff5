//! AFL++ target: see tcpsplice_fuzz::udp.
fn main() {
    afl::fuzz!(|data: &[u8]| tcpsplice_fuzz::udp::run(data));
}
