//! The seed's lateral-movement signal table as detectors over decision-log lines: pure, bounded, replayable.
//!
//! [`Detectors::observe`] takes one [`Event`] (a decision-log line, see
//! [`Event::from_log_line`]) and returns the [`Signal`]s it raises. Nothing here reads a
//! clock, a file or a socket: time is the events' own, so the sidecar can run this inline on
//! each decision and `eastwall audit detect` can run the same code over a recorded log, and
//! a test replays a week in milliseconds.
//!
//! # Layout
//! - [`event`]: [`Event`], parsed from a log line; hostile lines give `None`, never a panic.
//! - [`settings`]: [`Settings`] (`[detect]`), the change window, thresholds and bounds.
//! - [`time`]: [`Time`] and [`Span`], RFC 3339 parsing and formatting.
//! - [`window`]: [`window::Table`], a map that evicts its oldest key; [`window::Recent`].
//! - [`signal`]: [`Signal`] and its evidence; the de-duplication rule.
//! - [`new_flow`], [`shared_admin`], [`odd_hour`], [`credential`], [`fan_out`]: one detector each.
//! - [`state`]: [`State`], every table, and its versioned JSON form.
#![forbid(unsafe_code)]

pub mod credential;
pub mod event;
pub mod fan_out;
pub mod new_flow;
pub mod odd_hour;
pub mod settings;
pub mod shared_admin;
pub mod signal;
pub mod state;
pub mod time;
pub mod window;

pub use event::{Decision, Event, Kind};
pub use settings::{ChangeWindow, Settings, SettingsError, Threshold};
pub use signal::{Evidence, Name, Signal};
pub use state::{State, StateError};
pub use time::{Span, Time};

/// What every detector is told about the event besides the event itself.
pub(crate) struct Context<'a> {
    pub settings: &'a Settings,
    /// The detectors' clock: the latest event time seen (never earlier than before).
    pub now: Time,
    /// Whether the learning period is still running.
    pub learning: bool,
    /// The identity is a person: by the line, by its SPIFFE ID, or seen stepping up before.
    pub human: bool,
    /// The role is privileged (superuser-equivalent per the line, or in `admin_roles`).
    pub privileged: bool,
}

/// The five detectors and the state they share.
#[derive(Debug, Clone)]
pub struct Detectors {
    settings: Settings,
    state: State,
}

impl Detectors {
    /// Fresh detectors: nothing learned, the learning period starts at the first event.
    pub fn new(settings: Settings) -> Result<Detectors, SettingsError> {
        settings.validate()?;
        let state = State::new(&settings);
        Ok(Detectors { settings, state })
    }

    /// Detectors continuing from a saved state ([`Detectors::save`]).
    pub fn restore(settings: Settings, saved: &str) -> Result<Detectors, RestoreError> {
        settings.validate()?;
        let state = State::load(&settings, saved)?;
        Ok(Detectors { settings, state })
    }

    /// The state as JSON, to persist beside the log.
    pub fn save(&self) -> String {
        self.state.save()
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// An estimate of the memory the state holds.
    pub fn approx_bytes(&self) -> usize {
        self.state.approx_bytes()
    }

    /// Judges one event; returns the signals it raises, at most one per (signal, kind,
    /// subject) per `suppress` (see [`signal::allow`]).
    pub fn observe(&mut self, event: &Event) -> Vec<Signal> {
        let state = &mut self.state;
        let now = state.clock.max(event.time);
        state.clock = now;
        let started = *state.started.get_or_insert(event.time);
        let mut human = self.settings.is_human(event);
        if let Some(id) = event.identity() {
            // Once seen stepping up, a person stays one: their later sessions on a token
            // may not say so on the line.
            let known = state.profiles.get(&id.to_owned()).is_some_and(|p| p.human);
            human |= known;
        }
        let cx = Context {
            settings: &self.settings,
            now,
            learning: now < started.plus(self.settings.learning),
            human,
            privileged: self.settings.is_privileged(event),
        };
        let mut out = Vec::new();
        odd_hour::observe(state, &cx, event, &mut out);
        new_flow::observe(state, &cx, event, &mut out);
        shared_admin::observe(state, &cx, event, &mut out);
        credential::observe(state, &cx, event, &mut out);
        fan_out::observe(state, &cx, event, &mut out);
        out.retain(|s| signal::allow(&mut state.fired, self.settings.suppress, s, now));
        out
    }

    /// Parses and judges one decision-log line; a line that is not an event raises nothing.
    pub fn observe_line(&mut self, line: &serde_json::Value) -> Vec<Signal> {
        Event::from_log_line(line)
            .map(|e| self.observe(&e))
            .unwrap_or_default()
    }
}

/// Why saved detectors could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    State(#[from] StateError),
}
