//! prodctl against a running stack: `--output json` for scripts, its exit
//! codes, and shell completions.

mod support;

use serde_json::Value;
use support::{App, built_binary, spawn_app};

/// Runs prodctl with every service URL of `app`; gives its exit code and stdout.
async fn prodctl(app: &App, args: &[&str]) -> (Option<i32>, String, String) {
    let mut command = tokio::process::Command::new(built_binary("prodctl", "prodctl"));
    for (flag, service) in [
        ("--intake", prodsys::Service::Intake),
        ("--checker", prodsys::Service::Checker),
        ("--dispatcher", prodsys::Service::Dispatcher),
        ("--status", prodsys::Service::Status),
        ("--catalog", prodsys::Service::Catalog),
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

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?} in {text}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_watch_as_json_lines_ends_with_the_completed_production() {
    let app = spawn_app().await;
    let example = prodsys_testkit::repo_root().join("examples/cta-irf-mc.json");
    let (code, out, err) = prodctl(
        &app,
        &[
            "-o",
            "json",
            "submit",
            example.to_str().unwrap(),
            "--watch",
            "--timeout",
            "300",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let lines = json_lines(&out);
    assert!(
        lines[0]["submitted"]["request_id"].as_str().is_some(),
        "{out}"
    );
    assert_eq!(
        lines[1]["request"]["state"], "REQUEST_STATE_ACCEPTED",
        "{out}"
    );
    let production_id = lines[1]["request"]["production_id"].as_str().unwrap();
    let snapshots: Vec<&Value> = lines.iter().filter_map(|l| l.get("production")).collect();
    let last = snapshots
        .last()
        .unwrap_or_else(|| panic!("no update: {out}"));
    assert_eq!(last["state"], "PRODUCTION_STATE_COMPLETED", "{out}");
    assert_eq!(last["production_id"], production_id);
    assert_eq!(last["counts"]["done"], last["job_total"], "{out}");
    assert!(last["job_total"].as_u64().unwrap() > 0, "{out}");
    // The last line lists the production's files.
    let files = lines.last().unwrap();
    assert_eq!(files["production_id"], production_id);
    assert!(
        !files["files"].as_array().unwrap().is_empty()
            && files["files"][0]["lfn"].as_str().is_some(),
        "{out}"
    );
    // Watching it again gives its final state at once; exit 0 for COMPLETED.
    let (code, out, err) = prodctl(&app, &["-o", "json", "watch", production_id]).await;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let lines = json_lines(&out);
    assert_eq!(
        lines.last().unwrap()["production"]["state"],
        "PRODUCTION_STATE_COMPLETED"
    );
    // status as one object; a production that does not exist: NOT_FOUND, exit 3.
    let (code, out, _) = prodctl(&app, &["-o", "json", "status", production_id]).await;
    assert_eq!(code, Some(0));
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["state"], "PRODUCTION_STATE_COMPLETED");
    let (code, out, _) = prodctl(&app, &["-o", "json", "status", "CTA-999999"]).await;
    assert_eq!(code, Some(3), "{out}");
    let error: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(error["error"]["code"], "NOT_FOUND", "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_request_is_refused_as_json_with_exit_code_2() {
    let app = spawn_app().await;
    std::fs::create_dir_all(&app.env.work_dir).unwrap();
    let file = app.env.work_dir.join("bad.json");
    let mut request: Value = serde_json::from_str(
        &std::fs::read_to_string(prodsys_testkit::repo_root().join("examples/cta-irf-mc.json"))
            .unwrap(),
    )
    .unwrap();
    request["parameters"]["zenith_deg"] = 95.into();
    std::fs::write(&file, request.to_string()).unwrap();
    let (code, out, err) = prodctl(&app, &["-o", "json", "validate", file.to_str().unwrap()]).await;
    assert_eq!(code, Some(2), "{out}\n{err}");
    let answer: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(answer["acceptable"], false);
    let violations = answer["violations"].as_array().unwrap();
    assert!(
        violations
            .iter()
            .any(|v| v["field"] == "parameters.zenith_deg"
                && !v["description"].as_str().unwrap().is_empty()),
        "{out}"
    );
    // Text mode refuses it with the same exit code.
    let (code, out, _) = prodctl(&app, &["validate", file.to_str().unwrap()]).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("parameters.zenith_deg"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lists_parse_as_json_and_usage_errors_exit_1() {
    let app = spawn_app().await;
    let (code, out, err) = prodctl(&app, &["-o", "json", "profiles"]).await;
    assert_eq!(code, Some(0), "{err}");
    let profiles: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(
        profiles
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "cta-irf-mc" && p["id_prefix"] == "CTA"),
        "{out}"
    );
    let (code, out, _) = prodctl(&app, &["-o", "json", "templates"]).await;
    assert_eq!(code, Some(0));
    assert!(serde_json::from_str::<Value>(&out).unwrap().is_array());
    let (code, out, _) = prodctl(&app, &["-o", "json", "periods", "lapalma-2026-winter"]).await;
    assert_eq!(code, Some(0), "{out}");
    let periods: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(periods.as_array().unwrap().len(), 1, "{out}");
    assert_eq!(periods[0]["site"], "LaPalma");
    assert_eq!(
        periods[0]["pointings"].as_array().unwrap().len(),
        6,
        "{out}"
    );
    let (code, out, _) = prodctl(&app, &["periods"]).await;
    assert_eq!(code, Some(0));
    assert!(out.contains("zenith 60 deg, azimuth 0 deg"), "{out}");
    let (code, out, _) = prodctl(&app, &["-o", "json", "health"]).await;
    assert_eq!(code, Some(0), "{out}");
    let health: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(health.as_array().unwrap().len(), 5);
    assert!(
        health
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["status"] == "SERVING")
    );
    // A service that cannot be reached: UNAVAILABLE, exit 4, as JSON.
    let output = tokio::process::Command::new(built_binary("prodctl", "prodctl"))
        .args(["-o", "json", "--intake", "http://127.0.0.1:1", "profiles"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(4));
    let error: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(error["error"]["code"], "UNAVAILABLE");
    // Usage errors exit 1; --help lists the exit codes.
    let (code, _, _) = prodctl(&app, &["no-such-command"]).await;
    assert_eq!(code, Some(1));
    let (code, help, _) = prodctl(&app, &["--help"]).await;
    assert_eq!(code, Some(0));
    assert!(
        help.contains("Exit codes:") && help.contains("5  the watched production"),
        "{help}"
    );
}

#[test]
fn bash_accepts_the_completion_script() {
    let output = std::process::Command::new(built_binary("prodctl", "prodctl"))
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let script = String::from_utf8(output.stdout).unwrap();
    assert!(
        script.contains("complete -F") && script.contains("prodctl"),
        "{script}"
    );
    let dir = std::env::temp_dir().join(format!("prodctl-completion-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("prodctl.bash");
    std::fs::write(&file, &script).unwrap();
    let checked = std::process::Command::new("bash")
        .arg("-n")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
