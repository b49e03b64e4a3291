//! The kinds of forwarding destination: how a file is put on one and how
//! the checksum of what landed is read back. Each kind is a variant; a new
//! kind (a Rucio registration step, say) is another variant and its arm in
//! each method.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use prodsys_config::DestinationSettings;
use tokio::process::Command;

/// Why a copy did not verify.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The destination (or its tools) could not be used: retried.
    #[error("{0}")]
    Unavailable(String),
    /// The copy landed but its adler32 differs from the catalog's: the bad
    /// copy is removed and the file is copied again.
    #[error("adler32 on the destination is {found}, the catalog has {expected}")]
    Mismatch { found: String, expected: String },
    /// The source cannot be read (gone, or a URL this kind cannot copy from).
    #[error("{0}")]
    Source(String),
}

/// One configured destination.
#[derive(Debug, Clone)]
pub enum Destination {
    Posix(Posix),
    Xroot(Xroot),
}

#[derive(Debug, Clone)]
pub struct Posix {
    root: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Xroot {
    /// `root://host:port`
    server: String,
    /// The base path on the server (`/data`), without a trailing slash.
    base: String,
    xrdcp: String,
    xrdfs: String,
    timeout: Duration,
}

impl Destination {
    pub fn from_settings(
        name: &str,
        settings: &DestinationSettings,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        match settings {
            DestinationSettings::Posix { path } => {
                if !path.is_absolute() {
                    anyhow::bail!(
                        "forwarding.destinations.{name}.path: {} is not an absolute path",
                        path.display()
                    );
                }
                Ok(Self::Posix(Posix { root: path.clone() }))
            }
            DestinationSettings::Xroot { url, xrdcp, xrdfs } => {
                let (server, base) = split_root_url(url).map_err(|reason| {
                    anyhow::anyhow!("forwarding.destinations.{name}.url: {reason}")
                })?;
                Ok(Self::Xroot(Xroot {
                    server,
                    base,
                    xrdcp: xrdcp.clone(),
                    xrdfs: xrdfs.clone(),
                    timeout,
                }))
            }
            DestinationSettings::Rucio(_) => anyhow::bail!(
                "forwarding.destinations.{name}: a rucio destination registers copies; it is not copied to"
            ),
        }
    }

    /// Where `lfn` is (or goes) on this destination.
    pub fn url_of(&self, lfn: &str) -> String {
        match self {
            Self::Posix(p) => format!("file://{}", p.path_of(lfn).display()),
            Self::Xroot(x) => format!("{}/{}", x.server, x.path_of(lfn)),
        }
    }

    /// The adler32 of `lfn` on this destination, or None when it is not there.
    pub async fn checksum(&self, lfn: &str) -> Result<Option<String>, CopyError> {
        match self {
            Self::Posix(p) => p.checksum(lfn).await,
            Self::Xroot(x) => x.checksum(lfn).await,
        }
    }

    /// Copies `source_url` to `lfn` here and verifies that what landed has
    /// `adler32`; a copy that does not is removed again.
    pub async fn put(&self, source_url: &str, lfn: &str, adler32: &str) -> Result<(), CopyError> {
        let source = local_path(source_url);
        match self {
            Self::Posix(p) => {
                let source = source.ok_or_else(|| {
                    CopyError::Source(format!(
                        "a posix destination copies local files; the source is {source_url}"
                    ))
                })?;
                p.put(&source, lfn).await?;
            }
            Self::Xroot(x) => {
                // xrdcp reads local paths and root:// URLs alike.
                let source = source
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| source_url.to_string());
                x.put(&source, lfn).await?;
            }
        }
        match self.checksum(lfn).await? {
            Some(found) if found == adler32 => Ok(()),
            found => {
                let found = found.unwrap_or_else(|| "missing".into());
                if let Err(error) = self.remove(lfn).await {
                    tracing::warn!(lfn, %error, "removing a bad copy failed");
                }
                Err(CopyError::Mismatch {
                    found,
                    expected: adler32.to_string(),
                })
            }
        }
    }

    /// Removes `lfn` from this destination (a bad copy).
    pub async fn remove(&self, lfn: &str) -> Result<(), CopyError> {
        match self {
            Self::Posix(p) => match tokio::fs::remove_file(p.path_of(lfn)).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(CopyError::Unavailable(format!("removing: {e}"))),
            },
            Self::Xroot(x) => x
                .run(&x.xrdfs, &[&x.server, "rm", &x.path_of(lfn)])
                .await
                .map(|_| ()),
        }
    }
}

