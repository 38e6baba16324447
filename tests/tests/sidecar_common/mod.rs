//! Helpers the `sidecar_*` end-to-end tests share: raw wire-protocol clients (plaintext and
//! TLS) with bounded reads, decision-log assertions, and the "proxy still serves" check.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, BufMut, BytesMut};
use eastwall_e2e::sidecar::Deployment;
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Longest any single raw read may wait.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// billing's SPIFFE ID, as the decision log names it.
pub const BILLING_ID: &str = "spiffe://corp.example/app/billing";

/// SSLRequest.
pub fn ssl_request() -> BytesMut {
    let mut buf = BytesMut::new();
    eastwall::codec::put_ssl_request(&mut buf);
    buf
}

/// GSSENCRequest (length 8, code 1234.5680).
pub fn gssenc_request() -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32(8);
    buf.put_u32(eastwall::codec::GSSENC_REQUEST_CODE);
    buf
}

/// A protocol 3.0 StartupMessage.
pub fn startup(user: &str, database: &str) -> BytesMut {
    let mut buf = BytesMut::new();
    eastwall::codec::put_startup(&mut buf, &[("user", user), ("database", database)]);
    buf
}

/// A StartupMessage with an explicit protocol version and parameters.
pub fn startup_with_version(version: u32, params: &[(&str, &str)]) -> BytesMut {
    let mut body = BytesMut::new();
    body.put_u32(version);
    for (k, v) in params {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut buf = BytesMut::new();
    buf.put_u32(body.len() as u32 + 4);
    buf.put_slice(&body);
    buf
}

/// A simple Query message.
pub fn query(sql: &str) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u8(b'Q');
    buf.put_u32(sql.len() as u32 + 5);
    buf.put_slice(sql.as_bytes());
    buf.put_u8(0);
    buf
}

/// A CancelRequest.
pub fn cancel_request(pid: u32, key: &[u8]) -> BytesMut {
    let mut buf = BytesMut::new();
    eastwall::codec::put_cancel_request(&mut buf, pid, key);
    buf
}

pub async fn tcp(d: &Deployment) -> anyhow::Result<TcpStream> {
    let stream = timeout(READ_TIMEOUT, TcpStream::connect(d.addr()))
        .await
        .context("connecting to the proxy timed out")??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads until EOF (or a reset) within `limit`; fails if the peer keeps the connection open.
pub async fn read_to_close<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> anyhow::Result<Vec<u8>> {
    let mut all = Vec::new();
    let read = timeout(limit, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => all.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    match read {
        Ok(()) => Ok(all),
        Err(_) => bail!(
            "the proxy kept the connection open for {limit:?} (received {} bytes: {:?})",
            all.len(),
            String::from_utf8_lossy(&all)
        ),
    }
}

/// One backend message: tag and body.
#[derive(Debug, Clone)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// ErrorResponse / NoticeResponse fields by their code byte.
    pub fn field(&self, code: u8) -> Option<String> {
        let mut rest = &self.body[..];
        while let Some((&c, tail)) = rest.split_first() {
            if c == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0)?;
            if c == code {
                return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
            }
            rest = &tail[end + 1..];
        }
        None
    }
}

