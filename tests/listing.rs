//! ListProductions reads a page in one statement, however many productions
//! it holds: counted on the wire between the status service and PostgreSQL.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use prodsys::Service;
use prodsys_proto as pb;
use prodsys_testkit::TestEnv;
use secrecy::SecretString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A TCP proxy to PostgreSQL counting the statements clients execute
/// (Execute messages of the extended protocol, and simple queries).
async fn counting_proxy(upstream: String) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let executed = Arc::new(AtomicUsize::new(0));
    let count = executed.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(&upstream).await.unwrap();
            let count = count.clone();
            tokio::spawn(async move {
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
                });
                let _ = forward(&mut from_client, &mut to_server, &count).await;
            });
        }
    });
    (port, executed)
}

async fn forward(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    count: &AtomicUsize,
) -> std::io::Result<()> {
    // Untyped start-up messages first (an SSLRequest, then the startup packet).
    loop {
        let len = from.read_u32().await?;
        let mut body = vec![0; len as usize - 4];
        from.read_exact(&mut body).await?;
        to.write_u32(len).await?;
        to.write_all(&body).await?;
        if body[..4] != 80877103u32.to_be_bytes() {
            break;
        }
    }
    loop {
        let kind = from.read_u8().await?;
        let len = from.read_u32().await?;
        let mut body = vec![0; len as usize - 4];
        from.read_exact(&mut body).await?;
        if kind == b'E' || kind == b'Q' {
            count.fetch_add(1, Ordering::SeqCst);
        }
        to.write_u8(kind).await?;
        to.write_u32(len).await?;
        to.write_all(&body).await?;
    }
}

#[tokio::test]
async fn a_page_of_productions_is_not_a_statement_per_production() {
    prodsys_telemetry::init("warn");
    let mut env = TestEnv::new().await.unwrap();
    let url: tokio_postgres::Config = env.settings.database.url().parse().unwrap();
    let host = match &url.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
        other => panic!("a TCP database URL: {other:?}"),
    };
    let upstream_port = url.get_ports().first().copied().unwrap_or(5432);
    let (port, executed) = counting_proxy(format!("{host}:{upstream_port}")).await;
    env.settings.database.url = SecretString::from(format!(
        "postgres://{}@127.0.0.1:{port}/{}",
        url.get_user().unwrap_or("postgres"),
        env.database
    ));
    let shutdown = CancellationToken::new();
    let stack = prodsys::start(&[Service::Status], &env.settings, shutdown.clone())
        .await
        .unwrap();
    let status = pb::status_service_client::StatusServiceClient::new(
        tonic::transport::Channel::from_shared(format!(
            "http://{}",
            stack.addr(Service::Status).unwrap()
        ))
        .unwrap()
        .connect()
        .await
        .unwrap(),
    );
    // 60 productions, each with job counts; every fifth completed (its final counts).
    env.db()
        .await
        .unwrap()
        .batch_execute(
            "SET search_path TO status;
             INSERT INTO productions (production_id, profile, vo, backend, state, state_rank, job_total)
             SELECT format('LIST-%s', lpad(i::text, 6, '0')), 'test-sleep', 'test', 'local',
                    CASE WHEN i % 5 = 0 THEN 'SUCCEEDED' ELSE 'RUNNING' END, 1, 10
             FROM generate_series(1, 60) i;
             INSERT INTO job_counts SELECT format('LIST-%s', lpad(i::text, 6, '0')), 'RUNNING', 3
             FROM generate_series(1, 60) i;
             INSERT INTO final_counts SELECT format('LIST-%s', lpad(i::text, 6, '0')), 'DONE', 10
             FROM generate_series(5, 60, 5) i;",
        )
        .await
        .unwrap();
    let list = || {
        let mut status = status.clone();
        async move {
            status
                .list_productions(pb::ListProductionsRequest {
                    page_size: 50,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    list().await; // prepares the statement on a pooled connection
    // The service reads in the background too (its relay, its backlog
    // sample); the fewest statements over a few pages is the page's own.
    let mut statements = usize::MAX;
    let mut page = None;
    for _ in 0..5 {
        let before = executed.load(Ordering::SeqCst);
        let listed = list().await;
        statements = statements.min(executed.load(Ordering::SeqCst) - before);
        page = Some(listed);
    }
    let page = page.unwrap();
    assert_eq!(page.productions.len(), 50);
    assert_eq!(page.next_page_token, "LIST-000050");
    let running = &page.productions[0];
    let counts = running.counts.unwrap();
    assert_eq!((counts.running, counts.created), (3, 7), "{running:?}");
    let done = &page.productions[4];
    let counts = done.counts.unwrap();
    assert_eq!((counts.done, counts.running), (10, 0), "{done:?}");
    // The page, its forwarding progress and its jobs per installation, and
    // the pool's check of the connection it hands out: a statement per
    // production would be 50 more.
    assert!(statements <= 4, "a page of 50 took {statements} statements");
    shutdown.cancel();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), stack.wait()).await;
    env.cleanup().await;
}
