//! What the role a session logged in as can become, asked of PostgreSQL's own catalog on that
//! session before any client byte reaches it.
//!
//! The `is_superuser` ParameterStatus follows the *current* role, which a client can change
//! (`SET ROLE`), so it says nothing about what the session may become. The catalog does. Every
//! path below is judged through membership — `pg_has_role(…, 'MEMBER')`, direct or through
//! other roles, whatever INHERIT says, since `SET ROLE` needs only membership:
//!
//! - superuser-equivalent: a superuser role; `pg_execute_server_program`,
//!   `pg_read_server_files`, `pg_write_server_files` (each hands out the OS account
//!   `postgres`); `pg_read_all_data` / `pg_write_all_data` (the password hashes in
//!   `pg_authid`); a role with REPLICATION (logical decoding shows every row); a role with
//!   CREATEROLE before PostgreSQL 16 (it can grant itself any non-superuser role); a grant of
//!   `ALTER SYSTEM`, or of `SET` on a non-user parameter (`archive_command`,
//!   `session_preload_libraries`, … run code as `postgres`); EXECUTE granted on a built-in
//!   that reads or writes server files or reloads the configuration (`lo_export`,
//!   `pg_read_file`, `pg_file_write`, `dblink_connect_u`, …);
//! - an MFA-protected role (see `eastwall_config::mfa_roles`): a session that did not step up
//!   must not be able to `SET ROLE` into one.
//!
//! The check also reads back `session_user` and `current_database()`: with
//! `db_user_namespace` PostgreSQL may log in as another name than the one the policy judged.
//! Any doubt — an error, a missing row, an answer we cannot read, a timeout — is an error, and
//! the caller refuses.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::codec;
use crate::upstream::UpstreamSession;

/// Built-ins that read or write server files, run code or reload the configuration; EXECUTE
/// on any of them (beyond its default, which is superuser only) is superuser-equivalent.
const DANGEROUS_FUNCTIONS: &[&str] = &[
    "lo_import",
    "lo_export",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_stat_file",
    "pg_file_write",
    "pg_file_rename",
    "pg_file_unlink",
    "pg_file_sync",
    "pg_reload_conf",
    "dblink_connect_u",
];

/// What the catalog says about the session's login role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Why the role is superuser-equivalent, if it is.
    pub superuser: Option<String>,
    /// The MFA-protected roles it is a member of (comma-separated), if any.
    pub protected_member: Option<String>,
    /// The session's user and database as PostgreSQL has them.
    pub session_user: String,
    pub database: String,
    /// Parameters it holds SET on (comma-separated), still to be judged.
    pub(crate) set_granted: Option<String>,
}

/// Asks the catalog on `session` (right after login, before the client is relayed), with
/// `protected` the roles MFA protects. An error means the answer is unknown: refuse.
pub async fn check(
    session: &mut UpstreamSession,
    timeout: Duration,
    protected: &[&str],
) -> Result<Report, String> {
    let major = server_major(&session.parameters)
        .ok_or("PostgreSQL did not report a server_version it can be judged by")?;
    match tokio::time::timeout(timeout, check_within(session, major, protected)).await {
        Ok(Ok(report)) => Ok(report),
        Ok(Err(why)) => Err(format!(
            "the role's privileges could not be checked ({why})"
        )),
        Err(_) => Err(format!(
            "the role's privileges could not be checked within {timeout:?}"
        )),
    }
}

/// One query in the common case; a second only when the role holds SET on some parameter,
/// to learn whether any of them is one only superusers may set (`pg_settings` is costly to
/// plan on a backend's first query, and such grants are rare).
async fn check_within(
    session: &mut UpstreamSession,
    major: u32,
    protected: &[&str],
) -> Result<Report, String> {
    let report = judge(&ask(session, &query(major, protected)).await?, major)?;
    judge_set_grants(session, report).await
}

