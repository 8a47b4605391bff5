//! AFL++ target: see tcpsplice_fuzz::users.
fn main() {
    afl::fuzz!(|data: &[u8]| tcpsplice_fuzz::users::run(data));
}
