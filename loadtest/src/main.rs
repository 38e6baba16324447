//! `eastwall-loadtest`: the same workload against PostgreSQL directly and through Eastwall,
//! alternated A B A B, reported as per-pair ratios.
#![forbid(unsafe_code)]

mod cli;
mod modes;
mod report;
mod stats;
mod tls;

fn main() -> std::process::ExitCode {
    match cli::run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("eastwall-loadtest: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
