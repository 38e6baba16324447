//! Shared fixtures for the config crate's tests: the seed's segments, groups and policy.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use eastwall_ca::spiffe::SpiffeId;
use eastwall_config::{authorize, Decision, Policy, Request};

/// The seed's block, verbatim (lines 6-18 of seed/lateral-movement.txt).
pub const SEED: &str = include_str!("../../../examples/policy.ew");

pub fn sets(entries: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
        .collect()
}

/// PRODUCT.md's [segments].
pub fn segments() -> BTreeMap<String, Vec<String>> {
    sets(&[
        ("app", &["spiffe://corp.example/app/**"]),
        ("workstations", &["spiffe://corp.example/workstations/**"]),
        ("db", &["spiffe://corp.example/db/**"]),
        ("domain", &["spiffe://corp.example/domain/**"]),
    ])
}

/// PRODUCT.md's [groups].
pub fn groups() -> BTreeMap<String, Vec<String>> {
    sets(&[(
        "human_operators",
        &["spiffe://corp.example/app/operators/*"],
    )])
}

pub fn parse(text: &str) -> Policy {
    Policy::parse("policy.ew", text, &segments(), &groups())
        .unwrap_or_else(|errs| panic!("policy should parse: {errs:#?}"))
}

pub fn parse_err(text: &str) -> Vec<String> {
    match Policy::parse("policy.ew", text, &segments(), &groups()) {
        Ok(_) => panic!("policy should be refused:\n{text}"),
        Err(errs) => errs.iter().map(ToString::to_string).collect(),
    }
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// A request to the db segment on 5432 from loopback.
pub fn decide(policy: &Policy, id_str: &str, user: &str, database: &str, mfa: bool) -> Decision {
    let id = id(id_str);
    authorize(
        policy,
        &Request {
            id: &id,
            source: IpAddr::V4(Ipv4Addr::LOCALHOST),
            segment: "db",
            port: 5432,
            user,
            database,
            mfa_fresh: mfa,
            mfa_roles: None,
        },
    )
}
