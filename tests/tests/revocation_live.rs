//! Revoking a certificate ends the live sessions that use it, not just its next handshake:
//! the stolen certificate in the seed's story stops working the moment the CRL says so.

use std::time::Duration;

use eastwall_ca::{Ca, IssueRequest, RevokeTarget, SpiffeId};
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use eastwall_e2e::{client_config, connect_with};

#[tokio::test]
async fn a_revoked_certificate_loses_its_live_session_and_others_keep_theirs() -> anyhow::Result<()>
{
    let d = Deployment::start(SidecarOptions::default()).await?;
    let ca = Ca::open(&d.layout.dir.join("ca"))?;

    // Two certificates for the billing service: the quickstart one, and a second one.
    let second = ca.issue(&IssueRequest::new(SpiffeId::parse(
        "spiffe://corp.example/app/billing",
    )?))?;
    let second_tls = client_config(
        &d.ca_pem(),
        Some((
            &second.cert_pem,
            second.key_pem.as_deref().unwrap_or_default(),
        )),
    )?;
    let (stolen, stolen_connection) = d.connect_watching("billing", "billing").await?;
    let kept = connect_with(&d.pg_config("billing", "postgres"), second_tls).await?;
    stolen.simple_query("select 1").await?;
    kept.simple_query("select 1").await?;

    // Revoke only the quickstart certificate, by its serial.
    let admitted = d
        .wait_for_decision(|l| l["event"] == "connect" && l["decision"] == "allow")
        .await?;
    let serial = admitted["cert_serial"]
        .as_str()
        .expect("a serial")
        .to_owned();
    assert_ne!(serial, second.serial_hex);
    ca.revoke(&RevokeTarget::Serial(serial.clone()))?;

    // Within a reload period its session is ended, with a reason the client can read.
    let ended = tokio::time::timeout(Duration::from_secs(10), stolen_connection)
        .await
        .expect("the revoked certificate's session ended within 10 s")?;
    let err = ended.expect_err("the proxy ended the session");
    let db = err
        .as_db_error()
        .expect("an ErrorResponse, not a dropped connection");
    assert_eq!(db.code().code(), "57P01", "{db:?}");
    assert!(db.message().contains("revoked"), "{}", db.message());
    assert!(stolen.simple_query("select 1").await.is_err());
    let end = d
        .wait_for_decision(|l| l["event"] == "session_end" && l["cert_serial"] == serial.as_str())
        .await?;
    assert_eq!(end["reason"], "revoked");

    // The other certificate's session is untouched.
    let row = kept.query_one("select 40 + 2", &[]).await?;
    assert_eq!(row.get::<_, i32>(0), 42);
    Ok(())
}
