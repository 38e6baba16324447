//! The policy language: the seed's block, parsed into rules whose names are resolved at load.
//!
//! # Grammar
//!
//! The seed's block is a valid policy file as it stands:
//!
//! ```text
//! # Zero-trust east-west policy — deny by default, allow only named flows.
//! default action = DENY # no host talks to another unless allowed
//! allow:
//! from: segment("app") # app tier only
//! to: segment("db") :5432 # reach the database on its one port
//! require:
//! - mtls(service_identity) # unique per-service cert, not a shared cred
//! - mfa(human_operators) # admins step up before any DB shell
//! deny (and alert):
//! from: segment("workstations") # laptops never reach prod directly
//! to: segment("db")
//! to: segment("domain") # and never reach the domain controller
//! ```
//!
//! A file is a list of rules. Indentation and line breaks carry no meaning (write each clause
//! on its own line, indented or not, or several on one line); `#` starts a comment that runs to
//! the end of the line (outside a string).
//!
//! ```text
//! default action = DENY            optional, at most once; DENY is the only default there is
//! allow:                           starts an allow rule
//! deny:                            starts a deny rule
//! deny (and alert):                starts a deny rule whose decisions are marked as alerts
//! from: SELECTOR, SELECTOR ...     who; several `from:` lines add alternatives (any of them)
//!     segment("app")               an identity in segment `app` ([segments] in eastwall.toml)
//!     group("human_operators")     an identity in group `human_operators` ([groups])
//!     identity("spiffe://corp.example/app/billing")   exactly this SPIFFE ID
//! to: segment("db") [:5432], ...   where; several `to:` lines add alternatives; no port = any
//! as: role("billing"), ...         database roles the rule grants (several lines add more)
//! database: "billing", ...         databases the rule grants (several lines add more)
//! require:                         conditions of an allow rule, one per `- ` item:
//!     - mtls(service_identity)     the client proved a valid SVID (the proxy only evaluates
//!                                  policy for verified SVIDs, so this always holds; it is
//!                                  accepted so the seed's policy reads as written)
//!     - mfa(human_operators)       identities in that group need a fresh MFA assertion
//! ```
//!
//! Every rule needs at least one `from:` and one `to:`. Segment and group names must be
//! defined in eastwall.toml. Errors are reported as `file:line:column: expected …`, all of
//! them, not just the first.
//!
//! # Meaning
//!
//! - Nothing is admitted unless an allow rule names it (default action DENY).
//! - A rule applies to a request when some `from:` names the identity and some `to:` names the
//!   target segment (and port, when the `to:` gives one).
//! - Roles: an allow rule with `as:` lines grants exactly those roles, and the decision records
//!   that the role was named (`role_named_by_rule`), which is the only way a superuser role can
//!   be used: the proxy checks `rolsuper` upstream and refuses it otherwise. An allow rule
//!   without `as:` grants only the role named by the last segment of the SPIFFE ID
//!   (`spiffe://corp.example/app/billing` may log in as `billing`).
//! - Databases: an allow rule with `database:` lines grants only those databases; without one
//!   any database is allowed (PostgreSQL's CONNECT privilege still applies).
//! - A deny rule that applies always wins over any allow. A deny rule with `as:` or
//!   `database:` lines applies only to those roles or databases, so
//!   `deny: from: segment("app") to: segment("db") as: role("postgres")` forbids the superuser
//!   role without touching anything else; without them it applies to every role and database.
//!   `deny (and alert)` also marks the decision as an alert.
//! - `require: - mfa(group)`: when an allow rule that would admit the request names a group
//!   the identity belongs to, the identity must present a fresh MFA assertion, otherwise the
//!   verdict is `challenge`. If several allow rules admit the request and any of them asks for
//!   MFA, MFA is required: adding a rule can never remove a step-up.
//! - Policy rules match on identity, not on the source address; the address is logged.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use eastwall_ca::spiffe::{SpiffeId, TrustDomain};

use crate::pattern::IdPattern;

