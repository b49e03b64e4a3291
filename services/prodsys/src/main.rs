//! `prodsys serve all|intake|checker|dispatcher|status|catalog [--config FILE]`

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use prodsys::Service;

#[derive(Parser)]
#[command(
    name = "prodsys",
    version,
    about = "Production request system for ESFRI observatories"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run services: `all`, or one of intake, checker, dispatcher, status, catalog.
    Serve {
        #[arg(default_value = "all")]
        service: String,
        /// TOML settings file; PRODSYS__SECTION__KEY environment variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Create (or delete) one RabbitMQ user per service with least-privilege
    /// permissions, and an ingest user that can only publish requests to
    /// prodsys.ingest (runs rabbitmqctl); passwords go to files, never to stdout.
    BrokerUsers {
        /// The deployment's exchange and queue prefix (amqp.prefix).
        #[arg(long, env = "PRODSYS__AMQP__PREFIX", default_value = "")]
        prefix: String,
        /// Prepended to each role (intake, ..., ingest) to make the user name.
        #[arg(long, default_value = "prodsys-")]
        user_prefix: String,
        #[arg(long, default_value = "/")]
        vhost: String,
        /// Directory of the password files (<user>.password, mode 600).
        #[arg(long, default_value = "var/secrets")]
        secrets_dir: PathBuf,
        /// Only these roles (comma-separated: intake,checker,dispatcher,status,catalog,ingest).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Delete the users instead.
        #[arg(long)]
        delete: bool,
        #[arg(long, default_value = "rabbitmqctl")]
        rabbitmqctl: String,
    },
    /// Create (or drop) one PostgreSQL role per service, each owning only its
    /// own schema (no other role can read it); passwords go to files.
    DbRoles {
        /// A superuser's URL of the deployment's database.
        #[arg(long, env = "PRODSYS_DB_ADMIN_URL")]
        admin_url: String,
        #[arg(long, default_value = "prodsys_")]
        role_prefix: String,
        /// Directory of the password files (<role>.password, mode 600).
        #[arg(long, default_value = "var/secrets")]
        secrets_dir: PathBuf,
        /// Only these services (comma-separated).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Drop the roles and what they own in this database instead.
        #[arg(long)]
        delete: bool,
    },
}

fn main() -> anyhow::Result<()> {
    prodsys_telemetry::init("info");
    let (service, config) = match Cli::parse().command {
        Command::Serve { service, config } => (service, config),
        Command::BrokerUsers {
            prefix,
            user_prefix,
            vhost,
            secrets_dir,
            only,
            delete,
            rabbitmqctl,
        } => {
            return prodsys::access::BrokerUsers {
                prefix,
                user_prefix,
                vhost,
                secrets_dir,
                only,
                delete,
                rabbitmqctl,
            }
            .run();
        }
        Command::DbRoles {
            admin_url,
            role_prefix,
            secrets_dir,
            only,
            delete,
        } => {
            let roles = prodsys::access::DbRoles {
                admin_url,
                role_prefix,
                secrets_dir,
                only,
                delete,
            };
            return tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(roles.run());
        }
    };
    let services: Vec<Service> = if service == "all" {
        Service::ALL.to_vec()
    } else {
        vec![service.parse().map_err(anyhow::Error::msg)?]
    };
    let settings = prodsys_config::Settings::load(config.as_deref())?;
    let runtime = prodsys_server::runtime(services.len())?;
    let result = runtime.block_on(serve(services, settings));
    // Whatever is still running (a blocking call, a job's output copy) does
    // not keep the process: the grace period is over.
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}

/// Runs `services` until SIGTERM or Ctrl-C, then stops them gracefully:
/// consumers stop taking deliveries and finish (or give back) what they
/// hold, outboxes are flushed, connections closed — within
/// `shutdown_grace_ms`, or the process gives up and exits with an error.
async fn serve(services: Vec<Service>, settings: prodsys_config::Settings) -> anyhow::Result<()> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let grace = Duration::from_millis(settings.shutdown_grace_ms);
    let stop = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down");
        stop.cancel();
        // An operator who signals again does not want to wait.
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without waiting");
        std::process::exit(1);
    });
    let stack = prodsys::start(&services, &settings, shutdown.clone()).await?;
    for running in &stack.services {
        tracing::info!(service = running.service, addr = %running.addr, "ready");
    }
    let mut stopped = Box::pin(stack.wait());
    tokio::select! {
        result = &mut stopped => return result,
        _ = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(grace, stopped).await {
        Ok(result) => {
            tracing::info!("stopped");
            result
        }
        Err(_) => {
            anyhow::bail!("services did not stop within the shutdown grace period ({grace:?})")
        }
    }
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
