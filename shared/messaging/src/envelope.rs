//! CloudEvents attributes carried as AMQP 0-9-1 headers (binary content mode),
//! as the CloudEvents SDKs do over RabbitMQ: `cloudEvents_id`, `cloudEvents_type`, …
//! Both separators seen in the wild, `cloudEvents_` and `cloudEvents:` (the
//! AMQP binding), and the `ce-` prefix of the RabbitMQ binding are read.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};

pub const HEADER_PREFIX: &str = "cloudEvents_";
pub const SPEC_VERSION: &str = "1.0";
/// Header naming why a message was dead-lettered.
pub const DEAD_LETTER_REASON: &str = "x-prodsys-dead-letter-reason";
pub const ORIGINAL_ROUTING_KEY: &str = "x-prodsys-original-routing-key";
pub const ORIGINAL_EXCHANGE: &str = "x-prodsys-original-exchange";

/// The CloudEvents context attributes of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEvent {
    pub id: String,
    pub event_type: String,
    pub source: String,
    pub specversion: String,
    pub time: Option<String>,
    pub subject: Option<String>,
}

impl CloudEvent {
    /// AMQP headers for this event.
    pub fn to_headers(&self) -> FieldTable {
        let mut headers = FieldTable::default();
        let mut put = |name: &str, value: &str| {
            headers.insert(
                format!("{HEADER_PREFIX}{name}").into(),
                AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
            );
        };
        put("id", &self.id);
        put("type", &self.event_type);
        put("source", &self.source);
        put("specversion", &self.specversion);
        if let Some(time) = &self.time {
            put("time", time);
        }
        if let Some(subject) = &self.subject {
            put("subject", subject);
        }
        headers
    }

    /// Reads the attributes from `properties`; the error names what is missing or wrong.
    pub fn from_properties(properties: &BasicProperties) -> Result<Self, String> {
        let empty = FieldTable::default();
        let headers = properties.headers().as_ref().unwrap_or(&empty);
        let required = |name: &str| {
            header_text(headers, name)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("missing CloudEvents attribute {name:?}"))
        };
        let event = CloudEvent {
            id: required("id")?,
            event_type: required("type")?,
            source: required("source")?,
            specversion: required("specversion")?,
            time: header_text(headers, "time"),
            subject: header_text(headers, "subject"),
        };
        if event.specversion != SPEC_VERSION {
            return Err(format!(
                "unsupported CloudEvents specversion {:?}",
                event.specversion
            ));
        }
        Ok(event)
    }
}

/// A header's text under any CloudEvents prefix.
pub fn header_text(headers: &FieldTable, name: &str) -> Option<String> {
    ["cloudEvents_", "cloudEvents:", "ce-"]
        .iter()
        .find_map(|prefix| headers.inner().get(format!("{prefix}{name}").as_str()))
        .and_then(value_text)
}

/// A header value as text, if it is a string.
pub fn value_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> CloudEvent {
        CloudEvent {
            id: "e1".into(),
            event_type: "org.prodsys.request.received.v1".into(),
            source: "/prodsys/intake".into(),
            specversion: SPEC_VERSION.into(),
            time: Some("2026-01-01T00:00:00Z".into()),
            subject: Some("CTA-000001".into()),
        }
    }

    #[test]
    fn attributes_round_trip_through_headers() {
        let props = BasicProperties::default().with_headers(event().to_headers());
        assert_eq!(CloudEvent::from_properties(&props).unwrap(), event());
    }

    #[test]
    fn colon_separator_is_accepted() {
        let mut headers = FieldTable::default();
        for (k, v) in [
            ("id", "x"),
            ("type", "t"),
            ("source", "s"),
            ("specversion", "1.0"),
        ] {
            headers.insert(
                format!("cloudEvents:{k}").into(),
                AMQPValue::LongString(v.into()),
            );
        }
        let props = BasicProperties::default().with_headers(headers);
        assert_eq!(CloudEvent::from_properties(&props).unwrap().id, "x");
    }

    #[test]
    fn missing_attributes_are_named() {
        let mut headers = event().to_headers();
        let mut inner = headers.inner().clone();
        inner.remove("cloudEvents_source");
        headers = FieldTable::from(inner);
        let props = BasicProperties::default().with_headers(headers);
        assert_eq!(
            CloudEvent::from_properties(&props).unwrap_err(),
            "missing CloudEvents attribute \"source\""
        );
        let none = BasicProperties::default();
        assert!(
            CloudEvent::from_properties(&none)
                .unwrap_err()
                .contains("\"id\"")
        );
    }
}
