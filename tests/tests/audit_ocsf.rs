//! `eastwall audit ocsf` on real decision logs: a sidecar run becomes OCSF Authentication
//! events equal to what `eastwall::ocsf::to_ocsf` gives line by line, signal lines become
//! Detection Findings, a broken chain converts nothing, and `--out` is 0600 and never
//! silently replaces a file (least of all the log itself).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use eastwall::audit::{AuditLog, Entry};
use eastwall_e2e::eastwall_bin;
use eastwall_e2e::sidecar::{Deployment, SidecarOptions};
use serde_json::{json, Value};
use tokio_postgres::config::SslMode;
use tokio_postgres::NoTls;

const BILLING_ID: &str = "spiffe://corp.example/app/billing";

fn eastwall(args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(eastwall_bin()?).args(args).output()?)
}

fn stdout_lines(out: &Output) -> anyhow::Result<Vec<Value>> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The attributes OCSF 1.3.0 requires of every event, and of each of the two classes.
fn assert_required(ev: &Value) {
    for p in [
        "/activity_id",
        "/category_uid",
        "/class_uid",
        "/type_uid",
        "/severity_id",
        "/time",
        "/metadata/version",
        "/metadata/product/vendor_name",
    ] {
        assert!(ev.pointer(p).is_some_and(|v| !v.is_null()), "{p} in {ev}");
    }
    let class = ev["class_uid"].as_u64().unwrap();
    let activity = ev["activity_id"].as_u64().unwrap();
    assert_eq!(
        ev["type_uid"].as_u64(),
        Some(class * 100 + activity),
        "{ev}"
    );
    assert_eq!(ev["metadata"]["version"], "1.3.0");
    match class {
        3002 => {
            assert!(
                ev["user"]["name"].is_string() || ev["user"]["uid"].is_string(),
                "{ev}"
            );
            assert!(ev["dst_endpoint"]["svc_name"].is_string(), "{ev}");
        }
        2004 => {
            assert!(ev["finding_info"]["uid"].is_string(), "{ev}");
            assert!(ev["finding_info"]["title"].is_string(), "{ev}");
        }
        other => panic!("class {other}: {ev}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_log_converts_to_ocsf_and_a_broken_chain_converts_nothing() -> anyhow::Result<()>
{
    let d = Deployment::start(SidecarOptions::default()).await?;
    let client = d.connect("billing", "billing").await?;
    client.simple_query("select 1").await?;
    drop(client);
    d.wait_for_decision(|l| l["event"] == "session_end").await?;
    assert!(d.connect("finance-laptop", "finance-laptop").await.is_err());
    let mut plain = d.pg_config("billing", "postgres");
    plain.ssl_mode(SslMode::Disable);
    assert!(plain.connect(NoTls).await.is_err());
    d.wait_for_decision(|l| l["event"] == "connect" && l["spiffe_id"].is_null())
        .await?;

    // A copy, so the running sidecar cannot add lines between the two reads below.
    let scratch = tempfile::tempdir()?;
    let log = scratch.path().join("decisions.log");
    std::fs::copy(d.decision_log(), &log)?;
    let lines: Vec<Value> = eastwall_e2e::sidecar::read_decisions(&log)?;
    let log_arg = log.to_str().unwrap();

    let out = tokio::task::block_in_place(|| eastwall(&["audit", "ocsf", log_arg]))?;
    assert!(out.status.success(), "{}", stderr(&out));
    let events = stdout_lines(&out)?;
    // The CLI writes exactly what the library gives, line by line, in order.
    let expected: Vec<Value> = lines.iter().filter_map(eastwall::ocsf::to_ocsf).collect();
    assert_eq!(events, expected);
    assert!(
        stderr(&out).contains(&format!(
            "ok: {} lines verified, {} OCSF events",
            lines.len(),
            events.len()
        )),
        "{}",
        stderr(&out)
    );
    for ev in &events {
        assert_required(ev);
    }

    let admitted = events
        .iter()
        .find(|e| e["activity_id"] == 1 && e["status_id"] == 1 && e["user"]["uid"] == BILLING_ID)
        .expect("billing's admission");
    assert_eq!(admitted["class_uid"], 3002);
    assert_eq!(admitted["user"]["name"], "billing");
    assert_eq!(admitted["src_endpoint"]["ip"], "127.0.0.1");
    assert!(admitted["src_endpoint"]["port"].as_u64().is_some());
    let allow_line = lines
        .iter()
        .find(|l| l["event"] == "connect" && l["decision"] == "allow")
        .unwrap();
    assert_eq!(admitted["service"]["name"], allow_line["database"]);
    assert_eq!(admitted["service"]["name"], "postgres");
    assert_eq!(admitted["metadata"]["uid"], allow_line["conn_id"]);
    assert_eq!(
        admitted["unmapped"]["cert_serial"],
        allow_line["cert_serial"]
    );
    assert_eq!(admitted["unmapped"]["hash"], allow_line["hash"]);

    let logoff = events
        .iter()
        .find(|e| e["activity_id"] == 2)
        .expect("the session's end");
    assert_eq!(logoff["type_uid"], 300202);
    assert_eq!(logoff["metadata"]["uid"], allow_line["conn_id"]);
    assert_eq!(logoff["status_detail"], "client_closed");
    assert!(logoff["duration"].as_u64().is_some(), "{logoff}");

    let denied = events
        .iter()
        .find(|e| e["status_id"] == 2 && e["user"]["name"] == "finance-laptop")
        .expect("the workstation's refusal");
    assert!(denied["status_detail"].is_string());
    assert_eq!(
        denied["user"]["uid"],
        "spiffe://corp.example/workstations/finance-laptop"
    );
    // The plaintext client proved no identity: a failure with no user uid.
    let anonymous = lines
        .iter()
        .find(|l| l["event"] == "connect" && l["spiffe_id"].is_null())
        .and_then(eastwall::ocsf::to_ocsf)
        .unwrap();
    assert!(events.contains(&anonymous));
    assert_eq!(anonymous["status_id"], 2);
    assert!(anonymous["user"].get("uid").is_none(), "{anonymous}");

    // An edited line: FILE:LINE on stderr, exit 1, no event on stdout and no OUT file.
    let text = std::fs::read_to_string(&log)?;
    let tampered = scratch.path().join("tampered.log");
    let mut edited: Vec<String> = text.lines().map(str::to_owned).collect();
    edited[1] = edited[1].replacen("127.0.0.1", "127.0.0.2", 1);
    assert_ne!(edited[1], text.lines().nth(1).unwrap());
    std::fs::write(&tampered, edited.join("\n") + "\n")?;
    let out_file = scratch.path().join("never.ocsf");
    for args in [
        vec!["audit", "ocsf", tampered.to_str().unwrap()],
        vec![
            "audit",
            "ocsf",
            tampered.to_str().unwrap(),
            "--out",
            out_file.to_str().unwrap(),
        ],
    ] {
        let out = tokio::task::block_in_place(|| eastwall(&args))?;
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(
            stderr(&out).starts_with(&format!("{}:2: ", tampered.display())),
            "{}",
            stderr(&out)
        );
        assert!(
            out.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(!out_file.exists());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_lines_become_detection_findings_and_out_is_private_and_never_clobbered(
) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let log = scratch.path().join("decisions.log");
    let audit = AuditLog::open(&log).await?;
    let mut connect = Entry {
        conn_id: "c0ffee01".into(),
        event: "connect",
        decision: Some("allow"),
        peer: Some("10.9.0.9:40000".parse()?),
        spiffe_id: Some(BILLING_ID.into()),
        cert_serial: Some("4114baf7".into()),
        db_user: Some("billing".into()),
        database: Some("hr".into()),
        rule: Some("policy.ew:3".into()),
        reason: "allow rule policy.ew:3".into(),
        ..Entry::default()
    };
    connect.extra.insert("tls_version".into(), json!("TLSv1_3"));
    audit.record(connect).await?;
    // The body eastwall_detect::Signal serializes to (detect/src/signal.rs).
    let signal = json!({
        "signal": "fan_out",
        "time": "2025-01-02T03:04:05Z",
        "kind": "distinct_databases",
        "subject": "source 10.9.0.9",
        "identities": [BILLING_ID],
        "sources": ["10.9.0.9"],
        "targets": ["billing", "crm", "hr"],
        "counts": { "databases": 3 },
        "window": { "from": "2025-01-02T03:00:05Z", "to": "2025-01-02T03:04:05Z", "seconds": 240 },
    });
    let mut entry = Entry {
        conn_id: "c0ffee01".into(),
        event: "signal",
        alert: true,
        ..Entry::default()
    };
    entry.extra = signal.as_object().unwrap().clone();
    audit.record(entry).await?;
    audit
        .record(Entry {
            conn_id: "c0ffee02".into(),
            event: "low_disk_space",
            reason: "64 MiB left".into(),
            ..Entry::default()
        })
        .await?;
    drop(audit);

    let out_file = scratch.path().join("events.ocsf");
    let (log_arg, out_arg) = (log.to_str().unwrap(), out_file.to_str().unwrap());
    let out =
        tokio::task::block_in_place(|| eastwall(&["audit", "ocsf", log_arg, "--out", out_arg]))?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("3 lines verified, 2 OCSF events, 1 lines with no OCSF class skipped"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mode = std::fs::metadata(&out_file)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&out_file)?;
    let events: Vec<Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(events.len(), 2, "{text}");
    for ev in &events {
        assert_required(ev);
    }
    let finding = &events[1];
    assert_eq!(finding["class_uid"], 2004);
    assert_eq!(finding["type_uid"], 200401);
    assert_eq!(finding["severity_id"], 3);
    assert_eq!(finding["finding_info"]["types"], json!(["fan_out"]));
    assert_eq!(
        finding["finding_info"]["first_seen_time"],
        1_735_786_805_000i64
    );
    assert_eq!(
        finding["finding_info"]["last_seen_time"],
        1_735_787_045_000i64
    );
    assert_eq!(
        finding["evidences"][0]["data"]["targets"],
        json!(["billing", "crm", "hr"])
    );
    assert_eq!(finding["metadata"]["uid"], "c0ffee01");

    // A second run does not replace OUT without --force, and changes nothing.
    let before = std::fs::read(&out_file)?;
    let out =
        tokio::task::block_in_place(|| eastwall(&["audit", "ocsf", log_arg, "--out", out_arg]))?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("already exists; pass --force"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&out_file)?, before);
    std::fs::set_permissions(&out_file, std::fs::Permissions::from_mode(0o644))?;
    let out = tokio::task::block_in_place(|| {
        eastwall(&["audit", "ocsf", log_arg, "--out", out_arg, "--force"])
    })?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&out_file)?, before);
    assert_eq!(
        std::fs::metadata(&out_file)?.permissions().mode() & 0o777,
        0o600
    );

    // The log itself is never OUT, not even with --force, and not through a symlink.
    let link = scratch.path().join("link.ocsf");
    std::os::unix::fs::symlink(&log, &link)?;
    let log_before = std::fs::read(&log)?;
    for target in [log_arg, link.to_str().unwrap()] {
        let out = tokio::task::block_in_place(|| {
            eastwall(&["audit", "ocsf", log_arg, "--out", target, "--force"])
        })?;
        assert_eq!(out.status.code(), Some(1), "{target}");
        assert!(
            stderr(&out).contains("is the decision log being converted"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(std::fs::read(&log)?, log_before);
    assert!(eastwall::audit::verify(Path::new(&log)).is_ok());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_ocsf_file_holds_what_audit_ocsf_gives_for_the_same_log() -> anyhow::Result<()> {
    let d = Deployment::start(SidecarOptions {
        edit_config: Some(Box::new(|text: &mut String| {
            *text = text.replace(
                "path = \"decisions.log\"\n",
                "path = \"decisions.log\"\nocsf = \"decisions.ocsf.jsonl\"\n",
            );
        })),
        ..SidecarOptions::default()
    })
    .await?;
    let client = d.connect("billing", "billing").await?;
    client.simple_query("select 1").await?;
    drop(client);
    d.wait_for_decision(|l| l["event"] == "session_end").await?;
    assert!(d.connect("finance-laptop", "finance-laptop").await.is_err());
    let eastwall_e2e::sidecar::Deployment {
        layout,
        proxy,
        cluster,
        dir,
    } = d;
    // A stop writes what is queued.
    proxy.shutdown().await;
    let live = layout.dir.join("decisions.ocsf.jsonl");
    let mode = std::fs::metadata(&live)?.permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "private, like the log");
    let live_events: Vec<Value> = std::fs::read_to_string(&live)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let log = layout.dir.join("decisions.log");
    let out = tokio::task::block_in_place(|| eastwall(&["audit", "ocsf", log.to_str().unwrap()]))?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(live_events, stdout_lines(&out)?);
    assert!(
        live_events
            .iter()
            .any(|e| e["status_id"] == 2 && e["user"]["name"] == "finance-laptop"),
        "the refusal is exported"
    );
    drop((cluster, dir));
    Ok(())
}
