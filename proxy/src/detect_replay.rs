//! The detectors over a recorded decision log (`eastwall audit detect`): the same line parse and the same code the sidecar runs inline.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use eastwall_detect::{Detectors, Signal};
use serde_json::Value;

/// Longest line read; `audit::verify` refuses longer ones, so a verified log has none.
const MAX_LINE_BYTES: u64 = 1 << 20;

/// What a replay found.
#[derive(Debug)]
pub struct Replay {
    /// Lines judged (the verified ones).
    pub lines: usize,
    /// The signals, in the order the detectors raised them.
    pub signals: Vec<Signal>,
    /// `event: "signal"` lines the log already holds (what the sidecar raised inline).
    pub recorded: usize,
    /// The detectors after the last line, e.g. to save their state.
    pub detectors: Detectors,
}

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: longer than {MAX_LINE_BYTES} bytes; not a line Eastwall wrote", path.display())]
    TooLong { path: PathBuf, line: usize },
    #[error(transparent)]
    Restore(#[from] eastwall_detect::RestoreError),
    #[error("[detect] settings: {0}")]
    Settings(#[from] eastwall_detect::SettingsError),
}

/// Judges the first `counts[i]` lines of each file (the ones verified), oldest file first.
pub fn replay(
    files: &[PathBuf],
    counts: &[usize],
    tuning: eastwall_detect::Settings,
    saved: Option<&str>,
) -> Result<Replay, ReplayError> {
    let mut detectors = match saved {
        Some(text) => Detectors::restore(tuning, text)?,
        None => Detectors::new(tuning)?,
    };
    let mut out = Replay {
        lines: 0,
        signals: Vec::new(),
        recorded: 0,
        detectors: Detectors::new(eastwall_detect::Settings::default())?,
    };
    for (file, &count) in files.iter().zip(counts) {
        for_each_line(file, count, |line| {
            if line.get("event").and_then(Value::as_str) == Some("signal") {
                out.recorded += 1;
            }
            out.signals.extend(detectors.observe_line(line));
            out.lines += 1;
        })?;
    }
    out.detectors = detectors;
    Ok(out)
}

/// Calls `judge` on each of the first `count` lines of `path` that parse as JSON.
fn for_each_line(
    path: &Path,
    count: usize,
    mut judge: impl FnMut(&Value),
) -> Result<(), ReplayError> {
    let read = |source| ReplayError::Read {
        path: path.to_owned(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(read)?);
    let mut buf = Vec::new();
    for n in 1..=count {
        buf.clear();
        let got = (&mut reader)
            .take(MAX_LINE_BYTES + 1)
            .read_until(b'\n', &mut buf)
            .map_err(read)?;
        if got == 0 {
            break;
        }
        if got as u64 > MAX_LINE_BYTES {
            return Err(ReplayError::TooLong {
                path: path.to_owned(),
                line: n,
            });
        }
        if let Ok(line) = serde_json::from_slice::<Value>(&buf) {
            judge(&line);
        }
    }
    Ok(())
}

/// One signal as a line of text: time, signal/kind, subject, then the evidence.
pub fn describe(s: &Signal) -> String {
    let e = &s.evidence;
    let mut text = format!("{}  {}/{}  {}", s.time, s.name.as_str(), s.kind, s.subject);
    for (label, items) in [
        ("identities", &e.identities),
        ("sources", &e.sources),
        ("targets", &e.targets),
    ] {
        if !items.is_empty() {
            text.push_str(&format!("  {label}={}", items.join(",")));
        }
    }
    if !e.counts.is_empty() {
        let counts: Vec<String> = e.counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
        text.push_str(&format!("  {}", counts.join(" ")));
    }
    if let Some(w) = &e.window {
        text.push_str(&format!("  window={}s", w.seconds));
    }
    text
}
