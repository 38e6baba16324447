//! The registry of live sessions: the one place that knows who is connected right now and
//! how to end them.
//!
//! Every admitted session registers (after its allow line is durable and the client was
//! greeted) and stays registered until its `session_end` line is written: the
//! [`SessionGuard`] unregisters on drop, so a shutdown waiting for [`Registry::all_ended`]
//! waits for those lines. Each entry carries what an operator needs to judge the session
//! ([`SessionInfo`]: identity, serial, expiry, source, role, database, start, MFA, the deciding
//! rule), its live byte counters ([`LiveBytes`], bumped by the relay once per chunk), and an
//! end channel.
//!
//! Ending goes one way only: [`Registry::end`] (one session by connection id),
//! [`Registry::end_matching`] (every session a predicate picks, each with its own reason:
//! locks, policy reload) or [`Registry::end_all`] (shutdown; sticky, so a session registering
//! afterwards is ended at once). The session's relay hears it through its stop signal and
//! ends through the bounded path ([`crate::relay::END_GRACE`]): FATAL 57P01, both legs closed,
//! a `session_end` line with the reason. The first reason a session is given wins.
//!
//! The registry holds a short mutex only to register, unregister, list and pick; the relay
//! never touches it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use eastwall_ca::SpiffeId;
use serde::Serialize;
use tokio::sync::watch;

use crate::relay::{EndReason, LiveBytes};

/// What is known about a live session, fixed at admission.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub conn_id: String,
    pub spiffe_id: SpiffeId,
    /// The client certificate's serial, lowercase hex.
    pub serial_hex: String,
    /// The client certificate's notAfter: the session ends then (`cert_expired`).
    pub not_after: SystemTime,
    pub source: SocketAddr,
    /// The PostgreSQL role the session is logged in as.
    pub role: String,
    pub database: String,
    pub started: SystemTime,
    /// Set when the session was admitted after an MFA step-up.
    pub mfa: Option<MfaState>,
    /// The policy rule that allowed it, as the allow line cites it.
    pub rule: Option<String>,
}

/// How an operator's session proved MFA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MfaState {
    pub method: String,
    /// Age of the MFA assertion when the session was admitted, in seconds.
    pub age_s: u64,
}

/// A live session as `eastwall sessions` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionSnapshot {
    pub conn_id: String,
    pub spiffe_id: String,
    pub serial: String,
    pub source: String,
    pub role: String,
    pub database: String,
    /// Seconds since the Unix epoch.
    pub started: u64,
    /// The certificate's notAfter, seconds since the Unix epoch.
    pub not_after: u64,
    pub bytes_client_to_server: u64,
    pub bytes_server_to_client: u64,
    pub mfa: Option<MfaState>,
    pub rule: Option<String>,
    /// The reason it was told to end, while it is ending.
    pub ending: Option<&'static str>,
}

struct Live {
    info: Arc<SessionInfo>,
    bytes: Arc<LiveBytes>,
    end: watch::Sender<Option<EndReason>>,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<u64, Live>,
    next: u64,
    /// Set by [`Registry::end_all`]: every session, present and future, ends for it.
    ending_all: Option<EndReason>,
}

/// The live sessions of one sidecar.
pub struct Registry {
    inner: Mutex<Inner>,
    count: watch::Sender<usize>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            count: watch::channel(0).0,
        }
    }
}

