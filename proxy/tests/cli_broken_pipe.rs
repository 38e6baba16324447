//! `eastwall … | head`: a reader that goes away early is a clean end, not a panic. Each verb
//! that prints is run with its stdout a pipe whose reading end is already closed, so its very
//! first write fails with EPIPE (SIGPIPE is ignored by Rust programs).

use std::process::{Command, Stdio};

const EXAMPLE: &str = include_str!("../../examples/eastwall.toml");
const SEED: &str = include_str!("../../examples/policy.ew");

/// Runs eastwall with stdout a pipe nobody reads; returns (exit code, stderr).
fn with_closed_stdout(args: &[&str]) -> (Option<i32>, String) {
    // A socket pair stands in for the pipe (std::io::pipe is newer than our MSRV): writing
    // to it once the other end is closed fails with EPIPE exactly as a pipe does.
    let (reader, writer) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_eastwall"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::os::fd::OwnedFd::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("run eastwall");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_clean(args: &[&str]) {
    let (code, stderr) = with_closed_stdout(args);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{args:?}: {stderr}"
    );
    assert_eq!(code, Some(0), "{args:?}: {stderr}");
}

#[test]
fn printing_verbs_end_cleanly_when_the_reader_is_gone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("eastwall.toml");
    std::fs::write(&config, EXAMPLE).expect("write config");
    std::fs::write(dir.path().join("policy.ew"), SEED).expect("write policy");
    let config = config.to_str().expect("utf-8 path");

    assert_clean(&[
        "policy",
        "explain",
        "--config",
        config,
        "--id",
        "spiffe://corp.example/workstations/finance-laptop",
    ]);
    assert_clean(&["policy", "check", "--config", config]);

    let ca = dir.path().join("ca");
    let ca = ca.to_str().expect("utf-8 path");
    assert_clean(&["ca", "init", "--dir", ca, "--trust-domain", "corp.example"]);
    assert_clean(&["ca", "bundle", "--dir", ca]);

    let qs = dir.path().join("qs");
    assert_clean(&[
        "quickstart",
        "--dir",
        qs.to_str().expect("utf-8 path"),
        "--upstream",
        "127.0.0.1:5432",
    ]);
    let qs_config = qs.join("eastwall.toml");
    let qs_config = qs_config.to_str().expect("utf-8 path");
    assert_clean(&["mfa", "list", "--config", qs_config]);
    assert_clean(&[
        "mfa",
        "enroll",
        "--config",
        qs_config,
        "spiffe://corp.example/app/operators/bob",
    ]);
    let log = qs.join("decisions.log");
    std::fs::write(&log, "").expect("an empty log");
    assert_clean(&["audit", "verify", log.to_str().expect("utf-8 path")]);
}
