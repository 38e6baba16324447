//! The front door: everything a client sends before it has a session — SSLRequest,
//! GSSENCRequest, PG17 direct TLS, CancelRequest and the StartupMessage — and the TLS
//! handshake in between.
//!
//! Everything before a finished TLS handshake is bounded by `[limits] handshake_timeout`
//! and holds a slot of the smaller handshake budget only until then (see [`negotiate`]).
//!
//! Plaintext is read with exact-length reads from the raw socket, so no byte the client sent
//! after its SSLRequest can be mistaken for part of the encrypted session (CVE-2021-23214).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use rustls::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::codec::{self, CodecError, StartupMessage, StartupPacket};
use crate::tls::ALPN_POSTGRESQL;

/// The first byte of a TLS ClientHello record; a startup length can never begin with it.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A client whose TLS handshake succeeded and who asked for a session.
pub struct Arrival {
    pub tls: TlsStream<TcpStream>,
    pub startup: StartupMessage,
    /// Bytes the client sent after its StartupMessage (a pipelining client); relayed later.
    pub leftover: BytesMut,
    pub direct_tls: bool,
}

/// What the front door made of a connection.
pub enum FrontDoor {
    Session(Box<Arrival>),
    /// A CancelRequest, in plaintext (PQcancel) or inside TLS (PQcancelCreate).
    Cancel {
        pid: u32,
        key: Bytes,
    },
    /// A StartupMessage without TLS: refused with an error, never an auth request.
    Plaintext {
        startup: Option<StartupMessage>,
        stream: TcpStream,
    },
    /// Refused before any session: the reason for the log, and whether the error was
    /// already written to the client.
    Refused(Refusal),
    /// The client went away before saying anything (a port probe, a health check).
    Gone,
}

/// Why the front door closed a connection.
#[derive(Debug)]
pub struct Refusal {
    pub reason: &'static str,
    pub detail: String,
    /// What a refused certificate claimed (unverified), when TLS refused one.
    pub claimed: Option<crate::identity::Claimed>,
}

impl Refusal {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            claimed: None,
        }
    }
}

impl From<CodecError> for Refusal {
    fn from(err: CodecError) -> Self {
        let reason = match err {
            CodecError::StartupLength(_) | CodecError::MessageLength { .. } => "bad_length",
            _ => "protocol_violation",
        };
        Refusal::new(reason, err.to_string())
    }
}

/// What the client did before (or instead of) a finished TLS handshake.
enum Secured {
    Tls(Box<TlsStream<TcpStream>>, bool),
    Done(FrontDoor),
}

/// Negotiates encryption and reads the StartupMessage.
///
/// Everything up to a finished TLS handshake (or a plaintext request) must happen within
/// `handshake_timeout`, and `handshake_slot` — the connection's place in the smaller
/// handshake budget — is held only until then; reading the StartupMessage inside TLS is
/// bounded by the caller's startup timeout.
pub async fn negotiate<G>(
    tcp: TcpStream,
    tls: Arc<ServerConfig>,
    handshake_timeout: Duration,
    handshake_slot: G,
) -> FrontDoor {
    let secured = tokio::time::timeout(handshake_timeout, secure(tcp, tls)).await;
    drop(handshake_slot);
    match secured {
        Err(_) => FrontDoor::Refused(Refusal::new(
            "handshake_timeout",
            format!(
                "TLS handshake not finished within {}",
                humantime::format_duration(handshake_timeout)
            ),
        )),
        Ok(Secured::Done(front)) => front,
        Ok(Secured::Tls(stream, direct_tls)) => read_startup_in_tls(*stream, direct_tls).await,
    }
}

