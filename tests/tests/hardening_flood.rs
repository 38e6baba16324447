//! Unauthenticated exhaustion (issue 10, item 4), attacked as an attacker would: raw sockets
//! that never finish TLS, plaintext StartupMessages with huge names, IPv4 clients on a
//! dual-stack listener, and a rotated decision log.

mod sidecar_common;

use std::net::SocketAddr;
use std::time::Duration;

use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use serde_json::Value;
use sidecar_common::{read_to_close, startup, tcp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Attackers: 127.0.0.2 .. 127.0.0.17.
const ATTACKER_SOURCES: usize = 16;
const SILENT_CONNECTIONS: usize = 1024;

fn attacker(i: usize) -> String {
    format!("127.0.0.{}", 2 + i % ATTACKER_SOURCES)
}

async fn connect_from(source: &str, to: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse()?)?;
    let stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(to)).await??;
    Ok(stream)
}

/// Sends SSLRequest and returns the one-byte answer, or None when the proxy closed instead.
async fn ssl_answer(stream: &mut TcpStream) -> anyhow::Result<Option<u8>> {
    if stream.write_all(&SSL_REQUEST).await.is_err() {
        return Ok(None);
    }
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await? {
        Ok(0) | Err(_) => Ok(None),
        Ok(_) => Ok(Some(byte[0])),
    }
}

/// The soft open-files limit, raised (up to the hard limit) so that `needed` sockets fit.
fn ensure_open_files(needed: u64) -> anyhow::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        anyhow::bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur >= needed {
        return Ok(());
    }
    anyhow::ensure!(
        lim.rlim_max >= needed,
        "this test needs {needed} open files; the hard limit is {}",
        lim.rlim_max
    );
    lim.rlim_cur = needed;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        anyhow::bail!("setrlimit: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Opens `n` connections that never send a byte, from the attacker addresses in turn.
async fn silent_flood(to: SocketAddr, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        held.push(connect_from(&attacker(i), to).await?);
    }
    Ok(held)
}

#[tokio::test]
async fn plaintext_startups_with_huge_names_are_summarised_not_logged_line_by_line(
) -> anyhow::Result<()> {
    const ATTEMPTS: usize = 300;
    let d = Deployment::start(SidecarOptions::default()).await?;
    let log = d.decision_log();
    let before = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let user = "u".repeat(1024);
    let database = "é".repeat(512); // 1 KiB, two bytes per char: cuts must respect them
    for _ in 0..ATTEMPTS {
        let mut sock = tcp(&d).await?;
        sock.write_all(&startup(&user, &database)).await?;
        let reply = read_to_close(&mut sock, Duration::from_secs(5)).await?;
        assert_eq!(
            reply.first(),
            Some(&b'E'),
            "a FATAL ErrorResponse each time"
        );
    }
    // Stopping the sidecar writes the summaries of windows still open.
    let Deployment {
        proxy,
        layout: _layout,
        cluster: _cluster,
        dir: _dir,
    } = d;
    proxy.shutdown().await;

    let grown = std::fs::metadata(&log)?.len() - before;
    eprintln!("{ATTEMPTS} refused plaintext attempts grew the decision log by {grown} bytes");
    assert!(
        grown < 64 * 1024,
        "{ATTEMPTS} refused plaintext attempts grew the decision log by {grown} bytes"
    );
    let lines = eastwall_e2e::sidecar::read_decisions(&log)?;
    let written: Vec<&Value> = lines.iter().filter(|l| l["reason"] == "no_tls").collect();
    let suppressed: u64 = lines
        .iter()
        .filter(|l| l["event"] == "refusals_summary" && l["source"] == "127.0.0.1")
        .map(|l| l["suppressed"].as_u64().unwrap_or(0))
        .sum();
    assert!(!written.is_empty(), "the first refusals are written");
    assert_eq!(
        written.len() as u64 + suppressed,
        ATTEMPTS as u64,
        "every attempt is written or counted: {lines:#?}"
    );
    for line in &written {
        let user = line["db_user"].as_str().unwrap_or_default();
        let db = line["database"].as_str().unwrap_or_default();
        assert!(user.len() <= 64 && user.starts_with("uuu"), "{line}");
        assert!(db.len() <= 64 && db.starts_with("éé"), "{line}");
        assert_eq!(line["truncated"], true, "{line}");
    }
    eastwall::audit::verify(&log)?;
    Ok(())
}

