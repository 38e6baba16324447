//! The byte pipe between an admitted client and its PostgreSQL session.
//!
//! After admission the proxy adds no per-message work: bytes are read in chunks of up to a
//! TLS record (16 KiB) and written straight on. Reads go into one scratch buffer per worker
//! thread; a session owns memory only while the other side is slow to accept a write, so an
//! idle session holds no relay buffer at all (tokio's copy_bidirectional pins 16 KiB).
//!
//! A session with a deadline (`max_session` for MFA-admitted operators) is ended at a
//! message boundary of the server's stream, so the client can be told why with a clean
//! ErrorResponse instead of a torn message. Only such sessions pay for boundary tracking.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// One TLS record's worth of plaintext: the largest useful read.
const CHUNK: usize = 16 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; CHUNK].into_boxed_slice());
}

/// How a relayed session ended, and what crossed it.
#[derive(Debug)]
pub struct RelayOutcome {
    pub client_to_server: u64,
    pub server_to_client: u64,
    pub end: RelayEnd,
}

#[derive(Debug)]
pub enum RelayEnd {
    /// The client closed (Terminate, then EOF) and the server followed.
    ClientClosed,
    /// The server closed the session (e.g. a FATAL, or a shutdown).
    ServerClosed,
    ClientError(io::Error),
    ServerError(io::Error),
    /// The session's deadline passed; the server's stream was stopped at a message boundary.
    Deadline,
    /// Nothing crossed the session in either direction for the idle timeout.
    Idle,
    /// Told to stop (the client's certificate was revoked); stopped at a message boundary.
    Stopped,
}

impl RelayEnd {
    pub fn reason(&self) -> &'static str {
        match self {
            RelayEnd::ClientClosed => "client_closed",
            RelayEnd::ServerClosed => "server_closed",
            RelayEnd::ClientError(_) => "client_error",
            RelayEnd::ServerError(_) => "server_error",
            RelayEnd::Deadline => "max_session",
            RelayEnd::Idle => "idle_timeout",
            RelayEnd::Stopped => "revoked",
        }
    }
}

/// Follows message boundaries in a PostgreSQL stream (1-byte tag, 4-byte length that counts
/// itself) as bytes pass, without buffering them.
#[derive(Debug, Default)]
struct Boundaries {
    header: [u8; 5],
    header_len: usize,
    body_left: u64,
}

impl Boundaries {
    fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
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
            } else {
                self.header[self.header_len] = bytes[i];
                self.header_len += 1;
                i += 1;
                if self.header_len < 5 {
                    continue;
                }
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                self.body_left = u64::from(len.saturating_sub(4));
                self.header_len = 0;
            }
            if stop_at_first && self.at_boundary() {
                return i;
            }
        }
        i
    }
}

/// How a pump finished without error.
#[derive(Debug, PartialEq, Eq)]
enum Finished {
    /// The reader reached EOF and the writer was shut down.
    Eof,
    /// Asked to stop, it stopped at a message boundary.
    Stopped,
}

/// One direction of the pipe.
#[derive(Default)]
struct Pump {
    /// Bytes read but not yet accepted by the writer; empty (unallocated) when caught up.
    pending: Vec<u8>,
    written: usize,
    needs_flush: bool,
    read_eof: bool,
    done: bool,
    bytes: u64,
    /// Set when this direction may have to stop at a message boundary.
    boundaries: Option<Boundaries>,
    stopping: bool,
}

/// Which side an I/O error came from.
enum Side {
    Read(io::Error),
    Write(io::Error),
}