/// Gives `end` the reason if it has none yet; whether it took it.
fn tell(end: &watch::Sender<Option<EndReason>>, reason: &EndReason) -> bool {
    end.send_if_modified(|current| {
        if current.is_some() {
            return false;
        }
        *current = Some(reason.clone());
        true
    })
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a session until the guard is dropped. After [`Registry::end_all`] the
    /// session is told to end at once.
    pub fn register(&self, info: SessionInfo) -> SessionGuard<'_> {
        let (end, ended) = watch::channel(None);
        let bytes = Arc::new(LiveBytes::default());
        let info = Arc::new(info);
        let key = {
            let mut inner = self.lock();
            if let Some(reason) = &inner.ending_all {
                tell(&end, reason);
            }
            inner.next += 1;
            let key = inner.next;
            inner.sessions.insert(
                key,
                Live {
                    info: info.clone(),
                    bytes: bytes.clone(),
                    end,
                },
            );
            key
        };
        self.count.send_modify(|n| *n += 1);
        SessionGuard {
            registry: self,
            key,
            info,
            bytes,
            ended,
        }
    }

    /// Every live session, oldest first.
    pub fn list(&self) -> Vec<SessionSnapshot> {
        let inner = self.lock();
        let mut live: Vec<(&u64, &Live)> = inner.sessions.iter().collect();
        live.sort_by_key(|(key, _)| **key);
        live.into_iter().map(|(_, live)| snapshot(live)).collect()
    }

    /// Tells the session with this connection id to end; whether one is live.
    pub fn end(&self, conn_id: &str, reason: EndReason) -> bool {
        let inner = self.lock();
        let mut found = false;
        for live in inner.sessions.values() {
            if live.info.conn_id == conn_id {
                tell(&live.end, &reason);
                found = true;
            }
        }
        found
    }

    /// Tells every session `pick` gives a reason to end, with that reason; how many were
    /// told (sessions already ending keep their first reason and are not counted).
    pub fn end_matching(&self, mut pick: impl FnMut(&SessionInfo) -> Option<EndReason>) -> usize {
        let inner = self.lock();
        inner
            .sessions
            .values()
            .filter(|live| live.end.borrow().is_none())
            .filter_map(|live| pick(&live.info).map(|reason| tell(&live.end, &reason)))
            .filter(|told| *told)
            .count()
    }

    /// Ends every live session, and every one registered from now on, for `reason`.
    pub fn end_all(&self, reason: EndReason) {
        let mut inner = self.lock();
        for live in inner.sessions.values() {
            tell(&live.end, &reason);
        }
        inner.ending_all.get_or_insert(reason);
    }

    /// Sessions registered and not yet unregistered.
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

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn snapshot(live: &Live) -> SessionSnapshot {
    let info = &live.info;
    SessionSnapshot {
        conn_id: info.conn_id.clone(),
        spiffe_id: info.spiffe_id.to_string(),
        serial: info.serial_hex.clone(),
        source: info.source.to_string(),
        role: info.role.clone(),
        database: info.database.clone(),
        started: unix_seconds(info.started),
        not_after: unix_seconds(info.not_after),
        bytes_client_to_server: live.bytes.client_to_server.load(Ordering::Relaxed),
        bytes_server_to_client: live.bytes.server_to_client.load(Ordering::Relaxed),
        mfa: info.mfa.clone(),
        rule: info.rule.clone(),
        ending: live.end.borrow().as_ref().map(EndReason::reason),
    }
}

/// How long until `not_after`, seen at `now` (zero once it passed). The clock is a
/// parameter so the expiry arithmetic is tested without waiting.
pub fn time_left(not_after: SystemTime, now: SystemTime) -> Duration {
    not_after.duration_since(now).unwrap_or(Duration::ZERO)
}

/// One registered session; unregisters when dropped.
pub struct SessionGuard<'a> {
    registry: &'a Registry,
    key: u64,
    info: Arc<SessionInfo>,
    bytes: Arc<LiveBytes>,
    ended: watch::Receiver<Option<EndReason>>,
}