/// The local path of a `file://` URL (or a plain absolute path).
pub fn local_path(url: &str) -> Option<PathBuf> {
    if let Some(path) = url.strip_prefix("file://") {
        return Some(PathBuf::from(path));
    }
    url.starts_with('/').then(|| PathBuf::from(url))
}

/// `root://host:port//base` → (`root://host:port`, `/base`).
pub fn split_root_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("root://")
        .or_else(|| url.strip_prefix("xroot://"))
        .ok_or_else(|| format!("{url:?} is not a root:// URL"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return Err(format!("{url:?} names no host"));
    }
    let scheme = &url[..url.len() - rest.len()];
    let base = format!("/{}", path.trim_matches('/'));
    let base = if base == "/" { String::new() } else { base };
    Ok((format!("{scheme}{host}"), base))
}

impl Posix {
    fn path_of(&self, lfn: &str) -> PathBuf {
        self.root.join(lfn.trim_start_matches('/'))
    }

    async fn checksum(&self, lfn: &str) -> Result<Option<String>, CopyError> {
        let path = self.path_of(lfn);
        tokio::task::spawn_blocking(move || match std::fs::File::open(&path) {
            Ok(file) => prodsys_core::checksum::adler32_hex(std::io::BufReader::new(file))
                .map(|(_, sum)| Some(sum))
                .map_err(|e| CopyError::Unavailable(format!("reading {}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CopyError::Unavailable(format!(
                "opening {}: {e}",
                path.display()
            ))),
        })
        .await
        .map_err(|e| CopyError::Unavailable(e.to_string()))?
    }

    /// Copies into a temporary name beside the target, fsyncs it, renames it
    /// into place and fsyncs the directory: a crash leaves the old file or
    /// the whole new one, never half of it under the LFN.
    async fn put(&self, source: &Path, lfn: &str) -> Result<(), CopyError> {
        let target = self.path_of(lfn);
        let source = source.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let dir = target
                .parent()
                .ok_or_else(|| CopyError::Unavailable("an LFN with no directory".into()))?;
            std::fs::create_dir_all(dir)
                .map_err(|e| CopyError::Unavailable(format!("creating {}: {e}", dir.display())))?;
            let mut input = std::fs::File::open(&source).map_err(|e| {
                CopyError::Source(format!("opening the source {}: {e}", source.display()))
            })?;
            let temporary = dir.join(format!(
                ".{}.{}.part",
                target
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default(),
                uuid::Uuid::now_v7()
            ));
            let mut copy = || -> std::io::Result<()> {
                let mut output = std::fs::File::create(&temporary)?;
                std::io::copy(&mut input, &mut output)?;
                output.sync_all()?;
                std::fs::rename(&temporary, &target)?;
                std::fs::File::open(dir)?.sync_all()
            };
            copy().map_err(|e| {
                let _ = std::fs::remove_file(&temporary);
                CopyError::Unavailable(format!("copying to {}: {e}", target.display()))
            })
        })
        .await
        .map_err(|e| CopyError::Unavailable(e.to_string()))?
    }
}

impl Xroot {
    fn path_of(&self, lfn: &str) -> String {
        format!("{}/{}", self.base, lfn.trim_start_matches('/'))
    }

    async fn put(&self, source: &str, lfn: &str) -> Result<(), CopyError> {
        let target = format!("{}/{}", self.server, self.path_of(lfn));
        // --force: a bad or partial copy of an earlier try is overwritten;
        // --posc: the storage deletes a file whose copy did not complete.
        self.run(
            &self.xrdcp,
            &["--force", "--posc", "--nopbar", source, &target],
        )
        .await
        .map(|_| ())
    }

