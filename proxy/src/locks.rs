//! Locks: an operator's "nobody matching this gets in", by SPIFFE ID pattern, certificate
//! serial, source address range or database role, with an optional TTL and a message.
//!
//! # Parts
//! - [`Lock`] and [`Target`]: one lock, validated as it is built (a pattern in our trust
//!   domain, a normalised serial, a CIDR without host bits, a role PostgreSQL could use).
//! - [`LockSet`]: the locks in force, indexed once so that [`LockSet::find`] (run once per
//!   connection and per step-up request) hashes a serial and a role, scans only the pattern
//!   and range locks, and allocates nothing. Expired locks are skipped given a `now`.
//! - The store: `[locks] file` (default `locks.json` beside eastwall.toml), JSON, written
//!   atomically (a 0600 temporary in the same folder, fsync, rename, fsync of the folder) by
//!   [`edit`], which holds an flock on `<file>.lock` around read-modify-write so two
//!   `eastwall lock add` runs cannot lose each other's lock.
//! - [`LockWatcher`]: the running sidecar's copy, re-read when the file's stamp changes.
//! - [`changes`]: the `event: "lock"` lines (added, removed, expired) between two sets.
//! - [`check_lock`]: the refusal a new connection gets when a lock matches it.
//!
//! # Fail closed
//! Whoever can edit the lock file can lift every lock, so the file must be a regular file
//! owned by this user (or root) that group and others cannot write. A file that is refused
//! (unsafe, too large, not JSON, an unknown field, a duplicate id, a pattern outside our
//! trust domain, an expiry before its creation, ...) is refused as a whole: the sidecar keeps
//! the last set it accepted and writes an alert line, so locks never silently disappear. At
//! start, a refused file stops the sidecar rather than running without its locks.

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use eastwall_ca::spiffe::TrustDomain;
use eastwall_ca::SpiffeId;
use eastwall_config::IdPattern;
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::audit::{AuditLog, Entry};

/// Largest lock file read. A thousand locks is about 300 KiB; anything far bigger is not ours.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// Most locks one file may hold.
pub const MAX_LOCKS: usize = 10_000;
/// Longest lock message, in characters: it is shown to clients and written to every line.
pub const MAX_MESSAGE_CHARS: usize = 256;
/// Hex digits in a lock id.
pub const LOCK_ID_LEN: usize = 8;
/// The lock file's format version.
const VERSION: u32 = 1;

/// Why a lock, a lock file or a lock file write was refused. Each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A file an attacker could have written; it is not read.
    #[error("{}: refusing the lock file: {why}", path.display())]
    Unsafe { path: PathBuf, why: String },
    #[error("{}: refusing the lock file: {why}", path.display())]
    Invalid { path: PathBuf, why: String },
    #[error("{}: the lock file disappeared; the locks read before stay in force until a restart (restore it, or remove locks with `eastwall lock remove`)", path.display())]
    Vanished { path: PathBuf },
    /// A lock as typed on the command line.
    #[error("{0}")]
    Target(String),
    #[error("no lock with id {0:?} (see `eastwall lock list`)")]
    UnknownId(String),
}

// ---------------------------------------------------------------------------------------------
// The model

/// What a lock holds back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Identities matching a SPIFFE ID pattern (`*` one segment, `**` one or more).
    Id(IdPattern),
    /// One certificate, by serial: lowercase hex without leading zero bytes.
    Serial(String),
    /// Client addresses in a range; IPv4-mapped IPv6 clients are their IPv4 address.
    Source(Cidr),
    /// A database role (PostgreSQL user name), exactly as the client names it.
    Role(String),
}

impl Target {
    /// A pattern, checked against our trust domain.
    pub fn id(pattern: &str, trust_domain: &TrustDomain) -> Result<Self, LockError> {
        IdPattern::parse(pattern, Some(trust_domain))
            .map(Target::Id)
            .map_err(|e| LockError::Target(format!("--id {pattern:?}: {e}")))
    }

    /// A serial as a user types it (`0A:1B:..`, `0x0a1b..`), normalised.
    pub fn serial(serial: &str) -> Result<Self, LockError> {
        eastwall_ca::normalize_serial(serial)
            .ok()
            .filter(|s| !s.is_empty())
            .map(Target::Serial)
            .ok_or_else(|| {
                LockError::Target(format!(
                    "--serial {serial:?}: expected a certificate serial in hex, as `eastwall ca issue` prints it (colons allowed)"
                ))
            })
    }

    pub fn source(cidr: &str) -> Result<Self, LockError> {
        Cidr::parse(cidr)
            .map(Target::Source)
            .map_err(|e| LockError::Target(format!("--source {cidr:?}: {e}")))
    }

    /// A role name PostgreSQL could log in as: 1 to 63 bytes, no control characters.
    pub fn role(role: &str) -> Result<Self, LockError> {
        let why = if role.is_empty() {
            Some("expected a role name, found an empty string".to_owned())
        } else if role.len() > crate::params::MAX_NAME_BYTES {
            Some(format!(
                "a role name is at most {} bytes (PostgreSQL's limit)",
                crate::params::MAX_NAME_BYTES
            ))
        } else if role.chars().any(char::is_control) {
            Some("a role name cannot contain control characters".to_owned())
        } else {
            None
        };
        match why {
            Some(why) => Err(LockError::Target(format!("--role {role:?}: {why}"))),
            None => Ok(Target::Role(role.to_owned())),
        }
    }

    /// `spiffe_id`, `serial`, `source` or `role`: the key this target has in the file and the log.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Id(_) => "spiffe_id",
            Target::Serial(_) => "serial",
            Target::Source(_) => "source",
            Target::Role(_) => "role",
        }
    }

    /// The target's value as written in the file.
    pub fn value(&self) -> String {
        match self {
            Target::Id(p) => p.as_str().to_owned(),
            Target::Serial(s) | Target::Role(s) => s.clone(),
            Target::Source(c) => c.to_string(),
        }
    }

    /// `{"serial": "0a1b"}`: the target as the file and the decision log write it.
    pub fn to_json(&self) -> serde_json::Value {
        json!({ self.kind(): self.value() })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Id(p) => write!(f, "id {p}"),
            Target::Serial(s) => write!(f, "serial {s}"),
            Target::Source(c) => write!(f, "source {c}"),
            Target::Role(r) => write!(f, "role {r}"),
        }
    }
}

