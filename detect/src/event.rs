//! [`Event`]: the detectors' view of one decision-log line, parsed from the line's JSON.
//!
//! The same parse runs inline (the sidecar hands over the line it just wrote) and offline
//! (`eastwall audit detect FILE`), so what a replay finds is what the sidecar would have found.
//! Every field a line may lack is optional; a line the detectors cannot place in time is not
//! an event (`None`), never a panic.

use serde_json::Value;

use crate::time::Time;

/// Longest string kept from a line. The log caps fields at 1 KiB; the detectors keep less,
/// since every string they keep is held in a table for days.
pub const MAX_FIELD_CHARS: usize = 256;

/// What the line records (`event` in the log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A connection's admission decision (allow or deny).
    Connect,
    SessionEnd,
    /// psql closed at the MFA prompt; it will come back with the code.
    MfaChallenge,
    MfaFailure,
    MfaLockout,
    /// The HTTP step-up endpoint's decision (`reason` `mfa_accepted`, `mfa_wrong_code`, ...).
    StepUp,
    /// Unauthenticated refusals counted per source rather than logged one by one.
    RefusalsSummary,
    /// Any other event (`cancel`, `log_reopened`, ...): kept for the clock, judged by none.
    Other(String),
}

/// The line's `decision`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
    Challenge,
}

/// One decision-log line, as the detectors see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub time: Time,
    pub kind: Kind,
    pub decision: Option<Decision>,
    /// `reason`, e.g. `policy_deny`, `revoked`, `mfa_wrong_code`; empty when absent.
    pub reason: String,
    pub spiffe_id: Option<String>,
    pub serial: Option<String>,
    /// The client's IP address (the line's `peer` without its port; for a
    /// `refusals_summary`, its `source`).
    pub source: Option<String>,
    pub db_user: Option<String>,
    pub database: Option<String>,
    /// The line itself shows a person: an MFA event, a step-up, a `challenge` decision or a
    /// session admitted with `mfa`. [`crate::Settings::is_human`] adds the SPIFFE ID pattern.
    pub stepped_up: bool,
    /// The line itself shows a superuser-equivalent role: refused as `superuser_role`, or
    /// marked `"superuser": true`. [`crate::Settings::is_privileged`] adds `admin_roles`.
    pub superuser: bool,
    /// The sidecar saw this certificate in use from another source (`cert_reuse`).
    pub cert_reuse: bool,
    /// For a `refusals_summary`: the counted refusals by reason.
    pub counted: Vec<(String, u64)>,
}

impl Event {
    /// Reads a decision-log line. None when it has no usable `ts` or `event`: a line the
    /// detectors cannot place in time cannot count toward any window.
    pub fn from_log_line(line: &Value) -> Option<Event> {
        let time = Time::parse_rfc3339(line.get("ts")?.as_str()?)?;
        let kind = match line.get("event")?.as_str()? {
            "connect" => Kind::Connect,
            "session_end" => Kind::SessionEnd,
            "mfa_challenge" => Kind::MfaChallenge,
            "mfa_failure" => Kind::MfaFailure,
            "mfa_lockout" => Kind::MfaLockout,
            "stepup" => Kind::StepUp,
            "refusals_summary" => Kind::RefusalsSummary,
            other => Kind::Other(capped(other)),
        };
        let decision = match text(line, "decision").as_deref() {
            Some("allow") => Some(Decision::Allow),
            Some("deny") => Some(Decision::Deny),
            Some("challenge") => Some(Decision::Challenge),
            _ => None,
        };
        let reason = text(line, "reason").unwrap_or_default();
        let source = match kind {
            Kind::RefusalsSummary => text(line, "source"),
            _ => text(line, "peer").and_then(|p| source_ip(&p)),
        };
        let stepped_up = matches!(
            kind,
            Kind::MfaChallenge | Kind::MfaFailure | Kind::MfaLockout | Kind::StepUp
        ) || decision == Some(Decision::Challenge)
            || line.get("mfa").is_some_and(|m| m.is_string());
        let superuser = reason == "superuser_role"
            || line.get("superuser").and_then(Value::as_bool) == Some(true);
        Some(Event {
            time,
            decision,
            spiffe_id: text(line, "spiffe_id"),
            serial: text(line, "cert_serial"),
            source,
            db_user: text(line, "db_user"),
            database: text(line, "database"),
            stepped_up,
            superuser,
            cert_reuse: line.get("cert_reuse").is_some_and(|v| !v.is_null()),
            counted: counted(line, &kind),
            kind,
            reason,
        })
    }

