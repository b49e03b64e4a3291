//! Outputs of jobs on installations that do not share the dispatcher's work
//! directory (a DIRAC site, a Slurm cluster elsewhere: `shared_filesystem =
//! false`). Such a job writes its outputs to its production's first
//! forwarding destination itself, each file where forwarding would have put
//! it (`<destination>/<LFN>`: the job is given the LFN's directory as
//! `{output_url}`), and then a manifest of what it wrote — each file's
//! adler32, size and name, computed where the file was made — at
//! `<destination>/.prodsys/outputs/<production>/<attempt tag>.txt`. The
//! script the DIRAC and Slurm backends generate does both after the command
//! ([`upload_script`]), so a profile's command only writes into
//! `{output_dir}` as everywhere else.
//!
//! When such an attempt ends DONE, the dispatcher reads the manifest from
//! the storage and asks the storage for each file's size and adler32
//! (`xrdfs stat` and `xrdfs query checksum` on XRootD; the bytes themselves
//! on a posix destination). A manifest or a file that is missing, or a file
//! whose size or adler32 on the storage is not what the job wrote, fails the
//! attempt (it is retried). Storage that cannot be reached leaves the
//! attempt as it is until the next poll. The files are catalogued with their
//! URL on the storage, which the catalog's forwarder recognises as the
//! destination's own copy: it verifies it there and never copies it again.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use prodsys_config::{DestinationSettings, ForwardingSettings};
use prodsys_core::Profile;
use prodsys_core::profile::render;

use crate::domain::JobRow;
use crate::outputs::Scanned;

/// Where a remote attempt writes: the directory of its outputs' LFNs on the
/// storage, and its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteOutputs {
    pub output_url: String,
    pub manifest_url: String,
}

/// The storage under a forwarding destination, as a remote job writes to it.
#[derive(Debug, Clone)]
pub enum Storage {
    /// A filesystem the worker nodes mount at the same path.
    Posix { root: PathBuf },
    /// An XRootD storage element.
    Xroot {
        /// `root://host:port`
        server: String,
        /// The base path on the server, without a trailing slash.
        base: String,
        xrdcp: String,
        xrdfs: String,
    },
}

/// The storage of every configured destination, by name (a `rucio`
/// destination's is the storage its copies land on).
#[derive(Debug, Clone, Default)]
pub struct Destinations {
    storages: HashMap<String, Storage>,
    timeout: Duration,
}

impl Destinations {
    pub fn from_settings(settings: &ForwardingSettings) -> anyhow::Result<Self> {
        let mut storages = HashMap::new();
        for (name, destination) in &settings.destinations {
            if let Some(storage) = storage_of(name, destination)? {
                storages.insert(name.clone(), storage);
            }
        }
        for (name, destination) in &settings.destinations {
            if let DestinationSettings::Rucio(rucio) = destination
                && let Some(storage) = storages.get(&rucio.storage).cloned()
            {
                storages.insert(name.clone(), storage);
            }
        }
        Ok(Self {
            storages,
            timeout: Duration::from_secs(settings.copy_timeout_s.max(1)),
        })
    }

    /// Where the attempt `job` (named `tag` on its backend) writes its
    /// outputs, or why it cannot write them anywhere prodsys can find them.
    pub fn outputs_of(
        &self,
        profile: &Profile,
        job: &JobRow,
        tag: &str,
    ) -> Result<RemoteOutputs, String> {
        let (_, _, outputs) = self.locate(profile, job, tag)?;
        Ok(outputs)
    }

    fn locate(
        &self,
        profile: &Profile,
        job: &JobRow,
        tag: &str,
    ) -> Result<(&Storage, String, RemoteOutputs), String> {
        let Some(name) = job.output_destination.as_deref() else {
            return Err(format!(
                "production {} forwards its outputs nowhere, and its jobs run where the \
                 dispatcher cannot read their files: a job on an installation that does not \
                 share the work directory writes its outputs to the production's first \
                 forwarding destination (ask for one with `forward`)",
                job.production_id
            ));
        };
        let storage = self.storages.get(name).ok_or_else(|| {
            format!("forwarding destination {name:?} is not configured in this dispatcher")
        })?;
        let directory = lfn_directory(profile, job)?;
        let outputs = RemoteOutputs {
            output_url: storage.url_of(&directory),
            manifest_url: storage.url_of(&manifest_path(&job.production_id, tag)),
        };
        Ok((storage, directory, outputs))
    }

