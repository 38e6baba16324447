//! AFL++ entry point for `eastwall_fuzz::settings_toml` (see fuzz/src/lib.rs).
fn main() {
    afl::fuzz!(|data: &[u8]| eastwall_fuzz::settings_toml(data));
}
