//! `query`: N clients send pgbench's select-only query back to back for a duration.

use std::time::Instant;

use hdrhistogram::Histogram;
use tokio_postgres::types::Type;

use super::{LoadError, RunLimits, RunOutput, Target};
use crate::report::Figures;

/// How each query travels, named as pgbench names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// One Query message with the value inlined.
    Simple,
    /// Parse/Bind/Execute of an unnamed statement, one round trip.
    Extended,
    /// A statement prepared once per client, then Bind/Execute.
    Prepared,
}

/// The select-only transaction: against pgbench_accounts when `accounts` > 0, else a
/// constant select that needs no data.
#[derive(Debug, Clone, Copy)]
pub struct QueryShape {
    pub protocol: Protocol,
    pub accounts: u32,
}

impl QueryShape {
    fn sql(&self) -> &'static str {
        if self.accounts > 0 {
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
        } else {
            "SELECT $1::int4"
        }
    }
    fn simple_sql(&self, aid: i32) -> String {
        if self.accounts > 0 {
            format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid}")
        } else {
            format!("SELECT {aid}")
        }
    }
}

/// Latency histogram in nanoseconds, up to a minute.
pub fn latency_histogram() -> Histogram<u64> {
    // Constant, valid bounds (low >= 1, high >= 2 * low, 3 significant figures).
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("constant histogram bounds are valid")
}

/// xorshift64*: the account ids only need to spread over the table, not be unpredictable.
struct Ids(u64);
impl Ids {
    fn next(&mut self, max: u32) -> i32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (1 + (r % u64::from(max.max(1)))) as i32
    }
}

async fn client_loop(
    target: Target,
    shape: QueryShape,
    limits: RunLimits,
    seed: u64,
) -> Result<Histogram<u64>, LoadError> {
    let (client, conn) = target.connect().await?;
    let sql = shape.sql();
    let stmt = match shape.protocol {
        Protocol::Prepared => Some(client.prepare_typed(sql, &[Type::INT4]).await.map_err(
            |source| LoadError::Sql {
                what: "PREPARE",
                source,
            },
        )?),
        _ => None,
    };
    let mut ids = Ids(seed | 1);
    let mut hist = latency_histogram();
    let max = if shape.accounts > 0 {
        shape.accounts
    } else {
        1000
    };
    let deadline = Instant::now() + limits.duration;
    loop {
        let start = Instant::now();
        if start >= deadline {
            break;
        }
        let aid = ids.next(max);
        let result = match (&stmt, shape.protocol) {
            (Some(stmt), _) => client.query(stmt, &[&aid]).await.map(drop),
            (None, Protocol::Extended) => client
                .query_typed(sql, &[(&aid, Type::INT4)])
                .await
                .map(drop),
            (None, _) => client.simple_query(&shape.simple_sql(aid)).await.map(drop),
        };
        result.map_err(|source| LoadError::Sql {
            what: "the select",
            source,
        })?;
        let ns = start.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
        hist.saturating_record(ns.max(1));
    }
    drop(client);
    let _ = conn.await;
    Ok(hist)
}

pub async fn run(
    target: &Target,
    shape: QueryShape,
    limits: RunLimits,
) -> Result<RunOutput, LoadError> {
    let started = Instant::now();
    let workers: Vec<_> = (0..limits.clients.max(1))
        .map(|i| {
            let seed =
                started.elapsed().as_nanos() as u64 ^ ((i as u64 + 1) * 0x9E37_79B9_7F4A_7C15);
            tokio::spawn(client_loop(target.clone(), shape, limits, seed))
        })
        .collect();
    let mut all = latency_histogram();
    for w in workers {
        let h = w.await??;
        // Same bounds on every histogram, so adding cannot fail; saturate rather than panic.
        let _ = all.add(&h);
    }
    let secs = limits.duration.as_secs_f64().max(1e-9);
    let n = all.len();
    let us = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    let mut figures = Figures::new();
    figures.insert("tps", n as f64 / secs);
    figures.insert("lat_p50_us", us(0.5));
    figures.insert("lat_p99_us", us(0.99));
    figures.insert("lat_p999_us", us(0.999));
    Ok(RunOutput { figures, ops: n })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_ids_stay_in_range_and_spread() {
        let mut ids = Ids(12345);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = ids.next(100);
            assert!((1..=100).contains(&id));
            seen.insert(id);
        }
        assert_eq!(seen.len(), 100);
    }

    #[test]
    fn simple_protocol_inlines_the_value() {
        let shape = QueryShape {
            protocol: Protocol::Simple,
            accounts: 10,
        };
        assert_eq!(
            shape.simple_sql(7),
            "SELECT abalance FROM pgbench_accounts WHERE aid = 7"
        );
    }
}