/// One problem in a policy file, with its place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{col}: {message}")]
pub struct PolicyError {
    pub file: Arc<str>,
    pub line: u32,
    pub col: u32,
    pub message: String,
}

/// Where a rule is written, for decisions and the audit log; displays as `policy.ew:5`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RuleRef {
    pub file: Arc<str>,
    pub line: u32,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// What a rule does when it applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleKind {
    Allow,
    Deny,
    DenyAndAlert,
}

impl RuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Allow => "allow",
            RuleKind::Deny => "deny",
            RuleKind::DenyAndAlert => "deny (and alert)",
        }
    }
}

/// Who a `from:` names.
#[derive(Debug, Clone)]
pub(crate) enum Selector {
    Segment(usize),
    Group(usize),
    Identity(SpiffeId),
}

/// Where a `to:` points.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) segment: Box<str>,
    pub(crate) port: Option<u16>,
}

/// A segment or group: a name and its compiled patterns.
#[derive(Debug, Clone)]
pub(crate) struct NamedSet {
    pub(crate) name: Box<str>,
    pub(crate) patterns: Vec<IdPattern>,
}

impl NamedSet {
    pub(crate) fn contains(&self, id: &SpiffeId) -> bool {
        self.patterns.iter().any(|p| p.matches(id))
    }
}

/// One compiled rule.
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub(crate) kind: RuleKind,
    pub(crate) at: RuleRef,
    pub(crate) from: Vec<Selector>,
    pub(crate) to: Vec<Target>,
    pub(crate) roles: Vec<Box<str>>,
    pub(crate) databases: Vec<Box<str>>,
    /// Indexes into `Policy::groups` of the groups named by `- mfa(..)`.
    pub(crate) mfa: Vec<usize>,
    /// The reason a decision by this rule gives, written once at load so that deciding
    /// costs a copy rather than formatting (the identity and role are logged beside it).
    pub(crate) reason: String,
    /// The challenge reason for each group in `mfa`, in the same order.
    pub(crate) mfa_reasons: Vec<String>,
}

/// Rule counts by kind, for summaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RuleCounts {
    pub allow: usize,
    pub deny: usize,
    pub deny_and_alert: usize,
}

/// A compiled policy: every segment and group name resolved to its patterns at load.
#[derive(Debug, Clone)]
pub struct Policy {
    pub(crate) file: Arc<str>,
    /// Deny rules first, then allow rules, each in file order: evaluation walks them in turn.
    pub(crate) denies: Vec<Rule>,
    pub(crate) allows: Vec<Rule>,
    pub(crate) segments: Vec<NamedSet>,
    pub(crate) groups: Vec<NamedSet>,
}

impl Policy {
    /// Parses and compiles a policy. `file` is the name errors and decisions cite.
    pub fn parse(
        file: &str,
        text: &str,
        segments: &BTreeMap<String, Vec<String>>,
        groups: &BTreeMap<String, Vec<String>>,
    ) -> Result<Policy, Vec<PolicyError>> {
        Self::parse_in(file, text, segments, groups, None)
    }

