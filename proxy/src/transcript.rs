//! `eastwall audit sessions`: an audited session's lines as a transcript a person reads —
//! who, from where, how fresh their MFA was, then each statement with its outcome and time.
//!
//! A pure function of decision-log lines (the caller verifies the chain first). Text the
//! client chose is printed with control characters escaped, so a statement cannot move the
//! reader's cursor or recolour the terminal.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::BufRead;
use std::path::PathBuf;

use serde_json::Value;

/// Lines of the sessions to print, in log order.
#[derive(Default)]
struct Session {
    lines: Vec<Value>,
}

/// Reads `files` (oldest first) twice: which connections have statement lines (or is
/// `only`), then those connections' lines. Returns the transcript text.
pub fn transcript(files: &[PathBuf], only: Option<&str>) -> std::io::Result<String> {
    let mut wanted = BTreeSet::new();
    if let Some(conn) = only {
        wanted.insert(conn.to_owned());
    } else {
        each_line(files, |line| {
            if is_statement(line) {
                if let Some(conn) = line["conn_id"].as_str() {
                    wanted.insert(conn.to_owned());
                }
            }
        })?;
    }
    let mut sessions: BTreeMap<String, Session> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    each_line(files, |line| {
        let Some(conn) = line["conn_id"].as_str() else {
            return;
        };
        if !wanted.contains(conn) {
            return;
        }
        let relevant = matches!(
            line["event"].as_str(),
            Some("connect" | "statement" | "statement_result" | "session_end")
        );
        if !relevant {
            return;
        }
        if !sessions.contains_key(conn) {
            order.push(conn.to_owned());
        }
        sessions
            .entry(conn.to_owned())
            .or_default()
            .lines
            .push(line.clone());
    })?;
    let mut out = String::new();
    for conn in &order {
        render(&mut out, conn, &sessions[conn]);
    }
    if order.is_empty() {
        match only {
            Some(conn) => writeln!(out, "no lines for connection {}", clean(conn)).ok(),
            None => writeln!(out, "no audited sessions in this log").ok(),
        };
    }
    Ok(out)
}

fn is_statement(line: &Value) -> bool {
    matches!(
        line["event"].as_str(),
        Some("statement" | "statement_result")
    )
}

fn each_line(files: &[PathBuf], mut f: impl FnMut(&Value)) -> std::io::Result<()> {
    for file in files {
        let reader = std::io::BufReader::new(std::fs::File::open(file)?);
        for line in reader.lines() {
            if let Ok(value) = serde_json::from_str::<Value>(&line?) {
                f(&value);
            }
        }
    }
    Ok(())
}

/// Control characters (and the escape that starts terminal sequences) written visibly.
fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

fn s<'a>(line: &'a Value, key: &str) -> &'a str {
    line[key].as_str().unwrap_or("-")
}

/// `HH:MM:SS.mmm` of a line's RFC 3339 timestamp.
fn time(line: &Value) -> String {
    let ts = s(line, "ts");
    ts.get(11..23).unwrap_or(ts).to_owned()
}

fn render(out: &mut String, conn: &str, session: &Session) {
    let connect = session
        .lines
        .iter()
        .find(|l| l["event"] == "connect" && l["decision"] == "allow");
    let first = connect.or(session.lines.first());
    let Some(first) = first else {
        return;
    };
    let _ = writeln!(
        out,
        "session {} — {} as {} on {}",
        clean(conn),
        clean(s(first, "spiffe_id")),
        clean(s(first, "db_user")),
        clean(s(first, "database"))
    );
    if let Some(c) = connect {
        let mfa = match (c["mfa"].as_str(), c["mfa_age_s"].as_u64()) {
            (Some(method), Some(age)) => format!("MFA {} {age} s old", clean(method)),
            _ => "no MFA".to_owned(),
        };
        let _ = writeln!(
            out,
            "  from {}, admitted {} by rule {}, {mfa}",
            clean(s(c, "peer")),
            s(c, "ts"),
            clean(s(c, "rule"))
        );
    }
    for line in &session.lines {
        match line["event"].as_str() {
            Some("statement") => statement(out, line),
            Some("statement_result") => result(out, line),
            Some("session_end") => {
                let _ = writeln!(
                    out,
                    "  ended {} ({}{}) after {} ms",
                    s(line, "ts"),
                    clean(s(line, "reason")),
                    line["message"]
                        .as_str()
                        .map(|m| format!(": {}", clean(m)))
                        .unwrap_or_default(),
                    line["duration_ms"].as_u64().unwrap_or(0)
                );
            }
            _ => {}
        }
    }
    out.push('\n');
}

fn seq(line: &Value) -> String {
    line["seq"]
        .as_u64()
        .map_or_else(|| "#?".to_owned(), |n| format!("#{n}"))
}

