//! The running sidecar: what every connection shares, the accept loop, periodic upkeep
//! (CRL reload, limiter cleanup), the step-up endpoint, and a clean shutdown.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use eastwall_ca::SpiffeId;
use eastwall_config::{Config, MfaRoles, Policy, Settings};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::audit::{AuditError, AuditLog, Entry};
use crate::cancel::CancelRegistry;
use crate::metrics::Metrics;
use crate::mfa::{self, SecretStore, TokenKey, Verifier};
use crate::refusals::{self, RefusalGate};
use crate::relay::{EndReason, END_GRACE};
use crate::session::{self, CertUsage};
use crate::tls::{ReloadingServerConfig, ServerTlsFiles, TlsError};
use crate::upstream::Upstream;

/// How often TLS files (certificate, trust bundle, CRL) are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// How often rate-limiter state for quiet sources is dropped.
const CLEANUP_EVERY: Duration = Duration::from_secs(30);
/// How long a shutdown waits for live sessions to log their end: the grace, then the
/// CancelRequest each sends (bounded by the grace too), and a margin for the log's fsync.
const SHUTDOWN_WAIT: Duration = Duration::from_millis(2 * END_GRACE.as_millis() as u64 + 1000);
/// How often ended refusal windows are summarised in the log.
const SUMMARIES_EVERY: Duration = Duration::from_secs(1);
/// How often the decision log's filesystem is checked for free space.
const DISK_CHECK_EVERY: Duration = Duration::from_secs(60);

/// Why the sidecar could not start; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Config(#[from] eastwall_config::ConfigError),
    #[error(transparent)]
    Mfa(#[from] mfa::MfaError),
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
    #[error(transparent)]
    Locks(#[from] crate::locks::LockError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} for [admin] listen (/healthz, /readyz, /metrics): {source}; choose another address or set listen = \"off\"")]
    AdminListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Everything connections share.
pub struct Sidecar {
    pub settings: Settings,
    pub policy: Policy,
    pub tls: ReloadingServerConfig,
    pub upstream: Upstream,
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
    /// "End every live session, for this reason": set once (shutdown); every relay's stop
    /// input listens to it beside its own causes.
    pub end_all: watch::Sender<Option<EndReason>>,
    /// Admitted sessions that have not written their session_end line yet.
    pub live: LiveSessions,
    /// The Prometheus metrics `/metrics` serves; the decision log feeds most of them.
    pub metrics: Arc<Metrics>,
    /// Set when a shutdown starts: `/readyz` answers 503 from then on.
    pub draining: AtomicBool,
    /// The last upstream reachability check, for `/readyz`.
    pub reach: crate::admin::ReachCache,
    /// The last retry of a failed decision-log write, for `/readyz`.
    pub log_retry: crate::admin::ReachCache,
    /// The operators' locks (`[locks] file`), re-read by the upkeep task.
    pub locks: crate::locks::LockWatcher,
}

/// Counts admitted sessions until their session_end line is written, so a shutdown can
/// wait for those lines.
pub struct LiveSessions {
    count: watch::Sender<usize>,
}

impl Default for LiveSessions {
    fn default() -> Self {
        Self {
            count: watch::channel(0).0,
        }
    }
}

impl LiveSessions {
    /// Counts one session until the guard is dropped.
    pub fn enter(&self) -> LiveSession<'_> {
        self.count.send_modify(|n| *n += 1);
        LiveSession(self)
    }

    pub fn count(&self) -> usize {
        *self.count.borrow()
    }

    /// Waits until no session is live, at most `within`; whether they all ended.
    pub async fn all_ended(&self, within: Duration) -> bool {
        let mut count = self.count.subscribe();
        let ended = tokio::time::timeout(within, count.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok());
        ended
    }
}

/// One live session (see [`LiveSessions::enter`]).
pub struct LiveSession<'a>(&'a LiveSessions);

