//! `prodsys-fuzz [--inputs N] [--seed S]`: a fuzz-style run of every decoder
//! that takes outside bytes — protobuf requests, CloudEvents from the ingest
//! exchange, profile files and request JSON — with N inputs each (10^6 by
//! default): random bytes and random edits of valid inputs. Counts, per
//! decoder, the inputs taken, refused and the panics (caught); exits 1 on
//! any panic. Not part of CI (minutes in a release build):
//!
//! ```sh
//! cargo run --release -p prodsys-bench --bin prodsys-fuzz -- --inputs 1000000
//! ```

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::Instant;

use prodsys_core::{Profile, ProfileSet};
use prodsys_intake::{domain, ingest};
use prodsys_messaging::Incoming;
use prodsys_messaging::lapin::types::{AMQPValue, FieldTable, LongString};
use prodsys_proto as pb;
use prost::Message;

/// xorshift64*: reproducible from its seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Tokens that tend to reach deeper into a JSON or protobuf decoder.
const TOKENS: &[&[u8]] = &[
    b"\\u0000",
    b"\0",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b",",
    b":",
    b"null",
    b"true",
    b"-1",
    b"1e999",
    b"18446744073709551616",
    b"\xff\xfe",
    b"\\",
    b"\"\":{}",
    b"\x0a\x05hello",
    b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
];

/// `valid` with a few random edits: overwrite, insert, delete, insert a
/// token, truncate or duplicate a slice.
fn mutate(rng: &mut Rng, valid: &[u8]) -> Vec<u8> {
    let mut bytes = valid.to_vec();
    for _ in 0..1 + rng.below(6) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(6) {
            0 if at < bytes.len() => bytes[at] = rng.next() as u8,
            1 => bytes.insert(at, rng.next() as u8),
            2 if at < bytes.len() => {
                let end = (at + 1 + rng.below(16)).min(bytes.len());
                bytes.drain(at..end);
            }
            3 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                bytes.splice(at..at, token.iter().copied());
            }
            4 => bytes.truncate(at),
            _ if at < bytes.len() => {
                let end = (at + 1 + rng.below(32)).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                bytes.splice(at..at, copy);
            }
            _ => bytes.push(rng.next() as u8),
        }
    }
    bytes
}

#[derive(Default)]
struct Counts {
    inputs: u64,
    taken: u64,
    refused: u64,
    panics: u64,
}

/// Runs `decode` on `n` inputs from `make`; a panic is caught and counted.
fn run(
    name: &str,
    n: u64,
    rng: &mut Rng,
    mut make: impl FnMut(&mut Rng) -> Vec<u8>,
    decode: impl Fn(&[u8]) -> bool,
) -> Counts {
    let started = Instant::now();
    let mut counts = Counts::default();
    for _ in 0..n {
        let input = make(rng);
        counts.inputs += 1;
        match catch_unwind(AssertUnwindSafe(|| decode(&input))) {
            Ok(true) => counts.taken += 1,
            Ok(false) => counts.refused += 1,
            Err(_) => {
                counts.panics += 1;
                eprintln!(
                    "{name}: panic on input {:?}",
                    String::from_utf8_lossy(&input)
                );
            }
        }
    }
    println!(
        "{name}: {} inputs, {} taken, {} refused, {} panics ({:.1} s)",
        counts.inputs,
        counts.taken,
        counts.refused,
        counts.panics,
        started.elapsed().as_secs_f64()
    );
    counts
}

/// A CloudEvent delivery: structured mode (`s` + body) or binary mode
/// (anything else + body, with the attributes in headers).
fn delivery(bytes: &[u8]) -> Incoming {
    let (structured, body) = match bytes.split_first() {
        Some((b's', rest)) => (true, rest.to_vec()),
        Some((_, rest)) => (false, rest.to_vec()),
        None => (false, Vec::new()),
    };
    let mut headers = FieldTable::default();
    if !structured {
        for (k, v) in [
            ("cloudEvents_id", "e-2"),
            ("cloudEvents_source", "/esap"),
            ("cloudEvents_specversion", "1.0"),
            ("cloudEvents_type", ingest::SUBMIT_TYPE),
        ] {
            headers.insert(
                k.into(),
                AMQPValue::LongString(LongString::from(v.as_bytes().to_vec())),
            );
        }
    }
    let content_type = if structured {
        ingest::CONTENT_TYPE_STRUCTURED
    } else {
        "application/json"
    };
    Incoming {
        delivery_tag: 1,
        exchange: "prodsys.ingest".into(),
        routing_key: ingest::SUBMIT_TYPE.into(),
        redelivered: false,
        message_id: None,
        content_type: Some(content_type.into()),
        reply_to: Some("amq.gen-1".into()),
        user_id: None,
        headers,
        body,
        event: Err("fuzz".into()),
    }
}

