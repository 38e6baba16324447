//! AFL++ entry point for `eastwall_fuzz::stepup_body` (see fuzz/src/lib.rs).
fn main() {
    afl::fuzz!(|data: &[u8]| eastwall_fuzz::stepup_body(data));
}
