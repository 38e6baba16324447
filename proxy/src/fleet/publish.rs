//! Copies every committed decision-log batch to the fleet stream (`eastwall.log.<name>`) and the chain head every `[fleet] head_interval` (`eastwall.log.<name>.head`), never delaying an admission.
//!
//! The local, fsync'd log stays the record. This task reads the log's tap (bounded: a full
//! queue drops a batch, counted in `eastwall_fleet_lines_dropped_total`), so a slow or absent
//! NATS costs the fleet copy lines, never the sidecar its admissions. What the copy holds is
//! what `audit verify --fleet` compares a local file against: a line rewritten on the host
//! after it was published no longer matches.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use serde_json::Value;
use sha2::Digest;
use tokio::sync::watch;

use super::bundle::{head_subject, log_subject, rfc3339, Head};
use crate::audit::Tap;
use crate::metrics::Metrics;

/// How long a failed publish waits before it is tried again.
const RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// Batches larger than this are split at line boundaries (NATS' default max payload is 1 MiB).
const MAX_MESSAGE: usize = 512 * 1024;

/// The last line a batch ended with: its `ts` and `hash`.
fn last_line(batch: &[u8]) -> Option<(String, String)> {
    let line = batch.split(|&b| b == b'\n').rev().find(|l| !l.is_empty())?;
    let v: Value = serde_json::from_slice(line).ok()?;
    Some((
        v.get("ts")?.as_str()?.to_owned(),
        v.get("hash")?.as_str()?.to_owned(),
    ))
}

/// Splits a batch of whole lines into messages of at most [`MAX_MESSAGE`] bytes (a single
/// longer line is sent alone).
fn chunks(batch: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut end = 0;
    for (i, &b) in batch.iter().enumerate() {
        if b != b'\n' {
            continue;
        }
        if i + 1 - start > MAX_MESSAGE && end > start {
            out.push(&batch[start..end]);
            start = end;
        }
        end = i + 1;
    }
    if end > start {
        out.push(&batch[start..end]);
    }
    out
}

fn count_lines(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
}

/// Runs until `stop` changes, then publishes what is queued (bounded by the request timeout).
pub async fn run(
    client: async_nats::Client,
    settings: eastwall_config::FleetSettings,
    mut tap: Tap,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let name = settings.name.clone();
    let head_interval = settings.head_interval;
    let js = async_nats::jetstream::new(client);
    let mut ready = false;
    let subject = log_subject(&name);
    let heads = head_subject(&name);
    let mut published: u64 = 0;
    let mut last: Option<(String, String)> = None;
    let mut head_sent: Option<String> = None;
    let mut ticker = tokio::time::interval(head_interval);
    let mut seen_dropped = 0;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            batch = tap.rx.recv() => {
                let Some(batch) = batch else { break };
                let lines = count_lines(&batch);
                // Retried until NATS takes it: meanwhile the tap's bounded queue holds what
                // the log commits, and drops (counted) only once it is full.
                loop {
                    if !ready {
                        // Opened, not created: `eastwall fleet init` makes it.
                        ready = js.get_stream(&settings.stream).await.is_ok();
                    }
                    if ready && send(&js, &subject, &batch).await {
                        published += lines;
                        metrics.fleet.published.inc_by(lines);
                        if let Some(l) = last_line(&batch) { last = Some(l); }
                        break;
                    }
                    tokio::select! {
                        _ = stop.changed() => return,
                        () = tokio::time::sleep(RETRY) => {}
                    }
                }
            }
            _ = ticker.tick() => {
                if let Some((ts, hash)) = &last {
                    if head_sent.as_ref() != Some(hash) {
                        let head = Head {
                            sidecar: name.clone(),
                            at: rfc3339(SystemTime::now()),
                            ts: ts.clone(),
                            hash: hash.clone(),
                            lines: published,
                        };
                        let body = serde_json::to_vec(&head).unwrap_or_default();
                        if publish_acked(&js, &heads, Bytes::from(body)).await {
                            head_sent = Some(hash.clone());
                        }
                    }
                }
            }
        }
        let dropped = tap.dropped.load(Ordering::Relaxed);
        if dropped > seen_dropped {
            metrics.fleet.dropped.inc_by(dropped - seen_dropped);
            seen_dropped = dropped;
        }
    }
    while let Ok(batch) = tap.rx.try_recv() {
        if !send(&js, &subject, &batch).await {
            break;
        }
    }
}

/// Publishes one batch (in chunks), waiting for JetStream's acknowledgement of each.
async fn send(js: &async_nats::jetstream::Context, subject: &str, batch: &[u8]) -> bool {
    for chunk in chunks(batch) {
        if !publish_acked(js, subject, Bytes::copy_from_slice(chunk)).await {
            return false;
        }
    }
    true
}

async fn publish_acked(js: &async_nats::jetstream::Context, subject: &str, body: Bytes) -> bool {
    // A retry after a lost acknowledgement must not store the lines twice: JetStream drops
    // a second message with the same id inside its duplicate window.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "Nats-Msg-Id",
        hex::encode(&sha2::Sha256::digest(&body)[..16]),
    );
    let attempt = async {
        let ack = js
            .publish_with_headers(subject.to_owned(), headers, body)
            .await
            .ok()?;
        ack.await.ok()
    };
    match tokio::time::timeout(super::client::REQUEST_TIMEOUT, attempt).await {
        Ok(Some(_)) => true,
        _ => {
            tracing::debug!(subject, "fleet publish failed; the local log has the lines");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_split_at_line_boundaries_and_keep_every_byte() {
        let line = format!("{}\n", "x".repeat(200 * 1024));
        let batch = line.repeat(5);
        let parts = chunks(batch.as_bytes());
        assert!(parts
            .iter()
            .all(|p| p.len() <= MAX_MESSAGE && p.ends_with(b"\n")));
        assert_eq!(parts.concat(), batch.as_bytes());
        assert_eq!(parts.len(), 3);
        let huge = format!("{}\n", "y".repeat(MAX_MESSAGE * 2));
        assert_eq!(chunks(huge.as_bytes()), vec![huge.as_bytes()]);
        assert!(chunks(b"").is_empty());
    }

    #[test]
    fn the_head_is_the_last_whole_line() {
        let batch = b"{\"ts\":\"a\",\"hash\":\"1\"}\n{\"ts\":\"b\",\"hash\":\"2\"}\n";
        assert_eq!(last_line(batch), Some(("b".into(), "2".into())));
        assert_eq!(last_line(b"not json\n"), None);
    }
}
