//! The sidecar's Prometheus metrics, encoded by the Prometheus project's own client
//! (`prometheus-client`, OpenMetrics text) for `GET /metrics` on the admin listener
//! ([`crate::admin`]).
//!
//! Most counters move in one place: every decision-log line passes through
//! [`crate::audit::AuditLog`], which hands each written line to [`Metrics`] (an
//! [`crate::audit::Observer`]). So the counters agree with the log by construction: a line
//! that did not reach the disk is not counted (its write time still is).
//!
//! # Labels stay bounded
//!
//! A label value is never text a client chose. Reasons are Eastwall's own codes
//! (`no_tls`, `mfa_wrong_code`, `shutdown`, ...): a reason that is not such a code (a policy
//! rule's sentence, which may quote the requested role or database) is counted as `policy`,
//! and each labelled family accepts at most [`MAX_LABEL_VALUES`] distinct values, after which
//! new ones are counted as `other`. No SPIFFE ID, role, database or address is ever a label.
//!
//! # Names (labels in braces)
//!
//! `eastwall_decisions_total{event,decision,reason}` (every line with a decision but
//! `session_end`, which repeats its session's), `eastwall_session_ends_total{reason}`,
//! `eastwall_alerts_total{kind}`, `eastwall_signals_total{signal}`,
//! `eastwall_detect_lines_dropped_total` (decision-log lines the inline detectors missed
//! because their queue was full), `eastwall_detect_state_bytes` (their state's estimated size),
//! `eastwall_ocsf_lines_dropped_total` (lines the `[audit] ocsf` file missed, same reason),
//! `eastwall_sessions_active`, `eastwall_locks_active`,
//! `eastwall_handshake_duration_seconds`, `eastwall_upstream_login_duration_seconds`,
//! `eastwall_audit_write_duration_seconds` (histograms),
//! `eastwall_config_reloads_total{result}`, `eastwall_bytes_total{direction}`,
//! `eastwall_certificate_expiry_timestamp_seconds{cert}` (`cert="proxy"`: the proxy's own
//! certificate's notAfter; `cert="crl"`: the earliest nextUpdate of the CRLs in force).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::audit::{Entry, Observer};

/// The most distinct values one labelled family takes (beside `other`, which the later ones
/// become).
pub const MAX_LABEL_VALUES: usize = 64;
/// The longest reason code kept as a label value.
const MAX_LABEL_LEN: usize = 48;

/// The content type of [`Metrics::encode`]'s output (OpenMetrics 1.0 text).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`Metrics::encode_classic`]'s output (Prometheus text 0.0.4).
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    event: String,
    decision: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignalLabel {
    signal: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabel {
    cert: &'static str,
}

/// Which values a label has taken so far, capped at [`MAX_LABEL_VALUES`].
#[derive(Default)]
struct LabelCap {
    seen: Mutex<HashSet<String>>,
}

impl LabelCap {
    /// `value` when it is a code (`[a-z0-9_]`, starting with a letter, at most 48 bytes) and
    /// the cap has room or already holds it; `fallback` for other text; `other` past the cap.
    fn admit(&self, value: &str, fallback: &str) -> String {
        let value = if is_code(value) { value } else { fallback };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(value) {
            return value.to_owned();
        }
        if seen.len() >= MAX_LABEL_VALUES {
            return "other".to_owned();
        }
        seen.insert(value.to_owned());
        value.to_owned()
    }
}

/// Whether `s` looks like one of Eastwall's own reason codes rather than a sentence.
fn is_code(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LABEL_LEN
        && s.as_bytes()[0].is_ascii_lowercase()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Every metric the sidecar exports, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    decision_labels: LabelCap,
    session_ends: Family<ReasonLabel, Counter>,
    end_labels: LabelCap,
    alerts: Family<KindLabel, Counter>,
    alert_labels: LabelCap,
    signals: Family<SignalLabel, Counter>,
    signal_labels: LabelCap,
    config_reloads: Family<ResultLabel, Counter>,
    reload_labels: LabelCap,
    bytes: Family<DirectionLabel, Counter>,
    sessions_active: Gauge,
    locks_active: Gauge,
    detect_dropped: Counter,
    detect_state_bytes: Gauge,
    ocsf_dropped: Counter,
    /// `[fleet]`: see [`FleetMetrics`].
    pub fleet: FleetMetrics,
    handshake: Histogram,
    upstream_login: Histogram,
    audit_write: Histogram,
    cert_expiry: Family<CertLabel, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The fleet control plane's figures (all zero without `[fleet]`).
#[derive(Clone, Default)]
pub struct FleetMetrics {
    /// 1 while the last read of the bucket succeeded within `max_staleness`, else 0.
    pub fresh: Gauge,
    /// Seconds since the bucket was last read successfully.
    pub staleness: Gauge,
    /// The version of the fleet policy in force (0: the local policy file).
    pub policy_version: Gauge,
    /// Decision-log lines published to the fleet stream.
    pub published: Counter,
    /// Lines the fleet copy missed (backlog full or publish failed); the local log has them.
    pub dropped: Counter,
    /// Values in the bucket refused (bad signature, not an admin, rollback, invalid).
    pub refused: Counter,
}

impl FleetMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = FleetMetrics::default();
        registry.register(
            "fleet_fresh",
            "1 while the fleet control plane was read within [fleet] max_staleness",
            m.fresh.clone(),
        );
        registry.register_with_unit(
            "fleet_staleness",
            "Time since the fleet bucket was last read successfully",
            Unit::Seconds,
            m.staleness.clone(),
        );
        registry.register(
            "fleet_policy_version",
            "Version of the fleet policy bundle in force (0: the local policy file)",
            m.policy_version.clone(),
        );
        registry.register(
            "fleet_lines_published",
            "Decision-log lines published to the fleet stream",
            m.published.clone(),
        );
        registry.register(
            "fleet_lines_dropped",
            "Decision-log lines the fleet stream missed (the local log has every line)",
            m.dropped.clone(),
        );
        registry.register(
            "fleet_values_refused",
            "Values in the fleet bucket refused (signature, signer, rollback or content)",
            m.refused.clone(),
        );
        m
    }
}