#[tokio::test]
async fn a_thousand_silent_connections_from_16_sources_leave_billing_served() -> anyhow::Result<()>
{
    // Each silent connection is two descriptors here (client and the sidecar's side).
    ensure_open_files(2 * SILENT_CONNECTIONS as u64 + 512)?;
    let d = Deployment::start(SidecarOptions::default()).await?;
    let held = silent_flood(d.addr(), SILENT_CONNECTIONS).await?;
    // The flood is in place: one more from each attacker is closed unanswered (its source
    // budget, or the shared handshake budget, is full).
    for i in 0..ATTACKER_SOURCES {
        let mut probe = connect_from(&attacker(i), d.addr()).await?;
        assert_eq!(
            ssl_answer(&mut probe).await?,
            None,
            "{} is over its budget",
            attacker(i)
        );
    }
    // A valid client, through the real TLS path, still gets in.
    let billing = d.connect("billing", "billing").await?;
    let rows = billing.simple_query("select 1").await?;
    assert!(!rows.is_empty());
    drop(held);
    Ok(())
}

#[tokio::test]
async fn on_a_dual_stack_listener_each_ipv4_source_has_its_own_budget() -> anyhow::Result<()> {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; the dual-stack case cannot run");
        return Ok(());
    }
    let d = Deployment::start(SidecarOptions {
        edit_config: Some(Box::new(|text: &mut String| {
            *text = text.replacen("address = \"127.0.0.1:0\"", "address = \"[::]:0\"", 1);
        })),
        ..SidecarOptions::default()
    })
    .await?;
    assert!(d.addr().is_ipv6(), "listening on {}", d.addr());
    let to = SocketAddr::from(([127, 0, 0, 1], d.addr().port()));
    // One IPv4 host holds more silent connections than any per-source budget allows...
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(connect_from("127.0.0.2", to).await?);
    }
    let mut probe = connect_from("127.0.0.2", to).await?;
    assert_eq!(ssl_answer(&mut probe).await?, None, "127.0.0.2 is capped");
    // ...which caps that host only: another IPv4 host is answered,
    let mut other = connect_from("127.0.0.3", to).await?;
    assert_eq!(
        ssl_answer(&mut other).await?,
        Some(b'S'),
        "127.0.0.3 is served"
    );
    drop(other);
    // and billing from 127.0.0.1 logs in and queries.
    // (The helper pins `localhost` to 127.0.0.1: an IPv4 client of the [::] listener.)
    let billing = d.connect("billing", "billing").await?;
    billing.simple_query("select 1").await?;
    drop(held);
    Ok(())
}

/// Ends the spawned proxy with the test, whatever happens.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) -> anyhow::Result<()> {
    for _ in 0..200 {
        if check() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{what}: not within 10 s")
}

