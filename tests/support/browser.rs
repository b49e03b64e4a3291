//! A headless Chromium driven through chromedriver's W3C WebDriver API, for
//! the dashboard's pages.

use std::process::Stdio;
use std::time::Duration;

use prodsys_testkit::wait_for;
use serde_json::{Value, json};

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
pub struct Browser {
    driver: tokio::process::Child,
    http: reqwest::Client,
    session: String,
    base: String,
}

impl Browser {
    pub async fn start() -> Browser {
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

    pub async fn command(&self, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}/{path}", self.base, self.session);
        post_json(&self.http, &url, &body).await["value"].take()
    }

    pub async fn open(&self, url: &str) {
        self.command("url", json!({ "url": url })).await;
    }

    /// Runs `script` in the page and returns its value.
    pub async fn eval(&self, script: &str) -> Value {
        self.command("execute/sync", json!({ "script": script, "args": [] }))
            .await
    }

    /// The text of a cell (`data-field`) of the row whose element ID is
    /// `row`, if the row is shown.
    pub async fn field(&self, row: &str, field: &str) -> Option<String> {
        let script = format!(
            "const row = document.getElementById('{row}');
             if (!row) return null;
             const cell = row.querySelector('[data-field=\"{field}\"]');
             return cell ? cell.firstChild.textContent : null;"
        );
        self.eval(&script).await.as_str().map(str::to_string)
    }

    /// Clicks the first element matching the CSS `selector`, as a user
    /// would (WebDriver's element click: scrolled into view, must be
    /// visible and enabled).
    pub async fn click(&self, selector: &str) {
        let found = self
            .command(
                "element",
                json!({ "using": "css selector", "value": selector }),
            )
            .await;
        let element = found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {selector}: {found}"))
            .to_string();
        let clicked = self
            .command(&format!("element/{element}/click"), json!({}))
            .await;
        assert!(clicked.is_null(), "clicking {selector}: {clicked}");
    }

    /// The page as a PNG, as WebDriver takes it (the viewport).
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let url = format!("{}/session/{}/screenshot", self.base, self.session);
        let answer: Value = self
            .http
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let text = answer["value"]
            .as_str()
            .unwrap_or_else(|| panic!("no screenshot: {answer}"));
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .expect("a screenshot is base64")
    }

    pub async fn close(mut self) {
        let _ = self
            .http
            .delete(format!("{}/session/{}", self.base, self.session))
            .send()
            .await;
        let _ = self.driver.kill().await;
    }
}
