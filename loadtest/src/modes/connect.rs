//! `connect`: connection churn. Each iteration is a whole client life: TCP connect, SSLRequest,
//! full mTLS handshake (no resumption), startup, `select 1`, Terminate and close.

use std::time::Instant;

use hdrhistogram::Histogram;

use super::query::latency_histogram;
use super::{LoadError, RunLimits, RunOutput, Target};
use crate::report::Figures;

async fn churn(
    target: Target,
    limits: RunLimits,
) -> Result<(Histogram<u64>, Histogram<u64>), LoadError> {
    let mut connect = latency_histogram();
    let mut whole = latency_histogram();
    let deadline = Instant::now() + limits.duration;
    while Instant::now() < deadline {
        let start = Instant::now();
        let (client, conn) = target.connect().await?;
        let ready = start.elapsed();
        client
            .simple_query("select 1")
            .await
            .map_err(|source| LoadError::Sql {
                what: "select 1",
                source,
            })?;
        drop(client);
        conn.await?;
        let ns = |d: std::time::Duration| (d.as_nanos().min(u128::from(u64::MAX)) as u64).max(1);
        connect.saturating_record(ns(ready));
        whole.saturating_record(ns(start.elapsed()));
    }
    Ok((connect, whole))
}

pub async fn run(target: &Target, limits: RunLimits) -> Result<RunOutput, LoadError> {
    let workers: Vec<_> = (0..limits.clients.max(1))
        .map(|_| tokio::spawn(churn(target.clone(), limits)))
        .collect();
    let mut connect = latency_histogram();
    let mut whole = latency_histogram();
    for w in workers {
        let (c, h) = w.await??;
        let _ = connect.add(&c);
        let _ = whole.add(&h);
    }
    let n = whole.len();
    let mut figures = Figures::new();
    figures.insert(
        "conn_per_s",
        n as f64 / limits.duration.as_secs_f64().max(1e-9),
    );
    figures.insert(
        "connect_p50_us",
        connect.value_at_quantile(0.5) as f64 / 1000.0,
    );
    figures.insert(
        "connect_p99_us",
        connect.value_at_quantile(0.99) as f64 / 1000.0,
    );
    figures.insert(
        "session_p50_us",
        whole.value_at_quantile(0.5) as f64 / 1000.0,
    );
    Ok(RunOutput { figures, ops: n })
}
