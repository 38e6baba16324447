//! The drain, as an orchestrator drives it: SIGTERM to `eastwall proxy` stops new
//! connections at once, lets live sessions go on for `[limits] shutdown_grace`, then ends
//! the rest (57P01 "the sidecar is shutting down", reason `shutdown`), logs every
//! `session_end` and exits 0. A session that finishes by itself during the grace is logged
//! `client_closed`; a second signal cuts the grace short.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use eastwall_e2e::sidecar::{read_decisions, Deployment, SidecarOptions};
use serde_json::Value;
use tokio::time::timeout;

type Watched = (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
);

/// `eastwall proxy` on its own port, log and admin socket, from the deployment's layout.
struct Proxy {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn spawn_proxy(d: &Deployment, name: &str, grace: &str) -> anyhow::Result<Proxy> {
    let bin = tokio::task::spawn_blocking(eastwall_e2e::eastwall_bin).await??;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = format!("decisions-{name}.log");
    let text = std::fs::read_to_string(&d.layout.config)?
        .replace(
            "address = \"127.0.0.1:0\"",
            &format!("address = \"127.0.0.1:{port}\""),
        )
        .replace("path = \"decisions.log\"", &format!("path = \"{log}\""))
        + &format!("\n[limits]\nshutdown_grace = \"{grace}\"\n");
    let config = d.layout.dir.join(format!("{name}.toml"));
    std::fs::write(&config, text)?;
    let mut child = Command::new(bin)
        .args(["proxy", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let proxy = Proxy {
        child,
        port,
        log: d.layout.dir.join(log),
    };
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
        if line.contains("eastwall: listening on") {
            return Ok(proxy);
        }
    }
    Err(anyhow!("eastwall proxy did not start listening"))
}

async fn connect(d: &Deployment, port: u16) -> anyhow::Result<Watched> {
    let mut pg = eastwall_e2e::pg_config("localhost", port, "billing", "postgres");
    pg.ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, conn) = eastwall_e2e::connect_watching(&pg, d.tls_for("billing")?).await?;
    client.simple_query("select 1").await?;
    Ok((client, conn))
}

fn signal(proxy: &Proxy, which: &str) -> anyhow::Result<()> {
    let sent = Command::new("kill")
        .args([which, &proxy.child.id().to_string()])
        .status()?;
    anyhow::ensure!(sent.success(), "kill {which} failed");
    Ok(())
}

/// Waits (bounded) for the process to exit; its status and when.
async fn exited(
    mut proxy: Proxy,
    within: Duration,
) -> anyhow::Result<(std::process::ExitStatus, Proxy)> {
    tokio::task::spawn_blocking(move || {
        let until = Instant::now() + within;
        loop {
            if let Some(status) = proxy.child.try_wait()? {
                return Ok((status, proxy));
            }
            if Instant::now() > until {
                return Err(anyhow!("eastwall proxy did not exit within {within:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await?
}

async fn told_shutting_down(
    conn: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) -> anyhow::Result<()> {
    let ended = timeout(Duration::from_secs(5), conn)
        .await
        .context("the client was not told")??;
    let err = ended.expect_err("the proxy ended the session");
    let db = err
        .as_db_error()
        .ok_or_else(|| anyhow!("a dropped connection, not an ErrorResponse: {err}"))?;
    assert_eq!(db.code().code(), "57P01", "{db:?}");
    assert!(
        db.message().contains("the sidecar is shutting down"),
        "{}",
        db.message()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_for_the_grace_then_ends_the_rest_and_exits_0() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let proxy = spawn_proxy(&d, "drain", "2s").await?;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(connect(&d, proxy.port).await?);
    }
    let (finisher, finisher_conn) = connect(&d, proxy.port).await?;

    signal(&proxy, "-TERM")?;
    let sent = Instant::now();
    // During the grace: nothing new is accepted, but live sessions go on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut pg = eastwall_e2e::pg_config("localhost", proxy.port, "billing", "postgres");
    pg.ssl_mode(tokio_postgres::config::SslMode::Require);
    let refused = timeout(
        Duration::from_secs(5),
        eastwall_e2e::connect_with(&pg, d.tls_for("billing")?),
    )
    .await
    .context("a connection during the drain hung")?;
    assert!(
        refused.is_err(),
        "a new connection was accepted during the drain"
    );
    let row = open[0].0.query_one("select 40 + 2", &[]).await?;
    assert_eq!(
        row.get::<_, i32>(0),
        42,
        "live sessions go on during the grace"
    );
    // One session finishes on its own within the grace.
    drop(finisher);
    let _ = timeout(Duration::from_secs(2), finisher_conn).await;

    let (status, proxy) = exited(proxy, Duration::from_secs(2 + 2 + 1)).await?;
    let took = sent.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took >= Duration::from_secs(2),
        "the grace was not given: {took:?}"
    );
    assert!(
        took <= Duration::from_secs(4) + Duration::from_millis(500),
        "{took:?}"
    );

    let ends: Vec<Value> = read_decisions(&proxy.log)?
        .into_iter()
        .filter(|l| l["event"] == "session_end")
        .collect();
    assert_eq!(ends.len(), 4, "{ends:#?}");
    let reasons: Vec<&str> = ends.iter().filter_map(|l| l["reason"].as_str()).collect();
    assert_eq!(
        reasons.iter().filter(|r| **r == "shutdown").count(),
        3,
        "{reasons:?}"
    );
    assert_eq!(
        reasons.iter().filter(|r| **r == "client_closed").count(),
        1,
        "{reasons:?}"
    );
    for (_, conn) in open {
        told_shutting_down(conn).await?;
    }
    assert!(
        !d.layout.dir.join("drain.sock").exists(),
        "the admin socket is removed on exit"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_cuts_the_grace_short() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let proxy = spawn_proxy(&d, "impatient", "30s").await?;
    let (_client, conn) = connect(&d, proxy.port).await?;
    signal(&proxy, "-TERM")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&proxy, "-INT")?;
    let (status, proxy) = exited(proxy, Duration::from_secs(5)).await?;
    assert!(status.success(), "{status:?}");
    let ends: Vec<Value> = read_decisions(&proxy.log)?
        .into_iter()
        .filter(|l| l["event"] == "session_end")
        .collect();
    assert_eq!(ends.len(), 1, "{ends:#?}");
    assert_eq!(ends[0]["reason"], "shutdown");
    told_shutting_down(conn).await?;
    Ok(())
}

/// In-process: the drain marks the sidecar not ready at once (what `/readyz` reads) and
/// returns as soon as the last session ended by itself, well before the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_is_not_ready_at_once_and_ends_early_when_sessions_do() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let (client, conn) = d.connect_watching("billing", "billing").await?;
    client.simple_query("select 1").await?;
    let Deployment {
        proxy,
        layout,
        cluster,
        dir,
    } = d;
    let sidecar = proxy.sidecar.clone();
    let admin = proxy
        .admin_addr
        .ok_or_else(|| anyhow!("the fixture serves /readyz"))?;
    assert!(!sidecar.draining());
    assert!(readyz(admin).await?.starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    let drain = tokio::spawn(proxy.drain(Duration::from_secs(30), std::future::pending()));
    let until = Instant::now() + Duration::from_secs(5);
    while !sidecar.draining() {
        anyhow::ensure!(Instant::now() < until, "not draining");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // What an orchestrator sees during the drain: not ready, and why.
    let answer = readyz(admin).await?;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("draining"), "{answer}");
    client.simple_query("select 1").await?;
    drop(client);
    let _ = timeout(Duration::from_secs(5), conn).await;
    timeout(Duration::from_secs(10), drain)
        .await
        .context("the drain waited on after the last session ended")??;
    assert!(started.elapsed() < Duration::from_secs(10));
    let ends: Vec<Value> = read_decisions(&layout.dir.join("decisions.log"))?
        .into_iter()
        .filter(|l| l["event"] == "session_end")
        .collect();
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0]["reason"], "client_closed");
    drop((cluster, dir));
    Ok(())
}

/// `GET /readyz` over plain HTTP/1.1; the whole answer as text.
async fn readyz(admin: std::net::SocketAddr) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(admin),
    )
    .await??;
    tcp.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}
