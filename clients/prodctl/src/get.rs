//! `prodctl get`: downloads a production's outputs from the best replica —
//! a local file first (where the job wrote it, or a posix destination's
//! copy), then an XRootD one (`xrdcp`) — checks each file's size and adler32
//! against the catalog, and resumes: a file already present and correct is
//! skipped. Each file lands under `--to` at its LFN, through a `.part` file
//! renamed into place only once it checks out.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Instant;

use anyhow::Context;
use prodsys_proto as pb;

/// Where a file can be read from, best first.
pub fn sources(file: &pb::OutputFile, replicas: &[pb::Replica]) -> Vec<String> {
    let verified = |r: &&pb::Replica| {
        matches!(
            r.state(),
            pb::ReplicaState::Verified | pb::ReplicaState::Registered
        ) && !r.url.is_empty()
    };
    let mut local: Vec<String> = Vec::new();
    let mut remote: Vec<String> = Vec::new();
    for url in std::iter::once(&file.url).chain(replicas.iter().filter(verified).map(|r| &r.url)) {
        if url.starts_with("file://") || url.starts_with('/') {
            local.push(url.clone());
        } else if url.starts_with("root://") || url.starts_with("xroot://") {
            remote.push(url.clone());
        }
    }
    local.extend(remote);
    local.dedup();
    local
}

fn local_path(url: &str) -> Option<PathBuf> {
    url.strip_prefix("file://")
        .map(PathBuf::from)
        .or_else(|| url.starts_with('/').then(|| PathBuf::from(url)))
}

/// The size and adler32 of `path`, or None when it is absent.
fn checksum_of(path: &Path) -> anyhow::Result<Option<(u64, String)>> {
    match std::fs::File::open(path) {
        Ok(file) => {
            let mut hash = adler32::RollingAdler32::new();
            let mut reader = std::io::BufReader::new(file);
            let mut buf = vec![0u8; 256 * 1024];
            let mut size = 0u64;
            loop {
                let n = std::io::Read::read(&mut reader, &mut buf)?;
                if n == 0 {
                    break;
                }
                size += n as u64;
                hash.update_buffer(&buf[..n]);
            }
            Ok(Some((size, format!("{:08x}", hash.hash()))))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn matches(found: &Option<(u64, String)>, file: &pb::OutputFile) -> bool {
    found
        .as_ref()
        .is_some_and(|(size, sum)| *size == file.size && *sum == file.adler32)
}

/// Copies `source` to `part`; the reason when it cannot.
async fn fetch(source: &str, part: &Path, xrdcp: &str) -> Result<(), String> {
    if let Some(path) = local_path(source) {
        let part = part.to_path_buf();
        return tokio::task::spawn_blocking(move || std::fs::copy(&path, &part).map(|_| ()))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("copying {source}: {e}"));
    }
    let output = tokio::process::Command::new(xrdcp)
        .args(["--force", "--nopbar", source])
        .arg(part)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("running {xrdcp}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format!(
            "{xrdcp} {source}: {}",
            stderr
                .lines()
                .map(str::trim)
                .rfind(|l| !l.is_empty())
                .unwrap_or("failed")
        ))
    }
}

/// What happened to one file.
pub enum Fetched {
    /// Already there with the catalog's size and adler32.
    Present,
    Downloaded {
        from: String,
    },
    Failed {
        reasons: Vec<String>,
    },
}

