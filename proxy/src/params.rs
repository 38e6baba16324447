//! Which client startup parameters reach PostgreSQL: an allowlist of session-formatting
//! settings, with `options` taken apart exactly as the backend would take it apart.
//!
//! A startup parameter is a GUC set at connection time, and some GUCs change who the session
//! is (`role`, `session_authorization`) or what it may do (`local_preload_libraries`). Only
//! settings that format or bound a session pass; everything else is refused by name, so a
//! client learns what to remove. `options` (`-c name=value`, `--name=value`) is split with
//! PostgreSQL's own rules (`pg_split_opts`: whitespace separates, a backslash escapes the next
//! byte; `ParseLongOption`: `-` in a name is `_`) and each setting is judged like a top-level
//! parameter. What goes upstream is the settings we judged, as plain startup parameters: the
//! backend applies both forms the same way (`SetConfigOption`, PGC_S_CLIENT), so nothing we did
//! not see can ride along in a re-parsed string.

/// Settings a client may choose for its own session, lowercase. None of them changes the
/// session's identity or privileges, loads code, or reaches outside the session.
const ALLOWED: &[&str] = &[
    "application_name",
    "bytea_output",
    "client_encoding",
    "client_min_messages",
    "datestyle",
    "default_transaction_deferrable",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "extra_float_digits",
    "geqo",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "intervalstyle",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
    "lock_timeout",
    "search_path",
    "standard_conforming_strings",
    "statement_timeout",
    "timezone",
    "xmlbinary",
    "xmloption",
];

/// Parameters the proxy handles itself and never forwards as given.
const HANDLED: &[&str] = &["user", "database", "replication", "options"];

/// Why a startup message's parameters are refused. Each names what to remove.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("startup parameter {0:?} is not allowed through Eastwall: it could change the session's role or privileges")]
    Refused(String),
    #[error("setting {0:?} in the options startup parameter is not allowed through Eastwall")]
    RefusedInOptions(String),
    #[error("the options startup parameter may only hold -c name=value or --name=value settings; {0:?} is not one")]
    BadOptions(String),
    #[error("startup parameter {0:?} is given more than once")]
    Duplicate(String),
}

impl ParamError {
    /// The decision-log reason.
    pub fn reason(&self) -> &'static str {
        match self {
            ParamError::Refused(_) | ParamError::RefusedInOptions(_) => "startup_parameter_refused",
            ParamError::BadOptions(_) => "startup_options_refused",
            ParamError::Duplicate(_) => "startup_parameter_duplicate",
        }
    }
}

/// A GUC name as the backend looks it up: case-insensitive, `-` read as `_`.
fn normalize(name: &str) -> String {
    name.to_ascii_lowercase().replace('-', "_")
}

fn allowed(name: &str) -> bool {
    ALLOWED.contains(&name)
}

/// Checks every startup parameter and returns the settings to send upstream, in the order the
/// backend would apply them (`options` first, then the other parameters).
pub fn screen(params: &[(String, String)]) -> Result<Vec<(String, String)>, ParamError> {
    let mut seen: Vec<String> = Vec::with_capacity(params.len());
    let mut from_options = Vec::new();
    let mut direct = Vec::new();
    for (name, value) in params {
        // `_pq_.` names are protocol extensions, answered with NegotiateProtocolVersion.
        if name.starts_with("_pq_.") {
            continue;
        }
        let key = normalize(name);
        if seen.contains(&key) {
            return Err(ParamError::Duplicate(name.clone()));
        }
        seen.push(key.clone());
        if key == "options" {
            from_options = split_options(value)?;
        } else if HANDLED.contains(&key.as_str()) {
            continue;
        } else if allowed(&key) {
            direct.push((key, value.clone()));
        } else {
            return Err(ParamError::Refused(name.clone()));
        }
    }
    from_options.extend(direct);
    Ok(from_options)
}

