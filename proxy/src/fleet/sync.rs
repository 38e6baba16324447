//! The sidecar's fleet task: reads the whole bucket whenever the watch says it changed (and every few seconds regardless), verifies each value, and applies the policy and the locks through the same paths as a local change.
//!
//! A full read, not a stream of deltas: the state applied is always "what the bucket holds
//! now, verified", so a missed or reordered update cannot leave a sidecar half-applied, and
//! a successful read is exactly what `max_staleness` measures from.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv::Store;
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::watch;

use super::bundle::{self, LockValue, PolicyBundle, LOCK_PREFIX, POLICY_KEY};
use super::signed::{SignedError, Trust};
use crate::audit::Entry;
use crate::locks::Lock;
use crate::sidecar::Sidecar;

/// The longest wait between two reads when nothing changes.
const MAX_TICK: Duration = Duration::from_secs(10);

/// How often the bucket is read without a change: often enough that staleness is noticed
/// well inside `max_staleness`.
fn tick(max_staleness: Duration) -> Duration {
    (max_staleness / 4).clamp(Duration::from_millis(500), MAX_TICK)
}

/// What the task remembers between reads.
#[derive(Default)]
pub struct Memory {
    /// (key, revision) of values already refused: each is reported once.
    refused: HashMap<String, u64>,
    /// The fleet's locks by key, as last applied.
    locks: BTreeMap<String, Lock>,
    /// Whether the last read failed (its error is reported once per outage).
    failing: bool,
    /// Per key, the last value that verified and was applied (a policy bundle, a lock, a
    /// signed removal): what the cache file keeps. A refused newer value never replaces it,
    /// so a restart cannot be made to forget a lock by overwriting its key with garbage.
    good: BTreeMap<String, (u64, Vec<u8>)>,
    /// When the cache was last written.
    saved: Option<SystemTime>,
}

/// The last good read, kept beside the decision log (`<audit.path>.fleet.json`, 0600) so
/// a sidecar restarted while NATS is out of reach starts from the fleet's state, not from
/// an older local policy, and keeps its staleness clock: a restart does not make it fresh.
/// Every value in it is verified again on load, as if it came from the bucket.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Cache {
    /// RFC 3339: when the bucket was last read in full.
    contact: String,
    values: Vec<CachedValue>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CachedValue {
    key: String,
    revision: u64,
    /// The stored envelope, as text.
    value: String,
}

/// Where the cache lives.
pub fn cache_path(sidecar: &Sidecar) -> std::path::PathBuf {
    let mut p = sidecar.settings.audit.path.as_os_str().to_owned();
    p.push(".fleet.json");
    std::path::PathBuf::from(p)
}

fn save_cache(
    path: &std::path::Path,
    contact: SystemTime,
    values: &BTreeMap<String, (u64, Vec<u8>)>,
) -> std::io::Result<()> {
    use std::io::Write;
    let cache = Cache {
        contact: bundle::rfc3339(contact),
        values: values
            .iter()
            .map(|(key, (revision, raw))| CachedValue {
                key: key.clone(),
                revision: *revision,
                value: String::from_utf8_lossy(raw).into_owned(),
            })
            .collect(),
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(&serde_json::to_vec(&cache).unwrap_or_default())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Applies the cached last good state at start, before the first connection is accepted.
pub async fn restore(sidecar: &Sidecar) -> Memory {
    let mut memory = Memory::default();
    let Some(fleet) = sidecar.fleet.as_ref() else {
        return memory;
    };
    let path = cache_path(sidecar);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return memory,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot read the fleet cache; starting from the local state");
            return memory;
        }
    };
    let Ok(cache) = serde_json::from_slice::<Cache>(&text) else {
        tracing::error!(path = %path.display(), "the fleet cache is not valid; starting from the local state");
        return memory;
    };
    if let Ok(t) = humantime::parse_rfc3339(&cache.contact) {
        fleet.set_contact(t);
    }
    let values: Vec<(String, u64, Vec<u8>)> = cache
        .values
        .into_iter()
        .map(|v| (v.key, v.revision, v.value.into_bytes()))
        .collect();
    tracing::info!(values = values.len(), contact = %cache.contact, "fleet state restored from the cache");
    apply(sidecar, values, &mut memory).await;
    memory
}

