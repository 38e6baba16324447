//! Step-up MFA for human operators: TOTP secrets, answer checks, step-up tokens, failure limits.
//!
//! The proxy asks an operator for a password only after TLS, a valid SVID and a policy that
//! allows them but wants MFA; what they type goes to [`Verifier::check`]. One `Verifier` is
//! shared by every connection and by the HTTPS step-up endpoint, so rate limits and the
//! replay cache cover both paths.
//!
//! # Layout
//! - [`store`]: the secrets file (enrol, list, remove).
//! - [`totp`]: RFC 6238 codes.
//! - [`token`]: step-up tokens and the key that signs them.
//! - `limiter`: failure budgets per identity and per source address.

mod limiter;
pub mod store;
pub mod token;
pub mod totp;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use eastwall_ca::SpiffeId;
use subtle::ConstantTimeEq;

pub(crate) use limiter::source_key;
use limiter::{Charge, FailureLimiter};
pub use store::{otpauth_uri, Enrollment, SecretStore};
pub use token::{StepUpToken, TokenKey, TOKEN_PREFIX};

/// One source address may spend this many identities' worth of failures: enough for a shared
/// bastion host with several operators, too few to spray guesses across every identity.
pub const SOURCE_BUDGET_FACTOR: u32 = 5;

/// Why an MFA file could not be used. Each message names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum MfaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is readable or writable by group or others (mode {mode:03o}); it holds secrets: run `chmod 600 {path}`")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{path}: not a valid MFA secrets file: {reason}")]
    BadSecretsFile { path: PathBuf, reason: String },
    #[error("{path}: a token key is exactly 32 bytes, this file has {len} bytes; delete it to have a new key made (outstanding step-up tokens stop working)")]
    BadTokenKey { path: PathBuf, len: usize },
    #[error("{0} is already enrolled; pass --force to replace its secret (its current authenticator entry stops working)")]
    AlreadyEnrolled(SpiffeId),
    #[error("{0} is not enrolled for MFA")]
    NotEnrolled(SpiffeId),
}

/// The verdict on one MFA answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MfaOutcome {
    /// Admit. `method` is `"totp"` or `"token"`; `mfa_age_s` is how long ago the TOTP check
    /// behind it happened (0 for a code typed now).
    Accepted {
        method: &'static str,
        mfa_age_s: u64,
    },
    /// Refuse (FATAL 28P01). `reason`: `wrong_code`, `replayed_code`, `not_enrolled`,
    /// `bad_token`, `expired_token`, `token_other_cert`.
    Rejected { reason: &'static str },
    /// Refuse without looking at the answer: this identity or source spent its failure budget.
    /// `first` is true for the failure that started a lock (the first, or a longer one when
    /// the key trips again within a day); the proxy writes an alert then.
    LockedOut { first: bool },
}

impl MfaOutcome {
    /// Whether the client is admitted.
    pub fn is_accepted(&self) -> bool {
        matches!(self, Self::Accepted { .. })
    }

    /// A short word for logs: `accepted`, the rejection reason, or `locked_out`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Accepted { .. } => "accepted",
            Self::Rejected { reason } => reason,
            Self::LockedOut { .. } => "locked_out",
        }
    }

    /// `mfa_age_s` for the decision line, when the answer was accepted.
    pub fn mfa_age_s(&self) -> Option<u64> {
        match self {
            Self::Accepted { mfa_age_s, .. } => Some(*mfa_age_s),
            _ => None,
        }
    }
}

/// The numbers a [`Verifier`] works with (from `[mfa]` in the sidecar settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// How long a step-up token admits after the TOTP check behind it.
    pub max_age: Duration,
    /// Failures an identity may make within `failure_window` before it is locked out.
    pub max_failures: u32,
    pub failure_window: Duration,
}

impl From<&eastwall_config::MfaSettings> for Limits {
    fn from(s: &eastwall_config::MfaSettings) -> Self {
        Self {
            max_age: s.max_age,
            max_failures: s.max_failures,
            failure_window: s.failure_window,
        }
    }
}

/// The longest answer we look at; a longer password is refused unread.
const MAX_ANSWER_LEN: usize = token::MAX_TOKEN_LEN;

