//! One client connection, end to end: front door, identity, policy decision, MFA step-up,
//! the proxy's own upstream login, the decision line, and the relay.
//!
//! The order, and what PostgreSQL sees before the allow line is durable:
//!
//! 1. TLS, the client's certificate (its identity) and its startup message. PostgreSQL hears
//!    nothing.
//! 2. The policy decision and, for operators, the MFA step-up. A refusal is logged and the
//!    client gets FATAL; PostgreSQL hears nothing.
//! 3. The proxy's own login to PostgreSQL as the granted role: a connection, a startup
//!    message with the forwarded parameters, the proxy's authentication, and the proxy's own
//!    privilege check on that session (superuser-equivalence). PostgreSQL may log this login
//!    and a backend exists for it, but it carries no byte the client sent except the
//!    forwarded startup parameters.
//! 4. A failed privilege check is logged as a refusal and the upstream session is ended
//!    with Terminate.
//! 5. The allow line, durably in the log (written and fsync'd). If it cannot be written, the
//!    upstream session is ended and the client refused (57P03).
//! 6. Only then does AuthenticationOk reach the client, and only then do the client's own
//!    messages (including any it pipelined after the startup) reach PostgreSQL.
//!
//! # Stages
//!
//! Admission is a chain of small functions, each taking what the previous one established
//! and returning the next stage's input or a [`Refusal`] (its log line, SQLSTATE and
//! message), applied in one place ([`Refusal::apply`]): [`identify_client`] →
//! [`check_request`] → [`hold_places`] → [`decide_and_step_up`] → [`login_upstream`] →
//! [`check_privilege`] → [`record_allow`] → [`greet`] → [`relay_and_log`], which registers
//! the session in [`crate::registry`] for everything that may end it later.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::BytesMut;
use eastwall_config::{authorize, Decision, Request, Verdict};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::audit::Entry;
use crate::cancel::{BackendKey, CancelLookup};
use crate::codec::{self, Severity};
use crate::identity::{self, PeerIdentity};
use crate::mfa::MfaOutcome;
use crate::privilege;
use crate::registry::{self, MfaState, SessionGuard, SessionInfo};
use crate::relay;
use crate::sidecar::{Sidecar, StartupSlot};
use crate::startup::{self, Arrival, FrontDoor};
use crate::upstream::UpstreamSession;

/// Serves one accepted TCP connection until it ends. Never panics on client input.
/// `startup` is the connection's place in its source's pre-admission budget; it is given back
/// once the client is admitted (or gone).
/// `handshake` is its place in the smaller budget of connections not yet through TLS, held
/// only until the handshake is done (or `[limits] handshake_timeout` passes).
///
/// Every line written here, before an identity is proven, goes through
/// [`Sidecar::log_unauthenticated`]: aggregated per source, attacker strings capped.
pub async fn serve(
    sidecar: Arc<Sidecar>,
    tcp: TcpStream,
    peer: SocketAddr,
    startup: StartupSlot,
    handshake: StartupSlot,
) {
    let conn_id = identity::new_conn_id();
    let _ = tcp.set_nodelay(true);
    let started = Instant::now();
    let deadline = sidecar.settings.limits.startup_timeout;
    // A handshake timeout that is not shorter than the startup timeout leaves the startup
    // timeout in charge (and its reason in the log).
    let handshake_timeout = match sidecar.settings.limits.handshake_timeout {
        t if t < deadline => t,
        _ => deadline + std::time::Duration::from_secs(1),
    };

    // A full handshake budget can take this connection's slot for a source holding fewer.
    let evicted = handshake.eviction();
    // Boxed, as is every stage before and after the relay: a task's future is as large as
    // its largest state, and the session task lives as long as the session. Inline, the TLS
    // handshake, admission and logging states made each idle session's task 27 KiB; boxed,
    // they are heap allocations freed when their stage is done.
    let front = Box::pin(tokio::time::timeout(deadline, async {
        tokio::select! {
            front = startup::negotiate(tcp, sidecar.tls.get(), handshake_timeout, handshake) => front,
            _ = evicted.notified() => FrontDoor::Refused(startup::Refusal {
                reason: "handshake_evicted",
                detail: "handshake budget full: this source's oldest handshake made room for another source".into(),
                claimed: None,
            }),
        }
    }))
    .await;
    let front = match front {
        Ok(front) => front,
        Err(_) => {
            Box::pin(sidecar.log_refusal(
                &conn_id,
                peer,
                "startup_timeout",
                "no startup within the deadline",
            ))
            .await;
            return;
        }
    };
    match front {
        FrontDoor::Gone => {}
        FrontDoor::Refused(refusal) => {
            let mut entry = sidecar.entry(&conn_id, peer, "connect");
            entry.decision = Some("deny");
            entry.reason = refusal.reason.to_owned();
            if !refusal.detail.is_empty() {
                entry.extra.insert("detail".into(), refusal.detail.into());
            }
            if let Some(claimed) = refusal.claimed {
                // Never in spiffe_id / cert_serial: those are proven identities only.
                entry
                    .extra
                    .insert("claimed_spiffe_id".into(), claimed.spiffe_id.into());
                entry
                    .extra
                    .insert("claimed_cert_serial".into(), claimed.serial_hex.into());
                entry.extra.insert("unverified".into(), true.into());
            }
            Box::pin(sidecar.log_unauthenticated(entry)).await;
        }
        FrontDoor::Cancel { pid, key } => {
            Box::pin(handle_cancel(&sidecar, &conn_id, peer, pid, &key)).await
        }
        FrontDoor::Plaintext {
            startup,
            mut stream,
        } => {
            let mut entry = sidecar.entry(&conn_id, peer, "connect");
            entry.decision = Some("deny");
            entry.reason = "no_tls".into();
            if let Some(startup) = &startup {
                entry.db_user = startup.param("user").map(str::to_owned);
                entry.database = startup.param("database").map(str::to_owned);
            }
            Box::pin(sidecar.log_unauthenticated(entry)).await;
            let mut out = BytesMut::new();
            codec::put_error(
                &mut out,
                Severity::Fatal,
                "28000",
                "TLS with a client certificate is required",
                Some(&format!("Eastwall connection {conn_id}; connect with sslmode=verify-full and a client certificate")),
            );
            let _ = stream.write_all(&out).await;
            let _ = stream.shutdown().await;
        }
        FrontDoor::Session(arrival) => {
            sidecar.metrics.observe_handshake(started.elapsed());
            let remaining = deadline.saturating_sub(started.elapsed());
            Box::pin(admit_and_relay(
                sidecar, conn_id, peer, arrival, remaining, startup,
            ))
            .await;
        }
    }
}

