//! What every connection of a running sidecar shares ([`Sidecar`]), and the budgets that
//! keep one source from using up the rest ([`StartupSlots`], [`CertUsage`]).
//!
//! Kept apart from [`crate::server`] (which starts and stops the sidecar) and
//! [`crate::session`] (one connection): both use this module, neither the other's state.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use eastwall_ca::SpiffeId;
use eastwall_config::{MfaRoles, Policy, Settings};
use tokio::sync::{watch, Notify};

use crate::audit::{AuditLog, Entry};
use crate::cancel::CancelRegistry;
use crate::mfa::{SecretStore, Verifier};
use crate::refusals::{self, RefusalGate};
use crate::registry::Registry;
use crate::relay::EndReason;
use crate::tls::ReloadingServerConfig;
use crate::upstream::Upstream;

/// Everything connections share.
pub struct Sidecar {
    pub settings: Settings,
    /// The policy in force; a reload ([`crate::reload`]) replaces it.
    pub policy: RwLock<Arc<Policy>>,
    /// eastwall.toml and the policy file as last loaded, and a pending SIGHUP.
    pub config_watch: crate::reload::ConfigWatch,
    pub tls: ReloadingServerConfig,
    pub upstream: Upstream,
    /// Warm side connections for the privilege question (`[upstream] check_role`).
    pub check_pool: Option<crate::privilege_pool::CheckPool>,
    pub cancels: Arc<CancelRegistry>,
    pub audit: AuditLog,
    pub mfa: Option<Arc<Verifier>>,
    pub cert_usage: Arc<CertUsage>,
    /// Roles that `mfa(..)` rules protect; recomputed when the MFA enrollments change.
    pub mfa_roles: RwLock<Arc<MfaRoles>>,
    pub startup_slots: Arc<StartupSlots>,
    /// Connections that have not finished TLS: `max_handshakes`, `max_handshakes_per_source`.
    pub handshake_slots: Arc<StartupSlots>,
    /// Which unauthenticated refusals get a line of their own; the rest are summarised.
    pub refusals: RefusalGate,
    /// Serials the verified CRLs revoke, re-sent on every reload: live sessions watch it and
    /// end when their certificate appears (new handshakes are refused by the TLS verifier).
    pub revoked: watch::Sender<Arc<std::collections::HashSet<String>>>,
    /// Admitted sessions until their session_end line is written: what kills, locks, reloads,
    /// expiry, drain and metrics act on.
    pub sessions: Registry,
    /// Set when a drain starts: readiness turns false, no connection is accepted.
    pub draining: AtomicBool,
    /// The Prometheus metrics `/metrics` serves; the decision log feeds most of them.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The last upstream reachability check, for `/readyz`.
    pub reach: crate::admin::ReachCache,
    /// The last retry of a failed decision-log write, for `/readyz`.
    pub log_retry: crate::admin::ReachCache,
    /// The operators' locks (`[locks] file`), re-read by the upkeep task.
    pub locks: crate::locks::LockWatcher,
    /// The inline detectors (`[detect]`); None when disabled.
    pub detection: Option<crate::detection::Detection>,
    /// The dates that end the sidecar's usefulness (proxy certificate, CA, CRL).
    pub expiries: Mutex<crate::expiry::Expiries>,
    /// When each date's `expiry_warning` line was last written.
    pub expiry_warned: Mutex<HashMap<&'static str, Instant>>,
    /// The `[audit] ocsf` export; None when not configured.
    pub ocsf: Option<crate::ocsf_sink::OcsfSink>,
    /// `[fleet]`: the shared control plane's state; None when not configured.
    pub fleet: Option<crate::fleet::Fleet>,
}

/// A budget of connections in one phase, per source and (optionally) over all sources.
///
/// Used twice: connections that have not been admitted yet (TLS, startup, MFA in progress;
/// `[limits] max_startups_per_source`), and connections that have not finished TLS
/// (`max_handshakes`, `max_handshakes_per_source`). The global `max_connections` alone would
/// let hosts holding silent connections open lock everyone else out. Sources are keyed by
/// [`crate::source::limiter_key`].
pub struct StartupSlots {
    global: usize,
    per_source: usize,
    counts: Mutex<SlotCounts>,
}

