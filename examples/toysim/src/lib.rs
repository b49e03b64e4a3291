//! A tiny, deterministic Monte Carlo "simulator" for the prodsys examples.
//!
//! It stands in for a CORSIKA/sim_telarray container in the CTA IRF example: the local executor
//! runs it as a job's command and it writes one real `.simtel` file per NSB level, so the catalog
//! has real files with real sizes and checksums to register. The content is pseudo-random bytes
//! from a splitmix64 generator seeded from `(seed, nsb)`, so identical arguments always produce
//! byte-identical files.
//!
//! The crate is std-only on purpose: it must build in seconds.

pub mod dl1;
pub mod irf;
pub mod km3net;

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// Exit code for invalid command-line arguments.
pub const EXIT_BAD_ARGS: u8 = 2;
/// Exit code for I/O errors while writing output.
pub const EXIT_IO_ERROR: u8 = 1;
/// Exit code for the simulated failure requested with `--fail`.
pub const EXIT_SIMULATED_FAILURE: u8 = 3;

/// Default size in bytes of one simulated event.
pub const DEFAULT_EVENT_BYTES: usize = 64;

/// Usage text printed after an argument error.
pub const USAGE: &str = "usage: prodsys-toysim --run <u64> --seed <u64> --showers <u64> --nsb <u32[,u32...]> \
--site <str> --particle <str> --zenith <f64> --azimuth <f64> --layout <str> --output-dir <path> \
[--event-bytes <usize, default 64>] [--fail]";

/// Parsed command-line arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct Args {
    pub run: u64,
    pub seed: u64,
    pub showers: u64,
    /// NSB levels, in the order given; non-empty and without duplicates.
    pub nsb: Vec<u32>,
    pub site: String,
    pub particle: String,
    pub zenith: f64,
    pub azimuth: f64,
    pub layout: String,
    pub output_dir: PathBuf,
    pub event_bytes: usize,
    pub fail: bool,
}

/// An invalid command line. Every variant names the offending argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgError {
    /// A required argument was not given.
    Missing(&'static str),
    /// An argument that takes a value was last on the line or followed by another `--option`.
    MissingValue(String),
    /// An argument was given more than once.
    Duplicate(String),
    /// An argument that is not known.
    Unknown(String),
    /// A value that could not be parsed or is out of range.
    Invalid {
        arg: &'static str,
        value: String,
        reason: String,
    },
}

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing(arg) => write!(f, "missing required argument {arg}"),
            Self::MissingValue(arg) => write!(f, "argument {arg} requires a value"),
            Self::Duplicate(arg) => write!(f, "argument {arg} given more than once"),
            Self::Unknown(arg) => write!(f, "unknown argument {arg}"),
            Self::Invalid { arg, value, reason } => {
                write!(f, "invalid value {value:?} for {arg}: {reason}")
            }
        }
    }
}

impl std::error::Error for ArgError {}

impl ArgError {
    /// The argument this error is about (e.g. `--run`).
    pub fn argument(&self) -> &str {
        match self {
            Self::Missing(arg) | Self::Invalid { arg, .. } => arg,
            Self::MissingValue(arg) | Self::Duplicate(arg) | Self::Unknown(arg) => arg,
        }
    }
}

/// Options that take a value, in the order they appear in [`USAGE`].
const VALUE_OPTIONS: [&str; 11] = [
    "--run",
    "--seed",
    "--showers",
    "--nsb",
    "--site",
    "--particle",
    "--zenith",
    "--azimuth",
    "--layout",
    "--output-dir",
    "--event-bytes",
];

