//! `cargo run --release -p prodsys-bench -- [all|raw|submit|latency|status|catalog|plan|containers|productions|replicas|forwarding|rucio|history|faults] [--smoke] [--write]`
//!
//! Measures, in one run on this machine, the raw limits of RabbitMQ and
//! PostgreSQL (same client libraries and message size as prodsys) and what
//! prodsys does on top of them (each of the five services in its own process,
//! on a fresh database and AMQP prefix), prints a table of the figures, their
//! ratio to the raw limit each depends on and the targets of issue 5 (per
//! service for memory), and writes BENCHMARKS.md (unless `--smoke`, or with
//! `--write`).
//!
//! The service processes are this binary started again with the hidden
//! options `--serve <service> --config <file>`.

// Messages of prodsys_proto are built with `..Default::default()` even when
// every field is named, so fields added to the protocol later do not break
// the bench.
#![allow(clippy::needless_update)]

mod amqp;
mod chain;
mod containers;
mod faults;
mod forwarding;
mod history;
mod productions;
mod raw;
mod report;
mod rucio;
mod scale;
mod services;
mod stack;
mod sys;
mod watchers;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Everything below, in one run.
    All,
    /// Only the raw limits of RabbitMQ and PostgreSQL.
    Raw,
    /// Sustained requests/s from SubmitRequest to ACCEPTED.
    Submit,
    /// p50/p99 SubmitRequest → ACCEPTED at a fixed offered load.
    Latency,
    /// Job status transitions/s into the status service.
    Status,
    /// The status measurement again with WatchProduction streams and
    /// dashboard SSE clients following its production.
    Watchers,
    /// Output files/s into the catalog.
    Catalog,
    /// A chained production fed by its parent's files: the lag from a
    /// parent's outputs to the child's jobs, and the input bookkeeping's rate.
    Chain,
    /// One production of a million jobs planned and persisted, then cancelled.
    Plan,
    /// A catalog of 10,000,000 files of 100,000 productions: FindFiles,
    /// StreamFiles, and submit with that history beside an empty catalog.
    History,
    /// The fault suite (`tests/faults.rs`) at productions of hundreds of
    /// jobs. Restarts RabbitMQ and PostgreSQL: not part of `all`; its
    /// results replace the fault section of BENCHMARKS.md and nothing else.
    Faults,
    /// Container jobs through prodsys beside `podman run` of the same command.
    Containers,
    /// Whole productions of real toysim jobs on the local executor, submit →
    /// every production COMPLETED and catalogued, beside a plain spawner of
    /// the same commands.
    Productions,
    /// The whole productions again with two processes of every service:
    /// the rate beside one of each, and work done twice counted.
    Replicas,
    /// Small catalogued files forwarded by the catalog to a real XRootD
    /// server, beside `xrdcp` of the same files to it.
    Forwarding,
    /// Catalogued files registered in a real Rucio server by the catalog,
    /// beside Rucio's bulk REST calls registering as many.
    Rucio,
}

