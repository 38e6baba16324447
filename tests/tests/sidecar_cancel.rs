//! Cancel through the proxy: the client holds only the proxy's key, and a plaintext
//! CancelRequest (what libpq's PQcancel sends, without a certificate) carrying it stops the
//! running query; any other key stops nothing.

mod sidecar_common;

use std::time::{Duration, Instant};

use eastwall_e2e::connect_with;
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use sidecar_common::{assert_still_serves, cancel_request, query, raw_session, tcp};
use tokio::io::AsyncWriteExt;
use tokio_postgres::config::SslMode;
use tokio_postgres::NoTls;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_cancel_with_the_proxy_key_stops_pg_sleep_quickly() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    // `prefer` so the cancel token (like libpq's PQcancel) goes out in plaintext; the session
    // itself is TLS, since the proxy accepts nothing else.
    let mut config = d.pg_config("billing", "postgres");
    config.ssl_mode(SslMode::Prefer);
    let client = connect_with(&config, d.tls_for("billing")?).await?;
    let token = client.cancel_token();

    let sleeper = tokio::spawn(async move {
        let started = Instant::now();
        let result = client.simple_query("select pg_sleep(30)").await;
        (result, started.elapsed())
    });
    // Let the query reach PostgreSQL.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = Instant::now();
    token.cancel_query(NoTls).await?;
    let (result, _) = tokio::time::timeout(Duration::from_secs(10), sleeper).await??;
    let waited = sent.elapsed();
    let err = result.expect_err("the query was cancelled");
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    assert!(waited < Duration::from_secs(2), "cancel took {waited:?}");

    let line = d.wait_for_decision(|l| l["event"] == "cancel").await?;
    assert_eq!(line["decision"], "allow");
    assert_eq!(line["reason"], "forwarded");
    let session = d
        .decisions()?
        .into_iter()
        .find(|l| l["event"] == "connect")
        .expect("the session's line");
    assert_eq!(line["target_conn_id"], session["conn_id"]);
    assert_still_serves(&d).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_cancels_nothing() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let (mut session, pid, key) = raw_session(&d, "billing", "billing").await?;
    session.send(&query("select pg_sleep(30)")).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The right pid with a wrong key, and the right key with a wrong pid.
    let mut wrong = key.clone();
    wrong[0] ^= 0x5a;
    for (p, k) in [(pid, wrong.as_slice()), (pid ^ 1, key.as_slice())] {
        let mut sock = tcp(&d).await?;
        sock.write_all(&cancel_request(p, k)).await?;
        let reply = sidecar_common::read_to_close(&mut sock, Duration::from_secs(5)).await?;
        assert!(reply.is_empty(), "a cancel is never answered: {reply:?}");
    }
    // Still running a second later: nothing came back.
    match session.next_within(Duration::from_secs(1)).await {
        Err(_) => {}
        Ok(msg) => panic!("the query was disturbed by a wrong key: {msg:?}"),
    }
    let unknown = d
        .decisions()?
        .into_iter()
        .filter(|l| l["event"] == "cancel" && l["reason"] == "unknown_key")
        .count();
    assert_eq!(unknown, 2);

    // The right key ends it, in plaintext, through the same proxy.
    let sent = Instant::now();
    let mut sock = tcp(&d).await?;
    sock.write_all(&cancel_request(pid, &key)).await?;
    let msgs = session.until_ready().await?;
    let err = msgs
        .iter()
        .find(|m| m.tag == b'E')
        .expect("an ErrorResponse");
    assert_eq!(err.field(b'C').as_deref(), Some("57014"), "{msgs:?}");
    assert!(sent.elapsed() < Duration::from_secs(2));
    assert_still_serves(&d).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_inside_tls_with_a_certificate_works_too() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let tls = d.tls_for("billing")?;
    let client = connect_with(&d.pg_config("billing", "postgres"), tls.clone()).await?;
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = Instant::now();
    // sslmode=require: SSLRequest, TLS with billing's certificate, CancelRequest inside.
    token
        .cancel_query(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
        .await?;
    let err = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await??
        .expect_err("cancelled");
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    assert!(sent.elapsed() < Duration::from_secs(2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_a_cert_login_upstream() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions {
        upstream_auth: eastwall::quickstart::UpstreamAuth::Cert,
        ..SidecarOptions::default()
    })
    .await?;
    let (mut session, pid, key) = raw_session(&d, "billing", "billing").await?;
    session.send(&query("select pg_sleep(30)")).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = Instant::now();
    let mut sock = tcp(&d).await?;
    sock.write_all(&cancel_request(pid, &key)).await?;
    let msgs = session.until_ready().await?;
    let err = msgs
        .iter()
        .find(|m| m.tag == b'E')
        .expect("an ErrorResponse");
    assert_eq!(err.field(b'C').as_deref(), Some("57014"), "{msgs:?}");
    assert!(sent.elapsed() < Duration::from_secs(2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_ctrl_c_cancels_through_the_proxy() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let conninfo = d.conninfo("billing", "billing", "postgres");
    let psql = tokio::process::Command::new(sidecar_common::pg_binary("psql"))
        .args([conninfo.as_str(), "-X", "-c", "select pg_sleep(30)"])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = psql.id().expect("psql is running");
    // Wait until the query runs upstream.
    let started = Instant::now();
    loop {
        let running = d
            .cluster
            .run_sql("select count(*) from pg_stat_activity where query = 'select pg_sleep(30)'")
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        if running.trim() == "1" {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "psql never ran its query"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()?;
    assert!(status.success());
    let out = tokio::time::timeout(Duration::from_secs(10), psql.wait_with_output()).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn cancel_guesses_are_rate_limited_per_source() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    // Default: 10 cancel requests per second per source address.
    for i in 0..40u32 {
        let mut sock = tcp(&d).await?;
        sock.write_all(&cancel_request(i + 1, &[0, 0, 0, 0]))
            .await?;
        sidecar_common::read_to_close(&mut sock, Duration::from_secs(5)).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logged = d
        .decisions()?
        .into_iter()
        .filter(|l| l["event"] == "cancel")
        .count();
    assert!(
        (1..40).contains(&logged),
        "guesses beyond the rate are dropped unlogged: {logged} of 40 logged"
    );
    assert_still_serves(&d).await
}
