//! `[detect]` settings: thresholds, windows, the change window, the bounds; each default documented.

use serde::Deserialize;

use crate::event::Event;
use crate::time::{Span, Time};

/// What the detectors are tuned with. Every field has a default, so an empty `[detect]`
/// table (or none) is a working configuration.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// How long after the first event the detectors only learn (default `"7d"`). `new_flow`
    /// is silent until it ends; `odd_hour` judges by `change_window` until an identity has
    /// a baseline of its own.
    pub learning: Span,
    /// When administrative work is expected, UTC (default `"Mon-Fri 08:00-19:00"`). A human
    /// session inside it is never odd.
    pub change_window: ChangeWindow,
    /// A human identity needs this many learned sessions before its own hours replace the
    /// change window (default 5).
    pub odd_hour_min_sessions: u32,
    /// SPIFFE ID path fragments that name a person rather than a workload (default
    /// `["/operators/", "/human/", "/user/", "/users/"]`). An identity that ever steps up
    /// with MFA counts as human too.
    pub human_patterns: Vec<String>,
    /// Roles that are privileged whatever the catalog says (default `["postgres"]`); a line
    /// refused as `superuser_role`, or marked `"superuser": true`, is privileged as well.
    pub admin_roles: Vec<String>,
    /// One privileged role used by this many identities, or from this many source
    /// addresses, within the window (default 3 within `"1h"`).
    pub shared_admin: Threshold,
    /// One source or identity reaching this many distinct databases, roles or denied
    /// targets within the window (default 5 within `"10m"`).
    pub fan_out: Threshold,
    /// This many failed MFA answers for one identity, or from one source, within the window
    /// (default 5 within `"10m"`).
    pub brute_force: Threshold,
    /// After a signal, the same signal about the same subject is silent this long
    /// (default `"1h"`): one ongoing pattern, one line per hour, not one per event.
    pub suppress: Span,
    /// A session with no `session_end` line is taken as closed after this long (default
    /// `"24h"`), so a lost line cannot make a certificate look in use forever.
    pub session_horizon: Span,
    /// Most keys any one table tracks (default 250,000); the least recently seen is evicted.
    /// 100,000 identities each from its own host take 100,000 keys per table.
    pub max_keys: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            learning: Span::days(7),
            change_window: ChangeWindow::parse("Mon-Fri 08:00-19:00")
                .expect("the default change window parses"),
            odd_hour_min_sessions: 5,
            human_patterns: ["/operators/", "/human/", "/user/", "/users/"]
                .map(String::from)
                .to_vec(),
            admin_roles: vec!["postgres".into()],
            shared_admin: Threshold::new(3, Span::hours(1)),
            fan_out: Threshold::new(5, Span::minutes(10)),
            brute_force: Threshold::new(5, Span::minutes(10)),
            suppress: Span::hours(1),
            session_horizon: Span::hours(24),
            max_keys: 250_000,
        }
    }
}

/// A count within a sliding window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    pub count: u32,
    pub window: Span,
}

impl Threshold {
    pub const fn new(count: u32, window: Span) -> Self {
        Threshold { count, window }
    }
}

