//! prodctl — talk to a prodsys deployment from a terminal.
//!
//! `prodctl submit FILE [--watch]`, `prodctl watch ID`, `prodctl request ID`,
//! `prodctl status ID`, `prodctl files [ID] [--where 'nsb=5' ...]`, `prodctl get ID
//! [--to DIR] [--metadata k=v ...]`, `prodctl health`, `prodctl dlq
//! list|show|replay|drop SERVICE` (dead letters, over AMQP), `prodctl completions
//! SHELL`. `--output json` for scripts; the exit codes are in [`output::EXIT_CODES`].

mod dlq;
mod get;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{CommandFactory, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use output::Output;
use prodsys_proto as pb;
use serde::Deserialize;

#[derive(Parser)]
#[command(
    name = "prodctl",
    version,
    about = "Client of the prodsys production request system",
    after_help = output::EXIT_CODES
)]
struct Cli {
    /// Answer as text, or as JSON for scripts (JSON lines when following a production).
    #[arg(short, long, value_enum, default_value_t, global = true)]
    output: Output,
    #[arg(
        long,
        env = "PRODSYS_INTAKE_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    intake: String,
    #[arg(
        long,
        env = "PRODSYS_STATUS_URL",
        default_value = "http://127.0.0.1:50052",
        global = true
    )]
    status: String,
    #[arg(
        long,
        env = "PRODSYS_CATALOG_URL",
        default_value = "http://127.0.0.1:50053",
        global = true
    )]
    catalog: String,
    #[arg(
        long,
        env = "PRODSYS_CHECKER_URL",
        default_value = "http://127.0.0.1:50054",
        global = true
    )]
    checker: String,
    #[arg(
        long,
        env = "PRODSYS_DISPATCHER_URL",
        default_value = "http://127.0.0.1:50055",
        global = true
    )]
    dispatcher: String,
    /// Bearer token (a JWT of the WLCG profile) sent with every call; else
    /// --token-file, then BEARER_TOKEN and BEARER_TOKEN_FILE (WLCG bearer
    /// token discovery). None in the development mode.
    #[arg(long, env = "PRODSYS_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token (read at each run: an oidc-agent or a
    /// cron job may rewrite it).
    #[arg(long, env = "PRODSYS_TOKEN_FILE", global = true)]
    token_file: Option<std::path::PathBuf>,
    /// PEM CA certificate(s) to verify https:// services against.
    #[arg(long, env = "PRODSYS_CA_FILE", global = true)]
    ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate presented to https:// services that require
    /// one (`tls.client_ca_file`); with --key-file.
    #[arg(long, env = "PRODSYS_CERT_FILE", global = true, requires = "key_file")]
    cert_file: Option<std::path::PathBuf>,
    /// PEM private key of --cert-file.
    #[arg(long, env = "PRODSYS_KEY_FILE", global = true, requires = "cert_file")]
    key_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// How `prodctl record` renders a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum RecordFormat {
    Json,
    Markdown,
    RoCrate,
}

