//! The kinds of forwarding destination: how a file is put on one and how
//! the checksum of what landed is read back. Each kind is a variant; a new
//! kind (a Rucio registration step, say) is another variant and its arm in
//! each method.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prodsys_config::DestinationSettings;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::Semaphore;

/// Transfers at once within one `xrdcp` of many files (`--parallel`), and
/// checksums asked of one `xroot` destination at once, unless its
/// `parallel` says otherwise: XRootD 5.5 with its defaults (`xrootd.chksum
/// max 4`) had clients asking 8 at once wait 30 s, again and again (10,000
/// small files: 4 at once 6.7 s, 8 at once 542 s).
pub const XRDCP_PARALLEL: usize = prodsys_config::DEFAULT_XROOT_PARALLEL;

/// One file of a batch copied to a destination at once ([`Destination::put_many`]).
#[derive(Debug, Clone, Copy)]
pub struct Transfer<'a> {
    pub source_url: &'a str,
    pub lfn: &'a str,
    pub adler32: &'a str,
    /// Whether an earlier try may have put it there already: asked first.
    pub retried: bool,
}

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
    /// The XRootD client that downloads a `root://` source.
    xrdcp: String,
    timeout: Duration,
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
    /// Transfers within one `xrdcp` (`--parallel`), and the permits below.
    parallel: usize,
    /// Checksums the storage is asked for at once (shared by the clones of
    /// this destination): a server computes a few at a time and tells a
    /// client beyond that to wait — 30 s on XRootD 5.5 with its defaults.
    checksums: Arc<Semaphore>,
    /// Directories this process made (or found) on the storage (shared by
    /// the clones of this destination): a batch makes only the others.
    made: Arc<Mutex<HashSet<String>>>,
}

