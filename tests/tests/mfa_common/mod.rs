//! Shared by the `mfa_*` end-to-end tests: real psql/pg_dump runs (one through a
//! pseudo-terminal), the built `eastwall` binary, decision-log filters and extra operators.

#![allow(dead_code)] // each test file uses its own subset

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context};
use eastwall_e2e::sidecar::Deployment;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

pub const ALICE: &str = "spiffe://corp.example/app/operators/alice";
pub const BILLING: &str = "spiffe://corp.example/app/billing";
pub const LAPTOP: &str = "spiffe://corp.example/workstations/finance-laptop";

/// Longest any one client program may run before the test gives up on it.
pub const PROGRAM_TIMEOUT: Duration = Duration::from_secs(60);

/// The `eastwall` binary (built once per test process by the shared helper), off the runtime.
pub async fn eastwall_bin() -> anyhow::Result<PathBuf> {
    tokio::task::spawn_blocking(eastwall_e2e::eastwall_bin).await?
}

/// A client program with a clean libpq environment: no inherited PG* settings, no
/// ~/.pgpass, no psqlrc.
pub fn libpq_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    cmd.env("PGPASSFILE", "/nonexistent/eastwall-e2e-pgpass")
        .env("PGCONNECT_TIMEOUT", "10")
        .env("PSQLRC", "/nonexistent/eastwall-e2e-psqlrc")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs a program to the end (bounded), capturing its output.
pub async fn output(mut cmd: Command) -> anyhow::Result<Output> {
    let run = cmd.output();
    tokio::time::timeout(PROGRAM_TIMEOUT, run)
        .await
        .map_err(|_| anyhow!("{cmd:?} did not finish within {PROGRAM_TIMEOUT:?}"))?
        .with_context(|| format!("running {cmd:?}"))
}

/// `psql -X -w -At -c SQL` against `conninfo`, with `PGPASSWORD` when given. `-w`: a
/// password request without a password is an error instead of a prompt.
pub async fn psql(conninfo: &str, sql: &str, password: Option<&str>) -> anyhow::Result<Output> {
    let mut cmd = libpq_command("psql");
    cmd.args(["-X", "-w", "-At", "-d", conninfo, "-c", sql]);
    if let Some(pw) = password {
        cmd.env("PGPASSWORD", pw);
    }
    output(cmd).await
}

/// What a person at a terminal saw.
pub struct TerminalRun {
    /// Everything the program wrote to the terminal (prompt, results, errors).
    pub screen: String,
    pub success: bool,
    /// Whether the prompt showed.
    pub prompted: bool,
}

/// Runs `psql -X -d CONNINFO -c SQL` on a pseudo-terminal and, like a person, types
/// `answer()` followed by Enter once the password prompt is on screen.
pub async fn psql_on_terminal(
    conninfo: &str,
    sql: &str,
    answer: impl FnOnce() -> String,
) -> anyhow::Result<TerminalRun> {
    let psql = format!(
        "psql -X -P pager=off -d {} -c {}",
        shell_quote(conninfo),
        shell_quote(sql)
    );
    on_terminal(&psql, "Password", answer).await
}

