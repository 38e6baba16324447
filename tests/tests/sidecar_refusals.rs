//! Everything the policy does not name is refused the way PRODUCT.md says a client sees it,
//! and each refusal is exactly one decision line with its own reason.

mod sidecar_common;

use std::time::{Duration, Instant};

use eastwall_ca::testing::{issue_flawed, Flaw};
use eastwall_ca::{Ca, IssueRequest, RevokeTarget, SpiffeId};
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use eastwall_e2e::{client_config, connect_with, TestPki};
use sidecar_common::{
    assert_still_serves, one_decision, read_to_close, startup, tcp, with_reason, BILLING_ID,
};
use tokio::io::AsyncWriteExt;
use tokio_postgres::config::SslMode;
use tokio_postgres::NoTls;

/// Connects through the proxy as `role` with an arbitrary certificate and key.
async fn connect_as(
    d: &Deployment,
    cert_pem: Option<(&str, &str)>,
    role: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let tls = client_config(&d.ca_pem(), cert_pem).expect("client TLS config");
    connect_with(&d.pg_config(role, "postgres"), tls).await
}

fn our_ca(d: &Deployment) -> anyhow::Result<Ca> {
    Ok(Ca::open(&d.layout.dir.join("ca"))?)
}

fn billing_request() -> anyhow::Result<IssueRequest> {
    Ok(IssueRequest::new(SpiffeId::parse(BILLING_ID)?))
}

/// The only decision line so far, after a refusal in a fresh deployment.
async fn only_line(d: &Deployment, reason: &str) -> anyhow::Result<serde_json::Value> {
    let line = one_decision(d, |l| l["reason"] == reason).await?;
    // Detection signals the refusal raises are lines of their own (tests/tests/detection_inline.rs).
    let all: Vec<_> = d
        .decisions()?
        .into_iter()
        .filter(|l| l["event"] != "signal")
        .collect();
    assert_eq!(all.len(), 1, "one refusal, one line: {all:#?}");
    assert_eq!(line["event"], "connect");
    assert_eq!(line["decision"], "deny");
    Ok(line)
}

#[tokio::test]
async fn workstation_is_refused_with_an_alert() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let err = d
        .connect("finance-laptop", "finance-laptop")
        .await
        .expect_err("the laptop must be refused");
    let db = err.as_db_error().expect("a FATAL from the proxy");
    assert_eq!(db.code().code(), "28000");
    assert!(
        db.message()
            .contains("spiffe://corp.example/workstations/finance-laptop"),
        "{db:?}"
    );
    let line = one_decision(&d, |l| {
        l["spiffe_id"] == "spiffe://corp.example/workstations/finance-laptop"
    })
    .await?;
    assert_eq!(line["decision"], "deny");
    assert_eq!(line["alert"], true);
    assert_eq!(line["db_user"], "finance-laptop");
    assert!(db
        .message()
        .contains(line["conn_id"].as_str().unwrap_or("?")));
    assert_eq!(d.decisions()?.len(), 1);
    assert_still_serves(&d).await
}

#[tokio::test]
async fn client_without_a_certificate_gets_a_tls_alert() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let err = connect_as(&d, None, "billing").await.expect_err("refused");
    assert!(err.code().is_none(), "a TLS alert, not a SQL error: {err}");
    let text = format!("{err:?}");
    assert!(text.contains("CertificateRequired"), "{text}");
    let line = only_line(&d, "no_client_cert").await?;
    assert!(line["spiffe_id"].is_null());
    assert_eq!(line["alert"], false);
    assert_still_serves(&d).await
}

#[tokio::test]
async fn plaintext_client_is_told_tls_is_required() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let mut config = d.pg_config("billing", "postgres");
    config.ssl_mode(SslMode::Disable);
    let Err(err) = config.connect(NoTls).await else {
        panic!("a plaintext client was admitted");
    };
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "28000");
    assert_eq!(db.message(), "TLS with a client certificate is required");
    let line = only_line(&d, "no_tls").await?;
    assert_eq!(line["db_user"], "billing");

    // On the wire: the whole answer is one ErrorResponse and a close — never an
    // authentication request a client could answer with a password in the clear.
    let mut sock = tcp(&d).await?;
    sock.write_all(&startup("billing", "postgres")).await?;
    let reply = read_to_close(&mut sock, Duration::from_secs(5)).await?;
    assert_eq!(reply.first(), Some(&b'E'), "{reply:?}");
    let len = u32::from_be_bytes(reply[1..5].try_into()?) as usize;
    assert_eq!(reply.len(), 1 + len, "nothing after the error: {reply:?}");
    assert_eq!(with_reason(&d, "no_tls")?.len(), 2);
    assert_still_serves(&d).await
}