/// Buckets for connection-phase latencies: 1 ms to about 16 s.
fn latency_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 15,
    ))
}

/// Buckets for a decision-log write (queue + write + fdatasync): 50 µs to about 1.6 s.
fn write_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_05, 2.0, 16,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every family registered, at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("eastwall");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Decision-log lines that carry a decision, by event, decision and Eastwall reason code",
            decisions.clone(),
        );
        let session_ends = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "session_ends",
            "Admitted sessions that ended, by reason",
            session_ends.clone(),
        );
        let alerts = Family::<KindLabel, Counter>::default();
        registry.register(
            "alerts",
            "Decision-log lines marked alert, by event",
            alerts.clone(),
        );
        let signals = Family::<SignalLabel, Counter>::default();
        registry.register(
            "signals",
            "Detection signals fired, by signal",
            signals.clone(),
        );
        let detect_dropped = Counter::default();
        registry.register(
            "detect_lines_dropped",
            "Decision-log lines the inline detectors missed because their queue was full",
            detect_dropped.clone(),
        );
        let detect_state_bytes = Gauge::default();
        registry.register(
            "detect_state_bytes",
            "Estimated memory held by the inline detectors' state",
            detect_state_bytes.clone(),
        );
        let ocsf_dropped = Counter::default();
        registry.register(
            "ocsf_lines_dropped",
            "Decision-log lines the [audit] ocsf file missed because its queue was full",
            ocsf_dropped.clone(),
        );
        let fleet = FleetMetrics::register(&mut registry);
        let sessions_active = Gauge::default();
        registry.register(
            "sessions_active",
            "Admitted sessions that have not ended yet",
            sessions_active.clone(),
        );
        let locks_active = Gauge::default();
        registry.register("locks_active", "Locks in force", locks_active.clone());
        let handshake = latency_buckets();
        registry.register_with_unit(
            "handshake_duration",
            "From accept to a finished TLS handshake and startup message, for connections that got that far",
            Unit::Seconds,
            handshake.clone(),
        );
        let upstream_login = latency_buckets();
        registry.register_with_unit(
            "upstream_login_duration",
            "Logins to PostgreSQL on a client's behalf, successful or not",
            Unit::Seconds,
            upstream_login.clone(),
        );
        let audit_write = write_buckets();
        registry.register_with_unit(
            "audit_write_duration",
            "Decision-log writes from queueing to fdatasync, successful or not",
            Unit::Seconds,
            audit_write.clone(),
        );
        let config_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "config_reloads",
            "Reloads of the configuration or the TLS files, by result",
            config_reloads.clone(),
        );
        let bytes = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "bytes",
            "Bytes relayed by ended sessions, by direction",
            bytes.clone(),
        );
        let cert_expiry = Family::<CertLabel, Gauge>::default();
        registry.register_with_unit(
            "certificate_expiry_timestamp",
            "When the proxy's own certificate expires (cert=proxy, its notAfter) and when the CRL in force goes stale (cert=crl, its nextUpdate), in Unix seconds",
            Unit::Seconds,
            cert_expiry.clone(),
        );
        Self {
            registry,
            decisions,
            decision_labels: LabelCap::default(),
            session_ends,
            end_labels: LabelCap::default(),
            alerts,
            alert_labels: LabelCap::default(),
            signals,
            signal_labels: LabelCap::default(),
            config_reloads,
            reload_labels: LabelCap::default(),
            bytes,
            sessions_active,
            locks_active,
            detect_dropped,
            detect_state_bytes,
            ocsf_dropped,
            fleet,
            handshake,
            upstream_login,
            audit_write,
            cert_expiry,
        }
    }

    /// The exposition (OpenMetrics text, [`CONTENT_TYPE`]), with `sessions_active` set to
    /// `live` first.
    pub fn encode(&self, live: usize) -> String {
        self.sessions_active
            .set(i64::try_from(live).unwrap_or(i64::MAX));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            // Writing to a String does not fail; an empty body would still parse.
            out.clear();
        }
        out
    }

    /// The same exposition in the classic Prometheus text format (0.0.4), for clients that
    /// do not ask for OpenMetrics (curl, `promtool check metrics`): see [`to_classic`].
    pub fn encode_classic(&self, live: usize) -> String {
        to_classic(&self.encode(live))
    }

    /// Sets `eastwall_locks_active` (called by whoever owns the locks).
    pub fn set_locks_active(&self, n: usize) {
        self.locks_active.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Sets the detectors' figures: lines missed so far (a running total) and state size.
    pub fn set_detect(&self, dropped_total: u64, state_bytes: usize) {
        let seen = self.detect_dropped.get();
        if dropped_total > seen {
            self.detect_dropped.inc_by(dropped_total - seen);
        }
        self.detect_state_bytes
            .set(i64::try_from(state_bytes).unwrap_or(i64::MAX));
    }

    /// Sets the OCSF file's missed lines (a running total).
    pub fn set_ocsf_dropped(&self, dropped_total: u64) {
        let seen = self.ocsf_dropped.get();
        if dropped_total > seen {
            self.ocsf_dropped.inc_by(dropped_total - seen);
        }
    }

    /// Counts one fired detection signal (`signal` is the detector's name).
    pub fn signal(&self, signal: &str) {
        let signal = self.signal_labels.admit(signal, "other");
        self.signals.get_or_create(&SignalLabel { signal }).inc();
    }

    /// Counts one reload of the configuration or TLS files; `result` is `ok` or `error`.
    pub fn config_reload(&self, result: &str) {
        let result = self.reload_labels.admit(result, "other");
        self.config_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Records how long a connection took from accept to a finished front door.
    pub fn observe_handshake(&self, took: Duration) {
        self.handshake.observe(took.as_secs_f64());
    }

    /// The upstream-login histogram, for [`crate::upstream::Upstream`] to observe.
    pub fn upstream_login_histogram(&self) -> Histogram {
        self.upstream_login.clone()
    }

    /// Sets the proxy certificate's notAfter (`cert="proxy"`) and the CRL's earliest
    /// nextUpdate (`cert="crl"`, removed when no CRL is configured).
    pub fn set_expiry(&self, e: &crate::expiry::Expiries) {
        for (cert, at) in [("proxy", e.proxy), ("ca", e.ca), ("crl", e.crl)] {
            match at {
                Some(at) => {
                    let secs = match at.duration_since(SystemTime::UNIX_EPOCH) {
                        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                        Err(before) => {
                            -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX)
                        }
                    };
                    self.cert_expiry
                        .get_or_create(&CertLabel { cert })
                        .set(secs);
                }
                None => {
                    self.cert_expiry.remove(&CertLabel { cert });
                }
            }
        }
    }
}

