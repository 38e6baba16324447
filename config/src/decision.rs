//! Policy evaluation: a pure function from a compiled policy and one request to a decision
//! that says why (see the `policy` module for what the rules mean).

use std::fmt::Write as _;
use std::net::IpAddr;

use eastwall_ca::spiffe::SpiffeId;

use crate::mfa_roles::{protected_role_reason, MfaRoles};
use crate::policy::{Policy, Rule, RuleKind, RuleRef, Selector};

/// One connection attempt, in policy terms.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The verified SPIFFE ID from the client's SVID.
    pub id: &'a SpiffeId,
    /// Where the connection came from; logged, not matched (rules match identities).
    pub source: IpAddr,
    /// The segment being reached: the one this sidecar guards.
    pub segment: &'a str,
    /// The port in policy terms (the sidecar's `service_port`).
    pub port: u16,
    /// The database role asked for in the startup message.
    pub user: &'a str,
    /// The database asked for.
    pub database: &'a str,
    /// Whether a fresh MFA assertion (TOTP code or step-up token) came with the request.
    pub mfa_fresh: bool,
    /// The roles `mfa(..)` rules protect ([`Policy::mfa_roles`]): a grant of one of them
    /// without a fresh MFA assertion is a deny. `None` checks no role protection.
    pub mfa_roles: Option<&'a MfaRoles>,
}

/// What to do with the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Deny,
    /// Admitted once a fresh MFA assertion is presented.
    Challenge,
}

impl Verdict {
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Challenge => "challenge",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of [`authorize`], with the reason a person can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// The rule that decided; `None` for the default deny.
    pub rule: Option<RuleRef>,
    pub reason: String,
    /// Set by a `deny (and alert)` rule.
    pub alert: bool,
    /// The granted role was named by an `as:` line, which is what lets a superuser role in.
    pub role_named_by_rule: bool,
    /// The group whose `mfa(..)` requirement applies to this identity on this flow.
    pub mfa_group: Option<String>,
}

/// Decides one request. Pure and allocation-light: a handful of comparisons per rule.
pub fn authorize(policy: &Policy, req: &Request) -> Decision {
    evaluate(policy, req, None)
}