/// The second question, asked on `session` only when `report` says the role holds SET on
/// some parameter: is any of them one only superusers may set?
pub(crate) async fn judge_set_grants(
    session: &mut UpstreamSession,
    mut report: Report,
) -> Result<Report, String> {
    if report.superuser.is_none() {
        if let Some(granted) = report.set_granted.take() {
            let row = ask(session, &superuser_parameters_query(&granted)).await?;
            if let Some(names) = judge_parameters(&row)? {
                report.superuser = Some(format!(
                    "it holds SET on a parameter only superusers may set ({names})"
                ));
            }
        }
    }
    Ok(report)
}

/// The major version from the `server_version` ParameterStatus (`15.18 (Debian …)`).
pub(crate) fn server_major(parameters: &[(String, String)]) -> Option<u32> {
    let (_, version) = parameters.iter().find(|(k, _)| k == "server_version")?;
    let digits: String = version.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// An SQL string literal that means `text` whatever `standard_conforming_strings` says.
fn literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 3);
    out.push_str("E'");
    for c in text.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            '\0' => {}
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

pub(crate) fn name_array(names: &[&str]) -> String {
    if names.is_empty() {
        return "ARRAY[]::pg_catalog.name[]".into();
    }
    let items: Vec<String> = names.iter().map(|n| literal(n)).collect();
    format!("ARRAY[{}]::pg_catalog.name[]", items.join(", "))
}

/// Roles whose members get a shell, files or every row as the OS account `postgres`.
const DANGEROUS_ROLES: &[&str] = &[
    "pg_execute_server_program",
    "pg_read_server_files",
    "pg_write_server_files",
    "pg_read_all_data",
    "pg_write_all_data",
];

/// The question, written so that the session's own settings cannot change its meaning: every
/// object, function, operator and type is schema-qualified, because `search_path` is the
/// client's to set (startup parameter, `ALTER ROLE … SET`) and could put a look-alike first.
///
/// One scan of `pg_roles` over the roles the session user is a member of (itself included)
/// answers every role question at once: on a backend's first query, planning is most of the
/// cost, and each further reference to the view is planned again.
fn query(major: u32, protected: &[&str]) -> String {
    query_about(major, &Subject::SessionUser, &name_array(protected))
}

/// Whom the question is about.
pub(crate) enum Subject {
    /// The role this backend logged in as (`session_user`): the session's own backend.
    SessionUser,
    /// The role named by the first parameter of a prepared statement, `protected` the second:
    /// a side connection asking about somebody else's session ([`crate::privilege_pool`]).
    Parameter,
}

impl Subject {
    fn sql(&self) -> &'static str {
        match self {
            Subject::SessionUser => "session_user",
            Subject::Parameter => "$1::pg_catalog.name",
        }
    }
}

/// The question about `subject`, `protected` an SQL expression of type `name[]`.
pub(crate) fn query_about(major: u32, subject: &Subject, protected: &str) -> String {
    let who = subject.sql();
    let is_self = format!("c.rolname OPERATOR(pg_catalog.=) {who}");
    let names_in = |names: &str| {
        format!(
            "pg_catalog.string_agg(c.rolname::pg_catalog.text, ',') \
             FILTER (WHERE c.rolname OPERATOR(pg_catalog.=) ANY ({names}))"
        )
    };
    let parameters = |privilege: &str| {
        if major >= 15 {
            format!(
                "(SELECT pg_catalog.string_agg(a.parname::pg_catalog.text, ',') \
                   FROM pg_catalog.pg_parameter_acl a \
                  WHERE pg_catalog.has_parameter_privilege({who}, a.parname, '{privilege}'))"
            )
        } else {
            "NULL::pg_catalog.text".into()
        }
    };
    let functions = format!(
        "EXISTS (SELECT 1 FROM pg_catalog.pg_proc p \
           WHERE p.proname OPERATOR(pg_catalog.=) ANY ({}) AND p.proacl IS NOT NULL \
             AND pg_catalog.has_function_privilege({who}, p.oid, 'EXECUTE'))",
        name_array(DANGEROUS_FUNCTIONS)
    );
    format!(
        "SELECT pg_catalog.bool_or({is_self}), \
         pg_catalog.bool_or(c.rolsuper AND {is_self}), \
         pg_catalog.bool_or(c.rolsuper AND NOT {is_self}), \
         {dangerous}, \
         pg_catalog.bool_or(c.rolcreaterole), pg_catalog.bool_or(c.rolreplication), \
         {alter_system}, {set}, {functions}, {protected}, \
         {who}::pg_catalog.text, pg_catalog.current_database()::pg_catalog.text \
         FROM pg_catalog.pg_roles c \
         WHERE pg_catalog.pg_has_role({who}, c.oid, 'MEMBER')",
        dangerous = names_in(&name_array(DANGEROUS_ROLES)),
        alter_system = parameters("ALTER SYSTEM"),
        set = parameters("SET"),
        protected = names_in(protected),
    )
}