fn statement(out: &mut String, line: &Value) {
    let how = match s(line, "protocol") {
        "extended" => {
            let name = line["statement_name"].as_str().unwrap_or("");
            let name = if name.is_empty() {
                "unnamed".to_owned()
            } else {
                format!("{:?}", clean(name))
            };
            format!(" [parse {name}]")
        }
        "function" => format!(
            " [function call, oid {}]",
            line["function_oid"].as_u64().unwrap_or(0)
        ),
        _ => String::new(),
    };
    let mut text = clean(s(line, "text"));
    if line["truncated"] == true {
        let _ = write!(
            text,
            " … [truncated, {} bytes]",
            line["text_bytes"].as_u64().unwrap_or(0)
        );
    }
    let text = text.replace('\n', "\n                    ");
    let _ = writeln!(out, "  {}  {:<4} {text}{how}", time(line), seq(line));
}

fn result(out: &mut String, line: &Value) {
    let mut what = match s(line, "outcome") {
        "ok" => line["tag"].as_str().map_or_else(|| "ok".to_owned(), clean),
        "error" => format!("ERROR {}", clean(s(line, "sqlstate"))),
        "empty" => "(empty query)".to_owned(),
        "suspended" => "(portal suspended)".to_owned(),
        other => clean(other),
    };
    if let Some(rows) = line["rows"].as_u64() {
        let _ = write!(what, ", {rows} row{}", if rows == 1 { "" } else { "s" });
    }
    if let (Some(direction), Some(bytes)) =
        (line["copy_direction"].as_str(), line["copy_bytes"].as_u64())
    {
        let _ = write!(what, ", copy {} {bytes} bytes", clean(direction));
    }
    if let Some(params) = line["params"].as_u64() {
        let _ = write!(
            what,
            ", {params} parameter{}",
            if params == 1 { "" } else { "s" }
        );
    }
    if let Some(index) = line["index"].as_u64() {
        let _ = write!(what, " [statement {index}]");
    }
    if line["at_sync"] == true {
        what.push_str(" [at sync]");
    }
    let _ = writeln!(out, "  {}  {:<4} -> {what}", time(line), seq(line));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write_log(lines: &[Value]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.log");
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn a_session_reads_as_who_where_and_each_statement_with_its_outcome() {
        let ts = "2026-01-02T03:04:05.123456Z";
        let (_dir, path) = write_log(&[
            json!({"ts": ts, "conn_id": "c1", "event": "connect", "decision": "allow", "peer": "127.0.0.1:5000", "spiffe_id": "spiffe://corp.example/app/operators/alice", "db_user": "alice", "database": "postgres", "rule": "policy.ew:9", "mfa": "totp", "mfa_age_s": 3}),
            json!({"ts": ts, "conn_id": "c2", "event": "connect", "decision": "allow", "spiffe_id": "spiffe://corp.example/app/billing"}),
            json!({"ts": ts, "conn_id": "c1", "event": "statement", "seq": 1, "protocol": "simple", "text": "select 1;\nselect '\u{1b}[31m'", "truncated": false}),
            json!({"ts": ts, "conn_id": "c1", "event": "statement_result", "seq": 1, "index": 1, "outcome": "ok", "tag": "SELECT 1", "rows": 1}),
            json!({"ts": ts, "conn_id": "c1", "event": "statement_result", "seq": 1, "index": 2, "outcome": "error", "sqlstate": "42601"}),
            json!({"ts": ts, "conn_id": "c1", "event": "session_end", "reason": "client_closed", "duration_ms": 12}),
        ]);
        let text = transcript(std::slice::from_ref(&path), None).unwrap();
        assert!(
            text.starts_with(
                "session c1 — spiffe://corp.example/app/operators/alice as alice on postgres\n"
            ),
            "{text}"
        );
        assert!(text.contains("  from 127.0.0.1:5000, admitted 2026-01-02T03:04:05.123456Z by rule policy.ew:9, MFA totp 3 s old\n"), "{text}");
        assert!(text.contains("03:04:05.123  #1   select 1;\n"), "{text}");
        assert!(text.contains("-> SELECT 1, 1 row [statement 1]"), "{text}");
        assert!(text.contains("-> ERROR 42601 [statement 2]"), "{text}");
        assert!(
            text.contains("ended 2026-01-02T03:04:05.123456Z (client_closed) after 12 ms"),
            "{text}"
        );
        assert!(
            !text.contains('\u{1b}'),
            "escapes are shown, not sent: {text}"
        );
        assert!(text.contains("\\u{1b}[31m"), "{text}");
        assert!(
            !text.contains("c2"),
            "a session without statements is not a transcript"
        );
        let one = transcript(std::slice::from_ref(&path), Some("c2")).unwrap();
        assert!(
            one.starts_with("session c2 — spiffe://corp.example/app/billing"),
            "{one}"
        );
        let none = transcript(&[path], Some("nope")).unwrap();
        assert_eq!(none, "no lines for connection nope\n");
    }
}
