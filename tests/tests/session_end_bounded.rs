//! Every end Eastwall decides on is bounded, whatever the client does: a client that stops
//! reading (tiny receive window) while it keeps writing statements cannot keep a revoked or
//! expired session alive. The proxy stops reading from it at once, and after a short grace
//! both legs are closed and the PostgreSQL backend is gone. A sidecar shutdown ends every
//! live session the same way, each with its session_end line; a psql session that said
//! Terminate is logged client_closed.

mod sidecar_common;

use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};
use bytes::BytesMut;
use eastwall_ca::{Ca, RevokeTarget};
use eastwall_e2e::sidecar::{read_decisions, Deployment, SidecarOptions};
use eastwall_e2e::{connect_plain, Cluster};
use serde_json::Value;
use sidecar_common::{query, ssl_request, startup, tls_over, MsgReader, READ_TIMEOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;

/// How long the proxy may take, from the moment an end is due, to have no backend left.
const BACKEND_GONE_WITHIN: Duration = Duration::from_secs(10);

/// A direct superuser connection to the cluster, bypassing the proxy.
async fn direct(cluster: &Cluster) -> anyhow::Result<tokio_postgres::Client> {
    Ok(connect_plain(
        "127.0.0.1",
        cluster.port(),
        cluster.superuser(),
        "postgres",
        None,
    )
    .await?)
}

async fn backends_of(db: &tokio_postgres::Client, role: &str) -> anyhow::Result<i64> {
    let row = db
        .query_one(
            "select count(*) from pg_stat_activity where usename = $1 and backend_type = 'client backend'",
            &[&role],
        )
        .await?;
    Ok(row.get(0))
}

async fn rows(db: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(db
        .query_one("select count(*) from flood", &[])
        .await?
        .get(0))
}

/// A raw TLS session through the proxy over a socket with a tiny receive buffer (set before
/// connect), logged in as `role`; answers a cleartext password prompt with `password`.
async fn tiny_window_session(
    d: &Deployment,
    name: &str,
    role: &str,
    password: Option<&str>,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(2048)?;
    let mut tcp = timeout(READ_TIMEOUT, socket.connect(d.addr()))
        .await
        .context("connecting to the proxy timed out")??;
    tcp.set_nodelay(true)?;
    tcp.write_all(&ssl_request()).await?;
    let mut answer = [0u8; 1];
    timeout(READ_TIMEOUT, tcp.read_exact(&mut answer)).await??;
    if answer[0] != b'S' {
        bail!("proxy answered {:?} to SSLRequest", answer[0] as char);
    }
    let tls = tls_over(tcp, d.tls_for(name)?).await?;
    let mut reader = MsgReader::new(tls);
    reader.send(&startup(role, "postgres")).await?;
    if let Some(password) = password {
        let prompt = reader
            .next_within(READ_TIMEOUT)
            .await?
            .ok_or_else(|| anyhow!("closed before the password prompt"))?;
        if prompt.tag != b'R' || prompt.body[..4] != 3u32.to_be_bytes() {
            bail!("expected a cleartext password prompt, got {prompt:?}");
        }
        let mut p = BytesMut::new();
        p.extend_from_slice(b"p");
        p.extend_from_slice(&(password.len() as u32 + 5).to_be_bytes());
        p.extend_from_slice(password.as_bytes());
        p.extend_from_slice(&[0]);
        reader.send(&p).await?;
    }
    let msgs = reader.until_ready().await?;
    if let Some(err) = msgs.iter().find(|m| m.tag == b'E') {
        bail!("login failed: {:?}", err.field(b'M'));
    }
    Ok(reader.stream)
}

/// Writes INSERT statements as fast as the proxy takes them and never reads a byte; returns
/// when a write fails (the proxy closed) or `limit` passes. With `blocker_after`, after that
/// many batches of 20 it also asks for a result far larger than every socket buffer on the
/// way, so the proxy's writes to the client are certainly stuck.
fn flood(
    mut tls: TlsStream<TcpStream>,
    limit: Duration,
    blocker_after: Option<usize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut batch = BytesMut::new();
        for _ in 0..20 {
            batch.extend_from_slice(&query("insert into flood values (1)"));
        }
        let until = Instant::now() + limit;
        let mut batches = 0;
        while Instant::now() < until {
            batches += 1;
            let blocker = blocker_after == Some(batches);
            let write = async {
                if blocker {
                    tls.write_all(&query("select repeat('x', 64000000)"))
                        .await?;
                }
                tls.write_all(&batch).await?;
                tls.flush().await
            };
            match timeout(Duration::from_secs(1), write).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                // Blocked: the proxy stopped reading (or PostgreSQL did); keep trying.
                Err(_) => {}
            }
        }
    })
}