/// An IP range. IPv4-mapped IPv6 ranges (`::ffff:10.0.0.0/104`) are stored as IPv4, so a
/// lock matches a client whichever way the listener reports its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    /// `10.0.0.0/8`, `192.0.2.7` (one address), `2001:db8::/32`. Host bits must be zero:
    /// `10.0.0.1/8` is refused rather than guessed at.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, len) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            "expected an IP address or range such as 192.0.2.7, 10.0.0.0/8 or 2001:db8::/32"
                .to_owned()
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(len) => match len.parse::<u8>() {
                Ok(n) if n <= max && !len.starts_with('+') => n,
                _ => {
                    return Err(format!(
                        "the prefix length must be 0 to {max}, found {len:?}"
                    ))
                }
            },
        };
        // An IPv4-mapped range is that IPv4 range.
        let (addr, len) = match addr {
            IpAddr::V6(v6) if len >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), len - 96),
                None => (addr, len),
            },
            _ => (addr, len),
        };
        let cidr = Cidr {
            net: mask(addr, len),
            len,
        };
        if cidr.net != addr {
            return Err(format!(
                "{text} has bits set past its /{len} prefix; did you mean {cidr}?"
            ));
        }
        Ok(cidr)
    }

    /// Whether `ip` (either form of an IPv4 client) is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(_), ip @ IpAddr::V4(_)) | (IpAddr::V6(_), ip @ IpAddr::V6(_)) => {
                mask(ip, self.len) == self.net
            }
            _ => false,
        }
    }
}

fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.len)
    }
}

/// One lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    /// Short random hex, unique in the file; what `eastwall lock remove` takes.
    pub id: String,
    pub target: Target,
    pub created_at: SystemTime,
    /// When the lock lifts by itself; None: when it is removed.
    pub expires_at: Option<SystemTime>,
    /// Shown to refused clients and written in every line about the lock (may be empty).
    pub message: String,
    /// The OS user who placed it, for the record.
    pub created_by: String,
}

impl Lock {
    /// A new lock with a fresh id (not one of `taken`), placed now.
    pub fn new(
        target: Target,
        ttl: Option<Duration>,
        message: String,
        created_by: String,
        now: SystemTime,
        taken: &LockSet,
    ) -> Result<Self, LockError> {
        check_message(&message).map_err(|why| LockError::Target(format!("--message: {why}")))?;
        if ttl.is_some_and(|t| t.as_secs() == 0) {
            return Err(LockError::Target(
                "--ttl: expected a duration of at least one second, such as \"30m\" or \"8h\""
                    .into(),
            ));
        }
        // Whole seconds, what the file keeps (RFC 3339), so a reload compares equal; the
        // expiry is rounded up, so a lock holds at least its TTL.
        let too_far = || LockError::Target("--ttl: too far in the future".into());
        let expires_at = match ttl {
            Some(ttl) => Some(whole_seconds(
                now.checked_add(ttl + Duration::from_nanos(999_999_999))
                    .ok_or_else(too_far)?,
            )),
            None => None,
        };
        let now = whole_seconds(now);
        if let Some(at) = expires_at {
            rfc3339(at).map_err(|_| too_far())?;
        }
        let id = loop {
            let id = format!("{:08x}", rand::random::<u32>());
            if taken.get(&id).is_none() {
                break id;
            }
        };
        Ok(Lock {
            id,
            target,
            created_at: now,
            expires_at,
            message,
            created_by,
        })
    }

    /// Whether the lock is in force at `now`.
    pub fn active_at(&self, now: SystemTime) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

fn check_message(message: &str) -> Result<(), String> {
    if message.chars().count() > MAX_MESSAGE_CHARS {
        return Err(format!("at most {MAX_MESSAGE_CHARS} characters"));
    }
    if message.chars().any(char::is_control) {
        return Err("no control characters (newlines, escapes): it is shown to clients".into());
    }
    Ok(())
}

/// What a connection or step-up request is, for [`LockSet::find`]. Absent parts match nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct LockQuery<'a> {
    pub id: Option<&'a SpiffeId>,
    /// Lowercase hex of the certificate's raw serial, as the identity module writes it
    /// (a leading `00` sign byte is ignored).
    pub serial: Option<&'a str>,
    pub source: Option<IpAddr>,
    pub role: Option<&'a str>,
}

/// The locks in force, indexed for [`LockSet::find`].
#[derive(Debug, Default)]
pub struct LockSet {
    locks: Vec<Lock>,
    by_id: HashMap<Box<str>, usize>,
    /// For each serial and role, the lock on it that lasts longest: when that one has
    /// expired, so have the others.
    by_serial: HashMap<Box<str>, usize>,
    by_role: HashMap<Box<str>, usize>,
    patterns: Vec<usize>,
    sources: Vec<usize>,
}

/// Whether `a` lasts longer than `b` (None is forever).
fn outlasts(a: Option<SystemTime>, b: Option<SystemTime>) -> bool {
    match (a, b) {
        (None, Some(_)) => true,
        (Some(a), Some(b)) => a > b,
        _ => false,
    }
}

impl LockSet {
    /// Indexes `locks`; two locks with one id are refused.
    pub fn new(locks: Vec<Lock>) -> Result<Self, String> {
        let mut set = LockSet::default();
        for (i, lock) in locks.iter().enumerate() {
            if set.by_id.insert(lock.id.as_str().into(), i).is_some() {
                return Err(format!("two locks have the id {:?}", lock.id));
            }
            let keyed = match &lock.target {
                Target::Serial(s) => Some((&mut set.by_serial, s)),
                Target::Role(r) => Some((&mut set.by_role, r)),
                Target::Id(_) => {
                    set.patterns.push(i);
                    None
                }
                Target::Source(_) => {
                    set.sources.push(i);
                    None
                }
            };
            if let Some((map, key)) = keyed {
                let slot = map.entry(key.as_str().into()).or_insert(i);
                if outlasts(lock.expires_at, locks[*slot].expires_at) {
                    *slot = i;
                }
            }
        }
        set.locks = locks;
        Ok(set)
    }

    /// Every lock in the set, expired ones included, in file order.
    pub fn locks(&self) -> &[Lock] {
        &self.locks
    }

    pub fn get(&self, id: &str) -> Option<&Lock> {
        self.by_id.get(id).map(|&i| &self.locks[i])
    }

    /// Locks in force at `now`.
    pub fn active(&self, now: SystemTime) -> impl Iterator<Item = &Lock> {
        self.locks.iter().filter(move |l| l.active_at(now))
    }

    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }

    /// The first lock in force at `now` that matches any part of `query`. Allocation-free.
    pub fn find(&self, query: &LockQuery<'_>, now: SystemTime) -> Option<&Lock> {
        if self.locks.is_empty() {
            return None;
        }
        let active = |i: usize| Some(&self.locks[i]).filter(|l| l.active_at(now));
        if let Some(serial) = query.serial {
            let mut serial = serial;
            while let Some(rest) = serial.strip_prefix("00").filter(|r| !r.is_empty()) {
                serial = rest;
            }
            let hit = if serial.bytes().any(|b| b.is_ascii_uppercase()) {
                // Not what the identity module writes; matched the slow way, still correctly.
                self.by_serial
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(serial))
                    .and_then(|(_, &i)| active(i))
            } else {
                self.by_serial.get(serial).and_then(|&i| active(i))
            };
            if hit.is_some() {
                return hit;
            }
        }
        if let Some(id) = query.id {
            let hit = self
                .patterns
                .iter()
                .find_map(|&i| match &self.locks[i].target {
                    Target::Id(p) if p.matches(id) => active(i),
                    _ => None,
                });
            if hit.is_some() {
                return hit;
            }
        }
        if let Some(ip) = query.source {
            let hit = self
                .sources
                .iter()
                .find_map(|&i| match &self.locks[i].target {
                    Target::Source(c) if c.contains(ip) => active(i),
                    _ => None,
                });
            if hit.is_some() {
                return hit;
            }
        }
        if let Some(role) = query.role {
            return self.by_role.get(role).and_then(|&i| active(i));
        }
        None
    }

    /// The earliest expiry still ahead of `now`, if any: until then no lock can expire.
    fn next_expiry(&self, now: SystemTime) -> Option<SystemTime> {
        self.locks
            .iter()
            .filter_map(|l| l.expires_at)
            .filter(|&at| at > now)
            .min()
    }
}

