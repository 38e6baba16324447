//! Behaviour of [`Verifier`]: what an operator typing codes or presenting tokens sees.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;

const CERT_A: [u8; 32] = [0xaa; 32];
const CERT_B: [u8; 32] = [0xbb; 32];

fn alice() -> SpiffeId {
    SpiffeId::parse("spiffe://corp.example/app/operators/alice").unwrap()
}
fn bob() -> SpiffeId {
    SpiffeId::parse("spiffe://corp.example/app/operators/bob").unwrap()
}
fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
fn t0() -> SystemTime {
    // The start of a step, so ±1 step arithmetic below stays inside known steps.
    UNIX_EPOCH + Duration::from_secs(1_700_000_010 / 30 * 30)
}

struct Fixture {
    verifier: Verifier,
    secrets: HashMap<SpiffeId, Vec<u8>>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new(max_failures: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mfa.json");
        let mut secrets = HashMap::new();
        for id in [alice(), bob()] {
            let e = SecretStore::enroll(&path, &id, false).unwrap();
            let bytes = totp_rs::Secret::Encoded(e.secret_b32).to_bytes().unwrap();
            secrets.insert(id, bytes);
        }
        let store = SecretStore::load(&path).unwrap();
        let verifier = Verifier::with_limits(
            store,
            TokenKey::generate(),
            Limits {
                max_age: Duration::from_secs(300),
                max_failures,
                failure_window: Duration::from_secs(600),
            },
        );
        Self {
            verifier,
            secrets,
            _dir: dir,
        }
    }

    fn code(&self, id: &SpiffeId, t: SystemTime) -> String {
        totp::current_code(&self.secrets[id], t).unwrap()
    }

    fn check(&self, id: &SpiffeId, answer: &str, t: SystemTime) -> MfaOutcome {
        self.verifier.check(id, &CERT_A, ip("10.0.0.1"), answer, t)
    }
}

const TOTP_OK: MfaOutcome = MfaOutcome::Accepted {
    method: "totp",
    mfa_age_s: 0,
};

fn rejected(reason: &'static str) -> MfaOutcome {
    MfaOutcome::Rejected { reason }
}

#[test]
fn the_current_code_is_accepted_once_then_refused_as_replayed() {
    let f = Fixture::new(20);
    let code = f.code(&alice(), t0());
    assert_eq!(f.check(&alice(), &code, t0()), TOTP_OK);
    assert_eq!(f.check(&alice(), &code, t0()), rejected("replayed_code"));
    // Still a replay a step later, while the code is inside the ±1 window.
    assert_eq!(
        f.check(&alice(), &code, t0() + Duration::from_secs(30)),
        rejected("replayed_code")
    );
    // The next step's code works.
    let next = t0() + Duration::from_secs(30);
    assert_eq!(f.check(&alice(), &f.code(&alice(), next), next), TOTP_OK);
}

#[test]
fn one_code_per_identity_other_identities_unaffected() {
    let f = Fixture::new(20);
    assert_eq!(f.check(&alice(), &f.code(&alice(), t0()), t0()), TOTP_OK);
    assert_eq!(f.check(&bob(), &f.code(&bob(), t0()), t0()), TOTP_OK);
}

#[test]
fn codes_one_step_off_are_accepted_two_steps_off_refused() {
    for (offset, ok) in [(-60i64, false), (-30, true), (30, true), (60, false)] {
        let f = Fixture::new(20);
        let shown = t0().checked_add(Duration::from_secs(offset.unsigned_abs()));
        let shown = if offset < 0 {
            t0() - Duration::from_secs(offset.unsigned_abs())
        } else {
            shown.unwrap()
        };
        let outcome = f.check(&alice(), &f.code(&alice(), shown), t0());
        assert_eq!(outcome.is_accepted(), ok, "offset {offset}s: {outcome:?}");
    }
}

#[test]
fn wrong_malformed_and_unenrolled_answers_are_refused() {
    let f = Fixture::new(20);
    let right = f.code(&alice(), t0());
    let wrong = format!("{:06}", (right.parse::<u32>().unwrap() + 1) % 1_000_000);
    assert_eq!(f.check(&alice(), &wrong, t0()), rejected("wrong_code"));
    assert_eq!(f.check(&alice(), "", t0()), rejected("wrong_code"));
    assert_eq!(
        f.check(&alice(), &format!("{right} "), t0()),
        rejected("wrong_code")
    );
    assert_eq!(
        f.check(&alice(), &"9".repeat(5000), t0()),
        rejected("wrong_code")
    );
    let carol = SpiffeId::parse("spiffe://corp.example/app/operators/carol").unwrap();
    assert_eq!(f.check(&carol, "123456", t0()), rejected("not_enrolled"));
    // None of that used up the right code.
    assert_eq!(f.check(&alice(), &right, t0()), TOTP_OK);
}

