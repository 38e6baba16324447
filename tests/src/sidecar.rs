//! A whole Eastwall deployment per test: a private PostgreSQL cluster, a `quickstart` layout
//! pointed at it, and the sidecar running in-process on a free port.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{anyhow, Context};
use eastwall::pgcluster::Cluster;
use eastwall::quickstart::{self, Layout, UpstreamAuth};
use eastwall::server::Running;
use serde_json::Value;
use tempfile::TempDir;
use tokio_postgres::config::SslMode;
use tokio_postgres::Client;

use crate::{client_config, connect_with, pg_config};

/// Roles the sample identities log in as upstream; `finance-laptop` exists so that its
/// refusal is the policy's doing, not a missing role.
pub const SAMPLE_ROLES: &[&str] = &["billing", "alice", "finance-laptop"];

/// A change to eastwall.toml's text, applied before the sidecar loads it.
pub type ConfigEdit = Box<dyn FnOnce(&mut String) + Send>;

/// How to build a deployment.
pub struct SidecarOptions {
    pub upstream_auth: UpstreamAuth,
    /// Edits eastwall.toml before the sidecar loads it (e.g. to add `[limits]`).
    pub edit_config: Option<ConfigEdit>,
    /// Start the HTTPS step-up endpoint on a free port.
    pub stepup: bool,
}

impl Default for SidecarOptions {
    fn default() -> Self {
        Self {
            upstream_auth: UpstreamAuth::Trust,
            edit_config: None,
            stepup: true,
        }
    }
}

/// A running deployment. Dropping it stops the sidecar's tasks with the test runtime and the
/// cluster with its own Drop.
pub struct Deployment {
    pub cluster: Cluster,
    pub layout: Layout,
    pub proxy: Running,
    /// Owns the layout folder.
    pub dir: TempDir,
}

impl Deployment {
    /// Starts PostgreSQL, lays out the sidecar with `quickstart`, and starts it.
    pub async fn start(opts: SidecarOptions) -> anyhow::Result<Deployment> {
        let mut pg = crate::pg();
        if opts.upstream_auth == UpstreamAuth::Password {
            pg = pg
                .hba("local all all trust")
                .hba("host all all 127.0.0.1/32 scram-sha-256");
        }
        let dir = tempfile::Builder::new().prefix("eastwall-e2e-").tempdir()?;
        let layout_dir = dir.path().join("sidecar");
        let upstream_auth = opts.upstream_auth;
        let mut qs = quickstart::Options::new(layout_dir, String::new());
        qs.listen = "127.0.0.1:0".parse()?;
        qs.stepup_listen = opts.stepup.then(|| "127.0.0.1:0".parse()).transpose()?;
        qs.admin_listen = Some("127.0.0.1:0".parse()?);
        qs.upstream_auth = upstream_auth;

        // Cert login needs the cluster to trust our CA and serve a certificate from it, so the
        // layout (with its CA) comes first and the cluster is configured from it.
        let cluster = if upstream_auth == UpstreamAuth::Cert {
            qs.upstream = "127.0.0.1:1".into();
            let layout = quickstart::quickstart(&qs)?;
            let ca = eastwall_ca::Ca::open(&layout.dir.join("ca"))?;
            let mut req = eastwall_ca::IssueRequest::new(eastwall_ca::SpiffeId::parse(
                "spiffe://corp.example/db/postgres",
            )?);
            req.dns = vec!["localhost".into()];
            req.ips = vec!["127.0.0.1".parse()?];
            let server = ca.issue(&req)?;
            let tls = eastwall::pgcluster::ServerTls {
                cert_pem: server.cert_pem.clone(),
                key_pem: server.key_pem.clone().unwrap_or_default(),
                ca_pem: ca.bundle_pem().to_owned(),
                crl_pem: None,
            };
            let cluster = pg
                .tls(tls)
                .hba("local all all trust")
                .hba("hostssl all all 127.0.0.1/32 cert")
                .start()?;
            // Point the layout at the real port now that the cluster has one.
            let config_path = layout.config.clone();
            let text = std::fs::read_to_string(&config_path)?
                .replace("127.0.0.1:1\"", &format!("127.0.0.1:{}\"", cluster.port()));
            std::fs::write(&config_path, text)?;
            create_roles(&cluster, None)?;
            return Self::finish(cluster, layout, dir, opts.edit_config).await;
        } else {
            pg.start()?
        };
        qs.upstream = format!("127.0.0.1:{}", cluster.port());
        let layout = quickstart::quickstart(&qs)?;
        create_roles(&cluster, layout.upstream_password.as_deref())?;
        Self::finish(cluster, layout, dir, opts.edit_config).await
    }

