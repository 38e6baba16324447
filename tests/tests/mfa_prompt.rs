//! An operator steps up with plain psql at a terminal: prompted, types the code, gets a
//! shell; and a client that insists on channel binding refuses the prompt instead.

mod mfa_common;

use std::time::SystemTime;

use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use mfa_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_prompts_the_operator_and_admits_the_typed_code() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let conninfo = d.conninfo("alice", "alice", "postgres");

    let run = psql_on_terminal(&conninfo, "select current_user", || {
        d.alice_code(SystemTime::now())
    })
    .await?;

    assert!(
        run.prompted,
        "psql never asked for a password:\n{}",
        run.screen
    );
    assert!(
        run.screen.contains("Password for user alice:"),
        "{}",
        run.screen
    );
    assert!(run.success, "psql failed:\n{}", run.screen);
    // The result table, not the prompt (which also names alice).
    let after_prompt = run
        .screen
        .split("Password for user alice:")
        .nth(1)
        .unwrap_or("");
    assert!(
        after_prompt.lines().any(|l| l.trim() == "alice") && after_prompt.contains("(1 row)"),
        "no current_user row in:\n{}",
        run.screen
    );

    // psql's first connection ended at the prompt: one challenge line, not a failure.
    d.wait_for_decision(|l| l["spiffe_id"] == ALICE && l["event"] == "mfa_challenge")
        .await?;
    let lines = lines_for(&d, ALICE)?;
    let challenges: Vec<_> = lines
        .iter()
        .filter(|l| l["decision"] == "challenge")
        .collect();
    assert_eq!(challenges.len(), 1, "{}", show(&lines));
    assert_eq!(challenges[0]["event"], "mfa_challenge", "{}", show(&lines));
    let allows = admissions(&lines);
    assert_eq!(allows.len(), 1, "{}", show(&lines));
    assert_eq!(allows[0]["mfa"], "totp", "{}", show(&lines));
    assert_eq!(allows[0]["mfa_age_s"], 0, "{}", show(&lines));
    assert_eq!(allows[0]["db_user"], "alice", "{}", show(&lines));
    assert!(
        lines.iter().all(|l| l["decision"] != "deny"),
        "a failure was logged:\n{}",
        show(&lines)
    );
    Ok(())
}

/// libpq with `channel_binding=require` will not answer a cleartext password request, so an
/// MFA operator cannot use it; the guide tells them so, with this message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_require_refuses_the_prompt() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let conninfo = format!(
        "{} channel_binding=require",
        d.conninfo("alice", "alice", "postgres")
    );
    let out = psql(
        &conninfo,
        "select current_user",
        Some(&d.alice_code(SystemTime::now())),
    )
    .await?;
    assert!(!out.status.success(), "admitted:\n{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains(
            "channel binding required but not supported by server's authentication request"
        ),
        "{err}"
    );

    // The code was never sent: nothing was admitted or failed, and it still works.
    d.wait_for_decision(|l| l["spiffe_id"] == ALICE && l["event"] == "mfa_challenge")
        .await?;
    let lines = lines_for(&d, ALICE)?;
    assert!(admissions(&lines).is_empty(), "{}", show(&lines));
    assert!(
        lines.iter().all(|l| l["decision"] != "deny"),
        "{}",
        show(&lines)
    );
    let out = psql(
        &d.conninfo("alice", "alice", "postgres"),
        "select current_user",
        Some(&d.alice_code(SystemTime::now())),
    )
    .await?;
    assert_eq!(stdout(&out).trim(), "alice", "{}", stderr(&out));
    Ok(())
}
