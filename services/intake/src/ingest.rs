//! Requests from other ESFRI systems, as CloudEvents on `prodsys.ingest`:
//! structured mode (`application/cloudevents+json`, the whole event in the
//! body) or binary mode (attributes in `cloudEvents_*` / `cloudEvents:*`
//! headers, the JSON data as body). Type `org.prodsys.request.submit.v1`.
//!
//! The event's `source` + `id` is the idempotency key. An event that cannot
//! be a request at all (bad JSON, missing attributes, unknown type or profile,
//! oversized) is dead-lettered with the reason; a request whose parameters are
//! wrong is stored as REJECTED and answered. Answers go to the event's AMQP
//! `reply_to` queue as JSON CloudEvents, and the usual `request.accepted` /
//! `request.rejected` events carry the original event id as correlation.
//!
//! With tokens on, an event is a caller like a gRPC call: its `authorization`
//! application header (`Bearer <JWT>`) is checked as a call's token is (the
//! scope `compute.create`, the VO among the token's, the submitter its
//! subject), or, without a token, its broker user must be mapped to the
//! request's VO (`intake.broker_users`). An event refused so is stored
//! nowhere: it is dead-lettered with the reason, answered on `reply_to`.

use std::collections::BTreeMap;

use prodsys_core::{ProfileSet, Violation};
use prodsys_messaging::Incoming;
use prodsys_messaging::envelope::header_text;
use serde::Deserialize;
use serde_json::Value;

pub const SUBMIT_TYPE: &str = "org.prodsys.request.submit.v1";
/// The largest event accepted; production parameters are small.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;
pub const CONTENT_TYPE_STRUCTURED: &str = "application/cloudevents+json";

/// The `data` of a submit event.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitData {
    pub profile: String,
    pub vo: String,
    pub parameters: Value,
    #[serde(default)]
    pub backend: String,
    #[serde(default)]
    pub submitter: String,
    #[serde(default)]
    pub extend: bool,
    /// Answer an exact duplicate with the existing production instead of refusing it.
    #[serde(default)]
    pub reuse_existing: bool,
    /// Dispatch priority (higher first), -1000..1000.
    #[serde(default)]
    pub priority: i32,
    /// Forwarding destinations besides (or, with `forward_replace`, instead
    /// of) the profile's defaults.
    #[serde(default)]
    pub forward: Vec<String>,
    #[serde(default)]
    pub forward_replace: bool,
}

/// A submit event that is a request (though its parameters may still be wrong).
#[derive(Debug)]
pub struct Submission {
    pub event_id: String,
    pub source: String,
    pub data: SubmitData,
    pub reply_to: Option<String>,
    /// What is wrong with the parameters, if anything.
    pub violations: Vec<Violation>,
    /// The publisher's broker user (AMQP `user_id`), if it said.
    pub user_id: Option<String>,
    /// The event's `authorization` header.
    pub authorization: Authorization,
    /// Who owns the request (a token's issuer and subject), once admitted by a token.
    pub owner: Option<String>,
}

/// What an event's `authorization` application header holds.
#[derive(Clone, PartialEq, Eq)]
pub enum Authorization {
    None,
    Bearer(String),
    /// Something that is not `Bearer <token>`.
    Malformed,
}

impl std::fmt::Debug for Authorization {
    // A token is a credential: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Authorization::None => "None",
            Authorization::Bearer(_) => "Bearer(..)",
            Authorization::Malformed => "Malformed",
        })
    }
}

/// The application header an event's bearer token travels in.
pub const AUTHORIZATION_HEADER: &str = "authorization";

/// The `authorization` header of `headers` (its name in any case).
pub fn authorization(headers: &prodsys_messaging::lapin::types::FieldTable) -> Authorization {
    let Some(value) = headers
        .inner()
        .iter()
        .find(|(name, _)| name.as_str().eq_ignore_ascii_case(AUTHORIZATION_HEADER))
        .map(|(_, value)| value)
    else {
        return Authorization::None;
    };
    let Some(text) = prodsys_messaging::envelope::value_text(value) else {
        return Authorization::Malformed;
    };
    match text.trim().split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Authorization::Bearer(token.trim().to_string())
        }
        _ => Authorization::Malformed,
    }
}

