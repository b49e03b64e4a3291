//! The KM3NeT mode (`prodsys-toysim km3net ...`): one gSeaGen/MUPAGE-like
//! event file per run, as the KM3NeT example's container template runs it.
//!
//! The file starts with a text header naming the generator, detector,
//! flavour, run, energy range and spectral index, then the container template
//! the job ran (`PRODSYS_TEMPLATE`, `PRODSYS_TEMPLATE_VERSION`,
//! `PRODSYS_IMAGE`) and every template parameter it received
//! (`PRODSYS_PARAM_<NAME>` environment variables, as `parameter: name=value`
//! lines), so a test can read back what reached the container. The events are
//! seeded pseudo-random bytes: the same arguments give the same file.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::{ArgError, SimError, SplitMix64, WrittenFile};

/// Usage of the KM3NeT mode.
pub const USAGE: &str = "usage: prodsys-toysim km3net --generator <str> --detector <str> --flavour <str> \
--energy <min:max GeV> --index <f64> --events <u64> --run <u64> --seed <u64> --output <dir> \
[--event-bytes <usize, default 32>] [--allocate-mb <usize>] [--fail]";

/// Bytes of one simulated event unless told otherwise.
pub const DEFAULT_EVENT_BYTES: usize = 32;

/// Arguments of the KM3NeT mode.
#[derive(Debug, Clone, PartialEq)]
pub struct Km3netArgs {
    pub generator: String,
    pub detector: String,
    pub flavour: String,
    pub energy_min_gev: f64,
    pub energy_max_gev: f64,
    pub spectral_index: f64,
    pub events: u64,
    pub run: u64,
    pub seed: u64,
    pub output: PathBuf,
    pub event_bytes: usize,
    /// Memory to hold (and touch) while simulating, to play a job that needs too much.
    pub allocate_mb: usize,
    pub fail: bool,
}

fn value(
    args: &mut impl Iterator<Item = OsString>,
    name: &'static str,
) -> Result<String, ArgError> {
    let v = args
        .next()
        .ok_or_else(|| ArgError::MissingValue(name.to_string()))?;
    v.into_string().map_err(|v| ArgError::Invalid {
        arg: name,
        value: v.to_string_lossy().into_owned(),
        reason: "is not UTF-8".into(),
    })
}

fn number<T: std::str::FromStr>(name: &'static str, text: &str) -> Result<T, ArgError> {
    text.parse().map_err(|_| ArgError::Invalid {
        arg: name,
        value: text.to_string(),
        reason: "is not a number".into(),
    })
}

/// Parses the arguments after `km3net`.
pub fn parse_args<I, S>(args: I) -> Result<Km3netArgs, ArgError>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let mut it = args.into_iter().map(Into::into);
    let mut seen = std::collections::HashSet::new();
    let mut parsed = Km3netArgs {
        generator: String::new(),
        detector: String::new(),
        flavour: String::new(),
        energy_min_gev: 0.0,
        energy_max_gev: 0.0,
        spectral_index: 0.0,
        events: 0,
        run: 0,
        seed: 0,
        output: PathBuf::new(),
        event_bytes: DEFAULT_EVENT_BYTES,
        allocate_mb: 0,
        fail: false,
    };
    while let Some(arg) = it.next() {
        let arg = arg.to_string_lossy().into_owned();
        if !seen.insert(arg.clone()) {
            return Err(ArgError::Duplicate(arg));
        }
        match arg.as_str() {
            "--generator" => parsed.generator = value(&mut it, "--generator")?,
            "--detector" => parsed.detector = value(&mut it, "--detector")?,
            "--flavour" => parsed.flavour = value(&mut it, "--flavour")?,
            "--energy" => {
                let text = value(&mut it, "--energy")?;
                let (min, max) = text.split_once(':').ok_or_else(|| ArgError::Invalid {
                    arg: "--energy",
                    value: text.clone(),
                    reason: "must be min:max".into(),
                })?;
                parsed.energy_min_gev = number("--energy", min)?;
                parsed.energy_max_gev = number("--energy", max)?;
            }
            "--index" => parsed.spectral_index = number("--index", &value(&mut it, "--index")?)?,
            "--events" => parsed.events = number("--events", &value(&mut it, "--events")?)?,
            "--run" => parsed.run = number("--run", &value(&mut it, "--run")?)?,
            "--seed" => parsed.seed = number("--seed", &value(&mut it, "--seed")?)?,
            "--output" => parsed.output = PathBuf::from(value(&mut it, "--output")?),
            "--event-bytes" => {
                parsed.event_bytes = number("--event-bytes", &value(&mut it, "--event-bytes")?)?
            }
            "--allocate-mb" => {
                parsed.allocate_mb = number("--allocate-mb", &value(&mut it, "--allocate-mb")?)?
            }
            "--fail" => parsed.fail = true,
            _ => return Err(ArgError::Unknown(arg)),
        }
    }
    for (name, given) in [
        ("--generator", !parsed.generator.is_empty()),
        ("--detector", !parsed.detector.is_empty()),
        ("--flavour", !parsed.flavour.is_empty()),
        ("--energy", seen.contains("--energy")),
        ("--events", seen.contains("--events")),
        ("--run", seen.contains("--run")),
        ("--seed", seen.contains("--seed")),
        ("--output", !parsed.output.as_os_str().is_empty()),
    ] {
        if !given {
            return Err(ArgError::Missing(name));
        }
    }
    if parsed.events == 0 {
        return Err(ArgError::Invalid {
            arg: "--events",
            value: "0".into(),
            reason: "must be at least 1".into(),
        });
    }
    if parsed.event_bytes == 0 {
        return Err(ArgError::Invalid {
            arg: "--event-bytes",
            value: "0".into(),
            reason: "must be at least 1".into(),
        });
    }
    Ok(parsed)
}

