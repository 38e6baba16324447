//! `[detect]`: whether the sidecar runs the detectors inline, where their state lives, which signals place a lock, and the detectors' own tuning.

use std::path::{Path, PathBuf};
use std::time::Duration;

use eastwall_detect::Name;
use toml::{Spanned, Table, Value};

use crate::settings::Checker;

/// The sidecar's detection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectSettings {
    /// `enabled` (default true): feed every decision to the detectors. They never delay or
    /// change an admission unless `lock_on` says so.
    pub enabled: bool,
    /// `state_file` (default `<audit.path>.detect.json`): the learned baselines and windows,
    /// saved periodically and on shutdown, reloaded on start.
    pub state_file: PathBuf,
    /// `lock_on` (default none): signals that place an automatic, expiring lock on their
    /// subject (a source address, a certificate serial, an identity or a role).
    pub lock_on: Vec<Name>,
    /// `lock_ttl` (default 1h): how long such a lock holds.
    pub lock_ttl: Duration,
    /// Every other key: the detectors' thresholds, windows and bounds.
    pub tuning: eastwall_detect::Settings,
}

/// The keys Eastwall itself reads; the rest of the table is the detectors' own.
const OWN_KEYS: [&str; 4] = ["enabled", "state_file", "lock_on", "lock_ttl"];

pub(crate) fn check_detect(
    c: &mut Checker<'_>,
    raw: Option<&Spanned<Table>>,
    audit_path: &Path,
) -> DetectSettings {
    let mut state_default = audit_path.as_os_str().to_owned();
    state_default.push(".detect.json");
    let mut out = DetectSettings {
        enabled: true,
        state_file: PathBuf::from(state_default),
        lock_on: Vec::new(),
        lock_ttl: Duration::from_secs(3600),
        tuning: eastwall_detect::Settings::default(),
    };
    let Some(raw) = raw else { return out };
    let span = raw.span();
    let mut rest = raw.get_ref().clone();
    let own: Vec<(&str, Value)> = OWN_KEYS
        .iter()
        .filter_map(|k| rest.remove(*k).map(|v| (*k, v)))
        .collect();
    for (key, value) in own {
        let name = format!("detect.{key}");
        match (key, value) {
            ("enabled", Value::Boolean(b)) => out.enabled = b,
            ("state_file", Value::String(s)) if !s.is_empty() => {
                out.state_file = c.resolve(&s);
                if out.state_file == audit_path {
                    c.invalid(
                        span.clone(),
                        &name,
                        "must not be the decision log: saving the state would replace the log",
                    );
                }
            }
            ("lock_on", Value::Array(items)) => {
                for item in items {
                    match item.as_str().and_then(Name::parse) {
                        Some(n) if !out.lock_on.contains(&n) => out.lock_on.push(n),
                        Some(_) => {}
                        None => c.invalid(
                            span.clone(),
                            &name,
                            format!(
                                "{item} is not a signal; expected some of {}",
                                Name::ALL.map(Name::as_str).join(", ")
                            ),
                        ),
                    }
                }
            }
            ("lock_ttl", Value::String(s)) => match humantime::parse_duration(&s) {
                Ok(d) if d >= Duration::from_secs(1) => out.lock_ttl = d,
                _ => c.invalid(
                    span.clone(),
                    &name,
                    format!(
                        "expected a duration of at least one second such as \"1h\", found {s:?}"
                    ),
                ),
            },
            (_, value) => c.invalid(
                span.clone(),
                &name,
                format!(
                    "unexpected value {value}; {}",
                    match key {
                        "enabled" => "expected true or false",
                        "state_file" => "expected a file path",
                        "lock_on" =>
                            "expected a list of signal names, e.g. [\"credential_anomaly\"]",
                        _ => "expected a duration such as \"1h\"",
                    }
                ),
            ),
        }
    }
    match Value::Table(rest).try_into::<eastwall_detect::Settings>() {
        Ok(tuning) => match tuning.validate() {
            Ok(()) => out.tuning = tuning,
            Err(e) => c.invalid(span, "detect", e.to_string()),
        },
        Err(e) => c.invalid(
            span,
            "detect",
            format!(
                "{}; the keys are {}, learning, change_window, odd_hour_min_sessions, human_patterns, admin_roles, shared_admin, fan_out, brute_force, suppress, session_horizon, max_keys",
                e.message().trim_end(),
                OWN_KEYS.join(", ")
            ),
        ),
    }
    out
}
