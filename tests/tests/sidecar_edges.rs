//! Edges of admitted sessions: pipelined startups, upstream errors passed through
//! unchanged, superuser roles, server-side termination, TLS 1.2, and the session_end line.

mod sidecar_common;

use std::time::Duration;

use eastwall_e2e::connect_with;
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sidecar_common::{
    assert_still_serves, query, ssl_request, startup, tcp, tls_over, MsgReader, BILLING_ID,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn startup_pipelined_with_a_query_is_answered_in_order() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let mut sock = tcp(&d).await?;
    sock.write_all(&ssl_request()).await?;
    let mut s = [0u8; 1];
    sock.read_exact(&mut s).await?;
    assert_eq!(s[0], b'S');
    let tls = tls_over(sock, d.tls_for("billing")?).await?;
    let mut session = MsgReader::new(tls);
    // One write: StartupMessage then a Query, as pipelining drivers do.
    let mut both = startup("billing", "postgres");
    both.extend_from_slice(&query("select 'pipelined'"));
    session.send(&both).await?;
    let login = session.until_ready().await?;
    assert_eq!(login[0].tag, b'R');
    let answer = session.until_ready().await?;
    let row = answer.iter().find(|m| m.tag == b'D').expect("a DataRow");
    assert!(row.body.ends_with(b"pipelined"), "{answer:?}");
    Ok(())
}

#[tokio::test]
async fn upstream_login_errors_reach_the_client_unchanged() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let tls = d.tls_for("billing")?;
    let err = connect_with(&d.pg_config("billing", "no_such_db"), tls)
        .await
        .expect_err("no such database");
    let db = err.as_db_error().expect("PostgreSQL's own error");
    assert_eq!(db.code().code(), "3D000");
    assert!(db.message().contains("no_such_db"), "{db:?}");
    let line = d
        .wait_for_decision(|l| l["reason"] == "upstream_login_failed")
        .await?;
    assert_eq!(line["database"], "no_such_db");
    assert_still_serves(&d).await
}

#[tokio::test]
async fn a_role_that_became_superuser_is_refused() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    d.cluster
        .run_sql("alter role billing superuser")
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let err = d
        .connect("billing", "billing")
        .await
        .expect_err("superuser refused");
    let db = err.as_db_error().expect("a FATAL from the proxy");
    assert_eq!(db.code().code(), "28000");
    assert!(db.message().contains("superuser"), "{db:?}");
    let line = d
        .wait_for_decision(|l| l["reason"] == "superuser_role")
        .await?;
    assert_eq!(line["decision"], "deny");
    assert_eq!(line["spiffe_id"], BILLING_ID);
    // Nothing was left logged in upstream as billing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left = d
        .cluster
        .run_sql("select count(*) from pg_stat_activity where usename = 'billing'")
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    assert_eq!(left.trim(), "0");
    Ok(())
}

#[tokio::test]
async fn a_terminated_backend_ends_the_client_session_with_57p01() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let client = d.connect("billing", "billing").await?;
    let pid: i32 = client
        .query_one("select pg_backend_pid()", &[])
        .await?
        .get(0);
    let sleeper = tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.cluster
        .run_sql(&format!("select pg_terminate_backend({pid})"))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let err = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await??
        .expect_err("the session was terminated");
    assert_eq!(err.code().map(|c| c.code()), Some("57P01"), "{err}");
    let end = d.wait_for_decision(|l| l["event"] == "session_end").await?;
    assert_eq!(end["reason"], "server_closed");
    assert_still_serves(&d).await
}

#[tokio::test]
async fn session_end_is_logged_with_duration_and_bytes() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let client = d.connect("billing", "billing").await?;
    client.simple_query("select repeat('x', 100000)").await?;
    drop(client);
    let end = d.wait_for_decision(|l| l["event"] == "session_end").await?;
    assert_eq!(end["reason"], "client_closed");
    assert_eq!(end["spiffe_id"], BILLING_ID);
    assert!(
        end["bytes_server_to_client"].as_u64().unwrap_or(0) > 100_000,
        "{end}"
    );
    assert!(
        end["bytes_client_to_server"].as_u64().unwrap_or(0) > 0,
        "{end}"
    );
    assert!(end["duration_ms"].is_u64(), "{end}");
    let connect = d
        .decisions()?
        .into_iter()
        .find(|l| l["event"] == "connect")
        .expect("the admission line");
    assert_eq!(connect["conn_id"], end["conn_id"]);
    Ok(())
}

#[tokio::test]
async fn tls_1_2_clients_are_served() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let (cert, key) = d.identity_pem("billing")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(d.ca_pem().as_bytes()) {
        roots.add(c?)?;
    }
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())?;
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls12 = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    let client = connect_with(&d.pg_config("billing", "postgres"), tls12).await?;
    client.simple_query("select 1").await?;
    let line = d.wait_for_decision(|l| l["event"] == "connect").await?;
    assert_eq!(line["tls_version"], "TLSv1_2");
    Ok(())
}

/// Opens TLS as billing and sends a startup with these parameters; returns the first reply.
async fn startup_reply(
    d: &Deployment,
    params: &[(&str, &str)],
) -> anyhow::Result<Vec<sidecar_common::Msg>> {
    let mut sock = tcp(d).await?;
    sock.write_all(&ssl_request()).await?;
    let mut s = [0u8; 1];
    sock.read_exact(&mut s).await?;
    let tls = tls_over(sock, d.tls_for("billing")?).await?;
    let mut session = MsgReader::new(tls);
    session
        .send(&sidecar_common::startup_with_version(
            eastwall::codec::PROTOCOL_3_0,
            params,
        ))
        .await?;
    let mut msgs = Vec::new();
    while let Some(msg) = session.next_within(Duration::from_secs(10)).await? {
        let end = msg.tag == b'E' || msg.tag == b'Z';
        msgs.push(msg);
        if end {
            break;
        }
    }
    Ok(msgs)
}

#[tokio::test]
async fn missing_user_and_replication_are_refused() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    let msgs = startup_reply(&d, &[("database", "postgres")]).await?;
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0].tag, b'E');
    assert_eq!(msgs[0].field(b'C').as_deref(), Some("28000"));
    assert!(msgs[0]
        .field(b'M')
        .is_some_and(|m| m.contains("no PostgreSQL user name")));

    let msgs = startup_reply(
        &d,
        &[
            ("user", "billing"),
            ("database", "postgres"),
            ("replication", "database"),
        ],
    )
    .await?;
    assert_eq!((msgs.len(), msgs[0].tag), (1, b'E'), "{msgs:?}");
    assert_eq!(msgs[0].field(b'C').as_deref(), Some("28000"));

    // replication=false is an ordinary session.
    let msgs = startup_reply(
        &d,
        &[
            ("user", "billing"),
            ("database", "postgres"),
            ("replication", "false"),
        ],
    )
    .await?;
    assert_eq!(msgs.last().map(|m| m.tag), Some(b'Z'), "{msgs:?}");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let reasons: Vec<String> = d
        .decisions()?
        .iter()
        .filter(|l| l["decision"] == "deny")
        .filter_map(|l| l["reason"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(reasons, ["no_user", "replication_refused"]);
    assert_still_serves(&d).await
}
