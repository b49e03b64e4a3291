//! The DIRAC backend against a real DiracX server (tests/servers/diracx/start:
//! DiracX 0.7 from PyPI). No pilots run here, so the test plays the site: it
//! moves the jobs prodsys submitted through DiracX's own status API, the way
//! a pilot's job wrapper reports them, and checks that prodsys follows.
//! On a remote site (no shared filesystem) the test is also the worker node:
//! it runs each job's JDL, whose script uploads the outputs to a real XRootD
//! server (tests/servers/xrootd), and prodsys catalogues them from there.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use prodsys::Service;
use prodsys_config::{BackendSettings, DiracSettings};
use prodsys_proto as pb;
use prodsys_testkit::{TestEnv, wait_for};
use serde_json::{Value, json};
use support::storage::{
    base_path, files_of, forwarding_to, replica_in, server, storage_adler32, xroot_destination,
    xrootd_data,
};
use support::{App, cta_example, sleep_request, spawn_app_with, use_test_profiles};

const DIRAC: &str = "dirac-test";

struct DiracX {
    url: String,
    http: reqwest::Client,
}

/// Starts (or finds) the test DiracX; returns its URL.
fn start_diracx() -> String {
    let root = prodsys_testkit::repo_root();
    let status = Command::new(root.join("tests/servers/diracx/start"))
        .status()
        .expect("running tests/servers/diracx/start");
    assert!(status.success(), "the DiracX test server did not start");
    let env = std::fs::read_to_string(root.join("var/servers/diracx/env")).unwrap();
    env.lines()
        .find_map(|l| l.strip_prefix("export PRODSYS_DIRACX_URL="))
        .expect("PRODSYS_DIRACX_URL in the env file")
        .to_string()
}

/// A token command that counts its runs in `count`, then asks the server for a token.
fn counting_token_command(dir: &Path) -> (PathBuf, PathBuf) {
    let count = dir.join("token-runs");
    let script = dir.join("token");
    let token = prodsys_testkit::repo_root().join("tests/servers/diracx/token");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho run >> '{}'\nexec '{}' cta_prod\n",
            count.display(),
            token.display()
        ),
    )
    .unwrap();
    Command::new("chmod")
        .args(["+x", &script.to_string_lossy()])
        .status()
        .unwrap();
    (script, count)
}

fn on_dirac(env: &mut TestEnv, url: &str, token_command: &Path) {
    use_test_profiles(env);
    env.settings.dispatcher.poll_interval_ms = 300;
    env.settings.dispatcher.backends = BTreeMap::from([(
        DIRAC.to_string(),
        BackendSettings::Dirac(DiracSettings {
            url: url.to_string(),
            token: None,
            token_file: None,
            token_command: vec![token_command.to_string_lossy().into_owned()],
            // DiracX's tokens live 20 minutes: renewed after about 2 s here.
            token_refresh_margin_s: 1198,
            ca_file: None,
            max_in_flight: 100,
            sites: vec![],
            output_se: None,
            jdl: BTreeMap::new(),
            // A site that shares the work directory (the remote sites, whose
            // jobs upload their outputs, are `on_remote_dirac`).
            shared_filesystem: true,
        }),
    )]);
}

impl DiracX {
    fn new(url: &str) -> Self {
        Self {
            url: url.to_string(),
            http: reqwest::Client::new(),
        }
    }