/// Checks MFA answers. Shared (`Arc`) by all connections and the step-up endpoint.
pub struct Verifier {
    store: RwLock<SecretStore>,
    key: TokenKey,
    max_age: Duration,
    by_id: FailureLimiter<SpiffeId>,
    by_source: FailureLimiter<IpAddr>,
    /// The last time step whose code each identity used: a code for that step or an earlier
    /// one is a replay. One entry per identity that logged in recently.
    last_step: Mutex<HashMap<SpiffeId, u64>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier over `store`, signing tokens with `token_key`, with the limits in `settings`.
    pub fn new(
        store: SecretStore,
        token_key: TokenKey,
        settings: &eastwall_config::MfaSettings,
    ) -> Self {
        Self::with_limits(store, token_key, Limits::from(settings))
    }

    /// As [`Verifier::new`], from bare numbers.
    pub fn with_limits(store: SecretStore, token_key: TokenKey, limits: Limits) -> Self {
        let max_failures = limits.max_failures.max(1);
        Self {
            store: RwLock::new(store),
            key: token_key,
            max_age: limits.max_age,
            by_id: FailureLimiter::new(max_failures, limits.failure_window),
            by_source: FailureLimiter::new(
                max_failures.saturating_mul(SOURCE_BUDGET_FACTOR),
                limits.failure_window,
            ),
            last_step: Mutex::new(HashMap::new()),
        }
    }

    /// Swaps in a re-read secrets file (after `eastwall mfa enroll` or `remove`), keeping
    /// limits and the replay cache.
    /// An identity an administrator unlocked (`eastwall mfa unlock`) or re-enrolled since the
    /// last read starts again with a full budget and no lock.
    pub fn replace_store(&self, store: SecretStore) {
        let mut current = self.store.write().unwrap_or_else(|e| e.into_inner());
        for id in current.reset_between(&store) {
            tracing::info!(spiffe_id = %id, "MFA lockout cleared by an administrator");
            self.by_id.clear(&id);
        }
        *current = store;
    }

    /// Whether `id` has a TOTP secret enrolled.
    pub fn is_enrolled(&self, id: &SpiffeId) -> bool {
        self.store
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .secret(id)
            .is_some()
    }

    /// Checks what a client typed at the password prompt: a 6-digit TOTP code or a step-up
    /// token. Locked identities and sources are refused before the answer is looked at.
    pub fn check(
        &self,
        id: &SpiffeId,
        cert_sha256: &[u8; 32],
        source: IpAddr,
        answer: &str,
        now: SystemTime,
    ) -> MfaOutcome {
        self.limited(id, source, || {
            if answer.starts_with(TOKEN_PREFIX) {
                self.verify_token(id, cert_sha256, answer, now)
            } else {
                self.verify_code(id, answer, now)
            }
        })
    }

    /// Checks a TOTP code only (the step-up endpoint: a token must not buy a fresh token).
    pub fn check_code(
        &self,
        id: &SpiffeId,
        source: IpAddr,
        code: &str,
        now: SystemTime,
    ) -> MfaOutcome {
        self.limited(id, source, || self.verify_code(id, code, now))
    }

    /// How much longer `id` or `source` (whichever is longer) stays locked out, if at all.
    pub fn locked_for(&self, id: &SpiffeId, source: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let by_id = self.by_id.locked_for(id, now);
        let by_source = self.by_source.locked_for(&source_key(source), now);
        by_id.max(by_source)
    }

    /// Signs a step-up token for `id` and the certificate it presented, valid for `max_age`.
    /// Call only after an accepted TOTP code.
    pub fn issue_token(
        &self,
        id: &SpiffeId,
        cert_sha256: &[u8; 32],
        now: SystemTime,
    ) -> StepUpToken {
        token::sign(&self.key, id.as_str(), cert_sha256, now, self.max_age)
    }

    /// Forgets limiter and replay state that can no longer change a decision. Call on an
    /// interval (every few seconds) so memory stays bounded under a flood of sources.
    pub fn retain_recent(&self) {
        let now = Instant::now();
        self.by_id.retain_recent(now);
        self.by_source.retain_recent(now);
        if let Some(current) = totp::step_at(SystemTime::now()) {
            let oldest_useful = current.saturating_sub(totp::SKEW_STEPS);
            self.replay_cache().retain(|_, step| *step >= oldest_useful);
        }
    }

