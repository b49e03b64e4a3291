//! Storage for the forwarding tests: the test servers of tests/servers
//! (XRootD, Rucio), what they hold, and the catalog's view of replicas.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use prodsys_config::DestinationSettings;
use prodsys_proto as pb;
use prodsys_testkit::TestEnv;

use super::{App, cta_example, publish_raw};

/// Starts (or finds running) instance `name` of a test server kind
/// (`xrootd`, `rucio`; tests/servers/KIND/start is idempotent, so the tests
/// of a binary share one); what it prints: its URL.
pub fn server(kind: &str, name: &str) -> String {
    let script = prodsys_testkit::repo_root().join(format!("tests/servers/{kind}/start"));
    let output = std::process::Command::new(script)
        .arg(name)
        .output()
        .unwrap_or_else(|e| panic!("running tests/servers/{kind}/start: {e}"));
    assert!(
        output.status.success(),
        "{kind} {name} did not start: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// Stops instance `name` of a test server kind.
pub fn stop_server(kind: &str, name: &str) {
    let script = prodsys_testkit::repo_root().join(format!("tests/servers/{kind}/stop"));
    let status = std::process::Command::new(script)
        .arg(name)
        .status()
        .unwrap_or_else(|e| panic!("running tests/servers/{kind}/stop: {e}"));
    assert!(status.success());
}

/// Where XRootD instance `name` keeps the files it serves.
pub fn xrootd_data(name: &str) -> PathBuf {
    prodsys_testkit::repo_root().join(format!("var/servers/xrootd/{name}/data"))
}

/// What the storage answers for the adler32 of `path` (`xrdfs query checksum`).
pub fn storage_adler32(server: &str, path: &str) -> Option<String> {
    let output = std::process::Command::new("xrdfs")
        .args([server, "query", "checksum", path])
        .output()
        .expect("running xrdfs");
    let text = String::from_utf8_lossy(&output.stdout);
    let mut words = text.split_whitespace();
    match (output.status.success(), words.next(), words.next()) {
        (true, Some("adler32"), Some(sum)) => Some(sum.to_string()),
        _ => None,
    }
}

/// The adler32 of the file at `path`.
pub fn adler32_of(path: &Path) -> String {
    prodsys_core::checksum::adler32_hex(std::fs::File::open(path).unwrap())
        .unwrap()
        .1
}

/// The adler32 of what XRootD instance `name` holds at `path` (its bytes
/// on the storage), if it holds it.
pub fn stored_adler32(name: &str, path: &str) -> Option<String> {
    let on_disk = xrootd_data(name).join(path.trim_start_matches('/'));
    let file = std::fs::File::open(on_disk).ok()?;
    Some(prodsys_core::checksum::adler32_hex(file).unwrap().1)
}

/// Every file below `dir`, relative to it (as `/a/b`).
pub fn files_below(dir: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.insert(format!("/{}", path.strip_prefix(root).unwrap().display()));
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// Every file XRootD instance `name` holds below `base`, relative to it.
pub fn stored_below(name: &str, base: &str) -> BTreeSet<String> {
    files_below(&xrootd_data(name).join(base.trim_start_matches('/')))
}

/// A unique base path on a shared storage server for one test.
pub fn base_path() -> String {
    format!("/prodsys-tests/{}", uuid::Uuid::now_v7().simple())
}

/// Short retries, so outages and bad copies resolve within a test.
pub fn quick_retries(env: &mut TestEnv) {
    let f = &mut env.settings.forwarding;
    f.retry_min_ms = 200;
    f.retry_max_ms = 1_000;
    f.claim_ttl_ms = 5_000;
    f.copy_timeout_s = 30;
}

/// Destination `name`, with short retries.
pub fn forwarding_to(env: &mut TestEnv, name: &str, destination: DestinationSettings) {
    quick_retries(env);
    env.settings
        .forwarding
        .destinations
        .insert(name.to_string(), destination);
}

/// An XRootD destination under `base` of `server` (`root://host:port`).
pub fn xroot_destination(server: &str, base: &str) -> DestinationSettings {
    DestinationSettings::Xroot {
        url: format!("{server}/{base}"),
        xrdcp: "xrdcp".into(),
        xrdfs: "xrdfs".into(),
        parallel: prodsys_config::DEFAULT_XROOT_PARALLEL,
    }
}

/// The CTA example, forwarded to `destinations`.
pub fn forwarded_to(destinations: &[&str]) -> pb::SubmitRequestRequest {
    pb::SubmitRequestRequest {
        forward: destinations.iter().map(|d| d.to_string()).collect(),
        ..cta_example()
    }
}

/// FindFiles' answer for `query`, every page: each file with its replicas.
pub async fn with_replicas(
    app: &App,
    mut query: pb::FindFilesRequest,
) -> Vec<(pb::OutputFile, Vec<pb::Replica>)> {
    let mut all = Vec::new();
    loop {
        let page = app
            .catalog
            .clone()
            .find_files(query.clone())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.files.len(), page.replicas.len());
        for (file, replicas) in page.files.into_iter().zip(page.replicas) {
            assert_eq!(file.lfn, replicas.lfn);
            all.push((file, replicas.replicas));
        }
        if page.next_page_token.is_empty() {
            return all;
        }
        query.page_token = page.next_page_token;
    }
}

/// Every file of `production_id` with its replicas, in pages of 3 (so
/// paging is crossed too).
pub async fn files_of(app: &App, production_id: &str) -> Vec<(pb::OutputFile, Vec<pb::Replica>)> {
    with_replicas(
        app,
        pb::FindFilesRequest {
            production_id: production_id.into(),
            page_size: 3,
            ..Default::default()
        },
    )
    .await
}

/// The replica on `destination` in `state`, if there is one.
pub fn replica_in(
    replicas: &[pb::Replica],
    destination: &str,
    state: pb::ReplicaState,
) -> Option<pb::Replica> {
    replicas
        .iter()
        .find(|r| r.destination == destination && r.state() == state)
        .cloned()
}

/// Publishes `message` on the test's event exchange as the services would.
pub async fn publish_event(env: &TestEnv, short_type: &str, message: &impl prost::Message) {
    publish_raw(
        env,
        &format!("{}prodsys.events", env.prefix),
        short_type,
        &format!("org.prodsys.{short_type}.v1"),
        &message.encode_to_vec(),
    )
    .await;
}

/// Destination `disk`: a directory of the test's own standing for a
/// storage element; where it is.
pub fn disk(env: &mut TestEnv) -> PathBuf {
    let path = env.work_dir.join("disk");
    env.settings
        .forwarding
        .destinations
        .insert("disk".into(), DestinationSettings::posix(path.clone()));
    path
}
