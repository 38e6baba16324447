//! Summary statistics for A/B runs: medians, and the median/min/max of per-pair ratios.

use serde::Serialize;

/// The median of the values (mean of the middle two for an even count); None when empty or
/// when any value is not a number.
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

/// How the proxy compares with the direct path over all pairs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RatioSummary {
    pub direct_median: f64,
    pub proxy_median: f64,
    /// proxy / direct within each pair, so slow drift across pairs cancels.
    pub ratio_median: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
}

/// Summarises `(direct, proxy)` pairs. Pairs where direct is zero (no ratio) are skipped for
/// the ratio; None when no pair yields one.
pub fn summarize(pairs: &[(f64, f64)]) -> Option<RatioSummary> {
    let ratios: Vec<f64> = pairs
        .iter()
        .filter(|(d, p)| *d != 0.0 && d.is_finite() && p.is_finite())
        .map(|(d, p)| p / d)
        .collect();
    let direct: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    let proxy: Vec<f64> = pairs.iter().map(|p| p.1).collect();
    Some(RatioSummary {
        direct_median: median(&direct)?,
        proxy_median: median(&proxy)?,
        ratio_median: median(&ratios)?,
        ratio_min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratio_max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn ratio_is_per_pair_not_of_medians() {
        // Direct drifts upward; within each pair the proxy keeps 90%.
        let pairs = [(100.0, 90.0), (200.0, 180.0), (400.0, 360.0)];
        let s = summarize(&pairs).unwrap();
        assert!((s.ratio_median - 0.9).abs() < 1e-12);
        assert!((s.ratio_min - 0.9).abs() < 1e-12);
        assert!((s.ratio_max - 0.9).abs() < 1e-12);
        assert_eq!(s.direct_median, 200.0);
        assert_eq!(s.proxy_median, 180.0);
    }

    #[test]
    fn min_and_max_span_the_pairs() {
        let s = summarize(&[(10.0, 5.0), (10.0, 12.0), (10.0, 9.0)]).unwrap();
        assert_eq!(s.ratio_median, 0.9);
        assert_eq!(s.ratio_min, 0.5);
        assert_eq!(s.ratio_max, 1.2);
    }

    #[test]
    fn a_zero_direct_figure_gives_no_ratio_for_that_pair() {
        let s = summarize(&[(0.0, 5.0), (10.0, 20.0), (10.0, 10.0)]).unwrap();
        assert_eq!(s.ratio_median, 1.5);
        assert!(summarize(&[(0.0, 1.0)]).is_none());
        assert!(summarize(&[]).is_none());
    }
}
