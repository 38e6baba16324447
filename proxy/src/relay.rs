//! The byte pipe between an admitted client and its PostgreSQL session.
//!
//! After admission the proxy adds no per-byte work: bytes are read in chunks of up to a
//! TLS record (16 KiB) and written straight on. Reads go into one scratch buffer per worker
//! thread; a session owns memory only while the other side is slow to accept a write, so an
//! idle session holds no relay buffer at all (tokio's copy_bidirectional pins 16 KiB).
//!
//! Message framing is followed as bytes pass, never buffered: a header parse per message,
//! bodies skipped whole. The client's stream is always followed (it is light, and it tells
//! whether the client said Terminate before the server closed, so the end is logged
//! `client_closed`); the server's stream only when the session can be ended by Eastwall
//! (a deadline, an idle timeout or a stop signal), so it can be cut at a message boundary.
//!
//! # Ends Eastwall decides
//!
//! A session ends when both sides close, or when Eastwall decides so: `max_session`, the
//! idle timeout, or a [`StopSignal`] yielding an [`EndReason`] (revocation, shutdown, …).
//! From the moment an end is decided **not one more client byte is read**: what was read
//! and not yet passed on is dropped. The server's stream is then read on to its next message
//! boundary (not past it) and the relay returns an [`Ending`]: the caller closes PostgreSQL
//! (Terminate if the client's stream stopped at a boundary, then close, then a
//! CancelRequest) and delivers what is left plus a FATAL with [`Ending::finish`]. All of it
//! is bounded by the grace ([`END_GRACE`]): a client that stops reading, or a server that
//! stops writing mid-message, cannot hold the session open past it.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

/// One TLS record's worth of plaintext: the largest useful read.
const CHUNK: usize = 16 * 1024;

/// How long an end Eastwall decided may take, from the decision to both legs closed: the
/// server's stream is brought to a message boundary and the FATAL delivered within it, or
/// the connections are closed whatever the boundaries.
pub const END_GRACE: Duration = Duration::from_secs(2);

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; CHUNK].into_boxed_slice());
}

/// Why Eastwall ended a session that both sides still wanted.
///
/// Not `Copy` (a lock or a kill carries its message), but the relay only moves it: the hot
/// path allocates nothing for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The client's certificate was revoked (a CRL reload named its serial).
    Revoked,
    /// The MFA session reached `[mfa] max_session`.
    MaxSession,
    /// Nothing crossed the session for `[limits] idle_timeout`.
    Idle,
    /// The sidecar is shutting down.
    Shutdown,
    /// A lock matches the session (identity, serial, source or role).
    Locked { lock_id: String, message: String },
    /// An administrator ended it (`eastwall sessions kill`).
    Killed { message: String },
    /// A reloaded policy no longer allows it.
    PolicyChanged,
    /// The client's certificate reached its notAfter.
    CertExpired,
    /// An audited session's statement line could not be written (or the audit lost track):
    /// the session cannot go on unaudited.
    AuditFailed { message: String },
}

impl EndReason {
    /// The `reason` of the session_end line.
    pub fn reason(&self) -> &'static str {
        match self {
            EndReason::Revoked => "revoked",
            EndReason::MaxSession => "max_session",
            EndReason::Idle => "idle_timeout",
            EndReason::Shutdown => "shutdown",
            EndReason::Locked { .. } => "locked",
            EndReason::Killed { .. } => "killed",
            EndReason::PolicyChanged => "policy_changed",
            EndReason::CertExpired => "cert_expired",
            EndReason::AuditFailed { .. } => "audit_failed",
        }
    }
}

/// A statement auditor as the relay sees it ([`crate::statement_log::Auditor`]). Its
/// methods are called only when `ACTIVE` is true: the relay of a session that is not audited
/// runs with [`NoAudit`], for which every call site is a constant-false branch compiled out,
/// so that relay does the same work per chunk as before auditing existed.
pub trait Audit {
    const ACTIVE: bool;
    /// Client bytes just read: how many of them may be passed on now. The auditor keeps the
    /// rest, and the relay reads no more client bytes until they are released.
    fn client_bytes(&mut self, bytes: &[u8]) -> usize;
    /// Server bytes on their way to the client (never held).
    fn server_bytes(&mut self, bytes: &[u8]);
    /// Whether client bytes are held.
    fn holding(&self) -> bool;
    /// Once every line so far is durable, the held bytes that may be passed on now (the
    /// auditor may keep holding some, up to its next gate).
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<Result<Vec<u8>, EndReason>>;
    /// Drives the lines being written: Ready(Ok) when none is left, Ready(Err) when one
    /// could not be written (the session must end).
    fn poll_lines(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), EndReason>>;
    /// An end was decided: the held bytes are dropped, never sent; returns how many.
    fn drop_held(&mut self) -> usize;
}

/// The relay of a session whose statements are not audited.
pub struct NoAudit;

