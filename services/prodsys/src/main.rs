//! `prodsys serve all|intake|checker|dispatcher|status|catalog [--config FILE]`

use std::path::PathBuf;

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
}

fn main() -> anyhow::Result<()> {
    prodsys_telemetry::init("info");
    let Cli {
        command: Command::Serve { service, config },
    } = Cli::parse();
    let services: Vec<Service> = if service == "all" {
        Service::ALL.to_vec()
    } else {
        vec![service.parse().map_err(anyhow::Error::msg)?]
    };
    let settings = prodsys_config::Settings::load(config.as_deref())?;
    prodsys_server::runtime(services.len())?.block_on(serve(services, settings))
}

async fn serve(services: Vec<Service>, settings: prodsys_config::Settings) -> anyhow::Result<()> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        stop.cancel();
    });
    let stack = prodsys::start(&services, &settings, shutdown.clone()).await?;
    for running in &stack.services {
        tracing::info!(service = running.service, addr = %running.addr, "ready");
    }
    stack.wait().await
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
