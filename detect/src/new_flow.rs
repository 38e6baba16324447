//! `new_flow` (host-to-host auth): an identity from a source, or to a database or role, outside its learned baseline.
//!
//! Only admitted connections and accepted step-ups teach the baseline: a refused attempt is
//! exactly what the baseline must not come to consider normal. During the learning period
//! the detector learns and says nothing. After it, a flow it has not seen raises one signal
//! and, if admitted, becomes part of the baseline (first-seen semantics, like Elastic's
//! `new_terms`): the same new flow does not alert again.

use serde::{Deserialize, Serialize};

use crate::event::{Decision, Event, Kind};
use crate::signal::{Evidence, Name, Signal};
use crate::time::Time;
use crate::window::HeapSize;
use crate::Context;

/// Values kept per facet (sources, databases, roles) of one identity; the least recently
/// used is dropped beyond it. A workload reaching more than this many is unusual in itself.
pub const MAX_VALUES: usize = 32;

/// What is known of one identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Learned source addresses, databases and roles, least recently used first.
    pub sources: Vec<String>,
    pub databases: Vec<String>,
    pub roles: Vec<String>,
    /// Seen as a person (an MFA step-up, or a human SPIFFE ID pattern).
    pub human: bool,
    /// For people: learned sessions per hour of the day (UTC); empty for workloads.
    pub hours: Vec<u32>,
    /// For people: how many sessions `hours` holds.
    pub sessions: u32,
}

impl HeapSize for Profile {
    fn heap_bytes(&self) -> usize {
        self.sources.heap_bytes()
            + self.databases.heap_bytes()
            + self.roles.heap_bytes()
            + self.hours.capacity() * 4
    }
}

impl Profile {
    fn is_empty(&self) -> bool {
        self.sources.is_empty() && self.databases.is_empty() && self.roles.is_empty()
    }
}

/// `v` when it is not among `values`.
fn unseen<'a>(values: &[String], v: &'a Option<String>) -> Option<&'a str> {
    v.as_deref().filter(|v| !values.iter().any(|k| k == v))
}

/// Adds `value` as the most recently used, dropping the oldest beyond [`MAX_VALUES`].
fn learn(values: &mut Vec<String>, value: &str) {
    if let Some(i) = values.iter().position(|v| v == value) {
        let v = values.remove(i);
        values.push(v);
        return;
    }
    if values.len() >= MAX_VALUES {
        values.remove(0);
    }
    crate::window::push_exact(values, value.to_owned());
}

/// Events that show an identity using a flow: admissions (allowed or not), MFA answers,
/// step-ups. A `session_end` repeats its admission and adds nothing.
pub(crate) fn is_attempt(kind: &Kind) -> bool {
    matches!(
        kind,
        Kind::Connect | Kind::MfaChallenge | Kind::MfaFailure | Kind::MfaLockout | Kind::StepUp
    )
}

pub(crate) fn observe(state: &mut crate::State, cx: &Context, e: &Event, out: &mut Vec<Signal>) {
    let Some(id) = e.identity() else { return };
    if !is_attempt(&e.kind) {
        return;
    }
    let teaches =
        e.decision == Some(Decision::Allow) && matches!(e.kind, Kind::Connect | Kind::StepUp);
    let profile = state.profiles.entry(id.to_owned(), Profile::default);
    profile.human |= cx.human;
    let new_identity = profile.is_empty();
    let new_source = unseen(&profile.sources, &e.source);
    let new_database = unseen(&profile.databases, &e.database);
    let new_role = unseen(&profile.roles, &e.db_user);
    if !cx.learning && (new_source.is_some() || new_database.is_some() || new_role.is_some()) {
        let kind = if new_identity {
            "new_identity"
        } else if new_source.is_some() {
            "new_source"
        } else {
            "new_target"
        };
        out.push(signal(
            cx.now,
            kind,
            id,
            e,
            [new_source, new_database, new_role],
        ));
    }
    if teaches {
        for (values, v) in [
            (&mut profile.sources, &e.source),
            (&mut profile.databases, &e.database),
            (&mut profile.roles, &e.db_user),
        ] {
            if let Some(v) = v {
                learn(values, v);
            }
        }
    }
}

fn signal(now: Time, kind: &'static str, id: &str, e: &Event, new: [Option<&str>; 3]) -> Signal {
    let [source, database, role] = new;
    let target = format!(
        "{}/{}",
        e.database.as_deref().unwrap_or("-"),
        e.db_user.as_deref().unwrap_or("-")
    );
    let decision = match e.decision {
        Some(Decision::Allow) => "allowed",
        Some(Decision::Deny) => "denied",
        _ => "challenged",
    };
    Signal {
        name: Name::NewFlow,
        time: now,
        kind,
        subject: id.to_owned(),
        evidence: Evidence::of(
            vec![id.to_owned()],
            e.source.iter().cloned().collect(),
            vec![target],
        )
        .count("new_sources", source.is_some() as u64)
        .count("new_databases", database.is_some() as u64)
        .count("new_roles", role.is_some() as u64)
        .count(decision, 1),
    }
}