#[tokio::test]
async fn sighup_after_mv_writes_a_new_file_that_continues_the_chain() -> anyhow::Result<()> {
    let cluster = eastwall_e2e::pg().start()?;
    cluster.run_sql("CREATE ROLE billing LOGIN")?;
    let tmp = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut qs = eastwall::quickstart::Options::new(
        tmp.path().join("sidecar"),
        format!("127.0.0.1:{}", cluster.port()),
    );
    qs.listen = SocketAddr::from(([127, 0, 0, 1], port));
    qs.stepup_listen = None;
    let layout = eastwall::quickstart::quickstart(&qs)?;
    let stderr_path = tmp.path().join("proxy.stderr");
    let proxy = Child(
        std::process::Command::new(eastwall_e2e::eastwall_bin()?)
            .args(["proxy", "--config"])
            .arg(&layout.config)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr_path)?)
            .spawn()?,
    );
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    wait_for("eastwall proxy listening", || {
        stderr().contains("eastwall: listening on")
    })
    .await?;

    let billing = layout.identity("billing").expect("a billing identity");
    let tls = eastwall_e2e::client_config(
        &std::fs::read_to_string(&layout.ca_cert)?,
        Some((
            &std::fs::read_to_string(&billing.cert)?,
            &std::fs::read_to_string(&billing.key)?,
        )),
    )?;
    let connect =
        || eastwall_e2e::connect_tls("localhost", port, "billing", "postgres", tls.clone());
    connect().await?.simple_query("select 1").await?;

    let log = layout.dir.join("decisions.log");
    let old = layout.dir.join("decisions.log.1");
    std::fs::rename(&log, &old)?;
    let pid = i32::try_from(proxy.0.id())?;
    // SAFETY: kill(2) on the child we spawned.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    wait_for("a new decision log after SIGHUP", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("\"log_reopened\""))
    })
    .await?;
    // The proxy is still running and writes the next session to the new file.
    connect().await?.simple_query("select 2").await?;
    wait_for("billing's connect line in the new file", || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("\"allow\""))
    })
    .await?;

    let old_lines = eastwall_e2e::sidecar::read_decisions(&old)?;
    assert!(
        old_lines.iter().any(|l| l["decision"] == "allow"),
        "the first session stayed in the rotated file"
    );
    let old_report = eastwall::audit::verify(&old)?;
    let new_report = eastwall::audit::verify(&log)?;
    assert_eq!(
        new_report.first_prev, old_report.last_hash,
        "the new file's first line chains to the old file's last hash"
    );
    let verify = std::process::Command::new(eastwall_e2e::eastwall_bin()?)
        .args(["audit", "verify"])
        .arg(&old)
        .arg(&log)
        .output()?;
    let out = String::from_utf8_lossy(&verify.stdout);
    assert!(
        verify.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(out.contains("chain intact"), "{out}");
    // Given the wrong way round, the join is refused.
    let swapped = std::process::Command::new(eastwall_e2e::eastwall_bin()?)
        .args(["audit", "verify"])
        .arg(&log)
        .arg(&old)
        .output()?;
    assert!(!swapped.status.success(), "files out of order must fail");
    drop(proxy);
    Ok(())
}

#[tokio::test]
async fn a_silent_connection_is_closed_at_the_handshake_timeout_not_the_startup_timeout(
) -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions {
        edit_config: Some(Box::new(|text: &mut String| {
            text.push_str("\n[limits]\nstartup_timeout = \"60s\"\nhandshake_timeout = \"1s\"\n");
        })),
        ..SidecarOptions::default()
    })
    .await?;
    // Says SSLRequest, gets 'S', then never starts TLS.
    let mut sock = tcp(&d).await?;
    assert_eq!(ssl_answer(&mut sock).await?, Some(b'S'));
    let rest = read_to_close(&mut sock, Duration::from_secs(10)).await?;
    assert!(rest.is_empty(), "closed without a word: {rest:?}");
    let line = d
        .wait_for_decision(|l| l["reason"] == "handshake_timeout")
        .await?;
    assert_eq!(line["decision"], "deny");
    d.connect("billing", "billing")
        .await?
        .simple_query("select 1")
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_full_handshake_budget_makes_room_for_a_source_holding_none() -> anyhow::Result<()> {
    // A small budget two attacker hosts can fill on their own: 2 x 8 = max_handshakes.
    let d = Deployment::start(SidecarOptions {
        edit_config: Some(Box::new(|text: &mut String| {
            text.push_str(
                "\n[limits]\nmax_handshakes = 16\nmax_handshakes_per_source = 8\nhandshake_timeout = \"20s\"\n",
            );
        })),
        ..SidecarOptions::default()
    })
    .await?;
    let mut held = Vec::new();
    for source in ["127.0.0.2", "127.0.0.3"] {
        for _ in 0..8 {
            held.push(connect_from(source, d.addr()).await?);
        }
    }
    // Both hosts are at their cap, and the budget is full...
    let mut probe = connect_from("127.0.0.2", d.addr()).await?;
    assert_eq!(ssl_answer(&mut probe).await?, None, "127.0.0.2 is capped");
    // ...yet billing, from a host holding no handshake, is admitted and queries.
    let billing = d.connect("billing", "billing").await?;
    billing.simple_query("select 1").await?;
    let line = d
        .wait_for_decision(|l| l["reason"] == "handshake_evicted")
        .await?;
    assert_eq!(line["decision"], "deny");
    drop(held);
    Ok(())
}
