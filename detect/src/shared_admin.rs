//! `shared_admin` (local admin reuse): one privileged role used by several identities, or from several hosts, within a window.
//!
//! Every attempt on the role by a proven identity counts, refused ones included: three
//! identities trying `postgres` within the hour is the pattern whether or not the policy let
//! them in. A line without a proven identity (a plaintext or refused-handshake attempt, whose
//! role name anyone can type) never counts: otherwise anyone could raise the signal, or hold
//! its de-duplication slot for an hour so that the real pattern went unreported.

use serde::{Deserialize, Serialize};

use crate::event::{Event, Kind};
use crate::signal::{Evidence, Name, Signal};
use crate::window::{HeapSize, Recent};
use crate::Context;

/// Who used one privileged role recently.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleUse {
    pub identities: Recent,
    pub sources: Recent,
}

impl HeapSize for RoleUse {
    fn heap_bytes(&self) -> usize {
        self.identities.heap_bytes() + self.sources.heap_bytes()
    }
}

pub(crate) fn observe(state: &mut crate::State, cx: &Context, e: &Event, out: &mut Vec<Signal>) {
    if !cx.privileged
        || !matches!(
            e.kind,
            Kind::Connect | Kind::MfaChallenge | Kind::MfaFailure | Kind::MfaLockout
        )
    {
        return;
    }
    let Some(role) = e.db_user.as_deref() else {
        return;
    };
    if e.identity().is_none() {
        return;
    }
    let t = cx.settings.shared_admin;
    // A few more than the threshold, so the evidence shows who else, not only the count.
    let limit = t.count as usize + 8;
    let usage = state.roles.entry(role.to_owned(), RoleUse::default);
    let identities = match e.identity() {
        Some(id) => usage.identities.note(id, cx.now, t.window, limit),
        None => {
            usage.identities.prune(cx.now, t.window);
            usage.identities.0.len()
        }
    };
    let sources = match e.source.as_deref() {
        Some(src) => usage.sources.note(src, cx.now, t.window, limit),
        None => {
            usage.sources.prune(cx.now, t.window);
            usage.sources.0.len()
        }
    };
    let threshold = t.count as usize;
    let kind = if identities >= threshold {
        "several_identities"
    } else if sources >= threshold {
        "several_sources"
    } else {
        return;
    };
    let since = [usage.identities.since(), usage.sources.since()]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(cx.now);
    out.push(Signal {
        name: Name::SharedAdmin,
        time: cx.now,
        kind,
        subject: role.to_owned(),
        evidence: Evidence::of(
            usage.identities.values(),
            usage.sources.values(),
            vec![role.to_owned()],
        )
        .count("identities", identities as u64)
        .count("sources", sources as u64)
        .during(since, cx.now),
    });
}
