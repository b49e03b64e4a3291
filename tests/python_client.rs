//! The Python client package (clients/python) as a notebook uses it, against
//! a whole stack; and its committed gRPC stubs against the protos.

mod support;

use std::collections::BTreeSet;
use std::process::Output;
use std::time::Duration;

use prodsys::Service;
use prodsys_proto as pb;
use support::{spawn_app_with, use_km3net_templates, use_test_profiles};

/// Runs `python3 ARGS` with this tree's client package first on the path, so
/// the code under test is the checkout's whatever copy is installed.
async fn python(args: &[String], timeout: Duration) -> Output {
    let root = prodsys_testkit::repo_root();
    let mut path = vec![root.join("clients/python/src")];
    if let Some(existing) = std::env::var_os("PYTHONPATH") {
        path.extend(std::env::split_paths(&existing));
    }
    let mut command = tokio::process::Command::new("python3");
    command
        .args(args)
        .current_dir(&root)
        .env("PYTHONPATH", std::env::join_paths(path).unwrap())
        .kill_on_drop(true);
    tokio::time::timeout(timeout, command.output())
        .await
        .unwrap_or_else(|_| panic!("python3 {args:?} still running after {timeout:?}"))
        .expect("python3 runs (deploy/local/test installs clients/python/requirements-dev.txt)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_notebook_submits_follows_and_finds_files_with_the_python_client() {
    let mut image = String::new();
    let app = spawn_app_with(|env| {
        use_test_profiles(env);
        image = use_km3net_templates(env);
    })
    .await;
    let root = prodsys_testkit::repo_root();
    let addr = |service| app.stack.addr(service).unwrap().to_string();
    let args = vec![
        root.join("clients/python/tests/against_stack.py")
            .display()
            .to_string(),
        addr(Service::Intake),
        addr(Service::Status),
        addr(Service::Catalog),
        root.join("examples/cta-irf-mc.json").display().to_string(),
    ];
    let output = python(&args, Duration::from_secs(300)).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Python session failed: {stderr}"
    );
    let seen: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));

    // The shipped container templates, as the services list them.
    let templates = seen["templates"].as_array().unwrap();
    let names: Vec<&str> = templates.iter().map(|t| t[0].as_str().unwrap()).collect();
    assert_eq!(names, ["gseagen-7.4.1", "mupage-4.3"], "{templates:?}");
    assert!(
        templates.iter().all(|t| t[1] == image.as_str()),
        "{templates:?}"
    );

    // Accepted, with the first ID of the profile.
    let production_id = seen["production_id"].as_str().unwrap();
    assert_eq!(production_id, "CTA-000001");

    // The second identical submission is stored and rejected as a duplicate,
    // as intake itself reports it.
    let duplicate = &seen["duplicate"];
    assert_eq!(duplicate["state"], "REJECTED");
    assert_eq!(duplicate["existing_production_id"], production_id);
    let stored = app
        .intake
        .clone()
        .get_request(pb::GetRequestRequest {
            request_id: duplicate["request_id"].as_str().unwrap().into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.state(), pb::RequestState::Rejected);
    assert_eq!(stored.existing_production_id, production_id);
    let reasons: Vec<String> = stored
        .violations
        .into_iter()
        .map(|v| v.description)
        .collect();
    assert_eq!(duplicate["violations"][0][1], reasons[0].as_str());

    // Bad parameters: an exception with each field and its reason.
    let violations: Vec<(String, String)> = seen["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v[0].as_str().unwrap().into(), v[1].as_str().unwrap().into()))
        .collect();
    for (field, reason) in [
        ("parameters.site", "required"),
        (
            "parameters.zenith_deg",
            "\"twenty\" is not of type \"number\"",
        ),
        ("parameters.energy_min_tev", "less than energy_max_tev"),
    ] {
        assert!(
            violations
                .iter()
                .any(|(f, r)| f == field && r.contains(reason)),
            "({field}, {reason}) not in {violations:?}"
        );
    }
    assert!(
        seen["refusal"]
            .as_str()
            .unwrap()
            .contains("parameters.site: "),
        "{}",
        seen["refusal"]
    );
    assert_eq!(seen["cancel_violations"][0][0], "production_id");
    // Only the example, its duplicate, the keyed request and the one to
    // cancel were stored: refusals never are.
    assert_eq!(app.stored_requests().await, 4);

    // Watched to COMPLETED: 4000 showers in jobs of 1000.
    assert_eq!(seen["last"]["state"], "COMPLETED", "{}", seen["states"]);
    assert_eq!(seen["last"]["job_total"], 4);
    assert_eq!(seen["last"]["done"], 4);
    assert_eq!(
        app.production(production_id).await.unwrap().state(),
        pb::ProductionState::Completed
    );

    // The catalog's files, as the client listed them: the same as the catalog holds.
    let listed: BTreeSet<(String, u64, String)> = seen["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["lfn"].as_str().unwrap().into(),
                f["size"].as_u64().unwrap(),
                f["adler32"].as_str().unwrap().into(),
            )
        })
        .collect();
    let catalogued: BTreeSet<(String, u64, String)> = app
        .files(production_id)
        .await
        .into_iter()
        .map(|f| (f.lfn, f.size, f.adler32))
        .collect();
    assert_eq!(listed.len(), 8, "two NSB levels per job: {listed:?}");
    assert_eq!(listed, catalogued);
    for (lfn, size, _) in &listed {
        assert!(
            lfn.starts_with(
                "/vo.cta.in2p3.fr/MC/PROD6/LaPalma/gamma/sim_telarray/CTA-000001/Data/"
            ),
            "{lfn}"
        );
        assert!(*size > 0, "{lfn}");
    }
    assert_eq!(seen["record"]["state"], "COMPLETED");
    assert_eq!(seen["record"]["file_count"], 8);

    // Cancelled while running.
    let cancelled = &seen["cancelled"];
    let states = cancelled["states"].as_array().unwrap();
    assert!(states.iter().any(|s| s == "RUNNING"), "{states:?}");
    assert_eq!(states.last().unwrap(), "CANCELLED", "{states:?}");
    assert_eq!(cancelled["counts"]["cancelled"], 2);
    let sleeper = cancelled["production_id"].as_str().unwrap();
    assert_eq!(
        app.production(sleeper).await.unwrap().state(),
        pb::ProductionState::Cancelled
    );
    app.stop().await;
}