/// Of the parameters in `granted` (comma-separated, from `pg_parameter_acl`), those a
/// non-superuser may not normally set: not in `pg_settings` as `user` context.
pub(crate) fn superuser_parameters_query(granted: &str) -> String {
    let items: Vec<String> = granted.split(',').map(literal).collect();
    format!(
        "SELECT pg_catalog.string_agg(n, ',') \
         FROM pg_catalog.unnest(ARRAY[{}]::pg_catalog.text[]) AS n \
         WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_settings g \
           WHERE g.name OPERATOR(pg_catalog.=) n AND g.context OPERATOR(pg_catalog.=) 'user')",
        items.join(", ")
    )
}

pub(crate) async fn ask(
    session: &mut UpstreamSession,
    sql: &str,
) -> Result<Vec<Option<Bytes>>, String> {
    let mut out = BytesMut::new();
    codec::put_query(&mut out, sql);
    ask_with(session, &out).await
}

/// Sends `out` (a simple Query, or Parse/Bind/Execute/Sync) and reads the one row it answers
/// up to ReadyForQuery.
pub(crate) async fn ask_with(
    session: &mut UpstreamSession,
    out: &[u8],
) -> Result<Vec<Option<Bytes>>, String> {
    session
        .stream
        .write_all(out)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = BytesMut::with_capacity(512);
    let mut row: Option<Vec<Option<Bytes>>> = None;
    let mut failed: Option<String> = None;
    loop {
        let msg = next_message(session, &mut buf).await?;
        match msg.tag {
            // RowDescription, CommandComplete, ParseComplete, BindComplete.
            b'T' | b'C' | b'1' | b'2' => {}
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
                break;
            }
            other => return Err(format!("unexpected message {:?}", other as char)),
        }
    }
    // Whole asynchronous messages that arrived in the same read go to the client too; a
    // partial one cannot be handed on, so that is an error (fail closed).
    while let Some(msg) =
        codec::decode_message(&mut buf, codec::MAX_LOGIN_MESSAGE_LEN).map_err(|e| e.to_string())?
    {
        match msg.tag {
            b'N' | b'S' | b'A' => codec::put_raw(&mut session.pending, &msg),
            other => {
                return Err(format!(
                    "unexpected message {:?} after the answer",
                    other as char
                ))
            }
        }
    }
    if !buf.is_empty() {
        return Err("a partial message after the answer".into());
    }
    if let Some(why) = failed {
        return Err(why);
    }
    row.ok_or_else(|| "no catalog row for the session user".into())
}

async fn next_message(
    session: &mut UpstreamSession,
    buf: &mut BytesMut,
) -> Result<codec::Message, String> {
    loop {
        if let Some(msg) =
            codec::decode_message(buf, codec::MAX_LOGIN_MESSAGE_LEN).map_err(|e| e.to_string())?
        {
            return Ok(msg);
        }
        if session
            .stream
            .read_buf(buf)
            .await
            .map_err(|e| e.to_string())?
            == 0
        {
            return Err("PostgreSQL closed the connection".into());
        }
    }
}

