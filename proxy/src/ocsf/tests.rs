use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;

// What OCSF 1.3.0 requires, read from ocsf/ocsf-schema (events/base_event.json,
// events/iam/authentication.json, events/findings/finding.json and detection_finding.json,
// objects/metadata.json, product.json, user.json, network_endpoint.json, finding_info.json,
// analytic.json, evidences.json) and its CHANGELOG (1.4.0 relaxed `finding_info.title` and
// `product.vendor_name`, so both are still required in 1.3.0).

/// Required of every event: the base event's attributes and the metadata object's.
const BASE_REQUIRED: [&str; 10] = [
    "/activity_id",
    "/category_uid",
    "/class_uid",
    "/type_uid",
    "/severity_id",
    "/time",
    "/metadata",
    "/metadata/version",
    "/metadata/product",
    "/metadata/product/vendor_name",
];

/// Required of Authentication (3002): `user`.
const AUTHENTICATION_REQUIRED: [&str; 1] = ["/user"];

/// Required of Detection Finding (2004): `finding_info` and its `uid` and `title`.
const DETECTION_FINDING_REQUIRED: [&str; 3] =
    ["/finding_info", "/finding_info/uid", "/finding_info/title"];

/// `network_endpoint`'s at_least_one constraint.
const ENDPOINT_ONE_OF: [&str; 8] = [
    "ip",
    "uid",
    "name",
    "hostname",
    "svc_name",
    "instance_uid",
    "interface_uid",
    "interface_name",
];

/// `evidences`' at_least_one constraint (1.3.0 list).
const EVIDENCE_ONE_OF: [&str; 18] = [
    "actor",
    "api",
    "connection_info",
    "data",
    "database",
    "databucket",
    "device",
    "dst_endpoint",
    "email",
    "file",
    "process",
    "query",
    "src_endpoint",
    "url",
    "user",
    "job",
    "reg_key",
    "reg_value",
];

/// Every requirement `ev` misses, as readable strings; empty when it is a valid event of its
/// class.
fn missing(ev: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let has = |p: &str| ev.pointer(p).is_some_and(|v| !v.is_null());
    let mut need = |p: &str| {
        if !has(p) {
            out.push(p.to_owned());
        }
    };
    for p in BASE_REQUIRED {
        need(p);
    }
    let class_uid = ev["class_uid"].as_u64().unwrap_or(0);
    match class_uid {
        3002 => {
            for p in AUTHENTICATION_REQUIRED {
                need(p);
            }
        }
        2004 => {
            for p in DETECTION_FINDING_REQUIRED {
                need(p);
            }
        }
        other => out.push(format!("class_uid {other}")),
    }
    let category = ev["category_uid"].as_u64();
    let activity = ev["activity_id"].as_u64().unwrap_or(0);
    match class_uid {
        3002 => {
            if category != Some(3) {
                out.push("category_uid 3".into());
            }
            if !matches!(activity, 1 | 2) {
                out.push(format!("activity_id {activity}"));
            }
            if !["account", "name", "uid"]
                .iter()
                .any(|k| ev["user"][*k].is_string())
            {
                out.push("user: one of account, name, uid".into());
            }
            if !(has("/service") || has("/dst_endpoint")) {
                out.push("one of service, dst_endpoint".into());
            }
            for end in ["src_endpoint", "dst_endpoint"] {
                if has(&format!("/{end}"))
                    && !ENDPOINT_ONE_OF.iter().any(|k| !ev[end][*k].is_null())
                {
                    out.push(format!("{end}: one of {ENDPOINT_ONE_OF:?}"));
                }
            }
            if has("/service") && !ev["service"]["name"].is_string() {
                out.push("service.name".into());
            }
            if !matches!(ev["status_id"].as_u64(), Some(0 | 1 | 2 | 99)) {
                out.push("status_id".into());
            }
        }
        2004 => {
            if category != Some(2) {
                out.push("category_uid 2".into());
            }
            if activity != 1 {
                out.push(format!("activity_id {activity}"));
            }
            if has("/finding_info/analytic") && !has("/finding_info/analytic/type_id") {
                out.push("finding_info.analytic.type_id".into());
            }
            for (i, e) in ev["evidences"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                if !EVIDENCE_ONE_OF.iter().any(|k| !e[*k].is_null()) {
                    out.push(format!("evidences[{i}]: one of {EVIDENCE_ONE_OF:?}"));
                }
            }
        }
        _ => {}
    }
    if ev["type_uid"].as_u64() != Some(class_uid * 100 + activity) {
        out.push("type_uid = class_uid * 100 + activity_id".into());
    }
    if !matches!(ev["severity_id"].as_u64(), Some(0..=6 | 99)) {
        out.push("severity_id in 0..=6 or 99".into());
    }
    if !ev["time"].is_i64() {
        out.push("time as an integer".into());
    }
    if ev["metadata"]["version"] != OCSF_VERSION {
        out.push("metadata.version 1.3.0".into());
    }
    out
}