#[derive(Default)]
struct SlotCounts {
    total: usize,
    /// Each source's slots, oldest first.
    by_source: HashMap<IpAddr, VecDeque<Held>>,
    next_id: u64,
}

struct Held {
    id: u64,
    evict: Arc<Notify>,
}

/// Which part of a budget was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetFull {
    Source,
    Global,
}

impl StartupSlots {
    /// A per-source budget with no global cap.
    pub fn new(per_source: usize) -> Arc<Self> {
        Self::bounded(usize::MAX, per_source)
    }

    /// A budget of `global` slots over all sources, `per_source` for each.
    pub fn bounded(global: usize, per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            global: global.max(1),
            per_source: per_source.max(1),
            counts: Mutex::new(SlotCounts::default()),
        })
    }

    /// A slot for a new connection from `source`, or which budget is full.
    pub fn try_acquire(self: &Arc<Self>, source: IpAddr) -> Result<StartupSlot, BudgetFull> {
        self.acquire(source, false)
    }

    /// As [`Self::try_acquire`], but when the global budget is full and some source holds at
    /// least two slots more than `source`, that source's oldest slot is evicted (its
    /// connection is told through [`StartupSlot::eviction`]) to make room. So hosts holding
    /// many slots cannot keep a host with few out; only as many distinct sources as there
    /// are slots can fill the budget.
    pub fn try_acquire_fair(self: &Arc<Self>, source: IpAddr) -> Result<StartupSlot, BudgetFull> {
        self.acquire(source, true)
    }

    fn acquire(self: &Arc<Self>, source: IpAddr, evict: bool) -> Result<StartupSlot, BudgetFull> {
        let key = crate::source::limiter_key(source);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let held = counts.by_source.get(&key).map_or(0, VecDeque::len);
        if held >= self.per_source {
            return Err(BudgetFull::Source);
        }
        if counts.total >= self.global {
            let largest = counts
                .by_source
                .iter()
                .max_by_key(|(_, slots)| slots.len())
                .map(|(k, slots)| (*k, slots.len()));
            match largest {
                Some((victim, n)) if evict && n > held + 1 => {
                    if let Some(oldest) = counts
                        .by_source
                        .get_mut(&victim)
                        .and_then(VecDeque::pop_front)
                    {
                        oldest.evict.notify_one();
                        counts.total = counts.total.saturating_sub(1);
                    }
                }
                _ => return Err(BudgetFull::Global),
            }
        }
        counts.total += 1;
        counts.next_id += 1;
        let id = counts.next_id;
        let evict = Arc::new(Notify::new());
        counts.by_source.entry(key).or_default().push_back(Held {
            id,
            evict: evict.clone(),
        });
        Ok(StartupSlot {
            slots: self.clone(),
            key,
            id,
            evict,
        })
    }

    /// Slots held right now, over all sources.
    pub fn in_use(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// A connection's place in its source's startup budget, given back when it is admitted or gone.
pub struct StartupSlot {
    slots: Arc<StartupSlots>,
    key: IpAddr,
    id: u64,
    evict: Arc<Notify>,
}

impl StartupSlot {
    /// Notified when the slot was taken away for a source with fewer slots; the connection
    /// should then close.
    pub fn eviction(&self) -> Arc<Notify> {
        self.evict.clone()
    }
}

impl Drop for StartupSlot {
    fn drop(&mut self) {
        let mut counts = self.slots.counts.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slots) = counts.by_source.get_mut(&self.key) else {
            return;
        };
        // An evicted slot was already taken out (and uncounted) when it was evicted.
        let Some(at) = slots.iter().position(|h| h.id == self.id) else {
            return;
        };
        slots.remove(at);
        if slots.is_empty() {
            counts.by_source.remove(&self.key);
        }
        counts.total = counts.total.saturating_sub(1);
    }
}