async fn send_fatal(tls: &mut TlsStream<TcpStream>, sqlstate: &str, message: &str) {
    let mut out = BytesMut::new();
    codec::put_error(&mut out, Severity::Fatal, sqlstate, message, None);
    let _ = tls.write_all(&out).await;
    let _ = tls.flush().await;
    let _ = tls.shutdown().await;
}

/// Why a connection inside TLS is not admitted: the line the log gets (first), and what the
/// client is told. Every stage of admission returns its next stage's input or one of these;
/// [`Refusal::apply`] is the one place they take effect.
struct Refusal {
    /// None when there is nothing to log (the decision log itself failed). Boxed: refusals
    /// travel through every stage's `Result`.
    entry: Option<Box<Entry>>,
    reply: Reply,
}

enum Reply {
    /// FATAL with our connection id in the message.
    Fatal { sqlstate: String, message: String },
    /// PostgreSQL's own ErrorResponse, unchanged (an upstream login it rejected).
    Upstream(Vec<u8>),
    /// Nothing: the client is gone or closed at the prompt.
    Close,
}

impl Refusal {
    fn fatal(entry: Entry, sqlstate: &str, message: String) -> Self {
        Refusal {
            entry: Some(Box::new(entry)),
            reply: Reply::Fatal {
                sqlstate: sqlstate.to_owned(),
                message,
            },
        }
    }

    /// Logs (a log failure still refuses), then tells the client and closes.
    async fn apply(self, sidecar: &Sidecar, tls: &mut TlsStream<TcpStream>) {
        if let Some(entry) = self.entry {
            tracing::info!(
                conn.id = %entry.conn_id,
                spiffe_id = entry.spiffe_id.as_deref().unwrap_or("-"),
                decision = entry.decision.unwrap_or("-"),
                reason = %entry.reason,
                alert = entry.alert,
                "refused"
            );
            if let Err(err) = sidecar.audit.record(*entry).await {
                tracing::error!(%err, "decision log write failed");
            }
        }
        match self.reply {
            Reply::Fatal { sqlstate, message } => send_fatal(tls, &sqlstate, &message).await,
            Reply::Upstream(raw) => {
                let _ = tls.write_all(&raw).await;
                let _ = tls.shutdown().await;
            }
            Reply::Close => {}
        }
    }
}

/// A client inside TLS, from its identity on: who it is, what it asks, and the log entry
/// its decision line is built in.
struct Candidate {
    conn_id: String,
    peer: SocketAddr,
    user: String,
    database: String,
    identity: PeerIdentity,
    id_text: String,
    entry: Entry,
}

impl Candidate {
    /// A deny with `reason`; the entry goes into the refusal.
    fn deny(&mut self, reason: &str, sqlstate: &str, message: String) -> Refusal {
        let mut entry = std::mem::take(&mut self.entry);
        entry.decision = Some("deny");
        entry.reason = reason.into();
        Refusal::fatal(entry, sqlstate, message)
    }

    /// As [`Candidate::deny`], with Eastwall's own explanation as `detail`.
    fn deny_with(
        &mut self,
        reason: &str,
        detail: String,
        sqlstate: &str,
        message: String,
    ) -> Refusal {
        self.entry.extra.insert("detail".into(), json!(detail));
        self.deny(reason, sqlstate, message)
    }
}

/// The places an admitted session holds until it ends.
struct Places {
    _cert_use: crate::sidecar::CertUse,
    _identity_session: crate::sidecar::IdentitySession,
    /// The same certificate is in use from another source address.
    cert_elsewhere: bool,
}

/// An admitted session: everything it holds for its lifetime, in one heap allocation that
/// the relay borrows from (nothing of it is copied into the task's future).
struct Admitted {
    tls: TlsStream<TcpStream>,
    session: UpstreamSession,
    candidate: Candidate,
    decision: Decision,
    cancel: crate::cancel::CancelGuard,
    places: Places,
}

