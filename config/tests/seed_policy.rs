//! The seed's policy as a fixture: a table of identities and the verdicts the story expects.

mod common;

use common::*;
use eastwall_config::{explain, Policy, Request, Verdict};

const BILLING: &str = "spiffe://corp.example/app/billing";
const LAPTOP: &str = "spiffe://corp.example/workstations/finance-laptop";
const ALICE: &str = "spiffe://corp.example/app/operators/alice";
const STRAY: &str = "spiffe://corp.example/printers/floor-3";

#[test]
fn seed_block_parses_verbatim() {
    let p = parse(SEED);
    assert_eq!(p.rule_count(), 2);
    let c = p.counts();
    assert_eq!((c.allow, c.deny, c.deny_and_alert), (1, 0, 1));
    assert_eq!(p.mfa_groups(), ["human_operators"]);
}

#[test]
fn seed_block_parses_with_indentation_and_blank_lines() {
    let indented: String = SEED
        .lines()
        .map(|l| {
            if l.starts_with("allow") || l.starts_with("deny") || l.starts_with('#') {
                format!("{l}\n")
            } else {
                format!("    {l}\n\n")
            }
        })
        .collect();
    let plain = parse(SEED);
    let p = parse(&indented);
    assert_eq!(p.rule_count(), plain.rule_count());
    // Same decisions, whatever the layout.
    for (who, user) in [(BILLING, "billing"), (LAPTOP, "finance-laptop")] {
        assert_eq!(
            decide(&p, who, user, user, false).verdict,
            decide(&plain, who, user, user, false).verdict
        );
    }
}

/// (who, role, database, fresh MFA, expected verdict, deciding line, alert)
type Row = (
    &'static str,
    &'static str,
    &'static str,
    bool,
    Verdict,
    Option<u32>,
    bool,
);

#[test]
fn seed_table_of_identities_and_verdicts() {
    let p = parse(SEED);
    let table: &[Row] = &[
        (
            BILLING,
            "billing",
            "billing",
            false,
            Verdict::Allow,
            Some(3),
            false,
        ),
        (
            BILLING,
            "billing",
            "postgres",
            false,
            Verdict::Allow,
            Some(3),
            false,
        ),
        (
            BILLING,
            "reporting",
            "billing",
            false,
            Verdict::Deny,
            Some(3),
            false,
        ),
        (
            BILLING,
            "postgres",
            "postgres",
            false,
            Verdict::Deny,
            Some(3),
            false,
        ),
        (
            LAPTOP,
            "finance-laptop",
            "billing",
            false,
            Verdict::Deny,
            Some(9),
            true,
        ),
        (
            LAPTOP,
            "postgres",
            "postgres",
            true,
            Verdict::Deny,
            Some(9),
            true,
        ),
        (
            ALICE,
            "alice",
            "billing",
            false,
            Verdict::Challenge,
            Some(3),
            false,
        ),
        (
            ALICE,
            "alice",
            "billing",
            true,
            Verdict::Allow,
            Some(3),
            false,
        ),
        (
            ALICE,
            "postgres",
            "billing",
            true,
            Verdict::Deny,
            Some(3),
            false,
        ),
        (
            STRAY,
            "floor-3",
            "floor-3",
            false,
            Verdict::Deny,
            None,
            false,
        ),
        (
            "spiffe://evil.example/app/billing",
            "billing",
            "billing",
            false,
            Verdict::Deny,
            None,
            false,
        ),
    ];
    for &(who, user, db, mfa, verdict, line, alert) in table {
        let d = decide(&p, who, user, db, mfa);
        let ctx = format!("{who} as {user} on {db} mfa={mfa}: {d:?}");
        assert_eq!(d.verdict, verdict, "{ctx}");
        assert_eq!(d.rule.as_ref().map(|r| r.line), line, "{ctx}");
        assert_eq!(d.alert, alert, "{ctx}");
        assert!(!d.reason.is_empty(), "{ctx}");
    }
}

#[test]
fn workstation_denial_cites_the_deny_rule() {
    let d = decide(&parse(SEED), LAPTOP, "finance-laptop", "billing", false);
    assert_eq!(d.rule.unwrap().to_string(), "policy.ew:9");
}

