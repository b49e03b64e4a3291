//! `prodsys-toysim irf`: a stand-in for the last step of a CTA IRF chain,
//! which merges every DL1 file of a production into instrument response
//! functions. It reads each input (a `.dl1` file `prodsys-toysim dl1`
//! wrote) and writes one `<name>.irf` file: a line per input with its name,
//! size, adler32 and events, then totals over all of them, so the IRF
//! file shows which DL1 files, with which content, it was made of.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use crate::dl1::adler32;
use crate::{ArgError, SimError};

pub const USAGE: &str =
    "usage: prodsys-toysim irf --output-dir DIR --name NAME [--input-list FILE] [INPUT...]";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub output_dir: PathBuf,
    pub name: String,
    pub inputs: Vec<PathBuf>,
}

pub fn parse_args<I, S>(args: I) -> Result<Args, ArgError>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let mut output_dir = None;
    let mut name = None;
    let mut inputs = Vec::new();
    let mut args = args.into_iter().map(Into::into);
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy().into_owned();
        let mut value = |flag: &str| {
            args.next()
                .ok_or_else(|| ArgError::MissingValue(flag.to_string()))
        };
        match text.as_str() {
            "--output-dir" => output_dir = Some(PathBuf::from(value("--output-dir")?)),
            "--name" => {
                let v = value("--name")?.to_string_lossy().into_owned();
                if v.is_empty() || v.contains('/') {
                    return Err(ArgError::Invalid {
                        arg: "--name",
                        value: v,
                        reason: "must be a plain file name".into(),
                    });
                }
                name = Some(v);
            }
            "--input-list" => {
                let list = PathBuf::from(value("--input-list")?);
                let listed = std::fs::read_to_string(&list).map_err(|e| ArgError::Invalid {
                    arg: "--input-list",
                    value: list.display().to_string(),
                    reason: format!("cannot be read: {e}"),
                })?;
                inputs.extend(
                    listed
                        .lines()
                        .filter(|l| !l.trim().is_empty())
                        .map(PathBuf::from),
                );
            }
            flag if flag.starts_with("--") => return Err(ArgError::Unknown(flag.to_string())),
            _ => inputs.push(PathBuf::from(arg)),
        }
    }
    inputs.sort();
    inputs.dedup();
    if inputs.is_empty() {
        return Err(ArgError::Missing("an input file"));
    }
    Ok(Args {
        output_dir: output_dir.ok_or(ArgError::Missing("--output-dir"))?,
        name: name.ok_or(ArgError::Missing("--name"))?,
        inputs,
    })
}

/// The IRF content made of the DL1 inputs (name, bytes), in name order.
pub fn irf_content(inputs: &[(String, Vec<u8>)]) -> String {
    let mut text = String::from("# prodsys-toysim irf\n");
    let (mut events, mut intensity) = (0u64, 0u64);
    let mut sorted: Vec<&(String, Vec<u8>)> = inputs.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, bytes) in sorted {
        let body = String::from_utf8_lossy(bytes);
        let mut own = 0u64;
        for line in body.lines().filter(|l| l.starts_with("event ")) {
            own += 1;
            intensity += line
                .split_whitespace()
                .skip_while(|w| *w != "intensity")
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
        events += own;
        text.push_str(&format!(
            "dl1 {name} size {} adler32 {} events {own}\n",
            bytes.len(),
            adler32(bytes)
        ));
    }
    text.push_str(&format!(
        "files {}\nevents {events}\nintensity {intensity}\n",
        inputs.len()
    ));
    text
}

/// Writes `<name>.irf` into the output directory; its path.
pub fn merge(args: &Args, progress: &mut dyn Write) -> Result<PathBuf, SimError> {
    let io = |path: &PathBuf| {
        let path = path.clone();
        move |source| SimError::Io { path, source }
    };
    std::fs::create_dir_all(&args.output_dir).map_err(io(&args.output_dir))?;
    let mut inputs = Vec::with_capacity(args.inputs.len());
    for input in &args.inputs {
        let bytes = std::fs::read(input).map_err(io(input))?;
        let name = input
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        inputs.push((name, bytes));
    }
    let path = args.output_dir.join(format!("{}.irf", args.name));
    std::fs::write(&path, irf_content(&inputs)).map_err(io(&path))?;
    let _ = writeln!(
        progress,
        "irf: {} DL1 files -> {}",
        inputs.len(),
        path.display()
    );
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_irf_lists_every_input_with_its_checksum_and_sums_their_events() {
        let a = crate::dl1::dl1_content("a.simtel", &[1, 2, 3], "tailcuts");
        let b = crate::dl1::dl1_content("b.simtel", &vec![7u8; 5000], "tailcuts");
        let text = irf_content(&[
            ("b.dl1".into(), b.clone().into_bytes()),
            ("a.dl1".into(), a.clone().into_bytes()),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("dl1 a.dl1 "), "{text}");
        assert!(lines[1].ends_with("events 1"), "{text}");
        assert!(
            lines[2].contains(&format!("adler32 {}", adler32(b.as_bytes()))),
            "{text}"
        );
        assert!(text.contains("files 2\nevents 3\n"), "{text}");
        assert!(
            text.contains(&format!("intensity {}\n", 6 + 7 * 5000)),
            "{text}"
        );
    }

    #[test]
    fn a_name_and_an_input_are_required() {
        assert!(parse_args(["--output-dir", "/o", "/a.dl1"]).is_err());
        assert!(parse_args(["--output-dir", "/o", "--name", "x"]).is_err());
        assert!(parse_args(["--output-dir", "/o", "--name", "a/b", "/a.dl1"]).is_err());
        let ok = parse_args(["--output-dir", "/o", "--name", "x", "/b", "/a", "/a"]).unwrap();
        assert_eq!(ok.inputs, [PathBuf::from("/a"), PathBuf::from("/b")]);
    }
}
