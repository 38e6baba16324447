//! Hostile input: odd lines, absurd timestamps and a clock that runs backwards judge nothing wrongly and never panic.

mod common;

use common::*;
use eastwall_detect::{Detectors, Event, Settings, Span};
use serde_json::{json, Value};

#[test]
fn time_going_backwards_neither_panics_nor_rewinds_the_windows() {
    let mut sim = Sim::new();
    let e = Estate::new();
    sim.feed(e.day(0));
    let clock = sim.d.state().clock;
    // A line from a week earlier, and one from the far past: judged at the current clock.
    sim.feed([
        connect(t(-7, 3, 0), &e.billing_a, "billing", "billing", true),
        connect(t(-3000, 3, 0), &e.inventory, "inventory", "inventory", true),
    ]);
    assert_eq!(sim.d.state().clock, clock, "the clock never goes back");
    // A long jump forward and back again.
    sim.feed([
        connect(t(3000, 0, 0), &e.billing_a, "billing", "billing", true),
        connect(t(1, 0, 0), &e.billing_a, "billing", "billing", true),
    ]);
    assert_eq!(sim.d.state().clock, t(3000, 0, 0));
}

#[test]
fn absurd_timestamps_are_not_events() {
    let mut d = Detectors::new(Settings::default()).unwrap();
    let w = who("app/billing", "b1", "10.1.0.5");
    for ts in [
        "9999-12-31T23:59:59Z",
        "0001-01-01T00:00:00Z",
        "2025-01-06T25:00:00Z",
        "2025-01-06",
        "",
        "yesterday",
    ] {
        let mut l = connect(t(0, 0, 0), &w, "billing", "billing", true);
        l["ts"] = json!(ts);
        assert!(Event::from_log_line(&l).is_none(), "{ts}");
        assert!(d.observe_line(&l).is_empty());
    }
    assert_eq!(
        d.state().started,
        None,
        "no absurd line started the learning period"
    );
}

/// A deterministic scramble of real lines: fields removed, retyped, lengthened.
#[test]
fn scrambled_lines_never_panic() {
    let e = Estate::new();
    let mut d = Detectors::new(Settings {
        learning: Span::secs(0),
        ..Settings::default()
    })
    .unwrap();
    let odd: [Value; 9] = [
        Value::Null,
        json!(true),
        json!(-1),
        json!(1e300),
        json!(""),
        json!("x".repeat(5000)),
        json!([1, "a"]),
        json!({"a": {"b": 1}}),
        json!("[::1]:99999"),
    ];
    let keys = [
        "ts",
        "event",
        "decision",
        "peer",
        "spiffe_id",
        "cert_serial",
        "db_user",
        "database",
        "reason",
        "mfa",
        "superuser",
        "cert_reuse",
        "reasons",
        "source",
    ];
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let base = e.day(0);
    for round in 0..20_000 {
        let mut l = base[round % base.len()].clone();
        for _ in 0..(next() % 4) {
            let key = keys[(next() % keys.len() as u64) as usize];
            match next() % 3 {
                0 => {
                    l.as_object_mut().unwrap().remove(key);
                }
                _ => l[key] = odd[(next() % odd.len() as u64) as usize].clone(),
            }
        }
        if next() % 50 == 0 {
            let kinds = [
                "mfa_failure",
                "mfa_lockout",
                "stepup",
                "refusals_summary",
                "session_end",
            ];
            l["event"] = json!(kinds[(next() % 5) as usize]);
        }
        d.observe_line(&l);
    }
    assert!(d.state().largest_table() <= d.settings().max_keys);
}

/// An attacker with no certificate types `user=postgres` from three addresses, or presents a
/// self-made expired certificate once: neither may raise a signal (with `lock_on`, a lock)
/// nor hold the real signal's de-duplication slot.
#[test]
fn unauthenticated_lines_raise_no_role_signal_and_one_expired_certificate_is_no_pattern() {
    let mut sim = Sim::new();
    for (i, ip) in ["10.9.0.1", "10.9.0.2", "10.9.0.3", "10.9.0.4"]
        .iter()
        .enumerate()
    {
        let mut l = refused(t(0, 3, i as i64), ip, "no_tls");
        l["db_user"] = serde_json::json!("postgres");
        l["database"] = serde_json::json!("postgres");
        sim.feed([l]);
    }
    sim.feed([refused(t(0, 3, 10), "10.9.0.9", "expired")]);
    assert!(sim.signals.is_empty(), "{:#?}", sim.signals);
    // The real pattern is still seen: three proven identities on postgres within the hour.
    for (i, id) in ["app/a", "app/b", "app/c"].iter().enumerate() {
        let w = who(id, &format!("s{i}"), &format!("10.1.0.{i}"));
        sim.feed([connect(
            t(0, 3, 20 + i as i64),
            &w,
            "postgres",
            "postgres",
            false,
        )]);
    }
    assert_eq!(sim.named("shared_admin").len(), 1, "{:#?}", sim.signals);
    // Expired certificates from one address, repeatedly: that is a pattern.
    for i in 0..5 {
        sim.feed([refused(t(0, 4, i), "10.9.0.9", "expired")]);
    }
    assert!(
        sim.signals.iter().any(|s| s.kind == "expired_cert_retry"),
        "{:#?}",
        sim.signals
    );
}
