//! Dispatchers that crash, or run side by side: every local attempt runs
//! once, whichever dispatcher holds the installation follows it to its end,
//! and a finished attempt is never started again. The dispatchers run as
//! their own processes (this test binary started again, see
//! `dispatcher_process`) so that one can be killed with SIGKILL; the other
//! services run in the test's process. Jobs of the test-count profile
//! (tests/profiles) append a line to `runs.log` beside their attempt
//! directories each time they run. The same holds on the real Slurm of the
//! suite (tests/servers/slurm): a job found again by its name is followed,
//! not submitted again.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use prodsys::Service;
use prodsys_dispatcher::lease::Lease;
use prodsys_testkit::{TestEnv, wait_for};
use support::{App, spawn_services, use_test_profiles};
use tokio_util::sync::CancellationToken;

/// Set to a settings file: `dispatcher_process` serves a dispatcher with it.
const SERVE_ENV: &str = "PRODSYS_TEST_SERVE_DISPATCHER";

/// Not a test: the entry of the dispatcher processes the tests below start
/// (this binary run again with `--exact dispatcher_process --ignored`).
/// Serves until SIGTERM, or until the test that started it is gone.
#[test]
#[ignore = "a dispatcher process the adoption tests start themselves"]
fn dispatcher_process() {
    if let Some(config) = std::env::var_os(SERVE_ENV) {
        support::serve_dispatcher(&config, "info,prodsys_dispatcher=debug");
    }
}

/// A dispatcher process.
struct Dispatcher {
    name: String,
    child: tokio::process::Child,
    pid: u32,
    log: PathBuf,
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

impl Dispatcher {
    /// Starts a dispatcher process on `env`'s settings; returns once its queue exists.
    async fn start(env: &TestEnv, name: &str) -> Dispatcher {
        std::fs::create_dir_all(&env.work_dir).unwrap();
        let config = env.work_dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml::to_string(&env.settings).unwrap()).unwrap();
        let log = env.work_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "dispatcher_process", "--ignored", "--nocapture"])
            .env(SERVE_ENV, &config)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        if let Err(error) = wait_for(
            "the dispatcher process to be ready",
            Duration::from_secs(60),
            || async {
                std::fs::read_to_string(&log)
                    .ok()?
                    .contains("dispatcher ready")
                    .then_some(())
            },
        )
        .await
        {
            panic!("{name}: {error}; its log:\n{}", tail(&log));
        }
        Dispatcher {
            name: name.to_string(),
            child,
            pid,
            log,
        }
    }

    /// SIGKILL: no cleanup, no lease released, jobs left running.
    async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    /// SIGTERM, and its exit.
    async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        match tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await {
            Ok(status) => assert!(
                status.unwrap().success(),
                "{} did not stop cleanly; its log:\n{}",
                self.name,
                tail(&self.log)
            ),
            Err(_) => panic!("{} did not stop within 20 s of SIGTERM", self.name),
        }
    }
}

/// Kills, when dropped (a test that failed half-way), the process group of
/// every job still running under `0` (a work directory): jobs outlive dispatchers.
struct KillJobsOnDrop(PathBuf);

impl Drop for KillJobsOnDrop {
    fn drop(&mut self) {
        for (attempt, ended) in attempts(&self.0) {
            let pid = std::fs::read_to_string(attempt.join("prodsys.pid")).unwrap_or_default();
            if let (false, Some(pid)) = (ended, pid.split_whitespace().next()) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .status();
            }
        }
    }
}

/// A test-count production: `jobs` jobs, job i sleeping `seconds` × (i mod 3).
fn count_request(jobs: u64, seconds: u64, tag: &str) -> prodsys_proto::SubmitRequestRequest {
    prodsys_proto::SubmitRequestRequest {
        profile: "test-count".into(),
        vo: "test".into(),
        parameters_json: serde_json::json!({
            "jobs": jobs, "per_job": 1, "seconds": seconds, "tag": tag
        })
        .to_string(),
        backend: String::new(),
        ..support::cta_example()
    }
}

