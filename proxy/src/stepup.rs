//! The HTTPS step-up endpoint: an operator's TOTP code in, a short-lived step-up token out,
//! over the same mTLS client-identity rules as the PostgreSQL port. Also the client side that
//! `eastwall mfa login` (and tests) use to fetch a token.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use eastwall_ca::SpiffeId;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::mfa::{MfaOutcome, Verifier};

/// The one route the endpoint serves.
pub const STEPUP_PATH: &str = "/v1/stepup";
/// Largest request body accepted; a `{"code":"123456"}` is 17 bytes.
pub const MAX_BODY: usize = 1024;
/// Time allowed for the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for one whole connection, handshake included; slow clients are cut off.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections one source (an IPv4 address, an IPv6 /64) may have open at once; more are
/// closed at once, so one host cannot hold every slot. A step-up is one short request per
/// operator: eight covers a bastion with several operators logging in together.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 8;
/// Largest response body the client reads.
const MAX_RESPONSE: usize = 64 * 1024;

/// Who is asking, from a finished TLS handshake.
#[derive(Debug, Clone)]
pub struct StepUpIdentity {
    pub id: SpiffeId,
    /// SHA-256 of the leaf certificate (DER): what a token is bound to.
    pub cert_sha256: [u8; 32],
    /// The certificate's serial in lowercase hex, as the CA's index and the CRL name it.
    pub serial_hex: String,
    /// Why this identity may not step up at all (no policy rule asks it for MFA), or None.
    /// Such a request is refused (403) before any failure budget is charged.
    pub not_eligible: Option<String>,
}

/// Maps a finished TLS handshake to the client's identity. The proxy supplies this with its
/// SVID and policy checks; an `Err` is a refusal (HTTP 403) whose text is shown to the client.
pub type Identify =
    Arc<dyn Fn(&rustls::ServerConnection) -> Result<StepUpIdentity, String> + Send + Sync>;

/// Whether a lock holds this identity, certificate or source back now (see
/// [`crate::locks::check_lock`]). Checked on every request, before the code: a locked
/// operator gets no token and spends no budget.
pub type LockCheck =
    Arc<dyn Fn(&StepUpIdentity, IpAddr) -> Option<crate::locks::LockRefusal> + Send + Sync>;

