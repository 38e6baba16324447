//! The command line as a DBA runs it by hand: `ca issue` gives a server certificate a lifetime
//! a sidecar can live with, warns about a short one and never silently replaces a key; `mfa
//! login` with no terminal says what to do instead of printing an OS error.

use std::process::{Command, Output};

use eastwall_e2e::eastwall_bin;

fn eastwall(args: &[&str]) -> Output {
    Command::new(eastwall_bin().expect("eastwall builds"))
        .args(args)
        .output()
        .expect("eastwall runs")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `valid until` date `ca issue` printed, as seconds from now.
fn lifetime_secs(stdout: &str) -> i64 {
    // "… valid until 2026-12-02T22:00:00Z: billing.pem, …"
    let at = stdout
        .split("valid until ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(|word| word.trim_end_matches(':'))
        .unwrap_or_default();
    let until = chrono_free_parse(at).unwrap_or_else(|| panic!("no date in {stdout:?}"));
    until - now_secs()
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `2026-12-02T21:00:00Z` -> Unix seconds (days-from-civil; no date crate needed for a test).
fn chrono_free_parse(s: &str) -> Option<i64> {
    let s = s.trim();
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|v| v.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time
        .trim_end_matches('Z')
        .split(':')
        .map(|v| v.parse::<i64>().ok());
    let (h, min, sec) = (t.next()??, t.next()??, t.next()??);
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + min * 60 + sec)
}

#[test]
fn server_certificates_default_to_30_days_clients_to_an_hour() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let ca = ca.to_str().unwrap();
    let (out, err) = text(&eastwall(&[
        "ca",
        "init",
        "--dir",
        ca,
        "--trust-domain",
        "corp.example",
    ]));
    assert!(out.contains("created CA"), "{out}{err}");

    let server = dir.path().join("proxy");
    let run = eastwall(&[
        "ca",
        "issue",
        "--dir",
        ca,
        "spiffe://corp.example/db/postgres",
        "--dns",
        "localhost",
        "--out",
        server.to_str().unwrap(),
    ]);
    let (out, err) = text(&run);
    assert!(run.status.success(), "{out}{err}");
    let days = lifetime_secs(&out) as f64 / 86_400.0;
    assert!(
        (29.9..=30.1).contains(&days),
        "server lifetime {days} days: {out}"
    );
    assert!(!err.contains("warning"), "{err}");

    let client = dir.path().join("billing");
    let (out, _) = text(&eastwall(&[
        "ca",
        "issue",
        "--dir",
        ca,
        "spiffe://corp.example/app/billing",
        "--out",
        client.to_str().unwrap(),
    ]));
    let secs = lifetime_secs(&out);
    assert!(
        (3500..=3700).contains(&secs),
        "client lifetime {secs} s: {out}"
    );

    // A short server certificate is issued, with a warning that says what happens.
    let short = dir.path().join("short");
    let run = eastwall(&[
        "ca",
        "issue",
        "--dir",
        ca,
        "spiffe://corp.example/db/postgres",
        "--ip",
        "127.0.0.1",
        "--ttl",
        "1h",
        "--out",
        short.to_str().unwrap(),
    ]);
    let (out, err) = text(&run);
    assert!(run.status.success(), "{out}{err}");
    assert!(
        err.contains("warning: this server certificate is valid for only 1h"),
        "{err}"
    );
    assert!(err.contains("refuses every client"), "{err}");
}

#[test]
fn an_existing_certificate_or_key_is_replaced_only_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let ca = ca.to_str().unwrap();
    assert!(
        eastwall(&["ca", "init", "--dir", ca, "--trust-domain", "corp.example"])
            .status
            .success()
    );
    let prefix = dir.path().join("billing");
    let prefix = prefix.to_str().unwrap();
    let issue = |extra: &[&str]| {
        let mut args = vec![
            "ca",
            "issue",
            "--dir",
            ca,
            "spiffe://corp.example/app/billing",
            "--out",
            prefix,
        ];
        args.extend_from_slice(extra);
        eastwall(&args)
    };
    assert!(issue(&[]).status.success());
    let key_before = std::fs::read(format!("{prefix}.key")).unwrap();

    let again = issue(&[]);
    let (out, err) = text(&again);
    assert!(!again.status.success(), "replaced without --force: {out}");
    assert!(
        err.contains("billing.pem already exists; pass --force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(format!("{prefix}.key")).unwrap(),
        key_before,
        "key touched"
    );

    // Only the key left behind (say, the .pem was moved): still refused.
    std::fs::remove_file(format!("{prefix}.pem")).unwrap();
    let (_, err) = text(&issue(&[]));
    assert!(
        err.contains("billing.key already exists; pass --force"),
        "{err}"
    );

    let forced = issue(&["--force"]);
    assert!(forced.status.success(), "{:?}", text(&forced));
    assert_ne!(std::fs::read(format!("{prefix}.key")).unwrap(), key_before);
}

#[test]
fn mfa_login_without_a_terminal_says_to_pass_the_code() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let ca = ca.to_str().unwrap();
    assert!(
        eastwall(&["ca", "init", "--dir", ca, "--trust-domain", "corp.example"])
            .status
            .success()
    );
    let alice = dir.path().join("alice");
    let alice = alice.to_str().unwrap();
    assert!(eastwall(&[
        "ca",
        "issue",
        "--dir",
        ca,
        "spiffe://corp.example/app/operators/alice",
        "--out",
        alice
    ])
    .status
    .success());
    // setsid: a new session has no controlling terminal, as under cron or a CI runner.
    let out = Command::new("setsid")
        .arg("-w")
        .arg(eastwall_bin().expect("eastwall builds"))
        .args([
            "mfa",
            "login",
            "--url",
            "https://127.0.0.1:9",
            "--ca",
            &format!("{ca}/ca.pem"),
        ])
        .args([
            "--cert",
            &format!("{alice}.pem"),
            "--key",
            &format!("{alice}.key"),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("setsid runs");
    let (_, err) = text(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("no terminal to prompt for the MFA code on; pass --code CODE"),
        "{err}"
    );
    assert!(!err.contains("os error"), "{err}");
}

#[test]
fn policy_explain_can_exit_with_the_decision() {
    let dir = tempfile::tempdir().unwrap();
    let qs = dir.path().join("qs");
    let qs = qs.to_str().unwrap();
    let made = eastwall(&["quickstart", "--dir", qs, "--upstream", "127.0.0.1:5433"]);
    assert!(made.status.success(), "{:?}", text(&made));
    let config = format!("{qs}/eastwall.toml");
    let explain = |id: &str, extra: &[&str]| {
        let mut args = vec!["policy", "explain", "--config", &config, "--id", id];
        args.extend_from_slice(extra);
        eastwall(&args)
    };
    let laptop = "spiffe://corp.example/workstations/finance-laptop-7";
    // Without the flag, a deny is still a successful explanation.
    let plain = explain(laptop, &[]);
    assert_eq!(plain.status.code(), Some(0));
    assert!(text(&plain).0.contains("decision: deny"));
    for (id, code, verdict) in [
        ("spiffe://corp.example/app/billing", 0, "allow"),
        (laptop, 3, "deny"),
        ("spiffe://corp.example/app/operators/alice", 4, "challenge"),
    ] {
        let out = explain(id, &["--exit-code"]);
        assert_eq!(out.status.code(), Some(code), "{id}: {:?}", text(&out));
        assert!(
            text(&out).0.contains(&format!("decision: {verdict}")),
            "{id}"
        );
    }
}

#[test]
fn ca_list_shows_what_was_issued_and_when_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let ca = ca.to_str().unwrap();
    assert!(
        eastwall(&["ca", "init", "--dir", ca, "--trust-domain", "corp.example"])
            .status
            .success()
    );
    let (out, _) = text(&eastwall(&["ca", "list", "--dir", ca]));
    assert!(
        out.contains("no valid certificates (0 issued in all)"),
        "{out}"
    );
    let out_of = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let issued = text(&eastwall(&[
        "ca",
        "issue",
        "--dir",
        ca,
        "spiffe://corp.example/app/billing",
        "--out",
        &out_of("billing"),
    ]))
    .0;
    let serial = issued.split_whitespace().nth(2).unwrap().to_owned();
    assert!(eastwall(&[
        "ca",
        "issue",
        "--dir",
        ca,
        "spiffe://corp.example/db/postgres",
        "--dns",
        "localhost",
        "--out",
        &out_of("proxy"),
    ])
    .status
    .success());
    let (out, _) = text(&eastwall(&["ca", "list", "--dir", ca]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with(&serial), "{out}");
    assert!(
        lines[0].contains("spiffe://corp.example/app/billing  client  until "),
        "{out}"
    );
    assert!(lines[0].contains("left)  valid"), "{out}");
    assert!(
        lines[1].contains("spiffe://corp.example/db/postgres  server")
            && lines[1].contains("(29d 23h left)"),
        "{out}"
    );

    // Revoked: gone from the default list, shown with --all.
    assert!(eastwall(&["ca", "revoke", "--dir", ca, &serial])
        .status
        .success());
    let (out, _) = text(&eastwall(&["ca", "list", "--dir", ca]));
    assert!(!out.contains("app/billing"), "{out}");
    let (out, _) = text(&eastwall(&["ca", "list", "--dir", ca, "--all"]));
    assert!(
        out.lines()
            .any(|l| l.starts_with(&serial) && l.ends_with("revoked")),
        "{out}"
    );
}

/// An error that already quotes its OS error is not followed by the same text again.
#[test]
fn an_os_error_is_printed_once() {
    for args in [
        vec!["audit", "verify", "/nonexistent-eastwall/decisions.log"],
        vec!["proxy", "--config", "/nonexistent-eastwall/eastwall.toml"],
        vec!["check", "--config", "/nonexistent-eastwall/eastwall.toml"],
    ] {
        let out = eastwall(&args);
        assert!(!out.status.success(), "{args:?}");
        let (_, stderr) = text(&out);
        assert_eq!(
            stderr.matches("(os error 2)").count(),
            1,
            "{args:?}: {stderr}"
        );
        // A config problem is its line, then the count of problems (as `policy check`).
        assert!(stderr.lines().count() <= 2, "{args:?}: {stderr}");
    }
}
