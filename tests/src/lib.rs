//! Shared helpers for the end-to-end suite: private PostgreSQL clusters, a test PKI minted by
//! our own CA, and tokio-postgres clients over rustls.
//!
//! Every helper owns its temp dirs and ports, so tests run in parallel threads without
//! stepping on each other.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use eastwall_ca::{Ca, IssueRequest, SpiffeId, TrustDomain};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

pub mod nats;
pub mod sidecar;

pub use eastwall::pgcluster::{Cluster, ClusterError, ClusterOptions, ServerTls};

/// How long a test client waits for a TCP connection before failing instead of hanging.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts describing a private cluster: `pg().tls(..).hba("hostssl all all 127.0.0.1/32 cert").start()`.
pub fn pg() -> Pg {
    Pg::default()
}

/// Builder for [`ClusterOptions`]; see [`pg`].
#[derive(Debug, Clone, Default)]
pub struct Pg {
    opts: ClusterOptions,
}

impl Pg {
    /// Serve TLS with these files.
    pub fn tls(mut self, tls: ServerTls) -> Self {
        self.opts.tls = Some(tls);
        self
    }

    /// Adds one pg_hba.conf line; the first call replaces the trust-everything default.
    pub fn hba(mut self, line: impl Into<String>) -> Self {
        self.opts.hba.push(line.into());
        self
    }

    /// Adds one postgresql.conf setting.
    pub fn setting(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.opts.settings.push((key.into(), value.into()));
        self
    }

    /// Gives the `postgres` superuser a password (stored as a SCRAM verifier).
    pub fn superuser_password(mut self, password: impl Into<String>) -> Self {
        self.opts.superuser_password = Some(password.into());
        self
    }

    /// The options as built, for callers that start the cluster themselves.
    pub fn options(self) -> ClusterOptions {
        self.opts
    }

    /// initdb + start; blocks until the server accepts connections.
    /// The error's `Debug` is its message plus the server log tail, readable in a panic.
    pub fn start(self) -> anyhow::Result<Cluster> {
        Ok(Cluster::start(self.opts)?)
    }
}

/// A certificate and key, as PEM text and as files (for psql/libpq and `--cert` flags).
#[derive(Debug, Clone)]
pub struct Identity {
    /// Leaf then chain.
    pub cert_pem: String,
    /// The private key.
    pub key_pem: String,
    /// Where `cert_pem` is on disk.
    pub cert_path: PathBuf,
    /// Where `key_pem` is on disk (mode 0600).
    pub key_path: PathBuf,
}

/// A throwaway CA of ours in a temp dir; issues identities for servers and clients.
pub struct TestPki {
    ca: Ca,
    trust_domain: TrustDomain,
    dir: tempfile::TempDir,
}

impl TestPki {
    /// `eastwall ca init` in a fresh temp dir for `trust_domain` (e.g. `corp.example`).
    pub fn new(trust_domain: &str) -> anyhow::Result<TestPki> {
        let dir = tempfile::Builder::new()
            .prefix("eastwall-pki-")
            .tempdir()
            .context("creating a temp dir for the test CA")?;
        let trust_domain = TrustDomain::parse(trust_domain)?;
        let ca = Ca::init(
            &dir.path().join("ca"),
            &trust_domain,
            Duration::from_secs(24 * 3600),
            false,
        )?;
        Ok(TestPki {
            ca,
            trust_domain,
            dir,
        })
    }

    /// The CA directory (`ca.pem`, `ca.key`, `crl.pem` …).
    pub fn ca_dir(&self) -> &std::path::Path {
        self.ca.dir()
    }

    /// The trust bundle, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.bundle_pem().to_owned()
    }

    /// The CA's current signed CRL, PEM (present from `init` on; re-signed by every revoke).
    pub fn crl_pem(&self) -> anyhow::Result<String> {
        let path = self.ca.crl_path();
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// The underlying CA, for tests that revoke or inspect.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// `spiffe://<trust domain>/<path>`.
    pub fn spiffe_id(&self, path: &str) -> anyhow::Result<SpiffeId> {
        Ok(SpiffeId::parse(&format!(
            "spiffe://{}/{}",
            self.trust_domain.as_str(),
            path.trim_start_matches('/')
        ))?)
    }

    /// Issues and writes `<tmp>/<name>.pem` + `.key`, as `eastwall ca issue --out` does.
    pub fn issue(&self, name: &str, request: &IssueRequest) -> anyhow::Result<Identity> {
        let issued = self.ca.issue(request)?;
        let (cert_path, key_path) = issued.write(&self.dir.path().join(name))?;
        let key_path = key_path.ok_or_else(|| anyhow!("no key was written for {name}"))?;
        let key_pem = issued
            .key_pem
            .ok_or_else(|| anyhow!("no key was issued for {name}"))?;
        Ok(Identity {
            cert_pem: issued.cert_pem,
            key_pem,
            cert_path,
            key_path,
        })
    }

    /// A server identity for `localhost` / `127.0.0.1` (serverAuth + clientAuth).
    pub fn server(&self, name: &str, spiffe_path: &str) -> anyhow::Result<Identity> {
        let mut request = IssueRequest::new(self.spiffe_id(spiffe_path)?);
        request.dns = vec!["localhost".to_owned()];
        request.ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
        self.issue(name, &request)
    }

    /// A client identity; `common_name` is what PostgreSQL `cert` auth matches to the role.
    pub fn client(
        &self,
        name: &str,
        spiffe_path: &str,
        common_name: Option<&str>,
    ) -> anyhow::Result<Identity> {
        let mut request = IssueRequest::new(self.spiffe_id(spiffe_path)?);
        request.common_name = common_name.map(str::to_owned);
        self.issue(name, &request)
    }

    /// PostgreSQL's TLS files: this server identity, trusting this CA for client certs.
    pub fn server_tls(&self, server: &Identity) -> ServerTls {
        ServerTls {
            cert_pem: server.cert_pem.clone(),
            key_pem: server.key_pem.clone(),
            ca_pem: self.ca_pem(),
            crl_pem: None,
        }
    }
}

