//! `prodctl dlq list|show|replay|drop <service>`: the dead letters of a
//! service, read from its dead-letter queue (`<prefix>prodsys.<service>.dlq`)
//! straight over AMQP.
//!
//! Reading never loses a message: every message of the queue (up to
//! `--limit`) is fetched with manual acknowledgement and held while the
//! command acts; the ones it replayed or dropped are acknowledged, all
//! others are given back (nack with requeue) before the command ends. A
//! replay publishes the message (with confirms) straight to the service's
//! queue, where it is handled under its original routing key; its
//! dead-letter headers are removed, and only once the broker confirmed the
//! copy is the dead letter acknowledged. Consumers have an inbox, so a
//! replayed event that already took effect changes nothing.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties};
use prodsys_messaging::Names;
use prodsys_messaging::envelope::{
    DEAD_LETTER_REASON, ORIGINAL_EXCHANGE, ORIGINAL_ROUTING_KEY, dead_letter_reason, header_text,
    original_destination, value_text,
};

pub const SERVICES: [&str; 5] = ["intake", "checker", "dispatcher", "status", "catalog"];

/// What to do with the dead letters of one service.
#[derive(Debug, Clone)]
pub enum Action {
    List,
    Show(String),
    /// One message ID, or every message (`None`).
    Replay(Option<String>),
    Drop(Option<String>),
}

/// Runs `action` on the dead-letter queue of `service`.
pub async fn run(
    amqp_url: &str,
    tls: &lapin::tcp::OwnedTLSConfig,
    prefix: &str,
    service: &str,
    action: Action,
    limit: usize,
) -> anyhow::Result<ExitCode> {
    if !SERVICES.contains(&service) {
        bail!(
            "unknown service {service:?}: choose {}",
            SERVICES.join(", ")
        );
    }
    let names = Names::new(prefix);
    let dlq = names.dead_letter_queue(service);
    let connection = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect_with_config(
            amqp_url,
            ConnectionProperties::default().with_connection_name("prodctl-dlq".into()),
            tls.clone(),
            lapin::runtime::default_runtime()?,
        ),
    )
    .await
    .context("connecting to the broker timed out")?
    .context("cannot reach the broker")?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut letters = fetch(&channel, &dlq, limit).await?;
    let result = act(&channel, &names, service, &mut letters, action).await;
    // Whatever was not acknowledged goes back, in any case.
    for letter in &letters {
        if !letter.settled {
            let _ = channel
                .basic_nack(
                    letter.delivery.delivery_tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                )
                .await;
        }
    }
    let _ = channel.close(200, "done".into()).await;
    let _ = connection.close(200, "done".into()).await;
    result
}

struct Letter {
    delivery: Delivery,
    settled: bool,
}

/// Every message of `queue` (up to `limit`), held unacknowledged.
async fn fetch(channel: &Channel, queue: &str, limit: usize) -> anyhow::Result<Vec<Letter>> {
    let mut letters = Vec::new();
    while letters.len() < limit {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .with_context(|| format!("reading {queue}"))?;
        match got {
            Some(message) => letters.push(Letter {
                delivery: message.delivery,
                settled: false,
            }),
            None => break,
        }
    }
    Ok(letters)
}

async fn act(
    channel: &Channel,
    names: &Names,
    service: &str,
    letters: &mut [Letter],
    action: Action,
) -> anyhow::Result<ExitCode> {
    match action {
        Action::List => {
            if crate::output::json() {
                let list: Vec<serde_json::Value> = letters
                    .iter()
                    .map(|letter| {
                        let d = &letter.delivery;
                        serde_json::json!({
                            "message_id": message_id(d),
                            "type": header(d, "type"),
                            "routing_key": origin(d).1,
                            "reason": reason(d),
                            "time": time(d),
                        })
                    })
                    .collect();
                crate::output::print(&list.into());
                return Ok(ExitCode::SUCCESS);
            }
            if letters.is_empty() {
                eprintln!("{} is empty", names.dead_letter_queue(service));
            }
            for letter in letters.iter() {
                let d = &letter.delivery;
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    message_id(d),
                    header(d, "type").unwrap_or_else(|| "-".into()),
                    origin(d).1,
                    reason(d),
                    time(d)
                );
            }
            eprintln!("{} dead letter(s)", letters.len());
            Ok(ExitCode::SUCCESS)
        }
        Action::Show(id) => {
            let mut found = false;
            for letter in letters.iter().filter(|l| message_id(&l.delivery) == id) {
                found = true;
                show(&letter.delivery);
            }
            if !found {
                eprintln!(
                    "no dead letter {id} in {}",
                    names.dead_letter_queue(service)
                );
                return Ok(ExitCode::from(crate::output::NOT_FOUND));
            }
            Ok(ExitCode::SUCCESS)
        }
        Action::Replay(id) => {
            let queue = names.queue(service);
            let mut replayed = 0;
            for letter in letters.iter_mut() {
                if id
                    .as_ref()
                    .is_some_and(|id| *id != message_id(&letter.delivery))
                {
                    continue;
                }
                replay(channel, &queue, &letter.delivery).await?;
                channel
                    .basic_ack(letter.delivery.delivery_tag, BasicAckOptions::default())
                    .await?;
                letter.settled = true;
                replayed += 1;
                println!("replayed {}", message_id(&letter.delivery));
            }
            finish(replayed, id, "replayed", names, service)
        }
        Action::Drop(id) => {
            let mut dropped = 0;
            for letter in letters.iter_mut() {
                if id
                    .as_ref()
                    .is_some_and(|id| *id != message_id(&letter.delivery))
                {
                    continue;
                }
                channel
                    .basic_ack(letter.delivery.delivery_tag, BasicAckOptions::default())
                    .await?;
                letter.settled = true;
                dropped += 1;
                println!("dropped {}", message_id(&letter.delivery));
            }
            finish(dropped, id, "dropped", names, service)
        }
    }
}

