//! AFL++ entry point for `eastwall_fuzz::startup_packet` (see fuzz/src/lib.rs).
fn main() {
    afl::fuzz!(|data: &[u8]| eastwall_fuzz::startup_packet(data));
}
