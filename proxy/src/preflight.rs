//! `eastwall check`: everything the sidecar will need, checked before it is needed, as one finding per file or setting.
//!
//! `policy check` answers "does the policy parse"; this answers "will the sidecar start and
//! keep running": the files exist and parse, the key is the certificate's, nothing secret is
//! readable by others, nothing expires soon, the log's folder is writable, PostgreSQL answers
//! and the configured login works. Each check reads what the sidecar would read, with the
//! sidecar's own loaders, so a check that passes is a start that will pass.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use eastwall_config::{Policy, Settings, UpstreamLogin};

use crate::tls::{load_certs, load_key, Revocation};

/// A server certificate, the CA or a client certificate expiring within this is a warning.
pub const CERT_WARN: Duration = Duration::from_secs(7 * 24 * 3600);
/// The CA expiring within this is a warning: rolling a CA over takes longer than a leaf.
pub const CA_WARN: Duration = Duration::from_secs(30 * 24 * 3600);
/// A CRL whose nextUpdate is this close is a warning: past it, every handshake is refused.
pub const CRL_WARN: Duration = Duration::from_secs(2 * 24 * 3600);

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warning,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

/// One line of the report: what was checked (a setting and its file) and what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub what: String,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}: {}",
            self.level.as_str(),
            self.what,
            self.message
        )
    }
}

/// The findings, in the order a reader fixes them: files, then PostgreSQL.
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    fn push(&mut self, level: Level, what: impl Into<String>, message: impl Into<String>) {
        self.findings.push(Finding {
            level,
            what: what.into(),
            message: message.into(),
        });
    }

    /// The worst level found.
    pub fn worst(&self) -> Level {
        self.findings
            .iter()
            .map(|f| f.level)
            .max()
            .unwrap_or(Level::Ok)
    }
}

/// Runs every check against `settings` (already loaded and valid) at `now`.
pub async fn check(settings: &Settings, policy: &Policy, now: SystemTime) -> Report {
    let mut r = Report::default();
    let listen = &settings.listen;
    server_certificate(&mut r, &listen.cert, &listen.key, now);
    let anchors = client_ca(&mut r, &listen.client_ca, now);
    if let (Some(crl), Some(anchors)) = (&listen.crl, &anchors) {
        revocation(&mut r, crl, anchors, now);
    }
    if listen.crl.is_none() {
        r.push(
            Level::Warning,
            "listen.crl",
            "not set: a revoked certificate would still be admitted until it expires",
        );
    }
    writable_folder(&mut r, "audit.path", &settings.audit.path);
    if let Some(ocsf) = &settings.audit.ocsf {
        writable_folder(&mut r, "audit.ocsf", ocsf);
    }
    writable_folder(&mut r, "admin.socket", &settings.admin.socket);
    locks(&mut r, settings, now);
    detector_state(&mut r, settings);
    mfa(&mut r, settings, policy);
    upstream(&mut r, settings).await;
    r
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}

/// How long until `at`, in whole days, for messages.
fn days_until(at: SystemTime, now: SystemTime) -> String {
    match at.duration_since(now) {
        Ok(d) if d.as_secs() >= 2 * 86_400 => format!("{} days", d.as_secs() / 86_400),
        Ok(d) => format!("{} hours", d.as_secs() / 3600),
        Err(_) => "already".into(),
    }
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

/// A certificate's notAfter, and its URI SAN (the SPIFFE ID) when it has one.
fn validity(der: &[u8]) -> Option<(SystemTime, Option<String>)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    let id = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                _ => None,
            })
        });
    Some((SystemTime::UNIX_EPOCH + Duration::from_secs(secs), id))
}

/// Expired: error; within `warn`: warning; else ok.
fn expiry(
    r: &mut Report,
    what: &str,
    subject: &str,
    at: SystemTime,
    warn: Duration,
    now: SystemTime,
    renew: &str,
) {
    if at <= now {
        r.push(
            Level::Error,
            what,
            format!("{subject} expired at {}; {renew}", rfc3339(at)),
        );
    } else if at <= now + warn {
        r.push(
            Level::Warning,
            what,
            format!(
                "{subject} expires at {} (in {}); {renew}",
                rfc3339(at),
                days_until(at, now)
            ),
        );
    } else {
        r.push(
            Level::Ok,
            what,
            format!(
                "{subject}, expires {} (in {})",
                rfc3339(at),
                days_until(at, now)
            ),
        );
    }
}

