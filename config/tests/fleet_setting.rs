//! `[fleet]`: the defaults a sidecar gets, and what a hostile or careless config is refused for (plain NATS, names that would escape their subject, nobody allowed to push, unknown keys).

use std::path::Path;
use std::time::Duration;

use eastwall_config::{ConfigError, OnStale, Settings};

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

[groups]
dbas = ["spiffe://corp.example/ops/dbas/*"]
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

const GOOD: &str =
    "[fleet]\nnats = \"tls://nats.internal:4222\"\nname = \"db-01\"\nadmins = [\"dbas\"]\n";

#[test]
fn a_fleet_table_gets_safe_defaults_and_the_sidecars_own_svid() {
    assert!(
        settings("").unwrap().fleet.is_none(),
        "no [fleet]: no fleet"
    );
    let f = settings(GOOD).unwrap().fleet.unwrap();
    assert_eq!(f.servers, vec!["tls://nats.internal:4222".to_owned()]);
    assert_eq!(
        (f.name.as_str(), f.bucket.as_str(), f.stream.as_str()),
        ("db-01", "eastwall", "EASTWALL_LOG")
    );
    assert_eq!(f.on_stale, OnStale::Refuse, "fail closed by default");
    assert_eq!(f.max_staleness, Duration::from_secs(300));
    assert_eq!(f.cert, Path::new("/etc/eastwall/certs/proxy.pem"));
    assert_eq!(f.ca, Path::new("/etc/eastwall/ca/bundle.pem"));
    assert_eq!(f.admins.len(), 1);
    let two = settings("[fleet]\nnats = \"tls://a:4222, tls://b:4222\"\nname = \"x\"\nadmins = [\"spiffe://corp.example/ops/*\"]\non_stale = \"serve\"\n")
        .unwrap()
        .fleet
        .unwrap();
    assert_eq!(two.servers.len(), 2);
    assert_eq!(two.on_stale, OnStale::Serve);
}

#[test]
fn plain_nats_escaping_names_no_admins_and_unknown_keys_are_refused() {
    for (extra, needle) in [
        ("[fleet]\nnats = \"nats://nats.internal:4222\"\nname = \"a\"\nadmins = [\"dbas\"]\n", "plain nats:// is refused"),
        ("[fleet]\nnats = \"tls://nats.internal\"\nname = \"a\"\nadmins = [\"dbas\"]\n", "tls://HOST:PORT"),
        // A dot or a wildcard would publish into another sidecar's subject.
        ("[fleet]\nnats = \"tls://n:4222\"\nname = \"db.01\"\nadmins = [\"dbas\"]\n", "fleet.name"),
        ("[fleet]\nnats = \"tls://n:4222\"\nname = \"*\"\nadmins = [\"dbas\"]\n", "fleet.name"),
        ("[fleet]\nnats = \"tls://n:4222\"\nname = \"a\"\nbucket = \"kv.>\"\nadmins = [\"dbas\"]\n", "fleet.bucket"),
        ("[fleet]\nnats = \"tls://n:4222\"\nname = \"a\"\n", "fleet.admins"),
        ("[fleet]\nnats = \"tls://n:4222\"\nname = \"a\"\nadmins = []\n", "fleet.admins"),
        ("[fleet]\nnats = \"tls://n:4222\"\nname = \"a\"\nadmins = [\"nobody\"]\n", "fleet.admins"),
        ("[fleet]\nnats = \"tls://n:4222\"\nname = \"a\"\nadmins = [\"spiffe://evil.example/ops/*\"]\n", "fleet.admins"),
        ("[fleet]\nnats = \"tls://n:4222\"\nname = \"a\"\nadmins = [\"dbas\"]\non_stale = \"ignore\"\n", "fleet.on_stale"),
        ("[fleet]\nnats = \"tls://n:4222\"\nname = \"a\"\nadmins = [\"dbas\"]\nmax_staleness = \"0s\"\n", "fleet.max_staleness"),
        ("[fleet]\nnats = \"tls://n:4222\"\nname = \"a\"\nadmins = [\"dbas\"]\nverify = false\n", "verify"),
    ] {
        let text = refusal(extra);
        assert!(text.contains(needle), "{extra}\n→ {text}");
    }
}