impl Drop for LiveSession<'_> {
    fn drop(&mut self) {
        self.0.count.send_modify(|n| *n = n.saturating_sub(1));
    }
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
    fn refuse_at_accept(self: &Arc<Self>, peer: SocketAddr, reason: &'static str, what: &str) {
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

    async fn write(&self, entry: Entry) {
        if let Err(err) = self.audit.record(entry).await {
            tracing::error!(%err, "decision log write failed");
        }
    }

    /// Admitted sessions not yet ended: `eastwall_sessions_active`. The one place metrics
    /// read the live-session count from.
    pub fn live_sessions(&self) -> usize {
        self.live.count()
    }

    /// Whether a shutdown (drain) has started.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Re-reads the proxy certificate's notAfter and the CRL's nextUpdate into the metrics
    /// (at start and after each TLS reload).
    pub fn refresh_expiry_metrics(&self) {
        let not_after = crate::metrics::cert_not_after(&self.tls.files().cert);
        self.metrics
            .set_expiry(not_after, self.tls.crl_next_update());
    }

    /// Ends every live session (and any admitted from now on) for `reason`, each through
    /// the relay's bounded end: FATAL 57P01, both legs closed, a session_end line.
    pub fn end_all_sessions(&self, reason: EndReason) {
        self.end_all.send_replace(Some(reason));
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

/// A running sidecar: its addresses and a way to stop it.
pub struct Running {
    pub local_addr: SocketAddr,
    pub stepup_addr: Option<SocketAddr>,
    /// Where `/healthz`, `/readyz` and `/metrics` are served; None when `[admin] listen`
    /// is off.
    pub admin_addr: Option<SocketAddr>,
    pub sidecar: Arc<Sidecar>,
    shutdown: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
}

impl Running {
    /// Stops accepting, ends every live session with reason `shutdown` (the client gets
    /// FATAL 57P01 "the sidecar is shutting down", PostgreSQL's backend is closed and
    /// cancelled) and waits, bounded, for their session_end lines. Connections still
    /// starting up are dropped with the runtime.
    pub async fn shutdown(self) {
        self.sidecar.draining.store(true, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
        let _ = self.accept_task.await;
        self.sidecar.end_all_sessions(EndReason::Shutdown);
        if !self.sidecar.live.all_ended(SHUTDOWN_WAIT).await {
            tracing::warn!(
                sessions = self.sidecar.live.count(),
                "shutdown: some sessions did not log their end in time"
            );
        }
        self.sidecar.flush_refusal_summaries().await;
    }
}

/// Builds the shared state from a loaded config: every file is read now, so a broken
/// certificate, key, CRL or secret stops the start with a message rather than a client.
pub async fn prepare(config: Config) -> Result<Sidecar, StartError> {
    let Config { settings, policy } = config;
    let tls_files = ServerTlsFiles {
        cert: settings.listen.cert.clone(),
        key: settings.listen.key.clone(),
        client_ca: settings.listen.client_ca.clone(),
        crl: settings.listen.crl.clone(),
        // Beside the decision log: a folder the sidecar writes, kept with the audit trail.
        crl_state: settings
            .audit
            .path
            .with_file_name(crate::tls::CRL_STATE_FILE),
    };
    let tls = ReloadingServerConfig::new(tls_files.clone())?;
    let metrics = Arc::new(Metrics::new());
    let upstream =
        Upstream::new(&settings.upstream)?.with_login_histogram(metrics.upstream_login_histogram());
    let audit = AuditLog::open(&settings.audit.path).await?;
    audit.observe(metrics.clone());
    let mfa = if policy.mfa_groups().is_empty() {
        None
    } else {
        let store = SecretStore::load(&settings.mfa.secrets)?;
        let key = TokenKey::load_or_create(&settings.mfa.token_key)?;
        Some(Arc::new(Verifier::new(store, key, &settings.mfa)))
    };
    let (revoked, _) = watch::channel(Arc::new(tls.revoked_serials()));
    let protected = RwLock::new(Arc::new(mfa_roles(&settings, &policy)));
    let locks = crate::locks::LockWatcher::open(
        &settings.locks_file,
        &settings.trust_domain,
        std::time::SystemTime::now(),
    )?;
    let sidecar = Sidecar {
        cancels: CancelRegistry::new(settings.limits.cancels_per_second),
        startup_slots: StartupSlots::new(settings.limits.max_startups_per_source),
        handshake_slots: StartupSlots::bounded(
            settings.limits.max_handshakes,
            settings.limits.max_handshakes_per_source,
        ),
        refusals: RefusalGate::new(Instant::now()),
        settings,
        policy,
        tls,
        upstream,
        audit,
        mfa,
        cert_usage: Arc::new(CertUsage::default()),
        mfa_roles: protected,
        revoked,
        end_all: watch::channel(None).0,
        live: LiveSessions::default(),
        metrics,
        draining: AtomicBool::new(false),
        reach: crate::admin::ReachCache::default(),
        log_retry: crate::admin::ReachCache::default(),
        locks,
    };
    sidecar.refresh_expiry_metrics();
    Ok(sidecar)
}

/// Starts listening and serving. The listen address may use port 0 (tests).
pub async fn start(config: Config) -> Result<Running, StartError> {
    let sidecar = Arc::new(prepare(config).await?);
    let addr = sidecar.settings.listen.address;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| StartError::Listen { addr, source })?;
    let (shutdown, watcher) = watch::channel(false);

    let stepup_addr = match (&sidecar.mfa, sidecar.settings.mfa.stepup_listen) {
        (Some(verifier), Some(addr)) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Listen { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| StartError::Listen { addr, source })?;
            spawn_stepup(sidecar.clone(), verifier.clone(), listener, watcher.clone());
            Some(bound)
        }
        _ => None,
    };

    // A busy admin port does not stop the database path: it is reported loudly, and an
    // orchestrator probing /readyz sees the sidecar as not ready.
    let admin_addr = match sidecar.settings.admin.listen {
        Some(addr) => match bind_admin(addr).await {
            Ok((listener, bound)) => {
                if !crate::admin::is_loopback(bound) {
                    tracing::warn!(admin = %bound, "[admin] listen is not a loopback address: /healthz, /readyz and /metrics are served without authentication to whoever reaches it");
                }
                spawn_admin(sidecar.clone(), listener, watcher.clone());
                Some(bound)
            }
            Err(err) => {
                tracing::error!(%err, "the admin listener is off");
                None
            }
        },
        None => None,
    };

    spawn_upkeep(sidecar.clone(), watcher.clone());
    let accept_task = tokio::spawn(accept_loop(sidecar.clone(), listener, watcher));
    tracing::info!(listen = %local_addr, upstream = %sidecar.upstream.describe(), guards = %sidecar.settings.guards, "eastwall sidecar listening");
    Ok(Running {
        local_addr,
        stepup_addr,
        admin_addr,
        sidecar,
        shutdown,
        accept_task,
    })
}

async fn accept_loop(
    sidecar: Arc<Sidecar>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(
        sidecar.settings.limits.max_connections.max(1),
    ));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            sidecar.refuse_at_accept(peer, "connection_limit", "connection limit reached");
            drop(tcp);
            continue;
        };
        // Not yet through TLS: the smaller handshake budget, so silent or slow handshakes
        // can hold at most `max_handshakes` of `max_connections`.
        let handshake = match sidecar.handshake_slots.try_acquire_fair(peer.ip()) {
            Ok(handshake) => handshake,
            Err(full) => {
                let (reason, what) = match full {
                    BudgetFull::Source => (
                        "handshake_limit_source",
                        "too many connections from this source still in the TLS handshake",
                    ),
                    BudgetFull::Global => (
                        "handshake_limit",
                        "too many connections still in the TLS handshake",
                    ),
                };
                sidecar.refuse_at_accept(peer, reason, what);
                drop(tcp);
                continue;
            }
        };
        let Ok(startup) = sidecar.startup_slots.try_acquire(peer.ip()) else {
            sidecar.refuse_at_accept(
                peer,
                "startup_limit_source",
                "too many connections from this source still starting up",
            );
            drop(tcp);
            continue;
        };
        let sidecar = sidecar.clone();
        tokio::spawn(async move {
            session::serve(sidecar, tcp, peer, startup, handshake).await;
            drop(slot);
        });
    }
}

