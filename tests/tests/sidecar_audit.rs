//! The decision log of a real run verifies, any edit, deletion or reordering of one line is
//! caught at that line, and a log that cannot be written closes the door.

mod sidecar_common;

use std::path::Path;
use std::time::Duration;

use eastwall::audit::verify;
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use sidecar_common::{read_to_close, startup, tcp, BILLING_ID};
use tokio::io::AsyncWriteExt;
use tokio_postgres::config::SslMode;
use tokio_postgres::NoTls;

/// A run with a bit of everything: an admitted session that ends, a policy denial, a
/// plaintext client, a wrong role and a cancel with an unknown key.
async fn mixed_run(d: &Deployment) -> anyhow::Result<()> {
    let client = d.connect("billing", "billing").await?;
    client.simple_query("select 1").await?;
    drop(client);
    d.wait_for_decision(|l| l["event"] == "session_end").await?;
    assert!(d.connect("finance-laptop", "finance-laptop").await.is_err());
    assert!(d.connect("billing", "postgres").await.is_err());
    let mut plain = d.pg_config("billing", "postgres");
    plain.ssl_mode(SslMode::Disable);
    assert!(plain.connect(NoTls).await.is_err());
    let mut sock = tcp(d).await?;
    sock.write_all(&sidecar_common::cancel_request(1, &[1, 2, 3, 4]))
        .await?;
    read_to_close(&mut sock, Duration::from_secs(5)).await?;
    d.wait_for_decision(|l| l["event"] == "cancel").await?;
    Ok(())
}

fn lines_of(path: &Path) -> anyhow::Result<Vec<String>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .map(str::to_owned)
        .collect())
}

fn write_lines(path: &Path, lines: &[String]) -> anyhow::Result<()> {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text)?;
    Ok(())
}

#[tokio::test]
async fn a_real_log_verifies_and_each_tampering_is_found_at_its_line() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions::default()).await?;
    mixed_run(&d).await?;
    let log = d.decision_log();
    let lines = lines_of(&log)?;
    assert!(lines.len() >= 6, "{lines:#?}");
    let report = verify(&log).map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(report.lines, lines.len());

    let decisions = d.decisions()?;
    let events: Vec<&str> = decisions
        .iter()
        .filter_map(|l| l["event"].as_str())
        .collect();
    for event in ["connect", "session_end", "cancel"] {
        assert!(events.contains(&event), "{events:?}");
    }
    assert!(decisions
        .iter()
        .any(|l| l["spiffe_id"] == BILLING_ID && l["decision"] == "allow"));

    let scratch = tempfile::tempdir()?;
    let copy = scratch.path().join("decisions.log");
    let target = 2; // 0-based: the third line; its 1-based number is 3.

    // Edited: the denial of the workstation turned into an allow, say.
    let mut edited = lines.clone();
    edited[target] = edited[target].replacen("\"deny\"", "\"allow\"", 1);
    if edited[target] == lines[target] {
        edited[target] = edited[target].replacen("127.0.0.1", "127.0.0.2", 1);
    }
    assert_ne!(edited[target], lines[target]);
    write_lines(&copy, &edited)?;
    let err = verify(&copy).expect_err("an edited line fails");
    assert_eq!(err.line(), Some(target + 1), "{err}");

    // Deleted: the line after the gap no longer chains.
    let mut deleted = lines.clone();
    deleted.remove(target);
    write_lines(&copy, &deleted)?;
    let err = verify(&copy).expect_err("a deleted line fails");
    assert_eq!(err.line(), Some(target + 1), "{err}");

    // Reordered: two neighbours swapped.
    let mut swapped = lines.clone();
    swapped.swap(target, target + 1);
    write_lines(&copy, &swapped)?;
    let err = verify(&copy).expect_err("reordered lines fail");
    assert_eq!(err.line(), Some(target + 1), "{err}");

    // The untouched copy still verifies: the failures above are the tampering's doing.
    write_lines(&copy, &lines)?;
    assert!(verify(&copy).is_ok());
    Ok(())
}

#[tokio::test]
async fn an_unwritable_log_refuses_connections_and_the_proxy_stays_up() -> anyhow::Result<()> {
    // /dev/full accepts the open and fails every write with ENOSPC (root ignores chmod).
    let d = Deployment::start(SidecarOptions {
        edit_config: Some(Box::new(|text: &mut String| {
            *text = text.replace("path = \"decisions.log\"", "path = \"/dev/full\"");
        })),
        ..SidecarOptions::default()
    })
    .await?;
    assert_eq!(d.proxy.sidecar.audit.path(), Path::new("/dev/full"));

    for _ in 0..3 {
        let err = tokio::time::timeout(Duration::from_secs(10), d.connect("billing", "billing"))
            .await?
            .expect_err("no admission without a durable allow line");
        let db = err.as_db_error().expect("a FATAL from the proxy");
        assert_eq!(db.code().code(), "57P03", "{db:?}");
        assert!(db.message().contains("decision log"), "{db:?}");
    }
    // Refusals that do not need an allow line still answer promptly.
    let mut sock = tcp(&d).await?;
    sock.write_all(&startup("billing", "postgres")).await?;
    let reply = read_to_close(&mut sock, Duration::from_secs(5)).await?;
    assert_eq!(reply.first(), Some(&b'E'));
    Ok(())
}