#[derive(Subcommand)]
enum Command {
    /// Submit a request file (JSON: profile, vo, backend, submitter, parameters).
    Submit {
        file: PathBuf,
        /// Follow the request to its production's end, then list its files.
        #[arg(long)]
        watch: bool,
        /// Resubmitting with the same key returns the same request.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Accept as an extension of an overlapping production (new run numbers).
        #[arg(long)]
        extend: bool,
        /// How long --watch waits in all, in seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Follow a production to its end; exit 0 only when it COMPLETED.
    Watch {
        production_id: String,
        /// How long to wait in all, in seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Dry run: violations, fingerprint, duplicates and overlaps, job plan, resource estimate.
    Validate {
        file: PathBuf,
        #[arg(long)]
        extend: bool,
    },
    /// List the production profiles the deployment accepts.
    Profiles,
    /// List the container templates requests may name: shipped and derived.
    Templates {
        /// Only the template of this name.
        #[arg(default_value = "")]
        name: String,
        /// Only this profile's templates.
        #[arg(long, default_value = "")]
        profile: String,
    },
    /// List the observation periods requests may name (`observation_period`).
    Periods {
        /// Only the period of this name.
        #[arg(default_value = "")]
        name: String,
        /// Only this profile's periods.
        #[arg(long, default_value = "")]
        profile: String,
    },
    /// Show where a request stands (for an observation period, every pointing's production).
    Request { request_id: String },
    /// Show a production's state and job counts.
    Status { production_id: String },
    /// Stop a production: its jobs are killed and it ends CANCELLED.
    Cancel {
        production_id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List catalogued files: of a production, a dataset, under an LFN
    /// prefix, and/or matching metadata conditions.
    Files {
        /// The production whose files to list.
        production_id: Option<String>,
        /// A metadata condition, compared as the key's type: `key=value`,
        /// `key!=value`, `key<value`, `key<=value`, `key>value`,
        /// `key>=value` or `key in v1,v2`. Repeat for several (all must hold).
        #[arg(long = "where", value_name = "CONDITION")]
        conditions: Vec<String>,
        /// Only files whose LFN starts with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Only files of this dataset.
        #[arg(long)]
        dataset: Option<String>,
        /// Print each file's metadata too.
        #[arg(long)]
        metadata: bool,
        /// Print each file's replicas on forwarding destinations too
        /// (destination, state, URL).
        #[arg(long)]
        replicas: bool,
    },
    /// Download a production's outputs from the best replica (a local file,
    /// then root://), checking size and adler32; files already present and
    /// correct are skipped, so running it again resumes.
    Get {
        production_id: String,
        /// Where the files go, each at its LFN below it.
        #[arg(long, default_value = ".")]
        to: PathBuf,
        /// Only files whose metadata matches: `key=value` (or any condition
        /// `files --where` takes). Repeat for several (all must hold).
        #[arg(long = "metadata", value_name = "CONDITION")]
        conditions: Vec<String>,
        /// The XRootD copy command for root:// replicas.
        #[arg(long, env = "PRODSYS_XRDCP", default_value = "xrdcp")]
        xrdcp: String,
    },
    /// Show a finished production's record: who asked for it and with what,
    /// how its jobs and attempts went, CPU time, timeline, what it wrote.
    Record {
        production_id: String,
        /// markdown for people (the default; JSON with `-o json`), json, or
        /// ro-crate: the record's Workflow Run RO-Crate
        /// (ro-crate-metadata.json), as the catalog keeps it.
        #[arg(long, value_enum)]
        format: Option<RecordFormat>,
    },
    /// Exit 0 when every service answers SERVING.
    Health,
    /// Dead letters of a service: list, show, replay or drop them (over AMQP).
    Dlq {
        /// The broker, as the services reach it.
        #[arg(
            long,
            env = "PRODSYS_AMQP_URL",
            default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
        )]
        amqp_url: String,
        /// A PEM CA an `amqps://` broker's certificate may chain to (`amqp.ca_file`).
        #[arg(long, env = "PRODSYS__AMQP__CA_FILE")]
        amqp_ca_file: Option<std::path::PathBuf>,
        /// The deployment's prefix of exchange and queue names (`amqp.prefix`).
        #[arg(long, env = "PRODSYS__AMQP__PREFIX", default_value = "")]
        prefix: String,
        /// Most dead letters read at once.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
        #[command(subcommand)]
        action: DlqCommand,
    },
    /// Print a completion script: `prodctl completions bash > /etc/bash_completion.d/prodctl`.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// One line per dead letter: message ID, event type, original routing key, reason, time.
    List { service: String },
    /// Properties, headers and body of a dead letter.
    Show { service: String, message_id: String },
    /// Publish again to the service's queue (without the dead-letter headers),
    /// then remove the dead letter. Idempotent: an event that already took
    /// effect changes nothing.
    Replay {
        service: String,
        message_id: Option<String>,
        /// Every dead letter of the service.
        #[arg(long, conflicts_with = "message_id")]
        all: bool,
    },
    /// Remove dead letters for good.
    Drop {
        service: String,
        message_id: Option<String>,
        #[arg(long, conflicts_with = "message_id")]
        all: bool,
    },
}

/// The message a command names, or all of them with `--all`; one of the two is required.
fn selection(message_id: Option<String>, all: bool) -> anyhow::Result<Option<String>> {
    match (message_id, all) {
        (Some(id), false) => Ok(Some(id)),
        (None, true) => Ok(None),
        _ => bail!("name a message ID, or give --all"),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestFile {
    profile: String,
    vo: String,
    #[serde(default)]
    backend: String,
    #[serde(default)]
    submitter: String,
    #[serde(default)]
    idempotency_key: String,
    #[serde(default)]
    extend: bool,
    #[serde(default)]
    reuse_existing: bool,
    /// Dispatch priority among productions waiting for the same installation (higher first).
    #[serde(default)]
    priority: i32,
    /// Forwarding destinations besides the profile's defaults.
    #[serde(default)]
    forward: Vec<String>,
    /// `forward` replaces the profile's defaults.
    #[serde(default)]
    forward_replace: bool,
    parameters: serde_json::Value,
    /// Steps chained after this request, each taking the outputs of the
    /// one before (its input parameter is "{previous}").
    #[serde(default)]
    chain: Vec<ChainStepFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChainStepFile {
    profile: String,
    parameters: serde_json::Value,
}

impl RequestFile {
    fn load(file: &PathBuf) -> anyhow::Result<pb::SubmitRequestRequest> {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let r: RequestFile = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a request file", file.display()))?;
        Ok(pb::SubmitRequestRequest {
            profile: r.profile,
            vo: r.vo,
            parameters_json: r.parameters.to_string(),
            backend: r.backend,
            idempotency_key: r.idempotency_key,
            submitter: r.submitter,
            extend: r.extend,
            reuse_existing: r.reuse_existing,
            priority: r.priority,
            forward: r.forward,
            forward_replace: r.forward_replace,
            chain: r
                .chain
                .into_iter()
                .map(|s| pb::ChainStep {
                    profile: s.profile,
                    parameters_json: s.parameters.to_string(),
                })
                .collect(),
        })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            // --help and --version are answers; anything else is a usage error.
            return ExitCode::from(if error.use_stderr() {
                output::FAILURE
            } else {
                output::OK
            });
        }
    };
    output::set(cli.output);
    if let Err(error) = set_credentials(&cli) {
        return output::report(&error);
    }
    match run(cli).await {
        Ok(code) => code,
        Err(error) => output::report(&error),
    }
}

/// The bearer token, CA and client certificate of every call, from the
/// command line or the environment.
struct ClientAuth {
    token: Option<String>,
    ca_file: Option<std::path::PathBuf>,
    certificate: Option<prodsys_auth::tls::ClientCertificate>,
}

static CLIENT_AUTH: std::sync::OnceLock<ClientAuth> = std::sync::OnceLock::new();

fn set_credentials(cli: &Cli) -> anyhow::Result<()> {
    let read = |path: &std::path::Path, what: &str| -> anyhow::Result<String> {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("{what}: reading {}", path.display()))?;
        let token = token.trim().to_string();
        anyhow::ensure!(!token.is_empty(), "{what}: {} is empty", path.display());
        Ok(token)
    };
    let token = match (&cli.token, &cli.token_file) {
        (Some(token), _) => Some(token.trim().to_string()),
        (None, Some(path)) => Some(read(path, "--token-file")?),
        (None, None) => match (
            std::env::var("BEARER_TOKEN")
                .ok()
                .filter(|t| !t.trim().is_empty()),
            std::env::var_os("BEARER_TOKEN_FILE"),
        ) {
            (Some(token), _) => Some(token.trim().to_string()),
            (None, Some(path)) => Some(read(std::path::Path::new(&path), "BEARER_TOKEN_FILE")?),
            (None, None) => None,
        },
    };
    let certificate = match (&cli.cert_file, &cli.key_file) {
        (Some(cert), Some(key)) => Some(prodsys_auth::tls::ClientCertificate::from_files(
            cert,
            "--cert-file",
            key,
            "--key-file",
        )?),
        _ => None,
    };
    let _ = CLIENT_AUTH.set(ClientAuth {
        token,
        ca_file: cli.ca_file.clone(),
        certificate,
    });
    Ok(())
}

pub(crate) async fn connect(url: &str) -> anyhow::Result<prodsys_auth::Channel> {
    let auth = CLIENT_AUTH.get_or_init(|| ClientAuth {
        token: None,
        ca_file: None,
        certificate: None,
    });
    let channel = prodsys_auth::tls::client_endpoint(
        url,
        auth.ca_file.as_deref(),
        auth.certificate.as_ref(),
        "--ca-file",
    )
    .with_context(|| format!("invalid URL {url}"))?
    .connect_timeout(Duration::from_secs(5))
    .connect()
    .await
    .map_err(|error| {
        anyhow::Error::from(output::Failure::new(
            output::UNAVAILABLE,
            "UNAVAILABLE",
            format!("cannot reach {url}: {error}"),
        ))
    })?;
    let credentials = match &auth.token {
        Some(token) => prodsys_auth::Credentials::bearer(token.as_str()),
        None => prodsys_auth::Credentials::none(),
    };
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel,
        credentials,
    ))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Submit {
            ref file,
            watch,
            ref idempotency_key,
            extend,
            timeout,
        } => {
            let mut request = RequestFile::load(file)?;
            if let Some(key) = idempotency_key {
                request.idempotency_key = key.clone();
            }
            request.extend |= extend;
            if request.chain.is_empty() {
                submit(&cli, request, watch, Duration::from_secs(timeout)).await
            } else {
                submit_chain(&cli, request, watch, Duration::from_secs(timeout)).await
            }
        }
        Command::Watch {
            ref production_id,
            timeout,
        } => {
            let deadline = Instant::now() + Duration::from_secs(timeout);
            let state = watch_production(&cli, production_id, deadline).await?;
            Ok(ended(state))
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "prodctl",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { ref file, extend } => {
            let mut request = RequestFile::load(file)?;
            request.extend |= extend;
            let mut intake =
                pb::request_service_client::RequestServiceClient::new(connect(&cli.intake).await?);
            let v = intake
                .validate_request(request)
                .await
                .map_err(output::status)?
                .into_inner();
            if output::json() {
                output::print(&output::validation(&v));
            } else {
                print_validation(&v);
            }
            Ok(if v.acceptable {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(output::INVALID)
            })
        }
        Command::Request { ref request_id } => {
            let mut intake =
                pb::request_service_client::RequestServiceClient::new(connect(&cli.intake).await?);
            let request = intake
                .get_request(pb::GetRequestRequest {
                    request_id: request_id.clone(),
                })
                .await
                .map_err(output::status)?
                .into_inner();
            if output::json() {
                output::print(&output::request(&request));
            } else {
                print_request(&request);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { ref production_id } => {
            let mut status =
                pb::status_service_client::StatusServiceClient::new(connect(&cli.status).await?);
            let production = status
                .get_production(pb::GetProductionRequest {
                    production_id: production_id.clone(),
                })
                .await
                .map_err(output::status)?
                .into_inner();
            if output::json() {
                output::print(&output::production(&production));
            } else {
                println!("{}", progress_line(&production));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Files {
            ref production_id,
            ref conditions,
            ref prefix,
            ref dataset,
            metadata,
            replicas,
        } => {
            let conditions = match conditions
                .iter()
                .map(|c| parse_condition(c))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(c) => c,
                Err(e) => {
                    return Err(output::Failure::new(output::FAILURE, "INVALID_ARGUMENT", e).into());
                }
            };
            let query = pb::FindFilesRequest {
                production_id: production_id.clone().unwrap_or_default(),
                conditions,
                lfn_prefix: prefix.clone().unwrap_or_default(),
                dataset: dataset.clone().unwrap_or_default(),
                ..Default::default()
            };
            let count = stream_files(&cli.catalog, query, metadata, replicas).await?;
            if !output::json() {
                eprintln!("{count} file(s)");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Get {
            ref production_id,
            ref to,
            ref conditions,
            ref xrdcp,
        } => {
            let conditions = match conditions
                .iter()
                .map(|c| parse_condition(c))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("prodctl get: {e}");
                    return Ok(ExitCode::from(2));
                }
            };
            let query = pb::FindFilesRequest {
                production_id: production_id.clone(),
                conditions,
                ..Default::default()
            };
            get::run(&cli.catalog, query, to, xrdcp).await
        }
        Command::Record {
            ref production_id,
            format,
        } => {
            let format = match format {
                Some(RecordFormat::Json) => pb::RecordFormat::Json,
                Some(RecordFormat::Markdown) => pb::RecordFormat::Markdown,
                Some(RecordFormat::RoCrate) => pb::RecordFormat::RoCrate,
                None if output::json() => pb::RecordFormat::Json,
                None => pb::RecordFormat::Markdown,
            };
            let mut catalog =
                pb::catalog_service_client::CatalogServiceClient::new(connect(&cli.catalog).await?);
            let record = catalog
                .get_production_record(pb::GetProductionRecordRequest {
                    production_id: production_id.clone(),
                    format: format as i32,
                })
                .await
                .map_err(output::status)?
                .into_inner();
            let text = record.rendered;
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Health => health(&cli).await,
        Command::Dlq {
            ref amqp_url,
            ref amqp_ca_file,
            ref prefix,
            limit,
            ref action,
        } => {
            let (service, action) = match action {
                DlqCommand::List { service } => (service, dlq::Action::List),
                DlqCommand::Show {
                    service,
                    message_id,
                } => (service, dlq::Action::Show(message_id.clone())),
                DlqCommand::Replay {
                    service,
                    message_id,
                    all,
                } => (
                    service,
                    dlq::Action::Replay(selection(message_id.clone(), *all)?),
                ),
                DlqCommand::Drop {
                    service,
                    message_id,
                    all,
                } => (
                    service,
                    dlq::Action::Drop(selection(message_id.clone(), *all)?),
                ),
            };
            let tls =
                prodsys_messaging::broker::tls_from_files(amqp_ca_file.as_deref(), None, None)?;
            prodsys_messaging::broker::check_tls_url(amqp_url, &tls, "--amqp-url")?;
            dlq::run(amqp_url, &tls, prefix, service, action, limit).await
        }
        Command::Cancel {
            ref production_id,
            ref reason,
        } => {
            let mut intake =
                pb::request_service_client::RequestServiceClient::new(connect(&cli.intake).await?);
            let answer = intake
                .cancel_production(pb::CancelProductionRequest {
                    production_id: production_id.clone(),
                    reason: reason.clone(),
                })
                .await
                .map_err(output::status)?
                .into_inner();
            if output::json() {
                output::print(&serde_json::json!({
                    "production_id": production_id,
                    "accepted": answer.accepted,
                }));
            } else {
                println!(
                    "cancellation of {production_id} requested; follow it with: prodctl status {production_id}"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Profiles => {
            let mut intake =
                pb::request_service_client::RequestServiceClient::new(connect(&cli.intake).await?);
            let list = intake
                .list_profiles(pb::ListProfilesRequest {})
                .await
                .map_err(output::status)?
                .into_inner();
            if output::json() {
                output::print(&list.profiles.iter().map(output::profile).collect());
                return Ok(ExitCode::SUCCESS);
            }
            for p in &list.profiles {
                let vos = if p.vos.is_empty() {
                    "any VO".to_string()
                } else {
                    p.vos.join(", ")
                };
                println!("{}  ({}, IDs {}-NNNNNN)", p.name, vos, p.id_prefix);
                println!("    {}", p.description);
                println!("    identity: {}", p.identity.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Periods { name, profile } => {
            let mut intake =
                pb::request_service_client::RequestServiceClient::new(connect(&cli.intake).await?);
            let list = intake
                .list_periods(pb::ListPeriodsRequest { profile, name })
                .await
                .map_err(output::status)?
                .into_inner();
            if output::json() {
                output::print(&list.periods.iter().map(output::period).collect());
                return Ok(ExitCode::SUCCESS);
            }
            if list.periods.is_empty() {
                println!("no observation periods");
            }
            for p in &list.periods {
                println!(
                    "{}  ({}, {} to {})",
                    p.name, p.profile, p.valid_from, p.valid_until
                );
                if !p.description.is_empty() {
                    println!("    {}", p.description);
                }
                println!("    site:         {}", p.site);
                println!("    array layout: {}", p.array_layout);
                let nsb: Vec<String> = p.nsb_levels.iter().map(u32::to_string).collect();
                println!("    NSB levels:   {}", nsb.join(", "));
                println!("    atmosphere:   {}", p.atmosphere);
                println!("    pointings:    {}", p.pointings.len());
                for q in &p.pointings {
                    println!("      {}", q.label);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Templates { name, profile } => {
            let mut intake =
                pb::request_service_client::RequestServiceClient::new(connect(&cli.intake).await?);
            let list = intake
                .list_templates(pb::ListTemplatesRequest { profile, name })
                .await
                .map_err(output::status)?
                .into_inner();
            if output::json() {
                output::print(&list.templates.iter().map(output::template).collect());
                return Ok(ExitCode::SUCCESS);
            }
            if list.templates.is_empty() {
                println!("no container templates");
            }
            for t in &list.templates {
                let kind = if t.derived_from == t.name {
                    "shipped".to_string()
                } else {
                    format!("derived from {}", t.derived_from)
                };
                println!("{}  ({}, {kind})", t.name, t.profile);
                if !t.description.is_empty() && t.derived_from == t.name {
                    println!("    {}", t.description);
                }
                println!("    version:     {}", t.version);
                println!("    image:       {}", t.image);
                println!("    runtime:     {}", t.runtime);
                println!("    entrypoint:  {}", t.entrypoint.join(" "));
                println!("    parameters:  {}", t.parameters_json);
                println!("    overridable: {}", t.overridable_json);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn health(cli: &Cli) -> anyhow::Result<ExitCode> {
    let mut all = true;
    let mut answers = Vec::new();
    for (name, url) in [
        ("intake", &cli.intake),
        ("checker", &cli.checker),
        ("dispatcher", &cli.dispatcher),
        ("status", &cli.status),
        ("catalog", &cli.catalog),
    ] {
        let verdict = match connect(url).await {
            Ok(channel) => {
                let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
                match client
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                {
                    Ok(r) => match r.into_inner().status() {
                        tonic_health::pb::health_check_response::ServingStatus::Serving => {
                            "SERVING".to_string()
                        }
                        other => format!("{other:?}"),
                    },
                    Err(status) => output::status(status).to_string(),
                }
            }
            Err(error) => format!("{error:#}"),
        };
        all &= verdict == "SERVING";
        if output::json() {
            answers.push(serde_json::json!({"service": name, "url": url, "status": verdict}));
        } else {
            println!("{name:<10} {url:<28} {verdict}");
        }
    }
    if output::json() {
        output::print(&answers.into());
    }
    Ok(if all {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(output::UNAVAILABLE)
    })
}

fn print_validation(v: &pb::Validation) {
    println!("acceptable   {}", if v.acceptable { "yes" } else { "no" });
    if !v.period.is_empty() {
        println!(
            "period       {} ({} pointing(s), one production each)",
            v.period,
            v.pointings.len()
        );
    }
    if !v.parameters_json.is_empty() {
        println!("parameters   {}", v.parameters_json);
    }
    for p in &v.pointings {
        println!(
            "pointing     {}: {}",
            p.pointing,
            if p.acceptable {
                "new production"
            } else {
                "not produced"
            }
        );
        print_validation_details(p, "  ");
    }
    print_validation_details(v, "");
}

fn print_validation_details(v: &pb::Validation, indent: &str) {
    if !indent.is_empty() {
        if !v.parameters_json.is_empty() {
            println!("{indent}parameters   {}", v.parameters_json);
        }
        for violation in &v.violations {
            println!("{indent}  {}: {}", violation.field, violation.description);
        }
    }
    let println = |line: String| println!("{indent}{line}");
    if !v.fingerprint.is_empty() {
        println(format!("fingerprint  {}", v.fingerprint));
    }
    if !v.existing_production_id.is_empty() {
        println(format!("duplicate of {}", v.existing_production_id));
    }
    for o in &v.overlaps {
        println(format!(
            "overlaps     {}: {}",
            o.production_id, o.description
        ));
    }
    // Why: per identity, what the existence check found and which keys differ.
    for explanation in &v.explanations {
        println(format!("why          {explanation}"));
    }
    if let Some(p) = &v.plan {
        println(format!(
            "plan         {} job(s) of {} unit(s), {} in all, runs {}..{}",
            p.jobs, p.units_per_job, p.total_units, p.first_run, p.last_run
        ));
    }
    if let Some(e) = &v.estimate {
        println(format!(
            "estimate     {:.0} CPU s, {:.1} MB disk, {} MB memory per job; {:.2} CPU h, {:.3} GB in all",
            e.cpu_seconds_per_job,
            e.disk_mb_per_job,
            e.memory_mb,
            e.cpu_hours_total,
            e.disk_gb_total
        ));
    }
    if indent.is_empty() {
        for violation in &v.violations {
            println!("  {}: {}", violation.field, violation.description);
        }
    }
}

async fn submit(
    cli: &Cli,
    request: pb::SubmitRequestRequest,
    watch: bool,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let mut intake =
        pb::request_service_client::RequestServiceClient::new(connect(&cli.intake).await?);
    let answer = intake.submit_request(request).await;
    let answer = answer.map_err(output::status)?.into_inner();
    if output::json() {
        output::print(&serde_json::json!({"submitted": output::submitted(&answer)}));
    } else {
        println!(
            "request {}{}",
            answer.request_id,
            if answer.replayed {
                " (already submitted with this key)"
            } else {
                ""
            }
        );
    }
    if !watch {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = Instant::now() + timeout;
    let request = loop {
        let request = intake
            .get_request(pb::GetRequestRequest {
                request_id: answer.request_id.clone(),
            })
            .await
            .map_err(output::status)?
            .into_inner();
        if request.state() != pb::RequestState::Received {
            break request;
        }
        if Instant::now() > deadline {
            bail!("request {} was not checked in time", answer.request_id);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if output::json() {
        output::print(&serde_json::json!({"request": output::request(&request)}));
    } else {
        print_request(&request);
    }
    if request.state() == pb::RequestState::Rejected {
        return Ok(ExitCode::from(output::INVALID));
    }
    // A request that named an observation period has a production per
    // pointing: each is followed in turn.
    let mut productions: Vec<String> = request
        .productions
        .iter()
        .filter(|p| !p.production_id.is_empty())
        .map(|p| p.production_id.clone())
        .collect();
    if productions.is_empty() {
        productions.push(request.production_id.clone());
    }
    let mut final_state = pb::ProductionState::Completed;
    for production_id in &productions {
        let state = watch_production(cli, production_id, deadline).await?;
        if state != pb::ProductionState::Completed {
            final_state = state;
        }
        // The catalog may be a moment behind the status service: wait for its record.
        let mut catalog =
            pb::catalog_service_client::CatalogServiceClient::new(connect(&cli.catalog).await?);
        loop {
            let record = catalog
                .get_production_record(pb::GetProductionRecordRequest {
                    production_id: production_id.clone(),
                    ..Default::default()
                })
                .await;
            match record {
                Ok(_) => break,
                Err(s) if s.code() == tonic::Code::NotFound && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(s) => return Err(output::status(s)),
            }
        }
        let count = print_files(&cli.catalog, production_id).await?;
        if !output::json() {
            println!("{count} file(s) catalogued for {production_id}");
        }
    }
    Ok(ended(final_state))
}

/// Exit 0 when the production COMPLETED, else the code for "ended otherwise".
/// Submits a request and the chain of steps after it: the whole chain is
/// validated first (nothing is submitted if a step cannot connect), then
/// each step is submitted once the one before it is accepted, naming its
/// production where the step says "{previous}"; with `watch`, every step is
/// followed to its end.
async fn submit_chain(
    cli: &Cli,
    mut request: pb::SubmitRequestRequest,
    watch: bool,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let mut intake =
        pb::request_service_client::RequestServiceClient::new(connect(&cli.intake).await?);
    let validation = intake
        .validate_request(request.clone())
        .await
        .map_err(output::status)?
        .into_inner();
    if !validation.acceptable {
        if output::json() {
            output::print(&output::validation(&validation));
        } else {
            print_validation(&validation);
        }
        return Ok(ExitCode::from(output::INVALID));
    }
    let deadline = Instant::now() + timeout;
    let steps = std::mem::take(&mut request.chain);
    let mut previous = String::new();
    let mut productions = Vec::new();
    for (i, step) in std::iter::once(None)
        .chain(steps.into_iter().map(Some))
        .enumerate()
    {
        let mut this = request.clone();
        if let Some(step) = step {
            let mut parameters: serde_json::Value = serde_json::from_str(&step.parameters_json)?;
            if let Some(fields) = parameters.as_object_mut() {
                for value in fields.values_mut() {
                    if value.as_str() == Some("{previous}") {
                        *value = previous.clone().into();
                    }
                }
            }
            this.profile = step.profile;
            this.parameters_json = parameters.to_string();
            // A step's key is its own (a retried chain replays each step).
            if !request.idempotency_key.is_empty() {
                this.idempotency_key = format!("{}.step{i}", request.idempotency_key);
            }
        }
        let answer = intake
            .submit_request(this.clone())
            .await
            .map_err(output::status)?
            .into_inner();
        let decided = loop {
            let r = intake
                .get_request(pb::GetRequestRequest {
                    request_id: answer.request_id.clone(),
                })
                .await
                .map_err(output::status)?
                .into_inner();
            if r.state() != pb::RequestState::Received {
                break r;
            }
            if Instant::now() > deadline {
                bail!("request {} was not checked in time", answer.request_id);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        if output::json() {
            output::print(&serde_json::json!({"step": i, "profile": this.profile,
                "request": output::request(&decided)}));
        } else {
            println!("step {i} ({})", this.profile);
            print_request(&decided);
        }
        if decided.state() != pb::RequestState::Accepted {
            return Ok(ExitCode::from(output::INVALID));
        }
        previous = decided.production_id.clone();
        productions.push(previous.clone());
    }
    if !watch {
        return Ok(ExitCode::SUCCESS);
    }
    let mut last = pb::ProductionState::Completed;
    for production_id in &productions {
        let state = watch_production(cli, production_id, deadline).await?;
        if state != pb::ProductionState::Completed {
            last = state;
        }
    }
    Ok(ended(last))
}

fn ended(state: pb::ProductionState) -> ExitCode {
    if state == pb::ProductionState::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(output::NOT_COMPLETED)
    }
}

fn print_request(request: &pb::Request) {
    println!("request {} {:?}", request.request_id, request.state());
    if !request.production_id.is_empty() {
        println!("production {}", request.production_id);
    }
    if !request.existing_production_id.is_empty() {
        println!("duplicate of production {}", request.existing_production_id);
    }
    if !request.period.is_empty() {
        println!("observation period {}", request.period);
    }
    for p in &request.productions {
        let outcome = if !p.production_id.is_empty() {
            format!("production {}", p.production_id)
        } else if p.violations.is_empty() && !p.existing_production_id.is_empty() {
            format!("existing production {}", p.existing_production_id)
        } else {
            "not produced".to_string()
        };
        println!("  {}: {outcome}", p.pointing);
        for v in &p.violations {
            println!("      {}: {}", v.field, v.description);
        }
    }
    for v in &request.violations {
        println!("  {}: {}", v.field, v.description);
    }
}

fn progress_line(p: &pb::Production) -> String {
    let c = p.counts.unwrap_or_default();
    let held = if p.held_reason.is_empty() {
        String::new()
    } else {
        format!(" — {}", p.held_reason)
    };
    let forwarding: String = p
        .forwarding
        .iter()
        .map(|d| {
            format!(
                ", forwarded to {} {}/{}",
                d.destination, d.forwarded, d.total
            )
        })
        .collect();
    let finished = match (p.finished, p.forwarding.is_empty()) {
        (true, true) => ", outputs catalogued",
        (true, false) => ", outputs in place",
        (false, _) => "",
    };
    let pointing = if p.period.is_empty() {
        String::new()
    } else {
        format!(" ({}, {})", p.period, p.pointing)
    };
    // A chained production: the input files its jobs took, and its note.
    let inputs = match (p.inputs_used, p.inputs_note.as_str()) {
        (0, "") if p.state() != pb::ProductionState::WaitingForInput => String::new(),
        (used, "") => format!(", input files used {used}"),
        (used, note) => format!(", input files used {used} — {note}"),
    };
    // A group of installations (or `any`): where its jobs are.
    let placed = match p.installations.as_slice() {
        [] => String::new(),
        [only] if only.installation == p.backend => String::new(),
        all => {
            let each: Vec<String> = all
                .iter()
                .map(|i| {
                    let c = i.counts.unwrap_or_default();
                    format!(
                        "{} {} in flight {} done",
                        i.installation,
                        c.submitted + c.queued + c.running,
                        c.done
                    )
                })
                .collect();
            format!(", on {}", each.join(", "))
        }
    };
    format!(
        "{}{pointing} {:?} jobs {}: created {} submitted {} queued {} running {} done {} failed {} exhausted {} cancelled {}{inputs}{placed}{forwarding}{finished}{held}",
        p.production_id,
        p.state(),
        p.job_total,
        c.created,
        c.submitted,
        c.queued,
        c.running,
        c.done,
        c.failed,
        c.exhausted,
        c.cancelled
    )
}

async fn watch_production(
    cli: &Cli,
    production_id: &str,
    deadline: Instant,
) -> anyhow::Result<pb::ProductionState> {
    let mut status =
        pb::status_service_client::StatusServiceClient::new(connect(&cli.status).await?);
    // The status service may not have seen the acceptance yet.
    let mut stream = loop {
        match status
            .watch_production(pb::GetProductionRequest {
                production_id: production_id.to_string(),
            })
            .await
        {
            Ok(stream) => break stream.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => return Err(output::status(s)),
        }
    };
    let mut last = pb::ProductionState::Unspecified;
    let bar = progress_bar();
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let message = match tokio::time::timeout(remaining, stream.message()).await {
            Err(_) => {
                bar.abandon();
                return Err(output::Failure::new(
                    output::NOT_COMPLETED,
                    "DEADLINE_EXCEEDED",
                    format!("production {production_id} did not finish in time"),
                )
                .into());
            }
            Ok(message) => message,
        };
        match message {
            Ok(Some(snapshot)) => {
                if output::json() {
                    output::print(
                        &serde_json::json!({"production": output::production(&snapshot)}),
                    );
                } else if bar.is_hidden() {
                    println!("{}", progress_line(&snapshot));
                } else {
                    let c = snapshot.counts.unwrap_or_default();
                    bar.set_length(snapshot.job_total);
                    bar.set_position(c.done);
                    bar.set_message(format!(
                        "{} {:?}: {} running, {} failed",
                        snapshot.production_id,
                        snapshot.state(),
                        c.running,
                        c.failed + c.exhausted
                    ));
                    if snapshot.state() != last && last != pb::ProductionState::Unspecified {
                        bar.println(progress_line(&snapshot));
                    }
                }
                last = snapshot.state();
            }
            Ok(None) => {
                bar.finish();
                return Ok(last);
            }
            Err(s) => {
                bar.abandon();
                return Err(output::status(s));
            }
        }
    }
}

/// Jobs done of the total, with running and failed counts; hidden unless text
/// goes to a terminal, so scripts see the plain lines.
fn progress_bar() -> ProgressBar {
    use std::io::IsTerminal;
    if output::json() || !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    if let Ok(style) =
        ProgressStyle::with_template("[{elapsed_precise}] {wide_bar} {pos}/{len} jobs done  {msg}")
    {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// `key=value`, `key!=value`, `key<value`, `key<=value`, `key>value`,
/// `key>=value` or `key in v1,v2` as a condition.
fn parse_condition(text: &str) -> Result<pb::MetadataCondition, String> {
    use pb::ConditionOperator as Op;
    let text = text.trim();
    let condition = |key: &str, operator: Op, values: Vec<String>| {
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("{text:?} names no metadata key"));
        }
        Ok(pb::MetadataCondition {
            key: key.to_string(),
            operator: operator as i32,
            values,
        })
    };
    if let Some((key, values)) = text.split_once(" in ") {
        let values: Vec<String> = values
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            return Err(format!("{text:?} lists no values after `in`"));
        }
        return condition(key, Op::In, values);
    }
    let Some(at) = text.find(['=', '!', '<', '>']) else {
        return Err(format!(
            "{text:?} is not a condition: write key=value, key!=value, key<value, key<=value, key>value, key>=value or 'key in v1,v2'"
        ));
    };
    let (key, rest) = text.split_at(at);
    let (operator, value) = [
        ("!=", Op::Ne),
        ("<=", Op::Le),
        (">=", Op::Ge),
        ("=", Op::Eq),
        ("<", Op::Lt),
        (">", Op::Gt),
    ]
    .into_iter()
    .find_map(|(symbol, op)| rest.strip_prefix(symbol).map(|v| (op, v)))
    .ok_or_else(|| format!("{text:?}: unknown operator"))?;
    condition(key, operator, vec![value.trim().to_string()])
}

/// Prints every file `query` finds, from the catalog's stream; returns how many.
async fn stream_files(
    catalog_url: &str,
    query: pb::FindFilesRequest,
    with_metadata: bool,
    with_replicas: bool,
) -> anyhow::Result<usize> {
    let mut catalog =
        pb::catalog_service_client::CatalogServiceClient::new(connect(catalog_url).await?);
    // What files share comes once per class (far less to decode for
    // answers of millions of files); each file is made whole here.
    let query = pb::FindFilesRequest {
        metadata_by_class: true,
        ..query
    };
    let mut stream = catalog
        .stream_files(query)
        .await
        .map_err(output::status)?
        .into_inner();
    let mut count = 0;
    let mut all = Vec::new();
    let mut classes: std::collections::HashMap<u64, pb::FileClass> = Default::default();
    while let Some(mut page) = stream.message().await.map_err(output::status)? {
        classes.extend(page.classes.drain(..).map(|c| (c.class_id, c)));
        // Only files with replicas are listed, by LFN.
        let replicas: std::collections::HashMap<&str, &[pb::Replica]> = page
            .replicas
            .iter()
            .map(|r| (r.lfn.as_str(), r.replicas.as_slice()))
            .collect();
        for f in &mut page.files {
            if let Some(class) = classes.get(&f.class_id) {
                for (k, v) in &class.metadata {
                    f.metadata.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
        }
        for f in &page.files {
            let of_file = replicas.get(f.lfn.as_str()).copied().unwrap_or_default();
            if output::json() {
                let mut file = output::file(f);
                if with_replicas {
                    file["replicas"] = of_file.iter().map(output::replica).collect();
                }
                all.push(file);
            } else if with_metadata {
                let mut pairs: Vec<String> =
                    f.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
                pairs.sort();
                println!(
                    "{}  {:>12}  adler32:{}  {}",
                    f.lfn,
                    f.size,
                    f.adler32,
                    pairs.join(" ")
                );
            } else {
                println!("{}  {:>12}  adler32:{}", f.lfn, f.size, f.adler32);
            }
            if with_replicas && !output::json() {
                for r in of_file {
                    println!(
                        "    {} {} {}",
                        r.destination,
                        output::replica_state(r),
                        r.url
                    );
                }
            }
        }
        count += page.files.len();
    }
    if output::json() {
        output::print(&all.into());
    }
    Ok(count)
}

async fn print_files(catalog_url: &str, production_id: &str) -> anyhow::Result<usize> {
    let mut catalog =
        pb::catalog_service_client::CatalogServiceClient::new(connect(catalog_url).await?);
    let mut token = String::new();
    let mut count = 0;
    let mut all = Vec::new();
    loop {
        let page = catalog
            .find_files(pb::FindFilesRequest {
                production_id: production_id.to_string(),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .map_err(output::status)?
            .into_inner();
        for f in &page.files {
            if output::json() {
                all.push(output::file(f));
            } else {
                println!("{}  {:>12}  adler32:{}", f.lfn, f.size, f.adler32);
            }
        }
        count += page.files.len();
        if page.next_page_token.is_empty() {
            if output::json() {
                output::print(&serde_json::json!({
                    "production_id": production_id,
                    "files": all,
                }));
            }
            return Ok(count);
        }
        token = page.next_page_token;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_parse_with_each_operator() {
        use pb::ConditionOperator as Op;
        let parsed = |text: &str| {
            let c = parse_condition(text).unwrap();
            (c.key, Op::try_from(c.operator).unwrap(), c.values)
        };
        assert_eq!(parsed("nsb=5"), ("nsb".into(), Op::Eq, vec!["5".into()]));
        assert_eq!(
            parsed("thetaP>=20"),
            ("thetaP".into(), Op::Ge, vec!["20".into()])
        );
        assert_eq!(parsed("thetaP > 20").1, Op::Gt);
        assert_eq!(parsed("thetaP<20").1, Op::Lt);
        assert_eq!(parsed("thetaP<=20").1, Op::Le);
        assert_eq!(parsed("site!=Paranal").1, Op::Ne);
        assert_eq!(
            parsed("particle in gamma, proton"),
            (
                "particle".into(),
                Op::In,
                vec!["gamma".into(), "proton".into()]
            )
        );
        assert!(parse_condition("nsb").is_err());
        assert!(parse_condition("=5").is_err());
        assert!(parse_condition("nsb in ").is_err());
    }
}
