//! `eastwall quickstart`: lays out a complete, working sidecar in one folder — a CA, the
//! proxy's server certificate, the seed's sample identities, the seed's policy, a config,
//! and a TOTP enrollment for the sample operator.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use eastwall_ca::{Ca, CaError, IssueRequest, SpiffeId, TrustDomain};

use crate::mfa::{MfaError, SecretStore};

/// The seed's policy block, verbatim: the policy every quickstart starts from.
pub const SEED_POLICY: &str = "\
# Zero-trust east-west policy — deny by default, allow only named flows.
default action = DENY # no host talks to another unless allowed
allow:
from: segment(\"app\") # app tier only
to: segment(\"db\") :5432 # reach the database on its one port
require:
- mtls(service_identity) # unique per-service cert, not a shared cred
- mfa(human_operators) # admins step up before any DB shell
deny (and alert):
from: segment(\"workstations\") # laptops never reach prod directly
to: segment(\"db\")
to: segment(\"domain\") # and never reach the domain controller
";

/// How long quickstart's sample certificates live: long enough to try things by hand.
const SAMPLE_TTL: Duration = Duration::from_secs(24 * 3600);
/// The proxy's server certificate outlives the samples; rotate it with `ca issue`.
const PROXY_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// How the proxy logs in to PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UpstreamAuth {
    Trust,
    Password,
    Cert,
}

/// What to lay out.
#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    /// `HOST:PORT` over TCP, or `/socket/dir:PORT` for a Unix socket.
    pub upstream: String,
    pub listen: SocketAddr,
    pub upstream_auth: UpstreamAuth,
    pub trust_domain: TrustDomain,
    pub stepup_listen: Option<SocketAddr>,
    /// `[admin] listen`: `/healthz`, `/readyz`, `/metrics`; None writes `"off"`.
    pub admin_listen: Option<SocketAddr>,
}

impl Options {
    pub fn new(dir: PathBuf, upstream: String) -> Self {
        Self {
            dir,
            upstream,
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5432),
            upstream_auth: UpstreamAuth::Trust,
            trust_domain: TrustDomain::parse("corp.example").unwrap_or_else(|_| unreachable!()),
            stepup_listen: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8443)),
            admin_listen: Some(eastwall_config::DEFAULT_ADMIN_LISTEN),
        }
    }
}

/// Why quickstart could not lay out the folder.
#[derive(Debug, thiserror::Error)]
pub enum QuickstartError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Mfa(#[from] MfaError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} already holds an Eastwall layout (eastwall.toml); pick an empty folder")]
    Exists(PathBuf),
    #[error("--upstream {0:?} is not HOST:PORT (or /socket/dir:PORT)")]
    Upstream(String),
}

/// A sample identity quickstart issues.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: &'static str,
    pub id: SpiffeId,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What quickstart wrote.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub ca_cert: PathBuf,
    pub identities: Vec<Identity>,
    /// The sample operator's TOTP secret (base32), also in `mfa/alice.totp`.
    pub alice_totp_b32: String,
    /// Roles the upstream PostgreSQL needs (and, for `cert` login, the certificates for them).
    pub roles: Vec<&'static str>,
    /// For `password` login: the generated secret PostgreSQL's roles must have.
    pub upstream_password: Option<String>,
}

impl Layout {
    pub fn identity(&self, name: &str) -> Option<&Identity> {
        self.identities.iter().find(|i| i.name == name)
    }
}