/// Parses the command line (without the program name).
pub fn parse_args<I, S>(args: I) -> Result<Args, ArgError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut values: [Option<OsString>; VALUE_OPTIONS.len()] = Default::default();
    let mut fail = false;
    let mut iter = args.into_iter().map(|a| a.as_ref().to_os_string());

    while let Some(raw) = iter.next() {
        let Some(key) = raw.to_str() else {
            return Err(ArgError::Unknown(raw.to_string_lossy().into_owned()));
        };
        if key == "--fail" {
            if fail {
                return Err(ArgError::Duplicate(key.to_owned()));
            }
            fail = true;
            continue;
        }
        let Some(index) = VALUE_OPTIONS.iter().position(|o| *o == key) else {
            return Err(ArgError::Unknown(key.to_owned()));
        };
        let value = match iter.next() {
            Some(v) if !v.to_string_lossy().starts_with("--") => v,
            _ => return Err(ArgError::MissingValue(key.to_owned())),
        };
        if values[index].replace(value).is_some() {
            return Err(ArgError::Duplicate(key.to_owned()));
        }
    }

    let [
        run,
        seed,
        showers,
        nsb,
        site,
        particle,
        zenith,
        azimuth,
        layout,
        output_dir,
        event_bytes,
    ] = values;

    let run = parse_num::<u64>("--run", run)?;
    let seed = parse_num::<u64>("--seed", seed)?;
    let showers = parse_num::<u64>("--showers", showers)?;
    let nsb = parse_nsb(required("--nsb", nsb)?)?;
    let site = parse_name("--site", site)?;
    let particle = parse_name("--particle", particle)?;
    let zenith = parse_angle("--zenith", zenith)?;
    let azimuth = parse_angle("--azimuth", azimuth)?;
    let layout = parse_name("--layout", layout)?;
    let output_dir = PathBuf::from(required("--output-dir", output_dir)?);
    if output_dir.as_os_str().is_empty() {
        return Err(invalid("--output-dir", "", "must not be empty"));
    }
    let event_bytes = match event_bytes {
        None => DEFAULT_EVENT_BYTES,
        Some(v) => parse_num::<usize>("--event-bytes", Some(v))?,
    };
    if event_bytes == 0 {
        return Err(invalid("--event-bytes", "0", "must be at least 1"));
    }
    // The payload size of one file must be representable.
    if u64::try_from(event_bytes)
        .ok()
        .and_then(|e| e.checked_mul(showers))
        .is_none()
    {
        return Err(invalid(
            "--showers",
            &showers.to_string(),
            "showers * event bytes overflows a 64-bit file size",
        ));
    }

    Ok(Args {
        run,
        seed,
        showers,
        nsb,
        site,
        particle,
        zenith,
        azimuth,
        layout,
        output_dir,
        event_bytes,
        fail,
    })
}

fn invalid(arg: &'static str, value: &str, reason: impl Into<String>) -> ArgError {
    ArgError::Invalid {
        arg,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

fn required(arg: &'static str, value: Option<OsString>) -> Result<OsString, ArgError> {
    value.ok_or(ArgError::Missing(arg))
}

fn required_str(arg: &'static str, value: Option<OsString>) -> Result<String, ArgError> {
    required(arg, value)?
        .into_string()
        .map_err(|v| invalid(arg, &v.to_string_lossy(), "not valid UTF-8"))
}

fn parse_num<T>(arg: &'static str, value: Option<OsString>) -> Result<T, ArgError>
where
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    let value = required_str(arg, value)?;
    value
        .parse::<T>()
        .map_err(|e| invalid(arg, &value, e.to_string()))
}

fn parse_angle(arg: &'static str, value: Option<OsString>) -> Result<f64, ArgError> {
    let value = required_str(arg, value)?;
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err(invalid(arg, &value, "must be a finite number")),
        Err(e) => Err(invalid(arg, &value, e.to_string())),
    }
}

/// A name that ends up in a file name: non-empty, no path separators.
fn parse_name(arg: &'static str, value: Option<OsString>) -> Result<String, ArgError> {
    let value = required_str(arg, value)?;
    if value.is_empty() {
        return Err(invalid(arg, &value, "must not be empty"));
    }
    if value.contains(['/', '\\', '\0']) || value == "." || value == ".." {
        return Err(invalid(arg, &value, "must not contain path separators"));
    }
    Ok(value)
}

fn parse_nsb(value: OsString) -> Result<Vec<u32>, ArgError> {
    const ARG: &str = "--nsb";
    let text = value
        .into_string()
        .map_err(|v| invalid(ARG, &v.to_string_lossy(), "not valid UTF-8"))?;
    let mut levels = Vec::new();
    let mut seen = HashSet::new();
    for part in text.split(',') {
        let level = part
            .trim()
            .parse::<u32>()
            .map_err(|e| invalid(ARG, &text, format!("level {part:?}: {e}")))?;
        if !seen.insert(level) {
            return Err(invalid(ARG, &text, format!("level {level} listed twice")));
        }
        levels.push(level);
    }
    Ok(levels)
}

/// splitmix64 (Steele, Lea & Flood 2014): tiny, fast and good enough for filler bytes.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// Generator for one output file: the seed is combined with the NSB level so that every
    /// level gets its own, reproducible stream.
    pub fn for_level(seed: u64, nsb: u32) -> Self {
        Self::new(seed ^ mix64(u64::from(nsb).wrapping_add(GOLDEN_GAMMA)))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        mix64(self.state)
    }

    /// Fills `buf` with pseudo-random bytes (little-endian words).
    pub fn fill_bytes(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let word = self.next_u64().to_le_bytes();
            rest.copy_from_slice(&word[..rest.len()]);
        }
    }
}

