//! The files under `examples/` are what users copy: each must load as `eastwall policy check`
//! loads it, and the grants example must mean what its comments say.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use eastwall_ca::SpiffeId;
use eastwall_config::{authorize, Config, Request, Verdict};

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn files_ending(ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .expect("examples/ exists")
        .map(|entry| entry.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    files.sort();
    files
}

fn load(path: &Path) -> Config {
    Config::load(path).unwrap_or_else(|err| {
        panic!(
            "{} does not pass policy check:\n{}",
            path.display(),
            err.lines().join("\n")
        )
    })
}

#[test]
fn every_example_config_passes_policy_check() {
    let configs = files_ending("toml");
    assert!(
        configs.len() >= 2,
        "expected the seed example and the cert-login example, found {configs:?}"
    );
    for path in &configs {
        load(path);
    }
}

#[test]
fn every_example_policy_is_loaded_by_some_example_config() {
    // An .ew file no config names would never be checked by the test above.
    let named: Vec<PathBuf> = files_ending("toml")
        .iter()
        .map(|p| load(p).settings.policy_file)
        .map(|p| p.canonicalize().expect("policy file exists"))
        .collect();
    for policy in files_ending("ew") {
        let policy = policy.canonicalize().expect("policy file exists");
        assert!(
            named.contains(&policy),
            "{} is not named by any examples/*.toml",
            policy.display()
        );
    }
}

#[test]
fn example_policy_is_the_seed_block_quickstart_writes() {
    let text = std::fs::read_to_string(examples_dir().join("policy.ew")).expect("policy.ew");
    assert_eq!(text, eastwall::quickstart::SEED_POLICY);
}

#[test]
fn cert_login_example_loads_although_its_certificate_files_do_not_exist() {
    // Config::load checks syntax and consistency only; the sidecar reads certificates at start.
    let path = examples_dir().join("eastwall-cert-login.toml");
    let config = load(&path);
    assert!(!config.settings.listen.cert.exists());
    assert!(matches!(
        config.settings.upstream.login,
        eastwall_config::UpstreamLogin::Cert { .. }
    ));
}

/// Decides one request against the grants example, as `policy explain` would.
fn decide(id: &str, user: &str, database: &str, mfa_fresh: bool) -> eastwall_config::Decision {
    let config = load(&examples_dir().join("eastwall-cert-login.toml"));
    let id = SpiffeId::parse(id).expect("valid SPIFFE ID");
    authorize(
        &config.policy,
        &Request {
            id: &id,
            source: IpAddr::V4(Ipv4Addr::new(10, 0, 1, 20)),
            segment: &config.settings.guards,
            port: config.settings.service_port,
            user,
            database,
            mfa_fresh,
            mfa_roles: None,
        },
    )
}

const BILLING: &str = "spiffe://corp.example/app/billing";
const REPORTS: &str = "spiffe://corp.example/app/reports";
const DBA: &str = "spiffe://corp.example/ops/dbas/carol";
const LAPTOP: &str = "spiffe://corp.example/workstations/finance-laptop";

#[test]
fn grants_billing_its_two_roles_on_its_database_only() {
    assert_eq!(
        decide(BILLING, "billing", "billing", false).verdict,
        Verdict::Allow
    );
    assert_eq!(
        decide(BILLING, "billing_readonly", "billing", false).verdict,
        Verdict::Allow
    );
    assert_eq!(
        decide(BILLING, "billing", "hr", false).verdict,
        Verdict::Deny
    );
    assert_eq!(
        decide(BILLING, "reports_readonly", "billing", false).verdict,
        Verdict::Deny
    );
}

#[test]
fn grants_reports_read_only_on_two_databases() {
    assert_eq!(
        decide(REPORTS, "reports_readonly", "analytics", false).verdict,
        Verdict::Allow
    );
    assert_eq!(
        decide(REPORTS, "reports", "analytics", false).verdict,
        Verdict::Deny
    );
    assert_eq!(
        decide(REPORTS, "reports_readonly", "hr", false).verdict,
        Verdict::Deny
    );
}

#[test]
fn grants_the_superuser_to_dbas_only_after_mfa_and_never_to_apps() {
    let challenged = decide(DBA, "postgres", "postgres", false);
    assert_eq!(challenged.verdict, Verdict::Challenge);
    let admitted = decide(DBA, "postgres", "postgres", true);
    assert_eq!(admitted.verdict, Verdict::Allow);
    assert!(admitted.role_named_by_rule, "the superuser must be named");
    assert_eq!(
        decide(BILLING, "postgres", "billing", false).verdict,
        Verdict::Deny
    );
}

#[test]
fn grants_keep_the_seed_wall_against_laptops_with_an_alert() {
    let denied = decide(LAPTOP, "finance-laptop", "billing", false);
    assert_eq!(denied.verdict, Verdict::Deny);
    assert!(denied.alert);
}