async fn admit_and_relay(
    sidecar: Arc<Sidecar>,
    conn_id: String,
    peer: SocketAddr,
    mut arrival: Box<Arrival>,
    auth_time_left: std::time::Duration,
    startup_slot: StartupSlot,
) {
    let admitted = Box::pin(admit(
        &sidecar,
        conn_id,
        peer,
        &mut arrival.tls,
        &arrival.startup,
        auth_time_left,
    ))
    .await;
    let (candidate, decision, places, mut session) = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => return Box::pin(refusal.apply(&sidecar, &mut arrival.tls)).await,
    };
    let Some(cancel) = Box::pin(greet(
        &sidecar,
        &candidate,
        &mut arrival.tls,
        &arrival.startup,
        &mut session,
        &arrival.leftover,
    ))
    .await
    else {
        return;
    };
    drop(startup_slot);
    // What the greeting needed (the startup packet, the login's ParameterStatus list and
    // notices) is freed here, not kept by every idle session.
    let tls = into_tls(arrival);
    session.parameters = Vec::new();
    session.pending = BytesMut::new();
    let live = Box::new(Admitted {
        tls,
        session,
        candidate,
        decision,
        cancel,
        places,
    });
    relay_and_log(&sidecar, live).await;
}

/// The TLS stream out of an arrival, the rest (and its allocation) freed now.
fn into_tls(arrival: Box<Arrival>) -> TlsStream<TcpStream> {
    arrival.tls
}

/// Admission, stage by stage; PostgreSQL hears nothing before the upstream login, and the
/// client nothing but refusals before the allow line is durable.
async fn admit(
    sidecar: &Sidecar,
    conn_id: String,
    peer: SocketAddr,
    tls: &mut TlsStream<TcpStream>,
    startup: &codec::StartupMessage,
    auth_time_left: std::time::Duration,
) -> Result<(Candidate, Decision, Places, UpstreamSession), Refusal> {
    let mut candidate = identify_client(sidecar, conn_id, peer, tls, startup)?;
    let mut forwarded = check_request(&mut candidate, startup)?;
    // PostgreSQL's own log and pg_stat_activity name the Eastwall connection.
    crate::params::tag_application_name(&mut forwarded, &candidate.conn_id);
    check_locks(sidecar, &mut candidate)?;
    check_fleet(sidecar, &mut candidate)?;
    let places = hold_places(sidecar, &mut candidate)?;
    let decision =
        decide_and_step_up(sidecar, &mut candidate, tls, auth_time_left, &places).await?;
    let protected = protected_roles(sidecar, &decision, &candidate.database);
    let (user, database) = (candidate.user.clone(), candidate.database.clone());
    // The side question runs while the session's own backend starts (see privilege_pool).
    let (session, side_report) = tokio::join!(
        login_upstream(sidecar, &mut candidate, &forwarded),
        side_check(sidecar, &user, &database, &protected)
    );
    let mut session = session?;
    let side = (protected.as_slice(), side_report);
    check_privilege(sidecar, &mut candidate, &decision, side, &mut session).await?;
    record_allow(sidecar, &mut candidate, &mut session).await?;
    Ok((candidate, decision, places, session))
}

/// Identity first: nothing about the request matters until we know who asks.
fn identify_client(
    sidecar: &Sidecar,
    conn_id: String,
    peer: SocketAddr,
    tls: &TlsStream<TcpStream>,
    startup: &codec::StartupMessage,
) -> Result<Candidate, Refusal> {
    let user = startup.param("user").unwrap_or("").to_owned();
    let database = match startup.param("database") {
        Some(db) if !db.is_empty() => db.to_owned(),
        _ => user.clone(),
    };
    let mut entry = sidecar.entry(&conn_id, peer, "connect");
    entry.db_user = Some(user.clone());
    entry.database = Some(database.clone());
    if let Some(version) = tls.get_ref().1.protocol_version() {
        entry
            .extra
            .insert("tls_version".into(), json!(format!("{version:?}")));
    }
    let identity = match identity::identify(
        tls.get_ref().1.peer_certificates(),
        &sidecar.settings.trust_domain,
    ) {
        Ok(identity) => identity,
        Err(err) => {
            entry.decision = Some("deny");
            entry.reason = err.reason().into();
            entry.extra.insert("detail".into(), json!(err.to_string()));
            let message = format!("{err} (connection {conn_id})");
            return Err(Refusal::fatal(entry, "28000", message));
        }
    };
    entry.spiffe_id = Some(identity.id.to_string());
    entry.cert_serial = Some(identity.serial_hex.clone());
    Ok(Candidate {
        conn_id,
        peer,
        user,
        database,
        id_text: identity.id.to_string(),
        identity,
        entry,
    })
}

/// The request itself: protocol, user, no replication, names PostgreSQL uses as they are,
/// and only startup settings that cannot change who the session is (they are returned).
fn check_request(
    c: &mut Candidate,
    startup: &codec::StartupMessage,
) -> Result<Vec<(String, String)>, Refusal> {
    let conn_id = c.conn_id.clone();
    if startup.version >> 16 != 3 {
        let message = format!(
            "unsupported frontend protocol {}.{}: Eastwall speaks 3.0",
            startup.version >> 16,
            startup.version & 0xffff
        );
        return Err(c.deny("unsupported_protocol", "0A000", message));
    }
    if c.user.is_empty() {
        let message = format!("no PostgreSQL user name specified (connection {conn_id})");
        return Err(c.deny("no_user", "28000", message));
    }
    if startup
        .param("replication")
        .is_some_and(|v| v != "false" && v != "off" && v != "0")
    {
        let message = format!(
            "replication connections are not allowed through Eastwall for {} (connection {conn_id})",
            c.id_text
        );
        return Err(c.deny("replication_refused", "28000", message));
    }
    // PostgreSQL cuts names at 63 bytes: judge only names it will use as they are.
    for (what, len) in [("user", c.user.len()), ("database", c.database.len())] {
        if len > crate::params::MAX_NAME_BYTES {
            let message = format!(
                "{what} name of {len} bytes is longer than PostgreSQL's limit of {} bytes (connection {conn_id})",
                crate::params::MAX_NAME_BYTES
            );
            return Err(c.deny("name_too_long", "28000", message));
        }
    }
    crate::params::screen(&startup.params).map_err(|err| {
        let message = format!("{err} (connection {conn_id})");
        c.deny_with(err.reason(), err.to_string(), "28000", message)
    })
}

