//! The seed's attack through a real sidecar over a learned baseline: each of the five signals is logged inline, `audit detect` finds the same over the recorded log, the learned state survives a restart, and `lock_on` locks a stolen certificate out of live sessions.

mod sidecar_common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context};
use eastwall_detect::{Detectors, Settings as DetectTuning, Span, Time};
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use eastwall_e2e::{eastwall_bin, pg_config};
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

const TD: &str = "spiffe://corp.example";
/// Billing's own host, the phished finance laptop, alice's desk.
const BILLING_HOST: &str = "127.0.0.5";
const LAPTOP: &str = "127.0.0.42";
const ALICE_DESK: &str = "127.0.0.6";

/// Connects through the sidecar as identity `name` from `source`, as `role` to `db`.
async fn connect_from(
    d: &Deployment,
    source: &str,
    name: &str,
    role: &str,
    db: &str,
    password: Option<&str>,
) -> Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket
        .bind(format!("{source}:0").parse().expect("an address"))
        .expect("bind a loopback source");
    let stream = socket.connect(d.addr()).await.expect("reach the sidecar");
    let mut config = pg_config("localhost", d.addr().port(), role, db);
    config.ssl_mode(SslMode::Require);
    if let Some(pw) = password {
        config.password(pw);
    }
    let mut make = MakeRustlsConnect::new(d.tls_for(name).expect("a sample identity"));
    let tls = <MakeRustlsConnect as MakeTlsConnect<tokio::net::TcpStream>>::make_tls_connect(
        &mut make,
        "localhost",
    )
    .expect("a TLS connector");
    let (client, connection) = config.connect_raw(stream, tls).await?;
    Ok((
        client,
        tokio::spawn(async move {
            let _ = connection.await;
        }),
    ))
}

fn time_of(t: SystemTime) -> Time {
    let text = time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    Time::parse_rfc3339(&text).unwrap()
}

fn line(at: Time, event: &str, who: (&str, &str, &str), target: (&str, &str)) -> Value {
    json!({"ts": at.to_string(), "conn_id": "baseline", "event": event, "decision": "allow",
        "peer": format!("{}:50000", who.2), "spiffe_id": format!("{TD}/{}", who.0),
        "cert_serial": who.1, "db_user": target.1, "database": target.0, "rule": "policy.ew:2",
        "reason": "allowed by rule", "alert": false})
}

/// A benign eight days ending over an hour ago, replayed in milliseconds: billing from its
/// own host every hour, alice stepping up once a day at `alice_hour` (UTC) from her desk.
/// Returns the detectors' saved state, what the sidecar will start from.
fn learned_baseline(tuning: &DetectTuning, alice_hour: i64) -> String {
    let mut d = Detectors::new(tuning.clone()).unwrap();
    let now = time_of(SystemTime::now());
    // Each hour starts on the hour, so alice's step-up five minutes in stays inside her
    // window hour whatever minute the test runs at (from :55 it slipped into the next hour).
    let this_hour = Time(now.0 - now.0.rem_euclid(Span::hours(1).0));
    let start = this_hour.minus(Span(Span::days(8).0 + Span::hours(1).0));
    let mut feed = |v: Value| assert!(d.observe_line(&v).is_empty(), "benign: {v}");
    for hour in 0..8 * 24 {
        let at = start.plus(Span::hours(hour));
        let billing = ("app/billing", "b0", BILLING_HOST);
        feed(line(at, "connect", billing, ("postgres", "billing")));
        feed(line(
            at.plus(Span::minutes(50)),
            "session_end",
            billing,
            ("postgres", "billing"),
        ));
        if (at.hour() as i64) == alice_hour {
            let alice = ("app/operators/alice", "a0", ALICE_DESK);
            let mut l = line(
                at.plus(Span::minutes(5)),
                "connect",
                alice,
                ("postgres", "alice"),
            );
            l["mfa"] = json!("token");
            feed(l);
            feed(line(
                at.plus(Span::minutes(20)),
                "session_end",
                alice,
                ("postgres", "alice"),
            ));
        }
    }
    d.save()
}