    /// The outputs the attempt `job` wrote to its storage, each checked there
    /// against its manifest. `Ok(Err(reason))`: the attempt's outputs are
    /// missing or not what it wrote (the attempt failed); `Err`: the storage
    /// cannot be asked now (try again at the next poll).
    pub async fn collect(
        &self,
        profile: &Profile,
        job: &JobRow,
        tag: &str,
    ) -> Result<Result<Vec<Scanned>, String>, String> {
        let (storage, directory, outputs) = match self.locate(profile, job, tag) {
            Ok(found) => found,
            Err(reason) => return Ok(Err(reason)),
        };
        let manifest_path = manifest_path(&job.production_id, tag);
        let Some(text) = storage.read(&manifest_path, self.timeout).await? else {
            return Ok(Err(format!(
                "no output manifest at {}: the job did not upload its outputs",
                outputs.manifest_url
            )));
        };
        let entries = match parse_manifest(&text) {
            Ok(entries) => entries,
            Err(reason) => {
                return Ok(Err(format!(
                    "output manifest {}: {reason}",
                    outputs.manifest_url
                )));
            }
        };
        let mut files = Vec::with_capacity(entries.len());
        for entry in entries {
            let path = format!("{directory}/{}", entry.name);
            let url = storage.url_of(&path);
            let Some((size, adler32)) = storage.stat(&path, self.timeout).await? else {
                return Ok(Err(format!(
                    "output {} is missing on the storage at {url}",
                    entry.name
                )));
            };
            if size != entry.size {
                return Ok(Err(format!(
                    "output {} at {url} holds {size} bytes on the storage; the job wrote {}",
                    entry.name, entry.size
                )));
            }
            if adler32 != entry.adler32 {
                return Ok(Err(format!(
                    "output {} at {url} has adler32 {adler32} on the storage; the job wrote {}",
                    entry.name, entry.adler32
                )));
            }
            files.push(Scanned {
                path: PathBuf::from(&path),
                name: entry.name,
                size,
                adler32,
                url,
            });
        }
        Ok(Ok(files))
    }
}

fn storage_of(name: &str, destination: &DestinationSettings) -> anyhow::Result<Option<Storage>> {
    Ok(match destination {
        DestinationSettings::Posix { path, .. } => Some(Storage::Posix { root: path.clone() }),
        DestinationSettings::Xroot {
            url, xrdcp, xrdfs, ..
        } => {
            let (server, base) = split_root_url(url).map_err(|reason| {
                anyhow::anyhow!("forwarding.destinations.{name}.url: {reason}")
            })?;
            Some(Storage::Xroot {
                server,
                base,
                xrdcp: xrdcp.clone(),
                xrdfs: xrdfs.clone(),
            })
        }
        DestinationSettings::Rucio(_) => None,
    })
}

/// `root://host:port//base` → (`root://host:port`, `/base`), as the
/// catalog's forwarder splits it (so both name a file by the same URL).
fn split_root_url(url: &str) -> Result<(String, String), String> {
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

/// Where the manifest of the attempt named `tag` lies on its storage.
fn manifest_path(production_id: &str, tag: &str) -> String {
    format!("/.prodsys/outputs/{production_id}/{tag}.txt")
}

/// The directory of `job`'s output LFNs: its LFN template rendered for the
/// job, up to `/{file_name}`, which must end it (a remote job puts each file
/// it made in that directory under the file's own name).
pub fn lfn_directory(profile: &Profile, job: &JobRow) -> Result<String, String> {
    const MARK: &str = "\u{1}file_name\u{1}";
    let mut vars = profile.job_variables(
        &job.parameters,
        &job.production_id,
        &job.vo,
        &job.planned(),
        job.attempt as u32,
        "",
    );
    vars.insert("file_name".into(), MARK.into());
    let lfn = render(&profile.outputs().lfn, &vars);
    match lfn.strip_suffix(&format!("/{MARK}")) {
        Some(directory) if !directory.contains(MARK) && directory.starts_with('/') => {
            Ok(directory.to_string())
        }
        _ => Err(format!(
            "profile {}: outputs.lfn {:?} does not end with /{{file_name}}, so a job that \
             does not share the work directory cannot write its outputs at their LFNs",
            profile.name(),
            profile.outputs().lfn
        )),
    }
}

/// One line of a manifest: `<adler32> <size> <name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    pub adler32: String,
    pub size: u64,
    pub name: String,
}

