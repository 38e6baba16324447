//! The one mapping from a client's source address to the key every per-source limit counts it under.
//!
//! IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what a dual-stack `[::]` listener reports for an
//! IPv4 client) is that IPv4 address; any other IPv6 address is grouped by its /64, because
//! one host usually holds a whole /64 and could otherwise rotate addresses to dodge a limit.
//! Every limiter (startup and handshake budgets, cancel requests, MFA failures, the step-up
//! endpoint, refusal-log aggregation) uses [`limiter_key`], so they all agree on what one
//! source is.

use std::net::{IpAddr, Ipv6Addr};

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