impl Sidecar {
    /// A log entry with the fields every line of this connection carries.
    pub fn entry(&self, conn_id: &str, peer: SocketAddr, event: &'static str) -> Entry {
        Entry {
            conn_id: conn_id.to_owned(),
            event,
            peer: Some(peer),
            ..Entry::default()
        }
    }

    /// Logs a connection refused before any identity was established.
    pub async fn log_refusal(&self, conn_id: &str, peer: SocketAddr, reason: &str, detail: &str) {
        let mut entry = self.entry(conn_id, peer, "connect");
        entry.decision = Some("deny");
        entry.reason = reason.to_owned();
        if !detail.is_empty() {
            entry.extra.insert("detail".into(), detail.into());
        }
        self.log_unauthenticated(entry).await;
    }

    /// Writes (or counts) a line about a client whose identity is not proven: see
    /// [`crate::refusals`]. Strings the client chose are capped; a log failure is reported
    /// and the caller refuses anyway.
    pub async fn log_unauthenticated(&self, mut entry: Entry) {
        let Some(peer) = entry.peer else {
            return self.write(entry).await;
        };
        let (verdict, ended) = self
            .refusals
            .offer(peer.ip(), &entry.reason, Instant::now());
        if let Some(summary) = ended {
            self.write_summary(summary).await;
        }
        if verdict == refusals::Verdict::Counted {
            tracing::debug!(conn.id = %entry.conn_id, %peer, reason = %entry.reason, "unauthenticated refusal counted for the summary");
            return;
        }
        cap_unauthenticated(&mut entry);
        tracing::info!(conn.id = %entry.conn_id, %peer, reason = %entry.reason,
            detail = entry.extra.get("detail").and_then(|d| d.as_str()).unwrap_or(""),
            "refused before authentication");
        self.write(entry).await;
    }

    /// Counts (and, first in a window, logs) a connection closed at accept for a full budget,
    /// without holding up the accept loop on the log's fsync.
    pub(crate) fn refuse_at_accept(
        self: &Arc<Self>,
        peer: SocketAddr,
        reason: &'static str,
        what: &str,
    ) {
        let (verdict, ended) = self.refusals.offer(peer.ip(), reason, Instant::now());
        if verdict == refusals::Verdict::Counted && ended.is_none() {
            return;
        }
        tracing::warn!(%peer, reason, "{what}; closing");
        let sidecar = self.clone();
        tokio::spawn(async move {
            if let Some(summary) = ended {
                sidecar.write_summary(summary).await;
            }
            if verdict == refusals::Verdict::Write {
                let conn_id = crate::identity::new_conn_id();
                let mut entry = sidecar.entry(&conn_id, peer, "connect");
                entry.decision = Some("deny");
                entry.reason = reason.to_owned();
                sidecar.write(entry).await;
            }
        });
    }

    /// Writes the summaries of refusal windows that have ended.
    pub async fn write_due_summaries(&self) {
        for summary in self.refusals.due(Instant::now()) {
            self.write_summary(summary).await;
        }
    }

    /// Writes every refusal summary still open (at shutdown), so no count is lost.
    pub async fn flush_refusal_summaries(&self) {
        for summary in self.refusals.drain(Instant::now()) {
            self.write_summary(summary).await;
        }
    }

    async fn write_summary(&self, summary: refusals::Summary) {
        let conn_id = crate::identity::new_conn_id();
        let mut entry = Entry {
            conn_id,
            event: "refusals_summary",
            decision: Some("deny"),
            reason: "suppressed".into(),
            ..Entry::default()
        };
        let source = summary
            .source
            .map_or_else(|| "*".to_owned(), |ip| ip.to_string());
        tracing::warn!(%source, suppressed = summary.suppressed, "unauthenticated refusals from this source were counted, not logged one by one");
        entry.extra.insert("source".into(), source.into());
        entry
            .extra
            .insert("suppressed".into(), summary.suppressed.into());
        entry.extra.insert(
            "reasons".into(),
            serde_json::to_value(&summary.reasons).unwrap_or_default(),
        );
        entry.extra.insert(
            "window_ms".into(),
            (summary.window.as_millis() as u64).into(),
        );
        self.write(entry).await;
    }