    /// The connection's identity, or None when it never proved one.
    pub fn identity(&self) -> Option<&str> {
        self.spiffe_id.as_deref().filter(|s| !s.is_empty())
    }
}

/// A string field, capped; None when absent, null or not a string.
fn text(line: &Value, key: &str) -> Option<String> {
    line.get(key).and_then(Value::as_str).map(capped)
}

fn capped(s: &str) -> String {
    match s.char_indices().nth(MAX_FIELD_CHARS) {
        Some((cut, _)) => s[..cut].to_owned(),
        None => s.to_owned(),
    }
}

/// `10.0.0.7:51234` or `[fd00::7]:51234` → the address; a bare address is taken as it is.
fn source_ip(peer: &str) -> Option<String> {
    if let Ok(addr) = peer.parse::<std::net::SocketAddr>() {
        return Some(addr.ip().to_string());
    }
    peer.parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| ip.to_string())
}

/// A summary's `reasons` object, reason → count; at most 32 reasons are kept.
fn counted(line: &Value, kind: &Kind) -> Vec<(String, u64)> {
    if *kind != Kind::RefusalsSummary {
        return Vec::new();
    }
    line.get("reasons")
        .and_then(Value::as_object)
        .map(|reasons| {
            reasons
                .iter()
                .filter_map(|(k, v)| Some((capped(k), v.as_u64()?)))
                .take(32)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_real_allow_line_parses() {
        let line = json!({"ts":"2025-01-02T03:04:05.123456Z","conn_id":"c1","event":"connect",
            "decision":"allow","peer":"10.1.0.5:51000","spiffe_id":"spiffe://corp.example/app/billing",
            "cert_serial":"0a1b","db_user":"billing","database":"billing","rule":"policy.txt:3",
            "reason":"allowed by rule","alert":false,"tls_version":"TLSv1_3","prev":"00","hash":"11"});
        let e = Event::from_log_line(&line).unwrap();
        assert_eq!(e.kind, Kind::Connect);
        assert_eq!(e.decision, Some(Decision::Allow));
        assert_eq!(e.source.as_deref(), Some("10.1.0.5"));
        assert_eq!(e.identity(), Some("spiffe://corp.example/app/billing"));
        assert!(!e.stepped_up && !e.superuser && !e.cert_reuse);
    }

    #[test]
    fn hostile_lines_are_none_or_partial_never_a_panic() {
        let long = "x".repeat(100_000);
        for line in [
            json!(null),
            json!([1, 2]),
            json!("connect"),
            json!({}),
            json!({"ts": 5, "event": "connect"}),
            json!({"ts": "2025-01-02T03:04:05Z"}),
            json!({"ts": "2025-01-02T03:04:05Z", "event": 7}),
            json!({"ts": "9999-12-31T23:59:59Z", "event": "connect"}),
            json!({"ts": "-001-01-01T00:00:00Z", "event": "connect"}),
            json!({"ts": long.clone(), "event": "connect"}),
        ] {
            assert_eq!(Event::from_log_line(&line), None, "{line}");
        }
        let odd = json!({"ts": "2025-01-02T03:04:05Z", "event": long, "decision": 1,
            "peer": "not an address", "spiffe_id": {"x": 1}, "cert_serial": [1],
            "db_user": "é".repeat(1000), "reason": null, "mfa": 3, "superuser": "yes",
            "reasons": {"revoked": "many"}});
        let e = Event::from_log_line(&odd).unwrap();
        assert_eq!(e.kind, Kind::Other("x".repeat(MAX_FIELD_CHARS)));
        assert_eq!(
            (e.decision, e.source, e.spiffe_id, e.serial),
            (None, None, None, None)
        );
        assert_eq!(e.db_user.unwrap().chars().count(), MAX_FIELD_CHARS);
        assert_eq!(e.reason, "");
        assert!(!e.stepped_up && !e.superuser);
    }

    #[test]
    fn ipv6_peers_and_summaries_give_the_source_address() {
        let v6 = json!({"ts":"2025-01-02T03:04:05Z","event":"connect","peer":"[fd00::7]:5000"});
        assert_eq!(
            Event::from_log_line(&v6).unwrap().source.as_deref(),
            Some("fd00::7")
        );
        let summary = json!({"ts":"2025-01-02T03:04:05Z","event":"refusals_summary","decision":"deny",
            "peer":null,"reason":"suppressed","source":"10.9.0.9","suppressed":12,
            "reasons":{"revoked":12}});
        let e = Event::from_log_line(&summary).unwrap();
        assert_eq!(e.source.as_deref(), Some("10.9.0.9"));
        assert_eq!(e.counted, vec![("revoked".to_owned(), 12)]);
    }
}
