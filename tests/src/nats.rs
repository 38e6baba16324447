//! A private `nats-server` with JetStream per test, serving TLS from one of our CAs and
//! requiring client certificates chained to it: the fleet control plane's test double.
//!
//! Eastwall's names (see docs/fleet-nats.md): the key-value bucket `eastwall` (stream
//! `KV_eastwall`, subjects `$KV.eastwall.>`, keys `policy`, `lock.<id>`) and
//! the stream `EASTWALL_LOG` (subjects `eastwall.log.>`, one subject per sidecar). A fresh
//! server has neither; [`Nats::create_eastwall_streams`] makes both (async-nats 0.51's
//! `create_key_value` fails against 2.9, see there), or the code under test does.
//!
//! What nats-server 2.9 does, checked against 2.9.10 (docs/fleet-nats.md has the details):
//! - It sends `INFO {...}` in plain text first and upgrades to TLS after; it has no
//!   `handshake_first` (the config field is refused), so a client must not use TLS-first.
//! - `verify: true` refuses, in the TLS handshake, a client with no certificate, one from
//!   another CA, and one without the clientAuth EKU.
//! - `verify_and_map: true` also names the connection after the certificate: an email SAN,
//!   then a DNS SAN, then the URI SAN (`spiffe://...`), then the subject DN, must be a user in
//!   `authorization.users`, matched exactly; anything else is an `Authorization Violation`.
//!   [`NatsOptions::users`] uses that to give sidecars and operators their permissions.
//!
//! Ports and files are private to each [`Nats`]; only loopback is used.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use eastwall_ca::{Ca, IssueRequest, SpiffeId};

use crate::TestPki;

/// How long [`Nats::start`] and [`Nats::restart`] wait for the server to serve clients.
pub const NATS_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Nats::stop`] waits after SIGTERM before it kills the server.
pub const NATS_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The key-value bucket Eastwall keeps its policy and locks in.
pub const KV_BUCKET: &str = "eastwall";
/// The stream behind [`KV_BUCKET`].
pub const KV_STREAM: &str = "KV_eastwall";
/// The stream of decision lines.
pub const LOG_STREAM: &str = "EASTWALL_LOG";
/// The subjects of [`LOG_STREAM`]; a sidecar publishes on `eastwall.log.<sidecar-name>`.
pub const LOG_SUBJECTS: &str = "eastwall.log.>";

/// What a certificate-mapped user may do (the `authorization` block [`nats_conf`] writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsRole {
    /// A sidecar called `name`: reads the whole bucket (get, watch), publishes its decision
    /// lines on `eastwall.log.<name>` and its chain heads on `eastwall.log.<name>.head`.
    Sidecar { name: String },
    /// An operator: writes `policy` and `lock.*`, reads the bucket and the log, and may create
    /// and update the two streams.
    Operator,
    /// Anything: for tests that want a mapped identity without restrictions.
    Unrestricted,
}

/// A user of the server, named by the URI SAN (the SPIFFE ID) of its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsUser {
    /// `spiffe://<trust domain>/...`, exactly as in the certificate.
    pub spiffe_id: String,
    pub role: NatsRole,
}

impl NatsUser {
    pub fn sidecar(spiffe_id: impl Into<String>, name: impl Into<String>) -> NatsUser {
        NatsUser {
            spiffe_id: spiffe_id.into(),
            role: NatsRole::Sidecar { name: name.into() },
        }
    }

    pub fn operator(spiffe_id: impl Into<String>) -> NatsUser {
        NatsUser {
            spiffe_id: spiffe_id.into(),
            role: NatsRole::Operator,
        }
    }

    pub fn unrestricted(spiffe_id: impl Into<String>) -> NatsUser {
        NatsUser {
            spiffe_id: spiffe_id.into(),
            role: NatsRole::Unrestricted,
        }
    }
}

/// How to start a [`Nats`].
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// Empty: `verify: true`, every certificate from the CA may do anything. Otherwise
    /// `verify_and_map: true` with these users; a certificate from the CA whose SPIFFE ID is
    /// not listed is refused after the handshake (`-ERR 'Authorization Violation'`).
    pub users: Vec<NatsUser>,
    /// `debug: true` in the server's log (it then logs which certificate name it mapped).
    pub debug: bool,
    /// Also `trace: true`: every protocol line, including the JetStream API subjects used.
    pub trace: bool,
}

