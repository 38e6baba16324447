//! `fan_out` (protocol fan-out): one source or one identity reaching many distinct databases, roles or denied targets in a short window.
//!
//! Counted per subject (`source ADDR` and the identity itself) over `fan_out.window`, from
//! admission attempts: a workload uses one or two databases and roles; a walk over a list
//! of them, mostly refused, is the fan-out the seed's table describes.

use serde::{Deserialize, Serialize};

use crate::event::{Decision, Event, Kind};
use crate::signal::{Evidence, Name, Signal};
use crate::window::{HeapSize, Recent};
use crate::Context;

/// What one subject reached recently.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reach {
    pub databases: Recent,
    pub roles: Recent,
    /// Refused `database/role` pairs.
    pub denied: Recent,
    /// The other side: identities for a source, sources for an identity.
    pub others: Recent,
}

impl HeapSize for Reach {
    fn heap_bytes(&self) -> usize {
        self.databases.heap_bytes()
            + self.roles.heap_bytes()
            + self.denied.heap_bytes()
            + self.others.heap_bytes()
    }
}

pub(crate) fn observe(state: &mut crate::State, cx: &Context, e: &Event, out: &mut Vec<Signal>) {
    if e.kind != Kind::Connect {
        return;
    }
    let id = e.identity();
    let source = e.source.as_deref();
    if let Some(src) = source {
        let subject = format!("source {src}");
        reach(state, cx, e, subject, id, out);
    }
    if let Some(id) = id {
        reach(state, cx, e, id.to_owned(), source, out);
    }
}

fn reach(
    state: &mut crate::State,
    cx: &Context,
    e: &Event,
    subject: String,
    other: Option<&str>,
    out: &mut Vec<Signal>,
) {
    let t = cx.settings.fan_out;
    let limit = t.count as usize + 8;
    let now = cx.now;
    let r = state.reach.entry(subject.clone(), Reach::default);
    let databases = note(&mut r.databases, e.database.as_deref(), cx, limit);
    let roles = note(&mut r.roles, e.db_user.as_deref(), cx, limit);
    let denied_target = (e.decision == Some(Decision::Deny)).then(|| {
        format!(
            "{}/{}",
            e.database.as_deref().unwrap_or("-"),
            e.db_user.as_deref().unwrap_or("-")
        )
    });
    let denied = note(&mut r.denied, denied_target.as_deref(), cx, limit);
    note(&mut r.others, other, cx, limit);
    let threshold = t.count as usize;
    let (kind, targets) = if databases >= threshold {
        ("distinct_databases", r.databases.values())
    } else if roles >= threshold {
        ("distinct_roles", r.roles.values())
    } else if denied >= threshold {
        ("denied_targets", r.denied.values())
    } else {
        return;
    };
    let since = [r.databases.since(), r.roles.since(), r.denied.since()]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(now);
    let others = r.others.values();
    let (identities, sources) = match subject.strip_prefix("source ") {
        Some(source) => (others, vec![source.to_owned()]),
        None => (vec![subject.clone()], others),
    };
    out.push(Signal {
        name: Name::FanOut,
        time: now,
        kind,
        subject,
        evidence: Evidence::of(identities, sources, targets)
            .count("databases", databases as u64)
            .count("roles", roles as u64)
            .count("denied", denied as u64)
            .during(since, now),
    });
}

/// Notes `value` (if any) in the window; returns the distinct count after pruning.
fn note(recent: &mut Recent, value: Option<&str>, cx: &Context, limit: usize) -> usize {
    let w = cx.settings.fan_out.window;
    match value {
        Some(v) => recent.note(v, cx.now, w, limit),
        None => {
            recent.prune(cx.now, w);
            recent.0.len()
        }
    }
}
