//! The step-up endpoint follows the sidecar's CRL reloads: once an operator's certificate is
//! revoked it can no longer fetch step-up tokens, without a restart.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use eastwall_ca::{Ca, RevokeTarget, SpiffeId};
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};

#[tokio::test]
async fn a_revoked_operator_certificate_cannot_fetch_a_token() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let addr = d
        .proxy
        .stepup_addr
        .expect("the quickstart layout has a step-up endpoint");
    let url = format!("https://localhost:{}/v1/stepup", addr.port());
    let tls = Arc::new(d.tls_for("alice")?);

    // Before: alice's code buys a token.
    let code = d.alice_code(SystemTime::now());
    let token =
        eastwall::stepup::fetch_token(&url, tls.clone(), &code, Duration::from_secs(10)).await?;
    assert!(token.token.starts_with("ewst1."));

    // Revoke every certificate issued to alice; the sidecar reloads its TLS files within 2 s.
    let ca = Ca::open(&d.layout.dir.join("ca"))?;
    let revoked = ca.revoke(&RevokeTarget::Id(SpiffeId::parse(
        "spiffe://corp.example/app/operators/alice",
    )?))?;
    assert!(!revoked.is_empty());

    // Until the reload, TLS still admits alice and the HTTP layer answers (here 401: the same
    // code twice is a replay). After it, the handshake itself refuses her.
    let mut refused = None;
    for _ in 0..50 {
        let code = d.alice_code(SystemTime::now());
        match eastwall::stepup::fetch_token(&url, tls.clone(), &code, Duration::from_secs(10)).await
        {
            Err(eastwall::stepup::StepUpError::Refused { .. }) | Ok(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(err) => {
                refused = Some(err);
                break;
            }
        }
    }
    let err = refused.expect("the endpoint refused the revoked certificate within 10 s");
    assert!(
        format!("{err:?}").to_lowercase().contains("revoked"),
        "expected the TLS alert certificate_revoked, got {err:?}"
    );
    Ok(())
}
