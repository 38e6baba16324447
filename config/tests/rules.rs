//! One allowed/denied pair per rule kind and clause, named by the behaviour a user relies on.

mod common;

use common::*;
use eastwall_config::Verdict;

const BILLING: &str = "spiffe://corp.example/app/billing";
const ALICE: &str = "spiffe://corp.example/app/operators/alice";
const LAPTOP: &str = "spiffe://corp.example/workstations/finance-laptop";

#[test]
fn allow_from_segment_admits_members_and_no_one_else() {
    let p = parse("allow:\nfrom: segment(\"app\")\nto: segment(\"db\")\n");
    assert_eq!(
        decide(&p, BILLING, "billing", "b", false).verdict,
        Verdict::Allow
    );
    assert_eq!(
        decide(&p, LAPTOP, "finance-laptop", "b", false).verdict,
        Verdict::Deny
    );
}

#[test]
fn allow_from_identity_admits_exactly_that_id() {
    let p = parse(
        "allow:\nfrom: identity(\"spiffe://corp.example/app/billing\")\nto: segment(\"db\")\n",
    );
    assert_eq!(
        decide(&p, BILLING, "billing", "b", false).verdict,
        Verdict::Allow
    );
    let other = decide(
        &p,
        "spiffe://corp.example/app/billing2",
        "billing2",
        "b",
        false,
    );
    assert_eq!(other.verdict, Verdict::Deny);
}

#[test]
fn allow_from_group_admits_group_members_only() {
    let p = parse("allow:\nfrom: group(\"human_operators\")\nto: segment(\"db\")\n");
    assert_eq!(
        decide(&p, ALICE, "alice", "b", false).verdict,
        Verdict::Allow
    );
    assert_eq!(
        decide(&p, BILLING, "billing", "b", false).verdict,
        Verdict::Deny
    );
}

#[test]
fn several_from_lines_are_alternatives() {
    let p = parse("allow:\nfrom: segment(\"workstations\")\nfrom: identity(\"spiffe://corp.example/app/billing\")\nto: segment(\"db\")\n");
    assert_eq!(
        decide(&p, LAPTOP, "finance-laptop", "b", false).verdict,
        Verdict::Allow
    );
    assert_eq!(
        decide(&p, BILLING, "billing", "b", false).verdict,
        Verdict::Allow
    );
    assert_eq!(
        decide(&p, ALICE, "alice", "b", false).verdict,
        Verdict::Deny
    );
}

#[test]
fn to_names_the_segment_being_reached() {
    let p = parse("allow:\nfrom: segment(\"app\")\nto: segment(\"domain\")\n");
    // This sidecar guards db; a rule for the domain segment is another sidecar's business.
    assert_eq!(
        decide(&p, BILLING, "billing", "b", false).verdict,
        Verdict::Deny
    );
    let p = parse("allow:\nfrom: segment(\"app\")\nto: segment(\"domain\"), segment(\"db\")\n");
    assert_eq!(
        decide(&p, BILLING, "billing", "b", false).verdict,
        Verdict::Allow
    );
}

#[test]
fn to_port_restricts_the_port_and_no_port_means_any() {
    let with_port = parse("allow:\nfrom: segment(\"app\")\nto: segment(\"db\"):6432\n");
    assert_eq!(
        decide(&with_port, BILLING, "billing", "b", false).verdict,
        Verdict::Deny
    );
    let any_port = parse("allow:\nfrom: segment(\"app\")\nto: segment(\"db\")\n");
    assert_eq!(
        decide(&any_port, BILLING, "billing", "b", false).verdict,
        Verdict::Allow
    );
}

#[test]
fn without_as_only_the_last_segment_role_is_granted() {
    let p = parse("allow:\nfrom: segment(\"app\")\nto: segment(\"db\")\n");
    let own = decide(&p, BILLING, "billing", "b", false);
    assert_eq!(own.verdict, Verdict::Allow);
    assert!(!own.role_named_by_rule);
    let other = decide(&p, BILLING, "postgres", "b", false);
    assert_eq!(other.verdict, Verdict::Deny);
    assert!(other.reason.contains("last segment"), "{}", other.reason);
}

#[test]
fn as_role_grants_exactly_the_named_roles_and_marks_them_named() {
    let p = parse("allow:\nfrom: segment(\"app\")\nto: segment(\"db\")\nas: role(\"reporting\"), role(\"postgres\")\nas: role(\"audit\")\n");
    for role in ["reporting", "postgres", "audit"] {
        let d = decide(&p, BILLING, role, "b", false);
        assert_eq!(d.verdict, Verdict::Allow, "{role}");
        assert!(d.role_named_by_rule, "{role}");
    }
    // `as:` replaces the default: the identity's own role is no longer implied.
    let own = decide(&p, BILLING, "billing", "b", false);
    assert_eq!(own.verdict, Verdict::Deny);
    assert!(own.reason.contains("\"reporting\""), "{}", own.reason);
}

