//! Starting prodsys services by name, alone or all five in one process.
//! Services started together still talk only over AMQP and gRPC.

pub mod access;
use std::fmt;
use std::str::FromStr;

use anyhow::Context;
use prodsys_config::Settings;
use prodsys_server::Running;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Intake,
    Checker,
    Dispatcher,
    Status,
    Catalog,
}

impl Service {
    /// Consumers of events first, so their queues exist before anything is published.
    /// In the order they start together: each after those it asks (the
    /// checker asks the catalog; status and intake ask the checker), and
    /// status before the dispatcher and intake, whose events it projects.
    pub const ALL: [Service; 5] = [
        Service::Catalog,
        Service::Checker,
        Service::Intake,
        Service::Status,
        Service::Dispatcher,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Service::Intake => "intake",
            Service::Checker => "checker",
            Service::Dispatcher => "dispatcher",
            Service::Status => "status",
            Service::Catalog => "catalog",
        }
    }

    /// The service's schema migrations (its `migrations/` files, embedded).
    pub fn migrations(self) -> &'static [prodsys_db::Migration] {
        match self {
            Service::Intake => prodsys_intake::MIGRATIONS,
            Service::Checker => prodsys_checker::MIGRATIONS,
            Service::Dispatcher => prodsys_dispatcher::MIGRATIONS,
            Service::Status => prodsys_status::MIGRATIONS,
            Service::Catalog => prodsys_catalog::MIGRATIONS,
        }
    }

    pub async fn start(
        self,
        settings: &Settings,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Running> {
        match self {
            Service::Intake => prodsys_intake::start(settings, shutdown).await,
            Service::Checker => prodsys_checker::start(settings, shutdown).await,
            Service::Dispatcher => prodsys_dispatcher::start(settings, shutdown).await,
            Service::Status => prodsys_status::start(settings, shutdown).await,
            Service::Catalog => prodsys_catalog::start(settings, shutdown).await,
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Service {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Service::ALL
            .into_iter()
            .find(|svc| svc.name() == s)
            .ok_or_else(|| format!("unknown service {s:?}: choose all, intake, checker, dispatcher, status or catalog"))
    }
}

/// The five services of a running stack.
#[derive(Debug)]
pub struct Stack {
    pub services: Vec<Running>,
}

impl Stack {
    /// The gRPC address of `service`, if it runs here.
    pub fn addr(&self, service: Service) -> Option<std::net::SocketAddr> {
        self.services
            .iter()
            .find(|r| r.service == service.name())
            .map(|r| r.addr)
    }

    /// Waits until every service has stopped; the first failure is returned.
    pub async fn wait(self) -> anyhow::Result<()> {
        let results = futures::future::join_all(self.services.into_iter().map(Running::wait)).await;
        results.into_iter().collect()
    }
}

/// Starts `services` in dependency order.
pub async fn start(
    services: &[Service],
    settings: &Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<Stack> {
    let mut running: Vec<Running> = Vec::new();
    let mut settings = settings.clone();
    // Status starts before the dispatcher (it projects its events) but asks
    // it for jobs and logs: a dispatcher started with it on port 0 has its
    // port bound now (and served once it starts), so status knows where it
    // will listen.
    if services.contains(&Service::Status) && services.contains(&Service::Dispatcher) {
        if settings.dispatcher.port == 0 {
            let reserved = prodsys_server::reserve(&settings.grpc.host)
                .context("reserving the dispatcher's port")?;
            settings.dispatcher.port = reserved.port();
        }
        let host = match settings.grpc.host.as_str() {
            "0.0.0.0" | "" => "127.0.0.1".to_string(),
            "::" => "[::1]".to_string(),
            host if host.contains(':') => format!("[{host}]"),
            host => host.to_string(),
        };
        let scheme = if settings.tls.enabled() {
            "https"
        } else {
            "http"
        };
        settings.status.dispatcher_url = format!("{scheme}://{host}:{}", settings.dispatcher.port);
    }
    for service in Service::ALL.into_iter().filter(|s| services.contains(s)) {
        // Services started together find each other where they really listen.
        for r in &running {
            let scheme = if settings.tls.enabled() {
                "https"
            } else {
                "http"
            };
            let url = format!("{scheme}://{}", r.addr);
            match r.service {
                "checker" => {
                    settings.intake.checker_url = url.clone();
                    settings.status.checker_url = url;
                }
                "catalog" => {
                    settings.checker.catalog_url = url.clone();
                    settings.status.catalog_url = url;
                }
                "intake" => settings.status.intake_url = url,
                _ => {}
            }
        }
        let started = service
            .start(&settings, shutdown.clone())
            .await
            .map_err(|e| e.context(format!("starting {service}")))?;
        running.push(started);
    }
    Ok(Stack { services: running })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `.sql` files of `dir`, by name.
    fn files(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.ends_with(".sql"))
            .collect();
        names.sort();
        names
    }

    fn listed(migrations: &[prodsys_db::Migration]) -> Vec<String> {
        let mut names: Vec<String> = migrations.iter().map(|m| m.file.to_string()).collect();
        names.sort();
        names
    }

    /// A migration file nobody listed would never run: every file of each
    /// `migrations/` directory is embedded, and each names its version.
    #[test]
    fn every_migration_file_is_embedded() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        for service in Service::ALL {
            let dir = root
                .join("services")
                .join(service.name())
                .join("migrations");
            assert_eq!(listed(service.migrations()), files(&dir), "{service}");
            for migration in service.migrations() {
                let version = migration.version().unwrap();
                assert!(
                    prodsys_db::migrate::BASE
                        .iter()
                        .all(|base| base.version().unwrap() != version),
                    "{service}: {} takes a version of the shared base",
                    migration.file
                );
            }
        }
        let base = root.join("shared/db/migrations");
        assert_eq!(listed(prodsys_db::migrate::BASE), files(&base));
    }
}
