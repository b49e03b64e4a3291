//! A finished production's record: its numbers agree with the catalog and
//! the status service, it reads the same over gRPC, on the status HTTP port
//! and from `prodctl record`, and it is catalogued under the production as a
//! Workflow Run RO-Crate that roc-validator accepts.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use prodsys::Service;
use prodsys_proto as pb;
use prodsys_testkit::wait_for;
use serde_json::Value;
use support::{built_binary, cta_example, spawn_app_with};

/// adler32 written out here, independent of the code under test.
fn adler32(data: &[u8]) -> String {
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + u32::from(byte)) % 65521;
        b = (b + a) % 65521;
    }
    format!("{:08x}", (b << 16) | a)
}

/// The Python of an environment with roc-validator (tests/rocrate/
/// requirements.txt): the test command's (var/venv/rocrate), else one made
/// here under target/.
fn rocrate_python() -> PathBuf {
    let root = prodsys_testkit::repo_root();
    let python = |venv: &PathBuf| venv.join("bin/python");
    let ready = |venv: &PathBuf| {
        std::process::Command::new(python(venv))
            .args(["-c", "import rocrate_validator, rocrate"])
            .status()
            .is_ok_and(|s| s.success())
    };
    let local = root.join("var/venv/rocrate");
    if ready(&local) {
        return python(&local);
    }
    let venv = root.join("target/venv/rocrate");
    if !ready(&venv) {
        let made = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv");
        assert!(made.success(), "python3 -m venv {}", venv.display());
        let installed = std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "-r"])
            .arg(root.join("tests/rocrate/requirements.txt"))
            .status()
            .expect("pip install roc-validator");
        assert!(
            installed.success(),
            "pip install -r tests/rocrate/requirements.txt"
        );
    }
    python(&venv)
}