/// Lays out a sidecar in `opts.dir`.
pub fn quickstart(opts: &Options) -> Result<Layout, QuickstartError> {
    let dir = &opts.dir;
    let config_path = dir.join("eastwall.toml");
    if config_path.exists() {
        return Err(QuickstartError::Exists(dir.clone()));
    }
    let (upstream_host, upstream_port) = opts
        .upstream
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .filter(|(h, _)| !h.is_empty())
        .ok_or_else(|| QuickstartError::Upstream(opts.upstream.clone()))?;
    mkdir(dir)?;
    mkdir(&dir.join("certs"))?;
    mkdir(&dir.join("mfa"))?;

    let td = &opts.trust_domain;
    let ca = Ca::init(&dir.join("ca"), td, eastwall_ca::DEFAULT_CA_TTL, false)?;
    let id = |path: &str| {
        SpiffeId::parse(&format!("spiffe://{td}/{path}")).map_err(|e| QuickstartError::Ca(e.into()))
    };

    let mut proxy = IssueRequest::new(id("db/eastwall-proxy")?);
    proxy.ttl = PROXY_TTL;
    proxy.dns = vec!["localhost".into()];
    proxy.ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    ca.issue(&proxy)?.write(&dir.join("certs/proxy"))?;

    let mut identities = Vec::new();
    for (name, path) in [
        ("billing", "app/billing"),
        ("finance-laptop", "workstations/finance-laptop"),
        ("alice", "app/operators/alice"),
    ] {
        let mut req = IssueRequest::new(id(path)?);
        req.ttl = SAMPLE_TTL;
        let (cert, key) = ca.issue(&req)?.write(&dir.join("certs").join(name))?;
        identities.push(Identity {
            name,
            id: req.id,
            cert,
            key: key.unwrap_or_default(),
        });
    }

    let roles = vec!["billing", "alice"];
    let mut upstream_password = None;
    let login = match opts.upstream_auth {
        UpstreamAuth::Trust => "login = \"trust\"\n".to_owned(),
        UpstreamAuth::Password => {
            let secret = hex::encode(rand::random::<[u8; 24]>());
            eastwall_ca::write_private(
                &dir.join("upstream.secret"),
                format!("{secret}\n").as_bytes(),
            )?;
            upstream_password = Some(secret);
            "login = \"password\"\npassword_file = \"upstream.secret\"\n".to_owned()
        }
        UpstreamAuth::Cert => {
            mkdir(&dir.join("certs/upstream"))?;
            for role in &roles {
                let mut req = IssueRequest::new(id(&format!("db/eastwall-upstream/{role}"))?);
                req.common_name = Some((*role).to_owned());
                req.ttl = PROXY_TTL;
                ca.issue(&req)?
                    .write(&dir.join("certs/upstream").join(role))?;
            }
            "login = \"cert\"\ncert_dir = \"certs/upstream\"\nca = \"ca/ca.pem\"\nserver_name = \"localhost\"\n"
                .to_owned()
        }
    };
    let target = if upstream_host.starts_with('/') {
        format!("socket_dir = {:?}\nport = {upstream_port}\n", upstream_host)
    } else {
        format!("address = {:?}\n", opts.upstream)
    };

    let mut toml = String::new();
    let _ = write!(
        toml,
        "# Eastwall sidecar settings, written by `eastwall quickstart`.\n\
         trust_domain = \"{td}\"\n\
         guards = \"db\"\n\
         service_port = 5432\n\n\
         [listen]\n\
         address = \"{listen}\"\n\
         cert = \"certs/proxy.pem\"\n\
         key = \"certs/proxy.key\"\n\
         client_ca = \"ca/ca.pem\"\n\
         crl = \"ca/crl.pem\"\n\n\
         [upstream]\n{target}{login}\n\
         [segments]\n\
         app = [\"spiffe://{td}/app/**\"]\n\
         workstations = [\"spiffe://{td}/workstations/**\"]\n\
         db = [\"spiffe://{td}/db/**\"]\n\
         domain = [\"spiffe://{td}/domain/**\"]\n\n\
         [groups]\n\
         human_operators = [\"spiffe://{td}/app/operators/*\"]\n\n\
         [policy]\n\
         file = \"policy.ew\"\n\n\
         [mfa]\n\
         secrets = \"mfa/secrets.json\"\n\
         token_key = \"mfa/token.key\"\n\
         max_age = \"5m\"\n{stepup}\n\
         [audit]\n\
         path = \"decisions.log\"\n\n\
         [admin]\n\
         listen = \"{admin}\"\n",
        listen = opts.listen,
        admin = opts
            .admin_listen
            .map_or_else(|| "off".to_owned(), |a| a.to_string()),
        stepup = opts
            .stepup_listen
            .map(|a| format!("stepup_listen = \"{a}\"\n"))
            .unwrap_or_default(),
    );
    write_file(&dir.join("policy.ew"), SEED_POLICY)?;
    write_file(&config_path, &toml)?;

    let alice = id("app/operators/alice")?;
    let enrollment = SecretStore::enroll(&dir.join("mfa/secrets.json"), &alice, false)?;
    eastwall_ca::write_private(
        &dir.join("mfa/alice.totp"),
        format!("{}\n", enrollment.secret_b32).as_bytes(),
    )?;

    Ok(Layout {
        dir: dir.clone(),
        config: config_path,
        ca_cert: ca.cert_path(),
        identities,
        alice_totp_b32: enrollment.secret_b32,
        roles,
        upstream_password,
    })
}

