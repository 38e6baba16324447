//! `[audit] ocsf`: every committed decision-log line, converted by [`crate::ocsf::to_ocsf`], appended to a second file a SIEM can take without a parser.
//!
//! The sink reads the log's [`Tap`] on a thread of its own, so it never delays an admission:
//! a full queue drops a batch, counted in `eastwall_ocsf_lines_dropped_total`. It is a
//! derived export, not the record: the hash-chained log stays the source of truth, and
//! `eastwall audit ocsf` can rebuild the file from it at any time. Each batch is written with
//! one `write` and one `fdatasync`. The file is opened append-only, 0600, never through a
//! symbolic link; after a `log_reopened` line (SIGHUP, log rotation) it is reopened too, so
//! one logrotate rule can rotate both. A file that cannot be opened at start stops the start.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use crate::audit::{AuditLog, Tap};
use crate::metrics::Metrics;

/// Committed batches that may wait for the sink before new ones are dropped.
const QUEUE_BATCHES: usize = 4096;
/// How long stopping waits for the queue to be written.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// Why the OCSF file could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the OCSF file {} ([audit] ocsf): {source}", path.display())]
pub struct OcsfSinkError {
    path: PathBuf,
    source: std::io::Error,
}

/// The running sink: stop it to write what is queued.
pub struct OcsfSink {
    thread: crate::tap_thread::TapThread,
}

impl OcsfSink {
    /// Opens `path` and starts converting every line the log commits from now on.
    pub fn start(
        path: &Path,
        audit: &AuditLog,
        metrics: Arc<Metrics>,
    ) -> Result<OcsfSink, OcsfSinkError> {
        let refuse = |why: &str| OcsfSinkError {
            path: path.to_owned(),
            source: std::io::Error::other(why.to_owned()),
        };
        if crate::detection::same_place(path, audit.path()) {
            return Err(refuse("it is the decision log itself"));
        }
        let file = open(path).map_err(|source| OcsfSinkError {
            path: path.to_owned(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| OcsfSinkError {
            path: path.to_owned(),
            source,
        })?;
        if !meta.is_file() {
            return Err(refuse("not a regular file"));
        }
        {
            use std::os::unix::fs::MetadataExt;
            if meta.mode() & 0o077 != 0 {
                return Err(refuse(
                    "group or others may read or write it, and it holds every identity and address the log does; chmod 600 it",
                ));
            }
        }
        let tap = audit.tap(QUEUE_BATCHES);
        let owned = path.to_owned();
        let thread = crate::tap_thread::TapThread::spawn("eastwall-ocsf", move |rt, stopped| {
            run(rt, owned, file, tap, stopped, metrics)
        })
        .map_err(|source| OcsfSinkError {
            path: path.to_owned(),
            source,
        })?;
        Ok(OcsfSink { thread })
    }

    /// Writes what is queued and stops (bounded by [`STOP_WAIT`]).
    pub async fn stop(&self) {
        if !self.thread.stop(STOP_WAIT).await {
            tracing::error!("the OCSF file was not written to the end within {STOP_WAIT:?}");
        }
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    // O_NONBLOCK: a FIFO planted at the path fails (no reader) instead of hanging the start;
    // on a regular file it changes nothing.
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits())
        .open(path)
}

fn run(
    rt: tokio::runtime::Runtime,
    path: PathBuf,
    mut file: File,
    mut tap: Tap,
    mut stopped: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
) {
    let mut out = Vec::new();
    loop {
        let batch = rt.block_on(async {
            tokio::select! {
                batch = tap.rx.recv() => batch,
                _ = stopped.changed() => None,
            }
        });
        let Some(batch) = batch else { break };
        write(&path, &mut file, &batch, &mut out);
        metrics.set_ocsf_dropped(tap.dropped.load(Ordering::Relaxed));
    }
    while let Ok(batch) = tap.rx.try_recv() {
        write(&path, &mut file, &batch, &mut out);
    }
    metrics.set_ocsf_dropped(tap.dropped.load(Ordering::Relaxed));
}

/// Converts and appends one batch; reopens the file after a rotation line.
fn write(path: &Path, file: &mut File, batch: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut reopen = false;
    for raw in batch.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(line) = serde_json::from_slice::<Value>(raw) else {
            continue;
        };
        reopen |= line.get("event").and_then(Value::as_str) == Some("log_reopened");
        if let Some(event) = crate::ocsf::to_ocsf(&line) {
            if serde_json::to_writer(&mut *out, &event).is_ok() {
                out.push(b'\n');
            }
        }
    }
    if reopen {
        match open(path) {
            Ok(f) => *file = f,
            Err(err) => {
                tracing::error!(path = %path.display(), %err, "cannot reopen the OCSF file; still writing the old one")
            }
        }
    }
    if out.is_empty() {
        return;
    }
    if let Err(err) = file.write_all(out).and_then(|()| file.sync_data()) {
        tracing::error!(path = %path.display(), %err, "cannot write the OCSF file; the decision log still has every line (eastwall audit ocsf rebuilds it)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_existing_file_others_may_read_a_fifo_or_the_log_itself_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(&dir.path().join("decisions.log"))
            .await
            .unwrap();
        let metrics = Arc::new(Metrics::new());
        let path = dir.path().join("decisions.ocsf.jsonl");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = OcsfSink::start(&path, &log, metrics.clone()).err().unwrap();
        assert!(
            err.to_string().contains("group or others may read"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Must fail at once, not wait for a reader.
        let err = tokio::time::timeout(Duration::from_secs(5), async {
            OcsfSink::start(&path, &log, metrics.clone()).err()
        })
        .await
        .expect("a FIFO must not hang the start")
        .unwrap();
        assert!(!err.to_string().is_empty());
        let same = dir.path().join("sub/../decisions.log");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let err = OcsfSink::start(&same, &log, metrics).err().unwrap();
        assert!(err.to_string().contains("decision log itself"), "{err}");
    }

    #[test]
    fn a_link_planted_at_the_path_is_refused_and_a_new_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "").unwrap();
        let path = dir.path().join("decisions.ocsf.jsonl");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(open(&path).is_err(), "a symbolic link is not followed");
        std::fs::remove_file(&path).unwrap();
        open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
