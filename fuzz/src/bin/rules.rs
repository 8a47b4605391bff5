//! AFL++ target: see tcpsplice_fuzz::rules.
fn main() {
    afl::fuzz!(|data: &[u8]| tcpsplice_fuzz::rules::run(data));
}
