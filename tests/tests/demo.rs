//! `eastwall demo` end to end, as a newcomer runs it: the built binary, its stdout, its exit.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn eastwall() -> PathBuf {
    eastwall_e2e::eastwall_bin().expect("the eastwall binary builds")
}

fn demo(args: &[&str]) -> (Output, Duration) {
    // Build first: the time limit is the demo's, not the compiler's.
    let bin = eastwall();
    let started = Instant::now();
    let out = Command::new(&bin)
        .arg("demo")
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("eastwall demo runs");
    (out, started.elapsed())
}

/// The first stdout line that mentions `id` and contains `verdict` after the arrow.
fn verdict_line<'a>(stdout: &'a str, id: &str, verdict: &str) -> Option<&'a str> {
    stdout.lines().find(|l| {
        l.contains(id)
            && l.split_once(" -> ")
                .is_some_and(|(_, v)| v.starts_with(verdict))
    })
}

#[test]
fn demo_tells_the_story_and_every_verdict_holds() {
    let (out, took) = demo(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(took < Duration::from_secs(30), "demo took {took:?}");

    let billing = "spiffe://corp.example/app/billing";
    let laptop = "spiffe://corp.example/workstations/finance-laptop";
    let alice = "spiffe://corp.example/app/operators/alice";
    for (id, verdict) in [
        (billing, "allow"),
        (laptop, "deny + alert"),
        (laptop, "refused"),
        (alice, "challenge"),
        (alice, "allow"),
    ] {
        assert!(
            verdict_line(&stdout, id, verdict).is_some(),
            "no line naming {id} -> {verdict}\n{stdout}"
        );
    }
    let forged = verdict_line(&stdout, billing, "refused").expect("the forged cert is refused");
    assert!(forged.contains("another CA"), "{forged}");
    // The laptop's refusal is a real PostgreSQL error inside TLS, with its SQLSTATE.
    assert!(stdout.contains("FATAL 28000"), "{stdout}");
    // The billing query really ran, and alice's session is really hers.
    assert!(stdout.contains("3 invoices, 4200.00 total"), "{stdout}");
    assert!(
        stdout.contains("select current_user  =>  alice"),
        "{stdout}"
    );
    // The stolen billing certificate is locked by serial and its live session cut with the
    // lock's message, while billing on its re-issued certificate goes on.
    let cut = verdict_line(&stdout, billing, "cut").expect("the stolen session is cut");
    assert!(cut.contains("lock "), "{cut}");
    assert!(
        stdout.contains("FATAL 57P01: terminating connection: stolen from the finance laptop"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "billing, on its re-issued certificate:  select count(*) from invoices  =>  3"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("chain intact"), "{stdout}");
    // Not a terminal: no colour codes for a pipe or a log file to choke on.
    assert!(!stdout.contains('\x1b'), "escape codes in piped output");
}

#[test]
fn demo_with_dir_keeps_a_layout_whose_log_verifies_with_the_cli() {
    let dir = tempfile::tempdir().expect("temp dir");
    let layout = dir.path().join("demo");
    let (out, _) = demo(&["--dir", layout.to_str().expect("utf-8 temp path")]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for file in [
        "eastwall.toml",
        "policy.ew",
        "certs/billing.pem",
        "ca/ca.pem",
    ] {
        assert!(layout.join(file).is_file(), "{file} not kept");
    }

    let verify = Command::new(eastwall())
        .args(["audit", "verify"])
        .arg(layout.join("decisions.log"))
        .output()
        .expect("eastwall audit verify runs");
    let stdout = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{stdout}");
    assert!(stdout.contains("chain intact"), "{stdout}");

    // A second run into the same folder refuses instead of overwriting the layout.
    let (again, _) = demo(&["--dir", layout.to_str().expect("utf-8 temp path")]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("already holds an Eastwall layout"),
        "{stderr}"
    );
}

#[test]
fn demo_fleet_cuts_the_stolen_identity_on_every_sidecar_with_one_lock() {
    if let Err(e) = eastwall_e2e::nats::nats_server_bin() {
        panic!("the fleet demo needs nats-server (tests/run installs it): {e:#}");
    }
    let (out, took) = demo(&["--fleet"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo --fleet failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(took < Duration::from_secs(30), "demo --fleet took {took:?}");

    let billing = "spiffe://corp.example/app/billing";
    assert!(stdout.contains("fleet ready"), "{stdout}");
    // One lock, issued once, signed by the operator.
    let issued: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("eastwall lock add --fleet"))
        .collect();
    assert_eq!(issued.len(), 1, "{stdout}");
    assert!(
        stdout.contains("signed by spiffe://corp.example/ops/dbas/dana"),
        "{stdout}"
    );
    for side in ["east", "west"] {
        let on = format!("{billing} on {side}");
        for verdict in ["allow", "cut", "refused"] {
            assert!(
                verdict_line(&stdout, &on, verdict).is_some(),
                "no line naming {on} -> {verdict}\n{stdout}"
            );
        }
        // Admitted twice: before the lock and after its removal.
        let allowed = stdout
            .lines()
            .filter(|l| l.contains(&on) && l.contains(" -> allow"))
            .count();
        assert_eq!(allowed, 2, "{stdout}");
    }
    assert_eq!(
        stdout
            .matches("FATAL 57P01: terminating connection: stolen billing certificate")
            .count(),
        2,
        "{stdout}"
    );
    assert_eq!(stdout.matches("reason locked").count(), 2, "{stdout}");
    assert!(stdout.contains("eastwall lock remove --fleet"), "{stdout}");
    assert!(stdout.contains("admitted again"), "{stdout}");
    assert_eq!(stdout.matches("chain intact").count(), 2, "{stdout}");
    assert!(!stdout.contains('\x1b'), "escape codes in piped output");
}

#[test]
fn demo_fleet_without_nats_server_says_how_to_get_it() {
    let bin = eastwall();
    let out = Command::new(&bin)
        .args(["demo", "--fleet"])
        .env("EASTWALL_NATS_SERVER", "/nonexistent/nats-server")
        .output()
        .expect("eastwall demo runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("EASTWALL_NATS_SERVER"), "{stderr}");
}
