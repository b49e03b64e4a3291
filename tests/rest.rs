//! The HTTP/JSON API (`/api/v1` on the status port) against a whole stack:
//! a request submitted, followed and its production cancelled over HTTP;
//! files found with metadata conditions; a problem document (RFC 9457)
//! naming the field for each kind of bad input; and schemathesis generating
//! inputs for every operation of the served OpenAPI document (no 5xx, every
//! response as the document says).

mod support;

use std::path::PathBuf;
use std::time::Duration;

use prodsys::Service;
use prodsys_testkit::wait_for;
use serde_json::{Value, json};
use support::{cta_example, spawn_app_with, use_test_profiles};

fn base(app: &support::App) -> String {
    format!("http://{}", app.stack.addr(Service::Status).unwrap())
}

/// The status and JSON body of an answer, checking the content type a
/// problem must have.
async fn answer(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status >= 400 {
        assert_eq!(content_type, "application/problem+json", "{status} {body}");
        assert_eq!(body["status"], status, "{body}");
    }
    (status, body)
}

async fn get(url: &str) -> (u16, Value) {
    answer(reqwest::get(url).await.unwrap()).await
}

async fn post(url: &str, body: &Value) -> (u16, Value) {
    answer(
        reqwest::Client::new()
            .post(url)
            .json(body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn post_raw(url: &str, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    answer(
        reqwest::Client::new()
            .post(url)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// POSTs a JSON `body` the server may answer before reading it all (a body
/// over its limit): over a plain connection, so that the answer is read
/// even where the server closed its side while the body was still being
/// sent (an HTTP client library reports that as a broken pipe instead).
async fn post_unread(url: &str, body: Vec<u8>) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // The server may stop reading once it has seen the length: what is
    // left unsent does not matter.
    let _ = stream.write_all(&body).await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text}"));
    let (headers, rest) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers: {text}"));
    // The body as it came: whole, or in chunks (`<size>\r\n<data>\r\n`…).
    let json = if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut left = rest;
        while let Some((size, after)) = left.split_once("\r\n") {
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if size == 0 || after.len() < size {
                break;
            }
            out.push_str(&after[..size]);
            left = after[size..].trim_start_matches("\r\n");
        }
        out
    } else {
        rest.to_string()
    };
    (
        status,
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}")),
    )
}

fn fields(problem: &Value) -> Vec<String> {
    problem["violations"]
        .as_array()
        .unwrap_or_else(|| panic!("no violations: {problem}"))
        .iter()
        .map(|v| v["field"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_is_submitted_followed_and_cancelled_over_http() {
    let app = spawn_app_with(use_test_profiles).await;
    let api = format!("{}/api/v1", base(&app));
    // Jobs long enough to be cancelled while they run.
    let request = json!({
        "profile": "test-sleep", "vo": "test", "submitter": "rest",
        "parameters": {"jobs": 2, "per_job": 1, "seconds": 60, "fail_job": -1, "tag": "rest"},
    });
    let (status, verdict) = post(&format!("{api}/requests/validate"), &request).await;
    assert_eq!(status, 200, "{verdict}");
    assert_eq!(verdict["acceptable"], true, "{verdict}");
    assert_eq!(verdict["plan"]["jobs"], 2, "{verdict}");

    let response = reqwest::Client::new()
        .post(format!("{api}/requests"))
        .json(&request)
        .send()
        .await
        .unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let (status, submitted) = answer(response).await;
    assert_eq!(status, 202, "{submitted}");
    let request_id = submitted["request_id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/api/v1/requests/{request_id}"));

    let decided = wait_for("the request decided", Duration::from_secs(30), || {
        let url = format!("{}{location}", base(&app));
        async move {
            let (status, body) = get(&url).await;
            (status == 200 && body["state"] != "RECEIVED").then_some(body)
        }
    })
    .await
    .unwrap();
    assert_eq!(decided["state"], "ACCEPTED", "{decided}");
    assert_eq!(decided["parameters"]["tag"], "rest", "{decided}");
    let production_id = decided["production_id"].as_str().unwrap().to_string();

    let running = wait_for("the production running", Duration::from_secs(30), || {
        let url = format!("{api}/productions/{production_id}");
        async move {
            let (status, body) = get(&url).await;
            (status == 200 && body["state"] == "RUNNING").then_some(body)
        }
    })
    .await
    .unwrap();
    assert_eq!(running["job_total"], 2, "{running}");
    assert_eq!(running["request_id"], request_id.as_str());
    let (status, page) = get(&format!("{api}/productions?request_id={request_id}")).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        page["productions"][0]["production_id"],
        production_id.as_str()
    );
    let (status, page) = get(&format!("{api}/productions?state=running&vo=test")).await;
    assert_eq!(status, 200, "{page}");
    assert!(
        page["productions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["production_id"] == production_id.as_str()),
        "{page}"
    );

    let (status, cancelled) = post(
        &format!("{api}/productions/{production_id}/cancel"),
        &json!({"reason": "over HTTP"}),
    )
    .await;
    assert_eq!(status, 202, "{cancelled}");
    assert_eq!(cancelled["accepted"], true);
    wait_for("the production CANCELLED", Duration::from_secs(60), || {
        let url = format!("{api}/productions/{production_id}");
        async move {
            let (_, body) = get(&url).await;
            (body["state"] == "CANCELLED").then_some(())
        }
    })
    .await
    .unwrap();
    // A production nobody made: 404 with the message of the read model.
    let (status, missing) = get(&format!("{api}/productions/P-NOPE-1")).await;
    assert_eq!(status, 404, "{missing}");
    assert_eq!(missing["code"], "NOT_FOUND");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_are_found_with_the_conditions_of_find_files() {
    let app = spawn_app_with(|_| {}).await;
    let api = format!("{}/api/v1", base(&app));
    let production_id = app.run_and_catalogue(cta_example()).await;
    let search = format!("{api}/files/search");

    let (status, all) = post(
        &search,
        &json!({"production_id": production_id, "page_size": 1000}),
    )
    .await;
    assert_eq!(status, 200, "{all}");
    let all = all["files"].as_array().unwrap().clone();
    assert!(!all.is_empty());
    let (status, dark) = post(
        &search,
        &json!({
            "production_id": production_id,
            "conditions": [
                {"key": "nsb", "operator": "in", "values": ["1"]},
                {"key": "run_number", "operator": ">=", "values": ["1"]},
            ],
            "page_size": 1000,
        }),
    )
    .await;
    assert_eq!(status, 200, "{dark}");
    let dark = dark["files"].as_array().unwrap();
    assert!(!dark.is_empty() && dark.len() < all.len(), "{dark:?}");
    assert!(dark.iter().all(|f| f["metadata"]["nsb"] == "1"), "{dark:?}");
    assert!(
        dark.iter()
            .all(|f| f["production_id"] == production_id.as_str())
    );
    // The same query as GET, its conditions in the query string.
    let (status, by_get) = get(&format!(
        "{api}/files?production_id={production_id}&condition=nsb%20in%201&condition=run_number%3E%3D1&page_size=1000"
    ))
    .await;
    assert_eq!(status, 200, "{by_get}");
    assert_eq!(by_get["files"].as_array().unwrap(), dark);
    let (status, p) = get(&format!("{api}/files?condition=nsb&condition=nsb%3D1")).await;
    assert_eq!(
        (status, fields(&p)),
        (400, vec!["condition[0]".to_string()]),
        "{p}"
    );
    // Paged: one file a page, following next_page_token.
    let (status, first) = post(
        &search,
        &json!({"production_id": production_id, "page_size": 1}),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["files"].as_array().unwrap().len(), 1);
    let (_, second) = post(
        &search,
        &json!({"production_id": production_id, "page_size": 1,
                "page_token": first["next_page_token"]}),
    )
    .await;
    assert_eq!(second["files"][0]["lfn"], all[1]["lfn"]);
    // The catalog's refusal, with its field violations: 422.
    let (status, refused) = post(
        &search,
        &json!({"conditions": [{"key": "nsb", "operator": "in", "values": ["1", "x"]}]}),
    )
    .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["code"], "INVALID_ARGUMENT");
    assert!(!fields(&refused).is_empty(), "{refused}");
    // Its record, as JSON.
    let (status, record) = get(&format!("{api}/productions/{production_id}/record")).await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["production_id"], production_id.as_str(), "{record}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_kind_of_bad_input_is_a_problem_naming_the_field() {
    let app = spawn_app_with(|_| {}).await;
    let root = base(&app);
    let api = format!("{root}/api/v1");
    let submit = format!("{api}/requests");

    let (status, doc) = get(&format!("{root}/openapi.json")).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{doc}");
    assert!(doc["paths"]["/api/v1/files/search"]["post"].is_object());

    // Malformed JSON.
    let (status, p) = post_raw(&submit, "application/json", b"{\"profile\": ".to_vec()).await;
    assert_eq!((status, fields(&p)), (400, vec!["body".to_string()]), "{p}");
    // A wrong type, deep in the body.
    let (status, p) = post(
        &format!("{api}/files/search"),
        &json!({"conditions": [{"key": "nsb", "operator": "in", "values": [1]}]}),
    )
    .await;
    assert_eq!(status, 400, "{p}");
    assert_eq!(fields(&p), ["conditions[0].values[0]"]);
    let (status, p) = post(
        &format!("{api}/files/search"),
        &json!({"conditions": [{"key": "nsb", "operator": "~", "values": []}]}),
    )
    .await;
    assert_eq!(
        (status, fields(&p)),
        (400, vec!["conditions[0].operator".to_string()])
    );
    // An unknown field, and a missing one.
    let mut body = json!({"profile": "cta-irf-mc", "vo": "v", "parameters": {}, "colour": "red"});
    let (status, p) = post(&submit, &body).await;
    assert_eq!(
        (status, fields(&p)),
        (400, vec!["colour".to_string()]),
        "{p}"
    );
    body.as_object_mut().unwrap().remove("colour");
    body.as_object_mut().unwrap().remove("vo");
    let (status, p) = post(&submit, &body).await;
    assert_eq!((status, fields(&p)), (400, vec!["vo".to_string()]), "{p}");
    // A body too large.
    let huge = format!("{{\"reason\": \"{}\"}}", "x".repeat(2 << 20));
    let (status, p) =
        post_unread(&format!("{api}/productions/P-1/cancel"), huge.into_bytes()).await;
    assert_eq!((status, fields(&p)), (413, vec!["body".to_string()]), "{p}");
    // Not JSON at all.
    let (status, p) = post_raw(&submit, "text/plain", b"profile=x".to_vec()).await;
    assert_eq!(
        (status, fields(&p)),
        (415, vec!["Content-Type".to_string()]),
        "{p}"
    );
    // A NUL no service could store.
    let (status, p) = post(
        &submit,
        &json!({"profile": "a\u{0}b", "vo": "v", "parameters": {}}),
    )
    .await;
    assert_eq!(
        (status, fields(&p)),
        (400, vec!["profile".to_string()]),
        "{p}"
    );
    // Query parameters: a wrong type, an unknown name, a bad state.
    let (status, p) = get(&format!(
        "{api}/productions?page_size=ten&sort=age&state=NAPPING"
    ))
    .await;
    assert_eq!(status, 400, "{p}");
    let mut named = fields(&p);
    named.sort();
    assert_eq!(named, ["page_size", "sort", "state"], "{p}");
    // The service's own refusal: 422 with the violations gRPC gives.
    let (status, p) = post(
        &submit,
        &json!({"profile": "no-such-profile", "vo": "v", "parameters": {}}),
    )
    .await;
    assert_eq!(status, 422, "{p}");
    assert_eq!(p["code"], "INVALID_ARGUMENT");
    assert!(fields(&p).contains(&"profile".to_string()), "{p}");
    // The older JSON routes read their queries and paths the same way.
    let (status, p) = get(&format!("{root}/api/productions?page_size=ten")).await;
    assert_eq!(
        (status, fields(&p)),
        (400, vec!["page_size".to_string()]),
        "{p}"
    );
    let (status, p) = get(&format!("{root}/api/templates?profile=a%00b")).await;
    assert_eq!(
        (status, fields(&p)),
        (400, vec!["profile".to_string()]),
        "{p}"
    );
    let (status, p) = get(&format!("{root}/api/productions/P%001")).await;
    assert_eq!(
        (status, fields(&p)),
        (400, vec!["production_id".to_string()]),
        "{p}"
    );
    let (status, p) = get(&format!("{api}/productions/P%001")).await;
    assert_eq!(
        (status, fields(&p)),
        (400, vec!["production_id".to_string()]),
        "{p}"
    );
    let response = reqwest::Client::new()
        .delete(format!("{api}/profiles"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["allow"], "GET,HEAD");
    let (status, p) = answer(response).await;
    assert_eq!(
        (status, p["code"].as_str()),
        (405, Some("UNIMPLEMENTED")),
        "{p}"
    );
    let (status, p) = get(&format!("{api}/nothing/here")).await;
    assert_eq!(
        (status, p["code"].as_str()),
        (404, Some("NOT_FOUND")),
        "{p}"
    );
    let (status, p) = get(&format!("{api}/requests/not-a-request")).await;
    assert!(status == 404 || status == 422, "{status} {p}");
    app.stop().await;
}

/// schemathesis from the test command's environment (var/venv/schemathesis),
/// else one made here under target/ with the newest Python 3.12+ on PATH
/// (see deploy/local/test for why not 3.11).
fn schemathesis() -> PathBuf {
    let root = prodsys_testkit::repo_root();
    let bin = |venv: &PathBuf| venv.join("bin/schemathesis");
    let local = root.join("var/venv/schemathesis");
    if bin(&local).exists() {
        return bin(&local);
    }
    let venv = root.join("target/venv/schemathesis");
    if !bin(&venv).exists() {
        let python = ["python3.14", "python3.13", "python3.12"]
            .into_iter()
            .find(|p| {
                std::process::Command::new(p)
                    .args(["-c", ""])
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .unwrap_or("python3");
        let made = std::process::Command::new(python)
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv");
        assert!(made.success(), "python3 -m venv {}", venv.display());
        let installed = std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "-r"])
            .arg(root.join("tests/rest/requirements.txt"))
            .status()
            .expect("pip install schemathesis");
        assert!(
            installed.success(),
            "pip install -r tests/rest/requirements.txt"
        );
    }
    bin(&venv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schemathesis_finds_no_server_error_and_no_answer_off_the_document() {
    let app = spawn_app_with(use_test_profiles).await;
    let root = base(&app);
    // A production for the document's links to lead to (get, record, cancel).
    app.accepted(support::sleep_request(2, 30.0, -1, "schemathesis", "local"))
        .await;
    let junit = app.env.work_dir.join("schemathesis.xml");
    let out = tokio::process::Command::new(schemathesis())
        .arg("run")
        .arg(format!("{root}/openapi.json"))
        .args(["--checks", "all"])
        // Generated requests are refused by profiles they cannot know (422),
        // and the API has no authentication to probe.
        .args([
            "--exclude-checks",
            "positive_data_acceptance,ignored_auth,object_level_authorization",
        ])
        .args(["--max-examples", "30", "--workers", "2", "--seed", "16"])
        .args(["--request-timeout", "30", "--no-shrink"])
        .args(["--suppress-health-check", "all"])
        .args(["--report", "junit", "--report-junit-path"])
        .arg(&junit)
        .env("NO_COLOR", "1")
        .current_dir(&app.env.work_dir)
        .output()
        .await
        .expect("running schemathesis");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every operation was exercised (a test case each in the JUnit report).
    let junit = std::fs::read_to_string(&junit).expect("schemathesis's JUnit report");
    for operation in [
        "POST /api/v1/requests\"",
        "POST /api/v1/requests/validate\"",
        "GET /api/v1/requests/{request_id}\"",
        "GET /api/v1/productions\"",
        "GET /api/v1/productions/{production_id}\"",
        "POST /api/v1/productions/{production_id}/cancel\"",
        "GET /api/v1/productions/{production_id}/record\"",
        "POST /api/v1/files/search\"",
        "GET /api/v1/files\"",
        "GET /api/v1/profiles\"",
        "GET /api/v1/templates\"",
        "GET /api/v1/periods\"",
    ] {
        assert!(junit.contains(operation), "{operation} not run:\n{junit}");
    }
    app.stop().await;
}
