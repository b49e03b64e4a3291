//! The status dashboard in a real browser (Chromium, driven through
//! chromedriver's W3C WebDriver API): it shows a production submitted after
//! the page was opened and follows it live to COMPLETED, and its outputs
//! to their destination (files forwarded / catalogued), without a reload;
//! the JSON API and /metrics answer with the same read model. A period's
//! production shows its period and pointing, and a group's its jobs per
//! installation, in the list and on their pages.

mod support;

use std::time::Duration;

use prodsys::Service;
use prodsys_proto as pb;
use prodsys_testkit::wait_for;
use serde_json::{Value, json};
use support::browser::Browser;
use support::{cta_example, sleep_request, spawn_app_with};

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

/// Waits for `script` (run in the page) to return `true`.
async fn until(browser: &Browser, what: &str, seconds: u64, script: &str) {
    wait_for(what, Duration::from_secs(seconds), || async {
        (browser.eval(script).await == json!(true)).then_some(())
    })
    .await
    .unwrap();
}

/// The text of the element `selector` matches, or null.
async fn text(browser: &Browser, selector: &str) -> Value {
    browser
        .eval(&format!(
            "const e = document.querySelector({selector:?}); return e ? e.textContent : null;"
        ))
        .await
}

/// A production's page in a real browser: its state and counts, its jobs a
/// page at a time with their attempts, WMS status, exit code and log tail,
/// its files and their replicas, its record with the productions it read
/// from and those that read from it; the list's filters and search by ID;
/// a cancel button that cancels; and a screenshot of a page.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_production_page_shows_its_jobs_files_and_record_and_cancels() {
    let app = spawn_app_with(|env| {
        support::use_test_profiles(env);
        support::storage::disk(env);
    })
    .await;
    let status = format!("http://{}", app.stack.addr(Service::Status).unwrap());
    // Three jobs, the middle one failing on both its attempts; outputs to disk.
    let partial = app
        .accepted(pb::SubmitRequestRequest {
            forward: vec!["disk".into()],
            ..sleep_request(3, 0.2, 1, "dashboard-partial", "local")
        })
        .await;
    app.production_when(
        "the partial production finished",
        Duration::from_secs(90),
        &partial,
        |p| p.finished,
    )
    .await;
    // A chained production over its files (its record names its parent).
    let child = app
        .accepted(pb::SubmitRequestRequest {
            profile: "test-chain".into(),
            vo: "test".into(),
            parameters_json: json!({
                "input_production": partial, "seconds": 0, "tag": "dashboard-child"
            })
            .to_string(),
            backend: "local".into(),
            ..cta_example()
        })
        .await;
    // And one that runs long, to cancel.
    let long = app
        .accepted(sleep_request(2, 120.0, -1, "dashboard-long", "local"))
        .await;
    app.production_when(
        "the long production running",
        Duration::from_secs(60),
        &long,
        |p| p.state() == pb::ProductionState::Running,
    )
    .await;

    let browser = Browser::start().await;
    // The list, filtered by state through its query string: only the running one.
    browser.open(&format!("{status}/?state=RUNNING")).await;
    until(
        &browser,
        "the running production listed",
        30,
        &format!("return document.getElementById('p-{long}') !== null"),
    )
    .await;
    assert_eq!(
        browser
            .eval(&format!(
                "return document.getElementById('p-{partial}') === null \
                 && document.getElementById('filter-state').value === 'RUNNING'"
            ))
            .await,
        json!(true),
        "a production not RUNNING is filtered out"
    );
    // An installation no production ran on: none listed.
    browser
        .eval(
            "document.getElementById('filter-state').value = ''; \
             document.getElementById('filter-installation').value = 'nowhere'; \
             return null;",
        )
        .await;
    browser.click("#filters button[type=submit]").await;
    until(
        &browser,
        "nothing on installation nowhere",
        20,
        "return document.querySelectorAll('#productions tr').length === 0 \
         && !document.getElementById('empty').hidden \
         && location.search === '?installation=nowhere'",
    )
    .await;
    // By VO and installation (local): all three, each linking to its page.
    browser
        .open(&format!("{status}/?vo=test&installation=local"))
        .await;
    until(
        &browser,
        "the three productions of VO test on local",
        30,
        &format!(
            "return ['{partial}', '{child}', '{long}'].every(id => \
               document.querySelector(`#p-${{id}} a[href=\"productions/${{id}}\"]`) !== null)"
        ),
    )
    .await;
    // Part of an ID filters the list; a whole ID opens its page.
    let digits = partial.trim_start_matches("TEST-");
    browser
        .eval(&format!(
            "document.getElementById('search').value = '{digits}'; return null;"
        ))
        .await;
    browser.click("#filters button[type=submit]").await;
    until(
        &browser,
        "only the production whose ID contains the digits",
        20,
        &format!(
            "return document.getElementById('p-{partial}') !== null \
               && document.getElementById('p-{long}') === null"
        ),
    )
    .await;
    browser
        .eval(&format!(
            "document.getElementById('search').value = '{partial}'; return null;"
        ))
        .await;
    browser.click("#filters button[type=submit]").await;
    until(
        &browser,
        "the production's page opened by its ID",
        20,
        &format!("return location.pathname === '/productions/{partial}'"),
    )
    .await;

    // Its page: state, counts, jobs with attempts, WMS status and exit codes.
    until(
        &browser,
        "PARTIALLY_COMPLETED with its jobs",
        30,
        "return document.getElementById('state').textContent === 'PARTIALLY_COMPLETED' \
           && document.querySelectorAll('#jobs tr').length === 3",
    )
    .await;
    let counts = browser
        .eval(
            "const c = document.getElementById('counts'); \
             return ['job_total', 'done', 'exhausted'].map(f => \
               c.querySelector(`[data-field=\"${f}\"]`).textContent);",
        )
        .await;
    assert_eq!(counts, json!(["3", "2", "1"]));
    let job = |index: u64, field: &'static str| {
        let browser = &browser;
        async move {
            browser
                .field(&format!("j-{index}"), field)
                .await
                .unwrap_or_default()
        }
    };
    assert_eq!(job(1, "state").await, "EXHAUSTED");
    assert_eq!(job(1, "attempt").await, "2");
    assert_eq!(job(1, "exit_code").await, "1");
    assert_eq!(job(0, "state").await, "DONE");
    assert_eq!(job(0, "exit_code").await, "0");
    assert_eq!(job(0, "installation").await, "local (local)");
    assert!(!job(0, "wms_status").await.is_empty(), "the WMS's own word");
    assert!(!job(0, "backend_job_id").await.is_empty());
    // The failing job's log: the end of its last attempt's stdout and stderr.
    browser.click("#j-1 button.log").await;
    until(
        &browser,
        "the failing job's log",
        20,
        "return document.querySelector('#log-1 pre[data-stream=stderr]') !== null",
    )
    .await;
    assert_eq!(
        text(&browser, "#log-1 pre[data-stream=stdout]").await,
        json!("job 1 slept 0.2 s\n")
    );
    assert_eq!(
        text(&browser, "#log-1 pre[data-stream=stderr]").await,
        json!("job 1 fails on purpose\n")
    );
    // Its two files, each with its replica on the disk destination.
    until(
        &browser,
        "two files with replicas",
        30,
        "return document.querySelectorAll('#files tr.file').length === 2 \
           && document.querySelectorAll('#files .replica[data-destination=disk]').length === 2",
    )
    .await;
    let replica = text(&browser, "#files .replica[data-destination=disk]").await;
    assert!(replica.as_str().unwrap().starts_with("disk: "), "{replica}");
    // Its record, naming the production that read its files.
    until(
        &browser,
        "the record with its child production",
        60,
        &format!(
            "return document.querySelector('#children a[data-production=\"{child}\"]') !== null"
        ),
    )
    .await;
    assert_eq!(text(&browser, "#parents").await, json!("none"));
    assert_eq!(
        text(&browser, "#record-fields [data-field=file_count]").await,
        json!("2")
    );
    // The cancel button is gone from an ended production.
    assert_eq!(
        browser
            .eval("return document.getElementById('cancel').hidden")
            .await,
        json!(true)
    );
    // A screenshot of the page from its top: a PNG with something in it.
    browser
        .command("window/rect", json!({ "width": 1280, "height": 1400 }))
        .await;
    browser.eval("window.scrollTo(0, 0); return null;").await;
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert_eq!(&png[12..16], b"IHDR");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert!(width > 100 && height > 100, "{width}x{height}");
    assert!(
        png.len() > 5_000,
        "a page's screenshot of {} bytes",
        png.len()
    );
    // Kept for a person to look at (target/tmp/).
    std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-production-page.png"),
        &png,
    )
    .unwrap();

    // The child's page names its parent, linked.
    browser
        .click(&format!("#children a[data-production=\"{child}\"]"))
        .await;
    until(
        &browser,
        "the child's page with its parent",
        90,
        &format!(
            "return location.pathname === '/productions/{child}' \
               && document.querySelector('#parents a[data-production=\"{partial}\"]') !== null"
        ),
    )
    .await;

    // Jobs a page at a time.
    browser
        .open(&format!("{status}/productions/{long}?jobs_page_size=1"))
        .await;
    until(
        &browser,
        "the first page of one job",
        20,
        "return document.querySelectorAll('#jobs tr').length === 1 \
           && document.getElementById('j-0') !== null \
           && !document.getElementById('jobs-next').disabled",
    )
    .await;
    browser.click("#jobs-next").await;
    until(
        &browser,
        "the second page",
        20,
        "return document.getElementById('j-1') !== null \
           && document.getElementById('j-0') === null \
           && document.getElementById('jobs-next').disabled",
    )
    .await;
    // Cancel: the first click asks to confirm, the second cancels.
    browser.click("#cancel").await;
    assert_eq!(
        browser
            .eval("return document.getElementById('cancel').className")
            .await,
        json!("confirm")
    );
    browser.click("#cancel").await;
    until(
        &browser,
        "CANCELLED on the page",
        60,
        "return document.getElementById('state').textContent === 'CANCELLED' \
           && document.getElementById('cancel-result').textContent === 'cancel accepted'",
    )
    .await;
    let cancelled = app.production(&long).await.unwrap();
    assert_eq!(cancelled.state(), pb::ProductionState::Cancelled);
    browser.close().await;

    // The job API the page reads, and its problems.
    let http = reqwest::Client::new();
    let jobs: Value = http
        .get(format!(
            "{status}/api/productions/{partial}/jobs?page_size=2"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 2, "{jobs}");
    assert_eq!(jobs["jobs"][1]["attempts_submitted"], 2, "{jobs}");
    assert_eq!(jobs["jobs"][1]["wms"], "local", "{jobs}");
    assert_eq!(jobs["next_page_token"], "1", "{jobs}");
    for (path, status_code, field) in [
        (
            format!("api/productions/{partial}/jobs/x/log"),
            400,
            "job_index",
        ),
        (
            format!("api/productions/{partial}/jobs?page_token=z"),
            400,
            "page_token",
        ),
        (
            format!("api/productions/{partial}/jobs?sort=up"),
            400,
            "sort",
        ),
    ] {
        let answer = http.get(format!("{status}/{path}")).send().await.unwrap();
        assert_eq!(answer.status(), status_code, "{path}");
        let problem: Value = answer.json().await.unwrap();
        assert_eq!(
            problem["violations"][0]["field"], field,
            "{path}: {problem}"
        );
    }
    let absent = http
        .get(format!("{status}/api/productions/{partial}/jobs/7/log"))
        .send()
        .await
        .unwrap();
    assert_eq!(absent.status(), 404);
    app.stop().await;
}

