//! The detectors inline: every line the decision log commits is judged by `eastwall_detect`; a signal becomes an `event: "signal"` line, a metric and, for `[detect] lock_on` signals, an expiring lock.
//!
//! # Never in the way
//! The detectors read the log's [`Tap`]: the writer hands each committed batch over with
//! `try_send` and never waits, so an admission is never delayed or changed by detection. A
//! full queue drops the batch; its lines are counted in `eastwall_detect_lines_dropped_total`.
//! The detectors run on a thread of their own, so a large state save does not hold up a
//! runtime worker either. Because they read the lines as written, in commit order, and a
//! line is the same JSON offline, `eastwall audit detect` over the recorded log (from the
//! same saved state) finds the same signals.
//!
//! # Automatic locks
//! Only a signal named in `[detect] lock_on` places a lock, on its subject (a source
//! address, a certificate serial, an identity or a role), for `lock_ttl`, written to the lock
//! file as `eastwall lock add` does. The upkeep task then applies it within 2 s, to new
//! connections and live sessions alike, and logs it (`event: "lock"`).
//!
//! # State
//! The learned baselines and windows are saved to `[detect] state_file` every
//! [`SAVE_EVERY`] when they changed, and when the sidecar stops; written atomically (a 0600
//! temporary, fsync, rename, fsync of the folder). At start a state file that cannot be
//! used (not ours, writable by others, damaged, too large, from a newer build) stops the
//! sidecar: whoever could corrupt it would otherwise send the detectors back to learning,
//! where `new_flow` is silent for a week. The message says how to start afresh on purpose.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use eastwall_ca::spiffe::TrustDomain;
use eastwall_config::{DetectSettings, Settings};
use eastwall_detect::{Detectors, Name, Signal};
use serde_json::Value;
use tokio::sync::watch;

use crate::audit::{AuditLog, Entry, Tap};
use crate::locks::{self, Lock, Target};
use crate::metrics::Metrics;

/// How often a changed state is saved while the sidecar runs.
pub const SAVE_EVERY: Duration = Duration::from_secs(30);
/// Committed batches that may wait for the detectors before new ones are dropped.
const QUEUE_BATCHES: usize = 4096;
/// Largest state file read at start. The default bound (250,000 keys per table) saves to
/// well under this.
pub const MAX_STATE_BYTES: u64 = 1 << 30;
/// How long stopping waits for the queue to drain and the state to be saved.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// Who automatic locks are placed by, in the lock file and its log lines.
pub const LOCK_CREATOR: &str = "eastwall-detect";

/// Why the detectors could not start; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("cannot use the detector state {}: {why}; move it aside to start learning afresh (new_flow stays silent for the learning period), or set [detect] enabled = false", path.display())]
    State { path: PathBuf, why: String },
    #[error("cannot start the detector thread: {0}")]
    Spawn(std::io::Error),
}

/// The running detectors: stop them to drain their queue and save their state.
pub struct Detection {
    thread: crate::tap_thread::TapThread,
    started: Entry,
}

