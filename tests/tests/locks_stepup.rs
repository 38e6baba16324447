//! Locks reach the step-up endpoint (issue 11, item 2): a locked operator (by SPIFFE ID
//! pattern, certificate serial or source) gets HTTP 403 `locked` with the lock's message and
//! no token, each refusal is a `stepup` deny line with reason `locked` and the lock id, and
//! the running sidecar keeps its locks when the lock file is replaced by a hostile one.

mod mfa_common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use eastwall::stepup::{self, StepUpError};
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use mfa_common::*;
use serde_json::Value;

const BOUND: Duration = Duration::from_secs(5);

fn url(d: &Deployment) -> anyhow::Result<String> {
    let addr = d
        .proxy
        .stepup_addr
        .ok_or_else(|| anyhow::anyhow!("the fixture starts the step-up endpoint"))?;
    Ok(format!(
        "https://localhost:{}{}",
        addr.port(),
        stepup::STEPUP_PATH
    ))
}

async fn alice_fetch(
    d: &Deployment,
    at: SystemTime,
) -> anyhow::Result<Result<stepup::StepUpResponse, StepUpError>> {
    let tls = Arc::new(d.tls_for("alice")?);
    Ok(stepup::fetch_token(&url(d)?, tls, &d.alice_code(at), BOUND).await)
}

/// `eastwall lock ARGS --config <the deployment's eastwall.toml>`, expecting success; stdout.
async fn lock(d: &Deployment, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new(eastwall_bin().await?);
    cmd.arg("lock")
        .arg(args[0])
        .arg("--config")
        .arg(&d.layout.config)
        .args(&args[1..]);
    let out = output(cmd).await?;
    anyhow::ensure!(
        out.status.success(),
        "eastwall lock {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The `event: "lock"` line for `action` on `lock_id`; once it is written, the sidecar has
/// the new set in force.
async fn lock_line(d: &Deployment, action: &str, lock_id: &str) -> anyhow::Result<Value> {
    d.wait_for_decision(|l| {
        l["event"] == "lock" && l["action"] == action && l["lock_id"] == lock_id
    })
    .await
}

fn assert_locked(r: &Result<stepup::StepUpResponse, StepUpError>, lock_id: &str, message: &str) {
    match r {
        Err(StepUpError::Refused {
            status,
            error,
            detail,
        }) => {
            assert_eq!((*status, error.as_str()), (403, "locked"), "{r:?}");
            let detail = detail.as_deref().unwrap_or_default();
            assert!(
                detail.contains(lock_id) && detail.contains(message),
                "{detail}"
            );
        }
        other => panic!("expected 403 locked, got {other:?}"),
    }
}

#[tokio::test]
async fn a_locked_operator_gets_403_at_the_stepup_endpoint() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;

    // The attack: an operator's identity is known to be stolen; the thief asks for a token
    // with a valid code (the authenticator was taken too).
    let lock_id = lock(
        &d,
        &[
            "add",
            "--id",
            "spiffe://corp.example/app/operators/*",
            "--message",
            "incident 7: operators paused",
        ],
    )
    .await?;
    let added = lock_line(&d, "added", &lock_id).await?;
    assert_eq!(
        added["target"]["spiffe_id"], "spiffe://corp.example/app/operators/*",
        "{added}"
    );
    assert_eq!(added["message"], "incident 7: operators paused", "{added}");

    let r = alice_fetch(&d, SystemTime::now()).await?;
    assert_locked(&r, &lock_id, "incident 7: operators paused");

    let line = d
        .wait_for_decision(|l| l["event"] == "stepup" && l["spiffe_id"] == ALICE)
        .await?;
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["reason"], "locked", "{line}");
    assert_eq!(line["lock_id"], lock_id.as_str(), "{line}");

    // The refused request spent no code: once the lock is lifted the same code works.
    lock(&d, &["remove", &lock_id]).await?;
    lock_line(&d, "removed", &lock_id).await?;
    let r = alice_fetch(&d, SystemTime::now()).await?;
    let token =
        r.map_err(|e| anyhow::anyhow!("alice was refused after the lock was lifted: {e}"))?;
    assert!(token.token.starts_with(eastwall::mfa::TOKEN_PREFIX));
    Ok(())
}

