//! `eastwall audit verify` as an operator runs it: exit status and the one line it prints.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};

use eastwall::audit::{AuditLog, Entry};

fn verify(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_eastwall"))
        .args(["audit", "verify"])
        .arg(path)
        .output()
        .expect("run eastwall")
}

async fn write_log(path: &Path, n: usize) {
    let log = AuditLog::open(path).await.expect("open log");
    for i in 1..=n {
        let entry = Entry {
            conn_id: format!("c{i}"),
            event: "connect",
            decision: Some(if i % 2 == 0 { "deny" } else { "allow" }),
            peer: Some(SocketAddr::from(([127, 0, 0, 1], 50000 + i as u16))),
            spiffe_id: Some("spiffe://eastwall.test/billing".into()),
            db_user: Some("billing".into()),
            database: Some("billing".into()),
            reason: "test".into(),
            ..Entry::default()
        };
        log.record(entry).await.expect("record");
    }
}

fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<String>)) {
    let text = std::fs::read_to_string(path).expect("read log");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    edit(&mut lines);
    std::fs::write(path, lines.join("\n") + "\n").expect("write log");
}

fn assert_fails_at(out: &Output, path: &Path, line: usize, what: &str) {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let prefix = format!("{}:{line}: ", path.display());
    assert!(
        stderr.starts_with(&prefix) && stderr.contains(what),
        "expected `{prefix}…{what}…`, got {stderr:?}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
}

#[tokio::test]
async fn an_intact_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    write_log(&path, 5).await;
    let out = verify(&path);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("ok: 5 lines, chain intact (last hash "),
        "{stdout}"
    );
}

#[tokio::test]
async fn an_edited_line_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    write_log(&path, 4).await;
    rewrite(&path, |lines| {
        lines[1] = lines[1].replace("\"decision\":\"deny\"", "\"decision\":\"allow\"")
    });
    assert_fails_at(&verify(&path), &path, 2, "edited");
}

#[tokio::test]
async fn a_removed_line_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    write_log(&path, 4).await;
    rewrite(&path, |lines| {
        lines.remove(1);
    });
    assert_fails_at(&verify(&path), &path, 2, "removed, inserted or reordered");
}

#[tokio::test]
async fn reordered_lines_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    write_log(&path, 4).await;
    rewrite(&path, |lines| lines.swap(1, 2));
    assert_fails_at(&verify(&path), &path, 2, "removed, inserted or reordered");
}

#[tokio::test]
async fn a_truncated_last_line_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    write_log(&path, 3).await;
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    assert_fails_at(&verify(&path), &path, 3, "truncated");
}

#[test]
fn a_missing_file_is_an_error_not_a_pass() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.jsonl");
    let out = verify(&path);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nope.jsonl"), "{stderr}");
}
