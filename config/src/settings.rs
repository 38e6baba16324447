//! Sidecar settings: `eastwall.toml`, read strictly and checked as a whole before anything runs.
//!
//! # Keys
//!
//! Relative paths resolve against the folder that holds eastwall.toml. Durations are written
//! as `"5s"`, `"15m"`, `"1h 30m"`. Unknown keys are errors.
//!
//! ```toml
//! trust_domain = "corp.example"   # required: the SPIFFE trust domain of every identity
//! guards = "db"                   # required: the segment this sidecar guards (defined below)
//! service_port = 5432             # the port policy `to:` lines mean; independent of [listen]
//!
//! [listen]                        # required
//! address = "0.0.0.0:5432"        # required: where clients connect
//! cert = "certs/proxy.pem"        # required: the proxy's server certificate chain
//! key = "certs/proxy.key"         # required: its private key
//! client_ca = "ca/bundle.pem"     # required: the trust bundle client SVIDs must chain to
//! crl = "ca/crl.pem"              # optional: revoked client certificates
//!
//! [upstream]                      # required; exactly one of address / socket_dir
//! address = "127.0.0.1:5433"      # PostgreSQL over TCP, host:port ([v6]:port)
//! socket_dir = "/var/run/postgresql"  # or over a Unix socket in this folder ...
//! port = 5432                     # ... with this port number (socket_dir only; default 5432)
//! login = "trust"                 # required: "trust" | "password" | "cert"
//! password_file = "upstream.pw"   # password: a file holding the roles' password, or
//! password_env = "EASTWALL_UPSTREAM_PASSWORD"  # password: an environment variable
//! cert_dir = "upstream-certs"     # cert: <role>.pem + <role>.key per role (CN = role)
//! ca = "upstream-ca.pem"          # cert: the CA that signs PostgreSQL's server certificate
//! server_name = "db.internal"     # cert: name to verify on it (default: the address host)
//! connect_timeout = "5s"
//! allow_plaintext_remote = false  # trust/password logins to a non-loopback host are refused
//!                                 # unless this is true: they would cross the network in clear
//! check_role = "eastwall_check"   # optional: an ordinary role Eastwall keeps a few warm side
//!                                 # connections as, to ask the catalog what each session's
//!                                 # role can become (default: ask the session's own backend)
//!
//! [segments]                      # name = [SPIFFE ID patterns]; see the pattern module
//! app = ["spiffe://corp.example/app/**"]
//!
//! [groups]                        # name = [SPIFFE ID patterns]
//! human_operators = ["spiffe://corp.example/app/operators/*"]
//!
//! [policy]
//! file = "policy.ew"              # default "policy.ew"
//!
//! [mfa]
//! secrets = "mfa/secrets.json"    # default: enrolled TOTP secrets
//! max_age = "5m"                  # default 5m: how long an MFA assertion stays fresh
//! stepup_listen = "127.0.0.1:8443"  # optional: the HTTPS step-up endpoint; none if absent
//! token_key = "mfa/token.key"     # default: key that signs step-up tokens
//! max_session = "8h"              # optional: end MFA-admitted sessions after this long
//! max_failures = 20               # default 20 wrong codes per identity per window
//! failure_window = "15m"          # default 15m
//!
//! [audit]
//! path = "decisions.log"          # default "decisions.log": the hash-chained decision log
//! ocsf = "decisions.ocsf.jsonl"   # optional: the same decisions as OCSF 1.3 events, for a SIEM
//! statements = ["human_operators", "spiffe://corp.example/app/jobs/*"]  # default []: identities
//!                                 # (a [groups] name or a SPIFFE ID pattern) whose every statement
//!                                 # is logged; sessions admitted through an mfa(...) rule always are
//!
//! [detect]                        # the seed's five signals, inline; every key has a default
//! enabled = true                  # default true: signals are `event: "signal"` lines + a metric
//! state_file = "decisions.log.detect.json"  # default <audit.path>.detect.json
//! lock_on = []                    # default none: signals that place an automatic lock on their
//!                                 # subject, e.g. ["credential_anomaly", "fan_out"]
//! lock_ttl = "1h"                 # default 1h: how long such a lock holds
//! learning = "7d"                 # the detectors' own keys: see eastwall_detect::Settings
//! change_window = "Mon-Fri 08:00-19:00"
//!
//! [locks]
//! file = "locks.json"             # default "locks.json": `eastwall lock` writes it, the sidecar
//!                                 # watches it (a file name; not the policy file or the log)
//!
//! [fleet]                         # optional: policy, locks and logs shared over NATS JetStream
//! nats = "tls://nats-1.internal:4222"  # required: tls:// only; comma-separated for a cluster
//! name = "db-01"                  # required: this sidecar's name (eastwall.log.<name>)
//! admins = ["dbas"]               # required: who may push policies and locks ([groups] or patterns)
//! bucket = "eastwall"             # default: the key-value bucket (keys policy and lock.<id>)
//! stream = "EASTWALL_LOG"         # default: the stream of decision lines (eastwall.log.>)
//! cert = "certs/proxy.pem"        # default [listen] cert/key: the SVID presented to NATS
//! ca = "ca/bundle.pem"            # default [listen] client_ca: verifies the NATS servers
//! max_staleness = "5m"            # default 5m: the last good state serves this long offline
//! on_stale = "refuse"             # default: past it, new connections are refused ("serve")
//! head_interval = "5s"            # default 5s: how often the chain head is published
//! backlog = 4096                  # default: log batches queued for NATS before some drop
//!
//! [limits]
//! startup_timeout = "30s"         # default 30s: TLS + startup + MFA must finish within it
//! max_connections = 1000          # default 1000
//! cancels_per_second = 10         # default 10 cancel requests per source address
//! max_startups_per_source = 64    # default 64 connections per source address still in the
//!                                 # front door (TLS, startup, MFA); admitted sessions don't count
//! handshake_timeout = "5s"        # default 5s: from accept to a finished TLS handshake
//! max_handshakes = 250            # default max_connections / 4: connections not yet through
//!                                 # TLS, all sources together (at most max_connections)
//! max_handshakes_per_source = 32  # default 32 such connections per source address
//! idle_timeout = "1h"             # optional: close sessions idle this long
//! max_sessions_per_identity = 32  # default 32 (0 = default): sessions one SPIFFE ID may hold
//! shutdown_grace = "30s"          # default 30s: on SIGTERM, how long live sessions may finish
//!
//! [admin]
//! listen = "127.0.0.1:9187"       # default: plain HTTP /healthz, /readyz, /metrics; "off" or ""
//!                                 # turns it off; a non-loopback address is allowed (warned)
//! socket = "eastwall.sock"        # default: <config file stem>.sock beside eastwall.toml; the
//!                                 # Unix socket (0600) of `eastwall sessions` and `sessions kill`
//! ```
//!
//! Loading checks syntax and consistency and reads the policy file; certificate, key and
//! secret files are read by the parts that use them, which report their own errors.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use eastwall_ca::spiffe::TrustDomain;
use serde::Deserialize;
use toml::Spanned;

