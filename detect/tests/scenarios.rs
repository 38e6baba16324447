//! The seed's story replayed over a learned estate, a benign week that must stay silent, and state that survives a restart.

mod common;

use common::*;
use eastwall_detect::{Detectors, Settings, Signal};
use serde_json::{json, Value};

const LAPTOP_IP: &str = "10.3.0.42";

/// Eight benign days, then the night of the seed's story (day 8 is a Tuesday).
fn attack_lines(e: &Estate) -> Vec<Value> {
    let laptop = who("workstations/finance-laptop", "l1", LAPTOP_IP);
    // The attacker's copies of billing's and alice's certificates and keys, used from the laptop.
    let stolen_billing = Who {
        ip: LAPTOP_IP.into(),
        ..e.billing_a.clone()
    };
    let stolen_alice = Who {
        ip: LAPTOP_IP.into(),
        ..e.alice.clone()
    };
    let d = 8;
    let mut l = vec![
        // Billing's own host holds a session through the night.
        connect(t(d, 2, 0), &e.billing_a, "billing", "billing", true),
        // 02:13: the phished laptop tries the database directly; policy refuses it.
        connect(t(d, 2, 13), &laptop, "billing", "billing", false),
        connect(t(d, 2, 14), &laptop, "postgres", "postgres", false),
        // 02:20: billing's certificate from the laptop's address, while billing is connected.
        connect(t(d, 2, 20), &stolen_billing, "billing", "billing", true),
    ];
    // 02:21..: a walk over databases and roles, mostly refused.
    let walk = [
        ("hr", "billing"),
        ("payroll", "billing"),
        ("crm", "billing"),
        ("ledger", "billing"),
        ("inventory", "billing"),
        ("billing", "postgres"),
        ("billing", "admin"),
        ("billing", "reports_ro"),
    ];
    for (i, (db, role)) in walk.iter().enumerate() {
        l.push(connect(
            t(d, 2, 21 + i as i64),
            &stolen_billing,
            db,
            role,
            false,
        ));
    }
    // 02:31..: alice's MFA brute-forced from the laptop, until the sidecar locks it out.
    for i in 0..5 {
        l.push(mfa(
            t(d, 2, 31 + i),
            &stolen_alice,
            "mfa_failure",
            "mfa_wrong_code",
            "billing",
            "postgres",
        ));
    }
    l.push(mfa(
        t(d, 2, 36),
        &stolen_alice,
        "mfa_lockout",
        "mfa_locked_out",
        "billing",
        "postgres",
    ));
    // 03:05: billing's certificate was revoked at 03:00; the attacker tries it again.
    l.push(refused(t(d, 3, 5), LAPTOP_IP, "revoked"));
    l.push(end(t(d, 3, 30), &e.billing_a, "billing", "billing"));
    l
}

fn one<'a>(sim: &'a Sim, name: &str, kind: &str, subject: &str) -> &'a Signal {
    sim.signals
        .iter()
        .find(|s| s.name.as_str() == name && s.kind == kind && s.subject == subject)
        .unwrap_or_else(|| panic!("no {name}/{kind} about {subject}; got {:#?}", sim.signals))
}

#[test]
fn the_seed_attack_raises_each_of_the_five_signals_with_its_evidence() {
    let e = Estate::new();
    let mut sim = Sim::new();
    for day in 0..8 {
        sim.feed(e.day(day));
    }
    assert!(
        sim.signals.is_empty(),
        "benign learning raised {:#?}",
        sim.signals
    );
    sim.feed(attack_lines(&e));
    let laptop_id = "spiffe://corp.example/workstations/finance-laptop";
    let billing = "spiffe://corp.example/app/billing";
    let alice = "spiffe://corp.example/app/operators/alice";

    // Host-to-host auth: a workstation that never spoke to the database, and billing from it.
    let s = one(&sim, "new_flow", "new_identity", laptop_id);
    assert_eq!(s.evidence.sources, [LAPTOP_IP]);
    assert_eq!(s.evidence.counts["denied"], 1);
    assert_eq!(s.time.to_string(), "2025-01-14T02:13:00.000Z");
    let s = one(&sim, "new_flow", "new_source", billing);
    assert_eq!(s.evidence.sources, [LAPTOP_IP]);
    one(&sim, "new_flow", "new_source", alice);

    // Local admin reuse: three identities on postgres within the hour.
    let s = one(&sim, "shared_admin", "several_identities", "postgres");
    assert_eq!(s.evidence.identities, [billing, alice, laptop_id]);
    assert_eq!(s.evidence.counts["identities"], 3);

    // Odd hours: alice, who works 09:30-15:00, at 02:31.
    let s = one(&sim, "odd_hour", "outside_learned_hours", alice);
    assert_eq!(s.evidence.counts["hour_utc"], 2);
    assert_eq!(s.evidence.sources, [LAPTOP_IP]);

    // Credential anomalies: billing's certificate from two places at once; alice's code
    // brute-forced; the revoked certificate tried again.
    let s = one(
        &sim,
        "credential_anomaly",
        "cert_two_sources",
        "certificate b1",
    );
    assert_eq!(s.evidence.sources, ["10.1.0.5", LAPTOP_IP]);
    assert_eq!(s.evidence.identities, [billing]);
    let s = one(&sim, "credential_anomaly", "mfa_brute_force", alice);
    assert_eq!(s.evidence.counts["failures"], 5);
    assert_eq!(s.evidence.sources, [LAPTOP_IP]);
    let s = one(
        &sim,
        "credential_anomaly",
        "revoked_cert_retry",
        &format!("source {LAPTOP_IP}"),
    );
    assert_eq!(s.evidence.counts["attempts"], 1);

    // Fan-out: the walk, from the laptop's address and as billing.
    let s = one(
        &sim,
        "fan_out",
        "distinct_databases",
        &format!("source {LAPTOP_IP}"),
    );
    for db in ["hr", "payroll", "crm"] {
        assert!(s.evidence.targets.iter().any(|t| t == db), "{s:#?}");
    }
    assert!(s.evidence.identities.contains(&billing.to_owned()));
    let window = s.evidence.window.unwrap();
    assert!(window.seconds <= 10 * 60, "{window:?}");
    one(&sim, "fan_out", "distinct_databases", billing);

    // One ongoing pattern, one line: the walk is eight attempts, but one fan-out per subject.
    let fan_outs = sim.named("fan_out");
    assert_eq!(fan_outs.len(), 2, "{fan_outs:#?}");
    // Nobody innocent is named.
    for s in &sim.signals {
        let text = serde_json::to_string(s).unwrap();
        for innocent in [
            "operators/bob",
            "app/inventory",
            "app/reports",
            "10.1.0.6",
            "10.1.0.7",
        ] {
            assert!(!text.contains(innocent), "{text}");
        }
    }
    // The JSON a `signal` line will carry.
    let json = one(&sim, "fan_out", "distinct_databases", billing).to_json();
    assert_eq!(json["signal"], "fan_out");
    assert!(json["window"]["from"].as_str().unwrap().ends_with('Z'));
    assert!(json["counts"]["databases"].as_u64().unwrap() >= 5);
}

