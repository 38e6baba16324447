//! The running sidecar: what every connection shares, the accept loop, periodic upkeep
//! (CRL reload, limiter cleanup), the step-up endpoint, and a clean shutdown.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eastwall_config::{Config, Policy, Settings};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::audit::{AuditError, AuditLog, Entry};
use crate::cancel::CancelRegistry;
use crate::mfa::{self, SecretStore, TokenKey, Verifier};
use crate::session::{self, CertUsage};
use crate::tls::{ReloadingServerConfig, ServerTlsFiles, TlsError};
use crate::upstream::Upstream;

/// How often TLS files (certificate, trust bundle, CRL) are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// How often rate-limiter state for quiet sources is dropped.
const CLEANUP_EVERY: Duration = Duration::from_secs(30);

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
    #[error("cannot listen on {addr}: {source}")]
    Listen {
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
    pub startup_slots: Arc<StartupSlots>,
    /// Serials the verified CRLs revoke, re-sent on every reload: live sessions watch it and
    /// end when their certificate appears (new handshakes are refused by the TLS verifier).
    pub revoked: watch::Sender<Arc<std::collections::HashSet<String>>>,
}

/// Connections per source that have not been admitted yet (TLS, startup, MFA in progress).
/// The global `max_connections` alone would let one host holding silent connections open
/// lock everyone else out until the startup timeout.
pub struct StartupSlots {
    per_source: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl StartupSlots {
    pub fn new(per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            per_source: per_source.max(1),
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a new connection from `source`, or None when that source has its fill.
    pub fn try_acquire(self: &Arc<Self>, source: IpAddr) -> Option<StartupSlot> {
        let key = source_key(source);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(key).or_insert(0);
        if *count >= self.per_source {
            return None;
        }
        *count += 1;
        Some(StartupSlot {
            slots: self.clone(),
            key,
        })
    }
}

/// One host is one key: IPv6 clients usually hold a whole /64, so they are grouped by it.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::from(octets)
        }
    }
}

/// A connection's place in its source's startup budget, given back when it is admitted or gone.
pub struct StartupSlot {
    slots: Arc<StartupSlots>,
    key: IpAddr,
}

impl Drop for StartupSlot {
    fn drop(&mut self) {
        let mut counts = self.slots.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
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
        if let Err(err) = self.audit.record(entry).await {
            tracing::error!(%err, "decision log write failed");
        }
    }
}

/// A running sidecar: its addresses and a way to stop it.
pub struct Running {
    pub local_addr: SocketAddr,
    pub stepup_addr: Option<SocketAddr>,
    pub sidecar: Arc<Sidecar>,
    shutdown: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
}

impl Running {
    /// Stops accepting; sessions in flight end when their clients or servers close them.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.accept_task.await;
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
    };
    let tls = ReloadingServerConfig::new(tls_files.clone())?;
    let upstream = Upstream::new(&settings.upstream)?;
    let audit = AuditLog::open(&settings.audit.path).await?;
    let mfa = if policy.mfa_groups().is_empty() {
        None
    } else {
        let store = SecretStore::load(&settings.mfa.secrets)?;
        let key = TokenKey::load_or_create(&settings.mfa.token_key)?;
        Some(Arc::new(Verifier::new(store, key, &settings.mfa)))
    };
    let (revoked, _) = watch::channel(Arc::new(crate::tls::revoked_serials(&tls_files)?));
    Ok(Sidecar {
        cancels: CancelRegistry::new(settings.limits.cancels_per_second),
        startup_slots: StartupSlots::new(settings.limits.max_startups_per_source),
        settings,
        policy,
        tls,
        upstream,
        audit,
        mfa,
        cert_usage: Arc::new(CertUsage::default()),
        revoked,
    })
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

    spawn_upkeep(sidecar.clone(), watcher.clone());
    let accept_task = tokio::spawn(accept_loop(sidecar.clone(), listener, watcher));
    tracing::info!(listen = %local_addr, upstream = %sidecar.upstream.describe(), guards = %sidecar.settings.guards, "eastwall sidecar listening");
    Ok(Running {
        local_addr,
        stepup_addr,
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
            tracing::warn!(%peer, "connection limit reached; closing");
            drop(tcp);
            continue;
        };
        let Some(startup) = sidecar.startup_slots.try_acquire(peer.ip()) else {
            // Not written to the decision log: a flood must not become a flood of fsyncs.
            tracing::warn!(%peer, "too many connections from this source still starting up; closing");
            drop(tcp);
            continue;
        };
        let sidecar = sidecar.clone();
        tokio::spawn(async move {
            session::serve(sidecar, tcp, peer, startup).await;
            drop(slot);
        });
    }
}

fn spawn_upkeep(sidecar: Arc<Sidecar>, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut reload = tokio::time::interval(RELOAD_EVERY);
        let mut cleanup = tokio::time::interval(CLEANUP_EVERY);
        loop {
            tokio::select! {
                _ = reload.tick() => {
                    match sidecar.tls.refresh() {
                        Ok(true) => {
                            tracing::info!("TLS files changed; new handshakes use them");
                            match crate::tls::revoked_serials(sidecar.tls.files()) {
                                Ok(serials) => {
                                    sidecar.revoked.send_replace(Arc::new(serials));
                                }
                                Err(err) => tracing::error!(%err, "cannot read the CRL for live sessions"),
                            }
                        }
                        Ok(false) => {}
                        Err(err) => tracing::error!(%err, "TLS files changed but cannot be loaded; keeping the previous ones"),
                    }
                    if let Some(verifier) = &sidecar.mfa {
                        if let Ok(store) = SecretStore::load(&sidecar.settings.mfa.secrets) {
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
    tokio::spawn(async move {
        tokio::select! {
            _ = crate::stepup::serve(listener, tls, verifier, identify, on_decision) => {}
            _ = stop.changed() => {}
        }
    });
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
        assert!(slots.try_acquire(a).is_none(), "a third is refused");
        assert!(
            slots.try_acquire(b).is_some(),
            "another source is unaffected"
        );
        drop(first);
        assert!(
            slots.try_acquire(a).is_some(),
            "a released slot is reusable"
        );
    }

    #[test]
    fn ipv6_sources_are_grouped_by_their_64() {
        let slots = StartupSlots::new(1);
        let _held = slots
            .try_acquire("2001:db8:1:2::1".parse().unwrap())
            .unwrap();
        assert!(slots
            .try_acquire("2001:db8:1:2::ffff".parse().unwrap())
            .is_none());
        assert!(slots
            .try_acquire("2001:db8:1:3::1".parse().unwrap())
            .is_some());
    }
}
