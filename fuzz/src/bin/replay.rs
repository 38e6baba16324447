//! Runs inputs through a fuzz target without AFL: `replay TARGET PATH...` (files, or
//! directories of files such as `corpus/TARGET` or AFL's `crashes/`). Prints each input
//! as it starts, so a panic names the input that caused it.
use std::path::{Path, PathBuf};

fn inputs(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for entry in entries {
            if entry.is_file() && !entry.ends_with("README.txt") {
                out.push(entry);
            }
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let names: Vec<&str> = eastwall_fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
    let Some(target) = args.next() else {
        eprintln!(
            "usage: replay TARGET PATH...  (targets: {})",
            names.join(" ")
        );
        std::process::exit(2);
    };
    let Some(&(_, run)) = eastwall_fuzz::TARGETS.iter().find(|(n, _)| *n == target) else {
        eprintln!(
            "replay: no target {target:?} (targets: {})",
            names.join(" ")
        );
        std::process::exit(2);
    };
    let mut files = Vec::new();
    for arg in args {
        if let Err(e) = inputs(Path::new(&arg), &mut files) {
            eprintln!("replay: {arg}: {e}");
            std::process::exit(2);
        }
    }
    for file in &files {
        let data = std::fs::read(file).unwrap_or_else(|e| {
            eprintln!("replay: {}: {e}", file.display());
            std::process::exit(2);
        });
        eprintln!("replay: {target} {}", file.display());
        run(&data);
    }
    eprintln!("replay: {target}: {} inputs, no panic", files.len());
}
