//! The admin listener (`[admin] listen`): `/healthz`, `/readyz` and `/metrics` against a
//! private PostgreSQL and the real sidecar. The counters move by exactly what the test drove,
//! the exposition passes a real parser (`promtool check metrics`, or Python's
//! `prometheus_client` where promtool is missing), readiness follows the upstream, and
//! hostile HTTP (slowloris, huge headers, other methods, traversal paths, administrative
//! verbs, floods) neither takes the listener down nor reaches anything but the three paths.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long any single HTTP exchange may take in these tests.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// One HTTP response: status and body.
struct Reply {
    status: u16,
    headers: String,
    body: String,
}

/// Sends `request` verbatim on a new connection from `from` (any loopback address) and
/// reads the reply until the server closes.
async fn exchange_from(
    from: Option<&str>,
    admin: SocketAddr,
    request: &[u8],
) -> anyhow::Result<Reply> {
    let mut tcp = connect_from(from, admin).await?;
    tcp.write_all(request).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(HTTP_TIMEOUT, tcp.read_to_end(&mut raw))
        .await
        .context("the admin listener did not answer in time")??;
    parse_reply(&raw)
}

async fn exchange(admin: SocketAddr, request: &[u8]) -> anyhow::Result<Reply> {
    exchange_from(None, admin, request).await
}

async fn connect_from(from: Option<&str>, admin: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(from) = from {
        socket.bind(format!("{from}:0").parse()?)?;
    }
    Ok(tokio::time::timeout(HTTP_TIMEOUT, socket.connect(admin)).await??)
}

fn parse_reply(raw: &[u8]) -> anyhow::Result<Reply> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP response: {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status line: {head:?}"))?;
    Ok(Reply {
        status,
        headers: head.to_ascii_lowercase(),
        body: body.to_owned(),
    })
}

async fn get(admin: SocketAddr, path: &str) -> anyhow::Result<Reply> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    exchange(admin, request.as_bytes()).await
}

/// `/metrics` as Prometheus asks for it (OpenMetrics first).
async fn get_openmetrics(admin: SocketAddr) -> anyhow::Result<Reply> {
    let request = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
        Accept: application/openmetrics-text;version=1.0.0;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n\r\n";
    exchange(admin, request.as_bytes()).await
}

/// The samples of an exposition: `name{labels}` → value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The sum of every series of `name` whose labels include all of `labels` (`k="v"`).
fn total(samples: &HashMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name && labels.iter().all(|l| rest.contains(l))
        })
        .map(|(_, v)| v)
        .sum()
}

async fn scrape(admin: SocketAddr) -> anyhow::Result<HashMap<String, f64>> {
    let reply = get(admin, "/metrics").await?;
    anyhow::ensure!(reply.status == 200, "/metrics answered {}", reply.status);
    Ok(samples(&reply.body))
}

