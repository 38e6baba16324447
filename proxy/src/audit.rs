//! The decision log: durable, hash-chained JSON lines written with group commit; `verify` checks the chain.
//!
//! # Line format
//!
//! One JSON object per line, UTF-8, terminated by `\n`, no whitespace between tokens
//! (serde_json's compact form). Fields in this order:
//!
//! `ts` (RFC 3339 UTC with microseconds, e.g. `2025-01-02T03:04:05.123456Z`), `conn_id`,
//! `event`, `decision` (`"allow"` | `"deny"` | `"challenge"` | null), `peer` (`ip:port` or
//! null), `spiffe_id`, `cert_serial`, `db_user`, `database`, `rule` (each a string or null),
//! `reason` (string), `alert` (bool), then any extra fields of the event (e.g. `duration_ms`,
//! `bytes_client_to_server`), then `prev` and `hash` (64 lowercase hex digits each).
//!
//! # Chain
//!
//! * `prev` of the first line is [`GENESIS`], 64 ASCII zeros; `prev` of every other line is the
//!   `hash` of the line before it.
//! * `hash` = lowercase hex of SHA-256 over the UTF-8 bytes of
//!   `prev` ‖ `"\n"` ‖ *body*, where *body* is the line exactly as written but without the
//!   `hash` field: the line text up to (not including) the final `,"hash":"`, followed by `}`.
//!
//! So an edited field breaks that line's `hash`; a removed, inserted or reordered line breaks
//! the next line's `prev`. An auditor can check a log without this program:
//!
//! ```python
//! import hashlib, json, sys
//! prev = "0" * 64
//! for n, line in enumerate(open(sys.argv[1], encoding="utf-8"), 1):
//!     assert line.endswith("\n"), f"line {n}: truncated"
//!     line = line[:-1]
//!     rec = json.loads(line)
//!     assert rec["prev"] == prev, f"line {n}: prev does not chain"
//!     body = line[: line.rindex(',"hash":"')] + "}"
//!     assert hashlib.sha256((prev + "\n" + body).encode()).hexdigest() == rec["hash"], f"line {n}: edited"
//!     prev = rec["hash"]
//! ```
//!
//! [`verify`] does the same by parsing each line (field order preserved), removing `hash` and
//! re-serializing, which yields the identical body for every line this module writes.
//!
//! # Durability
//!
//! [`AuditLog::record`] returns only after its line is written and `fdatasync`ed. One writer
//! thread owns the file: it takes every entry queued while the previous `fdatasync` ran and
//! commits them with one write and one `fdatasync` (group commit), so concurrent connections
//! share the disk flush instead of queueing behind one flush each. If the write or the flush
//! fails, every entry of that batch gets the error (the proxy then refuses those clients), the
//! file is cut back to its last good length, and the next batch tries again.
//!
//! # Rotation
//!
//! [`AuditLog::reopen`] (the proxy command calls it on SIGHUP) reopens the configured path.
//! After `mv decisions.log decisions.log.1`, the path names a new, empty file: the writer
//! switches to it and its first line is a `log_reopened` event with `"rotated": true`,
//! whose `prev` is the last hash of the old file (also given as `previous_hash`), so the
//! chain runs on across files. If the path still names the same file, the writer keeps it
//! and the `log_reopened` line (`"rotated": false`) is just the next line of the chain.
//! [`verify`] accepts a file whose first line has a `prev` other than [`GENESIS`] only when
//! that line is such a rotation line, and reports where it continues from
//! ([`VerifyReport::first_prev`]); `eastwall audit verify decisions.log.1 decisions.log`
//! checks each file and that every file continues the one before it.
//!
//! Bytes after the last `\n` found when opening an existing log are a line the writer never
//! finished (a crash mid-write); it was never acknowledged, so no client was admitted on it.
//! [`AuditLog::open`] cuts it off, logging an error, so the chain continues cleanly.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

/// `prev` of the first line of a log: 64 ASCII zeros.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Longest string (in bytes) stored in any field; longer values are cut at a character
/// boundary and marked. Startup parameters are attacker-controlled and land in `db_user` and
/// `database`, so without a bound one client could make lines arbitrarily large.
pub const MAX_FIELD_BYTES: usize = 1024;

/// Most entries committed by one write + `fdatasync`; bounds the writer's buffer.
const MAX_BATCH: usize = 1024;

/// Queue depth between connection tasks and the writer; a full queue makes `record` wait,
/// which is the back-pressure we want when the disk is slow.
const QUEUE_DEPTH: usize = 4096;

/// `verify` refuses lines longer than this rather than reading an unbounded line into memory.
const MAX_LINE_BYTES: usize = 1 << 20;

/// The fixed fields, in the order they are written; extra fields with these names are dropped.
pub const FIELDS: [&str; 12] = [
    "ts",
    "conn_id",
    "event",
    "decision",
    "peer",
    "spiffe_id",
    "cert_serial",
    "db_user",
    "database",
    "rule",
    "reason",
    "alert",
];

const HASH_SEP: &str = ",\"hash\":\"";

/// One decision or session event, as the proxy reports it.
#[derive(Default, Clone, Debug)]
pub struct Entry {
    pub conn_id: String,
    /// `connect`, `session_end`, `cancel`, `mfa_challenge`, `mfa_success`, `mfa_failure`,
    /// `mfa_lockout`, `stepup`, `refusals_summary` (counted unauthenticated refusals, see
    /// `crate::refusals`), `log_reopened` (rotation), `low_disk_space`, ...
    pub event: &'static str,
    /// `allow`, `deny` or `challenge`; None only for events that carry no decision.
    pub decision: Option<&'static str>,
    pub peer: Option<SocketAddr>,
    pub spiffe_id: Option<String>,
    pub cert_serial: Option<String>,
    pub db_user: Option<String>,
    pub database: Option<String>,
    pub rule: Option<String>,
    pub reason: String,
    pub alert: bool,
    /// Event-specific fields written after `alert`, e.g. `duration_ms`, `tls_version`.
    pub extra: Map<String, Value>,
}

