//! A private `nats-server -js` for `eastwall demo --fleet`: one loopback listener on a free
//! port, TLS from the demo's CA with client certificates required (`verify: true`), and a
//! JetStream store in the demo's workspace. Modeled on the tests' harness (tests/src/nats.rs),
//! which the binary cannot use. Stopped (SIGTERM, then SIGKILL, bounded) when dropped.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use eastwall_ca::{Ca, IssueRequest, SpiffeId};

use super::DemoError;

/// How long the server may take to serve clients.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long it may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The nats-server binary: `$EASTWALL_NATS_SERVER`, else `nats-server` on PATH, else
/// /usr/sbin, /usr/local/sbin or /usr/local/bin.
pub fn find_bin() -> Result<PathBuf, DemoError> {
    if let Some(path) = std::env::var_os("EASTWALL_NATS_SERVER") {
        let path = PathBuf::from(path);
        if is_executable(&path) {
            return Ok(path);
        }
        return Err(DemoError::Nats(format!(
            "EASTWALL_NATS_SERVER={} is not an executable file",
            path.display()
        )));
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/local/bin"].map(PathBuf::from))
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            DemoError::Nats(
                "nats-server not found on PATH or in /usr/sbin; the fleet demo needs it: \
                 `apt-get install nats-server` (or set EASTWALL_NATS_SERVER)"
                    .into(),
            )
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A running nats-server; stopped on drop.
pub struct Nats {
    bin: PathBuf,
    child: Option<Child>,
    port: u16,
    log_path: PathBuf,
}

impl Nats {
    /// Starts `bin` with its files in `dir` (created), its certificate issued by `ca`.
    pub fn start(bin: PathBuf, ca: &Ca, dir: &Path) -> Result<Nats, DemoError> {
        let io = |what: String| DemoError::io(what);
        std::fs::create_dir_all(dir.join("jetstream"))
            .map_err(io(format!("cannot create {}", dir.display())))?;
        let td = ca.trust_domain().as_str().to_owned();
        let id = SpiffeId::parse(&format!("spiffe://{td}/nats/server"))
            .map_err(|e| DemoError::Nats(format!("the server's SPIFFE ID: {e}")))?;
        let mut request = IssueRequest::new(id);
        request.ttl = Duration::from_secs(24 * 3600);
        request.dns = vec!["localhost".to_owned()];
        request.ips = vec![Ipv4Addr::LOCALHOST.into()];
        let (cert_file, key_file) = ca.issue(&request)?.write(&dir.join("server"))?;
        let key_file =
            key_file.ok_or_else(|| DemoError::Nats("no key was written for nats-server".into()))?;
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.bundle_pem())
            .map_err(io(format!("cannot write {}", ca_file.display())))?;
        let conf_path = dir.join("nats.conf");
        let log_path = dir.join("nats-server.log");

        // A port free when asked may be taken before nats-server binds it: a few tries.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port()?;
            let conf = conf(
                port,
                &dir.join("jetstream"),
                &cert_file,
                &key_file,
                &ca_file,
            );
            std::fs::write(&conf_path, conf)
                .map_err(io(format!("cannot write {}", conf_path.display())))?;
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(io(format!("cannot open {}", log_path.display())))?;
            let stderr = log
                .try_clone()
                .map_err(io("cannot duplicate the nats-server log handle".into()))?;
            let child = Command::new(&bin)
                .arg("-c")
                .arg(&conf_path)
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(Stdio::from(log))
                .stderr(Stdio::from(stderr))
                .spawn()
                .map_err(io(format!("cannot start {}", bin.display())))?;
            let mut nats = Nats {
                bin: bin.clone(),
                child: Some(child),
                port,
                log_path: log_path.clone(),
            };
            match nats.wait_serving() {
                Ok(()) => return Ok(nats),
                Err(detail) => {
                    nats.stop();
                    let tail = nats.log_tail(20);
                    if attempt < 3 && tail.contains("address already in use") {
                        continue;
                    }
                    return Err(DemoError::Nats(format!(
                        "nats-server on 127.0.0.1:{port} did not start: {detail}\n--- {} (tail):\n{tail}",
                        log_path.display()
                    )));
                }
            }
        }
    }

    /// `tls://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    /// Waits (bounded) for an `INFO` line announcing JetStream, sent in plain text before TLS.
    fn wait_serving(&mut self) -> Result<(), String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last = String::from("nothing accepted a connection");
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("nats-server exited: {status}"));
                }
            }
            match read_info(addr) {
                Ok(info) if info.contains("\"jetstream\":true") => return Ok(()),
                Ok(info) => last = format!("INFO without JetStream: {info}"),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "not serving after {START_TIMEOUT:?} (last: {last})"
        ))
    }

    fn log_tail(&self, lines: usize) -> String {
        let Ok(file) = std::fs::File::open(&self.log_path) else {
            return String::new();
        };
        let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM (nats-server signals its own PID: no unsafe code), a bounded wait, SIGKILL.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let signalled = Command::new(&self.bin)
            .arg("--signal")
            .arg(format!("term={}", child.id()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if signalled {
            let deadline = Instant::now() + STOP_TIMEOUT;
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
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The server's config: loopback only, JetStream on disk, TLS with client certificates from
/// the demo's CA required. No monitoring port, no cluster, no leaf nodes.
fn conf(port: u16, store: &Path, cert: &Path, key: &Path, ca: &Path) -> String {
    let mut c = String::new();
    let _ = writeln!(c, "# Written by `eastwall demo --fleet`.");
    let _ = writeln!(c, "listen: \"127.0.0.1:{port}\"");
    let _ = writeln!(c, "server_name: \"eastwall-demo-{port}\"");
    let _ = writeln!(c, "jetstream {{");
    let _ = writeln!(c, "  store_dir: {}", quote(store));
    let _ = writeln!(c, "  max_memory_store: 64MB");
    let _ = writeln!(c, "  max_file_store: 256MB");
    let _ = writeln!(c, "}}");
    let _ = writeln!(c, "tls {{");
    let _ = writeln!(c, "  cert_file: {}", quote(cert));
    let _ = writeln!(c, "  key_file: {}", quote(key));
    let _ = writeln!(c, "  ca_file: {}", quote(ca));
    let _ = writeln!(c, "  verify: true");
    let _ = writeln!(c, "  timeout: 2");
    let _ = writeln!(c, "}}");
    c
}

/// A path as a quoted config string (nats-server takes JSON-style escapes).
fn quote(path: &Path) -> String {
    let s = path.to_string_lossy();
    serde_json::to_string(&s).unwrap_or_else(|_| format!("{s:?}"))
}

fn free_port() -> Result<u16, DemoError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(DemoError::io("cannot find a free port for nats-server"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(DemoError::io("cannot find a free port for nats-server"))
}

/// Connects, reads the first line (`INFO {...}`) and hangs up.
fn read_info(addr: SocketAddr) -> Result<String, String> {
    let stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(std::io::Read::take(stream, 64 * 1024))
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if !line.starts_with("INFO ") {
        return Err(format!("expected INFO, read {line:?}"));
    }
    Ok(line.trim_end().to_owned())
}
