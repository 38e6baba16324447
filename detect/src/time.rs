//! Time as the events carry it: milliseconds since the Unix epoch (UTC), RFC 3339 in and out.
//!
//! The detectors never read a clock. Every [`Time`] comes from a decision-log line's `ts`, so
//! a replay of a week runs in milliseconds and a test is its own clock. Parsing and
//! formatting are written here (civil-from-days arithmetic) to keep the crate free of a
//! calendar dependency.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

/// Earliest and latest year accepted in a line's `ts`. A timestamp outside is not a mistake
/// the detectors should absorb: one line dated 9999 would end every window and the learning
/// period at once, so such a line is not an event at all.
pub const MIN_YEAR: i64 = 2000;
pub const MAX_YEAR: i64 = 2200;

const MS_PER_DAY: i64 = 86_400_000;

/// An instant, in milliseconds since 1970-01-01T00:00:00Z.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Deserialize)]
#[serde(transparent)]
pub struct Time(pub i64);

/// A length of time in milliseconds; written in settings as `"30s"`, `"10m"`, `"1h"`, `"7d"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Span(pub i64);

impl Span {
    pub const fn secs(s: i64) -> Span {
        Span(s * 1000)
    }
    pub const fn minutes(m: i64) -> Span {
        Span(m * 60_000)
    }
    pub const fn hours(h: i64) -> Span {
        Span(h * 3_600_000)
    }
    pub const fn days(d: i64) -> Span {
        Span(d * MS_PER_DAY)
    }
    pub fn as_secs(self) -> i64 {
        self.0 / 1000
    }
}

impl Time {
    /// `self + span`, saturating: no input can overflow the arithmetic.
    pub fn plus(self, span: Span) -> Time {
        Time(self.0.saturating_add(span.0))
    }
    /// `self - span`, saturating.
    pub fn minus(self, span: Span) -> Time {
        Time(self.0.saturating_sub(span.0))
    }
    /// Day of the week, Monday = 0 … Sunday = 6 (1970-01-01 was a Thursday).
    pub fn weekday(self) -> u32 {
        (self.0.div_euclid(MS_PER_DAY) + 3).rem_euclid(7) as u32
    }
    /// Minute of the day, 0 ..= 1439, UTC.
    pub fn minute_of_day(self) -> u32 {
        (self.0.rem_euclid(MS_PER_DAY) / 60_000) as u32
    }
    /// Hour of the day, 0 ..= 23, UTC.
    pub fn hour(self) -> u32 {
        self.minute_of_day() / 60
    }

    /// Parses RFC 3339 (`2025-01-02T03:04:05.123456Z`, or with an offset such as `+02:00`).
    /// Fractions beyond milliseconds are dropped. None for anything else, including years
    /// outside [`MIN_YEAR`] ..= [`MAX_YEAR`].
    pub fn parse_rfc3339(text: &str) -> Option<Time> {
        let b = text.as_bytes();
        if b.len() < 20 || !text.is_ascii() {
            return None;
        }
        let num = |from: usize, to: usize| -> Option<i64> {
            let s = &text[from..to];
            s.bytes()
                .all(|c| c.is_ascii_digit())
                .then(|| s.parse().ok())
                .flatten()
        };
        if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
            return None;
        }
        if b[13] != b':' || b[16] != b':' {
            return None;
        }
        let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
        let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
        if !(MIN_YEAR..=MAX_YEAR).contains(&year)
            || !(1..=12).contains(&month)
            || day < 1
            || day > days_in_month(year, month)
            || hour > 23
            || minute > 59
            || second > 60
        {
            return None;
        }
        let mut rest = 19;
        let mut millis = 0;
        if b[rest] == b'.' {
            let digits = b[rest + 1..]
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .count();
            if digits == 0 {
                return None;
            }
            let frac = &text[rest + 1..rest + 1 + digits.min(3)];
            millis = frac.parse::<i64>().ok()? * 10_i64.pow(3 - frac.len() as u32);
            rest += 1 + digits;
        }
        let offset_min = match &b[rest..] {
            [b'Z' | b'z'] => 0,
            [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
                let (h, m) = (num(rest + 1, rest + 3)?, num(rest + 4, rest + 6)?);
                if h > 23 || m > 59 {
                    return None;
                }
                let off = h * 60 + m;
                if *sign == b'-' {
                    -off
                } else {
                    off
                }
            }
            _ => return None,
        };
        let days = days_from_civil(year, month, day);
        // A leap second (:60) is read as the next second's start: order is all we need.
        let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_min * 60;
        Some(Time(secs * 1000 + millis))
    }
}

/// `2025-01-02T03:04:05.123Z`: what signals carry, so they read like the log's own `ts`.
impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let days = self.0.div_euclid(MS_PER_DAY);
        let ms = self.0.rem_euclid(MS_PER_DAY);
        let (y, m, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
            ms / 3_600_000,
            ms / 60_000 % 60,
            ms / 1000 % 60,
            ms % 1000
        )
    }
}

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The state file stores the number (exact); signals format it (see `signal.rs`).
        s.serialize_i64(self.0)
    }
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_through_display() {
        let t = Time::parse_rfc3339("2025-01-02T03:04:05.123456Z").unwrap();
        assert_eq!(t.to_string(), "2025-01-02T03:04:05.123Z");
        assert_eq!(t.weekday(), 3, "2025-01-02 is a Thursday");
        assert_eq!(t.hour(), 3);
        let offset = Time::parse_rfc3339("2025-01-02T05:04:05.123+02:00").unwrap();
        assert_eq!(offset, t);
    }

    #[test]
    fn malformed_and_absurd_timestamps_are_refused() {
        for bad in [
            "",
            "2025-01-02",
            "2025-13-02T03:04:05Z",
            "2025-02-30T03:04:05Z",
            "9999-01-02T03:04:05Z",
            "1900-01-02T03:04:05Z",
            "2025-01-02T03:04:05",
            "2025-01-02T03:04:05.Z",
            "2025-01-02T03:04:05+2:00",
            "２025-01-02T03:04:05Z",
            "+025-01-02T03:04:05Z",
        ] {
            assert_eq!(Time::parse_rfc3339(bad), None, "{bad:?}");
        }
    }
}
