//! `eastwall lock add|list|remove`, run as an operator would: the built binary on temp files.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const EXAMPLE: &str = include_str!("../../examples/eastwall.toml");
const SEED: &str = include_str!("../../examples/policy.ew");

fn sidecar() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("eastwall.toml");
    std::fs::write(&config, EXAMPLE).expect("write config");
    std::fs::write(dir.path().join("policy.ew"), SEED).expect("write policy");
    (dir, config)
}

fn eastwall(config: &Path, args: &[&str]) -> Output {
    let (verb, rest) = args.split_first().expect("a verb");
    Command::new(env!("CARGO_BIN_EXE_eastwall"))
        .args(["lock", verb, "--config", config.to_str().expect("utf-8")])
        .args(rest)
        .output()
        .expect("run eastwall")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `lock add`, expecting success; the printed lock id.
fn add(config: &Path, args: &[&str]) -> String {
    let mut all = vec!["add"];
    all.extend_from_slice(args);
    let out = eastwall(config, &all);
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    assert_eq!(id.len(), 8, "one lock id on stdout: {id:?}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    id
}

fn list(config: &Path) -> String {
    let out = eastwall(config, &["list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// The one stderr line of a refused command (exit status 1).
fn refused(config: &Path, args: &[&str]) -> String {
    let out = eastwall(config, args);
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail");
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(out.stdout.is_empty());
    err
}

#[test]
fn add_list_remove_each_target_kind() {
    let (dir, config) = sidecar();
    assert!(list(&config).starts_with("no locks in force"));
    let by_id = add(
        &config,
        &[
            "--id",
            "spiffe://corp.example/app/operators/*",
            "--message",
            "incident 7",
        ],
    );
    let by_serial = add(&config, &["--serial", "0A:1B:FF", "--ttl", "8h"]);
    let by_source = add(&config, &["--source", "::ffff:10.1.0.0/112"]);
    let by_role = add(&config, &["--role", "billing"]);

    let table = list(&config);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "{table}");
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("TARGET"),
        "{table}"
    );
    let row = |id: &str| *lines.iter().find(|l| l.starts_with(id)).unwrap();
    assert!(row(&by_id).contains("id spiffe://corp.example/app/operators/*"));
    assert!(row(&by_id).contains("never") && row(&by_id).ends_with("incident 7"));
    assert!(row(&by_serial).contains("serial 0a1bff"), "normalised");
    assert!(!row(&by_serial).contains("never"), "it has a TTL");
    assert!(
        row(&by_source).contains("source 10.1.0.0/16"),
        "mapped is IPv4"
    );
    assert!(row(&by_role).contains("role billing"));

    let file = dir.path().join("locks.json");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(json["locks"][1]["target"]["serial"], "0a1bff");
    assert!(json["locks"][0]["created_by"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));

    let out = eastwall(&config, &["remove", &by_serial]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("removed lock {by_serial}")));
    assert!(!list(&config).contains(&by_serial));
    assert_eq!(list(&config).lines().count(), 4);

    let err = refused(&config, &["remove", &by_serial]);
    assert!(err.contains("no lock with id"), "{err}");
}

#[test]
fn bad_targets_are_one_clear_error_line() {
    let (dir, config) = sidecar();
    for (args, needle) in [
        (
            &["add", "--id", "spiffe://evil.example/app/**"][..],
            "trust domain",
        ),
        (
            &["add", "--id", "spiffe://corp.example/app*"],
            "whole path segments",
        ),
        (&["add", "--source", "10.0.0.0/33"], "0 to 32"),
        (
            &["add", "--source", "10.0.0.1/8"],
            "did you mean 10.0.0.0/8",
        ),
        (&["add", "--source", "db.internal"], "IP address"),
        (&["add", "--serial", "not-hex"], "--serial"),
        (&["add", "--role", ""], "empty string"),
        (
            &["add", "--role", "billing", "--ttl", "0s"],
            "at least one second",
        ),
        (&["add", "--role", "billing", "--ttl", "soon"], "--ttl"),
        (
            &["add", "--role", "billing", "--message", "a\nb"],
            "control characters",
        ),
    ] {
        let err = refused(&config, args);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    // Two targets, or none: a usage error (status 2).
    let out = eastwall(&config, &["add", "--role", "a", "--serial", "0a"]);
    assert_eq!(out.status.code(), Some(2));
    let out = eastwall(&config, &["add"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        !dir.path().join("locks.json").exists(),
        "nothing was written"
    );
}

#[test]
fn a_ttl_lock_is_gone_from_the_list_once_it_expires() {
    let (dir, config) = sidecar();
    let short = add(&config, &["--role", "billing", "--ttl", "1s"]);
    let kept = add(&config, &["--role", "reports"]);
    // The expiry is the TTL rounded up to a whole second: at most 2 s from now.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let table = list(&config);
    assert!(!table.contains(&short), "{table}");
    assert!(table.contains(&kept));
    // The next write drops it from the file.
    add(&config, &["--role", "x"]);
    let file = std::fs::read_to_string(dir.path().join("locks.json")).unwrap();
    assert!(!file.contains(&short));
    let err = refused(&config, &["remove", &short]);
    assert!(err.contains("no lock with id"), "{err}");
}

#[test]
fn concurrent_adds_from_many_shells_all_survive() {
    let (_dir, config) = sidecar();
    let spawned: Vec<_> = (0..12)
        .map(|n| {
            Command::new(env!("CARGO_BIN_EXE_eastwall"))
                .args(["lock", "add", "--config", config.to_str().unwrap()])
                .args(["--role", &format!("shell{n}")])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let ids: Vec<String> = spawned
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success());
            text(&out.stdout).trim().to_owned()
        })
        .collect();
    let table = list(&config);
    for (n, id) in ids.iter().enumerate() {
        assert!(table.contains(id), "lock {n} ({id}) was lost:\n{table}");
    }
    assert_eq!(table.lines().count(), 1 + 12, "{table}");
}

#[test]
fn a_hostile_lock_file_is_not_overwritten_or_trusted() {
    let (dir, config) = sidecar();
    let file = dir.path().join("locks.json");
    add(&config, &["--role", "billing"]);
    // Someone else could write it: refuse to read it and to replace it.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    let before = std::fs::read_to_string(&file).unwrap();
    for args in [&["list"][..], &["add", "--role", "x"]] {
        let err = refused(&config, args);
        assert!(err.contains("chmod 600"), "{err}");
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), before);
    // Garbage: named, and left for the operator to look at.
    std::fs::write(&file, "{\"version\":1,\"locks\":[").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = refused(&config, &["add", "--role", "x"]);
    assert!(
        err.contains("locks.json") && err.contains("not a lock file"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "{\"version\":1,\"locks\":["
    );
}
