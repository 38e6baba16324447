//! `eastwall audit`: checks the decision log's hash chain; runs the detectors over a verified log converts one to OCSF or to an HTML report.

use std::io::{BufWriter, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::audit::{self, VerifyError, VerifyReport};

/// Arguments of `eastwall audit`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Check that no line of a decision log was edited, removed or reordered.
    ///
    /// Exits 0 when the chain is intact; otherwise prints FILE:LINE and what is wrong with
    /// the first bad line, and exits 1. Rotated logs are given oldest first
    /// (`decisions.log.1 decisions.log`): each must continue the one before it.
    ///
    /// With --fleet, also compares the files with what this sidecar published to the fleet
    /// stream (its lines and chain heads): a line rewritten here after it was published, even
    /// with the chain recomputed, no longer matches, and the command exits 1.
    Verify {
        /// The decision log (JSON lines) to check; several for a rotated log, oldest first.
        #[arg(required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        fleet: FleetRead,
    },
    /// Run the seed's five detectors over a recorded decision log and print their signals.
    ///
    /// The chain is verified first (as `audit verify` does); a log that does not verify is
    /// not judged. The detectors are the sidecar's own, tuned by the config's [detect]
    /// table when --config is given, so a replay finds what the sidecar found inline. They
    /// start from nothing (learning), or from a saved state (--state, read only).
    ///
    /// With --fleet (and no files), the lines every sidecar of the config's [fleet] published
    /// are merged in time order and judged together, so a pattern spread across databases
    /// behind several sidecars (fan-out) is seen; each database is named `<sidecar>/<db>`.
    Detect {
        /// The decision log; several for a rotated log, oldest first.
        #[arg(required_unless_present = "fleet", num_args = 1..)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        fleet: FleetRead,
        /// eastwall.toml whose [detect] settings to use (default: the detectors' defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        /// A detector state file to start from (e.g. a copy of `<log>.detect.json`); never written.
        #[arg(long)]
        state: Option<PathBuf>,
        /// One JSON object per signal instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Convert a decision log to OCSF 1.3.0 events, one JSON object per line.
    ///
    /// The chain is verified first, as `audit verify` does: a broken chain prints FILE:LINE
    /// and exits 1 with nothing converted. Connects, step-ups, MFA answers, refusal summaries
    /// and session ends become Authentication (3002) events, detector signals Detection
    /// Finding (2004) events; other lines (rotation, reloads, locks, cancels, disk space) have
    /// no OCSF class and are counted as skipped.
    Ocsf {
        /// The decision log; several for a rotated log, oldest first.
        #[arg(required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Write the events to OUT (created mode 0600) instead of stdout.
        #[arg(long, value_name = "OUT")]
        out: Option<PathBuf>,
        /// Replace OUT if it exists.
        #[arg(long, requires = "out")]
        force: bool,
    },
    /// Write one self-contained HTML page about a decision log: who reached which database
    /// and role, the signals the detectors find (and any already logged), the top talkers.
    ///
    /// Checks the chain first, as `verify` does: a broken chain prints FILE:LINE and exits 1
    /// with no page. The page loads nothing and runs no script; every string from the log
    /// is escaped, and it stays small however large the log (the busiest nodes and edges,
    /// then "N more not shown").
    Report {
        /// The decision log; several for a rotated log, oldest first.
        #[arg(required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Where to write the page.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Replace --out if it exists.
        #[arg(long)]
        force: bool,
        /// eastwall.toml whose [detect] settings the replay uses (default: the detectors' defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        /// A detector state file to start the replay from; never written.
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// Print audited sessions as transcripts: who, from where, MFA age, each statement
    /// with its outcome and time.
    ///
    /// The chain is verified first, as `audit verify` does. Without --conn, every session
    /// that has statement lines (admitted through an mfa(...) rule, or named by
    /// `[audit] statements`); with it, that connection only.
    Sessions {
        /// The decision log; several for a rotated log, oldest first.
        #[arg(required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Only this connection (its conn_id).
        #[arg(long, value_name = "ID")]
        conn: Option<String>,
    },
}

/// `--fleet`: read the fleet's copy with the operator's SVID (the config names the fleet).
#[derive(Debug, clap::Args)]
pub struct FleetRead {
    /// Compare with (verify) or judge (detect) the fleet stream of the config's [fleet].
    #[arg(long, requires_all = ["fleet_config", "cert", "key"])]
    fleet: bool,
    /// With --fleet: the eastwall.toml holding [fleet] (for detect, also its [detect]).
    #[arg(long = "fleet-config", value_name = "FILE", requires = "fleet")]
    fleet_config: Option<PathBuf>,
    /// With --fleet: the certificate to connect to NATS with.
    #[arg(long, value_name = "FILE", requires = "fleet")]
    cert: Option<PathBuf>,
    /// With --fleet: its private key.
    #[arg(long, value_name = "FILE", requires = "fleet")]
    key: Option<PathBuf>,
}

impl FleetRead {
    fn parts(&self) -> Option<(&Path, crate::cli::fleet::Signer)> {
        match (self.fleet, &self.fleet_config, &self.cert, &self.key) {
            (true, Some(config), Some(cert), Some(key)) => Some((
                config.as_path(),
                crate::cli::fleet::Signer {
                    cert: cert.clone(),
                    key: key.clone(),
                },
            )),
            _ => None,
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Verify { files, fleet } => {
            verify(files.clone())?;
            if let Some((config, signer)) = fleet.parts() {
                if !crate::cli::fleet::verify(config, &signer, &files)? {
                    std::process::exit(1);
                }
            }
            Ok(())
        }
        Command::Detect {
            files,
            fleet,
            config,
            state,
            json,
        } => match fleet.parts() {
            Some((fleet_config, signer)) if files.is_empty() => {
                crate::cli::fleet::detect(fleet_config, &signer, json)
            }
            Some(_) => anyhow::bail!("--fleet judges the fleet's merged stream: give no files"),
            None => detect(files, config, state, json),
        },
        Command::Ocsf { files, out, force } => ocsf(&files, out.as_deref(), force),
        Command::Report {
            files,
            out,
            force,
            config,
            state,
        } => {
            let detectors = replay_detectors(config.as_deref(), state.as_deref())?;
            report(&files, &out, force, detectors)
        }
        Command::Sessions { files, conn } => sessions(&files, conn.as_deref()),
    }
}

fn detect(
    files: Vec<PathBuf>,
    config: Option<PathBuf>,
    state: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    let (tuning, saved) = replay_start(config.as_deref(), state.as_deref())?;
    let counts: Vec<usize> = check_chain(&files)?.iter().map(|r| r.lines).collect();
    let replay = crate::detect_replay::replay(&files, &counts, tuning, saved.as_deref())?;
    for signal in &replay.signals {
        if json {
            outln!("{}", signal.to_json());
        } else {
            outln!("{}", crate::detect_replay::describe(signal));
        }
    }
    if !json {
        outln!(
            "{} signal(s) over {} lines; the log itself records {} signal line(s)",
            replay.signals.len(),
            replay.lines,
            replay.recorded
        );
    }
    Ok(())
}

fn sessions(files: &[PathBuf], conn: Option<&str>) -> anyhow::Result<()> {
    check_chain(files)?;
    let text = crate::transcript::transcript(files, conn).context("cannot read the log")?;
    outln!("{}", text.trim_end());
    Ok(())
}

fn verify(files: Vec<PathBuf>) -> anyhow::Result<()> {
    let reports = check_chain(&files)?;
    if let Some((file, report)) = files.first().zip(reports.first()) {
        if report.first_prev != audit::GENESIS {
            outln!(
                "note: {} continues a rotated log whose last hash is {}; give the older file first to check the join",
                file.display(),
                report.first_prev
            );
        }
    }
    let lines: usize = reports.iter().map(|r| r.lines).sum();
    let last = reports
        .last()
        .map(|r| r.last_hash.clone())
        .unwrap_or_default();
    outln!("ok: {lines} lines, chain intact (last hash {last})");
    Ok(())
}

/// Verifies each file and that each continues the one before it. A broken chain is
/// `FILE:LINE: problem` on stderr and exit 1; an unreadable file is an error.
fn check_chain(files: &[PathBuf]) -> anyhow::Result<Vec<VerifyReport>> {
    let mut reports: Vec<VerifyReport> = Vec::new();
    for file in files {
        let report = match audit::verify(file) {
            Ok(report) => report,
            // `FILE:LINE: problem` on its own line, so editors and grep can jump to it.
            Err(err @ VerifyError::Line { .. }) => {
                eprintln!("{err}");
                std::process::exit(1)
            }
            Err(err) => return Err(err).context("cannot verify the decision log"),
        };
        if let Some((old, old_report)) = reports.last().map(|r| (&files[reports.len() - 1], r)) {
            if report.lines > 0 && report.first_prev != old_report.last_hash {
                eprintln!(
                    "{}:1: does not continue {}: its first line's prev is {}, the last hash there is {}",
                    file.display(),
                    old.display(),
                    report.first_prev,
                    old_report.last_hash
                );
                std::process::exit(1)
            }
        }
        reports.push(report);
    }
    Ok(reports)
}

/// Where the events go: stdout, or a 0600 temporary file beside OUT that is renamed onto it
/// only once every line is converted (so a failure leaves no half-written OUT).
enum Sink {
    Stdout(BufWriter<std::io::Stdout>),
    File {
        file: BufWriter<tempfile::NamedTempFile>,
        out: PathBuf,
        force: bool,
    },
}

impl Sink {
    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Sink::Stdout(w) => w,
            Sink::File { file, .. } => file,
        }
    }
}

fn ocsf(files: &[PathBuf], out: Option<&Path>, force: bool) -> anyhow::Result<()> {
    if let Some(out) = out {
        refuse_out(files, out, force)?;
    }
    let reports = check_chain(files)?;

    let mut sink = match out {
        None => Sink::Stdout(BufWriter::new(std::io::stdout())),
        Some(out) => {
            let dir = match out.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let tmp = tempfile::Builder::new()
                .prefix(".eastwall-ocsf-")
                .permissions(std::fs::Permissions::from_mode(0o600))
                .tempfile_in(dir)
                .with_context(|| format!("cannot create a file in {}", dir.display()))?;
            Sink::File {
                file: BufWriter::new(tmp),
                out: out.to_path_buf(),
                force,
            }
        }
    };

    let (mut converted, mut skipped) = (0usize, 0usize);
    let mut write_err: Option<std::io::Error> = None;
    for (file, verified) in files.iter().zip(&reports) {
        let expected = verified.lines;
        let walked = audit::verify_each(file, |n, line| {
            // Lines appended since the first pass (a live log) are left for the next run.
            if n > expected || write_err.is_some() {
                return;
            }
            let event = serde_json::from_slice(line)
                .ok()
                .and_then(|v| crate::ocsf::to_ocsf(&v));
            let Some(event) = event else {
                skipped += 1;
                return;
            };
            let w = sink.writer();
            let written = serde_json::to_writer(&mut *w, &event)
                .map_err(std::io::Error::from)
                .and_then(|()| w.write_all(b"\n"));
            match written {
                Ok(()) => converted += 1,
                Err(err) => write_err = Some(err),
            }
        });
        if let Err(why) = same_lines_again(walked, verified, expected) {
            eprintln!(
                "{}: changed while it was being converted ({why}); nothing was written to OUT, output to stdout is incomplete",
                file.display()
            );
            std::process::exit(1)
        }
        if let Some(err) = write_err.take() {
            return Err(match &sink {
                Sink::Stdout(_) => crate::cli::stdout_failed(&err),
                Sink::File { out, .. } => {
                    anyhow::Error::from(err).context(format!("cannot write {}", out.display()))
                }
            });
        }
    }

    let lines: usize = reports.iter().map(|r| r.lines).sum();
    let summary = format!(
        "ok: {lines} lines verified, {converted} OCSF events, {skipped} lines with no OCSF class skipped"
    );
    match sink {
        Sink::Stdout(mut w) => {
            if let Err(err) = w.flush() {
                crate::cli::stdout_failed(&err);
            }
            eprintln!("{summary}");
        }
        Sink::File { file, out, force } => {
            let tmp = file
                .into_inner()
                .map_err(|e| e.into_error())
                .with_context(|| format!("cannot write {}", out.display()))?;
            tmp.as_file()
                .sync_all()
                .with_context(|| format!("cannot write {}", out.display()))?;
            let persisted = if force {
                tmp.persist(&out).map(drop)
            } else {
                tmp.persist_noclobber(&out).map(drop)
            };
            persisted.map_err(|e| {
                if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                    anyhow::anyhow!(
                        "{} already exists; pass --force to replace it",
                        out.display()
                    )
                } else {
                    anyhow::Error::from(e.error).context(format!("cannot write {}", out.display()))
                }
            })?;
            outln!("{summary}, written to {}", out.display());
        }
    }
    Ok(())
}