    async fn checksum(&self, lfn: &str) -> Result<Option<String>, CopyError> {
        let path = self.path_of(lfn);
        match self
            .run(&self.xrdfs, &[&self.server, "query", "checksum", &path])
            .await
        {
            // "adler32 3e4aa739"
            Ok(out) => {
                let mut words = out.split_whitespace();
                match (words.next(), words.next()) {
                    (Some("adler32"), Some(sum)) => Ok(Some(format!(
                        "{:0>8}",
                        sum.trim_start_matches("0x").to_ascii_lowercase()
                    ))),
                    _ => Err(CopyError::Unavailable(format!(
                        "xrdfs query checksum answered {out:?}"
                    ))),
                }
            }
            Err(CopyError::Unavailable(reason))
                if reason.contains("No such file") || reason.contains("[3011]") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Runs an XRootD client command with the time limit; its stdout, or
    /// the reason it failed (its stderr).
    async fn run(&self, program: &str, args: &[&str]) -> Result<String, CopyError> {
        let mut command = Command::new(program);
        // The forwarder retries with its own backoff: the client tries to
        // connect once and gives up within seconds (its defaults keep trying
        // for minutes), unless the deployment's environment says otherwise.
        for (key, value) in [("XRD_CONNECTIONRETRY", "1"), ("XRD_CONNECTIONWINDOW", "10")] {
            if std::env::var_os(key).is_none() {
                command.env(key, value);
            }
        }
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let output = tokio::time::timeout(self.timeout, command.output())
            .await
            .map_err(|_| {
                CopyError::Unavailable(format!(
                    "{program} did not finish within {} s",
                    self.timeout.as_secs()
                ))
            })?
            .map_err(|e| CopyError::Unavailable(format!("running {program}: {e}")))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let reason = stderr
                .lines()
                .map(str::trim)
                .rfind(|l| !l.is_empty())
                .unwrap_or("no message");
            Err(CopyError::Unavailable(format!(
                "{program} {}: {reason}",
                output.status
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_urls_split_into_server_and_base() {
        assert_eq!(
            split_root_url("root://127.0.0.1:1094//data/cta").unwrap(),
            ("root://127.0.0.1:1094".into(), "/data/cta".into())
        );
        assert_eq!(
            split_root_url("root://eos.example.org:1094//").unwrap(),
            ("root://eos.example.org:1094".into(), String::new())
        );
        assert_eq!(
            split_root_url("root://h:1/").unwrap(),
            ("root://h:1".into(), String::new())
        );
        assert!(split_root_url("https://x/y").is_err());
        assert!(split_root_url("root:///x").is_err());
    }

    #[test]
    fn urls_of_lfns_on_each_kind() {
        let x = Destination::from_settings(
            "x",
            &DestinationSettings::Xroot {
                url: "root://127.0.0.1:1094//store".into(),
                xrdcp: "xrdcp".into(),
                xrdfs: "xrdfs".into(),
            },
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(
            x.url_of("/vo/MC/a.dat"),
            "root://127.0.0.1:1094//store/vo/MC/a.dat"
        );
        let p = Destination::from_settings(
            "p",
            &DestinationSettings::Posix {
                path: "/mnt/tmp".into(),
            },
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(p.url_of("/vo/a.dat"), "file:///mnt/tmp/vo/a.dat");
        assert!(
            Destination::from_settings(
                "rel",
                &DestinationSettings::Posix {
                    path: "relative".into()
                },
                Duration::from_secs(1)
            )
            .unwrap_err()
            .to_string()
            .contains("forwarding.destinations.rel.path")
        );
    }

    #[tokio::test]
    async fn a_posix_copy_lands_whole_and_verifies() {
        let dir = std::env::temp_dir().join(format!("prodsys-posix-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let source = dir.join("source.dat");
        std::fs::write(&source, b"Wikipedia").unwrap();
        let p = Destination::Posix(Posix {
            root: dir.join("store"),
        });
        assert_eq!(p.checksum("/vo/a.dat").await.unwrap(), None);
        let url = format!("file://{}", source.display());
        p.put(&url, "/vo/a.dat", "11e60398").await.unwrap();
        assert_eq!(
            std::fs::read(dir.join("store/vo/a.dat")).unwrap(),
            b"Wikipedia"
        );
        assert_eq!(
            p.checksum("/vo/a.dat").await.unwrap().as_deref(),
            Some("11e60398")
        );
        // The catalog's checksum disagrees with the bytes: refused, removed.
        let err = p.put(&url, "/vo/b.dat", "00000001").await.unwrap_err();
        assert!(matches!(err, CopyError::Mismatch { .. }), "{err}");
        assert!(!dir.join("store/vo/b.dat").exists());
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.join("store/vo"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["a.dat"]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