// ---------------------------------------------------------------------------------------------
// New connections

/// A new connection refused by a lock: FATAL 28000 with the lock's message, log reason
/// `locked` and the lock's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockRefusal {
    pub lock_id: String,
    /// For the client, without the connection id (see [`LockRefusal::client_message`]).
    pub message: String,
}

impl LockRefusal {
    pub const SQLSTATE: &'static str = "28000";
    pub const REASON: &'static str = "locked";

    fn of(lock: &Lock) -> Self {
        let message = if lock.message.is_empty() {
            format!("locked by Eastwall lock {}", lock.id)
        } else {
            format!("locked by Eastwall lock {}: {}", lock.id, lock.message)
        };
        LockRefusal {
            lock_id: lock.id.clone(),
            message,
        }
    }

    /// The FATAL message, with the connection id as every refusal carries it.
    pub fn client_message(&self, conn_id: &str) -> String {
        format!("{} (connection {conn_id})", self.message)
    }

    /// Marks `entry` as this refusal: decision deny, reason `locked`, `lock_id`.
    pub fn fill(&self, entry: &mut Entry) {
        entry.decision = Some("deny");
        entry.reason = Self::REASON.into();
        entry.extra.insert("lock_id".into(), json!(self.lock_id));
    }
}

/// Whether a lock in force at `now` holds this connection back.
pub fn check_lock(
    locks: &LockSet,
    id: &SpiffeId,
    serial: &str,
    source: IpAddr,
    role: Option<&str>,
    now: SystemTime,
) -> Option<LockRefusal> {
    let query = LockQuery {
        id: Some(id),
        serial: Some(serial),
        source: Some(source),
        role,
    };
    locks.find(&query, now).map(LockRefusal::of)
}

// ---------------------------------------------------------------------------------------------
// Events

/// What happened to a lock between two looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockAction {
    Added,
    Removed,
    Expired,
}

impl LockAction {
    pub fn as_str(self) -> &'static str {
        match self {
            LockAction::Added => "added",
            LockAction::Removed => "removed",
            LockAction::Expired => "expired",
        }
    }
}

/// One `event: "lock"` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockEvent {
    pub action: LockAction,
    pub lock: Lock,
}

impl LockEvent {
    /// The decision-log line: `action`, `lock_id`, `target`, `message`, `expires_at`,
    /// `created_by`.
    pub fn entry(&self) -> Entry {
        let lock = &self.lock;
        let mut entry = Entry {
            conn_id: crate::identity::new_conn_id(),
            event: "lock",
            reason: self.action.as_str().into(),
            ..Entry::default()
        };
        let extra = &mut entry.extra;
        extra.insert("action".into(), json!(self.action.as_str()));
        extra.insert("lock_id".into(), json!(lock.id));
        extra.insert("target".into(), lock.target.to_json());
        extra.insert("message".into(), json!(lock.message));
        if let Some(at) = lock.expires_at.and_then(|at| rfc3339(at).ok()) {
            extra.insert("expires_at".into(), json!(at));
        }
        extra.insert("created_by".into(), json!(lock.created_by));
        entry
    }
}

/// The lock lines between `before` as it stood at `then` and `after` at `now`: `added` for a
/// lock in force now that was not then, `expired` for one in force then whose TTL has passed
/// (whether or not it is still in the file), `removed` for one in force then that is gone
/// (or changed) before its TTL. Called with consecutive looks, each expiry is reported once.
pub fn changes(
    before: &LockSet,
    then: SystemTime,
    after: &LockSet,
    now: SystemTime,
) -> Vec<LockEvent> {
    let mut events = Vec::new();
    for old in before.active(then) {
        let same = after.get(&old.id).filter(|new| *new == old);
        let action = if !old.active_at(now) {
            LockAction::Expired
        } else if same.is_none() {
            LockAction::Removed
        } else {
            continue;
        };
        events.push(LockEvent {
            action,
            lock: old.clone(),
        });
    }
    for new in after.active(now) {
        let was = before
            .get(&new.id)
            .is_some_and(|old| old == new && old.active_at(then));
        if !was {
            events.push(LockEvent {
                action: LockAction::Added,
                lock: new.clone(),
            });
        }
    }
    events
}

// ---------------------------------------------------------------------------------------------
// The file

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LockFile {
    version: u32,
    locks: Vec<LockRecord>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LockRecord {
    id: String,
    target: TargetRecord,
    created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    #[serde(default)]
    message: String,
    created_by: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum TargetRecord {
    SpiffeId(String),
    Serial(String),
    Source(String),
    Role(String),
}

fn rfc3339(t: SystemTime) -> Result<String, time::error::Format> {
    OffsetDateTime::from(t).format(&Rfc3339)
}

fn parse_time(text: &str) -> Result<SystemTime, String> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map(SystemTime::from)
        .map_err(|_| format!("{text:?} is not an RFC 3339 time such as 2026-01-31T12:00:00Z"))
}

impl LockRecord {
    fn of(lock: &Lock) -> Self {
        let value = lock.target.value();
        LockRecord {
            id: lock.id.clone(),
            target: match &lock.target {
                Target::Id(_) => TargetRecord::SpiffeId(value),
                Target::Serial(_) => TargetRecord::Serial(value),
                Target::Source(_) => TargetRecord::Source(value),
                Target::Role(_) => TargetRecord::Role(value),
            },
            created_at: rfc3339(lock.created_at).unwrap_or_default(),
            expires_at: lock.expires_at.and_then(|t| rfc3339(t).ok()),
            message: lock.message.clone(),
            created_by: lock.created_by.clone(),
        }
    }

    fn into_lock(self, td: &TrustDomain) -> Result<Lock, String> {
        let id_ok = self.id.len() == LOCK_ID_LEN
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !id_ok {
            return Err(format!(
                "id {:?} is not {LOCK_ID_LEN} lowercase hex digits",
                self.id
            ));
        }
        let target = match &self.target {
            TargetRecord::SpiffeId(p) => Target::id(p, td),
            TargetRecord::Serial(s) => Target::serial(s),
            TargetRecord::Source(c) => Target::source(c),
            TargetRecord::Role(r) => Target::role(r),
        }
        .map_err(|e| e.to_string())?;
        let created_at = parse_time(&self.created_at).map_err(|e| format!("created_at: {e}"))?;
        let expires_at = match &self.expires_at {
            Some(t) => Some(parse_time(t).map_err(|e| format!("expires_at: {e}"))?),
            None => None,
        };
        if expires_at.is_some_and(|at| at <= created_at) {
            return Err("expires_at is not after created_at: such a lock never held".into());
        }
        check_message(&self.message).map_err(|e| format!("message: {e}"))?;
        if self.created_by.len() > 256 || self.created_by.chars().any(char::is_control) {
            return Err("created_by: at most 256 bytes, no control characters".into());
        }
        Ok(Lock {
            id: self.id,
            target,
            created_at,
            expires_at,
            message: self.message,
            created_by: self.created_by,
        })
    }
}

/// What a file looked like when read: a change in any of these means it was rewritten,
/// replaced (a rename gives a new inode) or had its mode or owner changed (the change time,
/// which only the kernel sets: a chmod to 0666 in place is noticed and refused at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }

    /// The stamp of `path` now; None when there is no file.
    fn now(path: &Path) -> Result<Option<Stamp>, LockError> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) => Ok(Some(Stamp::of(&meta))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LockError::Io {
                path: path.to_owned(),
                action: "inspect the lock file",
                source,
            }),
        }
    }
}

