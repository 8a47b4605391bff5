//! AFL++ target: see tcpsplice_fuzz::handshake.
fn main() {
    afl::fuzz!(|data: &[u8]| tcpsplice_fuzz::handshake::run(data));
}
