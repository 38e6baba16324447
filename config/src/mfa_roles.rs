//! Roles an `mfa(..)` rule protects, so that no other identity reaches them without MFA.
//!
//! `mfa(group)` is attached to identities, but what an attacker wants is the role: with the
//! seed's policy `spiffe://corp.example/app/operators/alice` must step up to log in as `alice`,
//! while `spiffe://corp.example/app/alice` (also in segment `app`) would get role `alice` by
//! the default-role rule without any MFA. A role is protected when an allow rule that asks for
//! MFA grants it: by name (`as: role("dba")`), or as the default role of a known member of the
//! MFA group — a member named by a pattern without wildcards, or an identity enrolled for MFA.
//! A decision that would grant a protected role without a fresh MFA assertion is a deny.

use std::collections::HashMap;

use eastwall_ca::spiffe::SpiffeId;

use crate::decision::{from_matches, mfa_group_for, Request};
use crate::pattern::IdPattern;
use crate::policy::{Policy, Rule, RuleRef, Selector};

/// Why one role is protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protection {
    /// The MFA group whose rule protects it.
    pub group: String,
    /// The allow rule that asks for MFA.
    pub rule: RuleRef,
    /// How the rule grants it: "named by `as:`" or "the default role of …".
    pub how: String,
    /// The databases the rule grants it on; empty means every database.
    pub databases: Vec<String>,
}

impl Protection {
    fn covers(&self, database: &str) -> bool {
        self.databases.is_empty() || self.databases.iter().any(|d| d == database)
    }
}

/// The protected roles of one policy, for the segment a sidecar guards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MfaRoles {
    by_role: HashMap<String, Vec<Protection>>,
}

impl MfaRoles {
    /// What protects `role` on `database`, if anything.
    pub fn protecting(&self, role: &str, database: &str) -> Option<&Protection> {
        self.by_role.get(role)?.iter().find(|p| p.covers(database))
    }

    /// Whether `role` is protected on any database.
    pub fn get(&self, role: &str) -> Option<&Protection> {
        self.by_role.get(role)?.first()
    }

    pub fn is_empty(&self) -> bool {
        self.by_role.is_empty()
    }

    /// The roles protected on `database`, in name order: a session that did not step up must
    /// not be able to become any of them.
    pub fn roles_for(&self, database: &str) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .by_role
            .iter()
            .filter(|(_, ps)| ps.iter().any(|p| p.covers(database)))
            .map(|(r, _)| r.as_str())
            .collect();
        names.sort_unstable();
        names
    }

    /// Every protection, in role order.
    pub fn roles(&self) -> Vec<(&str, &Protection)> {
        let mut all: Vec<_> = self
            .by_role
            .iter()
            .flat_map(|(r, ps)| ps.iter().map(move |p| (r.as_str(), p)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(b.0));
        all
    }

    /// Adds every protection of `other`: enrollments come and go (an operator not yet enrolled,
    /// or removed), but a role once protected stays protected for the life of the process.
    pub fn absorb(&mut self, other: &MfaRoles) {
        for (role, protection) in other.roles() {
            self.add(role, protection.clone());
        }
    }

    fn add(&mut self, role: &str, protection: Protection) {
        let list = self.by_role.entry(role.to_owned()).or_default();
        if !list.contains(&protection) {
            list.push(protection);
        }
    }

    fn protect(&mut self, role: &str, group: &str, rule: &Rule, how: String) {
        let protection = Protection {
            group: group.to_owned(),
            rule: rule.at.clone(),
            how,
            databases: rule.databases.iter().map(|d| d.to_string()).collect(),
        };
        self.add(role, protection);
    }
}

/// Whether a rule reaches this sidecar: its segment, and its port when the rule names one.
fn guards(rule: &Rule, segment: &str, port: u16) -> bool {
    rule.to
        .iter()
        .any(|t| &*t.segment == segment && t.port.is_none_or(|p| p == port))
}

/// The ID a pattern names when it has no wildcard.
fn exact_id(pattern: &IdPattern) -> Option<SpiffeId> {
    if pattern.as_str().contains('*') {
        return None;
    }
    SpiffeId::parse(pattern.as_str()).ok()
}

