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
    /// Starts `body` on a thread called `name`; it is given the runtime (to await on) and a
    /// receiver that changes when [`TapThread::stop`] is called.
    pub fn spawn(
        name: &str,
        body: impl FnOnce(tokio::runtime::Handle, watch::Receiver<bool>) + Send + 'static,
    ) -> std::io::Result<TapThread> {
        let (stop, stopped) = watch::channel(false);
        let rt = tokio::runtime::Handle::current();
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
