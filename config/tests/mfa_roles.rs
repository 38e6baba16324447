//! A role an `mfa(..)` rule protects is never reachable without MFA through another identity:
//! with the seed's policy, `app/alice` must not become role `alice` while `app/operators/alice`
//! has to step up for it.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::*;
use eastwall_config::{authorize, Decision, MfaRoles, Policy, Request, Verdict};

const OPERATOR: &str = "spiffe://corp.example/app/operators/alice";
const LOOKALIKE: &str = "spiffe://corp.example/app/alice";
const BILLING: &str = "spiffe://corp.example/app/billing";

fn decide_with(policy: &Policy, roles: &MfaRoles, who: &str, user: &str, mfa: bool) -> Decision {
    let who = id(who);
    authorize(
        policy,
        &Request {
            id: &who,
            source: IpAddr::V4(Ipv4Addr::LOCALHOST),
            segment: "db",
            port: 5432,
            user,
            database: user,
            mfa_fresh: mfa,
            mfa_roles: Some(roles),
        },
    )
}

#[test]
fn an_enrolled_operators_role_is_refused_to_a_lookalike_identity() {
    let p = parse(SEED);
    let roles = p.mfa_roles("db", 5432, &[id(OPERATOR)]);
    let protection = roles.get("alice").expect("alice's role is protected");
    assert_eq!(protection.group, "human_operators");

    let d = decide_with(&p, &roles, LOOKALIKE, "alice", false);
    assert_eq!(d.verdict, Verdict::Deny, "{d:?}");
    assert!(
        d.reason.contains("protected by mfa(human_operators)"),
        "{}",
        d.reason
    );
    // Even claiming a fresh MFA assertion does not help an identity outside the group: it
    // was never asked for one, so there is nothing to step up with.
    let d = decide_with(&p, &roles, LOOKALIKE, "alice", true);
    assert_eq!(d.verdict, Verdict::Deny, "{d:?}");
}

#[test]
fn the_operator_still_steps_up_and_others_are_untouched() {
    let p = parse(SEED);
    let roles = p.mfa_roles("db", 5432, &[id(OPERATOR)]);
    assert_eq!(
        decide_with(&p, &roles, OPERATOR, "alice", false).verdict,
        Verdict::Challenge
    );
    assert_eq!(
        decide_with(&p, &roles, OPERATOR, "alice", true).verdict,
        Verdict::Allow
    );
    assert_eq!(
        decide_with(&p, &roles, BILLING, "billing", false).verdict,
        Verdict::Allow
    );
}

#[test]
fn without_role_protection_the_lookalike_got_in() {
    // What the hostile review found, kept as the contrast: no protection, no deny.
    let p = parse(SEED);
    assert_eq!(
        decide(&p, LOOKALIKE, "alice", "alice", false).verdict,
        Verdict::Allow
    );
}

#[test]
fn a_role_named_by_an_mfa_rule_is_protected_from_a_rule_without_mfa() {
    let text = r#"
allow:
from: group("human_operators")
to: segment("db")
as: role("dba")
require:
- mfa(human_operators)
allow:
from: identity("spiffe://corp.example/app/batch")
to: segment("db")
as: role("dba")
"#;
    let p = parse(text);
    let roles = p.mfa_roles("db", 5432, std::iter::empty());
    assert!(roles.get("dba").is_some());
    let d = decide_with(&p, &roles, "spiffe://corp.example/app/batch", "dba", false);
    assert_eq!(d.verdict, Verdict::Deny, "{d:?}");
    assert_eq!(
        decide_with(&p, &roles, OPERATOR, "dba", false).verdict,
        Verdict::Challenge
    );
    let gaps = p.mfa_role_gaps("db", 5432, &roles);
    assert_eq!(gaps.len(), 1, "{gaps:#?}");
    assert!(gaps[0].contains("policy.ew:8"), "{}", gaps[0]);
    assert!(gaps[0].contains("app/batch"), "{}", gaps[0]);
}

#[test]
fn policy_gaps_name_the_seed_rule_for_an_enrolled_operator() {
    let p = parse(SEED);
    let roles = p.mfa_roles("db", 5432, &[id(OPERATOR)]);
    let gaps = p.mfa_role_gaps("db", 5432, &roles);
    assert_eq!(gaps.len(), 1, "{gaps:#?}");
    assert!(gaps[0].contains("role \"alice\""), "{}", gaps[0]);
    assert!(
        gaps[0].contains("spiffe://corp.example/app/** ending in /alice"),
        "{}",
        gaps[0]
    );
}

