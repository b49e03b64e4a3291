//! Server reflection as the tools people already have speak it: Python's
//! grpcio-reflection client (grpc.reflection.v1alpha) lists every server's
//! services and methods.

mod support;

use std::process::Command;

use prodsys::Service;
use support::spawn_app;
use tonic_reflection::pb::v1;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_reflection_clients_list_every_servers_services() {
    let app = spawn_app().await;
    let script = prodsys_testkit::repo_root().join("tests/reflection/list_services.py");
    for (service, expected) in [
        (
            Service::Intake,
            Some("prodsys.v1.RequestService/SubmitRequest"),
        ),
        (
            Service::Status,
            Some("prodsys.v1.StatusService/WatchProduction"),
        ),
        (
            Service::Catalog,
            Some("prodsys.v1.CatalogService/FindFiles"),
        ),
        (Service::Checker, Some("prodsys.v1.CheckerService/Evaluate")),
        (Service::Dispatcher, Some("prodsys.v1.JobService/ListJobs")),
    ] {
        let addr = app.stack.addr(service).unwrap();
        let output = Command::new("python3")
            .arg(&script)
            .arg(addr.to_string())
            .output()
            .expect("python3 runs");
        let listed = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{service}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            listed.lines().any(|l| l == "grpc.health.v1.Health/Check"),
            "{service} lists health: {listed}"
        );
        assert!(
            listed
                .lines()
                .any(|l| l == "grpc.reflection.v1alpha.ServerReflection"),
            "{service} lists v1alpha reflection: {listed}"
        );
        // Exactly the services this server answers: health, reflection and its own.
        let services: Vec<&str> = listed.lines().filter(|l| !l.contains('/')).collect();
        let own = expected.map(|m| m.split('/').next().unwrap());
        let mut wanted = vec![
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ];
        wanted.extend(own);
        let mut got = services.clone();
        got.sort();
        wanted.sort();
        assert_eq!(got, wanted, "{service} advertises what it serves");
        if let Some(method) = expected {
            assert!(
                listed.lines().any(|l| l == method),
                "{service} lists {method}: {listed}"
            );
        }
    }
    // grpc.reflection.v1 (grpcurl, current tools) answers the same list.
    let channel = support::channel(app.stack.addr(Service::Status).unwrap()).await;
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut answers = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer.message_response
    else {
        panic!("a list of services: {answer:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "prodsys.v1.StatusService"
        ]
    );
    app.stop().await;
}
