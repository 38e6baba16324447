//! AFL++ entry point for `eastwall_fuzz::relay_boundaries` (see fuzz/src/lib.rs).
fn main() {
    afl::fuzz!(|data: &[u8]| eastwall_fuzz::relay_boundaries(data));
}
