//! The TOTP secrets file: one JSON object mapping each enrolled SPIFFE ID to its base32 secret
//! and enrolment time. Mode 0600; a file that group or others can read is refused.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use eastwall_ca::SpiffeId;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use totp_rs::Secret;

use super::token::check_private;
use super::totp::{DIGITS, SECRET_LEN, STEP_SECS};
use super::MfaError;

/// The issuer an authenticator app shows next to the account.
pub const ISSUER: &str = "Eastwall";
/// The largest secrets file we read; far beyond any real deployment, it bounds a bad file.
const MAX_FILE_LEN: u64 = 16 * 1024 * 1024;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFile {
    secret_b32: String,
    enrolled_at: String,
    /// When an administrator last cleared this identity's lockout (`eastwall mfa unlock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unlocked_at: Option<String>,
}

#[derive(Clone)]
struct Entry {
    secret: Vec<u8>,
    secret_b32: String,
    enrolled_at: OffsetDateTime,
    unlocked_at: Option<OffsetDateTime>,
}

/// Enrolled operators and their TOTP secrets.
#[derive(Clone, Default)]
pub struct SecretStore {
    entries: BTreeMap<SpiffeId, Entry>,
}

impl fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretStore")
            .field("enrolled", &self.entries.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A new enrolment: what the operator types into (or scans with) an authenticator app.
#[derive(Clone)]
pub struct Enrollment {
    pub secret_b32: String,
    pub otpauth_uri: String,
}

impl fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Enrollment(<redacted>)")
    }
}