/// Splits an `options` value into settings, refusing anything but allowed `-c` settings.
fn split_options(value: &str) -> Result<Vec<(String, String)>, ParamError> {
    let words = split_words(value);
    let mut settings = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let setting = if word == "-c" {
            words
                .next()
                .ok_or_else(|| ParamError::BadOptions("-c without a setting".into()))?
        } else if let Some(rest) = word.strip_prefix("--") {
            rest.to_owned()
        } else if let Some(rest) = word.strip_prefix("-c") {
            rest.to_owned()
        } else {
            // Other switches (-d, -e, -P, -S, ...) set GUCs by letter, and a bare word is an
            // error to the backend: neither is a session-formatting setting.
            return Err(ParamError::BadOptions(truncate(&word)));
        };
        let Some((name, value)) = setting.split_once('=') else {
            return Err(ParamError::BadOptions(truncate(&setting)));
        };
        let key = normalize(name);
        if !allowed(&key) {
            return Err(ParamError::RefusedInOptions(truncate(name)));
        }
        settings.push((key, value.to_owned()));
    }
    Ok(settings)
}

/// `pg_split_opts`: words separated by whitespace; a backslash makes the next byte literal.
fn split_words(value: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chars = value.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return words;
        }
        let mut word = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_ascii_whitespace() {
                break;
            }
            chars.next();
            if c == '\\' {
                if let Some(escaped) = chars.next() {
                    word.push(escaped);
                }
            } else {
                word.push(c);
            }
        }
        words.push(word);
    }
}

