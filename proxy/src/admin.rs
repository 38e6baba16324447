//! The admin HTTP listener (`[admin] listen`, default `127.0.0.1:9187`): plain HTTP/1.1,
//! read-only, three paths.
//!
//! * `GET /healthz` → 200 `ok` while the process serves.
//! * `GET /readyz` → 200 `ready` when the configuration is loaded, the decision log's last
//!   write succeeded and PostgreSQL accepts a TCP (or Unix) connection (checked at most every
//!   [`REACH_TTL`], never a PostgreSQL session); 503 with one line per failing check
//!   otherwise, and 503 while the sidecar drains.
//! * `GET /metrics` → the Prometheus exposition ([`crate::metrics`]): OpenMetrics 1.0 text
//!   when the request's `Accept` names `application/openmetrics-text` (Prometheus does),
//!   the classic text format 0.0.4 otherwise (curl, `promtool check metrics`).
//!
//! `HEAD` is answered like `GET` without a body; any other method on those paths is 405,
//! any other path 404. No administrative verb (sessions, kill, locks, reload) is served here,
//! ever: those go over the admin Unix socket.
//!
//! The listener is hostile-input safe: at most [`MAX_CONNECTIONS`] connections
//! ([`MAX_PER_SOURCE`] per source address) are served at once, the rest wait in the kernel's
//! backlog; request headers must arrive within [`HEADER_TIMEOUT`] and fit in
//! [`MAX_HEADER_BYTES`]; a connection lives at most [`CONNECTION_TIMEOUT`]; request bodies
//! are never read.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Connections served at once; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections one source address (IPv6: its /64) may hold at once.
pub const MAX_PER_SOURCE: usize = 16;
/// How long a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection (keep-alive included) may stay open.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// The read buffer, and so the largest request head accepted (431 beyond it).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// How long an upstream reachability result is reused.
pub const REACH_TTL: Duration = Duration::from_secs(3);

/// What the listener asks of the running sidecar.
pub trait Health: Send + Sync + 'static {
    /// The Prometheus exposition: OpenMetrics text, or the classic 0.0.4 text format.
    fn metrics(&self, openmetrics: bool) -> String;
    /// The failing readiness checks, one line each; empty when ready.
    fn not_ready(&self) -> Pin<Box<dyn Future<Output = Vec<String>> + Send + '_>>;
    /// What will fail if nobody acts (a certificate or CRL close to its date), one line
    /// each; listed under `ready` without making the sidecar unready.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Reuses one reachability result for [`REACH_TTL`]; concurrent probes share one check.
#[derive(Default)]
pub struct ReachCache {
    last: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
}

impl ReachCache {
    /// The cached result, or `check`'s when it is older than [`REACH_TTL`].
    pub async fn get<F, Fut>(&self, check: F) -> Result<(), String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let mut last = self.last.lock().await;
        if let Some((at, result)) = &*last {
            if at.elapsed() < REACH_TTL {
                return result.clone();
            }
        }
        let result = check().await;
        *last = Some((Instant::now(), result.clone()));
        result
    }
}

/// Serves until the future is dropped (the caller selects it against shutdown).
pub async fn serve(listener: TcpListener, health: Arc<dyn Health>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_source = crate::source::SourceSlots::new(MAX_PER_SOURCE);
    loop {
        // A free slot first, so a flood waits in the kernel instead of in our memory.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(error = %err, "admin listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(source_slot) = per_source.try_acquire(peer.ip()) else {
            tracing::debug!(%peer, "admin listener: too many connections from this source; closing");
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _source_slot = source_slot;
            let service = hyper::service::service_fn(move |req| {
                let health = health.clone();
                async move { Ok::<_, Infallible>(respond(req, &*health).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                .serve_connection(TokioIo::new(tcp), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::debug!(%peer, error = %err, "admin listener: HTTP error"),
                Err(_) => tracing::debug!(%peer, "admin listener: connection timed out"),
            }
        });
    }
}

async fn respond(req: Request<Incoming>, health: &dyn Health) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = matches!(path, "/healthz" | "/readyz" | "/metrics");
    if !known {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let mut resp = match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let failing = health.not_ready().await;
            let warnings = health.warnings();
            let mut body = if failing.is_empty() {
                "ready\n".to_owned()
            } else {
                failing.join("\n") + "\n"
            };
            for w in &warnings {
                body.push_str(w);
                body.push('\n');
            }
            let status = if failing.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, &body)
        }
        _ => {
            let openmetrics = wants_openmetrics(req.headers());
            let content_type = if openmetrics {
                crate::metrics::CONTENT_TYPE
            } else {
                crate::metrics::CLASSIC_CONTENT_TYPE
            };
            let mut resp = Response::new(Full::new(Bytes::from(health.metrics(openmetrics))));
            let headers = resp.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
    };
    if head {
        *resp.body_mut() = Full::new(Bytes::new());
    }
    resp
}

/// Whether the client's `Accept` names OpenMetrics (Prometheus lists it first, with a q).
fn wants_openmetrics(headers: &hyper::HeaderMap) -> bool {
    const OPENMETRICS: &[u8] = b"application/openmetrics-text";
    headers.get_all(ACCEPT).iter().any(|value| {
        value
            .as_bytes()
            .windows(OPENMETRICS.len())
            .any(|w| w.eq_ignore_ascii_case(OPENMETRICS))
    })
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_owned())));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Whether an admin address is reachable only from this host.
pub fn is_loopback(addr: SocketAddr) -> bool {
    addr.ip().is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn reachability_is_checked_once_per_ttl() {
        let cache = ReachCache::default();
        let checks = AtomicUsize::new(0);
        for _ in 0..100 {
            let r = cache
                .get(|| async {
                    checks.fetch_add(1, Ordering::Relaxed);
                    Err::<(), _>("down".to_owned())
                })
                .await;
            assert_eq!(r, Err("down".to_owned()));
        }
        assert_eq!(checks.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_source_cannot_hold_every_slot() {
        let slots = crate::source::SourceSlots::new(2);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let a = slots.try_acquire(ip).unwrap();
        let _b = slots.try_acquire(ip).unwrap();
        assert!(slots.try_acquire(ip).is_none());
        assert!(slots.try_acquire("127.0.0.2".parse().unwrap()).is_some());
        drop(a);
        assert!(slots.try_acquire(ip).is_some());
    }
}