    /// Runs [`Verifier::retain_recent`] every `every`, forever; spawn it next to the listener.
    pub async fn run_housekeeping(self: std::sync::Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.retain_recent();
        }
    }

    fn replay_cache(&self) -> std::sync::MutexGuard<'_, HashMap<SpiffeId, u64>> {
        self.last_step.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses locked keys, runs `verify`, and charges both budgets when it fails.
    fn limited(
        &self,
        id: &SpiffeId,
        source: IpAddr,
        verify: impl FnOnce() -> MfaOutcome,
    ) -> MfaOutcome {
        let source = source_key(source);
        let mono = Instant::now();
        if self.by_id.is_locked(id, mono) || self.by_source.is_locked(&source, mono) {
            return MfaOutcome::LockedOut { first: false };
        }
        let outcome = verify();
        // Nothing to guess for an identity with no secret: charging it would only let anyone
        // spend the budget of the address an operator shares.
        if outcome.is_accepted()
            || outcome
                == (MfaOutcome::Rejected {
                    reason: "not_enrolled",
                })
        {
            return outcome;
        }
        let id_charge = self.by_id.charge(id, mono);
        let source_charge = self.by_source.charge(&source, mono);
        match (id_charge, source_charge) {
            (Charge::Tripped { first: a }, Charge::Tripped { first: b }) => {
                MfaOutcome::LockedOut { first: a || b }
            }
            (Charge::Tripped { first }, _) | (_, Charge::Tripped { first }) => {
                MfaOutcome::LockedOut { first }
            }
            _ => outcome,
        }
    }

    fn verify_code(&self, id: &SpiffeId, answer: &str, now: SystemTime) -> MfaOutcome {
        let store = self.store.read().unwrap_or_else(|e| e.into_inner());
        let Some(secret) = store.secret(id) else {
            return MfaOutcome::Rejected {
                reason: "not_enrolled",
            };
        };
        if !totp::is_code_shaped(answer) {
            return MfaOutcome::Rejected {
                reason: "wrong_code",
            };
        }
        let matched = totp::matching_steps(secret, answer, now);
        let Some(&step) = matched.iter().max() else {
            return MfaOutcome::Rejected {
                reason: "wrong_code",
            };
        };
        // Check and record under one lock: two connections racing with the same code must
        // not both get in.
        let mut used = self.replay_cache();
        if used.get(id).is_some_and(|last| step <= *last) {
            return MfaOutcome::Rejected {
                reason: "replayed_code",
            };
        }
        used.insert(id.clone(), step);
        MfaOutcome::Accepted {
            method: "totp",
            mfa_age_s: 0,
        }
    }

    fn verify_token(
        &self,
        id: &SpiffeId,
        cert_sha256: &[u8; 32],
        answer: &str,
        now: SystemTime,
    ) -> MfaOutcome {
        if answer.len() > MAX_ANSWER_LEN {
            return MfaOutcome::Rejected {
                reason: "bad_token",
            };
        }
        let Ok(claims) = token::verify(&self.key, answer) else {
            return MfaOutcome::Rejected {
                reason: "bad_token",
            };
        };
        if !bool::from(claims.id.as_bytes().ct_eq(id.as_str().as_bytes())) {
            return MfaOutcome::Rejected {
                reason: "bad_token",
            };
        }
        let want = hex::encode(cert_sha256);
        if !bool::from(claims.cert_sha256.as_bytes().ct_eq(want.as_bytes())) {
            return MfaOutcome::Rejected {
                reason: "token_other_cert",
            };
        }
        // Also bound by today's max_age, so lowering it in the config shortens tokens already
        // handed out.
        if token::is_expired(&claims, now)
            || token::age_secs(&claims, now) >= self.max_age.as_secs()
        {
            return MfaOutcome::Rejected {
                reason: "expired_token",
            };
        }
        MfaOutcome::Accepted {
            method: "token",
            mfa_age_s: token::age_secs(&claims, now),
        }
    }
}

#[cfg(test)]
mod tests;
