//! eastwall.toml: the example loads, defaults are safe, and every mistake names file:line and key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use eastwall_config::{
    Config, ConfigError, PasswordSource, Settings, UpstreamLogin, UpstreamTarget, Verdict,
};

const EXAMPLE: &str = include_str!("../../examples/eastwall.toml");
const SEED: &str = include_str!("../../examples/policy.ew");

/// A minimal valid file; tests append or replace lines in it.
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

fn settings(text: &str) -> Result<Settings, ConfigError> {
    Settings::from_toml(Path::new("/etc/eastwall/eastwall.toml"), text)
}

fn refused(text: &str) -> Vec<String> {
    match settings(text) {
        Ok(_) => panic!("should be refused:\n{text}"),
        Err(e) => e.lines(),
    }
}

fn has(lines: &[String], needle: &str) -> String {
    lines
        .iter()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no error mentions {needle:?}: {lines:#?}"))
        .clone()
}

fn with_upstream(upstream: &str) -> String {
    MINIMAL.replace(
        "[upstream]\naddress = \"127.0.0.1:5433\"\nlogin = \"trust\"\n",
        &format!("[upstream]\n{upstream}\n"),
    )
}

#[test]
fn example_config_and_seed_policy_load_together() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eastwall.toml");
    std::fs::write(&path, EXAMPLE).unwrap();
    std::fs::write(dir.path().join("policy.ew"), SEED).unwrap();
    let config = Config::load(&path).unwrap();
    let s = &config.settings;
    assert_eq!(s.guards, "db");
    assert_eq!(s.service_port, 5432);
    assert_eq!(s.trust_domain.as_str(), "corp.example");
    assert_eq!(s.listen.cert, dir.path().join("certs/proxy.pem"));
    assert_eq!(s.mfa.stepup_listen, Some("127.0.0.1:8443".parse().unwrap()));
    assert_eq!(s.segments.len(), 4);
    assert_eq!(config.policy.rule_count(), 2);
    assert_eq!(config.policy.file(), "policy.ew");
}

#[test]
fn defaults_are_the_documented_ones() {
    let s = settings(MINIMAL).unwrap();
    assert_eq!(s.service_port, 5432);
    assert_eq!(s.mfa.max_age, Duration::from_secs(300));
    assert_eq!(s.mfa.max_failures, 20);
    assert_eq!(s.mfa.failure_window, Duration::from_secs(900));
    assert_eq!(s.mfa.stepup_listen, None);
    assert_eq!(s.limits.startup_timeout, Duration::from_secs(30));
    assert_eq!(s.limits.max_connections, 1000);
    assert_eq!(s.limits.cancels_per_second, 10);
    assert_eq!(s.limits.idle_timeout, None);
    assert_eq!(s.limits.handshake_timeout, Duration::from_secs(5));
    assert_eq!(s.limits.max_handshakes, 250);
    assert_eq!(s.limits.max_handshakes_per_source, 32);
    assert_eq!(s.upstream.connect_timeout, Duration::from_secs(5));
    assert!(!s.upstream.allow_plaintext_remote);
    assert_eq!(s.policy_file, PathBuf::from("/etc/eastwall/policy.ew"));
    assert_eq!(s.audit.path, PathBuf::from("/etc/eastwall/decisions.log"));
    assert_eq!(
        s.mfa.secrets,
        PathBuf::from("/etc/eastwall/mfa/secrets.json")
    );
}

#[test]
fn relative_paths_resolve_against_the_config_folder_and_absolute_ones_stay() {
    let text = MINIMAL.replace(
        "client_ca = \"ca/bundle.pem\"",
        "client_ca = \"/opt/ca.pem\"",
    );
    let s = settings(&text).unwrap();
    assert_eq!(s.listen.key, PathBuf::from("/etc/eastwall/certs/proxy.key"));
    assert_eq!(s.listen.client_ca, PathBuf::from("/opt/ca.pem"));
}

#[test]
fn unknown_key_is_an_error_with_its_line() {
    let lines = refused(&MINIMAL.replace("guards = \"db\"", "guards = \"db\"\ngaurds = \"x\""));
    let e = has(&lines, "gaurds");
    assert!(e.starts_with("/etc/eastwall/eastwall.toml:3:1:"), "{e}");
}

