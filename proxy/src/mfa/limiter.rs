//! Failure budgets for MFA answers: a budget per key charged only on failures (GCRA: `max`
//! failures, refilled evenly over `window`), and locks that escalate. A locked key is refused
//! *before* its answer is checked (a right code does not unlock it).
//!
//! The first time a key spends its budget it is locked for one failure's worth of refill
//! (`window / max`, 45 s by default). Each further trip within [`ESCALATION_MEMORY`] of the
//! previous one locks for `window`, then twice that, and so on up to [`MAX_LOCKOUT`]: a guesser
//! gets about `max` tries per `MAX_LOCKOUT` once escalated, not `max` per `window`. A day
//! without a trip forgets the escalation. Time is passed in, so tests drive the clock.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a trip is remembered for escalation.
pub(crate) const ESCALATION_MEMORY: Duration = Duration::from_secs(24 * 3600);
/// The longest lock an escalation reaches.
pub(crate) const MAX_LOCKOUT: Duration = Duration::from_secs(8 * 3600);

/// What charging one failure did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Charge {
    /// Counted; budget left.
    Counted,
    /// This failure spent the budget: the key is locked from now on. `first` is true when this
    /// failure started a new lock (the proxy raises an alert then); false for a failure that
    /// raced past a lock already in force.
    Tripped { first: bool },
}

#[derive(Debug, Clone, Copy)]
struct State {
    /// GCRA theoretical arrival time: the budget is full when `tat <= now`, and `tat - now` is
    /// how much of the window the failures so far have used.
    tat: Instant,
    locked_until: Option<Instant>,
    /// Trips in a row, each within `ESCALATION_MEMORY` of the one before.
    trips: u32,
    last_trip: Option<Instant>,
}

/// A failure budget per key, with escalating locks.
pub(crate) struct FailureLimiter<K: Hash + Eq + Clone> {
    states: Mutex<HashMap<K, State>>,
    /// Time for one failure's worth of budget to come back.
    cell: Duration,
    window: Duration,
}

impl<K: Hash + Eq + Clone> FailureLimiter<K> {
    pub(crate) fn new(max: u32, window: Duration) -> Self {
        let max = max.max(1);
        // A zero window would mean "no limit"; a second is the least we accept.
        let window = window.max(Duration::from_secs(1));
        let cell = (window / max).max(Duration::from_nanos(1));
        Self {
            states: Mutex::new(HashMap::new()),
            cell,
            window,
        }
    }

    fn states(&self) -> std::sync::MutexGuard<'_, HashMap<K, State>> {
        // A panic elsewhere while holding this lock leaves the map consistent (single inserts
        // and removes), so keep using it rather than failing every later check.
        self.states.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long trip number `trips` (1-based, in a row) locks the key.
    fn lockout(&self, trips: u32) -> Duration {
        if trips <= 1 {
            return self.cell;
        }
        let doublings = (trips - 2).min(30);
        self.window
            .checked_mul(1u32 << doublings)
            .unwrap_or(MAX_LOCKOUT)
            .min(MAX_LOCKOUT)
            .max(self.cell)
    }

    /// Whether `key` has spent its budget and may not try again yet.
    pub(crate) fn is_locked(&self, key: &K, now: Instant) -> bool {
        self.locked_for(key, now).is_some()
    }

    /// How much longer `key` is locked, if it is.
    pub(crate) fn locked_for(&self, key: &K, now: Instant) -> Option<Duration> {
        self.states()
            .get(key)
            .and_then(|s| s.locked_until)
            .filter(|until| now < *until)
            .map(|until| until.saturating_duration_since(now))
    }

    /// Records one failure for `key`.
    pub(crate) fn charge(&self, key: &K, now: Instant) -> Charge {
        let mut states = self.states();
        let state = states.entry(key.clone()).or_insert(State {
            tat: now,
            locked_until: None,
            trips: 0,
            last_trip: None,
        });
        let base = if state.tat > now { state.tat } else { now };
        state.tat = base.checked_add(self.cell).unwrap_or(base);
        let used = state.tat.saturating_duration_since(now);
        // Spent when no whole failure's worth of budget is left after this one.
        if used.saturating_add(self.cell) <= self.window {
            return Charge::Counted;
        }
        if state.locked_until.is_some_and(|until| now < until) {
            // Raced past `is_locked` while a lock holds: no new lock, no new alert.
            return Charge::Tripped { first: false };
        }
        let in_a_row = state
            .last_trip
            .is_some_and(|t| now.saturating_duration_since(t) < ESCALATION_MEMORY);
        state.trips = if in_a_row {
            state.trips.saturating_add(1)
        } else {
            1
        };
        state.last_trip = Some(now);
        let lock = self.lockout(state.trips);
        state.locked_until = Some(now.checked_add(lock).unwrap_or(now));
        Charge::Tripped { first: true }
    }

