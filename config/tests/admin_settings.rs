//! `[admin] listen`: the default, turning it off, and what a wrong value is told.

use std::net::SocketAddr;
use std::path::Path;

use eastwall_config::{ConfigError, Settings, DEFAULT_ADMIN_LISTEN};

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
app = ["spiffe://corp.example/app/**"]
db = ["spiffe://corp.example/db/**"]
"#;

fn settings(admin: &str) -> Result<Settings, ConfigError> {
    let text = format!("{MINIMAL}\n{admin}");
    Settings::from_toml(Path::new("/etc/eastwall/eastwall.toml"), &text)
}

fn refused(admin: &str) -> String {
    match settings(admin) {
        Ok(s) => panic!("should be refused: {admin} -> {:?}", s.admin),
        Err(e) => e.lines().join("\n"),
    }
}

#[test]
fn absent_means_loopback_9187() {
    let s = settings("").unwrap();
    assert_eq!(s.admin.listen, Some(DEFAULT_ADMIN_LISTEN));
    assert_eq!(DEFAULT_ADMIN_LISTEN, "127.0.0.1:9187".parse().unwrap());
    let s = settings("[admin]\n").unwrap();
    assert_eq!(s.admin.listen, Some(DEFAULT_ADMIN_LISTEN));
}

#[test]
fn off_or_empty_turns_it_off() {
    assert_eq!(
        settings("[admin]\nlisten = \"off\"\n")
            .unwrap()
            .admin
            .listen,
        None
    );
    assert_eq!(
        settings("[admin]\nlisten = \"\"\n").unwrap().admin.listen,
        None
    );
}

#[test]
fn any_address_is_accepted_and_port_zero_too() {
    let s = settings("[admin]\nlisten = \"0.0.0.0:9187\"\n").unwrap();
    assert_eq!(
        s.admin.listen,
        Some("0.0.0.0:9187".parse::<SocketAddr>().unwrap())
    );
    let s = settings("[admin]\nlisten = \"[::1]:0\"\n").unwrap();
    assert_eq!(
        s.admin.listen,
        Some("[::1]:0".parse::<SocketAddr>().unwrap())
    );
}

#[test]
fn a_wrong_value_names_the_key_and_the_line() {
    for bad in [
        "\"localhost:9187\"",
        "\"9187\"",
        "\"127.0.0.1:99999\"",
        "\"127.0.0.1:9187\\n[x]\"",
    ] {
        let err = refused(&format!("[admin]\nlisten = {bad}\n"));
        assert!(err.contains("admin.listen"), "{bad}: {err}");
        assert!(
            err.contains("expected an IP address and port"),
            "{bad}: {err}"
        );
    }
    // A value of the wrong type: file:line:column of the value and what was expected.
    for bad in ["9187", "true"] {
        let admin = format!("[admin]\nlisten = {bad}\n");
        let line = format!("{MINIMAL}\n{admin}").lines().count();
        let err = refused(&admin);
        assert!(
            err.contains(&format!("eastwall.toml:{line}:")),
            "{bad}: {err}"
        );
        assert!(err.contains("expected a string"), "{bad}: {err}");
    }
}

#[test]
fn no_other_admin_key_is_accepted() {
    let err = refused("[admin]\nlisten = \"127.0.0.1:9187\"\nkill = true\n");
    assert!(err.contains("kill"), "{err}");
}
