//! Whether the role a session logged in as is superuser-equivalent, asked of PostgreSQL's own
//! catalog on that session before any client byte reaches it.
//!
//! The `is_superuser` ParameterStatus follows the *current* role, which a client can change at
//! startup (`options=-c role=…`, now refused) or later (`SET ROLE`), so it says nothing about
//! what the session may become. The catalog does: a role is superuser-equivalent when it is a
//! superuser, or is a member (directly or through other roles, whatever INHERIT says, since
//! `SET ROLE` needs only membership) of a superuser role or of `pg_execute_server_program`,
//! `pg_read_server_files` or `pg_write_server_files` (each hands out the OS account
//! `postgres`), or holds CREATEROLE before PostgreSQL 16 (which could grant itself those
//! roles). Any doubt — an error, a missing row, an answer we cannot read — counts as
//! superuser-equivalent: such roles need a rule that names them.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::codec;
use crate::upstream::UpstreamSession;

/// The question, written so that the session's own settings cannot change its meaning: every
/// object, function, operator and type is schema-qualified, because `search_path` is the
/// client's to set (startup parameter, `ALTER ROLE … SET`) and could put a look-alike first.
const QUERY: &str = "SELECT r.rolsuper, r.rolcreaterole, \
 EXISTS (SELECT 1 FROM pg_catalog.pg_roles s \
   WHERE s.rolsuper AND pg_catalog.pg_has_role(session_user, s.oid, 'MEMBER')), \
 pg_catalog.pg_has_role(session_user, 'pg_execute_server_program'::pg_catalog.name, 'MEMBER'), \
 pg_catalog.pg_has_role(session_user, 'pg_read_server_files'::pg_catalog.name, 'MEMBER'), \
 pg_catalog.pg_has_role(session_user, 'pg_write_server_files'::pg_catalog.name, 'MEMBER'), \
 pg_catalog.current_setting('server_version_num') \
 FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) session_user";

/// What the catalog says about the session's login role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Privilege {
    /// None of the superuser-equivalent paths is open.
    Ordinary,
    /// Superuser-equivalent, and why (for the log and the client's message).
    SuperuserEquivalent(String),
}

/// Asks the catalog on `session` (right after login, before the client is relayed). Never
/// fails: whatever stops the question from being answered is an answer of "superuser".
pub async fn check(session: &mut UpstreamSession, timeout: Duration) -> Privilege {
    match tokio::time::timeout(timeout, ask(session)).await {
        Ok(Ok(privilege)) => privilege,
        Ok(Err(why)) => Privilege::SuperuserEquivalent(format!(
            "the role's privileges could not be checked ({why})"
        )),
        Err(_) => Privilege::SuperuserEquivalent(format!(
            "the role's privileges could not be checked within {timeout:?}"
        )),
    }
}

async fn ask(session: &mut UpstreamSession) -> Result<Privilege, String> {
    let mut out = BytesMut::new();
    codec::put_query(&mut out, QUERY);
    session
        .stream
        .write_all(&out)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = BytesMut::with_capacity(512);
    let mut row: Option<Vec<Option<bytes::Bytes>>> = None;
    let mut failed: Option<String> = None;
    loop {
        let msg = loop {
            if let Some(msg) = codec::decode_message(&mut buf, codec::MAX_LOGIN_MESSAGE_LEN)
                .map_err(|e| e.to_string())?
            {
                break msg;
            }
            if session
                .stream
                .read_buf(&mut buf)
                .await
                .map_err(|e| e.to_string())?
                == 0
            {
                return Err("PostgreSQL closed the connection".into());
            }
        };
        match msg.tag {
            b'T' | b'C' => {}
            b'D' if row.is_none() => {
                row = Some(codec::parse_data_row(&msg.body).map_err(|e| e.to_string())?)
            }
            b'D' => return Err("more than one row".into()),
            b'E' => {
                let fields = codec::parse_error_fields(&msg.body);
                failed = Some(fields.message.unwrap_or_else(|| "an error".into()));
            }
            // Asynchronous messages the client would have seen: keep them for it.
            b'N' | b'S' | b'A' => codec::put_raw(&mut session.pending, &msg),
            b'Z' => {
                session.transaction_status = msg.body.first().copied().unwrap_or(b'I');
                if !buf.is_empty() {
                    return Err("data after ReadyForQuery".into());
                }
                break;
            }
            other => return Err(format!("unexpected message {:?}", other as char)),
        }
    }
    if let Some(why) = failed {
        return Err(why);
    }
    let row = row.ok_or("no catalog row for the session user")?;
    judge(&row)
}

