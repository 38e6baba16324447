//! The `eastwall` binary: parses the command line and hands each verb to `eastwall::cli`.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use eastwall::cli;

/// Eastwall: an mTLS, identity-aware sidecar for PostgreSQL that admits only the flows a
/// deny-by-default policy names.
#[derive(Debug, Parser)]
#[command(name = "eastwall", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The small CA: init, issue, bundle, revoke.
    Ca(cli::ca::Args),
    /// Lay out a complete, working sidecar in a folder.
    Quickstart(cli::quickstart::Args),
    /// Run the sidecar.
    Proxy(cli::proxy::Args),
    /// Check everything the sidecar needs before running it: files, keys, expiry, PostgreSQL.
    Check(cli::check::Args),
    /// Check a policy, or explain a decision.
    Policy(cli::policy::Args),
    /// Enroll, list and remove human operators' TOTP secrets; fetch a step-up token.
    Mfa(cli::mfa::Args),
    /// Verify the decision log's hash chain; detect over it; convert it to OCSF.
    Audit(cli::audit::Args),
    /// Lock out an identity pattern, certificate serial, source range or role; list; lift.
    Lock(cli::lock::Args),
    /// Push the policy to every sidecar of a fleet (NATS JetStream), signed.
    Fleet(cli::fleet::Args),
    /// List the running sidecar's live sessions, or kill one.
    Sessions(cli::sessions::Args),
    /// Play the lateral-movement story against a private PostgreSQL, in one command.
    Demo(cli::demo::Args),
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(err),
    };
    let result = match cli.command {
        Command::Ca(args) => cli::ca::run(args),
        Command::Quickstart(args) => cli::quickstart::run(args),
        Command::Proxy(args) => cli::proxy::run(args),
        Command::Check(args) => cli::check::run(args),
        Command::Policy(args) => cli::policy::run(args),
        Command::Mfa(args) => cli::mfa::run(args),
        Command::Audit(args) => cli::audit::run(args),
        Command::Lock(args) => cli::lock::run(args),
        Command::Fleet(args) => cli::fleet::run(args),
        Command::Demo(args) => cli::demo::run(args),
        Command::Sessions(args) => cli::sessions::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // One line a user can act on: the causes joined, never a backtrace. A cause that
            // an error already quotes in its own message is not repeated.
            eprintln!("eastwall: {}", one_line(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Help and version go out as clap writes them; a usage mistake is one line on stderr.
fn usage_error(err: clap::Error) -> std::process::ExitCode {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            if err.use_stderr() {
                std::process::ExitCode::from(2)
            } else {
                std::process::ExitCode::SUCCESS
            }
        }
        _ => {
            let text = err.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("eastwall: {first} (see --help)");
            std::process::ExitCode::from(2)
        }
    }
}

/// `err` and its causes as one line, each cause once.
fn one_line(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}
