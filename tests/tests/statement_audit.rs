//! Statement audit end to end, against real PostgreSQL: alice steps up and every statement
//! she runs (simple, extended with parameters, failing, COPY, several in one Query) is in
//! the chained log with its outcome and never a parameter value; billing's session is not
//! audited; both sessions carry `ew:<conn_id>` in PostgreSQL's application_name; and when the
//! log cannot be written, alice's next statement ends her session before it reaches
//! PostgreSQL.

use std::process::Command;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use eastwall_e2e::eastwall_bin;
use eastwall_e2e::sidecar::{read_decisions, Deployment, SidecarOptions};
use futures_util::SinkExt;
use serde_json::Value;

const ALICE: &str = "spiffe://corp.example/app/operators/alice";
const BILLING: &str = "spiffe://corp.example/app/billing";
const SECRET_PARAMETER: &str = "hunter2-parameter-value";

fn conn_of(lines: &[Value], spiffe_id: &str) -> String {
    lines
        .iter()
        .find(|l| {
            l["event"] == "connect" && l["decision"] == "allow" && l["spiffe_id"] == spiffe_id
        })
        .and_then(|l| l["conn_id"].as_str())
        .unwrap_or_else(|| panic!("no allow line for {spiffe_id}"))
        .to_owned()
}

fn of<'a>(lines: &'a [Value], conn: &str, event: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["conn_id"] == conn && l["event"] == event)
        .collect()
}

fn eastwall(args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(Command::new(eastwall_bin()?).args(args).output()?)
}

