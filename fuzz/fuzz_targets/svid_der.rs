//! AFL++ entry point for `eastwall_fuzz::svid_der` (see fuzz/src/lib.rs).
fn main() {
    afl::fuzz!(|data: &[u8]| eastwall_fuzz::svid_der(data));
}