/// Reads the one row the query returns.
pub(crate) fn judge(row: &[Option<Bytes>], major: u32) -> Result<Report, String> {
    const COLUMNS: usize = 12;
    if row.len() != COLUMNS {
        return Err(format!("{} columns, expected {COLUMNS}", row.len()));
    }
    let flag = |i: usize| -> Result<bool, String> {
        match row[i].as_deref() {
            Some(b"t") => Ok(true),
            Some(b"f") => Ok(false),
            _ => Err(format!("column {i} is not a boolean")),
        }
    };
    let text = |i: usize| -> Result<Option<String>, String> {
        row[i]
            .as_deref()
            .map(|v| String::from_utf8(v.to_vec()).map_err(|_| format!("column {i} is not UTF-8")))
            .transpose()
    };
    // Every role the session user is a member of is a row, itself included: without its
    // own row there is nothing to judge by (the aggregates are all NULL then).
    if !flag(0)? {
        return Err("no catalog row for the session user".into());
    }
    let dangerous = text(3)?;
    let alter_system = text(6)?;
    let reasons = [
        (flag(1)?, "it is a superuser".to_owned()),
        (flag(2)?, "it is a member of a superuser role".to_owned()),
        (
            dangerous.is_some(),
            format!(
                "it is a member of {}",
                dangerous.as_deref().unwrap_or_default()
            ),
        ),
        (
            flag(4)? && major < 16,
            "it has CREATEROLE (itself or through a role it belongs to), which before PostgreSQL 16 can grant itself any non-superuser role".to_owned(),
        ),
        (
            flag(5)?,
            "it has REPLICATION (itself or through a role it belongs to)".to_owned(),
        ),
        (
            alter_system.is_some(),
            format!(
                "it holds ALTER SYSTEM on {}",
                alter_system.as_deref().unwrap_or_default()
            ),
        ),
        (
            flag(8)?,
            "it may execute a built-in that reads or writes server files or reloads the configuration".to_owned(),
        ),
    ];
    let superuser = reasons
        .into_iter()
        .find(|(holds, _)| *holds)
        .map(|(_, why)| why);
    Ok(Report {
        superuser,
        set_granted: text(7)?,
        protected_member: text(9)?,
        session_user: text(10)?.ok_or("no session_user")?,
        database: text(11)?.ok_or("no current_database")?,
    })
}