impl Detection {
    /// Loads the state and starts the detector thread on the log's tap; None when `[detect]
    /// enabled = false`.
    pub fn start(
        settings: &Settings,
        audit: &AuditLog,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Detection>, DetectError> {
        let cfg = &settings.detect;
        if !cfg.enabled {
            return Ok(None);
        }
        if same_place(&cfg.state_file, audit.path()) {
            return Err(DetectError::State {
                path: cfg.state_file.clone(),
                why: "it is the decision log itself; a save would replace the log".into(),
            });
        }
        let (detectors, restored) = load_state_hashed(cfg)?;
        // A fresh start beside a log that already has lines is what a removed state file
        // looks like: say so in the chained log, as an alert, rather than learn in silence.
        let log_had_lines = std::fs::metadata(audit.path()).is_ok_and(|m| m.len() > 0);
        let mut started = Entry {
            conn_id: crate::identity::new_conn_id(),
            event: "detect_start",
            reason: if restored.is_some() {
                "restored".into()
            } else {
                "fresh".into()
            },
            alert: restored.is_none() && log_had_lines,
            ..Entry::default()
        };
        started.extra.insert(
            "state_file".into(),
            cfg.state_file.display().to_string().into(),
        );
        if let Some(hash) = &restored {
            started
                .extra
                .insert("state_sha256".into(), hash.clone().into());
        }
        let tap = audit.tap(QUEUE_BATCHES);
        let worker = Worker {
            detectors,
            state_file: cfg.state_file.clone(),
            lock_on: cfg.lock_on.clone(),
            lock_ttl: cfg.lock_ttl,
            locks_file: settings.locks_file.clone(),
            trust_domain: settings.trust_domain.clone(),
            audit: audit.clone(),
            metrics,
            dropped: Arc::clone(&tap.dropped),
            dirty: false,
        };
        let thread = crate::tap_thread::TapThread::spawn("eastwall-detect", move |rt, stopped| {
            worker.run(rt, tap, stopped)
        })
        .map_err(DetectError::Spawn)?;
        Ok(Some(Detection { thread, started }))
    }

    /// The `detect_start` line (alert) the sidecar writes before serving when the detectors
    /// start afresh beside a log that already has lines; None otherwise (a first start, or
    /// a restored state: both only traced).
    pub fn start_entry(&self) -> Option<Entry> {
        tracing::info!(state = %self.started.reason, "detectors started");
        self.started.alert.then(|| self.started.clone())
    }

    /// Judges what is queued, saves the state and stops (bounded by [`STOP_WAIT`]).
    pub async fn stop(&self) {
        if !self.thread.stop(STOP_WAIT).await {
            tracing::error!(
                "the detectors did not save their state within {STOP_WAIT:?}; it may be older than this run"
            );
        }
    }
}

/// The detector thread's state.
struct Worker {
    detectors: Detectors,
    state_file: PathBuf,
    lock_on: Vec<Name>,
    lock_ttl: Duration,
    locks_file: PathBuf,
    trust_domain: TrustDomain,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    /// Lines the tap missed (its queue was full).
    dropped: Arc<std::sync::atomic::AtomicU64>,
    /// The state changed since it was last saved.
    dirty: bool,
}

impl Worker {
    fn run(
        mut self,
        rt: tokio::runtime::Runtime,
        mut tap: Tap,
        mut stopped: watch::Receiver<bool>,
    ) {
        let mut last_save = Instant::now();
        loop {
            let next = rt.block_on(async {
                tokio::select! {
                    batch = tap.rx.recv() => Some(batch),
                    _ = tokio::time::sleep(SAVE_EVERY) => None,
                    _ = stopped.changed() => Some(None),
                }
            });
            match next {
                Some(Some(batch)) => self.judge(&rt, &batch),
                // The log is gone (every handle dropped): nothing more will come.
                Some(None) => break,
                None => {}
            }
            if last_save.elapsed() >= SAVE_EVERY {
                self.save();
                last_save = Instant::now();
            }
            if *stopped.borrow() {
                break;
            }
        }
        // What was committed before the stop is judged before the state is saved.
        while let Ok(batch) = tap.rx.try_recv() {
            self.judge(&rt, &batch);
        }
        self.save();
    }

    /// Judges one committed batch, line by line, as `audit detect` judges a file.
    fn judge(&mut self, rt: &tokio::runtime::Runtime, batch: &[u8]) {
        for raw in batch.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(line) = serde_json::from_slice::<Value>(raw) else {
                continue;
            };
            let signals = self.detectors.observe_line(&line);
            self.dirty = true;
            for signal in signals {
                self.raise(rt, &line, &signal);
            }
        }
    }

