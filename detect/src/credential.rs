//! `credential_anomaly`: a certificate, token or MFA code used where it should not be.
//!
//! Kinds (the signal's `kind`):
//! - `cert_two_sources`: one certificate serial in session from two source addresses at
//!   once (a key copied off its host), by the sidecar's own `cert_reuse` mark or by the
//!   detector's count of open sessions per serial and source;
//! - `token_other_cert`: a step-up token presented with a certificate it was not issued to;
//! - `replayed_mfa_code`: a TOTP code presented again;
//! - `mfa_brute_force`: `brute_force.count` failed MFA answers for one identity within the
//!   window (or from one source against several identities), or the sidecar's own lockout;
//! - `revoked_cert_retry`, `expired_cert_retry`: a certificate refused as revoked or expired
//!   at the handshake. Its holder used it before it was revoked or expired; presenting it now
//!   is trying again. Keyed by source: a refused handshake proves no identity.

use serde::{Deserialize, Serialize};

use crate::event::{Decision, Event, Kind};
use crate::signal::{Evidence, Name, Signal};
use crate::time::Time;
use crate::window::{HeapSize, Recent};
use crate::Context;

/// Sources tracked per certificate serial.
const MAX_SOURCES_PER_CERT: usize = 8;

/// Where one certificate is in session: (source, open sessions, last admitted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertUse(pub Vec<(String, u32, Time)>);

impl HeapSize for CertUse {
    fn heap_bytes(&self) -> usize {
        self.0.capacity() * std::mem::size_of::<(String, u32, Time)>()
            + self.0.iter().map(|(s, _, _)| s.capacity()).sum::<usize>()
    }
}

/// Recent failures of one subject, and who was on the other side of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failures {
    pub times: Vec<Time>,
    /// For an identity, the sources its failures came from; for a source, the identities.
    pub others: Recent,
}

impl HeapSize for Failures {
    fn heap_bytes(&self) -> usize {
        self.times.capacity() * 8 + self.others.heap_bytes()
    }
}

pub(crate) fn observe(state: &mut crate::State, cx: &Context, e: &Event, out: &mut Vec<Signal>) {
    match e.kind {
        Kind::Connect | Kind::SessionEnd => cert_sessions(state, cx, e, out),
        Kind::RefusalsSummary => {
            for (reason, n) in &e.counted {
                refused_cert(state, cx, e, reason, *n, out);
            }
            return;
        }
        _ => {}
    }
    if e.kind == Kind::Connect && e.decision == Some(Decision::Deny) {
        refused_cert(state, cx, e, &e.reason, 1, out);
    }
    let id = e.identity().unwrap_or("-");
    match e.reason.as_str() {
        "mfa_token_other_cert" => out.push(single(cx, e, "token_other_cert", id)),
        "mfa_replayed_code" => out.push(single(cx, e, "replayed_mfa_code", id)),
        _ => {}
    }
    let failed = matches!(e.kind, Kind::MfaFailure | Kind::StepUp)
        && matches!(
            e.reason.as_str(),
            "mfa_wrong_code" | "mfa_bad_token" | "mfa_replayed_code" | "mfa_token_other_cert"
        );
    let locked = e.kind == Kind::MfaLockout || e.reason == "mfa_locked_out";
    if failed || locked {
        mfa_failure(state, cx, e, locked, out);
    }
}

/// A signal from one line, no window: the line itself is the anomaly.
fn single(cx: &Context, e: &Event, kind: &'static str, subject: &str) -> Signal {
    Signal {
        name: Name::CredentialAnomaly,
        time: cx.now,
        kind,
        subject: subject.to_owned(),
        evidence: Evidence::of(
            e.identity().map(str::to_owned).into_iter().collect(),
            e.source.iter().cloned().collect(),
            e.serial
                .iter()
                .map(|s| format!("certificate {s}"))
                .collect(),
        )
        .count("attempts", 1),
    }
}