#[tokio::test]
async fn serial_and_source_locks_hold_and_survive_a_hostile_lock_file() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let now = SystemTime::now();
    alice_fetch(&d, now)
        .await?
        .map_err(|e| anyhow::anyhow!("alice before any lock: {e}"))?;
    let allowed = d
        .wait_for_decision(|l| l["event"] == "stepup" && l["decision"] == "allow")
        .await?;
    let serial = allowed["cert_serial"]
        .as_str()
        .unwrap_or_default()
        .to_uppercase();
    assert!(!serial.is_empty(), "{allowed}");

    // By serial, typed in capitals: normalised, and it matches.
    let by_serial = lock(
        &d,
        &["add", "--serial", &serial, "--message", "stolen laptop"],
    )
    .await?;
    lock_line(&d, "added", &by_serial).await?;
    assert_locked(&alice_fetch(&d, now).await?, &by_serial, "stolen laptop");

    // The attack: replace the lock file with one that lifts the lock: world-writable, then
    // garbage, then a foreign trust domain. Each is refused whole; the lock stays in force.
    let file = d.layout.dir.join("locks.json");
    let good = std::fs::read_to_string(&file)?;
    let hostile = [
        (r#"{"version":1,"locks":[]}"#.to_owned(), 0o666),
        ("not json".to_owned(), 0o600),
        (
            good.replace(
                &format!("\"serial\": \"{}\"", serial.to_lowercase()),
                "\"spiffe_id\": \"spiffe://evil.example/x\"",
            ),
            0o600,
        ),
    ];
    for (n, (text, mode)) in hostile.iter().enumerate() {
        let before = d
            .decisions()?
            .iter()
            .filter(|l| l["event"] == "lock_reload")
            .count();
        std::fs::write(&file, text)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(*mode))?;
        let mut seen = false;
        for _ in 0..50 {
            if d.decisions()?
                .iter()
                .filter(|l| l["event"] == "lock_reload")
                .count()
                > before
            {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(seen, "hostile file {n} was not reported within 5 s");
        let line = d
            .decisions()?
            .into_iter()
            .rfind(|l| l["event"] == "lock_reload")
            .unwrap_or_default();
        assert_eq!(line["alert"], true, "{line}");
        assert_eq!(line["locks_in_force"], 1, "{line}");
        assert_locked(&alice_fetch(&d, now).await?, &by_serial, "stolen laptop");
    }
    assert!(
        !d.decisions()?
            .iter()
            .any(|l| l["event"] == "lock" && l["action"] == "removed"),
        "no lock was lifted by a hostile file"
    );

    // The operator restores the file and lifts the serial lock; a source lock then holds
    // alice's address (127.0.0.1 inside 127.0.0.0/8).
    std::fs::write(&file, &good)?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
    lock(&d, &["remove", &by_serial]).await?;
    lock_line(&d, "removed", &by_serial).await?;
    let by_source = lock(&d, &["add", "--source", "127.0.0.0/8"]).await?;
    lock_line(&d, "added", &by_source).await?;
    assert_locked(&alice_fetch(&d, now).await?, &by_source, "");

    // A TTL lock expires by itself, with one `expired` line.
    lock(&d, &["remove", &by_source]).await?;
    lock_line(&d, "removed", &by_source).await?;
    // 3 s: longer than the sidecar's 2 s look at the file, so it is in force for a while.
    let short = lock(&d, &["add", "--id", ALICE, "--ttl", "3s"]).await?;
    lock_line(&d, "added", &short).await?;
    lock_line(&d, "expired", &short).await?;
    let r = alice_fetch(&d, now + Duration::from_secs(30)).await?;
    r.map_err(|e| anyhow::anyhow!("alice after the TTL lock expired: {e}"))?;
    let expired = d
        .decisions()?
        .iter()
        .filter(|l| {
            l["event"] == "lock" && l["lock_id"] == short.as_str() && l["action"] == "expired"
        })
        .count();
    assert_eq!(expired, 1);
    Ok(())
}
