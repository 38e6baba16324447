//! Results of an A/B run: per-run figures, the per-pair ratio summary, human and JSON output.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::stats::{median, summarize, RatioSummary};

/// Named figures of one run, e.g. `tps`, `lat_p99_us`.
pub type Figures = BTreeMap<&'static str, f64>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Direct,
    Proxy,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub pair: usize,
    pub side: Side,
    pub figures: Figures,
}

/// The whole run, as printed with `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: String,
    pub settings: BTreeMap<&'static str, String>,
    pub runs: Vec<RunRecord>,
    /// Figures both sides have: medians and the per-pair ratio proxy/direct.
    pub compared: BTreeMap<&'static str, RatioSummary>,
    /// Figures only the proxy runs have (its CPU and memory): medians.
    pub proxy_only: BTreeMap<&'static str, f64>,
}

impl Report {
    pub fn new(mode: &str, settings: BTreeMap<&'static str, String>, runs: Vec<RunRecord>) -> Self {
        let mut compared = BTreeMap::new();
        let mut proxy_only = BTreeMap::new();
        let pairs = runs.iter().map(|r| r.pair).max().map_or(0, |m| m + 1);
        let names: std::collections::BTreeSet<&'static str> = runs
            .iter()
            .flat_map(|r| r.figures.keys().copied())
            .collect();
        for name in names {
            let get = |pair, side| {
                runs.iter()
                    .find(|r| r.pair == pair && r.side == side)
                    .and_then(|r| r.figures.get(name).copied())
            };
            let both: Vec<(f64, f64)> = (0..pairs)
                .filter_map(|p| Some((get(p, Side::Direct)?, get(p, Side::Proxy)?)))
                .collect();
            if let Some(s) = summarize(&both) {
                compared.insert(name, s);
            } else {
                let proxy: Vec<f64> = (0..pairs).filter_map(|p| get(p, Side::Proxy)).collect();
                if let Some(m) = median(&proxy) {
                    proxy_only.insert(name, m);
                }
            }
        }
        Report {
            mode: mode.to_owned(),
            settings,
            runs,
            compared,
            proxy_only,
        }
    }

    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let settings: Vec<String> = self
            .settings
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(out, "mode {} ({})", self.mode, settings.join(" "));
        for r in &self.runs {
            let figs: Vec<String> = r
                .figures
                .iter()
                .map(|(k, v)| format!("{k}={}", fmt_num(*v)))
                .collect();
            let side = match r.side {
                Side::Direct => "direct",
                Side::Proxy => "proxy ",
            };
            let _ = writeln!(out, "  pair {} {side}  {}", r.pair + 1, figs.join("  "));
        }
        let _ = writeln!(
            out,
            "\n  {:<32} {:>12} {:>12}   proxy/direct median [min-max]",
            "metric", "direct", "proxy"
        );
        for (name, s) in &self.compared {
            let _ = writeln!(
                out,
                "  {:<32} {:>12} {:>12}   {:.3} [{:.3}-{:.3}]",
                name,
                fmt_num(s.direct_median),
                fmt_num(s.proxy_median),
                s.ratio_median,
                s.ratio_min,
                s.ratio_max
            );
        }
        for (name, v) in &self.proxy_only {
            let _ = writeln!(out, "  {:<32} {:>12} {:>12}", name, "-", fmt_num(*v));
        }
        out
    }
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pair: usize, side: Side, figs: &[(&'static str, f64)]) -> RunRecord {
        RunRecord {
            pair,
            side,
            figures: figs.iter().copied().collect(),
        }
    }

    #[test]
    fn shared_figures_are_compared_and_proxy_only_figures_kept_apart() {
        let runs = vec![
            run(0, Side::Direct, &[("tps", 100.0)]),
            run(
                0,
                Side::Proxy,
                &[("tps", 90.0), ("proxy_cpu_us_per_op", 7.0)],
            ),
            run(1, Side::Direct, &[("tps", 110.0)]),
            run(
                1,
                Side::Proxy,
                &[("tps", 88.0), ("proxy_cpu_us_per_op", 9.0)],
            ),
            run(2, Side::Direct, &[("tps", 100.0)]),
            run(
                2,
                Side::Proxy,
                &[("tps", 95.0), ("proxy_cpu_us_per_op", 8.0)],
            ),
        ];
        let r = Report::new("query", BTreeMap::new(), runs);
        let tps = r.compared["tps"];
        assert!((tps.ratio_median - 0.9).abs() < 1e-9);
        assert!((tps.ratio_min - 0.8).abs() < 1e-9);
        assert!((tps.ratio_max - 0.95).abs() < 1e-9);
        assert_eq!(r.proxy_only["proxy_cpu_us_per_op"], 8.0);
        assert!(!r.compared.contains_key("proxy_cpu_us_per_op"));
        let text = r.render_text();
        assert!(text.contains("0.900 [0.800-0.950]"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["compared"]["tps"]["ratio_median"], 0.9);
    }
}
