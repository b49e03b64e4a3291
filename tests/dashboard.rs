//! The status dashboard in a real browser (Chromium, driven through
//! chromedriver's W3C WebDriver API): it shows a production submitted after
//! the page was opened and follows it live to COMPLETED, and its outputs
//! to their destination (files forwarded / catalogued), without a reload;
//! the JSON API and /metrics answer with the same read model.

mod support;

use std::process::Stdio;
use std::time::Duration;

use prodsys::Service;
use prodsys_config::DestinationSettings;
use prodsys_proto as pb;
use prodsys_testkit::wait_for;
use serde_json::{Value, json};
use support::{cta_example, spawn_app_with};

/// POSTs `body` to a WebDriver endpoint; returns the JSON answer.
async fn post_json(http: &reqwest::Client, url: &str, body: &Value) -> Value {
    http.post(url)
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A chromedriver process and one headless Chromium session.
struct Browser {
    driver: tokio::process::Child,
    http: reqwest::Client,
    session: String,
    base: String,
}

impl Browser {
    async fn start() -> Browser {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver (Debian package chromium-driver) must be installed");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        wait_for("chromedriver", Duration::from_secs(20), || {
            let http = http.clone();
            let url = format!("{base}/status");
            async move {
                http.get(url)
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
            }
        })
        .await
        .unwrap();
        let answer = post_json(
            &http,
            &format!("{base}/session"),
            &json!({
                "capabilities": { "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {
                        "binary": "/usr/bin/chromium",
                        "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                 "--disable-dev-shm-usage"]
                    }
                }}
            }),
        )
        .await;
        let session = answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {answer}"))
            .to_string();
        Browser {
            driver,
            http,
            session,
            base,
        }
    }

    async fn command(&self, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}/{path}", self.base, self.session);
        post_json(&self.http, &url, &body).await["value"].take()
    }

    async fn open(&self, url: &str) {
        self.command("url", json!({ "url": url })).await;
    }

    /// Runs `script` in the page and returns its value.
    async fn eval(&self, script: &str) -> Value {
        self.command("execute/sync", json!({ "script": script, "args": [] }))
            .await
    }

    /// The text of a field of a production's row, if the row is shown.
    async fn field(&self, production_id: &str, field: &str) -> Option<String> {
        let script = format!(
            "const row = document.getElementById('p-{production_id}');
             if (!row) return null;
             const cell = row.querySelector('[data-field=\"{field}\"]');
             return cell ? cell.firstChild.textContent : null;"
        );
        self.eval(&script).await.as_str().map(str::to_string)
    }

    async fn close(mut self) {
        let _ = self
            .http
            .delete(format!("{}/session/{}", self.base, self.session))
            .send()
            .await;
        let _ = self.driver.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_follows_a_production_live_in_a_browser() {
    // Its outputs go to a directory standing for a storage element.
    let app = spawn_app_with(|env| {
        let path = env.work_dir.join("disk");
        env.settings
            .forwarding
            .destinations
            .insert("disk".into(), DestinationSettings::Posix { path });
    })
    .await;
    let status = format!("http://{}", app.stack.addr(Service::Status).unwrap());
    let browser = Browser::start().await;
    // The page is open before the production exists ...
    browser.open(&format!("{status}/")).await;
    wait_for("the page to go live", Duration::from_secs(20), || {
        let browser = &browser;
        async move {
            let live = browser
                .eval("return document.getElementById('live').className")
                .await;
            (live == "on").then_some(())
        }
    })
    .await
    .unwrap();
    let production = app
        .accepted(pb::SubmitRequestRequest {
            forward: vec!["disk".into()],
            ..cta_example()
        })
        .await;
    // ... and shows it, then its end, from events alone (never reloaded).
    let shown = wait_for(
        "the production on the page",
        Duration::from_secs(30),
        || {
            let browser = &browser;
            let production = production.clone();
            async move { browser.field(&production, "production_id").await }
        },
    )
    .await
    .unwrap();
    assert_eq!(shown, production);
    wait_for("COMPLETED on the page", Duration::from_secs(90), || {
        let browser = &browser;
        let production = production.clone();
        async move {
            let state = browser.field(&production, "state").await?;
            (state == "COMPLETED").then_some(())
        }
    })
    .await
    .unwrap();
    assert_eq!(
        browser.field(&production, "done").await.as_deref(),
        Some("4")
    );
    assert_eq!(
        browser.field(&production, "job_total").await.as_deref(),
        Some("4")
    );
    assert_eq!(
        browser.field(&production, "failed").await.as_deref(),
        Some("0")
    );
    // Its 8 outputs forwarded, and the production finished, on the page.
    wait_for("8 of 8 files forwarded on the page", Duration::from_secs(60), || {
        let browser = &browser;
        let production = production.clone();
        async move {
            let forwarded = browser.field(&production, "forwarding").await?;
            let finished = browser
                .eval(&format!(
                    "return document.querySelector('#p-{production} [data-field=\"finished\"]') !== null"
                ))
                .await;
            (forwarded == "disk 8/8" && finished == json!(true)).then_some(())
        }
    })
    .await
    .unwrap();
    let navigations = browser
        .eval("return performance.getEntriesByType('navigation').length")
        .await;
    assert_eq!(navigations, json!(1), "the page was never reloaded");
    browser.close().await;

    // The same read model as JSON ...
    let http = reqwest::Client::new();
    let one: Value = http
        .get(format!("{status}/api/productions/{production}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["state"], "COMPLETED", "{one}");
    assert_eq!(one["counts"]["done"], 4, "{one}");
    assert_eq!(
        one["forwarding"],
        json!([{ "destination": "disk", "forwarded": 8, "total": 8, "failing": 0 }]),
        "{one}"
    );
    assert_eq!(one["finished"], true, "{one}");
    let missing = http
        .get(format!("{status}/api/productions/CTA-999999"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let bad = http
        .get(format!("{status}/api/productions?state=SLEEPING"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("state"), "{body}");
    // ... and as Prometheus metrics.
    let metrics = http
        .get(format!("{status}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("prodsys_productions{state=\"COMPLETED\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("prodsys_jobs{state=\"DONE\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("prodsys_installation_up{installation=\"local\"} 1"),
        "{metrics}"
    );
    for line in [
        "prodsys_forwarding_files{destination=\"disk\"} 8",
        "prodsys_forwarded_files{destination=\"disk\"} 8",
        "prodsys_forwarding_failing_files{destination=\"disk\"} 0",
    ] {
        assert!(metrics.contains(line), "{line}: {metrics}");
    }
    app.stop().await;
}
