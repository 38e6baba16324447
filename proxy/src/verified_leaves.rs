//! Client leaves already verified against this trust bundle: a reconnect with the same
//! certificate skips the CA's signature check on it, never the rest of the handshake.
//!
//! The CA's ECDSA signature on the client's leaf is about a quarter of a full mTLS handshake
//! (≈ 745 k of 3.26 M instructions under callgrind). Its verdict depends only on the leaf's
//! bytes and the trust anchors, so it is remembered per exact DER, in a cache owned by the
//! verifier built for those anchors: a new bundle builds a new verifier, with an empty cache.
//! What still runs on every handshake: the validity window against `now` (kept here, from
//! the leaf), the revocation check, the client's proof that it holds the key
//! (CertificateVerify), and everything after TLS (SPIFFE ID, policy, locks).
//!
//! Only leaves that passed the full check are remembered, so filling the cache takes
//! certificates the CA signed; when full it is emptied, which only costs hits.

use std::collections::HashMap;
use std::sync::Mutex;

use rustls_pki_types::UnixTime;

/// How many distinct leaves are remembered before the cache starts over: far more than the
/// workloads one sidecar serves, a few hundred KiB at most.
pub const CAPACITY: usize = 1024;

/// The leaves one verifier has verified, with the validity window each carries.
#[derive(Debug, Default)]
pub struct VerifiedLeaves {
    seen: Mutex<HashMap<Box<[u8]>, Window>>,
}

/// notBefore and notAfter, in seconds since the Unix epoch (both inclusive, as in webpki).
#[derive(Debug, Clone, Copy)]
struct Window {
    not_before: i64,
    not_after: i64,
}

impl VerifiedLeaves {
    /// Whether exactly these bytes were verified before and `now` is inside their window.
    /// False sends the caller down the full check, which also words the refusal.
    pub fn holds(&self, der: &[u8], now: UnixTime) -> bool {
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(der)
            .is_some_and(|w| w.not_before <= now && now <= w.not_after)
    }

    /// Remembers a leaf that just passed the full check. A leaf whose validity cannot be
    /// read is not remembered (it is checked in full every time).
    pub fn remember(&self, der: &[u8]) {
        let Some(window) = window_of(der) else {
            return;
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= CAPACITY && !seen.contains_key(der) {
            seen.clear();
        }
        seen.insert(der.into(), window);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

fn window_of(der: &[u8]) -> Option<Window> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let validity = cert.validity();
    Some(Window {
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};
    use std::time::Duration;

    fn leaf(days: i64) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["client.example".to_owned()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(days);
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn at(offset_secs: i64) -> UnixTime {
        let now = UnixTime::now().as_secs() as i64 + offset_secs;
        UnixTime::since_unix_epoch(Duration::from_secs(now as u64))
    }

    #[test]
    fn a_remembered_leaf_holds_only_inside_its_window_and_only_for_its_exact_bytes() {
        let cache = VerifiedLeaves::default();
        let der = leaf(1);
        assert!(!cache.holds(&der, at(0)), "nothing is remembered unasked");
        cache.remember(&der);
        assert!(cache.holds(&der, at(0)));
        // Past notAfter, or before notBefore: the full check runs (and refuses).
        assert!(!cache.holds(&der, at(2 * 86_400)));
        assert!(!cache.holds(&der, at(-2 * 3600)));
        // One byte changed anywhere (the signature, say): not the leaf that was verified.
        for i in [0, der.len() / 2, der.len() - 1] {
            let mut forged = der.clone();
            forged[i] ^= 1;
            assert!(!cache.holds(&forged, at(0)), "byte {i}");
        }
        assert!(!cache.holds(&der[..der.len() - 1], at(0)));
    }

    #[test]
    fn bytes_that_are_not_a_certificate_are_never_remembered() {
        let cache = VerifiedLeaves::default();
        for junk in [&b""[..], b"\x30\x03\x02\x01\x01", &[0xff; 64]] {
            cache.remember(junk);
            assert!(!cache.holds(junk, at(0)));
        }
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_full_cache_starts_over_and_stays_bounded() {
        let cache = VerifiedLeaves::default();
        let der = leaf(1);
        cache.remember(&der);
        // Distinct bytes with a readable window: one leaf, its last byte varied (the
        // signature's), as a flood of CA-signed leaves would look to the cache.
        let mut filler = der.clone();
        for i in 0..CAPACITY {
            let n = filler.len();
            filler[n - 2] = (i >> 8) as u8;
            filler[n - 1] = i as u8;
            cache.remember(&filler);
            assert!(cache.len() <= CAPACITY);
        }
        assert!(cache.len() <= CAPACITY);
        // Remembered again after the reset, it holds again.
        cache.remember(&der);
        assert!(cache.holds(&der, at(0)));
    }
}
