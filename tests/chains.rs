//! Chained productions: a production whose profile declares `inputs` takes
//! another production's output files as its jobs' inputs. It is accepted
//! before they exist, waits (WAITING_FOR_INPUT), gets jobs as the files
//! arrive, uses each file exactly once (also when the dispatcher is killed
//! while files arrive, when `job.output` events come again, and when two
//! dispatcher replicas advance it at the same time), ends once
//! its parent ended and every file is used, and its outputs are made of its
//! parent's (checked by their content).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use prodsys::Service;
use prodsys_proto as pb;
use prodsys_testkit::{TestEnv, wait_for};
use prost::Message;
use support::{App, cta_example, sleep_request, spawn_app_with, spawn_services, use_test_profiles};

/// The shipped DL1 example, processing `parent`.
fn dl1_request(parent: &str) -> pb::SubmitRequestRequest {
    let path = prodsys_testkit::repo_root().join("examples/cta-dl1.json");
    let mut file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    file["parameters"]["input_production"] = parent.into();
    pb::SubmitRequestRequest {
        profile: file["profile"].as_str().unwrap().into(),
        vo: file["vo"].as_str().unwrap().into(),
        parameters_json: file["parameters"].to_string(),
        ..cta_example()
    }
}

/// The shipped IRF example, merging the DL1 files of `parent`.
fn irf_request(parent: &str) -> pb::SubmitRequestRequest {
    let path = prodsys_testkit::repo_root().join("examples/cta-irf.json");
    let mut file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    file["parameters"]["input_production"] = parent.into();
    pb::SubmitRequestRequest {
        profile: file["profile"].as_str().unwrap().into(),
        vo: file["vo"].as_str().unwrap().into(),
        parameters_json: file["parameters"].to_string(),
        ..cta_example()
    }
}

/// A test-chain production (tests/profiles) over `parent`'s files, two per job.
fn chain_request(parent: &str, seconds: f64, tag: &str) -> pb::SubmitRequestRequest {
    pb::SubmitRequestRequest {
        profile: "test-chain".into(),
        vo: "test".into(),
        parameters_json: serde_json::json!({
            "input_production": parent, "seconds": seconds, "tag": tag
        })
        .to_string(),
        backend: "local".into(),
        ..cta_example()
    }
}

fn local_path(url: &str) -> PathBuf {
    PathBuf::from(url.strip_prefix("file://").unwrap_or(url))
}