/// Downloads `file` under `to` unless it is already there and correct.
pub async fn get_file(
    file: &pb::OutputFile,
    replicas: &[pb::Replica],
    to: &Path,
    xrdcp: &str,
) -> anyhow::Result<Fetched> {
    let target = to.join(file.lfn.trim_start_matches('/'));
    let check = {
        let target = target.clone();
        tokio::task::spawn_blocking(move || checksum_of(&target)).await??
    };
    if matches(&check, file) {
        return Ok(Fetched::Present);
    }
    let dir = target.parent().context("an LFN with no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let part = PathBuf::from(format!("{}.part", target.display()));
    let mut reasons = Vec::new();
    for source in sources(file, replicas) {
        let _ = std::fs::remove_file(&part);
        if let Err(reason) = fetch(&source, &part, xrdcp).await {
            reasons.push(reason);
            continue;
        }
        let found = {
            let part = part.clone();
            tokio::task::spawn_blocking(move || checksum_of(&part)).await??
        };
        if matches(&found, file) {
            std::fs::rename(&part, &target)
                .with_context(|| format!("renaming into {}", target.display()))?;
            return Ok(Fetched::Downloaded { from: source });
        }
        let (size, sum) = found.unwrap_or((0, "missing".into()));
        reasons.push(format!(
            "{source}: got {size} bytes adler32 {sum}, the catalog has {} bytes adler32 {}",
            file.size, file.adler32
        ));
    }
    let _ = std::fs::remove_file(&part);
    if reasons.is_empty() {
        reasons.push("no replica that can be read from here".into());
    }
    Ok(Fetched::Failed { reasons })
}

/// Downloads every file of `query` into `to`, one progress line per file.
pub async fn run(
    catalog_url: &str,
    query: pb::FindFilesRequest,
    to: &Path,
    xrdcp: &str,
) -> anyhow::Result<ExitCode> {
    let mut catalog =
        pb::catalog_service_client::CatalogServiceClient::new(crate::connect(catalog_url).await?);
    let mut stream = catalog
        .stream_files(query)
        .await
        .map_err(crate::output::status)?
        .into_inner();
    let mut files = Vec::new();
    while let Some(page) = stream.message().await.map_err(crate::output::status)? {
        // Replicas come beside the files, in the same order.
        let mut replicas = page.replicas.into_iter().map(|r| r.replicas);
        for file in page.files {
            files.push((file, replicas.next().unwrap_or_default()));
        }
    }
    let total = files.len();
    let total_bytes: u64 = files.iter().map(|(f, _)| f.size).sum();
    let started = Instant::now();
    let (mut present, mut downloaded, mut failed, mut bytes) = (0, 0, 0, 0u64);
    for (i, (file, replicas)) in files.iter().enumerate() {
        let line = match get_file(file, replicas, to, xrdcp).await? {
            Fetched::Present => {
                present += 1;
                "present".to_string()
            }
            Fetched::Downloaded { from } => {
                downloaded += 1;
                bytes += file.size;
                format!("downloaded from {from}")
            }
            Fetched::Failed { reasons } => {
                failed += 1;
                format!("FAILED: {}", reasons.join("; "))
            }
        };
        println!(
            "[{}/{total}] {}  {} bytes  {line}",
            i + 1,
            file.lfn,
            file.size
        );
    }
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    eprintln!(
        "{total} file(s), {total_bytes} bytes: {downloaded} downloaded ({bytes} bytes, {:.1} MB/s), {present} already present, {failed} failed",
        bytes as f64 / 1e6 / secs
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(destination: &str, state: pb::ReplicaState, url: &str) -> pb::Replica {
        pb::Replica {
            destination: destination.into(),
            state: state as i32,
            url: url.into(),
            ..Default::default()
        }
    }

    #[test]
    fn local_files_come_before_remote_ones_and_only_verified_replicas_count() {
        let file = pb::OutputFile {
            lfn: "/vo/a.dat".into(),
            url: "file:///work/a.dat".into(),
            ..Default::default()
        };
        let replicas = [
            replica("xrd", pb::ReplicaState::Verified, "root://h:1//s/vo/a.dat"),
            replica("tmp", pb::ReplicaState::Verified, "file:///mnt/vo/a.dat"),
            replica("bad", pb::ReplicaState::Failed, "root://h:2//s/vo/a.dat"),
        ];
        assert_eq!(
            sources(&file, &replicas),
            [
                "file:///work/a.dat",
                "file:///mnt/vo/a.dat",
                "root://h:1//s/vo/a.dat"
            ]
        );
    }

    #[tokio::test]
    async fn a_file_is_fetched_checked_and_skipped_the_second_time() {
        let dir = std::env::temp_dir().join(format!("prodctl-get-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let source = dir.join("source.dat");
        std::fs::write(&source, b"Wikipedia").unwrap();
        let mut file = pb::OutputFile {
            lfn: "/vo/a.dat".into(),
            size: 9,
            adler32: "11e60398".into(),
            url: format!("file://{}", source.display()),
            ..Default::default()
        };
        let to = dir.join("out");
        assert!(matches!(
            get_file(&file, &[], &to, "xrdcp").await.unwrap(),
            Fetched::Downloaded { .. }
        ));
        assert_eq!(std::fs::read(to.join("vo/a.dat")).unwrap(), b"Wikipedia");
        assert!(matches!(
            get_file(&file, &[], &to, "xrdcp").await.unwrap(),
            Fetched::Present
        ));
        // A source whose bytes disagree with the catalog is refused.
        file.lfn = "/vo/b.dat".into();
        file.adler32 = "00000001".into();
        match get_file(&file, &[], &to, "xrdcp").await.unwrap() {
            Fetched::Failed { reasons } => assert!(reasons[0].contains("adler32"), "{reasons:?}"),
            _ => panic!("a corrupt source was accepted"),
        }
        assert!(!to.join("vo/b.dat").exists() && !to.join("vo/b.dat.part").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