#[test]
fn guards_must_name_a_defined_segment() {
    let lines = refused(&MINIMAL.replace("guards = \"db\"", "guards = \"dbs\""));
    let e = has(&lines, "guards:");
    assert!(
        e.starts_with("/etc/eastwall/eastwall.toml:2:10: guards: expected the name of a segment"),
        "{e}"
    );
    assert!(e.contains("\"app\", \"db\""), "{e}");
}

#[test]
fn segment_patterns_must_be_in_our_trust_domain_with_whole_segment_wildcards() {
    let lines = refused(&MINIMAL.replace(
        "app = [\"spiffe://corp.example/app/**\"]",
        "app = [\"spiffe://evil.example/app/**\", \"spiffe://corp.example/app*\"]",
    ));
    let foreign = has(&lines, "evil.example");
    assert!(foreign.contains(":15:8: segments.app:"), "{foreign}");
    has(
        &lines,
        ":15:40: segments.app: wildcards stand for whole path segments",
    );
}

#[test]
fn a_literal_password_is_refused_with_the_reason() {
    let lines = refused(&with_upstream(
        "address = \"127.0.0.1:5433\"\nlogin = \"password\"\npassword = \"hunter2\"",
    ));
    let e = has(&lines, "upstream.password:");
    assert!(
        e.contains("password_file") && e.contains("password_env"),
        "{e}"
    );
    assert!(
        !e.contains("hunter2"),
        "the error must not echo the secret: {e}"
    );
}

#[test]
fn password_login_takes_a_file_or_an_env_var() {
    let s = settings(&with_upstream(
        "address = \"127.0.0.1:5433\"\nlogin = \"password\"\npassword_file = \"upstream.pw\"",
    ))
    .unwrap();
    assert_eq!(
        s.upstream.login,
        UpstreamLogin::Password {
            user_secrets: PasswordSource::File("/etc/eastwall/upstream.pw".into())
        }
    );
    let s = settings(&with_upstream(
        "address = \"127.0.0.1:5433\"\nlogin = \"password\"\npassword_env = \"PGPW\"",
    ))
    .unwrap();
    assert_eq!(
        s.upstream.login,
        UpstreamLogin::Password {
            user_secrets: PasswordSource::Env("PGPW".into())
        }
    );
    let lines = refused(&with_upstream(
        "address = \"127.0.0.1:5433\"\nlogin = \"password\"",
    ));
    has(&lines, "expects password_file");
}

#[test]
fn keys_of_another_login_mode_are_errors() {
    let lines = refused(&with_upstream(
        "address = \"127.0.0.1:5433\"\nlogin = \"trust\"\npassword_file = \"pw\"",
    ));
    has(
        &lines,
        "upstream.password_file: expected no `password_file` with login = \"trust\"",
    );
}

#[test]
fn plaintext_login_to_a_remote_host_is_refused_unless_allowed() {
    let remote = "address = \"db.internal:5432\"\nlogin = \"trust\"";
    let lines = refused(&with_upstream(remote));
    has(&lines, "upstream.address: refusing a plaintext login");
    let allowed = settings(&with_upstream(&format!(
        "{remote}\nallow_plaintext_remote = true"
    )))
    .unwrap();
    assert_eq!(
        allowed.upstream.target,
        UpstreamTarget::Tcp {
            host: "db.internal".into(),
            port: 5432
        }
    );
    // Loopback needs no permission, in either spelling.
    settings(&with_upstream(
        "address = \"localhost:5433\"\nlogin = \"trust\"",
    ))
    .unwrap();
    settings(&with_upstream(
        "address = \"[::1]:5433\"\nlogin = \"trust\"",
    ))
    .unwrap();
}

#[test]
fn cert_login_to_a_remote_host_is_fine_and_defaults_the_server_name() {
    let s = settings(&with_upstream(
        "address = \"db.internal:5432\"\nlogin = \"cert\"\ncert_dir = \"up\"\nca = \"up/ca.pem\"",
    ))
    .unwrap();
    assert_eq!(
        s.upstream.login,
        UpstreamLogin::Cert {
            cert_dir: "/etc/eastwall/up".into(),
            ca: "/etc/eastwall/up/ca.pem".into(),
            server_name: "db.internal".into()
        }
    );
    let lines = refused(&with_upstream(
        "socket_dir = \"/run/pg\"\nlogin = \"cert\"\ncert_dir = \"up\"\nca = \"ca.pem\"",
    ));
    has(&lines, "Unix sockets");
}

