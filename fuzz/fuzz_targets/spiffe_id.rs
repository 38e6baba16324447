//! AFL++ entry point for `eastwall_fuzz::spiffe_id` (see fuzz/src/lib.rs).
fn main() {
    afl::fuzz!(|data: &[u8]| eastwall_fuzz::spiffe_id(data));
}