/// A production of an observation period and one over a group of two
/// installations: the list shows the period and pointing of the first and
/// the jobs per installation of the second, and so do their pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_period_s_pointing_and_a_group_s_jobs_per_installation_are_shown() {
    let app = spawn_app_with(|env| {
        support::use_test_profiles(env);
        env.settings.dispatcher.poll_interval_ms = 200;
        for (name, max_running) in [("local-small", 1), ("local-large", 3)] {
            env.settings.dispatcher.backends.insert(
                name.into(),
                prodsys_config::BackendSettings::Local {
                    max_running,
                    max_queued: 0,
                    work_dir: Some(env.work_dir.join(name)),
                },
            );
        }
        env.settings.federation.groups.insert(
            "pair".into(),
            vec!["local-small".into(), "local-large".into()],
        );
    })
    .await;
    let status = format!("http://{}", app.stack.addr(Service::Status).unwrap());
    // One pointing of the shipped period example: one production of one job.
    let example: Value = serde_json::from_str(
        &std::fs::read_to_string(
            prodsys_testkit::repo_root().join("examples/cta-irf-mc-period.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut parameters = example["parameters"].clone();
    parameters["n_showers"] = json!(1000);
    parameters["zenith_deg"] = json!(20);
    parameters["pointing"] = json!("North");
    let period = app
        .accepted(pb::SubmitRequestRequest {
            profile: "cta-irf-mc".into(),
            vo: "vo.cta.in2p3.fr".into(),
            parameters_json: parameters.to_string(),
            backend: "local".into(),
            submitter: "tests".into(),
            ..Default::default()
        })
        .await;
    let group = app
        .accepted(sleep_request(8, 0.5, -1, "dashboard-group", "pair"))
        .await;
    for production in [&period, &group] {
        app.production_when(
            "the production completed",
            Duration::from_secs(90),
            production,
            |p| p.state() == pb::ProductionState::Completed,
        )
        .await;
    }
    let pointing = "lapalma-2026-winter, zenith 20 deg, azimuth 180 deg";
    let browser = Browser::start().await;
    browser.open(&format!("{status}/")).await;
    until(
        &browser,
        "both productions listed",
        30,
        &format!(
            "return document.getElementById('p-{period}') !== null \
               && document.getElementById('p-{group}') !== null"
        ),
    )
    .await;
    assert_eq!(
        browser
            .field(&format!("p-{period}"), "period")
            .await
            .as_deref(),
        Some(pointing)
    );
    assert_eq!(
        browser.field(&format!("p-{group}"), "period").await,
        None,
        "a production of no period shows none"
    );
    // The group's row: its jobs on each installation, all done.
    let lines = browser
        .eval(&format!(
            "return Array.from(document.querySelectorAll('#p-{group} .installation[data-installation]'))
               .map(e => e.textContent);"
        ))
        .await;
    let lines: Vec<&str> = lines
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let done = |line: &str| -> u64 {
        line.split(", ")
            .find_map(|part| part.strip_suffix(" done"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line}"))
    };
    assert!(
        lines[0].starts_with("local-large: 0 in flight, "),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("local-small: 0 in flight, "),
        "{lines:?}"
    );
    assert_eq!(lines.iter().map(|l| done(l)).sum::<u64>(), 8, "{lines:?}");
    assert!(lines.iter().all(|l| done(l) > 0), "{lines:?}");

    // The period's page: its period and pointing; one installation, no split.
    browser
        .open(&format!("{status}/productions/{period}"))
        .await;
    until(
        &browser,
        "the period's page",
        30,
        "return document.getElementById('state').textContent === 'COMPLETED'",
    )
    .await;
    assert_eq!(text(&browser, "#period").await, json!(pointing));
    assert_eq!(text(&browser, "#installations").await, json!(""));
    // The group's page: its jobs per installation.
    browser.open(&format!("{status}/productions/{group}")).await;
    until(
        &browser,
        "the group's page with its installations",
        30,
        "return document.querySelectorAll('#installations [data-installation]').length === 2",
    )
    .await;
    let small = text(&browser, "#installations [data-installation=local-small]").await;
    let large = text(&browser, "#installations [data-installation=local-large]").await;
    let page_done = |v: &Value| done(v.as_str().unwrap().split(": ").nth(1).unwrap());
    assert_eq!(page_done(&small) + page_done(&large), 8, "{small} {large}");
    assert_eq!(
        lines.iter().map(|l| done(l)).collect::<Vec<_>>(),
        vec![page_done(&large), page_done(&small)],
        "the list and the page agree"
    );
    assert_eq!(text(&browser, "#period").await, json!("—"));
    browser.close().await;
    app.stop().await;
}
