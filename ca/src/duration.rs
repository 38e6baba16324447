//! Durations on the command line ("1h", "30m", "90d"), parsed with humantime.

use std::time::Duration;

use crate::error::CaError;

/// Parses a positive duration such as `1h`, `30m`, `90d` or `1h 30m`.
pub fn parse_duration(input: &str) -> Result<Duration, CaError> {
    let invalid = |reason: String| CaError::InvalidDuration {
        input: input.to_owned(),
        reason,
    };
    let d = humantime::parse_duration(input.trim()).map_err(|e| invalid(e.to_string()))?;
    if d.is_zero() {
        return Err(invalid("it must be longer than zero".to_owned()));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(
            parse_duration("90d").unwrap(),
            Duration::from_secs(90 * 86400)
        );
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
    }

    #[test]
    fn refuses_zero_garbage_and_negative() {
        for bad in ["0s", "", "soon", "-1h", "1 fortnight"] {
            let err = parse_duration(bad).unwrap_err().to_string();
            assert!(err.contains("1h, 30m or 90d"), "{bad}: {err}");
        }
    }
}
