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

/// Runs `script` with deploy/local/lib.sh sourced and `args` as `$1…`.
fn lib_sh(script: &str, args: &[&str]) -> std::process::Output {
    Command::new("bash")
        .arg("-c")
        .arg(format!("source deploy/local/lib.sh && {script}"))
        .arg("lib.sh")
        .args(args)
        .current_dir(prodsys_testkit::repo_root())
        .output()
        .unwrap()
}

/// `deploy/local/up --forward` runs the stack with deploy/prodsys.toml plus
/// the local XRootD as destination `local-xrootd`, and the CTA example
/// forwarded there: both read as prodsys and prodctl read them, nothing
/// else changed.
#[test]
fn the_forwarding_demo_adds_the_local_xrootd_and_forwards_the_cta_example_there() {
    let root = prodsys_testkit::repo_root();
    let dir = std::env::temp_dir().join(format!("prodsys-demo-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let made = lib_sh(r#"forward_demo_config "$1""#, &["root://127.0.0.1:31094"]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let path = dir.join("prodsys.toml");
    std::fs::write(&path, &made.stdout).unwrap();
    let mut demo = prodsys_config::Settings::load(Some(&path)).expect("the demo's config loads");
    let plain = prodsys_config::Settings::load(Some(&root.join("deploy/prodsys.toml"))).unwrap();
    let destination = demo
        .forwarding
        .destinations
        .remove("local-xrootd")
        .expect("the demo's destination");
    match destination {
        prodsys_config::DestinationSettings::Xroot {
            url, xrdcp, xrdfs, ..
        } => {
            assert_eq!(url, "root://127.0.0.1:31094//prodsys-demo");
            assert_eq!((xrdcp.as_str(), xrdfs.as_str()), ("xrdcp", "xrdfs"));
        }
        other => panic!("not an xroot destination: {other:?}"),
    }
    assert_eq!(
        toml::to_string(&demo).unwrap(),
        toml::to_string(&plain).unwrap(),
        "nothing else differs from deploy/prodsys.toml"
    );
    // Only a root://host:port URL is taken.
    assert!(
        !lib_sh(r#"forward_demo_config "$1""#, &["http://x"])
            .status
            .success()
    );

    let request = lib_sh(
        r#"forward_demo_request "$1""#,
        &["examples/cta-irf-mc.json"],
    );
    assert!(request.status.success());
    let mut forwarded: serde_json::Value = serde_json::from_slice(&request.stdout).unwrap();
    let example: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("examples/cta-irf-mc.json")).unwrap())
            .unwrap();
    assert_eq!(
        forwarded.as_object_mut().unwrap().remove("forward"),
        Some(serde_json::json!(["local-xrootd"]))
    );
    assert_eq!(forwarded, example);
    let _ = std::fs::remove_dir_all(&dir);
}
