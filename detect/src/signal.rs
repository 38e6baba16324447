//! [`Signal`]: what a detector reports, as the JSON a `signal` decision-log line will carry, and the de-duplication that keeps one pattern to one line.

use std::collections::BTreeMap;

use serde::{Serialize, Serializer};

use crate::time::{Span, Time};
use crate::window::Table;

/// The five rows of the seed's signal table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Name {
    /// Host-to-host auth: a flow never seen in the learned baseline.
    NewFlow,
    /// Local admin reuse: one privileged role, several identities or hosts.
    SharedAdmin,
    /// Odd-hour logons: a person's session outside their hours and the change window.
    OddHour,
    /// Credential anomalies: a certificate, token or MFA code used where it should not be.
    CredentialAnomaly,
    /// Protocol fan-out: one source or identity reaching many targets quickly.
    FanOut,
}

impl Name {
    /// Every signal, in the seed table's order.
    pub const ALL: [Name; 5] = [
        Name::NewFlow,
        Name::SharedAdmin,
        Name::OddHour,
        Name::CredentialAnomaly,
        Name::FanOut,
    ];

    /// The signal called `text` (`"fan_out"`, ...), as settings name it.
    pub fn parse(text: &str) -> Option<Name> {
        Name::ALL.into_iter().find(|n| n.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Name::NewFlow => "new_flow",
            Name::SharedAdmin => "shared_admin",
            Name::OddHour => "odd_hour",
            Name::CredentialAnomaly => "credential_anomaly",
            Name::FanOut => "fan_out",
        }
    }
}

/// One detection. Serialized, it is the body of an `event: "signal"` line:
/// `{"signal":"fan_out","time":"…","kind":"distinct_databases","subject":"source 10.9.0.9",
/// "identities":[…],"sources":[…],"targets":[…],"counts":{…},"window":{"from":…,"to":…,"seconds":…}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Signal {
    #[serde(rename = "signal")]
    pub name: Name,
    #[serde(serialize_with = "rfc3339")]
    pub time: Time,
    /// Which variant of the signal, e.g. `new_source`, `cert_two_sources`, `mfa_brute_force`.
    pub kind: &'static str,
    /// Who or what the signal is about; also the de-duplication key.
    pub subject: String,
    #[serde(flatten)]
    pub evidence: Evidence,
}

/// What made the signal fire; lists are sorted so a replay gives byte-identical lines.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Evidence {
    pub identities: Vec<String>,
    pub sources: Vec<String>,
    /// Databases, roles or `database/role` pairs, as the signal's kind says.
    pub targets: Vec<String>,
    pub counts: BTreeMap<&'static str, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
}

/// The stretch of time the evidence comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Window {
    #[serde(serialize_with = "rfc3339")]
    pub from: Time,
    #[serde(serialize_with = "rfc3339")]
    pub to: Time,
    pub seconds: i64,
}

impl Window {
    pub fn new(from: Time, to: Time) -> Window {
        Window {
            from,
            to,
            seconds: (to.0.saturating_sub(from.0)) / 1000,
        }
    }
}

impl Evidence {
    /// Evidence naming these identities, sources and targets (each sorted and deduplicated).
    pub fn of(identities: Vec<String>, sources: Vec<String>, targets: Vec<String>) -> Evidence {
        let tidy = |mut v: Vec<String>| {
            v.sort();
            v.dedup();
            v
        };
        Evidence {
            identities: tidy(identities),
            sources: tidy(sources),
            targets: tidy(targets),
            ..Evidence::default()
        }
    }

    pub fn count(mut self, what: &'static str, n: u64) -> Evidence {
        self.counts.insert(what, n);
        self
    }

    pub fn during(mut self, from: Time, to: Time) -> Evidence {
        self.window = Some(Window::new(from, to));
        self
    }
}

impl Signal {
    /// The signal as a JSON object, ready to be merged into a log line.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

fn rfc3339<S: Serializer>(t: &Time, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(t)
}

/// The de-duplication rule: after a signal, the same (name, kind, subject) is silent for
/// `suppress`; the first event after that may fire again. So a pattern that goes on for a
/// day gives one line per `suppress`, and a new subject is never held back by another's.
pub fn allow(fired: &mut Table<String, Time>, suppress: Span, signal: &Signal, now: Time) -> bool {
    let key = format!(
        "{}|{}|{}",
        signal.name.as_str(),
        signal.kind,
        signal.subject
    );
    match fired.get(&key) {
        Some(last) if now < last.plus(suppress) => false,
        _ => {
            fired.insert(key, now);
            true
        }
    }
}