/// The files a manifest lists, or why it cannot be read.
pub fn parse_manifest(text: &str) -> Result<Vec<ManifestEntry>, String> {
    let mut entries: Vec<ManifestEntry> = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            continue;
        }
        let mut words = line.splitn(3, ' ');
        let (Some(sum), Some(size), Some(name)) = (words.next(), words.next(), words.next()) else {
            return Err(format!(
                "line {}: {line:?} is not `<adler32> <size> <name>`",
                number + 1
            ));
        };
        let sum = sum.trim_start_matches("0x").to_ascii_lowercase();
        if sum.is_empty() || sum.len() > 8 || !sum.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "line {}: {sum:?} is not an adler32 (8 hex digits)",
                number + 1
            ));
        }
        let size: u64 = size
            .parse()
            .map_err(|_| format!("line {}: size {size:?} is not a number", number + 1))?;
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(format!("line {}: {name:?} is not a file name", number + 1));
        }
        if entries.iter().any(|e| e.name == name) {
            return Err(format!("line {}: {name} is listed twice", number + 1));
        }
        entries.push(ManifestEntry {
            adler32: format!("{sum:0>8}"),
            size,
            name: name.to_string(),
        });
    }
    Ok(entries)
}

impl Storage {
    /// The URL of `path` (an LFN, or a path like one) on this storage: the
    /// catalog's forwarder names the file it would copy there by the same URL.
    pub fn url_of(&self, path: &str) -> String {
        let relative = path.trim_start_matches('/');
        match self {
            Self::Posix { root } => format!("file://{}", root.join(relative).display()),
            Self::Xroot { server, base, .. } => format!("{server}/{base}/{relative}"),
        }
    }

    /// The text of the file at `path`, `None` if it is not there.
    async fn read(&self, path: &str, timeout: Duration) -> Result<Option<String>, String> {
        match self {
            Self::Posix { root } => {
                let file = root.join(path.trim_start_matches('/'));
                match tokio::fs::read(&file).await {
                    Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(format!("reading {}: {e}", file.display())),
                }
            }
            Self::Xroot { xrdcp, .. } => {
                let local = std::env::temp_dir().join(format!(
                    "prodsys-manifest-{}.txt",
                    uuid::Uuid::now_v7().simple()
                ));
                let url = self.url_of(path);
                let local_text = local.to_string_lossy().into_owned();
                let copied = run(xrdcp, &["--force", "--nopbar", &url, &local_text], timeout).await;
                let answer = match copied {
                    Ok(_) => tokio::fs::read(&local)
                        .await
                        .map(|bytes| Some(String::from_utf8_lossy(&bytes).into_owned()))
                        .map_err(|e| format!("reading the copy of {url}: {e}")),
                    Err(Failure::NotFound) => Ok(None),
                    Err(Failure::Unavailable(reason)) => Err(reason),
                };
                let _ = tokio::fs::remove_file(&local).await;
                answer
            }
        }
    }

    /// Size and adler32 of the file at `path` as the storage has it, `None`
    /// if it is not there.
    async fn stat(&self, path: &str, timeout: Duration) -> Result<Option<(u64, String)>, String> {
        match self {
            Self::Posix { root } => {
                let file = root.join(path.trim_start_matches('/'));
                tokio::task::spawn_blocking(move || match std::fs::File::open(&file) {
                    Ok(opened) => {
                        prodsys_core::checksum::adler32_hex(std::io::BufReader::new(opened))
                            .map(Some)
                            .map_err(|e| format!("reading {}: {e}", file.display()))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(format!("opening {}: {e}", file.display())),
                })
                .await
                .map_err(|e| e.to_string())?
            }
            Self::Xroot {
                server,
                base,
                xrdfs,
                ..
            } => {
                let remote = format!("{base}/{}", path.trim_start_matches('/'));
                let stat = match run(xrdfs, &[server, "stat", &remote], timeout).await {
                    Ok(out) => out,
                    Err(Failure::NotFound) => return Ok(None),
                    Err(Failure::Unavailable(reason)) => return Err(reason),
                };
                let size = stat
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("Size:"))
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| format!("xrdfs stat {remote} answered no size: {stat:?}"))?;
                let sum = match run(xrdfs, &[server, "query", "checksum", &remote], timeout).await {
                    Ok(out) => out,
                    Err(Failure::NotFound) => return Ok(None),
                    Err(Failure::Unavailable(reason)) => return Err(reason),
                };
                // "adler32 3e4aa739"
                let mut words = sum.split_whitespace();
                match (words.next(), words.next()) {
                    (Some("adler32"), Some(value)) => Ok(Some((
                        size,
                        format!(
                            "{:0>8}",
                            value.trim_start_matches("0x").to_ascii_lowercase()
                        ),
                    ))),
                    _ => Err(format!("xrdfs query checksum {remote} answered {sum:?}")),
                }
            }
        }
    }
}

