//! Failure budgets for MFA answers: a governor keyed limiter charged only on failures, plus a
//! small table of keys whose budget is spent, so a locked key is refused *before* its answer
//! is checked (a right code does not unlock it).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::DefaultClock;
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

type Keyed<K> = RateLimiter<K, DashMapStateStore<K>, DefaultClock, StateInformationMiddleware>;

/// What charging one failure did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Charge {
    /// Counted; budget left.
    Counted,
    /// This failure spent the budget: the key is locked from now on. `first` is false when the
    /// same key already tripped within the last window (so one attacker makes one alert).
    Tripped { first: bool },
}

#[derive(Debug, Clone, Copy)]
struct Lock {
    until: Instant,
    alerted_at: Instant,
}

/// A failure budget per key: `max` failures, refilled evenly over `window` (GCRA).
pub(crate) struct FailureLimiter<K: Hash + Eq + Clone> {
    limiter: Keyed<K>,
    locks: Mutex<HashMap<K, Lock>>,
    /// Time for one failure's worth of budget to come back.
    cell: Duration,
    window: Duration,
}

impl<K: Hash + Eq + Clone> FailureLimiter<K> {
    pub(crate) fn new(max: u32, window: Duration) -> Self {
        let max = NonZeroU32::new(max).unwrap_or(NonZeroU32::MIN);
        // A zero window would mean "no limit"; a second is the least we accept.
        let window = window.max(Duration::from_secs(1));
        let cell = (window / max.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(cell)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(max);
        Self {
            limiter: RateLimiter::dashmap(quota).with_middleware::<StateInformationMiddleware>(),
            locks: Mutex::new(HashMap::new()),
            cell,
            window,
        }
    }

    fn locks(&self) -> std::sync::MutexGuard<'_, HashMap<K, Lock>> {
        // A panic elsewhere while holding this lock leaves the map consistent (single inserts
        // and removes), so keep using it rather than failing every later check.
        self.locks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `key` has spent its budget and may not try again yet.
    pub(crate) fn is_locked(&self, key: &K, now: Instant) -> bool {
        self.locks().get(key).is_some_and(|l| now < l.until)
    }

    /// Records one failure for `key`.
    pub(crate) fn charge(&self, key: &K, now: Instant) -> Charge {
        let spent = match self.limiter.check_key(key) {
            Ok(snapshot) => snapshot.remaining_burst_capacity() == 0,
            // Two failures racing past `is_locked` at once: the later one finds it spent.
            Err(_) => true,
        };
        if !spent {
            return Charge::Counted;
        }
        let mut locks = self.locks();
        let first = locks
            .get(key)
            .is_none_or(|l| now.saturating_duration_since(l.alerted_at) >= self.window);
        let alerted_at = match locks.get(key) {
            Some(l) if !first => l.alerted_at,
            _ => now,
        };
        locks.insert(
            key.clone(),
            Lock {
                // GCRA frees one failure's worth of budget after `cell`; until then even a
                // right answer is refused.
                until: now.checked_add(self.cell).unwrap_or(now),
                alerted_at,
            },
        );
        Charge::Tripped { first }
    }

    /// Forgets keys whose budget is full again and whose alert window has passed.
    pub(crate) fn retain_recent(&self, now: Instant) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.locks().retain(|_, l| {
            now < l.until || now.saturating_duration_since(l.alerted_at) < self.window
        });
    }

    /// Keys tracked.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.limiter.len() + self.locks().len()
    }
}

/// The key a source address is limited under: the one mapping every limiter shares.
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    crate::source::limiter_key(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failure_that_spends_the_budget_locks_and_alerts_once() {
        let lim = FailureLimiter::<u32>::new(3, Duration::from_secs(3600));
        let now = Instant::now();
        assert_eq!(lim.charge(&1, now), Charge::Counted);
        assert_eq!(lim.charge(&1, now), Charge::Counted);
        assert!(!lim.is_locked(&1, now));
        assert_eq!(lim.charge(&1, now), Charge::Tripped { first: true });
        assert!(lim.is_locked(&1, now));
        assert!(!lim.is_locked(&2, now));
        // Charged again (a race) within the window: locked, but no second alert.
        assert_eq!(lim.charge(&1, now), Charge::Tripped { first: false });
    }

    #[test]
    fn a_lock_ends_when_budget_comes_back() {
        let lim = FailureLimiter::<u32>::new(2, Duration::from_secs(20));
        let now = Instant::now();
        lim.charge(&1, now);
        lim.charge(&1, now);
        assert!(lim.is_locked(&1, now));
        assert!(!lim.is_locked(&1, now + Duration::from_secs(11)));
    }

    #[test]
    fn retain_recent_forgets_idle_keys() {
        // Ten failures per second: one failure's budget returns in 100 ms.
        let lim = FailureLimiter::<u32>::new(10, Duration::from_secs(1));
        let now = Instant::now();
        for k in 0..1000 {
            assert_eq!(lim.charge(&k, now), Charge::Counted);
        }
        assert_eq!(lim.len(), 1000);
        lim.retain_recent(Instant::now());
        assert_eq!(lim.len(), 1000, "fresh failures are remembered");
        std::thread::sleep(Duration::from_millis(350));
        lim.retain_recent(Instant::now());
        assert_eq!(lim.len(), 0);
    }

    #[test]
    fn ipv6_sources_share_a_key_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(source_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }
}
