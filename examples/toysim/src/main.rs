//! `prodsys-toysim`: thin command-line wrapper around [`prodsys_toysim`].
//!
//! Exit codes: 0 success, 1 I/O error, 2 bad arguments, 3 simulated failure (`--fail`).

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
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