use crate::detect::DetectSettings;
use crate::error::ConfigError;
use crate::pattern::IdPattern;
use crate::policy::Policy;
use crate::secret::PasswordSource;

/// A loaded, validated configuration: settings plus the compiled policy they name.
#[derive(Debug, Clone)]
pub struct Config {
    pub settings: Settings,
    pub policy: Policy,
}

impl Config {
    /// Reads eastwall.toml and the policy file it names, and validates both.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let settings = Settings::load(path)?;
        let text =
            std::fs::read_to_string(&settings.policy_file).map_err(|source| ConfigError::Read {
                path: settings.policy_file.clone(),
                source,
            })?;
        let policy = Policy::parse_in(
            &settings.policy_label,
            &text,
            &settings.segments,
            &settings.groups,
            Some(&settings.trust_domain),
        )
        .map_err(ConfigError::Policy)?;
        Ok(Config { settings, policy })
    }
}

/// The sidecar's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The config file these came from.
    pub path: PathBuf,
    pub trust_domain: TrustDomain,
    /// The segment this sidecar guards; always defined in `segments`.
    pub guards: String,
    /// The port policy `to:` lines mean for this sidecar.
    pub service_port: u16,
    pub listen: ListenSettings,
    pub upstream: UpstreamSettings,
    pub mfa: MfaSettings,
    pub audit: AuditSettings,
    pub limits: Limits,
    pub admin: AdminSettings,
    /// `[locks] file`: the lock store, resolved.
    pub locks_file: PathBuf,
    /// `[detect]`: the detectors run inline, see [`crate::detect`].
    pub detect: DetectSettings,
    /// `[fleet]`: the shared control plane, see [`crate::fleet`]; None when absent.
    pub fleet: Option<crate::fleet::FleetSettings>,
    pub segments: BTreeMap<String, Vec<String>>,
    pub groups: BTreeMap<String, Vec<String>>,
    /// The policy file, resolved.
    pub policy_file: PathBuf,
    /// The policy file as written in eastwall.toml, which decisions and errors cite.
    pub policy_label: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSettings {
    pub address: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub crl: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSettings {
    pub target: UpstreamTarget,
    pub login: UpstreamLogin,
    pub connect_timeout: Duration,
    pub allow_plaintext_remote: bool,
    /// An ordinary role for warm side connections that answer the privilege question.
    pub check_role: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamTarget {
    Tcp { host: String, port: u16 },
    Unix { dir: PathBuf, port: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamLogin {
    Trust,
    /// SCRAM-SHA-256 with this secret for the upstream roles.
    Password {
        user_secrets: PasswordSource,
    },
    /// TLS client certificate `cert_dir/<role>.pem` + `<role>.key`, CN = role.
    Cert {
        cert_dir: PathBuf,
        ca: PathBuf,
        server_name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MfaSettings {
    pub secrets: PathBuf,
    pub max_age: Duration,
    pub stepup_listen: Option<SocketAddr>,
    pub token_key: PathBuf,
    pub max_session: Option<Duration>,
    pub max_failures: u32,
    pub failure_window: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    pub path: PathBuf,
    /// `ocsf`: a second, derived file of the same decisions as OCSF 1.3 events (JSON
    /// lines) for a SIEM; None when absent. The chained log stays the record.
    pub ocsf: Option<PathBuf>,
    /// `statements`: identities whose statements are logged (statement audit), besides every
    /// session admitted through an `mfa(...)` rule; group names are expanded to their patterns.
    pub statements: Vec<IdPattern>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub startup_timeout: Duration,
    pub max_connections: usize,
    pub cancels_per_second: u32,
    /// Connections one source address (IPv6: one /64) may have before admission, so that one
    /// host holding connections open cannot use up `max_connections` for everyone.
    pub max_startups_per_source: usize,
    /// Time from accept until the TLS handshake is done (plaintext negotiation included);
    /// short, and separate from `startup_timeout`, which also covers answering an MFA prompt.
    pub handshake_timeout: Duration,
    /// Connections that have not finished TLS, all sources together: a smaller budget inside
    /// `max_connections`, so silent or slow handshakes cannot starve admitted sessions or
    /// clients in the middle of logging in.
    pub max_handshakes: usize,
    /// Connections that have not finished TLS from one source (see `eastwall::source`).
    pub max_handshakes_per_source: usize,
    pub idle_timeout: Option<Duration>,
    /// Sessions one SPIFFE ID may hold at once (admitted or being admitted), so one workload
    /// cannot take all of PostgreSQL's `max_connections`. Never unlimited.
    pub max_sessions_per_identity: usize,
    /// On SIGTERM, how long live sessions may go on before they are ended (`shutdown`).
    pub shutdown_grace: Duration,
}

/// `[admin]`: the operator's side of the sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    /// `listen`: where plain HTTP serves `/healthz`, `/readyz` and `/metrics` (read-only;
    /// no administrative verb is ever served there). None when `"off"` or empty.
    pub listen: Option<SocketAddr>,
    /// The administrative Unix socket (`eastwall sessions`, `sessions kill`), mode 0600.
    pub socket: PathBuf,
}

/// `[admin] listen` when absent.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9187);

/// `[limits] max_sessions_per_identity` when absent or 0: a third of PostgreSQL's default
/// `max_connections` (100), above common pool sizes (HikariCP 10, PgBouncer 20).
pub const DEFAULT_MAX_SESSIONS_PER_IDENTITY: usize = 32;

// ---------------------------------------------------------------------------------------------
// The file as written

type Str = Spanned<String>;
type Named = BTreeMap<Spanned<String>, Spanned<Vec<Str>>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    trust_domain: Str,
    guards: Str,
    service_port: Option<Spanned<i64>>,
    listen: RawListen,
    upstream: RawUpstream,
    #[serde(default)]
    segments: Named,
    #[serde(default)]
    groups: Named,
    policy: Option<RawPolicy>,
    mfa: Option<RawMfa>,
    audit: Option<RawAudit>,
    limits: Option<RawLimits>,
    admin: Option<RawAdmin>,
    locks: Option<RawLocks>,
    fleet: Option<crate::fleet::RawFleet>,
    /// Read key by key in `crate::detect`: most of it is the detectors' own settings.
    detect: Option<Spanned<toml::Table>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Str>,
    socket: Option<Str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocks {
    file: Option<Str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    address: Str,
    cert: Str,
    key: Str,
    client_ca: Str,
    crl: Option<Str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    address: Option<Str>,
    socket_dir: Option<Str>,
    port: Option<Spanned<i64>>,
    login: Str,
    password_file: Option<Str>,
    password_env: Option<Str>,
    /// Accepted only to refuse it with a message that says why.
    password: Option<Spanned<toml::Value>>,
    cert_dir: Option<Str>,
    ca: Option<Str>,
    server_name: Option<Str>,
    connect_timeout: Option<Str>,
    allow_plaintext_remote: Option<bool>,
    check_role: Option<Str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    file: Option<Str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMfa {
    secrets: Option<Str>,
    max_age: Option<Str>,
    stepup_listen: Option<Str>,
    token_key: Option<Str>,
    max_session: Option<Str>,
    max_failures: Option<Spanned<i64>>,
    failure_window: Option<Str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    path: Option<Str>,
    ocsf: Option<Str>,
    statements: Option<Spanned<Vec<Str>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    startup_timeout: Option<Str>,
    max_connections: Option<Spanned<i64>>,
    cancels_per_second: Option<Spanned<i64>>,
    max_startups_per_source: Option<Spanned<i64>>,
    handshake_timeout: Option<Str>,
    max_handshakes: Option<Spanned<i64>>,
    max_handshakes_per_source: Option<Spanned<i64>>,
    idle_timeout: Option<Str>,
    max_sessions_per_identity: Option<Spanned<i64>>,
    shutdown_grace: Option<Str>,
}

// ---------------------------------------------------------------------------------------------
// Validation

/// Converts a byte offset in `text` to a 1-based line and column (in characters).
pub(crate) fn line_col(text: &str, offset: usize) -> (u32, u32) {
    let bytes = text.as_bytes();
    let offset = offset.min(bytes.len());
    let before = &bytes[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    // Count characters, not bytes: skip UTF-8 continuation bytes.
    let col = before[line_start..]
        .iter()
        .filter(|&&b| b & 0xC0 != 0x80)
        .count()
        + 1;
    (
        u32::try_from(line).unwrap_or(u32::MAX),
        u32::try_from(col).unwrap_or(u32::MAX),
    )
}

pub(crate) struct Checker<'a> {
    file: &'a Path,
    text: &'a str,
    dir: PathBuf,
    problems: Vec<ConfigError>,
}

impl Checker<'_> {
    pub(crate) fn invalid(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        let (line, col) = line_col(self.text, span.start);
        self.problems.push(ConfigError::Invalid {
            file: self.file.to_path_buf(),
            line,
            col,
            key: key.to_owned(),
            message: message.into(),
        });
    }

    /// A path as written in the file, resolved against the config's folder.
    pub(crate) fn resolve(&self, value: &str) -> PathBuf {
        self.dir.join(value)
    }

    pub(crate) fn path(&mut self, key: &str, value: &Str) -> PathBuf {
        if value.get_ref().is_empty() {
            self.invalid(
                value.span(),
                key,
                "expected a file path, found an empty string",
            );
        }
        self.dir.join(value.get_ref())
    }

    fn path_or(&mut self, key: &str, value: Option<&Str>, default: &str) -> PathBuf {
        match value {
            Some(v) => self.path(key, v),
            None => self.dir.join(default),
        }
    }

    pub(crate) fn duration(
        &mut self,
        key: &str,
        value: Option<&Str>,
        default: Duration,
    ) -> Duration {
        self.opt_duration(key, value).unwrap_or(default)
    }

    fn opt_duration(&mut self, key: &str, value: Option<&Str>) -> Option<Duration> {
        let v = value?;
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                self.invalid(
                    v.span(),
                    key,
                    "expected a duration above zero, such as \"5s\" or \"15m\"",
                );
                None
            }
            Err(e) => {
                self.invalid(
                    v.span(),
                    key,
                    format!("expected a duration such as \"5s\", \"15m\" or \"1h\": {e}"),
                );
                None
            }
        }
    }

    pub(crate) fn int<T: TryFrom<i64>>(
        &mut self,
        key: &str,
        value: Option<&Spanned<i64>>,
        default: T,
        min: i64,
        max: i64,
    ) -> T {
        let Some(v) = value else { return default };
        let n = *v.get_ref();
        match T::try_from(n) {
            Ok(t) if (min..=max).contains(&n) => t,
            _ => {
                self.invalid(
                    v.span(),
                    key,
                    format!("expected a whole number from {min} to {max}, found {n}"),
                );
                default
            }
        }
    }

    fn socket_addr(&mut self, key: &str, value: &Str) -> Option<SocketAddr> {
        match value.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.invalid(
                    value.span(),
                    key,
                    format!(
                        "expected an IP address and port such as \"127.0.0.1:5432\" or \"[::1]:5432\", found {:?}",
                        value.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn named_sets(
        &mut self,
        table: &str,
        raw: &Named,
        td: Option<&TrustDomain>,
    ) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        for (name, patterns) in raw {
            let key = format!("{table}.{}", name.get_ref());
            let valid_name = !name.get_ref().is_empty()
                && name
                    .get_ref()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid_name {
                self.invalid(
                    name.span(),
                    &key,
                    "expected a name of letters, digits, '_' and '-' (policy files refer to it by this name)",
                );
            }
            if patterns.get_ref().is_empty() {
                self.invalid(
                    patterns.span(),
                    &key,
                    "expected at least one SPIFFE ID pattern, e.g. [\"spiffe://corp.example/app/**\"]",
                );
            }
            for p in patterns.get_ref() {
                if let Err(e) = IdPattern::parse(p.get_ref(), td) {
                    self.invalid(p.span(), &key, e.to_string());
                }
            }
            out.insert(
                name.get_ref().clone(),
                patterns
                    .get_ref()
                    .iter()
                    .map(|p| p.get_ref().clone())
                    .collect(),
            );
        }
        out
    }
}

/// `[audit] statements`: each entry a group of `[groups]` (its patterns) or a SPIFFE ID
/// pattern; anything else, an empty list entry or one given twice, is refused by key.
fn check_audited(
    c: &mut Checker<'_>,
    raw: Option<&Spanned<Vec<Str>>>,
    groups: &BTreeMap<String, Vec<String>>,
    td: Option<&TrustDomain>,
) -> Vec<IdPattern> {
    const KEY: &str = "audit.statements";
    let mut out = Vec::new();
    let Some(raw) = raw else {
        return out;
    };
    let mut seen: Vec<&str> = Vec::new();
    for item in raw.get_ref() {
        let value = item.get_ref().as_str();
        if seen.contains(&value) {
            c.invalid(item.span(), KEY, format!("{value:?} is listed twice"));
            continue;
        }
        seen.push(value);
        if value.starts_with("spiffe://") {
            match IdPattern::parse(value, td) {
                Ok(p) => out.push(p),
                Err(e) => c.invalid(item.span(), KEY, e.to_string()),
            }
        } else if let Some(patterns) = groups.get(value) {
            out.extend(patterns.iter().filter_map(|p| IdPattern::parse(p, td).ok()));
        } else {
            let defined: Vec<String> = groups.keys().map(|k| format!("{k:?}")).collect();
            c.invalid(
                item.span(),
                KEY,
                format!(
                    "expected the name of a group in [groups] ({}) or a SPIFFE ID pattern such as \"spiffe://corp.example/app/operators/*\", found {value:?}",
                    if defined.is_empty() { "none defined".to_owned() } else { defined.join(", ") }
                ),
            );
        }
    }
    out
}

/// `[admin]`: the socket defaults to `<config file stem>.sock` beside the config, so two
/// configs in one folder do not share one.
fn check_admin(c: &mut Checker<'_>, path: &Path, raw: Option<&RawAdmin>) -> AdminSettings {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("eastwall");
    let default = format!("{stem}.sock");
    AdminSettings {
        listen: match raw.and_then(|a| a.listen.as_ref()) {
            None => Some(DEFAULT_ADMIN_LISTEN),
            Some(v) if matches!(v.get_ref().trim(), "" | "off") => None,
            Some(v) => c.socket_addr("admin.listen", v),
        },
        socket: c.path_or(
            "admin.socket",
            raw.and_then(|a| a.socket.as_ref()),
            &default,
        ),
    }
}

/// Splits `host:port` / `[v6]:port`.
fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        (host, after.strip_prefix(':')?)
    } else {
        let (host, port) = s.rsplit_once(':')?;
        if host.contains(':') {
            return None;
        }
        (host, port)
    };
    let port: u16 = port.parse().ok()?;
    if host.is_empty() || port == 0 {
        return None;
    }
    Some((host.to_owned(), port))
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl Settings {
    /// Reads and validates eastwall.toml (not the policy file; see [`Config::load`]).
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(path, &text)
    }

    /// Validates settings already read from `path`.
    pub fn from_toml(path: &Path, text: &str) -> Result<Settings, ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let (line, col) = line_col(text, e.span().map_or(0, |s| s.start));
            ConfigError::Syntax {
                file: path.to_path_buf(),
                line,
                col,
                message: e.message().trim_end().to_owned(),
            }
        })?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut c = Checker {
            file: path,
            text,
            dir,
            problems: Vec::new(),
        };

        let trust_domain = match TrustDomain::parse(raw.trust_domain.get_ref()) {
            Ok(td) => Some(td),
            Err(e) => {
                c.invalid(
                    raw.trust_domain.span(),
                    "trust_domain",
                    format!("expected a trust domain name such as \"corp.example\": {e}"),
                );
                None
            }
        };
        let segments = c.named_sets("segments", &raw.segments, trust_domain.as_ref());
        let groups = c.named_sets("groups", &raw.groups, trust_domain.as_ref());
        if raw.segments.is_empty() {
            c.invalid(
                raw.guards.span(),
                "segments",
                "expected a [segments] table defining at least the segment named by `guards`",
            );
        } else if !segments.contains_key(raw.guards.get_ref()) {
            let defined: Vec<String> = segments.keys().map(|k| format!("{k:?}")).collect();
            c.invalid(
                raw.guards.span(),
                "guards",
                format!(
                    "expected the name of a segment defined in [segments] ({}), found {:?}",
                    defined.join(", "),
                    raw.guards.get_ref()
                ),
            );
        }
        let service_port = c.int("service_port", raw.service_port.as_ref(), 5432u16, 1, 65535);

        let listen_address = c.socket_addr("listen.address", &raw.listen.address);
        let listen = ListenSettings {
            address: listen_address.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 5432))),
            cert: c.path("listen.cert", &raw.listen.cert),
            key: c.path("listen.key", &raw.listen.key),
            client_ca: c.path("listen.client_ca", &raw.listen.client_ca),
            crl: raw.listen.crl.as_ref().map(|v| c.path("listen.crl", v)),
        };

        let upstream = check_upstream(&mut c, &raw.upstream);

        let policy_value = raw.policy.as_ref().and_then(|p| p.file.as_ref());
        let policy_file = c.path_or("policy.file", policy_value, "policy.ew");
        let policy_label =
            policy_value.map_or_else(|| "policy.ew".to_owned(), |v| v.get_ref().clone());

        let m = raw.mfa.as_ref();
        let mfa = MfaSettings {
            secrets: c.path_or(
                "mfa.secrets",
                m.and_then(|m| m.secrets.as_ref()),
                "mfa/secrets.json",
            ),
            max_age: c.duration(
                "mfa.max_age",
                m.and_then(|m| m.max_age.as_ref()),
                Duration::from_secs(300),
            ),
            stepup_listen: m
                .and_then(|m| m.stepup_listen.as_ref())
                .and_then(|v| c.socket_addr("mfa.stepup_listen", v)),
            token_key: c.path_or(
                "mfa.token_key",
                m.and_then(|m| m.token_key.as_ref()),
                "mfa/token.key",
            ),
            max_session: c.opt_duration("mfa.max_session", m.and_then(|m| m.max_session.as_ref())),
            max_failures: c.int(
                "mfa.max_failures",
                m.and_then(|m| m.max_failures.as_ref()),
                20u32,
                1,
                1_000_000,
            ),
            failure_window: c.duration(
                "mfa.failure_window",
                m.and_then(|m| m.failure_window.as_ref()),
                Duration::from_secs(900),
            ),
        };
        let audit_path = c.path_or(
            "audit.path",
            raw.audit.as_ref().and_then(|a| a.path.as_ref()),
            "decisions.log",
        );
        let ocsf = raw
            .audit
            .as_ref()
            .and_then(|a| a.ocsf.as_ref())
            .map(|v| {
                let p = c.path("audit.ocsf", v);
                if p == audit_path {
                    c.invalid(
                        v.span(),
                        "audit.ocsf",
                        "must not be the decision log itself; name a file of its own, e.g. \"decisions.ocsf.jsonl\"",
                    );
                }
                p
            });
        let statements = check_audited(
            &mut c,
            raw.audit.as_ref().and_then(|a| a.statements.as_ref()),
            &groups,
            trust_domain.as_ref(),
        );
        let audit = AuditSettings {
            path: audit_path,
            ocsf,
            statements,
        };
        let detect = crate::detect::check_detect(&mut c, raw.detect.as_ref(), &audit.path);
        let l = raw.limits.as_ref();
        let startup_timeout = c.duration(
            "limits.startup_timeout",
            l.and_then(|l| l.startup_timeout.as_ref()),
            Duration::from_secs(30),
        );
        let max_connections = c.int(
            "limits.max_connections",
            l.and_then(|l| l.max_connections.as_ref()),
            1000usize,
            1,
            1_000_000,
        );
        let limits = Limits {
            startup_timeout,
            max_connections,
            cancels_per_second: c.int(
                "limits.cancels_per_second",
                l.and_then(|l| l.cancels_per_second.as_ref()),
                10u32,
                1,
                1_000_000,
            ),
            max_startups_per_source: c.int(
                "limits.max_startups_per_source",
                l.and_then(|l| l.max_startups_per_source.as_ref()),
                64usize,
                1,
                1_000_000,
            ),
            handshake_timeout: handshake_timeout(&mut c, l, startup_timeout),
            max_handshakes: max_handshakes(&mut c, l, max_connections),
            max_handshakes_per_source: c.int(
                "limits.max_handshakes_per_source",
                l.and_then(|l| l.max_handshakes_per_source.as_ref()),
                32usize,
                1,
                1_000_000,
            ),
            idle_timeout: c.opt_duration(
                "limits.idle_timeout",
                l.and_then(|l| l.idle_timeout.as_ref()),
            ),
            // 0 means "the default", never "unlimited".
            max_sessions_per_identity: match c.int(
                "limits.max_sessions_per_identity",
                l.and_then(|l| l.max_sessions_per_identity.as_ref()),
                DEFAULT_MAX_SESSIONS_PER_IDENTITY,
                0,
                1_000_000,
            ) {
                0 => DEFAULT_MAX_SESSIONS_PER_IDENTITY,
                n => n,
            },
            shutdown_grace: c.duration(
                "limits.shutdown_grace",
                l.and_then(|l| l.shutdown_grace.as_ref()),
                Duration::from_secs(30),
            ),
        };
        let admin = check_admin(&mut c, path, raw.admin.as_ref());
        let locks_file = check_locks_file(&mut c, raw.locks.as_ref(), &policy_file, &audit.path);
        let fleet = crate::fleet::check_fleet(
            &mut c,
            raw.fleet.as_ref(),
            &listen,
            &groups,
            trust_domain.as_ref(),
        );

        match (trust_domain, listen_address, upstream) {
            (Some(trust_domain), Some(_), Some(upstream)) if c.problems.is_empty() => {
                Ok(Settings {
                    path: path.to_path_buf(),
                    trust_domain,
                    guards: raw.guards.into_inner(),
                    service_port,
                    listen,
                    upstream,
                    mfa,
                    audit,
                    limits,
                    admin,
                    locks_file,
                    detect,
                    fleet,
                    segments,
                    groups,
                    policy_file,
                    policy_label,
                })
            }
            _ => Err(ConfigError::Many(c.problems)),
        }
    }
}