/// Refuses a file that someone other than us could have written.
fn check_file(path: &Path, meta: &std::fs::Metadata) -> Result<(), LockError> {
    let unsafe_file = |why: String| LockError::Unsafe {
        path: path.to_owned(),
        why,
    };
    if !meta.file_type().is_file() {
        return Err(unsafe_file("it is not a regular file".into()));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(unsafe_file(format!(
            "mode {mode:04o} lets group or others write it, and whoever can write it can lift every lock: run `chmod 600 {}`",
            path.display()
        )));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(unsafe_file(format!(
            "it is owned by uid {}, not by this user (uid {me}) or root",
            meta.uid()
        )));
    }
    Ok(())
}

/// Reads and validates the lock file. No file is an empty set (no lock was ever placed).
pub fn load(path: &Path, td: &TrustDomain) -> Result<(LockSet, Option<Stamp>), LockError> {
    let io = |action, source| LockError::Io {
        path: path.to_owned(),
        action,
        source,
    };
    let nofollow = nix::fcntl::OFlag::O_NOFOLLOW.bits();
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(nofollow)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((LockSet::default(), None))
        }
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) => {
            return Err(LockError::Unsafe {
                path: path.to_owned(),
                why: "it is a symbolic link".into(),
            })
        }
        Err(e) => return Err(io("open the lock file", e)),
    };
    let meta = file
        .metadata()
        .map_err(|e| io("inspect the lock file", e))?;
    check_file(path, &meta)?;
    let invalid = |why: String| LockError::Invalid {
        path: path.to_owned(),
        why,
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(invalid(format!(
            "it is {} bytes, more than the {MAX_FILE_BYTES} a lock file may hold",
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io("read the lock file", e))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(invalid(format!(
            "it is more than the {MAX_FILE_BYTES} bytes a lock file may hold"
        )));
    }
    let set = parse(&bytes, td).map_err(invalid)?;
    Ok((set, Some(Stamp::of(&meta))))
}

fn parse(bytes: &[u8], td: &TrustDomain) -> Result<LockSet, String> {
    let file: LockFile =
        serde_json::from_slice(bytes).map_err(|e| format!("not a lock file: {e}"))?;
    if file.version != VERSION {
        return Err(format!(
            "version {} is not one this Eastwall reads (expected {VERSION})",
            file.version
        ));
    }
    if file.locks.len() > MAX_LOCKS {
        return Err(format!(
            "{} locks, more than the {MAX_LOCKS} a file may hold",
            file.locks.len()
        ));
    }
    let mut locks = Vec::with_capacity(file.locks.len());
    for (n, record) in file.locks.into_iter().enumerate() {
        let id = record.id.clone();
        let lock = record
            .into_lock(td)
            .map_err(|e| format!("lock {} (id {id:?}): {e}", n + 1))?;
        locks.push(lock);
    }
    LockSet::new(locks)
}

fn render(locks: &[Lock]) -> Vec<u8> {
    let file = LockFile {
        version: VERSION,
        locks: locks.iter().map(LockRecord::of).collect(),
    };
    let mut text = serde_json::to_vec_pretty(&file).unwrap_or_default();
    text.push(b'\n');
    text
}

/// Replaces the lock file with `locks`: a 0600 temporary in the same folder, fsync, rename,
/// fsync of the folder; a crash leaves the old file or the new one. Run as root over a file
/// another user owns (the sidecar's), the new file keeps that owner so the sidecar can read it.
fn save(path: &Path, locks: &[Lock], owner: Option<(u32, u32)>) -> Result<(), LockError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io = |action, source| LockError::Io {
        path: path.to_owned(),
        action,
        source,
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".locks-")
        .suffix(".tmp")
        .permissions(Permissions::from_mode(0o600))
        .tempfile_in(&dir)
        .map_err(|e| io("create a temporary file beside the lock file", e))?;
    tmp.write_all(&render(locks))
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| io("write the lock file", e))?;
    if let Some((uid, gid)) = owner {
        if nix::unistd::geteuid().is_root() && uid != 0 {
            use std::os::fd::AsRawFd;
            nix::unistd::fchown(
                tmp.as_file().as_raw_fd(),
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .map_err(|e| io("keep the lock file's owner", e.into()))?;
        }
    }
    tmp.persist(path)
        .map_err(|e| io("replace the lock file", e.error))?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("sync the lock file's folder", e))?;
    Ok(())
}

/// Reads the lock file, lets `change` edit its locks (expired ones already dropped) and
/// writes the result, all under an exclusive flock on `<file>.lock`: concurrent edits queue
/// instead of losing each other's locks. A file that fails [`load`] is not touched.
pub fn edit<T>(
    path: &Path,
    td: &TrustDomain,
    now: SystemTime,
    change: impl FnOnce(&LockSet) -> Result<(Vec<Lock>, T), LockError>,
) -> Result<T, LockError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&lock_path)
        .map_err(|source| LockError::Io {
            path: lock_path.clone(),
            action: "open",
            source,
        })?;
    let _held = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive).map_err(
        |(_, errno)| LockError::Io {
            path: lock_path.clone(),
            action: "lock",
            source: errno.into(),
        },
    )?;
    let (set, _) = load(path, td)?;
    let owner = std::fs::metadata(path).ok().map(|m| (m.uid(), m.gid()));
    let kept: Vec<Lock> = set.active(now).cloned().collect();
    let kept = LockSet::new(kept).map_err(|why| LockError::Invalid {
        path: path.to_owned(),
        why,
    })?;
    let (locks, out) = change(&kept)?;
    if locks.len() > MAX_LOCKS {
        return Err(LockError::Target(format!(
            "the lock file already holds {MAX_LOCKS} locks; remove some first"
        )));
    }
    save(path, &locks, owner)?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The running sidecar's copy

