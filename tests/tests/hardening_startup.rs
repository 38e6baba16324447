//! Startup parameters and roles, attacked as the hostile review did: superuser reached through
//! `options=-c role=…` or a bare `role` parameter, superuser-equivalence through role
//! membership, names PostgreSQL truncates past an exact-name deny, and an operator's role
//! reached without MFA through a look-alike identity.

mod sidecar_common;

use std::time::Duration;

use anyhow::anyhow;
use eastwall_ca::{Ca, IssueRequest, SpiffeId};
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use eastwall_e2e::{client_config, connect_with};
use sidecar_common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn sql(d: &Deployment, text: &str) -> anyhow::Result<String> {
    d.cluster.run_sql(text).map_err(|e| anyhow!("{e:?}"))
}

/// Opens TLS as billing and sends a StartupMessage with `params`; returns the first message.
async fn raw_startup(d: &Deployment, params: &[(&str, &str)]) -> anyhow::Result<Msg> {
    let mut tcp = tcp(d).await?;
    tcp.write_all(&ssl_request()).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    assert_eq!(answer[0], b'S');
    let tls = tls_over(tcp, d.tls_for("billing")?).await?;
    let mut reader = MsgReader::new(tls);
    reader
        .send(&startup_with_version(0x0003_0000, params))
        .await?;
    reader
        .next_within(Duration::from_secs(10))
        .await?
        .ok_or_else(|| anyhow!("closed without a reply"))
}

/// billing is a superuser that may SET ROLE to a harmless role: the review's setup.
fn make_billing_a_superuser_with_a_harmless_role(d: &Deployment) -> anyhow::Result<()> {
    sql(d, "create role reporter nologin")?;
    sql(d, "grant reporter to billing")?;
    sql(d, "alter role billing superuser")?;
    Ok(())
}

#[tokio::test]
async fn options_role_cannot_hide_a_superuser() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    make_billing_a_superuser_with_a_harmless_role(&d)?;

    for options in ["-c role=reporter", "--role=reporter", "-c ROLE=reporter"] {
        let mut config = d.pg_config("billing", "postgres");
        config.options(options);
        let err = connect_with(&config, d.tls_for("billing")?)
            .await
            .err()
            .ok_or_else(|| anyhow!("{options}: admitted a superuser behind SET ROLE"))?;
        let db = err.as_db_error().expect("a FATAL from the proxy");
        assert_eq!(db.code().code(), "28000", "{options}: {db:?}");
        assert!(
            db.message().to_lowercase().contains("\"role\""),
            "{options}: {}",
            db.message()
        );
    }
    let refused = with_reason(&d, "startup_parameter_refused")?;
    assert_eq!(refused.len(), 3, "{refused:#?}");
    assert_eq!(refused[0]["db_user"], "billing");

    // Without the trick, the superuser is refused by the catalog check.
    let err = d
        .connect("billing", "billing")
        .await
        .err()
        .ok_or_else(|| anyhow!("superuser admitted"))?;
    assert_eq!(err.code().map(|c| c.code()), Some("28000"));
    assert_eq!(with_reason(&d, "superuser_role")?.len(), 1);
    // Nobody is logged in upstream as billing, and nothing was ever allowed.
    assert!(d.decisions()?.iter().all(|l| l["decision"] != "allow"));
    Ok(())
}

#[tokio::test]
async fn bare_role_and_session_authorization_parameters_are_refused() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    make_billing_a_superuser_with_a_harmless_role(&d)?;
    for (name, value) in [
        ("role", "reporter"),
        ("session_authorization", "reporter"),
        ("Role", "reporter"),
        ("local_preload_libraries", "x"),
    ] {
        let msg = raw_startup(
            &d,
            &[("user", "billing"), ("database", "postgres"), (name, value)],
        )
        .await?;
        assert_eq!(msg.tag, b'E', "{name}: {msg:?}");
        assert_eq!(msg.field(b'C').as_deref(), Some("28000"), "{name}");
        let text = msg.field(b'M').unwrap_or_default();
        assert!(text.contains(name), "{name}: {text}");
    }
    assert_still_serves_after_revert(&d).await
}

async fn assert_still_serves_after_revert(d: &Deployment) -> anyhow::Result<()> {
    sql(d, "alter role billing nosuperuser")?;
    assert_still_serves(d).await
}