/// The production as the dispatcher records it: state, jobs, inputs note.
async fn dispatcher_row(
    db: &prodsys_db::tokio_postgres::Client,
    production_id: &str,
) -> Option<(String, i64, String)> {
    db.query_opt(
        "SELECT state, job_total, inputs_note FROM dispatcher.productions WHERE production_id = $1",
        &[&production_id],
    )
    .await
    .unwrap()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// Every input of `child`: LFN → the job that took it (`None`: waiting for
/// one). An input taken by two jobs fails the test.
async fn inputs_of(
    db: &prodsys_db::tokio_postgres::Client,
    child: &str,
) -> BTreeMap<String, Option<i64>> {
    let mut inputs = BTreeMap::new();
    for row in db
        .query(
            "SELECT i.lfn, j.job_index FROM dispatcher.jobs j,
                    jsonb_array_elements_text(j.inputs) AS i(lfn)
             WHERE j.production_id = $1
             UNION ALL
             SELECT d.lfn, NULL FROM dispatcher.chain_links l
             JOIN dispatcher.delivered_files d
               ON d.production_id = l.parent AND d.seq > l.taken_seq
             WHERE l.child = $1 AND d.metadata @> l.conditions",
            &[&child],
        )
        .await
        .unwrap()
    {
        let (lfn, job): (String, Option<i64>) = (row.get(0), row.get(1));
        if let Some(before) = inputs.insert(lfn.clone(), job) {
            panic!("{lfn} is an input of {before:?} and of {job:?}");
        }
    }
    inputs
}

/// Waits for the catalog to hold `n` files of `production_id`.
async fn catalogued(app: &App, production_id: &str, n: usize) -> Vec<pb::OutputFile> {
    wait_for(
        &format!("{n} catalogued files of {production_id}"),
        Duration::from_secs(60),
        || async {
            let files = app.files(production_id).await;
            (files.len() == n).then_some(files)
        },
    )
    .await
    .unwrap()
}

/// Every DL1 file names one simulation file of the parent with the adler32
/// and size the catalog holds for it, and each parent file has one DL1 file.
fn assert_dl1_made_of(parent: &[pb::OutputFile], child: &[pb::OutputFile]) {
    let by_name: BTreeMap<String, &pb::OutputFile> = parent
        .iter()
        .map(|f| (f.lfn.rsplit('/').next().unwrap().to_string(), f))
        .collect();
    let mut used = BTreeSet::new();
    for file in child {
        let text = std::fs::read_to_string(local_path(&file.url)).unwrap();
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key} ")))
                .unwrap_or_else(|| panic!("{key} in {}:\n{text}", file.lfn))
                .to_string()
        };
        let input = field("input");
        let source = by_name
            .get(&input)
            .unwrap_or_else(|| panic!("{} names {input}, not a file of the parent", file.lfn));
        assert_eq!(field("adler32"), source.adler32, "{}", file.lfn);
        assert_eq!(field("size"), source.size.to_string(), "{}", file.lfn);
        // Its content follows from the input's bytes, not just its name.
        let bytes = std::fs::read(local_path(&source.url)).unwrap();
        assert_eq!(
            text,
            prodsys_toysim_dl1_content(&input, &bytes),
            "{}",
            file.lfn
        );
        assert!(used.insert(input.clone()), "{input} processed twice");
        assert_eq!(file.metadata["data_level"], "DL1");
        assert_eq!(file.metadata["input_production"], source.production_id);
    }
    assert_eq!(
        used,
        by_name.keys().cloned().collect(),
        "every simulation file processed once"
    );
}

