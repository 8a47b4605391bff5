//! AFL++ target: see tcpsplice_fuzz::http.
fn main() {
    afl::fuzz!(|data: &[u8]| tcpsplice_fuzz::http::run(data));
}