impl Audit for NoAudit {
    const ACTIVE: bool = false;
    #[inline(always)]
    fn client_bytes(&mut self, bytes: &[u8]) -> usize {
        bytes.len()
    }
    #[inline(always)]
    fn server_bytes(&mut self, _: &[u8]) {}
    #[inline(always)]
    fn holding(&self) -> bool {
        false
    }
    #[inline(always)]
    fn poll_release(&mut self, _: &mut Context<'_>) -> Poll<Result<Vec<u8>, EndReason>> {
        Poll::Ready(Ok(Vec::new()))
    }
    #[inline(always)]
    fn poll_lines(&mut self, _: &mut Context<'_>) -> Poll<Result<(), EndReason>> {
        Poll::Ready(Ok(()))
    }
    #[inline(always)]
    fn drop_held(&mut self) -> usize {
        0
    }
}

/// Live byte counters of one session, bumped once per relayed chunk (Relaxed: they are
/// read only for `eastwall sessions` and metrics, never to synchronise anything).
#[derive(Debug, Default)]
pub struct LiveBytes {
    pub client_to_server: AtomicU64,
    pub server_to_client: AtomicU64,
}

/// An input that, when it completes, ends the session with the reason it yields. One
/// future for every cause: callers combine theirs (e.g. with `select!`). The relay polls it
/// only after it woke the waker it was given ([`crate::stop_gate`]), so a signal that checks
/// a flag without registering a waker would never be seen.
pub type StopSignal<'a> = Pin<Box<dyn Future<Output = EndReason> + Send + 'a>>;

/// How a relayed session ended, and what crossed it.
#[derive(Debug)]
pub struct RelayOutcome {
    /// Client bytes passed on to the server (not those dropped when an end was decided).
    pub client_to_server: u64,
    pub server_to_client: u64,
    pub end: RelayEnd,
}

#[derive(Debug)]
pub enum RelayEnd {
    /// The client closed (Terminate, or EOF) and the server followed.
    ClientClosed,
    /// The server closed the session (e.g. a FATAL) without the client asking.
    ServerClosed,
    ClientError(io::Error),
    ServerError(io::Error),
    /// Eastwall ended it; the caller closes both legs (see [`Ending`]).
    Ended(Ending),
}

impl RelayEnd {
    pub fn reason(&self) -> &'static str {
        match self {
            RelayEnd::ClientClosed => "client_closed",
            RelayEnd::ServerClosed => "server_closed",
            RelayEnd::ClientError(_) => "client_error",
            RelayEnd::ServerError(_) => "server_error",
            RelayEnd::Ended(ending) => ending.reason.reason(),
        }
    }
}

/// An end Eastwall decided: the client is no longer read; what is left to do is close
/// PostgreSQL and tell the client, by `close_by`.
#[derive(Debug)]
pub struct Ending {
    pub reason: EndReason,
    /// The rest of the server's stream up to a message boundary, still owed to the client;
    /// None when no boundary could be reached in time (the client gets no farewell).
    rest: Option<Vec<u8>>,
    /// The server received the client's stream up to a message boundary, so a Terminate
    /// from us would be read as one.
    pub upstream_at_boundary: bool,
    /// When both legs must be closed.
    pub close_by: Instant,
}

impl Ending {
    /// Delivers the rest of the server's stream and then `farewell` (whole messages, e.g. a
    /// FATAL), then closes the client's side; gives up at `close_by`. Returns whether the
    /// client got it all.
    pub async fn finish<C: AsyncWrite + Unpin>(&mut self, client: &mut C, farewell: &[u8]) -> bool {
        let Some(mut out) = self.rest.take() else {
            return false;
        };
        out.extend_from_slice(farewell);
        let deliver = async {
            client.write_all(&out).await?;
            client.flush().await?;
            client.shutdown().await
        };
        matches!(
            tokio::time::timeout_at(self.close_by, deliver).await,
            Ok(Ok(()))
        )
    }
}

/// Follows message boundaries in a PostgreSQL stream (1-byte tag, 4-byte length that counts
/// itself) as bytes pass, without buffering them.
#[derive(Debug, Default)]
struct Boundaries {
    header: [u8; 5],
    header_len: usize,
    body_left: u64,
    /// A Terminate message ('X', length 4) went by.
    terminated: bool,
    /// A length below 4 went by: PostgreSQL closes on it, and what follows is not framed.
    lost: bool,
}

