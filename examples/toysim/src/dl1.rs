//! `prodsys-toysim dl1`: a stand-in for the DL0 → DL1 step of a CTA
//! processing chain (calibration, image cleaning, Hillas parameters). It
//! reads each input file (a `.simtel` the simulation step wrote) and writes
//! one `.dl1` file per input whose content is derived from the input's
//! bytes: a header naming the input with its size and adler32 (the checksum
//! the catalog holds for it), then one "image parameters" line per 4 KiB
//! block of the input. Anyone holding both files can check that the DL1 file
//! was made from that very input.
//!
//! The inputs come from `--input-list FILE` (one path a line), from the
//! arguments after the options, or both; given both, they must name the
//! same files (the chained job gets its inputs both ways).
//!
//! `prodsys-toysim reco` is the same processing for KM3NeT's reconstruction
//! of simulated events (`--algorithm jmuon|jshower`, `.reco` files).

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{ArgError, SimError};

pub const USAGE: &str = "usage: prodsys-toysim dl1 --output-dir DIR [--cleaning tailcuts|mars] [--input-list FILE] [INPUT...]
       prodsys-toysim reco --output-dir DIR [--algorithm jmuon|jshower] [--input-list FILE] [INPUT...]";

/// Which step: CTA DL1 processing or KM3NeT reconstruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Dl1,
    Reco,
}

impl Step {
    /// The step's name: in the header and as the output's extension.
    pub fn name(self) -> &'static str {
        match self {
            Step::Dl1 => "dl1",
            Step::Reco => "reco",
        }
    }

    /// The option choosing the method, its values and its default.
    fn method(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Step::Dl1 => ("--cleaning", &["tailcuts", "mars"]),
            Step::Reco => ("--algorithm", &["jmuon", "jshower"]),
        }
    }
}

/// Bytes of input summarised per output line.
const BLOCK: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub step: Step,
    pub output_dir: PathBuf,
    /// The image cleaning (DL1) or reconstruction algorithm.
    pub cleaning: String,
    pub inputs: Vec<PathBuf>,
}

pub fn parse_args<I, S>(args: I) -> Result<Args, ArgError>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    parse_step_args(Step::Dl1, args)
}

pub fn parse_step_args<I, S>(step: Step, args: I) -> Result<Args, ArgError>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let (method_flag, methods) = step.method();
    let mut output_dir = None;
    let mut cleaning = methods[0].to_string();
    let mut list = None;
    let mut positional = Vec::new();
    let mut args = args.into_iter().map(Into::into);
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy().into_owned();
        let mut value = |name: &'static str| {
            args.next()
                .ok_or_else(|| ArgError::MissingValue(name.to_string()))
                .map(PathBuf::from)
        };
        match text.as_str() {
            "--output-dir" => output_dir = Some(value("--output-dir")?),
            "--input-list" => list = Some(value("--input-list")?),
            flag if flag == method_flag => {
                let v = value(method_flag)?.to_string_lossy().into_owned();
                if !methods.contains(&v.as_str()) {
                    return Err(ArgError::Invalid {
                        arg: method_flag,
                        value: v,
                        reason: format!("must be one of {}", methods.join(", ")),
                    });
                }
                cleaning = v;
            }
            flag if flag.starts_with("--") => return Err(ArgError::Unknown(flag.to_string())),
            _ => positional.push(PathBuf::from(arg)),
        }
    }
    let output_dir = output_dir.ok_or(ArgError::Missing("--output-dir"))?;
    let inputs = match list {
        Some(list) => {
            let text = std::fs::read_to_string(&list).map_err(|e| ArgError::Invalid {
                arg: "--input-list",
                value: list.display().to_string(),
                reason: format!("cannot be read: {e}"),
            })?;
            let listed: Vec<PathBuf> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(PathBuf::from)
                .collect();
            if !positional.is_empty() && positional != listed {
                return Err(ArgError::Invalid {
                    arg: "--input-list",
                    value: list.display().to_string(),
                    reason: "names other files than the arguments".into(),
                });
            }
            listed
        }
        None => positional,
    };
    if inputs.is_empty() {
        return Err(ArgError::Missing("an input file"));
    }
    Ok(Args {
        step,
        output_dir,
        cleaning,
        inputs,
    })
}