enum Failure {
    NotFound,
    Unavailable(String),
}

/// Runs an XRootD client command with the time limit: its stdout, or why
/// not (the file is not there, or the storage cannot be used).
async fn run(program: &str, args: &[&str], timeout: Duration) -> Result<String, Failure> {
    let mut command = tokio::process::Command::new(program);
    // The scheduler asks again at its next poll: one quick connection try.
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
    let output = tokio::time::timeout(timeout, command.output())
        .await
        .map_err(|_| {
            Failure::Unavailable(format!(
                "{program} did not finish within {} s",
                timeout.as_secs()
            ))
        })?
        .map_err(|e| Failure::Unavailable(format!("running {program}: {e}")))?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).trim().to_string());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    // kXR_NotFound is error 3011.
    if stderr.contains("[3011]") || stderr.contains("No such file") {
        return Err(Failure::NotFound);
    }
    let reason = stderr
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("no message");
    Err(Failure::Unavailable(format!(
        "{program} {}: {reason}",
        output.status
    )))
}

/// `'it'\''s'` quoting for the POSIX shell that runs the upload step.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Shell (POSIX sh) that a remote job runs after its command: every complete
/// file in `output_dir` (a shell word, e.g. `"$PWD"/output`) uploaded to
/// `<output_url>/<name>`, then the manifest of them (adler32, size, name,
/// computed on the worker node) to the manifest URL. A copy that fails ends
/// the job with an error. XRootD URLs are written with `xrdcp` (adler32 with
/// `xrdadler32`, or Python's zlib where it is missing), `file://` ones with
/// `cp` into the mounted path.
/// The URLs come from [`export_script`], run before the command.
pub fn upload_script(output_dir: &str) -> String {
    let mut script = String::from(UPLOAD_FUNCTIONS);
    script.push_str(&format!(
        "for prodsys_file in {output_dir}/*; do\n{UPLOAD_LOOP_BODY}done\n"
    ));
    script.push_str("prodsys_put \"$prodsys_manifest\" \"$PRODSYS_OUTPUT_MANIFEST_URL\"\n");
    script
}

/// Shell that tells a remote job (and its upload step) where its outputs go:
/// `PRODSYS_OUTPUT_URL` (as `{output_url}`) and `PRODSYS_OUTPUT_MANIFEST_URL`.
pub fn export_script(remote: &RemoteOutputs) -> String {
    format!(
        "export PRODSYS_OUTPUT_URL={}\nexport PRODSYS_OUTPUT_MANIFEST_URL={}\n",
        quote(&remote.output_url),
        quote(&remote.manifest_url)
    )
}

/// The name of the manifest in the job's own directory (returned in a DIRAC
/// job's output sandbox).
pub const MANIFEST_FILE: &str = "prodsys-outputs.txt";

const UPLOAD_FUNCTIONS: &str = r#"prodsys_adler32() {
    if command -v xrdadler32 >/dev/null 2>&1; then
        xrdadler32 "$1" | cut -d' ' -f1
    else
        python3 -c 'import sys, zlib
s = 1
with open(sys.argv[1], "rb") as f:
    for b in iter(lambda: f.read(1 << 20), b""):
        s = zlib.adler32(b, s)
print("%08x" % s)' "$1"
    fi
}
prodsys_put() {
    case "$2" in
    file://*)
        prodsys_to=${2#file://}
        mkdir -p "${prodsys_to%/*}" && cp "$1" "$prodsys_to.part" && mv "$prodsys_to.part" "$prodsys_to"
        ;;
    *) xrdcp --force --posc --nopbar "$1" "$2" ;;
    esac
}
prodsys_manifest="$PWD"/prodsys-outputs.txt
: > "$prodsys_manifest"
"#;

