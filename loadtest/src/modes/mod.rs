//! The four workloads, the connection helper they share, and the proxy's /proc figures.

pub mod connect;
pub mod copy;
pub mod idle;
pub mod query;

use std::path::PathBuf;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::report::Figures;
use crate::tls::{ConnSpec, TargetError};

/// Why a run could not complete.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: String,
        source: tokio_postgres::Error,
    },
    #[error("{what} failed: {source}")]
    Sql {
        what: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("cannot read {path}: {source}")]
    Proc {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unexpected contents in {0}")]
    ProcFormat(PathBuf),
    #[error("--table {0:?} is not a plain (optionally schema-qualified) table name")]
    TableName(String),
    #[error("{0}")]
    Usage(String),
    #[error("a worker task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// One side of the comparison, ready to open connections.
#[derive(Clone)]
pub struct Target {
    pub name: String,
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
}

impl Target {
    pub fn new(name: &str, spec: &ConnSpec) -> Result<Self, LoadError> {
        Ok(Target {
            name: name.to_owned(),
            config: spec.pg_config()?,
            tls: spec.connector()?,
        })
    }

    /// Opens a session; its connection task runs until the client is dropped and returns
    /// the handle so callers that measure a whole session can wait for the close.
    pub async fn connect(&self) -> Result<(Client, tokio::task::JoinHandle<()>), LoadError> {
        let (client, conn) = self
            .config
            .connect(self.tls.clone())
            .await
            .map_err(|source| LoadError::Connect {
                target: self.name.clone(),
                source,
            })?;
        let handle = tokio::spawn(async move {
            // A session ending with an error is seen by the query that hit it.
            let _ = conn.await;
        });
        Ok((client, handle))
    }
}

/// What every mode returns: its figures and how many operations they cover, for CPU per op.
pub struct RunOutput {
    pub figures: Figures,
    pub ops: u64,
}

/// Shared settings of a run.
#[derive(Debug, Clone, Copy)]
pub struct RunLimits {
    pub clients: usize,
    pub duration: Duration,
}

/// Linux reports /proc times in USER_HZ, which is 100 on every architecture it supports.
const USER_HZ: f64 = 100.0;

/// CPU time (user + system) of a process so far, in microseconds.
pub fn proc_cpu_us(pid: u32) -> Result<f64, LoadError> {
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Proc {
        path: path.clone(),
        source,
    })?;
    parse_stat_cpu_ticks(&text)
        .map(|t| t as f64 * 1e6 / USER_HZ)
        .ok_or(LoadError::ProcFormat(path))
}

/// utime + stime from a /proc/PID/stat line. The command name may hold spaces and ')', so
/// fields are counted from the last ')'.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Resident memory of a process: (VmRSS, RssAnon) in KiB.
pub fn proc_rss_kib(pid: u32) -> Result<(u64, u64), LoadError> {
    let path = PathBuf::from(format!("/proc/{pid}/status"));
    let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Proc {
        path: path.clone(),
        source,
    })?;
    parse_status_rss(&text).ok_or(LoadError::ProcFormat(path))
}

pub fn parse_status_rss(status: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        status.lines().find_map(|l| {
            let v = l.strip_prefix(name)?.strip_prefix(':')?;
            v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
    };
    Some((field("VmRSS")?, field("RssAnon")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_after_a_command_name_with_spaces_and_parens() {
        let stat = "4242 (eastwall (x) y) S 1 4242 4242 0 -1 4194560 1 0 0 0 \
                    250 75 0 0 20 0 3 0 1000 1000000 500";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(325));
        assert_eq!(parse_stat_cpu_ticks("4242 (x) S 1 2"), None);
        assert_eq!(parse_stat_cpu_ticks("no paren"), None);
    }

    #[test]
    fn rss_fields_are_read_in_kib() {
        let status =
            "Name:\teastwall\nVmRSS:\t   12345 kB\nRssAnon:\t    8000 kB\nRssFile:\t 4000 kB\n";
        assert_eq!(parse_status_rss(status), Some((12345, 8000)));
        assert_eq!(parse_status_rss("Name:\tx\nVmRSS:\t1 kB\n"), None);
    }
}