impl Submission {
    pub fn idempotency_key(&self) -> String {
        format!("ce:{}:{}", self.source, self.event_id)
    }
}

/// What an ingest event may ask of intake besides a request: where its
/// answer goes, and for which VOs its publisher may submit.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Queues `reply_to` may name (`*`: any run of characters).
    pub reply_to_patterns: Vec<String>,
    /// Broker users and their VOs; empty: no publisher is restricted
    /// (unless tokens are on).
    pub broker_users: BTreeMap<String, Vec<String>>,
    /// Tokens on (`auth.dev_mode = false`): an event needs a valid token or
    /// a broker user mapped to its VO.
    pub tokens: bool,
}

impl Policy {
    pub fn from_settings(settings: &prodsys_config::IntakeSettings) -> Self {
        Self {
            reply_to_patterns: settings.reply_to_patterns.clone(),
            broker_users: settings.broker_users.clone(),
            tokens: false,
        }
    }

    /// With tokens on (`auth.dev_mode = false`) when `tokens`.
    pub fn with_tokens(self, tokens: bool) -> Self {
        Self { tokens, ..self }
    }

    /// With tokens on, why an event without a token may not submit for `vo`:
    /// its broker user is not mapped to it.
    pub fn refuses_without_token(&self, user_id: Option<&str>, vo: &str) -> Option<String> {
        let user = user_id.filter(|u| !u.is_empty());
        let mapped = user
            .and_then(|u| self.broker_users.get(u))
            .is_some_and(|vos| vos.iter().any(|v| v == vo));
        if mapped {
            return None;
        }
        Some(match user {
            None => format!(
                "the event carries no bearer token (application header `{AUTHORIZATION_HEADER}: Bearer <token>`) and names no broker user (AMQP user_id) mapped to VO {vo:?}"
            ),
            Some(user) => format!(
                "the event carries no bearer token (application header `{AUTHORIZATION_HEADER}: Bearer <token>`), and its broker user {user:?} is not mapped to VO {vo:?} (intake.broker_users)"
            ),
        })
    }

    /// Why intake may not answer into `queue`, if it may not.
    pub fn refuses_reply_to(&self, queue: &str) -> Option<String> {
        if queue.len() > 255 || queue.chars().any(char::is_control) {
            return Some(format!(
                "reply_to {:?} is not a queue name",
                queue.escape_debug().to_string()
            ));
        }
        if self.reply_to_patterns.iter().any(|p| glob(p, queue)) {
            return None;
        }
        Some(format!(
            "reply_to {queue:?} matches none of the queues answers may go to ({}): declare a server-named queue for answers",
            self.reply_to_patterns.join(", ")
        ))
    }