fn server_certificate(r: &mut Report, cert: &Path, key: &Path, now: SystemTime) {
    let what = format!("listen.cert {}", shown(cert));
    let chain = match load_certs(cert, "the proxy's certificate") {
        Ok(chain) => chain,
        Err(e) => return r.push(Level::Error, what, e.to_string()),
    };
    match validity(&chain[0]) {
        Some((at, id)) => expiry(
            r,
            &what,
            &id.unwrap_or_else(|| "the proxy's certificate".into()),
            at,
            CERT_WARN,
            now,
            "issue a new one with `eastwall ca issue ... --force`; the running sidecar picks it up within 2 s",
        ),
        None => r.push(Level::Error, &what, "not an X.509 certificate"),
    }
    let what_key = format!("listen.key {}", shown(key));
    secret_mode(r, &what_key, key);
    let key_der = match load_key(key) {
        Ok(k) => k,
        Err(e) => return r.push(Level::Error, what_key, e.to_string()),
    };
    let signer = match rustls::crypto::aws_lc_rs::sign::any_supported_type(&key_der) {
        Ok(s) => s,
        Err(e) => {
            return r.push(
                Level::Error,
                what_key,
                format!("not a usable private key: {e}"),
            )
        }
    };
    match rustls::sign::CertifiedKey::new(chain, signer).keys_match() {
        Ok(()) => r.push(Level::Ok, what_key, "the private key of listen.cert"),
        Err(_) => r.push(
            Level::Error,
            what_key,
            format!(
                "is not the private key of {}; issue the pair again",
                shown(cert)
            ),
        ),
    }
}

/// A key or secret file must not be readable by group or others.
fn secret_mode(r: &mut Report, what: &str, path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.mode() & 0o077 != 0 {
            r.push(
                Level::Error,
                what,
                format!(
                    "group or others may read it (mode {:o}); chmod 600 it",
                    meta.mode() & 0o7777
                ),
            );
        }
    }
}

fn client_ca(
    r: &mut Report,
    path: &Path,
    now: SystemTime,
) -> Option<Vec<rustls_pki_types::CertificateDer<'static>>> {
    let what = format!("listen.client_ca {}", shown(path));
    let certs = match load_certs(path, "CA certificates") {
        Ok(c) => c,
        Err(e) => {
            r.push(Level::Error, what, e.to_string());
            return None;
        }
    };
    let before = r.findings.len();
    let any_valid = certs
        .iter()
        .filter_map(|der| validity(der))
        .any(|(at, _)| at > now);
    for (i, der) in certs.iter().enumerate() {
        match validity(der) {
            Some((at, _)) => expiry(
                r,
                &what,
                &format!("CA certificate {} of {}", i + 1, certs.len()),
                at,
                CA_WARN,
                now,
                "roll the CA over: put the new root beside the old one in the bundle, then re-issue (docs/production.md)",
            ),
            None => r.push(Level::Error, &what, format!("certificate {} is not X.509", i + 1)),
        }
    }
    if any_valid {
        // A rollover: an old root expired beside one that verifies. Not an outage.
        for f in &mut r.findings[before..] {
            if f.level == Level::Error && f.message.contains("expired at") {
                f.level = Level::Warning;
            }
        }
    }
    Some(certs)
}

