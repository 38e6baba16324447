//! SPIFFE ID patterns, the members of segments and groups: compiled once, matched without allocating.
//!
//! # Syntax
//!
//! A pattern is a SPIFFE ID whose path segments may be wildcards:
//!
//! | pattern segment | matches |
//! |---|---|
//! | `billing` | exactly the path segment `billing` |
//! | `*` | exactly one path segment, whatever it is |
//! | `**` | one or more path segments |
//!
//! Wildcards stand for whole segments only (`app*` and `a/**b` are errors), and the trust
//! domain is always literal, so `spiffe://corp.example/app/**` matches
//! `spiffe://corp.example/app/billing` and `spiffe://corp.example/app/operators/alice` but not
//! `spiffe://corp.example/app` itself, nor anything in another trust domain.
//! `spiffe://corp.example/app/operators/*` matches `.../operators/alice` but not
//! `.../operators/alice/laptop`. `**` needs at least one segment so that a segment written as
//! "everything under `app/`" never silently includes the parent identity `app`.

use std::fmt;

use eastwall_ca::spiffe::{SpiffeId, TrustDomain};

/// Why a string is not a pattern we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("pattern must start with \"spiffe://\" followed by the trust domain, e.g. \"spiffe://corp.example/app/**\"")]
    Scheme,
    #[error("pattern's trust domain {found:?} is not this sidecar's trust domain {expected:?}")]
    ForeignTrustDomain { found: String, expected: String },
    #[error("pattern's trust domain is invalid: {0}")]
    TrustDomain(String),
    #[error("pattern needs a path after the trust domain, e.g. \"spiffe://corp.example/app/**\"")]
    MissingPath,
    #[error("pattern has an empty path segment ('//' or a trailing '/')")]
    EmptySegment,
    #[error("wildcards stand for whole path segments only: {0:?} must be \"*\" or \"**\"")]
    PartialWildcard(String),
    #[error("path segment {0:?} is not allowed; use letters, digits, '.', '-', '_', or a whole-segment \"*\" / \"**\"")]
    Segment(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Lit(Box<str>),
    /// `*`: exactly one segment.
    One,
    /// `**`: one or more segments.
    Many,
}

/// A compiled SPIFFE ID pattern.
#[derive(Clone, PartialEq, Eq)]
pub struct IdPattern {
    raw: Box<str>,
    trust_domain: Box<str>,
    segs: Box<[Seg]>,
}