    /// As [`Policy::parse`], also requiring `identity("…")` and every pattern to belong to
    /// `trust_domain` when one is given.
    pub fn parse_in(
        file: &str,
        text: &str,
        segments: &BTreeMap<String, Vec<String>>,
        groups: &BTreeMap<String, Vec<String>>,
        trust_domain: Option<&TrustDomain>,
    ) -> Result<Policy, Vec<PolicyError>> {
        let file: Arc<str> = file.into();
        let mut errors = Vec::new();
        let segments = compile_sets(&file, "segment", segments, trust_domain, &mut errors);
        let groups = compile_sets(&file, "group", groups, trust_domain, &mut errors);
        let tokens = lex(&file, text, &mut errors);
        let mut parser = Parser {
            file: file.clone(),
            tokens,
            pos: 0,
            errors,
            segments: &segments,
            groups: &groups,
            trust_domain,
            denies: Vec::new(),
            allows: Vec::new(),
            default_at: None,
        };
        parser.parse_file();
        let Parser {
            errors,
            denies,
            allows,
            ..
        } = parser;
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Policy {
            file,
            denies,
            allows,
            segments,
            groups,
        })
    }

    /// The file name rules cite.
    pub fn file(&self) -> &str {
        &self.file
    }

    pub fn rule_count(&self) -> usize {
        self.denies.len() + self.allows.len()
    }

    pub fn counts(&self) -> RuleCounts {
        let mut c = RuleCounts {
            allow: self.allows.len(),
            ..RuleCounts::default()
        };
        for rule in &self.denies {
            match rule.kind {
                RuleKind::DenyAndAlert => c.deny_and_alert += 1,
                _ => c.deny += 1,
            }
        }
        c
    }

    /// Whether `id` is in a group some allow rule names in `- mfa(..)`: such an identity
    /// needs a fresh MFA assertion before it is admitted by that rule.
    pub fn requires_mfa(&self, id: &SpiffeId) -> bool {
        self.allows
            .iter()
            .flat_map(|r| r.mfa.iter())
            .any(|&g| self.groups.get(g).is_some_and(|set| set.contains(id)))
    }

    /// The groups named by some `- mfa(..)`, each once, in name order.
    pub fn mfa_groups(&self) -> Vec<&str> {
        let mut idx: Vec<usize> = self
            .allows
            .iter()
            .flat_map(|r| r.mfa.iter().copied())
            .collect();
        idx.sort_unstable();
        idx.dedup();
        idx.iter()
            .filter_map(|&g| self.groups.get(g).map(|s| &*s.name))
            .collect()
    }

    /// The segments `id` belongs to, in name order.
    pub fn segments_of(&self, id: &SpiffeId) -> Vec<&str> {
        self.segments
            .iter()
            .filter(|s| s.contains(id))
            .map(|s| &*s.name)
            .collect()
    }

    /// The groups `id` belongs to, in name order.
    pub fn groups_of(&self, id: &SpiffeId) -> Vec<&str> {
        self.groups
            .iter()
            .filter(|s| s.contains(id))
            .map(|s| &*s.name)
            .collect()
    }
}