/// Reads the one row the query returns.
fn judge(row: &[Option<bytes::Bytes>]) -> Result<Privilege, String> {
    let flag = |i: usize| -> Result<bool, String> {
        match row.get(i).and_then(|v| v.as_deref()) {
            Some(b"t") => Ok(true),
            Some(b"f") => Ok(false),
            _ => Err(format!("column {i} is not a boolean")),
        }
    };
    if row.len() != 7 {
        return Err(format!("{} columns, expected 7", row.len()));
    }
    let version: u32 = row[6]
        .as_deref()
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
        .ok_or("server_version_num is not a number")?;
    let reasons = [
        (flag(0)?, "it is a superuser"),
        (flag(2)?, "it is a member of a superuser role"),
        (flag(3)?, "it is a member of pg_execute_server_program"),
        (flag(4)?, "it is a member of pg_read_server_files"),
        (flag(5)?, "it is a member of pg_write_server_files"),
        (
            flag(1)? && version < 160_000,
            "it has CREATEROLE, which before PostgreSQL 16 can grant itself any non-superuser role",
        ),
    ];
    Ok(reasons
        .iter()
        .find(|(holds, _)| *holds)
        .map_or(Privilege::Ordinary, |(_, why)| {
            Privilege::SuperuserEquivalent((*why).to_owned())
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(values: &[&str]) -> Vec<Option<bytes::Bytes>> {
        values
            .iter()
            .map(|v| Some(bytes::Bytes::copy_from_slice(v.as_bytes())))
            .collect()
    }

    #[test]
    fn an_ordinary_role_is_ordinary() {
        let r = row(&["f", "f", "f", "f", "f", "f", "150004"]);
        assert_eq!(judge(&r), Ok(Privilege::Ordinary));
    }

    #[test]
    fn each_path_to_superuser_is_named() {
        for (i, needle) in [
            (0, "superuser"),
            (2, "member of a superuser role"),
            (3, "pg_execute_server_program"),
            (4, "pg_read_server_files"),
            (5, "pg_write_server_files"),
        ] {
            let mut values = vec!["f"; 6];
            values[i] = "t";
            values.push("150004");
            match judge(&row(&values)) {
                Ok(Privilege::SuperuserEquivalent(why)) => assert!(why.contains(needle), "{why}"),
                other => panic!("column {i}: {other:?}"),
            }
        }
    }

    #[test]
    fn createrole_counts_only_before_16() {
        let old = row(&["f", "t", "f", "f", "f", "f", "150004"]);
        assert!(matches!(judge(&old), Ok(Privilege::SuperuserEquivalent(_))));
        let new = row(&["f", "t", "f", "f", "f", "f", "160001"]);
        assert_eq!(judge(&new), Ok(Privilege::Ordinary));
    }

    #[test]
    fn an_unreadable_answer_is_an_error_not_ordinary() {
        assert!(judge(&row(&["f"; 6])).is_err());
        assert!(judge(&row(&["x", "f", "f", "f", "f", "f", "150004"])).is_err());
        let mut nulls = row(&["f", "f", "f", "f", "f", "f", "150004"]);
        nulls[3] = None;
        assert!(judge(&nulls).is_err());
    }
}
