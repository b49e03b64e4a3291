//! Forwarding outputs onward, against a real XRootD server (Debian's
//! xrootd-server, started by tests/servers/xrootd/start bound to this
//! machine) and a posix directory: every file lands with the catalog's
//! adler32 (as the storage itself computes it), replicas show in FindFiles,
//! a production is finished only once its outputs are where it asked,
//! `prodctl get` downloads and resumes, an outage of the storage holds and
//! then recovers by itself, a copy that does not verify is made again, and
//! a production whose `production.completed` overtakes its last
//! `job.output` finishes forwarding only once those outputs are there too,
//! and a remote job's outputs, catalogued on the XRootD server, are copied
//! from there to a posix destination.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prodsys::Service;
use prodsys_config::DestinationSettings;
use prodsys_proto as pb;
use prodsys_testkit::{TestEnv, wait_for};
use support::storage::{
    adler32_of, base_path, files_below, files_of, forwarded_to, forwarding_to, publish_event,
    replica_in, server, stop_server, storage_adler32, stored_adler32, with_replicas,
    xroot_destination, xrootd_data,
};
use support::{built_binary, cta_example, spawn_app_with, spawn_services, violated_fields};

/// The XRootD instance `name`; its `root://127.0.0.1:PORT`.
fn xrootd(name: &str) -> String {
    server("xrootd", name)
}

fn verified(replicas: &[pb::Replica], destination: &str) -> Option<pb::Replica> {
    replica_in(replicas, destination, pb::ReplicaState::Verified)
}