/// Runs a shell command line on a pseudo-terminal (util-linux `script` makes it the controlling
/// terminal) and types `answer()` and Enter once `prompt` shows. psql discards tty input that
/// arrives before it prompts, so the answer is computed and typed only after the prompt.
pub async fn on_terminal(
    command_line: &str,
    prompt: &str,
    answer: impl FnOnce() -> String,
) -> anyhow::Result<TerminalRun> {
    let mut cmd = libpq_command("script");
    cmd.args(["-qec", command_line, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting script(1)")?;
    let mut stdin = child.stdin.take().context("script's stdin")?;
    let mut stdout = child.stdout.take().context("script's stdout")?;
    let mut answer = Some(answer);
    let mut screen = Vec::new();
    let mut prompted = false;
    let deadline = tokio::time::Instant::now() + PROGRAM_TIMEOUT;
    let mut buf = [0u8; 4096];
    loop {
        let n = match tokio::time::timeout_at(deadline, stdout.read(&mut buf)).await {
            Ok(n) => n?,
            Err(_) => bail!(
                "{command_line} on a terminal did not finish within {PROGRAM_TIMEOUT:?}; screen so far:\n{}",
                String::from_utf8_lossy(&screen)
            ),
        };
        if n == 0 {
            break;
        }
        screen.extend_from_slice(&buf[..n]);
        if !prompted && String::from_utf8_lossy(&screen).contains(prompt) {
            prompted = true;
            if let Some(answer) = answer.take() {
                let line = format!("{}\n", answer());
                stdin.write_all(line.as_bytes()).await?;
                stdin.flush().await?;
            }
        }
    }
    // stdin stays open until psql is done: script ends the session on its EOF.
    let status = tokio::time::timeout_at(deadline, child.wait())
        .await
        .map_err(|_| anyhow!("script(1) did not exit after psql's output ended"))??;
    drop(stdin);
    Ok(TerminalRun {
        screen: String::from_utf8_lossy(&screen).replace('\r', ""),
        success: status.success(),
        prompted,
    })
}

pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A six-digit code that is none of the codes alice's authenticator could show around `now`.
pub fn wrong_code(d: &Deployment, now: SystemTime) -> String {
    let near: Vec<String> = [-60i64, -30, 0, 30, 60]
        .iter()
        .map(|s| {
            let t = if *s < 0 {
                now - Duration::from_secs(s.unsigned_abs())
            } else {
                now + Duration::from_secs(*s as u64)
            };
            d.alice_code(t)
        })
        .collect();
    (0..10u32)
        .map(|i| format!("{:06}", i * 111_111))
        .find(|c| !near.contains(c))
        .unwrap_or_else(|| "123456".into())
}

/// Decision lines about `spiffe_id`.
pub fn lines_for(d: &Deployment, spiffe_id: &str) -> anyhow::Result<Vec<Value>> {
    Ok(d.decisions()?
        .into_iter()
        .filter(|l| l["spiffe_id"] == spiffe_id)
        .collect())
}

pub fn event(line: &Value) -> &str {
    line["event"].as_str().unwrap_or("")
}

/// Lines whose event starts with `mfa_`.
pub fn mfa_lines(lines: &[Value]) -> Vec<&Value> {
    lines
        .iter()
        .filter(|l| event(l).starts_with("mfa_"))
        .collect()
}

/// The `connect` lines that admitted someone.
pub fn admissions(lines: &[Value]) -> Vec<&Value> {
    lines
        .iter()
        .filter(|l| event(l) == "connect" && l["decision"] == "allow")
        .collect()
}

/// Renders lines for assertion messages.
pub fn show(lines: &[Value]) -> String {
    lines
        .iter()
        .map(|l| l.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A certificate and key written to files, for psql and `mfa login`.
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Issues another certificate for `spiffe_id` from the deployment's CA and writes it next to
/// the quickstart ones as `certs/<name>.pem` / `.key`.
pub fn issue_cert(d: &Deployment, spiffe_id: &str, name: &str) -> anyhow::Result<CertFiles> {
    let ca = eastwall_ca::Ca::open(&d.layout.dir.join("ca"))?;
    let req = eastwall_ca::IssueRequest::new(eastwall_ca::SpiffeId::parse(spiffe_id)?);
    let issued = ca.issue(&req)?;
    let (cert, key) = issued.write(&d.layout.dir.join("certs").join(name))?;
    Ok(CertFiles {
        cert,
        key: key.context("a fresh key was written")?,
        cert_pem: issued.cert_pem.clone(),
        key_pem: issued.key_pem.clone().unwrap_or_default(),
    })
}

/// A tokio-postgres connection through the proxy presenting `cert`.
pub async fn connect_as(
    d: &Deployment,
    cert: &CertFiles,
    role: &str,
    password: Option<&str>,
) -> anyhow::Result<Result<tokio_postgres::Client, tokio_postgres::Error>> {
    let tls = eastwall_e2e::client_config(&d.ca_pem(), Some((&cert.cert_pem, &cert.key_pem)))?;
    let mut config = d.pg_config(role, "postgres");
    if let Some(pw) = password {
        config.password(pw);
    }
    Ok(eastwall_e2e::connect_with(&config, tls).await)
}

/// libpq conninfo presenting `cert` (for identities the quickstart did not issue).
pub fn conninfo_with(d: &Deployment, cert: &CertFiles, role: &str) -> String {
    format!(
        "host=localhost hostaddr=127.0.0.1 port={} user={role} dbname=postgres sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
        d.addr().port(),
        d.layout.ca_cert.display(),
        cert.cert.display(),
        cert.key.display(),
    )
}

/// The error of a connection that must have been refused; `what` names it when it was not.
pub fn refused<T>(
    result: Result<T, tokio_postgres::Error>,
    what: &str,
) -> anyhow::Result<tokio_postgres::Error> {
    match result {
        Ok(_) => Err(anyhow!("connection admitted; expected: {what}")),
        Err(err) => Ok(err),
    }
}

/// The SQLSTATE of a failed connection, for assertions.
pub fn sqlstate(err: &tokio_postgres::Error) -> Option<&str> {
    err.code().map(|c| c.code())
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