#[derive(Debug, Parser)]
#[command(about = "Benchmarks of prodsys beside the raw limits of its broker and database")]
pub struct Args {
    #[arg(value_enum, default_value = "all")]
    pub scenario: Scenario,
    /// Leave this scenario out of `all` (repeatable), e.g. `--without history`
    /// for a run without the ten-million-file catalog.
    #[arg(long, value_enum)]
    pub without: Vec<Scenario>,
    /// Tiny sizes (under a minute), for CI; writes nothing unless --write.
    #[arg(long)]
    pub smoke: bool,
    /// Write BENCHMARKS.md even for a smoke run.
    #[arg(long)]
    pub write: bool,
    /// Where to write the results (default: BENCHMARKS.md at the repository root).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Seconds of sustained submission (default 60, smoke 5).
    #[arg(long)]
    pub submit_secs: Option<u64>,
    /// Concurrent submitting clients of the sustained run (default 512, smoke 32).
    #[arg(long)]
    pub clients: Option<usize>,
    /// Seconds of each short run at growing requests in flight before the
    /// sustained one (default 10, smoke 1; 0 skips them).
    #[arg(long)]
    pub sweep_secs: Option<u64>,
    /// Offered load of the latency measurement, requests/s (default 200, smoke 50).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds of the latency measurement (default 30, smoke 5).
    #[arg(long)]
    pub latency_secs: Option<u64>,
    /// Jobs of the production the plan scenario plans (default 1,000,000, smoke 20,000).
    #[arg(long)]
    pub plan_jobs: Option<u64>,
    /// Files in the catalog of the history scenario (default 10,000,000, smoke 20,000).
    #[arg(long)]
    pub history_files: Option<u64>,
    /// Productions they belong to (default 100,000, smoke 200).
    #[arg(long)]
    pub history_productions: Option<u64>,
    /// Files the parent of the chain scenario delivers at once (default 100,000, smoke 2,000).
    #[arg(long)]
    pub chain_files: Option<u64>,
    /// Jobs per production of the fault suite's large version (default 60, smoke 5).
    #[arg(long)]
    pub fault_jobs: Option<u64>,
    /// Container jobs of the containers scenario (default 1,000, smoke 4).
    #[arg(long)]
    pub container_jobs: Option<u64>,
    /// Container jobs at once, in prodsys and in the raw run (default 2).
    #[arg(long)]
    pub container_concurrency: Option<usize>,
    /// Container jobs the local executor holds there waiting for a slot,
    /// each started the moment one frees (`max_queued_jobs`; default 4).
    #[arg(long)]
    pub container_queue: Option<usize>,
    /// WatchProduction streams of the watchers scenario (default 1,000, smoke 100).
    #[arg(long)]
    pub watch_streams: Option<usize>,
    /// Dashboard SSE clients there (default 100, smoke 10).
    #[arg(long)]
    pub sse_clients: Option<usize>,
    /// Productions of the productions scenario (default 1,000, smoke 4).
    #[arg(long)]
    pub productions: Option<u64>,
    /// Jobs per production there (default 10).
    #[arg(long)]
    pub jobs_per_production: Option<u64>,
    /// Jobs at once there, in the local executor and in the raw spawner (default 4).
    #[arg(long)]
    pub production_concurrency: Option<usize>,
    /// Jobs the local executor holds there waiting for a slot, each started
    /// the moment one frees (`max_queued_jobs`; default 64).
    #[arg(long)]
    pub production_queue: Option<usize>,
    /// Forward the productions' outputs to a real XRootD server there
    /// (tests/servers/xrootd, which installs it when missing), and copy the
    /// raw run's outputs with xrdcp too.
    #[arg(long)]
    pub xrootd: bool,
    /// The dispatcher's poll interval there, ms (default: the tests' 200).
    #[arg(long)]
    pub poll_interval_ms: Option<u64>,
    /// Files of the forwarding scenario (default 10,000, smoke 200).
    #[arg(long)]
    pub forward_files: Option<u64>,
    /// Bytes of each of them (default 4,096).
    #[arg(long)]
    pub forward_bytes: Option<usize>,
    /// The catalog's `forwarding.claim_batch` there, and the raw run's
    /// files per `xrdcp` (default: the catalog's default).
    #[arg(long)]
    pub forward_batch: Option<usize>,
    /// Transfers at once to the XRootD server, by the catalog (the
    /// destination's `parallel`) and by the raw `xrdcp --parallel` (default
    /// 16; the test server computes 32 checksums at once).
    #[arg(long)]
    pub forward_parallel: Option<usize>,
    /// Replicas of the rucio scenario (default 10,000, smoke 200).
    #[arg(long)]
    pub rucio_files: Option<u64>,
    /// Bulk calls at once in its raw registration (default 2: the test
    /// server's gunicorn workers).
    #[arg(long)]
    pub rucio_raw_clients: Option<usize>,
    /// Internal: run this one service (the bench starts each service so).
    #[arg(long, hide = true, requires = "config")]
    pub serve: Option<String>,
    /// Internal: the settings file of `--serve`.
    #[arg(long, hide = true, requires = "serve")]
    pub config: Option<PathBuf>,
}

/// Runs CHECKPOINT on the server (needs a superuser or pg_checkpoint).
async fn checkpoint() -> anyhow::Result<()> {
    let (client, connection) =
        tokio_postgres::connect(&prodsys_testkit::admin_url(), tokio_postgres::NoTls).await?;
    let connection = tokio::spawn(connection);
    client.batch_execute("CHECKPOINT").await?;
    drop(client);
    let _ = connection.await;
    Ok(())
}

/// The value at quantile `q` of sorted `values`, in milliseconds.
pub fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// Everything one run measured.
#[derive(Debug, Default)]
pub struct Results {
    pub smoke: bool,
    pub command: String,
    pub started: String,
    pub wall_seconds: f64,
    pub machine: sys::Machine,
    pub raw_plan: Option<raw::RawPlan>,
    pub stack_plan: Option<stack::StackPlan>,
    pub pool_size: usize,
    pub prefetch: u16,
    pub batch_size: usize,
    pub broker: Option<raw::BrokerResult>,
    pub db: Option<raw::DbResult>,
    /// The bench's own process before the services started, and with them idle.
    pub rss_before_start: Option<u64>,
    pub rss_idle: Option<u64>,
    /// Each service process 3 s after all five were ready, by service.
    pub service_rss_idle: BTreeMap<String, u64>,
    /// Each service process's peak RSS (VmHWM) over the whole run, by service.
    pub service_rss_peak: BTreeMap<String, u64>,
    pub latency: Option<stack::LatencyResult>,
    pub submit: Option<stack::SubmitResult>,
    /// Short closed-loop runs at growing numbers of requests in flight.
    pub sweep: Vec<stack::SubmitResult>,
    pub status: Option<stack::StatusResult>,
    /// The status measurement with watchers.
    pub watched: Option<stack::StatusResult>,
    /// The watched measurement with its messages paced, for the lag.
    pub watched_paced: Option<stack::StatusResult>,
    /// The status measurement once more without watchers, after them.
    pub status_again: Option<stack::StatusResult>,
    pub catalog: Option<stack::CatalogResult>,
    pub chain: Option<chain::ChainResult>,
    pub plan: Option<stack::PlanResult>,
    pub cancel: Option<stack::CancelResult>,
    pub history_plan: Option<history::HistoryPlan>,
    pub history: Option<history::HistoryResult>,
    pub containers: Option<containers::ContainerResult>,
    pub productions: Option<productions::ProductionsResult>,
    /// The same productions with two processes of every service.
    pub replicated: Option<productions::ProductionsResult>,
    pub forwarding: Option<forwarding::ForwardingResult>,
    pub rucio: Option<rucio::RucioResult>,
    pub errors: Vec<String>,
}