#[tokio::test]
async fn the_cta_example_is_forwarded_to_xrootd_and_downloaded_with_prodctl() {
    let server = xrootd("forwarding");
    let base = base_path();
    let app = spawn_app_with(|env| {
        forwarding_to(env, "xrd-test", xroot_destination(&server, &base));
    })
    .await;

    // An unknown destination is refused at submit time, naming the field.
    let refused = app
        .decided(
            &app.submit(pb::SubmitRequestRequest {
                forward: vec!["xrd-test".into(), "nowhere".into()],
                ..cta_example()
            })
            .await
            .unwrap()
            .request_id,
        )
        .await;
    assert_eq!(refused.state(), pb::RequestState::Rejected);
    assert_eq!(refused.violations[0].field, "forward[1]", "{refused:?}");
    assert!(
        refused.violations[0].description.contains("xrd-test"),
        "the known destinations are named: {refused:?}"
    );

    let production_id = app.accepted(forwarded_to(&["xrd-test"])).await;
    // The watch ends only once the production is finished: its jobs done
    // and its outputs on the storage.
    let last = app.watch(&production_id).await.pop().unwrap();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
    assert!(last.finished, "{last:?}");
    let found = files_of(&app, &production_id).await;
    assert_eq!(found.len(), 8, "4 jobs × 2 NSB levels");
    assert_eq!(
        last.forwarding,
        [pb::DestinationProgress {
            destination: "xrd-test".into(),
            forwarded: 8,
            total: 8,
            failing: 0,
            held_reason: String::new(),
        }]
    );
    // At that moment every file is on the storage with the catalog's
    // adler32, as the server computes it and as its bytes say.
    for (file, replicas) in &found {
        assert_eq!(replicas.len(), 1, "{replicas:?}");
        let replica = verified(replicas, "xrd-test").unwrap_or_else(|| panic!("{file:?}"));
        assert_eq!(replica.url, format!("{server}/{base}{}", file.lfn));
        assert_eq!(
            storage_adler32(&server, &format!("{base}{}", file.lfn)).as_deref(),
            Some(file.adler32.as_str()),
            "{}",
            file.lfn
        );
        let on_disk = xrootd_data("forwarding").join(format!("{}{}", &base[1..], file.lfn));
        assert_eq!(adler32_of(&on_disk), file.adler32);
    }
    let files: Vec<pb::OutputFile> = found.into_iter().map(|(f, _)| f).collect();
    let stored = files_below(&xrootd_data("forwarding").join(&base[1..]));
    let lfns: BTreeSet<String> = files.iter().map(|f| f.lfn.clone()).collect();
    assert_eq!(stored, lfns, "each file once, nothing else");

    // prodctl get, from another machine's point of view: the job's own
    // copies are gone, so every file comes from root://.
    for file in &files {
        std::fs::remove_file(file.url.strip_prefix("file://").unwrap()).unwrap();
    }
    let to = app.env.work_dir.join("downloads");
    let catalog = format!(
        "http://{}",
        app.stack.addr(prodsys::Service::Catalog).unwrap()
    );
    let prodctl = built_binary("prodctl", "prodctl");
    // Asynchronously: the stack answers on this test's runtime.
    let get = || {
        tokio::process::Command::new(&prodctl)
            .args(["--catalog", &catalog, "get", &production_id, "--to"])
            .arg(&to)
            .output()
    };
    // The replicas as prodctl lists them: under each file, the destination,
    // its state and where the copy is; in JSON beside each file.
    let listed = tokio::process::Command::new(&prodctl)
        .args(["--catalog", &catalog, "files", &production_id, "--replicas"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{stdout}");
    for file in &files {
        assert!(
            stdout.contains(&format!(
                "    xrd-test verified {server}/{base}{}\n",
                file.lfn
            )),
            "{stdout}"
        );
    }
    let listed = tokio::process::Command::new(&prodctl)
        .args([
            "--output",
            "json",
            "--catalog",
            &catalog,
            "files",
            &production_id,
        ])
        .arg("--replicas")
        .output()
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let json = json.as_array().unwrap();
    assert_eq!(json.len(), 8, "{json:?}");
    for file in json {
        assert_eq!(file["replicas"][0]["destination"], "xrd-test", "{file}");
        assert_eq!(file["replicas"][0]["state"], "verified", "{file}");
    }
    let first = get().await.unwrap();
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(
        stdout.matches("downloaded from root://").count(),
        8,
        "{stdout}"
    );
    for file in &files {
        let path = to.join(file.lfn.trim_start_matches('/'));
        assert_eq!(adler32_of(&path), file.adler32, "{}", file.lfn);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), file.size);
    }
    // Again: everything is there and correct, nothing is fetched.
    let second = get().await.unwrap();
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success(), "{stdout}");
    assert_eq!(stdout.matches("present").count(), 8, "{stdout}");
    assert!(!stdout.contains("downloaded"), "{stdout}");
    // A file damaged locally is fetched again; one chosen by metadata only.
    let damaged = files.iter().find(|f| f.metadata["nsb"] == "5").unwrap();
    std::fs::write(to.join(damaged.lfn.trim_start_matches('/')), b"damaged").unwrap();
    let third = tokio::process::Command::new(&prodctl)
        .args([
            "--catalog",
            &catalog,
            "get",
            &production_id,
            "--metadata",
            "nsb=5",
            "--to",
        ])
        .arg(&to)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&third.stdout);
    assert!(third.status.success(), "{stdout}");
    assert_eq!(stdout.lines().count(), 4, "the NSB 5 files only: {stdout}");
    assert_eq!(
        stdout.matches("downloaded from root://").count(),
        1,
        "{stdout}"
    );
    assert_eq!(
        adler32_of(&to.join(damaged.lfn.trim_start_matches('/'))),
        damaged.adler32
    );
    app.stop().await;
}

