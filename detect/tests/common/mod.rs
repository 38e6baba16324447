//! Decision-log lines as the sidecar writes them, on a simulated clock, and the benign estate of the scenarios.
#![allow(dead_code)]

use eastwall_detect::{Detectors, Settings, Signal, Span, Time};
use serde_json::{json, Value};

/// Monday 2025-01-06 00:00:00 UTC: day 0 of every scenario.
pub fn t(day: i64, hour: i64, minute: i64) -> Time {
    let base = Time::parse_rfc3339("2025-01-06T00:00:00Z").unwrap();
    base.plus(Span::days(day))
        .plus(Span::hours(hour))
        .plus(Span::minutes(minute))
}

/// One client: its SPIFFE ID, certificate serial and address.
#[derive(Clone, Debug)]
pub struct Who {
    pub id: String,
    pub serial: String,
    pub ip: String,
}

pub fn who(id: &str, serial: &str, ip: &str) -> Who {
    Who {
        id: format!("spiffe://corp.example/{id}"),
        serial: serial.into(),
        ip: ip.into(),
    }
}

/// The fixed fields of a line, in the log's order; `extra` follows them.
fn line(
    at: Time,
    event: &str,
    decision: Option<&str>,
    w: Option<&Who>,
    target: Option<(&str, &str)>,
    reason: &str,
) -> Value {
    json!({
        "ts": at.to_string(),
        "conn_id": "c",
        "event": event,
        "decision": decision,
        "peer": w.map(|w| format!("{}:50000", w.ip)),
        "spiffe_id": w.map(|w| w.id.clone()),
        "cert_serial": w.map(|w| w.serial.clone()),
        "db_user": target.map(|t| t.1),
        "database": target.map(|t| t.0),
        "rule": "policy.txt:3",
        "reason": reason,
        "alert": false,
        "prev": "0",
        "hash": "0",
    })
}

pub fn connect(at: Time, w: &Who, db: &str, role: &str, allow: bool) -> Value {
    let decision = if allow { "allow" } else { "deny" };
    let reason = if allow {
        "allowed by rule"
    } else {
        "no rule allows this"
    };
    line(
        at,
        "connect",
        Some(decision),
        Some(w),
        Some((db, role)),
        reason,
    )
}

/// An operator's admission on a step-up token.
pub fn connect_mfa(at: Time, w: &Who, db: &str, role: &str) -> Value {
    let mut l = connect(at, w, db, role, true);
    l["mfa"] = json!("token");
    l["mfa_age_s"] = json!(30);
    l
}

pub fn end(at: Time, w: &Who, db: &str, role: &str) -> Value {
    line(
        at,
        "session_end",
        Some("allow"),
        Some(w),
        Some((db, role)),
        "client_closed",
    )
}

pub fn mfa(at: Time, w: &Who, event: &str, reason: &str, db: &str, role: &str) -> Value {
    line(at, event, Some("deny"), Some(w), Some((db, role)), reason)
}

pub fn challenge(at: Time, w: &Who, db: &str, role: &str) -> Value {
    line(
        at,
        "mfa_challenge",
        Some("challenge"),
        Some(w),
        Some((db, role)),
        "mfa required",
    )
}

pub fn stepup(at: Time, w: &Who, accepted: bool) -> Value {
    let (decision, reason) = if accepted {
        ("allow", "mfa_accepted")
    } else {
        ("deny", "mfa_wrong_code")
    };
    line(at, "stepup", Some(decision), Some(w), None, reason)
}

/// A handshake refused before identity (revoked, expired, ...): no SPIFFE ID on the line.
pub fn refused(at: Time, ip: &str, reason: &str) -> Value {
    let mut l = line(at, "connect", Some("deny"), None, None, reason);
    l["peer"] = json!(format!("{ip}:50001"));
    l
}

/// Feeds lines and keeps every signal with the time it came.
pub struct Sim {
    pub d: Detectors,
    pub signals: Vec<Signal>,
}

impl Sim {
    pub fn new() -> Sim {
        Sim {
            d: Detectors::new(Settings::default()).unwrap(),
            signals: Vec::new(),
        }
    }

