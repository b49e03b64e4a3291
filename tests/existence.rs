//! The existence check compares the whole identity of each output file with
//! what the catalog holds, and FindFiles answers typed metadata conditions.

mod support;

use std::collections::{BTreeSet, HashMap};

use pb::ConditionOperator as Op;
use prodsys_proto as pb;
use serde_json::json;
use support::{
    condition, cta_example, cta_with, km3net_with, spawn_app, spawn_app_with, use_km3net_templates,
    violated_fields,
};

fn metadata(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn registered(lfn: &str, production_id: &str, pairs: &[(&str, &str)]) -> pb::OutputFile {
    pb::OutputFile {
        class_id: 0,
        lfn: lfn.into(),
        size: 1000,
        adler32: "0a0b0c0d".into(),
        url: format!("root://eos.example.org//eos{lfn}"),
        metadata: metadata(pairs),
        production_id: production_id.into(),
        job_index: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_simulations_are_accepted_and_an_overlap_is_named_per_nsb_level() {
    let app = spawn_app().await;
    // NSB levels 1 and 5, simulated and catalogued.
    let first = app.run_and_catalogue(cta_example()).await;

    // NSB 1 and 19: an overlap on NSB 1 only, naming the production.
    let both = cta_with(|p| p["nsb_levels"] = json!([1, 19]));
    let dry = app.validate(both.clone()).await;
    assert!(!dry.acceptable, "{dry:?}");
    assert_eq!(dry.overlaps.len(), 1, "{:?}", dry.overlaps);
    assert_eq!(dry.overlaps[0].production_id, first);
    assert_eq!(dry.overlaps[0].description, "nsb 1 (existing nsb 1, 5)");
    let reason = &dry
        .violations
        .iter()
        .find(|v| v.field == "extend")
        .expect("an extension asked for")
        .description;
    assert!(
        reason.contains(&format!("{first} (nsb 1 (existing nsb 1, 5))")),
        "{reason}"
    );
    assert!(!reason.contains("nsb 19"), "{reason}");
    assert!(
        dry.explanations.iter().any(|e| e.starts_with(&format!(
            "nsb 1: 4 file(s) of this identity in the catalog ({first})"
        ))),
        "{:?}",
        dry.explanations
    );
    assert!(
        dry.explanations
            .iter()
            .any(|e| e.starts_with("nsb 19: no file of this identity in the catalog")),
        "{:?}",
        dry.explanations
    );
    // prodctl validate prints the same explanations.
    let file = app.env.work_dir.join("both.json");
    std::fs::create_dir_all(&app.env.work_dir).unwrap();
    std::fs::write(
        &file,
        json!({
            "profile": both.profile,
            "vo": both.vo,
            "parameters": serde_json::from_str::<serde_json::Value>(&both.parameters_json).unwrap(),
        })
        .to_string(),
    )
    .unwrap();
    let printed = std::process::Command::new(support::built_binary("prodctl", "prodctl"))
        .arg("--intake")
        .arg(format!(
            "http://{}",
            app.stack.addr(prodsys::Service::Intake).unwrap()
        ))
        .arg("validate")
        .arg(&file)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(
        printed
            .lines()
            .any(|l| l.starts_with("why          nsb 19: no file of this identity in the catalog")),
        "{printed}"
    );
    let refused = app
        .decided(&app.submit(both.clone()).await.unwrap().request_id)
        .await;
    assert_eq!(refused.state(), pb::RequestState::Rejected, "{refused:?}");
    assert!(
        refused
            .violations
            .iter()
            .any(|v| v.description.contains(&first) && v.description.contains("nsb 1")),
        "{:?}",
        refused.violations
    );
    // As an extension it is fine, with runs after those the catalog holds.
    let dry = app
        .validate(pb::SubmitRequestRequest {
            extend: true,
            ..both
        })
        .await;
    assert!(dry.acceptable, "{dry:?}");
    assert_eq!(dry.plan.unwrap().first_run, 5);

    // NSB 19 alone: a new simulation.
    let dark_moon = cta_with(|p| p["nsb_levels"] = json!([19]));
    let dry = app.validate(dark_moon.clone()).await;
    assert!(dry.acceptable, "{dry:?}");
    assert!(dry.overlaps.is_empty(), "{:?}", dry.overlaps);
    assert!(
        dry.explanations
            .iter()
            .any(|e| e.starts_with("nsb 19: no file")
                && e.contains(&format!("files of the same kind ({first}) differ in nsb"))),
        "{:?}",
        dry.explanations
    );
    let nsb19 = app.accepted(dark_moon).await;
    assert_ne!(nsb19, first);
    // Known before any of its files is catalogued: NSB 5 and 19 overlap
    // both productions, each on its own level.
    let dry = app
        .validate(cta_with(|p| p["nsb_levels"] = json!([5, 19])))
        .await;
    assert!(!dry.acceptable, "{dry:?}");
    let overlaps: Vec<(&str, &str)> = dry
        .overlaps
        .iter()
        .map(|o| (o.production_id.as_str(), o.description.as_str()))
        .collect();
    assert_eq!(
        overlaps,
        [
            (first.as_str(), "nsb 5 (existing nsb 1, 5)"),
            (nsb19.as_str(), "nsb 19 (existing nsb 19)")
        ]
    );

    // Another sim_telarray version: a new simulation, and the answer says
    // which key tells it apart.
    let other_version = cta_with(|p| p["software"]["sim_telarray"] = json!("2025-06-01"));
    let dry = app.validate(other_version.clone()).await;
    assert!(dry.acceptable, "{dry:?}");
    assert!(dry.overlaps.is_empty(), "{:?}", dry.overlaps);
    assert!(
        dry.explanations
            .iter()
            .any(|e| e.starts_with("nsb 1: no file")
                && e.contains("files of the same kind (")
                && e.contains(&first)
                && e.contains("tel_sim_prog_version")),
        "{:?}",
        dry.explanations
    );
    let version = app.accepted(other_version).await;
    assert!(![&first, &nsb19].contains(&&version));

    // The exact repeat is still refused, naming the production.
    let again = app
        .decided(&app.submit(cta_example()).await.unwrap().request_id)
        .await;
    assert_eq!(again.state(), pb::RequestState::Rejected);
    assert_eq!(again.existing_production_id, first);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_registered_from_elsewhere_are_compared_with_the_same_keys() {
    let app = spawn_app_with(|env| {
        use_km3net_templates(env);
    })
    .await;
    let mut catalog = app.catalog.clone();

    // KM3NeT: CC then NC of the same flavour are two productions.
    let cc = app.accepted(km3net_with(|_| {})).await;
    let nc = app
        .accepted(km3net_with(|p| p["interaction"] = json!("NC")))
        .await;
    assert_ne!(cc, nc);

    // nu_e CC outputs catalogued elsewhere, runs 7 and 8.
    let km3net = |run: &str| {
        registered(
            &format!("/km3net.org/simulation/ORCA10/gSeaGen/elsewhere/{run}/nue_cc.root"),
            "",
            &[
                ("detector", "ORCA10"),
                ("generator", "gSeaGen"),
                ("flavour", "nu_e"),
                ("interaction", "CC"),
                ("energy_min_gev", "1"),
                ("energy_max_gev", "10000"),
                ("spectral_index", "-2"),
                ("container_image", "docker://km3net/gseagen:7.4.1"),
                ("template", "gseagen-7.4.1"),
                ("run_number", run),
            ],
        )
    };
    // A value not of its key's type is refused by field.
    let status = catalog
        .register_files(pb::RegisterFilesRequest {
            files: vec![km3net("seven")],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["files[0].metadata.run_number"]);
    let added = catalog
        .register_files(pb::RegisterFilesRequest {
            files: vec![km3net("7"), km3net("8")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(added.registered, 2);

    let nu_e = |interaction: &'static str| {
        km3net_with(move |p| {
            p["flavour"] = json!("nu_e");
            p["interaction"] = json!(interaction);
            p.as_object_mut().unwrap().remove("derived_template");
        })
    };
    let dry = app.validate(nu_e("CC")).await;
    assert!(!dry.acceptable, "{dry:?}");
    let reason = &dry.violations[0].description;
    assert!(
        reason.contains(
            "already exist in the catalog: 2 file(s), 2000 bytes (registered from elsewhere)"
        ),
        "{reason}"
    );
    let dry = app.validate(nu_e("NC")).await;
    assert!(dry.acceptable, "{dry:?}");
    assert!(
        dry.explanations
            .iter()
            .any(|e| e.contains("(registered from elsewhere) differ in interaction")),
        "{:?}",
        dry.explanations
    );
    // More of the same: an extension, numbered after the runs held elsewhere.
    let dry = app
        .validate(pb::SubmitRequestRequest {
            extend: true,
            ..nu_e("CC")
        })
        .await;
    assert!(dry.acceptable, "{dry:?}");
    assert_eq!(dry.plan.unwrap().first_run, 9);
    // A disjoint energy range is another simulation.
    let higher = km3net_with(|p| {
        p["flavour"] = json!("nu_e");
        p["energy_min_gev"] = json!(10000);
        p["energy_max_gev"] = json!(100000);
        p.as_object_mut().unwrap().remove("derived_template");
    });
    let dry = app.validate(higher).await;
    assert!(dry.acceptable, "{dry:?}");
    assert!(
        dry.explanations
            .iter()
            .any(|e| e.contains("differ in energy_min_gev..energy_max_gev")),
        "{:?}",
        dry.explanations
    );

    // CTA: NSB 19 files from elsewhere with all their keys.
    let cta = |run: &str| {
        registered(
            &format!("/vo.cta.in2p3.fr/MC/PROD6/LaPalma/gamma/elsewhere/run{run}_nsb19.simtel"),
            "",
            &[
                ("array_layout", "Prod6-Hyperarray"),
                ("site", "LaPalma"),
                ("particle", "gamma"),
                ("phiP", "180.0"),
                ("thetaP", "20"),
                ("MCCampaign", "PROD6"),
                ("nsb", "19"),
                ("energy_min", "0.003"),
                ("energy_max", "330"),
                ("spectral_index", "-2.0"),
                ("viewcone", "0"),
                ("tel_sim_prog", "sim_telarray"),
                ("tel_sim_prog_version", "2024-02-05"),
                ("corsika_version", "7.7550"),
                ("data_level", "DL0"),
                ("run_number", run),
            ],
        )
    };
    catalog
        .register_files(pb::RegisterFilesRequest {
            files: vec![cta("1"), cta("2"), cta("3")],
        })
        .await
        .unwrap();
    // NSB 1 and 5 are new; NSB 19 is what is held elsewhere.
    let dry = app.validate(cta_example()).await;
    assert!(dry.acceptable, "{dry:?}");
    let dry = app
        .validate(cta_with(|p| p["nsb_levels"] = json!([5, 19])))
        .await;
    assert!(!dry.acceptable, "{dry:?}");
    let reason = &dry.violations[0].description;
    assert!(
        reason.contains("3 file(s), 3000 bytes (registered from elsewhere) for nsb 19"),
        "{reason}"
    );
    assert!(!reason.contains("nsb 5"), "{reason}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn find_files_answers_typed_conditions_in_pages_and_as_a_stream() {
    let app = spawn_app().await;
    let mut catalog = app.catalog.clone();
    // Eight files: NSB 1 and 5 of runs 1 to 4, zenith 20.
    let first = app.run_and_catalogue(cta_example()).await;
    // Three more: two protons from elsewhere (runs 9 and 10), one file of
    // another production.
    let proton = |run: &str| {
        registered(
            &format!("/vo.cta.in2p3.fr/MC/PROD5/Paranal/proton/run{run}.simtel"),
            "",
            &[
                ("site", "Paranal"),
                ("particle", "proton"),
                ("thetaP", "40.0"),
                ("nsb", "19"),
                ("run_number", run),
                ("energy_min", "0.01"),
            ],
        )
    };
    let older = registered(
        "/vo.cta.in2p3.fr/MC/PROD5/LaPalma/gamma/CTA-000900/run3.simtel",
        "CTA-000900",
        &[
            ("site", "LaPalma"),
            ("particle", "gamma"),
            ("thetaP", "52.5"),
            ("nsb", "5"),
            ("run_number", "3"),
            ("energy_min", "0.003"),
            ("dataset", "PROD5_LaPalma_gamma_CTA-000900"),
        ],
    );
    catalog
        .register_files(pb::RegisterFilesRequest {
            files: vec![proton("9"), proton("10"), older],
        })
        .await
        .unwrap();

    let find = |conditions: Vec<pb::MetadataCondition>| pb::FindFilesRequest {
        conditions,
        ..Default::default()
    };
    let count = |query: pb::FindFilesRequest| {
        let app = &app;
        async move { app.find_all(query).await.unwrap().len() }
    };
    let one = |key: &str, op: Op, value: &str| find(vec![condition(key, op, &[value])]);
    // Integers.
    assert_eq!(count(one("nsb", Op::Eq, "5")).await, 5);
    assert_eq!(count(one("nsb", Op::Ne, "5")).await, 6);
    assert_eq!(
        count(find(vec![condition("nsb", Op::In, &["1", "19"])])).await,
        6
    );
    // Numbers compare as numbers: 10 > 9 (as text "10" < "9").
    assert_eq!(count(one("run_number", Op::Ge, "9")).await, 2);
    assert_eq!(
        count(find(vec![
            condition("run_number", Op::Gt, &["2"]),
            condition("run_number", Op::Le, &["4"]),
        ]))
        .await,
        5
    );
    // Floats, registered as "40.0", found as 40.
    assert_eq!(count(one("thetaP", Op::Eq, "40")).await, 2);
    assert_eq!(count(one("thetaP", Op::Ge, "40")).await, 3);
    assert_eq!(count(one("thetaP", Op::Gt, "40")).await, 1);
    assert_eq!(count(one("thetaP", Op::Lt, "40")).await, 8);
    assert_eq!(count(one("thetaP", Op::Le, "40")).await, 10);
    assert_eq!(count(one("energy_min", Op::Lt, "0.005")).await, 9);
    assert_eq!(count(one("energy_min", Op::Ge, "1e-2")).await, 2);
    // Strings.
    assert_eq!(count(one("particle", Op::Eq, "proton")).await, 2);
    assert_eq!(count(one("site", Op::Ne, "LaPalma")).await, 2);
    assert_eq!(
        count(find(vec![condition(
            "particle",
            Op::In,
            &["gamma", "proton"]
        )]))
        .await,
        11
    );
    // Production, LFN prefix, dataset, and the equality map, with conditions.
    assert_eq!(
        count(pb::FindFilesRequest {
            production_id: first.clone(),
            conditions: vec![condition("nsb", Op::Eq, &["1"])],
            ..Default::default()
        })
        .await,
        4
    );
    assert_eq!(
        count(pb::FindFilesRequest {
            production_id: "CTA-000900".into(),
            ..Default::default()
        })
        .await,
        1
    );
    assert_eq!(
        count(pb::FindFilesRequest {
            lfn_prefix: "/vo.cta.in2p3.fr/MC/PROD5/".into(),
            ..Default::default()
        })
        .await,
        3
    );
    assert_eq!(
        count(pb::FindFilesRequest {
            dataset: format!("PROD6_LaPalma_gamma_{first}"),
            ..Default::default()
        })
        .await,
        8
    );
    assert_eq!(
        count(pb::FindFilesRequest {
            metadata: metadata(&[("thetaP", "20.0")]),
            ..Default::default()
        })
        .await,
        8
    );

    // Paging: every file once, in LFN order.
    let everything = pb::FindFilesRequest {
        lfn_prefix: "/".into(),
        page_size: 3,
        ..Default::default()
    };
    let first_page = catalog
        .find_files(everything.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first_page.files.len(), 3);
    assert_eq!(first_page.next_page_token, first_page.files[2].lfn);
    let paged: Vec<String> = app
        .find_all(everything.clone())
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.lfn)
        .collect();
    assert_eq!(paged.len(), 11);
    let mut sorted = paged.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, paged);

    // Through classes (what files share): a production's NSB levels are
    // two classes whose files interleave in LFN order, and pages of three
    // still give them in order, each once.
    let lfns = |files: Vec<pb::OutputFile>| files.into_iter().map(|f| f.lfn).collect::<Vec<_>>();
    let by_production = lfns(
        app.find_all(pb::FindFilesRequest {
            production_id: first.clone(),
            page_size: 3,
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    assert_eq!(by_production.len(), 8);
    assert!(
        by_production.windows(2).all(|w| w[0] < w[1]),
        "{by_production:?}"
    );
    let gammas_and_protons = pb::FindFilesRequest {
        conditions: vec![condition("particle", Op::In, &["gamma", "proton"])],
        page_size: 2,
        ..Default::default()
    };
    assert_eq!(
        lfns(app.find_all(gammas_and_protons.clone()).await.unwrap()),
        paged
    );
    let mut stream = catalog
        .stream_files(gammas_and_protons)
        .await
        .unwrap()
        .into_inner();
    let mut streamed_in_order = Vec::new();
    while let Some(page) = stream.message().await.unwrap() {
        streamed_in_order.extend(lfns(page.files));
    }
    assert_eq!(streamed_in_order, paged);
    // A condition on what files share and one on each file's own run.
    assert_eq!(
        count(find(vec![
            condition("particle", Op::Eq, &["gamma"]),
            condition("run_number", Op::Ge, &["3"]),
        ]))
        .await,
        5
    );

    // The stream: the same files, a page per message.
    let mut stream = catalog
        .stream_files(pb::FindFilesRequest {
            page_size: 4,
            ..everything
        })
        .await
        .unwrap()
        .into_inner();
    let mut messages = Vec::new();
    while let Some(page) = stream.message().await.unwrap() {
        messages.push(page.files.len());
        for f in page.files {
            assert!(paged.contains(&f.lfn));
            if f.lfn.contains("run9.simtel") {
                assert_eq!(f.metadata["thetaP"], "40");
                assert_eq!(f.metadata["run_number"], "9");
            }
        }
    }
    assert_eq!(messages, [4, 4, 3]);
    let mut stream = catalog
        .stream_files(one("nsb", Op::Eq, "5"))
        .await
        .unwrap()
        .into_inner();
    let mut streamed = BTreeSet::new();
    while let Some(page) = stream.message().await.unwrap() {
        streamed.extend(page.files.into_iter().map(|f| f.lfn));
    }
    assert_eq!(streamed.len(), 5);

    // More classes than one read of classes takes (32): forty files from
    // elsewhere, of 36 energies (a class each), LFNs in the reverse order of
    // registration.
    let many: Vec<pb::OutputFile> = (0..40)
        .map(|i| {
            registered(
                &format!("/vo.cta.in2p3.fr/MC/MANY/helium/run{:03}.simtel", 99 - i),
                "",
                &[
                    ("site", "Paranal"),
                    ("particle", "helium"),
                    ("energy_min", &format!("0.{}", i + 1)),
                    ("run_number", &(99 - i).to_string()),
                ],
            )
        })
        .collect();
    catalog
        .register_files(pb::RegisterFilesRequest { files: many })
        .await
        .unwrap();
    let heliums = pb::FindFilesRequest {
        conditions: vec![condition("particle", Op::Eq, &["helium"])],
        page_size: 7,
        ..Default::default()
    };
    let paged_heliums = lfns(app.find_all(heliums.clone()).await.unwrap());
    let mut expected: Vec<String> = (60..100)
        .map(|run| format!("/vo.cta.in2p3.fr/MC/MANY/helium/run{run:03}.simtel"))
        .collect();
    expected.sort();
    assert_eq!(paged_heliums, expected);
    let mut stream = catalog
        .stream_files(heliums.clone())
        .await
        .unwrap()
        .into_inner();
    let mut streamed_heliums = Vec::new();
    while let Some(page) = stream.message().await.unwrap() {
        streamed_heliums.extend(lfns(page.files));
    }
    assert_eq!(streamed_heliums, expected);

    // Asked by class, each file carries only its own keys and names its
    // class; each class comes once in a stream; together they are the
    // whole metadata of the answer asked plainly.
    let whole: HashMap<String, HashMap<String, String>> = app
        .find_all(heliums.clone())
        .await
        .unwrap()
        .into_iter()
        .map(|f| (f.lfn, f.metadata))
        .collect();
    let by_class = pb::FindFilesRequest {
        metadata_by_class: true,
        ..heliums.clone()
    };
    let mut stream = catalog
        .stream_files(by_class.clone())
        .await
        .unwrap()
        .into_inner();
    let (mut classes, mut sent_twice) = (HashMap::new(), Vec::new());
    let mut merged = HashMap::new();
    while let Some(page) = stream.message().await.unwrap() {
        for class in page.classes {
            if classes.insert(class.class_id, class.metadata).is_some() {
                sent_twice.push(class.class_id);
            }
        }
        assert!(page.replicas.is_empty(), "nothing was forwarded");
        for f in page.files {
            assert_eq!(
                f.metadata.keys().collect::<Vec<_>>(),
                ["run_number"],
                "{f:?}"
            );
            let mut metadata = classes
                .get(&f.class_id)
                .cloned()
                .unwrap_or_else(|| panic!("class {} named before it came", f.class_id));
            metadata.extend(f.metadata);
            merged.insert(f.lfn, metadata);
        }
    }
    assert!(sent_twice.is_empty(), "{sent_twice:?}");
    // A class per energy (0.1 and 0.10 are one number).
    let energies: BTreeSet<String> = whole
        .values()
        .map(|m| m["energy_min"].parse::<f64>().unwrap().to_string())
        .collect();
    assert_eq!(classes.len(), energies.len());
    assert!(classes.len() > 32, "{}", classes.len());
    assert_eq!(merged, whole);
    // A page names every class of its files.
    let page = catalog.find_files(by_class).await.unwrap().into_inner();
    assert_eq!(page.files.len(), 7);
    let named: BTreeSet<u64> = page.classes.iter().map(|c| c.class_id).collect();
    let used: BTreeSet<u64> = page.files.iter().map(|f| f.class_id).collect();
    assert_eq!(named, used);

    // An unknown key or a value of the wrong type is a field violation.
    let refused = |query: pb::FindFilesRequest| {
        let mut catalog = catalog.clone();
        async move {
            let status = catalog.find_files(query).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            violated_fields(&status)
        }
    };
    assert_eq!(
        refused(one("colour", Op::Eq, "blue")).await,
        ["conditions[0].key"]
    );
    assert_eq!(
        refused(one("nsb", Op::Eq, "five")).await,
        ["conditions[0].values"]
    );
    assert_eq!(
        refused(one("thetaP", Op::Ge, "steep")).await,
        ["conditions[0].values"]
    );
    assert_eq!(
        refused(find(vec![condition("nsb", Op::In, &["1", "x"])])).await,
        ["conditions[0].values[1]"]
    );
    assert_eq!(
        refused(find(vec![condition("nsb", Op::Eq, &["1", "5"])])).await,
        ["conditions[0].values"]
    );
    assert_eq!(
        refused(find(vec![condition("nsb", Op::Unspecified, &["1"])])).await,
        ["conditions[0].operator"]
    );
    assert_eq!(
        refused(pb::FindFilesRequest {
            metadata: metadata(&[("colour", "blue")]),
            ..Default::default()
        })
        .await,
        ["metadata.colour"]
    );
    assert_eq!(
        refused(pb::FindFilesRequest::default()).await,
        ["production_id"]
    );
    let status = catalog
        .stream_files(one("run_number", Op::Lt, "3.5"))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["conditions[0].values"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_classed_before_their_run_key_was_known_are_moved_at_start() {
    let app = spawn_app().await;
    let legacy = |run: &str| {
        registered(
            &format!("/vo.cta.in2p3.fr/MC/LEGACY/proton/run{run}.simtel"),
            "",
            &[
                ("site", "Paranal"),
                ("particle", "proton"),
                ("run_number", run),
            ],
        )
    };
    app.catalog
        .clone()
        .register_files(pb::RegisterFilesRequest {
            files: vec![legacy("1"), legacy("2")],
        })
        .await
        .unwrap();
    // As a catalog kept them whose profiles did not call run_number a run
    // key: each file a class of its own, its run among what it shares.
    let db = app.env.db().await.unwrap();
    db.batch_execute(
        "WITH legacy AS (
             INSERT INTO catalog.file_classes (production_id, metadata, file_count, total_bytes,
                                               first_lfns, min_lfn, max_lfn)
             SELECT production_id, metadata, 1, size, ARRAY[lfn], lfn, lfn FROM catalog.files
             WHERE starts_with(lfn, '/vo.cta.in2p3.fr/MC/LEGACY/')
             RETURNING class_id, min_lfn)
         UPDATE catalog.files f SET class_id = l.class_id, own = '{}'
         FROM legacy l WHERE f.lfn = l.min_lfn;
         DELETE FROM catalog.file_classes c
         WHERE NOT EXISTS (SELECT 1 FROM catalog.files f WHERE f.class_id = c.class_id);",
    )
    .await
    .unwrap();
    let run_one = || pb::FindFilesRequest {
        conditions: vec![
            condition("particle", Op::Eq, &["proton"]),
            condition("run_number", Op::Eq, &["1"]),
        ],
        ..Default::default()
    };
    // The run is asked of each file's own values, where these lack it.
    assert!(app.find_all(run_one()).await.unwrap().is_empty());

    let app = app.restart().await;
    let found = app.find_all(run_one()).await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].metadata["run_number"], "1");
    assert_eq!(found[0].metadata["site"], "Paranal");
    let classes: Vec<(i64, i64, Option<i64>)> = db
        .query(
            "SELECT c.file_count, c.total_bytes, c.max_run FROM catalog.file_classes c
             WHERE c.class_id IN (SELECT class_id FROM catalog.files
                                  WHERE starts_with(lfn, '/vo.cta.in2p3.fr/MC/LEGACY/'))",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    // One class again, with its figures.
    assert_eq!(classes, [(2, 2000, Some(2))]);
    app.stop().await;
}
