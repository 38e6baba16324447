//! The proxy's own login to PostgreSQL as the granted role: `trust`, SCRAM-SHA-256 with a
//! secret the proxy holds, or a TLS client certificate whose CN is the role.
//!
//! Client credentials are never relayed: SCRAM channel binding cannot survive a proxy that
//! terminates TLS (protocol-security item 25), so the client's authentication ends here.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use eastwall_config::{
    FileStamp, PasswordSource, Secret, UpstreamLogin, UpstreamSettings, UpstreamTarget,
};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::codec::{self, AuthRequest, ErrorFields};
use crate::tls;

/// Why the proxy could not open a session upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream PostgreSQL at {target} is unreachable: {source}")]
    Connect { target: String, source: io::Error },
    #[error("upstream PostgreSQL at {target} did not answer within {timeout:?}")]
    Timeout { target: String, timeout: Duration },
    #[error("upstream PostgreSQL at {target} refused TLS; Eastwall never falls back to plaintext")]
    TlsRefused { target: String },
    #[error("TLS to upstream PostgreSQL at {target} failed: {source}")]
    Tls { target: String, source: io::Error },
    #[error("upstream PostgreSQL refused the login")]
    Rejected { fields: ErrorFields, raw: Bytes },
    #[error("upstream PostgreSQL asked for {0} authentication; configure scram-sha-256, trust or cert for Eastwall's login")]
    UnsupportedAuth(&'static str),
    #[error("no upstream credential for role {role:?}: {why}")]
    NoCredential { role: String, why: String },
    #[error("upstream PostgreSQL broke the protocol: {0}")]
    Protocol(String),
    /// In password mode the server said AuthenticationOk without a completed SCRAM exchange
    /// whose server signature we checked: it never proved it knows the password, so it may be
    /// anyone listening at the upstream address.
    #[error("upstream at {target} accepted the login without proving it knows the password (no verified SCRAM exchange); refusing to send it any client data")]
    Unauthenticated { target: String },
    #[error("upstream PostgreSQL connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("upstream.server_name {0:?} is not a DNS name or IP address")]
    ServerName(String),
    #[error(transparent)]
    Secret(#[from] eastwall_config::ConfigError),
}

impl UpstreamError {
    /// The SQLSTATE the client sees.
    pub fn sqlstate(&self) -> &str {
        match self {
            UpstreamError::Rejected { fields, .. } => fields.code.as_deref().unwrap_or("08006"),
            UpstreamError::NoCredential { .. } | UpstreamError::UnsupportedAuth(_) => "28000",
            _ => "08006",
        }
    }
}

impl From<codec::CodecError> for UpstreamError {
    fn from(err: codec::CodecError) -> Self {
        UpstreamError::Protocol(err.to_string())
    }
}

/// A connection to PostgreSQL over whichever transport the config names.
pub enum UpstreamStream {
    Unix(UnixStream),
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Unix(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An upstream session that finished its login and is ready for the relay.
pub struct UpstreamSession {
    pub stream: UpstreamStream,
    /// The backend's own cancel key; clients only ever see the proxy's.
    pub backend_pid: u32,
    pub backend_key: Bytes,
    pub parameters: Vec<(String, String)>,
    pub transaction_status: u8,
    /// Messages PostgreSQL sent during login that the client must also see (notices).
    pub pending: BytesMut,
}

/// How to reach PostgreSQL and log in; built once from the settings.
pub struct Upstream {
    target: UpstreamTarget,
    connect_timeout: Duration,
    method: Method,
    /// `eastwall_upstream_login_duration_seconds`, when metrics are on.
    login_seconds: Option<prometheus_client::metrics::histogram::Histogram>,
}

enum Method {
    Trust,
    Scram(PasswordFile),
    Cert {
        cert_dir: PathBuf,
        ca: PathBuf,
        server_name: ServerName<'static>,
        /// One client config per role, built on first use: the certificate names the role.
        configs: Mutex<HashMap<String, Arc<ClientConfig>>>,
    },
}

/// SCRAM secrets: either one for every role, or `role:secret` lines (with `*:secret` as a
/// fallback) so each upstream role can have its own password.
struct Credentials {
    by_role: HashMap<String, Secret>,
    fallback: Option<Secret>,
}

/// The password source and what was last read from it. The file is looked at (one `stat`) on
/// every password login and read again when it changed, so a rotated password is used by the
/// next login without a restart.
struct PasswordFile {
    source: PasswordSource,
    current: Mutex<(Arc<Credentials>, Option<FileStamp>)>,
}

impl PasswordFile {
    fn open(source: &PasswordSource) -> Result<PasswordFile, UpstreamError> {
        let (secret, stamp) = source.read_stamped()?;
        Ok(PasswordFile {
            source: source.clone(),
            current: Mutex::new((Arc::new(Credentials::parse(secret)), stamp)),
        })
    }

    /// The credentials as the file holds them now. A changed file that cannot be used (made
    /// readable by others, emptied, removed) fails this login: the error says what to fix,
    /// and the next login tries again.
    fn credentials(&self) -> Result<Arc<Credentials>, UpstreamError> {
        let now = self.source.stamp();
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if now.is_some() && now == current.1 {
            return Ok(current.0.clone());
        }
        if let PasswordSource::Env(_) = self.source {
            return Ok(current.0.clone());
        }
        let (secret, stamp) = self.source.read_stamped().map_err(|err| {
            tracing::error!(%err, "upstream password file changed but cannot be used");
            err
        })?;
        tracing::info!("upstream password file changed; logins use the new contents");
        *current = (Arc::new(Credentials::parse(secret)), stamp);
        Ok(current.0.clone())
    }
}

impl Credentials {
    fn parse(secret: Secret) -> Credentials {
        let text = secret.expose();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.len() == 1 && !lines[0].contains(':') {
            return Credentials {
                by_role: HashMap::new(),
                fallback: Some(Secret::new(lines[0].trim().to_owned())),
            };
        }
        let mut by_role = HashMap::new();
        let mut fallback = None;
        for line in lines {
            if let Some((role, password)) = line.split_once(':') {
                let password = Secret::new(password.trim_end().to_owned());
                if role == "*" {
                    fallback = Some(password);
                } else {
                    by_role.insert(role.to_owned(), password);
                }
            }
        }
        Credentials { by_role, fallback }
    }

    fn for_role(&self, role: &str) -> Option<&Secret> {
        self.by_role.get(role).or(self.fallback.as_ref())
    }
}

impl Upstream {
    /// Prepares the upstream login from settings, reading the SCRAM secret now so a missing
    /// secret stops the proxy at start rather than failing each client.
    pub fn new(settings: &UpstreamSettings) -> Result<Upstream, UpstreamError> {
        let method = match &settings.login {
            UpstreamLogin::Trust => Method::Trust,
            UpstreamLogin::Password { user_secrets } => {
                Method::Scram(PasswordFile::open(user_secrets)?)
            }
            UpstreamLogin::Cert {
                cert_dir,
                ca,
                server_name,
            } => Method::Cert {
                cert_dir: cert_dir.clone(),
                ca: ca.clone(),
                server_name: ServerName::try_from(server_name.clone())
                    .map_err(|_| UpstreamError::ServerName(server_name.clone()))?,
                configs: Mutex::new(HashMap::new()),
            },
        };
        Ok(Upstream {
            target: settings.target.clone(),
            connect_timeout: settings.connect_timeout,
            method,
            login_seconds: None,
        })
    }

    /// Times every [`Upstream::login`] into `histogram`.
    pub fn with_login_histogram(
        mut self,
        histogram: prometheus_client::metrics::histogram::Histogram,
    ) -> Self {
        self.login_seconds = Some(histogram);
        self
    }

    /// Whether PostgreSQL accepts a connection right now: a plain connect, closed at once
    /// without a byte sent (PostgreSQL does not log such a connection), bounded by
    /// `connect_timeout`. For readiness probes; no session is opened.
    pub async fn reachable(&self) -> Result<(), UpstreamError> {
        self.connect_raw().await.map(drop)
    }

    /// Where PostgreSQL is, for messages.
    pub fn describe(&self) -> String {
        match &self.target {
            UpstreamTarget::Tcp { host, port } => format!("{host}:{port}"),
            UpstreamTarget::Unix { dir, port } => {
                format!("{}/.s.PGSQL.{port}", dir.display())
            }
        }
    }

    /// Opens a raw connection (no login): used for logins and for forwarding cancels.
    pub async fn connect_raw(&self) -> Result<UpstreamStream, UpstreamError> {
        let target = self.describe();
        let connect = async {
            match &self.target {
                UpstreamTarget::Tcp { host, port } => {
                    let stream = TcpStream::connect((host.as_str(), *port)).await?;
                    stream.set_nodelay(true)?;
                    Ok(UpstreamStream::Tcp(stream))
                }
                UpstreamTarget::Unix { dir, port } => {
                    let path = dir.join(format!(".s.PGSQL.{port}"));
                    Ok(UpstreamStream::Unix(UnixStream::connect(path).await?))
                }
            }
        };
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(source)) => Err(UpstreamError::Connect { target, source }),
            Err(_) => Err(UpstreamError::Timeout {
                target,
                timeout: self.connect_timeout,
            }),
        }
    }

    /// Sends a CancelRequest for a backend; PostgreSQL answers nothing and closes.
    pub async fn cancel(&self, pid: u32, key: &[u8]) -> Result<(), UpstreamError> {
        let mut stream = self.connect_raw().await?;
        let mut buf = BytesMut::new();
        codec::put_cancel_request(&mut buf, pid, key);
        stream.write_all(&buf).await?;
        stream.flush().await?;
        // Wait for PostgreSQL to close, so the cancel is processed before we report it.
        let mut sink = [0u8; 1];
        let _ = tokio::time::timeout(self.connect_timeout, stream.read(&mut sink)).await;
        Ok(())
    }

    /// Logs in as `role` to `database`, forwarding the client's other startup parameters.
    pub async fn login(
        &self,
        role: &str,
        database: &str,
        params: &[(&str, &str)],
    ) -> Result<UpstreamSession, UpstreamError> {
        let deadline = self.connect_timeout.saturating_mul(2);
        let target = self.describe();
        let started = std::time::Instant::now();
        let result =
            match tokio::time::timeout(deadline, self.login_inner(role, database, params)).await {
                Ok(result) => result,
                Err(_) => Err(UpstreamError::Timeout {
                    target,
                    timeout: deadline,
                }),
            };
        if let Some(histogram) = &self.login_seconds {
            histogram.observe(started.elapsed().as_secs_f64());
        }
        result
    }

    async fn login_inner(
        &self,
        role: &str,
        database: &str,
        params: &[(&str, &str)],
    ) -> Result<UpstreamSession, UpstreamError> {
        let mut stream = self.connect_raw().await?;
        if let Method::Cert { .. } = &self.method {
            stream = self.start_tls(stream, role).await?;
        }
        let mut out = BytesMut::new();
        let mut startup: Vec<(&str, &str)> = vec![("user", role), ("database", database)];
        startup.extend_from_slice(params);
        codec::put_startup(&mut out, &startup);
        stream.write_all(&out).await?;

        let mut inbuf = BytesMut::with_capacity(1024);
        let mut scram: Option<ScramSha256> = None;
        // Password mode trusts the server only after SCRAM's server signature checked out.
        let mut server_proved_password = false;
        let mut parameters = Vec::new();
        let mut backend = None;
        let mut pending = BytesMut::new();
        loop {
            let msg = read_message(&mut stream, &mut inbuf).await?;
            match msg.tag {
                b'R' => match codec::parse_auth_request(&msg.body)? {
                    AuthRequest::Ok => {
                        // trust means AuthenticationOk at once; cert mode verified the
                        // server's certificate (verify-full) before any byte was sent.
                        if let Method::Scram(_) = &self.method {
                            if !server_proved_password {
                                return Err(UpstreamError::Unauthenticated {
                                    target: self.describe(),
                                });
                            }
                        }
                    }
                    AuthRequest::Sasl(mechanisms) => {
                        if scram.is_some() {
                            return Err(UpstreamError::Protocol("a second SASL start".into()));
                        }
                        let secret = self.scram_secret(role)?;
                        if !mechanisms.iter().any(|m| m == "SCRAM-SHA-256") {
                            return Err(UpstreamError::UnsupportedAuth("an unknown SASL"));
                        }
                        let client = ScramSha256::new(
                            secret.expose().as_bytes(),
                            ChannelBinding::unsupported(),
                        );
                        out.clear();
                        codec::put_sasl_initial_response(
                            &mut out,
                            "SCRAM-SHA-256",
                            client.message(),
                        );
                        stream.write_all(&out).await?;
                        scram = Some(client);
                    }
                    AuthRequest::SaslContinue(data) => {
                        let client = scram.as_mut().ok_or_else(|| {
                            UpstreamError::Protocol("SASL continue without start".into())
                        })?;
                        client
                            .update(&data)
                            .map_err(|e| UpstreamError::Protocol(format!("SCRAM: {e}")))?;
                        out.clear();
                        codec::put_password_message(&mut out, client.message());
                        stream.write_all(&out).await?;
                    }
                    AuthRequest::SaslFinal(data) => {
                        let client = scram.as_mut().ok_or_else(|| {
                            UpstreamError::Protocol("SASL final without start".into())
                        })?;
                        // Verifies the server's signature: a server that does not know the
                        // secret cannot impersonate PostgreSQL to us.
                        client.finish(&data).map_err(|e| {
                            UpstreamError::Protocol(format!("SCRAM server proof: {e}"))
                        })?;
                        server_proved_password = true;
                    }
                    AuthRequest::Cleartext => {
                        return Err(UpstreamError::UnsupportedAuth("cleartext password"))
                    }
                    AuthRequest::Md5 => return Err(UpstreamError::UnsupportedAuth("md5")),
                    AuthRequest::Other(_) => {
                        return Err(UpstreamError::UnsupportedAuth("an unsupported"))
                    }
                },
                b'S' => parameters.push(codec::parse_parameter_status(&msg.body)?),
                b'K' => backend = Some(codec::parse_backend_key(&msg.body)?),
                b'N' => {
                    // Notices during login (e.g. a password about to expire) go to the client.
                    codec::put_raw(&mut pending, &msg);
                }
                b'E' => {
                    let mut raw = BytesMut::new();
                    codec::put_raw(&mut raw, &msg);
                    return Err(UpstreamError::Rejected {
                        fields: codec::parse_error_fields(&msg.body),
                        raw: raw.freeze(),
                    });
                }
                b'Z' => {
                    let status = msg.body.first().copied().unwrap_or(b'I');
                    let (backend_pid, backend_key) = backend.unwrap_or((0, Bytes::new()));
                    // Bytes after ReadyForQuery would be unprompted server messages; keep them.
                    pending.extend_from_slice(&inbuf);
                    return Ok(UpstreamSession {
                        stream,
                        backend_pid,
                        backend_key,
                        parameters,
                        transaction_status: status,
                        pending,
                    });
                }
                b'v' => {} // NegotiateProtocolVersion: we asked for 3.0 with no options.
                other => {
                    return Err(UpstreamError::Protocol(format!(
                        "unexpected message {:?} during login",
                        other as char
                    )))
                }
            }
        }
    }

    fn scram_secret(&self, role: &str) -> Result<Secret, UpstreamError> {
        match &self.method {
            Method::Scram(file) => file.credentials()?.for_role(role).cloned().ok_or_else(|| {
                UpstreamError::NoCredential {
                    role: role.to_owned(),
                    why: "the password file has no line for it".into(),
                }
            }),
            _ => Err(UpstreamError::UnsupportedAuth(
                "SCRAM (set upstream.login = \"password\")",
            )),
        }
    }

    async fn start_tls(
        &self,
        stream: UpstreamStream,
        role: &str,
    ) -> Result<UpstreamStream, UpstreamError> {
        let Method::Cert {
            cert_dir,
            ca,
            server_name,
            configs,
        } = &self.method
        else {
            return Ok(stream);
        };
        let UpstreamStream::Tcp(mut tcp) = stream else {
            // A Unix socket never leaves the host; TLS over it buys nothing and PG refuses it.
            return Err(UpstreamError::NoCredential {
                role: role.to_owned(),
                why: "cert login needs a TCP upstream (PostgreSQL does not do TLS on Unix sockets)"
                    .into(),
            });
        };
        let config = client_config_for(configs, cert_dir, ca, role)?;
        let target = self.describe();
        let mut out = BytesMut::new();
        codec::put_ssl_request(&mut out);
        tcp.write_all(&out).await?;
        // Read exactly one byte before TLS: anything more would be injected plaintext
        // (CVE-2021-23222), which the TLS layer then refuses.
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        if answer[0] != b'S' {
            return Err(UpstreamError::TlsRefused { target });
        }
        let connector = tokio_rustls::TlsConnector::from(config);
        let tls = connector
            .connect(server_name.clone(), tcp)
            .await
            .map_err(|source| UpstreamError::Tls { target, source })?;
        Ok(UpstreamStream::Tls(Box::new(tls)))
    }
}

fn client_config_for(
    configs: &Mutex<HashMap<String, Arc<ClientConfig>>>,
    cert_dir: &std::path::Path,
    ca: &std::path::Path,
    role: &str,
) -> Result<Arc<ClientConfig>, UpstreamError> {
    // The role becomes a file name: allow only what cannot escape cert_dir.
    let safe = !role.is_empty()
        && !role.starts_with('.')
        && role
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !safe {
        return Err(UpstreamError::NoCredential {
            role: role.to_owned(),
            why: "role names used with cert login must be letters, digits, '_', '-' or '.'".into(),
        });
    }
    let mut guard = configs.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(config) = guard.get(role) {
        return Ok(config.clone());
    }
    let cert = cert_dir.join(format!("{role}.pem"));
    let key = cert_dir.join(format!("{role}.key"));
    let config = tls::upstream_client_config(ca, Some((&cert, &key))).map_err(|e| {
        UpstreamError::NoCredential {
            role: role.to_owned(),
            why: e.to_string(),
        }
    })?;
    guard.insert(role.to_owned(), config.clone());
    Ok(config)
}

async fn read_message(
    stream: &mut UpstreamStream,
    buf: &mut BytesMut,
) -> Result<codec::Message, UpstreamError> {
    loop {
        if let Some(msg) = codec::decode_message(buf, codec::MAX_LOGIN_MESSAGE_LEN)? {
            return Ok(msg);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(UpstreamError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "PostgreSQL closed the connection during login",
            )));
        }
    }
}