#[test]
fn an_mfa_group_of_operators_only_has_no_gap() {
    let text = r#"
allow:
from: group("human_operators")
to: segment("db")
require:
- mfa(human_operators)
allow:
from: identity("spiffe://corp.example/app/billing")
to: segment("db")
"#;
    let p = parse(text);
    let roles = p.mfa_roles("db", 5432, &[id(OPERATOR)]);
    assert!(roles.get("alice").is_some());
    assert!(p.mfa_role_gaps("db", 5432, &roles).is_empty());
    assert_eq!(
        decide_with(&p, &roles, BILLING, "billing", false).verdict,
        Verdict::Allow
    );
}

#[test]
fn a_wildcard_free_group_member_is_protected_without_enrollment() {
    let groups = sets(&[("admins", &["spiffe://corp.example/app/ops/root-admin"])]);
    let text = r#"
allow:
from: segment("app")
to: segment("db")
require:
- mfa(admins)
"#;
    let p = Policy::parse("policy.ew", text, &segments(), &groups).unwrap();
    let roles = p.mfa_roles("db", 5432, std::iter::empty());
    assert!(roles.get("root-admin").is_some());
    let d = decide_with(
        &p,
        &roles,
        "spiffe://corp.example/app/x/root-admin",
        "root-admin",
        false,
    );
    assert_eq!(d.verdict, Verdict::Deny);
}

#[test]
fn protection_is_per_guarded_segment() {
    let p = parse(SEED);
    assert!(p.mfa_roles("domain", 5432, &[id(OPERATOR)]).is_empty());
}

#[test]
fn protection_follows_the_databases_the_mfa_rule_grants() {
    let text = r#"
allow:
from: group("human_operators")
to: segment("db")
as: role("analyst")
database: "analytics"
require:
- mfa(human_operators)
allow:
from: identity("spiffe://corp.example/app/etl")
to: segment("db")
as: role("analyst")
"#;
    let p = parse(text);
    let roles = p.mfa_roles("db", 5432, std::iter::empty());
    let who = id("spiffe://corp.example/app/etl");
    let ask = |database: &str| {
        authorize(
            &p,
            &Request {
                id: &who,
                source: IpAddr::V4(Ipv4Addr::LOCALHOST),
                segment: "db",
                port: 5432,
                user: "analyst",
                database,
                mfa_fresh: false,
                mfa_roles: Some(&roles),
            },
        )
        .verdict
    };
    assert_eq!(ask("analytics"), Verdict::Deny, "the protected database");
    assert_eq!(
        ask("etl"),
        Verdict::Allow,
        "a database the mfa rule never covered"
    );
    assert_eq!(roles.roles_for("etl"), Vec::<&str>::new());
    assert_eq!(roles.roles_for("analytics"), ["analyst"]);
}

#[test]
fn an_mfa_rules_own_identity_selector_is_protected_without_enrollment() {
    let text = r#"
allow:
from: identity("spiffe://corp.example/app/operators/carol")
to: segment("db")
require:
- mfa(human_operators)
allow:
from: segment("app")
to: segment("db")
"#;
    let p = parse(text);
    let roles = p.mfa_roles("db", 5432, std::iter::empty());
    assert!(roles.get("carol").is_some());
    let d = decide_with(
        &p,
        &roles,
        "spiffe://corp.example/app/carol",
        "carol",
        false,
    );
    assert_eq!(d.verdict, Verdict::Deny);
}

#[test]
fn protection_absorbed_from_an_earlier_enrollment_stays() {
    let p = parse(SEED);
    let mut roles = p.mfa_roles("db", 5432, &[id(OPERATOR)]);
    let after_removal = p.mfa_roles("db", 5432, std::iter::empty());
    assert!(after_removal.get("alice").is_none());
    roles.absorb(&after_removal);
    assert!(roles.get("alice").is_some(), "absorbing never removes");
}

#[test]
fn a_rule_for_another_port_protects_nothing_here() {
    let text = r#"
allow:
from: group("human_operators")
to: segment("db") :6432
as: role("dba")
require:
- mfa(human_operators)
"#;
    let p = parse(text);
    assert!(p.mfa_roles("db", 5432, std::iter::empty()).is_empty());
    assert!(p
        .mfa_roles("db", 6432, std::iter::empty())
        .get("dba")
        .is_some());
}