#[test]
fn app_service_asking_for_another_role_is_told_which_role_it_may_use() {
    let d = decide(&parse(SEED), BILLING, "postgres", "postgres", false);
    assert_eq!(d.verdict, Verdict::Deny);
    assert!(d.reason.contains("\"postgres\""), "{}", d.reason);
    assert!(d.reason.contains("\"billing\""), "{}", d.reason);
    assert!(!d.role_named_by_rule);
}

#[test]
fn operator_is_challenged_with_the_group_named() {
    let p = parse(SEED);
    let d = decide(&p, ALICE, "alice", "alice", false);
    assert_eq!(d.verdict, Verdict::Challenge);
    assert!(d.reason.starts_with("mfa_required"), "{}", d.reason);
    assert_eq!(d.mfa_group.as_deref(), Some("human_operators"));
    assert!(p.requires_mfa(&id(ALICE)));
    assert!(!p.requires_mfa(&id(BILLING)));
    // With MFA the group is still reported, so the proxy can bound the session.
    let d = decide(&p, ALICE, "alice", "alice", true);
    assert_eq!(d.mfa_group.as_deref(), Some("human_operators"));
    // A service outside the group is never subject to MFA.
    assert_eq!(
        decide(&p, BILLING, "billing", "billing", false).mfa_group,
        None
    );
}

#[test]
fn identity_in_no_segment_is_denied_by_default() {
    let d = decide(&parse(SEED), STRAY, "floor-3", "floor-3", false);
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(d.rule, None);
    assert_eq!(
        d.reason,
        "no allow rule names this flow (default action DENY)"
    );
}

#[test]
fn overlapping_deny_wins_over_the_allow() {
    // The laptop is in both segments: the allow names it, the deny names it too.
    let policy = Policy::parse(
        "policy.ew",
        SEED,
        &sets(&[
            ("app", &["spiffe://corp.example/**"]),
            ("workstations", &["spiffe://corp.example/workstations/**"]),
            ("db", &["spiffe://corp.example/db/**"]),
            ("domain", &["spiffe://corp.example/domain/**"]),
        ]),
        &groups(),
    )
    .unwrap();
    let d = decide(&policy, LAPTOP, "finance-laptop", "x", true);
    assert_eq!((d.verdict, d.alert), (Verdict::Deny, true));
    assert_eq!(d.rule.unwrap().line, 9);
    // Without the overlap the same policy would admit an app identity.
    assert_eq!(
        decide(&policy, BILLING, "billing", "x", false).verdict,
        Verdict::Allow
    );
}

#[test]
fn another_port_is_not_the_allowed_flow() {
    let p = parse(SEED);
    let who = id(BILLING);
    let req = Request {
        id: &who,
        source: "10.0.0.7".parse().unwrap(),
        segment: "db",
        port: 6432,
        user: "billing",
        database: "billing",
        mfa_fresh: false,
        mfa_roles: None,
    };
    assert_eq!(eastwall_config::authorize(&p, &req).verdict, Verdict::Deny);
    let req = Request { port: 5432, ..req };
    assert_eq!(eastwall_config::authorize(&p, &req).verdict, Verdict::Allow);
}

#[test]
fn explain_traces_every_rule_and_why() {
    let p = parse(SEED);
    let who = id(LAPTOP);
    let req = Request {
        id: &who,
        source: "127.0.0.1".parse().unwrap(),
        segment: "db",
        port: 5432,
        user: "finance-laptop",
        database: "finance-laptop",
        mfa_fresh: false,
        mfa_roles: None,
    };
    let (d, trace) = explain(&p, &req);
    assert_eq!(d, eastwall_config::authorize(&p, &req));
    let all = trace.join("\n");
    assert!(all.contains("segments [\"workstations\"]"), "{all}");
    assert!(
        all.contains("policy.ew:9 deny (and alert): APPLIES"),
        "{all}"
    );

    let who = id(BILLING);
    let req = Request {
        id: &who,
        user: "billing",
        ..req
    };
    let (_, trace) = explain(&p, &req);
    let all = trace.join("\n");
    assert!(
        all.contains("policy.ew:9 deny (and alert): does not apply"),
        "{all}"
    );
    assert!(
        all.contains("policy.ew:3 allow: grants role \"billing\""),
        "{all}"
    );
}
