//! The token flow: `eastwall mfa login` trades a TOTP code for a step-up token, which then
//! admits every connection of `pg_dump -j 4` — but only with the certificate it was issued
//! to, and only until `max_age`.

mod mfa_common;

use std::time::{Duration, Instant, SystemTime};

use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use mfa_common::*;

fn stepup_url(d: &Deployment) -> anyhow::Result<String> {
    let addr = d
        .proxy
        .stepup_addr
        .ok_or_else(|| anyhow::anyhow!("the fixture starts the step-up endpoint"))?;
    Ok(format!("https://localhost:{}/v1/stepup", addr.port()))
}

/// `eastwall mfa login` arguments for alice, without `--code`.
async fn login_args(d: &Deployment) -> anyhow::Result<Vec<String>> {
    let alice = d
        .layout
        .identity("alice")
        .ok_or_else(|| anyhow::anyhow!("quickstart issues alice"))?;
    let bin = eastwall_bin().await?;
    Ok([
        bin.to_str().unwrap_or_default(),
        "mfa",
        "login",
        "--url",
        &stepup_url(d)?,
        "--cert",
        alice.cert.to_str().unwrap_or_default(),
        "--key",
        alice.key.to_str().unwrap_or_default(),
        "--ca",
        d.layout.ca_cert.to_str().unwrap_or_default(),
    ]
    .map(str::to_owned)
    .to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_runs_pg_dump_with_four_jobs_and_only_with_its_certificate() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    d.cluster.run_sql(
        "create table t_alice(x int); alter table t_alice owner to alice; \
         insert into t_alice select generate_series(1,1000)",
    )?;

    let args = login_args(&d).await?;
    let mut login = libpq_command(&args[0]);
    login
        .args(&args[1..])
        .args(["--code", &d.alice_code(SystemTime::now())]);
    let out = output(login).await?;
    assert!(out.status.success(), "mfa login failed: {}", stderr(&out));
    // Only the token, so `export PGPASSWORD=$(eastwall mfa login ...)` works.
    let printed = stdout(&out);
    let token = printed.trim_end_matches('\n');
    assert!(
        !token.is_empty() && !token.contains(char::is_whitespace),
        "{printed:?}"
    );
    assert!(
        token.starts_with(eastwall::mfa::TOKEN_PREFIX),
        "{printed:?}"
    );
    let line = d
        .wait_for_decision(|l| l["spiffe_id"] == ALICE && l["event"] == "stepup")
        .await?;
    assert_eq!(line["decision"], "allow", "{line}");

    let dump = d.dir.path().join("dump");
    let mut pg_dump = libpq_command("pg_dump");
    pg_dump
        .args(["-j", "4", "-Fd", "-f"])
        .arg(&dump)
        .args(["-d", &d.conninfo("alice", "alice", "postgres")])
        .env("PGPASSWORD", token);
    let out = output(pg_dump).await?;
    assert!(out.status.success(), "pg_dump failed: {}", stderr(&out));
    let mut pg_restore = libpq_command("pg_restore");
    pg_restore.arg("-l").arg(&dump);
    let out = output(pg_restore).await?;
    assert!(
        stdout(&out).contains("TABLE DATA public t_alice alice"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );

    let lines = lines_for(&d, ALICE)?;
    let allows = admissions(&lines);
    // The leader and its four workers.
    assert!(allows.len() >= 5, "{}", show(&lines));
    for allow in &allows {
        assert_eq!(allow["mfa"], "token", "{allow}");
        assert!(
            allow["mfa_age_s"].as_u64().is_some_and(|a| a < 300),
            "{allow}"
        );
    }
    assert!(mfa_lines(&lines).is_empty(), "{}", show(&lines));

    // Another certificate for the same SPIFFE ID cannot use it...
    let other = issue_cert(&d, ALICE, "alice-second")?;
    let err = refused(
        connect_as(&d, &other, "alice", Some(token)).await?,
        "a token is bound to its certificate",
    )?;
    assert_eq!(sqlstate(&err), Some("28P01"), "{err}");
    let line = d
        .wait_for_decision(|l| l["reason"] == "mfa_token_other_cert")
        .await?;
    assert_eq!(line["spiffe_id"], ALICE, "{line}");
    assert_eq!(line["event"], "mfa_failure", "{line}");
    // ...while the one it was issued to still can.
    let client = d.connect_with_password("alice", "alice", token).await?;
    let row = client
        .query_one("select count(*) from t_alice", &[])
        .await?;
    assert_eq!(row.get::<_, i64>(0), 1000);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_refused_after_max_age() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions {
        edit_config: Some(Box::new(|toml: &mut String| {
            *toml = toml.replace("max_age = \"5m\"", "max_age = \"3s\"");
        })),
        ..SidecarOptions::default()
    })
    .await?;

    // Without --code, `mfa login` asks for it on the terminal.
    let args = login_args(&d).await?;
    let command_line = args
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    let run = on_terminal(&command_line, "MFA code:", || {
        d.alice_code(SystemTime::now())
    })
    .await?;
    let issued = Instant::now();
    assert!(run.prompted && run.success, "{}", run.screen);
    let token = run
        .screen
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(eastwall::mfa::TOKEN_PREFIX))
        .ok_or_else(|| anyhow::anyhow!("no token on screen:\n{}", run.screen))?
        .to_owned();
    assert!(
        !run.screen.contains(&d.alice_code(SystemTime::now())),
        "the code was echoed:\n{}",
        run.screen
    );

    let client = d.connect_with_password("alice", "alice", &token).await?;
    drop(client);

    // Ctrl-C at the prompt cancels it and leaves the terminal as it was: echo and line
    // editing back on (`stty` lists only the settings that differ from sane ones).
    let cancelled = on_terminal(&format!("{command_line}; stty"), "MFA code:", || {
        "\u{3}".to_owned()
    })
    .await?;
    assert!(
        cancelled
            .screen
            .contains("cancelled at the MFA code prompt"),
        "{}",
        cancelled.screen
    );
    assert!(
        !cancelled.screen.contains("-echo") && !cancelled.screen.contains("-icanon"),
        "the terminal was left without echo:\n{}",
        cancelled.screen
    );

    tokio::time::sleep(Duration::from_secs(4).saturating_sub(issued.elapsed())).await;
    let err = refused(
        d.connect_with_password("alice", "alice", &token).await,
        "an expired token is refused",
    )?;
    assert_eq!(sqlstate(&err), Some("28P01"), "{err}");
    let line = d
        .wait_for_decision(|l| l["reason"] == "mfa_expired_token")
        .await?;
    assert_eq!(line["spiffe_id"], ALICE, "{line}");
    Ok(())
}