/// Why the decision log could not be opened or written. Each names the file and the OS error.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open decision log {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot read the end of decision log {} to continue its chain: {source}", path.display())]
    ReadTail { path: PathBuf, source: io::Error },
    #[error("cannot write decision log {}: {source}", path.display())]
    Write {
        path: PathBuf,
        // Shared: one failed write or flush is reported to every entry of its batch.
        source: Arc<io::Error>,
    },
    #[error("decision log {} is closed: its writer stopped", path.display())]
    Closed { path: PathBuf },
    #[error("cannot start the decision log writer for {}: {source}", path.display())]
    Spawn { path: PathBuf, source: io::Error },
}

/// Learns of every line the writer handled: how long it waited and was written (queue,
/// write, `fdatasync`) and whether it reached the disk. Called on the writer thread, after
/// the batch's flush: it must be cheap and must not block.
pub trait Observer: Send + Sync + 'static {
    fn written(&self, entry: &Entry, took: Duration, ok: bool);
}

/// What the writer shares with the handles: set once, read per batch.
#[derive(Default)]
struct Watch {
    observer: OnceLock<Arc<dyn Observer>>,
    /// Whether the last write or flush succeeded (true until one fails).
    last_ok: AtomicBool,
    /// Readers of every committed batch ([`AuditLog::tap`]).
    taps: std::sync::Mutex<Vec<TapSender>>,
}

/// The writer's end of a tap.
struct TapSender {
    tx: mpsc::Sender<Arc<[u8]>>,
    dropped: Arc<AtomicU64>,
}

/// Every batch of lines the log commits from now on, as written (whole lines, each ending
/// in `\n`), in commit order: what the inline detectors and the OCSF export read.
///
/// The writer never waits for a tap: a batch that finds the queue full is dropped and its
/// lines are counted in [`Tap::dropped`]. The log itself is the record; a tap is a reader.
pub struct Tap {
    pub rx: mpsc::Receiver<Arc<[u8]>>,
    /// Lines this tap missed because its queue was full.
    pub dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("last_ok", &self.last_ok)
            .finish_non_exhaustive()
    }
}

/// The decision log; clones share one file and one writer thread.
#[derive(Clone, Debug)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    tx: mpsc::Sender<Request>,
    fsyncs: Arc<AtomicU64>,
    watch: Arc<Watch>,
}

type Done = oneshot::Sender<Result<(), Arc<io::Error>>>;

struct Request {
    entry: Entry,
    ts: String,
    done: Done,
    /// When the caller queued it, for [`Observer::written`].
    queued: Instant,
    /// Reopen the path first (log rotation); the entry is the `log_reopened` line.
    reopen: bool,
}

impl AuditLog {
    /// Opens `path` for appending, creating it with mode 0600, and continues the chain from
    /// its last line. A broken chain does not stop the proxy (`audit verify` is the check);
    /// it is logged at error level.
    pub async fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let owned = path.to_path_buf();
        let opened = tokio::task::spawn_blocking(move || {
            make_folder(&owned)?;
            open_blocking(&owned)
        })
        .await
        .map_err(|join| AuditError::Spawn {
            path: path.to_path_buf(),
            source: io::Error::other(join.to_string()),
        })??;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let fsyncs = Arc::new(AtomicU64::new(0));
        let watch = Arc::new(Watch::default());
        watch.last_ok.store(true, Ordering::Relaxed);
        let writer = Writer {
            watch: Arc::clone(&watch),
            path: path.to_path_buf(),
            identity: opened.identity,
            file: opened.file,
            regular: opened.regular,
            good_len: opened.len,
            dirty: false,
            prev: opened.prev,
            fsyncs: Arc::clone(&fsyncs),
        };
        std::thread::Builder::new()
            .name("eastwall-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| AuditError::Spawn {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(AuditLog {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                tx,
                fsyncs,
                watch,
            }),
        })
    }

    /// Appends `entry` and returns once it is on disk. An error means the line is not in the
    /// log: the caller must refuse whatever the entry admits.
    pub async fn record(&self, entry: Entry) -> Result<(), AuditError> {
        self.send(entry, false).await
    }

    /// Reopens the log's path (after rotation) and writes a `log_reopened` line there; see
    /// the module doc. On an error the writer keeps the file it had.
    pub async fn reopen(&self) -> Result<(), AuditError> {
        let entry = Entry {
            conn_id: crate::identity::new_conn_id(),
            event: "log_reopened",
            reason: "sighup".into(),
            ..Entry::default()
        };
        self.send(entry, true).await
    }

    async fn send(&self, entry: Entry, reopen: bool) -> Result<(), AuditError> {
        let ts = now_rfc3339();
        let (done, wait) = oneshot::channel();
        let request = Request {
            entry,
            ts,
            done,
            queued: Instant::now(),
            reopen,
        };
        if self.inner.tx.send(request).await.is_err() {
            return Err(self.closed());
        }
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(AuditError::Write {
                path: self.inner.path.clone(),
                source,
            }),
            Err(_) => Err(self.closed()),
        }
    }

    /// How many `fdatasync` calls the writer has made; with group commit this grows slower
    /// than the number of entries under concurrency.
    pub fn fsync_count(&self) -> u64 {
        self.inner.fsyncs.load(Ordering::Relaxed)
    }

    /// Hands every line written from now on to `observer` (the metrics); only the first
    /// observer set is kept.
    pub fn observe(&self, observer: Arc<dyn Observer>) {
        let _ = self.inner.watch.observer.set(observer);
    }

    /// A new reader of every committed batch, with room for `depth` batches (see [`Tap`]).
    pub fn tap(&self, depth: usize) -> Tap {
        let (tx, rx) = mpsc::channel(depth.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        self.inner
            .watch
            .taps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(TapSender {
                tx,
                dropped: Arc::clone(&dropped),
            });
        Tap { rx, dropped }
    }

    /// Whether the last write reached the disk (readiness: a log that cannot be written
    /// refuses every connection).
    pub fn last_write_ok(&self) -> bool {
        self.inner.watch.last_ok.load(Ordering::Relaxed)
    }

    /// The file this log writes to.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn closed(&self) -> AuditError {
        AuditError::Closed {
            path: self.inner.path.clone(),
        }
    }
}

struct Opened {
    file: File,
    /// Device and inode, to tell on reopen whether the path still names the same file.
    identity: Option<(u64, u64)>,
    regular: bool,
    len: u64,
    prev: String,
}

/// At start, a missing folder is made, private, as `mfa/` is: a fresh layout needs no
/// mkdir. A reopen (rotation) does not: a folder moved away is an operator's mistake to
/// report, and the writer keeps the file it has.
fn make_folder(path: &Path) -> Result<(), AuditError> {
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    if dir.exists() {
        return Ok(());
    }
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| AuditError::Open {
            path: path.to_path_buf(),
            source,
        })
}

