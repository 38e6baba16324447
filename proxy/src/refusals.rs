//! Aggregation of unauthenticated refusals, so a flood of them cannot fill the disk one fsync'd line at a time.
//!
//! Everything refused before an identity is proven (front-door refusals, failed or timed-out
//! TLS handshakes, plaintext StartupMessages, unknown cancel keys, budget refusals at accept)
//! goes through a [`RefusalGate`]. Per source (the key of [`crate::source::limiter_key`]) and
//! per [`INTERVAL`], the first [`BURST`] are written as usual; the rest are only counted, and
//! when the interval ends one `refusals_summary` line per source gives the exact count, by
//! reason. No refusal is lost: each is either a line of its own or counted in a summary
//! (summaries still open are written at shutdown).
//!
//! Memory and log volume stay bounded whatever the number of sources: at most
//! [`GLOBAL_BURST`] individual lines per interval over all sources, and at most
//! [`MAX_SOURCES`] sources tracked at once; refusals from further sources are counted under
//! one overflow summary (source `"*"`). Strings the client chose are capped at
//! [`UNAUTHENTICATED_FIELD_BYTES`] in these lines.
//!
//! Time is passed in (`now`), so the windows are tested without sleeping.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long one source's window lasts.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Refusals per source per interval that get a line of their own.
pub const BURST: u64 = 10;
/// Individual refusal lines per interval over all sources together.
pub const GLOBAL_BURST: u64 = 200;
/// Sources tracked at once; more are counted together under source `"*"`.
pub const MAX_SOURCES: usize = 1024;
/// Longest attacker-chosen string (user, database, SNI...) in an unauthenticated line.
pub const UNAUTHENTICATED_FIELD_BYTES: usize = 64;
/// The cap on the `detail` of an unauthenticated line: Eastwall's own error text, which may
/// quote a little of the client's, bounded like every other field.
pub const UNAUTHENTICATED_DETAIL_BYTES: usize = 256;

/// What to do with one refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write its line.
    Write,
    /// Counted; it will be in a summary.
    Counted,
}

/// The counted refusals of one source over one interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The limiter key, or None for the overflow bucket.
    pub source: Option<IpAddr>,
    pub suppressed: u64,
    pub reasons: BTreeMap<String, u64>,
    /// How long the window was open before it was summarised.
    pub window: Duration,
}

struct Window {
    started: Instant,
    written: u64,
    suppressed: u64,
    reasons: BTreeMap<String, u64>,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            started: now,
            written: 0,
            suppressed: 0,
            reasons: BTreeMap::new(),
        }
    }

    fn summary(self, source: Option<IpAddr>, now: Instant) -> Option<Summary> {
        (self.suppressed > 0).then(|| Summary {
            source,
            suppressed: self.suppressed,
            reasons: self.reasons,
            window: now.saturating_duration_since(self.started),
        })
    }
}

struct State {
    /// Keyed by limiter key; `None` is the overflow bucket.
    windows: HashMap<Option<IpAddr>, Window>,
    global_started: Instant,
    global_written: u64,
}

/// Decides which unauthenticated refusals are written and counts the others.
pub struct RefusalGate {
    interval: Duration,
    burst: u64,
    global_burst: u64,
    max_sources: usize,
    state: Mutex<State>,
}

impl RefusalGate {
    pub fn new(now: Instant) -> Self {
        Self::with_limits(now, INTERVAL, BURST, GLOBAL_BURST, MAX_SOURCES)
    }

    pub fn with_limits(
        now: Instant,
        interval: Duration,
        burst: u64,
        global_burst: u64,
        max_sources: usize,
    ) -> Self {
        Self {
            interval,
            burst,
            global_burst,
            max_sources: max_sources.max(1),
            state: Mutex::new(State {
                windows: HashMap::new(),
                global_started: now,
                global_written: 0,
            }),
        }
    }

    /// One refusal from `source` (any address: it is mapped to its limiter key here). Returns
    /// whether to write it, and the summary of this source's previous window if that window
    /// ended (to be written first, so the log stays in order).
    pub fn offer(&self, source: IpAddr, reason: &str, now: Instant) -> (Verdict, Option<Summary>) {
        let key = crate::source::limiter_key(source);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now.saturating_duration_since(state.global_started) >= self.interval {
            state.global_started = now;
            state.global_written = 0;
        }
        let mut ended = None;
        if let Some(window) = state.windows.get(&Some(key)) {
            if now.saturating_duration_since(window.started) >= self.interval {
                ended = state
                    .windows
                    .remove(&Some(key))
                    .and_then(|w| w.summary(Some(key), now));
            }
        }
        let slot =
            if state.windows.contains_key(&Some(key)) || state.windows.len() < self.max_sources {
                Some(key)
            } else {
                None
            };
        let global_room = state.global_written < self.global_burst;
        let burst = self.burst;
        let window = state
            .windows
            .entry(slot)
            .or_insert_with(|| Window::new(now));
        let verdict = if slot.is_some() && window.written < burst && global_room {
            window.written += 1;
            Verdict::Write
        } else {
            window.suppressed += 1;
            *window.reasons.entry(reason.to_owned()).or_insert(0) += 1;
            Verdict::Counted
        };
        if verdict == Verdict::Write {
            state.global_written += 1;
        }
        (verdict, ended)
    }

