//! `prodsys-toysim`: thin command-line wrapper around [`prodsys_toysim`].
//!
//! `prodsys-toysim km3net ...` writes a KM3NeT-like event file instead (see
//! [`prodsys_toysim::km3net`]); `prodsys-toysim dl1 ...` processes
//! simulation files into DL1 files and `prodsys-toysim reco ...` KM3NeT
//! event files into reconstructed ones (see [`prodsys_toysim::dl1`]), and
//! `prodsys-toysim irf ...` merges DL1 files into one IRF file (see
//! [`prodsys_toysim::irf`]).
//!
//! Exit codes: 0 success, 1 I/O error, 2 bad arguments, 3 simulated failure (`--fail`).

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    use prodsys_toysim::{dl1, irf, km3net};
    let mut argv = std::env::args_os().skip(1).peekable();
    let step = argv
        .peek()
        .and_then(|a| a.to_str())
        .unwrap_or_default()
        .to_string();
    match step.as_str() {
        "km3net" => {
            let environment: Vec<(String, String)> = std::env::vars().collect();
            run(
                "km3net",
                km3net::USAGE,
                km3net::parse_args(argv.skip(1)),
                |args, out| km3net::simulate(args, &environment, out).map(drop),
            )
        }
        "dl1" | "reco" => {
            let step = if step == "dl1" {
                dl1::Step::Dl1
            } else {
                dl1::Step::Reco
            };
            run(
                step.name(),
                dl1::USAGE,
                dl1::parse_step_args(step, argv.skip(1)),
                |args, out| dl1::process(args, out).map(drop),
            )
        }
        "irf" => run(
            "irf",
            irf::USAGE,
            irf::parse_args(argv.skip(1)),
            |args, out| irf::merge(args, out).map(drop),
        ),
        _ => run(
            "",
            prodsys_toysim::USAGE,
            prodsys_toysim::parse_args(argv),
            |args, out| prodsys_toysim::simulate(args, out).map(drop),
        ),
    }
}

/// Runs one step of the tool: its arguments as parsed (or the usage and
/// exit 2), then `work` with stdout for progress, exiting as its error says.
fn run<A>(
    step: &str,
    usage: &str,
    parsed: Result<A, impl std::fmt::Display>,
    work: impl FnOnce(&A, &mut dyn Write) -> Result<(), prodsys_toysim::SimError>,
) -> ExitCode {
    let args = match parsed {
        Ok(args) => args,
        Err(err) => {
            let name = if step.is_empty() {
                "prodsys-toysim".to_string()
            } else {
                format!("prodsys-toysim {step}")
            };
            eprintln!("{name}: {err}");
            eprintln!("{usage}");
            return ExitCode::from(prodsys_toysim::EXIT_BAD_ARGS);
        }
    };
    let mut out = std::io::stdout().lock();
    let result = work(&args, &mut out);
    // Progress output is informational only; a closed stdout must not turn a good run into a failure.
    let _ = out.flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{err}");
            ExitCode::from(err.exit_code())
        }
    }
}
