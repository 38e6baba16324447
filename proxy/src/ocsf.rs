//! OCSF 1.3.0 events from decision-log lines: [`to_ocsf`] maps one line to an Authentication (3002) or Detection Finding (2004) event, a pure function whose output is bounded.

use std::net::{IpAddr, SocketAddr};

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// The OCSF schema version the events follow (`metadata.version`).
pub const OCSF_VERSION: &str = "1.3.0";

/// Longest string, in bytes, copied from a line into an event; longer ones are cut and marked.
pub const MAX_TEXT: usize = crate::audit::MAX_FIELD_BYTES;

/// Most items copied from one list, and most keys from one object.
const MAX_ITEMS: usize = 64;

/// Most `user` and `src_endpoint` evidences in one finding.
const MAX_EVIDENCES: usize = 16;

/// Deepest nesting copied from an extra field.
const MAX_DEPTH: usize = 4;

/// Bytes of copied content (`unmapped` extras, evidence data) per event.
const COPY_BUDGET: usize = 16 * 1024;

const AUTHENTICATION: u64 = 3002;
const DETECTION_FINDING: u64 = 2004;

/// How many fixed and chain fields a line has: the log's own [`crate::audit::FIELDS`], then
/// `prev` and `hash`.
const FIXED_COUNT: usize = crate::audit::FIELDS.len() + 2;

/// A fixed or chain field: mapped or put in `unmapped` by name, never copied as an extra.
fn is_fixed(key: &str) -> bool {
    crate::audit::FIELDS.contains(&key) || key == "prev" || key == "hash"
}