/// adler32 of `bytes`, as 8 lowercase hex digits (as the catalog writes it).
pub fn adler32(bytes: &[u8]) -> String {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in bytes.chunks(5552) {
        for &byte in chunk {
            a += u32::from(byte);
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    format!("{:08x}", (b << 16) | a)
}

/// The DL1 file name of an input: its name with `.dl1` for its extension.
pub fn output_name(input: &Path) -> String {
    step_output_name(Step::Dl1, input)
}

/// The output file name of an input: its name with the step's extension.
pub fn step_output_name(step: Step, input: &Path) -> String {
    let stem = input
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "input".into());
    format!("{stem}.{}", step.name())
}

/// The DL1 content made of one input's bytes.
pub fn dl1_content(input_name: &str, bytes: &[u8], cleaning: &str) -> String {
    step_content(Step::Dl1, input_name, bytes, cleaning)
}

/// A step's content made of one input's bytes.
pub fn step_content(step: Step, input_name: &str, bytes: &[u8], method: &str) -> String {
    let label = match step {
        Step::Dl1 => "cleaning",
        Step::Reco => "algorithm",
    };
    let mut text = format!(
        "# prodsys-toysim {}\ninput {input_name}\nsize {}\nadler32 {}\n{label} {method}\n",
        step.name(),
        bytes.len(),
        adler32(bytes)
    );
    for (i, block) in bytes.chunks(BLOCK).enumerate() {
        // "Hillas parameters" of the block: its intensity (byte sum), and
        // its width and length (spread and maximum), all from its bytes.
        let intensity: u64 = block.iter().map(|&b| u64::from(b)).sum();
        let max = block.iter().copied().max().unwrap_or(0);
        let min = block.iter().copied().min().unwrap_or(0);
        text.push_str(&format!(
            "event {i} intensity {intensity} length {max} width {}\n",
            max - min
        ));
    }
    text
}

/// Writes one DL1 file per input into the output directory; their paths.
pub fn process(args: &Args, progress: &mut dyn Write) -> Result<Vec<PathBuf>, SimError> {
    std::fs::create_dir_all(&args.output_dir).map_err(|e| SimError::Io {
        path: args.output_dir.clone(),
        source: e,
    })?;
    let mut written = Vec::with_capacity(args.inputs.len());
    for input in &args.inputs {
        let bytes = std::fs::read(input).map_err(|e| SimError::Io {
            path: input.clone(),
            source: e,
        })?;
        let name = input
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = args.output_dir.join(step_output_name(args.step, input));
        let content = step_content(args.step, &name, &bytes, &args.cleaning);
        std::fs::write(&path, content).map_err(|e| SimError::Io {
            path: path.clone(),
            source: e,
        })?;
        let _ = writeln!(
            progress,
            "{}: {} -> {}",
            args.step.name(),
            input.display(),
            path.display()
        );
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adler32_matches_the_reference_values() {
        assert_eq!(adler32(b""), "00000001");
        assert_eq!(adler32(b"Wikipedia"), "11e60398");
        let big = vec![0xffu8; 100_000];
        // Computed the slow way: every byte folded in modulo 65521.
        let (mut a, mut b) = (1u64, 0u64);
        for &x in &big {
            a = (a + u64::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!(adler32(&big), format!("{:08x}", (b << 16) | a));
    }

    #[test]
    fn the_dl1_content_follows_the_input_bytes() {
        let one = dl1_content("a.simtel", &[1, 2, 3], "tailcuts");
        assert!(one.contains("adler32 000d0007"), "{one}");
        assert!(
            one.contains("event 0 intensity 6 length 3 width 2"),
            "{one}"
        );
        assert_ne!(one, dl1_content("a.simtel", &[1, 2, 4], "tailcuts"));
        assert_eq!(
            output_name(Path::new("/w/run1_nsb5.simtel")),
            "run1_nsb5.dl1"
        );
    }

    #[test]
    fn inputs_come_from_the_list_or_the_arguments_and_both_must_agree() {
        let dir = std::env::temp_dir().join(format!("toysim-dl1-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let list = dir.join("inputs.txt");
        std::fs::write(&list, "/a.simtel\n/b.simtel\n").unwrap();
        let l = list.to_str().unwrap();
        let parsed = parse_args(["--output-dir", "/o", "--input-list", l]).unwrap();
        assert_eq!(parsed.inputs.len(), 2);
        let both = [
            "--output-dir",
            "/o",
            "--input-list",
            l,
            "/a.simtel",
            "/b.simtel",
        ];
        assert!(parse_args(both).is_ok());
        let other = ["--output-dir", "/o", "--input-list", l, "/c.simtel"];
        assert!(parse_args(other).is_err());
        assert!(parse_args(["--output-dir", "/o"]).is_err());
        assert!(parse_args(["--output-dir", "/o", "--cleaning", "x", "/a"]).is_err());
        let reco = parse_step_args(
            Step::Reco,
            ["--output-dir", "/o", "--algorithm", "jshower", "/a.evt"],
        )
        .unwrap();
        assert_eq!((reco.step, reco.cleaning.as_str()), (Step::Reco, "jshower"));
        assert!(
            parse_step_args(
                Step::Reco,
                ["--output-dir", "/o", "--cleaning", "mars", "/a"]
            )
            .is_err()
        );
        assert_eq!(
            step_output_name(Step::Reco, Path::new("/w/run1.evt")),
            "run1.reco"
        );
        assert!(
            step_content(Step::Reco, "run1.evt", &[9], "jmuon")
                .starts_with("# prodsys-toysim reco\n")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
