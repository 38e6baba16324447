//! `idle`: opens N admitted sessions and holds them, to read the proxy's memory per session.

use std::time::{Duration, Instant};

use futures_util::stream::{self, StreamExt, TryStreamExt};

use super::{proc_rss_kib, LoadError, RunOutput, Target};
use crate::report::Figures;

/// Opening more sessions at once than this only queues them in the server's accept backlog.
const OPEN_PARALLELISM: usize = 16;

pub async fn run(
    target: &Target,
    sessions: usize,
    settle: Duration,
    proxy_pid: Option<u32>,
) -> Result<RunOutput, LoadError> {
    let before = proxy_pid.map(proc_rss_kib).transpose()?;
    let start = Instant::now();
    let open: Vec<_> = stream::iter(0..sessions)
        .map(|_| async {
            let (client, conn) = target.connect().await?;
            // One round trip proves the session is admitted and relaying, as an app's would be.
            client
                .simple_query("select 1")
                .await
                .map_err(|source| LoadError::Sql {
                    what: "select 1",
                    source,
                })?;
            Ok::<_, LoadError>((client, conn))
        })
        .buffer_unordered(OPEN_PARALLELISM)
        .try_collect()
        .await?;
    let opened_in = start.elapsed();
    // Let the proxy finish its post-admission work (logging, buffer release) before reading.
    tokio::time::sleep(settle).await;
    let held = proxy_pid.map(proc_rss_kib).transpose()?;

    let mut figures = Figures::new();
    figures.insert(
        "sessions_open_per_s",
        sessions as f64 / opened_in.as_secs_f64().max(1e-9),
    );
    if let (Some((rss0, anon0)), Some((rss1, anon1))) = (before, held) {
        let per = |a: u64, b: u64| (b as f64 - a as f64) / sessions.max(1) as f64;
        figures.insert("proxy_rss_kib_per_session", per(rss0, rss1));
        figures.insert("proxy_rss_anon_kib_per_session", per(anon0, anon1));
    }
    for (client, conn) in open {
        drop(client);
        conn.await?;
    }
    Ok(RunOutput {
        figures,
        ops: sessions as u64,
    })
}