    pub fn feed(&mut self, lines: impl IntoIterator<Item = Value>) {
        for l in lines {
            let got = self.d.observe_line(&l);
            self.signals.extend(got);
        }
    }

    pub fn named(&self, name: &str) -> Vec<&Signal> {
        self.signals
            .iter()
            .filter(|s| s.name.as_str() == name)
            .collect()
    }
}

/// The estate's clients.
pub struct Estate {
    pub billing_a: Who,
    pub billing_b: Who,
    pub inventory: Who,
    pub reports: Who,
    pub alice: Who,
    pub bob: Who,
}

impl Estate {
    pub fn new() -> Estate {
        Estate {
            billing_a: who("app/billing", "b1", "10.1.0.5"),
            billing_b: who("app/billing", "b2", "10.1.0.6"),
            inventory: who("app/inventory", "i1", "10.1.0.7"),
            reports: who("app/reports", "r1", "10.1.0.8"),
            alice: who("app/operators/alice", "a1", "10.2.0.10"),
            bob: who("app/operators/bob", "o1", "10.2.0.11"),
        }
    }

    /// A deploy: every certificate re-issued (new serials), same identities and hosts.
    pub fn rotate(&mut self, generation: u32) {
        for w in [
            &mut self.billing_a,
            &mut self.billing_b,
            &mut self.inventory,
            &mut self.reports,
            &mut self.alice,
            &mut self.bob,
        ] {
            let base = w.serial.split('.').next().unwrap().to_owned();
            w.serial = format!("{base}.{generation}");
        }
    }

    /// One benign day, in time order: the services around the clock from their own hosts,
    /// and on weekdays the two operators stepping up in working hours.
    pub fn day(&self, day: i64) -> Vec<Value> {
        let mut lines = Vec::new();
        for minute in (0..24 * 60).step_by(15) {
            let (h, m) = (minute / 60, minute % 60);
            let billing = if minute % 30 == 0 {
                &self.billing_a
            } else {
                &self.billing_b
            };
            lines.push((
                t(day, h, m),
                connect(t(day, h, m), billing, "billing", "billing", true),
            ));
            lines.push((
                t(day, h, m + 5),
                end(t(day, h, m + 5), billing, "billing", "billing"),
            ));
            if minute % 60 == 0 {
                let i = &self.inventory;
                lines.push((
                    t(day, h, m + 1),
                    connect(t(day, h, m + 1), i, "inventory", "inventory", true),
                ));
                lines.push((
                    t(day, h, m + 9),
                    end(t(day, h, m + 9), i, "inventory", "inventory"),
                ));
                let r = &self.reports;
                lines.push((
                    t(day, h, m + 2),
                    connect(t(day, h, m + 2), r, "billing", "reports_ro", true),
                ));
                lines.push((
                    t(day, h, m + 7),
                    end(t(day, h, m + 7), r, "billing", "reports_ro"),
                ));
            }
        }
        if day.rem_euclid(7) < 5 {
            for (w, db, hours) in [
                (&self.alice, "billing", [(9, 30), (14, 0)]),
                (&self.bob, "inventory", [(10, 0), (15, 30)]),
            ] {
                for (h, m) in hours {
                    lines.extend(self.operator_session(w, db, day, h, m));
                }
            }
        }
        lines.sort_by_key(|(at, _)| *at);
        lines.into_iter().map(|(_, l)| l).collect()
    }

    /// psql's first connection stops at the prompt; the operator steps up and comes back.
    pub fn operator_session(
        &self,
        w: &Who,
        db: &str,
        day: i64,
        h: i64,
        m: i64,
    ) -> Vec<(Time, Value)> {
        vec![
            (t(day, h, m), challenge(t(day, h, m), w, db, "postgres")),
            (t(day, h, m + 1), stepup(t(day, h, m + 1), w, true)),
            (
                t(day, h, m + 2),
                connect_mfa(t(day, h, m + 2), w, db, "postgres"),
            ),
            (t(day, h, m + 50), end(t(day, h, m + 50), w, db, "postgres")),
        ]
    }
}