/// What `prodsys-toysim dl1 --cleaning tailcuts` writes for one input.
fn prodsys_toysim_dl1_content(name: &str, bytes: &[u8]) -> String {
    let (mut a, mut b) = (1u64, 0u64);
    for &x in bytes {
        a = (a + u64::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    let mut text = format!(
        "# prodsys-toysim dl1\ninput {name}\nsize {}\nadler32 {:08x}\ncleaning tailcuts\n",
        bytes.len(),
        (b << 16) | a
    );
    for (i, block) in bytes.chunks(4096).enumerate() {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cta_chain_processes_each_simulation_file_once_and_merges_every_dl1_file() {
    let app = spawn_app_with(|_| {}).await;
    let parent = app.accepted(cta_example()).await;
    // The whole chain accepted while its first step runs (before any of
    // its files may exist): DL1 processing, then the IRF of its DL1 files.
    let child = app.accepted(dl1_request(&parent)).await;
    let irf = app.accepted(irf_request(&child)).await;
    let (snapshots, irf_snapshots) = tokio::join!(app.watch(&child), app.watch(&irf));
    let last = snapshots.last().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    let parent_files = catalogued(&app, &parent, 8).await;
    // One job per simulation file.
    assert_eq!(last.job_total, 8, "{last:?}");
    let child_files = catalogued(&app, &child, 8).await;
    assert_dl1_made_of(&parent_files, &child_files);
    let db = app.env.db().await.unwrap();
    let inputs = inputs_of(&db, &child).await;
    let jobs: BTreeSet<i64> = inputs.values().map(|j| j.unwrap()).collect();
    assert_eq!(inputs.len(), 8);
    assert_eq!(jobs, (0..8).collect(), "one file per job: {inputs:?}");
    let (_, _, note) = dispatcher_row(&db, &child).await.unwrap();
    assert_eq!(note, "", "its parent completed");

    // One IRF job merged every DL1 file, once all existed.
    let snapshots = irf_snapshots;
    assert!(
        snapshots
            .iter()
            .any(|p| p.state() == pb::ProductionState::WaitingForInput),
        "the IRF step waited for its input: {snapshots:?}"
    );
    let last = snapshots.last().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    assert_eq!((last.job_total, last.inputs_used), (1, 8), "{last:?}");
    let merged = catalogued(&app, &irf, 1).await;
    let text = std::fs::read_to_string(local_path(&merged[0].url)).unwrap();
    for dl1 in &child_files {
        let name = dl1.lfn.rsplit('/').next().unwrap();
        let line = format!("dl1 {name} size {} adler32 {} ", dl1.size, dl1.adler32);
        assert!(text.contains(&line), "{line:?} in\n{text}");
    }
    assert!(text.contains("files 8\n"), "{text}");
    assert_eq!(merged[0].metadata["data_level"], "IRF");

    // Each step's record names the steps on either side.
    let record = |production_id: &str| {
        let mut catalog = app.catalog.clone();
        let production_id = production_id.to_string();
        async move {
            catalog
                .get_production_record(pb::GetProductionRecordRequest {
                    production_id,
                    format: pb::RecordFormat::Json as i32,
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let (first, middle, last) = (
        record(&parent).await,
        record(&child).await,
        record(&irf).await,
    );
    // A chained step's plan grew as its inputs arrived: the largest is kept.
    assert_eq!((middle.job_total, last.job_total), (8, 1));
    assert_eq!(
        (first.parent_production_ids, first.child_production_ids),
        (vec![], vec![child.clone()])
    );
    assert_eq!(
        (middle.parent_production_ids, middle.child_production_ids),
        (vec![parent.clone()], vec![irf.clone()])
    );
    assert_eq!(
        (last.parent_production_ids, last.child_production_ids),
        (vec![child.clone()], vec![])
    );

    // The same processing of the same inputs again is a duplicate.
    let again = app.submit(dl1_request(&parent)).await.unwrap();
    let refused = app.decided(&again.request_id).await;
    assert_eq!(refused.state(), pb::RequestState::Rejected, "{refused:?}");
    // A parent that does not exist, or is of another profile, is refused
    // naming the parameter.
    // The IRF step cannot take simulation files: the chain does not connect.
    for (request, reason) in [
        (
            dl1_request("CTA-999999"),
            "no production CTA-999999".to_string(),
        ),
        (
            irf_request(&parent),
            format!(
                "{parent} is a production of profile cta-irf-mc; profile cta-irf takes the outputs of cta-dl1"
            ),
        ),
    ] {
        let answer = app.submit(request).await.unwrap();
        let refused = app.decided(&answer.request_id).await;
        assert_eq!(refused.state(), pb::RequestState::Rejected, "{refused:?}");
        assert!(
            refused.violations.iter().any(
                |v| v.field == "parameters.input_production" && v.description.contains(&reason)
            ),
            "{refused:?}"
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_child_of_a_partial_parent_processes_what_exists_and_a_cancelled_parent_cancels_its_chain()
 {
    let app = spawn_app_with(use_test_profiles).await;
    // Five jobs, the third always failing: four files.
    let parent = app
        .accepted(sleep_request(5, 0.2, 2, "partial-parent", "local"))
        .await;
    let child = app.accepted(chain_request(&parent, 0.0, "partial")).await;
    let last = app.watch(&child).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    assert_eq!(last.job_total, 2, "four files, two per job: {last:?}");
    // It says so, in status.
    let shown = app
        .production_when("the child's note", Duration::from_secs(30), &child, |p| {
            !p.inputs_note.is_empty()
        })
        .await;
    assert!(
        shown
            .inputs_note
            .contains(&format!("{parent} ended PARTIALLY_COMPLETED")),
        "{shown:?}"
    );
    assert_eq!(shown.inputs_used, 4);
    let db = app.env.db().await.unwrap();
    let (state, _, note) = dispatcher_row(&db, &child).await.unwrap();
    assert_eq!(state, "COMPLETED");
    assert!(
        note.contains(&format!("{parent} ended PARTIALLY_COMPLETED")),
        "{note}"
    );
    assert_eq!(inputs_of(&db, &child).await.len(), 4);

    // A long parent, a child waiting on it, and a grandchild on the child:
    // cancelling the parent cancels the chain.
    let long = app
        .accepted(sleep_request(4, 60.0, -1, "cancelled-parent", "local"))
        .await;
    let waiting = app.accepted(chain_request(&long, 0.0, "cancelled")).await;
    let seen = app
        .production_when(
            "the child waiting for input",
            Duration::from_secs(30),
            &waiting,
            |p| p.state() == pb::ProductionState::WaitingForInput,
        )
        .await;
    assert_eq!(seen.job_total, 0);
    app.cancel(&long, "test: stop the chain").await.unwrap();
    for id in [&long, &waiting] {
        let last = app.watch(id).await.pop().unwrap();
        assert_eq!(
            last.state(),
            pb::ProductionState::Cancelled,
            "{id}: {last:?}"
        );
    }
    app.stop().await;
}

/// Set to a settings file: `dispatcher_process` serves a dispatcher with it.
const SERVE_ENV: &str = "PRODSYS_TEST_CHAIN_DISPATCHER";

/// Not a test: the entry of the dispatcher processes the kill and replica
/// tests start (this binary run again with `--exact dispatcher_process --ignored`).
#[test]
#[ignore = "a dispatcher process the chain tests start themselves"]
fn dispatcher_process() {
    if let Some(config) = std::env::var_os(SERVE_ENV) {
        support::serve_dispatcher(&config, "info");
    }
}

/// A dispatcher in its own process, killed with SIGKILL.
struct Dispatcher {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Dispatcher {
    async fn start(env: &TestEnv, name: &str) -> Dispatcher {
        Dispatcher::start_with(env, name, &[]).await
    }

    /// One started with `vars` in its environment besides.
    async fn start_with(env: &TestEnv, name: &str, vars: &[(&str, &str)]) -> Dispatcher {
        let config = env.work_dir.join(format!("{name}.toml"));
        std::fs::create_dir_all(&env.work_dir).unwrap();
        std::fs::write(&config, toml::to_string(&env.settings).unwrap()).unwrap();
        let log = env.work_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "dispatcher_process", "--ignored", "--nocapture"])
            .env(SERVE_ENV, &config)
            .env("NO_COLOR", "1")
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        wait_for(
            "the dispatcher process",
            Duration::from_secs(60),
            || async {
                std::fs::read_to_string(&log)
                    .ok()?
                    .contains("dispatcher ready")
                    .then_some(())
            },
        )
        .await
        .unwrap();
        Dispatcher { child, log }
    }

    async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }
}

/// Every service but the dispatcher, in this process: the tests start
/// dispatchers of their own in processes they can kill.
async fn without_dispatcher(env: TestEnv) -> App {
    spawn_services(
        env,
        &[
            Service::Intake,
            Service::Checker,
            Service::Status,
            Service::Catalog,
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_input_is_used_once_across_a_killed_dispatcher_and_repeated_outputs() {
    let mut env = TestEnv::new().await.expect("test environment");
    use_test_profiles(&mut env);
    env.settings.dispatcher.max_concurrent_jobs = 3;
    env.settings.dispatcher.lease_ttl_ms = 1500;
    env.settings.dispatcher.poll_interval_ms = 200;
    let app = without_dispatcher(env).await;
    let mut first = Dispatcher::start(&app.env, "first").await;
    let jobs = 12u64;
    let parent = app
        .accepted(sleep_request(jobs, 0.7, -1, "killed-parent", "local"))
        .await;
    let child = app.accepted(chain_request(&parent, 0.3, "killed")).await;
    let db = app.env.db().await.unwrap();
    // Files arrive; the dispatcher dies among them.
    wait_for("some inputs taken", Duration::from_secs(60), || async {
        (inputs_of(&db, &child).await.len() >= 3).then_some(())
    })
    .await
    .unwrap();
    first.kill().await;
    let second = Dispatcher::start(&app.env, "second").await;
    // Every `job.output` of the parent so far, again, under new event IDs.
    let events = format!("{}prodsys.events", app.env.prefix);
    let delivered = app.files(&parent).await;
    let mut by_job: BTreeMap<u64, Vec<pb::OutputFile>> = BTreeMap::new();
    for file in delivered {
        by_job.entry(file.job_index).or_default().push(file);
    }
    for (job_index, files) in &by_job {
        let output = pb::JobOutput {
            production_id: parent.clone(),
            job_index: *job_index,
            attempt: 1,
            files: files.clone(),
        };
        support::publish_raw(
            &app.env,
            &events,
            "job.output",
            "job.output",
            &output.encode_to_vec(),
        )
        .await;
    }
    let ended = wait_for("the child to end", Duration::from_secs(120), || async {
        dispatcher_row(&db, &child)
            .await
            .filter(|(state, _, _)| state != "RUNNING")
    })
    .await;
    let (state, job_total, note) = match ended {
        Ok(row) => row,
        Err(error) => panic!(
            "{error}; second dispatcher:\n{}",
            std::fs::read_to_string(&second.log).unwrap_or_default()
        ),
    };
    assert_eq!(state, "COMPLETED");
    assert_eq!(note, "");
    // Two files a job, every file once, none left out.
    assert_eq!(job_total, jobs as i64 / 2);
    let inputs = inputs_of(&db, &child).await;
    assert_eq!(inputs.len(), jobs as usize, "{inputs:?}");
    let mut per_job: BTreeMap<i64, usize> = BTreeMap::new();
    for job in inputs.values() {
        *per_job
            .entry(job.expect("every input in a job"))
            .or_default() += 1;
    }
    assert!(per_job.values().all(|&n| n == 2), "{per_job:?}");
    // The child's outputs are its parent's files, each once, by content.
    let files = catalogued(&app, &child, jobs as usize).await;
    let mut runs = BTreeSet::new();
    for file in &files {
        let text = std::fs::read_to_string(local_path(&file.url)).unwrap();
        let mut lines = text.lines();
        let from = lines.next().unwrap().strip_prefix("from run").unwrap();
        let run = from.strip_suffix(".txt").unwrap().to_string();
        assert_eq!(lines.next(), Some(format!("run {run}").as_str()), "{text}");
        assert!(runs.insert(run.clone()), "run {run} processed twice");
    }
    let expected: BTreeSet<String> = (1..=jobs).map(|r| r.to_string()).collect();
    assert_eq!(runs, expected);
    let last = app
        .production_when(
            "the child completed in status",
            Duration::from_secs(30),
            &child,
            |p| p.state() == pb::ProductionState::Completed,
        )
        .await;
    assert_eq!(last.job_total, jobs / 2);
    assert_eq!(last.inputs_used, jobs);
    assert_eq!(last.inputs_note, "");
    drop(second);
    app.stop().await;
}

/// The jobs of `child` a dispatcher says it made (its `chained production
/// took inputs` lines, JSON): each run of job indexes one transaction made.
fn jobs_made(log: &Path, child: &str) -> Vec<std::ops::Range<i64>> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| {
            line["message"] == "chained production took inputs" && line["production_id"] == child
        })
        .filter_map(|line| {
            let (created, total) = (line["created"].as_i64()?, line["job_total"].as_i64()?);
            (created > 0).then(|| total - created..total)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_dispatcher_replicas_advancing_one_child_together_use_each_input_once() {
    let mut env = TestEnv::new().await.expect("test environment");
    use_test_profiles(&mut env);
    env.settings.dispatcher.max_concurrent_jobs = 32;
    let app = without_dispatcher(env).await;
    // Two replicas from the start, consuming the same queues: each takes
    // some of the parent's `job.output` events and advances the child.
    let json = [("PRODSYS_LOG_FORMAT", "json")];
    let mut replicas = [
        Dispatcher::start_with(&app.env, "replica-a", &json).await,
        Dispatcher::start_with(&app.env, "replica-b", &json).await,
    ];
    // One file per parent job, each in its own `job.output`, many at a time.
    let files = 300u64;
    let parent = app
        .accepted(sleep_request(files, 0.0, -1, "replicas-parent", "local"))
        .await;
    let child = app.accepted(chain_request(&parent, 0.0, "replicas")).await;
    let db = app.env.db().await.unwrap();
    let ended = wait_for("the child to end", Duration::from_secs(90), || async {
        dispatcher_row(&db, &child)
            .await
            .filter(|(state, _, _)| state != "RUNNING")
    })
    .await;
    let logs = || {
        replicas
            .iter()
            .map(|r| std::fs::read_to_string(&r.log).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    let (state, job_total, note) = ended.unwrap_or_else(|error| panic!("{error}; {}", logs()));
    assert_eq!((state.as_str(), note.as_str()), ("COMPLETED", ""));

    // The parent's files, as the catalog has them and as the dispatcher
    // recorded their delivery.
    let parent_files: BTreeSet<String> = catalogued(&app, &parent, files as usize)
        .await
        .into_iter()
        .map(|f| f.lfn)
        .collect();
    let delivered: BTreeSet<String> = db
        .query(
            "SELECT lfn FROM dispatcher.delivered_files WHERE production_id = $1",
            &[&parent],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(delivered, parent_files);
    // Each is an input of exactly one job of the child (`inputs_of` fails
    // on one taken twice), none is left out, and every job took two.
    let inputs = inputs_of(&db, &child).await;
    assert_eq!(
        inputs.keys().cloned().collect::<BTreeSet<_>>(),
        parent_files,
        "the child's inputs are its parent's files"
    );
    let mut per_job: BTreeMap<i64, usize> = BTreeMap::new();
    for job in inputs.values() {
        *per_job
            .entry(job.expect("every input in a job"))
            .or_default() += 1;
    }
    assert!(per_job.values().all(|&n| n == 2), "{per_job:?}");
    assert_eq!(per_job.len() as i64, job_total);
    assert_eq!(job_total, files as i64 / 2);

    // Both replicas made jobs of the child, in turns: what each says it
    // made, put together, is every job once.
    let made: Vec<Vec<std::ops::Range<i64>>> =
        replicas.iter().map(|r| jobs_made(&r.log, &child)).collect();
    assert!(
        made.iter().all(|m| !m.is_empty()),
        "both replicas made jobs of the child: {made:?}"
    );
    let mut turns: Vec<(i64, i64, usize)> = made
        .iter()
        .enumerate()
        .flat_map(|(replica, ranges)| ranges.iter().map(move |r| (r.start, r.end, replica)))
        .collect();
    turns.sort();
    let mut next = 0;
    for (start, end, _) in &turns {
        assert_eq!(*start, next, "each job made once: {turns:?}");
        next = *end;
    }
    assert_eq!(next, job_total, "{turns:?}");
    // Not one replica's takes after the other's: they alternate.
    let changes = turns.windows(2).filter(|w| w[0].2 != w[1].2).count();
    assert!(changes >= 2, "{changes} changes of replica: {turns:?}");
    eprintln!(
        "{} takes, {changes} changes of replica: {turns:?}",
        turns.len()
    );

    // The child's outputs are its inputs, each copied once.
    let outputs: BTreeSet<String> = catalogued(&app, &child, files as usize)
        .await
        .into_iter()
        .map(|f| {
            f.lfn
                .rsplit('/')
                .next()
                .unwrap()
                .replace(".chained", ".txt")
        })
        .collect();
    let names: BTreeSet<String> = parent_files
        .iter()
        .map(|lfn| lfn.rsplit('/').next().unwrap().to_string())
        .collect();
    assert_eq!(outputs, names);
    let last = app
        .production_when(
            "the child completed in status",
            Duration::from_secs(30),
            &child,
            |p| p.state() == pb::ProductionState::Completed,
        )
        .await;
    assert_eq!((last.job_total, last.inputs_used), (files / 2, files));
    assert_eq!(
        support::dlq_depth(&app.env, "dispatcher").await,
        0,
        "nothing dead-lettered"
    );
    for replica in &mut replicas {
        replica.kill().await;
    }
    app.stop().await;
}

async fn prodctl(app: &App, args: &[&str]) -> (Option<i32>, String, String) {
    let mut command = tokio::process::Command::new(support::built_binary("prodctl", "prodctl"));
    for (flag, service) in [
        ("--intake", Service::Intake),
        ("--status", Service::Status),
        ("--catalog", Service::Catalog),
    ] {
        command
            .arg(flag)
            .arg(format!("http://{}", app.stack.addr(service).unwrap()));
    }
    let output = command.args(args).output().await.unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The shipped CTA example followed by the DL1 and IRF steps, as one file.
fn chain_file(dir: &Path, name: &str, steps: &[&str]) -> PathBuf {
    let root = prodsys_testkit::repo_root().join("examples");
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(root.join(name)).unwrap()).unwrap()
    };
    let mut request = read("cta-irf-mc.json");
    request["chain"] = steps
        .iter()
        .map(|example| {
            let mut step = read(example);
            step["parameters"]["input_production"] = "{previous}".into();
            serde_json::json!({"profile": step["profile"], "parameters": step["parameters"]})
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, request.to_string()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_chain_is_checked_then_submitted_step_by_step() {
    let app = spawn_app_with(|_| {}).await;
    let dir = app.env.work_dir.join("chains");
    // The IRF step straight after the simulation cannot connect: refused
    // before anything is submitted, naming the step and why.
    let broken = chain_file(&dir, "broken.json", &["cta-irf.json"]);
    let (code, out, err) = prodctl(&app, &["submit", broken.to_str().unwrap()]).await;
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        out.contains("chain[0].parameters.input_production"),
        "{out}"
    );
    assert!(out.contains("takes the outputs of cta-dl1"), "{out}");
    assert_eq!(app.stored_requests().await, 0, "nothing submitted");
    // SubmitRequest itself takes no chain.
    let mut request = cta_example();
    request.chain = vec![pb::ChainStep {
        profile: "cta-dl1".into(),
        parameters_json: "{}".into(),
    }];
    let refused = app.submit(request).await.unwrap_err();
    assert_eq!(support::violated_fields(&refused), ["chain"]);

    let whole = chain_file(&dir, "whole.json", &["cta-dl1.json", "cta-irf.json"]);
    let (code, out, err) = prodctl(
        &app,
        &["-o", "json", "submit", whole.to_str().unwrap(), "--watch"],
    )
    .await;
    assert_eq!(code, Some(0), "{out}{err}");
    let steps: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("step").is_some())
        .collect();
    let ids: Vec<&str> = steps
        .iter()
        .map(|s| s["request"]["production_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{out}");
    assert!(
        ids[0].starts_with("CTA-") && ids[1].starts_with("CTADL-"),
        "{ids:?}"
    );
    assert!(ids[2].starts_with("CTAIRF-"), "{ids:?}");
    for (id, files) in ids.iter().zip([8, 8, 1]) {
        let p = app.production(id).await.unwrap();
        assert_eq!(p.state(), pb::ProductionState::Completed, "{p:?}");
        catalogued(&app, id, files).await;
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_km3net_reconstruction_processes_each_simulated_event_file_once() {
    let app = spawn_app_with(|env| {
        support::use_km3net_templates(env);
        env.settings.dispatcher.max_concurrent_jobs = 4;
    })
    .await;
    let sim = app.accepted(support::km3net_with(|_| {})).await;
    let path = prodsys_testkit::repo_root().join("examples/km3net-reco.json");
    let mut file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    file["parameters"]["input_production"] = sim.as_str().into();
    let reco = app
        .accepted(pb::SubmitRequestRequest {
            profile: "km3net-reco".into(),
            vo: "km3net.org".into(),
            parameters_json: file["parameters"].to_string(),
            ..cta_example()
        })
        .await;
    let last = app.watch(&reco).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    let sim_last = app.production(&sim).await.unwrap();
    let sim_files = catalogued(&app, &sim, sim_last.counts.unwrap().done as usize).await;
    assert_eq!(last.inputs_used, sim_files.len() as u64, "{last:?}");
    let reco_files = catalogued(&app, &reco, sim_files.len()).await;
    let by_name: BTreeMap<&str, &pb::OutputFile> = sim_files
        .iter()
        .map(|f| (f.lfn.rsplit('/').next().unwrap(), f))
        .collect();
    let mut used = BTreeSet::new();
    for file in &reco_files {
        let text = std::fs::read_to_string(local_path(&file.url)).unwrap();
        assert!(text.starts_with("# prodsys-toysim reco\n"), "{text}");
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key} ")))
                .unwrap()
                .to_string()
        };
        let input = field("input");
        let source = by_name[input.as_str()];
        assert_eq!(field("adler32"), source.adler32);
        assert_eq!(field("algorithm"), "jmuon");
        assert!(used.insert(input));
    }
    assert_eq!(used.len(), sim_files.len());
    app.stop().await;
}