/// An operator's lock on the identity, certificate, source or role refuses the connection
/// with the lock's message (a hash lookup; nothing when no lock is in force).
fn check_locks(sidecar: &Sidecar, c: &mut Candidate) -> Result<(), Refusal> {
    let locks = sidecar.locks.current();
    if locks.is_empty() {
        return Ok(());
    }
    let hit = crate::locks::check_lock(
        &locks,
        &c.identity.id,
        &c.identity.serial_hex,
        c.peer.ip(),
        Some(&c.user),
        std::time::SystemTime::now(),
    );
    match hit {
        None => Ok(()),
        Some(lock) => {
            lock.fill(&mut c.entry);
            let message = lock.client_message(&c.conn_id);
            Err(c.deny(
                crate::locks::LockRefusal::REASON,
                crate::locks::LockRefusal::SQLSTATE,
                message,
            ))
        }
    }
}

/// Past `[fleet] max_staleness` (with `on_stale = "refuse"`), the last good policy and
/// locks may be missing a lock placed since: new connections are refused (fail closed).
fn check_fleet(sidecar: &Sidecar, c: &mut Candidate) -> Result<(), Refusal> {
    let Some(fleet) = &sidecar.fleet else {
        return Ok(());
    };
    match fleet.refusal(std::time::SystemTime::now()) {
        None => Ok(()),
        Some(why) => {
            let message = format!("{why} (Eastwall connection {})", c.conn_id);
            Err(c.deny(
                crate::fleet::STALE_REASON,
                crate::fleet::STALE_SQLSTATE,
                message,
            ))
        }
    }
}

/// The certificate's use (reuse from another source is an alert) and the identity's place
/// among its sessions: one workload must not take all of PostgreSQL's max_connections, and
/// sessions being admitted count too, so a burst cannot overshoot.
fn hold_places(sidecar: &Sidecar, c: &mut Candidate) -> Result<Places, Refusal> {
    let (cert_use, cert_elsewhere) = sidecar
        .cert_usage
        .acquire(&c.identity.serial_hex, c.peer.ip());
    let max_sessions = sidecar.settings.limits.max_sessions_per_identity;
    let Some(identity_session) = sidecar
        .cert_usage
        .acquire_identity(&c.id_text, max_sessions)
    else {
        let message = format!(
            "too many sessions for {}: it already holds limits.max_sessions_per_identity = {max_sessions} (connection {})",
            c.id_text, c.conn_id
        );
        return Err(c.deny("identity_session_limit", "53300", message));
    };
    Ok(Places {
        _cert_use: cert_use,
        _identity_session: identity_session,
        cert_elsewhere,
    })
}

/// The policy decision and, for operators, the MFA step-up; the entry carries the result.
async fn decide_and_step_up(
    sidecar: &Sidecar,
    c: &mut Candidate,
    tls: &mut TlsStream<TcpStream>,
    auth_time_left: std::time::Duration,
    places: &Places,
) -> Result<Decision, Refusal> {
    let (source, conn_id, id_text) = (c.peer.ip(), c.conn_id.clone(), c.id_text.clone());
    let mut decision = decide(sidecar, &c.identity, source, &c.user, &c.database, false);
    let mut mfa_fields = Map::new();
    if decision.verdict == Verdict::Challenge {
        fill_decision(&mut c.entry, &decision);
        match step_up(sidecar, tls, &c.identity, source, auth_time_left).await {
            StepUp::Closed => {
                // psql's first connection: it saw the prompt and will reconnect with the
                // code. Neither a failure nor a use — one challenge line.
                c.entry.event = "mfa_challenge";
                return Err(Refusal {
                    entry: Some(Box::new(std::mem::take(&mut c.entry))),
                    reply: Reply::Close,
                });
            }
            StepUp::Outcome(MfaOutcome::Accepted { method, mfa_age_s }) => {
                mfa_fields.insert("mfa".into(), json!(method));
                mfa_fields.insert("mfa_age_s".into(), json!(mfa_age_s));
                decision = decide(sidecar, &c.identity, source, &c.user, &c.database, true);
            }
            StepUp::Outcome(MfaOutcome::Rejected { reason }) => {
                c.entry.event = "mfa_failure";
                // A replay is not a typo: the operator should wait for the next code.
                let message = if reason == "replayed_code" {
                    format!("MFA code already used for {id_text}; wait for the next code (connection {conn_id})")
                } else {
                    format!("MFA code rejected for {id_text} (connection {conn_id})")
                };
                return Err(c.deny(&format!("mfa_{reason}"), "28P01", message));
            }
            StepUp::Outcome(MfaOutcome::LockedOut { first }) => {
                c.entry.event = "mfa_lockout";
                c.entry.alert = first;
                let message = format!(
                    "too many failed MFA attempts for {id_text}; try again later (connection {conn_id})"
                );
                return Err(c.deny("mfa_locked_out", "28P01", message));
            }
            StepUp::Violation(detail) => {
                c.entry.event = "mfa_failure";
                let message =
                    format!("protocol violation during MFA step-up (connection {conn_id})");
                return Err(c.deny_with("protocol_violation", detail, "08P01", message));
            }
        }
    }
    fill_decision(&mut c.entry, &decision);
    c.entry.extra.extend(mfa_fields);
    if places.cert_elsewhere {
        c.entry.alert = true;
        c.entry.extra.insert(
            "cert_reuse".into(),
            json!("certificate in use from another source address"),
        );
    }
    if decision.verdict != Verdict::Allow {
        let message = format!("access denied for {id_text} (connection {conn_id})");
        let mut entry = std::mem::take(&mut c.entry);
        entry.decision = Some("deny");
        return Err(Refusal::fatal(entry, "28000", message));
    }
    Ok(decision)
}