fn compile_sets(
    file: &Arc<str>,
    what: &str,
    sets: &BTreeMap<String, Vec<String>>,
    trust_domain: Option<&TrustDomain>,
    errors: &mut Vec<PolicyError>,
) -> Vec<NamedSet> {
    // BTreeMap iteration is in name order, which `segments_of`/`mfa_groups` rely on.
    sets.iter()
        .map(|(name, patterns)| NamedSet {
            name: name.as_str().into(),
            patterns: patterns
                .iter()
                .filter_map(|raw| match IdPattern::parse(raw, trust_domain) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        // Settings validation reports these against eastwall.toml first; this
                        // only fires when the API is used directly.
                        errors.push(PolicyError {
                            file: file.clone(),
                            line: 1,
                            col: 1,
                            message: format!("{what} {name:?} has an invalid pattern {raw:?}: {e}"),
                        });
                        None
                    }
                })
                .collect(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(String),
    Colon,
    Comma,
    LParen,
    RParen,
    Eq,
    Dash,
    Eof,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Ident(s) => write!(f, "`{s}`"),
            Tok::Str(s) => write!(f, "string {s:?}"),
            Tok::Num(s) => write!(f, "number {s}"),
            Tok::Colon => f.write_str("`:`"),
            Tok::Comma => f.write_str("`,`"),
            Tok::LParen => f.write_str("`(`"),
            Tok::RParen => f.write_str("`)`"),
            Tok::Eq => f.write_str("`=`"),
            Tok::Dash => f.write_str("`-`"),
            Tok::Eof => f.write_str("end of file"),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: u32,
    col: u32,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_ident_continue(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

fn lex(file: &Arc<str>, text: &str, errors: &mut Vec<PolicyError>) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut line: u32 = 1;
    let mut col: u32 = 1;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let (tl, tc) = (line, col);
        col = col.saturating_add(1);
        let simple = match c {
            '\n' => {
                line = line.saturating_add(1);
                col = 1;
                continue;
            }
            c if c.is_whitespace() => continue,
            '#' => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                }
                continue;
            }
            ':' => Some(Tok::Colon),
            ',' => Some(Tok::Comma),
            '(' => Some(Tok::LParen),
            ')' => Some(Tok::RParen),
            '=' => Some(Tok::Eq),
            '-' => Some(Tok::Dash),
            _ => None,
        };
        let tok = if let Some(tok) = simple {
            tok
        } else if c == '"' {
            let mut s = String::new();
            let mut closed = false;
            while let Some(&n) = chars.peek() {
                if n == '\n' {
                    break;
                }
                chars.next();
                col = col.saturating_add(1);
                match n {
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\\' => match chars.peek() {
                        Some(&e @ ('"' | '\\')) => {
                            chars.next();
                            col = col.saturating_add(1);
                            s.push(e);
                        }
                        _ => errors.push(err_at(
                            file,
                            line,
                            col.saturating_sub(1),
                            "expected `\\\"` or `\\\\` (the only escapes inside a string)".into(),
                        )),
                    },
                    n => s.push(n),
                }
            }
            if !closed {
                errors.push(err_at(
                    file,
                    tl,
                    tc,
                    "expected a closing `\"` before the end of the line".into(),
                ));
            }
            Tok::Str(s)
        } else if is_ident_start(c) {
            let mut s = String::from(c);
            while let Some(&n) = chars.peek() {
                if !is_ident_continue(n) {
                    break;
                }
                s.push(n);
                chars.next();
                col = col.saturating_add(1);
            }
            Tok::Ident(s)
        } else if c.is_ascii_digit() {
            let mut s = String::from(c);
            while let Some(&n) = chars.peek() {
                if !n.is_ascii_digit() {
                    break;
                }
                s.push(n);
                chars.next();
                col = col.saturating_add(1);
            }
            Tok::Num(s)
        } else {
            errors.push(err_at(
                file,
                tl,
                tc,
                format!("unexpected character {c:?}; expected a keyword such as `allow:`, `from:` or `to:`, a string in double quotes, or `#` to start a comment"),
            ));
            continue;
        };
        tokens.push(Token {
            tok,
            line: tl,
            col: tc,
        });
    }
    tokens.push(Token {
        tok: Tok::Eof,
        line,
        col,
    });
    tokens
}

fn err_at(file: &Arc<str>, line: u32, col: u32, message: String) -> PolicyError {
    PolicyError {
        file: file.clone(),
        line,
        col,
        message,
    }
}

// ---------------------------------------------------------------------------------------------
// Parser

const CLAUSES: [&str; 5] = ["from", "to", "as", "database", "require"];
const CLAUSE_LIST: &str = "`from:`, `to:`, `as:`, `database:` or `require:`";
const RULE_STARTS: &str = "`allow:`, `deny:`, `deny (and alert):` or `default action = DENY`";
/// PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes; a longer name in policy would
/// never match what the server calls the role.
const MAX_NAME_LEN: usize = 63;

/// Why `s` cannot be a PostgreSQL role or database name as written, if it cannot.
pub(crate) fn name_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        Some("it is empty")
    } else if s.len() > MAX_NAME_LEN {
        Some("it is longer than 63 bytes, which PostgreSQL would truncate")
    } else if s.chars().any(|c| c.is_control()) {
        Some("it contains a control character")
    } else {
        None
    }
}

struct Parser<'a> {
    file: Arc<str>,
    tokens: Vec<Token>,
    pos: usize,
    errors: Vec<PolicyError>,
    segments: &'a [NamedSet],
    groups: &'a [NamedSet],
    trust_domain: Option<&'a TrustDomain>,
    denies: Vec<Rule>,
    allows: Vec<Rule>,
    default_at: Option<u32>,
}

/// A syntax error already recorded; the caller recovers by skipping ahead.
struct Recorded;

