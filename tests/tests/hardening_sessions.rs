//! One workload cannot take all of PostgreSQL's connections (issue 10, item 10):
//! `[limits] max_sessions_per_identity` caps the sessions one SPIFFE ID holds at once.

use std::time::Duration;

use eastwall_e2e::sidecar::{Deployment, SidecarOptions};

async fn deployment(limits: &'static str) -> anyhow::Result<Deployment> {
    Deployment::start(SidecarOptions {
        edit_config: Some(Box::new(move |text: &mut String| {
            text.push_str("\n[limits]\n");
            text.push_str(limits);
        })),
        ..SidecarOptions::default()
    })
    .await
}

#[tokio::test]
async fn one_identity_cannot_hold_more_than_its_sessions() -> anyhow::Result<()> {
    let d = deployment("max_sessions_per_identity = 2\n").await?;
    let first = d.connect("billing", "billing").await?;
    let second = d.connect("billing", "billing").await?;
    first.simple_query("select 1").await?;
    second.simple_query("select 1").await?;

    // The attack: a third, fourth... session of the same workload.
    let err = d
        .connect("billing", "billing")
        .await
        .expect_err("a third session of billing is refused");
    let db = err.as_db_error().expect("a FATAL from the proxy");
    assert_eq!(db.code().code(), "53300", "{db:?}");
    assert!(
        db.message()
            .contains("too many sessions for spiffe://corp.example/app/billing"),
        "{}",
        db.message()
    );
    let line = d
        .wait_for_decision(|l| l["reason"] == "identity_session_limit")
        .await?;
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["spiffe_id"], "spiffe://corp.example/app/billing");
    let conn_id = line["conn_id"].as_str().unwrap_or_default().to_owned();
    assert!(
        !conn_id.is_empty() && db.message().contains(&conn_id),
        "{}",
        db.message()
    );

    // The sessions it holds still work.
    first.simple_query("select 1").await?;

    // When one ends, its place comes back.
    drop(second);
    let mut again = None;
    for _ in 0..50 {
        match d.connect("billing", "billing").await {
            Ok(client) => {
                again = Some(client);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    again
        .expect("a place comes back when a session ends")
        .simple_query("select 1")
        .await?;
    Ok(())
}

#[tokio::test]
async fn absent_or_zero_means_the_default_never_unlimited() -> anyhow::Result<()> {
    let d = deployment("max_sessions_per_identity = 0\n").await?;
    assert_eq!(
        d.proxy.sidecar.settings.limits.max_sessions_per_identity,
        eastwall_config::DEFAULT_MAX_SESSIONS_PER_IDENTITY
    );
    let text = std::fs::read_to_string(&d.layout.config)?.replace(
        "max_sessions_per_identity = 0",
        "max_sessions_per_identity = -1",
    );
    std::fs::write(&d.layout.config, text)?;
    let lines = eastwall_config::Config::load(&d.layout.config)
        .expect_err("a negative limit is refused")
        .lines();
    assert!(
        lines.iter().any(|l| l.contains(":")
            && l.contains("limits.max_sessions_per_identity: expected a whole number from 0")),
        "{lines:?}"
    );
    Ok(())
}