    pub(crate) async fn write(&self, entry: Entry) {
        if let Err(err) = self.audit.record(entry).await {
            tracing::error!(%err, "decision log write failed");
        }
    }

    /// Ends every live session (and any admitted from now on) for `reason`, each through
    /// the relay's bounded end: FATAL 57P01, both legs closed, a session_end line.
    pub fn end_all_sessions(&self, reason: EndReason) {
        self.sessions.end_all(reason);
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Admitted sessions not yet ended: `eastwall_sessions_active`. The one place metrics
    /// read the live-session count from.
    pub fn live_sessions(&self) -> usize {
        self.sessions.count()
    }

    /// Re-reads the proxy certificate's notAfter and the CRL's nextUpdate into the metrics
    /// (at start and after each TLS reload).
    pub fn refresh_expiry_metrics(&self) {
        let files = self.tls.files();
        let e = crate::expiry::Expiries::read(
            &files.cert,
            &files.client_ca,
            self.tls.crl_next_update(),
        );
        self.metrics.set_expiry(&e);
        *self.expiries.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    /// The dates in force ([`Sidecar::refresh_expiry_metrics`]), judged at `now`.
    pub fn expiry_findings(&self, now: std::time::SystemTime) -> Vec<crate::expiry::Judged> {
        self.expiries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .judge(now)
    }

    /// Writes an `expiry_warning` line (alert) for each date that is close or past, at most
    /// once per [`crate::expiry::LOG_EVERY`] per date.
    pub async fn log_expiry_warnings(&self) {
        let now = std::time::SystemTime::now();
        for j in self.expiry_findings(now) {
            {
                let mut warned = self.expiry_warned.lock().unwrap_or_else(|p| p.into_inner());
                match warned.get(j.cert) {
                    Some(at) if at.elapsed() < crate::expiry::LOG_EVERY => continue,
                    _ => {
                        warned.insert(j.cert, Instant::now());
                    }
                }
            }
            tracing::warn!(cert = j.cert, "{}", j.message);
            let mut entry = Entry {
                conn_id: crate::identity::new_conn_id(),
                event: "expiry_warning",
                reason: if j.level == crate::preflight::Level::Error {
                    "expired".into()
                } else {
                    "expires_soon".into()
                },
                alert: true,
                ..Entry::default()
            };
            entry.extra.insert("cert".into(), j.cert.into());
            entry.extra.insert(
                "expires_at".into(),
                humantime::format_rfc3339_seconds(j.at).to_string().into(),
            );
            entry.extra.insert("detail".into(), j.message.into());
            if let Err(err) = self.audit.record(entry).await {
                tracing::error!(%err, "decision log write failed");
            }
        }
    }

    /// Whether a drain (shutdown) has started: `/readyz` answers 503 from then on.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// The roles `mfa(..)` rules protect on the segment this sidecar guards, counting the
/// identities enrolled for MFA (an unreadable secrets file enrolls nobody here; the sidecar
/// itself refuses to start without one when MFA is required).
pub fn mfa_roles(settings: &Settings, policy: &Policy) -> MfaRoles {
    let enrolled: Vec<SpiffeId> = if policy.mfa_groups().is_empty() {
        Vec::new()
    } else {
        SecretStore::load(&settings.mfa.secrets)
            .map(|store| store.list().into_iter().map(|(id, _)| id).collect())
            .unwrap_or_default()
    };
    policy.mfa_roles(&settings.guards, settings.service_port, &enrolled)
}

/// Caps every string a client could have chosen in an unauthenticated line and marks the
/// line `"truncated": true` when one was cut.
fn cap_unauthenticated(entry: &mut Entry) {
    let max = refusals::UNAUTHENTICATED_FIELD_BYTES;
    let mut cut = false;
    for field in [
        &mut entry.db_user,
        &mut entry.database,
        &mut entry.spiffe_id,
    ]
    .into_iter()
    .flatten()
    {
        cut |= refusals::cap_in_place(field, max);
    }
    for (key, value) in entry.extra.iter_mut() {
        if let serde_json::Value::String(s) = value {
            // `detail` is Eastwall's own explanation (a TLS or SVID error); it may quote a
            // little of what the client sent, so it is capped too, but with room to say why.
            let limit = if key == "detail" {
                refusals::UNAUTHENTICATED_DETAIL_BYTES
            } else {
                max
            };
            cut |= refusals::cap_in_place(s, limit);
        }
    }
    if cut {
        entry.extra.insert("truncated".into(), true.into());
    }
}

/// Which certificates are in use, and from where: one SVID is one workload, so the same
/// certificate from two source addresses at once is an alert.
#[derive(Default)]
pub struct CertUsage {
    in_use: Mutex<HashMap<String, (IpAddr, usize)>>,
    /// Sessions per SPIFFE ID, for `[limits] max_sessions_per_identity`.
    by_identity: Mutex<HashMap<String, usize>>,
}

impl CertUsage {
    /// Records a session's use of a certificate; returns whether another source holds it.
    pub fn acquire(self: &Arc<Self>, serial: &str, source: IpAddr) -> (CertUse, bool) {
        let mut map = self.in_use.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(serial.to_owned()).or_insert((source, 0));
        let elsewhere = entry.0 != source && entry.1 > 0;
        if entry.1 == 0 {
            entry.0 = source;
        }
        entry.1 += 1;
        (
            CertUse {
                usage: self.clone(),
                serial: serial.to_owned(),
            },
            elsewhere,
        )
    }
}

/// Releases a certificate use when the session ends.
pub struct CertUse {
    usage: Arc<CertUsage>,
    serial: String,
}

impl Drop for CertUse {
    fn drop(&mut self) {
        let mut map = self.usage.in_use.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = map.get_mut(&self.serial) {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                map.remove(&self.serial);
            }
        }
    }
}

impl CertUsage {
    /// A place among the sessions of `id`, or None when it already holds `max`.
    pub fn acquire_identity(self: &Arc<Self>, id: &str, max: usize) -> Option<IdentitySession> {
        let mut map = self.by_identity.lock().unwrap_or_else(|p| p.into_inner());
        let count = map.entry(id.to_owned()).or_insert(0);
        if *count >= max.max(1) {
            return None;
        }
        *count += 1;
        Some(IdentitySession {
            usage: self.clone(),
            id: id.to_owned(),
        })
    }
}

/// One session's place in its identity's `max_sessions_per_identity`, given back at its end.
pub struct IdentitySession {
    usage: Arc<CertUsage>,
    id: String,
}

impl Drop for IdentitySession {
    fn drop(&mut self) {
        let mut map = self
            .usage
            .by_identity
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = map.get_mut(&self.id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                map.remove(&self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_slots_cap_each_source_and_come_back() {
        let slots = StartupSlots::new(2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let first = slots.try_acquire(a).expect("1 of 2");
        let _second = slots.try_acquire(a).expect("2 of 2");
        assert!(slots.try_acquire(a).is_err(), "a third is refused");
        assert!(slots.try_acquire(b).is_ok(), "another source is unaffected");
        drop(first);
        assert!(slots.try_acquire(a).is_ok(), "a released slot is reusable");
    }

    #[test]
    fn ipv6_sources_are_grouped_by_their_64() {
        let slots = StartupSlots::new(1);
        let _held = slots
            .try_acquire("2001:db8:1:2::1".parse().unwrap())
            .unwrap();
        assert!(slots
            .try_acquire("2001:db8:1:2::ffff".parse().unwrap())
            .is_err());
        assert!(slots
            .try_acquire("2001:db8:1:3::1".parse().unwrap())
            .is_ok());
    }

    #[test]
    fn ipv4_clients_of_a_dual_stack_listener_each_have_their_own_budget() {
        let slots = StartupSlots::new(1);
        let _held = slots
            .try_acquire("::ffff:127.0.0.2".parse().unwrap())
            .unwrap();
        assert_eq!(
            slots.try_acquire("127.0.0.2".parse().unwrap()).err(),
            Some(BudgetFull::Source),
            "mapped and plain IPv4 are one source"
        );
        assert!(slots
            .try_acquire("::ffff:127.0.0.3".parse().unwrap())
            .is_ok());
    }

    #[test]
    fn unauthenticated_lines_cap_client_strings_and_say_so() {
        let mut entry = Entry {
            db_user: Some("u".repeat(1024)),
            database: Some("é".repeat(512)),
            reason: "no_tls".into(),
            ..Entry::default()
        };
        entry.extra.insert("detail".into(), "d".repeat(1000).into());
        cap_unauthenticated(&mut entry);
        assert_eq!(entry.db_user.as_deref().map(str::len), Some(64));
        assert_eq!(entry.database.as_deref().map(str::len), Some(64));
        assert_eq!(
            entry.extra["detail"].as_str().map(str::len),
            Some(refusals::UNAUTHENTICATED_DETAIL_BYTES),
            "our own detail keeps more room"
        );
        assert_eq!(entry.extra["truncated"], true);
        assert_eq!(entry.reason, "no_tls", "our own reason is not touched");

        let mut short = Entry {
            db_user: Some("billing".into()),
            ..Entry::default()
        };
        cap_unauthenticated(&mut short);
        assert!(!short.extra.contains_key("truncated"));
    }

    #[test]
    fn a_full_fair_budget_evicts_the_oldest_slot_of_the_largest_holder() {
        let slots = StartupSlots::bounded(4, 3);
        let flood: Vec<StartupSlot> = (0..3)
            .map(|_| {
                slots
                    .try_acquire_fair("127.0.0.2".parse().unwrap())
                    .unwrap()
            })
            .collect();
        let _other = slots
            .try_acquire_fair("127.0.0.3".parse().unwrap())
            .unwrap();
        assert_eq!(slots.in_use(), 4);
        let eviction = flood[0].eviction();
        let newcomer = slots
            .try_acquire_fair("127.0.0.4".parse().unwrap())
            .expect("room made for a source with none");
        assert_eq!(slots.in_use(), 4, "one out, one in");
        // The oldest of the flood was told (a permit is stored even before anyone waits).
        assert!(futures_util::FutureExt::now_or_never(eviction.notified()).is_some());
        // A source only one slot behind the largest holder does not evict.
        assert_eq!(
            slots.try_acquire_fair("127.0.0.3".parse().unwrap()).err(),
            Some(BudgetFull::Global)
        );
        // Another newcomer does: the flood is down to one.
        let _fifth = slots
            .try_acquire_fair("127.0.0.5".parse().unwrap())
            .unwrap();
        assert!(futures_util::FutureExt::now_or_never(flood[1].eviction().notified()).is_some());
        assert!(futures_util::FutureExt::now_or_never(flood[2].eviction().notified()).is_none());
        // The plain (unfair) budget never evicts.
        let plain = StartupSlots::bounded(1, 1);
        let _a = plain.try_acquire("127.0.0.2".parse().unwrap()).unwrap();
        assert!(plain.try_acquire("127.0.0.3".parse().unwrap()).is_err());
        drop(flood);
        drop(newcomer);
        assert_eq!(slots.in_use(), 2, "evicted slots are not counted twice");
    }

    #[test]
    fn a_bounded_budget_caps_all_sources_together() {
        let slots = StartupSlots::bounded(2, 2);
        let _a = slots.try_acquire("127.0.0.2".parse().unwrap()).unwrap();
        let b = slots.try_acquire("127.0.0.3".parse().unwrap()).unwrap();
        assert_eq!(
            slots.try_acquire("127.0.0.4".parse().unwrap()).err(),
            Some(BudgetFull::Global)
        );
        assert_eq!(slots.in_use(), 2);
        drop(b);
        assert!(slots.try_acquire("127.0.0.4".parse().unwrap()).is_ok());
    }
}