impl Policy {
    /// The roles this policy's `mfa(..)` rules protect on `segment`, given the identities
    /// enrolled for MFA (which name the operators whose default roles are protected).
    pub fn mfa_roles<'a>(
        &self,
        segment: &str,
        port: u16,
        enrolled: impl IntoIterator<Item = &'a SpiffeId>,
    ) -> MfaRoles {
        let mut roles = MfaRoles::default();
        let mfa_rules: Vec<&Rule> = self
            .allows
            .iter()
            .filter(|r| !r.mfa.is_empty() && guards(r, segment, port))
            .collect();
        let mut members: Vec<SpiffeId> = enrolled.into_iter().cloned().collect();
        for rule in &mfa_rules {
            for &g in &rule.mfa {
                let Some(set) = self.groups.get(g) else {
                    continue;
                };
                for role in &rule.roles {
                    roles.protect(role, &set.name, rule, "named by `as:`".into());
                }
                members.extend(set.patterns.iter().filter_map(exact_id));
            }
            // An mfa rule's own `from: identity(..)` names a member too, enrolled or not.
            members.extend(rule.from.iter().filter_map(|sel| match sel {
                Selector::Identity(id) => Some(id.clone()),
                _ => None,
            }));
        }
        for id in &members {
            for rule in mfa_rules.iter().filter(|r| r.roles.is_empty()) {
                if !from_matches(self, rule, id) {
                    continue;
                }
                if let Some((group, _)) = mfa_group_for(self, rule, id) {
                    let how = format!("the default role of {id}");
                    roles.protect(id.last_segment(), group, rule, how);
                }
            }
        }
        roles
    }

    /// Places where the policy grants a protected role without asking for MFA, one line each:
    /// `policy check` prints them, and the sidecar refuses such requests.
    pub fn mfa_role_gaps(&self, segment: &str, port: u16, roles: &MfaRoles) -> Vec<String> {
        let mut gaps = Vec::new();
        for (role, protection) in roles.roles() {
            for rule in self.allows.iter().filter(|r| guards(r, segment, port)) {
                if let Some(who) = grants_without_mfa(self, rule, role) {
                    gaps.push(format!(
                        "role {role:?} is protected by mfa({}) at {} ({}), but rule {} also grants it without MFA to {who}; Eastwall refuses those requests",
                        protection.group, protection.rule, protection.how, rule.at
                    ));
                }
            }
        }
        gaps
    }
}

/// Who, in words, `rule` could grant `role` to without MFA (None when nobody).
fn grants_without_mfa(policy: &Policy, rule: &Rule, role: &str) -> Option<String> {
    let mfa_patterns: Vec<&str> = rule
        .mfa
        .iter()
        .filter_map(|&g| policy.groups.get(g))
        .flat_map(|set| set.patterns.iter().map(IdPattern::as_str))
        .collect();
    let covered = |p: &IdPattern| mfa_patterns.contains(&p.as_str());
    if !rule.roles.is_empty() {
        if !rule.roles.iter().any(|r| &**r == role) {
            return None;
        }
        let outside: Vec<String> = rule
            .from
            .iter()
            .filter_map(|sel| match sel {
                Selector::Identity(id) => mfa_group_for(policy, rule, id)
                    .is_none()
                    .then(|| format!("identity({:?})", id.as_str())),
                Selector::Segment(i) => policy
                    .segments
                    .get(*i)
                    .filter(|s| !s.patterns.iter().all(covered))
                    .map(|s| format!("segment({:?})", &*s.name)),
                Selector::Group(i) => policy
                    .groups
                    .get(*i)
                    .filter(|s| !s.patterns.iter().all(covered))
                    .map(|s| format!("group({:?})", &*s.name)),
            })
            .collect();
        return (!outside.is_empty()).then(|| outside.join(", "));
    }
    // Default roles: who in `from:` could have a SPIFFE ID ending in `/role`?
    let mut who = Vec::new();
    for selector in &rule.from {
        match selector {
            Selector::Identity(id) => {
                if id.last_segment() == role && mfa_group_for(policy, rule, id).is_none() {
                    who.push(id.to_string());
                }
            }
            Selector::Segment(i) | Selector::Group(i) => {
                let set = match selector {
                    Selector::Segment(_) => policy.segments.get(*i),
                    _ => policy.groups.get(*i),
                };
                let Some(set) = set else { continue };
                for pattern in &set.patterns {
                    if !covered(pattern) && pattern.may_end_with(role) {
                        who.push(format!(
                            "identities matching {} ending in /{role}",
                            pattern.as_str()
                        ));
                    }
                }
            }
        }
    }
    (!who.is_empty()).then(|| who.join(", "))
}

/// The deny a decision becomes when it would grant a protected role without MFA.
pub(crate) fn protected_role_reason(req: &Request, protection: &Protection) -> String {
    format!(
        "role {:?} is protected by mfa({}) (rule {}, {}); {} may not use it without that group's MFA step-up",
        req.user, protection.group, protection.rule, protection.how, req.id
    )
}