#[test]
fn twenty_wrong_codes_lock_the_identity_even_for_the_right_code() {
    let f = Fixture::new(20);
    let right = f.code(&alice(), t0());
    let wrong = format!("{:06}", (right.parse::<u32>().unwrap() + 1) % 1_000_000);
    for i in 1..20 {
        assert_eq!(
            f.check(&alice(), &wrong, t0()),
            rejected("wrong_code"),
            "try {i}"
        );
    }
    // The twentieth trips the lock (the proxy writes its alert line on `first`).
    assert_eq!(
        f.check(&alice(), &wrong, t0()),
        MfaOutcome::LockedOut { first: true }
    );
    assert_eq!(
        f.check(&alice(), &right, t0()),
        MfaOutcome::LockedOut { first: false }
    );
    // Another identity from the same address is unaffected.
    assert_eq!(f.check(&bob(), &f.code(&bob(), t0()), t0()), TOTP_OK);
}

#[test]
fn one_source_spraying_many_identities_is_locked_by_address() {
    // The sprayed identities are enrolled operators: only they have budgets to spend.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mfa.json");
    for id in [alice(), bob()] {
        SecretStore::enroll(&path, &id, false).unwrap();
    }
    for n in 0..20u32 {
        let id = SpiffeId::parse(&format!("spiffe://corp.example/app/operators/u{n}")).unwrap();
        SecretStore::enroll(&path, &id, false).unwrap();
    }
    let store = SecretStore::load(&path).unwrap();
    let f = Fixture {
        verifier: Verifier::with_limits(
            store,
            TokenKey::generate(),
            Limits {
                max_age: Duration::from_secs(300),
                max_failures: 2,
                failure_window: Duration::from_secs(600),
            },
        ),
        secrets: {
            // Re-read alice's new secret so `code` below matches this store.
            let text = std::fs::read_to_string(&path).unwrap();
            let json: serde_json::Value = serde_json::from_str(&text).unwrap();
            let mut secrets = HashMap::new();
            for id in [alice(), bob()] {
                let b32 = json[id.as_str()]["secret_b32"].as_str().unwrap().to_owned();
                secrets.insert(id, totp_rs::Secret::Encoded(b32).to_bytes().unwrap());
            }
            secrets
        },
        _dir: dir,
    };
    let mut locked_at = None;
    for n in 0..100u32 {
        let id = SpiffeId::parse(&format!("spiffe://corp.example/app/operators/u{n}")).unwrap();
        if let MfaOutcome::LockedOut { .. } =
            f.verifier
                .check(&id, &CERT_A, ip("10.9.9.9"), "000000", t0())
        {
            locked_at = Some(n);
            break;
        }
    }
    // u0..u9 are each one failure short of their own lock; the address budget (2 × 5) runs out.
    assert_eq!(locked_at, Some(9));
    let code = f.code(&alice(), t0());
    assert_eq!(
        f.verifier
            .check(&alice(), &CERT_A, ip("10.9.9.9"), &code, t0()),
        MfaOutcome::LockedOut { first: false }
    );
    assert_eq!(
        f.verifier
            .check(&alice(), &CERT_A, ip("10.0.0.2"), &code, t0()),
        TOTP_OK
    );
}

#[test]
fn an_administrator_unlock_clears_the_lock_and_its_escalation() {
    let f = Fixture::new(2);
    let path = f._dir.path().join("mfa.json");
    let right = f.code(&alice(), t0());
    let wrong = format!("{:06}", (right.parse::<u32>().unwrap() + 1) % 1_000_000);
    f.check(&alice(), &wrong, t0());
    assert_eq!(
        f.check(&alice(), &wrong, t0()),
        MfaOutcome::LockedOut { first: true }
    );
    assert_eq!(
        f.check(&alice(), &right, t0()),
        MfaOutcome::LockedOut { first: false }
    );
    // Re-reading an unchanged file changes nothing.
    f.verifier.replace_store(SecretStore::load(&path).unwrap());
    assert_eq!(
        f.check(&alice(), &right, t0()),
        MfaOutcome::LockedOut { first: false }
    );
    SecretStore::unlock(&path, &alice()).unwrap();
    f.verifier.replace_store(SecretStore::load(&path).unwrap());
    assert_eq!(f.check(&alice(), &right, t0()), TOTP_OK);
    assert!(matches!(
        SecretStore::unlock(&path, &SpiffeId::parse("spiffe://corp.example/x").unwrap()),
        Err(MfaError::NotEnrolled(_))
    ));
}