fn spawn_upkeep(sidecar: Arc<Sidecar>, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut reload = tokio::time::interval(RELOAD_EVERY);
        let mut cleanup = tokio::time::interval(CLEANUP_EVERY);
        let mut summaries = tokio::time::interval(SUMMARIES_EVERY);
        let mut disk = tokio::time::interval(DISK_CHECK_EVERY);
        let mut disk_watch = crate::audit::DiskWatch::default();
        loop {
            tokio::select! {
                _ = summaries.tick() => sidecar.write_due_summaries().await,
                _ = disk.tick() => check_disk(&sidecar, &mut disk_watch).await,
                _ = reload.tick() => {
                    crate::locks::upkeep(&sidecar.locks, &sidecar.audit).await;
                    match sidecar.tls.refresh() {
                        Ok(true) => {
                            tracing::info!("TLS files changed; new handshakes use them");
                            sidecar.metrics.config_reload("ok");
                            sidecar.refresh_expiry_metrics();
                            // The same verified state the handshakes consult, not a re-read.
                            sidecar.revoked.send_replace(Arc::new(sidecar.tls.revoked_serials()));
                        }
                        Ok(false) => {}
                        Err(err) => {
                            // Kept visible: a tampered or broken CRL must not only be a trace
                            // line. The last good files stay in force.
                            tracing::error!(%err, failures = sidecar.tls.reload_failures(), "TLS files changed but cannot be loaded; keeping the previous ones");
                            sidecar.metrics.config_reload("error");
                            let event = if err.is_crl() { "crl_reload" } else { "tls_reload" };
                            let mut entry = Entry {
                                conn_id: crate::identity::new_conn_id(),
                                event,
                                reason: err.reason().to_owned(),
                                alert: true,
                                ..Entry::default()
                            };
                            entry.extra.insert("result".into(), "error".into());
                            entry.extra.insert("detail".into(), err.to_string().into());
                            if let Err(err) = sidecar.audit.record(entry).await {
                                tracing::error!(%err, "decision log write failed");
                            }
                        }
                    }
                    if let Some(verifier) = &sidecar.mfa {
                        if let Ok(store) = SecretStore::load(&sidecar.settings.mfa.secrets) {
                            let enrolled: Vec<SpiffeId> = store.list().into_iter().map(|(id, _)| id).collect();
                            let fresh = sidecar.policy.mfa_roles(&sidecar.settings.guards, sidecar.settings.service_port, &enrolled);
                            let mut roles = sidecar.mfa_roles.write().unwrap_or_else(|p| p.into_inner());
                            // Protection only grows: an operator removed (or a secrets file
                            // briefly missing) must not reopen their role to look-alikes.
                            let mut grown = (**roles).clone();
                            grown.absorb(&fresh);
                            if grown != **roles {
                                *roles = Arc::new(grown);
                            }
                            verifier.replace_store(store);
                        }
                    }
                }
                _ = cleanup.tick() => {
                    sidecar.cancels.retain_recent();
                    if let Some(verifier) = &sidecar.mfa {
                        verifier.retain_recent();
                    }
                }
                _ = stop.changed() => return,
            }
        }
    });
}

