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
    let mut argv = std::env::args_os().skip(1).peekable();
    if argv.peek().is_some_and(|a| a == "km3net") {
        return km3net(argv.skip(1));
    }
    if argv.peek().is_some_and(|a| a == "dl1") {
        return dl1(prodsys_toysim::dl1::Step::Dl1, argv.skip(1));
    }
    if argv.peek().is_some_and(|a| a == "reco") {
        return dl1(prodsys_toysim::dl1::Step::Reco, argv.skip(1));
    }
    if argv.peek().is_some_and(|a| a == "irf") {
        return irf(argv.skip(1));
    }
    let args = match prodsys_toysim::parse_args(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(err) => {
            eprintln!("prodsys-toysim: {err}");
            eprintln!("{}", prodsys_toysim::USAGE);
            return ExitCode::from(prodsys_toysim::EXIT_BAD_ARGS);
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = prodsys_toysim::simulate(&args, &mut out);
    // Progress output is informational only; a closed stdout must not turn a good run into a failure.
    let _ = out.flush();
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{err}");
            ExitCode::from(err.exit_code())
        }
    }
}

fn km3net(args: impl Iterator<Item = std::ffi::OsString>) -> ExitCode {
    use prodsys_toysim::km3net;
    let args = match km3net::parse_args(args) {
        Ok(args) => args,
        Err(err) => {
            eprintln!("prodsys-toysim km3net: {err}");
            eprintln!("{}", km3net::USAGE);
            return ExitCode::from(prodsys_toysim::EXIT_BAD_ARGS);
        }
    };
    let environment: Vec<(String, String)> = std::env::vars().collect();
    let mut out = std::io::stdout().lock();
    let result = km3net::simulate(&args, &environment, &mut out);
    let _ = out.flush();
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{err}");
            ExitCode::from(err.exit_code())
        }
    }
}

fn dl1(
    step: prodsys_toysim::dl1::Step,
    args: impl Iterator<Item = std::ffi::OsString>,
) -> ExitCode {
    use prodsys_toysim::dl1;
    let args = match dl1::parse_step_args(step, args) {
        Ok(args) => args,
        Err(err) => {
            eprintln!("prodsys-toysim {}: {err}", step.name());
            eprintln!("{}", dl1::USAGE);
            return ExitCode::from(prodsys_toysim::EXIT_BAD_ARGS);
        }
    };
    let mut out = std::io::stdout().lock();
    let result = dl1::process(&args, &mut out);
    let _ = out.flush();
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{err}");
            ExitCode::from(err.exit_code())
        }
    }
}

fn irf(args: impl Iterator<Item = std::ffi::OsString>) -> ExitCode {
    use prodsys_toysim::irf;
    let args = match irf::parse_args(args) {
        Ok(args) => args,
        Err(err) => {
            eprintln!("prodsys-toysim irf: {err}");
            eprintln!("{}", irf::USAGE);
            return ExitCode::from(prodsys_toysim::EXIT_BAD_ARGS);
        }
    };
    let mut out = std::io::stdout().lock();
    let result = irf::merge(&args, &mut out);
    let _ = out.flush();
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{err}");
            ExitCode::from(err.exit_code())
        }
    }
}