impl Pump {
    /// Moves bytes until the reader is exhausted (EOF, after which the writer is shut down)
    /// or an error; returns Pending while waiting on either side.
    fn poll_pump<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<Result<Finished, Side>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
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
            if self.read_eof {
                ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(Side::Write)?;
                ready!(Pin::new(&mut *w).poll_shutdown(cx)).map_err(Side::Write)?;
                self.done = true;
                return Poll::Ready(Ok(Finished::Eof));
            }
            if self.stopping
                && self
                    .boundaries
                    .as_ref()
                    .is_some_and(Boundaries::at_boundary)
            {
                ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(Side::Write)?;
                self.done = true;
                return Poll::Ready(Ok(Finished::Stopped));
            }
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
                            // When stopping, what lies past the next boundary is never sent:
                            // the session ends there.
                            filled = boundaries.consume(&scratch[..filled], self.stopping);
                        }
                        self.bytes += filled as u64;
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
            match step {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing more to read now: push out what the writer buffered (a TLS
                    // writer holds records until flushed), then wait.
                    if self.needs_flush {
                        ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(Side::Write)?;
                        self.needs_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// When a relayed session must end even though both sides still want it.
#[derive(Debug, Clone, Copy, Default)]
pub struct RelayLimits {
    /// Stop at the next message boundary of the server's stream after this instant.
    pub deadline: Option<Instant>,
    /// End when no byte has crossed in either direction for this long.
    pub idle: Option<std::time::Duration>,
}

/// Relays until the session ends, or until `deadline` (then at a message boundary of the
/// server's stream). When the client finishes sending, the server's write side is shut down
/// and its remaining output still reaches the client; when the server closes, it is over.
///
/// `stop`, when it completes, ends the session like the deadline does but reports `Stopped`.
pub async fn relay<C, S>(
    client: &mut C,
    server: &mut S,
    limits: RelayLimits,
    stop: Option<Pin<Box<dyn Future<Output = ()> + Send + '_>>>,
) -> RelayOutcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Pump::default();
    let mut down = Pump {
        boundaries: (limits.deadline.is_some() || stop.is_some()).then(Boundaries::default),
        ..Pump::default()
    };
    let mut stop = stop;
    let mut stopped = false;
    let mut timer: Option<Pin<Box<Sleep>>> = limits
        .deadline
        .map(|at| Box::pin(tokio::time::sleep_until(at)));
    // The idle timer is re-armed whenever bytes moved since the last wake-up.
    let mut idle: Option<(Pin<Box<Sleep>>, u64)> = limits
        .idle
        .map(|after| (Box::pin(tokio::time::sleep(after)), 0));
    let end = poll_fn(|cx| {
        if let (Some((sleep, seen)), Some(after)) = (&mut idle, limits.idle) {
            let moved = up.bytes + down.bytes;
            if moved != *seen {
                *seen = moved;
                sleep.as_mut().reset(Instant::now() + after);
            }
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(RelayEnd::Idle);
            }
        }
        if let Some(sleep) = &mut timer {
            if sleep.as_mut().poll(cx).is_ready() {
                down.stopping = true;
                timer = None;
            }
        }
        if let Some(signal) = &mut stop {
            if signal.as_mut().poll(cx).is_ready() {
                down.stopping = true;
                stopped = true;
                stop = None;
            }
        }
        if !up.done {
            match up.poll_pump(cx, client, server) {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(Side::Read(e))) => return Poll::Ready(RelayEnd::ClientError(e)),
                Poll::Ready(Err(Side::Write(e))) => return Poll::Ready(RelayEnd::ServerError(e)),
                Poll::Pending => {}
            }
        }
        match down.poll_pump(cx, server, client) {
            Poll::Ready(Ok(Finished::Stopped)) => Poll::Ready(if stopped {
                RelayEnd::Stopped
            } else {
                RelayEnd::Deadline
            }),
            Poll::Ready(Ok(Finished::Eof)) => Poll::Ready(if up.done {
                RelayEnd::ClientClosed
            } else {
                RelayEnd::ServerClosed
            }),
            Poll::Ready(Err(Side::Read(e))) => Poll::Ready(RelayEnd::ServerError(e)),
            Poll::Ready(Err(Side::Write(e))) => Poll::Ready(RelayEnd::ClientError(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    RelayOutcome {
        client_to_server: up.bytes,
        server_to_client: down.bytes,
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_flow_both_ways_and_are_counted() {
        let (mut client_end, mut client) = tokio::io::duplex(64);
        let (mut server, mut server_end) = tokio::io::duplex(64);
        let relay = tokio::spawn(async move {
            relay(&mut client, &mut server, RelayLimits::default(), None).await
        });

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
        let relay = tokio::spawn(async move {
            relay(&mut client, &mut server, RelayLimits::default(), None).await
        });
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

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
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
        }
    }

    #[tokio::test]
    async fn deadline_stops_the_server_stream_at_a_message_boundary() {
        let (mut client_end, mut client) = tokio::io::duplex(1 << 16);
        let (mut server, mut server_end) = tokio::io::duplex(1 << 16);
        let deadline = Instant::now() + std::time::Duration::from_millis(50);
        let relay = tokio::spawn(async move {
            relay(
                &mut client,
                &mut server,
                RelayLimits {
                    deadline: Some(deadline),
                    idle: None,
                },
                None,
            )
            .await
        });
        // One whole message, then half of the next one arriving after the deadline.
        let first = message(b'D', &[1u8; 10]);
        let second = message(b'D', &[2u8; 10]);
        server_end.write_all(&first).await.unwrap();
        server_end.write_all(&second[..7]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        server_end.write_all(&second[7..]).await.unwrap();
        server_end
            .write_all(&message(b'D', &[3u8; 10]))
            .await
            .unwrap();
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(5), relay)
            .await
            .expect("relay ends")
            .unwrap();
        assert!(
            matches!(outcome.end, RelayEnd::Deadline),
            "{:?}",
            outcome.end
        );
        let mut got = Vec::new();
        client_end.read_to_end(&mut got).await.unwrap();
        let mut expected = first.clone();
        expected.extend_from_slice(&second);
        assert_eq!(got, expected, "the client gets whole messages only");
    }

    #[tokio::test]
    async fn idle_sessions_end_and_busy_ones_do_not() {
        let (mut client_end, mut client) = tokio::io::duplex(1024);
        let (mut server, mut server_end) = tokio::io::duplex(1024);
        let limits = RelayLimits {
            deadline: None,
            idle: Some(std::time::Duration::from_millis(300)),
        };
        let relay =
            tokio::spawn(async move { relay(&mut client, &mut server, limits, None).await });
        // Traffic every 100 ms for a second keeps it alive past three idle periods.
        for _ in 0..10 {
            client_end.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            server_end.read_exact(&mut one).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(!relay.is_finished(), "a busy session was ended");
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(5), relay)
            .await
            .expect("an idle session ends")
            .unwrap();
        assert!(matches!(outcome.end, RelayEnd::Idle), "{:?}", outcome.end);
        assert_eq!(outcome.client_to_server, 10);
    }

    #[tokio::test]
    async fn a_stop_signal_ends_the_session_at_a_message_boundary() {
        let (mut client_end, mut client) = tokio::io::duplex(1 << 16);
        let (mut server, mut server_end) = tokio::io::duplex(1 << 16);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let relay = tokio::spawn(async move {
            let stop: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
                let _ = rx.await;
            });
            relay(&mut client, &mut server, RelayLimits::default(), Some(stop)).await
        });
        let whole = message(b'D', &[1u8; 10]);
        let torn = message(b'D', &[2u8; 10]);
        server_end.write_all(&whole).await.unwrap();
        server_end.write_all(&torn[..4]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        tx.send(()).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        server_end.write_all(&torn[4..]).await.unwrap();
        server_end.write_all(&message(b'Z', b"I")).await.unwrap();
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(5), relay)
            .await
            .expect("relay ends")
            .unwrap();
        assert!(
            matches!(outcome.end, RelayEnd::Stopped),
            "{:?}",
            outcome.end
        );
        let mut got = Vec::new();
        client_end.read_to_end(&mut got).await.unwrap();
        let mut expected = whole.clone();
        expected.extend_from_slice(&torn);
        assert_eq!(
            got, expected,
            "the torn message is completed, nothing after it is sent"
        );
    }
}