/// The files a server config points at.
#[derive(Debug, Clone)]
pub struct NatsFiles {
    pub store_dir: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
}

/// The nats-server config Eastwall's tests use: one loopback listener on `port`, JetStream in
/// `files.store_dir`, TLS required with client certificates verified against `files.ca_file`,
/// and, when `opts.users` is not empty, users mapped from their certificates' SPIFFE IDs.
pub fn nats_conf(port: u16, files: &NatsFiles, opts: &NatsOptions) -> String {
    let mut conf = String::new();
    let _ = writeln!(conf, "# Written by eastwall-e2e (tests/src/nats.rs).");
    let _ = writeln!(conf, "listen: \"127.0.0.1:{port}\"");
    let _ = writeln!(conf, "server_name: \"eastwall-test-{port}\"");
    let _ = writeln!(
        conf,
        "# No HTTP monitoring port, no cluster, no leaf nodes: clients only."
    );
    let _ = writeln!(conf, "jetstream {{");
    let _ = writeln!(conf, "  store_dir: {}", quote(&files.store_dir));
    let _ = writeln!(conf, "  max_memory_store: 64MB");
    let _ = writeln!(conf, "  max_file_store: 1GB");
    let _ = writeln!(conf, "}}");
    let _ = writeln!(conf, "tls {{");
    let _ = writeln!(conf, "  cert_file: {}", quote(&files.cert_file));
    let _ = writeln!(conf, "  key_file: {}", quote(&files.key_file));
    let _ = writeln!(conf, "  ca_file: {}", quote(&files.ca_file));
    if opts.users.is_empty() {
        let _ = writeln!(conf, "  verify: true");
    } else {
        let _ = writeln!(conf, "  verify_and_map: true");
    }
    let _ = writeln!(conf, "  timeout: 2");
    let _ = writeln!(conf, "}}");
    if !opts.users.is_empty() {
        conf.push_str(&authorization(&opts.users));
    }
    if opts.debug || opts.trace {
        let _ = writeln!(conf, "debug: true");
    }
    if opts.trace {
        let _ = writeln!(conf, "trace: true");
    }
    conf
}

/// The `authorization { users = [...] }` block for certificate-mapped users.
pub fn authorization(users: &[NatsUser]) -> String {
    let mut out = String::from("authorization {\n  users = [\n");
    for user in users {
        let _ = writeln!(out, "    {{");
        let _ = writeln!(out, "      user: {}", quote_str(&user.spiffe_id));
        if let Some(perms) = permissions(&user.role) {
            out.push_str(&perms);
        }
        let _ = writeln!(out, "    }}");
    }
    out.push_str("  ]\n}\n");
    out
}