/// Reports low free space on the decision log's filesystem: a full disk makes every write
/// fail, and the sidecar then refuses everyone (fail-closed), so it is flagged before that.
async fn check_disk(sidecar: &Sidecar, watch: &mut crate::audit::DiskWatch) {
    let path = sidecar.audit.path().to_path_buf();
    let space = tokio::task::spawn_blocking(move || crate::audit::free_space(&path)).await;
    let space = match space {
        Ok(Ok(space)) => space,
        Ok(Err(err)) => {
            tracing::warn!(%err, "cannot read the free space of the decision log's filesystem");
            return;
        }
        Err(_) => return,
    };
    match watch.observe(space) {
        Some(crate::audit::DiskChange::Low) => {
            tracing::error!(available = space.available, total = space.total, path = %sidecar.audit.path().display(),
                "low disk space for the decision log: when it is full every connection is refused");
            let mut entry = Entry {
                conn_id: crate::identity::new_conn_id(),
                event: "low_disk_space",
                reason: "below_threshold".into(),
                alert: true,
                ..Entry::default()
            };
            entry
                .extra
                .insert("available_bytes".into(), space.available.into());
            entry.extra.insert("total_bytes".into(), space.total.into());
            sidecar.write(entry).await;
        }
        Some(crate::audit::DiskChange::Recovered) => {
            tracing::info!(
                available = space.available,
                "disk space for the decision log is back above the threshold"
            );
        }
        None if watch.is_low() => {
            tracing::error!(
                available = space.available,
                "disk space for the decision log is still low"
            );
        }
        None => {}
    }
}