fn mkdir(path: &Path) -> Result<(), QuickstartError> {
    std::fs::create_dir_all(path).map_err(|source| QuickstartError::Write {
        path: path.to_owned(),
        source,
    })
}

fn write_file(path: &Path, text: &str) -> Result<(), QuickstartError> {
    std::fs::write(path, text).map_err(|source| QuickstartError::Write {
        path: path.to_owned(),
        source,
    })
}

/// What PostgreSQL's `pg_hba.conf` (and, for a socket, `pg_ident.conf`) needs for the upstream
/// login quickstart chose, and a warning when that choice lets others around the sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgHba {
    /// `pg_hba.conf` lines, first match wins: put them above any broader line.
    pub hba: Vec<String>,
    /// `pg_ident.conf` lines of the `eastwall` map: the sidecar's OS user to each role.
    pub ident: Vec<String>,
    /// One line for a login that costs the wall something (`trust` over TCP).
    pub warning: Option<String>,
    /// A `postgresql.conf` note for the mode (the socket's group, or `ssl_ca_file`).
    pub server_conf: Vec<String>,
}

/// The `pg_hba.conf` lines for `upstream` (`HOST:PORT` or `/socket/dir:PORT`) and `auth`, the
/// sidecar running as the OS user `os_user` and logging in as `roles`.
///
/// `trust` over a socket becomes `peer` with a map naming exactly `roles` for `os_user`:
/// PostgreSQL then checks the connecting process itself, so no other local user gets in.
/// `trust` over TCP has no safe form: PostgreSQL cannot tell who is on the other end of a
/// loopback connection, so it comes with a warning.
pub fn pg_hba(upstream: &str, auth: UpstreamAuth, os_user: &str, roles: &[&str]) -> PgHba {
    let host = upstream
        .rsplit_once(':')
        .map_or(upstream, |(h, _)| h)
        .trim_matches(['[', ']']);
    let socket = host.starts_with('/');
    let cidr = match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => format!("{a}/32"),
        Ok(IpAddr::V6(a)) => format!("{a}/128"),
        // A name (localhost): the sidecar's loopback address.
        Err(_) => "127.0.0.1/32".to_owned(),
    };
    let hba_line = |kind: &str, addr: &str, method: &str| {
        if addr.is_empty() {
            format!("{kind:<8}all  all  {method}")
        } else {
            format!("{kind:<8}all  all  {addr:<15} {method}")
        }
    };
    let mut out = PgHba {
        hba: Vec::new(),
        ident: Vec::new(),
        warning: None,
        server_conf: Vec::new(),
    };
    match (auth, socket) {
        (UpstreamAuth::Trust, true) => {
            out.hba.push(hba_line("local", "", "peer map=eastwall"));
            out.ident = roles
                .iter()
                .map(|role| format!("eastwall  {os_user}  {role}"))
                .collect();
            out.server_conf = vec![
                format!("unix_socket_directories = '{host}'   # a folder only postgres and the sidecar's group can enter"),
                // The sidecar's user's own group, as `useradd --user-group` makes it.
                format!("unix_socket_group = '{os_user}'"),
                "unix_socket_permissions = 0770".to_owned(),
            ];
        }
        (UpstreamAuth::Trust, false) => {
            out.hba.push(hba_line("host", &cidr, "trust"));
            out.warning = Some(format!(
                "`trust` over TCP lets every local OS user, not only this sidecar, connect to PostgreSQL on {cidr} as any role, superusers included, around the sidecar's policy and MFA; use --upstream /socket/dir:PORT (peer with a map), or --upstream-auth password|cert (docs/production.md)"
            ));
        }
        (UpstreamAuth::Password, true) => out.hba.push(hba_line("local", "", "scram-sha-256")),
        (UpstreamAuth::Password, false) => out.hba.push(hba_line("host", &cidr, "scram-sha-256")),
        (UpstreamAuth::Cert, _) => {
            out.hba.push(hba_line("hostssl", &cidr, "cert"));
            out.server_conf = vec![
                "ssl = on".to_owned(),
                "ssl_ca_file = '<this folder>/ca/ca.pem'   # the Eastwall CA: certificates with CN = role".to_owned(),
            ];
        }
    }
    out
}