/// Runs until `stop` changes. Never returns an error: an unreachable NATS is staleness.
pub async fn run(
    sidecar: Arc<Sidecar>,
    client: async_nats::Client,
    mut memory: Memory,
    mut stop: watch::Receiver<bool>,
) {
    let Some(fleet) = sidecar.fleet.as_ref() else {
        return;
    };
    let settings = fleet.settings.clone();
    let js = async_nats::jetstream::new(client);
    let cache = cache_path(&sidecar);
    let mut store: Option<Store> = None;
    let mut changes: Option<async_nats::jetstream::kv::Watch> = None;
    let period = tick(settings.max_staleness);
    loop {
        if store.is_none() {
            // Only opened, never created here: that is the operator's (`eastwall fleet
            // init`), and NATS permissions keep sidecars from it.
            store = js.get_key_value(&settings.bucket).await.ok();
        }
        if let (Some(kv), None) = (&store, &changes) {
            changes = tokio::time::timeout(super::client::REQUEST_TIMEOUT, kv.watch_all())
                .await
                .ok()
                .and_then(Result::ok);
        }
        let read = match &store {
            Some(kv) => read_all(kv).await,
            None => Err(format!(
                "the bucket {:?} cannot be opened (NATS out of reach, or not created yet: eastwall fleet init)",
                settings.bucket
            )),
        };
        match read {
            Ok(values) => {
                if memory.failing {
                    tracing::info!("fleet control plane reachable again");
                }
                memory.failing = false;
                let before = memory.good.clone();
                apply(&sidecar, values, &mut memory).await;
                let changed = memory.good != before;
                let now = SystemTime::now();
                fleet.contact(now);
                // Written when the state changed and at least once a minute (the contact
                // time is what a restarted sidecar's staleness counts from).
                if changed
                    || memory.saved.is_none_or(|t| {
                        now.duration_since(t).unwrap_or_default() > Duration::from_secs(60)
                    })
                {
                    match save_cache(&cache, now, &memory.good) {
                        Ok(()) => memory.saved = Some(now),
                        Err(e) => {
                            tracing::error!(path = %cache.display(), error = %e, "cannot write the fleet cache")
                        }
                    }
                }
            }
            Err(err) => {
                if !memory.failing {
                    tracing::warn!(%err, "cannot read the fleet bucket; serving the last good state");
                    let mut entry = fleet_entry("fleet_unreachable");
                    entry.alert = true;
                    entry.extra.insert("detail".into(), json!(err));
                    sidecar.write(entry).await;
                }
                memory.failing = true;
                // A watch over a dead connection may never yield again; make a new one.
                changes = None;
            }
        }
        publish_state(&sidecar);
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(period) => {}
            next = async {
                match changes.as_mut() {
                    Some(w) => w.next().await.map(|_| ()),
                    None => std::future::pending().await,
                }
            } => {
                if next.is_none() { changes = None; }
                // Let a burst of puts (a push of several locks) arrive before one read.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Refreshes the staleness figures for `/metrics`.
pub fn publish_state(sidecar: &Sidecar) {
    let Some(fleet) = sidecar.fleet.as_ref() else {
        return;
    };
    let now = SystemTime::now();
    let m = &sidecar.metrics.fleet;
    m.staleness
        .set(i64::try_from(fleet.staleness(now).as_secs()).unwrap_or(i64::MAX));
    m.fresh.set(i64::from(fleet.synced() && !fleet.stale(now)));
    m.policy_version
        .set(i64::try_from(fleet.policy_version()).unwrap_or(i64::MAX));
}

/// Every key's latest value, with its revision.
async fn read_all(kv: &Store) -> Result<Vec<(String, u64, Vec<u8>)>, String> {
    let timeout = super::client::REQUEST_TIMEOUT * 5;
    tokio::time::timeout(timeout, async {
        let keys: Vec<String> = kv
            .keys()
            .await
            .map_err(|e| e.to_string())?
            .filter_map(|k| async move { k.ok() })
            .collect()
            .await;
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(entry) = kv.entry(key.clone()).await.map_err(|e| e.to_string())? {
                if entry.operation == async_nats::jetstream::kv::Operation::Put {
                    out.push((key, entry.revision, entry.value.to_vec()));
                }
            }
        }
        Ok(out)
    })
    .await
    .map_err(|_| format!("no answer within {timeout:?}"))?
}

fn fleet_entry(event: &'static str) -> Entry {
    Entry {
        conn_id: crate::identity::new_conn_id(),
        event,
        ..Entry::default()
    }
}

async fn refuse(sidecar: &Sidecar, memory: &mut Memory, key: &str, revision: u64, why: String) {
    if memory.refused.get(key) == Some(&revision) {
        return;
    }
    memory.refused.insert(key.to_owned(), revision);
    sidecar.metrics.fleet.refused.inc();
    tracing::error!(key, revision, error = %why, "fleet value refused; the state in force stays");
    let mut entry = fleet_entry("fleet_refused");
    entry.alert = true;
    entry.reason = "fleet_value_refused".into();
    entry.extra.insert("key".into(), json!(key));
    entry.extra.insert("revision".into(), json!(revision));
    entry.extra.insert("detail".into(), json!(why));
    sidecar.write(entry).await;
}

async fn apply(sidecar: &Sidecar, values: Vec<(String, u64, Vec<u8>)>, memory: &mut Memory) {
    let Some(fleet) = sidecar.fleet.as_ref() else {
        return;
    };
    let now = SystemTime::now();
    let trust = Trust {
        verifier: sidecar.tls.client_verifier(),
        trust_domain: sidecar.settings.trust_domain.clone(),
        admins: fleet.settings.admins.clone(),
    };
    let mut locks = memory.locks.clone();
    let mut present = std::collections::HashSet::new();
    for (key, revision, raw) in values {
        present.insert(key.clone());
        if key != POLICY_KEY && !key.starts_with(LOCK_PREFIX) {
            continue; // heads and anything else: not state
        }
        let verified = match trust.verify(&key, &raw, now) {
            Ok(v) => v,
            Err(err) => {
                let why = match err {
                    SignedError::NotAdmin(_) | SignedError::Untrusted(_) => err.to_string(),
                    other => other.to_string(),
                };
                refuse(sidecar, memory, &key, revision, why).await;
                continue;
            }
        };
        if key == POLICY_KEY {
            match apply_policy(sidecar, &verified.body, &verified.signer).await {
                Ok(()) => {
                    memory.good.insert(key, (revision, raw));
                }
                Err(why) => refuse(sidecar, memory, &key, revision, why).await,
            }
            continue;
        }
        match bundle::parse_lock(
            &key,
            &verified.body,
            &verified.signer,
            &sidecar.settings.trust_domain,
        ) {
            Ok(LockValue::Lock(lock)) => {
                locks.insert(key.clone(), lock);
                memory.good.insert(key, (revision, raw));
            }
            Ok(LockValue::Removed) => {
                locks.remove(&key);
                memory.good.insert(key, (revision, raw));
            }
            Err(why) => refuse(sidecar, memory, &key, revision, why).await,
        }
    }
    // A lock whose key was deleted without a signed removal stays in force: whoever can
    // delete from the bucket must not be able to lift a lock.
    for key in memory.locks.keys() {
        if !present.contains(key) && memory.refused.get(key) != Some(&0) {
            memory.refused.insert(key.clone(), 0);
            let mut entry = fleet_entry("fleet_refused");
            entry.alert = true;
            entry.reason = "fleet_unsigned_removal".into();
            entry.extra.insert("key".into(), json!(key));
            entry.extra.insert(
                "detail".into(),
                json!("the lock's key was deleted from the bucket without a signed removal; the lock stays in force (eastwall lock remove --fleet lifts it)"),
            );
            sidecar.write(entry).await;
        }
    }
    memory.locks = locks;
    let events = sidecar
        .locks
        .set_fleet(memory.locks.values().cloned().collect(), now);
    sidecar
        .metrics
        .set_locks_active(sidecar.locks.current().active(now).count());
    for event in &events {
        tracing::info!(lock.id = %event.lock.id, target = %event.lock.target, action = event.action.as_str(), "fleet lock");
        let mut entry = event.entry();
        entry.extra.insert("source".into(), json!("fleet"));
        sidecar.write(entry).await;
    }
}

/// Applies a verified policy bundle if it is newer than the one in force.
async fn apply_policy(sidecar: &Sidecar, body: &str, signer: &str) -> Result<(), String> {
    let Some(fleet) = sidecar.fleet.as_ref() else {
        return Ok(());
    };
    let bundle: PolicyBundle =
        serde_json::from_str(body).map_err(|e| format!("not a policy bundle: {e}"))?;
    if bundle.pushed_by != signer {
        return Err(format!(
            "pushed_by {:?} is not the signer {signer}",
            bundle.pushed_by
        ));
    }
    let in_force = fleet.policy_version();
    if bundle.version == in_force {
        return Ok(());
    }
    if bundle.version < in_force {
        return Err(format!(
            "version {} is older than version {in_force}, in force: a replayed bundle",
            bundle.version
        ));
    }
    let policy = bundle.compile(&sidecar.settings.trust_domain, &sidecar.settings.guards)?;
    let counts = policy.counts();
    let ended = crate::reload::put_in_force(sidecar, policy);
    fleet.set_policy_version(bundle.version);
    tracing::info!(version = bundle.version, pushed_by = %bundle.pushed_by, sessions_ended = ended, "fleet policy applied");
    let mut entry = fleet_entry("config_reload");
    entry.reason = "fleet_policy".into();
    entry.extra.insert("result".into(), json!("ok"));
    entry.extra.insert("version".into(), json!(bundle.version));
    entry
        .extra
        .insert("pushed_by".into(), json!(bundle.pushed_by));
    entry
        .extra
        .insert("pushed_at".into(), json!(bundle.pushed_at));
    entry.extra.insert(
        "rules".into(),
        json!({"allow": counts.allow, "deny": counts.deny, "deny_and_alert": counts.deny_and_alert}),
    );
    entry.extra.insert("sessions_ended".into(), json!(ended));
    sidecar.write(entry).await;
    Ok(())
}