/// The file name written for NSB level `nsb`.
pub fn output_file_name(args: &Args, nsb: u32) -> String {
    format!(
        "{}_{}deg_{}deg_run{:06}___{}_nsb{}.simtel",
        args.particle, args.zenith, args.azimuth, args.run, args.layout, nsb
    )
}

/// The header line (including the trailing newline) of the file for NSB level `nsb`.
pub fn header_line(args: &Args, nsb: u32) -> String {
    format!(
        "# prodsys-toysim run={} seed={} site={} particle={} zenith={} azimuth={} layout={} nsb={} showers={}\n",
        args.run,
        args.seed,
        args.site,
        args.particle,
        args.zenith,
        args.azimuth,
        args.layout,
        nsb,
        args.showers
    )
}

/// One file written by [`simulate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenFile {
    pub path: PathBuf,
    pub nsb: u32,
    /// Size on disk in bytes.
    pub size: u64,
}

/// A failed simulation.
#[derive(Debug)]
pub enum SimError {
    /// `--fail` was given.
    SimulatedFailure,
    /// Creating or writing `path` failed.
    Io { path: PathBuf, source: io::Error },
}

impl SimError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::SimulatedFailure => EXIT_SIMULATED_FAILURE,
            Self::Io { .. } => EXIT_IO_ERROR,
        }
    }
}

