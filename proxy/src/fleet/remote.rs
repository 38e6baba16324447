//! What the CLI reads back from the fleet stream: one sidecar's published lines and heads (for `audit verify --fleet`), or every sidecar's lines merged in time order (for `audit detect --fleet`).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use futures_util::StreamExt;
use serde_json::Value;

use super::bundle::{head_subject, log_subject, Head};

/// How long a read waits for the next message before deciding the stream has no more.
const QUIET: Duration = Duration::from_secs(2);
/// The most messages one read takes (a bound, not a target).
const MAX_MESSAGES: usize = 10_000_000;

/// Every message on `filter` (a subject, wildcards allowed), oldest first, with its subject.
pub async fn fetch(
    client: &async_nats::Client,
    stream: &str,
    filter: &str,
) -> Result<Vec<(String, bytes::Bytes)>, String> {
    let js = async_nats::jetstream::new(client.clone());
    let stream = js
        .get_stream(stream)
        .await
        .map_err(|e| format!("the fleet stream {stream:?}: {e}"))?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: filter.to_owned(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("cannot read the fleet stream: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("cannot read the fleet stream: {e}"))?;
    let mut out = Vec::new();
    while out.len() < MAX_MESSAGES {
        let next = match tokio::time::timeout(QUIET, messages.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(Err(e))) => return Err(format!("reading the fleet stream: {e}")),
            Ok(Some(Ok(m))) => m,
        };
        let pending = next.info().map(|i| i.pending).unwrap_or(0);
        out.push((next.subject.to_string(), next.payload.clone()));
        if pending == 0 {
            break;
        }
    }
    Ok(out)
}

/// One sidecar's lines, as published, and its heads.
pub async fn sidecar_copy(
    client: &async_nats::Client,
    stream: &str,
    name: &str,
) -> Result<(Vec<Vec<u8>>, Vec<Head>), String> {
    let lines = fetch(client, stream, &log_subject(name))
        .await?
        .into_iter()
        .flat_map(|(_, payload)| split_lines(&payload))
        .collect();
    let heads = fetch(client, stream, &head_subject(name))
        .await?
        .into_iter()
        .filter_map(|(_, payload)| serde_json::from_slice(&payload).ok())
        .collect();
    Ok((lines, heads))
}

fn split_lines(payload: &[u8]) -> Vec<Vec<u8>> {
    payload
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// What comparing local files with the fleet's copy found.
#[derive(Debug, Default)]
pub struct Comparison {
    /// Fleet lines found byte for byte in the local files.
    pub matched: usize,
    /// Heads whose hash the local files hold.
    pub heads_matched: usize,
    /// Each difference, for a human.
    pub problems: Vec<String>,
}

/// The first 16 characters of a hash, for a message (a hostile hash may hold any text).
fn short(hash: &str) -> String {
    hash.chars().take(16).collect()
}

/// Where in the fleet's copy (stream order) the local files begin: lines before it were
/// rotated away here, or written before the files given. Judged from the chain, never
/// from timestamps, which whoever rewrites the log chooses.
fn coverage_start(
    first_prev: &str,
    fleet: &[(String, String, Value)],
    local: &HashMap<String, &[u8]>,
) -> Result<usize, String> {
    if first_prev == crate::audit::GENESIS {
        return Ok(0);
    }
    if let Some(i) = fleet.iter().position(|(hash, _, _)| hash == first_prev) {
        return Ok(i + 1);
    }
    // The fleet copy began later than the local files (the sidecar joined the fleet then).
    match fleet.first() {
        None => Ok(0),
        Some((_, _, v)) => {
            let prev = v.get("prev").and_then(Value::as_str).unwrap_or_default();
            if prev == first_prev || local.contains_key(prev) {
                Ok(0)
            } else {
                Err(format!(
                    "the local files begin after a line (hash {}) the fleet does not hold, and the fleet's copy does not begin inside them: they are not the log this sidecar published",
                    short(first_prev)
                ))
            }
        }
    }
}

/// Compares `local` (the lines of the given files, oldest first) with what the sidecar
/// published. Fleet lines before the point where the local chain begins (a rotated-away
/// older file) are not judged; every one after it, and every head after it, must be in the
/// local files byte for byte.
pub fn compare(local: &[Vec<u8>], fleet: &[Vec<u8>], heads: &[Head]) -> Comparison {
    let mut out = Comparison::default();
    let parse = |line: &[u8]| -> Option<(String, String, Value)> {
        let v: Value = serde_json::from_slice(line).ok()?;
        Some((
            v.get("hash")?.as_str()?.to_owned(),
            v.get("ts")?.as_str()?.to_owned(),
            v,
        ))
    };
    let mut by_hash: HashMap<String, &[u8]> = HashMap::new();
    let mut by_prev: HashMap<String, String> = HashMap::new();
    let mut first_prev: Option<String> = None;
    for line in local {
        if let Some((hash, _, v)) = parse(line) {
            let prev = v.get("prev").and_then(Value::as_str).unwrap_or_default();
            first_prev.get_or_insert_with(|| prev.to_owned());
            by_prev.insert(prev.to_owned(), hash.clone());
            by_hash.insert(hash, line);
        }
    }
    let Some(first_prev) = first_prev else {
        out.problems
            .push("the local files hold no decision line".into());
        return out;
    };
    let published: Vec<(String, String, Value)> = fleet.iter().filter_map(|l| parse(l)).collect();
    let raw: Vec<&Vec<u8>> = fleet.iter().filter(|l| parse(l).is_some()).collect();
    let start = match coverage_start(&first_prev, &published, &by_hash) {
        Ok(start) => start,
        Err(problem) => {
            out.problems.push(problem);
            0
        }
    };
    let before: HashSet<&str> = published[..start]
        .iter()
        .map(|(h, _, _)| h.as_str())
        .collect();
    let mut reported: HashSet<String> = HashSet::new();
    for ((hash, ts, v), line) in published[start..].iter().zip(&raw[start..]) {
        match by_hash.get(hash) {
            Some(mine) if *mine == line.as_slice() => out.matched += 1,
            Some(_) => out.problems.push(format!(
                "the line at {ts} (hash {}) differs from the copy the fleet holds",
                short(hash)
            )),
            None => {
                let prev = v.get("prev").and_then(Value::as_str).unwrap_or_default();
                let local_next = by_prev.get(prev).map(String::as_str).unwrap_or("none");
                if reported.insert(hash.clone()) {
                    out.problems.push(format!(
                        "the fleet holds a line at {ts} ({} {}, hash {}) that the local files do not: it was edited, removed or rewritten here (the local line after the same predecessor has hash {})",
                        v.get("event").and_then(Value::as_str).unwrap_or("?"),
                        v.get("spiffe_id").and_then(Value::as_str).unwrap_or(""),
                        short(hash),
                        short(local_next),
                    ));
                }
            }
        }
    }
    for head in heads {
        if before.contains(head.hash.as_str()) {
            continue;
        }
        if by_hash.contains_key(&head.hash) {
            out.heads_matched += 1;
        } else if reported.insert(head.hash.clone()) {
            out.problems.push(format!(
                "the chain head published at {} (last line {}, hash {}) is not in the local files",
                head.at,
                head.ts,
                short(&head.hash)
            ));
        }
    }
    out
}

/// Every sidecar's lines, each with its sidecar's name, merged by `ts` (stable within one
/// sidecar). `database` becomes `<sidecar>/<database>`, so the same database name behind
/// two sidecars counts as two targets, as it is.
pub async fn merged(client: &async_nats::Client, stream: &str) -> Result<Vec<Value>, String> {
    let mut all: Vec<(String, usize, Value)> = Vec::new();
    for (subject, payload) in fetch(client, stream, "eastwall.log.*").await? {
        let name = subject
            .strip_prefix("eastwall.log.")
            .unwrap_or(&subject)
            .to_owned();
        for line in split_lines(&payload) {
            let Ok(mut v) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            if let Some(db) = v.get("database").and_then(Value::as_str) {
                let qualified = format!("{name}/{db}");
                v["database"] = Value::String(qualified);
            }
            if let Some(obj) = v.as_object_mut() {
                obj.insert("sidecar".into(), Value::String(name.clone()));
            }
            let ts = v.get("ts").and_then(Value::as_str).unwrap_or("").to_owned();
            let n = all.len();
            all.push((ts, n, v));
        }
    }
    all.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    Ok(all.into_iter().map(|(_, _, v)| v).collect())
}

/// The lines of local files, oldest file first.
pub fn read_local(files: &[PathBuf]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for f in files {
        let bytes = std::fs::read(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        out.extend(split_lines(&bytes));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(ts: &str, prev: &str, hash: &str, who: &str) -> Vec<u8> {
        format!(r#"{{"ts":"{ts}","event":"connect","spiffe_id":"{who}","prev":"{prev}","hash":"{hash}"}}"#)
            .into_bytes()
    }

    #[test]
    fn an_edited_line_and_a_rewritten_chain_both_show() {
        let a = line("2026-01-01T00:00:01Z", "0", "a1", "x");
        let b = line("2026-01-01T00:00:02Z", "a1", "b2", "x");
        let fleet = vec![a.clone(), b.clone()];
        let head = Head {
            sidecar: "s".into(),
            at: "t".into(),
            ts: "2026-01-01T00:00:02Z".into(),
            hash: "b2".into(),
            lines: 2,
        };
        let same = compare(&fleet, &fleet, std::slice::from_ref(&head));
        assert!(same.problems.is_empty(), "{:?}", same.problems);
        assert_eq!((same.matched, same.heads_matched), (2, 1));
        // The same hash, other bytes: edited without re-chaining.
        let edited = line("2026-01-01T00:00:02Z", "a1", "b2", "y");
        let c = compare(&[a.clone(), edited], &fleet, std::slice::from_ref(&head));
        assert_eq!(c.problems.len(), 1, "{:?}", c.problems);
        assert!(c.problems[0].contains("differs"));
        // Edited and re-chained: the fleet's line and head are no longer here.
        let rechained = line("2026-01-01T00:00:02Z", "a1", "c3", "y");
        let c = compare(&[a, rechained], &fleet, &[head]);
        assert_eq!(
            c.problems.len(),
            1,
            "one report per missing hash: {:?}",
            c.problems
        );
        assert!(c.problems[0].contains("c3"));
    }

    #[test]
    fn a_log_replaced_or_started_elsewhere_does_not_pass() {
        let g = crate::audit::GENESIS;
        let a = line("2026-01-01T00:00:01Z", g, "a1", "x");
        let b = line("2026-01-01T00:00:02Z", "a1", "b2", "x");
        let fleet = vec![a.clone(), b.clone()];
        let head = Head {
            sidecar: "s".into(),
            at: "t".into(),
            ts: "2026-01-01T00:00:02Z".into(),
            hash: "b2".into(),
            lines: 2,
        };
        // One forged genesis line dated after everything the fleet holds.
        let forged = line("2099-01-01T00:00:00Z", g, "f0", "x");
        let c = compare(&[forged], &fleet, std::slice::from_ref(&head));
        assert_eq!(c.matched, 0);
        assert_eq!(
            c.problems.len(),
            2,
            "two lines (the head is the second): {:?}",
            c.problems
        );
        // A file that begins after a line nobody published.
        let orphan = line("2099-01-01T00:00:00Z", "zz", "f1", "x");
        let c = compare(&[orphan], &fleet, std::slice::from_ref(&head));
        assert!(c.problems[0].contains("not the log"), "{:?}", c.problems);
        // A rotated-away first file: the rest still has to match, and does.
        let c = compare(
            std::slice::from_ref(&b),
            &fleet,
            std::slice::from_ref(&head),
        );
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        assert_eq!((c.matched, c.heads_matched), (1, 1));
        // A hostile hash with multi-byte characters is reported, not a panic.
        let odd = Head {
            hash: "aaaaaaaaaaaaaaa\u{20ac}\u{20ac}".into(),
            ..head
        };
        let c = compare(&fleet, &fleet, &[odd]);
        assert_eq!(c.problems.len(), 1, "{:?}", c.problems);
    }
}