#[tokio::test]
async fn membership_in_server_file_roles_or_a_superuser_role_is_superuser() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    sql(&d, "create role ops_grp nologin")?;
    sql(&d, "create role root_grp nologin superuser")?;
    let cases = [
        (
            "grant pg_execute_server_program to billing",
            "pg_execute_server_program",
            "revoke pg_execute_server_program from billing",
        ),
        (
            "grant pg_read_server_files to billing",
            "pg_read_server_files",
            "revoke pg_read_server_files from billing",
        ),
        // Transitively, through a group that holds the predefined role.
        (
            "grant pg_write_server_files to ops_grp; grant ops_grp to billing",
            "pg_write_server_files",
            "revoke ops_grp from billing",
        ),
        // A NOINHERIT member of a superuser role can still SET ROLE to it.
        (
            "alter role billing noinherit; grant root_grp to billing",
            "superuser role",
            "revoke root_grp from billing; alter role billing inherit",
        ),
        // The hostile review's finding: CREATEROLE through a group, then SET ROLE and GRANT.
        (
            "create role admins nologin createrole; grant admins to billing",
            "CREATEROLE",
            "revoke admins from billing",
        ),
        // pg_authid's password hashes.
        (
            "grant pg_read_all_data to billing",
            "pg_read_all_data",
            "revoke pg_read_all_data from billing",
        ),
        // archive_command runs as the OS user postgres.
        (
            "grant alter system on parameter archive_command to billing",
            "ALTER SYSTEM",
            "revoke alter system on parameter archive_command from billing",
        ),
        // session_preload_libraries loads a library of the user's choosing as postgres.
        (
            "grant set on parameter session_preload_libraries to billing",
            "SET on a parameter only superusers may set (session_preload_libraries)",
            "revoke set on parameter session_preload_libraries from billing",
        ),
        // lo_export writes any file as postgres.
        (
            "grant execute on function lo_export(oid, text) to billing",
            "built-in",
            "revoke execute on function lo_export(oid, text) from billing",
        ),
        (
            "alter role billing replication",
            "REPLICATION",
            "alter role billing noreplication",
        ),
    ];
    for (grant, why, revoke) in cases {
        sql(&d, grant)?;
        let err = d
            .connect("billing", "billing")
            .await
            .err()
            .ok_or_else(|| anyhow!("admitted after: {grant}"))?;
        let db = err.as_db_error().expect("a FATAL from the proxy");
        assert_eq!(db.code().code(), "28000", "{grant}");
        assert!(db.message().contains(why), "{grant}: {}", db.message());
        sql(&d, revoke)?;
        assert_still_serves(&d).await?;
    }
    // SET on a parameter any role may set anyway changes nothing.
    sql(&d, "grant set on parameter work_mem to billing")?;
    assert_still_serves(&d).await?;
    // The session the catalog check used was closed: no backend is left for billing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = sql(
        &d,
        "select count(*) from pg_stat_activity where usename = 'billing' and state <> 'idle'",
    )?;
    assert_eq!(left.trim(), "0");
    Ok(())
}

#[tokio::test]
async fn a_search_path_cannot_fool_the_catalog_check() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    // billing plants look-alikes of everything the check uses, first on its search_path.
    sql(&d, "create schema evil authorization billing")?;
    sql(&d, "create view evil.pg_roles as select rolname, false as rolsuper, false as rolcreaterole, oid from pg_catalog.pg_roles")?;
    sql(&d, "create function evil.pg_has_role(name, oid, text) returns bool language sql as 'select false'")?;
    sql(&d, "alter role billing set search_path = evil, pg_catalog")?;
    sql(&d, "grant pg_execute_server_program to billing")?;
    let mut config = d.pg_config("billing", "postgres");
    config.options("-c search_path=evil,pg_catalog");
    let err = connect_with(&config, d.tls_for("billing")?)
        .await
        .err()
        .ok_or_else(|| anyhow!("the planted catalog fooled the check"))?;
    assert_eq!(err.code().map(|c| c.code()), Some("28000"), "{err}");
    Ok(())
}

