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
