//! The byte pipe between an admitted client and its PostgreSQL session.
//!
//! After admission the proxy adds no per-message work: bytes are read in chunks of up to a
//! TLS record (16 KiB) and written straight on. Reads go into one scratch buffer per worker
//! thread; a session owns memory only while the other side is slow to accept a write, so an
//! idle session holds no relay buffer at all (tokio's copy_bidirectional pins 16 KiB).

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
}

impl RelayEnd {
    pub fn reason(&self) -> &'static str {
        match self {
            RelayEnd::ClientClosed => "client_closed",
            RelayEnd::ServerClosed => "server_closed",
            RelayEnd::ClientError(_) => "client_error",
            RelayEnd::ServerError(_) => "server_error",
        }
    }
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
    ) -> Poll<Result<(), Side>>
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
                return Poll::Ready(Ok(()));
            }
            let step = SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let mut buf = ReadBuf::new(&mut scratch[..]);
                match Pin::new(&mut *r).poll_read(cx, &mut buf) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Err(Side::Read(e))),
                    Poll::Ready(Ok(())) => {
                        let filled = buf.filled().len();
                        if filled == 0 {
                            self.read_eof = true;
                            return Poll::Ready(Ok(()));
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

/// Relays until the session ends. When the client finishes sending, the server's write side
/// is shut down and its remaining output still reaches the client; when the server closes,
/// the session is over.
pub async fn relay<C, S>(client: &mut C, server: &mut S) -> RelayOutcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Pump::default();
    let mut down = Pump::default();
    let end = poll_fn(|cx| {
        if !up.done {
            match up.poll_pump(cx, client, server) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(Side::Read(e))) => return Poll::Ready(RelayEnd::ClientError(e)),
                Poll::Ready(Err(Side::Write(e))) => return Poll::Ready(RelayEnd::ServerError(e)),
                Poll::Pending => {}
            }
        }
        match down.poll_pump(cx, server, client) {
            Poll::Ready(Ok(())) => Poll::Ready(if up.done {
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
        let relay = tokio::spawn(async move { relay(&mut client, &mut server).await });

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
        let relay = tokio::spawn(async move { relay(&mut client, &mut server).await });
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
}
