//! SPIFFE IDs and trust domains, parsed once and strictly (SPIFFE-ID standard §2).
//!
//! Every other crate takes a [`SpiffeId`] rather than a string, so an identity that reached
//! the policy or the audit log has already passed every rule below.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest SPIFFE ID the standard obliges us to handle, and the longest we accept.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// The longest trust domain name the standard allows.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why a string is not a SPIFFE ID we accept; each variant names the rule that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID is {0} bytes long; the limit is {MAX_SPIFFE_ID_LEN}")]
    TooLong(usize),
    #[error("SPIFFE ID must start with the scheme \"spiffe://\" (lowercase)")]
    WrongScheme,
    #[error("trust domain is missing after \"spiffe://\"")]
    MissingTrustDomain,
    #[error("trust domain is {0} bytes long; the limit is {MAX_TRUST_DOMAIN_LEN}")]
    TrustDomainTooLong(usize),
    #[error("trust domain must not carry a port (found ':')")]
    Port,
    #[error("trust domain must not carry userinfo (found '@')")]
    UserInfo,
    #[error("SPIFFE ID must not carry a query (found '?')")]
    Query,
    #[error("SPIFFE ID must not carry a fragment (found '#')")]
    Fragment,
    #[error("SPIFFE ID must not be percent-encoded (found '%')")]
    PercentEncoded,
    #[error(
        "trust domain has {0:?}; only lowercase letters, digits, '.', '-' and '_' are allowed"
    )]
    TrustDomainChar(char),
    #[error("workload SPIFFE ID needs a path after the trust domain (e.g. spiffe://corp.example/app/billing)")]
    MissingPath,
    #[error("path has an empty segment ('//')")]
    EmptySegment,
    #[error("path must not end with '/'")]
    TrailingSlash,
    #[error("path segments '.' and '..' are not allowed")]
    DotSegment,
    #[error("path has {0:?}; only letters, digits, '.', '-' and '_' are allowed")]
    PathChar(char),
    #[error("SPIFFE ID {id} belongs to trust domain {found:?}, not {expected:?}")]
    ForeignTrustDomain {
        id: String,
        found: String,
        expected: String,
    },
}