impl SecretStore {
    /// Reads the secrets file. A missing file is an empty store (nobody enrolled yet).
    pub fn load(path: &Path) -> Result<Self, MfaError> {
        let io_err = |source| MfaError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(io_err(e)),
        };
        check_private(path, &file)?;
        let mut text = String::new();
        Read::take(&mut file, MAX_FILE_LEN)
            .read_to_string(&mut text)
            .map_err(io_err)?;
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Self, MfaError> {
        let bad = |reason: String| MfaError::BadSecretsFile {
            path: path.to_owned(),
            reason,
        };
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        // serde's message quotes the offending value, which here may be a TOTP secret: only
        // where it is, and what kind of mistake, is said.
        let raw: BTreeMap<String, EntryFile> = serde_json::from_str(text).map_err(|e| {
            bad(format!(
                "not the expected JSON ({:?} error) at line {} column {}",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        let mut entries = BTreeMap::new();
        for (key, entry) in raw {
            let id = SpiffeId::parse(&key).map_err(|e| bad(format!("key {key:?}: {e}")))?;
            let secret = Secret::Encoded(entry.secret_b32.clone())
                .to_bytes()
                .map_err(|_| bad(format!("{key}: secret_b32 is not valid base32")))?;
            if secret.len() < 16 {
                return Err(bad(format!(
                    "{key}: secret is {} bits; at least 128 are needed",
                    secret.len() * 8
                )));
            }
            let enrolled_at = OffsetDateTime::parse(&entry.enrolled_at, &Rfc3339)
                .map_err(|e| bad(format!("{key}: enrolled_at is not RFC 3339: {e}")))?;
            let unlocked_at = entry
                .unlocked_at
                .map(|t| OffsetDateTime::parse(&t, &Rfc3339))
                .transpose()
                .map_err(|e| bad(format!("{key}: unlocked_at is not RFC 3339: {e}")))?;
            entries.insert(
                id,
                Entry {
                    secret,
                    secret_b32: entry.secret_b32,
                    enrolled_at,
                    unlocked_at,
                },
            );
        }
        Ok(Self { entries })
    }

    fn save(&self, path: &Path) -> Result<(), MfaError> {
        let io_err = |source| MfaError::Io {
            path: path.to_owned(),
            source,
        };
        let file: BTreeMap<&str, EntryFile> = self
            .entries
            .iter()
            .map(|(id, e)| {
                (
                    id.as_str(),
                    EntryFile {
                        secret_b32: e.secret_b32.clone(),
                        enrolled_at: e
                            .enrolled_at
                            .format(&Rfc3339)
                            .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned()),
                        unlocked_at: e.unlocked_at.and_then(|t| t.format(&Rfc3339).ok()),
                    },
                )
            })
            .collect();
        let mut text =
            serde_json::to_string_pretty(&file).map_err(|e| MfaError::BadSecretsFile {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        text.push('\n');
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        // Write a 0600 temporary beside the file and rename it over: a crash never leaves a
        // half-written secrets file, and the secrets are never briefly world-readable.
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err)?;
        tmp.write_all(text.as_bytes()).map_err(io_err)?;
        tmp.as_file().sync_all().map_err(io_err)?;
        tmp.persist(path).map_err(|e| io_err(e.error))?;
        Ok(())
    }

    /// Creates a TOTP secret for `id` and stores it. An identity already enrolled is refused
    /// unless `force` (which replaces its secret, so the old authenticator entry stops working).
    pub fn enroll(path: &Path, id: &SpiffeId, force: bool) -> Result<Enrollment, MfaError> {
        let mut store = Self::load(path)?;
        if store.entries.contains_key(id) && !force {
            return Err(MfaError::AlreadyEnrolled(id.clone()));
        }
        let mut secret = vec![0u8; SECRET_LEN];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let secret_b32 = match Secret::Raw(secret.clone()).to_encoded() {
            Secret::Encoded(s) => s,
            Secret::Raw(_) => unreachable_encoded(),
        };
        let enrolled_at = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        store.entries.insert(
            id.clone(),
            Entry {
                secret,
                secret_b32: secret_b32.clone(),
                enrolled_at,
                unlocked_at: None,
            },
        );
        store.save(path)?;
        Ok(Enrollment {
            otpauth_uri: otpauth_uri(id, &secret_b32),
            secret_b32,
        })
    }

    /// Removes `id`'s secret; an identity that is not enrolled is an error.
    pub fn remove(path: &Path, id: &SpiffeId) -> Result<(), MfaError> {
        let mut store = Self::load(path)?;
        if store.entries.remove(id).is_none() {
            return Err(MfaError::NotEnrolled(id.clone()));
        }
        store.save(path)
    }

    /// Clears `id`'s MFA lockout: records the time in the file, and a running sidecar that
    /// re-reads it (every few seconds) forgets the identity's failures and lock.
    pub fn unlock(path: &Path, id: &SpiffeId) -> Result<(), MfaError> {
        let mut store = Self::load(path)?;
        let Some(entry) = store.entries.get_mut(id) else {
            return Err(MfaError::NotEnrolled(id.clone()));
        };
        // Nanoseconds kept: two unlocks in one second must both be seen as changes.
        entry.unlocked_at = Some(OffsetDateTime::now_utc());
        store.save(path)
    }

    /// Identities whose lock an administrator cleared, or whose secret changed (re-enrolled),
    /// between `self` (the file as it was) and `next`.
    pub(crate) fn reset_between(&self, next: &SecretStore) -> Vec<SpiffeId> {
        next.entries
            .iter()
            .filter(|(id, new)| {
                self.entries.get(*id).is_some_and(|old| {
                    old.unlocked_at != new.unlocked_at || old.secret_b32 != new.secret_b32
                })
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Enrolled identities and when each was enrolled, in ID order.
    pub fn list(&self) -> Vec<(SpiffeId, OffsetDateTime)> {
        self.entries
            .iter()
            .map(|(id, e)| (id.clone(), e.enrolled_at))
            .collect()
    }

    /// Whether `id` has a secret.
    pub fn is_enrolled(&self, id: &SpiffeId) -> bool {
        self.entries.contains_key(id)
    }

    pub(crate) fn secret(&self, id: &SpiffeId) -> Option<&[u8]> {
        self.entries.get(id).map(|e| e.secret.as_slice())
    }
}

/// `Secret::to_encoded` always yields `Encoded`; this keeps the match total without a panic.
fn unreachable_encoded() -> String {
    String::new()
}

/// The Key URI an authenticator app imports.
pub fn otpauth_uri(id: &SpiffeId, secret_b32: &str) -> String {
    format!(
        "otpauth://totp/{ISSUER}:{}?secret={secret_b32}&issuer={ISSUER}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECS}",
        percent_encode(id.as_str())
    )
}

/// Percent-encodes everything outside RFC 3986's unreserved set, as the label requires.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn alice() -> SpiffeId {
        SpiffeId::parse("spiffe://corp.example/app/operators/alice").unwrap()
    }

    #[test]
    fn enroll_writes_a_0600_file_that_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mfa.json");
        let e = SecretStore::enroll(&path, &alice(), false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(e.secret_b32.len(), 32, "160 bits of base32");
        assert_eq!(
            e.otpauth_uri,
            format!(
                "otpauth://totp/Eastwall:spiffe%3A%2F%2Fcorp.example%2Fapp%2Foperators%2Falice?secret={}&issuer=Eastwall&algorithm=SHA1&digits=6&period=30",
                e.secret_b32
            )
        );
        let store = SecretStore::load(&path).unwrap();
        assert_eq!(store.list().len(), 1);
        assert_eq!(store.list()[0].0, alice());
        assert_eq!(store.secret(&alice()).unwrap().len(), SECRET_LEN);
    }

    #[test]
    fn re_enrolling_needs_force_and_changes_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mfa.json");
        let first = SecretStore::enroll(&path, &alice(), false).unwrap();
        let err = SecretStore::enroll(&path, &alice(), false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        let second = SecretStore::enroll(&path, &alice(), true).unwrap();
        assert_ne!(first.secret_b32, second.secret_b32);
    }

    #[test]
    fn remove_forgets_and_refuses_unknown_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mfa.json");
        SecretStore::enroll(&path, &alice(), false).unwrap();
        SecretStore::remove(&path, &alice()).unwrap();
        assert!(SecretStore::load(&path).unwrap().list().is_empty());
        let err = SecretStore::remove(&path, &alice()).unwrap_err();
        assert!(err.to_string().contains("not enrolled"), "{err}");
    }

    #[test]
    fn a_file_readable_by_others_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mfa.json");
        SecretStore::enroll(&path, &alice(), false).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = SecretStore::load(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        // Enrolling through a too-open file is refused too, not silently tightened.
        assert!(SecretStore::enroll(&path, &alice(), true).is_err());
    }

    #[test]
    fn a_missing_file_is_an_empty_store_and_a_corrupt_one_names_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mfa.json");
        assert!(SecretStore::load(&path).unwrap().list().is_empty());
        for (text, needle) in [
            ("{", "Eof"),
            // A secret where an entry belongs: the error must say where, never the secret.
            (
                r#"{"spiffe://td/a":"JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"}"#,
                "line 1 column",
            ),
            (
                r#"{"not-an-id":{"secret_b32":"AAAA","enrolled_at":"2024-01-01T00:00:00Z"}}"#,
                "not-an-id",
            ),
            (
                r#"{"spiffe://td/a":{"secret_b32":"!!","enrolled_at":"2024-01-01T00:00:00Z"}}"#,
                "base32",
            ),
            (
                r#"{"spiffe://td/a":{"secret_b32":"AAAAAAAA","enrolled_at":"2024-01-01T00:00:00Z"}}"#,
                "128",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let err = SecretStore::load(&path).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
            assert!(!err.contains("JBSWY3DP"), "the secret leaked: {err}");
        }
    }
}