fn revocation(
    r: &mut Report,
    crl: &Path,
    anchors: &[rustls_pki_types::CertificateDer<'static>],
    now: SystemTime,
) {
    let what = format!("listen.crl {}", shown(crl));
    match Revocation::load(crl, anchors) {
        Ok(rev) => match rev.earliest_next_update() {
            Some(at) => expiry(
                r,
                &what,
                "the CRL's nextUpdate",
                at,
                CRL_WARN,
                now,
                "re-sign it with `eastwall ca crl --dir CA_DIR` (the documented timer does it daily); past nextUpdate every handshake is refused",
            ),
            None => r.push(Level::Ok, what, "loaded and verified"),
        },
        Err(e) => r.push(Level::Error, what, e.to_string()),
    }
}

/// The folder `path` lives in must exist (or be creatable) and be writable by this user.
fn writable_folder(r: &mut Report, key: &str, path: &Path) {
    let what = format!("{key} {}", shown(path));
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        // Only the decision log's folder is made at start; the others must exist.
        return if key == "audit.path" || key == "mfa.token_key" {
            r.push(
                Level::Warning,
                what,
                format!(
                    "its folder {} does not exist; the sidecar will create it (0700)",
                    shown(dir)
                ),
            )
        } else if key == "admin.socket" {
            // systemd's RuntimeDirectory= makes it as the unit starts, after ExecStartPre.
            r.push(
                Level::Warning,
                what,
                format!(
                    "its folder {} does not exist; it must before the sidecar starts (systemd's RuntimeDirectory= makes it)",
                    shown(dir)
                ),
            )
        } else {
            r.push(
                Level::Error,
                what,
                format!("its folder {} does not exist; create it", shown(dir)),
            )
        };
    }
    match tempfile::Builder::new()
        .prefix(".eastwall-check")
        .tempfile_in(dir)
    {
        Ok(_) => {}
        Err(e) => {
            return r.push(
                Level::Error,
                what,
                format!("cannot write in {}: {e}", shown(dir)),
            )
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.is_file() && key != "admin.socket" {
            return r.push(Level::Error, what, "exists and is not a regular file");
        }
        if meta.mode() & 0o022 != 0 && key != "admin.socket" {
            return r.push(
                Level::Error,
                what,
                format!(
                    "group or others may write it (mode {:o}); chmod 600 it",
                    meta.mode() & 0o7777
                ),
            );
        }
    }
    r.push(Level::Ok, what, "writable");
}

fn locks(r: &mut Report, settings: &Settings, now: SystemTime) {
    let what = format!("locks.file {}", shown(&settings.locks_file));
    match crate::locks::load(&settings.locks_file, &settings.trust_domain) {
        Ok((set, _)) => r.push(
            Level::Ok,
            what,
            format!("{} lock(s) in force", set.active(now).count()),
        ),
        Err(e) => r.push(Level::Error, what, e.to_string()),
    }
}

fn detector_state(r: &mut Report, settings: &Settings) {
    let cfg = &settings.detect;
    if !cfg.enabled {
        return;
    }
    // A dangling link exists too: the sidecar refuses it, so check must not skip it.
    if std::fs::symlink_metadata(&cfg.state_file).is_err() {
        return writable_folder(r, "detect.state_file", &cfg.state_file);
    }
    let what = format!("detect.state_file {}", shown(&cfg.state_file));
    match crate::detection::load_state(cfg) {
        Ok(_) => r.push(Level::Ok, what, "loads"),
        Err(e) => r.push(Level::Error, what, e.to_string()),
    }
}

fn mfa(r: &mut Report, settings: &Settings, policy: &Policy) {
    if policy.mfa_groups().is_empty() {
        return;
    }
    let m = &settings.mfa;
    let what = format!("mfa.secrets {}", shown(&m.secrets));
    secret_mode(r, &what, &m.secrets);
    match crate::mfa::SecretStore::load(&m.secrets) {
        Ok(store) if store.list().is_empty() => r.push(
            Level::Warning,
            what,
            "no operator is enrolled: every session an mfa(..) rule covers will be refused; `eastwall mfa enroll`",
        ),
        Ok(store) => r.push(
            Level::Ok,
            what,
            format!("{} operator(s) enrolled", store.list().len()),
        ),
        Err(e) => r.push(Level::Error, what, e.to_string()),
    }
    let what = format!("mfa.token_key {}", shown(&m.token_key));
    if m.token_key.exists() {
        let before = r.findings.len();
        secret_mode(r, &what, &m.token_key);
        if r.findings.len() == before {
            r.push(Level::Ok, what, "private");
        }
    } else {
        writable_folder(r, "mfa.token_key", &m.token_key);
    }
}

async fn upstream(r: &mut Report, settings: &Settings) {
    let u = &settings.upstream;
    if let UpstreamLogin::Password { user_secrets } = &u.login {
        if let Err(e) = user_secrets.read() {
            r.push(Level::Error, "upstream.password", e.to_string());
        }
    }
    if u.login == UpstreamLogin::Trust {
        match private_socket(&u.target) {
            Some(how) => r.push(
                Level::Ok,
                "upstream.login trust",
                format!("over a socket others cannot open ({how}): PostgreSQL's own peer check decides who logs in"),
            ),
            None => r.push(
                Level::Warning,
                "upstream.login trust",
                "PostgreSQL must trust only the proxy: a pg_hba `trust` line for 127.0.0.1 or the socket lets every local OS user become any role, superusers included, skipping the policy and MFA; prefer cert or password, or a socket only the proxy's group can open (docs/production.md)",
            ),
        }
    }
    let up = match crate::upstream::Upstream::new(u) {
        Ok(up) => up,
        Err(e) => return r.push(Level::Error, "upstream", e.to_string()),
    };
    let what = format!("upstream {}", up.describe());
    if let Err(e) = up.reachable().await {
        return r.push(Level::Error, what, e.to_string());
    }
    let Some(role) = &u.check_role else {
        return r.push(
            Level::Ok,
            what,
            "reachable (set [upstream] check_role to have the login itself checked)",
        );
    };
    match up.login(role, "postgres", &[]).await {
        Ok(_) => r.push(
            Level::Ok,
            what,
            format!("reachable; logged in as check_role {role:?}"),
        ),
        Err(crate::upstream::UpstreamError::Rejected { fields, .. }) => r.push(
            Level::Error,
            what,
            format!(
                "refused the login as check_role {role:?}: {} ({}); check pg_hba.conf and the role",
                fields.message.unwrap_or_default(),
                fields.code.unwrap_or_default()
            ),
        ),
        Err(e) => r.push(Level::Error, what, e.to_string()),
    }
}

/// For a Unix-socket upstream whose socket (or its folder) others cannot reach: how.
/// Then only the proxy's user or group gets to PostgreSQL's `peer` check at all.
fn private_socket(target: &eastwall_config::UpstreamTarget) -> Option<String> {
    let eastwall_config::UpstreamTarget::Unix { dir, port } = target else {
        return None;
    };
    let socket = dir.join(format!(".s.PGSQL.{port}"));
    let socket_mode = std::fs::metadata(&socket).ok()?.mode() & 0o777;
    let dir_mode = std::fs::metadata(dir).ok()?.mode() & 0o777;
    if socket_mode & 0o007 == 0 {
        Some(format!("socket mode {socket_mode:o}"))
    } else if dir_mode & 0o001 == 0 {
        Some(format!("folder mode {dir_mode:o}"))
    } else {
        None
    }
}
