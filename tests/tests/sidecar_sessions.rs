//! Admitted sessions are invisible: tokio-postgres, psql and pgbench do everything they do
//! against PostgreSQL — simple and extended queries, COPY both ways, LISTEN/NOTIFY — through
//! the proxy, with the billing certificate and `sslmode=verify-full`.

mod sidecar_common;

use std::time::Duration;

use bytes::Bytes;
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use sidecar_common::{let_billing_create, run_client, BILLING_ID};
use tokio::time::timeout;
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn simple_and_extended_queries_with_parameters() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let_billing_create(&d)?;
    let client = d.connect("billing", "billing").await?;

    let rows = client
        .simple_query("select current_user; select 'two', 'columns'")
        .await?;
    let values: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .filter_map(|i| r.get(i))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["billing", "two,columns"]);

    // Extended protocol: Parse/Bind/Describe/Execute/Sync with typed parameters, reused.
    let stmt = client
        .prepare("select $1::int4 + $2::int4, upper($3::text)")
        .await?;
    for i in 0..20 {
        let row = client.query_one(&stmt, &[&i, &100i32, &"abc"]).await?;
        assert_eq!(row.get::<_, i32>(0), i + 100);
        assert_eq!(row.get::<_, String>(1), "ABC");
    }

    // Errors pass through unchanged, and the session survives them.
    let err = client
        .query_one("select 1/0", &[])
        .await
        .expect_err("division by zero");
    assert_eq!(err.code().map(|c| c.code()), Some("22012"), "{err}");
    let err = client
        .query("select * from no_such_table", &[])
        .await
        .expect_err("undefined table");
    assert_eq!(err.code().map(|c| c.code()), Some("42P01"), "{err}");

    // A transaction with a rollback behaves as it does directly.
    client.batch_execute("create table t (n int)").await?;
    client
        .batch_execute("begin; insert into t values (1); rollback")
        .await?;
    let n: i64 = client
        .query_one("select count(*) from t", &[])
        .await?
        .get(0);
    assert_eq!(n, 0);
    Ok(())
}

#[tokio::test]
async fn copy_in_and_copy_out_of_a_few_megabytes() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let_billing_create(&d)?;
    let client = d.connect("billing", "billing").await?;
    client
        .batch_execute("create table blobs (id int, payload text)")
        .await?;

    const ROWS: usize = 40_000;
    let line = |i: usize| format!("{i}\t{}\n", "x".repeat(100 + i % 50));
    let mut expected = Vec::new();
    for i in 0..ROWS {
        expected.extend_from_slice(line(i).as_bytes());
    }
    assert!(expected.len() > 4_000_000, "a few MB: {}", expected.len());

    let sink = client.copy_in("copy blobs from stdin").await?;
    futures_util::pin_mut!(sink);
    for chunk in expected.chunks(64 * 1024) {
        sink.send(Bytes::copy_from_slice(chunk)).await?;
    }
    let copied = timeout(LIMIT, sink.finish()).await??;
    assert_eq!(copied, ROWS as u64);

    let stream = client
        .copy_out("copy (select * from blobs order by id) to stdout")
        .await?;
    let chunks: Vec<Bytes> = timeout(LIMIT, stream.try_collect()).await??;
    let got: Vec<u8> = chunks.concat();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "COPY OUT returned different bytes");
    Ok(())
}

#[tokio::test]
async fn listen_notify_between_two_proxied_sessions() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;

    // The listener drives its own connection to see asynchronous notifications.
    let tls = d.tls_for("billing")?;
    let (listener, mut connection) = d
        .pg_config("billing", "postgres")
        .connect(MakeRustlsConnect::new(tls))
        .await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
            }
        }
    });
    listener.batch_execute("listen invoices").await?;

    let sender = d.connect("billing", "billing").await?;
    sender
        .batch_execute("notify invoices, 'paid:42'; select pg_notify('invoices', 'paid:43')")
        .await?;

    for payload in ["paid:42", "paid:43"] {
        let got = timeout(Duration::from_secs(10), rx.recv())
            .await
            .map_err(|_| anyhow::anyhow!("no notification {payload} within 10 s"))?;
        assert_eq!(got, Some(("invoices".to_owned(), payload.to_owned())));
    }
    Ok(())
}

