//! What expires when (the proxy's certificate, the CA bundle, the CRL's nextUpdate), and what follows: a warning well before, a refusal after.
//!
//! Past the CRL's nextUpdate the sidecar refuses every handshake, and past its certificate's
//! notAfter every client refuses it: both would take the database off the network on a day
//! nobody chose. So the dates are metrics (`eastwall_certificate_expiry_timestamp_seconds`
//! with `cert` = `proxy`, `ca`, `crl`), `/readyz` lists a warning beside `ready` within the
//! thresholds of [`crate::preflight`] and fails once a date has passed, and the decision log
//! gets an `expiry_warning` line (alert) at most once a day per date.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::preflight::{Level, CA_WARN, CERT_WARN, CRL_WARN};

/// How often one date's warning is written to the decision log.
pub const LOG_EVERY: Duration = Duration::from_secs(24 * 3600);

/// The three dates; None when unknown (no CRL configured, a file that does not parse).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expiries {
    pub proxy: Option<SystemTime>,
    /// The earliest notAfter in the trust bundle (the metric, and the warning).
    pub ca: Option<SystemTime>,
    /// The latest: only when it has passed does no client verify any more. During a CA
    /// rollover the old root expires beside the new one, and that is no outage.
    pub ca_latest: Option<SystemTime>,
    pub crl: Option<SystemTime>,
}

/// One date judged at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judged {
    pub level: Level,
    /// `proxy`, `ca` or `crl`.
    pub cert: &'static str,
    pub at: SystemTime,
    pub message: String,
}

impl Expiries {
    /// Reads the proxy's certificate and the CA bundle; the CRL's date comes from the
    /// verified CRLs in force.
    pub fn read(cert: &Path, client_ca: &Path, crl_next: Option<SystemTime>) -> Expiries {
        let cas = not_afters(client_ca);
        Expiries {
            proxy: not_afters(cert).into_iter().next(),
            ca: cas.iter().copied().min(),
            ca_latest: cas.iter().copied().max(),
            crl: crl_next,
        }
    }

    /// Each known date that is past (error) or within its threshold (warning).
    pub fn judge(&self, now: SystemTime) -> Vec<Judged> {
        let mut out = Vec::new();
        for (cert, at, warn, what, fix) in [
            (
                "proxy",
                self.proxy,
                CERT_WARN,
                "the proxy's certificate",
                "issue a new one (`eastwall ca issue ... --force`); the sidecar reloads it within 2 s",
            ),
            (
                "ca",
                self.ca,
                CA_WARN,
                "a CA certificate of the trust bundle",
                "roll the CA over (docs/production.md)",
            ),
            (
                "crl",
                self.crl,
                CRL_WARN,
                "the CRL's nextUpdate",
                "re-sign it (`eastwall ca crl`); past it every handshake is refused",
            ),
        ] {
            let Some(at) = at else { continue };
            let when = humantime::format_rfc3339_seconds(at);
            if cert == "ca" && at <= now && self.ca_latest.is_some_and(|l| l > now) {
                out.push(Judged {
                    level: Level::Warning,
                    cert,
                    at,
                    message: format!(
                        "{what} expired at {when}; the bundle's other CA certificates still verify: remove it once nothing it issued is in use"
                    ),
                });
                continue;
            }
            if at <= now {
                out.push(Judged {
                    level: Level::Error,
                    cert,
                    at,
                    message: format!("{what} expired at {when}; {fix}"),
                });
            } else if at <= now + warn {
                let hours = at.duration_since(now).unwrap_or_default().as_secs() / 3600;
                out.push(Judged {
                    level: Level::Warning,
                    cert,
                    at,
                    message: format!("{what} expires at {when} (in {hours} h); {fix}"),
                });
            }
        }
        out
    }
}

/// notAfter of every certificate in a PEM file.
fn not_afters(path: &Path) -> Vec<SystemTime> {
    let Ok(pem) = std::fs::read(path) else {
        return Vec::new();
    };
    rustls_pemfile::certs(&mut pem.as_slice())
        .filter_map(Result::ok)
        .filter_map(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
            let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_date_warns_within_its_threshold_and_fails_once_past() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let day = Duration::from_secs(86_400);
        let e = Expiries {
            proxy: Some(now + 6 * day),
            ca: Some(now + 60 * day),
            ca_latest: Some(now + 60 * day),
            crl: Some(now - Duration::from_secs(1)),
        };
        let j = e.judge(now);
        assert_eq!(j.len(), 2, "{j:#?}");
        assert_eq!((j[0].cert, j[0].level), ("proxy", Level::Warning));
        assert!(j[0].message.contains("(in 144 h)"), "{}", j[0].message);
        assert_eq!((j[1].cert, j[1].level), ("crl", Level::Error));
        assert!(j[1].message.contains("every handshake is refused"));
        let quiet = Expiries {
            proxy: Some(now + 8 * day),
            ca: Some(now + 31 * day),
            ca_latest: Some(now + 31 * day),
            crl: Some(now + 3 * day),
        };
        assert!(quiet.judge(now).is_empty());
        // A rollover: the old root has expired, the new one verifies. A warning, not an outage.
        let rollover = Expiries {
            ca: Some(now - day),
            ca_latest: Some(now + 300 * day),
            ..quiet
        };
        let j = rollover.judge(now);
        assert_eq!((j[0].cert, j[0].level), ("ca", Level::Warning), "{j:#?}");
        let all_gone = Expiries {
            ca: Some(now - 2 * day),
            ca_latest: Some(now - day),
            ..quiet
        };
        assert_eq!(all_gone.judge(now)[0].level, Level::Error);
        assert!(Expiries::default().judge(now).is_empty());
    }
}
