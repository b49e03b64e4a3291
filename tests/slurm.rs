//! The Slurm backend against a real one-host Slurm cluster (slurmctld,
//! slurmd and munge, installed and started by tests/servers/slurm/start).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use prodsys::Service;
use prodsys_config::BackendSettings;
use prodsys_proto as pb;
use prodsys_testkit::{TestEnv, wait_for};
use support::{
    cta_example, sleep_request, slurm_jobs, spawn_app_with, start_slurm, use_test_profiles,
};

const SLURM: &str = "slurm-test";

fn on_slurm(env: &mut TestEnv) {
    start_slurm();
    use_test_profiles(env);
    env.settings.dispatcher.poll_interval_ms = 300;
    env.settings.dispatcher.backends = BTreeMap::from([(
        SLURM.to_string(),
        BackendSettings::Slurm {
            partition: "debug".into(),
            max_in_flight: 3,
            sbatch_args: vec![],
            shared_filesystem: true,
        },
    )]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cta_example_runs_on_slurm_and_failures_are_retried() {
    let app = spawn_app_with(on_slurm).await;
    let production = app
        .accepted(pb::SubmitRequestRequest {
            backend: SLURM.into(),
            ..cta_example()
        })
        .await;
    let last = app.watch(&production).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    assert_eq!(last.backend, SLURM);
    let files = wait_for("8 files", Duration::from_secs(30), || async {
        let files = app.files(&production).await;
        (files.len() == 8).then_some(files)
    })
    .await
    .unwrap();
    for file in &files {
        let bytes = std::fs::read(file.url.strip_prefix("file://").unwrap()).unwrap();
        assert_eq!(file.size, bytes.len() as u64);
    }
    let db = app.env.db().await.unwrap();
    let rows = db
        .query(
            "SELECT backend_job_id, raw_status FROM dispatcher.jobs WHERE production_id = $1",
            &[&production],
        )
        .await
        .unwrap();
    for row in &rows {
        let id: String = row.get(0);
        assert!(
            id.chars().all(|c| c.is_ascii_digit()),
            "a Slurm job id: {id}"
        );
        assert_eq!(row.get::<_, &str>(1), "COMPLETED");
    }
    // Each job's batch script recorded the CPU time of its command in its
    // working directory: every attempt's is known, without accounting.
    let unmeasured: i64 = db
        .query_one(
            "SELECT count(*) FROM dispatcher.jobs WHERE production_id = $1 AND cpu_measured <> attempt",
            &[&production],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unmeasured, 0, "every Slurm attempt's CPU time is known");

    // Job 1 fails on Slurm too: retried once, then exhausted.
    let partial = app
        .accepted(sleep_request(2, 0.0, 1, "slurm-retry", SLURM))
        .await;
    let last = app.watch(&partial).await.pop().unwrap();
    assert_eq!(
        last.state(),
        pb::ProductionState::PartiallyCompleted,
        "{last:?}"
    );
    let row = db
        .query_one(
            "SELECT attempt, state, raw_status, exit_code, cpu_measured FROM dispatcher.jobs WHERE production_id = $1 AND job_index = 1",
            &[&partial],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    assert_eq!(row.get::<_, &str>(1), "EXHAUSTED");
    assert_eq!(row.get::<_, &str>(2), "FAILED");
    assert_eq!(row.get::<_, Option<i32>>(3), Some(1));
    // Failed attempts' CPU time counts too.
    assert_eq!(row.get::<_, i32>(4), 2);
    // The dashboard's production page shows Slurm's own state of each job
    // and the end of its last attempt's logs, which Slurm wrote.
    let status = format!("http://{}", app.stack.addr(Service::Status).unwrap());
    let http = reqwest::Client::new();
    let jobs: serde_json::Value = http
        .get(format!("{status}/api/productions/{partial}/jobs"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job = &jobs["jobs"][1];
    assert_eq!(job["wms"], "slurm", "{jobs}");
    assert_eq!(job["installation"], SLURM, "{jobs}");
    assert_eq!(job["wms_status"], "FAILED", "{jobs}");
    assert_eq!(job["exit_code"], 1, "{jobs}");
    assert_eq!(job["attempt"], 2, "{jobs}");
    assert!(
        job["backend_job_id"]
            .as_str()
            .unwrap()
            .chars()
            .all(|c| c.is_ascii_digit()),
        "{jobs}"
    );
    assert_eq!(jobs["jobs"][0]["wms_status"], "COMPLETED", "{jobs}");
    let log: serde_json::Value = http
        .get(format!("{status}/api/productions/{partial}/jobs/1/log"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(log["available"], true, "{log}");
    assert_eq!(log["attempt"], 2, "{log}");
    assert!(
        log["stdout_tail"]
            .as_str()
            .unwrap()
            .starts_with("job 1 slept"),
        "{log}"
    );
    assert_eq!(log["stderr_tail"], "job 1 fails on purpose\n", "{log}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_scancels_and_a_restart_never_submits_an_attempt_twice() {
    let app = spawn_app_with(on_slurm).await;
    let production = app
        .accepted(sleep_request(4, 120.0, -1, "slurm-cancel", SLURM))
        .await;
    let db = app.env.db().await.unwrap();
    let deployment: String = db
        .query_one("SELECT tag FROM dispatcher.deployment", &[])
        .await
        .unwrap()
        .get(0);
    // This deployment's jobs of this production: other runs reuse production IDs.
    let ours = format!("{deployment}.{production}.");
    wait_for(
        "three jobs running on Slurm",
        Duration::from_secs(60),
        || async {
            let running = slurm_jobs(&ours)
                .into_iter()
                .filter(|(_, s)| s == "RUNNING")
                .count();
            (running == 3).then_some(())
        },
    )
    .await
    .unwrap();
    // The installation's cap holds: three in flight, one waiting.
    assert_eq!(slurm_jobs(&ours).len(), 3);

    // A crash between sbatch and the commit of its job id: the dispatcher
    // stops, and the job is left reserved without a backend id.
    let app = {
        let mut app = app;
        app.shutdown.cancel();
        let stack = std::mem::replace(&mut app.stack, prodsys::Stack { services: vec![] });
        let _ = tokio::time::timeout(Duration::from_secs(10), stack.wait()).await;
        db.execute(
            "UPDATE dispatcher.jobs SET backend_job_id = NULL, state = 'SUBMITTED'
             WHERE production_id = $1 AND job_index = 0",
            &[&production],
        )
        .await
        .unwrap();
        app.restart().await
    };
    let recovered = wait_for("the job found again by its tag", Duration::from_secs(30), || async {
        let row = db
            .query_one(
                "SELECT backend_job_id, raw_status FROM dispatcher.jobs WHERE production_id = $1 AND job_index = 0",
                &[&production],
            )
            .await
            .ok()?;
        row.get::<_, Option<String>>(0).map(|id| (id, row.get::<_, String>(1)))
    })
    .await
    .unwrap();
    assert!(
        recovered.0.chars().all(|c| c.is_ascii_digit()),
        "{recovered:?}"
    );
    let tag = format!("{ours}000000.a1");
    let named: Vec<_> = slurm_jobs(&tag);
    assert_eq!(named.len(), 1, "the attempt was submitted once: {named:?}");

    app.cancel(&production, "test").await.unwrap();
    let last = app.watch(&production).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Cancelled, "{last:?}");
    assert_eq!(last.counts.unwrap().cancelled, 4);
    wait_for(
        "Slurm to cancel the jobs",
        Duration::from_secs(30),
        || async {
            let jobs = slurm_jobs(&ours);
            jobs.iter().all(|(_, s)| s == "CANCELLED").then_some(())
        },
    )
    .await
    .unwrap();
    app.stop().await;
}

/// A cluster configured as not sharing the work directory: each batch
/// script uploads what its command wrote to the production's first
/// destination (a real XRootD), and prodsys catalogues the files from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_elsewhere_uploads_its_outputs_and_they_are_catalogued_from_the_storage() {
    use support::storage::{
        base_path, files_of, forwarding_to, replica_in, server, storage_adler32, xroot_destination,
    };
    let xrootd = server("xrootd", "slurm-remote");
    let base = base_path();
    let app = spawn_app_with(|env| {
        on_slurm(env);
        if let Some(BackendSettings::Slurm {
            shared_filesystem, ..
        }) = env.settings.dispatcher.backends.get_mut(SLURM)
        {
            *shared_filesystem = false;
        }
        forwarding_to(env, "se", xroot_destination(&xrootd, &base));
    })
    .await;
    let production = app
        .accepted(pb::SubmitRequestRequest {
            backend: SLURM.into(),
            forward: vec!["se".into()],
            ..cta_example()
        })
        .await;
    let last = app.watch(&production).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    let files = wait_for(
        "8 files verified on se",
        Duration::from_secs(60),
        || async {
            let files = files_of(&app, &production).await;
            (files.len() == 8
                && files
                    .iter()
                    .all(|(_, r)| replica_in(r, "se", pb::ReplicaState::Verified).is_some()))
            .then_some(files)
        },
    )
    .await
    .unwrap();
    for (file, replicas) in &files {
        let path = format!("/{}{}", &base[1..], file.lfn);
        assert_eq!(file.url, format!("{xrootd}/{path}"), "{file:?}");
        assert_eq!(
            Some(file.adler32.clone()),
            storage_adler32(&xrootd, &path),
            "{file:?}"
        );
        assert_eq!(replicas[0].url, file.url, "{replicas:?}");
    }
    app.stop().await;
}