/// One decision-log line as one OCSF 1.3.0 event, or None for a line with no OCSF class.
/// Never panics, whatever `line` holds; cheap enough to call on every line as it is written.
///
/// # Which lines become which events
///
/// | line `event` | OCSF event | `activity_id` | `status_id` |
/// |---|---|---|---|
/// | `connect`, `stepup`, `mfa_challenge`, `mfa_success`, `mfa_failure`, `mfa_lockout` | Authentication (3002) | 1 Logon | `decision` `allow` 1 Success, `deny` 2 Failure, `challenge` 99 Other (`status` "Challenge": the certificate passed, the MFA code is still owed), none 0 Unknown |
/// | `refusals_summary` | Authentication (3002) | 1 Logon | 2 Failure, with `count` = the refusals it stands for |
/// | `session_end` | Authentication (3002) | 2 Logoff | as its `decision` (`allow`: 1 Success); `status_detail` is the end reason, `duration` / `start_time` / `end_time` from `duration_ms` |
/// | `signal` | Detection Finding (2004) | 1 Create | 1 New (a finding's lifecycle status) |
/// | anything else: `cancel`, `lock`, `lock_reload`, `log_reopened`, `config_reload`, `crl_reload`, `low_disk_space`, `log_write_check`, ... | none ([`None`]) | | |
///
/// The last row is a decision: those lines are the sidecar's own operations (rotation, reloads,
/// disk space, operators' locks, query cancels), not authentications or detections. A Base
/// Event (class 0) for each would be a class a SIEM routes nowhere; the hash-chained log stays
/// the complete record, and `eastwall audit ocsf` reports how many lines it skipped.
///
/// [`None`] also for a line that is not a JSON object, whose `event` is not a string, whose
/// `ts` is not RFC 3339 (OCSF's `time` is required), or a `signal` line without a `signal`
/// name: every event returned has the attributes OCSF 1.3.0 requires of its class.
///
/// # Attributes
///
/// Every event: `class_uid`, `category_uid`, `activity_id`, `type_uid` (`class_uid * 100 +
/// activity_id`) with their names, `time` (epoch ms of `ts`), `severity_id`, `message`,
/// `metadata` {`version` "1.3.0", `product` {`name`, `vendor_name` "Eastwall", `version`},
/// `uid` = `conn_id`, `log_name` "decisions", `original_time` = `ts`}, and `unmapped` for what
/// OCSF has no attribute for: `event`, `decision`, `rule`, `alert`, `cert_serial`, the line's
/// chain `hash`, and the event's extra fields. No `raw_data`: the line is in the log.
///
/// Authentication: `user` {`name` = `db_user`, `uid` = `spiffe_id`} (OCSF requires a user;
/// a refusal before any name was given has `name` "unknown"), `src_endpoint` {`ip`, `port`}
/// from `peer`, `dst_endpoint` {`svc_name` "postgresql", or "eastwall-stepup" for the step-up
/// endpoint}, `service` {`name` = `database`}, `auth_protocol_id` 99 / `auth_protocol` "mTLS",
/// `logon_type_id` 3 Network, `is_remote`, `is_mfa` (MFA events, step-ups, and connects that
/// passed MFA), `status_detail` = `reason`. Severity: 4 High when the line is an alert, 2 Low
/// for a failure, otherwise 1 Informational. The certificate serial stays in `unmapped`: OCSF's
/// `certificate` object requires an `issuer`, which the line does not carry.
///
/// Detection Finding: `finding_info` {`uid` (stable: SHA-256 of `conn_id`, signal, kind,
/// subject and the signal's time, so a line converted live and offline gives the same uid),
/// `title`, `types` [signal], `analytic` {`name`, `uid`, `type_id`}, `created_time`,
/// `first_seen_time` / `last_seen_time` from the window}, `evidences` (one `data` evidence with
/// the subject, kind, identities, sources, targets and counts; a `user` evidence per identity
/// and a `src_endpoint` evidence per source address), `severity_id` by signal:
/// `credential_anomaly` 4 High, `fan_out` and `shared_admin` 3 Medium, `new_flow` and
/// `odd_hour` 2 Low, any other 0 Unknown.
///
/// # Bounds
///
/// Strings copied from the line are cut to [`MAX_TEXT`] bytes (marked `...[truncated, N
/// bytes]`); lists and objects copied to at most 64 items, 4 levels deep, and at most 16 KiB of
/// copied content per event, after which `unmapped.truncated` is `true`. So a line of any size
/// gives an event of a few tens of KiB at most, and the work is linear in what is copied.
pub fn to_ocsf(line: &Value) -> Option<Value> {
    let map = line.as_object()?;
    let event = map.get("event")?.as_str()?;
    let ts = map.get("ts")?.as_str()?;
    let time = epoch_ms(ts)?;
    let mut copier = Copier::new();
    let mut out = match event {
        "connect" | "stepup" | "mfa_challenge" | "mfa_success" | "mfa_failure" | "mfa_lockout"
        | "refusals_summary" | "session_end" => authentication(map, event, time),
        "signal" => detection_finding(map, time, &mut copier)?,
        _ => return None,
    };
    out.insert("time".into(), json!(time));
    out.insert("metadata".into(), metadata(map, ts));
    out.insert(
        "unmapped".into(),
        Value::Object(unmapped(map, event, &mut copier)),
    );
    Some(Value::Object(out))
}