/// `gSeaGen_ORCA10_nu_mu_run000042.evt`.
pub fn output_file_name(args: &Km3netArgs) -> String {
    format!(
        "{}_{}_{}_run{:06}.evt",
        args.generator, args.detector, args.flavour, args.run
    )
}

/// The header: what was simulated and with which template and parameters
/// (`environment` is the process's, as `(name, value)` pairs).
pub fn header(args: &Km3netArgs, environment: &[(String, String)]) -> String {
    let mut lines = vec![
        "km3net-toysim-event-file: 1".to_string(),
        format!("start_run: {}", args.run),
        format!("generator: {}", args.generator),
        format!("detector: {}", args.detector),
        format!("flavour: {}", args.flavour),
        format!(
            "energy_range_gev: {} {}",
            args.energy_min_gev, args.energy_max_gev
        ),
        format!("spectral_index: {}", args.spectral_index),
        format!("n_events: {}", args.events),
        format!("seed: {}", args.seed),
    ];
    let get = |name: &str| {
        environment
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    lines.push(format!("template: {}", get("PRODSYS_TEMPLATE")));
    lines.push(format!(
        "template_version: {}",
        get("PRODSYS_TEMPLATE_VERSION")
    ));
    lines.push(format!("image: {}", get("PRODSYS_IMAGE")));
    let mut parameters: Vec<(String, &str)> = environment
        .iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix("PRODSYS_PARAM_")?;
            Some((name.to_ascii_lowercase(), v.as_str()))
        })
        .collect();
    parameters.sort();
    for (name, value) in parameters {
        lines.push(format!("parameter: {name}={value}"));
    }
    lines.push("end_header:".to_string());
    lines.join("\n") + "\n"
}

/// Writes the run's event file into `args.output` (as `.part`, renamed when
/// complete) and returns it.
pub fn simulate(
    args: &Km3netArgs,
    environment: &[(String, String)],
    progress: &mut dyn Write,
) -> Result<Vec<WrittenFile>, SimError> {
    let mut held = Vec::new();
    if args.allocate_mb > 0 {
        // Touch every page, so the memory is really used.
        held = vec![1u8; args.allocate_mb * 1024 * 1024];
        let _ = writeln!(progress, "holding {} MiB", held.len() / (1024 * 1024));
    }
    if args.fail {
        return Err(SimError::SimulatedFailure);
    }
    fs::create_dir_all(&args.output).map_err(|source| SimError::Io {
        path: args.output.clone(),
        source,
    })?;
    let name = output_file_name(args);
    let path = args.output.join(&name);
    let part = args.output.join(format!("{name}.part"));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SimError::Io { path, source }
    };
    let file = File::create(&part).map_err(io(&part))?;
    let mut out = BufWriter::new(file);
    out.write_all(header(args, environment).as_bytes())
        .map_err(io(&part))?;
    let mut rng = SplitMix64::new(args.seed ^ args.run.rotate_left(32));
    let mut event = vec![0u8; args.event_bytes];
    for _ in 0..args.events {
        rng.fill_bytes(&mut event);
        out.write_all(&event).map_err(io(&part))?;
    }
    out.flush().map_err(io(&part))?;
    drop(out);
    fs::rename(&part, &path).map_err(io(&path))?;
    let size = fs::metadata(&path).map_err(io(&path))?.len();
    let _ = writeln!(progress, "wrote {} ({size} bytes)", path.display());
    drop(held);
    Ok(vec![WrittenFile { path, nsb: 0, size }])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path) -> Km3netArgs {
        parse_args([
            "--generator",
            "gSeaGen",
            "--detector",
            "ORCA10",
            "--flavour",
            "nu_mu",
            "--energy",
            "1:10000",
            "--index",
            "-2",
            "--events",
            "100",
            "--run",
            "7",
            "--seed",
            "42",
            "--output",
            dir.to_str().unwrap(),
        ])
        .unwrap()
    }

    #[test]
    fn the_file_names_what_was_simulated_and_the_template_parameters() {
        let dir = std::env::temp_dir().join(format!("toysim-km3net-{}", std::process::id()));
        let a = args(&dir);
        let env = vec![
            ("PRODSYS_TEMPLATE".to_string(), "t-derived".to_string()),
            ("PRODSYS_PARAM_SEAWATER_MODEL".to_string(), "v2".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let files = simulate(&a, &env, &mut Vec::new()).unwrap();
        assert_eq!(files.len(), 1);
        let bytes = fs::read(&files[0].path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for line in [
            "start_run: 7\n",
            "generator: gSeaGen\n",
            "detector: ORCA10\n",
            "flavour: nu_mu\n",
            "template: t-derived\n",
            "parameter: seawater_model=v2\n",
        ] {
            assert!(text.contains(line), "{line:?} missing");
        }
        assert!(!text.contains("HOME"));
        let header_len = header(&a, &env).len();
        assert_eq!(bytes.len(), header_len + 100 * DEFAULT_EVENT_BYTES);
        // Seeded: the same run again gives the same bytes.
        let again = simulate(&a, &env, &mut Vec::new()).unwrap();
        assert_eq!(fs::read(&again[0].path).unwrap(), bytes);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_arguments_are_named() {
        assert_eq!(
            parse_args(["--generator", "g"]).unwrap_err(),
            ArgError::Missing("--detector")
        );
        assert!(matches!(
            parse_args(["--energy", "5"]).unwrap_err(),
            ArgError::Invalid {
                arg: "--energy",
                ..
            }
        ));
    }
}
