//! `eastwall sessions`: list the running sidecar's live sessions, or end one, over its admin
//! Unix socket (`[admin] socket`; see [`crate::admin`] for the protocol).

use std::path::PathBuf;

use anyhow::anyhow;
use clap::Subcommand;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;

use crate::admin_socket::{self as admin, Request};

/// Arguments of `eastwall sessions`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// The sidecar's eastwall.toml (names the admin socket).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// One JSON object per session, one per line, instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// End a live session: its client gets FATAL 57P01 with the message, its session_end
    /// line says reason `killed`.
    Kill {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The session's connection id (from `eastwall sessions`).
        #[arg(value_name = "CONN_ID")]
        conn_id: String,
        /// What the client is told (default "killed by an administrator").
        #[arg(long, value_name = "TEXT")]
        message: Option<String>,
    },
}

fn socket_of(config: &std::path::Path) -> anyhow::Result<PathBuf> {
    let settings = eastwall_config::Settings::load(config)
        .map_err(|err| anyhow!("{}", err.lines().join("\n")))?;
    Ok(settings.admin.socket)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Some(Command::Kill {
            config,
            conn_id,
            message,
        }) => {
            if let Some(message) = &message {
                admin::check_message(message).map_err(|e| anyhow!("--message: {e}"))?;
            }
            let socket = socket_of(&config)?;
            admin::call(&socket, &Request::Kill { conn_id, message })?;
            outln!("eastwall: session ended (its session_end line follows in the decision log)");
            Ok(())
        }
        None => {
            let config = args
                .config
                .ok_or_else(|| anyhow!("--config FILE is required"))?;
            let socket = socket_of(&config)?;
            let answer = admin::call(&socket, &Request::List {})?;
            let sessions = answer["sessions"].as_array().cloned().unwrap_or_default();
            if args.json {
                for session in &sessions {
                    outln!("{session}");
                }
            } else {
                print_table(&sessions);
            }
            Ok(())
        }
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn timestamp(v: &Value) -> String {
    v.as_i64()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| "-".into())
}

fn print_table(sessions: &[Value]) {
    if sessions.is_empty() {
        outln!("no live sessions");
        return;
    }
    let rows: Vec<[String; 9]> = sessions
        .iter()
        .map(|s| {
            let mfa = match &s["mfa"] {
                Value::Object(m) => format!(
                    "{} ({}s)",
                    text(&m["method"]),
                    m["age_s"].as_u64().unwrap_or(0)
                ),
                _ => "-".into(),
            };
            [
                text(&s["conn_id"]),
                text(&s["spiffe_id"]),
                text(&s["serial"]),
                text(&s["source"]),
                text(&s["role"]),
                text(&s["database"]),
                timestamp(&s["started"]),
                format!(
                    "{}/{}",
                    s["bytes_client_to_server"].as_u64().unwrap_or(0),
                    s["bytes_server_to_client"].as_u64().unwrap_or(0)
                ),
                mfa,
            ]
        })
        .collect();
    let header = [
        "CONN_ID",
        "SPIFFE_ID",
        "SERIAL",
        "SOURCE",
        "ROLE",
        "DATABASE",
        "STARTED",
        "BYTES_IN/OUT",
        "MFA",
    ];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    outln!("{}", line(header.to_vec()));
    for row in &rows {
        outln!("{}", line(row.iter().map(String::as_str).collect()));
    }
}