/// Reads backend messages, buffering across calls.
pub struct MsgReader<S> {
    pub stream: S,
    buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> MsgReader<S> {
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// The next message within `limit`; `Ok(None)` at EOF.
    pub async fn next_within(&mut self, limit: Duration) -> anyhow::Result<Option<Msg>> {
        timeout(limit, self.next())
            .await
            .map_err(|_| anyhow!("no message from the proxy within {limit:?}"))?
    }

    async fn next(&mut self) -> anyhow::Result<Option<Msg>> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if !(4..=1 << 24).contains(&len) {
                    bail!("bad message length {len}");
                }
                if self.buf.len() > len {
                    let tag = self.buf.get_u8();
                    self.buf.advance(4);
                    let body = self.buf.split_to(len - 4).to_vec();
                    return Ok(Some(Msg { tag, body }));
                }
            }
            let n = match self.stream.read_buf(&mut self.buf).await {
                Ok(n) => n,
                Err(_) if self.buf.is_empty() => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                bail!("EOF inside a message ({} bytes buffered)", self.buf.len());
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads up to and including ReadyForQuery; returns every message.
    pub async fn until_ready(&mut self) -> anyhow::Result<Vec<Msg>> {
        let mut seen = Vec::new();
        loop {
            match self.next_within(READ_TIMEOUT).await? {
                Some(msg) => {
                    let done = msg.tag == b'Z';
                    seen.push(msg);
                    if done {
                        return Ok(seen);
                    }
                }
                None => bail!("connection closed before ReadyForQuery; saw {seen:?}"),
            }
        }
    }
}

/// TLS over an already-connected socket, verifying the proxy as `localhost`.
pub async fn tls_over(
    tcp: TcpStream,
    config: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from("localhost").map_err(std::io::Error::other)?;
    timeout(READ_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// A raw session through the proxy: SSLRequest, TLS as `name`, startup as `role`, read up to
/// ReadyForQuery. Returns the reader and the proxy's BackendKeyData.
pub async fn raw_session(
    d: &Deployment,
    name: &str,
    role: &str,
) -> anyhow::Result<(
    MsgReader<tokio_rustls::client::TlsStream<TcpStream>>,
    u32,
    Vec<u8>,
)> {
    let mut tcp = tcp(d).await?;
    tcp.write_all(&ssl_request()).await?;
    let mut answer = [0u8; 1];
    timeout(READ_TIMEOUT, tcp.read_exact(&mut answer)).await??;
    if answer[0] != b'S' {
        bail!("proxy answered {:?} to SSLRequest", answer[0] as char);
    }
    let tls = tls_over(tcp, d.tls_for(name)?).await?;
    let mut reader = MsgReader::new(tls);
    reader.send(&startup(role, "postgres")).await?;
    let msgs = reader.until_ready().await?;
    let key = msgs
        .iter()
        .find(|m| m.tag == b'K')
        .ok_or_else(|| anyhow!("no BackendKeyData in {msgs:?}"))?;
    let pid = u32::from_be_bytes(key.body[..4].try_into()?);
    Ok((reader, pid, key.body[4..].to_vec()))
}

/// billing can still connect and run a query through the proxy.
pub async fn assert_still_serves(d: &Deployment) -> anyhow::Result<()> {
    let client = timeout(READ_TIMEOUT, d.connect("billing", "billing"))
        .await
        .context("billing's connection timed out")?
        .context("billing is no longer served")?;
    let row = client.query_one("select 41 + 1", &[]).await?;
    assert_eq!(row.get::<_, i32>(0), 42);
    Ok(())
}

/// Waits for a line matching `pred`, then checks (after the log has had time to settle)
/// that it is the only one, and returns it.
pub async fn one_decision(d: &Deployment, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let line = d.wait_for_decision(&pred).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let all: Vec<Value> = d.decisions()?.into_iter().filter(|l| pred(l)).collect();
    if all.len() != 1 {
        bail!("expected exactly one matching decision line, got {all:#?}");
    }
    Ok(line)
}

/// Lines whose reason is `reason`.
pub fn with_reason(d: &Deployment, reason: &str) -> anyhow::Result<Vec<Value>> {
    Ok(d.decisions()?
        .into_iter()
        .filter(|l| l["reason"] == reason)
        .collect())
}

/// A PostgreSQL client binary (psql, pgbench): PATH first, then the Debian layout.
pub fn pg_binary(name: &str) -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    for dir in candidates {
        let path = dir.join(name);
        if path.is_file() {
            return path;
        }
    }
    for version in ["17", "16", "15", "14"] {
        let path = PathBuf::from(format!("/usr/lib/postgresql/{version}/bin/{name}"));
        if path.is_file() {
            return path;
        }
    }
    PathBuf::from(name)
}

/// Runs a client binary with a hard time limit; returns (success, stdout, stderr).
pub async fn run_client(
    program: &str,
    args: &[&str],
    limit: Duration,
) -> anyhow::Result<(bool, String, String)> {
    let mut cmd = tokio::process::Command::new(pg_binary(program));
    cmd.args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD")
        .env_remove("PGSERVICE")
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let out = timeout(limit, cmd.output())
        .await
        .map_err(|_| anyhow!("{program} {args:?} did not finish within {limit:?}"))?
        .with_context(|| format!("running {program}"))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Lets billing create tables: PostgreSQL 15 no longer grants CREATE on schema public to all.
pub fn let_billing_create(d: &Deployment) -> anyhow::Result<()> {
    d.cluster
        .run_sql("grant all on schema public to billing")
        .map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}
