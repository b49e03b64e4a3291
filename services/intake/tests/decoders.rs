//! Property tests of intake's decoders of outside bytes: protobuf requests,
//! CloudEvents from the ingest exchange, and request JSON. Whatever comes
//! in, each answers (a value or a refusal) and never panics.

use prodsys_core::ProfileSet;
use prodsys_intake::{domain, ingest};
use prodsys_messaging::Incoming;
use prodsys_messaging::lapin::types::{AMQPValue, FieldTable, LongString};
use prodsys_proto as pb;
use proptest::prelude::*;
use prost::Message;
use serde_json::Value;

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn profiles() -> &'static ProfileSet {
    static SET: std::sync::OnceLock<ProfileSet> = std::sync::OnceLock::new();
    SET.get_or_init(|| {
        ProfileSet::load_dir(&root().join("profiles"))
            .unwrap()
            .with_periods(&root().join("periods"))
            .unwrap()
    })
}

fn example() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("examples/cta-irf-mc.json")).unwrap())
        .unwrap()
}

/// Any JSON value, a few levels deep.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `bytes` with each (position, byte, kind) edit applied: overwrite, insert, delete.
fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(at, byte, kind) in edits {
        let at = if bytes.is_empty() {
            0
        } else {
            at % (bytes.len() + 1)
        };
        match kind % 3 {
            0 if at < bytes.len() => bytes[at] = byte,
            1 => bytes.insert(at, byte),
            _ if at < bytes.len() => {
                bytes.remove(at);
            }
            _ => bytes.push(byte),
        }
    }
    bytes
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..12)
}

fn incoming(
    body: Vec<u8>,
    structured: bool,
    headers: FieldTable,
    reply_to: Option<String>,
) -> Incoming {
    Incoming {
        delivery_tag: 1,
        exchange: "prodsys.ingest".into(),
        routing_key: ingest::SUBMIT_TYPE.into(),
        redelivered: false,
        message_id: None,
        content_type: Some(
            if structured {
                ingest::CONTENT_TYPE_STRUCTURED
            } else {
                "application/json"
            }
            .into(),
        ),
        reply_to,
        user_id: None,
        headers,
        body,
        event: Err("not binary".into()),
    }
}

/// A gRPC request as decoded and checked at the door.
fn take_request(bytes: &[u8]) {
    if let Ok(request) = pb::SubmitRequestRequest::decode(bytes) {
        let _ = prodsys_server::input::violations(&request);
        let _ = domain::check_proposal(
            profiles(),
            &domain::Proposal {
                profile: &request.profile,
                vo: &request.vo,
                parameters_json: &request.parameters_json,
                backend: &request.backend,
                submitter: &request.submitter,
                priority: request.priority,
                idempotency_key: &request.idempotency_key,
                forward: &request.forward,
            },
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_bytes_as_a_grpc_request(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        take_request(&bytes);
        let _ = pb::FindFilesRequest::decode(bytes.as_slice());
        let _ = pb::RequestAccepted::decode(bytes.as_slice());
    }

    #[test]
    fn a_grpc_request_with_edits(edits in edits()) {
        let e = example();
        let request = pb::SubmitRequestRequest {
            profile: e["profile"].as_str().unwrap().into(),
            vo: e["vo"].as_str().unwrap().into(),
            parameters_json: e["parameters"].to_string(),
            idempotency_key: "key-1".into(),
            forward: vec!["tape".into()],
            ..Default::default()
        };
        take_request(&mutate(request.encode_to_vec(), &edits));
    }

    #[test]
    fn any_json_as_a_requests_parameters(parameters in json(), vo in ".{0,20}") {
        let text = parameters.to_string();
        for profile in ["cta-irf-mc", "km3net-container-sim", "cta-dl1", "none"] {
            let _ = profiles().validate_request(profile, &vo, &text);
        }
        let mut found = Vec::new();
        domain::check_storable("parameters", &parameters, &mut found);
    }

    #[test]
    fn a_requests_json_with_edits(edits in edits()) {
        let text = mutate(example()["parameters"].to_string().into_bytes(), &edits);
        if let Ok(text) = String::from_utf8(text) {
            let _ = profiles().validate_request("cta-irf-mc", "vo.cta.in2p3.fr", &text);
        }
    }

    #[test]
    fn any_cloudevent(
        body in prop::collection::vec(any::<u8>(), 0..512),
        structured in any::<bool>(),
        headers in prop::collection::btree_map("cloudEvents[_:](id|source|type|specversion)", ".{0,40}", 0..5),
        reply_to in proptest::option::of(".{0,40}"),
    ) {
        let mut table = FieldTable::default();
        for (k, v) in headers {
            table.insert(k.as_str().into(), AMQPValue::LongString(LongString::from(v.into_bytes())));
        }
        let _ = ingest::parse(&incoming(body, structured, table, reply_to), profiles(), &ingest::Policy::default());
    }

    #[test]
    fn a_cloudevent_with_edits(edits in edits(), data in json()) {
        let valid = serde_json::json!({
            "specversion": "1.0", "id": "e-1", "source": "/esap", "type": ingest::SUBMIT_TYPE,
            "data": { "profile": "cta-irf-mc", "vo": "vo.cta.in2p3.fr", "parameters": example()["parameters"] },
        });
        let policy = ingest::Policy::from_settings(&Default::default());
        let body = mutate(valid.to_string().into_bytes(), &edits);
        let _ = ingest::parse(&incoming(body, true, FieldTable::default(), None), profiles(), &policy);
        let mut other = valid.clone();
        other["data"] = data;
        let body = other.to_string().into_bytes();
        let _ = ingest::parse(&incoming(body, true, FieldTable::default(), Some("amq.gen-1".into())), profiles(), &policy);
    }
}
