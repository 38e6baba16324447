//! `[locks] file`: its default, and the values refused because a lock write would destroy them.

use std::path::Path;

use eastwall_config::{ConfigError, Settings};

const MINIMAL: &str = r#"trust_domain = "corp.example"
guards = "db"

[listen]
address = "127.0.0.1:6432"
cert = "certs/proxy.pem"
key = "certs/proxy.key"
client_ca = "ca/bundle.pem"

[upstream]
address = "127.0.0.1:5433"
login = "trust"

[segments]
db = ["spiffe://corp.example/db/**"]
"#;

fn settings(extra: &str) -> Result<Settings, ConfigError> {
    Settings::from_toml(
        Path::new("/etc/eastwall/eastwall.toml"),
        &format!("{MINIMAL}{extra}"),
    )
}

fn refusal(extra: &str) -> String {
    match settings(extra) {
        Ok(_) => panic!("should be refused: {extra}"),
        Err(e) => e.lines().join("\n"),
    }
}

#[test]
fn the_lock_file_defaults_to_locks_json_beside_the_config() {
    let s = settings("").unwrap();
    assert_eq!(s.locks_file, Path::new("/etc/eastwall/locks.json"));
    let s = settings("[locks]\nfile = \"state/locks.json\"\n").unwrap();
    assert_eq!(s.locks_file, Path::new("/etc/eastwall/state/locks.json"));
}

#[test]
fn a_lock_file_that_is_a_folder_the_policy_or_the_log_is_refused_with_its_line() {
    for (value, needle) in [
        ("", "empty string"),
        ("state/", "folder"),
        ("..", "folder"),
        ("policy.ew", "file of its own"),
        ("decisions.log", "file of its own"),
    ] {
        let text = refusal(&format!("[locks]\nfile = \"{value}\"\n"));
        assert!(text.contains("locks.file"), "{text}");
        assert!(text.contains(needle), "{value:?}: {text}");
        assert!(text.contains("eastwall.toml:17:"), "{text}");
    }
    let text = refusal("[locks]\nfiles = \"x\"\n");
    assert!(text.contains("unknown field"), "{text}");
}