    /// Why the event's publisher (`user_id`, checked by the broker) may
    /// not submit for `vo`, if it may not.
    pub fn refuses_vo(&self, user_id: Option<&str>, vo: &str) -> Option<Violation> {
        if self.broker_users.is_empty() {
            return None;
        }
        let Some(user) = user_id.filter(|u| !u.is_empty()) else {
            return Some(Violation::new(
                "vo",
                "the event names no broker user (AMQP user_id), and only listed broker users may submit",
            ));
        };
        match self.broker_users.get(user) {
            None => Some(Violation::new(
                "vo",
                format!("broker user {user:?} may submit for no VO"),
            )),
            Some(vos) if !vos.iter().any(|v| v == vo) => Some(Violation::new(
                "vo",
                format!(
                    "broker user {user:?} may not submit for {vo:?}; it may for: {}",
                    vos.join(", ")
                ),
            )),
            Some(_) => None,
        }
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters.
pub fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Reads a submit event; `Err` is the dead-letter reason.
pub fn parse(
    incoming: &Incoming,
    profiles: &ProfileSet,
    policy: &Policy,
) -> Result<Submission, String> {
    if incoming.body.len() > MAX_EVENT_BYTES {
        return Err(format!(
            "event of {} bytes exceeds the limit of {MAX_EVENT_BYTES} bytes",
            incoming.body.len()
        ));
    }
    let reply_to = incoming.reply_to.clone().filter(|r| !r.is_empty());
    if let Some(reason) = reply_to.as_deref().and_then(|q| policy.refuses_reply_to(q)) {
        return Err(reason);
    }
    let text =
        std::str::from_utf8(&incoming.body).map_err(|e| format!("body is not UTF-8: {e}"))?;
    let structured = incoming
        .content_type
        .as_deref()
        .is_some_and(|c| c.starts_with(CONTENT_TYPE_STRUCTURED));
    let (attributes, data) = if structured {
        let event: Value =
            serde_json::from_str(text).map_err(|e| format!("body is not JSON: {e}"))?;
        let object = event
            .as_object()
            .ok_or("a structured CloudEvent must be a JSON object")?;
        let attribute = |name: &str| object.get(name).and_then(Value::as_str).map(str::to_string);
        let data = object
            .get("data")
            .cloned()
            .ok_or("missing CloudEvents data")?;
        (
            [
                attribute("id"),
                attribute("source"),
                attribute("specversion"),
                attribute("type"),
            ],
            data,
        )
    } else {
        let attribute = |name: &str| header_text(&incoming.headers, name);
        let data: Value =
            serde_json::from_str(text).map_err(|e| format!("body is not JSON: {e}"))?;
        (
            [
                attribute("id"),
                attribute("source"),
                attribute("specversion"),
                attribute("type"),
            ],
            data,
        )
    };
    let [id, source, specversion, event_type] = attributes;
    let required = |value: Option<String>, name: &str| {
        value
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("missing CloudEvents attribute {name:?}"))
    };
    let id = required(id, "id")?;
    let source = required(source, "source")?;
    let specversion = required(specversion, "specversion")?;
    let event_type = required(event_type, "type")?;
    if specversion != "1.0" {
        return Err(format!(
            "unsupported CloudEvents specversion {specversion:?}"
        ));
    }
    if event_type != SUBMIT_TYPE {
        return Err(format!(
            "unknown event type {event_type:?}; expected {SUBMIT_TYPE}"
        ));
    }
    if id.len() > 256 || source.len() > 512 {
        return Err("CloudEvents id or source is too long".into());
    }
    if id.chars().chain(source.chars()).any(char::is_control) {
        return Err("CloudEvents id or source holds a control character".into());
    }
    let data: SubmitData = serde_json::from_value(data)
        .map_err(|e| format!("data is not a production request: {e}"))?;
    // Even a refused request is stored (its verdict is kept): what cannot be
    // stored at all is refused here, by field, as the dead-letter reason.
    let mut unstorable = Vec::new();
    for (field, text) in [
        ("profile", &data.profile),
        ("vo", &data.vo),
        ("backend", &data.backend),
        ("submitter", &data.submitter),
    ] {
        crate::domain::check_storable(field, &Value::String(text.clone()), &mut unstorable);
    }
    for (i, name) in data.forward.iter().enumerate() {
        crate::domain::check_storable(
            &format!("forward[{i}]"),
            &Value::String(name.clone()),
            &mut unstorable,
        );
    }
    crate::domain::check_storable("parameters", &data.parameters, &mut unstorable);
    if !unstorable.is_empty() {
        let fields: Vec<String> = unstorable
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect();
        return Err(format!("data cannot be stored: {}", fields.join("; ")));
    }
    let Some(profile) = profiles.get(&data.profile) else {
        let known: Vec<&str> = profiles.iter().map(|p| p.name()).collect();
        return Err(format!(
            "unknown profile {:?}; known profiles: {}",
            data.profile,
            known.join(", ")
        ));
    };
    let mut violations = if profile.names_period(&data.parameters) {
        profiles
            .expand_request(&data.profile, &data.vo, &data.parameters.to_string())
            .err()
            .unwrap_or_default()
    } else {
        profile.validate(&data.vo, &data.parameters)
    };
    crate::domain::check_name("backend", &data.backend, &mut violations);
    crate::domain::check_name("submitter", &data.submitter, &mut violations);
    crate::domain::check_priority(data.priority, &mut violations);
    crate::domain::check_forward(&data.forward, &mut violations);
    // With tokens on, who may submit is decided by the token or the broker
    // user's mapping when the event is admitted (see `IntakeConsumer`).
    if !policy.tokens {
        violations.extend(policy.refuses_vo(incoming.user_id.as_deref(), &data.vo));
    }
    Ok(Submission {
        event_id: id,
        source,
        reply_to,
        data,
        violations,
        user_id: incoming.user_id.clone(),
        authorization: authorization(&incoming.headers),
        owner: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn structured(event: Value) -> Incoming {
        Incoming {
            delivery_tag: 1,
            exchange: String::new(),
            routing_key: String::new(),
            redelivered: false,
            message_id: None,
            content_type: Some(CONTENT_TYPE_STRUCTURED.into()),
            reply_to: None,
            user_id: None,
            headers: Default::default(),
            body: event.to_string().into_bytes(),
            event: Err("structured".into()),
        }
    }

    fn shipped() -> ProfileSet {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../profiles");
        ProfileSet::load_dir(&dir).unwrap()
    }

    fn example() -> Value {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cta-irf-mc.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn open() -> Policy {
        Policy::from_settings(&prodsys_config::IntakeSettings::default())
    }

    #[test]
    fn answers_go_only_to_server_named_queues_by_default() {
        assert!(glob("amq.gen-*", "amq.gen-JzTY20BRgKO-HjmUJj0wLg"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "a-b-b-c"));
        assert!(glob("reply.*.esap", "reply.1.esap"));
        assert!(!glob("amq.gen-*", "prodsys.checker"));
        assert!(!glob("amq.gen-*", "xamq.gen-1"));
        assert!(!glob("a*bc", "abcx"));
        assert!(!glob("exact", "exact2"));
        let policy = open();
        assert_eq!(policy.refuses_reply_to("amq.gen-abc"), None);
        let reason = policy.refuses_reply_to("t.prodsys.checker").unwrap();
        assert!(
            reason.contains("reply_to") && reason.contains("amq.gen-*"),
            "{reason}"
        );
        assert!(policy.refuses_reply_to("amq.gen-\0").is_some());

        let mut incoming = structured(event("e1", example()));
        incoming.reply_to = Some("t.prodsys.checker".into());
        let reason = parse(&incoming, &shipped(), &policy).unwrap_err();
        assert!(reason.contains("reply_to"), "{reason}");
        incoming.reply_to = Some("amq.gen-1".into());
        assert!(parse(&incoming, &shipped(), &policy).is_ok());
    }

    #[test]
    fn a_mapped_broker_user_submits_only_for_its_vos() {
        let policy = Policy {
            broker_users: [("esap".to_string(), vec!["vo.km3net.eu".to_string()])].into(),
            ..open()
        };
        let mut incoming = structured(event("e1", example()));
        let fields = |s: &Submission| -> Vec<String> {
            s.violations.iter().map(|v| v.field.clone()).collect()
        };
        let anonymous = parse(&incoming, &shipped(), &policy).unwrap();
        assert_eq!(fields(&anonymous), ["vo"]);
        incoming.user_id = Some("esap".into());
        let other_vo = parse(&incoming, &shipped(), &policy).unwrap();
        assert_eq!(fields(&other_vo), ["vo"]);
        assert!(other_vo.violations[0].description.contains("vo.km3net.eu"));
        incoming.user_id = Some("stranger".into());
        assert_eq!(
            fields(&parse(&incoming, &shipped(), &policy).unwrap()),
            ["vo"]
        );
        let allowed = Policy {
            broker_users: [("esap".to_string(), vec!["vo.cta.in2p3.fr".to_string()])].into(),
            ..open()
        };
        incoming.user_id = Some("esap".into());
        assert!(
            parse(&incoming, &shipped(), &allowed)
                .unwrap()
                .violations
                .is_empty()
        );
        // Without a mapping nobody is restricted.
        assert!(
            parse(&incoming, &shipped(), &open())
                .unwrap()
                .violations
                .is_empty()
        );
    }

    #[test]
    fn with_tokens_the_token_or_a_mapped_broker_user_decides_later() {
        let policy = Policy {
            broker_users: [("esap".to_string(), vec!["vo.cta.in2p3.fr".to_string()])].into(),
            ..open()
        }
        .with_tokens(true);
        let mut incoming = structured(event("e1", example()));
        incoming.user_id = Some("stranger".into());
        // No violation on vo at parsing: admission decides.
        let parsed = parse(&incoming, &shipped(), &policy).unwrap();
        assert!(parsed.violations.is_empty(), "{:?}", parsed.violations);
        assert_eq!(parsed.authorization, Authorization::None);
        let refusal = policy
            .refuses_without_token(Some("stranger"), "vo.cta.in2p3.fr")
            .unwrap();
        assert!(
            refusal.contains("stranger") && refusal.contains("bearer token"),
            "{refusal}"
        );
        assert!(
            policy
                .refuses_without_token(None, "vo.cta.in2p3.fr")
                .is_some()
        );
        assert!(
            policy
                .refuses_without_token(Some("esap"), "vo.km3net.eu")
                .is_some()
        );
        assert_eq!(
            policy.refuses_without_token(Some("esap"), "vo.cta.in2p3.fr"),
            None
        );
        // Without any mapping, every event needs a token.
        assert!(
            open()
                .with_tokens(true)
                .refuses_without_token(Some("esap"), "vo.cta.in2p3.fr")
                .is_some()
        );

        use prodsys_messaging::lapin::types::{AMQPValue, LongString};
        let header = |value: &str| {
            let mut headers = prodsys_messaging::lapin::types::FieldTable::default();
            headers.insert(
                "Authorization".into(),
                AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
            );
            authorization(&headers)
        };
        assert_eq!(
            header("Bearer abc.def.ghi"),
            Authorization::Bearer("abc.def.ghi".into())
        );
        assert_eq!(header("bearer  abc "), Authorization::Bearer("abc".into()));
        assert_eq!(header("Basic dXNlcjpwdw=="), Authorization::Malformed);
        assert_eq!(header("abc.def.ghi"), Authorization::Malformed);
        assert_eq!(header("Bearer "), Authorization::Malformed);
        assert_eq!(format!("{:?}", header("Bearer secret")), "Bearer(..)");
    }

    fn event(id: &str, data: Value) -> Value {
        serde_json::json!({
            "specversion": "1.0", "id": id, "source": "/esap", "type": SUBMIT_TYPE, "data": data,
        })
    }

    #[test]
    fn what_cannot_be_stored_is_refused_by_field() {
        let profiles = shipped();
        let fine = parse(&structured(event("e1", example())), &profiles, &open()).unwrap();
        assert!(fine.violations.is_empty(), "{:?}", fine.violations);

        let mut data = example();
        data["parameters"]["observation_period"] = "a\0b".into();
        data["submitter"] = "me\0".into();
        let reason = parse(&structured(event("e2", data)), &profiles, &open()).unwrap_err();
        assert!(reason.contains("parameters.observation_period"), "{reason}");
        assert!(reason.contains("submitter"), "{reason}");
        assert!(reason.contains("NUL"), "{reason}");

        let reason = parse(&structured(event("e\0", example())), &profiles, &open()).unwrap_err();
        assert!(reason.contains("control character"), "{reason}");
    }
}
