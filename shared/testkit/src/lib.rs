//! What every prodsys test needs: its own PostgreSQL database and AMQP name
//! prefix on the real servers, settings that point at them (gRPC on free
//! ports, the shipped profiles, the built tools), and waiting on a condition
//! with a deadline instead of sleeping.
//!
//! `PRODSYS_TEST_DATABASE_URL` (an admin connection, default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and `PRODSYS_TEST_AMQP_URL`
//! (default `amqp://guest:guest@127.0.0.1:5672/%2f`) say where the servers are.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use prodsys_config::Settings;
use secrecy::SecretString;
use tokio_postgres::NoTls;

pub const SERVICES: [&str; 5] = ["intake", "checker", "dispatcher", "status", "catalog"];

/// One test's private corner of the shared PostgreSQL and RabbitMQ.
pub struct TestEnv {
    pub settings: Settings,
    pub database: String,
    pub prefix: String,
    pub work_dir: PathBuf,
    admin_url: String,
    amqp_url: String,
}

pub fn admin_url() -> String {
    std::env::var("PRODSYS_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn amqp_url() -> String {
    std::env::var("PRODSYS_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The repository's root (where `profiles/` and `examples/` are).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where cargo put the binaries of this build (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("test executable directory");
    if dir.ends_with("deps") {
        dir.parent()
            .expect("target profile directory")
            .to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

impl TestEnv {
    /// Creates a fresh database and prefix; services configured with
    /// `settings` create their schemas in it.
    pub async fn new() -> anyhow::Result<Self> {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let database = format!("prodsys_test_{}", &tag[..16]);
        let prefix = format!("test.{}.", &tag[..12]);
        let admin = admin_url();
        // Both servers answer in time, or the test fails now, saying which:
        // a stuck server must cost a test a minute, not its whole time limit.
        until_up("the RabbitMQ broker", || async {
            let connection =
                lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
                    .await
                    .context("connecting to the test broker")?;
            let _ = connection.close(200, "reachable".into()).await;
            Ok(())
        })
        .await?;
        let client = until_up("PostgreSQL", || async {
            let (client, connection) = tokio_postgres::connect(&admin, NoTls)
                .await
                .context("connecting to PostgreSQL as admin")?;
            tokio::spawn(connection);
            client
                .batch_execute(&format!("CREATE DATABASE {database}"))
                .await
                .context("creating the test database")?;
            Ok(client)
        })
        .await?;
        drop(client);
        let mut url: tokio_postgres::Config = admin.parse()?;
        url.dbname(&database);
        let work_dir = std::env::temp_dir().join(format!("prodsys-test-{tag}"));
        let mut settings = Settings::default();
        settings.database.url = SecretString::from(database_url(&admin, &database));
        settings.database.pool_size = 8;
        settings.amqp.url = SecretString::from(amqp_url());
        settings.amqp.prefix = prefix.clone();
        settings.profiles_dir = repo_root().join("profiles");
        settings.periods_dir = repo_root().join("periods");
        for port in [
            &mut settings.intake.port,
            &mut settings.checker.port,
            &mut settings.dispatcher.port,
            &mut settings.status.port,
            &mut settings.catalog.port,
        ] {
            *port = 0;
        }
        settings.dispatcher.work_dir = work_dir.join("work");
        // Records are served, not written as files: a test's production has
        // the files its jobs wrote (tests/record.rs turns them on).
        settings.catalog.records_dir = PathBuf::new();
        settings.dispatcher.tools_dir = bin_dir();
        settings.dispatcher.poll_interval_ms = 200;
        Ok(Self {
            settings,
            database,
            prefix,
            work_dir,
            admin_url: admin,
            amqp_url: amqp_url(),
        })
    }

    /// A client connected to this test's database.
    pub async fn db(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, connection) =
            tokio_postgres::connect(&database_url(&self.admin_url, &self.database), NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// A channel on the test broker, for tests that publish or inspect queues themselves.
    pub async fn amqp(&self) -> anyhow::Result<(lapin::Connection, lapin::Channel)> {
        let connection =
            lapin::Connection::connect(&self.amqp_url, lapin::ConnectionProperties::default())
                .await?;
        let channel = connection.create_channel().await?;
        Ok((connection, channel))
    }

    /// Drops the database, the queues and exchanges under the prefix, and the work directory.
    pub async fn cleanup(self) {
        // Each server gets a bounded time: a test whose broker or database
        // stopped answering ends with what it found, not hanging in cleanup.
        let _ = tokio::time::timeout(CLEANUP_LIMIT, self.delete_topology()).await;
        let _ = tokio::time::timeout(CLEANUP_LIMIT, self.drop_database()).await;
        end_jobs(&self.work_dir);
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }

    async fn delete_topology(&self) {
        if let Ok((connection, channel)) = self.amqp().await {
            for service in SERVICES {
                for queue in [
                    format!("{}prodsys.{service}", self.prefix),
                    format!("{}prodsys.{service}.dlq", self.prefix),
                ] {
                    let _ = channel
                        .queue_delete(queue.as_str().into(), Default::default())
                        .await;
                }
            }
            let unroutable = format!("{}prodsys.unroutable", self.prefix);
            let _ = channel
                .queue_delete(unroutable.as_str().into(), Default::default())
                .await;
            for exchange in ["events", "ingest", "dlx", "unroutable"] {
                let name = format!("{}prodsys.{exchange}", self.prefix);
                let _ = channel
                    .exchange_delete(name.as_str().into(), Default::default())
                    .await;
            }
            let _ = connection.close(200, "test done".into()).await;
        }
    }

    async fn drop_database(&self) {
        if let Ok((client, connection)) = tokio_postgres::connect(&self.admin_url, NoTls).await {
            tokio::spawn(connection);
            let _ = client
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.database
                ))
                .await;
        }
    }
}

/// How long each server gets to answer a test's set-up probe.
const PROBE_LIMIT: Duration = Duration::from_secs(60);
/// How long each server gets for a test's cleanup.
const CLEANUP_LIMIT: Duration = Duration::from_secs(30);

/// How long a server that refuses connections is waited for: it may be
/// restarting (the test command restarts a broker that stopped answering).
const RESTART_LIMIT: Duration = Duration::from_secs(120);

/// `attempt` on `server` (each within [`PROBE_LIMIT`]), made again every
/// second while the server refuses connections, for up to [`RESTART_LIMIT`].
async fn until_up<T, F, Fut>(server: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let start = Instant::now();
    loop {
        match answers_in_time(server, attempt()).await {
            Err(error) if refused(&error) && start.elapsed() < RESTART_LIMIT => {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) if refused(&error) => {
                return Err(error.context(format!(
                    "{server} refused connections for {} s",
                    RESTART_LIMIT.as_secs()
                )));
            }
            other => return other,
        }
    }
}

/// Whether `error` is a refused connection (nothing listens on the port).
fn refused(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
            || cause.to_string().contains("Connection refused")
    })
}

/// `work` on `server`, failed with the server named if it takes longer than
/// [`PROBE_LIMIT`] (a server that accepts connections and never answers
/// makes every client wait forever otherwise).
async fn answers_in_time<T>(
    server: &str,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(PROBE_LIMIT, work).await {
        Ok(result) => result,
        Err(_) => anyhow::bail!(
            "{server} did not answer within {} s: it accepts connections but is stuck \
             (stopped, frozen or overloaded); the test cannot run",
            PROBE_LIMIT.as_secs()
        ),
    }
}

/// Kills the process group of every local job under `dir`: jobs outlive the
/// dispatcher that started them (a restarted one adopts them), so a test's
/// jobs end with its environment, not with its services. Each attempt's
/// supervisor leads its job's process group and names itself in `prodsys.pid`.
pub fn end_jobs(dir: &Path) {
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(path);
            } else if entry.file_name() == "prodsys.pid"
                // An attempt that recorded its end has no process left (and
                // its pid may belong to someone else by now).
                && !dir.join("prodsys.exit").exists()
                && let Some(pid) = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| t.split_whitespace().next()?.parse::<u32>().ok())
            {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
}

fn database_url(admin: &str, database: &str) -> String {
    match admin.rsplit_once('/') {
        Some((base, _)) if base.contains("://") && !base.ends_with('/') => {
            format!("{base}/{database}")
        }
        _ => format!("{admin}/{database}"),
    }
}

/// Polls `check` until it yields a value or `timeout` passes; the error says what was awaited.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_swap_the_database_name() {
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
    }
}