/// Decides one request and says, rule by rule, what matched and what did not.
pub fn explain(policy: &Policy, req: &Request) -> (Decision, Vec<String>) {
    let mut trace = Vec::new();
    let segments = policy.segments_of(req.id);
    let groups = policy.groups_of(req.id);
    trace.push(format!(
        "identity {} is in segments [{}] and groups [{}]",
        req.id,
        quoted(&segments),
        quoted(&groups)
    ));
    trace.push(format!(
        "request: role {:?}, database {:?}, to segment {:?} port {}, from {}, fresh MFA: {}",
        req.user,
        req.database,
        req.segment,
        req.port,
        req.source,
        if req.mfa_fresh { "yes" } else { "no" }
    ));
    let decision = evaluate(policy, req, Some(&mut trace));
    (decision, trace)
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn from_matches(policy: &Policy, rule: &Rule, id: &SpiffeId) -> bool {
    rule.from.iter().any(|sel| match sel {
        Selector::Segment(i) => policy.segments.get(*i).is_some_and(|s| s.contains(id)),
        Selector::Group(i) => policy.groups.get(*i).is_some_and(|s| s.contains(id)),
        Selector::Identity(x) => x == id,
    })
}

fn to_matches(rule: &Rule, req: &Request) -> bool {
    rule.to
        .iter()
        .any(|t| &*t.segment == req.segment && t.port.is_none_or(|p| p == req.port))
}

fn describe_from(policy: &Policy, rule: &Rule) -> String {
    rule.from
        .iter()
        .map(|sel| match sel {
            Selector::Segment(i) => format!(
                "segment({:?})",
                policy.segments.get(*i).map(|s| &*s.name).unwrap_or("?")
            ),
            Selector::Group(i) => format!(
                "group({:?})",
                policy.groups.get(*i).map(|s| &*s.name).unwrap_or("?")
            ),
            Selector::Identity(id) => format!("identity({:?})", id.as_str()),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_to(rule: &Rule) -> String {
    rule.to
        .iter()
        .map(|t| match t.port {
            Some(p) => format!("segment({:?}):{p}", &*t.segment),
            None => format!("segment({:?})", &*t.segment),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn names(list: &[Box<str>]) -> String {
    list.iter()
        .map(|n| format!("{:?}", &**n))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The first group named by the rule's `mfa(..)` that contains the identity, with the
/// challenge reason the rule wrote for it at load.
pub(crate) fn mfa_group_for<'p>(
    policy: &'p Policy,
    rule: &'p Rule,
    id: &SpiffeId,
) -> Option<(&'p str, &'p str)> {
    rule.mfa
        .iter()
        .zip(&rule.mfa_reasons)
        .find_map(|(&g, reason)| {
            let set = policy.groups.get(g)?;
            set.contains(id).then_some((&*set.name, reason.as_str()))
        })
}

/// Why an allow rule whose `from:` and `to:` matched still did not grant the request.
#[derive(Debug, Clone, Copy)]
enum Miss {
    Role,
    Database,
}

fn miss_reason(rule: &Rule, req: &Request, miss: Miss) -> String {
    match miss {
        Miss::Role if rule.roles.is_empty() => format!(
            "allow rule {} admits this identity, but not as role {:?}: without an `as:` line it grants only role {:?}, the last segment of the SPIFFE ID",
            rule.at,
            req.user,
            req.id.last_segment()
        ),
        Miss::Role => format!(
            "allow rule {} admits this identity, but not as role {:?}: it grants roles {}",
            rule.at,
            req.user,
            names(&rule.roles)
        ),
        Miss::Database => format!(
            "allow rule {} admits this identity, but not to database {:?}: it grants databases {}",
            rule.at,
            req.database,
            names(&rule.databases)
        ),
    }
}

fn evaluate(policy: &Policy, req: &Request, mut trace: Option<&mut Vec<String>>) -> Decision {
    // Denies first: one that applies wins whatever the allows say.
    for rule in &policy.denies {
        let from = from_matches(policy, rule, req.id);
        let to = from && to_matches(rule, req);
        let role = rule.roles.is_empty() || rule.roles.iter().any(|r| &**r == req.user);
        let db = rule.databases.is_empty() || rule.databases.iter().any(|d| &**d == req.database);
        let applies = from && to && role && db;
        if let Some(t) = trace.as_deref_mut() {
            t.push(trace_deny(policy, rule, req, from, to, role, db));
        }
        if applies {
            let alert = rule.kind == RuleKind::DenyAndAlert;
            return Decision {
                verdict: Verdict::Deny,
                rule: Some(rule.at.clone()),
                reason: rule.reason.clone(),
                alert,
                role_named_by_rule: false,
                mfa_group: None,
            };
        }
    }

    // Allows: collect every rule that grants, so that an `mfa(..)` on any of them holds.
    let mut granted: Option<&Rule> = None;
    let mut role_named = false;
    // (group, challenge reason) of the first granting rule that asks this identity for MFA.
    let mut mfa: Option<(&str, &str)> = None;
    let mut mfa_rule: Option<&Rule> = None;
    let mut near_miss: Option<(&Rule, Miss)> = None;
    for rule in &policy.allows {
        let from = from_matches(policy, rule, req.id);
        let to = from && to_matches(rule, req);
        if !(from && to) {
            if let Some(t) = trace.as_deref_mut() {
                t.push(trace_allow_miss(policy, rule, req, from));
            }
            continue;
        }
        let named = rule.roles.iter().any(|r| &**r == req.user);
        let role_ok = if rule.roles.is_empty() {
            req.user == req.id.last_segment()
        } else {
            named
        };
        let db_ok =
            rule.databases.is_empty() || rule.databases.iter().any(|d| &**d == req.database);
        if !role_ok || !db_ok {
            let miss = if role_ok { Miss::Database } else { Miss::Role };
            if let Some(t) = trace.as_deref_mut() {
                t.push(format!(
                    "{} allow: does not grant this: {}",
                    rule.at,
                    miss_reason(rule, req, miss)
                ));
            }
            if near_miss.is_none() {
                near_miss = Some((rule, miss));
            }
            continue;
        }
        let group = mfa_group_for(policy, rule, req.id);
        if let Some(t) = trace.as_deref_mut() {
            let mut line = format!(
                "{} allow: grants role {:?} on database {:?}{}",
                rule.at,
                req.user,
                req.database,
                if named {
                    " (named by `as:`)"
                } else {
                    " (the identity's own role)"
                }
            );
            if let Some((g, _)) = group {
                let _ = write!(
                    line,
                    "; requires mfa({g}) for this identity: {}",
                    if req.mfa_fresh {
                        "fresh assertion present"
                    } else {
                        "no fresh assertion"
                    }
                );
            }
            t.push(line);
        }
        if named && !granted.is_some_and(|g| g.roles.iter().any(|r| &**r == req.user)) {
            // Prefer citing the rule that named the role, since that is what lets it in.
            granted = Some(rule);
        } else if granted.is_none() {
            granted = Some(rule);
        }
        role_named |= named;
        if let (None, Some(g)) = (mfa, group) {
            mfa = Some(g);
            mfa_rule = Some(rule);
        }
    }

    if let Some(rule) = granted {
        if let Some((group, reason)) = mfa {
            if !req.mfa_fresh {
                return Decision {
                    verdict: Verdict::Challenge,
                    rule: mfa_rule.map(|r| r.at.clone()),
                    reason: reason.to_owned(),
                    alert: false,
                    role_named_by_rule: role_named,
                    mfa_group: Some(group.to_owned()),
                };
            }
        }
        if mfa.is_none() {
            if let Some(protection) = req
                .mfa_roles
                .and_then(|roles| roles.protecting(req.user, req.database))
            {
                if let Some(t) = trace.as_deref_mut() {
                    t.push(format!(
                        "role {:?} is protected by mfa({}) at {}: no grant without MFA",
                        req.user, protection.group, protection.rule
                    ));
                }
                return Decision {
                    verdict: Verdict::Deny,
                    rule: Some(protection.rule.clone()),
                    reason: protected_role_reason(req, protection),
                    alert: false,
                    role_named_by_rule: false,
                    mfa_group: None,
                };
            }
        }
        return Decision {
            verdict: Verdict::Allow,
            rule: Some(rule.at.clone()),
            reason: rule.reason.clone(),
            alert: false,
            role_named_by_rule: role_named,
            mfa_group: mfa.map(|(g, _)| g.to_owned()),
        };
    }
    if let Some((rule, why)) = near_miss {
        return Decision {
            verdict: Verdict::Deny,
            rule: Some(rule.at.clone()),
            reason: miss_reason(rule, req, why),
            alert: false,
            role_named_by_rule: false,
            mfa_group: None,
        };
    }
    if let Some(t) = trace {
        t.push("no allow rule applies: default action DENY".to_owned());
    }
    Decision {
        verdict: Verdict::Deny,
        rule: None,
        reason: "no allow rule names this flow (default action DENY)".to_owned(),
        alert: false,
        role_named_by_rule: false,
        mfa_group: None,
    }
}

fn trace_deny(
    policy: &Policy,
    rule: &Rule,
    req: &Request,
    from: bool,
    to: bool,
    role: bool,
    db: bool,
) -> String {
    let head = format!("{} {}:", rule.at, rule.kind.as_str());
    if !from {
        return format!(
            "{head} does not apply: identity is not named by from: {}",
            describe_from(policy, rule)
        );
    }
    if !to {
        return format!(
            "{head} does not apply: segment {:?} port {} is not named by to: {}",
            req.segment,
            req.port,
            describe_to(rule)
        );
    }
    if !role {
        return format!(
            "{head} does not apply: it names roles {}, not {:?}",
            names(&rule.roles),
            req.user
        );
    }
    if !db {
        return format!(
            "{head} does not apply: it names databases {}, not {:?}",
            names(&rule.databases),
            req.database
        );
    }
    format!(
        "{head} APPLIES: from {} to {} matches; a deny wins over any allow",
        describe_from(policy, rule),
        describe_to(rule)
    )
}

fn trace_allow_miss(policy: &Policy, rule: &Rule, req: &Request, from: bool) -> String {
    if !from {
        format!(
            "{} allow: does not apply: identity is not named by from: {}",
            rule.at,
            describe_from(policy, rule)
        )
    } else {
        format!(
            "{} allow: does not apply: segment {:?} port {} is not named by to: {}",
            rule.at,
            req.segment,
            req.port,
            describe_to(rule)
        )
    }
}
