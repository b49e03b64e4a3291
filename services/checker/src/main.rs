//! Runs the checker service alone: `prodsys-checker [CONFIG.toml]`.

fn main() -> anyhow::Result<()> {
    prodsys_telemetry::init("info");
    let config = std::env::args_os().nth(1).map(std::path::PathBuf::from);
    let settings = prodsys_config::Settings::load(config.as_deref())?;
    prodsys_server::runtime(1)?.block_on(serve(settings))
}

async fn serve(settings: prodsys_config::Settings) -> anyhow::Result<()> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = prodsys_checker::start(&settings, shutdown.clone()).await?;
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        shutdown.cancel();
    });
    running.wait().await
}