#[tokio::test]
async fn an_xrootd_outage_holds_the_production_and_everything_arrives_once_it_is_back() {
    const NAME: &str = "forwarding-outage";
    let server = xrootd(NAME);
    let base = base_path();
    let app = spawn_app_with(|env| {
        forwarding_to(env, "xrd-test", xroot_destination(&server, &base));
    })
    .await;
    let production_id = app.accepted(forwarded_to(&["xrd-test"])).await;
    // The storage goes away while the jobs write their outputs.
    stop_server("xrootd", NAME);
    let held = app
        .production_when(
            "the production completed, held by its destination",
            Duration::from_secs(120),
            &production_id,
            |p| {
                p.state() == pb::ProductionState::Completed
                    && p.forwarding
                        .first()
                        .is_some_and(|d| d.total == 8 && d.failing > 0)
            },
        )
        .await;
    assert!(!held.finished, "{held:?}");
    assert!(
        held.held_reason
            .contains("forwarding to xrd-test is failing"),
        "{held:?}"
    );
    let found = files_of(&app, &production_id).await;
    assert!(found.iter().all(|(_, r)| verified(r, "xrd-test").is_none()));
    // Each replica failed at least once, with the reason (some may be being
    // tried again right now).
    for (file, replicas) in &found {
        let r = &replicas[0];
        assert!(r.attempts >= 1 && !r.reason.is_empty(), "{file:?} {r:?}");
        assert!(
            matches!(
                r.state(),
                pb::ReplicaState::Failed | pb::ReplicaState::Copying
            ),
            "{r:?}"
        );
    }
    // Still not finished a while later: retried, never given up on, never
    // reported in place.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = app.production(&production_id).await.unwrap();
    assert!(!still.finished, "{still:?}");

    // Back on the same port: the retries find it by themselves.
    assert_eq!(xrootd(NAME), server);
    let done = app
        .production_when(
            "the production finished after the outage",
            Duration::from_secs(60),
            &production_id,
            |p| p.finished,
        )
        .await;
    assert_eq!(done.forwarding[0].forwarded, 8, "{done:?}");
    assert!(done.held_reason.is_empty(), "{done:?}");
    let found = files_of(&app, &production_id).await;
    for (file, replicas) in &found {
        assert!(verified(replicas, "xrd-test").is_some(), "{file:?}");
        assert_eq!(
            storage_adler32(&server, &format!("{base}{}", file.lfn)).as_deref(),
            Some(file.adler32.as_str())
        );
    }
    // Once: one replica per file, one copy per LFN on the storage, nothing
    // half-written left behind.
    let db = app.env.db().await.unwrap();
    let replicas: i64 = db
        .query_one("SELECT count(*) FROM catalog.replicas", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(replicas, 8);
    let stored = files_below(&xrootd_data(NAME).join(&base[1..]));
    let lfns: BTreeSet<String> = found.iter().map(|(f, _)| f.lfn.clone()).collect();
    assert_eq!(stored, lfns);
    app.stop().await;
}

#[tokio::test]
async fn a_posix_copy_that_does_not_verify_is_removed_and_made_again() {
    let mut disk = PathBuf::new();
    let app = spawn_app_with(|env| {
        disk = env.work_dir.join("disk");
        forwarding_to(env, "disk", DestinationSettings::posix(disk.clone()));
    })
    .await;
    let production_id = app.accepted(forwarded_to(&["disk"])).await;
    let last = app.watch(&production_id).await.pop().unwrap();
    assert!(last.finished, "{last:?}");
    for (file, replicas) in files_of(&app, &production_id).await {
        let replica = verified(&replicas, "disk").unwrap();
        let landed = disk.join(file.lfn.trim_start_matches('/'));
        assert_eq!(replica.url, format!("file://{}", landed.display()));
        assert_eq!(adler32_of(&landed), file.adler32);
    }

    // A late file of the production whose bytes were damaged after the
    // catalog recorded their adler32: every copy of it fails to verify.
    let source = app.env.work_dir.join("late.dat");
    let good = b"the bytes the catalog knows".to_vec();
    let sum = prodsys_core::checksum::adler32_hex(good.as_slice())
        .unwrap()
        .1;
    std::fs::write(&source, b"the bytes the catalog does not know").unwrap();
    let lfn = "/vo.cta.in2p3.fr/MC/late/late.dat";
    app.catalog
        .clone()
        .register_files(pb::RegisterFilesRequest {
            files: vec![pb::OutputFile {
                lfn: lfn.into(),
                size: good.len() as u64,
                adler32: sum.clone(),
                url: format!("file://{}", source.display()),
                production_id: production_id.clone(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    let late = || async {
        with_replicas(
            &app,
            pb::FindFilesRequest {
                lfn_prefix: lfn.into(),
                ..Default::default()
            },
        )
        .await
        .pop()
        .unwrap()
        .1
    };
    let failing = wait_for(
        "the second failed copy",
        Duration::from_secs(30),
        || async {
            let replica = late().await.first()?.clone();
            assert_ne!(replica.state(), pb::ReplicaState::Verified, "{replica:?}");
            (replica.state() == pb::ReplicaState::Failed && replica.attempts >= 2)
                .then_some(replica)
        },
    )
    .await
    .unwrap();
    assert!(
        failing.reason.contains(&format!("the catalog has {sum}")),
        "{failing:?}"
    );
    // The bad copy does not stay on the destination.
    assert!(!disk.join(lfn.trim_start_matches('/')).exists());

    // The source repaired, the next try verifies.
    std::fs::write(&source, &good).unwrap();
    let replica = wait_for("the copy made again", Duration::from_secs(30), || async {
        verified(&late().await, "disk")
    })
    .await
    .unwrap();
    assert!(replica.attempts >= 3, "{replica:?}");
    assert_eq!(
        std::fs::read(disk.join(lfn.trim_start_matches('/'))).unwrap(),
        good
    );
    app.stop().await;
}

#[tokio::test]
async fn without_destinations_outputs_stay_where_they_are_and_a_request_for_one_is_refused() {
    let app = support::spawn_app().await;
    let validation = app.validate(forwarded_to(&["xrd-test"])).await;
    assert!(!validation.acceptable);
    assert_eq!(
        validation
            .violations
            .iter()
            .map(|v| v.field.as_str())
            .collect::<Vec<_>>(),
        ["forward[0]"]
    );
    assert!(
        validation.violations[0]
            .description
            .contains("none is configured")
    );
    // Empty names are refused at the door.
    let refused = app
        .submit(pb::SubmitRequestRequest {
            forward: vec![String::new()],
            ..cta_example()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&refused), ["forward[0]"]);
    // As before: finished when the jobs are, no replicas.
    let production_id = app.run_and_catalogue(cta_example()).await;
    let last = app.production(&production_id).await.unwrap();
    assert!(last.finished && last.forwarding.is_empty(), "{last:?}");
    let found = files_of(&app, &production_id).await;
    assert!(!found.is_empty() && found.iter().all(|(_, r)| r.is_empty()));
    app.stop().await;
}

/// The `job.output` of job `job_index` of `production_id`: two small files
/// written under `dir`.
fn job_output(dir: &Path, production_id: &str, job_index: u64) -> pb::JobOutput {
    let files = (0..2)
        .map(|n| {
            let bytes = format!("job {job_index} file {n} of {production_id}").into_bytes();
            let path = dir.join(format!("job{job_index}-{n}.dat"));
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(&path, &bytes).unwrap();
            pb::OutputFile {
                lfn: format!("/vo.cta.in2p3.fr/MC/race/{production_id}/job{job_index}-{n}.dat"),
                size: bytes.len() as u64,
                adler32: adler32_of(&path),
                url: format!("file://{}", path.display()),
                production_id: production_id.into(),
                job_index,
                ..Default::default()
            }
        })
        .collect();
    pb::JobOutput {
        production_id: production_id.into(),
        job_index,
        attempt: 1,
        files,
    }
}

/// Speaks for the checker and the dispatcher of a production of
/// `job_total` jobs forwarded to `forward`: accepted, dispatched, `outputs`
/// (each job's `job.output`), then `production.completed` counting every job
/// DONE (outputs left out come later, from the test).
async fn speak_for_a_production(
    app: &support::App,
    production_id: &str,
    forward: &[&str],
    job_total: u64,
    outputs: Vec<pb::JobOutput>,
) {
    publish_event(
        &app.env,
        "request.accepted",
        &pb::RequestAccepted {
            request_id: uuid::Uuid::now_v7().to_string(),
            production_id: production_id.into(),
            profile: "cta-irf-mc".into(),
            vo: "vo.cta.in2p3.fr".into(),
            backend: "local".into(),
            forward: forward.iter().map(|d| d.to_string()).collect(),
            ..Default::default()
        },
    )
    .await;
    publish_event(
        &app.env,
        "production.dispatched",
        &pb::ProductionDispatched {
            production_id: production_id.into(),
            job_total,
            ..Default::default()
        },
    )
    .await;
    for output in &outputs {
        publish_event(&app.env, "job.output", output).await;
    }
    publish_event(
        &app.env,
        "production.completed",
        &pb::ProductionCompleted {
            production_id: production_id.into(),
            state: pb::ProductionState::Completed as i32,
            counts: Some(pb::JobCounts {
                done: job_total,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
}

/// A production of two jobs forwarded to `forward`, in the order that used
/// to lose files: accepted, dispatched, the first job's outputs, then
/// `production.completed` counting both jobs DONE (the second job's outputs
/// come later, from the test).
async fn two_jobs_completion_before_the_second_output(
    app: &support::App,
    written: &Path,
    production_id: &str,
    forward: &[&str],
) {
    speak_for_a_production(
        app,
        production_id,
        forward,
        2,
        vec![job_output(written, production_id, 0)],
    )
    .await;
}

/// production.completed handled before the last job.output of its
/// production (another consumer's batch, a redelivery): the catalog has
/// every file it knows of forwarded, but the production is not reported
/// forwarded, nor finished, until the outputs of every job the dispatcher
/// counted DONE are catalogued and forwarded too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_completion_that_overtakes_the_last_outputs_waits_for_them() {
    prodsys_telemetry::init("warn");
    let mut env = TestEnv::new().await.expect("test environment");
    let disk = env.work_dir.join("disk");
    let written = env.work_dir.join("written");
    forwarding_to(&mut env, "disk", DestinationSettings::posix(disk.clone()));
    // No checker, no dispatcher: the test speaks for them, in the order
    // that used to lose files.
    let app = spawn_services(env, &[Service::Intake, Service::Status, Service::Catalog]).await;
    let production_id = "CTA-990001";
    two_jobs_completion_before_the_second_output(&app, &written, production_id, &["disk"]).await;

    // The catalog took both, forwarded the first job's files, and swept
    // since (its progress is announced, nothing left to look at)...
    let db = app.env.db().await.unwrap();
    wait_for(
        "the first job's files forwarded and their progress announced",
        Duration::from_secs(30),
        || async {
            let row = db
                .query_one(
                    "SELECT (SELECT count(*) FROM catalog.replicas
                             WHERE production_id = $1 AND state = 'verified'),
                            EXISTS (SELECT FROM catalog.productions WHERE production_id = $1),
                            (SELECT NOT progress_dirty FROM catalog.forwarding
                             WHERE production_id = $1)",
                    &[&production_id],
                )
                .await
                .unwrap();
            (row.get::<_, i64>(0) == 2
                && row.get::<_, bool>(1)
                && row.get::<_, Option<bool>>(2) == Some(true))
            .then_some(())
        },
    )
    .await
    .unwrap();
    // ... and still does not call it forwarded: a job's outputs are missing.
    let finished_at: Option<chrono::DateTime<chrono::Utc>> = db
        .query_one(
            "SELECT finished_at FROM catalog.forwarding WHERE production_id = $1",
            &[&production_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(finished_at, None, "forwarded with a job's outputs missing");
    let seen = app
        .production_when(
            "status shows the production completed, 2 of 2 known files forwarded",
            Duration::from_secs(30),
            production_id,
            |p| {
                p.state() == pb::ProductionState::Completed
                    && p.forwarding.first().is_some_and(|d| d.forwarded == 2)
            },
        )
        .await;
    assert!(
        !seen.finished,
        "finished with a job's outputs missing: {seen:?}"
    );

    // The late outputs arrive: forwarded, then finished with all four.
    publish_event(
        &app.env,
        "job.output",
        &job_output(&written, production_id, 1),
    )
    .await;
    let done = app
        .production_when(
            "the production finished",
            Duration::from_secs(30),
            production_id,
            |p| p.finished,
        )
        .await;
    assert_eq!(
        done.forwarding,
        [pb::DestinationProgress {
            destination: "disk".into(),
            forwarded: 4,
            total: 4,
            failing: 0,
            held_reason: String::new(),
        }],
        "{done:?}"
    );
    let landed = files_below(&disk);
    assert_eq!(landed.len(), 4, "{landed:?}");
    let record = app
        .catalog
        .clone()
        .get_production_record(pb::GetProductionRecordRequest {
            production_id: production_id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.file_count, 4, "{record:?}");
    app.stop().await;
}

/// The same order for a production without destinations: it ends, but is
/// not finished (nor announced forwarded) until the outputs of every job it
/// counts as DONE are catalogued; then the catalog announces it, with no
/// destination, and status calls it finished with every file findable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_destinations_a_production_is_finished_once_its_outputs_are_catalogued() {
    prodsys_telemetry::init("warn");
    let env = TestEnv::new().await.expect("test environment");
    let written = env.work_dir.join("written");
    let app = spawn_services(env, &[Service::Intake, Service::Status, Service::Catalog]).await;
    let production_id = "CTA-990002";
    two_jobs_completion_before_the_second_output(&app, &written, production_id, &[]).await;
    // The catalog took both and looked at the production since...
    let db = app.env.db().await.unwrap();
    wait_for(
        "the first job's files catalogued and the production looked at",
        Duration::from_secs(30),
        || async {
            let row = db
                .query_one(
                    "SELECT (SELECT count(*) FROM catalog.files WHERE production_id = $1),
                            (SELECT NOT progress_dirty FROM catalog.forwarding
                             WHERE production_id = $1)",
                    &[&production_id],
                )
                .await
                .unwrap();
            (row.get::<_, i64>(0) == 2 && row.get::<_, Option<bool>>(1) == Some(true)).then_some(())
        },
    )
    .await
    .unwrap();
    // ... and status shows it ended, not finished: a job's outputs are missing.
    let seen = app
        .production_when(
            "status shows the production completed",
            Duration::from_secs(30),
            production_id,
            |p| p.state() == pb::ProductionState::Completed,
        )
        .await;
    assert!(
        !seen.finished && seen.forwarding.is_empty(),
        "finished with a job's outputs missing: {seen:?}"
    );
    publish_event(
        &app.env,
        "job.output",
        &job_output(&written, production_id, 1),
    )
    .await;
    let done = app
        .production_when(
            "the production finished",
            Duration::from_secs(30),
            production_id,
            |p| p.finished,
        )
        .await;
    assert!(done.forwarding.is_empty(), "{done:?}");
    // Every file findable the moment it is finished.
    assert_eq!(app.files(production_id).await.len(), 4);
    app.stop().await;
}

/// A remote job's outputs lie where it wrote them, on its production's
/// first destination (XRootD here), and are catalogued there with their
/// `root://` URLs: a posix destination the production also asked for is
/// filled from the storage (`xrdcp`), and both replicas end verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_posix_destination_is_filled_from_outputs_catalogued_on_xrootd() {
    prodsys_telemetry::init("warn");
    let server = xrootd("forwarding");
    let base = base_path();
    let mut env = TestEnv::new().await.expect("test environment");
    let disk = env.work_dir.join("disk");
    forwarding_to(&mut env, "se", xroot_destination(&server, &base));
    forwarding_to(&mut env, "disk", DestinationSettings::posix(disk.clone()));
    // No checker, no dispatcher: the test speaks for them and for the job.
    let app = spawn_services(env, &[Service::Intake, Service::Status, Service::Catalog]).await;
    let production_id = "CTA-990003";

    // The job, at a site that does not share the filesystem, uploads its
    // outputs to the first destination at their LFNs; nothing is left on
    // this machine but the storage's copies.
    let site = app.env.work_dir.join("site");
    std::fs::create_dir_all(&site).unwrap();
    let mut written = Vec::new();
    let files: Vec<pb::OutputFile> = (0..2)
        .map(|n| {
            let bytes = format!("remote output {n} of {production_id}\n").repeat(1000 * (n + 1));
            let lfn = format!("/vo.cta.in2p3.fr/MC/remote/{production_id}/out{n}.dat");
            let url = format!("{server}/{base}{lfn}");
            let local = site.join(format!("out{n}.dat"));
            std::fs::write(&local, &bytes).unwrap();
            let upload = std::process::Command::new("xrdcp")
                .args(["--nopbar", "--path"])
                .arg(&local)
                .arg(&url)
                .output()
                .expect("running xrdcp");
            assert!(
                upload.status.success(),
                "{}",
                String::from_utf8_lossy(&upload.stderr)
            );
            let adler32 = adler32_of(&local);
            std::fs::remove_file(&local).unwrap();
            written.push((lfn.clone(), bytes.clone().into_bytes()));
            pb::OutputFile {
                lfn,
                size: bytes.len() as u64,
                adler32,
                url,
                production_id: production_id.into(),
                ..Default::default()
            }
        })
        .collect();
    for (lfn, bytes) in &written {
        assert_eq!(
            stored_adler32("forwarding", &format!("{base}{lfn}")),
            Some(
                prodsys_core::checksum::adler32_hex(bytes.as_slice())
                    .unwrap()
                    .1
            )
        );
    }

    speak_for_a_production(
        &app,
        production_id,
        &["se", "disk"],
        1,
        vec![pb::JobOutput {
            production_id: production_id.into(),
            job_index: 0,
            attempt: 1,
            files: files.clone(),
        }],
    )
    .await;

    // Both destinations hold every file, verified.
    let remote_files = || {
        with_replicas(
            &app,
            pb::FindFilesRequest {
                lfn_prefix: format!("/vo.cta.in2p3.fr/MC/remote/{production_id}/"),
                ..Default::default()
            },
        )
    };
    let found = match wait_for(
        "every file verified on se and on disk",
        Duration::from_secs(60),
        || async {
            let found = remote_files().await;
            (found.len() == 2
                && found
                    .iter()
                    .all(|(_, r)| verified(r, "se").is_some() && verified(r, "disk").is_some()))
            .then_some(found)
        },
    )
    .await
    {
        Ok(found) => found,
        Err(e) => panic!("{e}: {:#?}", remote_files().await),
    };
    for ((file, replicas), (lfn, bytes)) in found.iter().zip(&written) {
        assert_eq!(&file.lfn, lfn);
        // The storage's copy is the source: verified where it lies.
        let se = verified(replicas, "se").unwrap();
        assert_eq!(se.url, format!("{server}/{base}{lfn}"), "{replicas:?}");
        assert_eq!(se.url, file.url);
        // The posix copy came from there, whole, with the catalog's adler32.
        let landed = disk.join(lfn.trim_start_matches('/'));
        let on_disk = verified(replicas, "disk").unwrap();
        assert_eq!(on_disk.url, format!("file://{}", landed.display()));
        assert_eq!(adler32_of(&landed), file.adler32);
        assert_eq!(&std::fs::read(&landed).unwrap(), bytes, "{lfn}");
    }
    let done = app
        .production_when(
            "the production finished",
            Duration::from_secs(30),
            production_id,
            |p| p.finished,
        )
        .await;
    let mut progress: Vec<_> = done
        .forwarding
        .iter()
        .map(|d| (d.destination.as_str(), d.forwarded == d.total, d.failing))
        .collect();
    progress.sort();
    assert_eq!(progress, [("disk", true, 0), ("se", true, 0)], "{done:?}");
    // Nothing else on the disk (no temporary left beside a file).
    let landed = files_below(&disk.join(format!("vo.cta.in2p3.fr/MC/remote/{production_id}")));
    assert_eq!(
        landed,
        ["/out0.dat", "/out1.dat"]
            .into_iter()
            .map(String::from)
            .collect::<BTreeSet<_>>()
    );
    app.stop().await;
}