fn authentication(map: &Map<String, Value>, event: &str, time: i64) -> Map<String, Value> {
    let (activity_id, activity) = if event == "session_end" {
        (2, "Logoff")
    } else {
        (1, "Logon")
    };
    let decision = map.get("decision").and_then(Value::as_str);
    let (status_id, status) = match (event, decision) {
        ("refusals_summary", _) => (2, "Failure"),
        (_, Some("allow")) => (1, "Success"),
        (_, Some("deny")) => (2, "Failure"),
        (_, Some("challenge")) => (99, "Challenge"),
        _ => (0, "Unknown"),
    };
    let alert = map.get("alert") == Some(&Value::Bool(true));
    let (severity_id, severity) = if alert {
        (4, "High")
    } else if status_id == 2 {
        (2, "Low")
    } else {
        (1, "Informational")
    };
    let stepup = event == "stepup";
    let is_mfa =
        stepup || event.starts_with("mfa_") || map.get("mfa").is_some_and(|m| m.is_string());

    let mut out = Map::new();
    class(
        &mut out,
        AUTHENTICATION,
        "Authentication",
        3,
        "Identity & Access Management",
        activity_id,
        activity,
    );
    out.insert("severity_id".into(), json!(severity_id));
    out.insert("severity".into(), json!(severity));
    out.insert("status_id".into(), json!(status_id));
    out.insert("status".into(), json!(status));
    let reason = text(map, "reason");
    if let Some(reason) = &reason {
        out.insert("status_detail".into(), json!(reason));
    }

    let mut user = Map::new();
    if let Some(name) = text(map, "db_user") {
        user.insert("name".into(), json!(name));
    }
    if let Some(uid) = text(map, "spiffe_id") {
        user.insert("uid".into(), json!(uid));
    }
    if user.is_empty() {
        // OCSF requires a user; nothing was proven or even claimed yet.
        user.insert("name".into(), json!("unknown"));
    }
    out.insert("user".into(), Value::Object(user));

    let src = match event {
        "refusals_summary" => map
            .get("source")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<IpAddr>().ok())
            .map(|ip| json!({ "ip": ip.to_string() })),
        _ => peer(map).map(|p| json!({ "ip": p.ip().to_string(), "port": p.port() })),
    };
    if let Some(src) = src {
        out.insert("src_endpoint".into(), src);
    }
    let svc = if stepup {
        "eastwall-stepup"
    } else {
        "postgresql"
    };
    out.insert("dst_endpoint".into(), json!({ "svc_name": svc }));
    if let Some(database) = text(map, "database") {
        out.insert("service".into(), json!({ "name": database }));
    }
    out.insert("auth_protocol_id".into(), json!(99));
    out.insert("auth_protocol".into(), json!("mTLS"));
    out.insert("logon_type_id".into(), json!(3));
    out.insert("logon_type".into(), json!("Network"));
    out.insert("is_remote".into(), json!(true));
    out.insert("is_mfa".into(), json!(is_mfa));

    if event == "session_end" {
        let duration = map
            .get("duration_ms")
            .and_then(Value::as_u64)
            .and_then(|d| i64::try_from(d).ok());
        if let Some(start) = duration.and_then(|d| time.checked_sub(d).map(|s| (d, s))) {
            out.insert("duration".into(), json!(start.0));
            out.insert("start_time".into(), json!(start.1));
            out.insert("end_time".into(), json!(time));
        }
    }
    if event == "refusals_summary" {
        if let Some(n) = map.get("suppressed").and_then(Value::as_u64) {
            out.insert("count".into(), json!(n));
        }
    }

    let who = text(map, "spiffe_id")
        .or_else(|| text(map, "db_user"))
        .unwrap_or_else(|| "unknown client".into());
    let decided = decision.map(clip).unwrap_or_else(|| "-".into());
    let message = match &reason {
        Some(reason) => format!("{event} {decided}: {who}: {reason}"),
        None => format!("{event} {decided}: {who}"),
    };
    out.insert("message".into(), json!(message));
    out
}

