//! The one mapping from a client's source address to the key every per-source limit counts it under.
//!
//! IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what a dual-stack `[::]` listener reports for an
//! IPv4 client) is that IPv4 address; any other IPv6 address is grouped by its /64, because
//! one host usually holds a whole /64 and could otherwise rotate addresses to dodge a limit.
//! Every limiter (startup and handshake budgets, cancel requests, MFA failures, the step-up
//! endpoint, refusal-log aggregation) uses [`limiter_key`], so they all agree on what one
//! source is.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// The key `ip` is limited under.
pub fn limiter_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(Ipv6Addr::from(segments))
            }
        },
    }
}

/// Open connections per source key, so one host cannot hold all of a small listener's
/// connections (the step-up endpoint, the admin HTTP port).
pub struct SourceSlots {
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

impl SourceSlots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `ip`, or None when its source has its fill.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let key = limiter_key(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(key).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            slots: self.clone(),
            key,
        })
    }
}

/// One connection's place in its source's budget, given back on drop.
pub struct SourceSlot {
    slots: Arc<SourceSlots>,
    key: IpAddr,
}

impl Drop for SourceSlot {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> IpAddr {
        limiter_key(s.parse().unwrap())
    }

    #[test]
    fn ipv4_is_its_own_key() {
        assert_eq!(key("127.0.0.2"), "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_ne!(key("127.0.0.2"), key("127.0.0.3"));
    }

    #[test]
    fn ipv4_mapped_addresses_are_their_ipv4_address_not_one_shared_key() {
        assert_eq!(
            key("::ffff:127.0.0.2"),
            "127.0.0.2".parse::<IpAddr>().unwrap()
        );
        assert_ne!(key("::ffff:127.0.0.2"), key("::ffff:127.0.0.3"));
        assert_eq!(key("::ffff:10.1.2.3"), key("10.1.2.3"));
    }

    #[test]
    fn other_ipv6_is_grouped_by_its_64() {
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::2"));
        assert_eq!(
            key("2001:db8:1:2::1"),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        // Loopback and the IPv4-compatible (not mapped) form stay IPv6.
        assert_eq!(key("::1"), "::".parse::<IpAddr>().unwrap());
        assert!(key("::127.0.0.2").is_ipv6());
    }
}