fn open_blocking(path: &Path) -> Result<Opened, AuditError> {
    let open_err = |source| AuditError::Open {
        path: path.to_path_buf(),
        source,
    };
    let tail_err = |source| AuditError::ReadTail {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if meta.is_dir() {
        return Err(open_err(io::Error::other("it is a directory")));
    }
    // A device or pipe (e.g. /dev/stdout in a container) has no tail to read or cut back;
    // such a log starts its chain at genesis.
    if !meta.is_file() {
        return Ok(Opened {
            file,
            identity: Some((meta.dev(), meta.ino())),
            regular: false,
            len: 0,
            prev: GENESIS.to_owned(),
        });
    }
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.mode() & 0o777),
            "decision log is readable or writable by group or others");
    }
    let mut file = file;
    let (last_line, complete_len) = read_last_line(&mut file, meta.len()).map_err(tail_err)?;
    if complete_len < meta.len() {
        tracing::error!(path = %path.display(), bytes = meta.len() - complete_len,
            "decision log ends in an unfinished line (the writer was interrupted); cutting it off");
        file.set_len(complete_len).map_err(tail_err)?;
        file.sync_data().map_err(tail_err)?;
    }
    let prev = match last_line {
        None => GENESIS.to_owned(),
        Some(line) => match last_hash(&line) {
            Some(hash) => hash,
            None => {
                tracing::error!(path = %path.display(),
                    "last line of the decision log has no valid hash; continuing the chain from genesis (run `eastwall audit verify`)");
                GENESIS.to_owned()
            }
        },
    };
    Ok(Opened {
        file,
        identity: Some((meta.dev(), meta.ino())),
        regular: true,
        len: complete_len,
        prev,
    })
}

/// Returns the last complete line (without its `\n`) and the length of the file up to and
/// including that line's `\n`, reading backwards in chunks so a large log costs little.
fn read_last_line(file: &mut File, len: u64) -> io::Result<(Option<Vec<u8>>, u64)> {
    const CHUNK: u64 = 64 * 1024;
    let mut tail: Vec<u8> = Vec::new();
    let mut start = len;
    let mut complete_len: Option<u64> = None;
    loop {
        if let Some(end) = complete_len {
            // Looking for the newline before the last complete line.
            let line_end = (end - start) as usize - 1;
            if let Some(nl) = tail[..line_end].iter().rposition(|&b| b == b'\n') {
                return Ok((Some(tail[nl + 1..line_end].to_vec()), end));
            }
            if start == 0 {
                return Ok((Some(tail[..line_end].to_vec()), end));
            }
            if line_end as u64 > MAX_LINE_BYTES as u64 {
                return Err(io::Error::other("last line is longer than 1 MiB"));
            }
        } else if let Some(nl) = tail.iter().rposition(|&b| b == b'\n') {
            complete_len = Some(start + nl as u64 + 1);
            continue;
        } else if start == 0 {
            return Ok((None, 0));
        }
        let step = CHUNK.min(start);
        start -= step;
        let mut chunk = vec![0u8; step as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&tail);
        tail = chunk;
    }
}