const UPLOAD_LOOP_BODY: &str = r#"    [ -f "$prodsys_file" ] || continue
    prodsys_name=${prodsys_file##*/}
    case "$prodsys_name" in *.part|*.tmp) continue ;; esac
    prodsys_sum=$(prodsys_adler32 "$prodsys_file")
    prodsys_size=$(wc -c < "$prodsys_file" | tr -d ' ')
    prodsys_put "$prodsys_file" "$PRODSYS_OUTPUT_URL/$prodsys_name"
    printf '%s %s %s\n' "$prodsys_sum" "$prodsys_size" "$prodsys_name" >> "$prodsys_manifest"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_are_read_strictly() {
        let entries = parse_manifest("0062 1 a.simtel\n00620062 2 b c.txt\n\n").unwrap();
        assert_eq!(
            entries,
            vec![
                ManifestEntry {
                    adler32: "00000062".into(),
                    size: 1,
                    name: "a.simtel".into()
                },
                ManifestEntry {
                    adler32: "00620062".into(),
                    size: 2,
                    name: "b c.txt".into()
                },
            ]
        );
        for (bad, why) in [
            ("xyz 1 a", "adler32"),
            ("00620062 -1 a", "size"),
            ("00620062 1 ../a", "file name"),
            ("00620062 1", "is not"),
            ("00620062 1 a\n00620062 1 a", "twice"),
        ] {
            let error = parse_manifest(bad).unwrap_err();
            assert!(error.contains(why), "{bad:?}: {error}");
        }
    }

    #[test]
    fn urls_on_the_storage_are_the_forwarders() {
        let (server, base) = split_root_url("root://127.0.0.1:1094//data/").unwrap();
        let xroot = Storage::Xroot {
            server,
            base,
            xrdcp: "xrdcp".into(),
            xrdfs: "xrdfs".into(),
        };
        assert_eq!(
            xroot.url_of("/cta/CTA-000001/a.simtel"),
            "root://127.0.0.1:1094//data/cta/CTA-000001/a.simtel"
        );
        let (server, base) = split_root_url("root://eos:1094").unwrap();
        let bare = Storage::Xroot {
            server,
            base,
            xrdcp: "xrdcp".into(),
            xrdfs: "xrdfs".into(),
        };
        assert_eq!(bare.url_of("/a/b"), "root://eos:1094//a/b");
        let posix = Storage::Posix {
            root: PathBuf::from("/mnt/tmp"),
        };
        assert_eq!(posix.url_of("/a/b"), "file:///mnt/tmp/a/b");
    }

    #[tokio::test]
    async fn a_posix_upload_is_checked_against_its_manifest() {
        let root = std::env::temp_dir().join(format!("prodsys-remote-{}", uuid::Uuid::now_v7()));
        let site = root.join("site");
        std::fs::create_dir_all(site.join("output")).unwrap();
        std::fs::write(site.join("output/a.txt"), "a").unwrap();
        std::fs::write(site.join("output/b.txt.part"), "unfinished").unwrap();
        let storage = Storage::Posix {
            root: root.join("storage"),
        };
        let remote = RemoteOutputs {
            output_url: storage.url_of("/vo/P-1/Data"),
            manifest_url: storage.url_of(&manifest_path("P-1", "d.P-1.000000.a1")),
        };
        let script = format!(
            "set -e\n{}{}",
            export_script(&remote),
            upload_script("\"$PWD\"/output")
        );
        let ran = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .current_dir(&site)
            .output()
            .unwrap();
        assert!(ran.status.success(), "{ran:?}");
        let manifest =
            std::fs::read_to_string(root.join("storage/.prodsys/outputs/P-1/d.P-1.000000.a1.txt"))
                .unwrap();
        assert_eq!(manifest, "00620062 1 a.txt\n");
        assert_eq!(
            storage
                .stat("/vo/P-1/Data/a.txt", Duration::from_secs(5))
                .await
                .unwrap(),
            Some((1, "00620062".into()))
        );
        assert_eq!(
            storage
                .stat("/vo/P-1/Data/b.txt", Duration::from_secs(5))
                .await
                .unwrap(),
            None
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