async fn secure(mut tcp: TcpStream, tls: Arc<ServerConfig>) -> Secured {
    use Secured::Done;
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(0) | Err(_) => return Done(FrontDoor::Gone),
        Ok(_) => {}
    }
    if first[0] == TLS_HANDSHAKE_RECORD {
        let stream = match accept_tls(tcp, tls).await {
            Ok(stream) => stream,
            Err(refusal) => return Done(FrontDoor::Refused(refusal)),
        };
        // Direct TLS is only for clients that say they speak PostgreSQL inside it.
        if stream.get_ref().1.alpn_protocol() != Some(ALPN_POSTGRESQL) {
            return Done(FrontDoor::Refused(Refusal::new(
                "direct_tls_without_alpn",
                "direct TLS connection without ALPN \"postgresql\"",
            )));
        }
        return Secured::Tls(Box::new(stream), true);
    }

    let mut gss_refused = false;
    loop {
        let packet = match read_plain_packet(&mut tcp).await {
            Ok(Some(packet)) => packet,
            Ok(None) => return Done(FrontDoor::Gone),
            Err(refusal) => return Done(FrontDoor::Refused(refusal)),
        };
        match packet {
            StartupPacket::GssEncRequest if !gss_refused => {
                gss_refused = true;
                if tcp.write_all(b"N").await.is_err() {
                    return Done(FrontDoor::Gone);
                }
            }
            StartupPacket::GssEncRequest => {
                return Done(FrontDoor::Refused(Refusal::new(
                    "protocol_violation",
                    "second GSSENCRequest",
                )))
            }
            StartupPacket::SslRequest => {
                if bytes_waiting(&tcp) {
                    return Done(FrontDoor::Refused(Refusal::new(
                        "data_after_ssl_request",
                        "received unencrypted data after SSL request",
                    )));
                }
                if tcp.write_all(b"S").await.is_err() {
                    return Done(FrontDoor::Gone);
                }
                return match accept_tls(tcp, tls).await {
                    Ok(stream) => Secured::Tls(Box::new(stream), false),
                    Err(refusal) => Done(FrontDoor::Refused(refusal)),
                };
            }
            StartupPacket::Cancel { pid, key } => return Done(FrontDoor::Cancel { pid, key }),
            StartupPacket::Startup(startup) => {
                return Done(FrontDoor::Plaintext {
                    startup: Some(startup),
                    stream: tcp,
                })
            }
        }
    }
}

/// Whether the client already sent more bytes: a client must wait for our `S` before TLS.
fn bytes_waiting(tcp: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(tcp.peek(&mut probe).now_or_never(), Some(Ok(n)) if n > 0)
}

async fn accept_tls(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
) -> Result<TlsStream<TcpStream>, Refusal> {
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
    let (result, refused_leaf) = crate::tls::accept_noting_refused_leaf(accept).await;
    result.map_err(|err| {
        let mut refusal = Refusal::new(
            crate::identity::handshake_failure_reason(&err),
            err.to_string(),
        );
        refusal.claimed = refused_leaf.and_then(|der| crate::identity::claimed(&der));
        refusal
    })
}

/// Reads one plaintext startup packet with exact reads; `None` when the client closed first.
async fn read_plain_packet(tcp: &mut TcpStream) -> Result<Option<StartupPacket>, Refusal> {
    let mut len_bytes = [0u8; 4];
    match tcp.read_exact(&mut len_bytes).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(Refusal::new("io_error", e.to_string())),
    }
    let len = u32::from_be_bytes(len_bytes) as usize;
    if !(codec::MIN_STARTUP_LEN..=codec::MAX_STARTUP_LEN).contains(&len) {
        return Err(CodecError::StartupLength(len as u32).into());
    }
    let mut buf = BytesMut::with_capacity(len);
    buf.extend_from_slice(&len_bytes);
    buf.resize(len, 0);
    tcp.read_exact(&mut buf[4..])
        .await
        .map_err(|e| Refusal::new("io_error", e.to_string()))?;
    match codec::decode_startup(&mut buf)? {
        Some(packet) => Ok(Some(packet)),
        None => Err(Refusal::new(
            "protocol_violation",
            "incomplete startup packet",
        )),
    }
}

async fn read_startup_in_tls(mut stream: TlsStream<TcpStream>, direct_tls: bool) -> FrontDoor {
    let mut buf = BytesMut::with_capacity(512);
    loop {
        match codec::decode_startup(&mut buf) {
            Ok(Some(StartupPacket::Startup(startup))) => {
                return FrontDoor::Session(Box::new(Arrival {
                    tls: stream,
                    startup,
                    leftover: buf,
                    direct_tls,
                }))
            }
            Ok(Some(StartupPacket::Cancel { pid, key })) => return FrontDoor::Cancel { pid, key },
            Ok(Some(StartupPacket::SslRequest | StartupPacket::GssEncRequest)) => {
                return FrontDoor::Refused(Refusal::new(
                    "protocol_violation",
                    "encryption request inside TLS",
                ))
            }
            Ok(None) => {}
            Err(err) => return FrontDoor::Refused(err.into()),
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) => return FrontDoor::Gone,
            Ok(_) => {}
            Err(e) => return FrontDoor::Refused(Refusal::new("io_error", e.to_string())),
        }
    }
}