/// The proxy logs in on its own as the granted role, with the screened settings.
async fn login_upstream(
    sidecar: &Sidecar,
    c: &mut Candidate,
    forwarded: &[(String, String)],
) -> Result<UpstreamSession, Refusal> {
    let forwarded: Vec<(&str, &str)> = forwarded
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    match sidecar
        .upstream
        .login(&c.user, &c.database, &forwarded)
        .await
    {
        Ok(session) => Ok(session),
        Err(err) => {
            tracing::warn!(conn.id = %c.conn_id, %err, "upstream login failed");
            let message = format!("{err} (connection {})", c.conn_id);
            let mut refusal = c.deny_with(
                "upstream_login_failed",
                err.to_string(),
                err.sqlstate(),
                message,
            );
            if let crate::upstream::UpstreamError::Rejected { raw, .. } = &err {
                // The client sees PostgreSQL's own error, unchanged.
                refusal.reply = Reply::Upstream(raw.to_vec());
            }
            Err(refusal)
        }
    }
}

/// The roles `mfa(...)` rules protect in `database`, unless this session stepped up.
fn protected_roles(sidecar: &Sidecar, decision: &Decision, database: &str) -> Vec<String> {
    if decision.mfa_group.is_some() {
        return Vec::new();
    }
    let roles = sidecar
        .mfa_roles
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    roles
        .roles_for(database)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// The privilege answer from a warm side connection, when `[upstream] check_role` is set and
/// one can be had; None means ask the session's own backend.
async fn side_check(
    sidecar: &Sidecar,
    user: &str,
    database: &str,
    protected: &[String],
) -> Option<privilege::Report> {
    let pool = sidecar.check_pool.as_ref()?;
    let timeout = sidecar.settings.upstream.connect_timeout;
    pool.check(&sidecar.upstream, timeout, user, database, protected)
        .await
}

/// The session user PostgreSQL reports at login (`session_authorization`).
fn logged_in_as(parameters: &[(String, String)]) -> Option<&str> {
    parameters
        .iter()
        .find(|(name, _)| name == "session_authorization")
        .map(|(_, value)| value.as_str())
}

/// What the session's login role can become, from the catalog (see [`privilege`]): a role
/// named by an `as:` line may be anything, superuser included; any other superuser-equivalent
/// role is refused; a session that did not step up must not be able to become a role MFA
/// protects; and PostgreSQL must have logged in as exactly the user and database judged. A
/// refusal ends the upstream session first.
async fn check_privilege(
    sidecar: &Sidecar,
    c: &mut Candidate,
    decision: &Decision,
    (protected, side_report): (&[String], Option<privilege::Report>),
    session: &mut UpstreamSession,
) -> Result<(), Refusal> {
    let timeout = sidecar.settings.upstream.connect_timeout;
    // The side answer is about a name; it counts only if PostgreSQL logged this session in
    // under exactly that name. Otherwise the session's own backend is asked.
    let answer = match side_report {
        Some(report) if logged_in_as(&session.parameters) == Some(c.user.as_str()) => Ok(report),
        _ => {
            let protected: Vec<&str> = protected.iter().map(String::as_str).collect();
            privilege::check(session, timeout, &protected).await
        }
    };
    let verdict = match answer {
        Err(why) => {
            let message = format!(
                "role {:?} cannot be admitted: {why} (connection {})",
                c.user, c.conn_id
            );
            Err(("privilege_check_failed", why, message))
        }
        Ok(report) if report.session_user != c.user || report.database != c.database => {
            let why = format!(
                "PostgreSQL logged in as user {:?} to database {:?}, not the {:?} and {:?} judged (db_user_namespace?)",
                report.session_user, report.database, c.user, c.database
            );
            let message = format!("{why} (connection {})", c.conn_id);
            Err(("name_mismatch", why, message))
        }
        Ok(report) => match (report.superuser, report.protected_member) {
            (Some(why), _) if !decision.role_named_by_rule => {
                let message = format!(
                    "role {:?} is superuser-equivalent ({why}); no policy rule grants it by name to {} (connection {})",
                    c.user, c.id_text, c.conn_id
                );
                Err(("superuser_role", why, message))
            }
            (_, Some(protected)) => {
                let why = format!(
                    "role {:?} is a member of {protected}, which an mfa(...) rule protects; it could SET ROLE to it without MFA",
                    c.user
                );
                let message = format!("{why} (connection {})", c.conn_id);
                Err(("mfa_protected_role", why, message))
            }
            _ => Ok(()),
        },
    };
    match verdict {
        Ok(()) => Ok(()),
        Err((reason, why, message)) => {
            let _ = terminate(&mut session.stream).await;
            Err(c.deny_with(reason, why, "28000", message))
        }
    }
}

/// Fail closed: without a durable allow line, nobody is admitted.
async fn record_allow(
    sidecar: &Sidecar,
    c: &mut Candidate,
    session: &mut UpstreamSession,
) -> Result<(), Refusal> {
    if let Err(err) = sidecar.audit.record(c.entry.clone()).await {
        tracing::error!(conn.id = %c.conn_id, %err, "decision log write failed; refusing");
        let _ = terminate(&mut session.stream).await;
        let message = format!(
            "Eastwall cannot write its decision log; refusing connections (connection {})",
            c.conn_id
        );
        return Err(Refusal {
            entry: None,
            reply: Reply::Fatal {
                sqlstate: "57P03".into(),
                message,
            },
        });
    }
    tracing::info!(conn.id = %c.conn_id, spiffe_id = %c.id_text, db.user = %c.user, db.name = %c.database, decision = "allow", "admitted");
    Ok(())
}

/// Only now does AuthenticationOk reach the client (with our cancel key), and only now do
/// the client's own pipelined messages reach PostgreSQL. None when either side is gone.
async fn greet(
    sidecar: &Sidecar,
    c: &Candidate,
    tls: &mut TlsStream<TcpStream>,
    startup: &codec::StartupMessage,
    session: &mut UpstreamSession,
    leftover: &[u8],
) -> Option<crate::cancel::CancelGuard> {
    let cancel = sidecar.cancels.register(
        BackendKey {
            pid: session.backend_pid,
            key: session.backend_key.clone(),
        },
        &c.conn_id,
    );
    let mut out = BytesMut::with_capacity(512);
    let unsupported: Vec<&str> = startup
        .params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.as_str())
        .collect();
    if startup.version != codec::PROTOCOL_3_0 || !unsupported.is_empty() {
        codec::put_negotiate_protocol_version(&mut out, &unsupported);
    }
    codec::put_auth_ok(&mut out);
    for (name, value) in &session.parameters {
        codec::put_parameter_status(&mut out, name, value);
    }
    codec::put_backend_key(&mut out, cancel.pid, cancel.secret);
    out.extend_from_slice(&session.pending);
    codec::put_ready_for_query(&mut out, session.transaction_status);
    if tls.write_all(&out).await.is_err() || tls.flush().await.is_err() {
        let _ = terminate(&mut session.stream).await;
        return None;
    }
    if !leftover.is_empty() && session.stream.write_all(leftover).await.is_err() {
        return None;
    }
    Some(cancel)
}