/// OUT must not exist (unless --force), and is never one of the logs being read, not even with
/// --force: replacing the decision log with its conversion would destroy the record.
fn refuse_out(files: &[PathBuf], out: &Path, force: bool) -> anyhow::Result<()> {
    let Ok(meta) = out.metadata() else {
        if !force && out.symlink_metadata().is_ok() {
            anyhow::bail!(
                "{} already exists; pass --force to replace it",
                out.display()
            );
        }
        return Ok(());
    };
    for file in files {
        if let Ok(m) = file.metadata() {
            if m.dev() == meta.dev() && m.ino() == meta.ino() {
                anyhow::bail!(
                    "{} is the decision log being converted ({}); choose another --out",
                    out.display(),
                    file.display()
                );
            }
        }
    }
    if !force {
        anyhow::bail!(
            "{} already exists; pass --force to replace it",
            out.display()
        );
    }
    Ok(())
}

/// The tuning (`--config`'s [detect], else the defaults) and saved state (`--state`) a
/// replay starts from, as the sidecar would.
fn replay_start(
    config: Option<&Path>,
    state: Option<&Path>,
) -> anyhow::Result<(eastwall_detect::Settings, Option<String>)> {
    let tuning = match config {
        Some(path) => eastwall_config::Settings::load(path)?.detect.tuning,
        None => eastwall_detect::Settings::default(),
    };
    let saved = match state {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the detector state {}", path.display()))?,
        ),
        None => None,
    };
    Ok((tuning, saved))
}

