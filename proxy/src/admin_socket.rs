//! The administrative Unix socket: `eastwall sessions` and `eastwall sessions kill` talk to
//! the running sidecar here, never over a TCP port.
//!
//! # Protocol
//!
//! One request per connection: the client sends one line of JSON (at most
//! [`MAX_REQUEST`] bytes, newline included) within [`REQUEST_TIMEOUT`]; the sidecar answers
//! one line of JSON and closes.
//!
//! ```text
//! -> {"verb":"list"}
//! <- {"ok":true,"sessions":[{"conn_id":"…","spiffe_id":"…","serial":"…","source":"…",
//!     "role":"…","database":"…","started":1700000000,"not_after":1700003600,
//!     "bytes_client_to_server":0,"bytes_server_to_client":0,"mfa":null,"rule":"…",
//!     "ending":null}]}
//! -> {"verb":"kill","conn_id":"…","message":"optional text"}
//! <- {"ok":true,"ended":"…"}
//! <- {"ok":false,"error":"no live session has connection id …"}
//! ```
//!
//! Anything else (not JSON, an unknown verb or field, a line too long, no newline in time)
//! gets `{"ok":false,"error":…}` and the connection is closed; nothing else happens.
//!
//! # Who may talk
//!
//! The socket is created mode 0600 (bound under a temporary name, restricted, then renamed
//! into place, so it is never reachable with wider rights), and each peer's credentials are
//! checked too: only the socket's owner (the sidecar's user) and root. A path that exists
//! and is not a stale socket (one nobody answers on) stops the start: a live one is another
//! sidecar. The socket is removed when the sidecar stops.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};

use crate::relay::EndReason;
use crate::sidecar::Sidecar;

/// The longest request line, newline included.
pub const MAX_REQUEST: usize = 4096;
/// How long a client has to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest kill message (it reaches the killed client's FATAL and the decision log).
pub const MAX_MESSAGE: usize = 256;
/// Requests served at once; more wait their turn in the kernel's backlog.
const CONCURRENT: usize = 8;
/// What the killed client reads when the administrator gave no message.
pub const DEFAULT_KILL_MESSAGE: &str = "killed by an administrator";

/// A request, as the client sends it.
#[derive(Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(tag = "verb", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    List {},
    Kill {
        conn_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
}

/// Why the admin socket cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {path}: {message}")]
    Setup { path: PathBuf, message: String },
}

fn setup(path: &Path, message: impl Into<String>) -> AdminError {
    AdminError::Setup {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The bound socket; removes its file when dropped (only if the file is still this socket).
pub struct AdminSocket {
    path: PathBuf,
    identity: (u64, u64),
    owner: u32,
    listener: Option<UnixListener>,
}

impl AdminSocket {
    /// Binds `path` with mode 0600. A stale socket there is replaced; anything else is an error.
    pub fn bind(path: &Path) -> Result<AdminSocket, AdminError> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => {
                        return Err(setup(
                            path,
                            "another process (a running sidecar?) answers on it; stop it or set [admin] socket to another path",
                        ))
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => {
                        std::fs::remove_file(path).map_err(|e| {
                            setup(path, format!("cannot remove the stale socket: {e}"))
                        })?;
                    }
                    Err(err) => {
                        return Err(setup(
                            path,
                            format!("exists and cannot be checked ({err}); remove it if no sidecar runs"),
                        ))
                    }
                }
            }
            Ok(_) => {
                return Err(setup(
                    path,
                    "exists and is not a socket; refusing to replace it (set [admin] socket to another path)",
                ))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(setup(path, format!("cannot be checked: {err}"))),
        }
        let name = path
            .file_name()
            .ok_or_else(|| setup(path, "expected a file name"))?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".{}.tmp", std::process::id()));
        let temp = path.with_file_name(temp_name);
        let _ = std::fs::remove_file(&temp);
        let std_listener = std::os::unix::net::UnixListener::bind(&temp)
            .map_err(|e| setup(path, format!("cannot listen: {e}")))?;
        let restricted = std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&temp, path));
        if let Err(err) = restricted {
            let _ = std::fs::remove_file(&temp);
            return Err(setup(
                path,
                format!("cannot restrict it to mode 0600: {err}"),
            ));
        }
        let meta = std::fs::symlink_metadata(path)
            .map_err(|e| setup(path, format!("cannot be checked: {e}")))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| setup(path, format!("cannot listen: {e}")))?;
        let listener = UnixListener::from_std(std_listener)
            .map_err(|e| setup(path, format!("cannot listen: {e}")))?;
        Ok(AdminSocket {
            path: path.to_path_buf(),
            identity: (meta.dev(), meta.ino()),
            owner: meta.uid(),
            listener: Some(listener),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves requests until `stop` changes.
    pub fn serve(&mut self, sidecar: Arc<Sidecar>, mut stop: watch::Receiver<bool>) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        let owner = self.owner;
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(CONCURRENT));
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stop.changed() => return,
                };
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let sidecar = sidecar.clone();
                tokio::spawn(async move {
                    serve_one(&sidecar, stream, owner).await;
                    drop(permit);
                });
            }
        });
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        // Only our own socket: a newer sidecar may have replaced a stale one of ours.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.identity {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

fn error(message: impl Into<String>) -> Value {
    json!({"ok": false, "error": message.into()})
}