/// The admitted session: registered (kills, locks, reloads, expiry, drain reach it there),
/// relayed, closed by whichever end, and its session_end line written.
async fn relay_and_log(sidecar: &Sidecar, mut held: Box<Admitted>) {
    let c = &held.candidate;
    // Registered until the session_end line is written: a shutdown waits for it.
    let live = sidecar.sessions.register(SessionInfo {
        conn_id: c.conn_id.clone(),
        spiffe_id: c.identity.id.clone(),
        serial_hex: c.identity.serial_hex.clone(),
        not_after: c.identity.not_after,
        source: c.peer,
        role: c.user.clone(),
        database: c.database.clone(),
        started: SystemTime::now(),
        mfa: mfa_state(&c.entry),
        rule: c.entry.rule.clone(),
    });
    let admitted = Instant::now();
    // Operators' sessions rest on an MFA assertion that ages; max_session bounds how long.
    let max_session = held
        .decision
        .mfa_group
        .as_ref()
        .and(sidecar.settings.mfa.max_session);
    let limits = relay::RelayLimits {
        deadline: max_session.map(|d| tokio::time::Instant::now() + d),
        idle: sidecar.settings.limits.idle_timeout,
        ..relay::RelayLimits::default()
    };
    let stop = stop_signal(sidecar, &live);
    let mut auditor = audited_because(sidecar, &held).map(|why| {
        let c = &held.candidate;
        let mut template = sidecar.entry(&c.conn_id, c.peer, "statement");
        template.spiffe_id = Some(c.id_text.clone());
        template.cert_serial = Some(c.identity.serial_hex.clone());
        template.db_user = Some(c.user.clone());
        template.database = Some(c.database.clone());
        template.rule = c.entry.rule.clone();
        template.reason = why.into();
        Box::new(crate::statement_log::Auditor::new(
            sidecar.audit.clone(),
            template,
        ))
    });
    let Admitted { tls, session, .. } = &mut *held;
    let outcome = match auditor.as_deref_mut() {
        None => {
            relay::relay_counted(
                tls,
                &mut session.stream,
                limits,
                Some(stop),
                Some(live.bytes()),
            )
            .await
        }
        // Boxed: only audited sessions hold its state.
        Some(auditor) => {
            Box::pin(relay::relay_audited(
                tls,
                &mut session.stream,
                limits,
                Some(stop),
                Some(live.bytes()),
                auditor,
            ))
            .await
        }
    };
    if let Some(auditor) = &mut auditor {
        // The statement lines come before the session_end line (a failure ended the
        // relay already, or is logged: the session is over either way).
        let _ = Box::pin(auditor.finish()).await;
    }
    Box::pin(end_session(
        sidecar,
        held,
        outcome,
        admitted,
        max_session,
        limits,
    ))
    .await;
    drop(live);
}

/// Why this session's statements are audited, if they are: it was admitted through an
/// `mfa(...)` rule, or its identity is named by `[audit] statements`.
fn audited_because(sidecar: &Sidecar, held: &Admitted) -> Option<&'static str> {
    if held.decision.mfa_group.is_some() {
        return Some("mfa");
    }
    let id = &held.candidate.identity.id;
    sidecar
        .settings
        .audit
        .statements
        .iter()
        .any(|pattern| pattern.matches(id))
        .then_some("audit_statements")
}