impl Destination {
    pub fn from_settings(
        name: &str,
        settings: &DestinationSettings,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        match settings {
            DestinationSettings::Posix { path, xrdcp } => {
                if !path.is_absolute() {
                    anyhow::bail!(
                        "forwarding.destinations.{name}.path: {} is not an absolute path",
                        path.display()
                    );
                }
                Ok(Self::Posix(Posix {
                    root: path.clone(),
                    xrdcp: xrdcp.clone(),
                    timeout,
                }))
            }
            DestinationSettings::Xroot {
                url,
                xrdcp,
                xrdfs,
                parallel,
            } => {
                let (server, base) = split_root_url(url).map_err(|reason| {
                    anyhow::anyhow!("forwarding.destinations.{name}.url: {reason}")
                })?;
                if *parallel == 0 {
                    anyhow::bail!("forwarding.destinations.{name}.parallel: must be at least 1");
                }
                Ok(Self::Xroot(Xroot {
                    server,
                    base,
                    xrdcp: xrdcp.clone(),
                    xrdfs: xrdfs.clone(),
                    timeout,
                    parallel: *parallel,
                    checksums: Arc::new(Semaphore::new(*parallel)),
                    made: Arc::new(Mutex::new(HashSet::new())),
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
    /// `adler32`; a copy that does not is removed again. A posix destination
    /// copies a local file itself and downloads a `root://` one with `xrdcp`
    /// (a remote job's output, written to its production's first
    /// destination).
    pub async fn put(&self, source_url: &str, lfn: &str, adler32: &str) -> Result<(), CopyError> {
        let source = local_path(source_url);
        match self {
            Self::Posix(p) => match source {
                Some(source) => p.put(&source, lfn).await?,
                None if is_xroot_url(source_url) => p.download(source_url, lfn).await?,
                None => {
                    return Err(CopyError::Source(format!(
                        "a posix destination copies local files and root:// URLs; the source is {source_url}"
                    )));
                }
            },
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

    /// Whether copies to this destination are made many at once
    /// ([`Destination::put_many`]): an `xroot` destination's are, as each
    /// client command costs a process and a login.
    pub fn copies_in_batches(&self) -> bool {
        matches!(self, Self::Xroot(_))
    }

    /// [`Destination::put`] of many files, one result each in order: on an
    /// `xroot` destination the files of one directory go in one `xrdcp
    /// --parallel`, which asks the storage for each landed file's adler32
    /// (`--cksum adler32:print`), held against the catalog's; a file that
    /// did not verify so (or cannot be copied so) is copied alone with
    /// [`Destination::put`], which removes a bad copy. A retried file found
    /// there with the catalog's adler32 (asked in one `xrdfs` session) is
    /// not copied again. The target directories are made in one `xrdfs`
    /// session before the copies, each once in this process (a copy that
    /// fails has its directory made again). The batch goes without `--posc`: on the storage
    /// it made each small file's copy several times slower, and a copy
    /// cut short is never recorded (it has no matching adler32) and is
    /// overwritten when it is made again.
    pub async fn put_many(&self, copies: &[Transfer<'_>]) -> Vec<Result<(), CopyError>> {
        let mut results: Vec<Option<Result<(), CopyError>>> = copies.iter().map(|_| None).collect();
        if let Self::Xroot(x) = self
            && let Err(e) = x.put_many(copies, &mut results).await
        {
            let reason = e.to_string();
            for r in results.iter_mut().filter(|r| r.is_none()) {
                *r = Some(Err(CopyError::Unavailable(reason.clone())));
            }
        }
        let mut out = Vec::with_capacity(copies.len());
        for (copy, result) in copies.iter().zip(results) {
            out.push(match result {
                Some(r) => r,
                None => self.put(copy.source_url, copy.lfn, copy.adler32).await,
            });
        }
        out
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

/// Whether `url` names a file on XRootD (`root://`, `xroot://`, or their
/// TLS forms), which `xrdcp` reads.
pub fn is_xroot_url(url: &str) -> bool {
    ["root://", "xroot://", "roots://", "xroots://"]
        .iter()
        .any(|scheme| url.starts_with(scheme))
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
            let temporary = temporary_beside(&target)?;
            let mut input = std::fs::File::open(&source).map_err(|e| {
                CopyError::Source(format!("opening the source {}: {e}", source.display()))
            })?;
            let mut copy = || -> std::io::Result<()> {
                let mut output = std::fs::File::create(&temporary)?;
                std::io::copy(&mut input, &mut output)?;
                into_place(&temporary, &target)
            };
            copy().map_err(|e| {
                let _ = std::fs::remove_file(&temporary);
                CopyError::Unavailable(format!("copying to {}: {e}", target.display()))
            })
        })
        .await
        .map_err(|e| CopyError::Unavailable(e.to_string()))?
    }

    /// [`Posix::put`] of a file on XRootD (`source_url`): `xrdcp` downloads
    /// it into the temporary name beside the target (within the copy time
    /// limit), which is then fsynced and renamed into place like a local
    /// copy. A source that cannot be read (unreachable, gone) is a
    /// [`CopyError::Source`]; a target that cannot be written, the client
    /// that cannot be run or does not finish, [`CopyError::Unavailable`].
    async fn download(&self, source_url: &str, lfn: &str) -> Result<(), CopyError> {
        let target = self.path_of(lfn);
        let temporary = {
            let target = target.clone();
            tokio::task::spawn_blocking(move || temporary_beside(&target))
                .await
                .map_err(|e| CopyError::Unavailable(e.to_string()))??
        };
        let into = temporary.display().to_string();
        // --force: a temporary name is never there already, but xrdcp
        // refuses to write over any file without it.
        let downloaded = run_client(
            &self.xrdcp,
            &["--force", "--nopbar", source_url, &into],
            self.timeout,
        )
        .await
        .map_err(|e| match e {
            CopyError::Unavailable(reason) => match xrdcp_side(&reason) {
                Some(XrdcpSide::Source) => {
                    CopyError::Source(format!("reading the source {source_url}: {reason}"))
                }
                Some(XrdcpSide::Destination) => {
                    CopyError::Unavailable(format!("writing {into}: {reason}"))
                }
                None => {
                    CopyError::Unavailable(format!("downloading {source_url} to {into}: {reason}"))
                }
            },
            other => other,
        });
        let placed = match downloaded {
            Ok(_) => {
                let (temporary, target) = (temporary.clone(), target.clone());
                tokio::task::spawn_blocking(move || {
                    into_place(&temporary, &target).map_err(|e| {
                        CopyError::Unavailable(format!("copying to {}: {e}", target.display()))
                    })
                })
                .await
                .map_err(|e| CopyError::Unavailable(e.to_string()))
                .and_then(|placed| placed)
            }
            Err(e) => Err(e),
        };
        if placed.is_err() {
            let _ = tokio::fs::remove_file(&temporary).await;
        }
        placed
    }
}

/// A new temporary name beside `target` (a hidden `.part` file), its
/// directory made.
fn temporary_beside(target: &Path) -> Result<PathBuf, CopyError> {
    let dir = target
        .parent()
        .ok_or_else(|| CopyError::Unavailable("an LFN with no directory".into()))?;
    std::fs::create_dir_all(dir)
        .map_err(|e| CopyError::Unavailable(format!("creating {}: {e}", dir.display())))?;
    Ok(dir.join(format!(
        ".{}.{}.part",
        target
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        uuid::Uuid::now_v7()
    )))
}

/// Fsyncs the copy at `temporary`, renames it to `target` and fsyncs their
/// directory.
fn into_place(temporary: &Path, target: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(temporary)?
        .sync_all()?;
    std::fs::rename(temporary, target)?;
    let dir = target.parent().unwrap_or(Path::new("/"));
    std::fs::File::open(dir)?.sync_all()
}

/// Which end of a copy `xrdcp` blamed for failing: it ends its error with
/// `(source)` or `(destination)` (`[FATAL] Connection error:  (source)`,
/// `[ERROR] Local error: permission denied:  (destination)`).
#[derive(Debug, PartialEq, Eq)]
enum XrdcpSide {
    Source,
    Destination,
}

fn xrdcp_side(reason: &str) -> Option<XrdcpSide> {
    let reason = reason.trim_end();
    if reason.ends_with("(source)") {
        Some(XrdcpSide::Source)
    } else if reason.ends_with("(destination)") {
        Some(XrdcpSide::Destination)
    } else {
        None
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

    /// The files of `copies` copied and verified in batches (see
    /// [`Destination::put_many`]): `results` gets the outcome of each file
    /// settled here; those left `None` are copied alone. An error: the
    /// storage could not be asked at all (every unsettled file fails so).
    async fn put_many(
        &self,
        copies: &[Transfer<'_>],
        results: &mut [Option<Result<(), CopyError>>],
    ) -> Result<(), CopyError> {
        // Retried files already there and correct.
        let retried: Vec<usize> = (0..copies.len()).filter(|&i| copies[i].retried).collect();
        if !retried.is_empty() {
            let paths: Vec<String> = retried
                .iter()
                .map(|&i| self.path_of(copies[i].lfn))
                .collect();
            let sums = self.checksums(&paths).await?;
            for (&i, path) in retried.iter().zip(&paths) {
                if sums.get(path).is_some_and(|s| s == copies[i].adler32) {
                    results[i] = Some(Ok(()));
                }
            }
        }
        // By target directory, each file under its own name there (xrdcp
        // names a file in a directory target after its source).
        let mut by_dir: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
        for (i, copy) in copies.iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            let source = match local_path(copy.source_url) {
                Some(p) => p.display().to_string(),
                None if copy.source_url.starts_with("root://") => copy.source_url.to_string(),
                None => continue,
            };
            let path = self.path_of(copy.lfn);
            let (Some((dir, name)), Some((_, source_name))) =
                (path.rsplit_once('/'), source.rsplit_once('/'))
            else {
                continue;
            };
            if name != source_name
                || name.is_empty()
                || path.contains(char::is_whitespace)
                || source.contains(char::is_whitespace)
            {
                continue;
            }
            by_dir.entry(dir.to_string()).or_default().push((i, source));
        }
        if by_dir.is_empty() {
            return Ok(());
        }
        // The directories not made yet, in one session (a directory made
        // by an earlier batch is not asked for again).
        let new_dirs: Vec<&String> = {
            let made = self.made.lock().expect("directories lock");
            by_dir.keys().filter(|dir| !made.contains(*dir)).collect()
        };
        if !new_dirs.is_empty() {
            let began = Instant::now();
            let script: String = new_dirs
                .iter()
                .map(|dir| format!("mkdir -p {dir}\n"))
                .collect();
            self.session(&script).await?;
            self.made
                .lock()
                .expect("directories lock")
                .extend(new_dirs.iter().map(|dir| dir.to_string()));
            tracing::debug!(
                directories = new_dirs.len(),
                elapsed_ms = began.elapsed().as_millis() as u64,
                "xroot: directories made"
            );
        }
        let mut failure = None;
        let mut verified = 0;
        for (dir, files) in &by_dir {
            // Each file's adler32 as the storage computes it once the file
            // landed (`--cksum adler32:print` asks the server, file by file,
            // in the same process), held against the catalog's here.
            let parallel = self.parallel.to_string();
            let target = format!("{}/{dir}/", self.server);
            let mut args = vec![
                "--force",
                "--nopbar",
                "--parallel",
                &parallel,
                "--cksum",
                "adler32:print",
            ];
            args.extend(files.iter().map(|(_, source)| source.as_str()));
            args.push(&target);
            // The time limit of one copy for each round of parallel transfers.
            let rounds = files.len().div_ceil(self.parallel) as u32;
            let permits = files.len().min(self.parallel) as u32;
            let waited = Instant::now();
            let asking = self
                .checksums
                .acquire_many(permits)
                .await
                .map_err(|e| CopyError::Unavailable(e.to_string()))?;
            let began = Instant::now();
            let (printed, outcome) = self
                .run_printing(&self.xrdcp, &args, self.timeout * rounds)
                .await;
            drop(asking);
            tracing::debug!(
                files = files.len(),
                waited_ms = (began - waited).as_millis() as u64,
                elapsed_ms = began.elapsed().as_millis() as u64,
                "xroot: batch copied"
            );
            if let Err(e) = outcome {
                // The directory may be gone from the storage: made again
                // by the next try.
                self.made.lock().expect("directories lock").remove(dir);
                failure = Some(e);
            }
            let sums = printed_checksums(&printed);
            for (i, _) in files {
                let name = copies[*i].lfn.rsplit('/').next().unwrap_or_default();
                if sums.get(name).is_some_and(|s| s == copies[*i].adler32) {
                    results[*i] = Some(Ok(()));
                    verified += 1;
                }
            }
        }
        if let Some(e) = failure
            && verified == 0
        {
            // Nothing landed: the storage refuses these copies; each is
            // not tried alone as well.
            return Err(e);
        }
        Ok(())
    }

    /// The adler32 of each of `paths` the storage has (missing: absent),
    /// asked in one `xrdfs` session.
    async fn checksums(&self, paths: &[String]) -> Result<HashMap<String, String>, CopyError> {
        let script: String = paths
            .iter()
            .map(|p| format!("query checksum {p}\n"))
            .collect();
        // One at a time in a session.
        let _asking = self
            .checksums
            .acquire()
            .await
            .map_err(|e| CopyError::Unavailable(e.to_string()))?;
        Ok(session_checksums(&self.session(&script).await?))
    }

    /// Runs `program` with `args` within `timeout`: what it wrote (stdout
    /// and stderr, where `xrdcp` prints checksums), and whether it succeeded.
    async fn run_printing(
        &self,
        program: &str,
        args: &[&str],
        timeout: Duration,
    ) -> (String, Result<(), CopyError>) {
        let output = match client_output(program, args, timeout).await {
            Ok(output) => output,
            Err(e) => return (String::new(), Err(e)),
        };
        let printed = format!(
            "{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (printed, finished(program, output).map(|_| ()))
    }

    /// Runs `script` (a command a line) in one `xrdfs` session; its stdout.
    async fn session(&self, script: &str) -> Result<String, CopyError> {
        let xrdfs = &self.xrdfs;
        let mut command = Command::new(xrdfs);
        client_environment(&mut command);
        let mut child = command
            .arg(&self.server)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| CopyError::Unavailable(format!("running {xrdfs}: {e}")))?;
        let mut stdin = child.stdin.take().expect("piped");
        let script = script.to_string();
        let writer = tokio::spawn(async move {
            let _ = stdin.write_all(script.as_bytes()).await;
            let _ = stdin.shutdown().await;
        });
        let output = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| {
                CopyError::Unavailable(format!(
                    "{xrdfs} did not finish within {} s",
                    self.timeout.as_secs()
                ))
            })?
            .map_err(|e| CopyError::Unavailable(format!("running {xrdfs}: {e}")))?;
        let _ = writer.await;
        finished(xrdfs, output)
    }

    async fn checksum(&self, lfn: &str) -> Result<Option<String>, CopyError> {
        let path = self.path_of(lfn);
        let asking = self
            .checksums
            .acquire()
            .await
            .map_err(|e| CopyError::Unavailable(e.to_string()))?;
        let answer = self
            .run(&self.xrdfs, &[&self.server, "query", "checksum", &path])
            .await;
        drop(asking);
        match answer {
            // "adler32 3e4aa739"
            Ok(out) => match adler32_answer(&out) {
                Some(sum) => Ok(Some(sum)),
                None => Err(CopyError::Unavailable(format!(
                    "xrdfs query checksum answered {out:?}"
                ))),
            },
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
        run_client(program, args, self.timeout).await
    }
}

/// What an XRootD client command wrote and how it exited, if it could be
/// run and finished within `timeout`.
async fn client_output(
    program: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<std::process::Output, CopyError> {
    let mut command = client_command(program, args);
    tokio::time::timeout(timeout, command.output())
        .await
        .map_err(|_| {
            CopyError::Unavailable(format!(
                "{program} did not finish within {} s",
                timeout.as_secs()
            ))
        })?
        .map_err(|e| CopyError::Unavailable(format!("running {program}: {e}")))
}

/// Runs an XRootD client command within `timeout`: its stdout, or the
/// reason it failed (the last line of its stderr).
async fn run_client(program: &str, args: &[&str], timeout: Duration) -> Result<String, CopyError> {
    let output = client_output(program, args, timeout).await?;
    finished(program, output)
}

/// The forwarder retries with its own backoff: the client tries to
/// connect once and gives up within seconds (its defaults keep trying for
/// minutes), unless the deployment's environment says otherwise.
/// `program` (an XRootD client) with `args`, its output captured, killed if
/// dropped, in the client environment.
fn client_command(program: &str, args: &[&str]) -> Command {
    let mut command = Command::new(program);
    client_environment(&mut command);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

fn client_environment(command: &mut Command) {
    for (key, value) in [("XRD_CONNECTIONRETRY", "1"), ("XRD_CONNECTIONWINDOW", "10")] {
        if std::env::var_os(key).is_none() {
            command.env(key, value);
        }
    }
}

/// A finished client command's stdout, or the reason it failed (the last
/// line of its stderr).
fn finished(program: &str, output: std::process::Output) -> Result<String, CopyError> {
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

/// The checksums `xrdcp --cksum adler32:print` printed, by file name: a
/// line per file, `adler32: 3e4aa739 root://host:port//dir//name 1024`.
fn printed_checksums(out: &str) -> HashMap<String, String> {
    out.lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("adler32:")?;
            let mut words = rest.split_whitespace();
            let sum = adler32_answer(&format!("adler32 {}", words.next()?))?;
            let name = words.next()?.rsplit('/').next()?.to_string();
            Some((name, sum))
        })
        .collect()
}

/// The answers of an `xrdfs` session of `query checksum` commands, by
/// path: each command is echoed after the prompt ("[host:port] / > query
/// checksum /path"), its answer ("adler32 3e4aa739") on the next line; a
/// file the storage does not have gets no answer there (the error goes to
/// stderr).
fn session_checksums(out: &str) -> HashMap<String, String> {
    let mut sums = HashMap::new();
    let mut asked: Option<&str> = None;
    for line in out.lines() {
        if let Some((_, path)) = line.split_once("> query checksum ") {
            asked = Some(path.trim());
        } else if let Some(path) = asked.take()
            && let Some(sum) = adler32_answer(line)
        {
            sums.insert(path.to_string(), sum);
        }
    }
    sums
}

/// The sum in an answer of `query checksum` ("adler32 3e4aa739"), as the
/// catalog writes adler32s (eight lower-case hex digits).
fn adler32_answer(line: &str) -> Option<String> {
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some("adler32"), Some(sum)) => Some(format!(
            "{:0>8}",
            sum.trim_start_matches("0x").to_ascii_lowercase()
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_printed_by_xrdcp_by_file_name() {
        let out = "[ERROR] something else\n\
                   adler32: 9fc30143 root://127.0.0.1:34637/tp/a//f1.dat 1024\n\
                   adler32: 38800ff root://127.0.0.1:34637/tp/a//f2.dat 1024\n";
        let sums = printed_checksums(out);
        assert_eq!(sums.len(), 2, "{sums:?}");
        assert_eq!(sums["f1.dat"], "9fc30143");
        assert_eq!(sums["f2.dat"], "038800ff");
    }

    #[test]
    fn a_session_of_checksum_queries_answers_by_path() {
        let out = "[127.0.0.1:34637] / > query checksum /t/a/f1.dat\n\
                   adler32 9fc30143\n\
                   [127.0.0.1:34637] / > query checksum /t/a/missing.dat\n\
                   [127.0.0.1:34637] / > query checksum /t/a/f2.dat\n\
                   adler32 0x38800ff\n\
                   [127.0.0.1:34637] / > Goodbye.\n";
        let sums = session_checksums(out);
        assert_eq!(sums.len(), 2, "{sums:?}");
        assert_eq!(sums["/t/a/f1.dat"], "9fc30143");
        assert_eq!(sums["/t/a/f2.dat"], "038800ff");
    }

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
                parallel: XRDCP_PARALLEL,
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
            &DestinationSettings::posix("/mnt/tmp"),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(p.url_of("/vo/a.dat"), "file:///mnt/tmp/vo/a.dat");
        assert!(
            Destination::from_settings(
                "rel",
                &DestinationSettings::posix("relative"),
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
            xrdcp: "xrdcp".into(),
            timeout: Duration::from_secs(10),
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

    #[test]
    fn xrdcp_names_the_end_of_a_copy_that_failed() {
        let failed = |line: &str| format!("xrdcp exit status: 54: {line}");
        assert_eq!(
            xrdcp_side(&failed("[FATAL] Connection error:  (source)")),
            Some(XrdcpSide::Source)
        );
        assert_eq!(
            xrdcp_side(&failed(
                "[ERROR] Server responded with an error: [3011] Unable to open /d/x; no such file or directory  (source)"
            )),
            Some(XrdcpSide::Source)
        );
        assert_eq!(
            xrdcp_side(&failed(
                "[ERROR] Local error: permission denied:  (destination)"
            )),
            Some(XrdcpSide::Destination)
        );
        assert_eq!(xrdcp_side(&failed("no message")), None);
        assert!(is_xroot_url("root://h:1094//a/b"));
        assert!(is_xroot_url("xroot://h:1094//a/b"));
        assert!(!is_xroot_url("https://h/a/b"));
        assert!(!is_xroot_url("file:///a/b"));
    }

    /// A stand-in for `xrdcp` (`--force --nopbar SOURCE TARGET`): copies
    /// `root://fake/<path>` from `<path>`, failing as xrdcp does when the
    /// source is missing or the target cannot be written (here: a target
    /// named `unwritable`).
    fn fake_xrdcp(dir: &Path) -> String {
        let script = dir.join("xrdcp");
        std::fs::write(
            &script,
            "#!/bin/sh\n\
             [ \"$1 $2\" = \"--force --nopbar\" ] || { echo \"unexpected arguments: $*\" >&2; exit 50; }\n\
             path=\"${3#root://fake/}\"\n\
             [ -f \"$path\" ] || { echo \"[ERROR] Server responded with an error: [3011] Unable to open $path; no such file or directory  (source)\" >&2; exit 54; }\n\
             case \"$4\" in *unwritable*) echo '[ERROR] Local error: permission denied:  (destination)' >&2; exit 54;; esac\n\
             cp \"$path\" \"$4\"\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script.display().to_string()
    }

    #[tokio::test]
    async fn a_posix_destination_downloads_a_root_source_with_xrdcp() {
        let dir = std::env::temp_dir().join(format!("prodsys-posix-root-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let source = dir.join("source.dat");
        std::fs::write(&source, b"Wikipedia").unwrap();
        let p = Destination::from_settings(
            "p",
            &DestinationSettings::Posix {
                path: dir.join("store"),
                xrdcp: fake_xrdcp(&dir),
            },
            Duration::from_secs(10),
        )
        .unwrap();
        let url = format!("root://fake/{}", source.display());
        p.put(&url, "/vo/a.dat", "11e60398").await.unwrap();
        assert_eq!(
            std::fs::read(dir.join("store/vo/a.dat")).unwrap(),
            b"Wikipedia"
        );
        // What landed is verified against the catalog's adler32.
        let err = p.put(&url, "/vo/b.dat", "00000001").await.unwrap_err();
        assert!(matches!(err, CopyError::Mismatch { .. }), "{err}");
        assert!(!dir.join("store/vo/b.dat").exists());
        // A source that is not there: the source is named as what failed.
        let missing = format!("root://fake/{}", dir.join("missing.dat").display());
        let err = p.put(&missing, "/vo/c.dat", "11e60398").await.unwrap_err();
        assert!(matches!(err, CopyError::Source(_)), "{err}");
        assert!(
            err.to_string()
                .starts_with(&format!("reading the source {missing}: ")),
            "{err}"
        );
        // A target that cannot be written (the fake refuses one named so):
        // the destination is.
        let err = p
            .put(&url, "/vo/unwritable.dat", "11e60398")
            .await
            .unwrap_err();
        assert!(matches!(err, CopyError::Unavailable(_)), "{err}");
        assert!(err.to_string().starts_with("writing "), "{err}");
        assert!(err.to_string().contains("(destination)"), "{err}");
        // A client that cannot be run, and a URL neither local nor XRootD.
        let absent = Destination::from_settings(
            "absent",
            &DestinationSettings::Posix {
                path: dir.join("store"),
                xrdcp: dir.join("no-xrdcp").display().to_string(),
            },
            Duration::from_secs(10),
        )
        .unwrap();
        let err = absent.put(&url, "/vo/f.dat", "11e60398").await.unwrap_err();
        assert!(err.to_string().contains("running "), "{err}");
        let err = p
            .put("https://example.org/a.dat", "/vo/g.dat", "11e60398")
            .await
            .unwrap_err();
        assert!(matches!(err, CopyError::Source(_)), "{err}");
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.join("store/vo"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["a.dat"]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
