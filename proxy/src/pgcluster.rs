//! Private PostgreSQL clusters for the test suite and `eastwall demo`: initdb + pg_ctl in a temp dir.
//!
//! A [`Cluster`] is a throwaway server on a free loopback port with its own data directory and
//! Unix socket directory, stopped and deleted when it is dropped. It runs the machine's own
//! PostgreSQL binaries (see [`find_bindir`]). initdb refuses to run as root, so when we are root
//! every server-side command runs as the `postgres` OS user and every file the server reads is
//! handed to that user.
//!
//! Blocking by design: callers inside an async runtime use `spawn_blocking`.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use nix::unistd::{Gid, Uid, User};

/// The loopback address every cluster listens on; nothing here ever binds a routable address.
const HOST: &str = "127.0.0.1";
/// The bootstrap superuser. Fixed rather than "whoever runs initdb" so that tests and the demo
/// see the same name whether they run as root or as a developer.
const SUPERUSER: &str = "postgres";
/// How often a start is retried when the free port we picked was taken in between.
const PORT_ATTEMPTS: usize = 5;
/// Seconds pg_ctl waits for start/stop before giving up.
const PG_CTL_TIMEOUT_SECS: &str = "60";
/// Environment variables that would silently change what our commands connect to or as whom.
const PG_ENV: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGSSLMODE",
    "PGSSLCERT",
    "PGSSLKEY",
    "PGSSLROOTCERT",
    "PGSSLCRL",
    "PGOPTIONS",
    "PGDATA",
    "PGCLIENTENCODING",
    "PSQLRC",
];

/// Everything that can go wrong managing a private cluster. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No initdb/pg_ctl on this machine.
    #[error("PostgreSQL server binaries not found; install them with: {install}")]
    BinariesNotFound {
        /// The exact command that installs them.
        install: String,
    },
    /// Running as root but there is no unprivileged user to run the server as.
    #[error(
        "running as root, and initdb refuses to run as root, but there is no `postgres` OS user \
         to run the server as; install the server package (apt-get install -y postgresql) or \
         create the user: useradd --system --create-home --home-dir /var/lib/postgresql postgres"
    )]
    NoPostgresUser,
    /// A file-system or process-spawning step failed.
    #[error("{what}: {error}")]
    Io {
        /// The step, in words.
        what: String,
        /// The underlying error.
        error: io::Error,
    },
    /// A PostgreSQL tool ran and reported failure.
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        /// The command line, for copy-paste.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed (stderr, then stdout), trimmed.
        output: String,
    },
    /// The server did not come up; the log tail usually says why.
    #[error("PostgreSQL did not start on {HOST}:{port}: {reason}\n--- server log (last lines of {log}) ---\n{log_tail}")]
    Start {
        /// The port it was asked to listen on.
        port: u16,
        /// pg_ctl's own complaint.
        reason: String,
        /// Where the full log is (inside the cluster's temp dir while it exists).
        log: String,
        /// The last lines of the server log.
        log_tail: String,
    },
    /// A statement sent through psql failed.
    #[error("SQL failed on cluster at {HOST}:{port}: {stderr}")]
    Sql {
        /// The cluster's port.
        port: u16,
        /// psql's error output.
        stderr: String,
    },
}

impl ClusterError {
    fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
        let what = what.into();
        move |error| ClusterError::Io { what, error }
    }
}

/// TLS material for the server, as PEM text; written into the cluster's private directory.
#[derive(Clone)]
pub struct ServerTls {
    /// The server certificate, optionally followed by its chain.
    pub cert_pem: String,
    /// The server's private key.
    pub key_pem: String,
    /// The CA(s) client certificates must chain to (`ssl_ca_file`).
    pub ca_pem: String,
    /// A CRL the server checks client certificates against (`ssl_crl_file`).
    pub crl_pem: Option<String>,
}