impl Observer for Metrics {
    fn written(&self, entry: &Entry, took: Duration, ok: bool) {
        self.audit_write.observe(took.as_secs_f64());
        if !ok {
            return;
        }
        if entry.event == "refusals_summary" {
            // Unauthenticated refusals past the per-source burst get no line of their own
            // (crate::refusals): their summary carries the count per reason, counted here
            // as the connect refusals they were.
            if let Some(reasons) = entry.extra.get("reasons").and_then(|v| v.as_object()) {
                for (reason, n) in reasons {
                    let labels = DecisionLabels {
                        event: self.decision_labels.admit("connect", "other"),
                        decision: "deny".to_owned(),
                        reason: self.decision_labels.admit(reason, "other"),
                    };
                    self.decisions
                        .get_or_create(&labels)
                        .inc_by(n.as_u64().unwrap_or(0));
                }
            }
        } else if let (Some(decision), false) = (entry.decision, entry.event == "session_end") {
            // A session_end line repeats its session's decision; it is counted as an end.
            let labels = DecisionLabels {
                event: self.decision_labels.admit(entry.event, "other"),
                decision: decision.to_owned(),
                reason: self.decision_labels.admit(&entry.reason, "policy"),
            };
            self.decisions.get_or_create(&labels).inc();
        }
        if entry.alert {
            let kind = self.alert_labels.admit(entry.event, "other");
            self.alerts.get_or_create(&KindLabel { kind }).inc();
        }
        match entry.event {
            "session_end" => {
                let reason = self.end_labels.admit(&entry.reason, "other");
                self.session_ends
                    .get_or_create(&ReasonLabel { reason })
                    .inc();
                for (field, direction) in [
                    ("bytes_client_to_server", "client_to_server"),
                    ("bytes_server_to_client", "server_to_client"),
                ] {
                    if let Some(n) = entry.extra.get(field).and_then(|v| v.as_u64()) {
                        self.bytes
                            .get_or_create(&DirectionLabel { direction })
                            .inc_by(n);
                    }
                }
            }
            "signal" => {
                let name = entry
                    .extra
                    .get("signal")
                    .and_then(|v| v.as_str())
                    .unwrap_or("other");
                self.signal(name);
            }
            "config_reload" => {
                let result = entry
                    .extra
                    .get("result")
                    .and_then(|v| v.as_str())
                    .unwrap_or("other");
                self.config_reload(result);
            }
            _ => {}
        }
    }
}