    /// One signal: its line, its metric and, when `lock_on` names it, its lock.
    fn raise(&mut self, rt: &tokio::runtime::Runtime, trigger: &Value, signal: &Signal) {
        self.metrics.signal(signal.name.as_str());
        let entry = signal_entry(trigger, signal);
        tracing::warn!(signal = signal.name.as_str(), kind = signal.kind, subject = %signal.subject, "detection signal");
        if let Err(err) = rt.block_on(self.audit.record(entry)) {
            tracing::error!(%err, "cannot write a detection signal to the decision log");
        }
        if self.lock_on.contains(&signal.name) {
            match place_lock(
                &self.locks_file,
                &self.trust_domain,
                signal,
                self.lock_ttl,
                SystemTime::now(),
            ) {
                Ok(Some(id)) => {
                    tracing::warn!(lock = %id, signal = signal.name.as_str(), subject = %signal.subject, "automatic lock placed")
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::error!(%err, signal = signal.name.as_str(), subject = %signal.subject, "cannot place the automatic lock [detect] lock_on asks for")
                }
            }
        }
    }

    fn save(&mut self) {
        self.metrics.set_detect(
            self.dropped.load(Ordering::Relaxed),
            self.detectors.approx_bytes(),
        );
        if !self.dirty {
            return;
        }
        match save_state(&self.state_file, &self.detectors.save()) {
            Ok(()) => self.dirty = false,
            Err(err) => {
                tracing::error!(path = %self.state_file.display(), %err, "cannot save the detector state; will try again")
            }
        }
    }
}

/// The `event: "signal"` line: the signal's own JSON (signal, time, kind, subject,
/// identities, sources, targets, counts, window) as its fields, under the `conn_id` of the
/// line that raised it, so the two can be joined.
pub fn signal_entry(trigger: &Value, signal: &Signal) -> Entry {
    let mut extra = match signal.to_json() {
        Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    extra.insert(
        "trigger_event".into(),
        trigger.get("event").cloned().unwrap_or(Value::Null),
    );
    let one_identity = match signal.evidence.identities.as_slice() {
        [only] => Some(only.clone()),
        _ => None,
    };
    Entry {
        conn_id: trigger
            .get("conn_id")
            .and_then(Value::as_str)
            .map_or_else(crate::identity::new_conn_id, str::to_owned),
        event: "signal",
        decision: None,
        spiffe_id: one_identity,
        reason: signal.kind.to_owned(),
        alert: true,
        extra,
        ..Entry::default()
    }
}

/// Most automatic locks in force at once: a pattern an attacker can provoke from many
/// addresses must not fill the lock file (and its 10,000 cap) that operators rely on.
pub const MAX_AUTOMATIC_LOCKS: usize = 256;

/// What an automatic lock holds back: the signal's subject. Never a role (`shared_admin`'s
/// subject): that would lock out every legitimate user of it, which only an operator may
/// decide. An IPv6 source is locked as its /64, the unit one host controls.
pub fn lock_target(signal: &Signal, td: &TrustDomain) -> Result<Target, locks::LockError> {
    let subject = signal.subject.as_str();
    if let Some(source) = subject.strip_prefix("source ") {
        match source.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(v4)) => Target::source(&format!("{v4}/32")),
            Ok(std::net::IpAddr::V6(v6)) => {
                let net = u128::from(v6) & !((1u128 << 64) - 1);
                Target::source(&format!("{}/64", std::net::Ipv6Addr::from(net)))
            }
            Err(_) => Target::source(source),
        }
    } else if let Some(serial) = subject.strip_prefix("certificate ") {
        Target::serial(serial)
    } else if subject.starts_with("spiffe://") {
        Target::id(subject, td)
    } else {
        Err(locks::LockError::Target(format!(
            "{subject:?}: automatic locks never lock a role; lock the identities named in the signal by hand if that is what you want"
        )))
    }
}