/// Waits (bounded) for a decision line matching `pred`.
async fn wait_for_line(
    d: &Deployment,
    within: Duration,
    pred: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let until = Instant::now() + within;
    loop {
        if let Some(line) = d.decisions()?.into_iter().find(|l| pred(l)) {
            return Ok(line);
        }
        if Instant::now() > until {
            bail!(
                "no matching decision line within {within:?}; log:\n{}",
                std::fs::read_to_string(d.decision_log()).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn flood_table(d: &Deployment) -> anyhow::Result<()> {
    d.cluster
        .run_sql("create table flood (n int); grant all on flood to billing, alice")
        .map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

/// The flood is under way: rows are arriving, and then the client's window has been full for
/// a while (the proxy's write to it is blocked).
async fn flood_is_flowing(db: &tokio_postgres::Client) -> anyhow::Result<()> {
    let until = Instant::now() + Duration::from_secs(10);
    while rows(db).await? < 200 {
        if Instant::now() > until {
            bail!("the flood never got going: {} rows", rows(db).await?);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// After the end: the session_end line is there, the backend goes away, and no row is added
/// once it is gone.
async fn assert_bounded_end(
    d: &Deployment,
    db: &tokio_postgres::Client,
    role: &str,
    due: Instant,
    pred: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let end = wait_for_line(d, BACKEND_GONE_WITHIN, |l| {
        l["event"] == "session_end" && pred(l)
    })
    .await?;
    let at_end = rows(db).await?;
    loop {
        let left = backends_of(db, role).await?;
        if left == 0 {
            break;
        }
        if due.elapsed() > BACKEND_GONE_WITHIN {
            bail!("{left} backend(s) of {role} still there {BACKEND_GONE_WITHIN:?} after the end was due");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = rows(db).await?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = rows(db).await?;
    assert_eq!(first, second, "rows kept arriving after the session ended");
    assert!(
        first - at_end <= 2,
        "{} rows were added after the session_end line",
        first - at_end
    );
    Ok(end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_ends_a_session_whose_client_stopped_reading() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    flood_table(&d)?;
    let db = direct(&d.cluster).await?;
    let tls = tiny_window_session(&d, "billing", "billing", None).await?;
    let admitted = wait_for_line(&d, READ_TIMEOUT, |l| {
        l["event"] == "connect" && l["decision"] == "allow"
    })
    .await?;
    let serial = admitted["cert_serial"]
        .as_str()
        .ok_or_else(|| anyhow!("no serial in {admitted}"))?
        .to_owned();
    let writer = flood(tls, Duration::from_secs(40), Some(50));
    flood_is_flowing(&db).await?;
    // Let the client's window fill: from here the proxy's writes to it are stuck.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let ca = Ca::open(&d.layout.dir.join("ca"))?;
    ca.revoke(&RevokeTarget::Serial(serial.clone()))?;
    // The sidecar looks at the CRL every 2 s: the end is due by then.
    let due = Instant::now() + Duration::from_secs(2);
    let end = assert_bounded_end(&d, &db, "billing", due, |l| {
        l["cert_serial"] == serial.as_str()
    })
    .await?;
    assert_eq!(end["reason"], "revoked", "{end}");
    writer.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_session_ends_a_session_whose_client_stopped_reading() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions {
        edit_config: Some(Box::new(|text: &mut String| {
            *text = text.replace("max_age = \"5m\"", "max_age = \"5m\"\nmax_session = \"3s\"");
        })),
        ..SidecarOptions::default()
    })
    .await?;
    flood_table(&d)?;
    let db = direct(&d.cluster).await?;
    let code = d.alice_code(SystemTime::now());
    let tls = tiny_window_session(&d, "alice", "alice", Some(&code)).await?;
    let due = Instant::now() + Duration::from_secs(3);
    let writer = flood(tls, Duration::from_secs(40), None);
    flood_is_flowing(&db).await?;
    let end = assert_bounded_end(&d, &db, "alice", due, |l| l["db_user"] == "alice").await?;
    assert_eq!(end["reason"], "max_session", "{end}");
    writer.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_every_live_session_with_a_logged_reason() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let (first, first_conn) = d.connect_watching("billing", "billing").await?;
    let (second, second_conn) = d.connect_watching("billing", "billing").await?;
    first.simple_query("select 1").await?;
    second.simple_query("select 1").await?;
    let Deployment {
        proxy,
        layout,
        cluster,
        dir,
    } = d;
    timeout(Duration::from_secs(10), proxy.shutdown())
        .await
        .context("shutdown did not finish within 10 s")?;
    // Both lines are written before shutdown returns.
    let ends: Vec<Value> = read_decisions(&layout.dir.join("decisions.log"))?
        .into_iter()
        .filter(|l| l["event"] == "session_end")
        .collect();
    assert_eq!(ends.len(), 2, "{ends:#?}");
    for end in &ends {
        assert_eq!(end["reason"], "shutdown", "{end}");
    }
    for conn in [first_conn, second_conn] {
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
    }
    // No backend is left behind.
    let direct_db = direct(&cluster).await?;
    let until = Instant::now() + Duration::from_secs(5);
    while backends_of(&direct_db, "billing").await? > 0 {
        if Instant::now() > until {
            bail!("billing's backends outlived the shutdown");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stopped_reading_cannot_hold_up_a_shutdown() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    flood_table(&d)?;
    let db = direct(&d.cluster).await?;
    let tls = tiny_window_session(&d, "billing", "billing", None).await?;
    let writer = flood(tls, Duration::from_secs(40), Some(50));
    flood_is_flowing(&db).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let Deployment {
        proxy,
        layout,
        cluster,
        dir,
    } = d;
    let asked = Instant::now();
    timeout(Duration::from_secs(10), proxy.shutdown())
        .await
        .context("shutdown did not finish within 10 s")?;
    let ends: Vec<Value> = read_decisions(&layout.dir.join("decisions.log"))?
        .into_iter()
        .filter(|l| l["event"] == "session_end")
        .collect();
    assert_eq!(ends.len(), 1, "{ends:#?}");
    assert_eq!(ends[0]["reason"], "shutdown");
    while backends_of(&db, "billing").await? > 0 {
        if asked.elapsed() > BACKEND_GONE_WITHIN {
            bail!("billing's backend outlived the shutdown");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writer.abort();
    drop((cluster, dir));
    Ok(())
}

/// `eastwall proxy` on SIGTERM: the live session is ended with a logged reason before the
/// process exits, and the client is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_logs_the_end_of_live_sessions_before_exiting() -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    let bin = tokio::task::spawn_blocking(eastwall_e2e::eastwall_bin).await??;
    let d = Deployment::start(SidecarOptions::default()).await?;
    // A second config for the process: its own port and its own decision log.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let text = std::fs::read_to_string(&d.layout.config)?
        .replace(
            "address = \"127.0.0.1:0\"",
            &format!("address = \"127.0.0.1:{port}\""),
        )
        .replace("path = \"decisions.log\"", "path = \"decisions-cli.log\"")
        // The drain's grace (default 30 s) is not what this test is about.
        + "\n[limits]\nshutdown_grace = \"1s\"\n";
    let config = d.layout.dir.join("cli.toml");
    std::fs::write(&config, text)?;
    let mut child = std::process::Command::new(bin)
        .args(["proxy", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let listening = (|| {
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
            if line.contains("eastwall: listening on") {
                return Ok(());
            }
        }
        Err(anyhow!("eastwall proxy did not start listening"))
    })();
    if let Err(err) = listening {
        let _ = child.kill();
        return Err(err);
    }
    let mut pg = eastwall_e2e::pg_config("localhost", port, "billing", "postgres");
    pg.ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, connection) = eastwall_e2e::connect_watching(&pg, d.tls_for("billing")?).await?;
    client.simple_query("select 1").await?;

    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(sent.success());
    let status = tokio::task::spawn_blocking(move || {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > until {
                let _ = child.kill();
                return Err(anyhow!(
                    "eastwall proxy did not exit within 10 s of SIGTERM"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await??;
    assert!(status.success(), "{status:?}");
    let ends: Vec<Value> = read_decisions(&d.layout.dir.join("decisions-cli.log"))?
        .into_iter()
        .filter(|l| l["event"] == "session_end")
        .collect();
    assert_eq!(ends.len(), 1, "{ends:#?}");
    assert_eq!(ends[0]["reason"], "shutdown");
    let ended = timeout(Duration::from_secs(5), connection)
        .await
        .context("the client was not told")??;
    let err = ended.expect_err("the proxy ended the session");
    let db = err
        .as_db_error()
        .ok_or_else(|| anyhow!("a dropped connection, not an ErrorResponse: {err}"))?;
    assert_eq!(db.code().code(), "57P01", "{db:?}");
    Ok(())
}

/// The race psql sometimes loses, made certain: Terminate, then wait for the server to close,
/// and only then the TLS close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_then_a_late_tls_close_is_logged_client_closed() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let (mut session, _, _) = sidecar_common::raw_session(&d, "billing", "billing").await?;
    session.send(&query("select 1")).await?;
    session.until_ready().await?;
    session.send(&[b'X', 0, 0, 0, 4]).await?;
    let rest = sidecar_common::read_to_close(&mut session.stream, READ_TIMEOUT).await?;
    assert!(rest.is_empty(), "{rest:?}");
    let _ = session.stream.shutdown().await;
    let end = wait_for_line(&d, READ_TIMEOUT, |l| l["event"] == "session_end").await?;
    assert_eq!(end["reason"], "client_closed", "{end}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_sessions_that_say_terminate_are_logged_client_closed() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let conninfo = d.conninfo("billing", "billing", "postgres");
    // psql sends Terminate and its TLS close in separate writes: the server may close first.
    const RUNS: usize = 8;
    for _ in 0..RUNS {
        let (ok, out, err) = sidecar_common::run_client(
            "psql",
            &["-X", "-w", "-At", &conninfo, "-c", "select 1"],
            Duration::from_secs(20),
        )
        .await?;
        assert!(ok, "psql failed: {out} {err}");
        assert_eq!(out.trim(), "1");
    }
    let until = Instant::now() + Duration::from_secs(5);
    let ends = loop {
        let ends: Vec<Value> = d
            .decisions()?
            .into_iter()
            .filter(|l| l["event"] == "session_end")
            .collect();
        if ends.len() >= RUNS || Instant::now() > until {
            break ends;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ends.len(), RUNS, "{ends:#?}");
    for end in &ends {
        assert_eq!(end["reason"], "client_closed", "{end}");
    }
    Ok(())
}