async fn bind_admin(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::AdminListen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| StartError::AdminListen { addr, source })?;
    Ok((listener, bound))
}

/// Serves `/healthz`, `/readyz` and `/metrics` ([`crate::admin`]) until shutdown.
fn spawn_admin(sidecar: Arc<Sidecar>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        tokio::select! {
            _ = crate::admin::serve(listener, sidecar) => {}
            _ = stop.changed() => {}
        }
    });
}

impl crate::admin::Health for Sidecar {
    fn metrics(&self, openmetrics: bool) -> String {
        let live = self.live_sessions();
        if openmetrics {
            self.metrics.encode(live)
        } else {
            self.metrics.encode_classic(live)
        }
    }

    fn not_ready(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<String>> + Send + '_>> {
        Box::pin(async move {
            let mut failing = Vec::new();
            if self.draining() {
                failing.push("draining: the sidecar is shutting down".to_owned());
            }
            if !self.audit.last_write_ok() {
                // Without traffic nothing would write again, and a sidecar taken out of
                // rotation for a failed write would stay out after the disk recovered: after
                // a failure, readiness itself writes a line (at most every few seconds).
                let _ = self
                    .log_retry
                    .get(|| async {
                        let entry = Entry {
                            conn_id: crate::identity::new_conn_id(),
                            event: "log_write_check",
                            reason: "after_failure".into(),
                            ..Entry::default()
                        };
                        self.audit.record(entry).await.map_err(|e| e.to_string())
                    })
                    .await;
            }
            if !self.audit.last_write_ok() {
                failing.push(format!(
                    "decision log: the last write to {} failed; every connection is refused until one succeeds",
                    self.audit.path().display()
                ));
            }
            let reach = self
                .reach
                .get(|| async { self.upstream.reachable().await.map_err(|e| e.to_string()) })
                .await;
            if let Err(err) = reach {
                failing.push(format!("upstream: {err}"));
            }
            failing
        })
    }
}