/// Reads the answer of [`superuser_parameters_query`]: the names, or None.
pub(crate) fn judge_parameters(row: &[Option<Bytes>]) -> Result<Option<String>, String> {
    match row {
        [value] => value
            .as_deref()
            .map(|v| String::from_utf8(v.to_vec()).map_err(|_| "not UTF-8".to_owned()))
            .transpose(),
        _ => Err(format!("{} columns, expected 1", row.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(values: &[Option<&str>]) -> Vec<Option<Bytes>> {
        values
            .iter()
            .map(|v| v.map(|v| Bytes::copy_from_slice(v.as_bytes())))
            .collect()
    }

    /// The row for billing, an ordinary role: found, no flag, no name.
    fn ordinary() -> Vec<Option<&'static str>> {
        vec![
            Some("t"),
            Some("f"),
            Some("f"),
            None,
            Some("f"),
            Some("f"),
            None,
            None,
            Some("f"),
            None,
            Some("billing"),
            Some("billing"),
        ]
    }

    #[test]
    fn an_ordinary_role_is_ordinary() {
        let report = judge(&row(&ordinary()), 15).unwrap();
        assert_eq!(report.superuser, None);
        assert_eq!(report.protected_member, None);
        assert_eq!(report.set_granted, None);
        assert_eq!(report.session_user, "billing");
    }

    #[test]
    fn each_path_to_superuser_is_named() {
        for (i, value, needle) in [
            (1, "t", "superuser"),
            (2, "t", "member of a superuser role"),
            (3, "pg_execute_server_program", "pg_execute_server_program"),
            (3, "pg_read_all_data", "pg_read_all_data"),
            (5, "t", "REPLICATION"),
            (6, "archive_command", "ALTER SYSTEM on archive_command"),
            (8, "t", "built-in"),
        ] {
            let mut values = ordinary();
            values[i] = Some(value);
            let report = judge(&row(&values), 16).unwrap();
            let why = report.superuser.unwrap_or_default();
            assert!(why.contains(needle), "column {i}: {why}");
        }
    }

    #[test]
    fn a_set_grant_is_left_for_the_second_question() {
        let mut values = ordinary();
        values[7] = Some("work_mem,session_preload_libraries");
        let report = judge(&row(&values), 15).unwrap();
        assert_eq!(report.superuser, None);
        assert_eq!(
            report.set_granted.as_deref(),
            Some("work_mem,session_preload_libraries")
        );
        let second = superuser_parameters_query("work_mem,it's");
        assert!(second.contains("E'work_mem', E'it''s'"), "{second}");
        assert_eq!(judge_parameters(&row(&[None])).unwrap(), None);
        assert_eq!(
            judge_parameters(&row(&[Some("session_preload_libraries")])).unwrap(),
            Some("session_preload_libraries".into())
        );
        assert!(judge_parameters(&row(&[None, None])).is_err());
    }

    #[test]
    fn createrole_counts_only_before_16() {
        let mut values = ordinary();
        values[4] = Some("t");
        assert!(judge(&row(&values), 15).unwrap().superuser.is_some());
        assert!(judge(&row(&values), 16).unwrap().superuser.is_none());
    }

    #[test]
    fn protected_membership_is_reported() {
        let mut values = ordinary();
        values[9] = Some("dba,alice");
        let report = judge(&row(&values), 15).unwrap();
        assert_eq!(report.protected_member.as_deref(), Some("dba,alice"));
    }

    #[test]
    fn an_unreadable_answer_is_an_error_not_ordinary() {
        assert!(judge(&row(&[Some("f"); 6]), 15).is_err());
        // No row for the session user itself: the aggregates are NULL.
        assert!(judge(&row(&[None; 12]), 15).is_err());
        let mut values = ordinary();
        values[0] = Some("f");
        assert!(judge(&row(&values), 15).is_err());
        let mut values = ordinary();
        values[1] = Some("x");
        assert!(judge(&row(&values), 15).is_err());
        let mut values = ordinary();
        values[5] = None;
        assert!(judge(&row(&values), 15).is_err());
        let mut values = ordinary();
        values[10] = None;
        assert!(judge(&row(&values), 15).is_err());
    }

    #[test]
    fn literals_survive_quotes_and_backslashes_whatever_the_settings() {
        assert_eq!(literal("a'b\\c"), "E'a''b\\\\c'");
        assert_eq!(name_array(&[]), "ARRAY[]::pg_catalog.name[]");
    }

    #[test]
    fn the_major_version_comes_from_server_version() {
        let p = |v: &str| vec![("server_version".to_owned(), v.to_owned())];
        assert_eq!(server_major(&p("15.18 (Debian 15.18-0+deb12u1)")), Some(15));
        assert_eq!(server_major(&p("17devel")), Some(17));
        assert_eq!(server_major(&p("")), None);
        assert_eq!(server_major(&[]), None);
    }

    #[test]
    fn the_query_gates_version_specific_catalogs() {
        assert!(!query(14, &[]).contains("pg_parameter_acl"));
        assert!(query(15, &["dba"]).contains("pg_parameter_acl"));
        assert!(query(15, &["dba"]).contains("E'dba'"));
    }
}