async fn serve_one(sidecar: &Sidecar, stream: UnixStream, owner: u32) {
    let allowed = stream
        .peer_cred()
        .is_ok_and(|cred| cred.uid() == owner || cred.uid() == 0);
    let (mut read, mut write) = stream.into_split();
    let answer = if allowed {
        match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut read)).await {
            Err(_) => error(format!(
                "no request line within {}s",
                REQUEST_TIMEOUT.as_secs()
            )),
            Ok(Err(message)) => error(message),
            Ok(Ok(request)) => answer(sidecar, request),
        }
    } else {
        tracing::warn!("admin socket: a peer that is not the sidecar's user was refused");
        error("only the sidecar's own user (or root) may use this socket")
    };
    let mut line = answer.to_string();
    line.push('\n');
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        write.write_all(line.as_bytes()).await?;
        write.shutdown().await
    })
    .await;
    // Closing with unread input would reset the connection and lose the answer (a client
    // still writing an oversized line must still learn why): read what is left, bounded in
    // bytes and time, then close.
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        use tokio::io::AsyncReadExt;
        tokio::io::copy(&mut (&mut read).take(DRAIN_MAX), &mut tokio::io::sink()).await
    })
    .await;
}

/// How much unread input is drained after an answer, and for how long at most.
const DRAIN_MAX: u64 = 4 * 1024 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads one request line of at most [`MAX_REQUEST`] bytes and parses it.
async fn read_request(read: &mut tokio::net::unix::OwnedReadHalf) -> Result<Request, String> {
    use tokio::io::AsyncReadExt;
    let mut line = Vec::with_capacity(256);
    // One byte more than allowed tells a line that is too long from one that fits.
    let mut limited = BufReader::new(read.take(MAX_REQUEST as u64 + 1));
    limited
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("cannot read the request: {e}"))?;
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    if line.last() != Some(&b'\n') {
        return Err("expected one JSON request line ending in a newline".into());
    }
    parse_request(&line)
}

/// Parses one request line (JSON, newline optional).
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line).map_err(|_| "the request is not UTF-8".to_owned())?;
    let request: Request = serde_json::from_str(text.trim_end()).map_err(|e| {
        format!("expected {{\"verb\":\"list\"}} or {{\"verb\":\"kill\",\"conn_id\":…}}: {e}")
    })?;
    if let Request::Kill {
        message: Some(message),
        ..
    } = &request
    {
        check_message(message)?;
    }
    Ok(request)
}

/// A kill message reaches a client and the log: printable text, not too long.
pub fn check_message(message: &str) -> Result<(), String> {
    if message.len() > MAX_MESSAGE {
        return Err(format!("message longer than {MAX_MESSAGE} bytes"));
    }
    if message.trim().is_empty() {
        return Err("message is empty".into());
    }
    if message.chars().any(char::is_control) {
        return Err("message contains control characters".into());
    }
    Ok(())
}

fn answer(sidecar: &Sidecar, request: Request) -> Value {
    match request {
        Request::List {} => json!({"ok": true, "sessions": sidecar.sessions.list()}),
        Request::Kill { conn_id, message } => {
            let message = message.unwrap_or_else(|| DEFAULT_KILL_MESSAGE.to_owned());
            if sidecar
                .sessions
                .end(&conn_id, EndReason::Killed { message })
            {
                tracing::info!(conn.id = %conn_id, "admin socket: session killed");
                json!({"ok": true, "ended": conn_id})
            } else {
                let mut shown = conn_id;
                crate::refusals::cap_in_place(&mut shown, 64);
                error(format!("no live session has connection id {shown:?}"))
            }
        }
    }
}

/// The client side: sends `request` to the socket and returns the answer, or why not.
pub fn call(socket: &Path, request: &Request) -> anyhow::Result<Value> {
    use anyhow::Context;
    use std::io::{BufRead, Write};

    let stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the sidecar's admin socket {} (is `eastwall proxy` running with this config?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    (&stream).write_all(line.as_bytes())?;
    let mut answer = String::new();
    std::io::BufReader::new(std::io::Read::take(&stream, 64 * 1024 * 1024))
        .read_line(&mut answer)
        .context("no answer from the sidecar")?;
    let answer: Value =
        serde_json::from_str(answer.trim_end()).context("the sidecar's answer is not JSON")?;
    if answer["ok"] != true {
        anyhow::bail!(
            "{}",
            answer["error"]
                .as_str()
                .unwrap_or("the sidecar refused the request")
        );
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        assert_eq!(
            parse_request(b"{\"verb\":\"list\"}\n"),
            Ok(Request::List {})
        );
        assert_eq!(
            parse_request(br#"{"verb":"kill","conn_id":"abc"}"#),
            Ok(Request::Kill {
                conn_id: "abc".into(),
                message: None
            })
        );
        for bad in [
            &b"garbage"[..],
            b"{}",
            b"{\"verb\":\"reboot\"}",
            b"{\"verb\":\"list\",\"extra\":1}",
            b"{\"verb\":\"kill\"}",
            b"\xff\xfe",
            b"{\"verb\":\"kill\",\"conn_id\":\"a\",\"message\":\"line\\nbreak\"}",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
        let long = format!(
            r#"{{"verb":"kill","conn_id":"a","message":"{}"}}"#,
            "x".repeat(MAX_MESSAGE + 1)
        );
        assert!(parse_request(long.as_bytes()).is_err());
    }

    #[test]
    fn a_path_that_is_not_a_socket_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eastwall.sock");
        std::fs::write(&path, "precious").unwrap();
        let err = AdminSocket::bind(&path).err().expect("refused");
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_a_live_one_is_not_and_the_file_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("eastwall.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let first = AdminSocket::bind(&path).expect("stale socket replaced");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = AdminSocket::bind(&path).err().expect("live socket kept");
        assert!(err.to_string().contains("answers on it"), "{err}");
        drop(first);
        assert!(!path.exists(), "removed when dropped");
    }
}