impl Boundaries {
    fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }

    fn header_done(&mut self, header: [u8; 5]) {
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        if len < 4 {
            self.lost = true;
        }
        if header[0] == b'X' && len == 4 && !self.lost {
            self.terminated = true;
        }
        self.body_left = u64::from(len.saturating_sub(4));
    }

    /// Consumes `bytes`; with `stop_at_first`, stops at the first boundary reached and
    /// returns how many bytes that took, else consumes everything.
    fn consume(&mut self, bytes: &[u8], stop_at_first: bool) -> usize {
        let mut i = 0;
        while i < bytes.len() {
            if self.body_left > 0 {
                let take = self.body_left.min((bytes.len() - i) as u64);
                i += take as usize;
                self.body_left -= take;
            } else if self.header_len == 0 && bytes.len() - i >= 5 {
                // The usual case: a whole header in the chunk.
                let mut header = [0u8; 5];
                header.copy_from_slice(&bytes[i..i + 5]);
                i += 5;
                self.header_done(header);
            } else {
                self.header[self.header_len] = bytes[i];
                self.header_len += 1;
                i += 1;
                if self.header_len < 5 {
                    continue;
                }
                self.header_len = 0;
                self.header_done(self.header);
            }
            if stop_at_first && self.at_boundary() {
                return i;
            }
        }
        i
    }
}

/// Where a boundary tracker stands after a stream went by (for the fuzz targets in `fuzz/`).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundaryState {
    pub at_boundary: bool,
    pub terminated: bool,
    pub lost: bool,
    /// Bytes consumed in all.
    pub consumed: usize,
}

/// Feeds `chunks` to one boundary tracker as the relay would read them; with
/// `stop_at_first`, each chunk is cut at the first boundary it reaches, as when an end was
/// decided, and the rest of it is not fed. Not part of the API: it exists so the tracker
/// can be fuzzed without a socket.
#[doc(hidden)]
pub fn follow_boundaries<'a>(
    chunks: impl IntoIterator<Item = &'a [u8]>,
    stop_at_first: bool,
) -> BoundaryState {
    let mut b = Boundaries::default();
    let mut consumed = 0;
    for chunk in chunks {
        consumed += b.consume(chunk, stop_at_first);
    }
    BoundaryState {
        at_boundary: b.at_boundary(),
        terminated: b.terminated,
        lost: b.lost,
        consumed,
    }
}

/// One direction of the pipe.
#[derive(Default)]
struct Pump<'a> {
    /// Bytes read but not yet accepted by the writer; empty (unallocated) when caught up.
    pending: Vec<u8>,
    written: usize,
    needs_flush: bool,
    read_eof: bool,
    done: bool,
    /// Bytes read (and passed on, or pending).
    bytes: u64,
    /// Set when this direction's message boundaries are followed.
    boundaries: Option<Boundaries>,
    /// The session's live counter for this direction (see [`LiveBytes`]).
    live: Option<&'a AtomicU64>,
}

/// Whether the client's Terminate went by (the client ended the session, whatever follows).
fn said_terminate(up: &Pump<'_>) -> bool {
    up.boundaries.as_ref().is_some_and(|b| b.terminated)
}

/// Which side an I/O error came from.
enum Side {
    Read(io::Error),
    Write(io::Error),
    /// The statement audit ended the session (only with an active [`Audit`]). Boxed, so a
    /// `Side` stays two words: it is returned through every poll of the hot path.
    Audit(Box<EndReason>),
}

