//! Distrust of input at the gRPC door: every string of every public request
//! is read before anything else does (the database, a lookup, a log line).
//! A NUL character (which PostgreSQL's text cannot hold), a control
//! character where no text has one, or a string longer than its kind
//! allows is a field violation naming the field, never an internal error.
//!
//! The check walks the message through its descriptor (the same file
//! descriptor set reflection serves), so a string field added to a request
//! later is checked without anyone remembering to.

use std::sync::OnceLock;

use prodsys_core::Violation;
use prost_reflect::{DescriptorPool, DynamicMessage, MapKey, Value};

/// A `*_json` document is bounded by the message size limit and by the
/// domain, which names the field its parameters are (`parameters`).
pub const MAX_JSON_BYTES: usize = usize::MAX;
/// Longest free text (a cancel's `reason`).
pub const MAX_TEXT_BYTES: usize = 4096;
/// Longest name, ID, key, token, prefix or metadata value.
pub const MAX_NAME_BYTES: usize = 1024;

/// A request message the public APIs take, checked by [`check`].
pub trait PublicRequest: prost::Message {
    /// Its full protobuf name (`prodsys.v1.SubmitRequestRequest`).
    const NAME: &'static str;
}

macro_rules! public_requests {
    ($($message:ident),* $(,)?) => {
        $(impl PublicRequest for prodsys_proto::$message {
            const NAME: &'static str = concat!("prodsys.v1.", stringify!($message));
        })*
    };
}

public_requests!(
    SubmitRequestRequest,
    GetRequestRequest,
    CancelProductionRequest,
    ListProfilesRequest,
    ListTemplatesRequest,
    ListPeriodsRequest,
    GetProductionRequest,
    ListProductionsRequest,
    FindFilesRequest,
    FindExistingRequest,
    FindExistingManyRequest,
    RegisterFilesRequest,
    GetProductionRecordRequest,
    ListJobsRequest,
    GetJobLogRequest,
);

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(prodsys_proto::FILE_DESCRIPTOR_SET)
            .expect("the compiled-in descriptor set decodes")
    })
}

/// Every string of `request` that cannot be taken, as field violations
/// (`forward[1]`, `metadata.site`, `conditions[0].values[2]`).
pub fn violations<M: PublicRequest>(request: &M) -> Vec<Violation> {
    let descriptor = pool()
        .get_message_by_name(M::NAME)
        .unwrap_or_else(|| panic!("{} is in the descriptor set", M::NAME));
    let mut found = Vec::new();
    match DynamicMessage::decode(descriptor, request.encode_to_vec().as_slice()) {
        Ok(message) => walk("", &message, &mut found),
        // Cannot happen for a message prost just encoded from the same protos.
        Err(e) => found.push(Violation::new("", format!("cannot be read: {e}"))),
    }
    found
}

/// `Err` with every violation of `request`, as a service's `Invalid`.
pub fn check<M: PublicRequest>(request: &M) -> Result<(), Vec<Violation>> {
    let found = violations(request);
    if found.is_empty() { Ok(()) } else { Err(found) }
}

/// [`check`] answered as gRPC: `INVALID_ARGUMENT` with a `BadRequest`.
pub fn checked<M: PublicRequest>(request: &M) -> Result<(), tonic::Status> {
    check(request).map_err(|v| crate::ServiceError::Validation(v).into())
}

fn walk(prefix: &str, message: &DynamicMessage, found: &mut Vec<Violation>) {
    for (field, value) in message.fields() {
        let path = if prefix.is_empty() {
            field.name().to_string()
        } else {
            format!("{prefix}.{}", field.name())
        };
        let kind = Kind::of(field.name());
        value_of(&path, kind, value, found);
    }
}

fn value_of(path: &str, kind: Kind, value: &Value, found: &mut Vec<Violation>) {
    match value {
        Value::String(text) => {
            if let Some(reason) = kind.refuses(text) {
                found.push(Violation::new(path, reason));
            }
        }
        Value::Message(inner) => walk(path, inner, found),
        Value::List(items) => {
            for (i, item) in items.iter().enumerate() {
                value_of(&format!("{path}[{i}]"), kind, item, found);
            }
        }
        Value::Map(entries) => {
            for (key, item) in entries {
                let MapKey::String(key) = key else {
                    value_of(path, kind, item, found);
                    continue;
                };
                if let Some(reason) = Kind::Name.refuses(key) {
                    found.push(Violation::new(
                        format!("{path}.{}", key.escape_debug()),
                        format!("key {reason}"),
                    ));
                    continue;
                }
                value_of(&format!("{path}.{key}"), Kind::Name, item, found);
            }
        }
        _ => {}
    }
}

