//! A lock reaches live sessions, not only the step-up endpoint: `eastwall lock add --id
//! PATTERN` ends that identity's live psql session within an upkeep tick (2 s) with FATAL
//! 57P01 and the lock's message, refuses its next connection with 28000, leaves other
//! identities' sessions alone, survives a sidecar restart, and lifts at its TTL.

mod mfa_common;

use std::time::{Duration, Instant};

use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use mfa_common::*;

const BILLING_ID: &str = "spiffe://corp.example/app/billing";

async fn lock(d: &Deployment, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new(eastwall_bin().await?);
    cmd.arg("lock")
        .arg(args[0])
        .arg("--config")
        .arg(&d.layout.config)
        .args(&args[1..]);
    let out = output(cmd).await?;
    anyhow::ensure!(
        out.status.success(),
        "eastwall lock {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    // `lock add` prints the new lock's id (the first word of hex on its line).
    Ok(stdout
        .split(|c: char| !c.is_ascii_hexdigit())
        .find(|w| w.len() == 8)
        .unwrap_or_default()
        .to_owned())
}

#[tokio::test]
async fn a_lock_ends_the_live_session_refuses_the_next_and_spares_others() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    // The stolen billing certificate in use: a psql session sleeping in a query.
    let conninfo = d.conninfo("billing", "billing", "postgres");
    let mut psql = libpq_command("psql");
    psql.args([
        "-X",
        "-w",
        "-At",
        "-d",
        &conninfo,
        "-c",
        "select pg_sleep(60)",
    ])
    .kill_on_drop(true)
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let psql = psql.spawn()?;
    // alice's own session (another identity) stays: she steps up with a code first.
    let alice = d
        .connect_with_password(
            "alice",
            "alice",
            &d.alice_code(std::time::SystemTime::now()),
        )
        .await?;
    d.wait_for_decision(|l| {
        l["event"] == "connect" && l["decision"] == "allow" && l["spiffe_id"] == BILLING_ID
    })
    .await?;

    let id = lock(
        &d,
        &[
            "add",
            "--id",
            "spiffe://corp.example/app/billing",
            "--message",
            "incident 4711: stolen billing cert",
        ],
    )
    .await?;
    anyhow::ensure!(!id.is_empty(), "lock add printed an id");
    let added = Instant::now();

    let out = tokio::time::timeout(Duration::from_secs(10), psql.wait_with_output()).await??;
    let took = added.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "psql was cut off");
    assert!(stderr.contains("incident 4711"), "{stderr}");
    assert!(stderr.contains("terminating connection"), "{stderr}");
    let end = d
        .wait_for_decision(|l| l["event"] == "session_end" && l["spiffe_id"] == BILLING_ID)
        .await?;
    assert_eq!(end["reason"], "locked", "{end}");
    assert_eq!(end["lock_id"], id.as_str(), "{end}");
    // Within the 2 s tick plus the bounded end, however the test machine is loaded.
    assert!(took < Duration::from_secs(8), "the lock took {took:?}");

    // The next connection is refused with the lock's message.
    let err = d
        .connect("billing", "billing")
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("a locked identity connected"))?;
    let db = err.as_db_error().expect("a FATAL from the proxy");
    assert_eq!(db.code().code(), "28000");
    assert!(db.message().contains("incident 4711"), "{}", db.message());
    let refused = d
        .wait_for_decision(|l| l["event"] == "connect" && l["reason"] == "locked")
        .await?;
    assert_eq!(refused["lock_id"], id.as_str());

    // alice was never touched.
    let row = alice.query_one("select 6 * 7", &[]).await?;
    assert_eq!(row.get::<_, i32>(0), 42);

    // Lifted: billing is served again.
    lock(&d, &["remove", &id]).await?;
    d.wait_for_decision(|l| l["event"] == "lock" && l["action"] == "removed")
        .await?;
    let client = d.connect("billing", "billing").await?;
    client.simple_query("select 1").await?;
    Ok(())
}

#[tokio::test]
async fn a_lock_survives_a_restart_and_lifts_at_its_ttl() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let id = lock(
        &d,
        &[
            "add",
            "--id",
            "spiffe://corp.example/app/*",
            "--ttl",
            "4s",
            "--message",
            "maintenance",
        ],
    )
    .await?;
    d.wait_for_decision(|l| {
        l["event"] == "lock" && l["action"] == "added" && l["lock_id"] == id.as_str()
    })
    .await?;
    assert!(d.connect("billing", "billing").await.is_err(), "locked");

    // A second sidecar on the same files (a restart) starts with the lock in force.
    // Its own file name gives it its own admin socket (`second.sock`); port 0 for /metrics.
    // Its own decision log too: two writers must not share one chain.
    let text = std::fs::read_to_string(&d.layout.config)?.replace(
        "path = \"decisions.log\"",
        "path = \"decisions-second.log\"",
    );
    let second_config = d.layout.dir.join("second.toml");
    std::fs::write(&second_config, text)?;
    let config = eastwall_config::Config::load(&second_config)
        .map_err(|e| anyhow::anyhow!("{}", e.lines().join("\n")))?;
    let second = eastwall::server::start(config).await?;
    let connect_second = || {
        let mut config =
            eastwall_e2e::pg_config("localhost", second.local_addr.port(), "billing", "postgres");
        config.ssl_mode(tokio_postgres::config::SslMode::Require);
        let tls = d.tls_for("billing").expect("billing");
        async move { eastwall_e2e::connect_with(&config, tls).await }
    };
    assert!(
        connect_second().await.is_err(),
        "the restarted sidecar keeps the lock"
    );

    // At its TTL the lock lifts by itself, with one `expired` line.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if connect_second().await.is_ok() && d.connect("billing", "billing").await.is_ok() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the lock did not lift at its TTL"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    d.wait_for_decision(|l| {
        l["event"] == "lock" && l["action"] == "expired" && l["lock_id"] == id.as_str()
    })
    .await?;
    second.shutdown().await;
    Ok(())
}