impl Results {
    /// The load of each measurement of the services that ran, in run order.
    pub fn phases(&self) -> Vec<(&'static str, &stack::PhaseLoad)> {
        [
            ("latency", self.latency.as_ref().map(|r| &r.load)),
            ("submit", self.submit.as_ref().map(|r| &r.load)),
            ("status", self.status.as_ref().map(|r| &r.load)),
            ("status, watched", self.watched.as_ref().map(|r| &r.load)),
            ("catalog", self.catalog.as_ref().map(|r| &r.load)),
            ("chain", self.chain.as_ref().map(|r| &r.load)),
            ("plan", self.plan.as_ref().map(|r| &r.load)),
            ("cancel", self.cancel.as_ref().map(|r| &r.load)),
            (
                "submit, empty catalog",
                self.history
                    .as_ref()
                    .and_then(|h| h.empty.as_ref())
                    .map(|r| &r.load),
            ),
            (
                "stream files",
                self.history
                    .as_ref()
                    .and_then(|h| h.stream.as_ref())
                    .map(|r| &r.load),
            ),
            (
                "submit, with history",
                self.history
                    .as_ref()
                    .and_then(|h| h.history.as_ref())
                    .map(|r| &r.load),
            ),
        ]
        .into_iter()
        .filter_map(|(name, load)| load.map(|l| (name, l)))
        .collect()
    }

    /// Largest RSS of `service`'s process seen while under load, and in
    /// which measurement (the first to reach it).
    pub fn loaded_rss(&self, service: &str) -> Option<(u64, &'static str)> {
        self.phases()
            .into_iter()
            .rev()
            .filter_map(|(name, load)| load.max_rss.get(service).map(|r| (*r, name)))
            .max_by_key(|(r, _)| *r)
    }

    /// Largest RSS of the bench's own process seen under load, and in which
    /// measurement (the first to reach it).
    pub fn bench_loaded_rss(&self) -> Option<(u64, &'static str)> {
        self.phases()
            .into_iter()
            .rev()
            .map(|(name, load)| (load.bench_max_rss, name))
            .max_by_key(|(r, _)| *r)
    }
}

fn history_plan(args: &Args) -> history::HistoryPlan {
    let smoke = args.smoke;
    history::HistoryPlan {
        files: args
            .history_files
            .unwrap_or(if smoke { 20_000 } else { 10_000_000 }),
        productions: args
            .history_productions
            .unwrap_or(if smoke { 200 } else { 100_000 }),
        find_queries: if smoke { 20 } else { 300 },
        submit_duration: Duration::from_secs(if smoke { 3 } else { 20 }),
        submit_clients: args.clients.unwrap_or(if smoke { 32 } else { 512 }),
    }
}