/// A rustls client config that trusts `ca_pem` and, if given, presents `client` (cert chain
/// PEM, key PEM). Server names are verified (the equivalent of libpq `verify-full`).
pub fn client_config(
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("parsing the CA PEM")?)?;
    }
    if roots.is_empty() {
        return Err(anyhow!("the CA PEM holds no certificate"));
    }
    // An explicit provider: no dependence on which crypto features other crates turned on.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .context("parsing the client certificate PEM")?;
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                .context("parsing the client key PEM")?;
            builder.with_client_auth_cert(chain, key)?
        }
    };
    Ok(config)
}

/// A tokio-postgres config for `host:port`. `localhost` is pinned to 127.0.0.1 (clusters
/// listen on IPv4 loopback only) while the name is still what TLS verifies.
pub fn pg_config(host: &str, port: u16, user: &str, db: &str) -> Config {
    let mut config = Config::new();
    config
        .host(host)
        .port(port)
        .user(user)
        .dbname(db)
        .connect_timeout(CONNECT_TIMEOUT);
    if host == "localhost" {
        config.hostaddr(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    config
}

/// Connects over TLS (required, verified by `tls`) and drives the connection in a task.
pub async fn connect_tls(
    host: &str,
    port: u16,
    user: &str,
    db: &str,
    tls: rustls::ClientConfig,
) -> Result<Client, tokio_postgres::Error> {
    let mut config = pg_config(host, port, user, db);
    config.ssl_mode(SslMode::Require);
    connect_with(&config, tls).await
}

/// Connects with a caller-built config over rustls and drives the connection in a task.
pub async fn connect_with(
    config: &Config,
    tls: rustls::ClientConfig,
) -> Result<Client, tokio_postgres::Error> {
    Ok(connect_watching(config, tls).await?.0)
}

/// As [`connect_with`], also handing back the connection task. A FATAL the server sends while
/// the client is idle (a session the proxy ends) is reported there, not by the next query,
/// which sees only a closed connection.
pub async fn connect_watching(
    config: &Config,
    tls: rustls::ClientConfig,
) -> Result<
    (
        Client,
        tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    ),
    tokio_postgres::Error,
> {
    let (client, connection) = config.connect(MakeRustlsConnect::new(tls)).await?;
    Ok((client, tokio::spawn(connection)))
}

/// Connects without TLS, with an optional password (SCRAM or cleartext, as the server asks).
pub async fn connect_plain(
    host: &str,
    port: u16,
    user: &str,
    db: &str,
    password: Option<&str>,
) -> Result<Client, tokio_postgres::Error> {
    let mut config = pg_config(host, port, user, db);
    config.ssl_mode(SslMode::Disable);
    if let Some(password) = password {
        config.password(password);
    }
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// True when nothing accepts TCP connections on 127.0.0.1:`port` any more.
pub fn port_refuses(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(2),
    )
    .is_err()
}

/// The `eastwall` binary, built once per test process. The e2e crate cannot name another
/// package's binary through `CARGO_BIN_EXE_*`, so it asks cargo, which is a no-op when the
/// binary is fresh. Blocking: call it before timing anything, or from `spawn_blocking`.
pub fn eastwall_bin() -> anyhow::Result<PathBuf> {
    static BIN: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "eastwall", "--bin", "eastwall"])
            .current_dir(&workspace)
            .status()
            .map_err(|e| format!("running cargo build: {e}"))?;
        if !status.success() {
            return Err(format!(
                "cargo build -p eastwall --bin eastwall failed: {status}"
            ));
        }
        // A relative CARGO_TARGET_DIR is relative to where cargo ran: the workspace.
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .map(|t| {
                if t.is_relative() {
                    workspace.join(t)
                } else {
                    t
                }
            })
            .unwrap_or_else(|| workspace.join("target"));
        let bin = target.join("debug/eastwall");
        if !bin.is_file() {
            return Err(format!(
                "built eastwall but {} does not exist",
                bin.display()
            ));
        }
        Ok(bin)
    })
    .clone()
    .map_err(|e| anyhow!(e))
}