fn replay_detectors(
    config: Option<&Path>,
    state: Option<&Path>,
) -> anyhow::Result<eastwall_detect::Detectors> {
    let (tuning, saved) = replay_start(config, state)?;
    Ok(match saved {
        Some(text) => eastwall_detect::Detectors::restore(tuning, &text)?,
        None => eastwall_detect::Detectors::new(tuning)?,
    })
}

/// `audit report`: verify, replay the detectors over the verified lines, write the page
/// atomically (0644; an existing OUT only with --force, a log being read never).
fn report(
    files: &[PathBuf],
    out: &Path,
    force: bool,
    mut detectors: eastwall_detect::Detectors,
) -> anyhow::Result<()> {
    refuse_out(files, out, force)?;
    let reports = check_chain(files)?;
    let mut page = crate::report::Report::new();
    for (file, verified) in files.iter().zip(&reports) {
        let expected = verified.lines;
        // One read that verifies and feeds: the page is of exactly the lines verified.
        let walked = audit::verify_each(file, |n, line| {
            if n > expected {
                return; // appended since the first pass (a live log): the next report's
            }
            let value = serde_json::from_slice(line).unwrap_or(serde_json::Value::Null);
            for signal in detectors.observe_line(&value) {
                page.signal(&signal);
            }
            page.line(&value);
        });
        if let Err(why) = same_lines_again(walked, verified, expected) {
            eprintln!(
                "{}: changed while the report was read ({why}); no page written",
                file.display()
            );
            std::process::exit(1)
        }
    }
    let last = reports
        .last()
        .map(|r| r.last_hash.as_str())
        .unwrap_or(audit::GENESIS);
    let header = crate::report::Header {
        files: files.iter().map(|f| f.display().to_string()).collect(),
        chain: format!("verified: intact, last hash {last}"),
    };
    let html = page.render(&header);
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".eastwall-report-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    // Readable by others whatever the umask: a report is meant to be shared.
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .and_then(|()| tmp.write_all(html.as_bytes()))
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", out.display()))?;
    // Without --force, a file that appeared since refuse_out is still not replaced.
    let placed = if force {
        tmp.persist(out).map(drop)
    } else {
        tmp.persist_noclobber(out).map(drop)
    };
    placed.map_err(|e| match e.error.kind() {
        std::io::ErrorKind::AlreadyExists => {
            anyhow::anyhow!(
                "{} already exists; pass --force to replace it",
                out.display()
            )
        }
        _ => anyhow::Error::from(e.error).context(format!("cannot write {}", out.display())),
    })?;
    outln!(
        "wrote {}: {} lines, {} signals",
        out.display(),
        page.lines(),
        page.signals()
    );
    Ok(())
}

/// Whether a second read (`walked`) met the lines the first pass verified: the same start and
/// at least as many lines. A bad line past them is one being written right now, not ours.
fn same_lines_again(
    walked: Result<VerifyReport, VerifyError>,
    verified: &VerifyReport,
    expected: usize,
) -> Result<(), String> {
    let unchanged = match &walked {
        Ok(again) => again.first_prev == verified.first_prev && again.lines >= expected,
        Err(VerifyError::Line { line, .. }) => *line > expected,
        Err(VerifyError::Io { .. }) => false,
    };
    if unchanged {
        return Ok(());
    }
    Err(walked.err().map_or_else(
        || "its lines are not the ones verified".to_owned(),
        |e| e.to_string(),
    ))
}
