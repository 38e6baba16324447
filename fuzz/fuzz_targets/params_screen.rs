//! AFL++ entry point for `eastwall_fuzz::params_screen` (see fuzz/src/lib.rs).
fn main() {
    afl::fuzz!(|data: &[u8]| eastwall_fuzz::params_screen(data));
}
