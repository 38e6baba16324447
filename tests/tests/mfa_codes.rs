//! TOTP codes as the password: a code admits once, replays and wrong codes get 28P01, twenty
//! failures lock the operator out (even for the right code) with one alert, and another
//! operator, enrolled with `eastwall mfa enroll`, is unaffected.

mod mfa_common;

use std::time::{Duration, SystemTime};

use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use mfa_common::*;

const BOB: &str = "spiffe://corp.example/app/operators/bob";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_admits_once_and_replayed_or_wrong_codes_get_28p01() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let conninfo = d.conninfo("alice", "alice", "postgres");
    let code = d.alice_code(SystemTime::now());

    let out = psql(&conninfo, "select current_user", Some(&code)).await?;
    assert_eq!(stdout(&out).trim(), "alice", "{}", stderr(&out));

    // The same code again, from tokio-postgres and from psql.
    let err = refused(
        d.connect_with_password("alice", "alice", &code).await,
        "a replayed code is refused",
    )?;
    assert_eq!(sqlstate(&err), Some("28P01"), "{err}");
    let out = psql(&conninfo, "select current_user", Some(&code)).await?;
    assert!(!out.status.success(), "replay admitted: {}", stdout(&out));
    assert!(
        stderr(&out).contains(
            "MFA code already used for spiffe://corp.example/app/operators/alice; wait for the next code"
        ),
        "{}",
        stderr(&out)
    );

    let wrong = wrong_code(&d, SystemTime::now());
    let err = refused(
        d.connect_with_password("alice", "alice", &wrong).await,
        "a wrong code is refused",
    )?;
    assert_eq!(sqlstate(&err), Some("28P01"), "{err}");
    // A wrong code keeps the plain message: only a replay says to wait.
    let text = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(text.starts_with("MFA code rejected for"), "{text}");

    d.wait_for_decision(|l| l["reason"] == "mfa_wrong_code")
        .await?;
    let lines = lines_for(&d, ALICE)?;
    let allows = admissions(&lines);
    assert_eq!(allows.len(), 1, "{}", show(&lines));
    assert_eq!(allows[0]["mfa"], "totp");
    let failures: Vec<_> = mfa_lines(&lines)
        .into_iter()
        .map(|l| {
            (
                event(l).to_owned(),
                l["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let f = |r: &str| ("mfa_failure".to_owned(), r.to_owned());
    assert_eq!(
        failures,
        vec![
            f("mfa_replayed_code"),
            f("mfa_replayed_code"),
            f("mfa_wrong_code")
        ],
        "{}",
        show(&lines)
    );
    // The failures themselves are not alerts; what the detectors make of them is a signal
    // line of its own (tests/tests/detection_inline.rs).
    assert!(
        lines
            .iter()
            .filter(|l| l["event"] != "signal")
            .all(|l| l["alert"] != true),
        "{}",
        show(&lines)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_wrong_codes_lock_the_operator_out_and_another_is_unaffected() -> anyhow::Result<()>
{
    let d = Deployment::start(SidecarOptions::default()).await?;

    for attempt in 1..=20 {
        let wrong = wrong_code(&d, SystemTime::now());
        let err = refused(
            d.connect_with_password("alice", "alice", &wrong).await,
            &format!("wrong code {attempt} refused"),
        )?;
        assert_eq!(sqlstate(&err), Some("28P01"), "attempt {attempt}: {err}");
    }
    // The right code, now: still refused, and the client is told why.
    let err = refused(
        d.connect_with_password("alice", "alice", &d.alice_code(SystemTime::now()))
            .await,
        "locked out even for the right code",
    )?;
    assert_eq!(sqlstate(&err), Some("28P01"), "{err}");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(
        message.contains("too many failed MFA attempts"),
        "{message}"
    );

    d.wait_for_decision(|l| {
        l["spiffe_id"] == ALICE && l["event"] == "mfa_lockout" && l["alert"] != true
    })
    .await?;
    let lines = lines_for(&d, ALICE)?;
    let mfa = mfa_lines(&lines);
    assert_eq!(mfa.len(), 21, "{}", show(&lines));
    for line in &mfa[..19] {
        assert_eq!(line["event"], "mfa_failure", "{line}");
        assert_eq!(line["reason"], "mfa_wrong_code", "{line}");
        assert_ne!(line["alert"], true, "{line}");
    }
    // The twentieth failure trips the lock and is the one alert.
    assert_eq!(mfa[19]["event"], "mfa_lockout", "{}", mfa[19]);
    assert_eq!(mfa[19]["reason"], "mfa_locked_out");
    assert_eq!(mfa[19]["alert"], true, "{}", mfa[19]);
    assert_eq!(mfa[20]["event"], "mfa_lockout", "{}", mfa[20]);
    assert_ne!(
        mfa[20]["alert"], true,
        "one lockout, one alert: {}",
        mfa[20]
    );
    assert!(admissions(&lines).is_empty(), "{}", show(&lines));

    // bob, enrolled with the CLI, steps up from the same address while alice is locked out.
    let bin = eastwall_bin().await?;
    let mut enroll = libpq_command(bin.to_str().unwrap_or_default());
    enroll
        .args(["mfa", "enroll", "--config"])
        .arg(&d.layout.config)
        .arg(BOB);
    let out = output(enroll).await?;
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = stdout(&out);
    assert!(printed.contains("otpauth://totp/"), "{printed}");
    assert!(
        printed.contains('█') || printed.contains('▀'),
        "no QR code:\n{printed}"
    );
    let first_secret = printed
        .lines()
        .find_map(|l| l.strip_prefix("secret (base32): "))
        .expect("enroll prints the secret")
        .trim()
        .to_owned();
    // Enrolling again would silently break bob's authenticator: it takes --force.
    let enroll_again = |force: bool| {
        let mut cmd = libpq_command(bin.to_str().unwrap_or_default());
        cmd.args(["mfa", "enroll", "--config"])
            .arg(&d.layout.config);
        if force {
            cmd.arg("--force");
        }
        cmd.arg(BOB);
        output(cmd)
    };
    let out = enroll_again(false).await?;
    assert!(!out.status.success(), "re-enrolled without --force");
    assert!(stderr(&out).contains("pass --force"), "{}", stderr(&out));
    let out = enroll_again(true).await?;
    assert!(out.status.success(), "{}", stderr(&out));
    let secret = stdout(&out)
        .lines()
        .find_map(|l| l.strip_prefix("secret (base32): "))
        .expect("enroll --force prints the new secret")
        .trim()
        .to_owned();
    assert_ne!(secret, first_secret, "--force makes a new secret");
    let mut list = libpq_command(bin.to_str().unwrap_or_default());
    list.args(["mfa", "list", "--config"]).arg(&d.layout.config);
    let out = output(list).await?;
    assert!(
        stdout(&out)
            .lines()
            .any(|l| l.starts_with(&format!("{BOB}\t"))),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );

    let bob = issue_cert(&d, BOB, "bob")?;
    d.cluster.run_sql("CREATE ROLE bob LOGIN")?;
    // The sidecar re-reads the secrets file every 2 s.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let code = eastwall::mfa::totp::code_from_base32(&secret, SystemTime::now())
        .ok_or_else(|| anyhow::anyhow!("bad secret {secret}"))?;
    let client = connect_as(&d, &bob, "bob", Some(&code))
        .await?
        .map_err(|e| anyhow::anyhow!("bob refused: {e}"))?;
    let row = client.query_one("select current_user::text", &[]).await?;
    assert_eq!(row.get::<_, String>(0), "bob");
    let bob_lines = lines_for(&d, BOB)?;
    assert_eq!(admissions(&bob_lines).len(), 1, "{}", show(&bob_lines));
    assert!(mfa_lines(&bob_lines).is_empty(), "{}", show(&bob_lines));

    // Removing bob's secret ends his step-ups.
    let mut remove = libpq_command(bin.to_str().unwrap_or_default());
    remove
        .args(["mfa", "remove", "--config"])
        .arg(&d.layout.config)
        .arg(BOB);
    let out = output(remove).await?;
    assert!(out.status.success(), "{}", stderr(&out));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let next =
        eastwall::mfa::totp::code_from_base32(&secret, SystemTime::now() + Duration::from_secs(30))
            .ok_or_else(|| anyhow::anyhow!("bad secret {secret}"))?;
    let err = refused(
        connect_as(&d, &bob, "bob", Some(&next)).await?,
        "a removed operator is refused",
    )?;
    assert_eq!(sqlstate(&err), Some("28P01"), "{err}");
    d.wait_for_decision(|l| l["spiffe_id"] == BOB && l["reason"] == "mfa_not_enrolled")
        .await?;
    Ok(())
}