/// The `permissions: {...}` of a role, indented for [`authorization`]; `None`: no limits.
///
/// Every client needs `_INBOX.>` to subscribe to: JetStream API replies, publish acks and
/// the deliveries of the ordered consumers behind KV `get`s and `watch`es arrive there.
fn permissions(role: &NatsRole) -> Option<String> {
    let (publish, subscribe): (Vec<String>, Vec<String>) = match role {
        NatsRole::Unrestricted => return None,
        NatsRole::Sidecar { name } => (
            vec![
                // Bind to the bucket and read it.
                "$JS.API.INFO".into(),
                format!("$JS.API.STREAM.INFO.{KV_STREAM}"),
                format!("$JS.API.DIRECT.GET.{KV_STREAM}.>"),
                format!("$JS.API.STREAM.MSG.GET.{KV_STREAM}"),
                // Watch it: an ordered push consumer, created and torn down by the client.
                format!("$JS.API.CONSUMER.CREATE.{KV_STREAM}"),
                format!("$JS.API.CONSUMER.CREATE.{KV_STREAM}.>"),
                format!("$JS.API.CONSUMER.DELETE.{KV_STREAM}.>"),
                format!("$JS.API.CONSUMER.INFO.{KV_STREAM}.>"),
                format!("$JS.FC.{KV_STREAM}.>"),
                // Its own log subject and chain-head subject.
                format!("$JS.API.STREAM.INFO.{LOG_STREAM}"),
                format!("eastwall.log.{name}"),
                format!("eastwall.log.{name}.head"),
            ],
            vec!["_INBOX.>".into()],
        ),
        NatsRole::Operator => (
            vec![
                "$JS.API.INFO".into(),
                // Create, inspect and update the two streams (not delete or purge them).
                format!("$JS.API.STREAM.CREATE.{KV_STREAM}"),
                format!("$JS.API.STREAM.UPDATE.{KV_STREAM}"),
                format!("$JS.API.STREAM.INFO.{KV_STREAM}"),
                format!("$JS.API.STREAM.CREATE.{LOG_STREAM}"),
                format!("$JS.API.STREAM.UPDATE.{LOG_STREAM}"),
                format!("$JS.API.STREAM.INFO.{LOG_STREAM}"),
                // Read both.
                format!("$JS.API.DIRECT.GET.{KV_STREAM}.>"),
                format!("$JS.API.STREAM.MSG.GET.{KV_STREAM}"),
                format!("$JS.API.DIRECT.GET.{LOG_STREAM}.>"),
                format!("$JS.API.STREAM.MSG.GET.{LOG_STREAM}"),
                format!("$JS.API.CONSUMER.CREATE.{KV_STREAM}"),
                format!("$JS.API.CONSUMER.CREATE.{KV_STREAM}.>"),
                format!("$JS.API.CONSUMER.DELETE.{KV_STREAM}.>"),
                format!("$JS.API.CONSUMER.INFO.{KV_STREAM}.>"),
                format!("$JS.API.CONSUMER.CREATE.{LOG_STREAM}"),
                format!("$JS.API.CONSUMER.CREATE.{LOG_STREAM}.>"),
                format!("$JS.API.CONSUMER.DELETE.{LOG_STREAM}.>"),
                format!("$JS.API.CONSUMER.INFO.{LOG_STREAM}.>"),
                format!("$JS.API.CONSUMER.MSG.NEXT.{LOG_STREAM}.>"),
                format!("$JS.ACK.{LOG_STREAM}.>"),
                format!("$JS.FC.{KV_STREAM}.>"),
                format!("$JS.FC.{LOG_STREAM}.>"),
                // Write the policy and the locks (not the sidecars' heads).
                format!("$KV.{KV_BUCKET}.policy"),
                format!("$KV.{KV_BUCKET}.lock.>"),
            ],
            vec!["_INBOX.>".into()],
        ),
    };
    let list = |subjects: &[String]| {
        subjects
            .iter()
            .map(|s| quote_str(s))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Some(format!(
        "      permissions: {{\n        publish: {{ allow: [{}] }}\n        subscribe: {{ allow: [{}] }}\n      }}\n",
        list(&publish),
        list(&subscribe)
    ))
}

/// A running (or stopped, between [`Nats::stop`] and [`Nats::restart`]) nats-server.
pub struct Nats {
    bin: PathBuf,
    child: Option<Child>,
    port: u16,
    files: NatsFiles,
    /// `spiffe://<td>/nats/admin`: certificate and key PEM, unrestricted (see [`Nats::admin`]).
    admin: (String, String),
    conf_path: PathBuf,
    log_path: PathBuf,
    /// Owns the config, the certificates, the JetStream store and the log.
    dir: tempfile::TempDir,
}

impl Nats {
    /// Starts a server trusting `pki`'s CA (client certificates from it may do anything).
    pub fn start(pki: &TestPki) -> anyhow::Result<Nats> {
        Nats::start_with_ca(pki.ca())
    }

    /// Starts a server trusting `ca` (e.g. `Ca::open(&layout.dir.join("ca"))`), which also
    /// issues the server's certificate (`spiffe://<td>/nats/server`, `localhost`, 127.0.0.1).
    /// That certificate is recorded in `ca`'s index like any other it issues.
    pub fn start_with_ca(ca: &Ca) -> anyhow::Result<Nats> {
        Nats::start_with(ca, NatsOptions::default())
    }

    /// As [`Nats::start_with_ca`], with certificate-mapped users, debug logging, ….
    pub fn start_with(ca: &Ca, mut opts: NatsOptions) -> anyhow::Result<Nats> {
        let bin = nats_server_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("eastwall-nats-")
            .tempdir()
            .context("creating a temp dir for nats-server")?;
        let td = ca.trust_domain().as_str().to_owned();
        let mut request =
            IssueRequest::new(SpiffeId::parse(&format!("spiffe://{td}/nats/server"))?);
        request.ttl = Duration::from_secs(24 * 3600);
        request.dns = vec!["localhost".to_owned()];
        request.ips = vec![Ipv4Addr::LOCALHOST.into()];
        let issued = ca
            .issue(&request)
            .context("issuing the nats-server certificate")?;
        let (cert_file, key_file) = issued.write(&dir.path().join("server"))?;
        let key_file = key_file.ok_or_else(|| anyhow!("no key was written for nats-server"))?;

        let admin_id = format!("spiffe://{td}/nats/admin");
        let mut request = IssueRequest::new(SpiffeId::parse(&admin_id)?);
        request.ttl = Duration::from_secs(24 * 3600);
        let issued = ca
            .issue(&request)
            .context("issuing the harness's admin certificate")?;
        issued.write(&dir.path().join("admin"))?;
        let admin = (
            issued.cert_pem,
            issued
                .key_pem
                .ok_or_else(|| anyhow!("no key was issued for the admin"))?,
        );
        if !opts.users.is_empty() && !opts.users.iter().any(|u| u.spiffe_id == admin_id) {
            opts.users.push(NatsUser::unrestricted(admin_id));
        }

        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.bundle_pem())
            .with_context(|| format!("writing {}", ca_file.display()))?;
        let store_dir = dir.path().join("jetstream");
        std::fs::create_dir(&store_dir)
            .with_context(|| format!("creating {}", store_dir.display()))?;
        let files = NatsFiles {
            store_dir,
            cert_file,
            key_file,
            ca_file,
        };
        let conf_path = dir.path().join("nats.conf");
        let log_path = dir.path().join("nats-server.log");
        let mut nats = Nats {
            bin,
            child: None,
            port: 0,
            files,
            admin,
            conf_path,
            log_path,
            dir,
        };
        // The free port is free when asked, not necessarily when nats-server binds it (a
        // test in another thread may take it in between): try a new one a few times.
        let mut attempt = 0;
        loop {
            attempt += 1;
            nats.port = free_port()?;
            std::fs::write(&nats.conf_path, nats_conf(nats.port, &nats.files, &opts))
                .with_context(|| format!("writing {}", nats.conf_path.display()))?;
            match nats.spawn() {
                Ok(()) => return Ok(nats),
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `tls://127.0.0.1:PORT`: the server's certificate names 127.0.0.1 (and `localhost`).
    pub fn url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The trust bundle the server verifies clients with, and clients verify it with.
    pub fn ca_file(&self) -> &Path {
        &self.files.ca_file
    }

    /// The JetStream store (nats-server keeps its data in `jetstream/` under it).
    pub fn store_dir(&self) -> &Path {
        &self.files.store_dir
    }

    /// The generated nats.conf.
    pub fn conf_path(&self) -> &Path {
        &self.conf_path
    }

    /// The server's stdout and stderr, across restarts.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The temp dir holding everything above.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path, lines)
    }

    /// True while the server process runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGTERM, up to [`NATS_STOP_TIMEOUT`] for it to exit, then SIGKILL. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        // nats-server signals a PID itself: no libc/nix (and no unsafe) needed for SIGTERM.
        let signalled = Command::new(&self.bin)
            .arg("--signal")
            .arg(format!("term={}", child.id()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if signalled {
            let deadline = Instant::now() + NATS_STOP_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops the server if it runs and starts it again: same port, same config, same store,
    /// so streams, buckets and their data survive.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        let _ = writeln!(
            log,
            "--- eastwall-e2e: starting {} -c {}",
            self.bin.display(),
            self.conf_path.display()
        );
        let stderr = log.try_clone().context("duplicating the log file handle")?;
        let mut child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf_path)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        match wait_serving(&mut child, self.port, NATS_START_TIMEOUT) {
            Ok(()) => {
                self.child = Some(child);
                Ok(())
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(anyhow!(
                    "nats-server on 127.0.0.1:{} did not start: {e:#}\n--- {} (tail):\n{}",
                    self.port,
                    self.log_path.display(),
                    self.log_tail(40)
                ))
            }
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The nats-server binary: `$EASTWALL_NATS_SERVER`, else `nats-server` on PATH, else
/// /usr/sbin or /usr/local/sbin (where Debian's package and manual installs put it).
pub fn nats_server_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("EASTWALL_NATS_SERVER") {
        let path = PathBuf::from(path);
        if is_executable(&path) {
            return Ok(path);
        }
        bail!(
            "EASTWALL_NATS_SERVER={} is not an executable file",
            path.display()
        );
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    for dir in on_path
        .into_iter()
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/local/bin"].map(PathBuf::from))
    {
        let candidate = dir.join("nats-server");
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    bail!("nats-server not found on PATH or in /usr/sbin; install it with `apt-get install nats-server`")
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A loopback port nothing listens on right now.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Waits until `port` answers with a NATS `INFO` line (sent in plain text before TLS), or the
/// child exits, or `timeout` passes.
fn wait_serving(child: &mut Child, port: u16, timeout: Duration) -> anyhow::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + timeout;
    let mut last = String::from("nothing accepted a connection");
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().context("checking on nats-server")? {
            bail!("nats-server exited: {status}");
        }
        match read_info(addr) {
            Ok(info) if info.contains("\"jetstream\":true") => return Ok(()),
            Ok(info) => last = format!("INFO without JetStream: {info}"),
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("not serving after {timeout:?} (last: {last})")
}

/// Connects, reads the server's first line (`INFO {...}`) and hangs up.
pub fn read_info(addr: SocketAddr) -> anyhow::Result<String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(std::io::Read::take(stream, 64 * 1024)).read_line(&mut line)?;
    if !line.starts_with("INFO ") {
        bail!("expected INFO, read {line:?}");
    }
    Ok(line.trim_end().to_owned())
}

fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A path as a quoted config string (nats-server's config strings take JSON-style escapes).
fn quote(path: &Path) -> String {
    quote_str(&path.to_string_lossy())
}

fn quote_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

/// What a server said to a connection it refused or ended, as text: a TLS alert, an `-ERR`
/// line, or an I/O error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// A minimal synchronous NATS client speaking the text protocol over rustls: enough to check
/// what a certificate may connect, publish or request, independently of any NATS library.
/// Every call is bounded by a 5 s socket timeout.
pub struct RawNatsClient {
    io: BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
    /// The `INFO` line the server sent before TLS.
    pub info: String,
    next_sid: u64,
}

impl Nats {
    /// A [`RawNatsClient`] presenting `client` (certificate chain PEM, key PEM), or no
    /// certificate. The error is a [`Refusal`] when the server refused the connection.
    pub fn raw_client(&self, client: Option<(&str, &str)>) -> anyhow::Result<RawNatsClient> {
        let ca_pem = std::fs::read_to_string(&self.files.ca_file)?;
        RawNatsClient::connect(self.port, &ca_pem, client)
    }

    /// A [`RawNatsClient`] as the harness's own identity, `spiffe://<td>/nats/admin`, which
    /// may do anything (with [`NatsOptions::users`] it is added as an unrestricted user).
    pub fn admin(&self) -> anyhow::Result<RawNatsClient> {
        self.raw_client(Some((&self.admin.0, &self.admin.1)))
    }

    /// Creates Eastwall's two streams as the admin: `KV_eastwall`, configured as async-nats'
    /// `create_key_value` would make bucket `eastwall` with `history` values per key, and
    /// `EASTWALL_LOG` on `eastwall.log.>`. Both file-backed, one replica.
    ///
    /// async-nats 0.51's `create_key_value` cannot do this against nats-server 2.9: it first
    /// asks `$JS.API.INFO`, and 2.9's reply lacks `reserved_memory`/`reserved_storage`, which
    /// 0.51 requires ("data did not match any variant of untagged enum Response").
    /// `get_key_value` works on the stream made here.
    pub fn create_eastwall_streams(&self, history: i64) -> anyhow::Result<()> {
        let mut admin = self.admin()?;
        for config in [kv_stream_config(history, 1), log_stream_config(1)] {
            let name = config["name"].as_str().unwrap_or_default().to_owned();
            let reply = admin.request_json(&format!("$JS.API.STREAM.CREATE.{name}"), &config)?;
            if let Some(error) = reply.get("error") {
                bail!("creating stream {name}: {error}");
            }
        }
        Ok(())
    }

    /// `$JS.API.STREAM.INFO.<name>`'s reply, as the admin.
    pub fn stream_info(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        self.admin()?.request_json(
            &format!("$JS.API.STREAM.INFO.{name}"),
            &serde_json::json!({}),
        )
    }
}

/// The `$JS.API.STREAM.CREATE.KV_eastwall` body: what async-nats 0.51's `create_key_value`
/// sends for bucket `eastwall` (its `kv_to_stream_config`, without the 2.10+ fields).
pub fn kv_stream_config(history: i64, replicas: usize) -> serde_json::Value {
    serde_json::json!({
        "name": KV_STREAM,
        "subjects": [format!("$KV.{KV_BUCKET}.>")],
        "retention": "limits",
        "max_consumers": -1,
        "max_msgs": -1,
        "max_bytes": -1,
        "max_age": 0,
        "max_msgs_per_subject": history.max(1),
        "max_msg_size": -1,
        "discard": "new",
        "storage": "file",
        "num_replicas": replicas,
        "duplicate_window": 120_000_000_000u64,
        "allow_rollup_hdrs": true,
        "deny_delete": true,
        "deny_purge": false,
        "allow_direct": true,
    })
}

/// The `$JS.API.STREAM.CREATE.EASTWALL_LOG` body: every sidecar's decision lines, kept by
/// limits (none set here: tests are small).
pub fn log_stream_config(replicas: usize) -> serde_json::Value {
    serde_json::json!({
        "name": LOG_STREAM,
        "subjects": [LOG_SUBJECTS],
        "retention": "limits",
        "max_consumers": -1,
        "max_msgs": -1,
        "max_bytes": -1,
        "max_age": 0,
        "max_msgs_per_subject": -1,
        "max_msg_size": -1,
        "discard": "old",
        "storage": "file",
        "num_replicas": replicas,
    })
}

impl RawNatsClient {
    /// Reads `INFO` in plain text, upgrades to TLS (verifying the server as 127.0.0.1 against
    /// `ca_pem`), sends `CONNECT` and `PING`, and waits for the `PONG`.
    pub fn connect(
        port: u16,
        ca_pem: &str,
        client: Option<(&str, &str)>,
    ) -> anyhow::Result<RawNatsClient> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
        // INFO arrives before TLS; read it byte by byte so no TLS bytes are swallowed.
        let mut info = Vec::new();
        let mut byte = [0u8; 1];
        while !info.ends_with(b"\r\n") {
            if info.len() > 64 * 1024 {
                bail!("INFO line longer than 64 KiB");
            }
            let n = std::io::Read::read(&mut tcp, &mut byte)?;
            if n == 0 {
                bail!("closed before INFO");
            }
            info.push(byte[0]);
        }
        let info = String::from_utf8_lossy(&info).trim_end().to_owned();
        if !info.starts_with("INFO ") {
            bail!("expected INFO, read {info:?}");
        }
        let config = crate::client_config(ca_pem, client)?;
        let name = rustls::pki_types::ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
        let mut raw = RawNatsClient {
            io: BufReader::new(rustls::StreamOwned::new(conn, tcp)),
            info,
            next_sid: 1,
        };
        let connect = serde_json::json!({
            "verbose": false, "pedantic": false, "tls_required": true, "name": "eastwall-e2e-raw",
            "lang": "rust-raw", "version": "0", "protocol": 1, "headers": true,
            "no_responders": false, "echo": false,
        });
        raw.send(format!("CONNECT {connect}\r\nPING\r\n").as_bytes())
            .map_err(refusal)?;
        raw.until_pong().map_err(refusal)?;
        Ok(raw)
    }

    /// Publishes and round-trips a `PING`, so a permissions `-ERR` surfaces as the error.
    pub fn publish(&mut self, subject: &str, payload: &[u8]) -> anyhow::Result<()> {
        let mut frame = format!("PUB {subject} {}\r\n", payload.len()).into_bytes();
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\nPING\r\n");
        self.send(&frame)?;
        self.until_pong()
    }

    /// As [`RawNatsClient::publish`], with NATS headers (`HPUB`): a KV delete is a message
    /// with `KV-Operation: DEL`, a purge `KV-Operation: PURGE` with `Nats-Rollup: sub`.
    pub fn publish_with_headers(
        &mut self,
        subject: &str,
        headers: &[(&str, &str)],
        payload: &[u8],
    ) -> anyhow::Result<()> {
        let mut head = String::from("NATS/1.0\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut frame = format!(
            "HPUB {subject} {} {}\r\n{head}",
            head.len(),
            head.len() + payload.len()
        )
        .into_bytes();
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\nPING\r\n");
        self.send(&frame)?;
        self.until_pong()
    }

    /// Sends `payload` to `subject` with a fresh inbox as reply subject and returns the first
    /// reply's payload. A JetStream API call is a request with a JSON body, e.g.
    /// `request("$JS.API.STREAM.INFO.EASTWALL_LOG", b"")`.
    pub fn request(&mut self, subject: &str, payload: &[u8]) -> anyhow::Result<Vec<u8>> {
        let sid = self.next_sid;
        self.next_sid += 1;
        let inbox = format!("_INBOX.eastwall-e2e-raw.{sid}");
        // `UNSUB <sid> 1` before the PUB: the subscription ends itself after one reply.
        let mut frame = format!(
            "SUB {inbox} {sid}\r\nUNSUB {sid} 1\r\nPUB {subject} {inbox} {}\r\n",
            payload.len()
        )
        .into_bytes();
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        self.send(&frame)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let line = self.read_line()?;
            if let Some(rest) = line.strip_prefix("MSG ") {
                let parts: Vec<&str> = rest.split(' ').collect();
                let size: usize = parts
                    .last()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| anyhow!("bad MSG line {line:?}"))?;
                let mut body = vec![0u8; size + 2];
                std::io::Read::read_exact(&mut self.io, &mut body)?;
                body.truncate(size);
                if parts.get(1) == Some(&sid.to_string().as_str()) {
                    return Ok(body);
                }
            } else {
                self.handle_control(&line)?;
            }
        }
        bail!("no reply to {subject} within 5 s")
    }

    /// As [`RawNatsClient::request`], parsing the reply as JSON.
    pub fn request_json(
        &mut self,
        subject: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let reply = self.request(subject, body.to_string().as_bytes())?;
        serde_json::from_slice(&reply)
            .with_context(|| format!("reply to {subject}: {}", String::from_utf8_lossy(&reply)))
    }

    fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let stream = self.io.get_mut();
        stream.write_all(bytes)?;
        stream.flush()?;
        Ok(())
    }

    /// Reads up to the `PONG`. An `-ERR` on the way is the result, once the `PONG` (or the
    /// hang-up that follows a fatal `-ERR`) has been read, so the connection stays usable
    /// after a permissions violation.
    fn until_pong(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut first_error: Option<anyhow::Error> = None;
        while Instant::now() < deadline {
            let line = match self.read_line() {
                Ok(line) => line,
                Err(e) => return Err(first_error.unwrap_or(e)),
            };
            if line == "PONG" {
                return first_error.map_or(Ok(()), Err);
            }
            if line.starts_with("MSG ") {
                bail!("unexpected {line:?} while waiting for PONG");
            }
            if let Err(e) = self.handle_control(&line) {
                first_error.get_or_insert(e);
            }
        }
        Err(first_error.unwrap_or_else(|| anyhow!("no PONG within 5 s")))
    }

    /// `PING` is answered, `+OK` and `INFO` skipped, `-ERR` is the error.
    fn handle_control(&mut self, line: &str) -> anyhow::Result<()> {
        if line == "PING" {
            self.send(b"PONG\r\n")
        } else if line == "+OK" || line.starts_with("INFO ") {
            Ok(())
        } else if line.starts_with("-ERR") {
            Err(Refusal(line.to_owned()).into())
        } else {
            bail!("unexpected {line:?}")
        }
    }

    fn read_line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        let n = self.io.read_line(&mut line)?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }
}

/// Anything that ends a connection during CONNECT/PING: a TLS alert, an `-ERR`, a hang-up.
fn refusal(e: anyhow::Error) -> anyhow::Error {
    if e.downcast_ref::<Refusal>().is_some() {
        e
    } else {
        Refusal(format!("{e:#}")).into()
    }
}
