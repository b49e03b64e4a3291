//! The status dashboard in a real browser (Chromium, driven through
//! chromedriver's W3C WebDriver API): it shows a production submitted after
//! the page was opened and follows it live to COMPLETED, and its outputs
//! to their destination (files forwarded / catalogued), without a reload;
//! the JSON API and /metrics answer with the same read model.

mod support;

use std::time::Duration;

use prodsys::Service;
use prodsys_proto as pb;
use prodsys_testkit::wait_for;
use serde_json::{Value, json};
use support::browser::Browser;
use support::{cta_example, spawn_app_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_follows_a_production_live_in_a_browser() {
    // Its outputs go to a directory standing for a storage element.
    let app = spawn_app_with(|env| {
        support::storage::disk(env);
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
    // Its 8 outputs forwarded, and the production finished, on the page.
    wait_for("8 of 8 files forwarded on the page", Duration::from_secs(60), || {
        let browser = &browser;
        let production = production.clone();
        async move {
            let forwarded = browser.field(&format!("p-{production}"), "forwarding").await?;
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
    assert_eq!(
        bad.headers()[reqwest::header::CONTENT_TYPE],
        "application/problem+json"
    );
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["status"], 400, "{body}");
    assert_eq!(body["code"], "INVALID_ARGUMENT", "{body}");
    assert_eq!(body["violations"][0]["field"], "state", "{body}");
    assert!(body["detail"].as_str().unwrap().contains("state"), "{body}");
    let missing: Value = missing.json().await.unwrap();
    assert_eq!(missing["status"], 404, "{missing}");
    assert_eq!(missing["code"], "NOT_FOUND", "{missing}");
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
