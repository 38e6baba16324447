//! The `eastwall` command line: one module per verb group, each with its clap arguments and `run`.
//!
//! Verbs print with [`outln!`], never `println!`: `println!` panics when the reader has gone
//! (`eastwall policy explain … | head`), and a closed pipe is a normal way for output to end.

use std::io::Write;

/// `println!` for the CLI: a reader that went away ends the program quietly (status 0).
macro_rules! outln {
    () => {
        $crate::cli::write_stdout(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!($($arg)*))
    };
}

/// Writes one line on stdout. A broken pipe exits with status 0 and no message, as `head`'s
/// writer expects; any other write error is one line on stderr and status 1.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| out.write_all(b"\n"));
    if let Err(err) = written {
        stdout_failed(&err);
    }
}

/// Writes bytes on stdout as they are (a PEM bundle), with [`write_stdout`]'s rules.
pub fn write_stdout_bytes(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    if let Err(err) = out.write_all(bytes).and_then(|()| out.flush()) {
        stdout_failed(&err);
    }
}

pub(crate) fn stdout_failed(err: &std::io::Error) -> ! {
    if err.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    let _ = writeln!(std::io::stderr(), "eastwall: cannot write to stdout: {err}");
    std::process::exit(1);
}

pub mod audit;
pub mod ca;
pub mod check;
pub mod demo;
pub mod fleet;
pub mod lock;
pub mod mfa;
pub mod policy;
pub mod proxy;
pub mod quickstart;
mod secret_prompt;
pub mod sessions;
