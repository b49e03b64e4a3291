//! The container deployment: deploy/docker-compose.yml read back by
//! podman-compose (`config`), and the prodsys image built from
//! deploy/Dockerfile with podman (deploy/local/build-prodsys-image: the
//! Debian base made here, the host's binaries in it) running `prodsys serve`
//! against this machine's PostgreSQL and RabbitMQ on the host network: every
//! service answers gRPC health and reflection, and the CTA example runs to
//! its end inside the container.

mod support;

use std::process::Command;
use std::time::Duration;

use prodsys_proto as pb;
use prodsys_testkit::{TestEnv, repo_root, wait_for};
use secrecy::ExposeSecret;
use support::{built_binary, cta_example};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_reflection::pb::v1;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_compose_file_is_valid_for_podman_compose() {
    let root = repo_root();
    let compose = root.join("var/venv/compose/bin/podman-compose");
    assert!(
        compose.exists(),
        "{} is missing: deploy/local/test installs tests/compose/requirements.txt there",
        compose.display()
    );
    let config = |with_tokens: bool| {
        let mut command = Command::new(&compose);
        command
            .arg("-f")
            .arg(root.join("deploy/docker-compose.yml"))
            .args(["--profile", "demo", "config"])
            .env_remove("PRODSYS_TOKEN_ISSUER")
            .env_remove("PRODSYS_INTERNAL_TOKEN");
        if with_tokens {
            command
                .env("PRODSYS_TOKEN_ISSUER", "https://iam.example.org/")
                .env("PRODSYS_INTERNAL_TOKEN", "a-secret-of-the-services");
        }
        command.output().expect("podman-compose runs")
    };
    // The stack runs with tokens on: without an issuer it does not start.
    let refused = config(false);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("PRODSYS_TOKEN_ISSUER"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let output = config(true);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "podman-compose config: {}{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Every service, the prodsys ones built from the Dockerfile with the
    // settings the YAML anchor gives each.
    for service in ["postgres", "rabbitmq", "example"] {
        assert!(
            !service_block(&text, service).is_empty(),
            "{service}: {text}"
        );
    }
    for service in ["intake", "checker", "dispatcher", "status", "catalog"] {
        let block = service_block(&text, service);
        for line in [
            "dockerfile: deploy/Dockerfile",
            "image: prodsys:latest",
            "PRODSYS__DATABASE__URL: postgres://postgres@postgres:5432/prodsys",
            "PRODSYS__STATUS__DISPATCHER_URL: http://dispatcher:50055",
            "PRODSYS__AUTH__DEV_MODE: 'false'",
            "PRODSYS__AUTH__ISSUERS: https://iam.example.org/",
            "condition: service_healthy",
        ] {
            assert!(
                block.lines().any(|l| l.trim() == line),
                "{service} has {line}: {block}"
            );
        }
        assert!(
            block.contains(&format!("- serve\n    - {service}\n")),
            "{service} serves itself: {block}"
        );
    }
}

/// The lines of one service in `config`'s output (indented under it).
fn service_block(config: &str, service: &str) -> String {
    let mut lines = config
        .lines()
        .skip_while(|l| *l != "services:")
        .skip_while(|l| *l != format!("  {service}:"));
    let Some(_) = lines.next() else {
        return String::new();
    };
    let mut block = String::new();
    for line in lines.take_while(|l| l.starts_with("   ")) {
        block.push_str(line);
        block.push('\n');
    }
    block
}

/// A container that is removed when the test ends, however it ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["--runtime", "runc", "rm", "-f", "-t", "5", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prodsys_image_serves_every_service_from_a_container() {
    let root = repo_root();
    // The host's binaries, in a directory of their own for the image.
    let bins = tempdir("prodsys-image-bins");
    for (package, bin) in [
        ("prodsys", "prodsys"),
        ("prodctl", "prodctl"),
        ("prodsys-toysim", "prodsys-toysim"),
    ] {
        std::fs::copy(built_binary(package, bin), bins.join(bin)).unwrap();
    }
    let tag = "localhost/prodsys:test";
    let built = Command::new(root.join("deploy/local/build-prodsys-image"))
        .args(["--tag", tag, "--bin-dir"])
        .arg(&bins)
        .output()
        .expect("deploy/local/build-prodsys-image runs");
    assert!(
        built.status.success(),
        "building the image: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    std::fs::remove_dir_all(&bins).unwrap();

    // A fresh database and broker prefix, as every test has; five free ports.
    let env = TestEnv::new().await.unwrap();
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let name = format!("prodsys-test-{}", env.prefix.replace('.', "-"));
    let mut run = Command::new("podman");
    run.args(["--runtime", "runc", "run", "-d", "--rm", "--name", &name])
        .args(["--network", "host"])
        .args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ]);
    let settings = [
        (
            "DATABASE__URL",
            env.settings.database.url.expose_secret().to_string(),
        ),
        (
            "AMQP__URL",
            env.settings.amqp.url.expose_secret().to_string(),
        ),
        ("AMQP__PREFIX", env.prefix.clone()),
        ("GRPC__HOST", "127.0.0.1".into()),
        ("INTAKE__PORT", ports[0].to_string()),
        ("STATUS__PORT", ports[1].to_string()),
        ("CATALOG__PORT", ports[2].to_string()),
        ("CHECKER__PORT", ports[3].to_string()),
        ("DISPATCHER__PORT", ports[4].to_string()),
    ];
    for (key, value) in settings {
        run.args(["-e", &format!("PRODSYS__{key}={value}")]);
    }
    // The image's own command: serve all, with the shipped configuration.
    let started = run.arg(tag).output().expect("podman runs");
    assert!(
        started.status.success(),
        "podman run: {}",
        String::from_utf8_lossy(&started.stderr)
    );
    let container = Container(name);
    let logs = || {
        let out = Command::new("podman")
            .args(["logs", &container.0])
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };

    // Every service answers gRPC health with SERVING ...
    let addr = |i: usize| -> std::net::SocketAddr { ([127, 0, 0, 1], ports[i]).into() };
    for (i, service) in ["intake", "status", "catalog", "checker", "dispatcher"]
        .iter()
        .enumerate()
    {
        let serving = wait_for(service, Duration::from_secs(60), || async move {
            let channel = tonic::transport::Channel::from_shared(format!("http://{}", addr(i)))
                .ok()?
                .connect()
                .await
                .ok()?;
            let answer = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .ok()?;
            (answer.into_inner().status == ServingStatus::Serving as i32).then_some(())
        })
        .await;
        assert!(serving.is_ok(), "{service} serving: {}", logs());
    }
    // ... and lists its API through reflection.
    for (i, own) in [
        (0, "prodsys.v1.RequestService"),
        (1, "prodsys.v1.StatusService"),
        (2, "prodsys.v1.CatalogService"),
        (3, "prodsys.v1.CheckerService"),
        (4, "prodsys.v1.JobService"),
    ] {
        let channel = support::channel(addr(i)).await;
        let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel);
        let request = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        };
        let answer = client
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
            .unwrap()
            .unwrap();
        let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
            answer.message_response
        else {
            panic!("a list of services: {answer:?}");
        };
        assert!(
            list.service.iter().any(|s| s.name == own),
            "{own} in {list:?}"
        );
    }

    // The CTA example, submitted from outside, runs to its end inside.
    let mut intake =
        pb::request_service_client::RequestServiceClient::new(support::channel(addr(0)).await);
    let request_id = intake
        .submit_request(cta_example())
        .await
        .unwrap()
        .into_inner()
        .request_id;
    let request = support::decided(&intake, &request_id).await;
    assert_eq!(request.state(), pb::RequestState::Accepted, "{request:?}");
    let status =
        pb::status_service_client::StatusServiceClient::new(support::channel(addr(1)).await);
    let production_id = request.production_id;
    let ended = wait_for("the example COMPLETED", Duration::from_secs(120), || {
        let mut status = status.clone();
        let production_id = production_id.clone();
        async move {
            let p = status
                .get_production(pb::GetProductionRequest { production_id })
                .await
                .ok()?
                .into_inner();
            (p.state() == pb::ProductionState::Completed && p.finished).then_some(p)
        }
    })
    .await;
    let ended = ended.unwrap_or_else(|e| panic!("{e}: {}", logs()));
    assert_eq!(ended.counts.unwrap().done, 4);
    // The dashboard's page of it, from the container's HTTP port.
    let page = reqwest::get(format!("http://{}/productions/{production_id}", addr(1)))
        .await
        .unwrap();
    assert_eq!(page.status(), 200);

    drop(container);
    env.cleanup().await;
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
