//! Step-up is for human operators only: the billing service is never asked for a password,
//! and the workstation is denied before any MFA question, whatever password it carries.

mod mfa_common;

use std::time::SystemTime;

use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use mfa_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_identity_is_never_challenged() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    // tokio-postgres without a password fails ("password missing") if asked for one.
    let client = d.connect("billing", "billing").await?;
    let row = client.query_one("select current_user::text", &[]).await?;
    assert_eq!(row.get::<_, String>(0), "billing");
    // psql -w fails instead of prompting if asked for one.
    let out = psql(
        &d.conninfo("billing", "billing", "postgres"),
        "select current_user",
        None,
    )
    .await?;
    assert_eq!(stdout(&out).trim(), "billing", "{}", stderr(&out));

    let lines = lines_for(&d, BILLING)?;
    let allows = admissions(&lines);
    assert_eq!(allows.len(), 2, "{}", show(&lines));
    for allow in allows {
        assert!(allow.get("mfa").is_none(), "{allow}");
    }
    assert!(
        lines.iter().all(|l| l["decision"] != "challenge"),
        "{}",
        show(&lines)
    );
    assert!(mfa_lines(&lines).is_empty(), "{}", show(&lines));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workstation_is_denied_before_mfa_even_with_a_valid_code() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let code = d.alice_code(SystemTime::now());
    for role in ["finance-laptop", "alice"] {
        let err = refused(
            d.connect_with_password("finance-laptop", role, &code).await,
            &format!("the laptop refused as {role}"),
        )?;
        assert_eq!(sqlstate(&err), Some("28000"), "{err}");
    }
    let out = psql(
        &d.conninfo("finance-laptop", "alice", "postgres"),
        "select current_user",
        Some(&code),
    )
    .await?;
    assert!(!out.status.success(), "admitted: {}", stdout(&out));
    assert!(
        stderr(&out)
            .contains("access denied for spiffe://corp.example/workstations/finance-laptop"),
        "{}",
        stderr(&out)
    );

    d.wait_for_decision(|l| l["spiffe_id"] == LAPTOP && l["db_user"] == "alice")
        .await?;
    let lines = lines_for(&d, LAPTOP)?;
    assert_eq!(lines.len(), 3, "{}", show(&lines));
    for line in &lines {
        assert_eq!(line["event"], "connect", "{line}");
        assert_eq!(line["decision"], "deny", "{line}");
        assert_eq!(line["alert"], true, "{line}");
    }
    // The laptop spent nothing of alice's: the same code still admits her.
    let out = psql(
        &d.conninfo("alice", "alice", "postgres"),
        "select current_user",
        Some(&code),
    )
    .await?;
    assert_eq!(stdout(&out).trim(), "alice", "{}", stderr(&out));
    Ok(())
}
