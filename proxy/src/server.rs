//! The running sidecar: start (every file read first), the accept loop, periodic upkeep
//! (CRL reload, limiter cleanup), the step-up endpoint, the admin socket, and the drain.
//! What connections share lives in [`crate::sidecar`].

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use eastwall_ca::SpiffeId;
use eastwall_config::Config;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::admin_socket::{AdminError, AdminSocket};
use crate::audit::{AuditError, AuditLog, Entry};
use crate::cancel::CancelRegistry;
use crate::metrics::Metrics;
use crate::mfa::{self, SecretStore, TokenKey, Verifier};
use crate::refusals::RefusalGate;
use crate::registry::Registry;
use crate::relay::{EndReason, END_GRACE};
use crate::session;
use crate::tls::{ReloadingServerConfig, ServerTlsFiles};
use crate::upstream::Upstream;

pub use crate::sidecar::{mfa_roles, BudgetFull, CertUsage, Sidecar, StartupSlot, StartupSlots};
pub use crate::tls::TlsError;

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
    Admin(#[from] AdminError),
    #[error(transparent)]
    Locks(#[from] crate::locks::LockError),
    #[error(transparent)]
    Detect(#[from] crate::detection::DetectError),
    #[error(transparent)]
    Ocsf(#[from] crate::ocsf_sink::OcsfSinkError),
    #[error(transparent)]
    Fleet(Box<crate::fleet::client::ClientError>),
    #[error("cannot listen on {addr} for [admin] listen (/healthz, /readyz, /metrics): {source}; choose another address or set listen = \"off\"")]
    AdminListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running sidecar: its addresses and a way to stop it.
pub struct Running {
    pub local_addr: SocketAddr,
    pub stepup_addr: Option<SocketAddr>,
    /// Where `/healthz`, `/readyz` and `/metrics` are served; None when `[admin] listen`
    /// is off.
    pub admin_addr: Option<SocketAddr>,
    pub sidecar: Arc<Sidecar>,
    /// Stops the accept loop and the step-up endpoint (the start of a drain).
    stop_accepting: watch::Sender<bool>,
    /// Stops upkeep and the admin socket (the end of a drain).
    stop_rest: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
    admin: AdminSocket,
}

impl Running {
    /// Stops accepting, ends every live session now with reason `shutdown` (the client gets
    /// FATAL 57P01 "the sidecar is shutting down", PostgreSQL's backend is closed and
    /// cancelled) and waits, bounded, for their session_end lines. Connections still
    /// starting up are dropped with the runtime. [`Running::drain`] with no grace.
    pub async fn shutdown(self) {
        self.drain(Duration::ZERO, std::future::ready(())).await;
    }

    /// The drain: readiness turns false ([`Sidecar::draining`]), nothing new is accepted,
    /// live sessions may finish on their own for `grace` (or until `shorten` completes,
    /// e.g. a second signal), then the rest are ended with reason `shutdown` through the
    /// bounded end, and every session_end line is waited for (bounded). Open refusal
    /// summaries are written; the admin socket is removed.
    pub async fn drain(self, grace: Duration, shorten: impl std::future::Future<Output = ()>) {
        self.sidecar.draining.store(true, Ordering::Relaxed);
        let _ = self.stop_accepting.send(true);
        let _ = self.accept_task.await;
        let live = self.sidecar.sessions.count();
        if live > 0 && !grace.is_zero() {
            tracing::info!(sessions = live, grace = %humantime::format_duration(grace), "draining: live sessions may finish");
            tokio::select! {
                _ = self.sidecar.sessions.all_ended(grace) => {}
                () = shorten => tracing::info!("draining: grace cut short"),
            }
        }
        self.sidecar.end_all_sessions(EndReason::Shutdown);
        if !self.sidecar.sessions.all_ended(SHUTDOWN_WAIT).await {
            tracing::warn!(
                sessions = self.sidecar.sessions.count(),
                "shutdown: some sessions did not log their end in time"
            );
        }
        self.sidecar.flush_refusal_summaries().await;
        if let Some(detection) = &self.sidecar.detection {
            // After the last session_end line: the saved state has seen the whole run.
            detection.stop().await;
        }
        if let Some(ocsf) = &self.sidecar.ocsf {
            ocsf.stop().await;
        }
        let _ = self.stop_rest.send(true);
        drop(self.admin);
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
    let detection = crate::detection::Detection::start(&settings, &audit, metrics.clone())?;
    if let Some(entry) = detection.as_ref().and_then(|d| d.start_entry()) {
        tracing::warn!("the detectors start afresh although the decision log has lines: was the state file removed? new_flow is silent until learning ends");
        audit.record(entry).await?;
    }
    let ocsf = match &settings.audit.ocsf {
        Some(path) => Some(crate::ocsf_sink::OcsfSink::start(
            path,
            &audit,
            metrics.clone(),
        )?),
        None => None,
    };
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
    let check_pool = settings
        .upstream
        .check_role
        .clone()
        .map(crate::privilege_pool::CheckPool::new);
    let fleet = settings
        .fleet
        .clone()
        .map(|f| crate::fleet::Fleet::new(f, std::time::SystemTime::now()));
    let sidecar = Sidecar {
        fleet,
        check_pool,
        cancels: CancelRegistry::new(settings.limits.cancels_per_second),
        startup_slots: StartupSlots::new(settings.limits.max_startups_per_source),
        handshake_slots: StartupSlots::bounded(
            settings.limits.max_handshakes,
            settings.limits.max_handshakes_per_source,
        ),
        refusals: RefusalGate::new(Instant::now()),
        config_watch: crate::reload::ConfigWatch::new(&settings),
        settings,
        policy: RwLock::new(Arc::new(policy)),
        tls,
        upstream,
        audit,
        mfa,
        cert_usage: Arc::new(CertUsage::default()),
        mfa_roles: protected,
        revoked,
        sessions: Registry::default(),
        draining: Default::default(),
        metrics,
        reach: crate::admin::ReachCache::default(),
        log_retry: crate::admin::ReachCache::default(),
        locks,
        detection,
        ocsf,
        expiries: Default::default(),
        expiry_warned: Default::default(),
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
    let mut admin = AdminSocket::bind(&sidecar.settings.admin.socket)?;
    let (stop_accepting, watcher) = watch::channel(false);
    let (stop_rest, rest_watcher) = watch::channel(false);

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
                spawn_admin(sidecar.clone(), listener, rest_watcher.clone());
                Some(bound)
            }
            Err(err) => {
                tracing::error!(%err, "the admin listener is off");
                None
            }
        },
        None => None,
    };

    spawn_upkeep(sidecar.clone(), rest_watcher.clone());
    spawn_fleet(&sidecar, rest_watcher.clone()).await?;
    admin.serve(sidecar.clone(), rest_watcher);
    let accept_task = tokio::spawn(accept_loop(sidecar.clone(), listener, watcher));
    tracing::info!(listen = %local_addr, upstream = %sidecar.upstream.describe(), guards = %sidecar.settings.guards, admin = %admin.path().display(), "eastwall sidecar listening");
    Ok(Running {
        local_addr,
        stepup_addr,
        admin_addr,
        sidecar,
        stop_accepting,
        stop_rest,
        accept_task,
        admin,
    })
}

/// `[fleet]`: connects in the background (the sidecar serves its local state until NATS
/// answers) and starts the bucket reader and the log publisher.
async fn spawn_fleet(
    sidecar: &Arc<Sidecar>,
    stop: watch::Receiver<bool>,
) -> Result<(), StartError> {
    let Some(fleet) = &sidecar.fleet else {
        return Ok(());
    };
    let settings = &fleet.settings;
    let client =
        crate::fleet::client::connect(settings, &format!("eastwall {}", settings.name), true)
            .await
            .map_err(|e| StartError::Fleet(Box::new(e)))?;
    let tap = sidecar.audit.tap(settings.backlog);
    tokio::spawn(crate::fleet::publish::run(
        client.clone(),
        settings.clone(),
        tap,
        sidecar.metrics.clone(),
        stop.clone(),
    ));
    // The cached last good state is in force before the first connection is accepted.
    let memory = crate::fleet::sync::restore(sidecar).await;
    tokio::spawn(crate::fleet::sync::run(
        sidecar.clone(),
        client,
        memory,
        stop,
    ));
    Ok(())
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
                    crate::reload::check(&sidecar).await;
                    sidecar.log_expiry_warnings().await;
                    crate::locks::upkeep(&sidecar.locks, &sidecar.audit).await;
                    apply_locks(&sidecar);
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
                            let fresh = sidecar.policy().mfa_roles(&sidecar.settings.guards, sidecar.settings.service_port, &enrolled);
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

/// Ends every live session a lock in force matches (identity, serial, source or role), each
/// through the bounded end with reason `locked`; run on every upkeep tick, so a new lock
/// reaches live sessions within 2 s, and sets the locks gauge.
fn apply_locks(sidecar: &Sidecar) {
    let locks = sidecar.locks.current();
    let now = std::time::SystemTime::now();
    sidecar.metrics.set_locks_active(locks.active(now).count());
    if locks.is_empty() {
        return;
    }
    let ended = sidecar.sessions.end_matching(|info| {
        let query = crate::locks::LockQuery {
            id: Some(&info.spiffe_id),
            serial: Some(&info.serial_hex),
            source: Some(info.source.ip()),
            role: Some(&info.role),
        };
        locks.find(&query, now).map(|lock| EndReason::Locked {
            lock_id: lock.id.clone(),
            message: lock.message.clone(),
        })
    });
    if ended > 0 {
        tracing::info!(sessions = ended, "locks ended live sessions");
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
    fn warnings(&self) -> Vec<String> {
        self.expiry_findings(std::time::SystemTime::now())
            .into_iter()
            .filter(|j| j.level == crate::preflight::Level::Warning)
            .map(|j| format!("warning: {}", j.message))
            .collect()
    }

    fn metrics(&self, openmetrics: bool) -> String {
        let live = self.live_sessions();
        // Staleness grows while a read hangs: computed at scrape time, not per read.
        crate::fleet::sync::publish_state(self);
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
            if let Some(why) = self
                .fleet
                .as_ref()
                .and_then(|f| f.refusal(std::time::SystemTime::now()))
            {
                failing.push(format!("fleet: {why}"));
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
            for j in self.expiry_findings(std::time::SystemTime::now()) {
                if j.level == crate::preflight::Level::Error {
                    failing.push(j.message);
                }
            }
            failing
        })
    }
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
        let not_eligible = (!policy_of.policy().requires_mfa(&who.id)).then(|| {
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
    let locked: crate::stepup::LockCheck = Arc::new(
        move |who: &crate::stepup::StepUpIdentity, source: std::net::IpAddr| {
            let locks = locks_of.locks.current();
            let now = std::time::SystemTime::now();
            crate::locks::check_lock(&locks, &who.id, &who.serial_hex, source, None, now)
        },
    );
    tokio::spawn(async move {
        tokio::select! {
            _ = crate::stepup::serve(listener, tls, verifier, identify, locked, on_decision) => {}
            _ = stop.changed() => {}
        }
    });
}