/// `locks.file`: default `locks.json`; a file name of its own, since every write replaces the
/// whole file (a locks file that was the policy or the log would destroy it).
fn check_locks_file(
    c: &mut Checker<'_>,
    raw: Option<&RawLocks>,
    policy_file: &Path,
    audit_path: &Path,
) -> PathBuf {
    let value = raw.and_then(|l| l.file.as_ref());
    let path = c.path_or("locks.file", value, "locks.json");
    if let Some(v) = value {
        let text = v.get_ref();
        if text.ends_with('/')
            || text.ends_with("/.")
            || text.ends_with("/..")
            || text == "."
            || text == ".."
        {
            c.invalid(
                v.span(),
                "locks.file",
                format!("expected a file name, found the folder {text:?}"),
            );
        } else if path == policy_file || path == audit_path {
            c.invalid(v.span(), "locks.file", "expected a file of its own: it is rewritten whole on every `eastwall lock`, so it cannot be the policy file or the decision log");
        }
    }
    path
}

/// `limits.handshake_timeout`: default 5 s (or `startup_timeout` when that is shorter); a
/// value above `startup_timeout` would never fire, so it is refused.
fn handshake_timeout(
    c: &mut Checker<'_>,
    l: Option<&RawLimits>,
    startup_timeout: Duration,
) -> Duration {
    let raw = l.and_then(|l| l.handshake_timeout.as_ref());
    let default = Duration::from_secs(5).min(startup_timeout);
    let value = c.duration("limits.handshake_timeout", raw, default);
    match raw {
        Some(v) if value > startup_timeout => {
            c.invalid(
                v.span(),
                "limits.handshake_timeout",
                format!(
                    "expected at most limits.startup_timeout ({}), which also bounds the handshake; found {:?}",
                    humantime::format_duration(startup_timeout),
                    v.get_ref()
                ),
            );
            default
        }
        _ => value,
    }
}