/// Records a decision (the proxy's audit log). An `Err` means it could not be recorded, and a
/// token is then not handed out: decisions that cannot be logged are refused.
/// It returns a future because the audit log confirms a line only after its fsync.
pub type OnDecision = Arc<
    dyn Fn(
            StepUpEvent,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

/// One step-up attempt, for the decision log.
#[derive(Debug, Clone)]
pub struct StepUpEvent {
    pub id: SpiffeId,
    pub cert_sha256: [u8; 32],
    pub cert_serial: String,
    pub source: SocketAddr,
    pub outcome: MfaOutcome,
    /// When the issued token expires, for accepted attempts.
    pub token_expires_at: Option<SystemTime>,
    /// For a lockout: how much longer it holds.
    pub locked_for: Option<Duration>,
    /// The operator's lock that refused this request (outcome `Rejected { reason: "locked" }`).
    pub lock_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepUpRequest {
    code: String,
}

/// The TOTP code in a request body (`{"code":"123456"}`), or None for any other body.
/// Public for the fuzz targets in `fuzz/`, not part of the API.
#[doc(hidden)]
pub fn parse_request(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<StepUpRequest>(body)
        .ok()
        .map(|r| r.code)
}

/// The 200 response body.
#[derive(Debug, Serialize, Deserialize)]
pub struct StepUpResponse {
    pub token: String,
    /// RFC 3339, UTC.
    pub expires_at: String,
}

#[derive(Serialize, Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

struct Shared {
    verifier: Arc<Verifier>,
    locked: LockCheck,
    on_decision: OnDecision,
}

/// Where each new connection's TLS config comes from: the sidecar rebuilds its config when the
/// CRL or trust bundle changes, and the endpoint must refuse a revoked certificate as soon as
/// the front door does.
pub type TlsSource = Arc<dyn Fn() -> Arc<rustls::ServerConfig> + Send + Sync>;

/// Serves the step-up endpoint on `listener` until the task is dropped. Never returns and never
/// panics on client input; errors end only the connection they happened on.
pub async fn serve(
    listener: TcpListener,
    tls: TlsSource,
    verifier: Arc<Verifier>,
    identify: Identify,
    locked: LockCheck,
    on_decision: OnDecision,
) {
    let shared = Arc::new(Shared {
        verifier,
        locked,
        on_decision,
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_source = crate::source::SourceSlots::new(MAX_CONNECTIONS_PER_SOURCE);
    loop {
        // Wait for a free slot before accepting, so a flood queues in the kernel instead of
        // growing our memory.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!(error = %err, "step-up endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(source_slot) = per_source.try_acquire(peer.ip()) else {
            // Not logged at warn or in the decision log: a flood must not become a log flood.
            tracing::debug!(peer = %peer, "step-up endpoint: too many connections from this source; closing");
            drop(tcp);
            drop(permit);
            continue;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls());
        let identify = identify.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _source_slot = source_slot;
            let served = tokio::time::timeout(
                CONNECTION_TIMEOUT,
                serve_connection(tcp, peer, acceptor, identify, shared),
            )
            .await;
            if served.is_err() {
                tracing::debug!(peer = %peer, "step-up endpoint: connection timed out");
            }
        });
    }
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    identify: Identify,
    shared: Arc<Shared>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            tracing::debug!(peer = %peer, error = %err, "step-up endpoint: TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let who = Arc::new(identify(tls.get_ref().1));
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let who = who.clone();
        async move { Ok::<_, Infallible>(respond(req, &shared, &who, peer).await) }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(tls), service)
        .await;
    if let Err(err) = result {
        tracing::debug!(peer = %peer, error = %err, "step-up endpoint: HTTP error");
    }
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, error: &str, detail: Option<String>) -> Response<Full<Bytes>> {
    json_response(
        status,
        &ErrorBody {
            error: error.to_owned(),
            detail,
        },
    )
}

async fn respond(
    req: Request<Incoming>,
    shared: &Shared,
    who: &Result<StepUpIdentity, String>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    if req.uri().path() != STEPUP_PATH {
        return error(StatusCode::NOT_FOUND, "not_found", None);
    }
    if req.method() != Method::POST {
        let mut resp = error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", None);
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    let who = match who {
        Ok(who) => who,
        Err(why) => return error(StatusCode::FORBIDDEN, "identity", Some(why.clone())),
    };
    let id = &who.id;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY as u64) {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", None);
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", None)
        }
        Err(_) => return error(StatusCode::BAD_REQUEST, "bad_request", None),
    };
    let Some(code) = parse_request(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            Some(r#"expected a JSON body {"code":"123456"}"#.to_owned()),
        );
    };
    // An identity that can never step up (no rule asks it for MFA, or it is not enrolled) is
    // refused before anything is charged: it must not spend an operator's per-source budget.
    let lock = (shared.locked)(who, peer.ip());
    let refusal = match (&lock, &who.not_eligible) {
        (Some(lock), _) => Some((crate::locks::LockRefusal::REASON, lock.message.clone())),
        (None, Some(why)) => Some(("not_eligible", why.clone())),
        (None, None) if !shared.verifier.is_enrolled(id) => Some((
            "not_enrolled",
            format!(
                "{id} is not enrolled for MFA; ask an administrator to run `eastwall mfa enroll`"
            ),
        )),
        (None, None) => None,
    };
    let now = SystemTime::now();
    let outcome = match refusal {
        Some((reason, _)) => MfaOutcome::Rejected { reason },
        None => shared.verifier.check_code(id, peer.ip(), &code, now),
    };
    let token = outcome
        .is_accepted()
        .then(|| shared.verifier.issue_token(id, &who.cert_sha256, now));
    let event = StepUpEvent {
        id: id.clone(),
        cert_sha256: who.cert_sha256,
        cert_serial: who.serial_hex.clone(),
        source: peer,
        outcome,
        token_expires_at: token.as_ref().map(|t| t.expires_at),
        locked_for: matches!(outcome, MfaOutcome::LockedOut { .. })
            .then(|| shared.verifier.locked_for(id, peer.ip()))
            .flatten(),
        lock_id: lock.map(|l| l.lock_id),
    };
    if let Err(why) = (shared.on_decision)(event).await {
        tracing::error!(error = %why, "step-up endpoint: decision not recorded; refusing");
        return error(StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable", None);
    }
    if let Some((reason, detail)) = refusal {
        return error(StatusCode::FORBIDDEN, reason, Some(detail));
    }
    match (outcome, token) {
        (MfaOutcome::Accepted { .. }, Some(token)) => json_response(
            StatusCode::OK,
            &StepUpResponse {
                expires_at: token.expires_at_rfc3339(),
                token: token.value,
            },
        ),
        (MfaOutcome::LockedOut { .. }, _) => error(
            StatusCode::TOO_MANY_REQUESTS,
            "locked_out",
            Some("too many failed MFA attempts; wait and try again".to_owned()),
        ),
        (outcome, _) if outcome.reason() == "replayed_code" => error(
            StatusCode::UNAUTHORIZED,
            "replayed_code",
            Some("this code was already used; wait for the next code".to_owned()),
        ),
        (outcome, _) => error(StatusCode::UNAUTHORIZED, outcome.reason(), None),
    }
}

/// Why fetching a step-up token failed.
#[derive(Debug, thiserror::Error)]
pub enum StepUpError {
    #[error("{0}: the URL must look like https://HOST:PORT/v1/stepup")]
    BadUrl(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {addr} failed: {source}")]
    Tls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP with {addr} failed: {source}")]
    Http {
        addr: String,
        #[source]
        source: hyper::Error,
    },
    #[error("the step-up endpoint did not answer within {0:?}")]
    Timeout(Duration),
    #[error("step-up refused ({status}): {error}{}", detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Refused {
        status: u16,
        error: String,
        detail: Option<String>,
    },
    #[error("the step-up endpoint sent a response we cannot read ({0})")]
    BadResponse(String),
}

/// Asks the step-up endpoint at `url` for a token, presenting the client certificate in `tls`.
pub async fn fetch_token(
    url: &str,
    tls: Arc<rustls::ClientConfig>,
    code: &str,
    timeout: Duration,
) -> Result<StepUpResponse, StepUpError> {
    tokio::time::timeout(timeout, fetch_token_inner(url, tls, code))
        .await
        .map_err(|_| StepUpError::Timeout(timeout))?
}

async fn fetch_token_inner(
    url: &str,
    tls: Arc<rustls::ClientConfig>,
    code: &str,
) -> Result<StepUpResponse, StepUpError> {
    let bad_url = || StepUpError::BadUrl(url.to_owned());
    let uri: Uri = url.parse().map_err(|_| bad_url())?;
    if uri.scheme_str() != Some("https") {
        return Err(bad_url());
    }
    let host = uri.host().ok_or_else(bad_url)?;
    let port = uri.port_u16().unwrap_or(443);
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let server_name = match bare_host.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(bare_host.to_owned()).map_err(|_| bad_url())?,
    };
    let addr = format!("{host}:{port}");
    let tcp = TcpStream::connect((bare_host, port))
        .await
        .map_err(|source| StepUpError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .map_err(|source| StepUpError::Tls {
            addr: addr.clone(),
            source,
        })?;
    let http_err = |source| StepUpError::Http {
        addr: addr.clone(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    let driver = tokio::spawn(conn);
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| !p.is_empty())
        .unwrap_or(STEPUP_PATH)
        .to_owned();
    let body = serde_json::json!({ "code": code }).to_string();
    let mut req = Request::new(Full::new(Bytes::from(body)));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = path.parse().map_err(|_| bad_url())?;
    let host_header = HeaderValue::from_str(&addr).map_err(|_| bad_url())?;
    req.headers_mut().insert(HOST, host_header);
    req.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let resp = sender.send_request(req).await.map_err(http_err)?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| StepUpError::BadResponse(e.to_string()))?
        .to_bytes();
    driver.abort();
    if status == StatusCode::OK {
        return serde_json::from_slice(&body).map_err(|e| StepUpError::BadResponse(e.to_string()));
    }
    let (error, detail) = match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(b) => (b.error, b.detail),
        Err(_) => (
            status.canonical_reason().unwrap_or("error").to_owned(),
            None,
        ),
    };
    Err(StepUpError::Refused {
        status: status.as_u16(),
        error,
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_request;

    #[test]
    fn the_request_body_is_a_code_and_nothing_else() {
        assert_eq!(
            parse_request(br#"{"code":"123456"}"#).as_deref(),
            Some("123456")
        );
        assert_eq!(
            parse_request(br#" { "code" : "0" } "#).as_deref(),
            Some("0")
        );
        for body in [
            &br#"{"code":"1","token":"x"}"#[..],
            br#"{"code":1}"#,
            br#"{}"#,
            b"",
            b"code=123456",
            br#"{"code":"1"} trailing"#,
        ] {
            assert_eq!(
                parse_request(body),
                None,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
