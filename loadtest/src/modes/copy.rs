//! `copy`: COPY a table out to the client, then the same bytes back in to a temporary table,
//! reporting MB/s (10^6 bytes) each way.

use std::time::Instant;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};

use super::{LoadError, RunOutput, Target};
use crate::report::Figures;

/// Chunk size for COPY IN: a few TLS records per CopyData, as psql's \copy sends.
const CHUNK: usize = 64 * 1024;

/// Accepts `name` or `schema.name` of plain identifier characters only, since the name is
/// placed into SQL text.
pub fn check_table_name(name: &str) -> Result<(), LoadError> {
    let ok = !name.is_empty()
        && name.split('.').count() <= 2
        && name.split('.').all(|part| {
            !part.is_empty()
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !part.starts_with(|c: char| c.is_ascii_digit())
        });
    if ok {
        Ok(())
    } else {
        Err(LoadError::TableName(name.to_owned()))
    }
}

/// Reads the table's COPY text once (up to `max_bytes`), as the payload for COPY IN.
pub async fn payload(target: &Target, table: &str, max_bytes: usize) -> Result<Vec<u8>, LoadError> {
    check_table_name(table)?;
    let (client, conn) = target.connect().await?;
    let sql = format!("COPY {table} TO STDOUT");
    let mut data = Vec::new();
    {
        // Scoped so the stream (and its claim on the session) is gone before the close.
        let stream = client
            .copy_out(&sql)
            .await
            .map_err(|source| LoadError::Sql {
                what: "COPY TO STDOUT",
                source,
            })?;
        futures_util::pin_mut!(stream);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| LoadError::Sql {
                what: "COPY TO STDOUT",
                source,
            })?;
            data.extend_from_slice(&chunk);
            if data.len() >= max_bytes {
                break;
            }
        }
    }
    // Keep whole rows only: cut after the last newline.
    let end = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    data.truncate(end);
    drop(client);
    let _ = conn.await;
    if data.is_empty() {
        return Err(LoadError::Usage(format!(
            "table {table} is empty: nothing to COPY"
        )));
    }
    Ok(data)
}

pub async fn run(target: &Target, table: &str, data: &[u8]) -> Result<RunOutput, LoadError> {
    check_table_name(table)?;
    let (client, conn) = target.connect().await?;
    let sql_err = |what| move |source| LoadError::Sql { what, source };

    let start = Instant::now();
    let stream = client
        .copy_out(&format!("COPY {table} TO STDOUT"))
        .await
        .map_err(sql_err("COPY TO STDOUT"))?;
    futures_util::pin_mut!(stream);
    let mut out_bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        out_bytes += chunk.map_err(sql_err("COPY TO STDOUT"))?.len() as u64;
    }
    let out_secs = start.elapsed().as_secs_f64().max(1e-9);

    client
        .batch_execute(&format!(
            "CREATE TEMP TABLE IF NOT EXISTS eastwall_copy_in (LIKE {table}); TRUNCATE eastwall_copy_in"
        ))
        .await
        .map_err(sql_err("CREATE TEMP TABLE"))?;
    let start = Instant::now();
    let sink = client
        .copy_in::<_, Bytes>("COPY eastwall_copy_in FROM STDIN")
        .await
        .map_err(sql_err("COPY FROM STDIN"))?;
    futures_util::pin_mut!(sink);
    for chunk in data.chunks(CHUNK) {
        sink.feed(Bytes::copy_from_slice(chunk))
            .await
            .map_err(sql_err("COPY FROM STDIN"))?;
    }
    sink.finish().await.map_err(sql_err("COPY FROM STDIN"))?;
    let in_secs = start.elapsed().as_secs_f64().max(1e-9);
    drop(client);
    let _ = conn.await;

    let mut figures = Figures::new();
    figures.insert("copy_out_mb_s", out_bytes as f64 / 1e6 / out_secs);
    figures.insert("copy_in_mb_s", data.len() as f64 / 1e6 / in_secs);
    Ok(RunOutput {
        figures,
        ops: ((out_bytes + data.len() as u64) / 1_000_000).max(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_table_names_are_placed_into_sql() {
        assert!(check_table_name("pgbench_accounts").is_ok());
        assert!(check_table_name("public.pgbench_accounts").is_ok());
        for bad in ["", "a;drop table x", "a.b.c", "1abc", "a b", "x--", "."] {
            assert!(check_table_name(bad).is_err(), "{bad}");
        }
    }
}