/// Scrapes until `ok` holds (bounded: 5 s); the last scrape either way.
async fn scrape_until(
    admin: SocketAddr,
    ok: impl Fn(&HashMap<String, f64>) -> bool,
) -> anyhow::Result<HashMap<String, f64>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = scrape(admin).await?;
        if ok(&now) || Instant::now() > deadline {
            return Ok(now);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn has(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run_with_stdin(cmd: &str, args: &[&str], input: &str) -> anyhow::Result<(bool, String)> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd}"))?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow!("no stdin"))?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

const PYTHON_PARSE: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
fmt = sys.argv[1]
text = sys.stdin.read()
parse = om if fmt == "openmetrics" else text_string_to_metric_families
n = sum(len(f.samples) for f in parse(text))
print(f"{n} samples")
"#;

/// Checks both formats with a real exposition parser; which one ran, or an error when none
/// is installed (tests/run installs promtool).
fn check_with_real_parser(classic: &str, openmetrics: &str) -> anyhow::Result<String> {
    // The first Python that has prometheus_client (Debian's python3-prometheus-client lives
    // in /usr/bin/python3's path, which a pyenv python3 on PATH does not see).
    let python = ["python3", "/usr/bin/python3"]
        .into_iter()
        .find(|py| has(py, &["-c", "import prometheus_client.openmetrics.parser"]));
    let mut used = Vec::new();
    if has("promtool", &["--version"]) {
        // promtool lints the classic format: a parse error or any lint problem fails.
        let (ok, out) = run_with_stdin("promtool", &["check", "metrics"], classic)?;
        anyhow::ensure!(
            ok && out.trim().is_empty(),
            "promtool check metrics refused the exposition: {out}\n{classic}"
        );
        used.push("promtool check metrics (classic text 0.0.4)");
    }
    if let Some(python) = python {
        for (fmt, text) in [("classic", classic), ("openmetrics", openmetrics)] {
            let (ok, out) = run_with_stdin(python, &["-c", PYTHON_PARSE, fmt], text)?;
            anyhow::ensure!(
                ok,
                "prometheus_client refused the {fmt} exposition: {out}\n{text}"
            );
        }
        used.push("python3 prometheus_client parsers (classic and OpenMetrics)");
    }
    if used.is_empty() {
        bail!(
            "no exposition parser installed: need promtool (Debian package `prometheus`, which \
             tests/run installs) or python3's prometheus_client (`pip install prometheus_client`)"
        );
    }
    Ok(used.join(" and "))
}

/// The notAfter of the proxy's certificate, read with x509-parser here.
fn proxy_not_after(d: &Deployment) -> anyhow::Result<i64> {
    let pem = std::fs::read(d.layout.dir.join("certs/proxy.pem"))?;
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .ok_or_else(|| anyhow!("no certificate in proxy.pem"))??;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)?;
    Ok(cert.validity().not_after.timestamp())
}

fn admin(d: &Deployment) -> anyhow::Result<SocketAddr> {
    d.proxy
        .admin_addr
        .ok_or_else(|| anyhow!("the admin listener is not running"))
}