fn plans(args: &Args) -> (raw::RawPlan, stack::StackPlan) {
    let smoke = args.smoke;
    let raw = raw::RawPlan {
        duration: Duration::from_secs(if smoke { 2 } else { 10 }),
        publish_window: 512,
        prefetch: 256,
        connections: 8,
        batch_rows: 1000,
    };
    let stack = stack::StackPlan {
        submit_duration: Duration::from_secs(args.submit_secs.unwrap_or(if smoke {
            5
        } else {
            60
        })),
        submit_clients: args.clients.unwrap_or(if smoke { 32 } else { 512 }),
        sweep_clients: if smoke {
            [2, 4, 8, 16, 32]
        } else {
            [64, 128, 256, 512, 1024]
        },
        sweep_duration: Duration::from_secs(args.sweep_secs.unwrap_or(if smoke { 1 } else { 10 })),
        latency_rate: args.rate.unwrap_or(if smoke { 50.0 } else { 200.0 }),
        latency_duration: Duration::from_secs(args.latency_secs.unwrap_or(if smoke {
            5
        } else {
            30
        })),
        latency_warmup: Duration::from_secs(if smoke { 1 } else { 3 }),
        status_jobs: if smoke { 10_000 } else { 200_000 },
        transitions_per_message: 500,
        catalog_files: if smoke { 10_000 } else { 200_000 },
        files_per_message: 200,
        plan_jobs: args
            .plan_jobs
            .unwrap_or(if smoke { 20_000 } else { 1_000_000 }),
        watchers: (
            args.watch_streams.unwrap_or(if smoke { 100 } else { 1000 }),
            args.sse_clients.unwrap_or(if smoke { 10 } else { 100 }),
        ),
    };
    (raw, stack)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let (Some(service), Some(config)) = (&args.serve, &args.config) {
        return services::serve(service, config);
    }
    if args.scenario == Scenario::Faults {
        return faults::run(&args);
    }
    prodsys_telemetry::init("warn");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let results = runtime.block_on(run(&args));
    // Every figure is taken: the measurements' files go now.
    sys::remove_set_aside();
    let results = results?;
    let table = report::text(&results);
    println!("\n{table}");
    let write = args.write || (!args.smoke && args.scenario == Scenario::All);
    if write {
        let path = args.output.clone().unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("BENCHMARKS.md")
        });
        let mut text = report::markdown(&results);
        // The fault suite's section is written by its own run; kept as it was.
        if let Some(section) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|old| faults::existing_section(&old))
        {
            text = faults::replace_section(&text, &section);
        }
        std::fs::write(&path, text)?;
        println!("wrote {}", path.display());
    }
    // The service processes (and the jobs they started) are gone by now.
    runtime.shutdown_timeout(Duration::from_secs(5));
    if !results.errors.is_empty() {
        anyhow::bail!("{} measurement(s) failed", results.errors.len());
    }
    Ok(())
}