    /// Summaries of the windows that have ended by `now`; those windows are forgotten.
    pub fn due(&self, now: Instant) -> Vec<Summary> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let ended: Vec<Option<IpAddr>> = state
            .windows
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.started) >= self.interval)
            .map(|(k, _)| *k)
            .collect();
        let mut out: Vec<Summary> = ended
            .into_iter()
            .filter_map(|k| state.windows.remove(&k).and_then(|w| w.summary(k, now)))
            .collect();
        out.sort_by_key(|s| s.source);
        out
    }

    /// Every open window's summary (at shutdown); all windows are forgotten.
    pub fn drain(&self, now: Instant) -> Vec<Summary> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Summary> = state
            .windows
            .drain()
            .filter_map(|(k, w)| w.summary(k, now))
            .collect();
        out.sort_by_key(|s| s.source);
        out
    }

    /// Sources tracked right now.
    pub fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .windows
            .len()
    }
}

/// Cuts `s` to at most `max` bytes at a character boundary; returns whether it was cut.
pub fn cap_in_place(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_first_of_a_burst_are_written_and_the_rest_counted_exactly() {
        let t0 = Instant::now();
        let gate = RefusalGate::with_limits(t0, INTERVAL, 3, 1000, 16);
        let a = ip("127.0.0.2");
        let verdicts: Vec<Verdict> = (0..300)
            .map(|i| {
                gate.offer(a, if i % 2 == 0 { "no_tls" } else { "bad_length" }, t0)
                    .0
            })
            .collect();
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Write).count(), 3);
        assert!(gate.due(t0 + INTERVAL / 2).is_empty(), "window still open");
        let due = gate.due(t0 + INTERVAL);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].source, Some(a));
        assert_eq!(due[0].suppressed, 297);
        assert_eq!(due[0].reasons.values().sum::<u64>(), 297);
        assert_eq!(gate.tracked(), 0, "an ended window is forgotten");
        // The next interval starts a new burst.
        assert_eq!(gate.offer(a, "no_tls", t0 + INTERVAL).0, Verdict::Write);
    }

    #[test]
    fn a_source_that_comes_back_after_its_window_gets_the_old_summary_first() {
        let t0 = Instant::now();
        let gate = RefusalGate::with_limits(t0, INTERVAL, 1, 1000, 16);
        let a = ip("10.0.0.1");
        assert_eq!(gate.offer(a, "no_tls", t0), (Verdict::Write, None));
        assert_eq!(gate.offer(a, "no_tls", t0).0, Verdict::Counted);
        let (verdict, ended) = gate.offer(a, "no_tls", t0 + INTERVAL);
        assert_eq!(verdict, Verdict::Write);
        assert_eq!(ended.map(|s| s.suppressed), Some(1));
        assert!(
            gate.drain(t0 + INTERVAL).is_empty(),
            "nothing counted since"
        );
    }

    #[test]
    fn sources_are_separate_and_mapped_ipv4_is_its_ipv4_source() {
        let t0 = Instant::now();
        let gate = RefusalGate::with_limits(t0, INTERVAL, 1, 1000, 16);
        assert_eq!(
            gate.offer(ip("::ffff:127.0.0.2"), "x", t0).0,
            Verdict::Write
        );
        assert_eq!(gate.offer(ip("127.0.0.2"), "x", t0).0, Verdict::Counted);
        assert_eq!(
            gate.offer(ip("::ffff:127.0.0.3"), "x", t0).0,
            Verdict::Write
        );
        let all = gate.drain(t0);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].source, Some(ip("127.0.0.2")));
    }

    #[test]
    fn many_sources_share_a_global_burst_and_one_overflow_bucket() {
        let t0 = Instant::now();
        let gate = RefusalGate::with_limits(t0, INTERVAL, 5, 10, 4);
        let mut written = 0;
        for i in 0..100u32 {
            let source = IpAddr::V6(std::net::Ipv6Addr::from(
                (0x2001_0db8u128 << 96) | ((i as u128) << 64),
            ));
            if gate.offer(source, "handshake_timeout", t0).0 == Verdict::Write {
                written += 1;
            }
        }
        assert!(written <= 10, "global burst: {written}");
        assert!(gate.tracked() <= 5, "4 sources and the overflow bucket");
        let all = gate.drain(t0);
        let counted: u64 = all.iter().map(|s| s.suppressed).sum();
        assert_eq!(written + counted, 100, "every refusal written or counted");
        assert!(all.iter().any(|s| s.source.is_none()));
    }

    #[test]
    fn capping_respects_character_boundaries() {
        let mut s = "é".repeat(40); // 80 bytes
        assert!(cap_in_place(&mut s, 63));
        assert_eq!(s.len(), 62);
        assert!(s.chars().all(|c| c == 'é'));
        let mut short = String::from("billing");
        assert!(!cap_in_place(&mut short, 64));
        assert_eq!(short, "billing");
    }
}