#[tokio::test]
async fn certificate_from_another_ca_is_untrusted() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    // Same trust domain name, same SPIFFE ID, different CA: only the signature differs.
    let foreign = TestPki::new("corp.example")?;
    let cert = foreign.client("billing", "app/billing", None)?;
    let err = connect_as(&d, Some((&cert.cert_pem, &cert.key_pem)), "billing")
        .await
        .expect_err("refused");
    assert!(err.code().is_none(), "{err}");
    // Same issuer name, so webpki finds "our" CA and the signature check fails: rustls
    // answers with a decrypt_error alert.
    assert!(format!("{err:?}").contains("AlertReceived"), "{err:?}");
    let line = only_line(&d, "untrusted").await?;
    // What it claimed is kept for forensics, marked unverified, never as the identity.
    assert!(line["spiffe_id"].is_null(), "{line}");
    assert_eq!(
        line["claimed_spiffe_id"],
        "spiffe://corp.example/app/billing"
    );
    assert!(line["claimed_cert_serial"].is_string(), "{line}");
    assert_eq!(line["unverified"], true);
    assert_still_serves(&d).await
}

#[tokio::test]
async fn expired_certificate_is_refused() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let now = time::OffsetDateTime::now_utc();
    let mut req = billing_request()?;
    req.validity = Some((now - time::Duration::days(2), now - time::Duration::days(1)));
    let cert = our_ca(&d)?.issue(&req)?;
    let key = cert.key_pem.clone().unwrap_or_default();
    let err = connect_as(&d, Some((&cert.cert_pem, &key)), "billing")
        .await
        .expect_err("refused");
    assert!(err.code().is_none(), "{err}");
    assert!(format!("{err:?}").contains("CertificateExpired"), "{err:?}");
    let line = only_line(&d, "expired").await?;
    assert_eq!(
        line["claimed_spiffe_id"],
        "spiffe://corp.example/app/billing"
    );
    assert_still_serves(&d).await
}

#[tokio::test]
async fn revoked_certificate_is_refused_once_the_crl_reloads() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let ca = our_ca(&d)?;
    let cert = ca.issue(&billing_request()?)?;
    let key = cert.key_pem.clone().unwrap_or_default();
    let pair = (cert.cert_pem.as_str(), key.as_str());
    let before = connect_as(&d, Some(pair), "billing").await?;
    before.simple_query("select 1").await?;

    ca.revoke(&RevokeTarget::Serial(cert.serial_hex.clone()))?;
    // The sidecar re-reads its TLS files every 2 s; poll, bounded.
    let started = Instant::now();
    let err = loop {
        match connect_as(&d, Some(pair), "billing").await {
            Err(err) => break err,
            Ok(_) if started.elapsed() < Duration::from_secs(15) => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Ok(_) => anyhow::bail!("revoked certificate still admitted after 15 s"),
        }
    };
    assert!(err.code().is_none(), "{err}");
    assert!(format!("{err:?}").contains("CertificateRevoked"), "{err:?}");
    // One refusal; the revoked certificate's live sessions also end, as session_end lines
    // with the same reason (tests/tests/revocation_live.rs).
    let line = one_decision(&d, |l| l["event"] == "connect" && l["reason"] == "revoked").await?;
    assert!(line["cert_serial"].is_null(), "{line}");
    assert_eq!(
        line["claimed_cert_serial"],
        cert.serial_hex.as_str(),
        "{line}"
    );
    assert_eq!(
        line["claimed_spiffe_id"],
        "spiffe://corp.example/app/billing"
    );
    assert_eq!(line["unverified"], true);
    assert!(d
        .decisions()?
        .iter()
        .filter(|l| l["event"] != "signal")
        .all(|l| l["decision"] == "allow" || l["reason"] == "revoked"));
    // The sample billing certificate (another serial) is unaffected.
    assert_still_serves(&d).await
}