impl Pump<'_> {
    /// Writes what is pending; Ready(Ok) once caught up (the memory is given back).
    fn poll_write_pending<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
    ) -> Poll<Result<(), Side>> {
        while self.written < self.pending.len() {
            let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.pending[self.written..]))
                .map_err(Side::Write)?;
            if n == 0 {
                return Poll::Ready(Err(Side::Write(io::ErrorKind::WriteZero.into())));
            }
            self.written += n;
        }
        if !self.pending.is_empty() {
            // Caught up: give the memory back rather than keep it for an idle session.
            self.pending = Vec::new();
            self.written = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// Reads one chunk and writes it on (what the writer does not take now is kept as
    /// pending). With `to_boundary`, nothing past the next message boundary is kept.
    /// Ready(Ok) after a chunk or EOF; Pending when nothing can be read now, after flushing
    /// what the writer buffered (a TLS writer holds records until flushed).
    ///
    /// With an active audit, `FROM_CLIENT` says which side `r` is: client bytes may be cut
    /// short (the auditor holds the rest), server bytes are shown to it as they pass.
    fn poll_read_chunk<R, W, A, const FROM_CLIENT: bool>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        to_boundary: bool,
        audit: &mut A,
    ) -> Poll<Result<(), Side>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
        A: Audit,
    {
        let step = SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut buf = ReadBuf::new(&mut scratch[..]);
            match Pin::new(&mut *r).poll_read(cx, &mut buf) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(e)) => Poll::Ready(Err(Side::Read(e))),
                Poll::Ready(Ok(())) => {
                    let mut filled = buf.filled().len();
                    if filled == 0 {
                        self.read_eof = true;
                        return Poll::Ready(Ok(()));
                    }
                    if let Some(boundaries) = &mut self.boundaries {
                        filled = boundaries.consume(&scratch[..filled], to_boundary);
                    }
                    if A::ACTIVE {
                        if FROM_CLIENT {
                            filled = audit.client_bytes(&scratch[..filled]);
                        } else {
                            audit.server_bytes(&scratch[..filled]);
                        }
                    }
                    self.bytes += filled as u64;
                    if let Some(live) = self.live {
                        live.fetch_add(filled as u64, Ordering::Relaxed);
                    }
                    self.needs_flush = true;
                    let mut off = 0;
                    while off < filled {
                        match Pin::new(&mut *w).poll_write(cx, &scratch[off..filled]) {
                            Poll::Ready(Ok(0)) => {
                                return Poll::Ready(Err(Side::Write(
                                    io::ErrorKind::WriteZero.into(),
                                )))
                            }
                            Poll::Ready(Ok(n)) => off += n,
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(Side::Write(e))),
                            Poll::Pending => {
                                self.pending = scratch[off..filled].to_vec();
                                break;
                            }
                        }
                    }
                    Poll::Ready(Ok(()))
                }
            }
        });
        if step.is_pending() && self.needs_flush {
            ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(Side::Write)?;
            self.needs_flush = false;
        }
        step
    }

    /// Moves bytes until the reader is exhausted (EOF, after which the writer is shut down)
    /// or an error; returns Pending while waiting on either side.
    fn poll_pump<R, W, A, const FROM_CLIENT: bool>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        audit: &mut A,
    ) -> Poll<Result<(), Side>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
        A: Audit,
    {
        loop {
            ready!(self.poll_write_pending(cx, w))?;
            if A::ACTIVE && FROM_CLIENT && audit.holding() {
                // Caught up: what the auditor held goes on once its lines are durable.
                let released =
                    ready!(audit.poll_release(cx)).map_err(|r| Side::Audit(Box::new(r)))?;
                self.bytes += released.len() as u64;
                if let Some(live) = self.live {
                    live.fetch_add(released.len() as u64, Ordering::Relaxed);
                }
                self.needs_flush |= !released.is_empty();
                self.pending = released;
                self.written = 0;
                continue;
            }
            if self.read_eof {
                ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(Side::Write)?;
                ready!(Pin::new(&mut *w).poll_shutdown(cx)).map_err(Side::Write)?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            ready!(self.poll_read_chunk::<R, W, A, FROM_CLIENT>(cx, r, w, false, audit))?;
        }
    }

    /// After an end was decided: reads on to the next message boundary, not past it,
    /// writing what the writer takes. Ready(Ok(true)) at a boundary (what is pending then
    /// completes the stream's last message), Ready(Ok(false)) when the stream ended inside a
    /// message or is not followed. The writer is never shut down.
    fn poll_to_boundary<R, W, A>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        audit: &mut A,
    ) -> Poll<Result<bool, Side>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
        A: Audit,
    {
        loop {
            let Some(boundaries) = &self.boundaries else {
                return Poll::Ready(Ok(false));
            };
            if boundaries.at_boundary() {
                return Poll::Ready(Ok(true));
            }
            if self.read_eof {
                return Poll::Ready(Ok(false));
            }
            // Read on only once the writer took what is pending: memory stays bounded.
            ready!(self.poll_write_pending(cx, w))?;
            ready!(self.poll_read_chunk::<R, W, A, false>(cx, r, w, true, audit))?;
        }
    }

    /// What is read but not yet written, taken out.
    fn take_pending(&mut self) -> Vec<u8> {
        let mut pending = std::mem::take(&mut self.pending);
        pending.drain(..self.written);
        self.written = 0;
        pending
    }
}

/// When a relayed session must end even though both sides still want it.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// `max_session`: end at this instant.
    pub deadline: Option<Instant>,
    /// End when no byte has crossed in either direction for this long.
    pub idle: Option<Duration>,
    /// From an end decided to both legs closed; [`END_GRACE`] unless a test wants less.
    pub grace: Duration,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            deadline: None,
            idle: None,
            grace: END_GRACE,
        }
    }
}

/// What the running relay stopped for.
enum Step {
    Over(RelayEnd),
    Decided(EndReason),
}

/// Relays until the session ends. When the client finishes sending, the server's write side
/// is shut down and its remaining output still reaches the client; when the server closes,
/// it is over.
///
/// The deadline, the idle timeout and `stop` (when it completes, with the reason it yields)
/// are ends Eastwall decides: the client is read no more, the server's stream is read on to
/// a message boundary within `limits.grace`, and [`RelayEnd::Ended`] says what is left to
/// do. The relay never closes either stream; the caller does.
pub async fn relay<C, S>(
    client: &mut C,
    server: &mut S,
    limits: RelayLimits,
    stop: Option<StopSignal<'_>>,
) -> RelayOutcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    relay_counted(client, server, limits, stop, None).await
}

/// [`relay`], also counting the bytes as they cross into `live` (one Relaxed add per chunk).
pub async fn relay_counted<C, S>(
    client: &mut C,
    server: &mut S,
    limits: RelayLimits,
    stop: Option<StopSignal<'_>>,
    live: Option<&LiveBytes>,
) -> RelayOutcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    relay_inner(client, server, limits, stop, live, &mut NoAudit).await
}