async fn run(args: &Args) -> anyhow::Result<Results> {
    let began = Instant::now();
    let (raw_plan, stack_plan) = plans(args);
    let mut results = Results {
        smoke: args.smoke,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        machine: sys::describe(),
        raw_plan: Some(raw_plan),
        ..Results::default()
    };
    results.machine.rabbitmq = sys::rabbitmq_version().await;
    let scenario = args.scenario;
    let wants =
        |s: Scenario| (scenario == Scenario::All && !args.without.contains(&s)) || scenario == s;

    // Raw limits first, on their own database and prefix, nothing else running.
    eprintln!("raw: RabbitMQ round trip ({:?}) …", raw_plan.duration);
    let raw_env = prodsys_testkit::TestEnv::new().await?;
    sys::own_database(&raw_env.database);
    match raw::broker(&prodsys_testkit::amqp_url(), &raw_env.prefix, raw_plan).await {
        Ok(r) => {
            eprintln!("  {:.0} msgs/s", r.round_trip_per_s);
            results.broker = Some(r);
        }
        Err(e) => results.errors.push(format!("raw RabbitMQ: {e:#}")),
    }
    eprintln!("raw: PostgreSQL single-row commits and batched inserts …");
    match raw::database(&raw_env, raw_plan).await {
        Ok(r) => {
            eprintln!(
                "  {:.0} commits/s, {:.0} rows/s batched",
                r.single_per_s, r.batch_rows_per_s
            );
            results.machine.postgres = r.server_version.clone();
            results.machine.postgres_settings = r.settings.clone();
            results.db = Some(r);
        }
        Err(e) => results.errors.push(format!("raw PostgreSQL: {e:#}")),
    }
    sys::cleanup(raw_env).await;
    // The raw runs leave WAL behind them (a million batched rows); a
    // checkpoint now writes it out before prodsys is measured, instead of
    // during its first measurement.
    if let Err(e) = checkpoint().await {
        eprintln!(
            "  no CHECKPOINT after the raw limits ({e:#}); the next measurement may pay for it"
        );
    }

    if !matches!(
        scenario,
        Scenario::Raw
            | Scenario::Containers
            | Scenario::History
            | Scenario::Productions
            | Scenario::Replicas
            | Scenario::Forwarding
            | Scenario::Rucio
    ) {
        results.stack_plan = Some(stack_plan);
        eprintln!("prodsys: starting the five services, each in its own process …");
        let bench = stack::Bench::start().await?;
        results.pool_size = bench.env.settings.database.pool_size;
        results.prefetch = bench.env.settings.amqp.prefetch;
        results.batch_size = bench.env.settings.amqp.batch_size;
        results.rss_before_start = Some(bench.rss_before_start);
        results.rss_idle = Some(bench.rss_idle);
        results.service_rss_idle = bench.service_rss_idle.clone();
        eprintln!(
            "  idle RSS: {}; bench clients {:.1} MiB (bench alone before start {:.1} MiB)",
            rss_list(&bench.service_rss_idle),
            sys::mib(bench.rss_idle),
            sys::mib(bench.rss_before_start)
        );
        let settle = Duration::from_secs(300);
        // A service process that ended makes every later measurement moot.
        let mut down = false;
        let mut check = |results: &mut Results| {
            for ended in bench.exited_services() {
                results.errors.push(ended);
                down = true;
            }
            !down
        };
        if wants(Scenario::Latency) && check(&mut results) {
            eprintln!(
                "prodsys: latency at {} req/s for {:?} …",
                stack_plan.latency_rate, stack_plan.latency_duration
            );
            match bench.latency(&stack_plan).await {
                Ok(r) => {
                    eprintln!("  p50 {:.1} ms, p99 {:.1} ms", r.p50_ms, r.p99_ms);
                    results.latency = Some(r);
                }
                Err(e) => results.errors.push(format!("latency: {e:#}")),
            }
            if let Err(e) = bench.quiesce(settle).await {
                results.errors.push(format!("after latency: {e:#}"));
            }
        }
        if wants(Scenario::Submit) && !stack_plan.sweep_duration.is_zero() {
            for clients in stack_plan.sweep_clients {
                if !check(&mut results) {
                    break;
                }
                eprintln!(
                    "prodsys: submit → ACCEPTED, {clients} requests in flight for {:?} …",
                    stack_plan.sweep_duration
                );
                match bench.submit(clients, stack_plan.sweep_duration).await {
                    Ok(r) => {
                        eprintln!(
                            "  {:.0} req/s accepted, p50 {:.0} ms",
                            r.accepted_per_s, r.accept_p50_ms
                        );
                        results.sweep.push(r);
                    }
                    Err(e) => results.errors.push(format!("submit sweep: {e:#}")),
                }
                if let Err(e) = bench.quiesce(settle).await {
                    results
                        .errors
                        .push(format!("after the submit sweep: {e:#}"));
                }
            }
        }
        if wants(Scenario::Submit) && check(&mut results) {
            eprintln!(
                "prodsys: submit → ACCEPTED, {} clients for {:?} …",
                stack_plan.submit_clients, stack_plan.submit_duration
            );
            if let Err(e) = bench.follow_received(false).await {
                results
                    .errors
                    .push(format!("unbinding request.received: {e:#}"));
            }
            let sustained = bench
                .submit(stack_plan.submit_clients, stack_plan.submit_duration)
                .await;
            if let Err(e) = bench.follow_received(true).await {
                results
                    .errors
                    .push(format!("binding request.received: {e:#}"));
            }
            match sustained {
                Ok(r) => {
                    eprintln!("  {:.0} req/s accepted", r.accepted_per_s);
                    results.submit = Some(r);
                }
                Err(e) => results.errors.push(format!("submit: {e:#}")),
            }
            if let Err(e) = bench.quiesce(settle).await {
                results.errors.push(format!("after submit: {e:#}"));
            }
        }
        if wants(Scenario::Status) && check(&mut results) {
            eprintln!(
                "prodsys: {} job transitions into status …",
                stack_plan.status_jobs * 3
            );
            match bench.status(&stack_plan, None, None).await {
                Ok(r) => {
                    eprintln!("  {:.0} transitions/s", r.transitions_per_s);
                    results.status = Some(r);
                }
                Err(e) => results.errors.push(format!("status: {e:#}")),
            }
            if let Err(e) = bench.quiesce(settle).await {
                results.errors.push(format!("after status: {e:#}"));
            }
        }
        if wants(Scenario::Watchers) && check(&mut results) {
            let (grpc, sse) = stack_plan.watchers;
            eprintln!(
                "prodsys: the status measurement again, {grpc} WatchProduction streams and {sse} dashboard SSE clients following it …"
            );
            if results.status.is_none() {
                // The same measurement without watchers, for the ratio.
                match bench.status(&stack_plan, None, None).await {
                    Ok(r) => results.status = Some(r),
                    Err(e) => results.errors.push(format!("status: {e:#}")),
                }
                if let Err(e) = bench.quiesce(settle).await {
                    results.errors.push(format!("after status: {e:#}"));
                }
            }
            match bench.status(&stack_plan, Some((grpc, sse)), None).await {
                Ok(r) => {
                    if let Some(w) = &r.watchers {
                        eprintln!(
                            "  {:.0} transitions/s; lag p50 {:.0} ms, p99 {:.0} ms; {} of {} watchers saw every job DONE",
                            r.transitions_per_s,
                            w.lag_p50_ms,
                            w.lag_p99_ms,
                            w.complete,
                            w.grpc + w.sse
                        );
                    }
                    results.watched = Some(r);
                }
                Err(e) => results.errors.push(format!("watchers: {e:#}")),
            }
            if let Err(e) = bench.quiesce(settle).await {
                results.errors.push(format!("after watchers: {e:#}"));
            }
            // And again without: each measurement on the same database runs
            // slower than the one before it (more rows), so the ratio is
            // taken against the mean of the one before and the one after.
            match bench.status(&stack_plan, None, None).await {
                Ok(r) => results.status_again = Some(r),
                Err(e) => results.errors.push(format!("status again: {e:#}")),
            }
            if let Err(e) = bench.quiesce(settle).await {
                results.errors.push(format!("after status again: {e:#}"));
            }
            // The lag above is mostly the queue: every message is published
            // within a fraction of a second and waits its turn. The lag from
            // event to watcher is measured at a load the service keeps up
            // with: half the rate it absorbed without watchers.
            let plain: Vec<f64> = [&results.status, &results.status_again]
                .into_iter()
                .flatten()
                .map(|r| r.transitions_per_s)
                .collect();
            if !plain.is_empty() {
                let pace = plain.iter().sum::<f64>() / plain.len() as f64 / 2.0;
                eprintln!(
                    "prodsys: the watched status measurement paced at {pace:.0} transitions/s …"
                );
                match bench
                    .status(&stack_plan, Some((grpc, sse)), Some(pace))
                    .await
                {
                    Ok(r) => {
                        if let Some(w) = &r.watchers {
                            eprintln!(
                                "  lag p50 {:.0} ms, p99 {:.0} ms",
                                w.lag_p50_ms, w.lag_p99_ms
                            );
                        }
                        results.watched_paced = Some(r);
                    }
                    Err(e) => results.errors.push(format!("watchers, paced: {e:#}")),
                }
                if let Err(e) = bench.quiesce(settle).await {
                    results.errors.push(format!("after watchers, paced: {e:#}"));
                }
            }
        }
        if wants(Scenario::Catalog) && check(&mut results) {
            eprintln!(
                "prodsys: {} files into the catalog …",
                stack_plan.catalog_files
            );
            match bench.catalog(&stack_plan).await {
                Ok(r) => {
                    eprintln!("  {:.0} files/s", r.files_per_s);
                    results.catalog = Some(r);
                }
                Err(e) => results.errors.push(format!("catalog: {e:#}")),
            }
        }
        if wants(Scenario::Chain) && check(&mut results) {
            if let Err(e) = bench.quiesce(settle).await {
                results.errors.push(format!("before chain: {e:#}"));
            }
            let plan = chain::ChainPlan {
                files: args
                    .chain_files
                    .unwrap_or(if args.smoke { 2_000 } else { 100_000 }),
                files_per_event: 20,
                paced_events: if args.smoke { 10 } else { 200 },
                pace_ms: 50,
            };
            eprintln!(
                "prodsys: a chained production fed {} files paced ({} every {} ms), then {} at once …",
                plan.paced_events * plan.files_per_event,
                plan.files_per_event,
                plan.pace_ms,
                plan.files
            );
            match bench.chain(&plan).await {
                Ok(r) => {
                    eprintln!(
                        "  lag p50 {:.0} ms, p99 {:.0} ms; {:.0} files/s; {} jobs, {} inputs misused",
                        r.lag_p50_ms, r.lag_p99_ms, r.files_per_s, r.jobs, r.misused
                    );
                    results.chain = Some(r);
                }
                Err(e) => results.errors.push(format!("chain: {e:#}")),
            }
        }
        // Last: its jobs stay waiting behind the one local slot.
        let mut tap = None;
        if wants(Scenario::Plan) && check(&mut results) {
            if let Err(e) = bench.quiesce(settle).await {
                results.errors.push(format!("before plan: {e:#}"));
            }
            eprintln!(
                "prodsys: planning one production of {} jobs …",
                stack_plan.plan_jobs
            );
            match bench.tap().await {
                Ok(t) => tap = Some(t),
                Err(e) => results.errors.push(format!("tapping the events: {e:#}")),
            }
            match bench.plan(&stack_plan).await {
                Ok(r) => {
                    eprintln!(
                        "  {:.1} s ({:.0} jobs/s), dispatcher RSS at most {:.1} MiB",
                        r.seconds,
                        r.jobs_per_s,
                        sys::mib(r.load.max_rss.get("dispatcher").copied().unwrap_or(0))
                    );
                    if r.rows != r.jobs as i64 {
                        results.errors.push(format!(
                            "plan: {} rows in dispatcher.jobs for {} jobs",
                            r.rows, r.jobs
                        ));
                    }
                    results.plan = Some(r);
                }
                Err(e) => results.errors.push(format!("plan: {e:#}")),
            }
        }
        if let Some(planned) = results.plan.clone()
            && check(&mut results)
        {
            eprintln!(
                "prodsys: cancelling the production of {} jobs …",
                planned.jobs
            );
            match bench.cancel(&planned).await {
                Ok(mut r) => {
                    if let Some(tap) = tap.take() {
                        r.messages = Some(tap.finish().await);
                    }
                    eprintln!(
                        "  {:.1} s (planned in {:.1} s); largest message {} bytes",
                        r.seconds,
                        r.plan_seconds,
                        r.messages.as_ref().map_or(0, |m| m.largest)
                    );
                    if r.unfinished != 0 {
                        results.errors.push(format!(
                            "cancel: {} jobs of {} not CANCELLED in the dispatcher",
                            r.unfinished, planned.production_id
                        ));
                    }
                    results.cancel = Some(r);
                }
                Err(e) => results.errors.push(format!("cancel: {e:#}")),
            }
        }
        if let Some(tap) = tap {
            tap.finish().await;
        }
        check(&mut results);
        eprintln!("prodsys: stopping and cleaning up …");
        results.service_rss_peak = bench.stop().await;
        // Each measurement starts the processes' high-water marks again, so
        // the peak over the run is the largest of theirs and the last one.
        let phase_peaks: Vec<(String, u64)> = results
            .phases()
            .iter()
            .flat_map(|(_, load)| load.max_rss.iter().map(|(s, r)| (s.clone(), *r)))
            .collect();
        for (service, rss) in phase_peaks {
            let peak = results.service_rss_peak.entry(service).or_default();
            *peak = (*peak).max(rss);
        }
    }
    if wants(Scenario::Containers) && scenario != Scenario::Raw {
        let plan = containers::ContainerPlan {
            jobs: args
                .container_jobs
                .unwrap_or(if args.smoke { 4 } else { 1000 }),
            concurrency: args.container_concurrency.unwrap_or(2),
            queued: args.container_queue.unwrap_or(4),
            poll_interval_ms: args.poll_interval_ms,
        };
        eprintln!(
            "containers: {} jobs, {} at once ({} queued), through prodsys and with podman run …",
            plan.jobs, plan.concurrency, plan.queued
        );
        match containers::run(plan).await {
            Ok(r) => {
                eprintln!(
                    "  podman run {:.1} s, prodsys {:.1} s: {:.2}×",
                    r.raw_seconds,
                    r.prodsys_seconds,
                    r.ratio()
                );
                results.containers = Some(r);
            }
            Err(e) => results.errors.push(format!("containers: {e:#}")),
        }
    }
    let productions_plan = productions::ProductionsPlan {
        productions: args
            .productions
            .unwrap_or(if args.smoke { 4 } else { 1000 }),
        jobs_per_production: args.jobs_per_production.unwrap_or(10),
        concurrency: args.production_concurrency.unwrap_or(4),
        queued: args.production_queue.unwrap_or(64),
        poll_interval_ms: args.poll_interval_ms,
        replicas: 1,
        raw: true,
        xrootd: args.xrootd,
    };
    if wants(Scenario::Productions) || (wants(Scenario::Replicas) && scenario == Scenario::Replicas)
    {
        let p = productions_plan;
        eprintln!(
            "productions: {} × {} toysim jobs, {} at once, through prodsys and a plain spawner …",
            p.productions, p.jobs_per_production, p.concurrency
        );
        match productions::run(p).await {
            Ok(r) => {
                eprintln!(
                    "  prodsys {:.1} s ({:.1} jobs/s), raw {:.1} s ({:.1} jobs/s): {:.2}×; {} of {} files verified",
                    r.prodsys_seconds,
                    r.prodsys_per_s(),
                    r.raw_seconds,
                    r.raw_per_s(),
                    r.ratio(),
                    r.files_verified,
                    r.files
                );
                results.productions = Some(r);
            }
            Err(e) => results.errors.push(format!("productions: {e:#}")),
        }
    }
    if wants(Scenario::Replicas) {
        let p = productions::ProductionsPlan {
            replicas: 2,
            raw: false,
            ..productions_plan
        };
        eprintln!(
            "replicas: the same {} × {} jobs with two processes of every service …",
            p.productions, p.jobs_per_production
        );
        match productions::run(p).await {
            Ok(r) => {
                eprintln!(
                    "  {:.1} s ({:.1} jobs/s); {} things done twice",
                    r.prodsys_seconds,
                    r.prodsys_per_s(),
                    r.duplicates.total()
                );
                results.replicated = Some(r);
            }
            Err(e) => results.errors.push(format!("replicas: {e:#}")),
        }
    }
    if wants(Scenario::Forwarding) {
        let defaults = prodsys_config::ForwardingSettings::default();
        let plan = forwarding::ForwardingPlan {
            files: args
                .forward_files
                .unwrap_or(if args.smoke { 200 } else { 10_000 }),
            file_bytes: args.forward_bytes.unwrap_or(4096),
            raw_batch: args.forward_batch.unwrap_or(defaults.claim_batch),
            // One invocation at a time, as many transfers in it as the
            // catalog has at once to the destination.
            raw_concurrency: 1,
            raw_parallel: args.forward_parallel.unwrap_or(16),
            rounds: if args.smoke { 1 } else { 3 },
        };
        eprintln!(
            "forwarding: {} files of {} bytes to XRootD by the catalog and by xrdcp …",
            plan.files, plan.file_bytes
        );
        match forwarding::run(plan).await {
            Ok(r) => {
                eprintln!(
                    "  xrdcp {:.1} s ({:.0} files/s; runs {:.1?} s), prodsys {:.1} s ({:.0} files/s; runs {:.1?} s): {:.2}×; {} verified, {} and {} on the storage",
                    r.raw_seconds,
                    r.raw_per_s(),
                    r.raw_runs,
                    r.prodsys_seconds,
                    r.prodsys_per_s(),
                    r.prodsys_runs,
                    r.ratio(),
                    r.verified,
                    r.stored,
                    r.raw_stored
                );
                results.forwarding = Some(r);
            }
            Err(e) => results.errors.push(format!("forwarding: {e:#}")),
        }
    }
    if wants(Scenario::Rucio) {
        let plan = rucio::RucioPlan {
            files: args
                .rucio_files
                .unwrap_or(if args.smoke { 200 } else { 10_000 }),
            batch: 500,
            raw_clients: args.rucio_raw_clients.unwrap_or(2),
        };
        eprintln!(
            "rucio: {} replicas registered by the catalog and by bulk REST calls …",
            plan.files
        );
        match rucio::run(plan).await {
            Ok(r) => {
                eprintln!(
                    "  bulk REST {:.1} s ({:.0} replicas/s), prodsys {:.1} s ({:.0} replicas/s): {:.2}×; Rucio lists {} and {}",
                    r.raw_seconds,
                    r.raw_per_s(),
                    r.prodsys_seconds,
                    r.prodsys_per_s(),
                    r.ratio(),
                    r.listed,
                    r.raw_listed
                );
                results.rucio = Some(r);
            }
            Err(e) => results.errors.push(format!("rucio: {e:#}")),
        }
    }
    if wants(Scenario::History) {
        let plan = history_plan(args);
        results.history_plan = Some(plan);
        match history_run(&plan).await {
            Ok(r) => results.history = Some(r),
            Err((r, e)) => {
                results.history = r;
                results.errors.push(format!("history: {e:#}"));
            }
        }
    }
    results.wall_seconds = began.elapsed().as_secs_f64();
    for error in &results.errors {
        eprintln!("FAILED: {error}");
    }
    Ok(results)
}

