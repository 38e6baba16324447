//! Cancel requests: each session gets the proxy's own random BackendKeyData, mapped to the
//! upstream backend's key, so a CancelRequest reaches only the session that owns the key.
//!
//! libpq's PQcancel sends CancelRequest in plaintext without a certificate (psql's Ctrl-C),
//! so the key is the only authenticator: it is random, compared in constant time, and
//! guesses are rate-limited per source address (protocol-security items 14–18).

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use subtle::ConstantTimeEq;

/// The upstream backend a proxy key stands for.
#[derive(Debug, Clone)]
pub struct BackendKey {
    pub pid: u32,
    pub key: Bytes,
}

struct Entry {
    secret: [u8; 4],
    backend: BackendKey,
    conn_id: String,
}

/// What became of a CancelRequest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelLookup {
    /// The key matched a live session: forward to this backend.
    Forward {
        backend_pid: u32,
        backend_key: Bytes,
        conn_id: String,
    },
    /// No live session has this key; the request is dropped.
    Unknown,
    /// Too many cancel attempts from this source; the request is dropped.
    RateLimited,
}

/// Live sessions' proxy keys, shared by all connections.
pub struct CancelRegistry {
    sessions: Mutex<HashMap<u32, Entry>>,
    limiter: DefaultKeyedRateLimiter<IpAddr>,
}

impl CancelRegistry {
    pub fn new(cancels_per_second: u32) -> Arc<Self> {
        let per_second = NonZeroU32::new(cancels_per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        Arc::new(Self {
            sessions: Mutex::new(HashMap::new()),
            limiter: RateLimiter::keyed(Quota::per_second(per_second)),
        })
    }

    /// Registers a session and returns the key its client gets; dropping the guard forgets it.
    pub fn register(self: &Arc<Self>, backend: BackendKey, conn_id: &str) -> CancelGuard {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            // Bit 31 clear: some clients treat the pid as signed (PgBouncer learned this from
            // pg_basebackup). Zero is avoided because it reads as "no key".
            let pid = rand::random::<u32>() & 0x7fff_ffff;
            if pid == 0 || sessions.contains_key(&pid) {
                continue;
            }
            let secret: [u8; 4] = rand::random();
            sessions.insert(
                pid,
                Entry {
                    secret,
                    backend,
                    conn_id: conn_id.to_owned(),
                },
            );
            return CancelGuard {
                registry: self.clone(),
                pid,
                secret,
            };
        }
    }

    /// Looks up a CancelRequest from `source`.
    pub fn lookup(&self, source: IpAddr, pid: u32, key: &[u8]) -> CancelLookup {
        if self
            .limiter
            .check_key(&crate::source::limiter_key(source))
            .is_err()
        {
            return CancelLookup::RateLimited;
        }
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match sessions.get(&pid) {
            Some(entry) if key.len() == 4 && bool::from(entry.secret.ct_eq(key)) => {
                CancelLookup::Forward {
                    backend_pid: entry.backend.pid,
                    backend_key: entry.backend.key.clone(),
                    conn_id: entry.conn_id.clone(),
                }
            }
            _ => CancelLookup::Unknown,
        }
    }

    /// Drops rate-limit state for sources that are back to a full bucket.
    pub fn retain_recent(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    pub fn live_sessions(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    fn forget(&self, pid: u32) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid);
    }
}

