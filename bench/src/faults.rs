//! The fault suite of `tests/faults.rs` at a larger size: the same six
//! faults, run by the test binary itself with productions of more jobs
//! (`PRODSYS_FAULT_JOBS`, `PRODSYS_FAULT_JOB_SECONDS`), one line each. The
//! lines go into their own section of BENCHMARKS.md; the rest of the file is
//! left as the last full run wrote it.
//!
//! The suite restarts RabbitMQ's application and PostgreSQL: run it alone,
//! with nothing else using either server.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context;

use crate::Args;

/// Where the section starts; it runs to the next `## ` heading.
pub const HEADING: &str = "## Fault suite at scale";

/// Runs the suite, prints its lines, and (unless smoke without --write)
/// puts them into BENCHMARKS.md.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let jobs = args.fault_jobs.unwrap_or(if args.smoke { 5 } else { 60 });
    // Shorter jobs at the large size, so a scenario's hundreds of jobs on
    // the cluster's four slots take a minute or two, not ten.
    let seconds = if jobs > 5 { 0.3 } else { 1.5 };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let started = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string();
    let clock = Instant::now();
    eprintln!(
        "faults: tests/faults.rs with {jobs} jobs per production of {seconds} s each (restarts RabbitMQ and PostgreSQL) …"
    );
    let mut child = Command::new(cargo)
        .args([
            "test",
            "-p",
            "prodsys-tests",
            "--test",
            "faults",
            "--",
            "--test-threads=1",
            "--nocapture",
        ])
        .env("PRODSYS_FAULT_JOBS", jobs.to_string())
        .env("PRODSYS_FAULT_JOB_SECONDS", seconds.to_string())
        .current_dir(&root)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test for tests/faults.rs")?;
    let mut lines = Vec::new();
    let mut failed = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            println!("{line}");
            // Under --nocapture a test's line may follow its name on one line.
            if let Some(at) = line.find("fault: ") {
                lines.push(line[at..].to_string());
            } else if let Some(name) = line
                .strip_prefix("test ")
                .and_then(|l| l.strip_suffix(" ... FAILED"))
            {
                failed.push(name.to_string());
            }
        }
    }
    let status = child.wait()?;
    let minutes = clock.elapsed().as_secs_f64() / 60.0;
    let section = section(&started, jobs, seconds, minutes, &lines, &failed);
    if !args.smoke || args.write {
        let path = args
            .output
            .clone()
            .unwrap_or_else(|| root.join("BENCHMARKS.md"));
        let existing = std::fs::read_to_string(&path).unwrap_or_default();
        std::fs::write(&path, replace_section(&existing, &section))?;
        println!("wrote the fault section of {}", path.display());
    }
    anyhow::ensure!(
        status.success() && failed.is_empty(),
        "the fault suite failed ({status}): {}",
        failed.join(", ")
    );
    Ok(())
}

fn section(
    started: &str,
    jobs: u64,
    seconds: f64,
    minutes: f64,
    lines: &[String],
    failed: &[String],
) -> String {
    let mut out = format!(
        "{HEADING}\n\nWritten by `cargo run --release -p prodsys-bench -- faults` on {started} ({minutes:.0} min): the six faults of `tests/faults.rs`, each on its own cluster (every service its own process), with productions of {jobs} jobs of {seconds} s instead of the suite's 5 of 1.5 s (`PRODSYS_FAULT_JOBS={jobs} PRODSYS_FAULT_JOB_SECONDS={seconds}`). One line per fault: what struck, what was checked, time from the fault's end until every check held.\n\n"
    );
    for line in lines {
        out.push_str(&format!("- {}\n", line.trim_start_matches("fault: ")));
    }
    if lines.is_empty() {
        out.push_str("- no fault reported a line\n");
    }
    for name in failed {
        out.push_str(&format!("- FAILED: `{name}`\n"));
    }
    out
}

/// The section of `markdown` that starts at [`HEADING`], if any.
pub fn existing_section(markdown: &str) -> Option<String> {
    let start = markdown.find(HEADING)?;
    let rest = &markdown[start..];
    let end = rest[HEADING.len()..]
        .find("\n## ")
        .map_or(rest.len(), |i| HEADING.len() + i + 1);
    Some(rest[..end].trim_end().to_string() + "\n")
}

/// `markdown` with its fault section replaced by `section`, or `section`
/// put before the history of what moved each figure (or at the end).
pub fn replace_section(markdown: &str, section: &str) -> String {
    if let Some(start) = markdown.find(HEADING) {
        let rest = &markdown[start + HEADING.len()..];
        let tail = rest.find("\n## ").map_or("", |i| &rest[i + 1..]);
        let mut out = markdown[..start].to_string();
        out.push_str(section);
        if !tail.is_empty() {
            out.push('\n');
            out.push_str(tail);
        }
        return out;
    }
    match markdown.find("## What moved each figure") {
        Some(at) => format!("{}{section}\n{}", &markdown[..at], &markdown[at..]),
        None if markdown.is_empty() => section.to_string(),
        None => format!("{}\n\n{section}", markdown.trim_end_matches('\n')),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fault_section_is_replaced_and_the_rest_kept() {
        let doc = "# B\n\n## Results\n\nx\n\n## What moved each figure\n\ny\n";
        let one = replace_section(doc, &format!("{HEADING}\n\n- a\n"));
        assert_eq!(
            one,
            format!(
                "# B\n\n## Results\n\nx\n\n{HEADING}\n\n- a\n\n## What moved each figure\n\ny\n"
            )
        );
        let two = replace_section(&one, &format!("{HEADING}\n\n- b\n"));
        assert_eq!(two, one.replace("- a", "- b"));
        assert_eq!(
            existing_section(&two).as_deref(),
            Some(format!("{HEADING}\n\n- b\n").as_str())
        );
    }
}