#[test]
fn unix_socket_upstream_takes_a_port() {
    let s = settings(&with_upstream(
        "socket_dir = \"/var/run/postgresql\"\nport = 5433\nlogin = \"trust\"",
    ))
    .unwrap();
    assert_eq!(
        s.upstream.target,
        UpstreamTarget::Unix {
            dir: "/var/run/postgresql".into(),
            port: 5433
        }
    );
    let lines = refused(&with_upstream(
        "address = \"127.0.0.1:5433\"\nsocket_dir = \"/x\"\nlogin = \"trust\"",
    ));
    has(&lines, "not both");
}

#[test]
fn bad_values_name_the_key_and_what_is_valid() {
    let text = format!(
        "{}\n[mfa]\nmax_age = \"five minutes\"\n[limits]\nmax_connections = 0\n",
        MINIMAL
            .replace("127.0.0.1:6432", "localhost:6432")
            .replace("login = \"trust\"", "login = \"scram\"")
    );
    let lines = refused(&text);
    has(&lines, "listen.address: expected an IP address and port");
    has(
        &lines,
        "upstream.login: expected \"trust\", \"password\" or \"cert\", found \"scram\"",
    );
    has(&lines, "mfa.max_age: expected a duration");
    has(
        &lines,
        "limits.max_connections: expected a whole number from 1",
    );
    assert!(lines.len() >= 4, "all problems at once: {lines:#?}");
}

#[test]
fn handshake_limits_are_read_and_checked_against_the_limits_they_sit_in() {
    let s = settings(&format!(
        "{MINIMAL}\n[limits]\nmax_connections = 40\nhandshake_timeout = \"2s\"\nmax_handshakes_per_source = 3\n"
    ))
    .unwrap();
    assert_eq!(s.limits.handshake_timeout, Duration::from_secs(2));
    assert_eq!(s.limits.max_handshakes, 10, "a quarter of max_connections");
    assert_eq!(s.limits.max_handshakes_per_source, 3);
    // A startup_timeout below 5 s bounds the default handshake timeout too.
    let s = settings(&format!("{MINIMAL}\n[limits]\nstartup_timeout = \"2s\"\n")).unwrap();
    assert_eq!(s.limits.handshake_timeout, Duration::from_secs(2));

    let lines = refused(&format!(
        "{MINIMAL}\n[limits]\nmax_connections = 10\nmax_handshakes = 11\nhandshake_timeout = \"1m\"\nmax_handshakes_per_source = 0\n"
    ));
    let line = has(
        &lines,
        "limits.max_handshakes: expected at most limits.max_connections (10)",
    );
    assert!(line.starts_with("/etc/eastwall/eastwall.toml:"), "{line}");
    has(
        &lines,
        "limits.handshake_timeout: expected at most limits.startup_timeout (30s)",
    );
    has(
        &lines,
        "limits.max_handshakes_per_source: expected a whole number from 1",
    );
    let lines = refused(&format!(
        "{MINIMAL}\n[limits]\nhandshake_timeout = \"0s\"\n"
    ));
    has(
        &lines,
        "limits.handshake_timeout: expected a duration above zero",
    );
}

#[test]
fn toml_syntax_errors_have_a_location() {
    let lines = refused("trust_domain = \"corp.example\nguards = 1\n");
    assert!(
        lines[0].starts_with("/etc/eastwall/eastwall.toml:1:"),
        "{lines:?}"
    );
}

#[test]
fn policy_errors_surface_through_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eastwall.toml");
    std::fs::write(&path, MINIMAL).unwrap();
    std::fs::write(
        dir.path().join("policy.ew"),
        "allow:\nfrom: segment(\"web\")\nto: segment(\"db\")\n",
    )
    .unwrap();
    let err = Config::load(&path).unwrap_err();
    let lines = err.lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("policy.ew:2:15:"), "{}", lines[0]);
}