/// Counts open sessions per (serial, source); an attempt with a serial already in session
/// elsewhere is the anomaly.
fn cert_sessions(state: &mut crate::State, cx: &Context, e: &Event, out: &mut Vec<Signal>) {
    let (Some(serial), Some(source)) = (e.serial.as_deref(), e.source.as_deref()) else {
        return;
    };
    let horizon = cx.now.minus(cx.settings.session_horizon);
    let uses = state.certs.entry(serial.to_owned(), CertUse::default);
    // A session admitted longer ago than the horizon with no end line is taken as gone.
    uses.0
        .retain(|(_, open, last)| *open > 0 && *last > horizon);
    if e.kind == Kind::SessionEnd {
        if let Some(u) = uses.0.iter_mut().find(|(s, _, _)| s == source) {
            u.1 = u.1.saturating_sub(1);
        }
        return;
    }
    let elsewhere: Vec<String> = uses
        .0
        .iter()
        .filter(|(s, _, _)| s != source)
        .map(|(s, _, _)| s.clone())
        .collect();
    if e.cert_reuse || !elsewhere.is_empty() {
        let mut sources = elsewhere;
        sources.push(source.to_owned());
        let mut signal = single(cx, e, "cert_two_sources", &format!("certificate {serial}"));
        signal.evidence.sources = Evidence::of(vec![], sources, vec![]).sources;
        let n = signal.evidence.sources.len() as u64;
        signal.evidence = signal.evidence.count("sources", n);
        out.push(signal);
    }
    if e.decision == Some(Decision::Allow) {
        match uses.0.iter_mut().find(|(s, _, _)| s == source) {
            Some(u) => {
                u.1 = u.1.saturating_add(1);
                u.2 = cx.now;
            }
            None => {
                if uses.0.len() >= MAX_SOURCES_PER_CERT {
                    uses.0.remove(0);
                }
                crate::window::push_exact(&mut uses.0, (source.to_owned(), 1, cx.now));
            }
        }
    }
}

/// A handshake refused for a revoked or expired certificate (one line, or `n` counted in a
/// refusals summary).
fn refused_cert(
    state: &mut crate::State,
    cx: &Context,
    e: &Event,
    reason: &str,
    n: u64,
    out: &mut Vec<Signal>,
) {
    let kind = match reason {
        "revoked" => "revoked_cert_retry",
        "expired" => "expired_cert_retry",
        _ => return,
    };
    let source = e.source.as_deref().unwrap_or("-");
    let tally = state
        .failures
        .entry(format!("{kind}|{source}"), Failures::default);
    let attempts = note_times(&mut tally.times, cx, n);
    // A revoked certificate is one of ours: the CRL is consulted only after the chain to our
    // CA verified. "Expired" is said before the issuer is looked at, so anyone can make one
    // with a certificate of their own: it takes `brute_force.count` within its window.
    if kind == "expired_cert_retry" && attempts < u64::from(cx.settings.brute_force.count) {
        return;
    }
    let since = tally.times.first().copied().unwrap_or(cx.now);
    let mut signal = single(cx, e, kind, &format!("source {source}"));
    signal.evidence = signal
        .evidence
        .count("attempts", attempts)
        .during(since, cx.now);
    out.push(signal);
}

/// Appends `n` failures at `now` (at most 64 kept) after forgetting those older than the
/// brute-force window; returns how many remain.
fn note_times(times: &mut Vec<Time>, cx: &Context, n: u64) -> u64 {
    let since = cx.now.minus(cx.settings.brute_force.window);
    times.retain(|t| *t > since);
    let keep = 64usize.max(cx.settings.brute_force.count as usize);
    for _ in 0..n.min(keep as u64) {
        if times.len() >= keep {
            times.remove(0);
        }
        times.push(cx.now);
    }
    times.len() as u64
}

/// Failed MFA answers per identity (and per source across identities).
fn mfa_failure(
    state: &mut crate::State,
    cx: &Context,
    e: &Event,
    locked: bool,
    out: &mut Vec<Signal>,
) {
    let t = cx.settings.brute_force;
    let (id, source) = (
        e.identity().unwrap_or("-"),
        e.source.as_deref().unwrap_or("-"),
    );
    let limit = t.count as usize + 8;
    for (key, other, by_source) in [
        (format!("mfa|identity {id}"), source, false),
        (format!("mfa|source {source}"), id, true),
    ] {
        let tally = state.failures.entry(key, Failures::default);
        let failures = note_times(&mut tally.times, cx, u64::from(!locked));
        let others = tally.others.note(other, cx.now, t.window, limit);
        // From one source, the pattern is several identities (a spray); one identity's
        // failures are already its own signal.
        let fires = if by_source {
            others >= 2 && failures >= u64::from(t.count)
        } else {
            locked || failures >= u64::from(t.count)
        };
        if !fires {
            continue;
        }
        let (identities, sources) = if by_source {
            (tally.others.values(), vec![source.to_owned()])
        } else {
            (vec![id.to_owned()], tally.others.values())
        };
        let since = tally.times.first().copied().unwrap_or(cx.now);
        let subject = if by_source {
            format!("source {source}")
        } else {
            id.to_owned()
        };
        out.push(Signal {
            name: Name::CredentialAnomaly,
            time: cx.now,
            kind: "mfa_brute_force",
            subject,
            evidence: Evidence::of(identities, sources, e.db_user.iter().cloned().collect())
                .count("failures", failures)
                .count("lockout", u64::from(locked))
                .during(since, cx.now),
        });
    }
}
