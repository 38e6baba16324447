//! RFC 6238 TOTP as every authenticator app reads it: HMAC-SHA-1, 30-second steps, 6 digits.

use std::time::{SystemTime, UNIX_EPOCH};

use subtle::ConstantTimeEq;
use totp_rs::{Algorithm, TOTP};

/// Length of one TOTP time step, in seconds.
pub const STEP_SECS: u64 = 30;
/// Digits in a code.
pub const DIGITS: usize = 6;
/// Steps either side of the current one still accepted, for clock drift and typing time.
pub const SKEW_STEPS: u64 = 1;
/// Bytes of a freshly generated secret: 160 bits, as RFC 4226 §4 recommends.
pub const SECRET_LEN: usize = 20;

/// The time step `t` falls in, or `None` for a clock before 1970 (nothing is accepted then).
pub fn step_at(t: SystemTime) -> Option<u64> {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs() / STEP_SECS)
}

/// The code for `secret` at time step `step`, with `digits` digits.
pub(crate) fn code_for_step(secret: &[u8], step: u64, digits: usize) -> String {
    // The issuer and account name only matter for otpauth URIs, which we build ourselves.
    let totp = TOTP::new_unchecked(
        Algorithm::SHA1,
        digits,
        0,
        STEP_SECS,
        secret.to_vec(),
        None,
        String::new(),
    );
    totp.generate(step.saturating_mul(STEP_SECS))
}

/// The 6-digit code for `secret` at time `t`: what an authenticator app shows.
pub fn current_code(secret: &[u8], t: SystemTime) -> Option<String> {
    step_at(t).map(|step| code_for_step(secret, step, DIGITS))
}

/// The 6-digit code at time `t` for a base32 secret as enrollment prints it (the demo plays
/// the operator's authenticator app with this).
pub fn code_from_base32(secret_b32: &str, t: SystemTime) -> Option<String> {
    let secret = totp_rs::Secret::Encoded(secret_b32.trim().to_owned())
        .to_bytes()
        .ok()?;
    current_code(&secret, t)
}

/// Every step within ±[`SKEW_STEPS`] of `now` whose code equals `answer`.
///
/// All candidates are computed and compared in constant time, so how long this takes says
/// nothing about how close a guess was.
pub(crate) fn matching_steps(secret: &[u8], answer: &str, now: SystemTime) -> Vec<u64> {
    let Some(current) = step_at(now) else {
        return Vec::new();
    };
    let first = current.saturating_sub(SKEW_STEPS);
    let last = current.saturating_add(SKEW_STEPS);
    let mut matched = Vec::new();
    for step in first..=last {
        let expected = code_for_step(secret, step, DIGITS);
        if bool::from(expected.as_bytes().ct_eq(answer.as_bytes())) {
            matched.push(step);
        }
    }
    matched
}

/// Whether `answer` looks like a TOTP code at all (exactly six ASCII digits).
pub(crate) fn is_code_shaped(answer: &str) -> bool {
    answer.len() == DIGITS && answer.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const RFC_SECRET: &[u8] = b"12345678901234567890";

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn rfc6238_sha1_test_vectors_match() {
        // RFC 6238 Appendix B, SHA-1 column (8 digits).
        let vectors: [(u64, &str); 6] = [
            (59, "94287082"),
            (1_111_111_109, "07081804"),
            (1_111_111_111, "14050471"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
            (20_000_000_000, "65353130"),
        ];
        for (secs, want) in vectors {
            assert_eq!(
                code_for_step(RFC_SECRET, secs / STEP_SECS, 8),
                want,
                "t={secs}"
            );
            // The 6-digit code an app shows is the same number mod 10^6.
            assert_eq!(
                current_code(RFC_SECRET, at(secs)).unwrap(),
                want[2..],
                "t={secs}"
            );
        }
    }

    #[test]
    fn codes_one_step_away_match_and_two_steps_away_do_not() {
        let now = at(1_234_567_890);
        let step = step_at(now).unwrap();
        for (offset, accepted) in [(-2i64, false), (-1, true), (0, true), (1, true), (2, false)] {
            let s = step.checked_add_signed(offset).unwrap();
            let code = code_for_step(RFC_SECRET, s, DIGITS);
            let matched = matching_steps(RFC_SECRET, &code, now);
            assert_eq!(matched.contains(&s), accepted, "offset {offset}");
        }
    }

    #[test]
    fn a_clock_before_1970_accepts_nothing() {
        let before = UNIX_EPOCH - Duration::from_secs(5);
        assert!(matching_steps(RFC_SECRET, "000000", before).is_empty());
    }

    #[test]
    fn only_six_digits_are_code_shaped() {
        assert!(is_code_shaped("012345"));
        assert!(!is_code_shaped("12345"));
        assert!(!is_code_shaped("1234567"));
        assert!(!is_code_shaped("12345a"));
        assert!(!is_code_shaped("１２３４５６"));
    }
}