/// The sidecar's locks: the last set it accepted, re-read when the file's stamp (device,
/// inode, size, modification time) changes.
pub struct LockWatcher {
    path: PathBuf,
    trust_domain: TrustDomain,
    state: Mutex<WatchState>,
    current: watch::Sender<Arc<LockSet>>,
}

struct WatchState {
    /// The locks the file holds (the set in force is these plus `fleet`).
    file: Vec<Lock>,
    /// The locks the fleet bucket holds ([`crate::fleet`]), verified.
    fleet: Vec<Lock>,
    /// The stamp of the file the current set came from; None: there was no file.
    stamp: Option<Stamp>,
    /// The stamp of the last file refused, so one bad file is reported once, not every tick.
    refused: Option<Option<Stamp>>,
    /// When `changes` last looked (expiries up to here are reported).
    checked_at: SystemTime,
}

/// What one look at the lock file found.
#[derive(Debug, Default)]
pub struct Refresh {
    /// `event: "lock"` lines, in order.
    pub events: Vec<LockEvent>,
    /// A new file that was refused (the previous set stays in force); reported once per file.
    pub refused: Option<LockError>,
}

impl LockWatcher {
    /// Reads the lock file for a starting sidecar. A refused file stops the start: running
    /// without the locks an operator placed would be failing open.
    pub fn open(path: &Path, td: &TrustDomain, now: SystemTime) -> Result<Self, LockError> {
        let (set, stamp) = load(path, td)?;
        Ok(LockWatcher {
            path: path.to_owned(),
            trust_domain: td.clone(),
            state: Mutex::new(WatchState {
                file: set.locks().to_vec(),
                fleet: Vec::new(),
                stamp,
                refused: None,
                checked_at: now,
            }),
            current: watch::channel(Arc::new(set)).0,
        })
    }

    /// The set in force; cheap (one reference count).
    pub fn current(&self) -> Arc<LockSet> {
        self.current.borrow().clone()
    }

    /// Notified whenever a new set is accepted (live sessions re-check themselves).
    pub fn subscribe(&self) -> watch::Receiver<Arc<LockSet>> {
        self.current.subscribe()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file if its stamp changed, and reports what changed up to `now`
    /// (including TTLs that passed with no change to the file).
    pub fn refresh(&self, now: SystemTime) -> Refresh {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let before = self.current();
        let then = state.checked_at;
        let mut out = Refresh::default();
        let stamp = match Stamp::now(&self.path) {
            Ok(stamp) => stamp,
            Err(err) => {
                // Not a new file to judge: the set in force stays, and the next tick retries.
                tracing::warn!(%err, "cannot inspect the lock file; keeping the locks in force");
                state.stamp
            }
        };
        let mut after = before.clone();
        if stamp != state.stamp && state.refused != Some(stamp) {
            let loaded = match stamp {
                None => Err(LockError::Vanished {
                    path: self.path.clone(),
                }),
                Some(_) => load(&self.path, &self.trust_domain),
            };
            match loaded {
                Ok((set, stamp)) => {
                    state.stamp = stamp;
                    state.refused = None;
                    state.file = set.locks().to_vec();
                    let set = union(&state.file, &state.fleet);
                    // The same locks rewritten: nothing to publish, no session to wake.
                    if set.locks() != before.locks() {
                        after = Arc::new(set);
                    }
                }
                Err(err) => {
                    state.refused = Some(stamp);
                    out.refused = Some(err);
                }
            }
        }
        let expiry_due = before.next_expiry(then).is_some_and(|at| at <= now);
        if !Arc::ptr_eq(&before, &after) || expiry_due || now < then {
            out.events = changes(&before, then, &after, now);
        }
        if !Arc::ptr_eq(&before, &after) {
            self.current.send_replace(after);
        }
        state.checked_at = now;
        out
    }
}

impl LockWatcher {
    /// Replaces the fleet's locks (already verified) and reports what changed up to `now`,
    /// as [`LockWatcher::refresh`] does for the file: live sessions a new lock matches are
    /// woken through the same channel.
    pub fn set_fleet(&self, fleet: Vec<Lock>, now: SystemTime) -> Vec<LockEvent> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let before = self.current();
        let then = state.checked_at;
        state.fleet = fleet;
        let after = union(&state.file, &state.fleet);
        let mut events = Vec::new();
        if after.locks() != before.locks() {
            let after = Arc::new(after);
            events = changes(&before, then, &after, now);
            self.current.send_replace(after);
            state.checked_at = now;
        }
        events
    }

    /// The fleet's locks in force now (for the fleet task's bookkeeping).
    pub fn fleet_locks(&self) -> Vec<Lock> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.fleet.clone()
    }
}

/// The file's locks and the fleet's, as one set. A fleet lock whose id a different file
/// lock already has stays in force under `<id>@fleet`: both hold (fail closed).
fn union(file: &[Lock], fleet: &[Lock]) -> LockSet {
    let mut all = file.to_vec();
    let mut ids: std::collections::HashSet<String> = file.iter().map(|l| l.id.clone()).collect();
    for lock in fleet {
        if all.iter().any(|l| l == lock) {
            continue;
        }
        let mut id = lock.id.clone();
        let mut n = 0;
        while ids.contains(&id) {
            n += 1;
            id = format!(
                "{}@fleet{}",
                lock.id,
                if n > 1 { n.to_string() } else { String::new() }
            );
        }
        ids.insert(id.clone());
        all.push(Lock { id, ..lock.clone() });
    }
    // Every id is unique by construction, so this cannot refuse; were it to, keeping every
    // lock matters more than the index, so refuse nothing silently: the file's set stays.
    LockSet::new(all).unwrap_or_else(|_| LockSet::new(file.to_vec()).unwrap_or_default())
}

/// One lock as the JSON record the lock file holds (what the fleet bucket carries).
pub fn lock_to_json(lock: &Lock) -> serde_json::Value {
    serde_json::to_value(LockRecord::of(lock)).unwrap_or_default()
}

/// One lock from such a record, checked as strictly as a lock file's.
pub fn lock_from_json(value: serde_json::Value, td: &TrustDomain) -> Result<Lock, String> {
    let record: LockRecord =
        serde_json::from_value(value).map_err(|e| format!("not a lock record: {e}"))?;
    record.into_lock(td)
}