/// Serves the HTTPS step-up endpoint with the same TLS config and SVID rules as the front
/// door; every attempt is a decision line, and no token is handed out unless it is logged.
fn spawn_stepup(
    sidecar: Arc<Sidecar>,
    verifier: Arc<Verifier>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let policy_of = sidecar.clone();
    let identify: crate::stepup::Identify = Arc::new(move |conn: &rustls::ServerConnection| {
        let who =
            crate::identity::identify(conn.peer_certificates(), &policy_of.settings.trust_domain)
                .map_err(|err| err.to_string())?;
        // Only identities some rule asks for MFA may spend MFA budgets here.
        let not_eligible = (!policy_of.policy.requires_mfa(&who.id)).then(|| {
            format!(
                "{} is not asked for MFA by any policy rule; step-up is for operators",
                who.id
            )
        });
        Ok(crate::stepup::StepUpIdentity {
            id: who.id,
            cert_sha256: who.cert_sha256,
            serial_hex: who.serial_hex,
            not_eligible,
        })
    });
    let logger = sidecar.clone();
    let on_decision: crate::stepup::OnDecision =
        Arc::new(move |event: crate::stepup::StepUpEvent| {
            let sidecar = logger.clone();
            Box::pin(async move {
                let conn_id = crate::identity::new_conn_id();
                let mut entry = sidecar.entry(&conn_id, event.source, "stepup");
                entry.spiffe_id = Some(event.id.to_string());
                entry.cert_serial = Some(event.cert_serial.clone());
                entry.decision = Some(if event.outcome.is_accepted() {
                    "allow"
                } else {
                    "deny"
                });
                entry.reason = format!("mfa_{}", event.outcome.reason());
                if let Some(lock_id) = &event.lock_id {
                    entry.reason = crate::locks::LockRefusal::REASON.into();
                    entry.extra.insert("lock_id".into(), lock_id.clone().into());
                }
                entry.alert = matches!(event.outcome, mfa::MfaOutcome::LockedOut { first: true });
                entry
                    .extra
                    .insert("cert_sha256".into(), hex::encode(event.cert_sha256).into());
                if let Some(left) = event.locked_for {
                    entry
                        .extra
                        .insert("lockout_s".into(), left.as_secs().max(1).into());
                }
                if let Some(age) = event.outcome.mfa_age_s() {
                    entry.extra.insert("mfa_age_s".into(), age.into());
                }
                sidecar.audit.record(entry).await.map_err(|e| e.to_string())
            })
        });
    // Same certificate and client verifier as the front door (rebuilt when the CRL changes),
    // but speaking HTTP/1.1: curl and our own client offer ALPN "http/1.1", which
    // "postgresql" would refuse. The HTTP copy is made again only when the front door's
    // config changed.
    let derived: std::sync::Mutex<Option<(Arc<rustls::ServerConfig>, Arc<rustls::ServerConfig>)>> =
        std::sync::Mutex::new(None);
    let source = sidecar.clone();
    let tls: crate::stepup::TlsSource = Arc::new(move || {
        let front = source.tls.get();
        let mut cache = derived.lock().unwrap_or_else(|p| p.into_inner());
        match &*cache {
            Some((seen, http)) if Arc::ptr_eq(seen, &front) => http.clone(),
            _ => {
                let mut http = (*front).clone();
                http.alpn_protocols = vec![b"http/1.1".to_vec()];
                let http = Arc::new(http);
                *cache = Some((front, http.clone()));
                http
            }
        }
    });
    let locks_of = sidecar.clone();
    let locked: crate::stepup::LockCheck =
        Arc::new(move |who: &crate::stepup::StepUpIdentity, source: IpAddr| {
            let locks = locks_of.locks.current();
            let now = std::time::SystemTime::now();
            crate::locks::check_lock(&locks, &who.id, &who.serial_hex, source, None, now)
        });
    tokio::spawn(async move {
        tokio::select! {
            _ = crate::stepup::serve(listener, tls, verifier, identify, locked, on_decision) => {}
            _ = stop.changed() => {}
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_shutdown_waits_for_live_sessions_and_no_longer() {
        let live = LiveSessions::default();
        assert!(live.all_ended(Duration::from_millis(10)).await);
        let first = live.enter();
        let second = live.enter();
        assert_eq!(live.count(), 2);
        assert!(!live.all_ended(Duration::from_millis(50)).await, "bounded");
        drop(first);
        let waiting = live.all_ended(Duration::from_secs(5));
        let ending = async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(second);
        };
        let (ended, ()) = tokio::join!(waiting, ending);
        assert!(ended);
        assert_eq!(live.count(), 0);
    }

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
        entry.extra.insert("sni".into(), "s".repeat(100).into());
        cap_unauthenticated(&mut entry);
        assert_eq!(entry.db_user.as_deref().map(str::len), Some(64));
        assert_eq!(entry.database.as_deref().map(str::len), Some(64));
        assert_eq!(entry.extra["sni"].as_str().map(str::len), Some(64));
        // Our own explanation keeps room to say why, and is still bounded.
        assert_eq!(entry.extra["detail"].as_str().map(str::len), Some(256));
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