fn last_hash(line: &[u8]) -> Option<String> {
    let map: Map<String, Value> = serde_json::from_slice(line).ok()?;
    match map.get("hash") {
        Some(Value::String(h)) if is_hex64(h) => Some(h.clone()),
        _ => None,
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

struct Writer {
    path: PathBuf,
    identity: Option<(u64, u64)>,
    file: File,
    regular: bool,
    /// Length of the file up to the last fully committed line.
    good_len: u64,
    /// A failed batch may have left partial bytes that could not be cut off yet.
    dirty: bool,
    prev: String,
    fsyncs: Arc<AtomicU64>,
    watch: Arc<Watch>,
}

impl Writer {
    /// Hands a committed batch of `lines` lines to every tap, never waiting: a full tap
    /// misses it (counted), a closed one is forgotten.
    fn pour(&self, bytes: &[u8], lines: usize) {
        let mut taps = self.watch.taps.lock().unwrap_or_else(|p| p.into_inner());
        if taps.is_empty() {
            return;
        }
        let shared: Arc<[u8]> = Arc::from(bytes);
        taps.retain(|tap| match tap.tx.try_send(Arc::clone(&shared)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tap.dropped.fetch_add(lines as u64, Ordering::Relaxed);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
    }

    /// Records the outcome of a write for readiness and tells the observer.
    fn tell(&self, req: &Request, ok: bool) {
        if let Some(observer) = self.watch.observer.get() {
            observer.written(&req.entry, req.queued.elapsed(), ok);
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut batch: Vec<Request> = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        // A reopen found while batching waits for the entries queued before it.
        let mut pending: Option<Request> = None;
        // Ends when every AuditLog clone is gone and the queue is drained.
        loop {
            let first = match pending.take() {
                Some(req) => req,
                None => match rx.blocking_recv() {
                    Some(req) => req,
                    None => break,
                },
            };
            if first.reopen {
                let Request {
                    mut entry,
                    ts,
                    done,
                    queued,
                    ..
                } = first;
                let outcome = self.reopen_and_record(&mut entry, &ts, &mut buf);
                self.watch.last_ok.store(outcome.is_ok(), Ordering::Relaxed);
                if outcome.is_ok() {
                    self.pour(&buf, 1);
                }
                if let Some(observer) = self.watch.observer.get() {
                    observer.written(&entry, queued.elapsed(), outcome.is_ok());
                }
                let _ = done.send(outcome);
                continue;
            }
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(req) if req.reopen => {
                        pending = Some(req);
                        break;
                    }
                    Ok(req) => batch.push(req),
                    Err(_) => break,
                }
            }
            buf.clear();
            let mut prev = self.prev.clone();
            for req in &batch {
                prev = encode_line(&req.entry, &req.ts, &prev, &mut buf);
            }
            let outcome = self.commit(&buf).map_err(Arc::new);
            if outcome.is_ok() {
                self.prev = prev;
                self.pour(&buf, batch.len());
            } else if let Err(err) = &outcome {
                tracing::error!(error = %err, entries = batch.len(),
                    "decision log write failed; refusing the connections it would admit");
            }
            self.watch.last_ok.store(outcome.is_ok(), Ordering::Relaxed);
            for req in batch.drain(..) {
                self.tell(&req, outcome.is_ok());
                // The caller may have gone away (client hung up); nothing to tell it then.
                let _ = req.done.send(outcome.clone());
            }
        }
    }

    /// Switches to the file now at the path if it is another one (rotation), then writes
    /// the `log_reopened` line.
    fn reopen_and_record(
        &mut self,
        entry: &mut Entry,
        ts: &str,
        buf: &mut Vec<u8>,
    ) -> Result<(), Arc<io::Error>> {
        let previous = self.prev.clone();
        let now_there = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let rotated = now_there.is_none() || now_there != self.identity;
        if rotated {
            let opened = open_blocking(&self.path).map_err(|err| {
                tracing::error!(%err, "cannot reopen the decision log; still writing the old file");
                Arc::new(io::Error::other(err.to_string()))
            })?;
            // A new, empty file continues this chain; a file that already has lines (not a
            // rotation we were told about) continues its own, as at startup.
            let continues_own = opened.regular && opened.len > 0;
            self.prev = if continues_own {
                opened.prev
            } else {
                previous.clone()
            };
            self.file = opened.file;
            self.identity = opened.identity;
            self.regular = opened.regular;
            self.good_len = opened.len;
            self.dirty = false;
            tracing::info!(path = %self.path.display(), "decision log reopened");
        }
        entry.extra.insert("rotated".into(), Value::Bool(rotated));
        entry
            .extra
            .insert("previous_hash".into(), Value::String(previous));
        buf.clear();
        let hash = encode_line(entry, ts, &self.prev, buf);
        let outcome = self.commit(buf).map_err(Arc::new);
        if outcome.is_ok() {
            self.prev = hash;
        }
        outcome
    }

    fn commit(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.dirty {
            self.rollback()?;
        }
        let result = self.file.write_all(buf).and_then(|()| {
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
            self.file.sync_data()
        });
        match result {
            Ok(()) => {
                self.good_len += buf.len() as u64;
                Ok(())
            }
            Err(err) => {
                // After a failed write or flush the tail is unknown; cut back to the last good
                // line so the next batch does not append to a half-written one.
                self.dirty = true;
                if let Err(cut) = self.rollback() {
                    tracing::error!(error = %cut, "cannot cut the decision log back after a failed write");
                }
                Err(err)
            }
        }
    }

    fn rollback(&mut self) -> io::Result<()> {
        if self.regular {
            self.file.set_len(self.good_len)?;
            self.file.sync_data()?;
        }
        self.dirty = false;
        Ok(())
    }
}

/// Appends the line for `entry` (with `\n`) to `buf` and returns its hash.
fn encode_line(entry: &Entry, ts: &str, prev: &str, buf: &mut Vec<u8>) -> String {
    let opt = |s: &Option<String>| match s {
        Some(s) => Value::String(cap(s)),
        None => Value::Null,
    };
    let mut map = Map::new();
    map.insert("ts".into(), Value::String(ts.to_owned()));
    map.insert("conn_id".into(), Value::String(cap(&entry.conn_id)));
    map.insert("event".into(), Value::String(cap(entry.event)));
    map.insert(
        "decision".into(),
        entry
            .decision
            .map_or(Value::Null, |d| Value::String(cap(d))),
    );
    map.insert(
        "peer".into(),
        entry
            .peer
            .map_or(Value::Null, |p| Value::String(p.to_string())),
    );
    map.insert("spiffe_id".into(), opt(&entry.spiffe_id));
    map.insert("cert_serial".into(), opt(&entry.cert_serial));
    map.insert("db_user".into(), opt(&entry.db_user));
    map.insert("database".into(), opt(&entry.database));
    map.insert("rule".into(), opt(&entry.rule));
    map.insert("reason".into(), Value::String(cap(&entry.reason)));
    map.insert("alert".into(), Value::Bool(entry.alert));
    for (key, value) in &entry.extra {
        if FIELDS.contains(&key.as_str()) || key == "prev" || key == "hash" {
            tracing::warn!(field = %key, "extra audit field would shadow a fixed one; dropped");
            continue;
        }
        // A statement's text is capped (and marked) by the statement audit at its own,
        // larger bound.
        let value = match value {
            Value::String(text) if key == "text" => {
                Value::String(cap_at(text, crate::statement_audit::MAX_TEXT_BYTES))
            }
            other => cap_value(other),
        };
        map.insert(cap(key), value);
    }
    map.insert("prev".into(), Value::String(prev.to_owned()));
    // A Map of strings, bools and JSON values cannot fail to serialize.
    let body = serde_json::to_string(&Value::Object(map)).unwrap_or_else(|_| String::from("{}"));
    let hash = chain_hash(prev, &body);
    // The body ends in `}`: splice the hash in as the last field.
    buf.extend_from_slice(&body.as_bytes()[..body.len() - 1]);
    buf.extend_from_slice(HASH_SEP.as_bytes());
    buf.extend_from_slice(hash.as_bytes());
    buf.extend_from_slice(b"\"}\n");
    hash
}

fn chain_hash(prev: &str, body: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(body.as_bytes());
    hex::encode(h.finalize())
}

fn cap(s: &str) -> String {
    cap_at(s, MAX_FIELD_BYTES)
}

fn cap_at(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...[truncated, {} bytes]", &s[..end], s.len())
}

fn cap_value(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(cap(s)),
        Value::Array(items) => Value::Array(items.iter().map(cap_value).collect()),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (cap(k), cap_value(v))).collect())
        }
        other => other.clone(),
    }
}

fn now_rfc3339() -> String {
    const FORMAT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(FORMAT)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00.000000Z"))
}

/// Free space on a filesystem, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Available to this (unprivileged) process.
    pub available: u64,
    pub total: u64,
}

/// Free space is low below this many bytes...
pub const LOW_SPACE_BYTES: u64 = 64 * 1024 * 1024;
/// ...or below this fraction of the filesystem (in percent), whichever is larger.
pub const LOW_SPACE_PERCENT: u64 = 1;

