//! Issue 10, items 3, 7 and 8: certificate and CRL tampering, tried as an attacker would
//! against a private PostgreSQL and the real sidecar. A CRL file that was emptied, holds no
//! CRL, was rolled back to an older CRL or is past its nextUpdate must never re-admit a
//! revoked certificate (and a bad reload is a visible decision line); a leaf issued by an
//! intermediate CA, and a leaf hiding a second URI SAN behind invalid UTF-8, are refused.

mod sidecar_common;

use std::time::{Duration, Instant};

use eastwall_ca::testing::{issue_flawed, issue_via_intermediate, sign_crl, CrlSpec, Flaw};
use eastwall_ca::{Ca, IssueRequest, IssuedCert, RevokeTarget, SpiffeId};
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use eastwall_e2e::{client_config, connect_with};
use serde_json::Value;
use sidecar_common::{assert_still_serves, one_decision, BILLING_ID};

fn our_ca(d: &Deployment) -> anyhow::Result<Ca> {
    Ok(Ca::open(&d.layout.dir.join("ca"))?)
}

fn billing_request() -> anyhow::Result<IssueRequest> {
    Ok(IssueRequest::new(SpiffeId::parse(BILLING_ID)?))
}

async fn connect_cert(
    d: &Deployment,
    cert: &IssuedCert,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let key = cert.key_pem.clone().unwrap_or_default();
    let tls = client_config(&d.ca_pem(), Some((&cert.cert_pem, &key))).expect("client TLS");
    connect_with(&d.pg_config("billing", "postgres"), tls).await
}

/// Polls (bounded, the sidecar re-reads its TLS files every 2 s) until `cert` is refused.
async fn wait_until_refused(d: &Deployment, cert: &IssuedCert) -> anyhow::Result<String> {
    let started = Instant::now();
    loop {
        match connect_cert(d, cert).await {
            Err(err) => return Ok(format!("{err:?}")),
            Ok(_) if started.elapsed() < Duration::from_secs(15) => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Ok(_) => anyhow::bail!("certificate {} still admitted after 15 s", cert.serial_hex),
        }
    }
}

/// Every connect refusal so far, oldest first. A handshake refusal names no certificate, so
/// callers count lines before and after their own attempt.
fn refusals(d: &Deployment) -> anyhow::Result<Vec<Value>> {
    Ok(d.decisions()?
        .into_iter()
        .filter(|l| l["event"] == "connect" && l["decision"] == "deny")
        .collect())
}