#[test]
fn a_benign_fortnight_with_a_rotation_and_a_late_evening_raises_no_signal() {
    let mut e = Estate::new();
    let mut sim = Sim::new();
    for day in 0..14 {
        if day == 9 {
            // Wednesday's deploy re-issues every certificate.
            e.rotate(1);
        }
        let mut lines = e.day(day);
        if day == 10 {
            // Thursday: alice works late once, inside the change window (ends 19:00).
            lines.extend(
                e.operator_session(&e.alice, "billing", day, 18, 0)
                    .into_iter()
                    .map(|(_, l)| l),
            );
            // Bob mistypes his code once before getting it right.
            lines.push(stepup(t(day, 18, 30), &e.bob, false));
            lines.extend(
                e.operator_session(&e.bob, "inventory", day, 18, 31)
                    .into_iter()
                    .map(|(_, l)| l),
            );
        }
        // In time order, as the sidecar writes them (RFC 3339 in one format sorts as text).
        lines.sort_by(|a, b| a["ts"].as_str().cmp(&b["ts"].as_str()));
        sim.feed(lines);
    }
    assert!(sim.signals.is_empty(), "{:#?}", sim.signals);
    assert!(sim.d.state().profiles.len() >= 5);
}

#[test]
fn state_round_trips_and_detection_continues_identically() {
    let e = Estate::new();
    let mut lines = Vec::new();
    for day in 0..8 {
        lines.extend(e.day(day));
    }
    lines.extend(attack_lines(&e));
    // Cut in the middle of the attack: windows, open sessions and suppressions are live.
    let cut = lines.len() - 10;

    let mut straight = Sim::new();
    straight.feed(lines[..cut].iter().cloned());
    let saved = straight.d.save();
    let before = straight.signals.len();
    straight.feed(lines[cut..].iter().cloned());

    let mut resumed = Sim {
        d: Detectors::restore(Settings::default(), &saved).unwrap(),
        signals: Vec::new(),
    };
    resumed.feed(lines[cut..].iter().cloned());
    assert_eq!(resumed.signals, straight.signals[before..]);
    assert!(
        !resumed.signals.is_empty(),
        "the cut should leave signals to find"
    );
    assert_eq!(resumed.d.save(), straight.d.save());
    assert!(
        saved.starts_with(r#"{"format":"eastwall-detect-state","version":1,"#),
        "{}",
        &saved[..80]
    );
}

#[test]
fn garbage_foreign_and_newer_state_is_an_error_not_a_panic() {
    let mut sim = Sim::new();
    sim.feed(Estate::new().day(0));
    let good = sim.d.save();
    let foreign = good.replacen("eastwall-detect-state", "something-else", 1);
    let newer = good.replacen(r#""version":1"#, r#""version":2"#, 1);
    let bent = good.replacen(r#""clock":"#, r#""clock":"x","was":"#, 1);
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "not readable"),
        ("{".into(), "not readable"),
        ("[]".into(), "not readable"),
        ("null".into(), "not readable"),
        (r#"{"version":1}"#.into(), "not an Eastwall detector state"),
        (foreign, "not an Eastwall detector state"),
        (newer, "version 2"),
        (good[..good.len() / 2].to_owned(), "not readable"),
        (bent, "not readable"),
        (
            good.replacen(r#""profiles":["#, r#""profiles":[7,"#, 1),
            "not readable",
        ),
        (with(&good, "clock", json!(-5)), "implausible"),
        (with(&good, "clock", json!("soon")), "not readable"),
        (with(&good, "fired", json!({"a": 1})), "not readable"),
        // Past the year limit, or before its own start: not a state this build wrote.
        (
            with(&good, "clock", json!(99_999_999_999_999_i64)),
            "implausible",
        ),
        (
            with(&good, "started", json!(99_999_999_999_999_i64)),
            "implausible",
        ),
    ];
    for (text, says) in cases {
        let err = Detectors::restore(Settings::default(), &text)
            .unwrap_err()
            .to_string();
        assert!(err.contains(says), "{}: {err}", &text[..text.len().min(60)]);
    }
}

/// `state` with one top-level field replaced.
fn with(state: &str, key: &str, value: Value) -> String {
    let mut v: Value = serde_json::from_str(state).unwrap();
    v[key] = value;
    v.to_string()
}
