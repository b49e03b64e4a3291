//! Federated resources: a request naming a group of installations has its
//! jobs placed by free room and share, an installation that stops has its
//! unfinished jobs finish elsewhere (none twice), and unknown names are
//! refused as backend violations.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prodsys_config::BackendSettings;
use prodsys_proto as pb;
use prodsys_testkit::{TestEnv, wait_for};
use support::{App, sleep_request, spawn_app_with, use_test_profiles};

const GROUP: &str = "pair";
const SMALL: &str = "local-small";
const LARGE: &str = "local-large";

/// Two local installations, one running 1 job at once and one 3, in group `pair`.
fn two_installations(env: &mut TestEnv) {
    use_test_profiles(env);
    env.settings.dispatcher.poll_interval_ms = 200;
    for (name, max_running) in [(SMALL, 1), (LARGE, 3)] {
        env.settings.dispatcher.backends.insert(
            name.into(),
            BackendSettings::Local {
                max_running,
                max_queued: 0,
                work_dir: Some(env.work_dir.join(name)),
            },
        );
    }
    env.settings
        .federation
        .groups
        .insert(GROUP.into(), vec![SMALL.into(), LARGE.into()]);
}

/// Each job's (installation, attempt, state) as the dispatcher recorded it.
async fn placements(app: &App, production: &str) -> BTreeMap<i64, (String, i32, String)> {
    let db = app.env.db().await.unwrap();
    db.query(
        "SELECT job_index, COALESCE(installation, ''), attempt, state FROM dispatcher.jobs
         WHERE production_id = $1",
        &[&production],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
    .collect()
}

/// A finished production's record (rendered as `format`) once it says
/// where its jobs ran.
async fn placed_record(
    app: &App,
    production: &str,
    format: pb::RecordFormat,
) -> pb::ProductionRecord {
    wait_for(
        &format!("the record of {production}"),
        Duration::from_secs(30),
        || async {
            app.catalog
                .clone()
                .get_production_record(pb::GetProductionRecordRequest {
                    production_id: production.to_string(),
                    format: format as i32,
                })
                .await
                .ok()
                .map(|r| r.into_inner())
                .filter(|r| !r.installations.is_empty())
        },
    )
    .await
    .unwrap()
}

/// A record's DONE jobs per installation.
fn done_per_installation(record: &pb::ProductionRecord) -> BTreeMap<String, u64> {
    record
        .installations
        .iter()
        .map(|i| (i.installation.clone(), i.counts.unwrap_or_default().done))
        .collect()
}

/// Attempt directories under `root` for `production` whose job exited 0, by job index.
fn successful_attempts(root: &Path, production: &str) -> BTreeMap<u64, Vec<PathBuf>> {
    let mut found: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(root.join(production)) else {
        return found;
    };
    for entry in entries {
        let dir = entry.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let index: u64 = name.split('.').next().unwrap().parse().unwrap();
        let exit = std::fs::read_to_string(dir.join("prodsys.exit")).unwrap_or_default();
        if exit.starts_with("exit 0") {
            found.entry(index).or_default().push(dir);
        }
    }
    found
}

/// The process groups of the attempts running under `root` (their supervisors' pids).
fn running_supervisors(root: &Path, production: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(root.join(production)) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let dir = e.unwrap().path();
            if dir.join("prodsys.exit").exists() {
                return None;
            }
            let pid = std::fs::read_to_string(dir.join("prodsys.pid")).ok()?;
            pid.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

fn signal_group(signal: &str, pid: u32) {
    let _ = std::process::Command::new("kill")
        .args([signal, "--", &format!("-{pid}")])
        .status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_splits_jobs_by_capacity_and_a_stopped_installation_s_jobs_finish_elsewhere_once() {
    let app = spawn_app_with(two_installations).await;
    let small_dir = app.env.work_dir.join(SMALL);
    let large_dir = app.env.work_dir.join(LARGE);

    // 1. Split by capacity: 12 jobs of 1.5 s over installations of 1 and 3 slots.
    let split = app
        .accepted(sleep_request(12, 1.5, -1, "split", GROUP))
        .await;
    let last = app.watch(&split).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    assert_eq!(last.backend, GROUP);
    let placed = placements(&app, &split).await;
    let on = |name: &str| placed.values().filter(|(i, _, _)| i == name).count();
    let (small, large) = (on(SMALL), on(LARGE));
    assert_eq!(small + large, 12, "{placed:?}");
    assert!(small >= 1, "the small installation took none: {placed:?}");
    assert!(
        large >= 2 * small,
        "the larger installation should take about 3 times as many: {small} vs {large}"
    );
    // Status shows the jobs per installation, as the dispatcher placed them.
    let per: BTreeMap<String, u64> = app
        .production_when(
            "jobs per installation",
            Duration::from_secs(10),
            &split,
            |p| {
                p.installations
                    .iter()
                    .map(|i| i.counts.unwrap_or_default().done)
                    .sum::<u64>()
                    == 12
            },
        )
        .await
        .installations
        .iter()
        .map(|i| (i.installation.clone(), i.counts.unwrap_or_default().done))
        .collect();
    assert_eq!(
        per,
        BTreeMap::from([
            (LARGE.to_string(), large as u64),
            (SMALL.to_string(), small as u64)
        ])
    );
    // The dashboard's JSON says the same.
    let http = app.stack.addr(prodsys::Service::Status).unwrap();
    let view: serde_json::Value = reqwest::get(format!("http://{http}/api/productions/{split}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let installations = view["installations"].as_array().unwrap();
    assert_eq!(installations.len(), 2, "{view}");
    assert_eq!(installations[0]["installation"], LARGE);
    assert_eq!(installations[0]["counts"]["done"], large as u64);
    // The production's record says where its jobs ran.
    let record = placed_record(&app, &split, pb::RecordFormat::Unspecified).await;
    assert_eq!(done_per_installation(&record), per, "{record:?}");
    // ... and which jobs ran where, as the dispatcher placed them.
    let placed = placements(&app, &split).await;
    for i in &record.installations {
        let jobs: Vec<i64> = i
            .jobs
            .iter()
            .flat_map(|r| r.first as i64..=r.last as i64)
            .collect();
        let there: Vec<i64> = placed
            .iter()
            .filter(|(_, (installation, _, _))| installation == &i.installation)
            .map(|(job, _)| *job)
            .collect();
        assert_eq!(jobs, there, "{}: {record:?}", i.installation);
        assert!(!i.jobs_truncated, "{record:?}");
    }
    // ... in each of its renderings too: JSON, and the RO-Crate's places of the run.
    let rendered = |format: pb::RecordFormat| {
        let mut catalog = app.catalog.clone();
        let production_id = split.clone();
        async move {
            catalog
                .get_production_record(pb::GetProductionRecordRequest {
                    production_id,
                    format: format as i32,
                })
                .await
                .unwrap()
                .into_inner()
                .rendered
        }
    };
    let as_json: serde_json::Value =
        serde_json::from_str(&rendered(pb::RecordFormat::Json).await).unwrap();
    let from_json: BTreeMap<String, u64> = as_json["installations"]
        .as_array()
        .unwrap_or_else(|| panic!("{as_json}"))
        .iter()
        .map(|i| {
            (
                i["installation"].as_str().unwrap().to_string(),
                i["counts"]["done"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(from_json, per, "{as_json}");
    let ro_crate: serde_json::Value =
        serde_json::from_str(&rendered(pb::RecordFormat::RoCrate).await).unwrap();
    let graph = ro_crate["@graph"].as_array().unwrap();
    let run = graph.iter().find(|e| e["@type"] == "CreateAction").unwrap();
    let places: Vec<String> = run["location"]
        .as_array()
        .unwrap_or_else(|| panic!("{run}"))
        .iter()
        .map(|l| {
            let id = l["@id"].as_str().unwrap();
            let place = graph.iter().find(|e| e["@id"] == id).unwrap();
            place["name"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(places, [LARGE, SMALL], "{run}");
    // Every job ran once, where the dispatcher says it did.
    let runs_small = successful_attempts(&small_dir, &split);
    let runs_large = successful_attempts(&large_dir, &split);
    assert_eq!(runs_small.len() + runs_large.len(), 12);
    assert_eq!((runs_small.len(), runs_large.len()), (small, large));

    // 2. The large installation stops mid-run: its running jobs die and its
    // disk goes; what it had not finished completes on the small one.
    let stopped = app
        .accepted(sleep_request(10, 4.0, -1, "stopped", GROUP))
        .await;
    wait_for(
        "three jobs running on the large installation",
        Duration::from_secs(30),
        || async {
            let running = placements(&app, &stopped)
                .await
                .values()
                .filter(|(i, _, s)| i == LARGE && s == "RUNNING")
                .count();
            let pids = running_supervisors(&large_dir, &stopped);
            (running == 3 && pids.len() == 3).then_some(())
        },
    )
    .await
    .unwrap();
    // Frozen first, so nothing finishes between the disk going and the kill.
    let pids = running_supervisors(&large_dir, &stopped);
    for pid in &pids {
        signal_group("-STOP", *pid);
    }
    let gone = app.env.work_dir.join(format!("{LARGE}.stopped"));
    std::fs::rename(&large_dir, &gone).unwrap();
    std::fs::write(&large_dir, "this installation is stopped\n").unwrap();
    for pid in &pids {
        signal_group("-KILL", *pid);
    }
    let last = app.watch(&stopped).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    assert_eq!(last.counts.unwrap().done, 10, "{last:?}");
    let placed = placements(&app, &stopped).await;
    // The three killed jobs were retried on the small installation (a retry
    // the large one took before it was seen failing, and never started,
    // was released to it as a further attempt).
    let moved: Vec<_> = placed
        .iter()
        .filter(|(_, (i, attempt, _))| i == SMALL && *attempt >= 2)
        .collect();
    assert_eq!(moved.len(), 3, "{placed:?}");
    assert!(placed.values().all(|(_, _, s)| s == "DONE"), "{placed:?}");
    // None ran twice: one successful attempt per job, over both installations.
    let runs_small = successful_attempts(&small_dir, &stopped);
    let runs_large = successful_attempts(&gone, &stopped);
    for index in 0..10u64 {
        let n =
            runs_small.get(&index).map_or(0, Vec::len) + runs_large.get(&index).map_or(0, Vec::len);
        assert_eq!(n, 1, "job {index}: {runs_small:?} {runs_large:?}");
    }
    let files = wait_for("10 files", Duration::from_secs(30), || async {
        let files = app.files(&stopped).await;
        (files.len() == 10).then_some(files)
    })
    .await
    .unwrap();
    let runs: std::collections::BTreeSet<_> = files.iter().map(|f| f.lfn.clone()).collect();
    assert_eq!(runs.len(), 10);
    // The record counts each job where its last attempt ran: the moved jobs
    // on the small installation, beside those that ran there from the start.
    // (The attempts killed on the large one are in its attempts and retries,
    // not in its jobs per installation.)
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for (installation, _, _) in placed.values() {
        *expected.entry(installation.clone()).or_default() += 1;
    }
    assert!(expected[SMALL] >= 3, "{expected:?}");
    let record = placed_record(&app, &stopped, pb::RecordFormat::Json).await;
    assert_eq!(done_per_installation(&record), expected, "{record:?}");
    assert!(record.retries >= 3, "{record:?}");
    let as_json: serde_json::Value = serde_json::from_str(&record.rendered).unwrap();
    let small_done = as_json["installations"]
        .as_array()
        .unwrap_or_else(|| panic!("{as_json}"))
        .iter()
        .find(|i| i["installation"] == SMALL)
        .map(|i| i["counts"]["done"].as_u64().unwrap());
    assert_eq!(small_done, Some(expected[SMALL]), "{as_json}");
    // Status told the large installation failing.
    let db = app.env.db().await.unwrap();
    let healthy: bool = db
        .query_one(
            "SELECT healthy FROM dispatcher.installation_health WHERE installation = $1",
            &[&LARGE],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!healthy);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_groups_and_installations_are_backend_violations() {
    let app = spawn_app_with(two_installations).await;
    for backend in [GROUP, "any", SMALL] {
        let verdict = app.validate(sleep_request(2, 0.0, -1, "ok", backend)).await;
        assert!(verdict.acceptable, "{backend}: {verdict:?}");
    }
    let verdict = app
        .validate(sleep_request(2, 0.0, -1, "unknown", "nowhere"))
        .await;
    assert!(!verdict.acceptable);
    let violation = verdict
        .violations
        .iter()
        .find(|v| v.field == "backend")
        .unwrap_or_else(|| panic!("{verdict:?}"));
    assert!(
        violation.description.contains("\"nowhere\"") && violation.description.contains(GROUP),
        "{violation:?}"
    );
    // Submitted, the same name is refused with the same violation.
    let request = app
        .submit(sleep_request(2, 0.0, -1, "unknown", "nowhere"))
        .await
        .unwrap();
    let decided = app.decided(&request.request_id).await;
    assert_eq!(decided.state(), pb::RequestState::Rejected, "{decided:?}");
    assert!(
        decided.violations.iter().any(|v| v.field == "backend"),
        "{decided:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_federated_production_kills_its_jobs_on_every_installation() {
    let app = spawn_app_with(two_installations).await;
    // An odd duration, to find the jobs' own processes afterwards.
    let production = app
        .accepted(sleep_request(8, 67.313, -1, "cancel", GROUP))
        .await;
    wait_for(
        "jobs running on both installations",
        Duration::from_secs(30),
        || async {
            let placed = placements(&app, &production).await;
            let running = |name: &str| {
                placed
                    .values()
                    .filter(|(i, _, s)| i == name && s == "RUNNING")
                    .count()
            };
            (running(SMALL) == 1 && running(LARGE) == 3).then_some(())
        },
    )
    .await
    .unwrap();
    assert!(app.cancel(&production, "enough").await.unwrap().accepted);
    let last = app.watch(&production).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Cancelled, "{last:?}");
    assert_eq!(last.counts.unwrap().cancelled, 8, "{last:?}");
    // Nothing of it runs anywhere.
    let left = wait_for("its processes to end", Duration::from_secs(10), || async {
        let out = std::process::Command::new("pgrep")
            .args(["-f", "sleep 67.313"])
            .output()
            .unwrap();
        out.stdout.is_empty().then_some(())
    })
    .await;
    assert!(left.is_ok(), "jobs of the cancelled production still run");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_installation_that_does_not_answer_is_given_nothing() {
    // A DIRAC installation whose server does not answer (nothing listens on
    // port 1), grouped with a local one.
    let app = spawn_app_with(|env| {
        two_installations(env);
        env.settings.dispatcher.backends.insert(
            "dirac-down".into(),
            BackendSettings::Dirac(prodsys_config::DiracSettings {
                url: "http://127.0.0.1:1".into(),
                token: Some("not-used".to_string().into()),
                token_file: None,
                token_command: vec![],
                token_refresh_margin_s: 300,
                ca_file: None,
                max_in_flight: 100,
                sites: vec![],
                output_se: None,
                jdl: Default::default(),
                shared_filesystem: false,
            }),
        );
        env.settings
            .federation
            .groups
            .insert("with-down".into(), vec!["dirac-down".into(), SMALL.into()]);
        // It would take most of the jobs if it answered.
        env.settings
            .federation
            .shares
            .insert("dirac-down".into(), 10.0);
    })
    .await;
    let production = app
        .accepted(sleep_request(4, 0.2, -1, "down", "with-down"))
        .await;
    let last = app.watch(&production).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    let placed = placements(&app, &production).await;
    assert!(
        placed
            .values()
            .all(|(i, attempt, _)| i == SMALL && *attempt == 1),
        "{placed:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_the_real_slurm_and_the_local_executor_jobs_split_by_capacity() {
    const SLURM: &str = "slurm-test";
    let app = spawn_app_with(|env| {
        support::start_slurm();
        two_installations(env);
        env.settings.dispatcher.poll_interval_ms = 300;
        env.settings.dispatcher.backends.insert(
            SLURM.into(),
            BackendSettings::Slurm {
                partition: "debug".into(),
                max_in_flight: 4,
                sbatch_args: vec![],
                shared_filesystem: true,
            },
        );
        env.settings
            .federation
            .groups
            .insert("mixed".into(), vec![SLURM.into(), SMALL.into()]);
    })
    .await;
    let production = app
        .accepted(sleep_request(10, 2.0, -1, "mixed", "mixed"))
        .await;
    let last = app.watch(&production).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    let placed = placements(&app, &production).await;
    let on = |name: &str| placed.values().filter(|(i, _, _)| i == name).count();
    let (slurm, local) = (on(SLURM), on(SMALL));
    assert_eq!(slurm + local, 10, "{placed:?}");
    assert!(
        local >= 1 && slurm > local,
        "Slurm (4 at once) should take more than the local installation (1): {slurm} vs {local}"
    );
    // The Slurm ones ran on the cluster.
    let on_cluster = support::slurm_jobs(&slurm_name(&app, &production).await);
    assert_eq!(on_cluster.len(), slurm, "{on_cluster:?}");
    let files = wait_for("10 files", Duration::from_secs(30), || async {
        let files = app.files(&production).await;
        (files.len() == 10).then_some(files)
    })
    .await
    .unwrap();
    assert_eq!(files.len(), 10);
    app.stop().await;
}

/// The prefix of this deployment's Slurm job names for `production`
/// (another test's production may have the same ID).
async fn slurm_name(app: &App, production: &str) -> String {
    let db = app.env.db().await.unwrap();
    let tag: String = db
        .query_one("SELECT tag FROM dispatcher.deployment", &[])
        .await
        .unwrap()
        .get(0);
    format!("{tag}.{production}.")
}

/// Slurm commands that run the real ones until `stopped` appears in their
/// directory, then fail the way they do while slurmctld is down.
fn slurm_shims(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    for command in ["sbatch", "squeue", "sacct", "sinfo", "scancel"] {
        let path = dir.join(command);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nif [ -e '{}' ]; then\n  echo 'slurm_load_jobs error: Unable to contact slurm controller (connect failure)' >&2\n  exit 1\nfi\nexec /usr/bin/{command} \"$@\"\n",
                dir.join("stopped").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// Attempt directories under `root` for `production` whose job wrote its
/// output (a job killed in its sleep writes none), by job index.
fn attempts_with_output(root: &Path, production: &str) -> BTreeMap<u64, usize> {
    let mut found: BTreeMap<u64, usize> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(root.join(production)) else {
        return found;
    };
    for entry in entries {
        let dir = entry.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let index: u64 = name.split('.').next().unwrap().parse().unwrap();
        let wrote = std::fs::read_dir(dir.join("output"))
            .map(|files| files.count() > 0)
            .unwrap_or(false);
        if wrote {
            *found.entry(index).or_default() += 1;
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_real_slurm_stopped_mid_run_has_its_jobs_finish_on_the_local_executor_once() {
    const SLURM: &str = "slurm-test";
    support::start_slurm();
    prodsys_telemetry::init("warn");
    let mut env = TestEnv::new().await.expect("test environment");
    two_installations(&mut env);
    env.settings.dispatcher.poll_interval_ms = 300;
    env.settings.dispatcher.backends.insert(
        SLURM.into(),
        BackendSettings::Slurm {
            partition: "debug".into(),
            max_in_flight: 4,
            sbatch_args: vec![],
            shared_filesystem: true,
        },
    );
    env.settings
        .federation
        .groups
        .insert("mixed".into(), vec![SLURM.into(), SMALL.into()]);
    // A Slurm that does not answer for 2 s has its jobs given up.
    env.settings.federation.abandon_after_s = 2;
    // The dispatcher runs as a process of its own, whose Slurm commands
    // stop answering when the test says so.
    let shims = env.work_dir.join("slurm-shims");
    slurm_shims(&shims);
    std::fs::create_dir_all(&env.work_dir).unwrap();
    let config = env.work_dir.join("dispatcher.toml");
    std::fs::write(&config, toml::to_string(&env.settings).unwrap()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let log = std::fs::File::create(env.work_dir.join("dispatcher.log")).unwrap();
    let path = format!(
        "{}:{}",
        shims.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut dispatcher = std::process::Command::new(support::built_binary("prodsys", "prodsys"))
        .args(["serve", "dispatcher", "--config"])
        .arg(&config)
        .env("PRODSYS__DISPATCHER__PORT", port.to_string())
        .env("PATH", path)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting prodsys serve dispatcher");
    let app = support::spawn_services(
        env,
        &[
            prodsys::Service::Catalog,
            prodsys::Service::Checker,
            prodsys::Service::Status,
            prodsys::Service::Intake,
        ],
    )
    .await;
    let production = app
        .accepted(sleep_request(10, 4.0, -1, "slurm-stops", "mixed"))
        .await;
    wait_for(
        "four jobs running on Slurm",
        Duration::from_secs(60),
        || async {
            let running = placements(&app, &production)
                .await
                .values()
                .filter(|(i, _, s)| i == SLURM && s == "RUNNING")
                .count();
            (running == 4).then_some(())
        },
    )
    .await
    .unwrap();
    // Slurm stops: its controller no longer answers and its jobs are lost.
    std::fs::write(shims.join("stopped"), "").unwrap();
    for (name, _) in support::slurm_jobs(&slurm_name(&app, &production).await) {
        let _ = std::process::Command::new("/usr/bin/scancel")
            .args(["-n", &name])
            .status();
    }
    let last = app.watch(&production).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    assert_eq!(last.counts.unwrap().done, 10, "{last:?}");
    let placed = placements(&app, &production).await;
    let moved = placed
        .values()
        .filter(|(i, attempt, _)| i == SMALL && *attempt >= 2)
        .count();
    assert!(
        moved >= 4,
        "the jobs lost on Slurm finish locally: {placed:?}"
    );
    // None ran twice: one attempt with outputs per job, over both.
    let on_slurm = attempts_with_output(&app.env.settings.dispatcher.work_dir, &production);
    let local = attempts_with_output(&app.env.work_dir.join(SMALL), &production);
    for index in 0..10u64 {
        let n =
            on_slurm.get(&index).copied().unwrap_or(0) + local.get(&index).copied().unwrap_or(0);
        assert_eq!(n, 1, "job {index}: {on_slurm:?} {local:?}");
    }
    // What was given up on Slurm is remembered, to be cancelled once it answers.
    let db = app.env.db().await.unwrap();
    let abandoned: i64 = db
        .query_one(
            "SELECT count(*) FROM dispatcher.abandoned_attempts WHERE installation = $1",
            &[&SLURM],
        )
        .await
        .unwrap()
        .get(0);
    assert!(abandoned >= 4, "{abandoned}");
    let _ = dispatcher.kill();
    let _ = dispatcher.wait();
    app.stop().await;
}

/// Makes a local installation fail as a lost disk does: its work directory
/// becomes a file.
fn break_installation(dir: &Path) {
    // A job still writing there, or a scheduler round starting an attempt,
    // may put the directory back while it is removed: again until the file
    // takes its place.
    for _ in 0..100 {
        let _ = std::fs::remove_dir_all(dir);
        match std::fs::write(dir, "this installation is stopped\n") {
            Ok(()) => return,
            Err(error) if error.kind() == std::io::ErrorKind::IsADirectory => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(error) => panic!("breaking {}: {error}", dir.display()),
        }
    }
    panic!("{} kept coming back as a directory", dir.display());
}

fn mend_installation(dir: &Path) {
    if dir.is_file() {
        std::fs::remove_file(dir).unwrap();
    }
    std::fs::create_dir_all(dir).unwrap();
}

/// Each job's (attempt, attempts moved, state), as the dispatcher recorded it.
async fn attempts(app: &App, production: &str) -> BTreeMap<i64, (i32, i32, String)> {
    let db = app.env.db().await.unwrap();
    db.query(
        "SELECT job_index, attempt, attempts_moved, state FROM dispatcher.jobs
         WHERE production_id = $1",
        &[&production],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
    .collect()
}

/// Attempt directories under `root` for `production` that started (the
/// supervisor wrote `prodsys.started`), by job index.
fn started_attempts(root: &Path, production: &str) -> BTreeMap<u64, usize> {
    let mut found: BTreeMap<u64, usize> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(root.join(production)) else {
        return found;
    };
    for entry in entries {
        let dir = entry.unwrap().path();
        if dir.join("prodsys.started").exists() {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            let index: u64 = name.split('.').next().unwrap().parse().unwrap();
            *found.entry(index).or_default() += 1;
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_is_held_only_while_all_its_installations_fail_and_moved_jobs_keep_their_retries() {
    let app = spawn_app_with(two_installations).await;
    let small_dir = app.env.work_dir.join(SMALL);
    let large_dir = app.env.work_dir.join(LARGE);
    let db = app.env.db().await.unwrap();
    let unhealthy = |name: &'static str| {
        let db = &db;
        async move {
            db.query_opt(
                "SELECT healthy FROM dispatcher.installation_health WHERE installation = $1",
                &[&name],
            )
            .await
            .unwrap()
            .is_some_and(|r| !r.get::<_, bool>(0))
            .then_some(())
        }
    };
    // 1. Every installation of the group fails.
    break_installation(&small_dir);
    break_installation(&large_dir);
    for name in [SMALL, LARGE] {
        wait_for("the installation failing", Duration::from_secs(30), || {
            unhealthy(name)
        })
        .await
        .unwrap();
    }
    // Job 0 always fails: the profile allows it 2 attempts that run.
    let production = app.accepted(sleep_request(4, 1.0, 0, "held", GROUP)).await;
    let held = app
        .production_when(
            "the production held",
            Duration::from_secs(30),
            &production,
            |p| !p.held_reason.is_empty(),
        )
        .await;
    assert!(
        held.held_reason
            .starts_with("held: every WMS installation of pair is failing (")
            && held.held_reason.contains(SMALL)
            && held.held_reason.contains(LARGE),
        "{held:?}"
    );
    let http = app.stack.addr(prodsys::Service::Status).unwrap();
    let view: serde_json::Value =
        reqwest::get(format!("http://{http}/api/productions/{production}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(view["held_reason"], held.held_reason.as_str(), "{view}");

    // 2. The large installation answers its probe but cannot start a job of
    // this production (a file where its directory goes): what it reserved
    // it never got, and it is released for the others.
    mend_installation(&large_dir);
    std::fs::write(large_dir.join(&production), "no room here\n").unwrap();
    wait_for(
        "job 0 moved off the large installation",
        Duration::from_secs(60),
        || async {
            let jobs = attempts(&app, &production).await;
            jobs.get(&0)
                .is_some_and(|(_, moved, _)| *moved >= 1)
                .then_some(())
        },
    )
    .await
    .unwrap();

    // 3. The small installation answers again: one member can take the
    // jobs, so the production is not held while it runs.
    mend_installation(&small_dir);
    let running = app
        .production_when(
            "the production no longer held",
            Duration::from_secs(60),
            &production,
            |p| p.held_reason.is_empty(),
        )
        .await;
    assert_eq!(running.state(), pb::ProductionState::Running, "{running:?}");
    std::fs::remove_file(large_dir.join(&production)).unwrap();
    let last = app
        .production_when(
            "the production ended",
            Duration::from_secs(120),
            &production,
            |p| p.state() == pb::ProductionState::PartiallyCompleted,
        )
        .await;
    let counts = last.counts.unwrap();
    assert_eq!((counts.done, counts.exhausted), (3, 1), "{last:?}");
    // Job 0 ran twice, as the profile allows, however often it was moved
    // before it started: the moves cost it no retry.
    let jobs = attempts(&app, &production).await;
    let (attempt, moved, state) = jobs[&0].clone();
    assert_eq!(state, "EXHAUSTED", "{jobs:?}");
    assert!(moved >= 1, "{jobs:?}");
    assert_eq!(attempt - moved, 2, "{jobs:?}");
    let on_small = started_attempts(&small_dir, &production);
    let on_large = started_attempts(&large_dir, &production);
    let runs = |index: u64| {
        on_small.get(&index).copied().unwrap_or(0) + on_large.get(&index).copied().unwrap_or(0)
    };
    assert_eq!(runs(0), 2, "{on_small:?} {on_large:?}");
    for index in 1..4u64 {
        assert_eq!(runs(index), 1, "job {index}: {on_small:?} {on_large:?}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn productions_sharing_installations_go_by_priority_and_equal_ones_take_turns() {
    let app = spawn_app_with(two_installations).await;
    // The group's four slots are taken ...
    let blocker = app
        .accepted(sleep_request(4, 6.0, -1, "blocker", GROUP))
        .await;
    let running = |production: String| {
        let app = &app;
        async move {
            placements(app, &production)
                .await
                .values()
                .filter(|(_, _, s)| s == "RUNNING")
                .count()
        }
    };
    wait_for(
        "the blocker on every slot",
        Duration::from_secs(30),
        || async { (running(blocker.clone()).await == 4).then_some(()) },
    )
    .await
    .unwrap();
    // ... while an older production over the group, a plain one of the
    // large installation of the same priority, and a newer urgent one wait.
    let older = app
        .accepted(sleep_request(8, 0.5, -1, "older", GROUP))
        .await;
    let plain = app
        .accepted(sleep_request(8, 0.5, -1, "plain", LARGE))
        .await;
    let urgent = app
        .accepted(pb::SubmitRequestRequest {
            priority: 10,
            ..sleep_request(4, 0.5, -1, "urgent", GROUP)
        })
        .await;
    let ids = vec![older.clone(), plain.clone(), urgent.clone()];
    let db = app.env.db().await.unwrap();
    wait_for("all three planned", Duration::from_secs(30), || async {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM dispatcher.productions
                 WHERE production_id = ANY($1) AND state = 'RUNNING'",
                &[&ids],
            )
            .await
            .unwrap()
            .get(0);
        (n == 3).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(
        running(blocker.clone()).await,
        4,
        "the blocker ended before the others were planned: the test needs it longer"
    );
    for production in [&blocker, &older, &plain, &urgent] {
        let last = app
            .production_when(
                "the production completed",
                Duration::from_secs(90),
                production,
                |p| p.state() == pb::ProductionState::Completed,
            )
            .await;
        assert_eq!(last.counts.unwrap().done, last.job_total, "{last:?}");
    }
    // The order the jobs started in.
    let started: Vec<(String, chrono::DateTime<chrono::Utc>)> = db
        .query(
            "SELECT production_id, started_at FROM dispatcher.jobs
             WHERE production_id = ANY($1) ORDER BY started_at, production_id, job_index",
            &[&ids],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(started.len(), 20, "{started:?}");
    // Every urgent job started before (or in the same round as) any other.
    let last_urgent = started
        .iter()
        .filter(|(p, _)| *p == urgent)
        .map(|(_, at)| *at)
        .max()
        .unwrap();
    let first_other = started
        .iter()
        .filter(|(p, _)| *p != urgent)
        .map(|(_, at)| *at)
        .min()
        .unwrap();
    assert!(last_urgent <= first_other, "{started:?}");
    // The two of equal priority took turns: neither waited for the other,
    // whether it is older or plain on the installation they share.
    let first_eight: Vec<&String> = started
        .iter()
        .filter(|(p, _)| *p != urgent)
        .take(8)
        .map(|(p, _)| p)
        .collect();
    let of = |p: &String| first_eight.iter().filter(|q| **q == p).count();
    assert!(
        of(&older) >= 3 && of(&plain) >= 3,
        "the first eight of the two: {first_eight:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_room_on_both_installations_jobs_follow_the_configured_shares() {
    const HEAVY: &str = "local-heavy";
    const LIGHT: &str = "local-light";
    let app = spawn_app_with(|env| {
        use_test_profiles(env);
        env.settings.dispatcher.poll_interval_ms = 200;
        // Room for every job on either: only the shares tell them apart.
        for name in [HEAVY, LIGHT] {
            env.settings.dispatcher.backends.insert(
                name.into(),
                BackendSettings::Local {
                    max_running: 8,
                    max_queued: 0,
                    work_dir: Some(env.work_dir.join(name)),
                },
            );
        }
        env.settings
            .federation
            .groups
            .insert("weighted".into(), vec![HEAVY.into(), LIGHT.into()]);
        env.settings.federation.shares.insert(HEAVY.into(), 3.0);
    })
    .await;
    // Long enough for all eight to be in flight at once.
    let production = app
        .accepted(sleep_request(8, 4.0, -1, "shares", "weighted"))
        .await;
    let last = app.watch(&production).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    let placed = placements(&app, &production).await;
    assert!(
        placed.values().all(|(_, attempt, _)| *attempt == 1),
        "a job moved or was retried: {placed:?}"
    );
    let on = |name: &str| placed.values().filter(|(i, _, _)| i == name).count();
    // Three to one: 6 and 2 (with equal shares it would be 4 and 4).
    assert_eq!((on(HEAVY), on(LIGHT)), (6, 2), "{placed:?}");
    let ran = |name: &str| successful_attempts(&app.env.work_dir.join(name), &production).len();
    assert_eq!((ran(HEAVY), ran(LIGHT)), (6, 2));
    app.stop().await;
}

/// Where each attempt of the job that always fails started (installation,
/// attempts) when the installation it failed on is, by share, not where a
/// job placed afresh would go: the small one (share 2) is busy with another
/// production's job when it is placed, and free again when it fails.
async fn retries_of_a_failing_job(retry_elsewhere: bool) -> BTreeMap<String, usize> {
    let app = spawn_app_with(|env| {
        two_installations(env);
        env.settings.federation.shares.insert(SMALL.into(), 2.0);
        env.settings.federation.retry_elsewhere = retry_elsewhere;
    })
    .await;
    let blocker = app
        .accepted(sleep_request(1, 1.5, -1, "blocker", GROUP))
        .await;
    wait_for(
        "the blocker running on the small installation",
        Duration::from_secs(30),
        || async {
            placements(&app, &blocker)
                .await
                .values()
                .any(|(i, _, s)| i == SMALL && s == "RUNNING")
                .then_some(())
        },
    )
    .await
    .unwrap();
    // Its only job fails after 4 s, each time.
    let failing = app
        .accepted(sleep_request(1, 4.0, 0, "failing", GROUP))
        .await;
    let last = app.watch(&failing).await.pop().unwrap();
    assert_eq!(last.counts.unwrap().exhausted, 1, "{last:?}");
    let placed = placements(&app, &failing).await;
    let (installation, attempt, state) = placed[&0].clone();
    assert_eq!((attempt, state.as_str()), (2, "EXHAUSTED"), "{placed:?}");
    let mut started = BTreeMap::new();
    for name in [SMALL, LARGE] {
        let n = started_attempts(&app.env.work_dir.join(name), &failing)
            .get(&0)
            .copied()
            .unwrap_or(0);
        if n > 0 {
            started.insert(name.to_string(), n);
        }
    }
    // The last attempt is recorded where it started.
    assert!(
        started.contains_key(&installation),
        "{placed:?} {started:?}"
    );
    app.stop().await;
    started
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_job_s_retry_stays_on_its_installation_unless_retries_may_move() {
    // Retries may not move: both attempts on the large installation it
    // was placed on, though the small one is free and preferred by share.
    assert_eq!(
        retries_of_a_failing_job(false).await,
        BTreeMap::from([(LARGE.to_string(), 2)])
    );
    // The same with retries that may move (the default): the retry is
    // placed afresh and goes to the small one.
    assert_eq!(
        retries_of_a_failing_job(true).await,
        BTreeMap::from([(LARGE.to_string(), 1), (SMALL.to_string(), 1)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_places_jobs_only_on_the_installations_serving_the_request_s_vo() {
    let app = spawn_app_with(|env| {
        two_installations(env);
        // The small installation has the most room and the largest share,
        // but serves only another VO; neither does the default one.
        env.settings.dispatcher.backends.insert(
            SMALL.into(),
            BackendSettings::Local {
                max_running: 6,
                max_queued: 0,
                work_dir: Some(env.work_dir.join(SMALL)),
            },
        );
        env.settings.federation.shares.insert(SMALL.into(), 10.0);
        env.settings
            .federation
            .vos
            .insert(SMALL.into(), vec!["other".into()]);
        env.settings
            .federation
            .vos
            .insert("local".into(), vec!["other".into()]);
    })
    .await;
    // Naming the other VO's installation is a backend violation ...
    let verdict = app.validate(sleep_request(2, 0.0, -1, "vo", SMALL)).await;
    assert!(!verdict.acceptable, "{verdict:?}");
    let violation = verdict
        .violations
        .iter()
        .find(|v| v.field == "backend")
        .unwrap_or_else(|| panic!("{verdict:?}"));
    assert!(violation.description.contains("\"test\""), "{violation:?}");
    // ... and `any` means the large installation only.
    let production = app.accepted(sleep_request(6, 1.0, -1, "any", "any")).await;
    let last = app.watch(&production).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    let placed = placements(&app, &production).await;
    assert_eq!(placed.len(), 6, "{placed:?}");
    assert!(placed.values().all(|(i, _, _)| i == LARGE), "{placed:?}");
    assert!(successful_attempts(&app.env.work_dir.join(SMALL), &production).is_empty());
    assert_eq!(
        successful_attempts(&app.env.work_dir.join(LARGE), &production).len(),
        6
    );
    app.stop().await;
}