impl Parser<'_> {
    fn peek(&self) -> &Token {
        self.peek_at(0)
    }

    fn peek_at(&self, n: usize) -> &Token {
        // The lexer always ends with Eof, so the last token is a safe answer past the end.
        let last = self.tokens.len().saturating_sub(1);
        &self.tokens[(self.pos + n).min(last)]
    }

    fn bump(&mut self) -> Token {
        let t = self.peek().clone();
        if self.pos < self.tokens.len().saturating_sub(1) {
            self.pos += 1;
        }
        t
    }

    fn is_ident(&self, n: usize, word: &str) -> bool {
        matches!(&self.peek_at(n).tok, Tok::Ident(s) if s == word)
    }

    fn error(&mut self, line: u32, col: u32, message: String) {
        self.errors.push(err_at(&self.file, line, col, message));
    }

    fn expected(&mut self, what: &str) -> Recorded {
        let t = self.peek().clone();
        self.error(t.line, t.col, format!("expected {what}, found {}", t.tok));
        Recorded
    }

    fn expect(&mut self, tok: Tok, what: &str) -> Result<Token, Recorded> {
        if self.peek().tok == tok {
            Ok(self.bump())
        } else {
            Err(self.expected(what))
        }
    }

    fn expect_ident(&mut self, word: &str) -> Result<Token, Recorded> {
        if self.is_ident(0, word) {
            Ok(self.bump())
        } else {
            Err(self.expected(&format!("`{word}`")))
        }
    }

    /// Whether the next tokens start a rule or the default line.
    fn at_rule_start(&self) -> bool {
        (self.is_ident(0, "allow") && self.peek_at(1).tok == Tok::Colon)
            || (self.is_ident(0, "deny") && matches!(self.peek_at(1).tok, Tok::Colon | Tok::LParen))
            || (self.is_ident(0, "default") && self.is_ident(1, "action"))
    }

    fn at_clause_start(&self) -> bool {
        matches!(&self.peek().tok, Tok::Ident(s) if CLAUSES.contains(&s.as_str()))
            && self.peek_at(1).tok == Tok::Colon
    }

    /// After an error: skip to something a rule or clause can start from.
    fn recover(&mut self) {
        while self.peek().tok != Tok::Eof && !self.at_rule_start() && !self.at_clause_start() {
            self.bump();
        }
    }

    fn parse_file(&mut self) {
        while self.peek().tok != Tok::Eof {
            if self.is_ident(0, "default") {
                if self.parse_default().is_err() {
                    self.recover();
                }
            } else if self.is_ident(0, "allow") || self.is_ident(0, "deny") {
                self.parse_rule();
            } else {
                self.unknown_keyword(RULE_STARTS);
                self.bump();
                self.recover();
            }
        }
    }

    /// Reports a word where a keyword belongs, with a suggestion when it is a near miss.
    fn unknown_keyword(&mut self, expected: &str) {
        let t = self.peek().clone();
        let hint = match &t.tok {
            Tok::Ident(word) => {
                let known = [
                    "allow", "deny", "default", "from", "to", "as", "database", "require",
                ];
                if CLAUSES.contains(&word.as_str()) {
                    // A real clause keyword, just outside any rule.
                    format!(" (a `{word}:` line belongs inside a rule: start one with `allow:` or `deny:`)")
                } else {
                    known
                        .iter()
                        .find(|k| k.len() > 2 && edit_distance(k, word) <= 2)
                        .map(|k| format!(" (did you mean `{k}:`?)"))
                        .unwrap_or_default()
                }
            }
            _ => String::new(),
        };
        let found = match (&t.tok, self.peek_at(1).tok == Tok::Colon) {
            (Tok::Ident(w), true) => format!("`{w}:`"),
            (tok, _) => tok.to_string(),
        };
        self.error(
            t.line,
            t.col,
            format!("expected {expected}, found {found}{hint}"),
        );
    }

    fn parse_default(&mut self) -> Result<(), Recorded> {
        let start = self.bump();
        self.expect_ident("action")?;
        self.expect(Tok::Eq, "`=` (as in `default action = DENY`)")?;
        let t = self.peek().clone();
        match &t.tok {
            Tok::Ident(v) if v.eq_ignore_ascii_case("deny") => {
                self.bump();
            }
            Tok::Ident(v) if v.eq_ignore_ascii_case("allow") => {
                self.bump();
                self.error(
                    t.line,
                    t.col,
                    "expected `DENY`: Eastwall admits only the flows an allow rule names, so the default action is always DENY".into(),
                );
                return Err(Recorded);
            }
            _ => return Err(self.expected("`DENY`")),
        }
        if let Some(first) = self.default_at {
            self.error(
                start.line,
                start.col,
                format!("expected one `default action` line; it is already set on line {first}"),
            );
        } else {
            self.default_at = Some(start.line);
        }
        Ok(())
    }

    fn parse_rule(&mut self) {
        let head = self.bump();
        let mut header_ok = true;
        let kind = if self.is_ident_tok(&head, "allow") {
            RuleKind::Allow
        } else if self.peek().tok == Tok::LParen {
            if self.parse_alert_suffix().is_err() {
                // One error per broken header: skip to the clauses without also asking for `:`.
                header_ok = false;
                self.recover();
            }
            RuleKind::DenyAndAlert
        } else {
            RuleKind::Deny
        };
        if header_ok
            && self
                .expect(Tok::Colon, &format!("`:` after `{}`", kind.as_str()))
                .is_err()
        {
            self.recover();
        }
        let mut rule = Rule {
            kind,
            at: RuleRef {
                file: self.file.clone(),
                line: head.line,
            },
            from: Vec::new(),
            to: Vec::new(),
            roles: Vec::new(),
            databases: Vec::new(),
            mfa: Vec::new(),
            reason: String::new(),
            mfa_reasons: Vec::new(),
        };
        let mut require_at: Option<(u32, u32)> = None;
        // Whether the clause was written at all, so an unknown segment in it is not also
        // reported as a missing clause.
        let (mut saw_from, mut saw_to) = (false, false);
        loop {
            if self.peek().tok == Tok::Eof || self.at_rule_start() {
                break;
            }
            if !self.at_clause_start() {
                self.unknown_keyword(&format!("{CLAUSE_LIST}, or a new rule"));
                self.bump();
                self.recover();
                continue;
            }
            let kw = self.bump();
            self.bump(); // the ':'
            let result = match &kw.tok {
                Tok::Ident(k) if k == "from" => {
                    saw_from = true;
                    self.parse_from(&mut rule)
                }
                Tok::Ident(k) if k == "to" => {
                    saw_to = true;
                    self.parse_to(&mut rule)
                }
                Tok::Ident(k) if k == "as" => self.parse_as(&mut rule),
                Tok::Ident(k) if k == "database" => self.parse_database(&mut rule),
                _ => {
                    require_at.get_or_insert((kw.line, kw.col));
                    self.parse_require(&mut rule)
                }
            };
            if result.is_err() {
                self.recover();
            }
        }
        if !saw_from {
            self.error(
                head.line,
                head.col,
                format!(
                    "expected a `from:` line in this {} rule, e.g. `from: segment(\"app\")`",
                    kind.as_str()
                ),
            );
        }
        if !saw_to {
            self.error(
                head.line,
                head.col,
                format!(
                    "expected a `to:` line in this {} rule, e.g. `to: segment(\"db\") :5432`",
                    kind.as_str()
                ),
            );
        }
        if let (RuleKind::Deny | RuleKind::DenyAndAlert, Some((l, c))) = (kind, require_at) {
            self.error(
                l,
                c,
                "expected `from:`, `to:`, `as:` or `database:`: `require:` only applies to allow rules (a deny has nothing to require)".into(),
            );
        }
        rule.reason = match kind {
            RuleKind::Allow => format!("allow rule {} grants this flow", rule.at),
            _ => format!("{} rule {} forbids this flow", kind.as_str(), rule.at),
        };
        rule.mfa_reasons = rule
            .mfa
            .iter()
            .map(|&g| {
                let name = self.groups.get(g).map_or("?", |s| &*s.name);
                format!(
                    "mfa_required: members of group {name:?} must present a fresh MFA assertion (rule {})",
                    rule.at
                )
            })
            .collect();
        match kind {
            RuleKind::Allow => self.allows.push(rule),
            _ => self.denies.push(rule),
        }
    }

    fn is_ident_tok(&self, t: &Token, word: &str) -> bool {
        matches!(&t.tok, Tok::Ident(s) if s == word)
    }

    fn parse_alert_suffix(&mut self) -> Result<(), Recorded> {
        self.bump(); // '('
        self.expect_ident("and")?;
        self.expect_ident("alert")?;
        self.expect(Tok::RParen, "`)` (as in `deny (and alert):`)")?;
        Ok(())
    }

    /// `NAME("string")`, returning the string and its position.
    fn call_with_string(&mut self, name: &str) -> Result<(String, u32, u32), Recorded> {
        self.bump(); // name
        self.expect(Tok::LParen, &format!("`(` after `{name}`"))?;
        let t = self.peek().clone();
        let Tok::Str(s) = t.tok else {
            return Err(self.expected(&format!("a string in double quotes, as in `{name}(\"…\")`")));
        };
        self.bump();
        self.expect(Tok::RParen, &format!("`)` to close `{name}(`"))?;
        Ok((s, t.line, t.col))
    }

    /// Parses `item, item, ...` with `one` parsing each item.
    fn comma_list(
        &mut self,
        rule: &mut Rule,
        mut one: impl FnMut(&mut Self, &mut Rule) -> Result<(), Recorded>,
    ) -> Result<(), Recorded> {
        loop {
            one(self, rule)?;
            if self.peek().tok == Tok::Comma {
                self.bump();
            } else {
                return Ok(());
            }
        }
    }

    fn resolve(&mut self, sets_are_groups: bool, name: &str, line: u32, col: u32) -> Option<usize> {
        let (sets, what, table) = if sets_are_groups {
            (self.groups, "group", "[groups]")
        } else {
            (self.segments, "segment", "[segments]")
        };
        if let Some(i) = sets.iter().position(|s| &*s.name == name) {
            return Some(i);
        }
        let defined: Vec<String> = sets.iter().map(|s| format!("{:?}", &*s.name)).collect();
        let defined = if defined.is_empty() {
            "none are defined".to_owned()
        } else {
            format!("defined: {}", defined.join(", "))
        };
        self.error(
            line,
            col,
            format!("expected a {what} defined in {table} of eastwall.toml, found unknown {what} {name:?} ({defined})"),
        );
        None
    }

    fn parse_from(&mut self, rule: &mut Rule) -> Result<(), Recorded> {
        self.comma_list(rule, |p, rule| {
            let which = ["segment", "group", "identity"]
                .into_iter()
                .find(|w| p.is_ident(0, w));
            let Some(which) = which else {
                return Err(p.expected(
                    "`segment(\"name\")`, `group(\"name\")` or `identity(\"spiffe://…\")`",
                ));
            };
            let (s, line, col) = p.call_with_string(which)?;
            match which {
                "segment" => {
                    if let Some(i) = p.resolve(false, &s, line, col) {
                        rule.from.push(Selector::Segment(i));
                    }
                }
                "group" => {
                    if let Some(i) = p.resolve(true, &s, line, col) {
                        rule.from.push(Selector::Group(i));
                    }
                }
                _ => match SpiffeId::parse(&s) {
                    Ok(id) => match p.trust_domain.map(|td| id.require_trust_domain(td)) {
                        Some(Err(e)) => p.error(line, col, format!("expected an identity in this sidecar's trust domain: {e}")),
                        _ => rule.from.push(Selector::Identity(id)),
                    },
                    Err(e) => p.error(
                        line,
                        col,
                        format!("expected a SPIFFE ID such as \"spiffe://corp.example/app/billing\": {e} (use segment(..) or group(..) for patterns)"),
                    ),
                },
            }
            Ok(())
        })
    }

    fn parse_to(&mut self, rule: &mut Rule) -> Result<(), Recorded> {
        self.comma_list(rule, |p, rule| {
            if !p.is_ident(0, "segment") {
                return Err(p.expected("`segment(\"name\")`, optionally followed by `:PORT`"));
            }
            let (s, line, col) = p.call_with_string("segment")?;
            let mut port = None;
            if p.peek().tok == Tok::Colon {
                p.bump();
                let t = p.peek().clone();
                let Tok::Num(n) = &t.tok else {
                    return Err(
                        p.expected("a port number after `:`, as in `to: segment(\"db\") :5432`")
                    );
                };
                p.bump();
                match n.parse::<u16>() {
                    Ok(v) if v > 0 => port = Some(v),
                    _ => p.error(
                        t.line,
                        t.col,
                        format!("expected a port from 1 to 65535, found {n}"),
                    ),
                }
            }
            if p.resolve(false, &s, line, col).is_some() {
                rule.to.push(Target {
                    segment: s.into(),
                    port,
                });
            }
            Ok(())
        })
    }

    fn check_name(&mut self, what: &str, s: &str, line: u32, col: u32) -> bool {
        if let Some(problem) = name_problem(s) {
            self.error(line, col, format!("expected a {what} name, but {problem}"));
            return false;
        }
        true
    }

    fn parse_as(&mut self, rule: &mut Rule) -> Result<(), Recorded> {
        self.comma_list(rule, |p, rule| {
            if !p.is_ident(0, "role") {
                return Err(p.expected("`role(\"name\")`"));
            }
            let (s, line, col) = p.call_with_string("role")?;
            if p.check_name("role", &s, line, col) {
                rule.roles.push(s.into());
            }
            Ok(())
        })
    }

    fn parse_database(&mut self, rule: &mut Rule) -> Result<(), Recorded> {
        self.comma_list(rule, |p, rule| {
            let t = p.peek().clone();
            let Tok::Str(s) = t.tok else {
                return Err(
                    p.expected("a database name in double quotes, as in `database: \"billing\"`")
                );
            };
            p.bump();
            if p.check_name("database", &s, t.line, t.col) {
                rule.databases.push(s.into());
            }
            Ok(())
        })
    }

    fn parse_require(&mut self, rule: &mut Rule) -> Result<(), Recorded> {
        let mut any = false;
        loop {
            let dashed = self.peek().tok == Tok::Dash;
            if dashed {
                self.bump();
            } else if !(self.is_ident(0, "mtls") || self.is_ident(0, "mfa"))
                || self.peek_at(1).tok != Tok::LParen
            {
                if !any {
                    return Err(self.expected("`- mtls(service_identity)` or `- mfa(group)`"));
                }
                return Ok(());
            }
            any = true;
            if self.is_ident(0, "mtls") {
                self.bump();
                self.expect(Tok::LParen, "`(` after `mtls`")?;
                self.expect_ident("service_identity")?;
                self.expect(Tok::RParen, "`)` to close `mtls(`")?;
            } else if self.is_ident(0, "mfa") {
                self.bump();
                self.expect(Tok::LParen, "`(` after `mfa`")?;
                let t = self.peek().clone();
                let name = match &t.tok {
                    Tok::Ident(s) | Tok::Str(s) => s.clone(),
                    _ => return Err(self.expected("a group name, as in `mfa(human_operators)`")),
                };
                self.bump();
                self.expect(Tok::RParen, "`)` to close `mfa(`")?;
                if let Some(g) = self.resolve(true, &name, t.line, t.col) {
                    if !rule.mfa.contains(&g) {
                        rule.mfa.push(g);
                    }
                }
            } else {
                return Err(self.expected("`mtls(service_identity)` or `mfa(group)` after `-`"));
            }
            if self.peek().tok == Tok::Comma {
                self.bump();
            }
        }
    }
}

/// Levenshtein distance over bytes, for "did you mean" hints on short keywords.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if b.len() > 32 {
        return usize::MAX;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