fn assert_valid(ev: &Value) {
    let missing = missing(ev);
    assert!(missing.is_empty(), "missing {missing:?} in {ev:#}");
}

const TS: &str = "2025-01-02T03:04:05.123456Z";
const TS_MS: i64 = 1_735_787_045_123;
const HASH: &str = "b9e5c0ffee00000000000000000000000000000000000000000000000000beef";

/// A line as the decision log writes it: the fixed fields, then `extra`, then the chain.
fn line(event: &str, decision: Option<&str>, extra: Value) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("ts".into(), json!(TS));
    m.insert("conn_id".into(), json!("c0ffee01"));
    m.insert("event".into(), json!(event));
    m.insert("decision".into(), json!(decision));
    m.insert("peer".into(), json!("10.1.2.3:40000"));
    m.insert(
        "spiffe_id".into(),
        json!("spiffe://corp.example/app/billing"),
    );
    m.insert(
        "cert_serial".into(),
        json!("4114baf779c6b2541eab194ce003cdd8"),
    );
    m.insert("db_user".into(), json!("billing"));
    m.insert("database".into(), json!("billing"));
    m.insert("rule".into(), json!("policy.ew:3"));
    m.insert("reason".into(), json!("allow rule policy.ew:3"));
    m.insert("alert".into(), json!(false));
    if let Value::Object(extra) = extra {
        m.extend(extra);
    }
    m.insert("prev".into(), json!("0".repeat(64)));
    m.insert("hash".into(), json!(HASH));
    Value::Object(m)
}

/// A refusal before any identity: no SVID, no names.
fn anonymous(event: &str, reason: &str) -> Value {
    let mut l = line(
        event,
        Some("deny"),
        json!({ "detail": "plaintext StartupMessage" }),
    );
    for k in ["spiffe_id", "cert_serial", "db_user", "database", "rule"] {
        l[k] = Value::Null;
    }
    l["reason"] = json!(reason);
    l
}

fn signal(name: &str) -> Value {
    let mut l = line(
        "signal",
        None,
        json!({
            "signal": name,
            "time": "2025-01-02T03:04:05Z",
            "kind": "distinct_databases",
            "subject": "source 10.9.0.9",
            "identities": ["spiffe://corp.example/app/billing", "spiffe://corp.example/app/crm"],
            "sources": ["10.9.0.9", "not an address"],
            "targets": ["billing", "crm", "hr"],
            "counts": { "databases": 3 },
            "window": { "from": "2025-01-02T03:00:05Z", "to": "2025-01-02T03:04:05Z", "seconds": 240 },
        }),
    );
    l["alert"] = json!(true);
    for k in [
        "peer",
        "spiffe_id",
        "cert_serial",
        "db_user",
        "database",
        "rule",
    ] {
        l[k] = Value::Null;
    }
    l["reason"] = json!("");
    l
}