    async fn finish(
        cluster: Cluster,
        layout: Layout,
        dir: TempDir,
        edit: Option<ConfigEdit>,
    ) -> anyhow::Result<Deployment> {
        if let Some(edit) = edit {
            let mut text = std::fs::read_to_string(&layout.config)?;
            edit(&mut text);
            std::fs::write(&layout.config, text)?;
        }
        let config = eastwall_config::Config::load(&layout.config)
            .map_err(|e| anyhow!("{}", e.lines().join("\n")))?;
        let proxy = eastwall::server::start(config).await?;
        Ok(Deployment {
            cluster,
            layout,
            proxy,
            dir,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.proxy.local_addr
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(&self.layout.ca_cert).unwrap_or_default()
    }

    /// Certificate and key PEM of a sample identity (`billing`, `finance-laptop`, `alice`).
    pub fn identity_pem(&self, name: &str) -> anyhow::Result<(String, String)> {
        let who = self
            .layout
            .identity(name)
            .ok_or_else(|| anyhow!("no sample identity {name}"))?;
        Ok((
            std::fs::read_to_string(&who.cert)?,
            std::fs::read_to_string(&who.key)?,
        ))
    }

    /// A rustls client config presenting `name`'s certificate (verify-full against our CA).
    pub fn tls_for(&self, name: &str) -> anyhow::Result<rustls::ClientConfig> {
        let (cert, key) = self.identity_pem(name)?;
        client_config(&self.ca_pem(), Some((&cert, &key)))
    }

    /// A tokio-postgres config for the proxy: host `localhost` (what the proxy cert names).
    pub fn pg_config(&self, user: &str, db: &str) -> tokio_postgres::Config {
        let mut config = pg_config("localhost", self.addr().port(), user, db);
        config.ssl_mode(SslMode::Require);
        config
    }

    /// Connects through the proxy as `name`, asking for `role`.
    pub async fn connect(&self, name: &str, role: &str) -> Result<Client, tokio_postgres::Error> {
        let tls = self.tls_for(name).expect("a sample identity");
        connect_with(&self.pg_config(role, "postgres"), tls).await
    }

    /// As [`Deployment::connect`], also handing back the connection task, where a FATAL sent
    /// to an idle client is reported.
    pub async fn connect_watching(
        &self,
        name: &str,
        role: &str,
    ) -> Result<
        (
            Client,
            tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
        ),
        tokio_postgres::Error,
    > {
        let tls = self.tls_for(name).expect("a sample identity");
        crate::connect_watching(&self.pg_config(role, "postgres"), tls).await
    }

    /// Connects as `name`/`role` with a password (an MFA code or a step-up token).
    pub async fn connect_with_password(
        &self,
        name: &str,
        role: &str,
        password: &str,
    ) -> Result<Client, tokio_postgres::Error> {
        let tls = self.tls_for(name).expect("a sample identity");
        let mut config = self.pg_config(role, "postgres");
        config.password(password);
        connect_with(&config, tls).await
    }

    /// libpq connection string for psql/pgbench as `name` asking for `role`.
    pub fn conninfo(&self, name: &str, role: &str, db: &str) -> String {
        let who = self.layout.identity(name);
        let (cert, key) = who
            .map(|w| (w.cert.display().to_string(), w.key.display().to_string()))
            .unwrap_or_default();
        format!(
            "host=localhost hostaddr=127.0.0.1 port={} user={role} dbname={db} sslmode=verify-full sslrootcert={} sslcert={cert} sslkey={key}",
            self.addr().port(),
            self.layout.ca_cert.display(),
        )
    }

    /// alice's TOTP code at `t` (what her authenticator app shows).
    pub fn alice_code(&self, t: SystemTime) -> String {
        eastwall::mfa::totp::code_from_base32(&self.layout.alice_totp_b32, t).unwrap_or_default()
    }

    pub fn decision_log(&self) -> PathBuf {
        self.layout.dir.join("decisions.log")
    }

    /// Every decision line so far, parsed.
    pub fn decisions(&self) -> anyhow::Result<Vec<Value>> {
        read_decisions(&self.decision_log())
    }

    /// Waits (bounded) until a decision line matching `pred` appears, and returns it.
    pub async fn wait_for_decision(&self, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let mut lines = self.wait_for_decisions(1, pred).await?;
        Ok(lines.swap_remove(0))
    }

    /// Waits (bounded) until at least `count` decision lines match `pred`, and returns them
    /// all. Waiting for the first match `count` times would return the same line each time.
    pub async fn wait_for_decisions(
        &self,
        count: usize,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Vec<Value>> {
        for _ in 0..100 {
            let found: Vec<Value> = self.decisions()?.into_iter().filter(|l| pred(l)).collect();
            if found.len() >= count.max(1) {
                return Ok(found);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Err(anyhow!(
            "fewer than {count} matching decision lines after 5 s; log:\n{}",
            std::fs::read_to_string(self.decision_log()).unwrap_or_default()
        ))
    }
}

/// Parses a decision log into JSON values, one per line.
pub fn read_decisions(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // A line still being written (no newline yet) is not a line: the writer appends one
    // line per write, and a read can land between its first bytes and its end.
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    whole
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad decision line {l}")))
        .collect()
}

fn create_roles(cluster: &Cluster, password: Option<&str>) -> anyhow::Result<()> {
    for role in SAMPLE_ROLES {
        let sql = match password {
            Some(pw) => format!("CREATE ROLE \"{role}\" LOGIN PASSWORD '{pw}'"),
            None => format!("CREATE ROLE \"{role}\" LOGIN"),
        };
        cluster.run_sql(&sql)?;
    }
    Ok(())
}