/// `[detect]` for the test: the state file, and a change window twelve hours from now so
/// that tonight's work is outside it, whatever time the test runs.
fn detect_table(state: &Path, extra: &str) -> (String, DetectTuning, i64) {
    let hour_now = time_of(SystemTime::now()).hour() as i64;
    let window_hour = (hour_now + 12) % 24;
    let window = format!("Mon-Sun {window_hour:02}:00-{:02}:00", window_hour + 1);
    let table = format!(
        "\n[detect]\nstate_file = \"{}\"\nchange_window = \"{window}\"\n{extra}",
        state.display()
    );
    let tuning = DetectTuning {
        change_window: eastwall_detect::ChangeWindow::parse(&window).unwrap(),
        ..DetectTuning::default()
    };
    (table, tuning, window_hour)
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn signals(d: &Deployment) -> anyhow::Result<Vec<Value>> {
    Ok(d.decisions()?
        .into_iter()
        .filter(|l| l["event"] == "signal")
        .collect())
}

fn key(s: &Value) -> (String, String, String) {
    let t = |k: &str| s[k].as_str().unwrap_or_default().to_owned();
    (t("signal"), t("kind"), t("subject"))
}

/// Waits (bounded) until every `(signal, kind, subject)` wanted is in the log.
async fn wait_for_signals(
    d: &Deployment,
    wanted: &[(&str, &str, &str)],
) -> anyhow::Result<Vec<Value>> {
    for _ in 0..100 {
        let got = signals(d)?;
        let keys: BTreeSet<_> = got.iter().map(key).collect();
        if wanted
            .iter()
            .all(|(a, b, c)| keys.contains(&((*a).to_owned(), (*b).to_owned(), (*c).to_owned())))
        {
            return Ok(got);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(anyhow!(
        "not every signal {wanted:?} after 5 s; signals: {:#?}",
        signals(d)?.iter().map(key).collect::<Vec<_>>()
    ))
}

fn find<'a>(all: &'a [Value], signal: &str, kind: &str, subject: &str) -> &'a Value {
    all.iter()
        .find(|s| key(s) == (signal.into(), kind.into(), subject.into()))
        .unwrap_or_else(|| panic!("no {signal}/{kind} about {subject}"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The signal's own fields of a `signal` line (what `audit detect --json` prints).
fn signal_fields(line: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for k in [
        "signal",
        "time",
        "kind",
        "subject",
        "identities",
        "sources",
        "targets",
        "counts",
        "window",
    ] {
        if let Some(v) = line.get(k) {
            out.insert(k.into(), v.clone());
        }
    }
    Value::Object(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_attack_raises_all_five_signals_inline_and_offline_alike() -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let state = scratch.path().join("detect.json");
    let (table, tuning, window_hour) = detect_table(&state, "");
    // alice works at the hour the change window covers, twelve hours from now.
    let baseline = learned_baseline(&tuning, window_hour);
    write_private(&state, &baseline)?;
    let initial = scratch.path().join("initial.json");
    std::fs::write(&initial, &baseline)?;
    let d = Deployment::start(SidecarOptions {
        edit_config: Some(Box::new(move |text: &mut String| text.push_str(&table))),
        ..SidecarOptions::default()
    })
    .await?;
    for db in ["hr", "payroll", "crm", "ledger", "inventory"] {
        d.cluster.run_sql(&format!("CREATE DATABASE {db}"))?;
    }

    // Billing's own host is connected, as it always is.
    let (billing, _b) =
        connect_from(&d, BILLING_HOST, "billing", "billing", "postgres", None).await?;
    billing.simple_query("SELECT 1").await?;
    // 1. The phished laptop tries the database, as itself and as postgres: refused.
    for role in ["finance-laptop", "postgres"] {
        let err = connect_from(&d, LAPTOP, "finance-laptop", role, "postgres", None)
            .await
            .err()
            .context("the laptop must be refused")?;
        assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("28000"));
    }
    // 2. Billing's certificate and key, copied off, used from the laptop while billing is on.
    let (stolen, _s) = connect_from(&d, LAPTOP, "billing", "billing", "postgres", None).await?;
    stolen.simple_query("SELECT 1").await?;
    // 3. The walk over databases, and the superuser role (refused as superuser_role).
    for db in ["hr", "payroll", "crm", "ledger", "inventory"] {
        let (c, _t) = connect_from(&d, LAPTOP, "billing", "billing", db, None).await?;
        drop(c);
    }
    assert!(
        connect_from(&d, LAPTOP, "billing", "postgres", "postgres", None)
            .await
            .is_err()
    );
    // 4. alice's certificate from the laptop: wrong MFA codes until the brute force shows.
    for _ in 0..5 {
        let err = connect_from(&d, LAPTOP, "alice", "alice", "postgres", Some("000000"))
            .await
            .err()
            .context("a wrong code must be refused")?;
        assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("28P01"));
    }
    let _ = connect_from(&d, LAPTOP, "alice", "postgres", "postgres", Some("000000")).await;

    let laptop_id = format!("{TD}/workstations/finance-laptop");
    let billing_id = format!("{TD}/app/billing");
    let alice_id = format!("{TD}/app/operators/alice");
    let laptop_src = format!("source {LAPTOP}");
    let all = wait_for_signals(
        &d,
        &[
            ("new_flow", "new_identity", &laptop_id),
            ("new_flow", "new_source", &billing_id),
            ("shared_admin", "several_identities", "postgres"),
            ("odd_hour", "outside_learned_hours", &alice_id),
            ("credential_anomaly", "mfa_brute_force", &alice_id),
            ("fan_out", "distinct_databases", &laptop_src),
        ],
    )
    .await?;
    // The evidence a responder needs, on the line itself.
    let s = find(&all, "new_flow", "new_identity", &laptop_id);
    assert_eq!(strings(&s["sources"]), [LAPTOP]);
    assert_eq!(s["alert"], true);
    let s = find(&all, "new_flow", "new_source", &billing_id);
    assert_eq!(strings(&s["sources"]), [LAPTOP]);
    let cert = all
        .iter()
        .find(|s| s["kind"] == "cert_two_sources")
        .context("credential_anomaly/cert_two_sources")?;
    // Sorted as text, so a replay gives byte-identical lines.
    assert_eq!(strings(&cert["sources"]), [LAPTOP, BILLING_HOST]);
    assert_eq!(strings(&cert["identities"]), [billing_id.as_str()]);
    let s = find(&all, "shared_admin", "several_identities", "postgres");
    for id in [&billing_id, &alice_id, &laptop_id] {
        assert!(strings(&s["identities"]).contains(&id.as_str()), "{s}");
    }
    let s = find(&all, "odd_hour", "outside_learned_hours", &alice_id);
    assert_eq!(strings(&s["sources"]), [LAPTOP]);
    let s = find(&all, "credential_anomaly", "mfa_brute_force", &alice_id);
    assert!(s["counts"]["failures"].as_u64() >= Some(5), "{s}");
    let s = find(&all, "fan_out", "distinct_databases", &laptop_src);
    for db in ["hr", "payroll", "crm"] {
        assert!(strings(&s["targets"]).contains(&db), "{s}");
    }
    assert!(s["window"]["seconds"].as_i64() <= Some(600), "{s}");
    // Nobody innocent is named: alice's desk never appears.
    for s in &all {
        assert!(!s.to_string().contains(ALICE_DESK), "{s}");
    }
    // And the metric counts them.
    let metrics = d.proxy.sidecar.metrics.encode(0);
    assert!(
        metrics.contains("eastwall_signals_total{signal=\"fan_out\"}"),
        "{metrics}"
    );

    // Offline over the recorded log, from the same starting state: the same signals.
    let config = d.layout.config.clone();
    let log = d.decision_log();
    let recorded: Vec<Value> = signals(&d)?.iter().map(signal_fields).collect();
    let out = std::process::Command::new(eastwall_bin()?)
        .args(["audit", "detect", "--json", "--config"])
        .arg(&config)
        .arg("--state")
        .arg(&initial)
        .arg(&log)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let offline: Vec<Value> = String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    // The offline run has seen every line; the inline one may still be writing the last.
    assert!(
        offline.len() >= recorded.len(),
        "{offline:#?}\n{recorded:#?}"
    );
    assert_eq!(offline[..recorded.len()], recorded[..]);

    // Stop: the state is saved. A restarted sidecar continues from it, out of learning: a
    // workload it never saw is a new flow at once (a fresh start would learn for a week).
    let Deployment {
        cluster,
        layout,
        proxy,
        dir,
    } = d;
    drop((billing, stolen));
    proxy.shutdown().await;
    let saved = std::fs::read_to_string(&state)?;
    assert!(saved.contains("finance-laptop"), "the state saw the attack");
    let restarted = eastwall::server::start(eastwall_config::Config::load(&layout.config)?).await?;
    let ca = eastwall_ca::Ca::open(&layout.dir.join("ca"))?;
    let reports = ca.issue(&eastwall_ca::IssueRequest::new(
        eastwall_ca::SpiffeId::parse(&format!("{TD}/app/reports"))?,
    ))?;
    cluster.run_sql("CREATE ROLE reports LOGIN")?;
    let tls = eastwall_e2e::client_config(
        &std::fs::read_to_string(&layout.ca_cert)?,
        Some((
            &reports.cert_pem,
            reports.key_pem.as_deref().unwrap_or_default(),
        )),
    )?;
    let mut cfg = pg_config(
        "localhost",
        restarted.local_addr.port(),
        "reports",
        "postgres",
    );
    cfg.ssl_mode(SslMode::Require);
    let c = eastwall_e2e::connect_with(&cfg, tls).await?;
    c.simple_query("SELECT 1").await?;
    let reports_id = format!("{TD}/app/reports");
    let mut seen = false;
    for _ in 0..100 {
        let lines = eastwall_e2e::sidecar::read_decisions(&layout.dir.join("decisions.log"))?;
        if lines.iter().any(|l| {
            l["event"] == "signal" && l["kind"] == "new_identity" && l["subject"] == reports_id
        }) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        seen,
        "the restarted sidecar did not continue from its saved state"
    );
    let log_path = layout.dir.join("decisions.log");
    let lines = eastwall_e2e::sidecar::read_decisions(&log_path)?;
    assert!(
        !lines.iter().any(|l| l["event"] == "detect_start"),
        "a restored state is no alert"
    );
    drop(c);
    restarted.shutdown().await;
    // The attack on the baseline: the state file removed. The next start says so, as an
    // alert in the chained log, instead of learning again in silence.
    std::fs::remove_file(&state)?;
    let again = eastwall::server::start(eastwall_config::Config::load(&layout.config)?).await?;
    let lines = eastwall_e2e::sidecar::read_decisions(&log_path)?;
    let start = lines
        .iter()
        .find(|l| l["event"] == "detect_start")
        .context("a detect_start line")?;
    assert_eq!(
        (start["reason"].as_str(), start["alert"].as_bool()),
        (Some("fresh"), Some(true))
    );
    again.shutdown().await;
    drop((cluster, dir));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_on_locks_a_certificate_used_from_two_hosts_out_of_its_live_sessions(
) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let state = scratch.path().join("detect.json");
    let (table, _, _) = detect_table(
        &state,
        "lock_on = [\"credential_anomaly\"]\nlock_ttl = \"10m\"\n",
    );
    let d = Deployment::start(SidecarOptions {
        edit_config: Some(Box::new(move |text: &mut String| text.push_str(&table))),
        ..SidecarOptions::default()
    })
    .await?;
    let (billing, own) =
        connect_from(&d, BILLING_HOST, "billing", "billing", "postgres", None).await?;
    billing.simple_query("SELECT 1").await?;
    let (stolen, theirs) = connect_from(&d, LAPTOP, "billing", "billing", "postgres", None).await?;
    stolen.simple_query("SELECT 1").await?;

    // Within the upkeep tick, the certificate is locked: both sessions end, reason locked.
    let line = d
        .wait_for_decision(|l| l["event"] == "lock" && l["created_by"] == "eastwall-detect")
        .await?;
    assert_eq!(line["action"], "added", "{line}");
    let ends = d
        .wait_for_decisions(2, |l| {
            l["event"] == "session_end" && l["reason"] == "locked"
        })
        .await?;
    assert_eq!(
        ends.len(),
        2,
        "both sessions on the certificate end, no other"
    );
    for task in [own, theirs] {
        tokio::time::timeout(Duration::from_secs(5), task).await??;
    }
    // The lock is in the file an operator manages, and lifts by itself.
    let locks: Value =
        serde_json::from_str(&std::fs::read_to_string(d.layout.dir.join("locks.json"))?)?;
    let lock = &locks["locks"][0];
    assert_eq!(lock["created_by"], "eastwall-detect", "{locks}");
    assert!(lock["target"]["serial"].is_string(), "{locks}");
    assert!(lock["expires_at"].is_string(), "{locks}");
    // A new connection on the certificate is refused with the lock's message.
    let err = connect_from(&d, BILLING_HOST, "billing", "billing", "postgres", None)
        .await
        .err()
        .context("a locked certificate must be refused")?;
    let db = err.as_db_error().context("a FATAL")?;
    assert!(
        db.message().contains("credential_anomaly"),
        "{}",
        db.message()
    );
    Ok(())
}