impl IdPattern {
    /// Compiles a pattern; with `expected` set, its trust domain must be that one.
    pub fn parse(raw: &str, expected: Option<&TrustDomain>) -> Result<Self, PatternError> {
        let rest = raw.strip_prefix("spiffe://").ok_or(PatternError::Scheme)?;
        let (domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        TrustDomain::parse(domain).map_err(|e| PatternError::TrustDomain(e.to_string()))?;
        if let Some(expected) = expected {
            if domain != expected.as_str() {
                return Err(PatternError::ForeignTrustDomain {
                    found: domain.to_owned(),
                    expected: expected.as_str().to_owned(),
                });
            }
        }
        if path.len() <= 1 {
            return Err(PatternError::MissingPath);
        }
        let mut segs = Vec::new();
        for seg in path[1..].split('/') {
            segs.push(match seg {
                "" => return Err(PatternError::EmptySegment),
                "*" => Seg::One,
                "**" => Seg::Many,
                s if s.contains('*') => return Err(PatternError::PartialWildcard(s.to_owned())),
                s => {
                    // A literal segment must be something a SpiffeId could contain, or the
                    // pattern could never match and the author would not find out why.
                    let probe = format!("spiffe://td/{s}");
                    if SpiffeId::parse(&probe).is_err() {
                        return Err(PatternError::Segment(s.to_owned()));
                    }
                    Seg::Lit(s.into())
                }
            });
        }
        Ok(Self {
            raw: raw.into(),
            trust_domain: domain.into(),
            segs: segs.into(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether some identity this pattern names could have `segment` as its last path
    /// segment (the role it gets by default).
    pub fn may_end_with(&self, segment: &str) -> bool {
        match self.segs.last() {
            Some(Seg::Lit(lit)) => &**lit == segment,
            Some(Seg::One | Seg::Many) => true,
            None => false,
        }
    }

    /// Whether `id` is one of the identities this pattern names.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        // `SpiffeId::segments` is an opaque iterator; the matcher needs a cloneable one.
        let path = id.path().get(1..).unwrap_or_default();
        id.trust_domain() == &*self.trust_domain && match_segments(&self.segs, path.split('/'))
    }
}

/// Wildcard matching over path segments, the classic linear backtracking algorithm: `**` is
/// "one segment, then any number", and only the most recent `**` is ever re-tried, which is
/// enough because a later `**` can absorb whatever an earlier one could.
fn match_segments<'a, I>(pat: &[Seg], mut segs: I) -> bool
where
    I: Iterator<Item = &'a str> + Clone,
{
    let mut p = 0;
    // (pattern index after the last `**`, segments left after what it has absorbed so far)
    let mut resume: Option<(usize, I)> = None;
    loop {
        let Some(seg) = segs.next() else {
            return p == pat.len();
        };
        let step = match pat.get(p) {
            Some(Seg::Many) => {
                p += 1;
                resume = Some((p, segs.clone()));
                true
            }
            Some(Seg::One) => {
                p += 1;
                true
            }
            Some(Seg::Lit(lit)) if **lit == *seg => {
                p += 1;
                true
            }
            _ => false,
        };
        if step {
            continue;
        }
        match &mut resume {
            Some((after, absorbed)) => {
                if absorbed.next().is_none() {
                    return false;
                }
                p = *after;
                segs = absorbed.clone();
            }
            None => return false,
        }
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl fmt::Debug for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdPattern({})", self.raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pat(s: &str) -> IdPattern {
        IdPattern::parse(s, None).unwrap()
    }
    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn double_star_matches_one_or_more_segments_below() {
        let p = pat("spiffe://corp.example/app/**");
        assert!(p.matches(&id("spiffe://corp.example/app/billing")));
        assert!(p.matches(&id("spiffe://corp.example/app/operators/alice")));
        assert!(!p.matches(&id("spiffe://corp.example/app")));
        assert!(!p.matches(&id("spiffe://corp.example/application/x")));
        assert!(!p.matches(&id("spiffe://other.example/app/billing")));
    }

    #[test]
    fn single_star_matches_exactly_one_segment() {
        let p = pat("spiffe://corp.example/app/operators/*");
        assert!(p.matches(&id("spiffe://corp.example/app/operators/alice")));
        assert!(!p.matches(&id("spiffe://corp.example/app/operators")));
        assert!(!p.matches(&id("spiffe://corp.example/app/operators/alice/laptop")));
    }

    #[test]
    fn literal_pattern_matches_only_that_identity() {
        let p = pat("spiffe://corp.example/app/billing");
        assert!(p.matches(&id("spiffe://corp.example/app/billing")));
        assert!(!p.matches(&id("spiffe://corp.example/app/billing2")));
        assert!(!p.matches(&id("spiffe://corp.example/app/billing/x")));
    }

    #[test]
    fn double_star_in_the_middle_backtracks() {
        let p = pat("spiffe://td/a/**/b/*");
        assert!(p.matches(&id("spiffe://td/a/x/b/y")));
        assert!(p.matches(&id("spiffe://td/a/x/b/b/y")));
        assert!(p.matches(&id("spiffe://td/a/b/b/y")));
        assert!(!p.matches(&id("spiffe://td/a/b/y")));
        assert!(!p.matches(&id("spiffe://td/a/x/b")));
    }

    #[test]
    fn bad_patterns_say_what_is_wrong() {
        let td = TrustDomain::parse("corp.example").unwrap();
        for (raw, needle) in [
            ("corp.example/app/**", "spiffe://"),
            ("spiffe://corp.example", "path"),
            ("spiffe://corp.example/", "path"),
            ("spiffe://corp.example/app//x", "empty"),
            ("spiffe://corp.example/app*", "whole path segments"),
            ("spiffe://corp.example/a b", "not allowed"),
            ("spiffe://evil.example/app/**", "evil.example"),
            ("spiffe://Corp/app", "trust domain"),
        ] {
            let err = IdPattern::parse(raw, Some(&td)).unwrap_err().to_string();
            assert!(err.contains(needle), "{raw}: {err}");
        }
    }

    /// The obvious exponential definition, to check the fast matcher against.
    fn reference(pat: &[Seg], segs: &[&str]) -> bool {
        match (pat.first(), segs.first()) {
            (None, None) => true,
            (None, Some(_)) => false,
            (Some(Seg::Many), _) => (1..=segs.len()).any(|n| reference(&pat[1..], &segs[n..])),
            (Some(_), None) => false,
            (Some(Seg::One), Some(_)) => reference(&pat[1..], &segs[1..]),
            (Some(Seg::Lit(l)), Some(s)) => **l == **s && reference(&pat[1..], &segs[1..]),
        }
    }

    fn seg_strategy() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just("a"), Just("b"), Just("c")]
    }

    proptest! {
        #[test]
        fn matcher_agrees_with_the_definition(
            pat_segs in prop::collection::vec(prop_oneof![Just("*"), Just("**"), seg_strategy()], 1..6),
            id_segs in prop::collection::vec(seg_strategy(), 1..8),
        ) {
            let p = pat(&format!("spiffe://td/{}", pat_segs.join("/")));
            let i = id(&format!("spiffe://td/{}", id_segs.join("/")));
            prop_assert_eq!(p.matches(&i), reference(&p.segs, &id_segs), "{} vs {}", p, i);
        }

        #[test]
        fn double_star_prefix_matches_everything_strictly_below(
            prefix in prop::collection::vec("[a-z]{1,4}", 1..3),
            below in prop::collection::vec("[a-z]{1,4}", 0..4),
        ) {
            let p = pat(&format!("spiffe://td/{}/**", prefix.join("/")));
            let mut all = prefix.clone();
            all.extend(below.iter().cloned());
            let i = id(&format!("spiffe://td/{}", all.join("/")));
            prop_assert_eq!(p.matches(&i), !below.is_empty());
        }

        #[test]
        fn single_star_matches_exactly_one_more_segment(
            prefix in prop::collection::vec("[a-z]{1,4}", 1..3),
            below in prop::collection::vec("[a-z]{1,4}", 0..4),
        ) {
            let p = pat(&format!("spiffe://td/{}/*", prefix.join("/")));
            let mut all = prefix.clone();
            all.extend(below.iter().cloned());
            let i = id(&format!("spiffe://td/{}", all.join("/")));
            prop_assert_eq!(p.matches(&i), below.len() == 1);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,64}") {
            let _ = IdPattern::parse(&s, None);
        }
    }
}