fn finish(
    n: usize,
    id: Option<String>,
    what: &str,
    names: &Names,
    service: &str,
) -> anyhow::Result<ExitCode> {
    eprintln!("{n} dead letter(s) {what}");
    match id {
        Some(id) if n == 0 => {
            eprintln!(
                "no dead letter {id} in {}",
                names.dead_letter_queue(service)
            );
            Ok(ExitCode::from(crate::output::NOT_FOUND))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// Publishes `delivery` to `queue` (through the default exchange) under its
/// original routing key, without the dead-letter headers, and waits for the
/// broker's confirm.
async fn replay(channel: &Channel, queue: &str, delivery: &Delivery) -> anyhow::Result<()> {
    let (exchange, routing_key) = origin(delivery);
    let mut headers: std::collections::BTreeMap<_, _> = delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default()
        .inner()
        .clone();
    headers.retain(|name, _| {
        let name = name.as_str();
        !(name == DEAD_LETTER_REASON
            || name == "x-death"
            || name == "x-delivery-count"
            || name.starts_with("x-first-death-")
            || name.starts_with("x-last-death-"))
    });
    // The consumer reads the original routing key from these on a message
    // that reached its queue directly.
    let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
    headers.insert(ORIGINAL_ROUTING_KEY.into(), text(&routing_key));
    headers.insert(ORIGINAL_EXCHANGE.into(), text(&exchange));
    let properties = delivery
        .properties
        .clone()
        .with_headers(FieldTable::from(headers))
        .with_delivery_mode(2);
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &delivery.data,
            properties,
        )
        .await
        .with_context(|| format!("publishing to {queue}"))?;
    match tokio::time::timeout(Duration::from_secs(10), confirm)
        .await
        .context("no confirm from the broker within 10 s")??
    {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => bail!("{queue} does not exist: is the service deployed?"),
        Confirmation::Nack(_) => bail!("the broker refused the replay to {queue}"),
        Confirmation::NotRequested => bail!("confirms are not enabled"),
    }
}

fn headers(delivery: &Delivery) -> FieldTable {
    delivery.properties.headers().clone().unwrap_or_default()
}

/// A CloudEvents attribute.
fn header(delivery: &Delivery, name: &str) -> Option<String> {
    header_text(&headers(delivery), name)
}

fn message_id(delivery: &Delivery) -> String {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_string())
        .or_else(|| header(delivery, "id"))
        .unwrap_or_else(|| "-".into())
}

/// Why the message was dead-lettered (the service's reason, or the broker's).
fn reason(delivery: &Delivery) -> String {
    dead_letter_reason(&headers(delivery))
        .unwrap_or_else(|| "-".into())
        .replace(['\n', '\t'], " ")
}

/// The exchange and routing key the message was first published to.
fn origin(delivery: &Delivery) -> (String, String) {
    original_destination(&headers(delivery))
        .unwrap_or_else(|| (String::new(), delivery.routing_key.to_string()))
}

fn time(delivery: &Delivery) -> String {
    header(delivery, "time")
        .or_else(|| delivery.properties.timestamp().map(|t| format!("@{t}")))
        .unwrap_or_else(|| "-".into())
}

fn show(delivery: &Delivery) {
    let p = &delivery.properties;
    println!("message-id      {}", message_id(delivery));
    println!("reason          {}", reason(delivery));
    let (exchange, key) = origin(delivery);
    println!("published to    {exchange:?} with routing key {key:?}");
    if let Some(ct) = p.content_type() {
        println!("content-type    {ct}");
    }
    if let Some(reply) = p.reply_to() {
        println!("reply-to        {reply}");
    }
    if let Some(t) = p.timestamp() {
        println!("timestamp       {t}");
    }
    println!("headers");
    for (name, value) in headers(delivery).inner() {
        println!("  {name} = {}", describe(value));
    }
    let body = &delivery.data;
    println!("body            {} byte(s)", body.len());
    let json = serde_json::from_slice::<serde_json::Value>(body).ok();
    match json {
        Some(value) if !body.is_empty() => {
            println!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            )
        }
        _ => print!("{}", hex_dump(body)),
    }
}

fn describe(value: &AMQPValue) -> String {
    match value {
        AMQPValue::FieldArray(a) => format!(
            "[{}]",
            a.as_slice()
                .iter()
                .map(describe)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        AMQPValue::FieldTable(t) => format!(
            "{{{}}}",
            t.inner()
                .iter()
                .map(|(k, v)| format!("{k}: {}", describe(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => value_text(other).unwrap_or_else(|| format!("{other:?}")),
    }
}

/// 16 bytes a line: offset, hex, printable ASCII.
fn hex_dump(body: &[u8]) -> String {
    let mut out = String::new();
    for (i, chunk) in body.chunks(16).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let ascii: String = chunk
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        out.push_str(&format!(
            "  {:08x}  {:<47}  {ascii}\n",
            i * 16,
            hex.join(" ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_dump_shows_offsets_and_ascii() {
        let dump = hex_dump(b"\x08\x01hello world, dead letter");
        assert!(dump.starts_with("  00000000  08 01 68 65"), "{dump}");
        assert!(dump.contains("..hello world, d"), "{dump}");
        assert!(dump.contains("00000010"), "{dump}");
    }
}