#[test]
fn missing_policy_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eastwall.toml");
    std::fs::write(&path, MINIMAL).unwrap();
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("policy.ew") && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn loaded_policy_decides_with_the_configured_segments() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eastwall.toml");
    std::fs::write(&path, EXAMPLE).unwrap();
    std::fs::write(dir.path().join("policy.ew"), SEED).unwrap();
    let config = Config::load(&path).unwrap();
    let id = eastwall_ca::spiffe::SpiffeId::parse("spiffe://corp.example/app/billing").unwrap();
    let d = eastwall_config::authorize(
        &config.policy,
        &eastwall_config::Request {
            id: &id,
            source: "127.0.0.1".parse().unwrap(),
            segment: &config.settings.guards,
            port: config.settings.service_port,
            user: "billing",
            database: "billing",
            mfa_fresh: false,
            mfa_roles: None,
        },
    );
    assert_eq!(d.verdict, Verdict::Allow);
}

#[test]
fn admin_socket_and_shutdown_grace_have_safe_defaults_and_refuse_nonsense() {
    let s = settings(MINIMAL).unwrap();
    assert_eq!(s.admin.socket, PathBuf::from("/etc/eastwall/eastwall.sock"));
    assert_eq!(s.limits.shutdown_grace, Duration::from_secs(30));
    let set = settings(&format!(
        "{MINIMAL}\n[admin]\nsocket = \"run/ew.sock\"\n\n[limits]\nshutdown_grace = \"2s\"\n"
    ))
    .unwrap();
    assert_eq!(set.admin.socket, PathBuf::from("/etc/eastwall/run/ew.sock"));
    assert_eq!(set.limits.shutdown_grace, Duration::from_secs(2));
    let lines = refused(&format!("{MINIMAL}\n[admin]\nsocket = \"\"\n"));
    has(&lines, "admin.socket");
    let lines = refused(&format!("{MINIMAL}\n[limits]\nshutdown_grace = \"0s\"\n"));
    has(&lines, "limits.shutdown_grace");
    let lines = refused(&format!("{MINIMAL}\n[admin]\nsockets = \"x\"\n"));
    has(&lines, "sockets");
}

#[test]
fn check_role_must_be_a_name_postgresql_keeps_as_written() {
    let base = "address = \"127.0.0.1:5433\"\nlogin = \"trust\"";
    assert_eq!(
        settings(&with_upstream(base)).unwrap().upstream.check_role,
        None
    );
    let s = settings(&with_upstream(&format!(
        "{base}\ncheck_role = \"eastwall_check\""
    )))
    .unwrap();
    assert_eq!(s.upstream.check_role.as_deref(), Some("eastwall_check"));
    let long = "r".repeat(64);
    for (value, needle) in [
        ("", "it is empty"),
        (long.as_str(), "it is longer than 63 bytes"),
        ("a\\u0007b", "it contains a control character"),
    ] {
        let lines = refused(&with_upstream(&format!("{base}\ncheck_role = \"{value}\"")));
        has(
            &lines,
            &format!("upstream.check_role: expected a role name, but {needle}"),
        );
    }
    let lines = refused(&with_upstream(&format!("{base}\ncheck_role = 7")));
    has(&lines, "expected a string");
}

#[test]
fn detection_is_on_by_default_with_its_state_beside_the_log_and_no_automatic_locks() {
    let s = settings(MINIMAL).unwrap();
    assert!(s.detect.enabled);
    assert_eq!(
        s.detect.state_file,
        PathBuf::from("/etc/eastwall/decisions.log.detect.json")
    );
    assert!(s.detect.lock_on.is_empty(), "lock_on is off by default");
    assert_eq!(s.detect.lock_ttl, Duration::from_secs(3600));
    assert_eq!(s.detect.tuning, eastwall_detect::Settings::default());
    assert_eq!(s.audit.ocsf, None);

    let s = settings(&format!(
        "{MINIMAL}\n[audit]\nocsf = \"out.ocsf\"\n[detect]\nenabled = false\nstate_file = \"st.json\"\nlock_on = [\"fan_out\", \"credential_anomaly\", \"fan_out\"]\nlock_ttl = \"30m\"\nlearning = \"14d\"\nfan_out = {{ count = 8, window = \"5m\" }}\nchange_window = \"Mon-Sat 07:00-20:00\"\n"
    ))
    .unwrap();
    assert!(!s.detect.enabled);
    assert_eq!(s.detect.state_file, PathBuf::from("/etc/eastwall/st.json"));
    assert_eq!(
        s.detect.lock_on,
        vec![
            eastwall_detect::Name::FanOut,
            eastwall_detect::Name::CredentialAnomaly
        ]
    );
    assert_eq!(s.detect.lock_ttl, Duration::from_secs(1800));
    assert_eq!(s.detect.tuning.learning, eastwall_detect::Span::days(14));
    assert_eq!(s.detect.tuning.fan_out.count, 8);
    assert_eq!(s.audit.ocsf, Some(PathBuf::from("/etc/eastwall/out.ocsf")));
}

