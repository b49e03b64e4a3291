//! KM3NeT's use case for real: container templates (shipped and derived),
//! the image allow-list, and container jobs run by podman on the local
//! executor, their files catalogued with the template that made them.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use prodsys_proto as pb;
use prodsys_testkit::wait_for;
use serde_json::json;
use support::browser::Browser;
use support::{App, km3net_with, spawn_app_with, use_km3net_templates, use_test_profiles};

const DERIVED: &str = "gseagen-7.4.1-seawater-v2";

async fn templates(app: &App, name: &str) -> Vec<pb::TemplateInfo> {
    app.intake
        .clone()
        .list_templates(pb::ListTemplatesRequest {
            profile: "km3net-container-sim".into(),
            name: name.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .templates
}

/// The header lines of an event file (up to `end_header:`).
fn header(path: &str) -> Vec<String> {
    let bytes = std::fs::read(path.strip_prefix("file://").unwrap()).unwrap();
    let end = bytes
        .windows(b"end_header:".len())
        .position(|w| w == b"end_header:")
        .expect("a header");
    String::from_utf8(bytes[..end].to_vec())
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_km3net_example_runs_in_podman_with_its_derived_template() {
    let mut image = String::new();
    let app = spawn_app_with(|env| {
        image = use_km3net_templates(env);
        env.settings.dispatcher.max_concurrent_jobs = 4;
    })
    .await;
    let digest = image.rsplit_once('@').unwrap().1.to_string();
    let shipped = templates(&app, "").await;
    let names: Vec<&str> = shipped.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["gseagen-7.4.1", "mupage-4.3"], "{shipped:?}");
    assert_eq!(shipped[0].image, image);
    assert_eq!(shipped[0].runtime, "podman");

    let production = app.run_and_catalogue(km3net_with(|_| {})).await;
    let derived = templates(&app, DERIVED).await;
    assert_eq!(derived.len(), 1, "the derivation is recorded: {derived:?}");
    let derived = &derived[0];
    assert_eq!(derived.derived_from, "gseagen-7.4.1");
    assert_eq!(derived.digest, digest);
    assert!(
        derived
            .version
            .starts_with(&format!("gseagen-7.4.1+{}+", &digest[7..19])),
        "{}",
        derived.version
    );
    let parameters: serde_json::Value = serde_json::from_str(&derived.parameters_json).unwrap();
    assert_eq!(parameters["seawater_model"], "v2");
    assert_eq!(parameters["photocathode"], "R12199");

    let files = app.files(&production).await;
    assert_eq!(files.len(), 4, "one event file per job: {files:?}");
    let mut runs = BTreeSet::new();
    for file in &files {
        let m = &file.metadata;
        assert_eq!(m["detector"], "ORCA10");
        assert_eq!(m["generator"], "gSeaGen");
        assert_eq!(m["flavour"], "nu_mu");
        assert_eq!(m["image_digest"], digest);
        assert_eq!(m["container_image"], image);
        assert_eq!(m["template"], DERIVED);
        assert_eq!(m["template_version"], derived.version);
        runs.insert(m["run_number"].clone());
        // The catalogued checksum is the bytes'.
        let path = file.url.strip_prefix("file://").unwrap();
        let (size, adler32) =
            prodsys_core::checksum::adler32_hex(std::fs::File::open(path).unwrap()).unwrap();
        assert_eq!((size, adler32.as_str()), (file.size, file.adler32.as_str()));
        assert!(
            file.size > 5000 * 32,
            "5000 events of 32 bytes: {}",
            file.size
        );
        // What reached the container: the derived template's parameters.
        let header = header(&file.url);
        for line in [
            format!("start_run: {}", m["run_number"]),
            "generator: gSeaGen".to_string(),
            "detector: ORCA10".to_string(),
            "flavour: nu_mu".to_string(),
            format!("template: {DERIVED}"),
            format!("template_version: {}", derived.version),
            format!("image: {image}"),
            "parameter: seawater_model=v2".to_string(),
            "parameter: light_yield=0.95".to_string(),
            "parameter: photocathode=R12199".to_string(),
        ] {
            assert!(header.contains(&line), "{line:?} not in {header:?}");
        }
    }
    assert_eq!(runs.len(), 4, "{runs:?}");

    // Reused by name: a later request runs the recorded derivation.
    let again = app
        .run_and_catalogue(km3net_with(|p| {
            p.as_object_mut().unwrap().remove("derived_template");
            p["container_template"] = json!(DERIVED);
            p["flavour"] = json!("nu_e");
            p["n_events"] = json!(100);
            p["events_per_job"] = json!(100);
        }))
        .await;
    let files = app.files(&again).await;
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].metadata["template_version"], derived.version);
    assert!(header(&files[0].url).contains(&"parameter: seawater_model=v2".to_string()));

    // prodctl shows it.
    let printed = std::process::Command::new(support::built_binary("prodctl", "prodctl"))
        .arg("--intake")
        .arg(format!(
            "http://{}",
            app.stack.addr(prodsys::Service::Intake).unwrap()
        ))
        .args(["templates", DERIVED])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(
        printed.starts_with(&format!(
            "{DERIVED}  (km3net-container-sim, derived from gseagen-7.4.1)\n"
        )),
        "{printed}"
    );
    assert!(
        printed.contains(&format!("version:     {}", derived.version)),
        "{printed}"
    );

    // The name cannot be given to another derivation.
    let taken = app
        .decided(
            &app.submit(km3net_with(|p| {
                p["derived_template"]["parameters"]["seawater_model"] = json!("v1");
                p["flavour"] = json!("anti_nu_mu");
            }))
            .await
            .unwrap()
            .request_id,
        )
        .await;
    assert_eq!(taken.state(), pb::RequestState::Rejected);
    assert_eq!(
        taken.violations[0].field, "parameters.derived_template.name",
        "{taken:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn images_outside_the_allow_list_unknown_templates_and_disallowed_overrides_are_refused() {
    let app = spawn_app_with(|env| {
        use_km3net_templates(env);
    })
    .await;
    let refusals = [
        (
            km3net_with(|p| {
                p["derived_template"]["image"] = json!(format!(
                    "docker.io/someone/miner@sha256:{}",
                    "ab".repeat(32)
                ));
            }),
            "parameters.derived_template.image",
            "is not an image km3net.org may run",
        ),
        (
            km3net_with(|p| p["container_template"] = json!("gseagen-9.9")),
            "parameters.container_template",
            "unknown template \"gseagen-9.9\"",
        ),
        (
            km3net_with(|p| {
                p["derived_template"]["parameters"]["photocathode"] = json!("R7081");
            }),
            "parameters.derived_template.parameters.photocathode",
            "does not allow overriding",
        ),
        (
            km3net_with(|p| {
                p["derived_template"]["image"] = json!("localhost/km3net/toysim:latest");
            }),
            "parameters.derived_template.image",
            "",
        ),
    ];
    for (request, field, reason) in refusals {
        let status = app.submit(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        let violations = support::violated_fields(&status);
        assert_eq!(violations, [field], "{status:?}");
        assert!(status.message().contains(reason), "{status:?}");
    }
    // Nothing stored anywhere: no request, production or derivation.
    assert_eq!(app.stored_requests().await, 0);
    let db = app.env.db().await.unwrap();
    for table in ["checker.productions", "checker.derived_templates"] {
        let n: i64 = db
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{table}");
    }
    assert!(templates(&app, DERIVED).await.is_empty());
    app.stop().await;
}

/// The templates plus two that fail: one whose toy exits 3, one that holds
/// more memory than the profile allows its jobs.
fn add_failing_templates(dir: &std::path::Path) {
    let path = dir.join("km3net-container-sim.json");
    let mut file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let base = file["templates"]["gseagen-7.4.1"].clone();
    for (name, extra) in [
        ("toysim-exits-3", vec!["--fail"]),
        ("toysim-needs-256m", vec!["--allocate-mb", "256"]),
    ] {
        let mut template = base.clone();
        let entrypoint = template["entrypoint"].as_array_mut().unwrap();
        entrypoint.extend(extra.into_iter().map(|a| json!(a)));
        file["templates"][name] = template;
    }
    std::fs::write(&path, file.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containers_that_fail_or_exceed_their_memory_are_retried_then_exhausted() {
    let app = spawn_app_with(|env| {
        use_test_profiles(env);
        // Jobs of 64 MB, two attempts each.
        let path = env.settings.profiles_dir.join("km3net-container-sim.json");
        let mut profile: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        profile["resources"]["memory_mb"] = json!(64);
        profile["max_attempts"] = json!(2);
        std::fs::write(&path, profile.to_string()).unwrap();
        use_km3net_templates(env);
        add_failing_templates(&env.settings.templates_dir);
        env.settings.dispatcher.max_concurrent_jobs = 2;
    })
    .await;
    let request = |template: &str| {
        let template = template.to_string();
        km3net_with(move |p| {
            p.as_object_mut().unwrap().remove("derived_template");
            p["container_template"] = json!(template);
            p["n_events"] = json!(10);
            p["events_per_job"] = json!(10);
        })
    };
    let db = app.env.db().await.unwrap();
    for (template, reason) in [
        ("toysim-exits-3", "exited 3"),
        (
            "toysim-needs-256m",
            "exited 137: killed by SIGKILL (over its memory limit, or killed)",
        ),
    ] {
        let production = app.accepted(request(template)).await;
        let last = app.watch(&production).await.pop().unwrap();
        assert_eq!(last.state(), pb::ProductionState::Failed, "{last:?}");
        assert_eq!(last.counts.unwrap().exhausted, 1, "{last:?}");
        let row = db
            .query_one(
                "SELECT attempt, state, raw_status FROM dispatcher.jobs WHERE production_id = $1",
                &[&production],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), 2, "{template}: retried once");
        assert_eq!(row.get::<_, &str>(1), "EXHAUSTED");
        assert_eq!(row.get::<_, &str>(2), reason);
        // Both attempts ran, in their own directories.
        let attempts = std::fs::read_dir(app.env.settings.dispatcher.work_dir.join(&production))
            .unwrap()
            .count();
        assert_eq!(attempts, 2);
        let catalog = app.files(&production).await;
        assert!(catalog.is_empty(), "{catalog:?}");
    }
    // The job status the status service keeps says why.
    wait_for(
        "the reason in the read model",
        Duration::from_secs(10),
        || {
            let db = &db;
            async move {
                let rows = db
                    .query(
                        "SELECT raw_status FROM status.jobs WHERE state = 'EXHAUSTED'",
                        &[],
                    )
                    .await
                    .ok()?;
                let reasons: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                (reasons.len() == 2 && reasons.iter().any(|r| r.starts_with("exited 137")))
                    .then_some(())
            }
        },
    )
    .await
    .unwrap();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_km3net_example_runs_in_podman_on_slurm() {
    const SLURM: &str = "slurm-test";
    let status =
        std::process::Command::new(prodsys_testkit::repo_root().join("tests/servers/slurm/start"))
            .status()
            .expect("running tests/servers/slurm/start");
    assert!(status.success(), "the Slurm test cluster did not start");
    let mut image = String::new();
    let app = spawn_app_with(|env| {
        image = use_km3net_templates(env);
        env.settings.dispatcher.poll_interval_ms = 300;
        env.settings.dispatcher.backends = std::collections::BTreeMap::from([(
            SLURM.to_string(),
            prodsys_config::BackendSettings::Slurm {
                partition: "debug".into(),
                max_in_flight: 4,
                sbatch_args: vec![],
                shared_filesystem: true,
            },
        )]);
    })
    .await;
    let production = app
        .run_and_catalogue(pb::SubmitRequestRequest {
            backend: SLURM.into(),
            ..km3net_with(|p| {
                p["n_events"] = json!(1000);
                p["events_per_job"] = json!(500);
            })
        })
        .await;
    let derived = templates(&app, DERIVED).await.pop().unwrap();
    let files = app.files(&production).await;
    assert_eq!(files.len(), 2, "{files:?}");
    for file in &files {
        assert_eq!(file.metadata["template_version"], derived.version);
        assert_eq!(file.metadata["container_image"], image);
        let path = file.url.strip_prefix("file://").unwrap();
        let (size, adler32) =
            prodsys_core::checksum::adler32_hex(std::fs::File::open(path).unwrap()).unwrap();
        assert_eq!((size, adler32.as_str()), (file.size, file.adler32.as_str()));
        assert!(header(&file.url).contains(&"parameter: seawater_model=v2".to_string()));
    }
    // The batch script ran the same container command the local executor runs.
    let db = app.env.db().await.unwrap();
    let rows = db
        .query(
            "SELECT backend_job_id, workdir FROM dispatcher.jobs WHERE production_id = $1",
            &[&production],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        let id: String = row.get(0);
        assert!(
            id.chars().all(|c| c.is_ascii_digit()),
            "a Slurm job id: {id}"
        );
        let workdir: String = row.get(1);
        let script = std::fs::read_to_string(std::path::Path::new(&workdir).join("job.sh"))
            .expect("the batch script in the attempt's directory");
        assert!(
            script.contains("\n'podman' '--runtime' 'runc' 'run' '--rm' '--network' 'none'"),
            "{script}"
        );
        assert!(script.contains(&format!("'{image}'")), "{script}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn derivations_racing_for_one_name_get_it_once() {
    let app = spawn_app_with(|env| {
        use_km3net_templates(env);
    })
    .await;
    // Submitted together, so most share the checker's batches.
    let racers = (1..=8).map(|i| {
        app.submit(km3net_with(move |p| {
            p["derived_template"]["name"] = json!("contested");
            p["derived_template"]["parameters"]["light_yield"] = json!(i as f64 / 10.0);
            p["n_events"] = json!(10);
            p["events_per_job"] = json!(10);
        }))
    });
    let mut verdicts = Vec::new();
    for submitted in futures::future::join_all(racers).await {
        verdicts.push(app.decided(&submitted.unwrap().request_id).await);
    }
    let (won, lost): (Vec<_>, Vec<_>) = verdicts
        .into_iter()
        .partition(|r| r.state() == pb::RequestState::Accepted);
    assert_eq!(won.len(), 1, "{won:?}");
    for request in &lost {
        assert_eq!(request.state(), pb::RequestState::Rejected, "{request:?}");
        assert_eq!(
            request.violations[0].field,
            "parameters.derived_template.name"
        );
    }
    let recorded = templates(&app, "contested").await;
    assert_eq!(recorded.len(), 1);
    let winner: serde_json::Value = serde_json::from_str(&won[0].parameters_json).unwrap();
    let parameters: serde_json::Value = serde_json::from_str(&recorded[0].parameters_json).unwrap();
    assert_eq!(
        parameters["light_yield"],
        winner["derived_template"]["parameters"]["light_yield"]
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_lists_shipped_and_derived_templates() {
    let mut image = String::new();
    let app = spawn_app_with(|env| {
        image = use_km3net_templates(env);
    })
    .await;
    let status = format!(
        "http://{}",
        app.stack.addr(prodsys::Service::Status).unwrap()
    );
    // A request derives a template: it is recorded when the request is accepted.
    app.accepted(km3net_with(|p| {
        p["n_events"] = json!(10);
        p["events_per_job"] = json!(10);
    }))
    .await;
    let derived = templates(&app, DERIVED).await.remove(0);

    let browser = Browser::start().await;
    browser.open(&format!("{status}/")).await;
    // From the productions page to the templates page by its link.
    browser
        .eval("document.querySelector('a[href=\"templates\"]').click(); return null")
        .await;
    let shown = wait_for(
        "the derived template on the page",
        Duration::from_secs(20),
        || {
            let browser = &browser;
            async move { browser.field(&format!("t-{DERIVED}"), "derived_from").await }
        },
    )
    .await
    .unwrap();
    assert_eq!(shown, "gseagen-7.4.1");
    let field = |row: String, field: &'static str| {
        let browser = &browser;
        async move { browser.field(&row, field).await.unwrap_or_default() }
    };
    assert_eq!(
        field(format!("t-{DERIVED}"), "version").await,
        derived.version
    );
    assert_eq!(field(format!("t-{DERIVED}"), "image").await, image);
    let defaults: serde_json::Value =
        serde_json::from_str(&field(format!("t-{DERIVED}"), "parameters").await).unwrap();
    assert_eq!(defaults["seawater_model"], "v2");
    for shipped in ["gseagen-7.4.1", "mupage-4.3"] {
        assert_eq!(
            field(format!("t-{shipped}"), "derived_from").await,
            "(shipped)"
        );
        assert_eq!(field(format!("t-{shipped}"), "runtime").await, "podman");
    }
    let rows = browser
        .eval("return document.querySelectorAll('#templates tr').length")
        .await;
    assert_eq!(rows, json!(3), "two shipped templates and one derived");
    browser.close().await;

    // The same as JSON, filtered as ListTemplates is.
    let http = reqwest::Client::new();
    let one: serde_json::Value = http
        .get(format!("{status}/api/templates?name=mupage-4.3"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = one["templates"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{one}");
    assert_eq!(listed[0]["profile"], "km3net-container-sim");
    assert!(listed[0]["overridable"].is_object(), "{one}");
    app.stop().await;
}