/// A setting that cannot work, named by its key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error("detect.change_window {text:?}: {why}; write e.g. \"Mon-Fri 08:00-19:00\" (UTC), several windows separated by ';'")]
    ChangeWindow { text: String, why: String },
    #[error("detect.{key} {text:?}: not a duration; write a whole number with s, m, h or d, e.g. \"10m\"")]
    Span { key: &'static str, text: String },
    #[error("detect.{key}: {why}")]
    Invalid { key: &'static str, why: String },
}

impl Settings {
    /// Values that parse but cannot work: a zero threshold fires on nothing, a zero window
    /// sees nothing, a zero bound keeps nothing.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |key, why: &str| {
            Err(SettingsError::Invalid {
                key,
                why: why.into(),
            })
        };
        for (key, t) in [
            ("shared_admin", self.shared_admin),
            ("fan_out", self.fan_out),
            ("brute_force", self.brute_force),
        ] {
            if t.count < 2 {
                return invalid(key, "count must be at least 2 (one event is not a pattern)");
            }
            if t.window.0 <= 0 {
                return invalid(key, "window must be longer than zero");
            }
        }
        if self.max_keys < 16 {
            return invalid("max_keys", "must be at least 16");
        }
        if self.learning.0 < 0 || self.suppress.0 < 0 || self.session_horizon.0 <= 0 {
            return invalid(
                "learning",
                "learning and suppress must not be negative, session_horizon must be positive",
            );
        }
        Ok(())
    }

    /// Whether the event is a person's: the line says so (an MFA event or a stepped-up
    /// session), or the SPIFFE ID's path matches one of [`Settings::human_patterns`].
    pub fn is_human(&self, event: &Event) -> bool {
        event.stepped_up
            || event.spiffe_id.as_deref().is_some_and(|id| {
                let path = id
                    .strip_prefix("spiffe://")
                    .and_then(|rest| rest.find('/').map(|i| &rest[i..]))
                    .unwrap_or("");
                // "/operators/" also matches a path ending in "/operators".
                self.human_patterns.iter().any(|p| {
                    path.contains(p.as_str())
                        || p.strip_suffix('/')
                            .is_some_and(|p| !p.is_empty() && path.ends_with(p))
                })
            })
    }

    /// Whether the role is privileged: the line says superuser-equivalent, or the role is in
    /// [`Settings::admin_roles`].
    pub fn is_privileged(&self, event: &Event) -> bool {
        event.superuser
            || event
                .db_user
                .as_deref()
                .is_some_and(|role| self.admin_roles.iter().any(|a| a == role))
    }
}