impl fmt::Display for SimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SimulatedFailure => f.write_str("simulated failure"),
            Self::Io { path, source } => {
                write!(
                    f,
                    "prodsys-toysim: I/O error on {}: {source}",
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for SimError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::SimulatedFailure => None,
            Self::Io { source, .. } => Some(source),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SimError + '_ {
    move |source| SimError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs the simulation: writes one file per NSB level into `args.output_dir` and reports progress
/// on `progress`. With `args.fail` nothing is written (not even the output directory) and
/// [`SimError::SimulatedFailure`] is returned.
///
/// Each file is written under a `.part` name and renamed when complete, so a crashed run never
/// leaves a truncated file under the final name.
pub fn simulate(args: &Args, progress: &mut dyn Write) -> Result<Vec<WrittenFile>, SimError> {
    if args.fail {
        return Err(SimError::SimulatedFailure);
    }
    // Progress output is best effort: failing to print must not fail the simulation.
    let _ = writeln!(
        progress,
        "simulating run {} (seed {}, site {}, {} {}deg/{}deg, layout {}, {} showers x {} NSB level(s), {} bytes/event)",
        args.run,
        args.seed,
        args.site,
        args.particle,
        args.zenith,
        args.azimuth,
        args.layout,
        args.showers,
        args.nsb.len(),
        args.event_bytes
    );

    fs::create_dir_all(&args.output_dir).map_err(io_err(&args.output_dir))?;

    let mut written = Vec::with_capacity(args.nsb.len());
    for &nsb in &args.nsb {
        let path = args.output_dir.join(output_file_name(args, nsb));
        let size = write_level(args, nsb, &path)?;
        let _ = writeln!(progress, "wrote {} ({size} bytes)", path.display());
        written.push(WrittenFile { path, nsb, size });
    }

    let total: u64 = written.iter().map(|w| w.size).sum();
    let _ = writeln!(
        progress,
        "done: run {} wrote {} file(s), {total} bytes in total",
        args.run,
        written.len()
    );
    Ok(written)
}

fn write_level(args: &Args, nsb: u32, path: &Path) -> Result<u64, SimError> {
    let mut part_name = path.as_os_str().to_os_string();
    part_name.push(".part");
    let part = PathBuf::from(part_name);

    let result = write_contents(args, nsb, &part);
    if result.is_err() {
        let _ = fs::remove_file(&part);
    }
    result?;
    fs::rename(&part, path).map_err(io_err(path))?;
    Ok(fs::metadata(path).map_err(io_err(path))?.len())
}

fn write_contents(args: &Args, nsb: u32, path: &Path) -> Result<(), SimError> {
    let file = File::create(path).map_err(io_err(path))?;
    let mut out = BufWriter::with_capacity(1 << 16, file);
    out.write_all(header_line(args, nsb).as_bytes())
        .map_err(io_err(path))?;

    let mut rng = SplitMix64::for_level(args.seed, nsb);
    let mut event = vec![0u8; args.event_bytes];
    for _ in 0..args.showers {
        rng.fill_bytes(&mut event);
        out.write_all(&event).map_err(io_err(path))?;
    }
    let file = out.into_inner().map_err(|e| io_err(path)(e.into_error()))?;
    file.sync_all().map_err(io_err(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Instant, SystemTime, UNIX_EPOCH};

    /// A unique scratch directory under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            let dir = std::env::temp_dir().join(format!(
                "prodsys-toysim-test-{name}-{}-{nanos}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            Self(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn argv(output_dir: &Path, extra: &[&str]) -> Vec<OsString> {
        let mut v: Vec<OsString> = [
            "--run",
            "42",
            "--seed",
            "1234",
            "--showers",
            "100",
            "--nsb",
            "1,5",
            "--site",
            "LaPalma",
            "--particle",
            "gamma",
            "--zenith",
            "20.0",
            "--azimuth",
            "180",
            "--layout",
            "alpha",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        v.push("--output-dir".into());
        v.push(output_dir.as_os_str().to_os_string());
        v.extend(extra.iter().map(OsString::from));
        v
    }

    /// argv with option `key` (and its value) removed.
    fn argv_without(output_dir: &Path, key: &str) -> Vec<OsString> {
        let full = argv(output_dir, &[]);
        let mut out = Vec::new();
        let mut i = 0;
        while i < full.len() {
            if full[i] == key {
                i += 2;
            } else {
                out.push(full[i].clone());
                i += 1;
            }
        }
        out
    }

    /// argv with the value of option `key` replaced.
    fn argv_with(output_dir: &Path, key: &str, value: &str) -> Vec<OsString> {
        let mut full = argv(output_dir, &[]);
        let pos = full.iter().position(|a| a == key).expect("known option");
        full[pos + 1] = value.into();
        full
    }

    fn run_sim(args: &Args) -> (Vec<WrittenFile>, String) {
        let mut progress = Vec::new();
        let written = simulate(args, &mut progress).expect("simulation succeeds");
        (
            written,
            String::from_utf8(progress).expect("utf-8 progress"),
        )
    }

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read output dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn parses_full_command_line() {
        let scratch = Scratch::new("parse");
        let args = parse_args(argv(scratch.path(), &[])).expect("valid");
        assert_eq!(args.run, 42);
        assert_eq!(args.seed, 1234);
        assert_eq!(args.showers, 100);
        assert_eq!(args.nsb, vec![1, 5]);
        assert_eq!(args.site, "LaPalma");
        assert_eq!(args.particle, "gamma");
        assert_eq!(args.zenith, 20.0);
        assert_eq!(args.azimuth, 180.0);
        assert_eq!(args.layout, "alpha");
        assert_eq!(args.output_dir, scratch.path());
        assert_eq!(args.event_bytes, DEFAULT_EVENT_BYTES);
        assert!(!args.fail);

        let args = parse_args(argv(scratch.path(), &["--event-bytes", "10", "--fail"])).unwrap();
        assert_eq!(args.event_bytes, 10);
        assert!(args.fail);
        // Parsing alone never touches the file system.
        assert!(!scratch.path().exists());
    }

    #[test]
    fn missing_run_is_reported_by_name() {
        let scratch = Scratch::new("missing-run");
        let err = parse_args(argv_without(scratch.path(), "--run")).unwrap_err();
        assert_eq!(err, ArgError::Missing("--run"));
        assert_eq!(err.argument(), "--run");
        assert!(err.to_string().contains("--run"), "{err}");
    }

    #[test]
    fn non_numeric_showers_is_reported_by_name() {
        let scratch = Scratch::new("bad-showers");
        let err = parse_args(argv_with(scratch.path(), "--showers", "many")).unwrap_err();
        assert!(
            matches!(&err, ArgError::Invalid { arg: "--showers", value, .. } if value == "many"),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("--showers") && msg.contains("many"), "{msg}");
    }

    #[test]
    fn other_bad_arguments_name_the_argument() {
        let scratch = Scratch::new("bad-args");
        let dir = scratch.path();
        let cases: Vec<(Vec<OsString>, &str)> = vec![
            (argv(dir, &["--bogus", "1"]), "--bogus"),
            (argv(dir, &["--event-bytes"]), "--event-bytes"),
            (argv(dir, &["--event-bytes", "0"]), "--event-bytes"),
            (argv(dir, &["--event-bytes", "-3"]), "--event-bytes"),
            (argv(dir, &["--run", "7"]), "--run"),
            (argv(dir, &["--fail", "--fail"]), "--fail"),
            (argv_with(dir, "--nsb", "1,x"), "--nsb"),
            (argv_with(dir, "--nsb", "1,1"), "--nsb"),
            (argv_with(dir, "--nsb", ""), "--nsb"),
            (argv_with(dir, "--zenith", "steep"), "--zenith"),
            (argv_with(dir, "--azimuth", "inf"), "--azimuth"),
            (argv_with(dir, "--seed", "-1"), "--seed"),
            (argv_with(dir, "--particle", "../evil"), "--particle"),
            (argv_with(dir, "--layout", ""), "--layout"),
            (argv_with(dir, "--site", "--layout"), "--site"),
            (argv_without(dir, "--output-dir"), "--output-dir"),
            (argv_without(dir, "--nsb"), "--nsb"),
        ];
        for (args, name) in cases {
            let err = parse_args(&args).expect_err(name);
            assert_eq!(err.argument(), name, "{args:?} -> {err}");
            assert!(err.to_string().contains(name), "{err}");
        }
        // showers * event bytes must fit in a 64-bit file size.
        let mut huge = argv_with(dir, "--showers", &u64::MAX.to_string());
        huge.extend(["--event-bytes".into(), "2".into()]);
        assert_eq!(parse_args(&huge).unwrap_err().argument(), "--showers");
    }

    #[test]
    fn one_file_per_nsb_level_with_expected_name_and_size() {
        let scratch = Scratch::new("files");
        let args = parse_args(argv(scratch.path(), &[])).unwrap();
        let (written, progress) = run_sim(&args);

        let expected = [
            "gamma_20deg_180deg_run000042___alpha_nsb1.simtel",
            "gamma_20deg_180deg_run000042___alpha_nsb5.simtel",
        ];
        assert_eq!(dir_entries(scratch.path()), expected);
        assert_eq!(written.len(), 2);
        for (file, (name, nsb)) in written.iter().zip(expected.iter().zip([1u32, 5])) {
            assert_eq!(file.path, scratch.path().join(name));
            assert_eq!(file.nsb, nsb);
            let header = header_line(&args, nsb);
            let expected_size = header.len() as u64 + 100 * 64;
            assert_eq!(file.size, expected_size);
            assert_eq!(fs::metadata(&file.path).unwrap().len(), expected_size);
            let bytes = fs::read(&file.path).unwrap();
            assert!(bytes.starts_with(header.as_bytes()));
            assert_eq!(
                header,
                format!(
                    "# prodsys-toysim run=42 seed=1234 site=LaPalma particle=gamma zenith=20 azimuth=180 layout=alpha nsb={nsb} showers=100\n"
                )
            );
            assert!(progress.contains(&format!(
                "wrote {} ({expected_size} bytes)",
                file.path.display()
            )));
        }
        assert!(progress.starts_with("simulating run 42"), "{progress}");
        let total = written.iter().map(|w| w.size).sum::<u64>();
        assert!(
            progress
                .lines()
                .last()
                .unwrap()
                .contains(&format!("{total} bytes")),
            "{progress}"
        );

        let a = fs::read(&written[0].path).unwrap();
        let b = fs::read(&written[1].path).unwrap();
        let ha = header_line(&args, 1).len();
        let hb = header_line(&args, 5).len();
        assert_ne!(a[ha..], b[hb..], "NSB levels must have different payloads");
    }

    #[test]
    fn same_arguments_give_identical_bytes() {
        let first = Scratch::new("same-a");
        let second = Scratch::new("same-b");
        let a = run_sim(&parse_args(argv(first.path(), &[])).unwrap()).0;
        let b = run_sim(&parse_args(argv(second.path(), &[])).unwrap()).0;
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.path.file_name(), y.path.file_name());
            assert_eq!(fs::read(&x.path).unwrap(), fs::read(&y.path).unwrap());
        }
        // Rerunning into the same directory overwrites with identical content.
        let again = run_sim(&parse_args(argv(first.path(), &[])).unwrap()).0;
        assert_eq!(again, a);
        assert_eq!(dir_entries(first.path()).len(), 2);

        // A different seed changes the payload but not the names or sizes.
        let other = Scratch::new("same-c");
        let c = run_sim(&parse_args(argv_with(other.path(), "--seed", "1235")).unwrap()).0;
        for (x, z) in a.iter().zip(&c) {
            assert_eq!(x.path.file_name(), z.path.file_name());
            assert_eq!(x.size, z.size);
            let (bx, bz) = (fs::read(&x.path).unwrap(), fs::read(&z.path).unwrap());
            let payload = bx.len() - 100 * 64;
            assert_ne!(bx[payload..], bz[payload..]);
        }
    }

    #[test]
    fn event_bytes_and_zero_showers() {
        let scratch = Scratch::new("sizes");
        let args = parse_args(argv(scratch.path(), &["--event-bytes", "13"])).unwrap();
        let (written, _) = run_sim(&args);
        for file in &written {
            let expected = header_line(&args, file.nsb).len() as u64 + 100 * 13;
            assert_eq!(file.size, expected);
        }

        let empty = Scratch::new("zero");
        let args = parse_args(argv_with(empty.path(), "--showers", "0")).unwrap();
        let (written, _) = run_sim(&args);
        for file in &written {
            assert_eq!(file.size, header_line(&args, file.nsb).len() as u64);
        }
    }

    #[test]
    fn fail_writes_nothing() {
        let scratch = Scratch::new("fail");
        let args = parse_args(argv(scratch.path(), &["--fail"])).unwrap();
        let mut progress = Vec::new();
        let err = simulate(&args, &mut progress).unwrap_err();
        assert!(matches!(err, SimError::SimulatedFailure));
        assert_eq!(err.exit_code(), EXIT_SIMULATED_FAILURE);
        assert_eq!(err.to_string(), "simulated failure");
        assert!(
            !scratch.path().exists(),
            "--fail must not create the output dir"
        );
        assert!(progress.is_empty());
    }

    #[test]
    fn io_error_names_the_path() {
        let scratch = Scratch::new("io");
        fs::create_dir_all(scratch.path()).unwrap();
        // A regular file where the output directory should be.
        let blocker = scratch.path().join("not-a-dir");
        fs::write(&blocker, b"x").unwrap();
        let args = parse_args(argv(&blocker.join("out"), &[])).unwrap();
        let err = simulate(&args, &mut io::sink()).unwrap_err();
        assert_eq!(err.exit_code(), EXIT_IO_ERROR);
        assert!(err.to_string().contains("not-a-dir"), "{err}");
    }

    #[test]
    fn splitmix64_reference_values() {
        // Reference outputs of splitmix64 seeded with 1234567 (from the original C code).
        let mut rng = SplitMix64::new(1_234_567);
        let got: Vec<u64> = (0..5).map(|_| rng.next_u64()).collect();
        assert_eq!(
            got,
            [
                6_457_827_717_110_365_317,
                3_203_168_211_198_807_973,
                9_817_491_932_198_370_423,
                4_593_380_528_125_082_431,
                16_408_922_859_458_223_821,
            ]
        );

        let mut buf = [0u8; 11];
        SplitMix64::new(1_234_567).fill_bytes(&mut buf);
        assert_eq!(buf[..8], 6_457_827_717_110_365_317u64.to_le_bytes());
        assert_eq!(buf[8..], 3_203_168_211_198_807_973u64.to_le_bytes()[..3]);
    }

    #[test]
    fn hundred_thousand_showers_is_fast() {
        let scratch = Scratch::new("speed");
        let args = parse_args(argv_with(scratch.path(), "--showers", "100000")).unwrap();
        let start = Instant::now();
        let (written, _) = run_sim(&args);
        let elapsed = start.elapsed();
        assert_eq!(written.len(), 2);
        // Generous bound so unoptimised test builds on slow CI machines still pass.
        assert!(elapsed.as_secs_f64() < 5.0, "took {elapsed:?}");
    }
}
