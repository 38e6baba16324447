//! `eastwall policy check` and `explain`, run as a user would: the built binary on temp files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const EXAMPLE: &str = include_str!("../../examples/eastwall.toml");
const SEED: &str = include_str!("../../examples/policy.ew");

/// A folder holding the example eastwall.toml and the given policy.
fn sidecar(policy: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("eastwall.toml");
    std::fs::write(&config, EXAMPLE).expect("write config");
    std::fs::write(dir.path().join("policy.ew"), policy).expect("write policy");
    (dir, config)
}

fn eastwall(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_eastwall"))
        .args(args)
        .output()
        .expect("run eastwall")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn check(config: &Path) -> Output {
    eastwall(&[
        "policy",
        "check",
        "--config",
        config.to_str().expect("utf-8 path"),
    ])
}

fn explain(config: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "policy",
        "explain",
        "--config",
        config.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    let out = eastwall(&args);
    assert!(
        out.status.success(),
        "explain failed: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[test]
fn check_accepts_the_seed_policy_and_example_config() {
    let (_dir, config) = sidecar(SEED);
    let out = check(&config);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim_end(),
        "ok: policy.ew: 2 rules (1 allow, 1 deny+alert), 4 segments, 1 group; guards db:5432"
    );
}

#[test]
fn check_rejects_an_unknown_segment_with_its_location() {
    let (_dir, config) = sidecar(&SEED.replace("segment(\"app\")", "segment(\"apps\")"));
    let out = check(&config);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("policy.ew:4:15: expected a segment defined in [segments]"),
        "{err}"
    );
    assert!(err.contains("unknown segment \"apps\""), "{err}");
}

#[test]
fn check_rejects_a_misspelled_keyword_with_its_location() {
    let (_dir, config) = sidecar(&SEED.replace("require:", "requires:"));
    let out = check(&config);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("policy.ew:6:1: expected `from:`"), "{err}");
    assert!(err.contains("found `requires:`"), "{err}");
}

#[test]
fn check_rejects_a_rule_with_no_to_with_its_location() {
    let policy = "allow:\nfrom: segment(\"app\")\n# forgot the target\n";
    let (_dir, config) = sidecar(policy);
    let out = check(&config);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("policy.ew:1:1: expected a `to:` line in this allow rule"),
        "{err}"
    );
}

#[test]
fn check_prints_every_error_one_per_line() {
    let policy = "allow:\nfrom: segment(\"nope\")\nto: segment(\"db\")\ndeny:\nform: segment(\"app\")\nto: segment(\"db\")\n";
    let (_dir, config) = sidecar(policy);
    let out = check(&config);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let located: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("policy.ew:"))
        .collect();
    assert_eq!(located.len(), 3, "{err}");
}

#[test]
fn check_reports_config_errors_with_file_and_line() {
    let (dir, config) = sidecar(SEED);
    std::fs::write(
        &config,
        EXAMPLE.replace("guards = \"db\"", "guards = \"database\""),
    )
    .unwrap();
    let out = check(&config);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let expected = format!(
        "{}:6:10: guards: expected the name of a segment",
        dir.path().join("eastwall.toml").display()
    );
    assert!(err.contains(&expected), "{err}");
}

#[test]
fn explain_workstation_is_denied_with_the_rule_line_and_alert() {
    let (_dir, config) = sidecar(SEED);
    let out = explain(
        &config,
        &["--id", "spiffe://corp.example/workstations/finance-laptop"],
    );
    assert!(out.contains("decision: deny\n"), "{out}");
    assert!(out.contains("rule: policy.ew:9\n"), "{out}");
    assert!(out.contains("alert: yes\n"), "{out}");
    assert!(
        out.contains("policy.ew:9 deny (and alert): APPLIES"),
        "{out}"
    );
}

#[test]
fn explain_operator_is_challenged_without_mfa_and_allowed_with_it() {
    let (_dir, config) = sidecar(SEED);
    let alice = "spiffe://corp.example/app/operators/alice";
    let out = explain(&config, &["--id", alice]);
    assert!(out.contains("decision: challenge\n"), "{out}");
    assert!(out.contains("mfa group: human_operators"), "{out}");
    let out = explain(&config, &["--id", alice, "--mfa"]);
    assert!(out.contains("decision: allow\n"), "{out}");
    assert!(out.contains("rule: policy.ew:3\n"), "{out}");
}

#[test]
fn explain_service_asking_for_postgres_is_denied_and_says_why() {
    let (_dir, config) = sidecar(SEED);
    let out = explain(
        &config,
        &[
            "--id",
            "spiffe://corp.example/app/billing",
            "--user",
            "postgres",
        ],
    );
    assert!(out.contains("decision: deny\n"), "{out}");
    assert!(out.contains("not as role \"postgres\""), "{out}");
    let out = explain(&config, &["--id", "spiffe://corp.example/app/billing"]);
    assert!(out.contains("decision: allow\n"), "{out}");
    assert!(
        out.contains("role \"billing\", database \"billing\""),
        "defaults: {out}"
    );
}

#[test]
fn explain_refuses_a_malformed_id_clearly() {
    let (_dir, config) = sidecar(SEED);
    let out = eastwall(&[
        "policy",
        "explain",
        "--config",
        config.to_str().unwrap(),
        "--id",
        "corp.example/app/x",
    ]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--id"), "{}", text(&out.stderr));
}