    fn token() -> String {
        let out = Command::new(prodsys_testkit::repo_root().join("tests/servers/diracx/token"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Jobs whose name starts with `prefix`: id → (name, status, minor status).
    async fn jobs(&self, prefix: &str) -> HashMap<u64, (String, String, String)> {
        let answer: Value = self
            .http
            .post(format!("{}/api/jobs/search?page=1&per_page=10000", self.url))
            .bearer_auth(Self::token())
            .json(&json!({
                "parameters": ["JobID", "JobName", "Status", "MinorStatus"],
                "search": [{"parameter": "JobName", "operator": "like", "value": format!("{prefix}%")}],
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer
            .as_array()
            .unwrap_or_else(|| panic!("search answered {answer}"))
            .iter()
            .map(|j| {
                (
                    j["JobID"].as_u64().unwrap(),
                    (
                        j["JobName"].as_str().unwrap().to_string(),
                        j["Status"].as_str().unwrap().to_string(),
                        j["MinorStatus"].as_str().unwrap_or_default().to_string(),
                    ),
                )
            })
            .collect()
    }

    /// What a pilot's job wrapper reports: these jobs move to `status`.
    async fn report(&self, ids: &[u64], status: &str, minor: &str) {
        // Updates dated before a job's last record are ignored: keep time moving.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let at = chrono_now();
        let body: serde_json::Map<String, Value> = ids
            .iter()
            .map(|id| {
                (
                    id.to_string(),
                    json!({ &at: {"Status": status, "MinorStatus": minor, "Source": "JobWrapper"}}),
                )
            })
            .collect();
        let answer: Value = self
            .http
            .patch(format!("{}/api/jobs/status", self.url))
            .bearer_auth(Self::token())
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let failed = answer["failed"].as_object().map_or(0, |f| f.len());
        assert_eq!(failed, 0, "status update refused: {answer}");
    }

    /// A pilot's walk from the task queue to running.
    async fn run(&self, ids: &[u64]) {
        for (status, minor) in [
            ("Checking", "JobSanity"),
            ("Waiting", "Pilot Agent Submission"),
            ("Matched", "Assigned"),
            ("Running", "Application"),
        ] {
            self.report(ids, status, minor).await;
        }
    }
}

fn chrono_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// This deployment's prefix of the DIRAC job names of `production`.
async fn job_prefix(app: &App, production: &str) -> String {
    let db = app.env.db().await.unwrap();
    let deployment: String = db
        .query_one("SELECT tag FROM dispatcher.deployment", &[])
        .await
        .unwrap()
        .get(0);
    format!("{deployment}.{production}.")
}

async fn counts(app: &App, production: &str) -> pb::JobCounts {
    app.production(production)
        .await
        .expect("the production in the status service")
        .counts
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_go_to_diracx_in_calls_of_twenty_and_prodsys_follows_the_site() {
    let url = start_diracx();
    let dir = std::env::temp_dir().join(format!("prodsys-dirac-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (token_command, token_runs) = counting_token_command(&dir);
    let app = spawn_app_with(|env| on_dirac(env, &url, &token_command)).await;
    let diracx = DiracX::new(&url);

    // 25 jobs: one call of 20 and one of 5.
    let production = app
        .accepted(sleep_request(25, 0.0, -1, "dirac", DIRAC))
        .await;
    let prefix = job_prefix(&app, &production).await;
    let jobs = wait_for("25 jobs in DiracX", Duration::from_secs(60), || async {
        let jobs = diracx.jobs(&prefix).await;
        (jobs.len() == 25).then_some(jobs)
    })
    .await
    .unwrap();
    assert!(jobs.values().all(|(_, s, _)| s == "Received"), "{jobs:?}");
    let mut ids: Vec<u64> = jobs.keys().copied().collect();
    ids.sort();
    let db = app.env.db().await.unwrap();
    // The dispatcher records each DiracX job ID once DiracX has answered
    // its call (the jobs may be listed there a moment before).
    let ids_text: Vec<String> = jobs.keys().map(|id| id.to_string()).collect();
    wait_for(
        "every DiracX job recorded against its attempt",
        Duration::from_secs(30),
        || async {
            let recorded: i64 = db
                .query_one(
                    "SELECT count(*) FROM dispatcher.jobs
                     WHERE production_id = $1 AND backend_job_id = ANY($2)",
                    &[&production, &ids_text],
                )
                .await
                .unwrap()
                .get(0);
            (recorded == 25).then_some(())
        },
    )
    .await
    .unwrap();
    // Every DiracX job is one attempt of one job, named by its tag.
    for (id, (name, _, _)) in &jobs {
        let row = db
            .query_one(
                "SELECT job_index, attempt FROM dispatcher.jobs
                 WHERE production_id = $1 AND backend_job_id = $2",
                &[&production, &id.to_string()],
            )
            .await
            .unwrap();
        let tag = format!(
            "{prefix}{:06}.a{}",
            row.get::<_, i64>(0),
            row.get::<_, i32>(1)
        );
        assert_eq!(name, &tag);
    }

    // The site runs them all: prodsys sees them running.
    diracx.run(&ids).await;
    wait_for("25 running", Duration::from_secs(30), || async {
        (counts(&app, &production).await.running == 25).then_some(())
    })
    .await
    .unwrap();

    // 24 end well; one fails and comes back as a second attempt, a new DIRAC job.
    let failing = ids[3];
    let (done, failed): (Vec<u64>, Vec<u64>) = ids.iter().partition(|id| **id != failing);
    diracx
        .report(&done, "Completing", "Uploading Output Data")
        .await;
    diracx.report(&done, "Done", "Execution Complete").await;
    diracx
        .report(&failed, "Failed", "Application Finished With Errors")
        .await;
    let retry = wait_for(
        "the failed job's second attempt",
        Duration::from_secs(30),
        || async {
            let jobs = diracx.jobs(&prefix).await;
            jobs.into_iter()
                .find(|(_, (name, _, _))| name.ends_with(".a2"))
        },
    )
    .await
    .unwrap();
    // The second attempt's DiracX status reaches the dispatcher's row once
    // its backend ID is committed and polled (the row may be read between).
    let index: i64 = wait_for(
        "the second attempt's DiracX status",
        Duration::from_secs(30),
        || async {
            let row = db
                .query_opt(
                    "SELECT job_index FROM dispatcher.jobs
                     WHERE production_id = $1 AND attempt = 2 AND raw_status LIKE 'Received%'",
                    &[&production],
                )
                .await
                .unwrap()?;
            Some(row.get(0))
        },
    )
    .await
    .unwrap();
    assert_eq!(retry.1.0, format!("{prefix}{index:06}.a2"));
    // While the retry is in flight the dispatcher polls every 300 ms: its
    // token nears expiry (by the margin) and is fetched again before it expires.
    wait_for(
        "the token fetched again",
        Duration::from_secs(30),
        || async {
            let runs = std::fs::read_to_string(&token_runs).unwrap_or_default();
            (runs.lines().count() >= 2).then_some(())
        },
    )
    .await
    .unwrap();
    diracx.run(&[retry.0]).await;
    diracx
        .report(&[retry.0], "Done", "Execution Complete")
        .await;
    let last = app.watch(&production).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    assert_eq!(last.counts.unwrap().done, 25);
    let rows = db
        .query(
            "SELECT raw_status FROM dispatcher.jobs WHERE production_id = $1",
            &[&production],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 25);
    for row in rows {
        // DIRAC's own word is kept beside ours.
        assert_eq!(row.get::<_, &str>(0), "Done: Execution Complete");
    }
    // 26 DIRAC jobs for 25 jobs and one retry: no attempt was submitted twice.
    assert_eq!(diracx.jobs(&prefix).await.len(), 26);
    // The dashboard's production page shows DIRAC's Status and MinorStatus
    // of each job apart, and says why it shows no log.
    let status = format!("http://{}", app.stack.addr(Service::Status).unwrap());
    let http = reqwest::Client::new();
    let listed: serde_json::Value = http
        .get(format!(
            "{status}/api/productions/{production}/jobs?page_size=100"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = listed["jobs"].as_array().unwrap();
    assert_eq!(listed.len(), 25);
    for job in listed {
        assert_eq!(job["wms"], "dirac", "{job}");
        assert_eq!(job["installation"], DIRAC, "{job}");
        assert_eq!(job["wms_status"], "Done", "{job}");
        assert_eq!(job["wms_minor_status"], "Execution Complete", "{job}");
    }
    assert_eq!(listed[index as usize]["attempt"], 2);
    assert_eq!(
        listed[index as usize]["backend_job_id"],
        retry.0.to_string()
    );
    let log: serde_json::Value = http
        .get(format!("{status}/api/productions/{production}/jobs/0/log"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(log["available"], false, "{log}");
    assert!(
        log["unavailable_reason"]
            .as_str()
            .unwrap()
            .contains("output sandbox"),
        "{log}"
    );
    app.stop().await;
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_kills_queued_and_running_jobs_through_the_status_call() {
    let url = start_diracx();
    let dir = std::env::temp_dir().join(format!("prodsys-dirac-cancel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (token_command, _) = counting_token_command(&dir);
    let app = spawn_app_with(|env| on_dirac(env, &url, &token_command)).await;
    let diracx = DiracX::new(&url);

    let production = app
        .accepted(sleep_request(4, 0.0, -1, "dirac-cancel", DIRAC))
        .await;
    let prefix = job_prefix(&app, &production).await;
    let jobs = wait_for("4 jobs in DiracX", Duration::from_secs(60), || async {
        let jobs = diracx.jobs(&prefix).await;
        (jobs.len() == 4).then_some(jobs)
    })
    .await
    .unwrap();
    let mut ids: Vec<u64> = jobs.keys().copied().collect();
    ids.sort();
    // Two run at the site, two still wait in the task queue.
    diracx.run(&ids[..2]).await;
    wait_for("2 running", Duration::from_secs(30), || async {
        (counts(&app, &production).await.running == 2).then_some(())
    })
    .await
    .unwrap();

    app.cancel(&production, "test").await.unwrap();
    let last = app.watch(&production).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Cancelled, "{last:?}");
    assert_eq!(last.counts.unwrap().cancelled, 4);
    let killed = wait_for(
        "DiracX to mark them Killed",
        Duration::from_secs(30),
        || async {
            let jobs = diracx.jobs(&prefix).await;
            jobs.values().all(|(_, s, _)| s == "Killed").then_some(jobs)
        },
    )
    .await
    .unwrap();
    assert_eq!(killed.len(), 4);
    assert!(
        killed
            .values()
            .all(|(_, _, minor)| minor.contains("prodsys")),
        "{killed:?}"
    );
    app.stop().await;
    std::fs::remove_dir_all(dir).ok();
}

/// The JDL DiracX holds for job `id`, as submitted (DiracX keeps it
/// zlib-compressed, base64).
fn stored_jdl(id: u64) -> String {
    let db = prodsys_testkit::repo_root().join("var/servers/diracx/state/db/jobdb.db");
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import base64, sqlite3, sys, zlib; c = sqlite3.connect(sys.argv[1]); \
             jdl = c.execute('SELECT OriginalJDL FROM JobJDLs WHERE JobID = ?', (int(sys.argv[2]),)).fetchone()[0]; \
             print(zlib.decompress(base64.b64decode(jdl)).decode())",
        )
        .arg(&db)
        .arg(id.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The value of a JDL string attribute, its escapes undone.
fn jdl_attribute(jdl: &str, name: &str) -> Option<String> {
    let start = jdl.find(&format!("{name} = \""))? + name.len() + 4;
    let mut value = String::new();
    let mut chars = jdl[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => value.push(chars.next()?),
            '"' => return Some(value),
            c => value.push(c),
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_container_job_runs_from_its_jdl_on_a_worker_node() {
    let url = start_diracx();
    let dir = std::env::temp_dir().join(format!("prodsys-dirac-km3net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (token_command, _) = counting_token_command(&dir);
    let mut image = String::new();
    let app = spawn_app_with(|env| {
        on_dirac(env, &url, &token_command);
        image = support::use_km3net_templates(env);
    })
    .await;
    let diracx = DiracX::new(&url);
    let mut request = support::km3net_with(|p| {
        p["n_events"] = json!(20);
        p["events_per_job"] = json!(10);
    });
    request.backend = DIRAC.into();
    let production = app.accepted(request).await;
    let prefix = job_prefix(&app, &production).await;
    let jobs = wait_for("2 jobs in DiracX", Duration::from_secs(60), || async {
        let jobs = diracx.jobs(&prefix).await;
        (jobs.len() == 2).then_some(jobs)
    })
    .await
    .unwrap();
    let ids: Vec<u64> = jobs.keys().copied().collect();
    diracx.run(&ids).await;
    // The site: each job's JDL, run as a job wrapper runs it (`Executable
    // Arguments` through a shell, in the job's own directory), with podman.
    for id in &ids {
        let jdl = stored_jdl(*id);
        let executable = jdl_attribute(&jdl, "Executable").unwrap();
        let arguments = jdl_attribute(&jdl, "Arguments").unwrap();
        assert_eq!(executable, "/bin/sh", "{jdl}");
        let site = dir.join(format!("job-{id}"));
        std::fs::create_dir_all(&site).unwrap();
        let ran = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("{executable} {arguments}"))
            .current_dir(&site)
            .output()
            .unwrap();
        assert!(ran.status.success(), "{jdl}\n{ran:?}");
        // The script the job wrote and ran (returned in its output sandbox).
        let script = std::fs::read_to_string(site.join("prodsys-job.sh")).unwrap();
        assert!(script.contains(&image), "the pinned image: {script}");
        assert!(
            !script.contains(&*app.env.work_dir.to_string_lossy()),
            "nothing of the dispatcher's filesystem: {script}"
        );
        assert!(
            jdl.contains("prodsys-job.sh"),
            "in the output sandbox: {jdl}"
        );
        let written: Vec<PathBuf> = std::fs::read_dir(site.join("output"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(written.len(), 1, "one event file: {written:?}");
        let bytes = std::fs::read(&written[0]).unwrap();
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]).to_string();
        // The derived template's parameters reached the container.
        for line in [
            "template: gseagen-7.4.1-seawater-v2",
            "parameter: seawater_model=v2",
            &format!("image: {image}"),
            "detector: ORCA10",
        ] {
            assert!(text.contains(line), "{line:?} in {text}");
        }
    }
    diracx.report(&ids, "Done", "Execution Complete").await;
    let last = app.watch(&production).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    assert_eq!(last.counts.unwrap().done, 2);
    app.stop().await;
    std::fs::remove_dir_all(dir).ok();
}

/// XRootD instance of the remote-site tests: its `root://127.0.0.1:PORT`.
fn xrootd() -> String {
    server("xrootd", "dirac-remote")
}

/// The DIRAC installation as a site that shares nothing with the
/// dispatcher, its productions' outputs going to destination `se` (XRootD
/// under `base`); a chained test profile that reads its inputs with xrdcp.
fn on_remote_dirac(env: &mut TestEnv, url: &str, token_command: &Path, xrootd: &str, base: &str) {
    on_dirac(env, url, token_command);
    if let Some(BackendSettings::Dirac(dirac)) = env.settings.dispatcher.backends.get_mut(DIRAC) {
        dirac.shared_filesystem = false;
    }
    forwarding_to(env, "se", xroot_destination(xrootd, base));
    // Each input fetched from the storage; each output names its input and
    // holds its bytes, so checksums prove what flowed.
    let profile = json!({
        "name": "test-chain-xrootd",
        "description": "Test jobs chained after a test-count production, reading their inputs from root:// URLs with xrdcp",
        "id_prefix": "TCX",
        "parameters": {
            "type": "object",
            "additionalProperties": false,
            "required": ["input_production", "tag"],
            "properties": {
                "input_production": { "type": "string", "pattern": "^COUNT-[0-9]{1,18}$" },
                "tag": { "type": "string" }
            }
        },
        "identity": ["input_production", "tag"],
        "inputs": {
            "production": "input_production",
            "profile": "test-count",
            "group_size": 2,
            "list_file": "inputs.lst"
        },
        "resources": { "cpu_seconds_per_unit": 1, "memory_mb": 100, "disk_mb_per_unit": 0 },
        "max_attempts": 2,
        "job": {
            "command": [
                "sh", "-c",
                "mkdir -p {output_dir} && test {input_count} -eq $(wc -l < {input_list}) && for f in $(cat {input_list}); do n=$(basename $f .txt); xrdcp --nopbar --force $f $n.in && (echo from $n; cat $n.in) > {output_dir}/$n.chained; done"
            ]
        },
        "outputs": {
            "dir": "output",
            "lfn": "/test/{production_id}/{file_name}",
            "metadata": { "input_production": "{input_production}" }
        }
    });
    std::fs::write(
        env.settings.profiles_dir.join("test-chain-xrootd.json"),
        serde_json::to_string_pretty(&profile).unwrap(),
    )
    .unwrap();
}

/// A test-count production (tests/profiles) of `jobs` jobs, each writing one
/// file, on the DIRAC installation, forwarded to `forward`.
fn count_request(jobs: u64, tag: &str, forward: &[&str]) -> pb::SubmitRequestRequest {
    pb::SubmitRequestRequest {
        profile: "test-count".into(),
        vo: "test".into(),
        parameters_json: json!({"jobs": jobs, "per_job": 1, "seconds": 0, "tag": tag}).to_string(),
        backend: DIRAC.into(),
        forward: forward.iter().map(|d| d.to_string()).collect(),
        ..cta_example()
    }
}

/// The worker node: runs job `id`'s JDL as a job wrapper does (`Executable
/// Arguments` through a shell, in a directory of its own under `site`).
fn run_on_worker_node(site: &Path, id: u64) -> String {
    let jdl = stored_jdl(id);
    let executable = jdl_attribute(&jdl, "Executable").unwrap();
    let arguments = jdl_attribute(&jdl, "Arguments").unwrap();
    let dir = site.join(format!("job-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let ran = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("{executable} {arguments}"))
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(ran.status.success(), "{jdl}\n{ran:?}");
    std::fs::read_to_string(dir.join("prodsys-job.sh")).unwrap()
}

/// The DiracX jobs of `prefix` once there are `n`, by name.
async fn named_jobs(diracx: &DiracX, prefix: &str, n: usize) -> BTreeMap<String, u64> {
    wait_for(
        &format!("{n} jobs in DiracX"),
        Duration::from_secs(60),
        || async {
            let jobs = diracx.jobs(prefix).await;
            (jobs.len() == n).then(|| {
                jobs.into_iter()
                    .map(|(id, (name, _, _))| (name, id))
                    .collect()
            })
        },
    )
    .await
    .unwrap()
}

/// A DIRAC installation that does not share the work directory, its
/// outputs going to an XRootD destination: the servers, a directory of the
/// test's own (its token command and the site's), and the stack.
struct RemoteSite {
    xrootd: String,
    base: String,
    dir: PathBuf,
    app: App,
    diracx: DiracX,
}

impl RemoteSite {
    async fn start(tag: &str) -> RemoteSite {
        let url = start_diracx();
        let xrootd = xrootd();
        let base = base_path();
        let dir = std::env::temp_dir().join(format!("prodsys-dirac-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (token_command, _) = counting_token_command(&dir);
        let app =
            spawn_app_with(|env| on_remote_dirac(env, &url, &token_command, &xrootd, &base)).await;
        RemoteSite {
            xrootd,
            base,
            dir,
            app,
            diracx: DiracX::new(&url),
        }
    }
}

/// Where XRootD instance `dirac-remote` keeps `lfn` of a destination under `base`.
fn on_storage_disk(base: &str, lfn: &str) -> PathBuf {
    xrootd_data("dirac-remote").join(format!("{}{lfn}", &base[1..]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_remote_site_uploads_its_outputs_and_prodsys_catalogues_them_from_the_storage() {
    let RemoteSite {
        xrootd,
        base,
        dir,
        app,
        diracx,
    } = RemoteSite::start("remote").await;

    let production = app.accepted(count_request(3, "remote", &["se"])).await;
    let prefix = job_prefix(&app, &production).await;
    let first = named_jobs(&diracx, &prefix, 3).await;
    let ids: Vec<u64> = first.values().copied().collect();
    diracx.run(&ids).await;
    let site = dir.join("site");
    for id in &ids {
        let script = run_on_worker_node(&site, *id);
        assert!(
            !script.contains(&*app.env.work_dir.to_string_lossy()),
            "nothing of the dispatcher's filesystem: {script}"
        );
        assert!(
            script.contains(&format!("{xrootd}/{base}/test/{production}")),
            "{script}"
        );
    }
    // What the site wrote is on the storage at each file's LFN (job i
    // writes run i+1); one upload arrives corrupt, another never arrives.
    let lfn = |run: u64| format!("/test/{production}/run{run}.txt");
    let corrupt = on_storage_disk(&base, &lfn(1));
    assert_eq!(std::fs::read_to_string(&corrupt).unwrap(), "run 1\n");
    std::fs::write(&corrupt, "run 7\n").unwrap();
    std::fs::remove_file(on_storage_disk(&base, &lfn(2))).unwrap();
    diracx.report(&ids, "Done", "Execution Complete").await;

    // Those two attempts failed and come back as second attempts; the third job is done.
    let second = named_jobs(&diracx, &prefix, 5).await;
    let retries: Vec<(&String, &u64)> = second.iter().filter(|(n, _)| n.ends_with(".a2")).collect();
    assert_eq!(
        retries
            .iter()
            .map(|(n, _)| n[prefix.len()..].to_string())
            .collect::<Vec<_>>(),
        ["000000.a2", "000001.a2"]
    );
    let retry_ids: Vec<u64> = retries.iter().map(|(_, id)| **id).collect();
    diracx.run(&retry_ids).await;
    for id in &retry_ids {
        run_on_worker_node(&site, *id);
    }
    diracx
        .report(&retry_ids, "Done", "Execution Complete")
        .await;
    let last = app.watch(&production).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    assert_eq!(last.counts.unwrap().done, 3);

    // Every file catalogued at its place on the storage, with the adler32
    // the storage reports; the copy there counts as forwarded, once verified.
    let files = wait_for(
        "every file verified on se",
        Duration::from_secs(30),
        || async {
            let files = files_of(&app, &production).await;
            (files.len() == 3
                && files
                    .iter()
                    .all(|(_, r)| replica_in(r, "se", pb::ReplicaState::Verified).is_some()))
            .then_some(files)
        },
    )
    .await
    .unwrap();
    for (index, (file, replicas)) in files.iter().enumerate() {
        let run = index + 1;
        assert_eq!(file.lfn, lfn(run as u64), "{file:?}");
        let path = format!("/{}{}", &base[1..], file.lfn);
        assert_eq!(file.url, format!("{xrootd}/{path}"), "{file:?}");
        let on_storage = storage_adler32(&xrootd, &path).expect("on the storage");
        assert_eq!(file.adler32, on_storage, "{file:?}");
        let expected = format!("run {run}\n");
        assert_eq!(file.size, expected.len() as u64);
        let (_, written) = prodsys_core::checksum::adler32_hex(expected.as_bytes()).unwrap();
        assert_eq!(file.adler32, written, "{file:?}");
        assert_eq!(replicas.len(), 1, "{replicas:?}");
        assert_eq!(replicas[0].url, file.url, "{replicas:?}");
    }
    app.production_when("finished", Duration::from_secs(30), &production, |p| {
        p.finished
    })
    .await;
    app.stop().await;
    std::fs::remove_dir_all(dir).ok();
}

/// A test-chain-xrootd production over `parent`'s files, on the DIRAC installation.
fn chained_request(parent: &str, tag: &str) -> pb::SubmitRequestRequest {
    pb::SubmitRequestRequest {
        profile: "test-chain-xrootd".into(),
        vo: "test".into(),
        parameters_json: json!({"input_production": parent, "tag": tag}).to_string(),
        backend: DIRAC.into(),
        forward: vec!["se".into()],
        ..cta_example()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chained_job_at_a_remote_site_reads_its_inputs_from_the_storage() {
    let RemoteSite {
        xrootd,
        base,
        dir,
        app,
        diracx,
    } = RemoteSite::start("chain").await;
    let site = dir.join("site");

    // The parent runs at the site too: its outputs are on the storage.
    let parent = app
        .accepted(count_request(2, "chain-parent", &["se"]))
        .await;
    let child = app.accepted(chained_request(&parent, "chain")).await;
    let parent_jobs = named_jobs(&diracx, &job_prefix(&app, &parent).await, 2).await;
    let ids: Vec<u64> = parent_jobs.values().copied().collect();
    diracx.run(&ids).await;
    for id in &ids {
        run_on_worker_node(&site, *id);
    }
    diracx.report(&ids, "Done", "Execution Complete").await;
    let last = app.watch(&parent).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    let inputs: Vec<String> = app
        .files(&parent)
        .await
        .into_iter()
        .map(|f| f.url)
        .collect();
    assert!(
        inputs.iter().all(|u| u.starts_with("root://")),
        "{inputs:?}"
    );

    // The child's one job (two inputs per job) gets them as root:// URLs in
    // its input list, written by its script on the worker node.
    let child_jobs = named_jobs(&diracx, &job_prefix(&app, &child).await, 1).await;
    let id = *child_jobs.values().next().unwrap();
    diracx.run(&[id]).await;
    let script = run_on_worker_node(&site, id);
    let mut listed: Vec<String> =
        std::fs::read_to_string(site.join(format!("job-{id}/inputs.lst")))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
    listed.sort();
    let mut expected = inputs.clone();
    expected.sort();
    assert_eq!(listed, expected, "{script}");
    diracx.report(&[id], "Done", "Execution Complete").await;
    let last = app.watch(&child).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    let mut files = app.files(&child).await;
    files.sort_by(|a, b| a.lfn.cmp(&b.lfn));
    assert_eq!(files.len(), 2, "{files:?}");
    for (index, file) in files.iter().enumerate() {
        let run = index + 1;
        // Made of the parent's file, as the storage holds it.
        let bytes = std::fs::read(on_storage_disk(&base, &file.lfn)).unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            format!("from run{run}\nrun {run}\n")
        );
        let path = format!("/{}{}", &base[1..], file.lfn);
        assert_eq!(file.url, format!("{xrootd}/{path}"));
        assert_eq!(Some(file.adler32.clone()), storage_adler32(&xrootd, &path));
    }
    app.stop().await;
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_remote_site_is_given_no_job_whose_files_it_could_not_reach() {
    let url = start_diracx();
    let xrootd = xrootd();
    let base = base_path();
    let dir = std::env::temp_dir().join(format!("prodsys-dirac-refused-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (token_command, _) = counting_token_command(&dir);
    let app = spawn_app_with(|env| {
        on_remote_dirac(env, &url, &token_command, &xrootd, &base);
        env.settings
            .federation
            .groups
            .insert("remote-sites".into(), vec![DIRAC.into()]);
    })
    .await;
    let diracx = DiracX::new(&url);
    let db = app.env.db().await.unwrap();
    let reasons = |production: String| {
        let db = &db;
        async move {
            db.query(
                "SELECT state, raw_status FROM dispatcher.jobs WHERE production_id = $1",
                &[&production],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect::<Vec<_>>()
        }
    };

    // Outputs forwarded nowhere: nothing a remote job could write to. The
    // checker refuses that for the installation named; through a group the
    // dispatcher refuses each attempt before submitting it.
    let refused = app
        .decided(
            &app.submit(count_request(1, "nowhere", &[]))
                .await
                .unwrap()
                .request_id,
        )
        .await;
    assert_eq!(refused.state(), pb::RequestState::Rejected, "{refused:?}");
    assert_eq!(refused.violations[0].field, "forward", "{refused:?}");
    assert!(
        refused.violations[0]
            .description
            .contains("does not share the dispatcher's work directory"),
        "{refused:?}"
    );
    let mut grouped = count_request(1, "nowhere", &[]);
    grouped.backend = "remote-sites".into();
    let nowhere = app.accepted(grouped).await;
    let last = app.watch(&nowhere).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Failed, "{last:?}");
    for (state, reason) in reasons(nowhere.clone()).await {
        assert_eq!(state, "EXHAUSTED");
        assert!(reason.contains("forwards its outputs nowhere"), "{reason}");
    }
    assert!(
        diracx
            .jobs(&job_prefix(&app, &nowhere).await)
            .await
            .is_empty()
    );

    // Inputs that are files on the dispatcher's host (the parent ran on the
    // local executor): no site can read them.
    let mut local = count_request(2, "local-parent", &[]);
    local.backend = "local".into();
    let parent = app.accepted(local).await;
    let child = app.accepted(chained_request(&parent, "local-inputs")).await;
    let last = app.watch(&child).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Failed, "{last:?}");
    for (state, reason) in reasons(child.clone()).await {
        assert_eq!(state, "EXHAUSTED");
        assert!(
            reason.contains("is a file on the dispatcher's host"),
            "{reason}"
        );
    }
    assert!(
        diracx
            .jobs(&job_prefix(&app, &child).await)
            .await
            .is_empty()
    );
    app.stop().await;
    std::fs::remove_dir_all(dir).ok();
}