/// `limits.max_handshakes`: default a quarter of `max_connections` (at least 1); it must leave
/// room inside `max_connections`, or silent handshakes could fill it again.
fn max_handshakes(c: &mut Checker<'_>, l: Option<&RawLimits>, max_connections: usize) -> usize {
    let raw = l.and_then(|l| l.max_handshakes.as_ref());
    let default = (max_connections / 4).max(1);
    let value = c.int("limits.max_handshakes", raw, default, 1, 1_000_000);
    match raw {
        Some(v) if value > max_connections => {
            c.invalid(
                v.span(),
                "limits.max_handshakes",
                format!(
                    "expected at most limits.max_connections ({max_connections}): handshakes are a budget inside it; found {value}"
                ),
            );
            default
        }
        _ => value,
    }
}

fn check_upstream(c: &mut Checker<'_>, u: &RawUpstream) -> Option<UpstreamSettings> {
    let problems_before = c.problems.len();
    if let Some(pw) = &u.password {
        c.invalid(
            pw.span(),
            "upstream.password",
            "a literal password does not belong in eastwall.toml (config files end up in backups, tickets and version control); use password_file = \"path\" or password_env = \"VARIABLE\"",
        );
    }
    let target = match (&u.address, &u.socket_dir) {
        (Some(a), None) => {
            if let Some(p) = &u.port {
                c.invalid(
                    p.span(),
                    "upstream.port",
                    "expected no `port` with `address`: the port is part of the address (\"host:port\")",
                );
            }
            match split_host_port(a.get_ref()) {
                Some((host, port)) => Some((UpstreamTarget::Tcp { host, port }, a)),
                None => {
                    c.invalid(
                        a.span(),
                        "upstream.address",
                        format!(
                            "expected host:port such as \"127.0.0.1:5433\", \"db.internal:5432\" or \"[::1]:5433\", found {:?}",
                            a.get_ref()
                        ),
                    );
                    None
                }
            }
        }
        (None, Some(d)) => {
            let dir = c.path("upstream.socket_dir", d);
            let port = c.int("upstream.port", u.port.as_ref(), 5432u16, 1, 65535);
            Some((UpstreamTarget::Unix { dir, port }, d))
        }
        (Some(a), Some(_)) => {
            c.invalid(
                a.span(),
                "upstream.address",
                "expected either `address` (TCP) or `socket_dir` (Unix socket), not both",
            );
            None
        }
        (None, None) => {
            c.invalid(
                u.login.span(),
                "upstream",
                "expected `address = \"host:port\"` (TCP) or `socket_dir = \"/var/run/postgresql\"` (Unix socket)",
            );
            None
        }
    };

    // Keys that belong to another login mode are errors: a stray password_file under
    // login = "cert" means the author believes something that is not true.
    let mode = u.login.get_ref().as_str();
    let stray = |c: &mut Checker<'_>, key: &str, v: &Option<Str>, needs: &str| {
        if let Some(v) = v {
            c.invalid(
                v.span(),
                &format!("upstream.{key}"),
                format!("expected no `{key}` with login = {mode:?}; it applies only to login = {needs:?}"),
            );
        }
    };
    let login = match mode {
        "trust" => {
            stray(c, "password_file", &u.password_file, "password");
            stray(c, "password_env", &u.password_env, "password");
            stray(c, "cert_dir", &u.cert_dir, "cert");
            stray(c, "ca", &u.ca, "cert");
            stray(c, "server_name", &u.server_name, "cert");
            Some(UpstreamLogin::Trust)
        }
        "password" => {
            stray(c, "cert_dir", &u.cert_dir, "cert");
            stray(c, "ca", &u.ca, "cert");
            stray(c, "server_name", &u.server_name, "cert");
            match (&u.password_file, &u.password_env) {
                (Some(f), None) => Some(UpstreamLogin::Password {
                    user_secrets: PasswordSource::File(c.path("upstream.password_file", f)),
                }),
                (None, Some(e)) => {
                    if e.get_ref().is_empty() {
                        c.invalid(
                            e.span(),
                            "upstream.password_env",
                            "expected an environment variable name",
                        );
                    }
                    Some(UpstreamLogin::Password {
                        user_secrets: PasswordSource::Env(e.get_ref().clone()),
                    })
                }
                (Some(f), Some(_)) => {
                    c.invalid(
                        f.span(),
                        "upstream.password_file",
                        "expected either password_file or password_env, not both",
                    );
                    None
                }
                (None, None) => {
                    c.invalid(
                        u.login.span(),
                        "upstream.login",
                        "login = \"password\" expects password_file = \"path\" or password_env = \"VARIABLE\"",
                    );
                    None
                }
            }
        }
        "cert" => {
            stray(c, "password_file", &u.password_file, "password");
            stray(c, "password_env", &u.password_env, "password");
            let host = match &target {
                Some((UpstreamTarget::Tcp { host, .. }, _)) => Some(host.clone()),
                Some((UpstreamTarget::Unix { .. }, at)) => {
                    c.invalid(
                        at.span(),
                        "upstream.socket_dir",
                        "login = \"cert\" needs TLS, which PostgreSQL does not offer over Unix sockets; use address = \"host:port\"",
                    );
                    None
                }
                None => None,
            };
            let cert_dir = u.cert_dir.as_ref().map(|v| c.path("upstream.cert_dir", v));
            let ca = u.ca.as_ref().map(|v| c.path("upstream.ca", v));
            for (key, present) in [("cert_dir", cert_dir.is_some()), ("ca", ca.is_some())] {
                if !present {
                    c.invalid(
                        u.login.span(),
                        "upstream.login",
                        format!("login = \"cert\" expects `{key}` in [upstream]"),
                    );
                }
            }
            let server_name = u.server_name.as_ref().map(|v| v.get_ref().clone()).or(host);
            match (cert_dir, ca, server_name) {
                (Some(cert_dir), Some(ca), Some(server_name)) => Some(UpstreamLogin::Cert {
                    cert_dir,
                    ca,
                    server_name,
                }),
                _ => None,
            }
        }
        other => {
            c.invalid(
                u.login.span(),
                "upstream.login",
                format!("expected \"trust\", \"password\" or \"cert\", found {other:?}"),
            );
            None
        }
    };

    let allow_plaintext_remote = u.allow_plaintext_remote.unwrap_or(false);
    if let (
        Some((UpstreamTarget::Tcp { host, .. }, at)),
        Some(UpstreamLogin::Trust | UpstreamLogin::Password { .. }),
    ) = (&target, &login)
    {
        if !allow_plaintext_remote && !is_loopback_host(host) {
            c.invalid(
                at.span(),
                "upstream.address",
                format!(
                    "refusing a plaintext login = {mode:?} to non-loopback host {host:?}: use login = \"cert\" (TLS), a loopback address or socket_dir, or set allow_plaintext_remote = true if the path is protected otherwise"
                ),
            );
        }
    }
    let connect_timeout = c.duration(
        "upstream.connect_timeout",
        u.connect_timeout.as_ref(),
        Duration::from_secs(5),
    );
    let check_role = u.check_role.as_ref().and_then(|v| {
        let name = v.get_ref();
        match crate::policy::name_problem(name) {
            Some(problem) => {
                c.invalid(
                    v.span(),
                    "upstream.check_role",
                    format!("expected a role name, but {problem}"),
                );
                None
            }
            None => Some(name.clone()),
        }
    });
    if c.problems.len() != problems_before {
        return None;
    }
    Some(UpstreamSettings {
        target: target?.0,
        login: login?,
        connect_timeout,
        allow_plaintext_remote,
        check_role,
    })
}
