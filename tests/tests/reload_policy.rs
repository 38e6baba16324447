//! Reload while things run: editing the policy so billing is no longer allowed ends billing's
//! live session (57P01, `session_end` reason `policy_changed`) and refuses its next
//! connection, while alice's stepped-up session goes on; a broken policy is refused whole
//! with a `config_reload` error line and the policy in force stays; a rotated server
//! certificate is served to the next client while existing sessions continue.

mod sidecar_common;

use std::time::{Duration, Instant, SystemTime};

use anyhow::anyhow;
use eastwall_ca::{Ca, IssueRequest, SpiffeId};
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use sidecar_common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BILLING_ID: &str = "spiffe://corp.example/app/billing";

/// The seed policy with its allow narrowed to the operators' group.
const OPERATORS_ONLY: &str = r#"default action = DENY
allow:
from: group("human_operators")
to: segment("db") :5432
require:
- mfa(human_operators)
deny (and alert):
from: segment("workstations")
to: segment("db")
"#;

#[tokio::test]
async fn a_policy_edit_ends_what_it_no_longer_allows_and_a_broken_one_changes_nothing(
) -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let policy = d.layout.dir.join("policy.ew");
    let (billing, billing_conn) = d.connect_watching("billing", "billing").await?;
    billing.simple_query("select 1").await?;
    let alice = d
        .connect_with_password("alice", "alice", &d.alice_code(SystemTime::now()))
        .await?;

    // A broken policy first: refused whole, logged, and billing is still served.
    let good = std::fs::read_to_string(&policy)?;
    std::fs::write(&policy, "allow:\nfrom: segment(\"nope\")\n")?;
    let refused = d
        .wait_for_decision(|l| l["event"] == "config_reload" && l["result"] == "error")
        .await?;
    assert_eq!(refused["reason"], "config_invalid");
    assert_eq!(refused["alert"], true);
    assert!(
        refused["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("policy.ew"),
        "{refused}"
    );
    billing.simple_query("select 2").await?;
    assert_still_serves(&d).await?;

    // Now a valid policy that no longer allows billing.
    std::fs::write(&policy, OPERATORS_ONLY)?;
    let changed = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), billing_conn)
        .await
        .map_err(|_| anyhow!("billing's session outlived the policy change"))??;
    let err = ended.expect_err("the proxy ended the session");
    let db = err
        .as_db_error()
        .expect("a FATAL, not a dropped connection");
    assert_eq!(db.code().code(), "57P01", "{db:?}");
    assert!(changed.elapsed() < Duration::from_secs(8));
    let end = d
        .wait_for_decision(|l| {
            l["event"] == "session_end"
                && l["spiffe_id"] == BILLING_ID
                && l["reason"] != "client_closed"
        })
        .await?;
    assert_eq!(end["reason"], "policy_changed", "{end}");
    let applied = d
        .wait_for_decision(|l| l["event"] == "config_reload" && l["result"] == "ok")
        .await?;
    assert_eq!(applied["sessions_ended"], 1, "{applied}");

    // Refused from now on; alice, still allowed, keeps her session.
    let err = d
        .connect("billing", "billing")
        .await
        .err()
        .ok_or_else(|| anyhow!("billing admitted under the new policy"))?;
    assert_eq!(err.code().map(|c| c.code()), Some("28000"));
    let row = alice.query_one("select 6 * 7", &[]).await?;
    assert_eq!(row.get::<_, i32>(0), 42);

    // And back: the original policy admits billing again.
    std::fs::write(&policy, good)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.connect("billing", "billing").await.is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the restored policy was not applied"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// The leaf certificate the proxy presents to a new TLS client.
async fn presented_leaf(d: &Deployment) -> anyhow::Result<Vec<u8>> {
    let mut tcp = tcp(d).await?;
    tcp.write_all(&ssl_request()).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    let tls = tls_over(tcp, d.tls_for("billing")?).await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| anyhow!("no server certificate"))?;
    Ok(leaf.as_ref().to_vec())
}

#[tokio::test]
async fn a_rotated_server_certificate_is_served_next_and_drops_nobody() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let (billing, billing_conn) = d.connect_watching("billing", "billing").await?;
    billing.simple_query("select 1").await?;
    let before = presented_leaf(&d).await?;

    let ca = Ca::open(&d.layout.dir.join("ca"))?;
    let mut req = IssueRequest::new(SpiffeId::parse("spiffe://corp.example/db/eastwall")?);
    req.dns = vec!["localhost".into()];
    req.ips = vec!["127.0.0.1".parse()?];
    let fresh = ca.issue(&req)?;
    let certs = d.layout.dir.join("certs");
    // Key first, then the certificate: the reload reads both.
    std::fs::write(
        certs.join("proxy.key"),
        fresh.key_pem.clone().unwrap_or_default(),
    )?;
    std::fs::write(certs.join("proxy.pem"), &fresh.cert_pem)?;
    let wanted = rustls_pki_types::pem::PemObject::from_pem_slice(fresh.cert_pem.as_bytes())
        .map(|c: rustls_pki_types::CertificateDer<'_>| c.as_ref().to_vec())
        .map_err(|e| anyhow!("{e:?}"))?;
    assert_ne!(before, wanted);

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if presented_leaf(&d).await? == wanted {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the new server certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The session opened before the rotation still runs, and nobody was dropped.
    let row = billing.query_one("select 40 + 2", &[]).await?;
    assert_eq!(row.get::<_, i32>(0), 42);
    assert!(!billing_conn.is_finished());
    assert_still_serves(&d).await
}