#[tokio::test]
async fn two_uri_sans_are_not_an_svid() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let cert = issue_flawed(&our_ca(&d)?, &billing_request()?, Flaw::TwoUriSans)?;
    let key = cert.key_pem.clone().unwrap_or_default();
    let err = connect_as(&d, Some((&cert.cert_pem, &key)), "billing")
        .await
        .expect_err("refused");
    let db = err.as_db_error().expect("FATAL inside TLS");
    assert_eq!(db.code().code(), "28000");
    assert!(db.message().contains("URI SAN"), "{db:?}");
    let line = only_line(&d, "svid_multi_uri").await?;
    assert!(line["spiffe_id"].is_null(), "no identity was established");
    assert_still_serves(&d).await
}

#[tokio::test]
async fn ca_certificate_as_a_client_leaf_is_refused() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let cert = issue_flawed(&our_ca(&d)?, &billing_request()?, Flaw::CaTrue)?;
    let key = cert.key_pem.clone().unwrap_or_default();
    let err = connect_as(&d, Some((&cert.cert_pem, &key)), "billing")
        .await
        .expect_err("refused");
    // webpki refuses a CA certificate as an end entity during the handshake, so the client
    // gets a TLS alert; the log still says which SVID rule it broke.
    assert!(err.code().is_none(), "{err}");
    assert!(format!("{err:?}").contains("AlertReceived"), "{err:?}");
    only_line(&d, "svid_ca_leaf").await?;
    assert_still_serves(&d).await
}

#[tokio::test]
async fn leaf_that_can_sign_certificates_is_refused() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let cert = issue_flawed(&our_ca(&d)?, &billing_request()?, Flaw::KeyCertSign)?;
    let key = cert.key_pem.clone().unwrap_or_default();
    let err = connect_as(&d, Some((&cert.cert_pem, &key)), "billing")
        .await
        .expect_err("refused");
    let db = err.as_db_error().expect("FATAL inside TLS");
    assert_eq!(db.code().code(), "28000");
    only_line(&d, "svid_ca_usage").await?;
    assert_still_serves(&d).await
}

#[tokio::test]
async fn billing_asking_for_postgres_is_denied_without_naming_the_rule() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let err = d.connect("billing", "postgres").await.expect_err("refused");
    let db = err.as_db_error().expect("a FATAL from the proxy");
    assert_eq!(db.code().code(), "28000");
    let line = one_decision(&d, |l| l["db_user"] == "postgres").await?;
    assert_eq!(line["decision"], "deny");
    assert_eq!(line["spiffe_id"], BILLING_ID);
    let conn_id = line["conn_id"].as_str().unwrap_or("?");
    assert!(db.message().contains(BILLING_ID), "{db:?}");
    assert!(db.message().contains(conn_id), "{db:?}");
    let text = format!("{} {:?} {:?}", db.message(), db.detail(), db.hint());
    assert!(
        !text.contains("policy.ew") && !text.contains("segment(") && !text.contains("line "),
        "the client must not learn the rule: {text}"
    );
    assert_eq!(d.decisions()?.len(), 1);
    assert_still_serves(&d).await
}

#[tokio::test]
async fn every_other_broken_svid_has_its_own_reason() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let ca = our_ca(&d)?;
    let cases = [
        (Flaw::NoUriSan, "svid_no_uri", true),
        (Flaw::NonSpiffeUri, "svid_bad_id", true),
        (Flaw::ForeignTrustDomain, "svid_foreign_domain", true),
        // No clientAuth EKU: webpki refuses it in the handshake.
        (Flaw::ServerAuthOnly, "wrong_key_purpose", false),
    ];
    for (flaw, reason, inside_tls) in cases {
        let cert = issue_flawed(&ca, &billing_request()?, flaw)?;
        let key = cert.key_pem.clone().unwrap_or_default();
        let err = connect_as(&d, Some((&cert.cert_pem, &key)), "billing")
            .await
            .err()
            .unwrap_or_else(|| panic!("{flaw:?} admitted"));
        if inside_tls {
            let db = err.as_db_error().expect("FATAL inside TLS");
            assert_eq!(db.code().code(), "28000", "{flaw:?}");
        } else {
            assert!(err.code().is_none(), "{flaw:?}: {err}");
        }
        let line = one_decision(&d, |l| l["reason"] == reason).await?;
        assert_eq!(line["decision"], "deny", "{flaw:?}");
        assert!(line["spiffe_id"].is_null(), "{flaw:?}: {line}");
    }
    assert_eq!(d.decisions()?.len(), cases.len());
    assert_still_serves(&d).await
}