/// Weekly windows, UTC: `"Mon-Fri 08:00-19:00"`, `"Mon,Wed 07:00-09:30; Sat 10:00-12:00"`.
/// A window ends before its end minute; `24:00` is the end of the day. Overnight windows are
/// written as two (`"Mon-Fri 22:00-24:00; Tue-Sat 00:00-06:00"`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct ChangeWindow {
    text: String,
    /// (weekday bit set, Monday = bit 0; start minute; end minute, exclusive)
    windows: Vec<(u8, u32, u32)>,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl ChangeWindow {
    pub fn parse(text: &str) -> Result<ChangeWindow, SettingsError> {
        let fail = |why: String| SettingsError::ChangeWindow {
            text: text.to_owned(),
            why,
        };
        let mut windows = Vec::new();
        for part in text.split(';').map(str::trim) {
            let mut words = part.split_whitespace();
            let (Some(days), Some(hours), None) = (words.next(), words.next(), words.next()) else {
                return Err(fail(format!("{part:?} is not DAYS HH:MM-HH:MM")));
            };
            let days = parse_days(days).map_err(&fail)?;
            let (start, end) = hours
                .split_once('-')
                .ok_or_else(|| fail(format!("{hours:?} is not HH:MM-HH:MM")))?;
            let (start, end) = (
                parse_hhmm(start).map_err(&fail)?,
                parse_hhmm(end).map_err(&fail)?,
            );
            if end <= start {
                return Err(fail(format!(
                    "{hours:?} ends before it starts; write an overnight window as two"
                )));
            }
            windows.push((days, start, end));
        }
        Ok(ChangeWindow {
            text: text.to_owned(),
            windows,
        })
    }

    /// Whether `t` falls inside one of the windows.
    pub fn contains(&self, t: Time) -> bool {
        let (day, minute) = (t.weekday(), t.minute_of_day());
        self.windows
            .iter()
            .any(|&(days, start, end)| days & (1 << day) != 0 && (start..end).contains(&minute))
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl TryFrom<String> for ChangeWindow {
    type Error = SettingsError;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        ChangeWindow::parse(&text)
    }
}

fn day_index(name: &str) -> Result<u32, String> {
    DAYS.iter()
        .position(|d| d.eq_ignore_ascii_case(name))
        .map(|i| i as u32)
        .ok_or_else(|| format!("{name:?} is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun)"))
}

/// `Mon-Fri`, `Sat`, `Mon,Wed,Fri`, `Fri-Mon` (a range may wrap over the weekend).
fn parse_days(text: &str) -> Result<u8, String> {
    let mut bits = 0u8;
    for item in text.split(',') {
        match item.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (day_index(from)?, day_index(to)?);
                let mut d = from;
                loop {
                    bits |= 1 << d;
                    if d == to {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => bits |= 1 << day_index(item)?,
        }
    }
    Ok(bits)
}

/// `HH:MM`, 00:00 ..= 24:00, as minutes of the day.
fn parse_hhmm(text: &str) -> Result<u32, String> {
    let bad = || format!("{text:?} is not a time HH:MM between 00:00 and 24:00");
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 || !(h.bytes().chain(m.bytes())).all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m > 59 || h > 24 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

impl Span {
    /// `"30s"`, `"10m"`, `"1h"`, `"7d"`.
    pub fn parse(key: &'static str, text: &str) -> Result<Span, SettingsError> {
        let bad = || SettingsError::Span {
            key,
            text: text.to_owned(),
        };
        // Split before the last character, not the last byte: "5é" must not panic.
        let Some((last, _)) = text.char_indices().last() else {
            return Err(bad());
        };
        let (n, unit) = text.split_at(last);
        if n.is_empty() || !n.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        let n: i64 = n.parse().map_err(|_| bad())?;
        let unit_ms: i64 = match unit {
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        n.checked_mul(unit_ms).map(Span).ok_or_else(bad)
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Span::parse("duration", &text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Time {
        Time::parse_rfc3339(text).unwrap()
    }

    #[test]
    fn the_default_change_window_is_weekday_office_hours() {
        let w = Settings::default().change_window;
        assert!(w.contains(at("2025-01-06T08:00:00Z")), "Monday 08:00");
        assert!(w.contains(at("2025-01-10T18:59:00Z")), "Friday 18:59");
        assert!(
            !w.contains(at("2025-01-10T19:00:00Z")),
            "Friday 19:00 ends it"
        );
        assert!(!w.contains(at("2025-01-07T02:13:00Z")), "Tuesday 02:13");
        assert!(!w.contains(at("2025-01-11T10:00:00Z")), "Saturday");
    }

    #[test]
    fn several_windows_and_wrapping_day_ranges_parse() {
        let w = ChangeWindow::parse("Fri-Mon 22:00-24:00; wed 00:00-01:30").unwrap();
        assert!(w.contains(at("2025-01-12T23:00:00Z")), "Sunday 23:00");
        assert!(w.contains(at("2025-01-08T01:00:00Z")), "Wednesday 01:00");
        assert!(!w.contains(at("2025-01-07T23:00:00Z")), "Tuesday 23:00");
    }

    #[test]
    fn malformed_change_windows_are_refused_with_the_reason() {
        for (text, says) in [
            ("", "is not DAYS"),
            ("Mon-Fri", "is not DAYS"),
            ("Mon-Fri 8:00-19:00", "is not a time"),
            ("Mon-Fry 08:00-19:00", "\"Fry\" is not a day"),
            ("Mon-Fri 19:00-08:00", "ends before it starts"),
            ("Mon-Fri 08:00-24:30", "is not a time"),
            ("Mon-Fri 08:00 19:00", "is not DAYS"),
            ("Mon-Fri 08:00-19:00;", "is not DAYS"),
        ] {
            let err = ChangeWindow::parse(text).unwrap_err().to_string();
            assert!(err.contains(says), "{text:?}: {err}");
            assert!(err.contains("detect.change_window"), "{err}");
        }
    }

    #[test]
    fn settings_deserialize_with_defaults_and_refuse_unknown_keys() {
        let s: Settings = serde_json::from_str(
            r#"{"learning":"14d","fan_out":{"count":8,"window":"5m"},"admin_roles":["postgres","dba"]}"#,
        )
        .unwrap();
        assert_eq!(s.learning, Span::days(14));
        assert_eq!(s.fan_out, Threshold::new(8, Span::minutes(5)));
        assert_eq!(s.brute_force, Settings::default().brute_force);
        s.validate().unwrap();
        let err = serde_json::from_str::<Settings>(r#"{"learnin":"14d"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `learnin`"), "{err}");
        let err = serde_json::from_str::<Settings>(r#"{"change_window":"always"}"#).unwrap_err();
        assert!(err.to_string().contains("detect.change_window"), "{err}");
        let err = serde_json::from_str::<Settings>(r#"{"suppress":"1 hour"}"#).unwrap_err();
        assert!(err.to_string().contains("not a duration"), "{err}");
        let zero = Settings {
            fan_out: Threshold::new(0, Span::minutes(1)),
            ..Settings::default()
        };
        assert!(zero
            .validate()
            .unwrap_err()
            .to_string()
            .contains("detect.fan_out"));
    }
}