fn main() -> anyhow::Result<()> {
    let mut inputs: u64 = 1_000_000;
    let mut seed: u64 = 0x5eed_2026;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--inputs" => inputs = args.next().unwrap_or_default().parse()?,
            "--seed" => seed = args.next().unwrap_or_default().parse()?,
            other => anyhow::bail!("unknown argument {other:?} (--inputs N, --seed S)"),
        }
    }
    // Panics are counted, not printed by the default hook a million times.
    std::panic::set_hook(Box::new(|_| {}));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let profiles =
        ProfileSet::load_dir(&root.join("profiles"))?.with_periods(&root.join("periods"))?;
    let example: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        root.join("examples/cta-irf-mc.json"),
    )?)?;
    let mut rng = Rng(seed | 1);
    println!("prodsys-fuzz: {inputs} inputs per decoder, seed {seed}");

    // 1. Protobuf requests (SubmitRequest as intake takes it, at the door).
    let request = pb::SubmitRequestRequest {
        profile: "cta-irf-mc".into(),
        vo: "vo.cta.in2p3.fr".into(),
        parameters_json: example["parameters"].to_string(),
        idempotency_key: "key-1".into(),
        forward: vec!["tape".into()],
        ..Default::default()
    }
    .encode_to_vec();
    let protobuf = run(
        "protobuf requests",
        inputs,
        &mut rng,
        |rng| match rng.below(2) {
            0 => rng.bytes(256),
            _ => mutate(rng, &request),
        },
        |bytes| match pb::SubmitRequestRequest::decode(bytes) {
            Ok(r) => {
                prodsys_server::input::violations(&r).is_empty()
                    && domain::check_proposal(
                        &profiles,
                        &domain::Proposal {
                            profile: &r.profile,
                            vo: &r.vo,
                            parameters_json: &r.parameters_json,
                            backend: &r.backend,
                            submitter: &r.submitter,
                            priority: r.priority,
                            idempotency_key: &r.idempotency_key,
                            forward: &r.forward,
                        },
                    )
                    .is_ok()
            }
            Err(_) => false,
        },
    );

    // 2. CloudEvents on the ingest exchange (structured and binary mode).
    let data = serde_json::json!({
        "profile": example["profile"], "vo": example["vo"], "parameters": example["parameters"],
    });
    let event = serde_json::json!({
        "specversion": "1.0", "id": "e-1", "source": "/esap", "type": ingest::SUBMIT_TYPE,
        "data": data,
    })
    .to_string()
    .into_bytes();
    let data = data.to_string().into_bytes();
    let policy = ingest::Policy::from_settings(&Default::default());
    let cloudevents = run(
        "CloudEvents",
        inputs,
        &mut rng,
        |rng| match rng.below(3) {
            0 => rng.bytes(256),
            1 => [b"s".as_slice(), &mutate(rng, &event)].concat(),
            _ => [b"b".as_slice(), &mutate(rng, &data)].concat(),
        },
        |bytes| {
            ingest::parse(&delivery(bytes), &profiles, &policy)
                .is_ok_and(|s| s.violations.is_empty())
        },
    );

    // 3. Profile files.
    let profile_file = std::fs::read(root.join("profiles/cta-irf-mc.json"))?;
    let profile_files = run(
        "profile files",
        inputs,
        &mut rng,
        |rng| match rng.below(4) {
            0 => rng.bytes(256),
            _ => mutate(rng, &profile_file),
        },
        |bytes| {
            let text = String::from_utf8_lossy(bytes);
            Profile::from_json(Path::new("fuzz.json"), &text).is_ok()
        },
    );

    // 4. Request JSON (parameters checked against the profile).
    let parameters = example["parameters"].to_string().into_bytes();
    let request_json = run(
        "request JSON",
        inputs,
        &mut rng,
        |rng| match rng.below(4) {
            0 => rng.bytes(128),
            _ => mutate(rng, &parameters),
        },
        |bytes| {
            let text = String::from_utf8_lossy(bytes);
            profiles
                .validate_request("cta-irf-mc", "vo.cta.in2p3.fr", &text)
                .is_ok()
        },
    );

    let panics = protobuf.panics + cloudevents.panics + profile_files.panics + request_json.panics;
    println!("total panics: {panics}");
    if panics > 0 {
        std::process::exit(1);
    }
    Ok(())
}