#[tokio::test]
async fn counters_move_by_exactly_what_was_driven_and_pass_a_real_parser() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let admin = admin(&d)?;
    assert!(admin.ip().is_loopback());

    let health = get(admin, "/healthz").await?;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let before = scrape(admin).await?;
    assert_eq!(total(&before, "eastwall_sessions_active", &[]), 0.0);
    assert_eq!(total(&before, "eastwall_decisions_total", &[]), 0.0);

    // billing: allowed, and live.
    let (billing, conn) = d.connect_watching("billing", "billing").await?;
    billing.simple_query("SELECT 1").await?;
    let live = scrape_until(admin, |m| total(m, "eastwall_sessions_active", &[]) == 1.0).await?;
    assert_eq!(total(&live, "eastwall_sessions_active", &[]), 1.0);

    // The laptop: denied by policy (an alert). A plaintext client: no_tls.
    let laptop = d.connect("finance-laptop", "finance-laptop").await;
    assert!(laptop.is_err(), "the laptop must be refused");
    let plain =
        eastwall_e2e::connect_plain("127.0.0.1", d.addr().port(), "billing", "postgres", None)
            .await;
    assert!(plain.is_err(), "a plaintext client must be refused");
    d.wait_for_decision(|l| l["reason"] == "no_tls").await?;

    // billing leaves: its session_end line, and the gauge back to 0.
    drop(billing);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
    let end = d.wait_for_decision(|l| l["event"] == "session_end").await?;
    let after = scrape_until(admin, |m| {
        total(m, "eastwall_sessions_active", &[]) == 0.0
            && total(m, "eastwall_session_ends_total", &[]) == 1.0
    })
    .await?;
    assert_eq!(total(&after, "eastwall_sessions_active", &[]), 0.0);

    // Exactly what was driven.
    let log = d.decisions()?;
    let allow = total(&after, "eastwall_decisions_total", &["decision=\"allow\""]);
    let deny = total(&after, "eastwall_decisions_total", &["decision=\"deny\""]);
    assert_eq!(allow, 1.0, "billing once: {log:#?}");
    assert_eq!(deny, 2.0, "the laptop and the plaintext client");
    assert_eq!(
        total(
            &after,
            "eastwall_decisions_total",
            &[
                "event=\"connect\"",
                "decision=\"deny\"",
                "reason=\"no_tls\""
            ]
        ),
        1.0
    );
    let alerts_in_log = log.iter().filter(|l| l["alert"] == true).count() as f64;
    assert_eq!(
        alerts_in_log, 1.0,
        "the laptop's refusal is the alert: {log:#?}"
    );
    assert_eq!(
        total(&after, "eastwall_alerts_total", &["kind=\"connect\""]),
        1.0
    );
    let end_reason = end["reason"].as_str().unwrap_or("?");
    assert_eq!(
        total(
            &after,
            "eastwall_session_ends_total",
            &[&format!("reason=\"{end_reason}\"")]
        ),
        1.0
    );
    for (field, direction) in [
        ("bytes_client_to_server", "client_to_server"),
        ("bytes_server_to_client", "server_to_client"),
    ] {
        let logged = end[field].as_u64().unwrap_or(0) as f64;
        assert!(logged > 0.0, "{field} in {end}");
        assert_eq!(
            total(
                &after,
                "eastwall_bytes_total",
                &[&format!("direction=\"{direction}\"")]
            ),
            logged
        );
    }
    // Two connections finished the front door inside TLS (billing, the laptop); one
    // upstream login (billing); one log write per line.
    assert_eq!(
        total(&after, "eastwall_handshake_duration_seconds_count", &[]),
        2.0
    );
    assert_eq!(
        total(
            &after,
            "eastwall_upstream_login_duration_seconds_count",
            &[]
        ),
        1.0
    );
    assert_eq!(
        total(&after, "eastwall_audit_write_duration_seconds_count", &[]),
        log.len() as f64
    );
    let with_decision = log
        .iter()
        .filter(|l| !l["decision"].is_null() && l["event"] != "session_end")
        .count() as f64;
    assert_eq!(allow + deny, with_decision);

    // The proxy certificate's notAfter, as the certificate says.
    assert_eq!(
        total(
            &after,
            "eastwall_certificate_expiry_timestamp_seconds",
            &["cert=\"proxy\""]
        ),
        proxy_not_after(&d)? as f64
    );
    let crl_next = total(
        &after,
        "eastwall_certificate_expiry_timestamp_seconds",
        &["cert=\"crl\""],
    );
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs() as f64;
    assert!(crl_next > now, "the quickstart CRL is in force: {crl_next}");

    // No identity, role or address ever becomes a label.
    let classic = get(admin, "/metrics").await?;
    for leaked in ["spiffe://", "finance-laptop", "127.0.0.1", "billing"] {
        assert!(
            !classic.body.contains(leaked),
            "{leaked} in the exposition:\n{}",
            classic.body
        );
    }
    assert!(
        classic
            .headers
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        classic.headers
    );
    let om = get_openmetrics(admin).await?;
    assert!(
        om.headers
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{}",
        om.headers
    );
    assert!(om.body.ends_with("# EOF\n"));
    for name in [
        "eastwall_decisions",
        "eastwall_session_ends",
        "eastwall_alerts",
        "eastwall_sessions_active",
        "eastwall_locks_active",
        "eastwall_handshake_duration_seconds",
        "eastwall_upstream_login_duration_seconds",
        "eastwall_audit_write_duration_seconds",
        "eastwall_bytes",
        "eastwall_certificate_expiry_timestamp_seconds",
    ] {
        assert!(
            om.body.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{}",
            om.body
        );
    }
    let used = check_with_real_parser(&classic.body, &om.body)?;
    eprintln!("exposition checked with: {used}");
    println!("exposition checked with: {used}");
    Ok(())
}