/// Places the lock `lock_on` asks for, unless one on the same target is already in force.
/// Returns the new lock's id.
pub fn place_lock(
    file: &Path,
    td: &TrustDomain,
    signal: &Signal,
    ttl: Duration,
    now: SystemTime,
) -> Result<Option<String>, locks::LockError> {
    let target = lock_target(signal, td)?;
    // Shown to the refused client: which signal, not the evidence.
    let message = format!(
        "locked automatically after a {} signal; ask your security team",
        signal.name.as_str()
    );
    locks::edit(file, td, now, |set| {
        let mut all: Vec<Lock> = set.locks().to_vec();
        if set.active(now).any(|l| l.target == target) {
            return Ok((all, None));
        }
        let automatic = set
            .active(now)
            .filter(|l| l.created_by == LOCK_CREATOR)
            .count();
        if automatic >= MAX_AUTOMATIC_LOCKS {
            return Err(locks::LockError::Target(format!(
                "{MAX_AUTOMATIC_LOCKS} automatic locks are already in force; no more are placed until some expire"
            )));
        }
        let lock = Lock::new(target, Some(ttl), message, LOCK_CREATOR.into(), now, set)?;
        let id = lock.id.clone();
        all.push(lock);
        Ok((all, Some(id)))
    })
}

/// Whether two paths name the same place once `..` and links in their folders are resolved
/// (`sub/../decisions.log` is `decisions.log`).
pub fn same_place(a: &Path, b: &Path) -> bool {
    let place = |p: &Path| {
        let dir = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Some(std::fs::canonicalize(dir).ok()?.join(p.file_name()?))
    };
    matches!((place(a), place(b)), (Some(x), Some(y)) if x == y)
}

/// [`load_state`], and the SHA-256 of the state it restored (None: a fresh start).
fn load_state_hashed(cfg: &DetectSettings) -> Result<(Detectors, Option<String>), DetectError> {
    let existed = std::fs::symlink_metadata(&cfg.state_file).is_ok();
    let detectors = load_state(cfg)?;
    let hash = existed
        .then(|| std::fs::read(&cfg.state_file).ok())
        .flatten()
        .map(|bytes| {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&bytes))
        });
    Ok((detectors, hash))
}

