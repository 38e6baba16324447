//! The proxy logs in to PostgreSQL itself, in each of the three ways it can (trust, SCRAM
//! with a secret it holds, a client certificate from our CA), and survives PostgreSQL going
//! away and coming back.

mod sidecar_common;

use std::time::Duration;

use eastwall::quickstart::UpstreamAuth;
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use sidecar_common::assert_still_serves;

async fn deployment(auth: UpstreamAuth) -> anyhow::Result<Deployment> {
    Deployment::start(SidecarOptions {
        upstream_auth: auth,
        ..SidecarOptions::default()
    })
    .await
}

/// billing is admitted and PostgreSQL saw the login the mode implies.
async fn billing_session_facts(d: &Deployment) -> anyhow::Result<(String, bool, String)> {
    let client = d.connect("billing", "billing").await?;
    let row = client
        .query_one(
            "select current_user::text, \
                    coalesce((select ssl from pg_stat_ssl where pid = pg_backend_pid()), false), \
                    coalesce((select client_dn from pg_stat_ssl where pid = pg_backend_pid()), '')",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1), row.get(2)))
}

#[tokio::test]
async fn trust_login() -> anyhow::Result<()> {
    let d = deployment(UpstreamAuth::Trust).await?;
    let (user, ssl, _) = billing_session_facts(&d).await?;
    assert_eq!((user.as_str(), ssl), ("billing", false));
    Ok(())
}

#[tokio::test]
async fn password_login_with_scram() -> anyhow::Result<()> {
    let d = deployment(UpstreamAuth::Password).await?;
    let (user, _, _) = billing_session_facts(&d).await?;
    assert_eq!(user, "billing");
    // PostgreSQL only accepts SCRAM from 127.0.0.1 here (the fixture's pg_hba), so the
    // session existing is the proof; the verifier stored for the role is SCRAM too.
    let stored = d
        .cluster
        .run_sql(
            "select rolpassword like 'SCRAM-SHA-256$%' from pg_authid where rolname = 'billing'",
        )
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(stored.trim(), "t");
    Ok(())
}

#[tokio::test]
async fn cert_login_over_tls() -> anyhow::Result<()> {
    let d = deployment(UpstreamAuth::Cert).await?;
    let (user, ssl, dn) = billing_session_facts(&d).await?;
    assert_eq!((user.as_str(), ssl), ("billing", true));
    assert!(dn.contains("CN=billing"), "{dn}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopping_and_returning() -> anyhow::Result<()> {
    let mut d = deployment(UpstreamAuth::Trust).await?;
    let existing = d.connect("billing", "billing").await?;
    let sleeper = tokio::spawn(async move { existing.simple_query("select pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;

    tokio::task::block_in_place(|| d.cluster.stop()).map_err(|e| anyhow::anyhow!("{e:?}"))?;

    // The session in flight hears PostgreSQL's own shutdown error, unchanged.
    let err = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await??
        .expect_err("the session ends with the server");
    assert_eq!(err.code().map(|c| c.code()), Some("57P01"), "{err}");

    // New clients are told the upstream is down; the proxy itself stays up.
    for _ in 0..2 {
        let err = d
            .connect("billing", "billing")
            .await
            .expect_err("no upstream");
        let db = err.as_db_error().expect("a FATAL from the proxy");
        assert_eq!(db.code().code(), "08006", "{db:?}");
        assert!(db.message().contains("unreachable"), "{db:?}");
    }
    let line = d
        .wait_for_decision(|l| l["reason"] == "upstream_login_failed")
        .await?;
    assert_eq!(line["decision"], "deny");

    tokio::task::block_in_place(|| d.cluster.start_again())
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_still_serves(&d).await?;

    // The ended session was logged with how it ended.
    let ends = d
        .decisions()?
        .into_iter()
        .filter(|l| l["event"] == "session_end")
        .count();
    assert!(ends >= 1);
    Ok(())
}