/// [`relay_counted`] for a session whose statements are audited: `audit` sees every byte
/// and holds the client's where its lines must be durable first; a line that cannot be
/// written ends the session with [`EndReason::AuditFailed`].
pub async fn relay_audited<C, S, A>(
    client: &mut C,
    server: &mut S,
    limits: RelayLimits,
    stop: Option<StopSignal<'_>>,
    live: Option<&LiveBytes>,
    audit: &mut A,
) -> RelayOutcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
    A: Audit,
{
    relay_inner(client, server, limits, stop, live, audit).await
}

async fn relay_inner<C, S, A>(
    client: &mut C,
    server: &mut S,
    limits: RelayLimits,
    stop: Option<StopSignal<'_>>,
    live: Option<&LiveBytes>,
    audit: &mut A,
) -> RelayOutcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
    A: Audit,
{
    let mut up = Pump {
        boundaries: Some(Boundaries::default()),
        live: live.map(|l| &l.client_to_server),
        ..Pump::default()
    };
    let can_end = limits.deadline.is_some() || limits.idle.is_some() || stop.is_some();
    let mut down = Pump {
        boundaries: can_end.then(Boundaries::default),
        live: live.map(|l| &l.server_to_client),
        ..Pump::default()
    };
    // Polled only when its own sources woke it, not on every chunk (see stop_gate).
    let mut stop = stop.map(crate::stop_gate::GatedStop::new);
    let mut timer: Option<Pin<Box<Sleep>>> = limits
        .deadline
        .map(|at| Box::pin(tokio::time::sleep_until(at)));
    // The idle timer is re-armed whenever bytes moved since the last wake-up.
    let mut idle: Option<(Pin<Box<Sleep>>, u64)> = limits
        .idle
        .map(|after| (Box::pin(tokio::time::sleep(after)), 0));
    let step = poll_fn(|cx| {
        // Ends first: once one is decided, the client is not read again.
        if let (Some((sleep, seen)), Some(after)) = (&mut idle, limits.idle) {
            let moved = up.bytes + down.bytes;
            if moved != *seen {
                *seen = moved;
                sleep.as_mut().reset(Instant::now() + after);
            }
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Step::Decided(EndReason::Idle));
            }
        }
        if let Some(sleep) = &mut timer {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Step::Decided(EndReason::MaxSession));
            }
        }
        if let Some(signal) = &mut stop {
            if let Poll::Ready(reason) = signal.poll(cx) {
                return Poll::Ready(Step::Decided(reason));
            }
        }
        if A::ACTIVE {
            if let Poll::Ready(Err(reason)) = audit.poll_lines(cx) {
                return Poll::Ready(Step::Decided(reason));
            }
        }
        if !up.done {
            match up.poll_pump::<C, S, A, true>(cx, client, server, audit) {
                Poll::Ready(Ok(())) | Poll::Pending => {}
                // After its Terminate, a client that drops the socket without a TLS
                // close_notify (or resets it) has still ended the session by its own word.
                Poll::Ready(Err(Side::Read(e))) => {
                    return Poll::Ready(Step::Over(if said_terminate(&up) {
                        RelayEnd::ClientClosed
                    } else {
                        RelayEnd::ClientError(e)
                    }))
                }
                Poll::Ready(Err(Side::Write(e))) => {
                    return Poll::Ready(Step::Over(RelayEnd::ServerError(e)))
                }
                Poll::Ready(Err(Side::Audit(reason))) => {
                    return Poll::Ready(Step::Decided(*reason))
                }
            }
        }
        let down_step = down.poll_pump::<S, C, A, false>(cx, server, client, audit);
        if A::ACTIVE && down_step.is_pending() {
            // Lines the server's answers just produced start on their way now.
            if let Poll::Ready(Err(reason)) = audit.poll_lines(cx) {
                return Poll::Ready(Step::Decided(reason));
            }
        }
        match down_step {
            // The server closed: after the client's Terminate (psql's Terminate and its TLS
            // close arrive separately) or EOF that is the client's doing.
            Poll::Ready(Ok(())) => Poll::Ready(Step::Over(if up.done || said_terminate(&up) {
                RelayEnd::ClientClosed
            } else {
                RelayEnd::ServerClosed
            })),
            Poll::Ready(Err(Side::Read(e))) => Poll::Ready(Step::Over(RelayEnd::ServerError(e))),
            Poll::Ready(Err(Side::Write(e))) => Poll::Ready(Step::Over(if said_terminate(&up) {
                RelayEnd::ClientClosed
            } else {
                RelayEnd::ClientError(e)
            })),
            Poll::Ready(Err(Side::Audit(reason))) => Poll::Ready(Step::Decided(*reason)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    let end = match step {
        Step::Over(end) => end,
        Step::Decided(reason) => {
            let close_by = Instant::now() + limits.grace;
            drop(stop);
            // What the client sent and the server did not take yet is never sent.
            let unsent = up.take_pending();
            up.bytes -= unsent.len() as u64;
            if let Some(live) = up.live {
                live.fetch_sub(unsent.len() as u64, Ordering::Relaxed);
            }
            // Held for the log and never released: never sent either.
            let held = audit.drop_held();
            let upstream_at_boundary = unsent.is_empty()
                && held == 0
                && up.boundaries.as_ref().is_some_and(Boundaries::at_boundary);
            drop(unsent);
            let reached = tokio::time::timeout_at(
                close_by,
                poll_fn(|cx| down.poll_to_boundary(cx, server, client, &mut *audit)),
            )
            .await;
            let rest = match reached {
                Ok(Ok(true)) => Some(down.take_pending()),
                _ => None,
            };
            RelayEnd::Ended(Ending {
                reason,
                rest,
                upstream_at_boundary,
                close_by,
            })
        }
    };
    RelayOutcome {
        client_to_server: up.bytes,
        server_to_client: down.bytes,
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const FAST: Duration = Duration::from_millis(300);

    fn limits() -> RelayLimits {
        RelayLimits {
            grace: FAST,
            ..RelayLimits::default()
        }
    }

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn stop_on(rx: tokio::sync::oneshot::Receiver<EndReason>) -> StopSignal<'static> {
        Box::pin(async move {
            match rx.await {
                Ok(reason) => reason,
                Err(_) => std::future::pending().await,
            }
        })
    }

    fn ending(end: &mut RelayEnd) -> &mut Ending {
        match end {
            RelayEnd::Ended(ending) => ending,
            other => panic!("expected an end Eastwall decided, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_are_counted() {
        let (mut client_end, mut client) = tokio::io::duplex(64);
        let (mut server, mut server_end) = tokio::io::duplex(64);
        let relay =
            tokio::spawn(async move { relay(&mut client, &mut server, limits(), None).await });

        let big = vec![7u8; 100_000];
        let writer = {
            let big = big.clone();
            tokio::spawn(async move {
                client_end.write_all(&big).await.unwrap();
                client_end.shutdown().await.unwrap();
                let mut back = Vec::new();
                client_end.read_to_end(&mut back).await.unwrap();
                back
            })
        };
        let mut got = Vec::new();
        server_end.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big);
        server_end.write_all(b"reply").await.unwrap();
        server_end.shutdown().await.unwrap();
        drop(server_end);

        assert_eq!(writer.await.unwrap(), b"reply");
        let outcome = relay.await.unwrap();
        assert_eq!(outcome.client_to_server, 100_000);
        assert_eq!(outcome.server_to_client, 5);
        assert!(
            matches!(outcome.end, RelayEnd::ClientClosed),
            "{:?}",
            outcome.end
        );
    }

    #[tokio::test]
    async fn server_close_ends_the_session() {
        let (mut client_end, mut client) = tokio::io::duplex(64);
        let (mut server, server_end) = tokio::io::duplex(64);
        let relay =
            tokio::spawn(async move { relay(&mut client, &mut server, limits(), None).await });
        drop(server_end);
        let outcome = relay.await.unwrap();
        assert!(
            matches!(
                outcome.end,
                RelayEnd::ServerClosed | RelayEnd::ServerError(_)
            ),
            "{:?}",
            outcome.end
        );
        let mut rest = Vec::new();
        client_end.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    /// psql writes Terminate, then (separately) its TLS close: the server may close in
    /// between, and that is still the client's end.
    #[tokio::test]
    async fn a_server_close_after_the_clients_terminate_is_the_clients_end() {
        let (mut client_end, mut client) = tokio::io::duplex(1024);
        let (mut server, mut server_end) = tokio::io::duplex(1024);
        let relay =
            tokio::spawn(async move { relay(&mut client, &mut server, limits(), None).await });
        let mut said = message(b'Q', b"select 1\0");
        said.extend(message(b'X', b""));
        client_end.write_all(&said).await.unwrap();
        let mut got = vec![0u8; said.len()];
        server_end.read_exact(&mut got).await.unwrap();
        drop(server_end);
        let outcome = relay.await.unwrap();
        assert!(
            matches!(outcome.end, RelayEnd::ClientClosed),
            "{:?}",
            outcome.end
        );
        drop(client_end);
    }

    /// Terminate's five bytes inside another message (CopyData here) are not a Terminate.
    #[tokio::test]
    async fn terminate_bytes_inside_a_message_are_not_a_terminate() {
        let (_client_end, mut client) = tokio::io::duplex(1024);
        let (mut server, mut server_end) = tokio::io::duplex(1024);
        let relay =
            tokio::spawn(async move { relay(&mut client, &mut server, limits(), None).await });
        let copy = message(b'd', &message(b'X', b""));
        let mut client_end = _client_end;
        client_end.write_all(&copy).await.unwrap();
        let mut got = vec![0u8; copy.len()];
        server_end.read_exact(&mut got).await.unwrap();
        drop(server_end);
        let outcome = relay.await.unwrap();
        assert!(
            matches!(outcome.end, RelayEnd::ServerClosed),
            "{:?}",
            outcome.end
        );
    }

    #[test]
    fn boundaries_are_found_across_arbitrary_chunking() {
        let mut stream = message(b'T', b"row description");
        stream.extend(message(b'D', &[7u8; 100]));
        stream.extend(message(b'Z', b"I"));
        let ends = [20usize, 20 + 105, 20 + 105 + 6];
        for chunk in 1..stream.len() {
            let mut b = Boundaries::default();
            let mut seen = Vec::new();
            let mut pos = 0;
            for part in stream.chunks(chunk) {
                let mut off = 0;
                while off < part.len() {
                    off += b.consume(&part[off..], true);
                    if b.at_boundary() {
                        seen.push(pos + off);
                    }
                }
                pos += part.len();
            }
            assert_eq!(seen, ends, "chunk size {chunk}");
            assert!(!b.terminated);
        }
    }

    #[test]
    fn follow_boundaries_reports_the_trackers_state() {
        let mut stream = message(b'Q', b"select 1\0");
        stream.extend(message(b'X', b""));
        let whole = follow_boundaries([&stream[..]], false);
        assert_eq!(
            whole,
            BoundaryState {
                at_boundary: true,
                terminated: true,
                lost: false,
                consumed: stream.len(),
            }
        );
        assert_eq!(follow_boundaries(stream.chunks(3), false), whole);
        // Stopping at the first boundary: the end of the Query.
        assert_eq!(follow_boundaries([&stream[..]], true).consumed, 14);
    }

    #[test]
    fn terminate_is_seen_only_as_a_message_of_its_own() {
        let mut stream = message(b'Q', b"select 'X\0\0\0\x04'\0");
        stream.extend(message(b'd', &message(b'X', b"")));
        for chunk in 1..=stream.len() {
            let mut b = Boundaries::default();
            for part in stream.chunks(chunk) {
                b.consume(part, false);
            }
            assert!(!b.terminated, "chunk size {chunk}");
            for part in message(b'X', b"").chunks(chunk) {
                b.consume(part, false);
            }
            assert!(b.terminated, "chunk size {chunk}");
        }
        // Past a length PostgreSQL refuses, nothing is framed any more.
        let mut b = Boundaries::default();
        b.consume(&[b'Q', 0, 0, 0, 2], false);
        b.consume(&message(b'X', b""), false);
        assert!(!b.terminated);
    }

    #[tokio::test]
    async fn deadline_stops_the_server_stream_at_a_message_boundary() {
        let (mut client_end, mut client) = tokio::io::duplex(1 << 16);
        let (mut server, mut server_end) = tokio::io::duplex(1 << 16);
        let deadline = Instant::now() + Duration::from_millis(50);
        let relay = tokio::spawn(async move {
            let limits = RelayLimits {
                deadline: Some(deadline),
                grace: Duration::from_secs(2),
                ..RelayLimits::default()
            };
            let mut outcome = relay(&mut client, &mut server, limits, None).await;
            let done = ending(&mut outcome.end).finish(&mut client, b"bye").await;
            (outcome, done)
        });
        // One whole message, then half of the next one arriving after the deadline.
        let first = message(b'D', &[1u8; 10]);
        let second = message(b'D', &[2u8; 10]);
        server_end.write_all(&first).await.unwrap();
        server_end.write_all(&second[..7]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        server_end.write_all(&second[7..]).await.unwrap();
        server_end
            .write_all(&message(b'D', &[3u8; 10]))
            .await
            .unwrap();
        let (mut outcome, done) = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .expect("relay ends")
            .unwrap();
        assert!(done);
        assert_eq!(ending(&mut outcome.end).reason, EndReason::MaxSession);
        let mut got = Vec::new();
        client_end.read_to_end(&mut got).await.unwrap();
        let mut expected = first.clone();
        expected.extend_from_slice(&second);
        expected.extend_from_slice(b"bye");
        assert_eq!(got, expected, "the client gets whole messages only");
    }

    #[tokio::test]
    async fn idle_sessions_end_and_busy_ones_do_not() {
        let (mut client_end, mut client) = tokio::io::duplex(1024);
        let (mut server, mut server_end) = tokio::io::duplex(1024);
        let limits = RelayLimits {
            idle: Some(Duration::from_millis(300)),
            ..limits()
        };
        let relay =
            tokio::spawn(async move { relay(&mut client, &mut server, limits, None).await });
        // Traffic every 100 ms for a second keeps it alive past three idle periods.
        for _ in 0..10 {
            client_end.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            server_end.read_exact(&mut one).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!relay.is_finished(), "a busy session was ended");
        let mut outcome = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .expect("an idle session ends")
            .unwrap();
        assert_eq!(ending(&mut outcome.end).reason, EndReason::Idle);
        assert_eq!(outcome.client_to_server, 10);
    }

    #[tokio::test]
    async fn a_stop_signal_ends_the_session_at_a_message_boundary() {
        let (mut client_end, mut client) = tokio::io::duplex(1 << 16);
        let (mut server, mut server_end) = tokio::io::duplex(1 << 16);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let relay = tokio::spawn(async move {
            let limits = RelayLimits {
                grace: Duration::from_secs(2),
                ..RelayLimits::default()
            };
            let mut outcome = relay(&mut client, &mut server, limits, Some(stop_on(rx))).await;
            ending(&mut outcome.end).finish(&mut client, b"").await;
            outcome
        });
        let whole = message(b'D', &[1u8; 10]);
        let torn = message(b'D', &[2u8; 10]);
        server_end.write_all(&whole).await.unwrap();
        server_end.write_all(&torn[..4]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(EndReason::Revoked).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        server_end.write_all(&torn[4..]).await.unwrap();
        server_end.write_all(&message(b'Z', b"I")).await.unwrap();
        let mut outcome = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .expect("relay ends")
            .unwrap();
        assert_eq!(ending(&mut outcome.end).reason, EndReason::Revoked);
        assert_eq!(outcome.end.reason(), "revoked");
        let mut got = Vec::new();
        client_end.read_to_end(&mut got).await.unwrap();
        let mut expected = whole.clone();
        expected.extend_from_slice(&torn);
        assert_eq!(
            got, expected,
            "the torn message is completed, nothing after it is sent"
        );
    }

    /// The attack: the client stops reading (its window is full, the server's stream is
    /// stuck on it) and keeps writing statements. Once the end is decided not one more
    /// client byte reaches the server, and the relay gives up within the grace.
    #[tokio::test]
    async fn a_client_that_stops_reading_cannot_hold_the_session_or_feed_the_server() {
        let (client_end, mut client) = tokio::io::duplex(4096);
        let (mut server, server_end) = tokio::io::duplex(4096);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let relay = tokio::spawn(async move {
            let outcome = relay(&mut client, &mut server, limits(), Some(stop_on(rx))).await;
            (outcome, client, server)
        });
        // The client writes statements forever and never reads.
        let (_client_rd, mut client_wr) = tokio::io::split(client_end);
        let writer = tokio::spawn(async move {
            let statement = message(b'Q', b"insert into t values (1)\0");
            while client_wr.write_all(&statement).await.is_ok() {}
        });
        // The server counts what reaches it and streams a big result nobody reads.
        let (mut server_rd, mut server_wr) = tokio::io::split(server_end);
        let received = Arc::new(AtomicU64::new(0));
        let counter = {
            let received = received.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = server_rd.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    received.fetch_add(n as u64, Ordering::SeqCst);
                }
            })
        };
        let streamer = tokio::spawn(async move {
            let row = message(b'D', &[9u8; 1000]);
            while server_wr.write_all(&row).await.is_ok() {}
        });
        // Let the pipes fill up: the server's stream is stuck on the client.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(received.load(Ordering::SeqCst) > 0);
        tx.send(EndReason::Revoked).unwrap();
        let decided = Instant::now();
        let (mut outcome, client, server) = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .expect("the relay ends although the client reads nothing")
            .unwrap();
        assert!(
            decided.elapsed() < FAST + Duration::from_millis(200),
            "{:?}",
            decided.elapsed()
        );
        assert_eq!(ending(&mut outcome.end).reason, EndReason::Revoked);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            received.load(Ordering::SeqCst),
            outcome.client_to_server,
            "the server got exactly what the relay passed on"
        );
        // Nothing more arrives, although the client is still writing.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(received.load(Ordering::SeqCst), outcome.client_to_server);
        assert!(!writer.is_finished(), "the client is still trying to write");
        drop((client, server));
        for task in [writer, counter, streamer] {
            task.abort();
        }
    }

    /// An end decided while the client's stream is mid-message: the partial message is not
    /// completed by us, and no Terminate may follow it.
    #[tokio::test]
    async fn an_end_mid_client_message_forbids_a_terminate() {
        let (mut client_end, mut client) = tokio::io::duplex(1024);
        let (mut server, mut server_end) = tokio::io::duplex(1024);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let relay = tokio::spawn(async move {
            relay(&mut client, &mut server, limits(), Some(stop_on(rx))).await
        });
        let statement = message(b'Q', b"select 1\0");
        client_end.write_all(&statement[..6]).await.unwrap();
        let mut got = [0u8; 6];
        server_end.read_exact(&mut got).await.unwrap();
        tx.send(EndReason::Shutdown).unwrap();
        let mut outcome = relay.await.unwrap();
        let end = ending(&mut outcome.end);
        assert_eq!(end.reason, EndReason::Shutdown);
        assert!(!end.upstream_at_boundary);
        assert_eq!(outcome.end.reason(), "shutdown");
    }
}