#[tokio::test]
async fn psql_verify_full_runs_queries_and_backslash_copy() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let_billing_create(&d)?;
    let conninfo = d.conninfo("billing", "billing", "postgres");
    let csv_in = d.dir.path().join("in.csv");
    let csv_out = d.dir.path().join("out.csv");
    let mut text = String::new();
    for i in 0..1000 {
        text.push_str(&format!("{i},name {i}\n"));
    }
    std::fs::write(&csv_in, &text)?;

    let copy_in = format!("\\copy people from '{}' csv", csv_in.display());
    let copy_out = format!(
        "\\copy (select * from people order by id) to '{}' csv",
        csv_out.display()
    );
    let (ok, stdout, stderr) = run_client(
        "psql",
        &[
            &conninfo,
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-c",
            "create table people (id int primary key, name text)",
            "-c",
            &copy_in,
            "-c",
            "select count(*), current_user, (select ssl from pg_stat_ssl where pid = pg_backend_pid()) from people",
            "-c",
            &copy_out,
        ],
        LIMIT,
    )
    .await?;
    assert!(ok, "psql failed:\n{stdout}\n{stderr}");
    // `\copy` reports its count; the query sees every row, as billing. Our trust-mode upstream
    // leg is plain TCP on loopback, which PostgreSQL reports as ssl = f.
    assert!(stdout.contains("COPY 1000"), "{stdout}");
    assert!(stdout.contains("1000|billing|f"), "{stdout}");
    assert_eq!(std::fs::read_to_string(&csv_out)?, text);

    // An error stops the script with psql's exit code and PostgreSQL's message.
    let (ok, _, stderr) = run_client(
        "psql",
        &[&conninfo, "-X", "-v", "ON_ERROR_STOP=1", "-c", "select 1/0"],
        LIMIT,
    )
    .await?;
    assert!(!ok);
    assert!(stderr.contains("division by zero"), "{stderr}");

    let allowed = d
        .decisions()?
        .into_iter()
        .filter(|l| l["event"] == "connect" && l["decision"] == "allow")
        .count();
    assert_eq!(allowed, 2, "one allow line per psql session");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_simple_extended_and_prepared_have_no_failed_transactions() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let_billing_create(&d)?;
    let conninfo = d.conninfo("billing", "billing", "postgres");

    let (ok, stdout, stderr) = run_client("pgbench", &["-i", "-q", &conninfo], LIMIT).await?;
    assert!(ok, "pgbench -i failed:\n{stdout}\n{stderr}");

    for mode in ["simple", "extended", "prepared"] {
        let (ok, stdout, stderr) = run_client(
            "pgbench",
            &["-M", mode, "-c", "2", "-t", "50", "-n", &conninfo],
            LIMIT,
        )
        .await?;
        assert!(ok, "pgbench -M {mode} failed:\n{stdout}\n{stderr}");
        assert!(
            stdout.contains("number of transactions actually processed: 100/100"),
            "-M {mode}:\n{stdout}"
        );
        assert!(
            stdout.contains("number of failed transactions: 0 "),
            "-M {mode}:\n{stdout}"
        );
    }

    // Every pgbench connection was one admitted billing session, and each ended cleanly.
    let lines = d.decisions()?;
    let denied: Vec<_> = lines.iter().filter(|l| l["decision"] == "deny").collect();
    assert!(denied.is_empty(), "{denied:#?}");
    assert!(lines
        .iter()
        .filter(|l| l["event"] == "connect")
        .all(|l| l["spiffe_id"] == BILLING_ID));
    Ok(())
}