#[tokio::test]
async fn readyz_is_ready_then_503_when_postgres_stops() -> anyhow::Result<()> {
    let mut d = Deployment::start(SidecarOptions::default()).await?;
    let admin = admin(&d)?;
    let ready = get(admin, "/readyz").await?;
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));

    d.cluster.stop()?;
    // Bounded: the reachability result is reused for a few seconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    let reply = loop {
        let reply = get(admin, "/readyz").await?;
        if reply.status == 503 || Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(reply.status, 503, "{}", reply.body);
    let lines: Vec<&str> = reply.body.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "one line per failing check: {:?}",
        reply.body
    );
    assert!(lines[0].starts_with("upstream: "), "{}", lines[0]);
    // The process still runs.
    assert_eq!(get(admin, "/healthz").await?.status, 200);

    // Back up: ready again.
    d.cluster.start_again()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let reply = loop {
        let reply = get(admin, "/readyz").await?;
        if reply.status == 200 || Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(reply.status, 200, "{}", reply.body);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_certificate_close_to_expiry_is_warned_in_readyz_the_log_and_the_metrics(
) -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let admin = admin(&d)?;
    // The operator re-issues the proxy's certificate, but for two days only.
    let ca = eastwall_ca::Ca::open(&d.layout.dir.join("ca"))?;
    let mut req = eastwall_ca::IssueRequest::new(eastwall_ca::SpiffeId::parse(
        "spiffe://corp.example/db/eastwall-proxy",
    )?);
    req.ttl = Duration::from_secs(2 * 86_400);
    req.dns = vec!["localhost".into()];
    req.ips = vec!["127.0.0.1".parse()?];
    ca.issue(&req)?.write(&d.layout.dir.join("certs/proxy"))?;
    let expected = proxy_not_after(&d)?;

    // Within the reload tick: still ready, with the warning under it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let reply = loop {
        let reply = get(admin, "/readyz").await?;
        if reply.body.contains("warning:") || Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        reply.status, 200,
        "a warning does not take the sidecar out: {}",
        reply.body
    );
    let lines: Vec<&str> = reply.body.lines().collect();
    assert_eq!(lines[0], "ready");
    assert!(
        lines[1].starts_with("warning: the proxy's certificate expires at")
            && lines[1].contains("eastwall ca issue"),
        "{}",
        reply.body
    );
    // The dates are metrics: the proxy's own certificate, the CA, the CRL.
    let m = scrape(admin).await?;
    let gauge = |cert: &str| {
        total(
            &m,
            "eastwall_certificate_expiry_timestamp_seconds",
            &[&format!("cert=\"{cert}\"")],
        )
    };
    assert_eq!(gauge("proxy") as i64, expected);
    assert!(gauge("ca") > gauge("proxy"), "the CA outlives it");
    assert!(gauge("crl") > 0.0);
    // And one alert line in the decision log, not one per tick.
    let line = d
        .wait_for_decision(|l| l["event"] == "expiry_warning" && l["cert"] == "proxy")
        .await?;
    assert_eq!(line["alert"], true);
    assert_eq!(line["reason"], "expires_soon");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = d
        .decisions()?
        .iter()
        .filter(|l| l["event"] == "expiry_warning")
        .count();
    assert_eq!(n, 1, "once a day per date");
    Ok(())
}

#[tokio::test]
async fn readyz_is_503_while_draining() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let admin = admin(&d)?;
    assert_eq!(get(admin, "/readyz").await?.status, 200);
    d.proxy
        .sidecar
        .draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let reply = get(admin, "/readyz").await?;
    assert_eq!(reply.status, 503);
    assert!(reply.body.starts_with("draining: "), "{}", reply.body);
    Ok(())
}

/// The listener still answers /healthz from a fresh source.
async fn still_answers(admin: SocketAddr) -> anyhow::Result<()> {
    let reply = get(admin, "/healthz").await?;
    anyhow::ensure!(
        reply.status == 200 && reply.body == "ok\n",
        "/healthz answered {} {:?}",
        reply.status,
        reply.body
    );
    Ok(())
}