fn detection_finding(
    map: &Map<String, Value>,
    time: i64,
    copier: &mut Copier,
) -> Option<Map<String, Value>> {
    let name = text(map, "signal")?;
    let kind = text(map, "kind").unwrap_or_default();
    let subject = text(map, "subject").unwrap_or_default();
    let signal_time = text(map, "time").unwrap_or_default();
    let (severity_id, severity) = match name.as_str() {
        "credential_anomaly" => (4, "High"),
        "fan_out" | "shared_admin" => (3, "Medium"),
        "new_flow" | "odd_hour" => (2, "Low"),
        _ => (0, "Unknown"),
    };
    // new_flow and odd_hour compare with a learned baseline; fan_out counts in a window;
    // shared_admin and credential_anomaly are rules over what was seen.
    let (type_id, analytic_type) = match name.as_str() {
        "new_flow" | "odd_hour" => (2, "Behavioral"),
        "fan_out" => (3, "Statistical"),
        "shared_admin" | "credential_anomaly" => (1, "Rule"),
        _ => (0, "Unknown"),
    };

    let mut out = Map::new();
    class(
        &mut out,
        DETECTION_FINDING,
        "Detection Finding",
        2,
        "Findings",
        1,
        "Create",
    );
    out.insert("severity_id".into(), json!(severity_id));
    out.insert("severity".into(), json!(severity));
    out.insert("status_id".into(), json!(1));
    out.insert("status".into(), json!("New"));

    let title = match (kind.is_empty(), subject.is_empty()) {
        (false, false) => format!("{name} ({kind}): {subject}"),
        (false, true) => format!("{name} ({kind})"),
        (true, false) => format!("{name}: {subject}"),
        (true, true) => name.clone(),
    };
    let conn_id = text(map, "conn_id").unwrap_or_default();
    let mut info = Map::new();
    info.insert(
        "uid".into(),
        json!(finding_uid(&[
            &conn_id,
            &name,
            &kind,
            &subject,
            &signal_time
        ])),
    );
    info.insert("title".into(), json!(title));
    info.insert("types".into(), json!([name]));
    info.insert(
        "analytic".into(),
        json!({
            "name": name,
            "uid": format!("eastwall/{name}"),
            "type_id": type_id,
            "type": analytic_type,
        }),
    );
    info.insert(
        "created_time".into(),
        json!(epoch_ms(&signal_time).unwrap_or(time)),
    );
    if let Some(window) = map.get("window").and_then(Value::as_object) {
        let at = |k: &str| window.get(k).and_then(Value::as_str).and_then(epoch_ms);
        if let Some(from) = at("from") {
            info.insert("first_seen_time".into(), json!(from));
        }
        if let Some(to) = at("to") {
            info.insert("last_seen_time".into(), json!(to));
        }
    }
    out.insert("finding_info".into(), Value::Object(info));

    let mut evidences = Vec::new();
    let mut data = Map::new();
    data.insert("subject".into(), json!(subject));
    data.insert("kind".into(), json!(kind));
    for key in ["identities", "sources", "targets", "counts"] {
        if let Some(v) = map.get(key) {
            data.insert(key.into(), copier.copy(v, 0));
        }
    }
    evidences.push(json!({ "data": data }));
    let strings = |key: &str| -> Vec<String> {
        map.get(key)
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .take(MAX_EVIDENCES)
                    .map(clip)
                    .collect()
            })
            .unwrap_or_default()
    };
    for id in strings("identities") {
        evidences.push(json!({ "user": { "uid": id } }));
    }
    for source in strings("sources") {
        if let Ok(ip) = source.parse::<IpAddr>() {
            evidences.push(json!({ "src_endpoint": { "ip": ip.to_string() } }));
        }
    }
    out.insert("evidences".into(), Value::Array(evidences));
    out.insert("message".into(), json!(title));
    Some(out)
}

/// The classification attributes, with their captions.
fn class(
    out: &mut Map<String, Value>,
    class_uid: u64,
    class_name: &str,
    category_uid: u64,
    category_name: &str,
    activity_id: u64,
    activity_name: &str,
) {
    out.insert("class_uid".into(), json!(class_uid));
    out.insert("class_name".into(), json!(class_name));
    out.insert("category_uid".into(), json!(category_uid));
    out.insert("category_name".into(), json!(category_name));
    out.insert("activity_id".into(), json!(activity_id));
    out.insert("activity_name".into(), json!(activity_name));
    out.insert("type_uid".into(), json!(class_uid * 100 + activity_id));
    out.insert(
        "type_name".into(),
        json!(format!("{class_name}: {activity_name}")),
    );
}

fn metadata(map: &Map<String, Value>, ts: &str) -> Value {
    let mut m = Map::new();
    m.insert("version".into(), json!(OCSF_VERSION));
    m.insert(
        "product".into(),
        json!({
            "name": "Eastwall",
            "vendor_name": "Eastwall",
            "version": env!("CARGO_PKG_VERSION"),
        }),
    );
    if let Some(uid) = text(map, "conn_id") {
        m.insert("uid".into(), json!(uid));
    }
    m.insert("log_name".into(), json!("decisions"));
    m.insert("original_time".into(), json!(clip(ts)));
    Value::Object(m)
}

