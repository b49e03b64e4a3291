//! The local stack's own scripts (deploy/local/), run as a newcomer runs them.

use std::process::Command;

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

/// `deploy/local/up` empties the demo's queues before each demo; every queue
/// must go, not only the first (rabbitmqctl once read the loop's input).
#[tokio::test]
async fn the_demo_queue_reset_deletes_every_queue_holding_messages() {
    let connection = Connection::connect(
        &prodsys_testkit::amqp_url(),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let prefix = format!("prodsys.reset-{}.", &tag[..12]);
    let queues: Vec<String> = ["intake", "checker", "dispatcher", "status.dlq"]
        .iter()
        .map(|name| format!("{prefix}{name}"))
        .collect();
    for queue in &queues {
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        for n in 0..3 {
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    format!("message {n}").as_bytes(),
                    BasicProperties::default(),
                )
                .await
                .unwrap();
        }
    }
    let root = prodsys_testkit::repo_root();
    let output = Command::new("bash")
        .arg("-c")
        .arg(r#"source deploy/local/lib.sh && reset_demo_queues "$1""#)
        .arg("reset")
        .arg(&prefix)
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let said = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("deleted 4 RabbitMQ queue(s)"), "{said}");
    for queue in &queues {
        let probe = connection.create_channel().await.unwrap();
        let passive = probe
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        assert!(passive.is_err(), "{queue} still exists");
    }
    let _ = connection.close(200, "done".into()).await;
}