/// Free space on the filesystem that holds `path` (the log file, or its folder if the file
/// is gone).
pub fn free_space(path: &Path) -> io::Result<Space> {
    let stat = nix::sys::statvfs::statvfs(path)
        .or_else(|_| nix::sys::statvfs::statvfs(path.parent().unwrap_or(Path::new("."))))
        .map_err(io::Error::from)?;
    let unit = stat.fragment_size() as u64;
    Ok(Space {
        available: (stat.blocks_available() as u64).saturating_mul(unit),
        total: (stat.blocks() as u64).saturating_mul(unit),
    })
}

impl Space {
    /// Below [`LOW_SPACE_BYTES`] or [`LOW_SPACE_PERCENT`] of the total.
    pub fn is_low(&self) -> bool {
        let percent = self.total / 100 * LOW_SPACE_PERCENT;
        self.available < LOW_SPACE_BYTES.max(percent)
    }
}

/// A change worth reporting in free space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskChange {
    Low,
    Recovered,
}

/// Remembers whether space was low, so that the decision log gets one line when it becomes
/// low (not one a minute) and the recovery is noted.
#[derive(Debug, Default)]
pub struct DiskWatch {
    low: bool,
}

impl DiskWatch {
    pub fn observe(&mut self, space: Space) -> Option<DiskChange> {
        let low = space.is_low();
        let change = match (self.low, low) {
            (false, true) => Some(DiskChange::Low),
            (true, false) => Some(DiskChange::Recovered),
            _ => None,
        };
        self.low = low;
        change
    }

    pub fn is_low(&self) -> bool {
        self.low
    }
}

/// A log whose chain is intact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub lines: usize,
    /// `hash` of the last line, or [`GENESIS`] for an empty log.
    pub last_hash: String,
    /// `prev` of the first line: [`GENESIS`], or for a file that starts with a rotation line,
    /// the last hash of the file it continues.
    pub first_prev: String,
}

/// Why a log does not verify: the file could not be read, or the first bad line.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{}: cannot read: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}:{line}: {problem}", path.display())]
    Line {
        path: PathBuf,
        /// 1-based.
        line: usize,
        problem: LineProblem,
    },
}

impl VerifyError {
    /// The 1-based number of the first bad line, if the file could be read.
    pub fn line(&self) -> Option<usize> {
        match self {
            VerifyError::Io { .. } => None,
            VerifyError::Line { line, .. } => Some(*line),
        }
    }
}

/// What is wrong with a line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LineProblem {
    #[error("truncated: the last line has no newline (the writer was interrupted mid-line)")]
    Truncated,
    #[error("line is longer than {MAX_LINE_BYTES} bytes")]
    TooLong,
    #[error("not a JSON object: {0}")]
    Unparseable(String),
    #[error("missing or invalid field `{0}`")]
    Field(&'static str),
    #[error("fields out of order: `{found}` where `{expected}` belongs")]
    Order {
        expected: &'static str,
        found: String,
    },
    #[error("prev does not match the previous line's hash: a line before this one was removed, inserted or reordered (prev {found}, expected {expected})")]
    Prev { expected: String, found: String },
    #[error("line is not in the exact form the writer produces (whitespace, escaping or a duplicate field was changed)")]
    NotCanonical,
    #[error("hash does not match the line's content: the line was edited (stored {stored}, computed {computed})")]
    Hash { stored: String, computed: String },
}

/// Checks the whole chain of the log at `path`; reports the first bad line.
pub fn verify(path: &Path) -> Result<VerifyReport, VerifyError> {
    verify_each(path, |_, _| {})
}

/// [`verify`], handing each line to `each` (its 1-based number and its text without `\n`)
/// once it and every line before it have checked, in the same read: what `each` sees is what
/// was verified, even if the file changes meanwhile.
pub fn verify_each(
    path: &Path,
    mut each: impl FnMut(usize, &[u8]),
) -> Result<VerifyReport, VerifyError> {
    let io_err = |source| VerifyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let mut reader = BufReader::new(file);
    let mut prev = GENESIS.to_owned();
    let mut first_prev = GENESIS.to_owned();
    let mut line = Vec::new();
    let mut n = 0usize;
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(io_err)?;
        if read == 0 {
            return Ok(VerifyReport {
                lines: n,
                last_hash: prev,
                first_prev,
            });
        }
        n += 1;
        let bad = |problem| VerifyError::Line {
            path: path.to_path_buf(),
            line: n,
            problem,
        };
        if line.last() != Some(&b'\n') {
            return Err(bad(if line.len() > MAX_LINE_BYTES {
                LineProblem::TooLong
            } else {
                LineProblem::Truncated
            }));
        }
        line.pop();
        if n == 1 {
            if let Some(continued) = rotation_start(&line) {
                prev = continued.clone();
                first_prev = continued;
            }
        }
        prev = check_line(&line, &prev).map_err(bad)?;
        each(n, &line);
    }
}

/// The `prev` a file's first line may start from when it is a rotation line (`log_reopened`,
/// `"rotated": true`, and `prev` equal to its `previous_hash`); None otherwise, and the
/// first line must then start at [`GENESIS`]. The line's own hash is still checked.
fn rotation_start(line: &[u8]) -> Option<String> {
    let map: Map<String, Value> = serde_json::from_slice(line).ok()?;
    let prev = map.get("prev")?.as_str()?;
    let rotation = map.get("event")? == "log_reopened"
        && map.get("rotated")? == &Value::Bool(true)
        && map.get("previous_hash")?.as_str()? == prev
        && is_hex64(prev);
    rotation.then(|| prev.to_owned())
}