/// A trust domain name such as `corp.example`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (no scheme).
    pub fn parse(name: &str) -> Result<Self, SpiffeIdError> {
        check_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://DOMAIN`, as written in a CA certificate.
    pub fn id_uri(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

/// A workload's SPIFFE ID: `spiffe://TRUST_DOMAIN/PATH`, always with a non-empty path.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole ID as given; it is already canonical because we accept one spelling only.
    raw: String,
    /// Byte offset of the '/' that starts the path.
    path_start: usize,
}

impl SpiffeId {
    /// Parses and validates a workload SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        // Query, fragment and percent-encoding are refused wherever they appear, before the
        // authority/path split, so that "spiffe://td?x" is reported as a query, not a bad char.
        if rest.contains('?') {
            return Err(SpiffeIdError::Query);
        }
        if rest.contains('#') {
            return Err(SpiffeIdError::Fragment);
        }
        if rest.contains('%') {
            return Err(SpiffeIdError::PercentEncoded);
        }
        let (domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(domain)?;
        if path.is_empty() {
            return Err(SpiffeIdError::MissingPath);
        }
        check_path(path)?;
        Ok(Self {
            raw: s.to_owned(),
            path_start: SCHEME.len() + domain.len(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The trust domain name, e.g. `corp.example`.
    pub fn trust_domain(&self) -> &str {
        &self.raw[SCHEME.len()..self.path_start]
    }

    /// The path, starting with '/', e.g. `/app/billing`.
    pub fn path(&self) -> &str {
        &self.raw[self.path_start..]
    }

    /// The path's segments, e.g. `["app", "billing"]`.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path()[1..].split('/')
    }

    /// The last path segment, which names the database role an identity gets by default.
    pub fn last_segment(&self) -> &str {
        self.path().rsplit('/').next().unwrap_or_default()
    }

    /// Refuses an ID from another trust domain than `expected`.
    pub fn require_trust_domain(&self, expected: &TrustDomain) -> Result<(), SpiffeIdError> {
        if self.trust_domain() == expected.as_str() {
            Ok(())
        } else {
            Err(SpiffeIdError::ForeignTrustDomain {
                id: self.raw.clone(),
                found: self.trust_domain().to_owned(),
                expected: expected.as_str().to_owned(),
            })
        }
    }
}

fn check_trust_domain(domain: &str) -> Result<(), SpiffeIdError> {
    if domain.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong(domain.len()));
    }
    if domain.contains('@') {
        return Err(SpiffeIdError::UserInfo);
    }
    if domain.contains(':') {
        return Err(SpiffeIdError::Port);
    }
    for c in domain.chars() {
        if !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')) {
            return Err(SpiffeIdError::TrustDomainChar(c));
        }
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.ends_with('/') {
        return Err(SpiffeIdError::TrailingSlash);
    }
    for segment in path[1..].split('/') {
        if segment.is_empty() {
            return Err(SpiffeIdError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        for c in segment.chars() {
            if !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')) {
                return Err(SpiffeIdError::PathChar(c));
            }
        }
    }
    Ok(())
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.raw)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.raw)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: &str) -> SpiffeIdError {
        SpiffeId::parse(s).expect_err(s)
    }

    #[test]
    fn accepts_a_workload_id_and_splits_it() {
        let id = SpiffeId::parse("spiffe://corp.example/app/billing").unwrap();
        assert_eq!(id.trust_domain(), "corp.example");
        assert_eq!(id.path(), "/app/billing");
        assert_eq!(id.segments().collect::<Vec<_>>(), ["app", "billing"]);
        assert_eq!(id.last_segment(), "billing");
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "spiffe://corp.example/app/billing",
            "spiffe://a_b-c.9/X.y-Z_0/..x/.hidden",
            "spiffe://td/one",
        ] {
            let id: SpiffeId = s.parse().unwrap();
            assert_eq!(id.to_string(), s);
            assert_eq!(id.to_string().parse::<SpiffeId>().unwrap(), id);
        }
    }

    #[test]
    fn scheme_must_be_spiffe_lowercase() {
        assert!(SpiffeId::parse("spiffe://td/x").is_ok());
        assert_eq!(refused("https://td/x"), SpiffeIdError::WrongScheme);
        assert_eq!(refused("SPIFFE://td/x"), SpiffeIdError::WrongScheme);
        assert_eq!(refused("spiffe:/td/x"), SpiffeIdError::WrongScheme);
    }

    #[test]
    fn empty_is_refused() {
        assert_eq!(refused(""), SpiffeIdError::Empty);
    }

    #[test]
    fn trust_domain_is_lowercase_letters_digits_dot_dash_underscore() {
        assert!(SpiffeId::parse("spiffe://a-b_c.d9/x").is_ok());
        assert_eq!(
            refused("spiffe://Corp.example/x"),
            SpiffeIdError::TrustDomainChar('C')
        );
        assert_eq!(
            refused("spiffe://corp!example/x"),
            SpiffeIdError::TrustDomainChar('!')
        );
        assert_eq!(refused("spiffe:///x"), SpiffeIdError::MissingTrustDomain);
    }

    #[test]
    fn trust_domain_length_is_bounded() {
        let ok = "a".repeat(MAX_TRUST_DOMAIN_LEN);
        assert!(SpiffeId::parse(&format!("spiffe://{ok}/x")).is_ok());
        let long = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
        assert_eq!(
            refused(&format!("spiffe://{long}/x")),
            SpiffeIdError::TrustDomainTooLong(256)
        );
    }

    #[test]
    fn port_and_userinfo_are_refused() {
        assert!(SpiffeId::parse("spiffe://td/x").is_ok());
        assert_eq!(refused("spiffe://td:443/x"), SpiffeIdError::Port);
        assert_eq!(refused("spiffe://user@td/x"), SpiffeIdError::UserInfo);
    }

    #[test]
    fn query_fragment_and_percent_encoding_are_refused() {
        assert!(SpiffeId::parse("spiffe://td/x.y").is_ok());
        assert_eq!(refused("spiffe://td/x?y=1"), SpiffeIdError::Query);
        assert_eq!(refused("spiffe://td/x#frag"), SpiffeIdError::Fragment);
        assert_eq!(refused("spiffe://td/x%41"), SpiffeIdError::PercentEncoded);
    }

    #[test]
    fn path_is_required() {
        assert!(SpiffeId::parse("spiffe://td/a").is_ok());
        assert_eq!(refused("spiffe://td"), SpiffeIdError::MissingPath);
        assert_eq!(refused("spiffe://td/"), SpiffeIdError::TrailingSlash);
    }

    #[test]
    fn path_segments_are_non_empty_and_not_dots() {
        assert!(SpiffeId::parse("spiffe://td/a/.b/c..").is_ok());
        assert_eq!(refused("spiffe://td/a//b"), SpiffeIdError::EmptySegment);
        assert_eq!(refused("spiffe://td/a/./b"), SpiffeIdError::DotSegment);
        assert_eq!(refused("spiffe://td/a/.."), SpiffeIdError::DotSegment);
        assert_eq!(refused("spiffe://td/a/b/"), SpiffeIdError::TrailingSlash);
    }

    #[test]
    fn path_characters_are_restricted() {
        assert!(SpiffeId::parse("spiffe://td/Az09.-_").is_ok());
        assert_eq!(refused("spiffe://td/a b"), SpiffeIdError::PathChar(' '));
        assert_eq!(refused("spiffe://td/a*"), SpiffeIdError::PathChar('*'));
        assert_eq!(
            refused("spiffe://td/caf\u{e9}"),
            SpiffeIdError::PathChar('\u{e9}')
        );
    }

    #[test]
    fn total_length_is_bounded_at_2048_bytes() {
        let head = "spiffe://td/";
        let ok = format!("{head}{}", "a".repeat(MAX_SPIFFE_ID_LEN - head.len()));
        assert!(SpiffeId::parse(&ok).is_ok());
        let long = format!("{ok}a");
        assert_eq!(refused(&long), SpiffeIdError::TooLong(2049));
    }

    #[test]
    fn foreign_trust_domain_is_refused() {
        let td = TrustDomain::parse("corp.example").unwrap();
        let ours = SpiffeId::parse("spiffe://corp.example/app/x").unwrap();
        assert!(ours.require_trust_domain(&td).is_ok());
        let theirs = SpiffeId::parse("spiffe://evil.example/app/x").unwrap();
        let err = theirs.require_trust_domain(&td).unwrap_err();
        assert!(err.to_string().contains("evil.example"), "{err}");
    }

    #[test]
    fn every_error_names_its_rule() {
        for (input, needle) in [
            ("https://td/x", "scheme"),
            ("spiffe://td:1/x", "port"),
            ("spiffe://u@td/x", "userinfo"),
            ("spiffe://td/x?q", "query"),
            ("spiffe://td/x#f", "fragment"),
            ("spiffe://td/%20", "percent"),
            ("spiffe://td", "path"),
            ("spiffe://td/a//b", "empty segment"),
            ("spiffe://td/a/", "end with '/'"),
            ("spiffe://td/..", "'..'"),
        ] {
            let msg = refused(input).to_string();
            assert!(msg.contains(needle), "{input}: {msg}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,64}") {
            let _ = SpiffeId::parse(&s);
        }

        #[test]
        fn valid_ids_round_trip(
            td in "[a-z0-9._-]{1,20}",
            segs in proptest::collection::vec("[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,10}", 1..5),
        ) {
            let s = format!("spiffe://{td}/{}", segs.join("/"));
            let id = SpiffeId::parse(&s).unwrap();
            proptest::prop_assert_eq!(id.as_str(), s.as_str());
            proptest::prop_assert_eq!(id.segments().count(), segs.len());
        }
    }
}