impl std::fmt::Debug for ServerTls {
    // The key must never reach a log line or a panic message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_pem", &format_args!("<{} bytes>", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .field("ca_pem", &format_args!("<{} bytes>", self.ca_pem.len()))
            .field("crl_pem", &self.crl_pem.as_ref().map(|c| c.len()))
            .finish()
    }
}

/// How to set a cluster up. `Default` gives a plain, trust-everything-on-loopback server.
#[derive(Clone, Default)]
pub struct ClusterOptions {
    /// Turn on `ssl` with these files.
    pub tls: Option<ServerTls>,
    /// Full pg_hba.conf lines. Empty means the default: `local all all trust` and
    /// `host all all 127.0.0.1/32 trust`. A non-empty list replaces the default, except that
    /// `local all postgres trust` always comes first so [`Cluster::psql`] keeps working.
    pub hba: Vec<String>,
    /// Extra postgresql.conf settings, applied after ours (so they win).
    pub settings: Vec<(String, String)>,
    /// A password for the `postgres` superuser, for tests that log in as it over TCP.
    pub superuser_password: Option<String>,
}

impl std::fmt::Debug for ClusterOptions {
    // The superuser password must never reach a log line or a panic message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterOptions")
            .field("tls", &self.tls)
            .field("hba", &self.hba)
            .field("settings", &self.settings)
            .field(
                "superuser_password",
                &self.superuser_password.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// Who the server-side commands run as when we are root.
#[derive(Debug, Clone)]
struct RunAs {
    uid: Uid,
    gid: Gid,
    home: PathBuf,
}

/// A running private PostgreSQL cluster; stopped and deleted on drop.
#[derive(Debug)]
pub struct Cluster {
    bindir: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_file: PathBuf,
    port: u16,
    run_as: Option<RunAs>,
    running: bool,
    // Last field: dropped after `Drop::drop` has stopped the server, which removes the files.
    root: tempfile::TempDir,
}

/// Finds the directory holding `initdb` and `pg_ctl`.
///
/// Order: `$EASTWALL_PG_BINDIR`, then `pg_config --bindir`, then the newest
/// `/usr/lib/postgresql/*/bin` (Debian/Ubuntu keep server binaries off `PATH`).
pub fn find_bindir() -> Result<PathBuf, ClusterError> {
    if let Some(dir) = std::env::var_os("EASTWALL_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if has_server_binaries(&dir) {
            return Ok(dir);
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_server_binaries(&dir) {
                return Ok(dir);
            }
        }
    }
    let mut candidates: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = version_key(&entry.file_name().to_string_lossy())?;
            let bin = entry.path().join("bin");
            has_server_binaries(&bin).then_some((version, bin))
        })
        .collect();
    candidates.sort();
    match candidates.pop() {
        Some((_, bin)) => Ok(bin),
        None => Err(ClusterError::BinariesNotFound {
            install: install_command(),
        }),
    }
}

/// The command that installs the server binaries, with `sudo` when we are not root.
pub fn install_command() -> String {
    if nix::unistd::geteuid().is_root() {
        "apt-get install -y postgresql".to_owned()
    } else {
        "sudo apt-get install -y postgresql".to_owned()
    }
}

fn has_server_binaries(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("pg_ctl").is_file()
}

/// "15" → [15], "9.6" → [9, 6]; anything else is not a version directory.
fn version_key(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

/// A postgresql.conf value, always single-quoted (PostgreSQL accepts quotes for every type).
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A free loopback port. Another process may take it before the server binds it; `start`
/// retries with a fresh port when that happens.
fn free_port() -> Result<u16, ClusterError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(ClusterError::io(
        "cannot bind a loopback port to find a free one",
    ))?;
    let port = listener
        .local_addr()
        .map_err(ClusterError::io("cannot read the bound loopback port"))?
        .port();
    Ok(port)
}

