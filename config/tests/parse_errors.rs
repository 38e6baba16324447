//! Policy files that must be refused, each with file:line:col and what was expected.

mod common;

use common::*;
use eastwall_config::Policy;
use proptest::prelude::*;

fn only(errs: &[String], needle: &str) -> String {
    errs.iter()
        .find(|e| e.contains(needle))
        .unwrap_or_else(|| panic!("no error mentions {needle:?}: {errs:#?}"))
        .clone()
}

#[test]
fn unknown_segment_is_an_error_at_its_string() {
    let errs = parse_err("allow:\nfrom: segment(\"ap\")\nto: segment(\"db\")\n");
    let e = only(&errs, "unknown segment \"ap\"");
    assert!(
        e.starts_with("policy.ew:2:15: expected a segment defined in [segments]"),
        "{e}"
    );
    assert!(e.contains("\"app\""), "lists the defined segments: {e}");
}

#[test]
fn unknown_mfa_group_is_an_error() {
    let errs =
        parse_err("allow:\nfrom: segment(\"app\")\nto: segment(\"db\")\nrequire:\n- mfa(admins)\n");
    let e = only(&errs, "unknown group \"admins\"");
    assert!(e.starts_with("policy.ew:5:7:"), "{e}");
}

#[test]
fn misspelled_keyword_is_reported_with_a_suggestion() {
    let errs = parse_err("allow:\nform: segment(\"app\")\nto: segment(\"db\")\n");
    let e = only(&errs, "found `form:`");
    assert!(e.starts_with("policy.ew:2:1: expected `from:`"), "{e}");
    assert!(e.contains("did you mean `from:`?"), "{e}");
}

#[test]
fn misspelled_rule_header_is_reported() {
    let errs = parse_err("alow:\nfrom: segment(\"app\")\nto: segment(\"db\")\n");
    let e = only(&errs, "found `alow:`");
    assert!(e.starts_with("policy.ew:1:1: expected `allow:`"), "{e}");
}

#[test]
fn clause_outside_a_rule_says_where_it_belongs() {
    let errs =
        parse_err("from: segment(\"app\")\nallow:\nfrom: segment(\"app\")\nto: segment(\"db\")\n");
    let e = only(&errs, "policy.ew:1:1:");
    assert!(e.contains("belongs inside a rule"), "{e}");
}

#[test]
fn rule_with_no_to_is_an_error_at_the_rule() {
    let errs = parse_err("# c\nallow:\nfrom: segment(\"app\")\n");
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].starts_with("policy.ew:2:1: expected a `to:` line in this allow rule"),
        "{}",
        errs[0]
    );
}

#[test]
fn rule_with_no_from_is_an_error() {
    let errs = parse_err("deny:\nto: segment(\"db\")\n");
    only(
        &errs,
        "policy.ew:1:1: expected a `from:` line in this deny rule",
    );
}

#[test]
fn every_error_is_reported_not_just_the_first() {
    let errs = parse_err(
        "allow:\nfrom: segment(\"nope\")\nto: segment(\"db\") :99999\nas: role(\"\")\ndeny (and alrt):\nfrom: segment(\"app\")\nto: segment(\"db\")\n",
    );
    only(&errs, "policy.ew:2:15:");
    only(&errs, "policy.ew:3:20: expected a port from 1 to 65535");
    only(&errs, "policy.ew:4:10: expected a role name");
    only(&errs, "policy.ew:5:11: expected `alert`");
    assert_eq!(errs.len(), 4, "one error per mistake: {errs:#?}");
}

#[test]
fn default_action_allow_is_refused_with_the_reason() {
    let errs = parse_err("default action = ALLOW\n");
    only(&errs, "policy.ew:1:18: expected `DENY`");
}

#[test]
fn default_action_may_appear_once() {
    let errs = parse_err("default action = DENY\ndefault action = DENY\n");
    only(&errs, "policy.ew:2:1: expected one `default action` line");
}