/// The OS user this process runs as (who `eastwall proxy` will run as, if started the same way).
pub fn current_os_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map_or_else(|| "eastwall".to_owned(), |u| u.name)
}

/// The psql command line that connects as a sample identity through the proxy.
pub fn psql_command(layout: &Layout, who: &Identity, listen: SocketAddr, role: &str) -> String {
    format!(
        "psql \"host=localhost port={port} user={role} dbname=postgres sslmode=verify-full sslrootcert={ca} sslcert={cert} sslkey={key}\"",
        port = listen.port(),
        ca = layout.ca_cert.display(),
        cert = who.cert.display(),
        key = who.key.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_over_a_socket_is_peer_with_one_map_line_per_role() {
        let got = pg_hba(
            "/var/lib/postgresql/eastwall-sock:5432",
            UpstreamAuth::Trust,
            "eastwall",
            &["billing", "alice"],
        );
        assert_eq!(got.hba, vec!["local   all  all  peer map=eastwall"]);
        assert_eq!(
            got.ident,
            vec!["eastwall  eastwall  billing", "eastwall  eastwall  alice"]
        );
        assert!(got.warning.is_none());
        assert!(got
            .server_conf
            .iter()
            .any(|l| l.starts_with("unix_socket_group = 'eastwall'")));
    }

    #[test]
    fn trust_over_tcp_is_warned_about() {
        let got = pg_hba("127.0.0.1:5433", UpstreamAuth::Trust, "me", &["billing"]);
        assert_eq!(got.hba, vec!["host    all  all  127.0.0.1/32    trust"]);
        let warning = got.warning.expect("a warning");
        assert!(warning.contains("every local OS user"), "{warning}");
        assert!(warning.contains("superusers included"), "{warning}");
    }

    #[test]
    fn password_and_cert_name_the_upstream_address() {
        let pw = pg_hba("[::1]:5433", UpstreamAuth::Password, "me", &["billing"]);
        assert_eq!(
            pw.hba,
            vec!["host    all  all  ::1/128         scram-sha-256"]
        );
        assert!(pw.warning.is_none());
        let cert = pg_hba("127.0.0.1:5433", UpstreamAuth::Cert, "me", &["billing"]);
        assert_eq!(cert.hba, vec!["hostssl all  all  127.0.0.1/32    cert"]);
        let sock = pg_hba("/run/pg:5432", UpstreamAuth::Password, "me", &["billing"]);
        assert_eq!(sock.hba, vec!["local   all  all  scram-sha-256"]);
    }
}