    /// Forgets everything about `key`: a full budget, no lock, no escalation.
    pub(crate) fn clear(&self, key: &K) {
        self.states().remove(key);
    }

    /// Forgets keys whose budget is full again, that are not locked, and whose last trip is
    /// too old to escalate.
    pub(crate) fn retain_recent(&self, now: Instant) {
        self.states().retain(|_, s| {
            now < s.tat
                || s.locked_until.is_some_and(|u| now < u)
                || s.last_trip
                    .is_some_and(|t| now.saturating_duration_since(t) < ESCALATION_MEMORY)
        });
    }

    /// Keys tracked.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.states().len()
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
    fn repeated_trips_escalate_to_long_lockouts_then_are_forgotten() {
        // The defaults: 20 failures per 15 minutes.
        let window = Duration::from_secs(900);
        let lim = FailureLimiter::<u32>::new(20, window);
        let t0 = Instant::now();
        let mut now = t0;
        let spend = |lim: &FailureLimiter<u32>, now: Instant| {
            let mut n = 0;
            loop {
                n += 1;
                if let Charge::Tripped { first } = lim.charge(&1, now) {
                    assert!(first, "a new lock raises an alert");
                    return n;
                }
            }
        };
        assert_eq!(spend(&lim, now), 20);
        // First trip: the old 45 s rate.
        assert_eq!(lim.locked_for(&1, now), Some(Duration::from_secs(45)));
        now += Duration::from_secs(45);
        assert!(!lim.is_locked(&1, now));
        // One more wrong guess trips again: now a real lockout of a whole window.
        assert_eq!(spend(&lim, now), 1);
        assert_eq!(lim.locked_for(&1, now), Some(window));
        // Each further trip within a day doubles it, up to MAX_LOCKOUT.
        let mut expected = window;
        let mut guesses_in_a_day = 21;
        loop {
            now += lim.locked_for(&1, now).unwrap();
            assert!(!lim.is_locked(&1, now));
            guesses_in_a_day += spend(&lim, now);
            expected = (expected * 2).min(MAX_LOCKOUT);
            assert_eq!(lim.locked_for(&1, now), Some(expected));
            if expected == MAX_LOCKOUT {
                break;
            }
        }
        // 15m, 30m, 1h, 2h, 4h, 8h: by the cap, about 120 guesses in the first ~16 hours
        // instead of 80 an hour.
        assert!(now - t0 < ESCALATION_MEMORY, "{:?}", now - t0);
        assert!(guesses_in_a_day <= 130, "{guesses_in_a_day}");
        // Stays at the cap.
        now += MAX_LOCKOUT;
        spend(&lim, now);
        assert_eq!(lim.locked_for(&1, now), Some(MAX_LOCKOUT));
        // A day without a trip forgets the escalation: the next trip is a first trip again.
        now += MAX_LOCKOUT + ESCALATION_MEMORY;
        lim.retain_recent(now);
        assert_eq!(lim.len(), 0);
        assert_eq!(spend(&lim, now), 20);
        assert_eq!(lim.locked_for(&1, now), Some(Duration::from_secs(45)));
    }

    #[test]
    fn a_race_during_a_lock_does_not_escalate() {
        let lim = FailureLimiter::<u32>::new(2, Duration::from_secs(20));
        let now = Instant::now();
        lim.charge(&1, now);
        assert_eq!(lim.charge(&1, now), Charge::Tripped { first: true });
        for _ in 0..5 {
            assert_eq!(lim.charge(&1, now), Charge::Tripped { first: false });
        }
        assert_eq!(lim.locked_for(&1, now), Some(Duration::from_secs(10)));
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
        lim.retain_recent(now);
        assert_eq!(lim.len(), 1000, "fresh failures are remembered");
        lim.retain_recent(now + Duration::from_millis(350));
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
