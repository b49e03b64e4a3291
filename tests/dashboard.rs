//! The status dashboard in a real browser (Chromium, driven through
//! chromedriver's W3C WebDriver API): it shows a production submitted after
//! the page was opened and follows it live to COMPLETED without a reload;
//! the JSON API and /metrics answer with the same read model.

mod support;

use std::time::Duration;

use prodsys::Service;
use prodsys_testkit::wait_for;
use serde_json::{Value, json};
use support::browser::Browser;
use support::{cta_example, spawn_app};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_follows_a_production_live_in_a_browser() {
    let app = spawn_app().await;
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
    let production = app.accepted(cta_example()).await;
    // ... and shows it, then its end, from events alone (never reloaded).
    let shown = wait_for(
        "the production on the page",
        Duration::from_secs(30),
        || {
            let browser = &browser;
            let production = production.clone();
            async move {
                browser
                    .field(&format!("p-{production}"), "production_id")
                    .await
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(shown, production);
    wait_for("COMPLETED on the page", Duration::from_secs(90), || {
        let browser = &browser;
        let production = production.clone();
        async move {
            let state = browser.field(&format!("p-{production}"), "state").await?;
            (state == "COMPLETED").then_some(())
        }
    })
    .await
    .unwrap();
    assert_eq!(
        browser
            .field(&format!("p-{production}"), "done")
            .await
            .as_deref(),
        Some("4")
    );
    assert_eq!(
        browser
            .field(&format!("p-{production}"), "job_total")
            .await
            .as_deref(),
        Some("4")
    );
    assert_eq!(
        browser
            .field(&format!("p-{production}"), "failed")
            .await
            .as_deref(),
        Some("0")
    );
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
    app.stop().await;
}