#[test]
fn require_on_a_deny_rule_is_refused() {
    let errs = parse_err(
        "deny:\nfrom: segment(\"app\")\nto: segment(\"db\")\nrequire:\n- mfa(human_operators)\n",
    );
    only(&errs, "policy.ew:4:1:");
}

#[test]
fn mtls_takes_only_service_identity() {
    let errs = parse_err(
        "allow:\nfrom: segment(\"app\")\nto: segment(\"db\")\nrequire:\n- mtls(shared_password)\n",
    );
    only(&errs, "policy.ew:5:8: expected `service_identity`");
}

#[test]
fn bad_identity_and_unterminated_string_are_located() {
    let errs =
        parse_err("allow:\nfrom: identity(\"spiffe://corp.example/app/\")\nto: segment(\"db)\n");
    only(&errs, "policy.ew:2:16: expected a SPIFFE ID");
    only(&errs, "policy.ew:3:13: expected a closing `\"`");
}

#[test]
fn foreign_identity_is_refused_when_the_trust_domain_is_known() {
    let td = eastwall_ca::spiffe::TrustDomain::parse("corp.example").unwrap();
    let errs = Policy::parse_in(
        "policy.ew",
        "allow:\nfrom: identity(\"spiffe://evil.example/app/x\")\nto: segment(\"db\")\n",
        &segments(),
        &groups(),
        Some(&td),
    )
    .unwrap_err();
    assert!(errs[0].to_string().contains("evil.example"), "{errs:?}");
}

#[test]
fn columns_count_characters_not_bytes() {
    let errs = parse_err("# — em dash\nallow: from: segment(\"app\") to: segment(\"db\") → x\n");
    only(&errs, "policy.ew:2:47: unexpected character '→'");
}

/// Words the policy language knows, so random lines often get deep into the parser.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("allow:".to_owned()),
        Just("deny:".to_owned()),
        Just("deny (and alert):".to_owned()),
        Just("from:".to_owned()),
        Just("to:".to_owned()),
        Just("as:".to_owned()),
        Just("database:".to_owned()),
        Just("require:".to_owned()),
        Just("- mtls(service_identity)".to_owned()),
        Just("- mfa(human_operators)".to_owned()),
        Just("segment(\"app\")".to_owned()),
        Just("segment(\"db\") :5432".to_owned()),
        Just("role(\"x\")".to_owned()),
        Just("identity(\"spiffe://corp.example/app/x\")".to_owned()),
        Just("default action = DENY".to_owned()),
        Just(",".to_owned()),
        Just(":".to_owned()),
        Just("(".to_owned()),
        Just("\"".to_owned()),
        Just("#".to_owned()),
        "\\PC{0,12}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// The CI stand-in for the fuzz target: no input makes the parser panic, and whatever it
    /// accepts can be evaluated.
    #[test]
    fn parser_never_panics_on_keyword_soup(lines in prop::collection::vec(prop::collection::vec(fragment(), 0..6), 0..12)) {
        let text: String = lines.iter().map(|l| l.join(" ") + "\n").collect();
        if let Ok(p) = Policy::parse("fuzz.ew", &text, &segments(), &groups()) {
            let _ = decide(&p, "spiffe://corp.example/app/operators/x", "x", "x", false);
        }
    }

    #[test]
    fn parser_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = Policy::parse("fuzz.ew", &text, &segments(), &groups());
    }

    #[test]
    fn every_error_has_a_location_inside_the_text(lines in prop::collection::vec(prop::collection::vec(fragment(), 0..5), 1..8)) {
        let text: String = lines.iter().map(|l| l.join(" ") + "\n").collect();
        if let Err(errs) = Policy::parse("fuzz.ew", &text, &segments(), &groups()) {
            let line_count = u32::try_from(text.lines().count()).unwrap() + 1;
            for e in errs {
                prop_assert!(e.line >= 1 && e.line <= line_count && e.col >= 1, "{e}");
            }
        }
    }
}