/// The history scenario on a stack of its own: submit on the empty catalog,
/// the fill, first pages, the stream, submit with the history.
async fn history_run(
    plan: &history::HistoryPlan,
) -> Result<history::HistoryResult, (Option<history::HistoryResult>, anyhow::Error)> {
    eprintln!("prodsys: a fresh stack for the catalog with a history …");
    let bench = stack::Bench::start().await.map_err(|e| (None, e))?;
    let mut result = history::HistoryResult::default();
    let outcome = history_steps(&bench, plan, &mut result).await;
    bench.stop().await;
    match outcome {
        Ok(()) => Ok(result),
        Err(e) => Err((Some(result), e)),
    }
}

async fn history_steps(
    bench: &stack::Bench,
    plan: &history::HistoryPlan,
    result: &mut history::HistoryResult,
) -> anyhow::Result<()> {
    let settle = Duration::from_secs(300);
    eprintln!(
        "prodsys: submit → verdict on the empty catalog, {} clients for {:?} …",
        plan.submit_clients, plan.submit_duration
    );
    bench.follow_received(false).await?;
    let empty = bench
        .submit_with(plan.submit_clients, plan.submit_duration, None)
        .await?;
    eprintln!("  {:.0} req/s decided", empty.decided_per_s());
    result.empty = Some(empty);
    bench.quiesce(settle).await?;
    eprintln!(
        "prodsys: filling the checker and catalog with {} productions, about {} files …",
        plan.productions, plan.files
    );
    history::fill(bench, plan, result).await?;
    eprintln!(
        "  {} files in {:.0} s (indexes {:.0} s, vacuum {:.0} s)",
        result.files, result.fill_seconds, result.index_seconds, result.vacuum_seconds
    );
    if let Err(e) = checkpoint().await {
        eprintln!("  no CHECKPOINT after the fill ({e:#})");
    }
    eprintln!(
        "prodsys: FindFiles first pages, {} queries …",
        plan.find_queries
    );
    let find = history::find(bench, plan).await?;
    eprintln!("  p50 {:.1} ms, p99 {:.1} ms", find.p50_ms, find.p99_ms);
    result.find = Some(find);
    eprintln!("prodsys: StreamFiles …");
    let stream = history::stream(bench).await?;
    eprintln!(
        "  {} files in {:.1} s ({:.0} files/s)",
        stream.files, stream.seconds, stream.files_per_s
    );
    result.stream = Some(stream);
    eprintln!("prodsys: submit → verdict with the history, one in ten a duplicate or an overlap …");
    let history = bench
        .submit_with(
            plan.submit_clients,
            plan.submit_duration,
            Some(plan.productions),
        )
        .await?;
    eprintln!(
        "  {:.0} req/s decided ({} accepted, {} rejected)",
        history.decided_per_s(),
        history.accepted_in_window,
        history.rejected
    );
    result.history = Some(history);
    bench.quiesce(settle).await?;
    Ok(())
}

/// "intake 12.3 MiB, checker …" in pipeline order.
pub fn rss_list(rss: &BTreeMap<String, u64>) -> String {
    services::ORDER
        .iter()
        .filter_map(|s| {
            rss.get(s.name())
                .map(|r| format!("{s} {:.1} MiB", sys::mib(*r)))
        })
        .collect::<Vec<_>>()
        .join(", ")
}