/// Rewrites prometheus-client's OpenMetrics text as Prometheus text 0.0.4. The samples are
/// the same lines; only the metadata differs between the two formats: a counter family is
/// named without `_total` in OpenMetrics (`# TYPE eastwall_decisions counter`) and with it
/// in 0.0.4 (the name its samples carry), and 0.0.4 has no `# UNIT` line and no `# EOF`.
/// Metadata lines come before each family's samples, `# HELP` first, as the client writes
/// them.
pub fn to_classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // The family's # HELP line, held until its # TYPE says whether it is a counter.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, text)) = help.take() {
                push_meta(&mut out, "HELP", name, "", text);
            }
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let suffix = if kind == "counter" { "_total" } else { "" };
            if let Some((help_name, text)) = help.take() {
                let suffix = if help_name == name { suffix } else { "" };
                push_meta(&mut out, "HELP", help_name, suffix, text);
            }
            push_meta(&mut out, "TYPE", name, suffix, kind);
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else {
            if let Some((name, text)) = help.take() {
                push_meta(&mut out, "HELP", name, "", text);
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    if let Some((name, text)) = help.take() {
        push_meta(&mut out, "HELP", name, "", text);
    }
    out
}

fn push_meta(out: &mut String, what: &str, name: &str, suffix: &str, rest: &str) {
    out.push_str("# ");
    out.push_str(what);
    out.push(' ');
    out.push_str(name);
    out.push_str(suffix);
    out.push(' ');
    out.push_str(rest);
    out.push('\n');
}

/// The notAfter of the first certificate in a PEM file (the proxy's own, first in its
/// chain); None when it cannot be read.
pub fn cert_not_after(path: &Path) -> Option<SystemTime> {
    let pem = std::fs::read(path).ok()?;
    let der = rustls_pemfile::certs(&mut pem.as_slice()).next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let secs = cert.validity().not_after.timestamp();
    let secs = u64::try_from(secs).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(event: &'static str, decision: Option<&'static str>, reason: &str) -> Entry {
        Entry {
            event,
            decision,
            reason: reason.to_owned(),
            ..Entry::default()
        }
    }

    #[test]
    fn decision_lines_are_counted_by_code_and_sentences_become_policy() {
        let m = Metrics::new();
        m.written(
            &entry("connect", Some("deny"), "no_tls"),
            Duration::ZERO,
            true,
        );
        m.written(
            &entry(
                "connect",
                Some("deny"),
                "rule billing allows role billing, not \"evil\"\n{x=\"1\"}",
            ),
            Duration::ZERO,
            true,
        );
        m.written(&entry("connect", Some("allow"), "x"), Duration::ZERO, false);
        let text = m.encode(0);
        assert!(text.contains(
            "eastwall_decisions_total{event=\"connect\",decision=\"deny\",reason=\"no_tls\"} 1\n"
        ));
        assert!(text.contains(
            "eastwall_decisions_total{event=\"connect\",decision=\"deny\",reason=\"policy\"} 1\n"
        ));
        assert!(!text.contains("evil"), "no client text in a label: {text}");
        assert!(
            !text.contains("decision=\"allow\""),
            "a failed write is not counted"
        );
        assert!(text.contains("eastwall_audit_write_duration_seconds_count 3\n"));
    }

    #[test]
    fn summarised_refusals_count_as_the_refusals_they_were() {
        let m = Metrics::new();
        m.written(
            &entry("connect", Some("deny"), "no_tls"),
            Duration::ZERO,
            true,
        );
        let mut summary = entry("refusals_summary", Some("deny"), "suppressed");
        summary.extra.insert(
            "reasons".into(),
            serde_json::json!({"no_tls": 40, "handshake_timeout": 2}),
        );
        m.written(&summary, Duration::ZERO, true);
        let text = m.encode(0);
        assert!(text.contains(
            "eastwall_decisions_total{event=\"connect\",decision=\"deny\",reason=\"no_tls\"} 41\n"
        ));
        assert!(text.contains("reason=\"handshake_timeout\"} 2\n"));
        assert!(!text.contains("suppressed"));
    }

    #[test]
    fn a_flood_of_distinct_reasons_is_capped() {
        let m = Metrics::new();
        for i in 0..1000 {
            let reason = format!("code_{i}");
            m.written(
                &entry("connect", Some("deny"), &reason),
                Duration::ZERO,
                true,
            );
            m.written(&entry("session_end", None, &reason), Duration::ZERO, true);
        }
        let text = m.encode(0);
        let series = text
            .lines()
            .filter(|l| l.starts_with("eastwall_decisions_total{"))
            .count();
        assert!(series <= MAX_LABEL_VALUES + 1, "{series} series");
        assert!(text.contains("reason=\"other\""));
        let ends = text
            .lines()
            .filter(|l| l.starts_with("eastwall_session_ends_total{"))
            .count();
        assert!(ends <= MAX_LABEL_VALUES + 1, "{ends} series");
    }

    #[test]
    fn session_ends_count_bytes_and_alerts_count_by_event() {
        let m = Metrics::new();
        let mut end = entry("session_end", None, "client_closed");
        end.extra.insert("bytes_client_to_server".into(), 10.into());
        end.extra.insert("bytes_server_to_client".into(), 32.into());
        m.written(&end, Duration::ZERO, true);
        let mut alert = entry("connect", Some("deny"), "revoked");
        alert.alert = true;
        m.written(&alert, Duration::ZERO, true);
        m.set_locks_active(3);
        let text = m.encode(2);
        assert!(text.contains("eastwall_session_ends_total{reason=\"client_closed\"} 1\n"));
        assert!(text.contains("eastwall_bytes_total{direction=\"client_to_server\"} 10\n"));
        assert!(text.contains("eastwall_bytes_total{direction=\"server_to_client\"} 32\n"));
        assert!(text.contains("eastwall_alerts_total{kind=\"connect\"} 1\n"));
        assert!(text.contains("eastwall_sessions_active 2\n"));
        assert!(text.contains("eastwall_locks_active 3\n"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn the_classic_format_names_counters_by_their_samples_and_drops_openmetrics_lines() {
        let m = Metrics::new();
        m.written(
            &entry("connect", Some("deny"), "no_tls"),
            Duration::ZERO,
            true,
        );
        let classic = m.encode_classic(1);
        assert!(classic.contains("# HELP eastwall_decisions_total Decision-log lines"));
        assert!(classic.contains("# TYPE eastwall_decisions_total counter\n"));
        assert!(classic.contains(
            "eastwall_decisions_total{event=\"connect\",decision=\"deny\",reason=\"no_tls\"} 1\n"
        ));
        assert!(classic.contains("# TYPE eastwall_sessions_active gauge\n"));
        assert!(classic.contains("# TYPE eastwall_handshake_duration_seconds histogram\n"));
        assert!(!classic.contains("# UNIT"));
        assert!(!classic.contains("# EOF"));
        let samples = |t: &str| t.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples(&classic), samples(&m.encode(1)), "the same samples");
    }

    #[test]
    fn expiry_gauges_are_unix_seconds() {
        let m = Metrics::new();
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        m.set_expiry(&crate::expiry::Expiries {
            proxy: Some(at),
            ca: Some(at + Duration::from_secs(5)),
            ca_latest: Some(at + Duration::from_secs(5)),
            crl: None,
        });
        let text = m.encode(0);
        assert!(text.contains(
            "eastwall_certificate_expiry_timestamp_seconds{cert=\"proxy\"} 1900000000\n"
        ));
        assert!(text
            .contains("eastwall_certificate_expiry_timestamp_seconds{cert=\"ca\"} 1900000005\n"));
        assert!(!text.contains("cert=\"crl\""));
    }
}