fn application_name(d: &Deployment, role: &str) -> anyhow::Result<String> {
    Ok(d
        .cluster
        .run_sql(&format!(
            "SELECT application_name FROM pg_stat_activity WHERE usename = '{role}' AND backend_type = 'client backend'"
        ))?
        .trim()
        .to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_statements_are_logged_with_outcomes_and_a_full_log_ends_her_session(
) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(eastwall_bin).await??;
    let d = Deployment::start(SidecarOptions::default()).await?;
    d.cluster
        .run_sql("CREATE SCHEMA alice AUTHORIZATION alice")?;

    let billing = d.connect("billing", "billing").await?;
    billing.simple_query("SELECT 1").await?;
    let code = d.alice_code(SystemTime::now());
    let alice = d.connect_with_password("alice", "alice", &code).await?;

    // Both admitted sessions name their Eastwall connection in PostgreSQL.
    let lines = d.decisions()?;
    let (alice_conn, billing_conn) = (conn_of(&lines, ALICE), conn_of(&lines, BILLING));
    let app = application_name(&d, "alice")?;
    assert!(app.ends_with(&format!("ew:{alice_conn}")), "{app}");
    let app = application_name(&d, "billing")?;
    assert!(app.ends_with(&format!("ew:{billing_conn}")), "{app}");
    assert!(app.len() <= 63, "{app}");

    // 1. Simple protocol.
    alice
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, note text)")
        .await?;
    // 2. Extended protocol with parameters.
    let row = alice
        .query_one(
            "INSERT INTO t VALUES ($1, $2) RETURNING id",
            &[&1i32, &SECRET_PARAMETER],
        )
        .await?;
    assert_eq!(row.get::<_, i32>(0), 1);
    // 3. A failing statement.
    let err = alice
        .simple_query("SELECT * FROM missing_table")
        .await
        .expect_err("no such table");
    assert_eq!(err.code().map(|c| c.code()), Some("42P01"));
    // 4. COPY in.
    let data = "2\ttwo\n3\tthree\n";
    let sink = alice.copy_in("COPY t (id, note) FROM STDIN").await?;
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from_static(data.as_bytes())).await?;
    assert_eq!(sink.finish().await?, 2);
    // 5. Several statements in one Query.
    alice
        .simple_query("INSERT INTO t VALUES (4, 'four'); SELECT count(*) FROM t")
        .await?;
    // billing goes on, and ends, unaudited.
    billing.simple_query("SELECT 2").await?;
    drop(billing);
    d.wait_for_decision(|l| l["event"] == "session_end" && l["conn_id"] == billing_conn.as_str())
        .await?;
    d.wait_for_decision(|l| {
        l["event"] == "statement_result" && l["conn_id"] == alice_conn.as_str() && l["index"] == 2
    })
    .await?;

    let lines = d.decisions()?;
    let statements = of(&lines, &alice_conn, "statement");
    let results = of(&lines, &alice_conn, "statement_result");
    let texts: Vec<(&str, &str)> = statements
        .iter()
        .map(|l| {
            (
                l["protocol"].as_str().unwrap_or(""),
                l["text"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        texts,
        [
            ("simple", "CREATE TABLE t (id int PRIMARY KEY, note text)"),
            ("extended", "INSERT INTO t VALUES ($1, $2) RETURNING id"),
            ("simple", "SELECT * FROM missing_table"),
            ("extended", "COPY t (id, note) FROM STDIN"),
            (
                "simple",
                "INSERT INTO t VALUES (4, 'four'); SELECT count(*) FROM t"
            ),
        ],
        "{statements:#?}"
    );
    for s in &statements {
        assert_eq!(s["spiffe_id"], ALICE);
        assert_eq!(s["db_user"], "alice");
        assert_eq!(s["database"], "postgres");
        assert_eq!(s["truncated"], false);
        assert_eq!(s["reason"], "mfa");
    }
    let seq = |i: usize| statements[i]["seq"].clone();
    let outcome = |l: &Value| {
        (
            l["seq"].clone(),
            l["outcome"].as_str().unwrap_or("").to_owned(),
            l["tag"]
                .as_str()
                .or(l["sqlstate"].as_str())
                .unwrap_or("")
                .to_owned(),
            l["rows"].clone(),
        )
    };
    let got: Vec<_> = results.iter().map(|l| outcome(l)).collect();
    let want = |i: usize, outcome: &str, tag: &str, rows: Value| {
        (seq(i), outcome.to_owned(), tag.to_owned(), rows)
    };
    assert_eq!(
        got,
        [
            want(0, "ok", "CREATE TABLE", Value::Null),
            want(1, "ok", "INSERT 0 1", 1.into()),
            want(2, "error", "42P01", Value::Null),
            want(3, "ok", "COPY 2", 2.into()),
            want(4, "ok", "INSERT 0 1", 1.into()),
            want(4, "ok", "SELECT 1", 1.into()),
        ],
        "{results:#?}"
    );
    assert_eq!(
        results[1]["params"], 2,
        "the parameter count, not the values"
    );
    assert_eq!(results[3]["copy_direction"], "in");
    assert_eq!(results[3]["copy_bytes"], data.len());
    assert_eq!(
        (results[4]["index"].clone(), results[5]["index"].clone()),
        (1.into(), 2.into())
    );
    assert!(of(&lines, &billing_conn, "statement").is_empty());
    assert!(of(&lines, &billing_conn, "statement_result").is_empty());
    let text = std::fs::read_to_string(d.decision_log())?;
    assert!(
        !text.contains(SECRET_PARAMETER),
        "a parameter value reached the log"
    );

    // The log fills up: its path now names /dev/full, which the writer switches to.
    let log = d.decision_log();
    let kept = log.with_extension("log.1");
    std::fs::rename(&log, &kept)?;
    std::os::unix::fs::symlink("/dev/full", &log)?;
    assert!(d.proxy.sidecar.audit.reopen().await.is_err());

    // alice pipelines two inserts: the first ends her session before PostgreSQL has all of
    // it, the second never leaves the proxy.
    let (first, second) = tokio::join!(
        alice.simple_query("INSERT INTO t VALUES (5, 'five')"),
        alice.simple_query("INSERT INTO t VALUES (6, 'six')"),
    );
    let err = first.expect_err("the session ends");
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("a FATAL: {err:?}"));
    assert_eq!(db.code().code(), "57P01", "{db:?}");
    assert!(
        db.message()
            .contains("the statement audit log cannot be written"),
        "{db:?}"
    );
    assert!(second.is_err());
    assert!(alice.is_closed() || alice.simple_query("SELECT 1").await.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let count = d.cluster.run_sql("SELECT count(*) FROM alice.t")?;
    assert_eq!(
        count.trim(),
        "4",
        "nothing alice sent after the failure ran"
    );

    // The log up to the failure verifies, and reads as a transcript.
    let kept_s = kept.to_str().unwrap_or_default();
    let out = eastwall(&["audit", "verify", kept_s])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = eastwall(&["audit", "sessions", kept_s])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let transcript = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = transcript.lines().collect();
    assert_eq!(
        lines[0],
        format!("session {alice_conn} — {ALICE} as alice on postgres"),
        "{transcript}"
    );
    assert!(lines[1].starts_with("  from 127.0.0.1:"), "{transcript}");
    assert!(lines[1].contains(", MFA totp "), "{transcript}");
    let has = |needle: &str| {
        assert!(
            lines.iter().any(|l| l.contains(needle)),
            "no line with {needle:?}:\n{transcript}"
        )
    };
    has("#1   CREATE TABLE t (id int PRIMARY KEY, note text)");
    has("#1   -> CREATE TABLE");
    has("#2   INSERT INTO t VALUES ($1, $2) RETURNING id [parse ");
    has("#2   -> INSERT 0 1, 1 row, 2 parameters");
    has("#3   -> ERROR 42P01");
    has("#4   -> COPY 2, 2 rows, copy in 14 bytes");
    has("#5   -> INSERT 0 1, 1 row [statement 1]");
    has("#5   -> SELECT 1, 1 row [statement 2]");
    assert!(
        !transcript.contains(&billing_conn),
        "billing is not a transcript"
    );
    let out = eastwall(&["audit", "sessions", kept_s, "--conn", &billing_conn])?;
    let one = String::from_utf8_lossy(&out.stdout);
    assert!(
        one.starts_with(&format!("session {billing_conn} — {BILLING}")),
        "{one}"
    );
    assert!(!read_decisions(&kept)?.is_empty());
    Ok(())
}