/// The saved state, or fresh detectors when there is none.
pub(crate) fn load_state(cfg: &DetectSettings) -> Result<Detectors, DetectError> {
    let path = &cfg.state_file;
    let fail = |why: String| DetectError::State {
        path: path.clone(),
        why,
    };
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Detectors::new(cfg.tuning.clone()).map_err(|e| fail(e.to_string()));
        }
        Err(e) => return Err(fail(e.to_string())),
    };
    let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(fail(format!(
            "owned by uid {}, not this user ({me}) or root",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(fail(format!(
            "group or others may write it (mode {:o}); whoever can write it can teach the detectors that an attack is normal",
            meta.mode() & 0o7777
        )));
    }
    if meta.len() > MAX_STATE_BYTES {
        return Err(fail(format!(
            "{} bytes, more than the {MAX_STATE_BYTES} this build reads",
            meta.len()
        )));
    }
    let mut text = String::new();
    file.take(MAX_STATE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| fail(e.to_string()))?;
    Detectors::restore(cfg.tuning.clone(), &text).map_err(|e| fail(e.to_string()))
}

/// Writes `text` to `path` atomically: a 0600 temporary beside it, fsync, rename, fsync of
/// the folder.
fn save_state(path: &Path, text: &str) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use eastwall_detect::{Evidence, Time};

    fn signal(name: Name, subject: &str) -> Signal {
        Signal {
            name,
            time: Time::parse_rfc3339("2026-01-06T02:13:00Z").unwrap(),
            kind: "k",
            subject: subject.into(),
            evidence: Evidence::of(
                vec!["spiffe://corp.example/app/billing".into()],
                vec![],
                vec![],
            ),
        }
    }

    fn cfg(dir: &Path) -> DetectSettings {
        DetectSettings {
            enabled: true,
            state_file: dir.join("decisions.log.detect.json"),
            lock_on: Vec::new(),
            lock_ttl: Duration::from_secs(3600),
            tuning: eastwall_detect::Settings::default(),
        }
    }

    fn refused(cfg: &DetectSettings, says: &str) {
        let err = load_state(cfg).expect_err("must be refused").to_string();
        assert!(err.contains(says), "{err}");
        assert!(err.contains("move it aside"), "{err}");
        assert!(err.contains(&cfg.state_file.display().to_string()), "{err}");
    }

    #[test]
    fn a_state_file_that_cannot_be_trusted_is_refused_never_replaced_by_a_fresh_start() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path());
        // None yet: fresh detectors, learning.
        assert!(load_state(&cfg).unwrap().state().started.is_none());
        let saved = Detectors::new(cfg.tuning.clone()).unwrap().save();
        save_state(&cfg.state_file, &saved).unwrap();
        let mode = std::fs::metadata(&cfg.state_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "saved private");
        load_state(&cfg).unwrap();
        // The attacks: a poisoned baseline others may write, a link elsewhere, garbage,
        // another program's JSON, a newer format.
        std::fs::set_permissions(&cfg.state_file, std::fs::Permissions::from_mode(0o666)).unwrap();
        refused(&cfg, "group or others may write it");
        std::fs::remove_file(&cfg.state_file).unwrap();
        let elsewhere = dir.path().join("elsewhere.json");
        save_state(&elsewhere, &saved).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &cfg.state_file).unwrap();
        refused(&cfg, "");
        std::fs::remove_file(&cfg.state_file).unwrap();
        for (text, says) in [
            ("{not json", "not readable JSON"),
            (
                "{\"format\":\"someone-else\"}",
                "not an Eastwall detector state",
            ),
            (
                &saved.replace("\"version\":1", "\"version\":99"),
                "version 99",
            ),
        ] {
            let _ = std::fs::remove_file(&cfg.state_file);
            save_state(&cfg.state_file, text).unwrap();
            refused(&cfg, says);
        }
        std::fs::remove_file(&cfg.state_file).unwrap();
        std::fs::create_dir(&cfg.state_file).unwrap();
        refused(&cfg, "not a regular file");
    }

    #[test]
    fn a_state_file_spelled_through_dot_dot_is_still_the_log() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let log = dir.path().join("decisions.log");
        std::fs::write(&log, "").unwrap();
        assert!(same_place(&dir.path().join("sub/../decisions.log"), &log));
        assert!(!same_place(&dir.path().join("sub/decisions.log"), &log));
    }

    #[test]
    fn a_save_replaces_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        save_state(&path, "first, and much longer than the second").unwrap();
        save_state(&path, "second").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "second");
        assert!(!dir.path().join("s.json.tmp").exists());
    }

    #[test]
    fn each_subject_becomes_the_lock_target_it_names() {
        let td = TrustDomain::parse("corp.example").unwrap();
        let t = |s| lock_target(&signal(Name::FanOut, s), &td);
        assert_eq!(t("source 10.9.0.9").unwrap().value(), "10.9.0.9/32");
        assert_eq!(t("source fd00::7:1:2:3").unwrap().value(), "fd00::/64");
        assert_eq!(t("certificate 0a1b").unwrap().kind(), "serial");
        assert_eq!(
            t("spiffe://corp.example/app/billing").unwrap().kind(),
            "spiffe_id"
        );
        // A role is never locked automatically: it would lock out its every legitimate user.
        assert!(t("postgres").is_err());
        // A subject outside our trust domain, or one no target can be, places no lock.
        assert!(t("spiffe://evil.example/x").is_err());
        assert!(t("source not-an-address").is_err());
        assert!(t("").is_err());
    }

    #[test]
    fn a_signal_line_carries_the_evidence_under_the_triggering_connection() {
        let trigger = serde_json::json!({"conn_id": "c-1", "event": "connect"});
        let e = signal_entry(&trigger, &signal(Name::CredentialAnomaly, "certificate 0a"));
        assert_eq!(
            (e.event, e.alert, e.conn_id.as_str()),
            ("signal", true, "c-1")
        );
        assert_eq!(e.extra["signal"], "credential_anomaly");
        assert_eq!(e.extra["trigger_event"], "connect");
        assert_eq!(
            e.spiffe_id.as_deref(),
            Some("spiffe://corp.example/app/billing")
        );
        assert_eq!(e.reason, "k");
    }
}