/// Checks one line (without `\n`) against the previous hash; returns its hash.
fn check_line(line: &[u8], prev: &str) -> Result<String, LineProblem> {
    let mut map: Map<String, Value> =
        serde_json::from_slice(line).map_err(|e| LineProblem::Unparseable(e.to_string()))?;
    let keys: Vec<&str> = map.keys().map(String::as_str).collect();
    for (i, &expected) in FIELDS.iter().enumerate() {
        match keys.get(i) {
            Some(&key) if key == expected => {}
            Some(&key) if map.contains_key(expected) => {
                return Err(LineProblem::Order {
                    expected,
                    found: key.to_owned(),
                })
            }
            _ => return Err(LineProblem::Field(expected)),
        }
    }
    let n = keys.len();
    if n < FIELDS.len() + 2 || keys[n - 1] != "hash" {
        return Err(LineProblem::Field("hash"));
    }
    if keys[n - 2] != "prev" {
        return Err(LineProblem::Field("prev"));
    }
    let is_str = |f: &str| matches!(map.get(f), Some(Value::String(_)));
    let is_str_or_null = |f: &str| matches!(map.get(f), Some(Value::String(_) | Value::Null));
    for f in ["conn_id", "event", "reason"] {
        if !is_str(f) {
            return Err(LineProblem::Field(f));
        }
    }
    for f in [
        "decision",
        "peer",
        "spiffe_id",
        "cert_serial",
        "db_user",
        "database",
        "rule",
    ] {
        if !is_str_or_null(f) {
            return Err(LineProblem::Field(f));
        }
    }
    let ts_ok = match map.get("ts") {
        Some(Value::String(ts)) => {
            time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).is_ok()
        }
        _ => false,
    };
    if !ts_ok {
        return Err(LineProblem::Field("ts"));
    }
    if !matches!(map.get("alert"), Some(Value::Bool(_))) {
        return Err(LineProblem::Field("alert"));
    }
    let stored = match map.get("hash") {
        Some(Value::String(h)) if is_hex64(h) => h.clone(),
        _ => return Err(LineProblem::Field("hash")),
    };
    match map.get("prev") {
        Some(Value::String(p)) if is_hex64(p) => {
            if p != prev {
                return Err(LineProblem::Prev {
                    expected: prev.to_owned(),
                    found: p.clone(),
                });
            }
        }
        _ => return Err(LineProblem::Field("prev")),
    }
    map.shift_remove("hash");
    let body = serde_json::to_string(&Value::Object(map))
        .map_err(|e| LineProblem::Unparseable(e.to_string()))?;
    let computed = chain_hash(prev, &body);
    if computed != stored {
        return Err(LineProblem::Hash { stored, computed });
    }
    // The hash was checked over the re-serialized body; insisting that the text is exactly
    // that form keeps this check and the documented text-slicing one in agreement (no
    // whitespace, re-escaping or duplicate keys that one would accept and the other not).
    let canonical = body.len() + HASH_SEP.len() + 64 + 1 == line.len()
        && line.starts_with(&body.as_bytes()[..body.len() - 1])
        && line.ends_with(format!("{HASH_SEP}{stored}\"}}").as_bytes());
    if !canonical {
        return Err(LineProblem::NotCanonical);
    }
    Ok(stored)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: usize) -> Entry {
        let mut extra = Map::new();
        extra.insert("duration_ms".into(), Value::from(n as u64 * 7));
        Entry {
            conn_id: format!("c{n}"),
            event: "connect",
            decision: Some("allow"),
            peer: Some(SocketAddr::from(([127, 0, 0, 1], 40000 + n as u16))),
            spiffe_id: Some("spiffe://eastwall.test/billing".into()),
            cert_serial: Some("01ab".into()),
            db_user: Some("billing".into()),
            database: Some("billing".into()),
            rule: Some("billing-rw".into()),
            reason: "rule matched".into(),
            alert: false,
            extra,
        }
    }

    async fn write_log(path: &Path, n: usize) -> AuditLog {
        let log = AuditLog::open(path).await.unwrap();
        for i in 1..=n {
            log.record(entry(i)).await.unwrap();
        }
        log
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(path, text).unwrap();
    }

    fn bad_line(path: &Path) -> (usize, LineProblem) {
        match verify(path) {
            Err(VerifyError::Line { line, problem, .. }) => (line, problem),
            other => panic!("expected a bad line, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_tap_sees_every_committed_line_and_a_stuck_one_never_holds_the_log_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        let log = AuditLog::open(&path).await.unwrap();
        let mut reader = log.tap(1024);
        // The attack on the detectors: a reader that never reads, while lines keep coming.
        let stuck = log.tap(1);
        for i in 1..=50 {
            tokio::time::timeout(Duration::from_secs(5), log.record(entry(i)))
                .await
                .expect("a full tap must not make record wait")
                .unwrap();
        }
        let mut seen = Vec::new();
        while let Ok(batch) = reader.rx.try_recv() {
            seen.extend_from_slice(&batch);
        }
        let file = std::fs::read(&path).unwrap();
        assert_eq!(
            seen, file,
            "the tap holds the lines exactly as written, in order"
        );
        assert_eq!(reader.dropped.load(Ordering::Relaxed), 0);
        assert!(
            stuck.dropped.load(Ordering::Relaxed) >= 49,
            "the stuck tap's misses are counted"
        );
        // A closed tap is forgotten, and the log goes on.
        drop(reader);
        log.record(entry(51)).await.unwrap();
        assert_eq!(verify(&path).unwrap().lines, 51);
    }

    #[tokio::test]
    async fn a_missing_folder_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("var/log/eastwall/decisions.log");
        let log = AuditLog::open(&path).await.unwrap();
        log.record(entry(1)).await.unwrap();
        let mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(verify(&path).unwrap().lines, 1);
    }

    #[tokio::test]
    async fn records_round_trip_in_field_order_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        write_log(&path, 3).await;
        let report = verify(&path).unwrap();
        assert_eq!(report.lines, 3);
        let text = lines(&path);
        let first: Map<String, Value> = serde_json::from_str(&text[0]).unwrap();
        let keys: Vec<&str> = first.keys().map(String::as_str).collect();
        let mut expected: Vec<&str> = FIELDS.to_vec();
        expected.extend(["duration_ms", "prev", "hash"]);
        assert_eq!(keys, expected);
        assert_eq!(first["prev"], GENESIS);
        assert_eq!(first["peer"], "127.0.0.1:40001");
        assert_eq!(first["decision"], "allow");
        let ts = first["ts"].as_str().unwrap();
        assert!(
            ts.ends_with('Z') && ts.len() == "2025-01-02T03:04:05.123456Z".len(),
            "{ts}"
        );
        let last: Map<String, Value> = serde_json::from_str(&text[2]).unwrap();
        assert_eq!(last["hash"].as_str().unwrap(), report.last_hash);
        // The documented body: the line up to `,"hash":"` plus `}`, chained to prev.
        let second: Map<String, Value> = serde_json::from_str(&text[1]).unwrap();
        let body = format!("{}}}", &text[1][..text[1].rfind(HASH_SEP).unwrap()]);
        assert_eq!(
            chain_hash(first["hash"].as_str().unwrap(), &body),
            second["hash"].as_str().unwrap()
        );
        // Re-serializing the parsed line gives back the exact text.
        assert_eq!(
            serde_json::to_string(&Value::Object(second)).unwrap(),
            text[1]
        );
    }

    #[tokio::test]
    async fn an_empty_log_verifies_with_genesis() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        let _log = AuditLog::open(&path).await.unwrap();
        assert_eq!(
            verify(&path).unwrap(),
            VerifyReport {
                lines: 0,
                last_hash: GENESIS.into(),
                first_prev: GENESIS.into(),
            }
        );
    }

    #[tokio::test]
    async fn an_edited_field_fails_at_that_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        write_log(&path, 4).await;
        let mut text = lines(&path);
        text[1] = text[1].replace("\"decision\":\"allow\"", "\"decision\":\"deny\"");
        write_lines(&path, &text);
        assert!(matches!(bad_line(&path), (2, LineProblem::Hash { .. })));
    }

    #[tokio::test]
    async fn a_deleted_line_fails_at_its_successor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        write_log(&path, 4).await;
        let mut text = lines(&path);
        text.remove(1);
        write_lines(&path, &text);
        assert!(matches!(bad_line(&path), (2, LineProblem::Prev { .. })));
    }

    #[tokio::test]
    async fn swapped_lines_fail_at_the_first_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        write_log(&path, 4).await;
        let mut text = lines(&path);
        text.swap(1, 2);
        write_lines(&path, &text);
        assert!(matches!(bad_line(&path), (2, LineProblem::Prev { .. })));
    }

    #[tokio::test]
    async fn a_truncated_last_line_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        write_log(&path, 3).await;
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - 20]).unwrap();
        assert_eq!(bad_line(&path), (3, LineProblem::Truncated));
    }

    #[tokio::test]
    async fn reformatted_or_incomplete_lines_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        write_log(&path, 2).await;
        let good = lines(&path);

        let mut text = good.clone();
        text[0] = text[0].replacen(",", ", ", 1);
        write_lines(&path, &text);
        assert_eq!(bad_line(&path), (1, LineProblem::NotCanonical));

        let mut text = good.clone();
        text[1] = "not json".into();
        write_lines(&path, &text);
        assert!(matches!(bad_line(&path), (2, LineProblem::Unparseable(_))));

        let mut text = good.clone();
        text[1] = text[1].replace("\"alert\":false,", "");
        write_lines(&path, &text);
        assert_eq!(bad_line(&path), (2, LineProblem::Field("alert")));
    }

    #[tokio::test]
    async fn reopening_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        drop(write_log(&path, 2).await);
        let before = verify(&path).unwrap();
        let log = AuditLog::open(&path).await.unwrap();
        log.record(entry(3)).await.unwrap();
        let report = verify(&path).unwrap();
        assert_eq!(report.lines, 3);
        let third: Map<String, Value> = serde_json::from_str(&lines(&path)[2]).unwrap();
        assert_eq!(third["prev"].as_str().unwrap(), before.last_hash);
    }

    #[tokio::test]
    async fn reopening_after_a_crash_mid_line_drops_the_unfinished_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        drop(write_log(&path, 2).await);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"ts\":\"2025-").unwrap();
        drop(f);
        let log = AuditLog::open(&path).await.unwrap();
        log.record(entry(3)).await.unwrap();
        assert_eq!(verify(&path).unwrap().lines, 3);
    }

    #[tokio::test]
    async fn reopening_finds_the_last_line_across_read_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        let log = AuditLog::open(&path).await.unwrap();
        // Lines of ~1.5 KiB so the 64 KiB backward read splits one of them.
        for i in 0..100 {
            let mut e = entry(i);
            e.reason = "r".repeat(1000 + i);
            log.record(e).await.unwrap();
        }
        drop(log);
        let log = AuditLog::open(&path).await.unwrap();
        log.record(entry(100)).await.unwrap();
        assert_eq!(verify(&path).unwrap().lines, 101);
    }

    #[tokio::test]
    async fn a_new_log_is_private_to_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        let _log = AuditLog::open(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[tokio::test]
    async fn an_unopenable_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory, and a path under a regular file: root cannot open either.
        let err = AuditLog::open(dir.path()).await.unwrap_err();
        assert!(matches!(err, AuditError::Open { .. }), "{err}");
        let file = dir.path().join("plain");
        std::fs::write(&file, b"").unwrap();
        let err = AuditLog::open(&file.join("decisions.jsonl"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("plain/decisions.jsonl"), "{err}");
    }

    #[tokio::test]
    async fn the_observer_and_readiness_see_each_write_and_its_outcome() {
        #[derive(Default)]
        struct Seen(std::sync::Mutex<Vec<(&'static str, bool)>>);
        impl Observer for Seen {
            fn written(&self, entry: &Entry, _took: Duration, ok: bool) {
                self.0.lock().unwrap().push((entry.event, ok));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let good = AuditLog::open(&dir.path().join("d.log")).await.unwrap();
        let seen = Arc::new(Seen::default());
        good.observe(seen.clone());
        assert!(good.last_write_ok());
        good.record(entry(0)).await.unwrap();
        good.reopen().await.unwrap();
        assert!(good.last_write_ok());
        let full = AuditLog::open(Path::new("/dev/full")).await.unwrap();
        full.observe(seen.clone());
        assert!(full.last_write_ok(), "nothing failed yet");
        assert!(full.record(entry(1)).await.is_err());
        assert!(!full.last_write_ok());
        let seen = seen.0.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![
                (entry(0).event, true),
                ("log_reopened", true),
                (entry(1).event, false)
            ]
        );
    }

    #[tokio::test]
    async fn a_failing_disk_fails_every_record_and_keeps_failing_closed() {
        // /dev/full accepts open() but every write fails with ENOSPC.
        let log = AuditLog::open(Path::new("/dev/full")).await.unwrap();
        for i in 0..3 {
            let err = log.record(entry(i)).await.unwrap_err();
            assert!(matches!(err, AuditError::Write { .. }), "{err}");
            assert!(err.to_string().contains("/dev/full"), "{err}");
        }
        let batch: Vec<_> = (0..20).map(|i| log.record(entry(i))).collect();
        for result in futures_util::future::join_all(batch).await {
            assert!(result.is_err());
        }
    }

    #[tokio::test]
    async fn concurrent_records_share_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        let log = AuditLog::open(&path).await.unwrap();
        // 200 callers at once: while one fdatasync runs the rest queue and are committed
        // together, so the flush count stays far below the entry count (on ext4 here it is
        // typically 2-5; one fsync per entry would mean no group commit at all).
        let all: Vec<_> = (0..200)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.record(entry(i)).await })
            })
            .collect();
        for task in all {
            task.await.unwrap().unwrap();
        }
        assert_eq!(verify(&path).unwrap().lines, 200);
        let fsyncs = log.fsync_count();
        assert!(fsyncs < 200, "200 records took {fsyncs} fsyncs");
    }

    #[tokio::test]
    async fn hostile_strings_stay_on_one_bounded_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        let log = AuditLog::open(&path).await.unwrap();
        let nasty = "a\nb\r\0c\u{1b}[31m\"}\n{\"fake\":1}\u{2028}é";
        let mut e = entry(1);
        e.database = Some(nasty.into());
        e.db_user = Some("ü".repeat(50 * 1024)); // 100 KiB, two bytes per char
        log.record(e).await.unwrap();
        log.record(entry(2)).await.unwrap();
        let text = lines(&path);
        assert_eq!(text.len(), 2);
        assert!(text[0].len() < 4 * 1024, "line is {} bytes", text[0].len());
        let first: Map<String, Value> = serde_json::from_str(&text[0]).unwrap();
        assert_eq!(first["database"], nasty);
        let user = first["db_user"].as_str().unwrap();
        assert!(user.starts_with("üü") && user.ends_with("[truncated, 102400 bytes]"));
        assert_eq!(verify(&path).unwrap().lines, 2);
    }

    #[tokio::test]
    async fn reopening_after_rotation_starts_a_new_file_that_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        let old = dir.path().join("decisions.jsonl.1");
        let log = write_log(&path, 2).await;
        std::fs::rename(&path, &old).unwrap();
        // Written after the move but before the reopen: still the old file.
        log.record(entry(3)).await.unwrap();
        log.reopen().await.unwrap();
        log.record(entry(4)).await.unwrap();

        let old_report = verify(&old).unwrap();
        assert_eq!(old_report.lines, 3);
        let new_lines = lines(&path);
        assert_eq!(new_lines.len(), 2, "{new_lines:#?}");
        let first: Map<String, Value> = serde_json::from_str(&new_lines[0]).unwrap();
        assert_eq!(first["event"], "log_reopened");
        assert_eq!(first["rotated"], true);
        assert_eq!(first["prev"].as_str().unwrap(), old_report.last_hash);
        assert_eq!(
            first["previous_hash"].as_str().unwrap(),
            old_report.last_hash
        );
        let new_report = verify(&path).unwrap();
        assert_eq!(new_report.lines, 2);
        assert_eq!(new_report.first_prev, old_report.last_hash);
        let mode = std::fs::metadata(&path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[tokio::test]
    async fn reopening_the_same_file_just_continues_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        let log = write_log(&path, 2).await;
        log.reopen().await.unwrap();
        log.record(entry(3)).await.unwrap();
        let report = verify(&path).unwrap();
        assert_eq!(report.lines, 4);
        assert_eq!(report.first_prev, GENESIS);
        let third: Map<String, Value> = serde_json::from_str(&lines(&path)[2]).unwrap();
        assert_eq!(third["rotated"], false);
    }

    #[tokio::test]
    async fn a_file_cut_at_a_non_rotation_line_does_not_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        let log = write_log(&path, 2).await;
        // A SIGHUP without rotation leaves a `"rotated": false` line mid-file: cutting the
        // file there must not pass for a rotated log.
        log.reopen().await.unwrap();
        log.record(entry(3)).await.unwrap();
        let text = lines(&path);
        write_lines(&path, &text[2..]);
        assert!(matches!(bad_line(&path), (1, LineProblem::Prev { .. })));
        // Nor does a forged rotation line whose prev is not its previous_hash.
        let mut forged: Map<String, Value> = serde_json::from_str(&text[2]).unwrap();
        forged.insert("rotated".into(), Value::Bool(true));
        forged.insert("previous_hash".into(), Value::from("1".repeat(64)));
        write_lines(&path, &[serde_json::to_string(&forged).unwrap()]);
        assert!(verify(&path).is_err());
    }

    #[tokio::test]
    async fn a_failed_reopen_keeps_writing_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("logs");
        std::fs::create_dir(&sub).unwrap();
        let path = sub.join("decisions.jsonl");
        let log = write_log(&path, 1).await;
        let moved = dir.path().join("moved");
        std::fs::rename(&sub, &moved).unwrap();
        // The folder is gone: the path cannot be opened.
        assert!(log.reopen().await.is_err());
        log.record(entry(2)).await.unwrap();
        assert_eq!(verify(&moved.join("decisions.jsonl")).unwrap().lines, 2);
    }

    #[test]
    fn low_space_is_reported_once_when_it_becomes_low_and_when_it_recovers() {
        let gib = 1024 * 1024 * 1024;
        let space = |available| Space {
            available,
            total: 100 * gib,
        };
        assert!(!space(2 * gib).is_low());
        assert!(space(gib / 2).is_low(), "under 1 % of 100 GiB");
        assert!(
            Space {
                available: 32 * 1024 * 1024,
                total: gib
            }
            .is_low(),
            "under 64 MiB"
        );
        let mut watch = DiskWatch::default();
        assert_eq!(watch.observe(space(2 * gib)), None);
        assert_eq!(watch.observe(space(gib / 2)), Some(DiskChange::Low));
        assert_eq!(watch.observe(space(gib / 4)), None, "once, not every check");
        assert!(watch.is_low());
        assert_eq!(watch.observe(space(2 * gib)), Some(DiskChange::Recovered));
    }

    #[test]
    fn free_space_reads_the_log_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let space = free_space(&dir.path().join("not-yet-created.jsonl")).unwrap();
        assert!(
            space.total > 0 && space.available <= space.total,
            "{space:?}"
        );
    }

    #[tokio::test]
    async fn extra_fields_cannot_forge_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("decisions.jsonl");
        let log = AuditLog::open(&path).await.unwrap();
        let mut e = entry(1);
        e.extra.insert("hash".into(), Value::from("0".repeat(64)));
        e.extra.insert("decision".into(), Value::from("allow"));
        log.record(e).await.unwrap();
        assert_eq!(verify(&path).unwrap().lines, 1);
    }
}