#[test]
fn database_lines_restrict_databases_and_without_them_any_is_allowed() {
    let p = parse(
        "allow:\nfrom: segment(\"app\")\nto: segment(\"db\")\ndatabase: \"billing\", \"ledger\"\n",
    );
    assert_eq!(
        decide(&p, BILLING, "billing", "ledger", false).verdict,
        Verdict::Allow
    );
    let d = decide(&p, BILLING, "billing", "hr", false);
    assert_eq!(d.verdict, Verdict::Deny);
    assert!(d.reason.contains("\"hr\""), "{}", d.reason);
}

#[test]
fn plain_deny_denies_without_alert() {
    let p = parse("allow:\nfrom: segment(\"app\")\nto: segment(\"db\")\ndeny:\nfrom: identity(\"spiffe://corp.example/app/billing\")\nto: segment(\"db\")\n");
    let d = decide(&p, BILLING, "billing", "b", false);
    assert_eq!(
        (d.verdict, d.alert, d.rule.map(|r| r.line)),
        (Verdict::Deny, false, Some(4))
    );
    let other = decide(&p, "spiffe://corp.example/app/orders", "orders", "b", false);
    assert_eq!(other.verdict, Verdict::Allow);
}

#[test]
fn deny_and_alert_sets_the_alert_flag() {
    let p = parse("deny (and alert):\nfrom: segment(\"app\")\nto: segment(\"db\")\n");
    let d = decide(&p, BILLING, "billing", "b", false);
    assert_eq!((d.verdict, d.alert), (Verdict::Deny, true));
    let outsider = decide(&p, LAPTOP, "finance-laptop", "b", false);
    assert_eq!((outsider.verdict, outsider.alert), (Verdict::Deny, false));
}

#[test]
fn deny_with_as_forbids_only_that_role() {
    let p = parse(
        "allow:\nfrom: segment(\"app\")\nto: segment(\"db\")\nas: role(\"postgres\"), role(\"billing\")\n\
         deny:\nfrom: segment(\"app\")\nto: segment(\"db\")\nas: role(\"postgres\")\n",
    );
    assert_eq!(
        decide(&p, BILLING, "billing", "b", false).verdict,
        Verdict::Allow
    );
    let su = decide(&p, BILLING, "postgres", "b", false);
    assert_eq!(
        (su.verdict, su.rule.map(|r| r.line)),
        (Verdict::Deny, Some(5))
    );
}

#[test]
fn deny_with_database_forbids_only_that_database() {
    let p = parse(
        "allow:\nfrom: segment(\"app\")\nto: segment(\"db\")\n\
         deny:\nfrom: segment(\"app\")\nto: segment(\"db\")\ndatabase: \"hr\"\n",
    );
    assert_eq!(
        decide(&p, BILLING, "billing", "billing", false).verdict,
        Verdict::Allow
    );
    assert_eq!(
        decide(&p, BILLING, "billing", "hr", false).verdict,
        Verdict::Deny
    );
}

#[test]
fn require_mfa_challenges_group_members_until_fresh() {
    let p = parse(
        "allow:\nfrom: segment(\"app\")\nto: segment(\"db\")\nrequire:\n- mfa(human_operators)\n",
    );
    assert_eq!(
        decide(&p, ALICE, "alice", "b", false).verdict,
        Verdict::Challenge
    );
    assert_eq!(
        decide(&p, ALICE, "alice", "b", true).verdict,
        Verdict::Allow
    );
    // Not in the group: no step-up needed.
    assert_eq!(
        decide(&p, BILLING, "billing", "b", false).verdict,
        Verdict::Allow
    );
}

#[test]
fn a_second_allow_without_mfa_cannot_bypass_the_step_up() {
    let p = parse(
        "allow:\nfrom: segment(\"app\")\nto: segment(\"db\")\nrequire:\n- mfa(human_operators)\n\
         allow:\nfrom: group(\"human_operators\")\nto: segment(\"db\")\n",
    );
    assert_eq!(
        decide(&p, ALICE, "alice", "b", false).verdict,
        Verdict::Challenge
    );
    assert_eq!(
        decide(&p, ALICE, "alice", "b", true).verdict,
        Verdict::Allow
    );
}

#[test]
fn require_mtls_is_satisfied_by_a_verified_identity() {
    let p = parse(
        "allow:\nfrom: segment(\"app\")\nto: segment(\"db\")\nrequire:\n- mtls(service_identity)\n",
    );
    assert_eq!(
        decide(&p, BILLING, "billing", "b", false).verdict,
        Verdict::Allow
    );
    assert_eq!(
        decide(&p, LAPTOP, "finance-laptop", "b", false).verdict,
        Verdict::Deny
    );
}

#[test]
fn empty_policy_denies_everything() {
    let p = parse("# nothing allowed yet\ndefault action = DENY\n");
    assert_eq!(p.rule_count(), 0);
    assert_eq!(
        decide(&p, BILLING, "billing", "b", false).verdict,
        Verdict::Deny
    );
}

#[test]
fn clauses_may_share_a_line() {
    let p = parse("deny: from: segment(\"app\") to: segment(\"db\") as: role(\"postgres\")\nallow: from: segment(\"app\") to: segment(\"db\") :5432\n");
    assert_eq!(
        decide(&p, BILLING, "billing", "b", false).verdict,
        Verdict::Allow
    );
    assert_eq!(
        decide(&p, BILLING, "postgres", "b", false).verdict,
        Verdict::Deny
    );
}