fn authentication_lines() -> Vec<Value> {
    let mut lockout = line("mfa_lockout", Some("deny"), json!({}));
    lockout["alert"] = json!(true);
    lockout["reason"] = json!("mfa_locked_out");
    let mut stepup = line(
        "stepup",
        Some("allow"),
        json!({ "cert_sha256": "ab".repeat(32), "mfa_age_s": 0 }),
    );
    stepup["db_user"] = Value::Null;
    stepup["database"] = Value::Null;
    vec![
        line(
            "connect",
            Some("allow"),
            json!({ "tls_version": "TLSv1_3" }),
        ),
        line(
            "connect",
            Some("allow"),
            json!({ "mfa": "totp", "mfa_age_s": 12 }),
        ),
        line("connect", Some("deny"), json!({})),
        anonymous("connect", "no_tls"),
        line("mfa_challenge", Some("challenge"), json!({})),
        line("mfa_success", Some("allow"), json!({})),
        line("mfa_failure", Some("deny"), json!({})),
        lockout,
        stepup,
        line(
            "session_end",
            Some("allow"),
            json!({ "duration_ms": 1500, "bytes_client_to_server": 10, "bytes_server_to_client": 20 }),
        ),
        {
            let mut s = anonymous("refusals_summary", "suppressed");
            s["peer"] = Value::Null;
            s.as_object_mut()
                .unwrap()
                .insert("source".into(), json!("10.6.6.6"));
            s.as_object_mut()
                .unwrap()
                .insert("suppressed".into(), json!(290));
            s
        },
    ]
}

const SIGNALS: [(&str, u64); 5] = [
    ("credential_anomaly", 4),
    ("fan_out", 3),
    ("shared_admin", 3),
    ("new_flow", 2),
    ("odd_hour", 2),
];