impl SessionGuard<'_> {
    pub fn info(&self) -> &SessionInfo {
        &self.info
    }

    /// The counters the relay bumps.
    pub fn bytes(&self) -> &LiveBytes {
        &self.bytes
    }

    /// Yields `Some(reason)` once the registry tells this session to end.
    pub fn ended(&self) -> watch::Receiver<Option<EndReason>> {
        self.ended.clone()
    }
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.registry.lock().sessions.remove(&self.key);
        self.registry
            .count
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(conn_id: &str, id: &str) -> SessionInfo {
        SessionInfo {
            conn_id: conn_id.into(),
            spiffe_id: SpiffeId::parse(id).unwrap(),
            serial_hex: "0a".into(),
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000),
            source: "127.0.0.1:5000".parse().unwrap(),
            role: "billing".into(),
            database: "postgres".into(),
            started: SystemTime::now(),
            mfa: None,
            rule: Some("policy.ew:3".into()),
        }
    }

    #[tokio::test]
    async fn a_shutdown_waits_for_live_sessions_and_no_longer() {
        let live = Registry::default();
        assert!(live.all_ended(Duration::from_millis(10)).await);
        let first = live.register(info("a", "spiffe://corp.example/app/billing"));
        let second = live.register(info("b", "spiffe://corp.example/app/billing"));
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
    fn end_tells_one_session_and_the_first_reason_wins() {
        let live = Registry::default();
        let a = live.register(info("a", "spiffe://corp.example/app/billing"));
        let b = live.register(info("b", "spiffe://corp.example/app/billing"));
        let killed = EndReason::Killed {
            message: "bye".into(),
        };
        assert!(live.end("a", killed.clone()));
        assert!(!live.end("nobody", EndReason::Shutdown));
        assert!(live.end("a", EndReason::Shutdown), "still live");
        assert_eq!(*a.ended().borrow(), Some(killed));
        assert_eq!(*b.ended().borrow(), None);
        let listed = live.list();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].conn_id, "a");
        assert_eq!(listed[0].ending, Some("killed"));
        assert_eq!(listed[1].ending, None);
        drop(a);
        assert!(
            !live.end("a", EndReason::Shutdown),
            "gone once unregistered"
        );
        assert_eq!(live.list().len(), 1);
    }

    #[test]
    fn end_matching_picks_by_info_and_skips_sessions_already_ending() {
        let live = Registry::default();
        let a = live.register(info("a", "spiffe://corp.example/app/billing"));
        let b = live.register(info("b", "spiffe://corp.example/app/laptop"));
        let c = live.register(info("c", "spiffe://corp.example/app/laptop"));
        live.end("c", EndReason::CertExpired);
        let told = live.end_matching(|s| {
            s.spiffe_id
                .to_string()
                .ends_with("/laptop")
                .then_some(EndReason::PolicyChanged)
        });
        assert_eq!(told, 1);
        assert_eq!(*a.ended().borrow(), None);
        assert_eq!(*b.ended().borrow(), Some(EndReason::PolicyChanged));
        assert_eq!(*c.ended().borrow(), Some(EndReason::CertExpired));
    }

    #[test]
    fn end_all_reaches_sessions_registered_afterwards() {
        let live = Registry::default();
        let a = live.register(info("a", "spiffe://corp.example/app/billing"));
        live.end_all(EndReason::Shutdown);
        let late = live.register(info("b", "spiffe://corp.example/app/billing"));
        assert_eq!(*a.ended().borrow(), Some(EndReason::Shutdown));
        assert_eq!(*late.ended().borrow(), Some(EndReason::Shutdown));
    }

    #[test]
    fn live_bytes_show_in_the_list() {
        let live = Registry::default();
        let a = live.register(info("a", "spiffe://corp.example/app/billing"));
        a.bytes().client_to_server.fetch_add(10, Ordering::Relaxed);
        a.bytes().server_to_client.fetch_add(20, Ordering::Relaxed);
        let s = &live.list()[0];
        assert_eq!(
            (s.bytes_client_to_server, s.bytes_server_to_client),
            (10, 20)
        );
    }

    #[test]
    fn time_left_is_zero_once_past() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        assert_eq!(
            time_left(t, t - Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        assert_eq!(time_left(t, t + Duration::from_secs(5)), Duration::ZERO);
    }
}