#[tokio::test]
async fn the_python_clients_stubs_are_generated_from_the_current_protos() {
    let script = prodsys_testkit::repo_root().join("clients/python/generate.py");
    let output = python(
        &[script.display().to_string(), "--check".into()],
        Duration::from_secs(120),
    )
    .await;
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// examples/notebook.ipynb, executed by nbclient in a real Jupyter kernel
/// (var/venv/notebook, which deploy/local/test makes) against a whole stack:
/// it submits the CTA example, watches it to the end, plots its jobs'
/// progress and a histogram of its files' sizes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_example_notebook_runs_against_a_live_stack() {
    let root = prodsys_testkit::repo_root();
    let venv_python = root.join("var/venv/notebook/bin/python");
    assert!(
        venv_python.exists(),
        "{} is missing: deploy/local/test installs tests/notebook/requirements.txt there",
        venv_python.display()
    );
    let app = spawn_app_with(|_| {}).await;
    // The executed notebook is kept for a person to look at (target/tmp/).
    let executed = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("notebook.ipynb");
    let addr = |service| format!("http://{}", app.stack.addr(service).unwrap());
    let mut command = tokio::process::Command::new(&venv_python);
    command
        .arg(root.join("tests/notebook/run.py"))
        .arg(root.join("examples/notebook.ipynb"))
        .arg(&executed)
        .env("PYTHONPATH", root.join("clients/python/src"))
        .env("PRODSYS_INTAKE_URL", addr(Service::Intake))
        .env("PRODSYS_STATUS_URL", addr(Service::Status))
        .env("PRODSYS_CATALOG_URL", addr(Service::Catalog))
        .env("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(600), command.output())
        .await
        .expect("the notebook ran within 10 minutes")
        .expect("the notebook's Python runs");
    assert!(
        output.status.success(),
        "the notebook failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let notebook: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&executed).unwrap()).unwrap();
    let outputs: Vec<&serde_json::Value> = notebook["cells"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["cell_type"] == "code")
        .flat_map(|c| c["outputs"].as_array().unwrap())
        .collect();
    assert!(
        outputs.iter().all(|o| o["output_type"] != "error"),
        "{outputs:?}"
    );
    // Two figures, each a PNG with something in it.
    let figures: Vec<Vec<u8>> = outputs
        .iter()
        .filter_map(|o| o["data"]["image/png"].as_str())
        .map(|png| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(png.replace('\n', ""))
                .unwrap()
        })
        .collect();
    assert_eq!(figures.len(), 2, "the progress plot and the histogram");
    for png in &figures {
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(png.len() > 5_000, "a figure of {} bytes", png.len());
    }
    // Its summary: the production it followed, as the services know it.
    let summary: serde_json::Value = outputs
        .iter()
        .rev()
        .filter(|o| o["name"] == "stdout")
        .filter_map(|o| {
            let text = match &o["text"] {
                serde_json::Value::Array(lines) => {
                    lines.iter().filter_map(|l| l.as_str()).collect::<String>()
                }
                text => text.as_str().unwrap_or_default().to_string(),
            };
            serde_json::from_str(text.trim()).ok()
        })
        .next()
        .expect("the summary cell printed its JSON");
    let production_id = summary["production_id"].as_str().unwrap();
    assert_eq!(summary["state"], "COMPLETED", "{summary}");
    assert_eq!(summary["jobs_done"], 4, "{summary}");
    // At least the final state: a production that ended before the watch
    // began is given once, as it ended (four toy jobs can take less time
    // than a kernel takes to reach the watch cell).
    assert!(summary["snapshots"].as_u64().unwrap() >= 1, "{summary}");
    let files = app.files(production_id).await;
    assert_eq!(summary["files"], files.len() as u64, "{summary}");
    assert_eq!(
        summary["total_bytes"],
        files.iter().map(|f| f.size).sum::<u64>(),
        "{summary}"
    );
    assert_eq!(
        app.production(production_id).await.unwrap().state(),
        pb::ProductionState::Completed
    );
    app.stop().await;
}