fn postgres_user() -> Result<RunAs, ClusterError> {
    match User::from_name(SUPERUSER) {
        Ok(Some(user)) => Ok(RunAs {
            uid: user.uid,
            gid: user.gid,
            home: user.dir,
        }),
        Ok(None) => Err(ClusterError::NoPostgresUser),
        Err(errno) => Err(ClusterError::Io {
            what: "cannot look up the `postgres` OS user".to_owned(),
            error: io::Error::from(errno),
        }),
    }
}

fn command_line(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

fn combined_output(out: &Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.trim().is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(stdout.trim());
    }
    text
}

/// The last `lines` lines of a file from byte `from` on, or a note saying why there are none.
fn tail(path: &Path, from: u64, lines: usize) -> String {
    let mut text = String::new();
    let read = fs::File::open(path).and_then(|mut file| {
        file.seek(SeekFrom::Start(from))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        text = String::from_utf8_lossy(&bytes).into_owned();
        Ok(())
    });
    if let Err(err) = read {
        return format!("(no log: {err})");
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Cluster {
    /// initdb, configure and start a cluster on a free loopback port; returns once it accepts
    /// connections.
    pub fn start(opts: ClusterOptions) -> Result<Cluster, ClusterError> {
        let bindir = find_bindir()?;
        let run_as = if nix::unistd::geteuid().is_root() {
            Some(postgres_user()?)
        } else {
            None
        };
        // As root the server user must reach our dir, and $TMPDIR may point somewhere it
        // cannot traverse (e.g. under /root); /tmp is world-traversable everywhere.
        let builder = {
            let mut b = tempfile::Builder::new();
            b.prefix("eastwall-pg-");
            b
        };
        let root = if run_as.is_some() {
            builder.tempdir_in("/tmp")
        } else {
            builder.tempdir()
        }
        .map_err(ClusterError::io("cannot create a temp dir for the cluster"))?;
        let data_dir = root.path().join("data");
        let socket_dir = root.path().join("sock");
        let tls_dir = root.path().join("tls");
        let log_file = data_dir.join("server.log");

        let mut cluster = Cluster {
            bindir,
            data_dir,
            socket_dir,
            log_file,
            port: 0,
            run_as,
            running: false,
            root,
        };
        fs::set_permissions(cluster.root.path(), fs::Permissions::from_mode(0o755)).map_err(
            ClusterError::io("cannot set permissions on the cluster temp dir"),
        )?;
        // initdb (running as the server user) creates data/ in here.
        cluster.give_to_server(cluster.root.path())?;
        cluster.make_dir(&cluster.socket_dir.clone(), 0o700)?;
        cluster.initdb(opts.superuser_password.as_deref())?;
        cluster.write_hba(&opts.hba)?;

        let mut conf: Vec<(String, String)> = vec![
            ("listen_addresses".into(), HOST.into()),
            (
                "unix_socket_directories".into(),
                cluster.socket_dir.to_string_lossy().into_owned(),
            ),
            // A throwaway cluster: durability buys nothing and costs seconds per test.
            ("fsync".into(), "off".into()),
            ("synchronous_commit".into(), "off".into()),
            ("full_page_writes".into(), "off".into()),
            ("shared_buffers".into(), "16MB".into()),
            ("max_connections".into(), "100".into()),
            ("password_encryption".into(), "scram-sha-256".into()),
        ];
        if let Some(tls) = &opts.tls {
            cluster.make_dir(&tls_dir, 0o700)?;
            let cert = tls_dir.join("server.crt");
            let key = tls_dir.join("server.key");
            let ca = tls_dir.join("ca.crt");
            cluster.write_private(&cert, &tls.cert_pem, 0o644)?;
            cluster.write_private(&key, &tls.key_pem, 0o600)?;
            cluster.write_private(&ca, &tls.ca_pem, 0o644)?;
            conf.push(("ssl".into(), "on".into()));
            conf.push(("ssl_cert_file".into(), cert.to_string_lossy().into_owned()));
            conf.push(("ssl_key_file".into(), key.to_string_lossy().into_owned()));
            conf.push(("ssl_ca_file".into(), ca.to_string_lossy().into_owned()));
            if let Some(crl_pem) = &tls.crl_pem {
                let crl = tls_dir.join("crl.pem");
                cluster.write_private(&crl, crl_pem, 0o644)?;
                conf.push(("ssl_crl_file".into(), crl.to_string_lossy().into_owned()));
            }
        }
        conf.extend(opts.settings.iter().cloned());
        cluster.append_conf(&conf)?;

        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            cluster.port = free_port()?;
            match cluster.pg_ctl_start() {
                Ok(()) => return Ok(cluster),
                Err(StartFailure::PortTaken(err)) => last_err = Some(err),
                Err(StartFailure::Other(err)) => return Err(err),
            }
        }
        Err(last_err.unwrap_or_else(|| ClusterError::Start {
            port: cluster.port,
            reason: "no free port".to_owned(),
            log: cluster.log_file.display().to_string(),
            log_tail: String::new(),
        }))
    }

    /// The TCP port the server listens on (loopback only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TCP host, `127.0.0.1`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// The directory holding the server's Unix socket (`.s.PGSQL.<port>`).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The cluster's data directory (holds `server.log`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The bootstrap superuser's role name.
    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    /// The server log, for tests that assert on what PostgreSQL saw.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// A `psql` command connected as the superuser over the Unix socket; add `-c` or stdin.
    pub fn psql(&self) -> Command {
        let psql = self.bindir.join("psql");
        let mut cmd = Command::new(if psql.is_file() {
            psql
        } else {
            PathBuf::from("psql")
        });
        for var in PG_ENV {
            cmd.env_remove(var);
        }
        cmd.arg("-X")
            .args(["-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string()])
            .args(["-U", SUPERUSER, "-d", "postgres"]);
        cmd
    }

    /// Runs SQL (any number of statements, each in its own transaction) as the superuser and
    /// returns psql's unaligned, tuples-only output.
    pub fn run_sql(&self, sql: &str) -> Result<String, ClusterError> {
        let mut child = self
            .psql()
            .args(["-At", "-q", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(ClusterError::io("cannot run psql"))?;
        // Feed stdin from a thread so a large result cannot deadlock against a large script.
        let writer = child.stdin.take().map(|mut stdin| {
            let sql = sql.to_owned();
            std::thread::spawn(move || stdin.write_all(sql.as_bytes()))
        });
        let out = child
            .wait_with_output()
            .map_err(ClusterError::io("cannot read psql's output"))?;
        if let Some(writer) = writer {
            // A write error here means psql exited early; its stderr below says why.
            let _ = writer.join();
        }
        if !out.status.success() {
            return Err(ClusterError::Sql {
                port: self.port,
                stderr: combined_output(&out),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops the server (fast shutdown: sessions are disconnected). The files stay, so
    /// [`Cluster::start_again`] can bring it back on the same port.
    pub fn stop(&mut self) -> Result<(), ClusterError> {
        if !self.running {
            return Ok(());
        }
        let mut cmd = self.server_command("pg_ctl");
        cmd.arg("stop").arg("-D").arg(&self.data_dir).args([
            "-m",
            "fast",
            "-w",
            "-t",
            PG_CTL_TIMEOUT_SECS,
        ]);
        self.run_checked(cmd)?;
        self.running = false;
        Ok(())
    }

    /// Starts a stopped cluster again on the same port. Fails if something else took the port
    /// in the meantime.
    pub fn start_again(&mut self) -> Result<(), ClusterError> {
        if self.running {
            return Ok(());
        }
        match self.pg_ctl_start() {
            Ok(()) => Ok(()),
            Err(StartFailure::PortTaken(err) | StartFailure::Other(err)) => Err(err),
        }
    }

    /// Stop then start, on the same port; for tests that take the upstream away mid-session.
    pub fn restart(&mut self) -> Result<(), ClusterError> {
        self.stop()?;
        self.start_again()
    }

    fn pg_ctl_start(&mut self) -> Result<(), StartFailure> {
        let log_start = fs::metadata(&self.log_file).map(|m| m.len()).unwrap_or(0);
        let mut cmd = self.server_command("pg_ctl");
        cmd.arg("start")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-s"])
            .args(["-o", &format!("-p {}", self.port)]);
        let out = cmd
            .output()
            .map_err(ClusterError::io("cannot run pg_ctl start"))
            .map_err(StartFailure::Other)?;
        if out.status.success() {
            self.running = true;
            return Ok(());
        }
        // pg_ctl may leave a half-started postmaster behind after a timeout; make sure not.
        self.running = true;
        self.stop_immediately();
        let log_tail = tail(&self.log_file, log_start, 30);
        let err = ClusterError::Start {
            port: self.port,
            reason: combined_output(&out),
            log: self.log_file.display().to_string(),
            log_tail,
        };
        let taken = matches!(&err, ClusterError::Start { log_tail, .. }
            if log_tail.contains("Address already in use") || log_tail.contains("could not bind"));
        Err(if taken {
            StartFailure::PortTaken(err)
        } else {
            StartFailure::Other(err)
        })
    }

    fn initdb(&self, superuser_password: Option<&str>) -> Result<(), ClusterError> {
        let mut cmd = self.server_command("initdb");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync");
        let pwfile = self.root.path().join("pwfile");
        if let Some(password) = superuser_password {
            self.write_private(&pwfile, password, 0o600)?;
            cmd.arg("--pwfile").arg(&pwfile);
        }
        let result = self.run_checked(cmd);
        // The password lives on only as a SCRAM verifier inside the cluster.
        let _ = fs::remove_file(&pwfile);
        result
    }

    fn write_hba(&self, lines: &[String]) -> Result<(), ClusterError> {
        let mut text = String::from("# written by eastwall pgcluster\n");
        // Always first, so run_sql works whatever the caller's rules say about others.
        text.push_str(&format!("local all {SUPERUSER} trust\n"));
        if lines.is_empty() {
            text.push_str("local all all trust\nhost all all 127.0.0.1/32 trust\n");
        } else {
            for line in lines {
                text.push_str(line);
                text.push('\n');
            }
        }
        self.write_private(&self.data_dir.join("pg_hba.conf"), &text, 0o600)
    }

    fn append_conf(&self, settings: &[(String, String)]) -> Result<(), ClusterError> {
        let path = self.data_dir.join("postgresql.conf");
        let mut text = String::from("\n# eastwall pgcluster settings (later lines win)\n");
        for (key, value) in settings {
            text.push_str(&format!("{key} = {}\n", conf_quote(value)));
        }
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(text.as_bytes()))
            .map_err(ClusterError::io(format!(
                "cannot append to {}",
                path.display()
            )))
    }

    /// Writes a file the server will read: given `mode`, owned by the server user.
    fn write_private(&self, path: &Path, contents: &str, mode: u32) -> Result<(), ClusterError> {
        let what = || format!("cannot write {}", path.display());
        // Create with the final mode so a key is never readable by others, even briefly.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .map_err(ClusterError::io(what()))?;
        file.write_all(contents.as_bytes())
            .map_err(ClusterError::io(what()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(ClusterError::io(what()))?;
        self.give_to_server(path)
    }

    fn make_dir(&self, path: &Path, mode: u32) -> Result<(), ClusterError> {
        fs::create_dir(path)
            .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(mode)))
            .map_err(ClusterError::io(format!(
                "cannot create {}",
                path.display()
            )))?;
        self.give_to_server(path)
    }

    fn give_to_server(&self, path: &Path) -> Result<(), ClusterError> {
        let Some(run_as) = &self.run_as else {
            return Ok(());
        };
        nix::unistd::chown(path, Some(run_as.uid), Some(run_as.gid)).map_err(|errno| {
            ClusterError::Io {
                what: format!("cannot hand {} to the postgres user", path.display()),
                error: io::Error::from(errno),
            }
        })
    }

    /// A server-side tool, run as the `postgres` user when we are root, with a clean env.
    fn server_command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(tool));
        for var in PG_ENV {
            cmd.env_remove(var);
        }
        // Our own cwd may be unreadable to the server user; initdb and postgres complain.
        cmd.current_dir(self.root.path());
        if let Some(run_as) = &self.run_as {
            cmd.uid(run_as.uid.as_raw())
                .gid(run_as.gid.as_raw())
                .env("HOME", &run_as.home)
                .env("USER", SUPERUSER)
                .env("LOGNAME", SUPERUSER);
        }
        cmd
    }

    fn run_checked(&self, mut cmd: Command) -> Result<(), ClusterError> {
        let line = command_line(&cmd);
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(ClusterError::io(format!("cannot run `{line}`")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ClusterError::Command {
                command: line,
                status: out.status.to_string(),
                output: combined_output(&out),
            })
        }
    }

    /// Best effort, for drop and failed starts: immediate shutdown, then SIGKILL as a last
    /// resort so no postmaster outlives its deleted data directory.
    fn stop_immediately(&mut self) {
        if !self.running {
            return;
        }
        let mut cmd = self.server_command("pg_ctl");
        cmd.arg("stop").arg("-D").arg(&self.data_dir).args([
            "-m",
            "immediate",
            "-w",
            "-t",
            PG_CTL_TIMEOUT_SECS,
        ]);
        if self.run_checked(cmd).is_err() && self.pg_ctl_says_running() {
            if let Some(pid) = self.postmaster_pid() {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        self.running = false;
    }

    /// `pg_ctl status` exits 0 only when postmaster.pid names a live process. Checked before
    /// any SIGKILL so a stale pid file can never make us signal an unrelated process.
    fn pg_ctl_says_running(&self) -> bool {
        let mut cmd = self.server_command("pg_ctl");
        cmd.arg("status").arg("-D").arg(&self.data_dir);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    fn postmaster_pid(&self) -> Option<nix::unistd::Pid> {
        let text = fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        (pid > 0).then(|| nix::unistd::Pid::from_raw(pid))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_immediately();
        // `root` (the TempDir) is dropped next and removes everything.
    }
}

/// Why a start attempt failed: a lost race for the port is worth another try, the rest not.
enum StartFailure {
    PortTaken(ClusterError),
    Other(ClusterError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_values_are_quoted_so_a_value_cannot_add_a_setting() {
        assert_eq!(conf_quote("on"), "'on'");
        assert_eq!(conf_quote("a'b\nssl = off"), "'a''b\nssl = off'");
    }

    #[test]
    fn version_dirs_sort_numerically_not_lexically() {
        let mut v = [version_key("9.6"), version_key("15"), version_key("10")];
        v.sort();
        assert_eq!(v[2], Some(vec![15]));
        assert_eq!(version_key("common"), None);
    }

    #[test]
    fn missing_binaries_error_names_the_install_command() {
        let err = ClusterError::BinariesNotFound {
            install: install_command(),
        };
        assert!(err
            .to_string()
            .ends_with("install them with: apt-get install -y postgresql"));
    }

    #[test]
    fn options_debug_never_shows_the_superuser_password() {
        let opts = ClusterOptions {
            superuser_password: Some("hunter2-secret".into()),
            ..ClusterOptions::default()
        };
        assert!(!format!("{opts:?}").contains("hunter2-secret"));
    }

    #[test]
    fn server_tls_debug_never_shows_the_key() {
        let tls = ServerTls {
            cert_pem: "CERT".into(),
            key_pem: "SECRET-KEY".into(),
            ca_pem: "CA".into(),
            crl_pem: None,
        };
        assert!(!format!("{tls:?}").contains("SECRET-KEY"));
    }
}
