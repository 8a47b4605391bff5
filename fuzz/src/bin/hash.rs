//! AFL++ target: see tcpsplice_fuzz::hash.
fn main() {
    afl::fuzz!(|data: &[u8]| tcpsplice_fuzz::hash::run(data));
}