#[test]
fn authentication_events_have_every_attribute_ocsf_1_3_requires() {
    for l in authentication_lines() {
        let ev = to_ocsf(&l).unwrap_or_else(|| panic!("no event for {l}"));
        assert_valid(&ev);
        assert_eq!(ev["class_uid"], 3002, "{ev}");
        let expected_activity = if l["event"] == "session_end" { 2 } else { 1 };
        assert_eq!(ev["activity_id"], expected_activity, "{ev}");
        assert_eq!(ev["type_uid"], 300200 + expected_activity, "{ev}");
        assert_eq!(ev["time"], TS_MS);
        assert_eq!(ev["metadata"]["uid"], "c0ffee01");
        assert_eq!(ev["metadata"]["original_time"], TS);
        assert_eq!(ev["metadata"]["log_name"], "decisions");
        assert_eq!(ev["metadata"]["product"]["name"], "Eastwall");
        assert_eq!(
            ev["metadata"]["product"]["version"],
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(ev["auth_protocol"], "mTLS");
        assert!(ev["message"].is_string());
        assert!(ev.get("raw_data").is_none());
    }
}

#[test]
fn the_requirement_check_itself_finds_each_missing_attribute() {
    let auth = to_ocsf(&line("connect", Some("allow"), json!({}))).unwrap();
    let finding = to_ocsf(&signal("fan_out")).unwrap();
    for (ev, pointer) in BASE_REQUIRED
        .iter()
        .chain(&AUTHENTICATION_REQUIRED)
        .map(|p| (&auth, *p))
        .chain(DETECTION_FINDING_REQUIRED.iter().map(|p| (&finding, *p)))
    {
        let mut broken = ev.clone();
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        broken
            .pointer_mut(if parent.is_empty() { "" } else { parent })
            .and_then(Value::as_object_mut)
            .unwrap()
            .remove(key);
        assert!(
            !missing(&broken).is_empty(),
            "{pointer} removed went unnoticed"
        );
    }
    let mut wrong_type = auth.clone();
    wrong_type["type_uid"] = json!(300299);
    assert!(!missing(&wrong_type).is_empty());
    let mut nameless = auth.clone();
    nameless["user"] = json!({ "credential_uid": "x" });
    assert!(!missing(&nameless).is_empty());
    let mut no_target = auth;
    no_target.as_object_mut().unwrap().remove("dst_endpoint");
    no_target.as_object_mut().unwrap().remove("service");
    assert!(!missing(&no_target).is_empty());
    let mut empty_evidence = finding;
    empty_evidence["evidences"] = json!([{ "name": "x" }]);
    assert!(!missing(&empty_evidence).is_empty());
}

#[test]
fn detection_findings_have_every_attribute_ocsf_1_3_requires() {
    for (name, severity) in SIGNALS {
        let ev = to_ocsf(&signal(name)).unwrap();
        assert_valid(&ev);
        assert_eq!(ev["class_uid"], 2004);
        assert_eq!(ev["category_uid"], 2);
        assert_eq!(ev["activity_id"], 1);
        assert_eq!(ev["type_uid"], 200401);
        assert_eq!(ev["severity_id"], severity, "{name}");
        let info = &ev["finding_info"];
        assert_eq!(info["types"], json!([name]));
        assert_eq!(info["analytic"]["name"], name);
        assert!(info["analytic"]["type_id"].as_u64().unwrap() > 0, "{name}");
        assert_eq!(info["first_seen_time"], TS_MS - 240_123);
        assert_eq!(info["last_seen_time"], TS_MS - 123);
        assert_eq!(info["created_time"], TS_MS - 123);
        assert_eq!(
            info["title"],
            format!("{name} (distinct_databases): source 10.9.0.9")
        );
        let evidences = ev["evidences"].as_array().unwrap();
        let data = &evidences[0]["data"];
        assert_eq!(data["targets"], json!(["billing", "crm", "hr"]));
        assert_eq!(data["counts"], json!({ "databases": 3 }));
        assert_eq!(data["identities"].as_array().unwrap().len(), 2);
        // Two identities, one source that is an address.
        assert_eq!(evidences.len(), 4, "{evidences:#?}");
        assert_eq!(evidences[3]["src_endpoint"]["ip"], "10.9.0.9");
        assert_eq!(ev["unmapped"]["kind"], "distinct_databases");
        assert_eq!(ev["unmapped"]["window"]["seconds"], 240);
        assert_eq!(ev["unmapped"]["alert"], true);
    }
    // A detector this table does not know yet still gives a valid finding.
    let ev = to_ocsf(&signal("brand_new")).unwrap();
    assert_valid(&ev);
    assert_eq!(ev["severity_id"], 0);
}

#[test]
fn a_connect_line_maps_its_identity_source_database_and_decision() {
    let ev = to_ocsf(&line(
        "connect",
        Some("allow"),
        json!({ "tls_version": "TLSv1_3" }),
    ))
    .unwrap();
    assert_eq!(
        ev["user"],
        json!({ "name": "billing", "uid": "spiffe://corp.example/app/billing" })
    );
    assert_eq!(
        ev["src_endpoint"],
        json!({ "ip": "10.1.2.3", "port": 40000 })
    );
    assert_eq!(ev["dst_endpoint"], json!({ "svc_name": "postgresql" }));
    assert_eq!(ev["service"], json!({ "name": "billing" }));
    assert_eq!(ev["status_id"], 1);
    assert_eq!(ev["status"], "Success");
    assert_eq!(ev["status_detail"], "allow rule policy.ew:3");
    assert_eq!(ev["severity_id"], 1);
    assert_eq!(ev["is_mfa"], false);
    let unmapped = &ev["unmapped"];
    assert_eq!(unmapped["cert_serial"], "4114baf779c6b2541eab194ce003cdd8");
    assert_eq!(unmapped["rule"], "policy.ew:3");
    assert_eq!(unmapped["decision"], "allow");
    assert_eq!(unmapped["event"], "connect");
    assert_eq!(unmapped["hash"], HASH);
    assert_eq!(unmapped["tls_version"], "TLSv1_3");
    assert!(unmapped.get("prev").is_none() && unmapped.get("ts").is_none());

    let deny = to_ocsf(&line("connect", Some("deny"), json!({}))).unwrap();
    assert_eq!(
        (deny["status_id"].as_u64(), deny["severity_id"].as_u64()),
        (Some(2), Some(2))
    );
    let mut alert = line("connect", Some("deny"), json!({}));
    alert["alert"] = json!(true);
    assert_eq!(to_ocsf(&alert).unwrap()["severity_id"], 4);
    let challenge = to_ocsf(&line("mfa_challenge", Some("challenge"), json!({}))).unwrap();
    assert_eq!(
        (
            challenge["status_id"].as_u64(),
            challenge["is_mfa"].as_bool()
        ),
        (Some(99), Some(true))
    );
    let mfa = to_ocsf(&line("connect", Some("allow"), json!({ "mfa": "totp" }))).unwrap();
    assert_eq!(mfa["is_mfa"], true);

    let nobody = to_ocsf(&anonymous("connect", "no_tls")).unwrap();
    assert_eq!(nobody["user"], json!({ "name": "unknown" }));
    assert!(nobody.get("service").is_none());
    assert_eq!(nobody["unmapped"]["detail"], "plaintext StartupMessage");

    let v6 = {
        let mut l = line("connect", Some("allow"), json!({}));
        l["peer"] = json!("[2001:db8::1]:5432");
        to_ocsf(&l).unwrap()
    };
    assert_eq!(
        v6["src_endpoint"],
        json!({ "ip": "2001:db8::1", "port": 5432 })
    );
}

#[test]
fn a_session_end_is_a_logoff_with_its_duration_and_end_reason() {
    let mut l = line(
        "session_end",
        Some("allow"),
        json!({ "duration_ms": 1500, "bytes_client_to_server": 10, "bytes_server_to_client": 20 }),
    );
    l["reason"] = json!("client_closed");
    let ev = to_ocsf(&l).unwrap();
    assert_eq!(
        (ev["activity_id"].as_u64(), ev["activity_name"].as_str()),
        (Some(2), Some("Logoff"))
    );
    assert_eq!(ev["type_uid"], 300202);
    assert_eq!(ev["status_detail"], "client_closed");
    assert_eq!(ev["duration"], 1500);
    assert_eq!(ev["start_time"], TS_MS - 1500);
    assert_eq!(ev["end_time"], TS_MS);
    assert!(ev["unmapped"].get("duration_ms").is_none());
    assert_eq!(ev["unmapped"]["bytes_server_to_client"], 20);
}

#[test]
fn a_refusals_summary_is_one_failure_counted_for_its_source() {
    let lines = authentication_lines();
    let summary = lines.last().unwrap();
    let ev = to_ocsf(summary).unwrap();
    assert_eq!(ev["status_id"], 2);
    assert_eq!(ev["count"], 290);
    assert_eq!(ev["src_endpoint"], json!({ "ip": "10.6.6.6" }));
    // `*` (all sources) is no address.
    let mut all = summary.clone();
    all["source"] = json!("*");
    assert!(to_ocsf(&all).unwrap().get("src_endpoint").is_none());
}

#[test]
fn a_finding_uid_is_stable_and_tells_signals_apart() {
    let a = to_ocsf(&signal("fan_out")).unwrap();
    let again = to_ocsf(&signal("fan_out")).unwrap();
    assert_eq!(a["finding_info"]["uid"], again["finding_info"]["uid"]);
    // The chain hash is not part of it: a live sink without one gives the same uid.
    let mut unhashed = signal("fan_out");
    unhashed.as_object_mut().unwrap().remove("hash");
    assert_eq!(
        to_ocsf(&unhashed).unwrap()["finding_info"]["uid"],
        a["finding_info"]["uid"]
    );
    let mut other_subject = signal("fan_out");
    other_subject["subject"] = json!("source 10.9.0.10");
    let mut other_conn = signal("fan_out");
    other_conn["conn_id"] = json!("c0ffee02");
    for other in [signal("new_flow"), other_subject, other_conn] {
        assert_ne!(
            to_ocsf(&other).unwrap()["finding_info"]["uid"],
            a["finding_info"]["uid"]
        );
    }
    assert_eq!(a["finding_info"]["uid"].as_str().unwrap().len(), 32);
}

#[test]
fn lines_with_no_ocsf_class_give_none() {
    for event in [
        "log_reopened",
        "config_reload",
        "crl_reload",
        "lock",
        "lock_reload",
        "low_disk_space",
        "log_write_check",
        "cancel",
        "something_new",
        "",
    ] {
        assert_eq!(to_ocsf(&line(event, None, json!({}))), None, "{event}");
    }
}

/// Every hostile variant: no panic, and either None or a valid, bounded event.
fn check_hostile(l: &Value) {
    if let Some(ev) = to_ocsf(l) {
        assert_valid(&ev);
        let size = serde_json::to_vec(&ev).unwrap().len();
        assert!(size < 64 * 1024, "{size} bytes from a hostile line");
    }
}

#[test]
fn hostile_lines_never_panic_and_never_give_an_event_without_its_required_attributes() {
    // Not objects at all.
    for v in [
        json!(null),
        json!(true),
        json!(7),
        json!("connect"),
        json!([line("connect", Some("allow"), json!({}))]),
        json!({}),
    ] {
        assert_eq!(to_ocsf(&v), None, "{v}");
    }
    // No usable time: OCSF's `time` is required, so no event.
    for ts in [
        Value::Null,
        json!(1_735_787_045),
        json!("yesterday"),
        json!("2025-13-40T99:99:99Z"),
        json!(format!("2025-01-02T03:04:05.{}Z", "1".repeat(100_000))),
        json!(["2025-01-02T03:04:05Z"]),
    ] {
        for base in [line("connect", Some("allow"), json!({})), signal("fan_out")] {
            let mut l = base;
            l["ts"] = ts.clone();
            assert_eq!(to_ocsf(&l), None, "ts {ts}");
        }
        let mut missing = line("connect", Some("allow"), json!({}));
        missing.as_object_mut().unwrap().remove("ts");
        assert_eq!(to_ocsf(&missing), None);
    }
    // An event name of the wrong type, or a signal with no name.
    let mut l = line("connect", Some("allow"), json!({}));
    l["event"] = json!(["connect"]);
    assert_eq!(to_ocsf(&l), None);
    for name in [
        Value::Null,
        json!(""),
        json!(4),
        json!({ "signal": "fan_out" }),
    ] {
        let mut s = signal("fan_out");
        s["signal"] = name.clone();
        assert_eq!(to_ocsf(&s), None, "signal {name}");
    }

    let huge = "\u{1F600}x".repeat(20_000); // 100 KB, multi-byte characters at the cut
    let deep = (0..100).fold(json!("bottom"), |v, _| json!([v]));
    let wrong: Vec<Value> = vec![
        Value::Null,
        json!(-1),
        json!(u64::MAX),
        json!(1.5e300),
        json!(true),
        json!(huge),
        json!([huge, huge]),
        json!({ "a": huge }),
        json!((0..10_000).collect::<Vec<_>>()),
        deep.clone(),
        json!("[::1"),
        json!("10.1.2.3:99999"),
        json!("10.1.2.3"),
    ];
    let mut bases = authentication_lines();
    bases.extend(SIGNALS.iter().map(|(name, _)| signal(name)));
    for base in &bases {
        let keys: Vec<String> = base.as_object().unwrap().keys().cloned().collect();
        for key in keys.iter().filter(|k| *k != "ts" && *k != "event") {
            for w in &wrong {
                let mut l = base.clone();
                l[key.as_str()] = w.clone();
                check_hostile(&l);
            }
        }
        // Every field huge at once, plus many and huge extra keys.
        let mut l = base.clone();
        for key in keys
            .iter()
            .filter(|k| *k != "ts" && *k != "event" && *k != "signal")
        {
            l[key.as_str()] = json!(huge);
        }
        let map = l.as_object_mut().unwrap();
        for i in 0..500 {
            map.insert(format!("extra_{i}"), json!(huge));
        }
        map.insert(huge.clone(), json!(huge));
        map.insert("nested".into(), deep.clone());
        check_hostile(&l);
        let ev = to_ocsf(&l);
        if let Some(ev) = ev {
            assert_eq!(ev["unmapped"]["truncated"], true, "{}", base["event"]);
        }
    }
    // A window of the wrong shape, lists of non-strings, counts of strings.
    let mut s = signal("fan_out");
    s["window"] = json!({ "from": 5, "to": ["x"] });
    s["identities"] = json!([1, null, {}, [huge]]);
    s["sources"] = json!("10.9.0.9");
    s["counts"] = json!({ "n": huge });
    check_hostile(&s);
    let ev = to_ocsf(&s).unwrap();
    assert!(ev["finding_info"].get("first_seen_time").is_none());
    assert_eq!(ev["evidences"].as_array().unwrap().len(), 1);
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        Just(json!("10.1.2.3:5432")),
        Just(json!("2025-01-02T03:04:05Z")),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            prop::collection::btree_map(".{0,12}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any value in any field of any mapped event: no panic, and a valid event or None.
    #[test]
    fn arbitrary_field_values_never_break_an_event(
        which in 0usize..16,
        field in prop::sample::select(vec![
            "conn_id", "decision", "peer", "spiffe_id", "cert_serial", "db_user", "database",
            "rule", "reason", "alert", "duration_ms", "suppressed", "source", "signal", "time",
            "kind", "subject", "identities", "sources", "targets", "counts", "window", "mfa",
        ]),
        value in any_json(),
    ) {
        let mut bases = authentication_lines();
        bases.extend(SIGNALS.iter().map(|(name, _)| signal(name)));
        let mut l = bases[which % bases.len()].clone();
        l[field] = value;
        check_hostile(&l);
    }
}