/// After the relay: both legs closed if Eastwall ended the session, then its session_end
/// line. Boxed by the caller, so none of this sits in an idle session's future.
async fn end_session(
    sidecar: &Sidecar,
    held: Box<Admitted>,
    mut outcome: relay::RelayOutcome,
    admitted: Instant,
    max_session: Option<std::time::Duration>,
    limits: relay::RelayLimits,
) {
    let Admitted {
        tls,
        session,
        candidate: c,
        decision,
        cancel,
        places,
    } = *held;
    drop(cancel);
    if let relay::RelayEnd::Ended(ending) = &mut outcome.end {
        let message = farewell(
            &ending.reason,
            &c.id_text,
            &c.conn_id,
            max_session,
            limits.idle,
        );
        close_ended(sidecar, tls, session, ending, &message).await;
    } else {
        drop((tls, session));
    }

    let mut end = sidecar.entry(&c.conn_id, c.peer, "session_end");
    end.decision = Some("allow");
    end.spiffe_id = Some(c.id_text);
    end.cert_serial = Some(c.identity.serial_hex);
    end.db_user = Some(c.user);
    end.database = Some(c.database);
    end.rule = decision.rule.as_ref().map(|r| r.to_string());
    end.reason = outcome.end.reason().into();
    end.extra.insert(
        "duration_ms".into(),
        json!(admitted.elapsed().as_millis() as u64),
    );
    end.extra.insert(
        "bytes_client_to_server".into(),
        json!(outcome.client_to_server),
    );
    end.extra.insert(
        "bytes_server_to_client".into(),
        json!(outcome.server_to_client),
    );
    if let relay::RelayEnd::Ended(ending) = &outcome.end {
        end_details(&mut end, &ending.reason);
    }
    if let Err(err) = sidecar.audit.record(end).await {
        tracing::error!(conn.id = %c.conn_id, %err, "could not log session end");
    }
    drop(places);
}

/// The MFA fields of the allow line, for the registry.
fn mfa_state(entry: &Entry) -> Option<MfaState> {
    Some(MfaState {
        method: entry.extra.get("mfa")?.as_str()?.to_owned(),
        age_s: entry.extra.get("mfa_age_s")?.as_u64()?,
    })
}

/// What a session_end line says beyond its reason: a lock's id, a message given.
fn end_details(end: &mut Entry, reason: &relay::EndReason) {
    match reason {
        relay::EndReason::Locked { lock_id, message } => {
            end.extra.insert("lock_id".into(), json!(lock_id));
            end.extra.insert("message".into(), json!(message));
        }
        relay::EndReason::Killed { message } | relay::EndReason::AuditFailed { message } => {
            end.extra.insert("message".into(), json!(message));
        }
        _ => {}
    }
}

