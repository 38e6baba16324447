//! `[fleet]`: the NATS JetStream control plane this sidecar shares with others: where it is, who may push to it, and what to do when it is out of reach.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use eastwall_ca::spiffe::TrustDomain;
use serde::Deserialize;
use toml::Spanned;

use crate::pattern::IdPattern;
use crate::settings::{Checker, ListenSettings};

type Str = Spanned<String>;

/// What a sidecar does once the control plane has been out of reach past `max_staleness`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStale {
    /// Refuse new connections (fail closed; the default). Live sessions go on.
    Refuse,
    /// Go on admitting on the last good state, with an alert line and the metric.
    Serve,
}

/// The sidecar's fleet settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    /// `nats`: `tls://HOST:PORT` (several, comma-separated, for a cluster). Plain `nats://`
    /// is refused: the control plane carries the policy and the locks.
    pub servers: Vec<String>,
    /// `name`: this sidecar's name in the fleet (its log subject `eastwall.log.<name>` and
    /// its chain heads on `eastwall.log.<name>.head`): letters, digits, `_` and `-`.
    pub name: String,
    /// `bucket` (default `eastwall`): the key-value bucket holding the policy and the locks.
    pub bucket: String,
    /// `stream` (default `EASTWALL_LOG`): the stream holding every sidecar's decision lines.
    pub stream: String,
    /// `cert` / `key` (default `[listen] cert` / `key`): the SVID presented to NATS.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `ca` (default `[listen] client_ca`): the CA that signs the NATS servers' certificates.
    pub ca: PathBuf,
    /// `server_name` (default: the host of the first URL): the name verified on them.
    pub server_name: Option<String>,
    /// `admins`: the identities whose signed pushes (policy, locks) this sidecar accepts: a
    /// `[groups]` name or a SPIFFE ID pattern each. Required and never empty.
    pub admins: Vec<IdPattern>,
    /// `max_staleness` (default 5m): how long the last good state serves once the control
    /// plane is out of reach.
    pub max_staleness: Duration,
    /// `on_stale` (default "refuse").
    pub on_stale: OnStale,
    /// `head_interval` (default 5s): how often the chain head is published.
    pub head_interval: Duration,
    /// `backlog` (default 4096): committed log batches that may wait for NATS before new
    /// ones are dropped from the fleet copy (never from the local log), counted in a metric.
    pub backlog: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFleet {
    nats: Str,
    name: Str,
    bucket: Option<Str>,
    stream: Option<Str>,
    cert: Option<Str>,
    key: Option<Str>,
    ca: Option<Str>,
    server_name: Option<Str>,
    admins: Option<Spanned<Vec<Str>>>,
    max_staleness: Option<Str>,
    on_stale: Option<Str>,
    head_interval: Option<Str>,
    backlog: Option<Spanned<i64>>,
}

/// A NATS subject token or KV key part: no dots, wildcards or spaces.
fn is_token(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

pub(crate) fn check_fleet(
    c: &mut Checker<'_>,
    raw: Option<&RawFleet>,
    listen: &ListenSettings,
    groups: &BTreeMap<String, Vec<String>>,
    td: Option<&TrustDomain>,
) -> Option<FleetSettings> {
    let raw = raw?;
    let mut servers = Vec::new();
    for url in raw.nats.get_ref().split(',').map(str::trim) {
        let ok = url.strip_prefix("tls://").is_some_and(|rest| {
            rest.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
        });
        if ok {
            servers.push(url.to_owned());
        } else {
            c.invalid(
                raw.nats.span(),
                "fleet.nats",
                format!("expected tls://HOST:PORT (comma-separated for a cluster), found {url:?}; plain nats:// is refused because the control plane carries the policy and the locks"),
            );
        }
    }
    let token = |c: &mut Checker<'_>, key: &str, v: Option<&Str>, default: &str| -> String {
        match v {
            None => default.to_owned(),
            Some(v) if is_token(v.get_ref(), 64) => v.get_ref().clone(),
            Some(v) => {
                c.invalid(
                    v.span(),
                    key,
                    format!(
                        "expected 1 to 64 letters, digits, '_' or '-' (it is part of NATS subjects), found {:?}",
                        v.get_ref()
                    ),
                );
                default.to_owned()
            }
        }
    };
    let name = token(c, "fleet.name", Some(&raw.name), "");
    let bucket = token(c, "fleet.bucket", raw.bucket.as_ref(), "eastwall");
    let stream = token(c, "fleet.stream", raw.stream.as_ref(), "EASTWALL_LOG");
    let admins = check_admins(c, raw, groups, td);
    let max_staleness = c.duration(
        "fleet.max_staleness",
        raw.max_staleness.as_ref(),
        Duration::from_secs(300),
    );
    let on_stale = match raw.on_stale.as_ref().map(|v| (v, v.get_ref().as_str())) {
        None | Some((_, "refuse")) => OnStale::Refuse,
        Some((_, "serve")) => OnStale::Serve,
        Some((v, other)) => {
            c.invalid(
                v.span(),
                "fleet.on_stale",
                format!(
                    "expected \"refuse\" (the default: fail closed) or \"serve\", found {other:?}"
                ),
            );
            OnStale::Refuse
        }
    };
    let head_interval = c.duration(
        "fleet.head_interval",
        raw.head_interval.as_ref(),
        Duration::from_secs(5),
    );
    let backlog = c.int(
        "fleet.backlog",
        raw.backlog.as_ref(),
        4096usize,
        1,
        1_000_000,
    );
    let server_name = raw.server_name.as_ref().map(|v| v.get_ref().clone());
    Some(FleetSettings {
        servers,
        name,
        bucket,
        stream,
        cert: raw
            .cert
            .as_ref()
            .map_or_else(|| listen.cert.clone(), |v| c.path("fleet.cert", v)),
        key: raw
            .key
            .as_ref()
            .map_or_else(|| listen.key.clone(), |v| c.path("fleet.key", v)),
        ca: raw
            .ca
            .as_ref()
            .map_or_else(|| listen.client_ca.clone(), |v| c.path("fleet.ca", v)),
        server_name,
        admins,
        max_staleness,
        on_stale,
        head_interval,
        backlog,
    })
}

/// `fleet.admins`: like `[audit] statements`, group names or patterns; required, since a
/// fleet nobody may push to would silently never apply a policy or a lock.
fn check_admins(
    c: &mut Checker<'_>,
    raw: &RawFleet,
    groups: &BTreeMap<String, Vec<String>>,
    td: Option<&TrustDomain>,
) -> Vec<IdPattern> {
    const KEY: &str = "fleet.admins";
    let Some(list) = raw.admins.as_ref().filter(|l| !l.get_ref().is_empty()) else {
        c.invalid(
            raw.nats.span(),
            KEY,
            "expected the identities that may push policies and locks to the fleet, e.g. admins = [\"dbas\"] (a [groups] name or a SPIFFE ID pattern each)",
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in list.get_ref() {
        let value = item.get_ref().as_str();
        if value.starts_with("spiffe://") {
            match IdPattern::parse(value, td) {
                Ok(p) => out.push(p),
                Err(e) => c.invalid(item.span(), KEY, e.to_string()),
            }
        } else if let Some(patterns) = groups.get(value) {
            out.extend(patterns.iter().filter_map(|p| IdPattern::parse(p, td).ok()));
        } else {
            c.invalid(
                item.span(),
                KEY,
                format!("expected the name of a group in [groups] or a SPIFFE ID pattern, found {value:?}"),
            );
        }
    }
    out
}
