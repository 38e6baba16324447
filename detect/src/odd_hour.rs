//! `odd_hour` (odd-hour logons): a person's session outside the change window and outside the hours they are known to work.
//!
//! The rule, per human identity and UTC hour of the day:
//! - inside `change_window` a session is never odd (that is when admin work is expected);
//! - outside it, a session is odd unless the identity has a baseline (at least
//!   `odd_hour_min_sessions` learned sessions) in which that hour already occurs.
//!
//! Admitted sessions and accepted step-ups are learned: all of them during the learning
//! period, afterwards only those that were not odd, so an attacker who keeps working at
//! 03:00 does not teach the baseline that 03:00 is normal. Refusals and failed MFA answers
//! are judged (a 03:00 brute force is an odd-hour logon attempt) but never learned. Unlike
//! `new_flow`, this signal needs no baseline, so it may fire during the learning period.

use crate::event::{Decision, Event, Kind};
use crate::new_flow::{is_attempt, Profile};
use crate::signal::{Evidence, Name, Signal};
use crate::Context;

pub(crate) fn observe(state: &mut crate::State, cx: &Context, e: &Event, out: &mut Vec<Signal>) {
    let Some(id) = e.identity() else { return };
    if !cx.human || !is_attempt(&e.kind) {
        return;
    }
    let profile = state.profiles.entry(id.to_owned(), Profile::default);
    profile.human = true;
    if profile.hours.len() != 24 {
        profile.hours = vec![0; 24];
    }
    // The event's own hour, not the clock's: a late line is judged by when it happened.
    let hour = e.time.hour() as usize;
    let baseline = profile.sessions >= cx.settings.odd_hour_min_sessions;
    let usual = baseline && profile.hours[hour] > 0;
    let odd = !cx.settings.change_window.contains(e.time) && !usual;
    if odd {
        let target = format!(
            "{}/{}",
            e.database.as_deref().unwrap_or("-"),
            e.db_user.as_deref().unwrap_or("-")
        );
        out.push(Signal {
            name: Name::OddHour,
            time: cx.now,
            kind: if baseline {
                "outside_learned_hours"
            } else {
                "outside_change_window"
            },
            subject: id.to_owned(),
            evidence: Evidence::of(
                vec![id.to_owned()],
                e.source.iter().cloned().collect(),
                vec![target],
            )
            .count("hour_utc", hour as u64)
            .count("learned_sessions", u64::from(profile.sessions))
            .count("learned_at_this_hour", u64::from(profile.hours[hour])),
        });
    }
    let admitted =
        e.decision == Some(Decision::Allow) && matches!(e.kind, Kind::Connect | Kind::StepUp);
    if admitted && (cx.learning || !odd) {
        profile.hours[hour] = profile.hours[hour].saturating_add(1);
        profile.sessions = profile.sessions.saturating_add(1);
    }
}
