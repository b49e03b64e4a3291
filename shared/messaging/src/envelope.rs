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

/// Why a dead letter was dead-lettered: the service's reason, or the
/// broker's (`delivery_limit`, `rejected`, …) from `x-first-death-reason` or
/// its `x-death` record.
pub fn dead_letter_reason(headers: &FieldTable) -> Option<String> {
    let raw = |name: &str| headers.inner().get(name).and_then(value_text);
    raw(DEAD_LETTER_REASON)
        .or_else(|| raw("x-first-death-reason"))
        .or_else(|| first_death(headers, "reason"))
}

/// The exchange and routing key a dead letter was first published to: the
/// service's `x-prodsys-original-*` headers, or the broker's x-death record.
pub fn original_destination(headers: &FieldTable) -> Option<(String, String)> {
    let raw = |name: &str| headers.inner().get(name).and_then(value_text);
    if let Some(key) = raw(ORIGINAL_ROUTING_KEY) {
        return Some((raw(ORIGINAL_EXCHANGE).unwrap_or_default(), key));
    }
    let death = oldest_death(headers)?;
    let exchange = raw("x-first-death-exchange")
        .or_else(|| death.inner().get("exchange").and_then(value_text))
        .unwrap_or_default();
    let key = match death.inner().get("routing-keys")? {
        AMQPValue::FieldArray(keys) => keys.as_slice().first().and_then(value_text)?,
        _ => return None,
    };
    Some((exchange, key))
}

/// The first time the message died: the last entry of `x-death`.
fn oldest_death(headers: &FieldTable) -> Option<FieldTable> {
    match headers.inner().get("x-death")? {
        AMQPValue::FieldArray(deaths) => deaths.as_slice().iter().rev().find_map(|d| match d {
            AMQPValue::FieldTable(t) => Some(t.clone()),
            _ => None,
        }),
        _ => None,
    }
}

fn first_death(headers: &FieldTable, field: &str) -> Option<String> {
    oldest_death(headers).and_then(|t| t.inner().get(field).and_then(value_text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letters_name_their_reason_and_origin() {
        let text = |s: &str| AMQPValue::LongString(s.into());
        let mut ours = FieldTable::default();
        ours.insert(DEAD_LETTER_REASON.into(), text("does not decode"));
        ours.insert(ORIGINAL_ROUTING_KEY.into(), text("request.received"));
        ours.insert(ORIGINAL_EXCHANGE.into(), text("prodsys.events"));
        assert_eq!(
            dead_letter_reason(&ours).as_deref(),
            Some("does not decode")
        );
        assert_eq!(
            original_destination(&ours),
            Some(("prodsys.events".into(), "request.received".into()))
        );
        // Dead-lettered by the broker after the delivery limit.
        let mut death = FieldTable::default();
        death.insert("reason".into(), text("delivery_limit"));
        death.insert("exchange".into(), text("prodsys.events"));
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(vec![text("job.status")].into()),
        );
        let mut broker = FieldTable::default();
        broker.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        );
        assert_eq!(
            dead_letter_reason(&broker).as_deref(),
            Some("delivery_limit")
        );
        assert_eq!(
            original_destination(&broker),
            Some(("prodsys.events".into(), "job.status".into()))
        );
        assert_eq!(original_destination(&FieldTable::default()), None);
    }

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