/// Validates the crate in `dir` against the Process Run Crate profile (its
/// required checks); the validator's report when it fails.
fn validate_crate(dir: &std::path::Path) -> Result<Value, String> {
    // Beside the crate, not in it.
    let report = dir.with_extension("report.json");
    let out = std::process::Command::new(rocrate_python())
        .arg(prodsys_testkit::repo_root().join("tests/rocrate/validate.py"))
        .args([
            "-y",
            "--disable-color",
            "validate",
            "-p",
            "process-run-crate-0.5",
        ])
        .args(["-f", "json", "-o"])
        .arg(&report)
        .arg(dir)
        .output()
        .expect("running roc-validator");
    let text = std::fs::read_to_string(&report).map_err(|e| {
        format!(
            "no report ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let report: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    if out.status.success() && report["passed"] == true {
        Ok(report)
    } else {
        Err(text)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_production_s_record_agrees_with_the_catalog_and_status_and_is_a_valid_ro_crate()
{
    let app = spawn_app_with(|env| {
        env.settings.catalog.records_dir = env.work_dir.join("records");
    })
    .await;
    let answer = app.submit(cta_example()).await.unwrap();
    let request = app.decided(&answer.request_id).await;
    assert_eq!(request.state(), pb::RequestState::Accepted, "{request:?}");
    let production_id = request.production_id.clone();
    let snapshots = app.watch(&production_id).await;
    let last = snapshots.last().unwrap().clone();
    assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");

    // The record is there once every output is registered, and its file
    // once the recorder wrote it.
    let catalog = app.catalog.clone();
    let record = wait_for(
        "the production's record, catalogued",
        Duration::from_secs(60),
        || {
            let mut catalog = catalog.clone();
            let production_id = production_id.clone();
            async move {
                let record = catalog
                    .get_production_record(pb::GetProductionRecordRequest {
                        production_id,
                        format: pb::RecordFormat::RoCrate as i32,
                    })
                    .await
                    .ok()?
                    .into_inner();
                (!record.record_lfn.is_empty()).then_some(record)
            }
        },
    )
    .await
    .unwrap();

    // Who asked, for what.
    assert_eq!(record.request_id, answer.request_id);
    assert_eq!(record.submitter, "tests");
    assert_eq!(record.vo, "vo.cta.in2p3.fr");
    assert_eq!(record.profile, "cta-irf-mc");
    let profile_text =
        std::fs::read(prodsys_testkit::repo_root().join("profiles/cta-irf-mc.json")).unwrap();
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&profile_text))
    };
    assert_eq!(record.profile_sha256, digest);
    assert_eq!(record.fingerprint.len(), 64);
    let parameters: Value = serde_json::from_str(&record.parameters_json).unwrap();
    assert_eq!(parameters["site"], "LaPalma");
    assert_eq!(record.software["corsika"], "7.7550");
    assert_eq!(record.software["sim_telarray"], "2024-02-05");
    assert_eq!(record.installation, "local");
    // Where its jobs ran: all four on the one installation it named.
    let ran: Vec<(String, u64)> = record
        .installations
        .iter()
        .map(|i| (i.installation.clone(), i.counts.unwrap_or_default().done))
        .collect();
    assert_eq!(ran, [("local".to_string(), 4)], "{record:?}");

    // Its jobs, as status saw them.
    let counts = record.counts.unwrap();
    assert_eq!(record.job_total, last.job_total);
    assert_eq!(counts, last.counts.unwrap());
    assert_eq!(counts.done, 4);
    assert_eq!((record.first_run, record.last_run), (1, 4));
    assert_eq!(record.attempts, 4, "one attempt per job: {record:?}");
    assert_eq!(record.retries, 0);
    // The local executor reports every attempt's CPU time.
    assert_eq!(record.cpu_measured_attempts, 4, "{record:?}");
    assert!(record.cpu_seconds_used >= 0.0);
    let estimate = record.estimate.unwrap();
    assert!(
        (estimate.cpu_seconds_per_job - 110.0).abs() < 1e-9,
        "{estimate:?}"
    );
    // Its timeline, in order.
    let times = [
        record.submitted_unix_ms,
        record.accepted_unix_ms,
        record.first_job_started_unix_ms,
        record.last_job_ended_unix_ms,
        record.completed_unix_ms,
    ];
    assert!(times.iter().all(|t| *t > 0), "{times:?}");
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");

    // What it wrote, as the catalog lists it: the outputs and the record.
    let files = app.files(&production_id).await;
    let (records, outputs): (Vec<_>, Vec<_>) =
        files.iter().partition(|f| f.lfn == record.record_lfn);
    assert_eq!(outputs.len(), 8);
    assert_eq!(record.file_count, 8);
    assert_eq!(
        record.total_bytes,
        outputs.iter().map(|f| f.size).sum::<u64>()
    );
    assert_eq!(record.datasets.len(), 1, "{:?}", record.datasets);
    assert_eq!(
        record.datasets[0].name,
        format!("PROD6_LaPalma_gamma_{production_id}")
    );
    assert_eq!(record.datasets[0].file_count, 8);
    assert_eq!(record.datasets[0].total_bytes, record.total_bytes);
    assert!(record.parent_production_ids.is_empty() && record.child_production_ids.is_empty());

    // The record's own file: under the production's directory, with the
    // size and adler32 of what was written, and the crate gRPC renders.
    assert_eq!(records.len(), 1, "{files:?}");
    let file = records[0];
    assert_eq!(
        file.lfn,
        format!(
            "/vo.cta.in2p3.fr/MC/PROD6/LaPalma/gamma/sim_telarray/{production_id}/record/ro-crate-metadata.json"
        )
    );
    // It carries what the outputs share (their dataset), as a record.
    assert_eq!(file.metadata["dataset"], record.datasets[0].name);
    assert_eq!(file.metadata["site"], "LaPalma");
    assert_eq!(file.metadata["data_level"], "record");
    assert!(!file.metadata.contains_key("run_number"), "{file:?}");
    let path = PathBuf::from(file.url.strip_prefix("file://").unwrap());
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(file.size, bytes.len() as u64);
    assert_eq!(file.adler32, adler32(&bytes));
    assert_eq!(record.rendered.as_bytes(), bytes.as_slice());

    // The same record on the status HTTP port: JSON, Markdown, RO-Crate.
    let status = format!("http://{}", app.stack.addr(Service::Status).unwrap());
    let http = reqwest::Client::new();
    let url = format!("{status}/api/productions/{production_id}/record");
    let json: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(json["production_id"], production_id.as_str());
    assert_eq!(json["file_count"], 8);
    assert_eq!(json["total_bytes"], record.total_bytes);
    assert_eq!(json["counts"]["done"], 4);
    assert_eq!(json["attempts"], 4);
    assert_eq!(json["record_lfn"], record.record_lfn.as_str());
    assert_eq!(json["installations"][0]["installation"], "local", "{json}");
    assert_eq!(json["installations"][0]["counts"]["done"], 4, "{json}");
    let crate_text = http
        .get(format!("{url}?format=ro-crate"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        crate_text.as_bytes(),
        bytes.as_slice(),
        "the crate is deterministic"
    );
    let markdown = http
        .get(format!("{url}?format=markdown"))
        .send()
        .await
        .unwrap();
    assert!(
        markdown.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/markdown")
    );
    let markdown = markdown.text().await.unwrap();
    let missing = http
        .get(format!("{status}/api/productions/CTA-999999/record"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), reqwest::StatusCode::NOT_FOUND);
    let bad = http.get(format!("{url}?format=pdf")).send().await.unwrap();
    assert_eq!(bad.status(), reqwest::StatusCode::BAD_REQUEST);

    // prodctl record prints the Markdown for people.
    let mut command = tokio::process::Command::new(built_binary("prodctl", "prodctl"));
    command
        .arg("--catalog")
        .arg(format!(
            "http://{}",
            app.stack.addr(Service::Catalog).unwrap()
        ))
        .args(["record", &production_id]);
    let out = command.output().await.unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(printed, markdown);
    for expected in [
        format!("# Production {production_id}"),
        "**State:** COMPLETED".to_string(),
        "| Submitter | `tests` |".to_string(),
        "| Runs | 1 – 4 |".to_string(),
        "| corsika | 7.7550 |".to_string(),
        "4 jobs: 4 done, 0 exhausted, 0 cancelled, 0 failed. 4 attempts (0 retries).".to_string(),
        "| local | 4 | 4 | 0 | 0 | 0 |".to_string(),
        "8 files, ".to_string(),
        format!("({} bytes)", record.total_bytes),
        format!("catalogued as `{}`", record.record_lfn),
    ] {
        assert!(
            printed.contains(&expected),
            "{expected:?} not in\n{printed}"
        );
    }
    let mut command = tokio::process::Command::new(built_binary("prodctl", "prodctl"));
    command
        .arg("--catalog")
        .arg(format!(
            "http://{}",
            app.stack.addr(Service::Catalog).unwrap()
        ))
        .args(["record", &production_id, "--format", "ro-crate"]);
    let out = command.output().await.unwrap();
    assert_eq!(out.stdout, bytes);

    // roc-validator accepts the crate as a Process Run Crate.
    let dir = app.env.work_dir.join("crate");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ro-crate-metadata.json"), &bytes).unwrap();
    if let Err(report) = validate_crate(&dir) {
        panic!("roc-validator refused the record's crate: {report}");
    }
    app.stop().await;
}

/// A production is finished (`production.forwarded`, `finished` in status)
/// only once its record is catalogued too, and then with the record's copy
/// on its destination: here the recorder cannot write until the test lets
/// it, so every output is catalogued and forwarded long before the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_production_is_finished_only_once_its_record_is_catalogued_and_forwarded() {
    let mut blocker = PathBuf::new();
    let mut disk = PathBuf::new();
    let app = spawn_app_with(|env| {
        // A file where the records' directory should be: writing fails.
        std::fs::create_dir_all(&env.work_dir).unwrap();
        blocker = env.work_dir.join("blocked");
        std::fs::write(&blocker, "not a directory").unwrap();
        env.settings.catalog.records_dir = blocker.join("records");
        disk = support::storage::disk(env);
        support::storage::quick_retries(env);
    })
    .await;
    let request = pb::SubmitRequestRequest {
        forward: vec!["disk".into()],
        ..cta_example()
    };
    let answer = app.submit(request).await.unwrap();
    let production_id = app.decided(&answer.request_id).await.production_id;
    let forwarded = app
        .production_when(
            "the outputs forwarded, the record not yet written",
            Duration::from_secs(240),
            &production_id,
            |p| {
                // Every output: production.completed may come before the
                // catalog took the last job's files (the total grows).
                p.state() == pb::ProductionState::Completed
                    && p.forwarding
                        .first()
                        .is_some_and(|d| d.total == 8 && d.forwarded == d.total)
            },
        )
        .await;
    assert!(!forwarded.finished, "{forwarded:?}");
    // The example's four jobs write two files each, all catalogued.
    let outputs = app.files(&production_id).await.len() as u64;
    assert_eq!(outputs, 8);
    assert_eq!(forwarded.forwarding[0].total, outputs, "{forwarded:?}");
    // Several sweeps of the forwarder and the recorder later, still not finished.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = app.production(&production_id).await.unwrap();
    assert!(!still.finished, "finished without its record: {still:?}");

    // The recorder can write: the record is catalogued, forwarded, and only
    // then is the production finished, with every file on the disk.
    std::fs::remove_file(&blocker).unwrap();
    let done = app
        .production_when(
            "the production finished",
            Duration::from_secs(120),
            &production_id,
            |p| p.finished,
        )
        .await;
    assert_eq!(done.forwarding[0].forwarded, outputs + 1, "{done:?}");
    assert_eq!(done.forwarding[0].total, outputs + 1, "{done:?}");
    let files = app.files(&production_id).await;
    assert_eq!(files.len() as u64, outputs + 1);
    let record = files
        .iter()
        .find(|f| f.lfn.ends_with("ro-crate-metadata.json"))
        .expect("the record among the production's files");
    let copy = disk.join(record.lfn.trim_start_matches('/'));
    assert_eq!(adler32(&std::fs::read(copy).unwrap()), record.adler32);
    app.stop().await;
}
