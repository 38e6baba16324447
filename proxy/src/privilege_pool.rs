//! Warm side connections that ask the catalog about a session's role while the session's own
//! backend is still starting (`[upstream] check_role`).
//!
//! On a backend's first query PostgreSQL loads and plans the catalogs it touches; the privilege
//! question ([`crate::privilege`]) costs a fresh backend about 3 ms of CPU, which a client
//! opening a connection per transaction pays every time. A side connection that has asked
//! before answers a prepared question from warm caches, and asks it while the session logs in,
//! off the critical path. Every catalog it reads (`pg_roles`, `pg_auth_members`,
//! `pg_parameter_acl`) is shared by the cluster; `pg_proc` is not, so the pool is per database.
//!
//! Nothing here refuses anyone: any doubt (no connection to spare, a login that fails, an
//! error, a timeout) answers None and the caller asks the session's own backend instead, as it
//! does without a pool. What is asked is the same question, about a name instead of
//! `session_user`; the caller checks that the session really logged in as that name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::codec;
use crate::privilege::{self, Report, Subject};
use crate::upstream::{Upstream, UpstreamSession};

/// The prepared statement's name on every side connection.
const STATEMENT: &str = "eastwall_privilege_check";
/// Side connections open at once, idle or busy, over all databases: each is a backend of
/// PostgreSQL's `max_connections`. When all are busy a session asks its own backend.
const MAX_OPEN: usize = 8;
/// Idle side connections kept per database.
const MAX_IDLE_PER_DATABASE: usize = 4;
/// At most one warning this often: a missing check role would otherwise log every connection.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// What the side connections call themselves in `pg_stat_activity`.
pub const APPLICATION_NAME: &str = "eastwall privilege check";

/// The side connections, by database.
pub struct CheckPool {
    role: String,
    idle: Mutex<HashMap<String, Vec<SideConnection>>>,
    open: Arc<Semaphore>,
    warned: Mutex<Option<Instant>>,
}

/// One logged-in side connection; its permit returns to the pool when it is dropped.
struct SideConnection {
    session: UpstreamSession,
    major: u32,
    prepared: bool,
    _permit: OwnedSemaphorePermit,
}

impl CheckPool {
    /// A pool that logs in as `role` (an ordinary role; it needs CONNECT on the databases).
    pub fn new(role: String) -> CheckPool {
        CheckPool {
            role,
            idle: Mutex::new(HashMap::new()),
            open: Arc::new(Semaphore::new(MAX_OPEN)),
            warned: Mutex::new(None),
        }
    }

    /// What the catalog says about `role` in `database`, `protected` the MFA-protected roles
    /// to look for; None when the pool cannot tell within `timeout` (ask the session instead).
    pub async fn check(
        &self,
        upstream: &Upstream,
        timeout: Duration,
        role: &str,
        database: &str,
        protected: &[String],
    ) -> Option<Report> {
        let asked = tokio::time::timeout(timeout, async {
            let mut side = match self.take(database) {
                Some(side) => side,
                None => self.connect(upstream, database).await?,
            };
            let report = side.ask(role, protected).await?;
            self.put(database, side);
            Ok::<Report, String>(report)
        })
        .await;
        match asked {
            Ok(Ok(report)) => Some(report),
            Ok(Err(why)) => {
                self.warn(database, &why);
                None
            }
            Err(_) => {
                self.warn(database, &format!("no answer within {timeout:?}"));
                None
            }
        }
    }

    fn take(&self, database: &str) -> Option<SideConnection> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.get_mut(database).and_then(Vec::pop)
    }

    fn put(&self, database: &str, side: SideConnection) {
        // Only a connection left exactly as it was (idle, nothing pending) is reused.
        if side.session.transaction_status != b'I' {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let kept = idle.entry(database.to_owned()).or_default();
        if kept.len() < MAX_IDLE_PER_DATABASE {
            kept.push(side);
        }
    }

    /// A new side connection, if one may be opened: when every permit is held by idle
    /// connections to other databases, the oldest of those makes way.
    async fn connect(&self, upstream: &Upstream, database: &str) -> Result<SideConnection, String> {
        let permit = match self.open.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.evict_other(database);
                self.open
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| format!("all {MAX_OPEN} side connections are busy"))?
            }
        };
        let session = upstream
            .login(
                &self.role,
                database,
                &[("application_name", APPLICATION_NAME)],
            )
            .await
            .map_err(|e| format!("logging in as {:?}: {e}", self.role))?;
        let major = privilege::server_major(&session.parameters)
            .ok_or_else(|| "PostgreSQL did not report a server_version".to_owned())?;
        Ok(SideConnection {
            session,
            major,
            prepared: false,
            _permit: permit,
        })
    }

    fn evict_other(&self, database: &str) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(kept) = idle
            .iter_mut()
            .filter(|(db, kept)| db.as_str() != database && !kept.is_empty())
            .map(|(_, kept)| kept)
            .next()
        {
            kept.remove(0);
        }
        idle.retain(|_, kept| !kept.is_empty());
    }

    fn warn(&self, database: &str, why: &str) {
        let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
        if warned.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return;
        }
        *warned = Some(Instant::now());
        tracing::warn!(
            check_role = %self.role,
            db.name = %database,
            %why,
            "privilege check side connection unavailable; asking each session's own backend (slower, as safe)"
        );
    }
}

impl SideConnection {
    /// The question about `role`, prepared on first use; the second question (SET grants) as
    /// a simple query when it is needed.
    async fn ask(&mut self, role: &str, protected: &[String]) -> Result<Report, String> {
        let mut out = BytesMut::with_capacity(256);
        if !self.prepared {
            let sql =
                privilege::query_about(self.major, &Subject::Parameter, "$2::pg_catalog.name[]");
            codec::put_parse(&mut out, STATEMENT, &sql);
        }
        codec::put_bind_text(&mut out, STATEMENT, &[role, &array_literal(protected)]);
        codec::put_execute_sync(&mut out);
        let row = privilege::ask_with(&mut self.session, &out).await?;
        self.prepared = true;
        let report = privilege::judge(&row, self.major)?;
        let report = privilege::judge_set_grants(&mut self.session, report).await?;
        // Notices and parameter changes on a side connection are nobody's to see.
        self.session.pending.clear();
        Ok(report)
    }
}

/// A text-format array literal, each element quoted: `{"a","b \"c\""}`.
fn array_literal(names: &[String]) -> String {
    let mut out = String::from("{");
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in name.chars() {
            match c {
                '"' | '\\' => {
                    out.push('\\');
                    out.push(c);
                }
                '\0' => {}
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_literals_quote_every_element() {
        assert_eq!(array_literal(&[]), "{}");
        assert_eq!(
            array_literal(&["dba".into(), "a,b".into(), "q\"\\".into()]),
            r#"{"dba","a,b","q\"\\"}"#
        );
    }

    #[test]
    fn the_side_question_names_its_parameters_and_no_session_user() {
        let sql = privilege::query_about(15, &Subject::Parameter, "$2::pg_catalog.name[]");
        assert!(!sql.contains("session_user"), "{sql}");
        assert!(sql.contains("pg_has_role($1::pg_catalog.name, c.oid, 'MEMBER')"));
        assert!(sql.contains("ANY ($2::pg_catalog.name[])"));
    }
}
