//! The HTTPS step-up endpoint under attack (issue 10, item 10): workloads that can never step
//! up cannot spend an operator's per-source failure budget, one source cannot hold every
//! connection slot, and every step-up line names the certificate serial.

mod mfa_common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use eastwall::stepup::{self, StepUpError};
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use mfa_common::*;
use tokio::io::AsyncReadExt;

const BOUND: Duration = Duration::from_secs(5);

async fn deployment(mfa_extra: &'static str) -> anyhow::Result<Deployment> {
    Deployment::start(SidecarOptions {
        edit_config: Some(Box::new(move |text: &mut String| {
            *text = text.replace("[mfa]\n", &format!("[mfa]\n{mfa_extra}"));
        })),
        ..SidecarOptions::default()
    })
    .await
}

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

async fn fetch(
    d: &Deployment,
    tls: rustls::ClientConfig,
    code: &str,
) -> anyhow::Result<Result<stepup::StepUpResponse, StepUpError>> {
    Ok(stepup::fetch_token(&url(d)?, Arc::new(tls), code, BOUND).await)
}

fn status(r: &Result<stepup::StepUpResponse, StepUpError>) -> Option<(u16, String)> {
    match r {
        Err(StepUpError::Refused { status, error, .. }) => Some((*status, error.clone())),
        _ => None,
    }
}

#[tokio::test]
async fn workloads_that_cannot_step_up_spend_no_operator_budget() -> anyhow::Result<()> {
    // One failure per identity, five per source: the smallest budgets there are.
    let d = deployment("max_failures = 1\n").await?;
    let wrong = wrong_code(&d, SystemTime::now());

    // The attack: billing (no rule asks it for MFA) and bob (an operator, not enrolled) send
    // wrong codes from the address alice uses, to lock that address out.
    let bob = issue_cert(&d, "spiffe://corp.example/app/operators/bob", "bob")?;
    let bob_tls = eastwall_e2e::client_config(&d.ca_pem(), Some((&bob.cert_pem, &bob.key_pem)))?;
    for _ in 0..6 {
        let r = fetch(&d, d.tls_for("billing")?, &wrong).await?;
        assert_eq!(status(&r), Some((403, "not_eligible".to_owned())), "{r:?}");
        let r = fetch(&d, bob_tls.clone(), &wrong).await?;
        assert_eq!(status(&r), Some((403, "not_enrolled".to_owned())), "{r:?}");
    }
    // alice, from the same address, still gets her token.
    let r = fetch(&d, d.tls_for("alice")?, &d.alice_code(SystemTime::now())).await?;
    let token = r.map_err(|e| anyhow::anyhow!("alice was refused: {e}"))?;
    assert!(token.token.starts_with(eastwall::mfa::TOKEN_PREFIX));

    // Each refusal is a decision line, with the certificate serial filled in.
    let line = d
        .wait_for_decision(|l| l["event"] == "stepup" && l["spiffe_id"] == BILLING)
        .await?;
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["reason"], "mfa_not_eligible", "{line}");
    d.connect("billing", "billing").await?;
    let connect = d
        .wait_for_decision(|l| l["event"] == "connect" && l["spiffe_id"] == BILLING)
        .await?;
    assert!(connect["cert_serial"].is_string(), "{connect}");
    assert_eq!(line["cert_serial"], connect["cert_serial"], "{line}");
    let bob_line = d
        .wait_for_decision(|l| {
            l["event"] == "stepup" && l["spiffe_id"] == "spiffe://corp.example/app/operators/bob"
        })
        .await?;
    assert_eq!(bob_line["reason"], "mfa_not_enrolled", "{bob_line}");
    let alice_line = d
        .wait_for_decision(|l| l["event"] == "stepup" && l["spiffe_id"] == ALICE)
        .await?;
    assert_eq!(alice_line["decision"], "allow", "{alice_line}");
    let serial = alice_line["cert_serial"].as_str().unwrap_or_default();
    assert!(
        !serial.is_empty()
            && serial
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
        "{alice_line}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_hold_every_stepup_slot() -> anyhow::Result<()> {
    let d = deployment("").await?;
    let target = d.proxy.stepup_addr.expect("step-up endpoint");

    // The attack: 256 silent TCP connections from 127.0.0.2, the endpoint's global limit.
    let mut held = Vec::new();
    for _ in 0..stepup::MAX_CONNECTIONS {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind("127.0.0.2:0".parse()?)?;
        held.push(socket.connect(target).await?);
    }

    // alice, from another address, is still served within a few seconds.
    let r = fetch(&d, d.tls_for("alice")?, &d.alice_code(SystemTime::now())).await?;
    r.map_err(|e| anyhow::anyhow!("alice was not served: {e}"))?;

    // And the flood's connections beyond the per-source cap were closed at once.
    let closed: Vec<_> = held
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut byte = [0u8; 1];
                matches!(
                    tokio::time::timeout(Duration::from_secs(3), s.read(&mut byte)).await,
                    Ok(Ok(0)) | Ok(Err(_))
                )
            })
        })
        .collect();
    let mut n = 0;
    for c in closed {
        if c.await? {
            n += 1;
        }
    }
    assert!(
        n >= stepup::MAX_CONNECTIONS - stepup::MAX_CONNECTIONS_PER_SOURCE,
        "only {n} of the flood's connections were closed"
    );
    Ok(())
}

#[tokio::test]
async fn an_administrator_clears_a_lockout_with_eastwall_mfa_unlock() -> anyhow::Result<()> {
    let d = deployment("max_failures = 1\n").await?;
    let r = fetch(&d, d.tls_for("alice")?, &wrong_code(&d, SystemTime::now())).await?;
    assert_eq!(status(&r), Some((429, "locked_out".to_owned())), "{r:?}");
    let line = d
        .wait_for_decision(|l| l["event"] == "stepup" && l["reason"] == "mfa_locked_out")
        .await?;
    assert_eq!(line["alert"], true, "{line}");
    assert!(line["lockout_s"].as_u64().is_some_and(|s| s > 0), "{line}");

    let mut unlock = tokio::process::Command::new(eastwall_bin().await?);
    unlock
        .args(["mfa", "unlock", "--config"])
        .arg(&d.layout.config)
        .arg(ALICE);
    let out = output(unlock).await?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Cleared"), "{}", stdout(&out));

    // The sidecar re-reads the secrets file every 2 s.
    let code = d.alice_code(SystemTime::now());
    for _ in 0..50 {
        let r = fetch(&d, d.tls_for("alice")?, &code).await?;
        match status(&r) {
            None => {
                r.map_err(|e| anyhow::anyhow!("{e}"))?;
                return Ok(());
            }
            Some((429, _)) => tokio::time::sleep(Duration::from_millis(200)).await,
            other => anyhow::bail!("unexpected answer {other:?}"),
        }
    }
    anyhow::bail!("the lock was not cleared within 10 s")
}