/// Attacker-chosen text in an error message stays short.
fn truncate(text: &str) -> String {
    const MAX: usize = 64;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Appends `ew:<conn_id>` to the `application_name` sent upstream (adding it when the client
/// set none), so `pg_stat_activity`, PostgreSQL's log (`%a` in `log_line_prefix`) and pgAudit
/// lines name the Eastwall connection. The client's own name comes first, cut so the whole
/// stays within PostgreSQL's 63 bytes; characters other than printable ASCII become `?`
/// (as PostgreSQL would otherwise escape them into `\xNN`, lengthening the name past the
/// limit and cutting the tag off).
pub fn tag_application_name(settings: &mut Vec<(String, String)>, conn_id: &str) {
    let tag = format!("ew:{conn_id}");
    let entry = settings.iter_mut().find(|(k, _)| k == "application_name");
    let own = entry.as_ref().map(|(_, v)| v.as_str()).unwrap_or("");
    let clean: String = own
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect();
    let room = MAX_NAME_BYTES.saturating_sub(tag.len() + 1);
    let mut own = clean.trim_end().to_owned();
    if own.len() > room {
        // ASCII by now, so any byte is a character boundary.
        own.truncate(room);
        own = own.trim_end().to_owned();
    }
    let value = if own.is_empty() {
        tag
    } else {
        format!("{own} {tag}")
    };
    match entry {
        Some((_, v)) => *v = value,
        None => settings.push(("application_name".into(), value)),
    }
}

/// PostgreSQL's NAMEDATALEN is 64: names of 64 bytes or more are cut to 63 bytes, which could
/// turn a name no rule denies into one a rule does. Such names are refused, not judged.
pub const MAX_NAME_BYTES: usize = 63;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_name_ends_in_the_connection_id_within_63_bytes() {
        let id = "0123456789abcdef";
        let mut none = Vec::new();
        tag_application_name(&mut none, id);
        assert_eq!(none, p(&[("application_name", "ew:0123456789abcdef")]));

        let mut psql = p(&[("client_encoding", "UTF8"), ("application_name", "psql")]);
        tag_application_name(&mut psql, id);
        assert_eq!(psql[1].1, "psql ew:0123456789abcdef");
        assert_eq!(psql.len(), 2, "replaced in place, not added twice");

        let mut long = p(&[("application_name", &"x".repeat(200))]);
        tag_application_name(&mut long, id);
        assert_eq!(long[0].1.len(), MAX_NAME_BYTES);
        assert!(long[0].1.ends_with(" ew:0123456789abcdef"));
        assert!(long[0].1.starts_with("xxxx"));

        // Multi-byte and control characters never push the tag past the limit.
        let mut wide = p(&[("application_name", &"é\u{1}".repeat(40))]);
        tag_application_name(&mut wide, id);
        let value = &wide[0].1;
        assert!(value.len() <= MAX_NAME_BYTES && value.is_ascii(), "{value}");
        assert!(value.ends_with(" ew:0123456789abcdef"), "{value}");

        // A client cannot forge a second tag that hides ours: ours is always last.
        let mut forged = p(&[("application_name", "ew:ffffffffffffffff")]);
        tag_application_name(&mut forged, id);
        assert_eq!(forged[0].1, "ew:ffffffffffffffff ew:0123456789abcdef");
    }

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn what_libpq_and_the_regression_suite_send_is_forwarded() {
        let got = screen(&p(&[
            ("user", "billing"),
            ("database", "billing"),
            ("application_name", "psql"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("TimeZone", "PST8PDT"),
            ("IntervalStyle", "postgres_verbose"),
            ("extra_float_digits", "3"),
        ]))
        .unwrap();
        assert_eq!(
            got,
            p(&[
                ("application_name", "psql"),
                ("client_encoding", "UTF8"),
                ("datestyle", "ISO, MDY"),
                ("timezone", "PST8PDT"),
                ("intervalstyle", "postgres_verbose"),
                ("extra_float_digits", "3"),
            ])
        );
    }

    #[test]
    fn role_and_session_authorization_are_refused_in_any_spelling() {
        for name in [
            "role",
            "ROLE",
            "Session_Authorization",
            "session-authorization",
        ] {
            let err = screen(&p(&[("user", "billing"), (name, "postgres")])).unwrap_err();
            assert_eq!(err, ParamError::Refused(name.into()), "{name}");
        }
    }

    #[test]
    fn settings_that_load_code_or_change_privileges_are_refused() {
        for name in [
            "local_preload_libraries",
            "session_preload_libraries",
            "row_security",
            "is_superuser",
            "custom.thing",
        ] {
            assert!(screen(&p(&[(name, "x")])).is_err(), "{name}");
        }
    }

    #[test]
    fn options_role_is_refused_however_it_is_written() {
        for options in [
            "-c role=postgres",
            "-crole=postgres",
            "--role=postgres",
            "-c ROLE=postgres",
            "-c statement_timeout=0 -c role=postgres",
            "--session-authorization=postgres",
            "-c\tsession_authorization=postgres",
        ] {
            let err = screen(&p(&[("options", options)])).unwrap_err();
            assert!(
                matches!(err, ParamError::RefusedInOptions(_)),
                "{options}: {err:?}"
            );
        }
    }

    #[test]
    fn other_switches_and_bare_words_in_options_are_refused() {
        for options in ["-P", "-d 5", "-e", "role=postgres", "-c", "-c role", "-S 1"] {
            let err = screen(&p(&[("options", options)])).unwrap_err();
            assert!(
                matches!(err, ParamError::BadOptions(_)),
                "{options}: {err:?}"
            );
        }
    }

    #[test]
    fn allowed_options_become_plain_parameters_before_the_others() {
        let got = screen(&p(&[
            ("application_name", "app"),
            (
                "options",
                r"-c search_path=a,b --statement-timeout=5s -cDateStyle=ISO\,\ DMY",
            ),
        ]))
        .unwrap();
        assert_eq!(
            got,
            p(&[
                ("search_path", "a,b"),
                ("statement_timeout", "5s"),
                ("datestyle", "ISO, DMY"),
                ("application_name", "app"),
            ])
        );
    }

    #[test]
    fn an_escaped_space_does_not_split_a_setting() {
        // `-c search_path=a\ -c\ role=postgres` is ONE setting to the backend: search_path is
        // "a -c role=postgres", not a second setting.
        let got = screen(&p(&[("options", r"-c search_path=a\ -c\ role=postgres")])).unwrap();
        assert_eq!(got, p(&[("search_path", "a -c role=postgres")]));
    }

    #[test]
    fn duplicates_are_refused_whatever_their_case() {
        let err = screen(&p(&[("user", "a"), ("USER", "b")])).unwrap_err();
        assert_eq!(err, ParamError::Duplicate("USER".into()));
        assert!(screen(&p(&[("TimeZone", "UTC"), ("timezone", "PST8PDT")])).is_err());
    }

    #[test]
    fn protocol_extensions_are_left_to_negotiation() {
        assert_eq!(screen(&p(&[("_pq_.foo", "1")])).unwrap(), vec![]);
    }

    #[test]
    fn long_names_in_errors_are_cut() {
        let name = format!("-c {}=1", "r".repeat(1000));
        let err = screen(&p(&[("options", &name)])).unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
    }
}
