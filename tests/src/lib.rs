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
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

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
    let (client, connection) = config.connect(MakeRustlsConnect::new(tls)).await?;
    tokio::spawn(async move {
        // The error, if any, surfaces to the test through the client's next call.
        let _ = connection.await;
    });
    Ok(client)
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