/// `cert` is refused now, as revoked, with a fresh decision line saying so.
async fn assert_refused_as_revoked(d: &Deployment, cert: &IssuedCert) -> anyhow::Result<()> {
    let before = refusals(d)?.len();
    let err = connect_cert(d, cert)
        .await
        .expect_err("a revoked certificate must stay refused");
    assert!(format!("{err:?}").contains("CertificateRevoked"), "{err:?}");
    for _ in 0..100 {
        let lines = refusals(d)?;
        if lines.len() > before {
            assert_eq!(lines.last().unwrap()["reason"], "revoked", "{lines:#?}");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("no decision line for the refused connection")
}

/// Waits for the `n`th failed `crl_reload` line and returns it.
async fn nth_reload_error(d: &Deployment, n: usize) -> anyhow::Result<Value> {
    let errors = |l: &Value| l["event"] == "crl_reload" && l["result"] == "error";
    d.wait_for_decision(|_| {
        d.decisions()
            .map(|all| all.iter().filter(|l| errors(l)).count() >= n)
            .unwrap_or(false)
    })
    .await?;
    let all: Vec<Value> = d.decisions()?.into_iter().filter(errors).collect();
    Ok(all[n - 1].clone())
}

/// Stops the running sidecar, then starts a new one from the same files and returns why it
/// would not start. Its decision log, CA and CRL state are the same files.
async fn restart_error(d: Deployment) -> anyhow::Result<String> {
    let Deployment {
        cluster: _cluster,
        layout,
        proxy,
        dir: _dir,
    } = d;
    proxy.shutdown().await;
    let config = eastwall_config::Config::load(&layout.config)
        .map_err(|e| anyhow::anyhow!("{}", e.lines().join("\n")))?;
    match eastwall::server::start(config).await {
        Ok(running) => {
            running.shutdown().await;
            anyhow::bail!("the sidecar started with a CRL it should have refused")
        }
        Err(err) => Ok(err.to_string()),
    }
}

#[tokio::test]
async fn an_emptied_or_certificate_only_crl_file_keeps_revocation_and_blocks_a_restart(
) -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let ca = our_ca(&d)?;
    let crl = ca.crl_path();
    let stolen = ca.issue(&billing_request()?)?;
    ca.revoke(&RevokeTarget::Serial(stolen.serial_hex.clone()))?;
    let seen = wait_until_refused(&d, &stolen).await?;
    assert!(seen.contains("CertificateRevoked"), "{seen}");

    // The attacker empties the CRL file: revocation must not silently switch off.
    std::fs::write(&crl, b"")?;
    let line = nth_reload_error(&d, 1).await?;
    assert_eq!(line["reason"], "crl_missing", "{line}");
    let detail = line["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(&crl.display().to_string()), "{detail}");
    assert!(detail.contains("no CRL"), "{detail}");
    assert_refused_as_revoked(&d, &stolen).await?;

    // A PEM file that holds a certificate but no CRL: the same.
    std::fs::write(&crl, d.ca_pem())?;
    let line = nth_reload_error(&d, 2).await?;
    assert_eq!(line["reason"], "crl_missing", "{line}");
    assert_refused_as_revoked(&d, &stolen).await?;
    assert_still_serves(&d).await?;

    // A restart with such a file is a start error naming the file and the problem.
    let err = restart_error(d).await?;
    assert!(err.contains(&crl.display().to_string()), "{err}");
    assert!(err.contains("no CRL"), "{err}");
    Ok(())
}

#[tokio::test]
async fn an_older_crl_put_back_does_not_readmit_what_the_newer_one_revoked() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let ca = our_ca(&d)?;
    let crl = ca.crl_path();
    let a = ca.issue(&billing_request()?)?;
    let b = ca.issue(&billing_request()?)?;

    ca.revoke(&RevokeTarget::Serial(a.serial_hex.clone()))?;
    wait_until_refused(&d, &a).await?;
    let older = std::fs::read(&crl)?;
    ca.revoke(&RevokeTarget::Serial(b.serial_hex.clone()))?;
    wait_until_refused(&d, &b).await?;

    // The older CRL is validly signed by our CA, but does not list B.
    std::fs::write(&crl, &older)?;
    let line = nth_reload_error(&d, 1).await?;
    assert_eq!(line["reason"], "crl_rollback", "{line}");
    let detail = line["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("lower"), "{detail}");
    assert_refused_as_revoked(&d, &b).await?;
    assert_refused_as_revoked(&d, &a).await?;
    assert_still_serves(&d).await?;

    // The high-water mark is on disk: a restart does not forget it.
    let state = d.layout.dir.join("crl-state.json");
    assert!(state.is_file(), "{} exists", state.display());
    let err = restart_error(d).await?;
    assert!(err.contains("lower"), "{err}");
    assert!(err.contains(&crl.display().to_string()), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_crl_past_its_next_update_admits_no_one() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let ca = our_ca(&d)?;
    let crl = ca.crl_path();
    // Validly signed and newer than anything seen, but its nextUpdate has passed: revocation
    // status is unknown, so no one is admitted.
    let now = time::OffsetDateTime::now_utc();
    let stale = sign_crl(
        &ca,
        &CrlSpec {
            revoked: Vec::new(),
            crl_number: 1000,
            this_update: now - time::Duration::days(9),
            next_update: now - time::Duration::days(2),
        },
    )?;
    std::fs::write(&crl, stale)?;
    let started = Instant::now();
    let err = loop {
        match d.connect("billing", "billing").await {
            Err(err) => break err,
            Ok(_) if started.elapsed() < Duration::from_secs(15) => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Ok(_) => anyhow::bail!("admitted 15 s after a stale CRL was installed"),
        }
    };
    assert!(err.code().is_none(), "a TLS alert, not a FATAL: {err}");
    let line = d
        .wait_for_decision(|l| l["event"] == "connect" && l["reason"] == "crl_expired")
        .await?;
    assert_eq!(line["decision"], "deny");
    let detail = line["detail"].as_str().unwrap_or_default();
    assert!(detail.to_lowercase().contains("revocation"), "{detail}");

    // Starting with a stale CRL is a start error that says what to do.
    let err = restart_error(d).await?;
    assert!(err.contains(&crl.display().to_string()), "{err}");
    assert!(err.contains("nextUpdate"), "{err}");
    Ok(())
}

/// A deployment whose `[listen]` has no `crl` line.
async fn without_crl() -> anyhow::Result<Deployment> {
    Deployment::start(SidecarOptions {
        edit_config: Some(Box::new(|text: &mut String| {
            *text = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("crl ="))
                .collect::<Vec<_>>()
                .join("\n");
        })),
        ..SidecarOptions::default()
    })
    .await
}

#[tokio::test]
async fn a_leaf_from_an_intermediate_ca_is_refused_without_a_crl() -> anyhow::Result<()> {
    let d = without_crl().await?;
    // The CA signs leaves only; an intermediate signed with its key (pathlen 0, keyCertSign)
    // issues a perfectly formed SVID for billing, sent as leaf + intermediate.
    let (leaf, _intermediate) = issue_via_intermediate(&our_ca(&d)?, &billing_request()?)?;
    let err = connect_cert(&d, &leaf)
        .await
        .expect_err("a leaf not issued by a trust anchor must be refused");
    assert!(err.code().is_none(), "refused in the handshake: {err}");
    assert!(format!("{err:?}").contains("AlertReceived"), "{err:?}");
    let line = one_decision(&d, |l| l["event"] == "connect" && l["decision"] == "deny").await?;
    assert_eq!(line["reason"], "svid_not_direct", "{line}");
    let detail = line["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("intermediate"), "{detail}");
    assert_still_serves(&d).await
}

#[tokio::test]
async fn a_second_uri_san_hidden_by_invalid_utf8_is_refused() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let cert = issue_flawed(&our_ca(&d)?, &billing_request()?, Flaw::InvalidUtf8Uri)?;
    let err = connect_cert(&d, &cert)
        .await
        .expect_err("an SVID with an undecodable SAN entry must be refused");
    let db = err.as_db_error().expect("a FATAL inside TLS");
    assert_eq!(db.code().code(), "28000");
    assert!(db.message().contains("subjectAltName"), "{db:?}");
    let line = one_decision(&d, |l| l["event"] == "connect" && l["decision"] == "deny").await?;
    assert_eq!(line["reason"], "svid_invalid_san", "{line}");
    assert!(line["spiffe_id"].is_null(), "no identity was established");
    assert_still_serves(&d).await
}

#[tokio::test]
async fn the_stepup_endpoint_refuses_a_leaf_from_an_intermediate_ca() -> anyhow::Result<()> {
    let d = without_crl().await?;
    let addr = d.proxy.stepup_addr.expect("a step-up endpoint");
    let url = format!("https://localhost:{}/v1/stepup", addr.port());
    let alice = IssueRequest::new(SpiffeId::parse(
        "spiffe://corp.example/app/operators/alice",
    )?);
    let (leaf, _) = issue_via_intermediate(&our_ca(&d)?, &alice)?;
    let key = leaf.key_pem.clone().unwrap_or_default();
    let tls = std::sync::Arc::new(client_config(&d.ca_pem(), Some((&leaf.cert_pem, &key)))?);
    let code = d.alice_code(std::time::SystemTime::now());
    let result = eastwall::stepup::fetch_token(&url, tls, &code, Duration::from_secs(10)).await;
    // Refused in the TLS handshake, before any HTTP answer (Refused would mean the endpoint
    // accepted the certificate and judged the code).
    match result {
        Ok(_) => anyhow::bail!("a token for a certificate from an intermediate CA"),
        Err(eastwall::stepup::StepUpError::Refused { .. }) => {
            anyhow::bail!("the endpoint accepted the certificate and judged the code")
        }
        Err(err) => assert!(
            format!("{err:?}").contains("CertificateUnknown"),
            "expected the TLS alert certificate_unknown, got {err:?}"
        ),
    }
    // The real alice still gets a token.
    let tls = std::sync::Arc::new(d.tls_for("alice")?);
    let code = d.alice_code(std::time::SystemTime::now());
    let token = eastwall::stepup::fetch_token(&url, tls, &code, Duration::from_secs(10)).await?;
    assert!(token.token.starts_with("ewst1."));
    Ok(())
}