/// What OCSF has no attribute for: the fixed fields not mapped, the chain hash, and the
/// event's extra fields (those mapped, like `duration_ms`, left out).
fn unmapped(map: &Map<String, Value>, event: &str, copier: &mut Copier) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("event".into(), json!(clip(event)));
    for key in ["decision", "rule", "cert_serial"] {
        if let Some(v) = text(map, key) {
            out.insert(key.into(), json!(v));
        }
    }
    if let Some(alert) = map.get("alert").and_then(Value::as_bool) {
        out.insert("alert".into(), json!(alert));
    }
    if peer(map).is_none() {
        if let Some(p) = text(map, "peer") {
            out.insert("peer".into(), json!(p));
        }
    }
    if let Some(hash) = text(map, "hash") {
        out.insert("hash".into(), json!(hash));
    }
    let mapped: &[&str] = match event {
        "session_end" => &["duration_ms"],
        "refusals_summary" => &["suppressed"],
        "signal" => &[
            "signal",
            "time",
            "identities",
            "sources",
            "targets",
            "counts",
        ],
        _ => &[],
    };
    for (key, value) in map.iter().take(FIXED_COUNT + MAX_ITEMS) {
        if is_fixed(key) || mapped.contains(&key.as_str()) {
            continue;
        }
        if copier.exhausted() {
            copier.truncated = true;
            break;
        }
        let key = clip(key);
        copier.spend(key.len());
        let value = copier.copy(value, 0);
        out.insert(key, value);
    }
    if map.len() > FIXED_COUNT + MAX_ITEMS {
        copier.truncated = true;
    }
    if copier.truncated {
        out.insert("truncated".into(), json!(true));
    }
    out
}

/// Copies JSON within the event's budget: strings cut, lists and objects shortened, nesting
/// limited; records whether anything was left out.
struct Copier {
    budget: usize,
    truncated: bool,
}

impl Copier {
    fn new() -> Copier {
        Copier {
            budget: COPY_BUDGET,
            truncated: false,
        }
    }

    fn exhausted(&self) -> bool {
        self.budget == 0
    }

    fn spend(&mut self, n: usize) {
        self.budget = self.budget.saturating_sub(n);
    }

    fn copy(&mut self, v: &Value, depth: usize) -> Value {
        match v {
            Value::String(s) => {
                if s.len() > MAX_TEXT {
                    self.truncated = true;
                }
                let s = clip(s);
                self.spend(s.len() + 2);
                Value::String(s)
            }
            Value::Array(_) | Value::Object(_) if depth >= MAX_DEPTH => {
                self.truncated = true;
                Value::Null
            }
            Value::Array(items) => {
                let mut out = Vec::new();
                for item in items {
                    if out.len() == MAX_ITEMS || self.exhausted() {
                        self.truncated = true;
                        break;
                    }
                    out.push(self.copy(item, depth + 1));
                }
                self.spend(2);
                Value::Array(out)
            }
            Value::Object(map) => {
                let mut out = Map::new();
                for (key, item) in map {
                    if out.len() == MAX_ITEMS || self.exhausted() {
                        self.truncated = true;
                        break;
                    }
                    let key = clip(key);
                    self.spend(key.len() + 3);
                    let item = self.copy(item, depth + 1);
                    out.insert(key, item);
                }
                self.spend(2);
                Value::Object(out)
            }
            scalar => {
                self.spend(8);
                scalar.clone()
            }
        }
    }
}

/// A non-empty string field, cut to [`MAX_TEXT`].
fn text(map: &Map<String, Value>, key: &str) -> Option<String> {
    match map.get(key)? {
        Value::String(s) if !s.is_empty() => Some(clip(s)),
        _ => None,
    }
}

/// `s` cut at a character boundary to [`MAX_TEXT`] bytes and marked, as the decision log
/// marks its own cut fields.
fn clip(s: &str) -> String {
    if s.len() <= MAX_TEXT {
        return s.to_owned();
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...[truncated, {} bytes]", &s[..end], s.len())
}

fn peer(map: &Map<String, Value>) -> Option<SocketAddr> {
    let p = map.get("peer")?.as_str()?;
    if p.len() > 64 {
        return None;
    }
    p.parse().ok()
}

/// RFC 3339 as milliseconds since the Unix epoch.
fn epoch_ms(ts: &str) -> Option<i64> {
    if ts.len() > 64 {
        return None;
    }
    let t = time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// 128 bits of SHA-256 over the parts, each length-prefixed so no two part lists collide.
fn finding_uid(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

#[cfg(test)]
mod tests;
