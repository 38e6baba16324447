//! A thread of its own that reads a decision-log tap ([`crate::audit::Tap`]), and its bounded stop: what the inline detectors and the OCSF file share.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

/// The running thread and the switch that stops it.
pub struct TapThread {
    stop: watch::Sender<bool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl TapThread {
    /// Starts `body` on a thread called `name`; it is given a runtime of its own to await on
    /// and a receiver that changes when [`TapThread::stop`] is called.
    ///
    /// Its own (current-thread, timers only), not the sidecar's: a thread that awaited a
    /// timer on the sidecar's runtime panicked when that runtime shut down first ("A Tokio
    /// 1.x context was found, but it is being shutdown"). Channels and the log's commit
    /// notices work across runtimes; when the sidecar's side is gone they close, and the
    /// body sees that instead.
    pub fn spawn(
        name: &str,
        body: impl FnOnce(tokio::runtime::Runtime, watch::Receiver<bool>) + Send + 'static,
    ) -> std::io::Result<TapThread> {
        let (stop, stopped) = watch::channel(false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(rt, stopped))?;
        Ok(TapThread {
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Asks the thread to finish what is queued and waits for it, at most `wait`; false
    /// when it did not finish in time.
    pub async fn stop(&self, wait: Duration) -> bool {
        let _ = self.stop.send(true);
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(thread) = thread else { return true };
        let joined = tokio::task::spawn_blocking(move || thread.join());
        tokio::time::timeout(wait, joined).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sidecar's runtime shuts down while the thread waits on a timer: the thread goes
    /// on with its own runtime (it used to panic inside the timer).
    #[test]
    fn a_thread_outlives_the_runtime_that_started_it_without_a_panic() {
        let sidecar = tokio::runtime::Runtime::new().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = sidecar.block_on(async {
            TapThread::spawn("tap-test", move |rt, mut stopped| {
                let woke = rt.block_on(async {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(300)) => "slept",
                        _ = stopped.changed() => "stopped",
                    }
                });
                let _ = tx.send(woke);
            })
            .unwrap()
        });
        drop(sidecar);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok("slept"));
        drop(thread);
    }
}