#[tokio::test]
async fn session_formatting_settings_still_reach_postgresql() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    // What pg_regress's sessions send, through PGOPTIONS and libpq's environment.
    let conninfo = d.conninfo("billing", "billing", "postgres");
    let mut cmd = tokio::process::Command::new(pg_binary("psql"));
    cmd.args([&conninfo, "-XAtc", "show datestyle; show timezone; show intervalstyle; show search_path; show application_name"])
        .env("PGOPTIONS", "-c intervalstyle=postgres_verbose -c search_path=public,pg_catalog")
        .env("PGDATESTYLE", "Postgres, MDY")
        .env("PGTZ", "PST8PDT")
        .env("PGAPPNAME", "pg_regress/strings")
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output()).await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines: Vec<&str> = stdout.lines().collect();
    // The client's application_name goes first, and the sidecar adds its connection tag.
    let app = lines.pop().unwrap_or_default();
    assert!(app.starts_with("pg_regress/strings ew:"), "{app}");
    assert_eq!(
        lines,
        [
            "Postgres, MDY",
            "PST8PDT",
            "postgres_verbose",
            "public,pg_catalog",
        ]
    );

    // psql with a forbidden PGOPTIONS sees the parameter named.
    let mut cmd = tokio::process::Command::new(pg_binary("psql"));
    cmd.args([&conninfo, "-XAtc", "select 1"])
        .env("PGOPTIONS", "-c session_authorization=postgres")
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output()).await??;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("session_authorization"), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn names_postgresql_would_truncate_are_refused() -> anyhow::Result<()> {
    let denied = "d".repeat(63);
    let deny =
        format!("\ndeny:\nfrom: segment(\"app\")\nto: segment(\"db\")\ndatabase: \"{denied}\"\n");
    let d = Deployment::start(SidecarOptions {
        edit_config: None,
        ..SidecarOptions::default()
    })
    .await?;
    let policy = d.layout.dir.join("policy.ew");
    let mut text = std::fs::read_to_string(&policy)?;
    text.push_str(&deny);
    std::fs::write(&policy, text)?;
    // Restart the sidecar on the edited policy (policy reload is a later issue). The first
    // one still runs: the second needs its own admin socket.
    let toml = std::fs::read_to_string(&d.layout.config)?;
    anyhow::ensure!(
        toml.contains("[admin]\n"),
        "quickstart writes an [admin] table"
    );
    let toml = toml.replacen("[admin]\n", "[admin]\nsocket = \"restarted.sock\"\n", 1);
    std::fs::write(&d.layout.config, toml)?;
    let config = eastwall_config::Config::load(&d.layout.config).map_err(|e| anyhow!("{e:?}"))?;
    let proxy = eastwall::server::start(config).await?;
    sql(&d, &format!("create database \"{denied}\""))?;

    let port = proxy.local_addr.port();
    let connect = |db: String| {
        let mut config = eastwall_e2e::pg_config("localhost", port, "billing", &db);
        config.ssl_mode(tokio_postgres::config::SslMode::Require);
        let tls = d.tls_for("billing").expect("billing");
        async move { connect_with(&config, tls).await }
    };
    // The exact name is denied by the rule.
    let err = connect(denied.clone())
        .await
        .err()
        .ok_or_else(|| anyhow!("denied db admitted"))?;
    assert_eq!(err.code().map(|c| c.code()), Some("28000"));
    // One more byte used to slip past the rule and land in the same database.
    let err = connect(format!("{denied}x"))
        .await
        .err()
        .ok_or_else(|| anyhow!("a 64-byte name reached the denied database"))?;
    let db = err.as_db_error().expect("a FATAL from the proxy");
    assert_eq!(db.code().code(), "28000");
    assert!(db.message().contains("64 bytes"), "{}", db.message());
    let long_user = format!("{}x", "b".repeat(63));
    assert!(connect_user(&d, port, &long_user).await.is_err());
    let lines = eastwall_e2e::sidecar::read_decisions(&d.decision_log())?;
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["reason"] == "name_too_long")
            .count(),
        2
    );
    proxy.shutdown().await;
    Ok(())
}

async fn connect_user(
    d: &Deployment,
    port: u16,
    user: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = eastwall_e2e::pg_config("localhost", port, user, "postgres");
    config.ssl_mode(tokio_postgres::config::SslMode::Require);
    connect_with(&config, d.tls_for("billing").expect("billing")).await
}

#[tokio::test]
async fn an_operators_role_is_not_reachable_through_a_lookalike_identity() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    // app/alice is in segment app, like billing, but not in human_operators.
    let ca = Ca::open(&d.layout.dir.join("ca"))?;
    let lookalike = ca.issue(&IssueRequest::new(SpiffeId::parse(
        "spiffe://corp.example/app/alice",
    )?))?;
    let tls = client_config(
        &d.ca_pem(),
        Some((
            &lookalike.cert_pem,
            lookalike.key_pem.as_deref().unwrap_or_default(),
        )),
    )?;
    let err = connect_with(&d.pg_config("alice", "postgres"), tls)
        .await
        .err()
        .ok_or_else(|| anyhow!("app/alice became role alice without MFA"))?;
    let db = err.as_db_error().expect("a FATAL from the proxy");
    assert_eq!(db.code().code(), "28000");
    let line = d
        .wait_for_decision(|l| l["spiffe_id"] == "spiffe://corp.example/app/alice")
        .await?;
    assert_eq!(line["decision"], "deny");
    assert!(
        line["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("protected by mfa(human_operators)"),
        "{line}"
    );

    // `policy check` tells the author about the gap.
    let out = std::process::Command::new(eastwall_e2e::eastwall_bin()?)
        .args(["policy", "check", "--config"])
        .arg(&d.layout.config)
        .output()?;
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: role \"alice\" is protected"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn a_member_of_an_mfa_protected_role_cannot_skip_mfa() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    // alice is an enrolled operator, so role alice is MFA-protected; billing, a member of it,
    // could SET ROLE alice without ever stepping up.
    sql(&d, "grant alice to billing")?;
    let err = d
        .connect("billing", "billing")
        .await
        .err()
        .ok_or_else(|| anyhow!("billing admitted while it can become alice"))?;
    let db = err.as_db_error().expect("a FATAL from the proxy");
    assert_eq!(db.code().code(), "28000");
    assert!(db.message().contains("alice"), "{}", db.message());
    assert_eq!(with_reason(&d, "mfa_protected_role")?.len(), 1);
    sql(&d, "revoke alice from billing")?;
    assert_still_serves(&d).await
}
