//! Observation periods: a request that names one takes the period's site,
//! layout, NSB levels and atmosphere, and becomes one production per
//! pointing it selects, each with its own ID, fingerprint and existence
//! check, grouped under the request.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use prodsys_proto as pb;
use prodsys_testkit::TestEnv;
use serde_json::{Value, json};
use support::{App, spawn_app, spawn_app_with, violated_fields};

const PERIOD: &str = "lapalma-2026-winter";

/// The shipped period example (lapalma-2026-winter, every pointing), one
/// job per production, its parameters changed by `change`.
fn period_request(change: impl FnOnce(&mut Value)) -> pb::SubmitRequestRequest {
    let path = prodsys_testkit::repo_root().join("examples/cta-irf-mc-period.json");
    let file: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut parameters = file["parameters"].clone();
    parameters["n_showers"] = json!(1000);
    change(&mut parameters);
    pb::SubmitRequestRequest {
        profile: file["profile"].as_str().unwrap().into(),
        vo: file["vo"].as_str().unwrap().into(),
        parameters_json: parameters.to_string(),
        backend: "local".into(),
        submitter: "tests".into(),
        ..Default::default()
    }
}

/// Files of the period's simulation at zenith 60, pointing South, NSB 1,
/// catalogued from elsewhere.
fn registered_elsewhere() -> pb::OutputFile {
    let lfn =
        "/vo.cta.in2p3.fr/MC/PROD6/LaPalma/gamma/sim_telarray/elsewhere/Data/000xxx/run7_nsb1.h5";
    let metadata: HashMap<String, String> = [
        ("site", "LaPalma"),
        ("array_layout", "Alpha"),
        ("particle", "gamma"),
        ("phiP", "0"),
        ("thetaP", "60"),
        ("MCCampaign", "PROD6"),
        ("nsb", "1"),
        ("energy_min", "0.003"),
        ("energy_max", "330"),
        ("atmosphere", "LaPalma-winter-ATM62"),
        ("run_number", "7"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    pb::OutputFile {
        class_id: 0,
        lfn: lfn.into(),
        size: 1000,
        adler32: "0a0b0c0d".into(),
        url: format!("root://eos.example.org//eos{lfn}"),
        metadata,
        production_id: String::new(),
        job_index: 0,
    }
}

/// Puts a `prodsys-toysim` ahead of the real one where the jobs find their
/// programs: it writes the command line it was given (`job.args`, one
/// argument a line) and its `PRODSYS_` environment (`job.env`) into the
/// attempt's directory, then runs the real one with the same arguments.
fn record_job_commands(env: &mut TestEnv) {
    use std::os::unix::fs::PermissionsExt;
    let real = env.settings.dispatcher.tools_dir.join("prodsys-toysim");
    assert!(real.is_file(), "{} is not built", real.display());
    let tools = env.work_dir.join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    let wrapper = tools.join("prodsys-toysim");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > job.args\nenv | grep '^PRODSYS_' | sort > job.env\nexec '{}' \"$@\"\n",
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    env.settings.dispatcher.tools_dir = tools;
}

/// What the job of an attempt directory was given: its arguments, the
/// value after each `--option`, and its `PRODSYS_` environment.
struct JobCommand {
    args: Vec<String>,
    options: HashMap<String, String>,
    env: HashMap<String, String>,
}

fn job_command(attempt: &Path) -> JobCommand {
    let read = |name: &str| {
        std::fs::read_to_string(attempt.join(name))
            .unwrap_or_else(|e| panic!("{}: {e}", attempt.join(name).display()))
    };
    let args: Vec<String> = read("job.args").lines().map(str::to_string).collect();
    let options = args
        .windows(2)
        .filter(|w| w[0].starts_with("--"))
        .map(|w| (w[0].clone(), w[1].clone()))
        .collect();
    let env = read("job.env")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    JobCommand { args, options, env }
}

/// The attempt directories of a production's jobs (`<job>.a<attempt>`).
fn attempt_dirs(app: &App, production_id: &str) -> Vec<std::path::PathBuf> {
    let root = app.env.settings.dispatcher.work_dir.join(production_id);
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

async fn request_productions(app: &App, request_id: &str) -> Vec<pb::Production> {
    app.status
        .clone()
        .list_productions(pb::ListProductionsRequest {
            request_id: request_id.into(),
            page_size: 50,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .productions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_period_becomes_one_production_per_pointing_each_checked_for_existence() {
    let app = spawn_app_with(record_job_commands).await;
    // One pointing of the period simulated already (by prodsys), another
    // catalogued from elsewhere.
    let one = app
        .submit(period_request(|p| {
            p["zenith_deg"] = json!(20);
            p["pointing"] = json!("North");
        }))
        .await
        .unwrap();
    let one = app.decided(&one.request_id).await;
    assert_eq!(one.state(), pb::RequestState::Accepted, "{one:?}");
    assert_eq!(one.period, PERIOD);
    assert_eq!(one.productions.len(), 1, "{one:?}");
    let first = one.production_id.clone();
    assert_eq!(one.productions[0].production_id, first);
    assert_eq!(
        one.productions[0].pointing,
        "zenith 20 deg, azimuth 180 deg"
    );
    app.catalog
        .clone()
        .register_files(pb::RegisterFilesRequest {
            files: vec![registered_elsewhere()],
        })
        .await
        .unwrap();

    // The whole period: 3 zeniths x 2 azimuths, six pointings, each checked alone.
    let submitted = app.submit(period_request(|_| {})).await.unwrap();
    let request = app.decided(&submitted.request_id).await;
    assert_eq!(request.state(), pb::RequestState::Accepted, "{request:?}");
    assert_eq!(request.period, PERIOD);
    let by_pointing: HashMap<&str, &pb::PointingProduction> = request
        .productions
        .iter()
        .map(|p| (p.pointing.as_str(), p))
        .collect();
    assert_eq!(by_pointing.len(), 6, "{request:?}");
    // Produced already by prodsys: reported with its production.
    let done = by_pointing["zenith 20 deg, azimuth 180 deg"];
    assert!(done.production_id.is_empty(), "{done:?}");
    assert_eq!(done.existing_production_id, first);
    assert!(
        done.violations[0]
            .description
            .contains(&format!("already exists as production {first}")),
        "{done:?}"
    );
    // Catalogued from elsewhere: reported with what the catalog holds.
    let elsewhere = by_pointing["zenith 60 deg, azimuth 0 deg"];
    assert!(elsewhere.production_id.is_empty(), "{elsewhere:?}");
    assert!(
        elsewhere.violations[0]
            .description
            .contains("outputs of this simulation already exist in the catalog"),
        "{elsewhere:?}"
    );
    // The other four: a production each, with its own ID and fingerprint.
    let new: Vec<&pb::PointingProduction> = request
        .productions
        .iter()
        .filter(|p| !p.production_id.is_empty())
        .collect();
    assert_eq!(new.len(), 4, "{request:?}");
    let ids: BTreeSet<&str> = new.iter().map(|p| p.production_id.as_str()).collect();
    let fingerprints: BTreeSet<&str> = new.iter().map(|p| p.fingerprint.as_str()).collect();
    assert_eq!((ids.len(), fingerprints.len()), (4, 4));
    assert!(!ids.contains(first.as_str()));
    assert_eq!(request.production_id, new[0].production_id);
    assert!(new.iter().all(|p| p.violations.is_empty()));

    // Status lists them under the request, each with its period and pointing.
    let listed = waits::list(&app, &submitted.request_id, 4).await;
    let pointings: BTreeSet<&str> = listed.iter().map(|p| p.pointing.as_str()).collect();
    assert_eq!(
        pointings,
        BTreeSet::from([
            "zenith 20 deg, azimuth 0 deg",
            "zenith 40 deg, azimuth 180 deg",
            "zenith 40 deg, azimuth 0 deg",
            "zenith 60 deg, azimuth 180 deg",
        ])
    );
    assert!(listed.iter().all(|p| p.period == PERIOD), "{listed:?}");

    // Each runs with its own pointing: the job's command and the files'
    // metadata carry it and the period.
    for p in &new {
        let last = app.watch(&p.production_id).await.pop().unwrap();
        assert_eq!(last.state(), pb::ProductionState::Completed, "{last:?}");
        let files = waits::files(&app, &p.production_id, 3).await;
        for f in &files {
            assert_eq!(f.metadata["observation_period"], PERIOD, "{f:?}");
            assert_eq!(f.metadata["atmosphere"], "LaPalma-winter-ATM62");
            assert_eq!(f.metadata["array_layout"], "Alpha");
            assert_eq!(f.metadata["thetaP"], format!("{}", p.zenith_deg as i64));
            assert_eq!(f.metadata["phiP"], format!("{}", p.azimuth_deg as i64));
        }
        let nsb: BTreeSet<&str> = files.iter().map(|f| f.metadata["nsb"].as_str()).collect();
        assert_eq!(nsb, BTreeSet::from(["1", "5", "19"]));
        // The job was given the pointing on its command line and the period
        // in its environment, and simulated that pointing.
        let attempts = attempt_dirs(&app, &p.production_id);
        assert_eq!(attempts.len(), 1, "{attempts:?}");
        let job = job_command(&attempts[0]);
        let angle = |option: &str| -> f64 {
            job.options[option]
                .parse()
                .unwrap_or_else(|e| panic!("{option}: {e}: {:?}", job.args))
        };
        assert_eq!(angle("--zenith"), p.zenith_deg, "{:?}", job.args);
        assert_eq!(angle("--azimuth"), p.azimuth_deg, "{:?}", job.args);
        assert_eq!(job.options["--site"], "LaPalma", "{:?}", job.args);
        assert_eq!(job.options["--layout"], "Alpha", "{:?}", job.args);
        assert_eq!(
            job.env
                .get("PRODSYS_OBSERVATION_PERIOD")
                .map(String::as_str),
            Some(PERIOD),
            "{:?}",
            job.env
        );
        assert_eq!(
            job.env.get("PRODSYS_ATMOSPHERE").map(String::as_str),
            Some("LaPalma-winter-ATM62"),
            "{:?}",
            job.env
        );
        assert_eq!(
            job.env.get("PRODSYS_PRODUCTION_ID"),
            Some(&p.production_id),
            "{:?}",
            job.env
        );
        let outputs: Vec<_> = std::fs::read_dir(attempts[0].join("output"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(outputs.len(), 3, "{outputs:?}");
        for output in &outputs {
            let content = std::fs::read(output).unwrap();
            let header = String::from_utf8_lossy(&content[..content.len().min(300)])
                .lines()
                .next()
                .unwrap_or_default()
                .to_string();
            let field = |name: &str| -> f64 {
                header
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{name}=")))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{name} in {header:?}"))
            };
            assert_eq!(field("zenith"), p.zenith_deg, "{header}");
            assert_eq!(field("azimuth"), p.azimuth_deg, "{header}");
        }
    }

    // The same period again: every pointing exists now, so the request is
    // refused, each pointing named with its reason.
    let again = app.submit(period_request(|_| {})).await.unwrap();
    let again = app.decided(&again.request_id).await;
    assert_eq!(again.state(), pb::RequestState::Rejected, "{again:?}");
    assert_eq!(again.productions.len(), 6);
    assert!(again.productions.iter().all(|p| p.production_id.is_empty()));
    let reasons: Vec<&str> = again
        .violations
        .iter()
        .map(|v| v.description.as_str())
        .collect();
    for p in &new {
        let expected = format!(
            "{}: the same simulation already exists as production {}",
            p.pointing, p.production_id
        );
        assert!(reasons.contains(&expected.as_str()), "{reasons:?}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_period_is_listed_validated_and_refuses_what_contradicts_it_by_field() {
    let app = spawn_app().await;
    let refused = |change: fn(&mut Value)| {
        let app = &app;
        async move {
            let status = app.submit(period_request(change)).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            (violated_fields(&status), status.message().to_string())
        }
    };
    let (fields, _) = refused(|p| p["observation_period"] = json!("2019-never")).await;
    assert_eq!(fields, ["parameters.observation_period"]);
    let (fields, _) = refused(|p| p["zenith_deg"] = json!(45)).await;
    assert_eq!(fields, ["parameters.zenith_deg"]);
    let (fields, _) = refused(|p| p["site"] = json!("Paranal")).await;
    assert_eq!(fields, ["parameters.site"]);
    let (fields, _) = refused(|p| p["array_layout"] = json!("Prod6-Hyperarray")).await;
    assert_eq!(fields, ["parameters.array_layout"]);
    let (fields, _) = refused(|p| p["nsb_levels"] = json!([1, 7])).await;
    assert_eq!(fields, ["parameters.nsb_levels"]);
    // Nights outside the period's validity (2026-11-01 to 2027-04-30), or
    // not dates at all.
    let (fields, message) =
        refused(|p| p["observation_dates"] = json!("2027-04-20/2027-05-03")).await;
    assert_eq!(fields, ["parameters.observation_dates"]);
    assert!(
        message.contains(
            "2027-05-03 is outside observation period lapalma-2026-winter, valid from 2026-11-01 to 2027-04-30"
        ),
        "{message}"
    );
    let (fields, message) = refused(|p| p["observation_dates"] = json!("2026-12-32")).await;
    assert_eq!(fields, ["parameters.observation_dates"]);
    assert!(message.contains("is not a date"), "{message}");
    // Nothing of these was stored.
    assert_eq!(app.stored_requests().await, 0);
    // Dates without a period are refused too, by name.
    let mut parameters: Value =
        serde_json::from_str(&support::cta_example().parameters_json).unwrap();
    parameters["observation_dates"] = json!("2026-12-01");
    let status = app
        .submit(pb::SubmitRequestRequest {
            parameters_json: parameters.to_string(),
            ..support::cta_example()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["parameters.observation_dates"]);
    // Nights of the period: accepted, and kept in the parameters.
    let within = app
        .validate(period_request(|p| {
            p["observation_dates"] = json!("2026-12-20/2027-01-10");
            p["zenith_deg"] = json!(20);
        }))
        .await;
    assert!(within.acceptable, "{within:?}");
    let parameters: Value = serde_json::from_str(&within.pointings[0].parameters_json).unwrap();
    assert_eq!(parameters["observation_dates"], "2026-12-20/2027-01-10");

    // ValidateRequest: each pointing's parameters and verdict.
    let dry = app.validate(period_request(|_| {})).await;
    assert!(dry.acceptable, "{dry:?}");
    assert_eq!(dry.period, PERIOD);
    assert_eq!(dry.pointings.len(), 6);
    let fingerprints: BTreeSet<&str> = dry
        .pointings
        .iter()
        .map(|p| p.fingerprint.as_str())
        .collect();
    assert_eq!(fingerprints.len(), 6);
    for p in &dry.pointings {
        assert!(p.acceptable, "{p:?}");
        let parameters: Value = serde_json::from_str(&p.parameters_json).unwrap();
        assert_eq!(parameters["site"], "LaPalma");
        assert_eq!(parameters["array_layout"], "Alpha");
        assert_eq!(parameters["atmosphere"], "LaPalma-winter-ATM62");
        assert_eq!(parameters["nsb_levels"], json!([1, 5, 19]));
        let label = format!(
            "zenith {} deg, azimuth {} deg",
            parameters["zenith_deg"],
            if parameters["pointing"] == "North" {
                180
            } else {
                0
            }
        );
        assert_eq!(p.pointing, label);
        assert_eq!(p.plan.unwrap().jobs, 1);
    }
    // An NSB subset is what the profile lets a request override.
    let dark = app
        .validate(period_request(|p| {
            p["nsb_levels"] = json!([1]);
            p["zenith_deg"] = json!(40);
        }))
        .await;
    assert!(dark.acceptable, "{dark:?}");
    assert_eq!(dark.pointings.len(), 2);
    for p in &dark.pointings {
        let parameters: Value = serde_json::from_str(&p.parameters_json).unwrap();
        assert_eq!(
            (
                parameters["nsb_levels"].clone(),
                parameters["zenith_deg"].clone()
            ),
            (json!([1]), json!(40))
        );
    }
    // A request without a period is itself: one verdict, no pointings.
    let plain = app.validate(support::cta_example()).await;
    assert!(plain.acceptable, "{plain:?}");
    assert!(plain.period.is_empty() && plain.pointings.is_empty());
    let parameters: Value = serde_json::from_str(&plain.parameters_json).unwrap();
    assert_eq!(parameters["array_layout"], "Prod6-Hyperarray");

    // ListPeriods over gRPC, and the same through status's HTTP port.
    let listed = app
        .intake
        .clone()
        .list_periods(pb::ListPeriodsRequest {
            profile: "cta-irf-mc".into(),
            name: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .periods;
    let winter = listed
        .iter()
        .find(|p| p.name == PERIOD)
        .expect("the winter period");
    assert_eq!(winter.pointings.len(), 6);
    assert_eq!(
        (winter.site.as_str(), winter.nsb_levels.as_slice()),
        ("LaPalma", &[1, 5, 19][..])
    );
    assert!(listed.len() >= 2, "{listed:?}");
    let status = format!(
        "http://{}",
        app.stack.addr(prodsys::Service::Status).unwrap()
    );
    let answer: Value = reqwest::Client::new()
        .get(format!("{status}/api/periods?name={PERIOD}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let periods = answer["periods"].as_array().unwrap();
    assert_eq!(periods.len(), 1, "{answer}");
    assert_eq!(periods[0]["atmosphere"], "LaPalma-winter-ATM62");
    assert_eq!(periods[0]["pointings"].as_array().unwrap().len(), 6);
    assert_eq!(periods[0]["valid_from"], "2026-11-01");

    // The versioned HTTP API answers the same periods: every shipped one
    // of the profile, and the one asked for by name in full.
    let v1 = |query: &'static str| {
        let status = status.clone();
        async move {
            let response = reqwest::get(format!("{status}/api/v1/periods{query}"))
                .await
                .unwrap();
            let code = response.status().as_u16();
            let content_type = response
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            (code, content_type, response.json::<Value>().await.unwrap())
        }
    };
    let shipped: BTreeSet<String> = std::fs::read_dir(prodsys_testkit::repo_root().join("periods"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| {
            let period: toml::Value = toml::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
            period["name"].as_str().unwrap().to_string()
        })
        .collect();
    let (code, _, all) = v1("?profile=cta-irf-mc").await;
    assert_eq!(code, 200, "{all}");
    let names: BTreeSet<String> = all["periods"]
        .as_array()
        .unwrap_or_else(|| panic!("{all}"))
        .iter()
        .map(|p| {
            assert_eq!(p["profile"], "cta-irf-mc", "{p}");
            p["name"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(names, shipped, "{all}");
    let (code, _, one) = v1("?name=lapalma-2026-winter").await;
    assert_eq!(code, 200, "{one}");
    let periods = one["periods"].as_array().unwrap_or_else(|| panic!("{one}"));
    assert_eq!(periods.len(), 1, "{one}");
    let period = &periods[0];
    assert_eq!(period["name"], PERIOD);
    assert_eq!(period["profile"], "cta-irf-mc");
    assert_eq!(period["site"], "LaPalma");
    assert_eq!(period["array_layout"], "Alpha");
    assert_eq!(period["nsb_levels"], json!([1, 5, 19]));
    assert_eq!(period["atmosphere"], "LaPalma-winter-ATM62");
    assert_eq!(period["valid_from"], "2026-11-01");
    assert_eq!(period["valid_until"], "2027-04-30");
    assert!(
        period["description"]
            .as_str()
            .is_some_and(|d| d.starts_with("CTA-North winter 2026/27")),
        "{period}"
    );
    let pointings: BTreeSet<(i64, i64, String)> = period["pointings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            (
                q["zenith_deg"].as_f64().unwrap() as i64,
                q["azimuth_deg"].as_f64().unwrap() as i64,
                q["label"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: BTreeSet<(i64, i64, String)> = [20, 40, 60]
        .into_iter()
        .flat_map(|z| [180, 0].map(|a| (z, a, format!("zenith {z} deg, azimuth {a} deg"))))
        .collect();
    assert_eq!(pointings, expected, "{period}");
    // Another profile's or an unknown name: no periods; a filter it does not
    // know: a problem.
    for query in ["?profile=km3net-reco", "?name=2019-never"] {
        let (code, _, none) = v1(query).await;
        assert_eq!(code, 200, "{query}: {none}");
        assert_eq!(none["periods"], json!([]), "{query}: {none}");
    }
    let (code, content_type, problem) = v1("?colour=blue").await;
    assert_eq!(code, 400, "{problem}");
    assert_eq!(content_type, "application/problem+json", "{problem}");
    assert_eq!(problem["status"], 400, "{problem}");
    app.stop().await;
}

mod waits {
    use super::*;

    pub async fn list(app: &App, request_id: &str, n: usize) -> Vec<pb::Production> {
        prodsys_testkit::wait_for(
            "the request's productions in status",
            Duration::from_secs(30),
            || async {
                let listed = request_productions(app, request_id).await;
                (listed.len() == n && listed.iter().all(|p| !p.pointing.is_empty()))
                    .then_some(listed)
            },
        )
        .await
        .unwrap()
    }

    pub async fn files(app: &App, production_id: &str, n: usize) -> Vec<pb::OutputFile> {
        prodsys_testkit::wait_for(
            "the production's files in the catalog",
            Duration::from_secs(30),
            || async {
                let files = app.files(production_id).await;
                (files.len() == n).then_some(files)
            },
        )
        .await
        .unwrap()
    }
}
