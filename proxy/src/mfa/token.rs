//! Step-up tokens: a sidecar-signed, short-lived statement "this identity, with this certificate,
//! passed a TOTP check at `iat`", used as the password by tools that open many connections.
//!
//! Format: `ewst1.` + base64url(payload JSON) + `.` + base64url(HMAC-SHA256(key, "ewst1." + payload)).
//! The MAC covers the encoded text, so no JSON canonicalisation is needed and the version
//! prefix cannot be swapped.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::MfaError;

/// What every step-up token starts with; also how an answer is told apart from a TOTP code.
pub const TOKEN_PREFIX: &str = "ewst1.";
/// Bytes in a token key.
pub const TOKEN_KEY_LEN: usize = 32;
/// The longest token we try to parse; longer answers are refused unread.
pub(crate) const MAX_TOKEN_LEN: usize = 8 * 1024;

type HmacSha256 = Hmac<Sha256>;

/// The key that signs step-up tokens. Only the sidecar holds it; it never leaves this process.
#[derive(Clone)]
pub struct TokenKey([u8; TOKEN_KEY_LEN]);

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

impl TokenKey {
    /// A fresh random key (for tests and for `load_or_create`).
    pub fn generate() -> Self {
        let mut bytes = [0u8; TOKEN_KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// Reads the key at `path`, or creates it (32 random bytes, mode 0600) when absent.
    ///
    /// A key file readable by group or others is refused: anyone who can read it can mint
    /// tokens for every operator.
    pub fn load_or_create(path: &Path) -> Result<Self, MfaError> {
        match OpenOptions::new().read(true).open(path) {
            Ok(mut file) => {
                check_private(path, &file)?;
                let mut bytes = Vec::with_capacity(TOKEN_KEY_LEN);
                Read::take(&mut file, TOKEN_KEY_LEN as u64 + 1)
                    .read_to_end(&mut bytes)
                    .map_err(|source| MfaError::Io {
                        path: path.to_owned(),
                        source,
                    })?;
                let key: [u8; TOKEN_KEY_LEN] =
                    bytes
                        .try_into()
                        .map_err(|b: Vec<u8>| MfaError::BadTokenKey {
                            path: path.to_owned(),
                            len: b.len(),
                        })?;
                Ok(Self(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::create(path),
            Err(source) => Err(MfaError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn create(path: &Path) -> Result<Self, MfaError> {
        let key = Self::generate();
        let io_err = |source| MfaError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The folder holds secrets too (the TOTP file sits beside the key by default).
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err)?;
        }
        let mut file = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(file) => file,
            // Another sidecar process created it between our open and create: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Self::load_or_create(path)
            }
            Err(e) => return Err(io_err(e)),
        };
        file.write_all(&key.0).map_err(io_err)?;
        file.sync_all().map_err(io_err)?;
        Ok(key)
    }

    fn mac(&self) -> HmacSha256 {
        // RFC 2104 zero-pads keys shorter than the hash block; doing it here lets us use the
        // infallible fixed-size constructor instead of one that returns a Result.
        let mut block = hmac::digest::generic_array::GenericArray::default();
        block[..TOKEN_KEY_LEN].copy_from_slice(&self.0);
        <HmacSha256 as hmac::digest::KeyInit>::new(&block)
    }
}

/// Refuses a secret file that group or others can read or write.
pub(crate) fn check_private(path: &Path, file: &std::fs::File) -> Result<(), MfaError> {
    let meta = file.metadata().map_err(|source| MfaError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(MfaError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// A signed step-up token and when it stops being accepted.
#[derive(Clone, PartialEq, Eq)]
pub struct StepUpToken {
    /// The text the operator uses as the password.
    pub value: String,
    pub expires_at: SystemTime,
}

impl fmt::Debug for StepUpToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepUpToken")
            .field("value", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl StepUpToken {
    /// The expiry as RFC 3339 (UTC), as the step-up endpoint reports it.
    pub fn expires_at_rfc3339(&self) -> String {
        rfc3339(self.expires_at)
    }
}

/// `t` as RFC 3339 in UTC, whole seconds.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Claims {
    pub id: String,
    /// Hex SHA-256 of the client certificate (DER) the TOTP check was made over.
    pub cert_sha256: String,
    /// Issue time, Unix seconds.
    pub iat: u64,
    /// Expiry, Unix seconds; the token is refused from this second on.
    pub exp: u64,
}

/// Why a token was refused before its claims were compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenFault {
    /// Not our format, or not signed by our key.
    Forged,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs a token for `id` and `cert_sha256`, valid for `max_age` from `now`.
pub(crate) fn sign(
    key: &TokenKey,
    id: &str,
    cert_sha256: &[u8; 32],
    now: SystemTime,
    max_age: Duration,
) -> StepUpToken {
    let iat = unix_secs(now);
    let exp = iat.saturating_add(max_age.as_secs().max(1));
    let claims = Claims {
        id: id.to_owned(),
        cert_sha256: hex::encode(cert_sha256),
        iat,
        exp,
    };
    // Serialising a struct of strings and integers cannot fail.
    let payload = serde_json::to_vec(&claims).unwrap_or_default();
    let signed = format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(payload));
    let mut mac = key.mac();
    mac.update(signed.as_bytes());
    let tag = mac.finalize().into_bytes();
    StepUpToken {
        value: format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag)),
        expires_at: UNIX_EPOCH + Duration::from_secs(exp),
    }
}

/// Checks the MAC (in constant time, before anything is parsed) and returns the claims.
pub(crate) fn verify(key: &TokenKey, token: &str) -> Result<Claims, TokenFault> {
    if token.len() > MAX_TOKEN_LEN || !token.starts_with(TOKEN_PREFIX) {
        return Err(TokenFault::Forged);
    }
    let (signed, tag_b64) = token.rsplit_once('.').ok_or(TokenFault::Forged)?;
    let payload_b64 = signed
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(TokenFault::Forged)?;
    if payload_b64.contains('.') {
        return Err(TokenFault::Forged);
    }
    let tag = URL_SAFE_NO_PAD
        .decode(tag_b64)
        .map_err(|_| TokenFault::Forged)?;
    let mut mac = key.mac();
    mac.update(signed.as_bytes());
    mac.verify_slice(&tag).map_err(|_| TokenFault::Forged)?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| TokenFault::Forged)?;
    serde_json::from_slice(&payload).map_err(|_| TokenFault::Forged)
}

/// Seconds since `iat`, for `mfa_age_s`.
pub(crate) fn age_secs(claims: &Claims, now: SystemTime) -> u64 {
    unix_secs(now).saturating_sub(claims.iat)
}

/// Whether the token has expired at `now`.
pub(crate) fn is_expired(claims: &Claims, now: SystemTime) -> bool {
    unix_secs(now) >= claims.exp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    #[test]
    fn a_signed_token_verifies_and_carries_its_claims() {
        let key = TokenKey::generate();
        let tok = sign(
            &key,
            "spiffe://td/a",
            &[7; 32],
            now(),
            Duration::from_secs(300),
        );
        assert!(tok.value.starts_with(TOKEN_PREFIX));
        let claims = verify(&key, &tok.value).unwrap();
        assert_eq!(claims.id, "spiffe://td/a");
        assert_eq!(claims.cert_sha256, hex::encode([7u8; 32]));
        assert_eq!(claims.exp - claims.iat, 300);
        assert_eq!(tok.expires_at, now() + Duration::from_secs(300));
    }

    #[test]
    fn another_key_or_a_changed_byte_is_refused() {
        let key = TokenKey::generate();
        let tok = sign(
            &key,
            "spiffe://td/a",
            &[7; 32],
            now(),
            Duration::from_secs(300),
        );
        assert_eq!(
            verify(&TokenKey::generate(), &tok.value),
            Err(TokenFault::Forged)
        );
        // Swap the payload for one naming someone else, keeping the old tag.
        let (_, tag) = tok.value.rsplit_once('.').unwrap();
        let other = sign(
            &key,
            "spiffe://td/b",
            &[7; 32],
            now(),
            Duration::from_secs(300),
        );
        let (other_signed, _) = other.value.rsplit_once('.').unwrap();
        let forged = format!("{other_signed}.{tag}");
        assert_eq!(verify(&key, &forged), Err(TokenFault::Forged));
        for garbage in [
            "",
            "ewst1.",
            "ewst1..",
            "ewst1.a.b.c",
            "ewst2.x.y",
            "ewst1.!!!.???",
        ] {
            assert_eq!(
                verify(&key, garbage),
                Err(TokenFault::Forged),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn rfc3339_is_utc_seconds() {
        assert_eq!(rfc3339(now()), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn key_file_is_created_0600_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mfa/token.key");
        let a = TokenKey::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = TokenKey::load_or_create(&path).unwrap();
        assert_eq!(a.0, b.0);
    }

    #[test]
    fn key_file_readable_by_others_or_of_wrong_length_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        std::fs::write(&path, [1u8; 32]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = TokenKey::load_or_create(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::write(&path, [1u8; 31]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = TokenKey::load_or_create(&path).unwrap_err();
        assert!(err.to_string().contains("31 bytes"), "{err}");
    }
}