/// What ends this session besides its client and server: the registry telling it to end
/// (kill, lock, policy change, shutdown), a revocation of its certificate (only with a CRL
/// configured: without one nothing can be revoked), or its certificate's notAfter.
fn stop_signal(sidecar: &Sidecar, live: &SessionGuard<'_>) -> relay::StopSignal<'static> {
    let mut told = live.ended();
    let info = live.info();
    let revocations = sidecar
        .settings
        .listen
        .crl
        .is_some()
        .then(|| (sidecar.revoked.subscribe(), info.serial_hex.clone()));
    let expires_in = registry::time_left(info.not_after, SystemTime::now());
    Box::pin(async move {
        let registry = async {
            loop {
                if let Some(reason) = &*told.borrow_and_update() {
                    return reason.clone();
                }
                if told.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        };
        let revoked = async {
            let Some((mut revocations, serial)) = revocations else {
                return std::future::pending().await;
            };
            loop {
                if revocations.borrow_and_update().contains(&serial) {
                    return;
                }
                if revocations.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        };
        // Biased: polled on every wake-up of the relay, so no per-poll random draw.
        tokio::select! {
            biased;
            reason = registry => reason,
            () = revoked => relay::EndReason::Revoked,
            () = tokio::time::sleep(expires_in) => relay::EndReason::CertExpired,
        }
    })
}

/// The FATAL's message for an end Eastwall decided.
fn farewell(
    reason: &relay::EndReason,
    id_text: &str,
    conn_id: &str,
    max_session: Option<std::time::Duration>,
    idle: Option<std::time::Duration>,
) -> String {
    let show = |d: Option<std::time::Duration>| {
        d.map(|d| humantime::format_duration(d).to_string())
            .unwrap_or_default()
    };
    let why = match reason {
        relay::EndReason::Revoked => format!("the certificate of {id_text} was revoked"),
        relay::EndReason::MaxSession => format!(
            "the MFA session of {id_text} reached max_session ({}); reconnect and step up again",
            show(max_session)
        ),
        relay::EndReason::Idle => format!("idle for {}", show(idle)),
        relay::EndReason::Shutdown => "the sidecar is shutting down".to_owned(),
        relay::EndReason::Locked { message, .. } | relay::EndReason::Killed { message } => {
            message.clone()
        }
        relay::EndReason::PolicyChanged => {
            format!("the policy no longer allows this session of {id_text}")
        }
        relay::EndReason::CertExpired => format!("the certificate of {id_text} expired"),
        relay::EndReason::AuditFailed { message } => message.clone(),
    };
    format!("terminating connection: {why} (connection {conn_id})")
}

/// Closes both legs of a session Eastwall ended. PostgreSQL first: Terminate if it can be
/// written at once and lands on a message boundary, then the socket is closed (a backend
/// blocked writing to us fails at once) and a CancelRequest stops a backend busy in a
/// query. Meanwhile the client gets the rest of its last message and FATAL 57P01, until the
/// grace runs out; then its connection is closed too.
async fn close_ended(
    sidecar: &Sidecar,
    tls: TlsStream<TcpStream>,
    session: crate::upstream::UpstreamSession,
    ending: &mut relay::Ending,
    message: &str,
) {
    use futures_util::FutureExt;
    let crate::upstream::UpstreamSession {
        mut stream,
        backend_pid,
        backend_key,
        ..
    } = session;
    if ending.upstream_at_boundary {
        // Never waited for: a backend that stopped reading must not delay the close.
        let _ = terminate(&mut stream).now_or_never();
    }
    drop(stream);
    let cancel = tokio::time::timeout(
        relay::END_GRACE,
        sidecar.upstream.cancel(backend_pid, &backend_key),
    );
    let mut fatal = BytesMut::new();
    codec::put_error(&mut fatal, Severity::Fatal, "57P01", message, None);
    let tell = async move {
        let mut tls = tls;
        ending.finish(&mut tls, &fatal).await
        // The client's connection is closed here, delivered or not.
    };
    let (cancelled, _) = tokio::join!(cancel, tell);
    if !matches!(cancelled, Ok(Ok(()))) {
        tracing::warn!(
            backend_pid,
            "could not cancel the backend of an ended session"
        );
    }
}

fn decide(
    sidecar: &Sidecar,
    identity: &PeerIdentity,
    source: IpAddr,
    user: &str,
    database: &str,
    mfa_fresh: bool,
) -> Decision {
    let roles = sidecar
        .mfa_roles
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    authorize(
        &sidecar.policy(),
        &Request {
            id: &identity.id,
            source,
            segment: &sidecar.settings.guards,
            port: sidecar.settings.service_port,
            user,
            database,
            mfa_fresh,
            mfa_roles: Some(&roles),
        },
    )
}

fn fill_decision(entry: &mut Entry, decision: &Decision) {
    entry.decision = Some(decision.verdict.as_str());
    entry.rule = decision.rule.as_ref().map(|r| r.to_string());
    entry.reason = decision.reason.to_string();
    entry.alert = decision.alert;
}

enum StepUp {
    /// The client closed at the prompt (psql's first connection).
    Closed,
    Outcome(MfaOutcome),
    Violation(String),
}

/// Asks for the MFA answer inside TLS and checks it.
async fn step_up(
    sidecar: &Sidecar,
    tls: &mut TlsStream<TcpStream>,
    identity: &PeerIdentity,
    source: IpAddr,
    time_left: std::time::Duration,
) -> StepUp {
    let Some(verifier) = &sidecar.mfa else {
        return StepUp::Outcome(MfaOutcome::Rejected {
            reason: "not_configured",
        });
    };
    let mut out = BytesMut::new();
    codec::put_auth_cleartext(&mut out);
    if tls.write_all(&out).await.is_err() || tls.flush().await.is_err() {
        return StepUp::Closed;
    }
    let read = async {
        let mut buf = BytesMut::with_capacity(128);
        loop {
            match codec::decode_message(&mut buf, codec::MAX_PASSWORD_LEN) {
                Ok(Some(msg)) => return Ok(Some(msg)),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            match tls.read_buf(&mut buf).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(_) => return Ok(None),
            }
        }
    };
    let msg = match tokio::time::timeout(time_left, read).await {
        Err(_) | Ok(Ok(None)) => return StepUp::Closed,
        Ok(Err(detail)) => return StepUp::Violation(detail),
        Ok(Ok(Some(msg))) => msg,
    };
    if msg.tag == b'X' {
        return StepUp::Closed;
    }
    if msg.tag != b'p' {
        return StepUp::Violation(format!(
            "expected a password message, got {:?}",
            msg.tag as char
        ));
    }
    let answer = match codec::parse_password(&msg.body) {
        Ok(answer) => answer,
        Err(e) => return StepUp::Violation(e.to_string()),
    };
    StepUp::Outcome(verifier.check(
        &identity.id,
        &identity.cert_sha256,
        source,
        answer.trim(),
        SystemTime::now(),
    ))
}

async fn terminate(stream: &mut crate::upstream::UpstreamStream) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    codec::put_terminate(&mut out);
    stream.write_all(&out).await?;
    stream.shutdown().await
}

/// Forwards a CancelRequest when its key names a live session; answers nothing either way.
async fn handle_cancel(sidecar: &Sidecar, conn_id: &str, peer: SocketAddr, pid: u32, key: &[u8]) {
    match sidecar.cancels.lookup(peer.ip(), pid, key) {
        CancelLookup::Forward {
            backend_pid,
            backend_key,
            conn_id: target,
        } => {
            let result = sidecar.upstream.cancel(backend_pid, &backend_key).await;
            let mut entry = sidecar.entry(conn_id, peer, "cancel");
            entry.decision = Some("allow");
            entry.reason = match &result {
                Ok(()) => "forwarded".into(),
                Err(e) => format!("forward_failed: {e}"),
            };
            entry
                .extra
                .insert("target_conn_id".into(), Value::from(target));
            let _ = sidecar.audit.record(entry).await;
        }
        CancelLookup::Unknown => {
            let mut entry = sidecar.entry(conn_id, peer, "cancel");
            entry.decision = Some("deny");
            entry.reason = "unknown_key".into();
            // Anyone can send a CancelRequest: aggregated like the other unauthenticated lines.
            sidecar.log_unauthenticated(entry).await;
        }
        CancelLookup::RateLimited => {
            // Not written to the decision log: a flood of guesses must not become a flood
            // of fsyncs. The limiter is what stops it; tracing keeps a trace.
            tracing::warn!(conn.id = %conn_id, %peer, "cancel request rate-limited");
        }
    }
}