#[tokio::test]
async fn hostile_http_gets_nothing_but_the_three_paths_and_the_listener_stays_up(
) -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let admin = admin(&d)?;

    // Slowloris from 127.0.0.2: more connections than the listener serves at once, none
    // finishing its headers. They take at most their source's share (others are answered
    // at once, not after the header timeout), and each is closed after the header timeout.
    let mut slow = Vec::new();
    for _ in 0..(eastwall::admin::MAX_CONNECTIONS + 16) {
        let mut tcp = connect_from(Some("127.0.0.2"), admin).await?;
        let _ = tcp
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-a: ")
            .await;
        slow.push(tcp);
    }
    let started = Instant::now();
    let promptly = Duration::from_secs(2);
    tokio::time::timeout(promptly, still_answers(admin))
        .await
        .context("a slowloris source starved everyone else")??;
    for tcp in &mut slow {
        let _ = tcp.write_all(b"b").await;
    }
    tokio::time::timeout(promptly, still_answers(admin))
        .await
        .context("a slowloris source starved everyone else")??;
    // Every slow connection ends (closed or refused) within the header timeout + margin.
    for mut tcp in slow {
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(
            eastwall::admin::HEADER_TIMEOUT + Duration::from_secs(5),
            tcp.read_to_end(&mut buf),
        )
        .await;
        assert!(closed.is_ok(), "a slowloris connection was kept open");
    }
    assert!(started.elapsed() < eastwall::admin::HEADER_TIMEOUT + Duration::from_secs(6));

    // A huge header: refused (431) or closed, never served.
    let mut huge = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 256 * 1024));
    huge.extend(b"\r\n\r\n");
    let mut tcp = connect_from(None, admin).await?;
    let _ = tcp.write_all(&huge).await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(HTTP_TIMEOUT, tcp.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw);
    assert!(
        !text.contains("eastwall_"),
        "a huge header was served: {text}"
    );
    if !raw.is_empty() {
        assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    }
    still_answers(admin).await?;

    // Other methods on the real paths: 405 with Allow; bodies never read.
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let request = format!(
            "{method} /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello"
        );
        let reply = exchange(admin, request.as_bytes()).await?;
        assert_eq!(reply.status, 405, "{method}");
        assert!(
            reply.headers.contains("allow: get, head"),
            "{}",
            reply.headers
        );
    }
    // HEAD: headers only.
    let head = exchange(
        admin,
        b"HEAD /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());

    // Traversal, encodings and administrative verbs: 404 (or 400 for what is not HTTP),
    // and no administrative effect.
    let (billing, _conn) = d.connect_watching("billing", "billing").await?;
    for path in [
        "/../../etc/passwd",
        "/metrics/../readyz",
        "/metrics/",
        "/%2e%2e/%2e%2e/etc/passwd",
        "//metrics",
        "/healthz%00",
        "/sessions",
        "/sessions/kill",
        "/sessions/kill?conn_id=all",
        "/locks",
        "/lock/add",
        "/reload",
        "/shutdown",
        "/quitquitquit",
        "/admin",
        "/debug/pprof",
    ] {
        let reply = get(admin, path).await?;
        assert!(
            reply.status == 404 || reply.status == 400,
            "{path} answered {}",
            reply.status
        );
        for method in ["POST", "DELETE"] {
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            );
            let reply = exchange(admin, request.as_bytes()).await?;
            assert!(
                reply.status == 404 || reply.status == 400,
                "{method} {path}"
            );
        }
    }
    // Not HTTP at all.
    let junk = exchange(admin, b"\x16\x03\x01\x00\x05hello\r\n\r\n").await;
    if let Ok(reply) = junk {
        assert_eq!(reply.status, 400);
    }
    billing.simple_query("SELECT 1").await?;
    assert!(
        d.decisions()?.iter().all(|l| l["event"] != "session_end"),
        "billing's session was not touched"
    );

    // 1,000 rapid requests, ten at a time: every one answered.
    for chunk in 0..100 {
        let answers = futures_util::future::join_all((0..10).map(|_| get(admin, "/healthz"))).await;
        for answer in answers {
            let answer = answer.with_context(|| format!("chunk {chunk}"))?;
            assert_eq!(answer.status, 200);
        }
    }
    // A burst of 300 at once from one source: some may be turned away at the source cap,
    // the listener stays up and the next request is served.
    let burst = futures_util::future::join_all((0..300).map(|_| get(admin, "/metrics"))).await;
    let served = burst
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.status == 200))
        .count();
    assert!(served >= eastwall::admin::MAX_PER_SOURCE, "{served} served");
    still_answers(admin).await?;
    Ok(())
}
