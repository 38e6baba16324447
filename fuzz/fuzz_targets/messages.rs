//! AFL++ entry point for `eastwall_fuzz::messages` (see fuzz/src/lib.rs).
fn main() {
    afl::fuzz!(|data: &[u8]| eastwall_fuzz::messages(data));
}
