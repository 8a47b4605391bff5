//! AFL++ target: see tcpsplice_fuzz::proxyin.
fn main() {
    afl::fuzz!(|data: &[u8]| tcpsplice_fuzz::proxyin::run(data));
}
