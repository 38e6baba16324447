//! AFL++ entry point for `eastwall_fuzz::csr` (see fuzz/src/lib.rs).
fn main() {
    afl::fuzz!(|data: &[u8]| eastwall_fuzz::csr(data));
}