/// A session's registration; the key is forgotten when the session ends.
pub struct CancelGuard {
    registry: Arc<CancelRegistry>,
    pub pid: u32,
    pub secret: [u8; 4],
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.registry.forget(self.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(pid: u32) -> BackendKey {
        BackendKey {
            pid,
            key: Bytes::from_static(&[9, 9, 9, 9]),
        }
    }

    const SOURCE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn matching_key_forwards_to_its_own_backend() {
        let registry = CancelRegistry::new(100);
        let a = registry.register(backend(11), "a");
        let b = registry.register(backend(22), "b");
        match registry.lookup(SOURCE, a.pid, &a.secret) {
            CancelLookup::Forward {
                backend_pid,
                conn_id,
                ..
            } => {
                assert_eq!((backend_pid, conn_id.as_str()), (11, "a"))
            }
            other => panic!("{other:?}"),
        }
        match registry.lookup(SOURCE, b.pid, &b.secret) {
            CancelLookup::Forward { backend_pid, .. } => assert_eq!(backend_pid, 22),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wrong_key_or_pid_is_unknown() {
        let registry = CancelRegistry::new(100);
        let a = registry.register(backend(11), "a");
        let mut wrong = a.secret;
        wrong[0] ^= 1;
        assert_eq!(
            registry.lookup(SOURCE, a.pid, &wrong),
            CancelLookup::Unknown
        );
        assert_eq!(
            registry.lookup(SOURCE, a.pid ^ 1, &a.secret),
            CancelLookup::Unknown
        );
        assert_eq!(
            registry.lookup(SOURCE, a.pid, &[1, 2, 3]),
            CancelLookup::Unknown
        );
    }

    #[test]
    fn ended_session_cannot_be_cancelled() {
        let registry = CancelRegistry::new(100);
        let a = registry.register(backend(11), "a");
        let (pid, secret) = (a.pid, a.secret);
        drop(a);
        assert_eq!(registry.lookup(SOURCE, pid, &secret), CancelLookup::Unknown);
        assert_eq!(registry.live_sessions(), 0);
    }

    #[test]
    fn guesses_are_rate_limited_per_source() {
        let registry = CancelRegistry::new(5);
        let a = registry.register(backend(11), "a");
        let limited = (0..50)
            .filter(|i| registry.lookup(SOURCE, *i, &[0, 0, 0, 0]) == CancelLookup::RateLimited)
            .count();
        assert!(limited >= 40, "only {limited} of 50 guesses were limited");
        // Even the right key is refused while the source is over its budget.
        assert_eq!(
            registry.lookup(SOURCE, a.pid, &a.secret),
            CancelLookup::RateLimited
        );
        // Another source is unaffected.
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(matches!(
            registry.lookup(other, a.pid, &a.secret),
            CancelLookup::Forward { .. }
        ));
    }

    #[test]
    fn dual_stack_sources_are_limited_by_their_ipv4_address() {
        let registry = CancelRegistry::new(2);
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        let plain: IpAddr = "127.0.0.2".parse().unwrap();
        let neighbour: IpAddr = "::ffff:127.0.0.3".parse().unwrap();
        for _ in 0..2 {
            assert_eq!(registry.lookup(mapped, 1, &[0; 4]), CancelLookup::Unknown);
        }
        // Mapped and plain are one source; another IPv4 client is not that source.
        assert_eq!(
            registry.lookup(plain, 1, &[0; 4]),
            CancelLookup::RateLimited
        );
        assert_eq!(
            registry.lookup(neighbour, 1, &[0; 4]),
            CancelLookup::Unknown
        );
        // IPv6 by /64: a neighbour address in the same /64 shares the budget.
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        registry.lookup(a, 1, &[0; 4]);
        registry.lookup(a, 1, &[0; 4]);
        assert_eq!(registry.lookup(b, 1, &[0; 4]), CancelLookup::RateLimited);
    }

    #[test]
    fn proxy_pids_are_positive_and_unique() {
        let registry = CancelRegistry::new(100);
        let guards: Vec<_> = (0..1000)
            .map(|i| registry.register(backend(i), "x"))
            .collect();
        let mut pids: Vec<u32> = guards.iter().map(|g| g.pid).collect();
        assert!(pids.iter().all(|p| *p != 0 && *p < 0x8000_0000));
        pids.sort_unstable();
        pids.dedup();
        assert_eq!(pids.len(), 1000);
    }
}
