//! Sessions the proxy ends itself: `[mfa] max_session` ends an operator's session when its MFA
//! assertion is too old, `[limits] idle_timeout` ends a quiet one; both with FATAL 57P01 at a
//! message boundary, and the decision log says why. Services are not bound by max_session.

use std::time::{Duration, SystemTime};

use eastwall_e2e::sidecar::{Deployment, SidecarOptions};

fn with_max_session(text: &mut String) {
    *text = text.replace("max_age = \"5m\"", "max_age = \"5m\"\nmax_session = \"2s\"");
}

#[tokio::test]
async fn operator_session_ends_at_max_session_and_says_why() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions {
        edit_config: Some(Box::new(with_max_session)),
        ..SidecarOptions::default()
    })
    .await?;
    let alice = d
        .connect_with_password("alice", "alice", &d.alice_code(SystemTime::now()))
        .await?;
    alice.simple_query("select 1").await?;
    // A long result streaming when the deadline passes must still end on a whole message.
    let err = alice
        .simple_query("select pg_sleep(3), repeat('x', 100000)")
        .await
        .expect_err("the session is ended");
    let db = err
        .as_db_error()
        .expect("an ErrorResponse, not a torn stream");
    assert_eq!(db.code().code(), "57P01", "{db:?}");
    assert!(db.message().contains("max_session"), "{}", db.message());

    let end = d
        .wait_for_decision(|l| l["event"] == "session_end" && l["db_user"] == "alice")
        .await?;
    assert_eq!(end["reason"], "max_session");
    Ok(())
}

#[tokio::test]
async fn service_sessions_are_not_bound_by_max_session() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions {
        edit_config: Some(Box::new(with_max_session)),
        ..SidecarOptions::default()
    })
    .await?;
    let billing = d.connect("billing", "billing").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let row = billing.query_one("select 40 + 2", &[]).await?;
    assert_eq!(row.get::<_, i32>(0), 42);
    Ok(())
}

#[tokio::test]
async fn idle_sessions_end_with_57p01_and_a_logged_reason() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions {
        edit_config: Some(Box::new(|text: &mut String| {
            text.push_str("\n[limits]\nidle_timeout = \"1s\"\n");
        })),
        ..SidecarOptions::default()
    })
    .await?;
    let (billing, connection) = d.connect_watching("billing", "billing").await?;
    // Busy for longer than the idle timeout: not ended.
    for _ in 0..6 {
        billing.simple_query("select 1").await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the idle session was ended")?;
    let err = ended.expect_err("the proxy ended the session");
    let db = err
        .as_db_error()
        .expect("an ErrorResponse, not a dropped connection");
    assert_eq!(db.code().code(), "57P01", "{db:?}");
    assert!(db.message().contains("idle"), "{}", db.message());
    assert!(billing.simple_query("select 1").await.is_err());
    let end = d
        .wait_for_decision(|l| l["event"] == "session_end" && l["db_user"] == "billing")
        .await?;
    assert_eq!(end["reason"], "idle_timeout");
    Ok(())
}