async fn submit_all(app: &App, requests: Vec<prodsys_proto::SubmitRequestRequest>) -> Vec<String> {
    futures::future::join_all(requests.into_iter().map(|r| app.accepted(r))).await
}

/// Settings of both tests: a short lease, quick polls, the test profiles.
async fn environment(slots: usize) -> TestEnv {
    let mut env = TestEnv::new().await.expect("test environment");
    use_test_profiles(&mut env);
    env.settings.dispatcher.max_concurrent_jobs = slots;
    env.settings.dispatcher.lease_ttl_ms = 1500;
    env.settings.dispatcher.poll_interval_ms = 200;
    env
}

/// Counts of the dispatcher's jobs by state.
async fn job_states(db: &prodsys_db::tokio_postgres::Client) -> BTreeMap<String, i64> {
    db.query(
        "SELECT state, count(*) FROM dispatcher.jobs GROUP BY state",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Waits until every production has ended (as the dispatcher records it); they must be COMPLETED.
async fn all_completed(
    db: &prodsys_db::tokio_postgres::Client,
    productions: &[String],
    timeout: Duration,
) {
    let states = wait_for("every production to end", timeout, || async {
        let rows = db
            .query(
                "SELECT production_id, state FROM dispatcher.productions WHERE production_id = ANY($1)",
                &[&productions],
            )
            .await
            .ok()?;
        let states: BTreeMap<String, String> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        (states.len() == productions.len()
            && states.values().all(|s| s != "RUNNING" && s != "CANCELLING"))
        .then_some(states)
    })
    .await;
    let states = match states {
        Ok(states) => states,
        Err(error) => panic!("{error}: jobs by state {:?}", job_states(db).await),
    };
    for (production, state) in &states {
        assert_eq!(state, "COMPLETED", "{production}");
    }
}

/// Who holds the local installation's lease.
async fn owner(db: &prodsys_db::tokio_postgres::Client) -> Option<String> {
    owner_of(db, "local").await
}

/// Who holds `installation`'s lease.
async fn owner_of(db: &prodsys_db::tokio_postgres::Client, installation: &str) -> Option<String> {
    db.query_opt(
        "SELECT owner FROM dispatcher.installation_leases WHERE installation = $1",
        &[&installation],
    )
    .await
    .unwrap()
    .map(|r| r.get::<_, String>(0))
}

/// Every job of `productions` DONE in its first attempt, which ran exactly
/// once (one line in runs.log, one attempt directory that ended once with
/// exit 0), and its one file catalogued once.
async fn assert_each_job_ran_once(app: &App, productions: &[String], jobs: u64) {
    let db = app.env.db().await.unwrap();
    let work = &app.env.settings.dispatcher.work_dir;
    for production in productions {
        let rows = db
            .query(
                "SELECT job_index, state, attempt, raw_status FROM dispatcher.jobs
                 WHERE production_id = $1 ORDER BY job_index",
                &[production],
            )
            .await
            .unwrap();
        assert_eq!(rows.len() as u64, jobs, "{production}");
        let mut indexes = BTreeSet::new();
        let mut final_attempt = BTreeMap::new();
        for row in &rows {
            let (index, state, attempt, raw): (i64, &str, i32, Option<&str>) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            assert_eq!(state, "DONE", "{production} job {index}: {raw:?}");
            indexes.insert(index);
            final_attempt.insert(index, attempt);
        }
        let runs = std::fs::read_to_string(work.join(production).join("runs.log")).unwrap();
        let mut counted: BTreeMap<i64, u32> = BTreeMap::new();
        for line in runs.lines() {
            let index = line.split_whitespace().next().unwrap().parse().unwrap();
            *counted.entry(index).or_default() += 1;
        }
        let once: BTreeMap<i64, u32> = indexes.iter().map(|i| (*i, 1)).collect();
        assert_eq!(counted, once, "{production}: runs of each job");
        let mut dirs: Vec<String> = std::fs::read_dir(work.join(production))
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_dir())
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        dirs.sort();
        // Each job's attempt that ran ended with exit 0. A dispatcher killed
        // between committing an attempt as submitted and starting it leaves
        // an attempt that never started: the one that takes over finds
        // nothing under its tag and submits the next attempt, which is the
        // one that runs (runs.log above: once). Killed between marking an
        // attempt started and spawning its supervisor, it leaves the mark
        // without a supervisor: the one that takes over waits START_GRACE for
        // its pid file and then takes it for lost. An earlier attempt's
        // supervisor never ran, so it never wrote its pid file.
        for (index, attempt) in &final_attempt {
            let ran = format!("{index:06}.a{attempt}");
            assert!(dirs.contains(&ran), "{production}: {ran} in {dirs:?}");
            for dir in dirs
                .iter()
                .filter(|d| d.starts_with(&format!("{index:06}.a")))
            {
                let path = work.join(production).join(dir);
                if *dir == ran {
                    let exit = std::fs::read_to_string(path.join("prodsys.exit")).unwrap();
                    assert!(exit.starts_with("exit 0\n"), "{production}/{dir}: {exit}");
                } else {
                    assert!(
                        !path.join("prodsys.pid").exists(),
                        "{production}/{dir}: an earlier attempt whose supervisor ran"
                    );
                }
            }
        }
        let expected_attempts: usize = dirs
            .iter()
            .filter(|d| indexes.iter().any(|i| d.starts_with(&format!("{i:06}.a"))))
            .count();
        assert_eq!(
            expected_attempts,
            dirs.len(),
            "{production}: attempt directories only of its jobs: {dirs:?}"
        );
        let files = wait_for(
            "the production's files in the catalog",
            Duration::from_secs(30),
            || async {
                let files = app.files(production).await;
                (files.len() as u64 >= jobs).then_some(files)
            },
        )
        .await
        .unwrap();
        let lfns: BTreeSet<&str> = files.iter().map(|f| f.lfn.as_str()).collect();
        assert_eq!(lfns.len() as u64, jobs, "{production}: {lfns:?}");
        assert_eq!(files.len() as u64, jobs, "{production}: each file once");
        assert!(
            files.iter().all(|f| f.lfn.ends_with(".txt") && f.size > 0),
            "only complete files: {files:?}"
        );
    }
}

/// Attempt directories under the work directory, with whether each has ended.
fn attempts(work: &Path) -> Vec<(PathBuf, bool)> {
    let mut found = Vec::new();
    for production in std::fs::read_dir(work).into_iter().flatten().flatten() {
        for attempt in std::fs::read_dir(production.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = attempt.path();
            if path.join("prodsys.started").exists() {
                let ended = path.join("prodsys.exit").exists();
                found.push((path, ended));
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dispatcher_killed_while_jobs_run_is_replaced_and_nothing_runs_twice() {
    let env = environment(6).await;
    let _jobs = KillJobsOnDrop(env.settings.dispatcher.work_dir.clone());
    let mut first = Dispatcher::start(&env, "dispatcher-1").await;
    let app = spawn_services(
        env,
        &[
            Service::Status,
            Service::Catalog,
            Service::Checker,
            Service::Intake,
        ],
    )
    .await;
    let db = app.env.db().await.unwrap();
    let work = app.env.settings.dispatcher.work_dir.clone();
    // 12 jobs on 6 slots: jobs take 0, 3 or 6 s.
    let productions = submit_all(
        &app,
        vec![
            count_request(6, 3, "crash-a"),
            count_request(6, 3, "crash-b"),
        ],
    )
    .await;
    wait_for(
        "some jobs done and others running",
        Duration::from_secs(60),
        || async {
            let states = job_states(&db).await;
            (states.get("DONE").copied().unwrap_or(0) >= 1
                && states.get("RUNNING").copied().unwrap_or(0) >= 3)
                .then_some(())
        },
    )
    .await
    .unwrap();

    first.kill().await;
    let ended_at_kill = attempts(&work).iter().filter(|(_, ended)| *ended).count();
    // Jobs go on without a dispatcher; wait until one more ended meanwhile.
    wait_for(
        "an attempt to end while no dispatcher runs",
        Duration::from_secs(30),
        || async {
            (attempts(&work).iter().filter(|(_, ended)| *ended).count() > ended_at_kill)
                .then_some(())
        },
    )
    .await
    .unwrap();
    let second = Dispatcher::start(&app.env, "dispatcher-2").await;
    wait_for(
        "the new dispatcher to take the installation over",
        Duration::from_secs(20),
        || async {
            owner(&db)
                .await
                .filter(|o| o.contains(&format!(":{}:", second.pid)))
        },
    )
    .await
    .unwrap();
    // It adopts attempts still running, not only ended ones.
    assert!(
        attempts(&work).iter().any(|(_, ended)| !*ended),
        "some attempts still run when the new dispatcher takes over"
    );
    all_completed(&db, &productions, Duration::from_secs(90)).await;
    assert_each_job_ran_once(&app, &productions, 6).await;
    second.stop().await;
    // A graceful stop gives the lease up for a successor.
    let leases: i64 = db
        .query_one("SELECT count(*) FROM dispatcher.installation_leases", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(leases, 0);
    drop(db);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_dispatcher_replicas_share_the_work_and_one_takes_over_when_the_other_dies() {
    let env = environment(8).await;
    let _jobs = KillJobsOnDrop(env.settings.dispatcher.work_dir.clone());
    let mut replicas = vec![
        Dispatcher::start(&env, "replica-1").await,
        Dispatcher::start(&env, "replica-2").await,
    ];
    let app = spawn_services(
        env,
        &[
            Service::Status,
            Service::Catalog,
            Service::Checker,
            Service::Intake,
        ],
    )
    .await;
    let db = app.env.db().await.unwrap();

    // 24 productions of 3 jobs (0, 1 and 2 s), both replicas planning.
    let requests = (0..24)
        .map(|i| count_request(3, 1, &format!("replicas-{i}")))
        .collect();
    let productions = submit_all(&app, requests).await;
    all_completed(&db, &productions, Duration::from_secs(120)).await;
    assert_each_job_ran_once(&app, &productions, 3).await;

    // Kill the replica holding the installation while jobs run: the other takes over.
    let holder = owner(&db).await.expect("a replica holds the installation");
    let killed = replicas
        .iter()
        .position(|r| holder.contains(&format!(":{}:", r.pid)))
        .expect("the holder is one of the replicas");
    let later = submit_all(
        &app,
        (0..6)
            .map(|i| count_request(3, 2, &format!("takeover-{i}")))
            .collect(),
    )
    .await;
    wait_for("jobs running", Duration::from_secs(60), || async {
        (job_states(&db).await.get("RUNNING").copied().unwrap_or(0) >= 2).then_some(())
    })
    .await
    .unwrap();
    replicas[killed].kill().await;
    let survivor = replicas.remove(1 - killed);
    all_completed(&db, &later, Duration::from_secs(120)).await;
    assert_each_job_ran_once(&app, &later, 3).await;
    let now = owner(&db)
        .await
        .expect("the survivor holds the installation");
    assert!(
        now.contains(&format!(":{}:", survivor.pid)),
        "{now} is the survivor ({})",
        survivor.pid
    );
    survivor.stop().await;
    drop(db);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn attempts_queued_by_a_killed_dispatcher_are_started_by_the_next_once_each() {
    let mut env = environment(2).await;
    env.settings.dispatcher.max_queued_jobs = 4;
    let _jobs = KillJobsOnDrop(env.settings.dispatcher.work_dir.clone());
    let mut first = Dispatcher::start(&env, "dispatcher-1").await;
    let app = spawn_services(
        env,
        &[
            Service::Status,
            Service::Catalog,
            Service::Checker,
            Service::Intake,
        ],
    )
    .await;
    let db = app.env.db().await.unwrap();
    let work = app.env.settings.dispatcher.work_dir.clone();
    // 9 jobs of 0, 2 and 4 s on 2 slots and a queue of 4.
    let productions = submit_all(&app, vec![count_request(9, 2, "queued-kill")]).await;
    wait_for(
        "jobs waiting in the executor's queue",
        Duration::from_secs(60),
        || async {
            let states = job_states(&db).await;
            (states.get("QUEUED").copied().unwrap_or(0) >= 2).then_some(())
        },
    )
    .await
    .unwrap();
    first.kill().await;
    let queued_at_kill: Vec<PathBuf> = std::fs::read_dir(work.join(&productions[0]))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|d| d.join("prodsys.queued").exists() && !d.join("prodsys.started").exists())
        .collect();
    assert!(
        !queued_at_kill.is_empty(),
        "attempts still waiting at the kill"
    );
    let second = Dispatcher::start(&app.env, "dispatcher-2").await;
    all_completed(&db, &productions, Duration::from_secs(120)).await;
    assert_each_job_ran_once(&app, &productions, 9).await;
    // What waited was started by the successor, in the attempt it was queued
    // as (not given up and retried), and ran to its end.
    for dir in &queued_at_kill {
        let exit = std::fs::read_to_string(dir.join("prodsys.exit")).unwrap();
        assert!(exit.starts_with("exit 0\n"), "{}: {exit}", dir.display());
    }
    let attempts: i64 = db
        .query_one("SELECT max(attempt)::bigint FROM dispatcher.jobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 1, "no attempt was lost to the kill");
    second.stop().await;
    drop(db);
    app.stop().await;
}

/// The lease itself, against PostgreSQL: one holder at a time, taken over
/// only once expired, and a holder that lost it changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_installation_lease_has_one_holder_and_passes_on_only_when_it_expires() {
    let env = environment(1).await;
    // The dispatcher's schema, from a dispatcher that started and stopped.
    let dispatcher = Dispatcher::start(&env, "schema").await;
    dispatcher.stop().await;
    let db = prodsys_db::Db::new(env.settings.database.url(), "dispatcher", 4).unwrap();
    let ttl = Duration::from_millis(600);
    let a = Lease::new(db.clone(), "test-installation", "a", ttl);
    let b = Lease::new(db.clone(), "test-installation", "b", ttl);
    assert_eq!(a.acquire().await.unwrap(), Some(None), "free: taken");
    assert_eq!(b.acquire().await.unwrap(), None, "held: refused");
    assert_eq!(
        a.acquire().await.unwrap(),
        Some(Some("a".into())),
        "renewed"
    );
    let shutdown = CancellationToken::new();
    let _held = a.hold(&shutdown);
    {
        let mut client = db.client().await.unwrap();
        let tx = client.transaction().await.unwrap();
        a.fence(&tx).await.expect("the holder may change jobs");
        assert!(b.fence(&tx).await.is_err(), "the other may not");
    }
    // `a` stops renewing: once expired, `b` takes it, and `a`'s next transaction is refused.
    let taken = wait_for("the lease to expire", Duration::from_secs(10), || async {
        b.acquire().await.unwrap()
    })
    .await
    .unwrap();
    assert_eq!(taken, Some("a".into()));
    let mut client = db.client().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let refused = a.fence(&tx).await.unwrap_err();
    assert!(refused.to_string().contains("no longer holds"), "{refused}");
    assert!(a.lost(), "the old holder knows");
    drop(tx);
    assert_eq!(a.acquire().await.unwrap(), None);
    // Released: free at once.
    b.release().await.unwrap();
    assert_eq!(a.acquire().await.unwrap(), Some(None));
    drop(client);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_dispatcher_cancels_the_jobs_it_adopted() {
    let env = environment(4).await;
    let _jobs = KillJobsOnDrop(env.settings.dispatcher.work_dir.clone());
    let mut first = Dispatcher::start(&env, "dispatcher-1").await;
    let app = spawn_services(
        env,
        &[
            Service::Status,
            Service::Catalog,
            Service::Checker,
            Service::Intake,
        ],
    )
    .await;
    let db = app.env.db().await.unwrap();
    let work = app.env.settings.dispatcher.work_dir.clone();
    // Jobs 1 and 2 sleep 1777 and 3554 s (odd numbers, to find their processes).
    let production = app.accepted(count_request(3, 1777, "cancel-adopted")).await;
    wait_for("two jobs running", Duration::from_secs(60), || async {
        let states = job_states(&db).await;
        (states.get("RUNNING") == Some(&2) && states.get("DONE") == Some(&1)).then_some(())
    })
    .await
    .unwrap();
    first.kill().await;
    let sleeping = || {
        let out = std::process::Command::new("pgrep")
            .args(["-f", "^sleep (1777|3554)$"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    assert_eq!(sleeping(), 2, "the jobs outlive the dispatcher");

    let second = Dispatcher::start(&app.env, "dispatcher-2").await;
    wait_for(
        "the new dispatcher to take the installation over",
        Duration::from_secs(20),
        || async {
            owner(&db)
                .await
                .filter(|o| o.contains(&format!(":{}:", second.pid)))
        },
    )
    .await
    .unwrap();
    assert!(
        app.cancel(&production, "wrong energy range")
            .await
            .unwrap()
            .accepted
    );
    wait_for(
        "the production cancelled",
        Duration::from_secs(30),
        || async {
            let state: String = db
                .query_one(
                    "SELECT state FROM dispatcher.productions WHERE production_id = $1",
                    &[&production],
                )
                .await
                .ok()?
                .get(0);
            (state == "CANCELLED").then_some(())
        },
    )
    .await
    .unwrap();
    wait_for(
        "the adopted jobs' processes to end",
        Duration::from_secs(10),
        || async { (sleeping() == 0).then_some(()) },
    )
    .await
    .unwrap();
    // Their supervisors stayed to record the signal.
    for index in [1, 2] {
        let exit = work
            .join(&production)
            .join(format!("{index:06}.a1/prodsys.exit"));
        let text = wait_for("the exit file", Duration::from_secs(10), || async {
            std::fs::read_to_string(&exit).ok()
        })
        .await
        .unwrap();
        assert!(text.starts_with("exit 143\n"), "job {index}: {text}");
    }
    second.stop().await;
    drop(db);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dispatcher_killed_while_slurm_jobs_run_is_replaced_and_nothing_runs_twice() {
    const SLURM: &str = "slurm-adoption";
    let started =
        std::process::Command::new(prodsys_testkit::repo_root().join("tests/servers/slurm/start"))
            .status()
            .expect("running tests/servers/slurm/start");
    assert!(started.success(), "the Slurm test cluster did not start");
    let mut env = environment(2).await;
    env.settings.dispatcher.backends = BTreeMap::from([(
        SLURM.to_string(),
        prodsys_config::BackendSettings::Slurm {
            partition: "debug".into(),
            max_in_flight: 4,
            sbatch_args: vec![],
            shared_filesystem: true,
        },
    )]);
    let mut first = Dispatcher::start(&env, "slurm-dispatcher-1").await;
    let app = spawn_services(
        env,
        &[
            Service::Status,
            Service::Catalog,
            Service::Checker,
            Service::Intake,
        ],
    )
    .await;
    let db = app.env.db().await.unwrap();
    let work = app.env.settings.dispatcher.work_dir.clone();
    // 6 jobs, 4 at a time on Slurm: jobs take 0, 4 or 8 s.
    let production = app
        .accepted(prodsys_proto::SubmitRequestRequest {
            backend: SLURM.into(),
            ..count_request(6, 4, "slurm-crash")
        })
        .await;
    let deployment: String = db
        .query_one("SELECT tag FROM dispatcher.deployment", &[])
        .await
        .unwrap()
        .get(0);
    let ours = format!("{deployment}.{production}.");
    wait_for(
        "some jobs done and others running on Slurm",
        Duration::from_secs(90),
        || async {
            let states = job_states(&db).await;
            (states.get("DONE").copied().unwrap_or(0) >= 1
                && states.get("RUNNING").copied().unwrap_or(0) >= 2)
                .then_some(())
        },
    )
    .await
    .unwrap();

    first.kill().await;
    // The cluster goes on without a dispatcher: wait until a job it ran ended meanwhile.
    let running_at_kill: BTreeSet<String> = support::slurm_jobs(&ours)
        .into_iter()
        .filter(|(_, state)| state == "RUNNING")
        .map(|(name, _)| name)
        .collect();
    assert!(!running_at_kill.is_empty());
    wait_for(
        "a Slurm job to end while no dispatcher runs",
        Duration::from_secs(60),
        || async {
            support::slurm_jobs(&ours)
                .iter()
                .any(|(name, state)| running_at_kill.contains(name) && state == "COMPLETED")
                .then_some(())
        },
    )
    .await
    .unwrap();
    let second = Dispatcher::start(&app.env, "slurm-dispatcher-2").await;
    wait_for(
        "the new dispatcher to take the Slurm installation over",
        Duration::from_secs(20),
        || async {
            owner_of(&db, SLURM)
                .await
                .filter(|o| o.contains(&format!(":{}:", second.pid)))
        },
    )
    .await
    .unwrap();
    all_completed(
        &db,
        std::slice::from_ref(&production),
        Duration::from_secs(120),
    )
    .await;

    // Every job DONE in its first attempt ...
    let rows = db
        .query(
            "SELECT job_index, state, attempt, raw_status FROM dispatcher.jobs
             WHERE production_id = $1 ORDER BY job_index",
            &[&production],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 6);
    for row in &rows {
        let (index, state, attempt, raw): (i64, &str, i32, Option<&str>) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        assert_eq!((state, attempt), ("DONE", 1), "job {index}: {raw:?}");
    }
    // ... submitted to Slurm once (one job per attempt name) ...
    let mut names: BTreeMap<String, u32> = BTreeMap::new();
    for (name, _) in support::slurm_jobs(&ours) {
        *names.entry(name).or_default() += 1;
    }
    let expected: BTreeMap<String, u32> = (0..6).map(|i| (format!("{ours}{i:06}.a1"), 1)).collect();
    assert_eq!(names, expected, "one Slurm job per attempt");
    // ... which ran once ...
    let runs = std::fs::read_to_string(work.join(&production).join("runs.log")).unwrap();
    let mut counted: BTreeMap<i64, u32> = BTreeMap::new();
    for line in runs.lines() {
        *counted
            .entry(line.split_whitespace().next().unwrap().parse().unwrap())
            .or_default() += 1;
    }
    assert_eq!(
        counted,
        (0..6).map(|i| (i, 1)).collect(),
        "runs of each job"
    );
    // ... and its file catalogued once.
    let files = wait_for(
        "the production's files",
        Duration::from_secs(30),
        || async {
            let files = app.files(&production).await;
            (files.len() >= 6).then_some(files)
        },
    )
    .await
    .unwrap();
    assert_eq!(files.len(), 6, "{files:?}");
    second.stop().await;
    drop(db);
    app.stop().await;
}