/// What a string field holds, by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A JSON document (`parameters_json`): JSON's whitespace allowed.
    Json,
    /// Free text written by a person (`reason`): newlines and tabs allowed.
    Text,
    /// Everything else: names, IDs, keys, tokens, prefixes, values.
    Name,
}

impl Kind {
    fn of(field: &str) -> Self {
        if field.ends_with("_json") {
            Kind::Json
        } else if field == "reason" {
            Kind::Text
        } else {
            Kind::Name
        }
    }

    fn limit(self) -> usize {
        match self {
            Kind::Json => MAX_JSON_BYTES,
            Kind::Text => MAX_TEXT_BYTES,
            Kind::Name => MAX_NAME_BYTES,
        }
    }

    /// Why `text` cannot be taken as this kind, if it cannot.
    fn refuses(self, text: &str) -> Option<String> {
        if text.contains('\0') {
            return Some("holds a NUL character (\\0), which cannot be stored".into());
        }
        if text.len() > self.limit() {
            return Some(format!(
                "is {} bytes long, more than {}",
                text.len(),
                self.limit()
            ));
        }
        let allowed = |c: char| match self {
            Kind::Json | Kind::Text => matches!(c, '\t' | '\n' | '\r'),
            Kind::Name => false,
        };
        if let Some(c) = text.chars().find(|&c| c.is_control() && !allowed(c)) {
            return Some(format!(
                "holds a control character ({})",
                c.escape_unicode()
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prodsys_proto as pb;

    fn fields(v: &[Violation]) -> Vec<&str> {
        let mut f: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        f.sort();
        f
    }

    #[test]
    fn every_string_of_a_request_is_read_wherever_it_is() {
        let fine = pb::SubmitRequestRequest {
            profile: "cta-irf-mc".into(),
            parameters_json: "{\n\t\"a\": 1\r\n}".into(),
            forward: vec!["tape".into()],
            ..Default::default()
        };
        assert!(violations(&fine).is_empty());
        let bad = pb::SubmitRequestRequest {
            profile: "cta\0".into(),
            idempotency_key: "a\nb".into(),
            parameters_json: "{\"a\": \"\0\"}".into(),
            forward: vec!["ok".into(), "x".repeat(MAX_NAME_BYTES + 1)],
            chain: vec![pb::ChainStep {
                profile: "\u{7f}".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let found = violations(&bad);
        assert_eq!(
            fields(&found),
            [
                "chain[0].profile",
                "forward[1]",
                "idempotency_key",
                "parameters_json",
                "profile"
            ],
            "{found:?}"
        );
        let files = pb::FindFilesRequest {
            metadata: [
                ("site".to_string(), "a\0".to_string()),
                ("k\0".into(), "v".into()),
            ]
            .into(),
            conditions: vec![pb::MetadataCondition {
                key: "nsb".into(),
                values: vec!["1".into(), "\u{1b}[31m".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            fields(&violations(&files)),
            ["conditions[0].values[1]", "metadata.k\\0", "metadata.site"]
        );
        let cancel = pb::CancelProductionRequest {
            production_id: "CTA-000001".into(),
            reason: "wrong energy\nsee the log".into(),
        };
        assert!(check(&cancel).is_ok());
        let status = checked(&pb::CancelProductionRequest {
            reason: "\0".into(),
            ..cancel
        })
        .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("reason"), "{}", status.message());
    }

    #[test]
    fn every_public_request_is_in_the_descriptor_set() {
        fn named<M: PublicRequest + Default>() {
            assert!(violations(&M::default()).is_empty(), "{}", M::NAME);
        }
        named::<pb::SubmitRequestRequest>();
        named::<pb::GetRequestRequest>();
        named::<pb::CancelProductionRequest>();
        named::<pb::ListProfilesRequest>();
        named::<pb::ListTemplatesRequest>();
        named::<pb::ListPeriodsRequest>();
        named::<pb::GetProductionRequest>();
        named::<pb::ListProductionsRequest>();
        named::<pb::FindFilesRequest>();
        named::<pb::FindExistingRequest>();
        named::<pb::FindExistingManyRequest>();
        named::<pb::RegisterFilesRequest>();
        named::<pb::GetProductionRecordRequest>();
        named::<pb::ListJobsRequest>();
        named::<pb::GetJobLogRequest>();
    }
}