#[test]
fn identities_that_are_not_enrolled_spend_no_budget() {
    // The attack: any workload with a certificate (billing, a laptop) sends wrong codes from
    // the address an operator shares, to lock that address out.
    let f = Fixture::new(2);
    for n in 0..200u32 {
        let id = SpiffeId::parse(&format!("spiffe://corp.example/app/u{n}")).unwrap();
        assert_eq!(
            f.verifier
                .check(&id, &CERT_A, ip("10.9.9.9"), "000000", t0()),
            rejected("not_enrolled")
        );
    }
    let code = f.code(&alice(), t0());
    assert_eq!(
        f.verifier
            .check(&alice(), &CERT_A, ip("10.9.9.9"), &code, t0()),
        TOTP_OK
    );
}

#[test]
fn a_token_admits_its_identity_and_certificate_until_it_expires() {
    let f = Fixture::new(20);
    let tok = f.verifier.issue_token(&alice(), &CERT_A, t0());
    assert_eq!(tok.expires_at, t0() + Duration::from_secs(300));
    let later = t0() + Duration::from_secs(120);
    for _ in 0..4 {
        // Reusable: pg_dump -j 4 opens several connections with the same password.
        assert_eq!(
            f.check(&alice(), &tok.value, later),
            MfaOutcome::Accepted {
                method: "token",
                mfa_age_s: 120
            }
        );
    }
    let expired = t0() + Duration::from_secs(300);
    assert_eq!(
        f.check(&alice(), &tok.value, expired),
        rejected("expired_token")
    );
}

#[test]
fn a_lower_max_age_shortens_tokens_already_issued() {
    let f = Fixture::new(20);
    let tok = f.verifier.issue_token(&alice(), &CERT_A, t0());
    let store = f.verifier.store.read().unwrap().clone();
    let stricter = Verifier::with_limits(
        store,
        f.verifier.key.clone(),
        Limits {
            max_age: Duration::from_secs(60),
            max_failures: 20,
            failure_window: Duration::from_secs(600),
        },
    );
    let at = |s| t0() + Duration::from_secs(s);
    let check = |t| stricter.check(&alice(), &CERT_A, ip("10.0.0.1"), &tok.value, t);
    assert!(check(at(59)).is_accepted());
    assert_eq!(check(at(60)), rejected("expired_token"));
}

#[test]
fn a_token_with_another_certificate_or_identity_is_refused() {
    let f = Fixture::new(20);
    let tok = f.verifier.issue_token(&alice(), &CERT_A, t0());
    assert_eq!(
        f.verifier
            .check(&alice(), &CERT_B, ip("10.0.0.1"), &tok.value, t0()),
        rejected("token_other_cert")
    );
    assert_eq!(f.check(&bob(), &tok.value, t0()), rejected("bad_token"));
}

#[test]
fn a_tampered_or_foreign_token_is_refused() {
    let f = Fixture::new(20);
    let tok = f.verifier.issue_token(&alice(), &CERT_A, t0());
    let mut bytes = tok.value.clone().into_bytes();
    let mid = bytes.len() / 2;
    bytes[mid] = if bytes[mid] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(bytes).unwrap();
    assert_eq!(f.check(&alice(), &tampered, t0()), rejected("bad_token"));
    let other = Fixture::new(20);
    let foreign = other.verifier.issue_token(&alice(), &CERT_A, t0());
    assert_eq!(
        f.check(&alice(), &foreign.value, t0()),
        rejected("bad_token")
    );
    assert_eq!(f.check(&alice(), "ewst1.", t0()), rejected("bad_token"));
}

#[test]
fn the_code_only_check_refuses_tokens() {
    let f = Fixture::new(20);
    let tok = f.verifier.issue_token(&alice(), &CERT_A, t0());
    assert_eq!(
        f.verifier
            .check_code(&alice(), ip("10.0.0.1"), &tok.value, t0()),
        rejected("wrong_code")
    );
    let code = f.code(&alice(), t0());
    assert_eq!(
        f.verifier.check_code(&alice(), ip("10.0.0.1"), &code, t0()),
        TOTP_OK
    );
}

#[test]
fn retain_recent_keeps_the_replay_cache_bounded_but_correct() {
    let f = Fixture::new(20);
    let now = SystemTime::now();
    let code = f.code(&alice(), now);
    assert_eq!(f.check(&alice(), &code, now), TOTP_OK);
    f.verifier.retain_recent();
    // A code still inside the window stays a replay after cleanup.
    assert_eq!(f.check(&alice(), &code, now), rejected("replayed_code"));
}

#[test]
fn replacing_the_store_enrolls_and_removes_without_a_restart() {
    let f = Fixture::new(20);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mfa.json");
    std::fs::write(&path, "{}").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    f.verifier.replace_store(SecretStore::load(&path).unwrap());
    assert_eq!(
        f.check(&alice(), &f.code(&alice(), t0()), t0()),
        rejected("not_enrolled")
    );
}
