//! The privilege question asked on warm side connections (`[upstream] check_role`): the same
//! refusals as on the session's own backend, a grant made after the pool is warm seen by the
//! very next connection, the session's own backend no longer asked, and a check role that
//! cannot log in falling back to the session's own backend rather than admitting anyone.

mod sidecar_common;

use anyhow::anyhow;
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use sidecar_common::*;

const SIDE_APP: &str = "eastwall privilege check";

fn sql(d: &Deployment, text: &str) -> anyhow::Result<String> {
    d.cluster.run_sql(text).map_err(|e| anyhow!("{e:?}"))
}

/// A deployment whose `[upstream]` names `eastwall_check` as its check role.
async fn with_check_role() -> anyhow::Result<Deployment> {
    Deployment::start(SidecarOptions {
        edit_config: Some(Box::new(|text: &mut String| {
            *text = text.replacen(
                "[upstream]\n",
                "[upstream]\ncheck_role = \"eastwall_check\"\n",
                1,
            );
        })),
        ..SidecarOptions::default()
    })
    .await
}

async fn admitted(d: &Deployment) -> anyhow::Result<()> {
    let client = d.connect("billing", "billing").await?;
    client.simple_query("select 1").await?;
    Ok(())
}

async fn refused(d: &Deployment, needle: &str) -> anyhow::Result<()> {
    let err = d
        .connect("billing", "billing")
        .await
        .err()
        .ok_or_else(|| anyhow!("admitted although {needle}"))?;
    let db = err.as_db_error().ok_or_else(|| anyhow!("{err}"))?;
    assert_eq!(db.code().code(), "28000", "{db:?}");
    assert!(db.message().contains(needle), "{}", db.message());
    Ok(())
}

/// Backends of the check role in pg_stat_activity.
fn side_backends(d: &Deployment) -> anyhow::Result<Vec<String>> {
    let out = sql(
        d,
        &format!(
            "select pid from pg_stat_activity where usename = 'eastwall_check' \
             and application_name = '{SIDE_APP}' order by pid"
        ),
    )?;
    Ok(out.lines().map(str::to_owned).collect())
}

#[tokio::test]
async fn a_warm_side_connection_sees_every_grant_at_once() -> anyhow::Result<()> {
    let d = with_check_role().await?;
    sql(&d, "create role eastwall_check login")?;
    // Every statement PostgreSQL runs goes to its log from here on.
    sql(&d, "alter system set log_statement = 'all'")?;
    sql(&d, "select pg_reload_conf()")?;

    for _ in 0..3 {
        admitted(&d).await?;
    }
    let warm = side_backends(&d)?;
    assert_eq!(
        warm.len(),
        1,
        "sequential connections share one side connection"
    );

    // Granted after the pool is warm: the very next connection is judged by it.
    sql(&d, "grant pg_execute_server_program to billing")?;
    refused(&d, "pg_execute_server_program").await?;
    sql(&d, "revoke pg_execute_server_program from billing")?;
    admitted(&d).await?;
    sql(&d, "create role root_grp nologin superuser")?;
    sql(&d, "grant root_grp to billing")?;
    refused(&d, "member of a superuser role").await?;
    sql(&d, "revoke root_grp from billing")?;
    sql(&d, "alter role billing superuser")?;
    refused(&d, "is a superuser").await?;
    sql(&d, "alter role billing nosuperuser")?;
    admitted(&d).await?;
    assert_eq!(
        side_backends(&d)?,
        warm,
        "the same side connection answered throughout"
    );

    let refusals = with_reason(&d, "superuser_role")?;
    assert_eq!(refusals.len(), 3, "{refusals:#?}");
    assert!(refusals.iter().all(|l| l["db_user"] == "billing"));

    // The question was the prepared one, about billing by name; no session's own backend
    // asked it (that question reads `session_user`).
    let log = std::fs::read_to_string(d.cluster.log_file())?;
    assert!(
        log.contains("execute eastwall_privilege_check"),
        "no prepared privilege question in PostgreSQL's log"
    );
    assert!(
        !log.contains("pg_has_role(session_user"),
        "a session's own backend was asked although the side connection was warm"
    );
    assert_still_serves(&d).await
}

#[tokio::test]
async fn a_check_role_that_cannot_log_in_falls_back_not_open() -> anyhow::Result<()> {
    // eastwall_check does not exist: every side login fails.
    let d = with_check_role().await?;
    sql(&d, "alter system set log_statement = 'all'")?;
    sql(&d, "select pg_reload_conf()")?;
    admitted(&d).await?;
    sql(&d, "grant pg_read_server_files to billing")?;
    refused(&d, "pg_read_server_files").await?;
    sql(&d, "revoke pg_read_server_files from billing")?;
    admitted(&d).await?;
    assert!(side_backends(&d)?.is_empty());
    // Each session's own backend was asked instead.
    let log = std::fs::read_to_string(d.cluster.log_file())?;
    assert!(
        log.contains("pg_has_role(session_user"),
        "no fallback question"
    );

    // A check role that exists but may not connect to the database: the same.
    sql(&d, "create role eastwall_check login")?;
    sql(&d, "revoke connect on database postgres from public")?;
    sql(&d, "grant connect on database postgres to billing")?;
    sql(&d, "alter role billing superuser")?;
    refused(&d, "is a superuser").await?;
    sql(&d, "alter role billing nosuperuser")?;
    admitted(&d).await?;
    assert!(side_backends(&d)?.is_empty());
    Ok(())
}