/// One upkeep tick: re-reads the lock file and writes its `lock` lines, and an alert line
/// (`event: "lock_reload"`) for a file that was refused.
pub async fn upkeep(watcher: &LockWatcher, audit: &AuditLog) {
    let refresh = watcher.refresh(SystemTime::now());
    for event in &refresh.events {
        tracing::info!(lock.id = %event.lock.id, target = %event.lock.target, action = event.action.as_str(), "lock");
        if let Err(err) = audit.record(event.entry()).await {
            tracing::error!(%err, "decision log write failed");
        }
    }
    if let Some(err) = refresh.refused {
        let in_force = watcher.current().active(SystemTime::now()).count();
        tracing::error!(%err, in_force, "lock file changed but is refused; the previous locks stay in force");
        let mut entry = Entry {
            conn_id: crate::identity::new_conn_id(),
            event: "lock_reload",
            reason: "lock_file_refused".into(),
            alert: true,
            ..Entry::default()
        };
        entry.extra.insert("result".into(), json!("error"));
        entry.extra.insert("detail".into(), json!(err.to_string()));
        entry.extra.insert("locks_in_force".into(), json!(in_force));
        if let Err(err) = audit.record(entry).await {
            tracing::error!(%err, "decision log write failed");
        }
    }
}

/// The OS user running this command, for `created_by` (and who ran sudo, when root through
/// sudo: the record is for people, not a security check).
pub fn os_user() -> String {
    let uid = nix::unistd::getuid();
    let name = match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => user.name,
        _ => format!("uid {uid}"),
    };
    match std::env::var("SUDO_USER") {
        Ok(by)
            if uid.is_root()
                && !by.is_empty()
                && by.len() <= 64
                && !by.contains(char::is_control) =>
        {
            format!("{name} (sudo from {by})")
        }
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + secs)
    }

    fn td() -> TrustDomain {
        TrustDomain::parse("corp.example").unwrap()
    }

    fn sid(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn lock(id: &str, target: Target, ttl: Option<u64>) -> Lock {
        Lock {
            id: id.into(),
            target,
            created_at: at(0),
            expires_at: ttl.map(at),
            message: format!("msg {id}"),
            created_by: "alice".into(),
        }
    }

    fn set(locks: Vec<Lock>) -> LockSet {
        LockSet::new(locks).unwrap()
    }

    fn by_source(set: &LockSet, ip: &str, now: SystemTime) -> Option<String> {
        let q = LockQuery {
            source: Some(ip.parse().unwrap()),
            ..LockQuery::default()
        };
        set.find(&q, now).map(|l| l.id.clone())
    }

    #[test]
    fn a_ttl_lock_holds_until_its_expiry_and_not_after() {
        let s = set(vec![lock(
            "00000001",
            Target::role("billing").unwrap(),
            Some(60),
        )]);
        let q = LockQuery {
            role: Some("billing"),
            ..LockQuery::default()
        };
        assert!(s.find(&q, at(59)).is_some());
        assert!(s.find(&q, at(60)).is_none(), "expired at its TTL");
        let other = LockQuery {
            role: Some("Billing"),
            ..LockQuery::default()
        };
        assert!(
            s.find(&other, at(1)).is_none(),
            "roles are exact, as PostgreSQL's"
        );
    }

    #[test]
    fn the_longest_lock_on_one_serial_wins() {
        let s = set(vec![
            lock("00000001", Target::serial("0a1b").unwrap(), Some(10)),
            lock("00000002", Target::serial("0A:1B").unwrap(), None),
            lock("00000003", Target::serial("0a1b").unwrap(), Some(20)),
        ]);
        let q = LockQuery {
            serial: Some("0a1b"),
            ..LockQuery::default()
        };
        assert_eq!(s.find(&q, at(30)).unwrap().id, "00000002");
    }

    #[test]
    fn serials_match_whatever_case_or_sign_byte_they_are_written_with() {
        let t = Target::serial("0x00:8F:AB").unwrap();
        assert_eq!(t, Target::Serial("8fab".into()));
        let s = set(vec![lock("00000001", t, None)]);
        for serial in ["8fab", "008fab", "8FAB", "008FaB"] {
            let q = LockQuery {
                serial: Some(serial),
                ..LockQuery::default()
            };
            assert!(s.find(&q, at(1)).is_some(), "{serial}");
        }
        let q = LockQuery {
            serial: Some("8fac"),
            ..LockQuery::default()
        };
        assert!(s.find(&q, at(1)).is_none());
        assert!(Target::serial("xyz").is_err());
        assert!(Target::serial("").is_err());
    }

    #[test]
    fn ipv4_ranges_match_plain_and_mapped_clients() {
        let s = set(vec![lock(
            "00000001",
            Target::source("10.1.0.0/16").unwrap(),
            None,
        )]);
        assert!(by_source(&s, "10.1.2.3", at(1)).is_some());
        assert!(
            by_source(&s, "::ffff:10.1.2.3", at(1)).is_some(),
            "dual-stack listener"
        );
        assert!(by_source(&s, "10.2.0.1", at(1)).is_none());
        assert!(by_source(&s, "::ffff:10.2.0.1", at(1)).is_none());
        assert!(by_source(&s, "2001:db8::1", at(1)).is_none());
        // A mapped range is the IPv4 range.
        assert_eq!(
            Target::source("::ffff:10.1.0.0/112").unwrap(),
            Target::source("10.1.0.0/16").unwrap()
        );
        // One address.
        let one = set(vec![lock(
            "00000002",
            Target::source("192.0.2.7").unwrap(),
            None,
        )]);
        assert!(by_source(&one, "192.0.2.7", at(1)).is_some());
        assert!(by_source(&one, "192.0.2.8", at(1)).is_none());
        let all = set(vec![lock(
            "00000003",
            Target::source("0.0.0.0/0").unwrap(),
            None,
        )]);
        assert!(by_source(&all, "203.0.113.9", at(1)).is_some());
        assert!(by_source(&all, "::1", at(1)).is_none());
    }

    #[test]
    fn ipv6_ranges_match_by_prefix() {
        let s = set(vec![lock(
            "00000001",
            Target::source("2001:db8:1::/48").unwrap(),
            None,
        )]);
        assert!(by_source(&s, "2001:db8:1:ffff::1", at(1)).is_some());
        assert!(by_source(&s, "2001:db8:2::1", at(1)).is_none());
        assert!(by_source(&s, "10.0.0.1", at(1)).is_none());
        let host = set(vec![lock(
            "00000002",
            Target::source("::1/128").unwrap(),
            None,
        )]);
        assert!(by_source(&host, "::1", at(1)).is_some());
        assert!(by_source(&host, "::2", at(1)).is_none());
    }

    #[test]
    fn bad_ranges_are_refused_with_what_would_be_valid() {
        for (bad, needle) in [
            ("10.0.0.1/8", "did you mean 10.0.0.0/8"),
            ("10.0.0.0/33", "0 to 32"),
            ("2001:db8::/129", "0 to 128"),
            ("10.0.0.0/+8", "0 to 32"),
            ("10.0.0.0/", "0 to 32"),
            ("10.0.0", "IP address"),
            ("host.example", "IP address"),
            ("", "IP address"),
        ] {
            let err = Target::source(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn patterns_use_segment_wildcards_and_our_trust_domain_only() {
        let s = set(vec![lock(
            "00000001",
            Target::id("spiffe://corp.example/app/operators/*", &td()).unwrap(),
            None,
        )]);
        let q = |id: &str| LockQuery {
            id: Some(Box::leak(Box::new(sid(id)))),
            ..LockQuery::default()
        };
        assert!(s
            .find(&q("spiffe://corp.example/app/operators/alice"), at(1))
            .is_some());
        assert!(s
            .find(
                &q("spiffe://corp.example/app/operators/alice/laptop"),
                at(1)
            )
            .is_none());
        assert!(s
            .find(&q("spiffe://corp.example/app/billing"), at(1))
            .is_none());
        assert!(s
            .find(&q("spiffe://other.example/app/operators/alice"), at(1))
            .is_none());
        let err = Target::id("spiffe://other.example/app/**", &td())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not this sidecar's trust domain"), "{err}");
        assert!(Target::id("spiffe://corp.example/app*", &td()).is_err());
        assert!(Target::role("").is_err());
        assert!(Target::role(&"r".repeat(64)).is_err());
        assert!(Target::role("a\nb").is_err());
    }

    #[test]
    fn check_lock_refuses_with_the_lock_message_and_id() {
        let s = set(vec![lock(
            "0badc0de",
            Target::serial("0a1b").unwrap(),
            None,
        )]);
        let id = sid("spiffe://corp.example/app/billing");
        let src: IpAddr = "127.0.0.1".parse().unwrap();
        let refusal = check_lock(&s, &id, "0a1b", src, Some("billing"), at(1)).unwrap();
        assert_eq!(refusal.lock_id, "0badc0de");
        assert_eq!(
            refusal.client_message("c1"),
            "locked by Eastwall lock 0badc0de: msg 0badc0de (connection c1)"
        );
        let mut entry = Entry::default();
        refusal.fill(&mut entry);
        assert_eq!(entry.reason, "locked");
        assert_eq!(entry.extra["lock_id"], "0badc0de");
        assert!(check_lock(&s, &id, "0a1c", src, Some("billing"), at(1)).is_none());
        assert!(check_lock(&LockSet::default(), &id, "0a1b", src, None, at(1)).is_none());
    }

    #[test]
    fn changes_report_each_expiry_once_and_removals_and_additions() {
        let a = lock("0000000a", Target::role("a").unwrap(), Some(10));
        let b = lock("0000000b", Target::role("b").unwrap(), None);
        let c = lock("0000000c", Target::role("c").unwrap(), None);
        let before = set(vec![a.clone(), b.clone()]);
        // Nothing changed, nothing expired.
        assert!(changes(&before, at(1), &before, at(5)).is_empty());
        // a's TTL passes: one expired line, then none.
        let ev = changes(&before, at(5), &before, at(10));
        assert_eq!(
            ev,
            vec![LockEvent {
                action: LockAction::Expired,
                lock: a.clone()
            }]
        );
        assert!(changes(&before, at(10), &before, at(12)).is_empty());
        // b removed, c added, a purged from the file after it expired: nothing about a.
        let after = set(vec![c.clone()]);
        let ev = changes(&before, at(12), &after, at(14));
        assert_eq!(
            ev,
            vec![
                LockEvent {
                    action: LockAction::Removed,
                    lock: b.clone()
                },
                LockEvent {
                    action: LockAction::Added,
                    lock: c.clone()
                },
            ]
        );
        // A lock expired and purged in the same interval is expired, not removed.
        let ev = changes(&before, at(5), &set(vec![b.clone()]), at(11));
        assert_eq!(
            ev,
            vec![LockEvent {
                action: LockAction::Expired,
                lock: a.clone()
            }]
        );
        // A lock already past its TTL when it appears is not "added".
        let late = lock("0000000d", Target::role("d").unwrap(), Some(3));
        assert!(changes(&LockSet::default(), at(4), &set(vec![late]), at(5)).is_empty());
    }

    // ---- the file

    fn write_mode(path: &Path, text: &str, mode: u32) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, Permissions::from_mode(mode)).unwrap();
    }

    fn good_file() -> String {
        r#"{"version":1,"locks":[{"id":"0000000a","target":{"role":"billing"},"created_at":"2027-01-15T08:00:00Z","message":"incident 7","created_by":"alice"}]}"#.into()
    }

    #[test]
    fn locks_round_trip_through_the_file_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks.json");
        let now = at(0);
        let id = edit(&path, &td(), now, |set| {
            let mut locks = set.locks().to_vec();
            let lock = Lock::new(
                Target::id("spiffe://corp.example/app/**", &td())?,
                Some(Duration::from_secs(3600)),
                "stolen laptop".into(),
                "alice".into(),
                now,
                set,
            )?;
            let id = lock.id.clone();
            locks.push(lock);
            locks.push(Lock::new(
                Target::source("::ffff:10.0.0.0/104")?,
                None,
                String::new(),
                "bob".into(),
                now,
                set,
            )?);
            Ok((locks, id))
        })
        .unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let (set, stamp) = load(&path, &td()).unwrap();
        assert!(stamp.is_some());
        assert_eq!(set.locks().len(), 2);
        let first = set.get(&id).unwrap();
        assert_eq!(first.message, "stolen laptop");
        assert_eq!(first.expires_at, Some(at(3600)));
        assert_eq!(set.locks()[1].target.value(), "10.0.0.0/8");
        // An edit drops locks that have expired.
        edit(&path, &td(), at(3600), |set| Ok((set.locks().to_vec(), ()))).unwrap();
        assert_eq!(load(&path, &td()).unwrap().0.locks().len(), 1);
    }

    #[test]
    fn hostile_lock_files_are_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks.json");
        let lock_json = |id: &str, target: &str, extra: &str| {
            format!(
                r#"{{"id":"{id}","target":{target},"created_at":"2027-01-15T08:00:00Z","created_by":"a"{extra}}}"#
            )
        };
        let file = |locks: &[String]| format!(r#"{{"version":1,"locks":[{}]}}"#, locks.join(","));
        let role = r#"{"role":"billing"}"#;
        let cases: Vec<(String, &str)> = vec![
            ("garbage \u{0}\u{1}".into(), "not a lock file"),
            (String::new(), "not a lock file"),
            ("[]".into(), "not a lock file"),
            (r#"{"version":2,"locks":[]}"#.into(), "version 2"),
            (
                r#"{"version":1,"locks":[],"extra":1}"#.into(),
                "unknown field",
            ),
            (
                r#"{"version":1,"version":1,"locks":[]}"#.into(),
                "duplicate field",
            ),
            (
                file(&[lock_json("0000000a", role, r#","admin":true"#)]),
                "unknown field",
            ),
            (
                file(&[lock_json("0000000a", r#"{"role":"a","serial":"0a"}"#, "")]),
                "not a lock file",
            ),
            (
                file(&[lock_json("0000000a", r#"{"everyone":"x"}"#, "")]),
                "unknown variant",
            ),
            (
                file(&[
                    lock_json("0000000a", role, ""),
                    lock_json("0000000a", r#"{"role":"x"}"#, ""),
                ]),
                "two locks have the id",
            ),
            (file(&[lock_json("0000000A", role, "")]), "lowercase hex"),
            (file(&[lock_json("../../x", role, "")]), "lowercase hex"),
            (
                file(&[lock_json(
                    "0000000a",
                    r#"{"spiffe_id":"spiffe://evil.example/**"}"#,
                    "",
                )]),
                "trust domain",
            ),
            (
                file(&[lock_json("0000000a", r#"{"source":"10.0.0.1/8"}"#, "")]),
                "did you mean",
            ),
            (
                file(&[lock_json("0000000a", r#"{"serial":"zz"}"#, "")]),
                "--serial",
            ),
            (
                file(&[lock_json("0000000a", r#"{"role":""}"#, "")]),
                "empty string",
            ),
            (
                file(&[lock_json(
                    "0000000a",
                    role,
                    r#","expires_at":"2027-01-15T07:00:00Z""#,
                )]),
                "not after created_at",
            ),
            (
                file(&[lock_json("0000000a", role, r#","expires_at":"soon""#)]),
                "RFC 3339",
            ),
            (
                file(&[lock_json("0000000a", role, r#","message":"a\u001b[2Jb""#)]),
                "control characters",
            ),
            (
                file(&[lock_json(
                    "0000000a",
                    role,
                    &format!(r#","message":"{}""#, "m".repeat(300)),
                )]),
                "at most 256",
            ),
            (
                format!(
                    r#"{{"version":1,"locks":[],"pad":"{}"}}"#,
                    " ".repeat(MAX_FILE_BYTES as usize)
                ),
                "more than",
            ),
        ];
        for (text, needle) in cases {
            write_mode(&path, &text, 0o600);
            let err = load(&path, &td()).map(|_| ()).unwrap_err().to_string();
            assert!(
                err.contains(needle),
                "{}: {err}",
                &text[..text.len().min(120)]
            );
            assert!(err.contains("locks.json"), "{err}");
        }
        // Group- or world-writable: an attacker's file.
        write_mode(&path, &good_file(), 0o620);
        let err = load(&path, &td()).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        write_mode(&path, &good_file(), 0o602);
        assert!(load(&path, &td()).is_err());
        // A symbolic link to a good file is still refused.
        let real = dir.path().join("real.json");
        write_mode(&real, &good_file(), 0o600);
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&real, &path).unwrap();
        let err = load(&path, &td()).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        // A folder.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(load(&path, &td()).is_err());
    }

    #[test]
    fn a_file_owned_by_another_user_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            return; // Only root can give a file away; the check runs in CI as root.
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks.json");
        write_mode(&path, &good_file(), 0o600);
        nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let err = load(&path, &td()).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("owned by uid 65534"), "{err}");
    }

    #[test]
    fn the_watcher_keeps_the_last_good_set_and_reports_a_bad_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks.json");
        write_mode(&path, &good_file(), 0o600);
        let w = LockWatcher::open(&path, &td(), at(0)).unwrap();
        assert_eq!(w.current().locks().len(), 1);
        let updates = w.subscribe();

        // Each hostile rewrite is refused; the lock stays in force.
        for bad in [
            "{}".to_owned(),
            r#"{"version":1,"locks":[]} trailing"#.to_owned(),
            good_file().replace("corp.example", "x").replace(
                r#"{"role":"billing"}"#,
                r#"{"spiffe_id":"spiffe://evil.example/x"}"#,
            ),
        ] {
            write_mode(&path, &bad, 0o600);
            let r = w.refresh(at(1));
            assert!(r.refused.is_some(), "{bad}");
            assert!(r.events.is_empty());
            assert_eq!(w.current().locks().len(), 1, "last good set kept");
            let again = w.refresh(at(2));
            assert!(again.refused.is_none(), "one report per bad file");
        }
        // Made world-writable in place: the change time moves, so it is judged, and refused.
        write_mode(&path, &good_file(), 0o600);
        assert!(w.refresh(at(3)).refused.is_none());
        std::fs::set_permissions(&path, Permissions::from_mode(0o666)).unwrap();
        let r = w.refresh(at(3));
        assert!(matches!(r.refused, Some(LockError::Unsafe { .. })), "{r:?}");
        write_mode(&path, r#"{"version":1,"locks":[]}"#, 0o666);
        assert!(w.refresh(at(3)).refused.is_some());
        assert_eq!(w.current().locks().len(), 1);
        // Deleted: refused too, locks stay.
        std::fs::remove_file(&path).unwrap();
        let r = w.refresh(at(4));
        assert!(
            matches!(r.refused, Some(LockError::Vanished { .. })),
            "{r:?}"
        );
        assert_eq!(w.current().locks().len(), 1);
        assert!(!updates.has_changed().unwrap(), "no new set was published");

        // A good rewrite that removes the lock and adds a 10 s one: removed + added.
        let ttl = r#"{"version":1,"locks":[{"id":"0000000b","target":{"serial":"0a"},"created_at":"2027-01-15T08:00:00Z","expires_at":"2027-01-15T08:00:10Z","created_by":"a"}]}"#;
        write_mode(&path, ttl, 0o600);
        let now =
            SystemTime::from(OffsetDateTime::parse("2027-01-15T08:00:05Z", &Rfc3339).unwrap());
        let r = w.refresh(now);
        assert!(r.refused.is_none(), "{:?}", r.refused);
        let actions: Vec<_> = r
            .events
            .iter()
            .map(|e| (e.action, e.lock.id.as_str()))
            .collect();
        assert_eq!(
            actions,
            [
                (LockAction::Removed, "0000000a"),
                (LockAction::Added, "0000000b")
            ]
        );
        assert!(updates.has_changed().unwrap());
        // Its TTL passes with no change to the file: expired, once.
        let r = w.refresh(now + Duration::from_secs(5));
        let actions: Vec<_> = r.events.iter().map(|e| e.action).collect();
        assert_eq!(actions, [LockAction::Expired]);
        assert!(w.refresh(now + Duration::from_secs(7)).events.is_empty());
        let line = r.events[0].entry();
        assert_eq!(line.event, "lock");
        assert_eq!(line.extra["action"], "expired");
        assert_eq!(line.extra["lock_id"], "0000000b");
        assert_eq!(line.extra["target"], json!({"serial": "0a"}));
    }

    #[test]
    fn a_refused_file_stops_a_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks.json");
        write_mode(&path, "nope", 0o600);
        assert!(LockWatcher::open(&path, &td(), at(0)).is_err());
        std::fs::remove_file(&path).unwrap();
        let w = LockWatcher::open(&path, &td(), at(0)).expect("no file: no locks");
        assert!(w.current().is_empty());
        assert!(w.refresh(at(1)).refused.is_none(), "still no file is fine");
    }
}