#[test]
fn hostile_detect_settings_are_refused_by_key() {
    for (table, says) in [
        ("lock_on = [\"everything\"]", "detect.lock_on"),
        ("lock_on = \"fan_out\"", "expected a list of signal names"),
        ("lock_ttl = \"0s\"", "detect.lock_ttl"),
        ("enabled = \"yes\"", "expected true or false"),
        (
            "state_file = \"decisions.log\"",
            "must not be the decision log",
        ),
        ("learnin = \"7d\"", "unknown field `learnin`"),
        (
            "fan_out = { count = 1, window = \"5m\" }",
            "count must be at least 2",
        ),
        ("change_window = \"always\"", "detect.change_window"),
        ("max_keys = 3", "max_keys"),
        ("suppress = \"1 hour\"", "not a duration"),
    ] {
        let lines = refused(&format!("{MINIMAL}\n[detect]\n{table}\n"));
        let line = has(&lines, says);
        assert!(line.contains("eastwall.toml:"), "{line}");
    }
    let lines = refused(&format!("{MINIMAL}\n[audit]\nocsf = \"decisions.log\"\n"));
    has(&lines, "audit.ocsf");
}

#[test]
fn audited_statements_name_groups_or_patterns_and_default_to_none() {
    assert!(settings(MINIMAL).unwrap().audit.statements.is_empty());
    let text = format!(
        "{MINIMAL}\n[groups]\nops = [\"spiffe://corp.example/app/operators/*\", \"spiffe://corp.example/app/sre/**\"]\n[audit]\nstatements = [\"ops\", \"spiffe://corp.example/app/jobs/nightly\"]\n"
    );
    let s = settings(&text).unwrap();
    let audited: Vec<&str> = s.audit.statements.iter().map(|p| p.as_str()).collect();
    assert_eq!(
        audited,
        [
            "spiffe://corp.example/app/operators/*",
            "spiffe://corp.example/app/sre/**",
            "spiffe://corp.example/app/jobs/nightly"
        ]
    );
    let alice = eastwall_ca::SpiffeId::parse("spiffe://corp.example/app/operators/alice").unwrap();
    assert!(s.audit.statements.iter().any(|p| p.matches(&alice)));
}

#[test]
fn hostile_audited_statements_are_refused_by_key_with_their_line() {
    let with = |list: &str| {
        format!("{MINIMAL}\n[groups]\nops = [\"spiffe://corp.example/app/operators/*\"]\n[audit]\nstatements = {list}\n")
    };
    for (list, needle) in [
        (
            r#"["nobody"]"#,
            "expected the name of a group in [groups] (\"ops\")",
        ),
        (r#"[""]"#, "expected the name of a group"),
        (
            r#"["spiffe://other.example/app/*"]"#,
            "not this sidecar's trust domain",
        ),
        (r#"["spiffe://corp.example/app*"]"#, "whole path segments"),
        (r#"["ops", "ops"]"#, "listed twice"),
        (r#"["spiffe://corp.example/"]"#, "needs a path"),
    ] {
        let lines = refused(&with(list));
        let line = has(&lines, "audit.statements");
        assert!(line.contains(needle), "{list}: {line}");
        assert!(line.contains("eastwall.toml:"), "{line}");
    }
    // Not a list of strings: a syntax error with its location.
    let lines = refused(&with("\"ops\""));
    assert!(
        lines.iter().any(|l| l.contains("eastwall.toml:")),
        "{lines:?}"
    );
    let lines = refused(&with("[1]"));
    assert!(
        lines.iter().any(|l| l.contains("eastwall.toml:")),
        "{lines:?}"
    );
}
