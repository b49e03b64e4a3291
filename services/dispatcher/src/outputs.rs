//! Collecting an attempt's outputs: the files it left in its output
//! directory, each checksummed (adler32, as DIRAC and Rucio write it). Runs
//! on a blocking thread, outside any transaction.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// One output file, checksummed.
#[derive(Debug, Clone, PartialEq)]
pub struct Scanned {
    pub path: PathBuf,
    pub name: String,
    pub size: u64,
    pub adler32: String,
    /// Where it is: `file://` and its path, or its URL on the storage a
    /// remote job wrote it to (see `remote`).
    pub url: String,
}

/// Suffixes of files still being written: never collected.
const TEMPORARY_SUFFIXES: [&str; 2] = [".part", ".tmp"];

/// Why `dir` may not be read as an attempt's outputs, if it may not: it
/// must lie lexically under `root` (the work directory) with no `..`, and no
/// directory from `root` down to it may be a symbolic link (a job could
/// replace its output directory by a link to anywhere).
pub fn outside(root: &Path, dir: &Path) -> Option<String> {
    let Ok(relative) = dir.strip_prefix(root) else {
        return Some(format!(
            "output directory {} is not under the work directory {}",
            dir.display(),
            root.display()
        ));
    };
    let mut at = root.to_path_buf();
    for component in relative.components() {
        let std::path::Component::Normal(name) = component else {
            return Some(format!(
                "output directory {} leaves the work directory",
                dir.display()
            ));
        };
        at.push(name);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Some(format!(
                    "{} is a symbolic link; an attempt's directories must be real directories",
                    at.display()
                ));
            }
            _ => {}
        }
    }
    None
}

/// [`scan_outputs`] of `dir`, once [`outside`] finds it inside `root`.
pub fn scan_outputs_under(root: &Path, dir: &Path) -> anyhow::Result<Result<Vec<Scanned>, String>> {
    match outside(root, dir) {
        Some(reason) => Ok(Err(reason)),
        None => scan_outputs(dir),
    }
}

/// Every complete regular file directly under `dir`, sorted, with size and
/// adler32. `Ok(Err(reason))` when the attempt's outputs cannot be taken: a
/// symbolic link (it could point anywhere) or a name that is not UTF-8 (no
/// LFN can hold it). Files with a temporary suffix are left out.
pub fn scan_outputs(dir: &Path) -> anyhow::Result<Result<Vec<Scanned>, String>> {
    let mut found = Vec::new();
    if !dir.is_dir() {
        return Ok(Ok(Vec::new()));
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            return Ok(Err(format!(
                "output file name is not UTF-8: {}",
                path.display()
            )));
        };
        if kind.is_symlink() {
            return Ok(Err(format!(
                "output {name} is a symbolic link; outputs must be regular files"
            )));
        }
        if !kind.is_file() || TEMPORARY_SUFFIXES.iter().any(|s| name.ends_with(s)) {
            continue;
        }
        found.push((path, name));
    }
    found.sort();
    let mut files = Vec::with_capacity(found.len());
    for (path, name) in found {
        let file =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let (size, adler32) = prodsys_core::checksum::adler32_hex(std::io::BufReader::new(file))?;
        files.push(Scanned {
            url: format!("file://{}", path.display()),
            path,
            name,
            size,
            adler32,
        });
    }
    Ok(Ok(files))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_read_only_inside_the_work_directory_and_through_no_link() {
        let root = std::env::temp_dir().join(format!("prodsys-work-{}", uuid::Uuid::new_v4()));
        let attempt = root.join("CTA-000001/000000.a1");
        std::fs::create_dir_all(attempt.join("output")).unwrap();
        std::fs::write(attempt.join("output/a.simtel"), "a").unwrap();
        assert_eq!(outside(&root, &attempt.join("output")), None);
        assert_eq!(
            scan_outputs_under(&root, &attempt.join("output"))
                .unwrap()
                .unwrap()
                .len(),
            1
        );
        assert!(outside(&root, Path::new("/etc")).is_some());
        assert!(outside(&root, &root.join("CTA-000001/../../etc")).is_some());
        // The job replaced its output directory by a link to elsewhere.
        let elsewhere = root.join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("secret"), "s").unwrap();
        std::fs::remove_dir_all(attempt.join("output")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, attempt.join("output")).unwrap();
        let reason = scan_outputs_under(&root, &attempt.join("output"))
            .unwrap()
            .unwrap_err();
        assert!(reason.contains("symbolic link"), "{reason}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn only_complete_regular_files_with_utf8_names_are_collected() {
        use std::os::unix::ffi::OsStrExt;
        let dir = std::env::temp_dir().join(format!("prodsys-outputs-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("b.simtel"), "bb").unwrap();
        std::fs::write(dir.join("a.simtel"), "a").unwrap();
        std::fs::write(dir.join("c.simtel.part"), "still writing").unwrap();
        std::fs::write(dir.join("d.tmp"), "scratch").unwrap();
        let files = scan_outputs(&dir).unwrap().unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a.simtel", "b.simtel"]);
        assert_eq!(files[1].size, 2);
        assert_eq!(files[0].adler32, "00620062");

        std::os::unix::fs::symlink("/etc/passwd", dir.join("e.simtel")).unwrap();
        let refused = scan_outputs(&dir).unwrap().unwrap_err();
        assert!(
            refused.contains("e.simtel") && refused.contains("symbolic link"),
            "{refused}"
        );
        std::fs::remove_file(dir.join("e.simtel")).unwrap();

        let odd = std::ffi::OsStr::from_bytes(b"f\xff.simtel");
        std::fs::write(dir.join(odd), "x").unwrap();
        let refused = scan_outputs(&dir).unwrap().unwrap_err();
        assert!(refused.contains("not UTF-8"), "{refused}");
        std::fs::remove_dir_all(&dir).unwrap();

        // No output directory: no files, no error.
        assert_eq!(scan_outputs(&dir).unwrap().unwrap(), vec![]);
    }
}
