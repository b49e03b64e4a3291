//! Settings of every prodsys process. Defaults work on a developer machine
//! (PostgreSQL and RabbitMQ on 127.0.0.1); a TOML file and then environment
//! variables (`PRODSYS__DATABASE__URL`, `PRODSYS__AMQP__PREFIX`, …) override
//! them. URLs that may hold passwords are secrets and never print; they are
//! written out only when whole settings are serialised on purpose (a settings
//! file handed to a child process).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

mod auth;
mod federation;
mod rucio;
pub use auth::{AuthSettings, ClientIdentity, IssuerSettings, TlsSettings};
pub use federation::{ANY, FederationSettings};
pub use rucio::{RucioAuth, RucioRule, RucioSettings};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Settings {
    pub profiles_dir: PathBuf,
    /// Directory of container templates (one JSON file per profile whose
    /// jobs run in containers); one that does not exist holds none.
    pub templates_dir: PathBuf,
    /// Directory of observation periods (one TOML file per period); one
    /// that does not exist holds none.
    pub periods_dir: PathBuf,
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub grpc: GrpcSettings,
    pub intake: IntakeSettings,
    pub checker: CheckerSettings,
    pub dispatcher: DispatcherSettings,
    pub status: StatusSettings,
    pub catalog: CatalogSettings,
    /// Where the catalog forwards outputs; nothing is forwarded when no
    /// destination is configured.
    pub forwarding: ForwardingSettings,
    /// Groups of installations a request may name as its `backend`, and how
    /// their jobs are placed.
    pub federation: FederationSettings,
    /// Who may call: bearer tokens (the WLCG JWT profile) checked against
    /// configured issuers, or the development mode without tokens (loopback only).
    pub auth: AuthSettings,
    /// TLS of every gRPC/HTTP port and of the clients between services.
    pub tls: TlsSettings,
    /// How long a stopping service (SIGTERM, Ctrl-C) may take to finish
    /// what it holds and flush its outbox before the process exits.
    pub shutdown_grace_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct DatabaseSettings {
    #[serde(serialize_with = "expose")]
    pub url: SecretString,
    /// One role per service: a service named here connects with its own
    /// URL (`prodsys db-roles` creates the roles); the others use `url`.
    #[serde(
        serialize_with = "expose_map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub service_urls: BTreeMap<String, SecretString>,
    /// Files holding a service's password (`"*"`: every service's), put
    /// into its URL at start; the password is never logged.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub password_files: BTreeMap<String, PathBuf>,
    pub pool_size: usize,
    /// How long an event's ID is kept in a service's inbox (to recognise a
    /// redelivery); older IDs are deleted in the background.
    pub inbox_retention_s: u64,
    /// TLS to PostgreSQL, as libpq's parameters of the same names (which a
    /// URL may also carry in its query; the URL's own win): `disable`,
    /// `prefer`, `require`, `verify-ca` or `verify-full`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslmode: Option<String>,
    /// PEM CA certificate(s) the server's certificate must chain to
    /// (`verify-ca`, `verify-full`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslrootcert: Option<PathBuf>,
    /// PEM client certificate and key, for a server that asks for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslcert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sslkey: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct AmqpSettings {
    #[serde(serialize_with = "expose")]
    pub url: SecretString,
    /// One broker user per service: a service named here connects with its
    /// own URL (`prodsys broker-users` creates the users with
    /// least-privilege permissions); the others use `url`. `amqps://` URLs
    /// connect over TLS (rustls, the broker verified against the web PKI
    /// roots and `ca_file`).
    #[serde(
        serialize_with = "expose_map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub service_urls: BTreeMap<String, SecretString>,
    /// Files holding a service's password (`"*"`: every service's), put
    /// into its URL at start; the password is never logged.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub password_files: BTreeMap<String, PathBuf>,
    /// Prefix of every exchange and queue name, so several deployments (or
    /// tests) share one broker without meeting.
    pub prefix: String,
    /// Deliveries a consumer may hold unacknowledged.
    pub prefetch: u16,
    /// Most deliveries handled in one database transaction.
    pub batch_size: usize,
    /// Most message bytes in one batch: a batch closes at `batch_size`
    /// deliveries or once its bodies reach this many bytes, whichever comes
    /// first, so a batch of large messages (a `job.output` of hundreds of
    /// files, tens of kilobytes each) stays a few megabytes once decoded.
    pub batch_bytes: usize,
    /// Deliveries of one message before it is dead-lettered.
    pub delivery_limit: u32,
    pub confirm_timeout_ms: u64,
    /// Longest a consumer holds a batch through a transient failure (a
    /// dependency down) before republishing its messages as fresh copies;
    /// keep it well under the broker's `consumer_timeout` (30 min).
    pub hold_limit_ms: u64,
    /// Longest pause between two tries of a held batch (backoff with jitter).
    pub hold_retry_max_ms: u64,
    /// PEM CA certificate(s) an `amqps://` broker's certificate may chain
    /// to (a private CA), trusted besides the web PKI roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) and its key, presented to a broker
    /// that asks for one (`ssl_options.verify = verify_peer`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct GrpcSettings {
    pub host: String,
    pub max_message_bytes: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct IntakeSettings {
    pub port: u16,
    /// Where the checker answers `Evaluate` (for `ValidateRequest`).
    pub checker_url: String,
    /// Queues an ingest event's `reply_to` may name (`*` matches any run
    /// of characters). The default takes only the server-named queues a
    /// publisher declares for itself; an event naming any other queue is
    /// dead-lettered, so no publisher makes intake write into a queue of
    /// prodsys or of anyone else.
    pub reply_to_patterns: Vec<String>,
    /// Broker users (the AMQP `user_id` property, which RabbitMQ checks
    /// against the connection's user) and the VOs each may submit for by
    /// event. Empty: any publisher may submit for any VO. Otherwise an
    /// event from a user not listed, without `user_id`, or for a VO its
    /// user may not use is refused with the reason (answered on
    /// `reply_to`).
    pub broker_users: BTreeMap<String, Vec<String>>,
    /// Admission limits per VO (`[intake.vo_limits."vo.cta.in2p3.fr"]`;
    /// the entry `"*"` holds for every VO not named). A submission that
    /// would pass one is refused with a field violation on `vo`.
    pub vo_limits: BTreeMap<String, VoLimits>,
}

/// What one VO may have admitted and unfinished at once: its requests
/// waiting for the checker or accepted with their production not yet
/// ended (COMPLETED, FAILED, CANCELLED...).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VoLimits {
    /// Most jobs (as the profiles split the requests) over those.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_jobs_in_flight: Option<u64>,
    /// Most of those requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_productions_waiting: Option<u64>,
}

impl IntakeSettings {
    /// The limits that hold for `vo`, if any do.
    pub fn limits_of(&self, vo: &str) -> Option<&VoLimits> {
        self.vo_limits.get(vo).or_else(|| self.vo_limits.get("*"))
    }
}

impl Default for IntakeSettings {
    fn default() -> Self {
        Self {
            port: 50051,
            checker_url: "http://127.0.0.1:50054".into(),
            reply_to_patterns: vec!["amq.gen-*".into()],
            broker_users: BTreeMap::new(),
            vo_limits: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct StatusSettings {
    /// gRPC port (which also serves the dashboard over HTTP); 0 picks a free one.
    pub port: u16,
    /// Where the checker answers `ListTemplates` (the dashboard's templates page).
    pub checker_url: String,
    /// Where the catalog answers `GetProductionRecord` (a production's record
    /// on the HTTP port).
    pub catalog_url: String,
    /// Where intake answers submit, validate, cancel and profiles for the
    /// HTTP/JSON API (`/api/v1`).
    pub intake_url: String,
    /// Where the dispatcher answers `ListJobs` and `GetJobLog` (the
    /// dashboard's production page: its jobs, their WMS status and logs).
    pub dispatcher_url: String,
}

impl Default for StatusSettings {
    fn default() -> Self {
        Self {
            port: 50052,
            checker_url: "http://127.0.0.1:50054".into(),
            catalog_url: "http://127.0.0.1:50053".into(),
            intake_url: "http://127.0.0.1:50051".into(),
            dispatcher_url: "http://127.0.0.1:50055".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct CheckerSettings {
    pub port: u16,
    /// Where the catalog answers `FindExisting`.
    pub catalog_url: String,
}

impl Default for CheckerSettings {
    fn default() -> Self {
        Self {
            port: 50054,
            catalog_url: "http://127.0.0.1:50053".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct CatalogSettings {
    /// gRPC port; 0 picks a free one.
    pub port: u16,
    /// Where the catalog writes each finished production's record
    /// (`<records_dir>/<production>/ro-crate-metadata.json`) and registers
    /// it as a file of the production, beside its outputs. Empty: records
    /// are served but not written as files.
    pub records_dir: PathBuf,
}

impl Default for CatalogSettings {
    fn default() -> Self {
        Self {
            port: 50053,
            records_dir: PathBuf::from("var/records"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct DispatcherSettings {
    pub port: u16,
    /// Root of the jobs' working directories.
    pub work_dir: PathBuf,
    /// Directory put first on PATH for job commands (where prodsys-toysim lives).
    pub tools_dir: PathBuf,
    /// Jobs the local executor runs at once.
    pub max_concurrent_jobs: usize,
    /// Jobs the built-in local executor holds beyond those, waiting for a
    /// slot, each started the moment one frees (see `BackendSettings::Local`).
    pub max_queued_jobs: usize,
    /// Longest wait between two polls of a backend.
    pub poll_interval_ms: u64,
    /// Time to live of a dispatcher replica's lease on an installation: it
    /// renews it every third of this; another replica takes the installation
    /// over this long after the holder stopped renewing.
    pub lease_ttl_ms: u64,
    /// Ceiling on the jobs of one production, over every profile's own
    /// `max_jobs`: a request whose plan exceeds the smaller is refused.
    pub max_jobs_per_production: u64,
    /// Jobs created per planning transaction.
    pub plan_chunk_jobs: u64,
    /// How long a cancel that arrived before its production is remembered
    /// (seconds): one whose production never comes (an ID never issued, a
    /// request refused after all) is forgotten after this.
    pub pending_cancel_ttl_s: u64,
    /// Named WMS installations besides `local` (which always exists, with
    /// `max_concurrent_jobs`); a request chooses one by name.
    pub backends: BTreeMap<String, BackendSettings>,
}

/// One WMS installation.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum BackendSettings {
    /// Jobs as processes on the dispatcher's machine.
    Local {
        #[serde(default = "default_local_slots")]
        max_running: usize,
        /// Attempts held beyond the running ones, waiting for a slot, like a
        /// batch system's queue: each starts the moment a slot frees instead
        /// of at the scheduler's next round (worth it for jobs of seconds or
        /// less; a queued attempt has its place, so a production of higher
        /// priority arriving later starts after it). 0: none wait here.
        #[serde(default)]
        max_queued: usize,
        /// Root of this installation's working directories (the
        /// dispatcher's `work_dir` when not given).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        work_dir: Option<PathBuf>,
    },
    /// A Slurm cluster through its commands (sbatch, squeue, scancel).
    Slurm {
        /// Partition to submit to; the cluster's default when empty.
        #[serde(default)]
        partition: String,
        /// Most jobs queued or running at once.
        #[serde(default = "default_in_flight")]
        max_in_flight: usize,
        /// Extra sbatch arguments (account, QOS, …).
        #[serde(default)]
        sbatch_args: Vec<String>,
        /// Whether the nodes share the dispatcher's work directory (the
        /// default). A cluster elsewhere (`false`) runs each attempt in a
        /// directory of its own and uploads its outputs to the production's
        /// first forwarding destination, where they are checked and catalogued.
        #[serde(default = "default_true")]
        shared_filesystem: bool,
    },
    /// A DIRAC installation through the DiracX REST API.
    Dirac(DiracSettings),
}

/// A DiracX server and how prodsys authenticates to it. Exactly one token
/// source: `token`, `token_file` or `token_command`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiracSettings {
    /// Base URL of the DiracX server (`https://diracx.example.org`).
    pub url: String,
    /// A fixed access token (never refreshed: for short tests only).
    #[serde(
        default,
        serialize_with = "expose_optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub token: Option<SecretString>,
    /// A file holding the access token, rewritten by something else (an
    /// oidc-agent or a cron job); read again when the token nears expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// A command that prints a fresh access token on stdout; run again when
    /// the token nears expiry or the server refuses it.
    #[serde(default)]
    pub token_command: Vec<String>,
    /// A token is renewed this many seconds before its `exp` claim.
    #[serde(default = "default_token_refresh_margin")]
    pub token_refresh_margin_s: u64,
    /// PEM file of extra CA certificates to trust (a grid CA bundle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Most jobs queued or running at once.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// Sites the jobs may run at (JDL `Site`); any when empty.
    #[serde(default)]
    pub sites: Vec<String>,
    /// Storage element for the jobs' output data (JDL `OutputSE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_se: Option<String>,
    /// Extra JDL attributes, written as given (`Priority = "5"`, `Tags = "{\"GPU\"}"`).
    #[serde(default)]
    pub jdl: BTreeMap<String, String>,
    /// Whether the sites' worker nodes share the dispatcher's work directory
    /// (a DIRAC site on the dispatcher's own cluster). By default they do
    /// not: each job uploads its outputs to its production's first
    /// forwarding destination, where they are checked and catalogued.
    #[serde(default)]
    pub shared_filesystem: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ForwardingSettings {
    /// Named destinations (`[forwarding.destinations.<name>]`); a profile
    /// names its defaults, a request may add or replace them (`forward`).
    pub destinations: BTreeMap<String, DestinationSettings>,
    /// Copy slots of one catalog process (over every destination).
    pub max_concurrent_copies: usize,
    /// Replicas one slot carries to an `xroot` destination (one `xrdcp` of
    /// many files, verified in one `xrdfs` session) or into `rucio`
    /// registrations; a round claims this many per free slot.
    pub claim_batch: usize,
    /// How long a claimed copy is its claimer's; after that another catalog
    /// process takes it over (the claimer died mid-copy).
    pub claim_ttl_ms: u64,
    /// First and longest wait before a failed copy is tried again (doubling).
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
    /// Longest a single copy or checksum query may take.
    pub copy_timeout_s: u64,
}

impl Default for ForwardingSettings {
    fn default() -> Self {
        Self {
            destinations: BTreeMap::new(),
            max_concurrent_copies: 8,
            claim_batch: 500,
            claim_ttl_ms: 120_000,
            retry_min_ms: 1_000,
            retry_max_ms: 60_000,
            copy_timeout_s: 600,
        }
    }
}

/// One destination outputs are forwarded to, by kind.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum DestinationSettings {
    /// A mounted filesystem: files are copied under `path` at their LFN,
    /// fsynced, and the adler32 of what landed is compared. A file whose
    /// source is on XRootD (`root://`, as a remote job's outputs are on its
    /// production's first destination) is downloaded with `xrdcp`.
    Posix {
        path: PathBuf,
        /// The XRootD client command that reads `root://` sources (found on
        /// PATH by default).
        #[serde(default = "default_xrdcp")]
        xrdcp: String,
    },
    /// An XRootD storage element (`root://host:port//path`): files are copied
    /// with `xrdcp` and the storage's own adler32 (`xrdfs … query checksum`)
    /// is compared.
    Xroot {
        url: String,
        /// The XRootD client commands (found on PATH by default).
        #[serde(default = "default_xrdcp")]
        xrdcp: String,
        #[serde(default = "default_xrdfs")]
        xrdfs: String,
        /// Transfers, and checksums asked of the storage, at once (the
        /// `--parallel` of each `xrdcp`, shared by every copy to this
        /// destination). An XRootD server computes `xrootd.chksum max` (4
        /// unless configured) checksums at once and has a client that asks
        /// more wait 30 s: keep this at most that.
        #[serde(default = "default_xroot_parallel")]
        parallel: usize,
    },
    /// A Rucio server: each file, once copied to the `storage` destination,
    /// is registered there as a replica on an RSE and attached to its
    /// production's dataset.
    Rucio(Box<RucioSettings>),
}

impl DestinationSettings {
    /// A `posix` destination at `path`, reading `root://` sources with the
    /// `xrdcp` found on PATH.
    pub fn posix(path: impl Into<PathBuf>) -> Self {
        Self::Posix {
            path: path.into(),
            xrdcp: default_xrdcp(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_xrdcp() -> String {
    "xrdcp".into()
}

fn default_xrdfs() -> String {
    "xrdfs".into()
}

/// XRootD's own `xrootd.chksum max` default.
pub const DEFAULT_XROOT_PARALLEL: usize = 4;

fn default_xroot_parallel() -> usize {
    DEFAULT_XROOT_PARALLEL
}

/// A secret as its plain text, for a settings file written on purpose.
fn expose<S: Serializer>(secret: &SecretString, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(secret.expose_secret())
}

fn expose_optional<S: Serializer>(
    secret: &Option<SecretString>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match secret {
        Some(secret) => serializer.serialize_some(secret.expose_secret()),
        None => serializer.serialize_none(),
    }
}

fn default_token_refresh_margin() -> u64 {
    300
}

fn default_local_slots() -> usize {
    2
}

fn default_in_flight() -> usize {
    1000
}

impl DispatcherSettings {
    /// Every installation by name, `local` included.
    pub fn installations(&self) -> BTreeMap<String, BackendSettings> {
        let mut all = self.backends.clone();
        all.entry("local".into()).or_insert(BackendSettings::Local {
            max_running: self.max_concurrent_jobs,
            max_queued: self.max_queued_jobs,
            work_dir: None,
        });
        all
    }
}

impl BackendSettings {
    /// Most jobs the installation holds at once (queued or running).
    pub fn max_in_flight(&self) -> usize {
        match self {
            BackendSettings::Local {
                max_running,
                max_queued,
                ..
            } => (*max_running).max(1) + max_queued,
            BackendSettings::Slurm { max_in_flight, .. } => *max_in_flight,
            BackendSettings::Dirac(dirac) => dirac.max_in_flight,
        }
    }

    /// Whether the installation's jobs run where the dispatcher's work
    /// directory is (their outputs are collected from there); if not, they
    /// upload them to their production's first forwarding destination.
    pub fn shares_filesystem(&self) -> bool {
        match self {
            BackendSettings::Local { .. } => true,
            BackendSettings::Slurm {
                shared_filesystem, ..
            } => *shared_filesystem,
            BackendSettings::Dirac(dirac) => dirac.shared_filesystem,
        }
    }
}

impl Settings {
    /// Whether the federation settings fit the configured installations.
    pub fn check_federation(&self) -> Result<(), ConfigError> {
        let names = self.dispatcher.installations().into_keys().collect();
        self.federation.check(&names).map_err(ConfigError)
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            profiles_dir: PathBuf::from("profiles"),
            templates_dir: PathBuf::from("var/templates"),
            periods_dir: PathBuf::from("periods"),
            database: DatabaseSettings::default(),
            amqp: AmqpSettings::default(),
            grpc: GrpcSettings::default(),
            intake: IntakeSettings::default(),
            status: StatusSettings::default(),
            catalog: CatalogSettings::default(),
            checker: CheckerSettings::default(),
            dispatcher: DispatcherSettings::default(),
            forwarding: ForwardingSettings::default(),
            federation: FederationSettings::default(),
            auth: AuthSettings::default(),
            tls: TlsSettings::default(),
            shutdown_grace_ms: 10_000,
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("postgres://postgres@127.0.0.1:5432/prodsys"),
            service_urls: BTreeMap::new(),
            password_files: BTreeMap::new(),
            pool_size: 16,
            inbox_retention_s: 7 * 24 * 3600,
            sslmode: None,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
        }
    }
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("amqp://guest:guest@127.0.0.1:5672/%2f"),
            service_urls: BTreeMap::new(),
            password_files: BTreeMap::new(),
            prefix: String::new(),
            prefetch: 256,
            batch_size: 128,
            batch_bytes: 1 << 20,
            delivery_limit: 5,
            confirm_timeout_ms: 10_000,
            hold_limit_ms: 300_000,
            hold_retry_max_ms: 5_000,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

impl Default for GrpcSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            max_message_bytes: 16 * 1024 * 1024,
        }
    }
}

impl Default for DispatcherSettings {
    fn default() -> Self {
        Self {
            port: 50055,
            work_dir: PathBuf::from("var/work"),
            tools_dir: PathBuf::new(),
            max_concurrent_jobs: 2,
            max_queued_jobs: 0,
            poll_interval_ms: 1000,
            lease_ttl_ms: 10_000,
            max_jobs_per_production: 1_000_000,
            plan_chunk_jobs: 10_000,
            pending_cancel_ttl_s: 7 * 24 * 3600,
            backends: BTreeMap::new(),
        }
    }
}

impl DatabaseSettings {
    pub fn url(&self) -> &str {
        self.url.expose_secret()
    }

    /// The URL `service` connects with: its own, or the shared one, with
    /// the password of its password file when it has one, and the TLS
    /// parameters of these settings it does not give itself.
    pub fn url_for(&self, service: &str) -> Result<SecretString, ConfigError> {
        let url = credential_url(&self.url, &self.service_urls, &self.password_files, service)?;
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
        let tls = [
            ("sslmode", self.sslmode.clone()),
            ("sslrootcert", path(&self.sslrootcert)),
            ("sslcert", path(&self.sslcert)),
            ("sslkey", path(&self.sslkey)),
        ];
        with_parameters(url.expose_secret(), &tls).map(SecretString::from)
    }
}

impl AmqpSettings {
    pub fn url(&self) -> &str {
        self.url.expose_secret()
    }

    /// The URL `service` connects with (see [`DatabaseSettings::url_for`]).
    pub fn url_for(&self, service: &str) -> Result<SecretString, ConfigError> {
        credential_url(&self.url, &self.service_urls, &self.password_files, service)
    }
}

fn credential_url(
    shared: &SecretString,
    own: &BTreeMap<String, SecretString>,
    password_files: &BTreeMap<String, PathBuf>,
    service: &str,
) -> Result<SecretString, ConfigError> {
    let url = own.get(service).unwrap_or(shared);
    let Some(file) = password_files
        .get(service)
        .or_else(|| password_files.get("*"))
    else {
        return Ok(url.clone());
    };
    let password = std::fs::read_to_string(file)
        .map_err(|e| ConfigError(format!("password file {}: {e}", file.display())))?;
    let password = password.trim_end_matches(['\n', '\r']);
    with_password(url.expose_secret(), password)
        .map(SecretString::from)
        .ok_or_else(|| {
            ConfigError(format!(
                "the URL of {service} names no user to give a password"
            ))
        })
}

/// `url` with each of `parameters` that is set and that it does not give
/// itself: in its query (a `postgres://` URL), or as a word (a `key=value`
/// connection string).
fn with_parameters(
    url: &str,
    parameters: &[(&str, Option<String>)],
) -> Result<String, ConfigError> {
    let mut url = url.to_string();
    let is_url = url.contains("://");
    for (key, value) in parameters {
        let Some(value) = value else { continue };
        if is_url {
            let query = url.split_once('?').map(|(_, q)| q).unwrap_or_default();
            if query.split('&').any(|p| p.split('=').next() == Some(*key)) {
                continue;
            }
            let separator = if url.contains('?') { '&' } else { '?' };
            url = format!("{url}{separator}{key}={}", percent_encode(value, b"-._~/"));
        } else {
            if url
                .split_whitespace()
                .any(|w| w.split('=').next() == Some(*key))
            {
                continue;
            }
            if value
                .chars()
                .any(|c| c.is_whitespace() || c == '\'' || c == '\\')
            {
                return Err(ConfigError(format!(
                    "database.{key}: {value:?} cannot be written into a connection string of words; give the database URL as postgres://…"
                )));
            }
            url = format!("{url} {key}={value}");
        }
    }
    Ok(url)
}

fn percent_encode(text: &str, keep: &[u8]) -> String {
    let mut encoded = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || keep.contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    encoded
}

/// `url` (`scheme://user[:password]@host...`) with `password`, percent-encoded.
pub fn with_password(url: &str, password: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, host) = authority.rsplit_once('@')?;
    let user = userinfo.split(':').next().filter(|u| !u.is_empty())?;
    let encoded = percent_encode(password, b"-._~");
    Some(format!("{scheme}://{user}:{encoded}@{host}{tail}"))
}

fn expose_map<S: Serializer>(
    secrets: &BTreeMap<String, SecretString>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = serializer.serialize_map(Some(secrets.len()))?;
    for (key, secret) in secrets {
        map.serialize_entry(key, secret.expose_secret())?;
    }
    map.end()
}

#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid configuration: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Settings {
    /// Defaults, then `file` if given, then `PRODSYS__*` environment variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, None)
    }

    /// As [`Settings::load`], with `environment` in place of the process's
    /// environment when given (a deployment's variables, checked before it runs).
    pub fn load_with_env(
        file: Option<&Path>,
        environment: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        builder
            .add_source(
                config::Environment::with_prefix("PRODSYS")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(environment.map(|vars| vars.into_iter().collect())),
            )
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_point_at_a_local_machine() {
        let s = Settings::default();
        assert_eq!(s.intake.port, 50051);
        assert!(s.database.url().starts_with("postgres://"));
    }

    #[test]
    fn secrets_do_not_print() {
        let mut s = Settings::default();
        s.database.url = SecretString::from("postgres://u:hunter2@db/x");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn file_values_override_defaults() {
        let dir = std::env::temp_dir().join(format!("prodsys-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.toml");
        std::fs::write(
            &path,
            "[amqp]\nprefix = \"x.\"\n[dispatcher]\nmax_concurrent_jobs = 7\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert_eq!(s.amqp.prefix, "x.");
        assert_eq!(s.dispatcher.max_concurrent_jobs, 7);
        assert_eq!(s.amqp.prefetch, 256);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn installations_come_from_the_file_and_local_always_exists() {
        let dir = std::env::temp_dir().join(format!("prodsys-config-b-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.toml");
        std::fs::write(
            &path,
            "[dispatcher.backends.slurm-local]\nkind = \"slurm\"\npartition = \"debug\"\n\
             [dispatcher.backends.dirac-cta]\nkind = \"dirac\"\nurl = \"https://diracx.example.org\"\n\
             token_command = [\"get-token\", \"cta\"]\njdl = { Priority = \"5\" }\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        let all = s.dispatcher.installations();
        assert_eq!(
            all.keys().collect::<Vec<_>>(),
            ["dirac-cta", "local", "slurm-local"]
        );
        match &all["dirac-cta"] {
            BackendSettings::Dirac(d) => {
                assert_eq!(d.url, "https://diracx.example.org");
                assert_eq!(d.token_command, ["get-token", "cta"]);
                assert_eq!(d.token_refresh_margin_s, 300);
                assert_eq!(d.max_in_flight, 1000);
                assert_eq!(d.jdl["Priority"], "5");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(&all["slurm-local"], BackendSettings::Slurm { partition, max_in_flight: 1000, .. } if partition == "debug")
        );
        std::fs::write(&path, "[dispatcher.backends.x]\nkind = \"pbs\"\n").unwrap();
        assert!(
            Settings::load(Some(&path))
                .unwrap_err()
                .to_string()
                .contains("pbs")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn destinations_come_from_the_file_by_kind() {
        let dir = std::env::temp_dir().join(format!("prodsys-config-d-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.toml");
        std::fs::write(
            &path,
            "[forwarding.destinations.tmp-disk]\nkind = \"posix\"\npath = \"/data/tmp\"\n\
             [forwarding.destinations.eos]\nkind = \"xroot\"\nurl = \"root://eos.example.org:1094//eos/cta\"\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert_eq!(
            s.forwarding.destinations.keys().collect::<Vec<_>>(),
            ["eos", "tmp-disk"]
        );
        assert!(
            matches!(&s.forwarding.destinations["eos"], DestinationSettings::Xroot { url, xrdcp, parallel, .. } if url.starts_with("root://") && xrdcp == "xrdcp" && *parallel == DEFAULT_XROOT_PARALLEL)
        );
        assert!(
            matches!(&s.forwarding.destinations["tmp-disk"], DestinationSettings::Posix { path, xrdcp } if path.as_os_str() == "/data/tmp" && xrdcp == "xrdcp")
        );
        std::fs::write(
            &path,
            "[forwarding.destinations.tmp-disk]\nkind = \"posix\"\npath = \"/data/tmp\"\nxrdcp = \"/opt/xrootd/bin/xrdcp\"\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert!(
            matches!(&s.forwarding.destinations["tmp-disk"], DestinationSettings::Posix { xrdcp, .. } if xrdcp == "/opt/xrootd/bin/xrdcp")
        );
        std::fs::write(
            &path,
            "[forwarding.destinations.eos]\nkind = \"xroot\"\nurl = \"root://eos.example.org:1094//eos/cta\"\nparallel = 16\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert!(
            matches!(&s.forwarding.destinations["eos"], DestinationSettings::Xroot { parallel, .. } if *parallel == 16)
        );
        std::fs::write(&path, "[forwarding.destinations.x]\nkind = \"ftp\"\n").unwrap();
        assert!(
            Settings::load(Some(&path))
                .unwrap_err()
                .to_string()
                .contains("ftp")
        );
        assert!(Settings::default().forwarding.destinations.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn groups_shares_and_vos_come_from_the_file() {
        let dir = std::env::temp_dir().join(format!("prodsys-config-f-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.toml");
        std::fs::write(
            &path,
            "[dispatcher.backends.local-b]\nkind = \"local\"\nmax_running = 3\nwork_dir = \"/tmp/b\"\n\
             [federation]\nretry_elsewhere = false\n\
             [federation.groups]\npair = [\"local\", \"local-b\"]\n\
             [federation.shares]\nlocal-b = 2.5\n[federation.vos]\nlocal-b = [\"cta\"]\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert!(s.check_federation().is_ok());
        assert_eq!(s.federation.groups["pair"], ["local", "local-b"]);
        assert_eq!(s.federation.share("local-b"), 2.5);
        assert!(!s.federation.retry_elsewhere);
        assert_eq!(s.dispatcher.installations()["local-b"].max_in_flight(), 3);
        assert!(Settings::default().federation.retry_elsewhere);
        std::fs::write(
            &path,
            "[federation.groups]\npair = [\"local\", \"nowhere\"]\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert!(
            s.check_federation()
                .unwrap_err()
                .to_string()
                .contains("nowhere")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn auth_comes_from_the_file_in_tables_or_strings() {
        let dir = std::env::temp_dir().join(format!("prodsys-config-a-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.toml");
        assert!(Settings::default().auth.dev_mode);
        std::fs::write(
            &path,
            "[auth]\ndev_mode = false\ninternal_token_file = \"/run/t\"\n\
             [[auth.issuers]]\nurl = \"https://iam.example.org/\"\n\
             [auth.production_managers]\n\"vo.cta.in2p3.fr\" = \"/vo.cta.in2p3.fr/production\"\n\
             [tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert!(!s.auth.dev_mode);
        assert_eq!(s.auth.issuers[0].url, "https://iam.example.org/");
        assert_eq!(
            s.auth.production_managers["vo.cta.in2p3.fr"],
            "/vo.cta.in2p3.fr/production"
        );
        assert!(s.auth.check().is_ok());
        assert!(s.tls.enabled() && s.tls.check().is_ok());
        // As the environment gives them: one string each.
        std::fs::write(
            &path,
            "[auth]\ndev_mode = false\nissuers = \"https://a.example.org, https://b.example.org\"\n\
             production_managers = \"vo.cta.in2p3.fr=/vo.cta.in2p3.fr/production,km3net.org=/km3net.org/prod\"\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert_eq!(s.auth.issuers.len(), 2);
        assert_eq!(s.auth.issuers[1].url, "https://b.example.org");
        assert_eq!(s.auth.production_managers["km3net.org"], "/km3net.org/prod");
        // Tokens on without an issuer, or half a certificate, are refused by name.
        std::fs::write(
            &path,
            "[auth]\ndev_mode = false\n[tls]\ncert_file = \"c.pem\"\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert!(
            s.auth
                .check()
                .unwrap_err()
                .to_string()
                .contains("auth.issuers")
        );
        assert!(
            s.tls
                .check()
                .unwrap_err()
                .to_string()
                .contains("tls.key_file")
        );
        // Client certificates: required by a CA, presented from their own
        // files or the server's; half a pair, or a CA without TLS, named.
        std::fs::write(
            &path,
            "[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nclient_ca_file = \"clients.pem\"\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert!(s.tls.check().is_ok() && s.tls.client_certificates_required());
        let identity = s.tls.client_identity().unwrap();
        assert_eq!(identity.cert_file, Path::new("c.pem"));
        assert_eq!(identity.key_setting, "tls.key_file");
        std::fs::write(
            &path,
            "[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n\
             client_cert_file = \"cc.pem\"\nclient_key_file = \"ck.pem\"\n",
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert!(!s.tls.client_certificates_required());
        let identity = s.tls.client_identity().unwrap();
        assert_eq!(identity.key_file, Path::new("ck.pem"));
        assert_eq!(identity.cert_setting, "tls.client_cert_file");
        for (file, named) in [
            (
                "[tls]\nclient_ca_file = \"clients.pem\"\n",
                "tls.client_ca_file",
            ),
            (
                "[tls]\nclient_cert_file = \"cc.pem\"\n",
                "tls.client_key_file",
            ),
            (
                "[tls]\nclient_key_file = \"ck.pem\"\n",
                "tls.client_cert_file",
            ),
        ] {
            std::fs::write(&path, file).unwrap();
            let s = Settings::load(Some(&path)).unwrap();
            let error = s.tls.check().unwrap_err().to_string();
            assert!(error.contains(named), "{file}: {error}");
        }
        assert!(Settings::default().tls.client_identity().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let err = Settings::load(Some(Path::new("/nonexistent/prodsys.toml"))).unwrap_err();
        assert!(err.to_string().contains("prodsys.toml"), "{err}");
    }

    #[test]
    fn the_database_tls_settings_join_every_url_that_does_not_say_its_own() {
        let mut s = DatabaseSettings {
            sslmode: Some("verify-full".into()),
            sslrootcert: Some(PathBuf::from("/etc/prodsys/db ca.pem")),
            ..DatabaseSettings::default()
        };
        s.url = SecretString::from("postgres://u@db/x");
        s.service_urls.insert(
            "catalog".into(),
            SecretString::from("postgres://c@db/x?sslmode=require&application_name=c"),
        );
        assert_eq!(
            s.url_for("intake").unwrap().expose_secret(),
            "postgres://u@db/x?sslmode=verify-full&sslrootcert=/etc/prodsys/db%20ca.pem"
        );
        assert_eq!(
            s.url_for("catalog").unwrap().expose_secret(),
            "postgres://c@db/x?sslmode=require&application_name=c&sslrootcert=/etc/prodsys/db%20ca.pem"
        );
        s.url = SecretString::from("host=db user=u");
        s.sslrootcert = Some(PathBuf::from("/etc/ca.pem"));
        assert_eq!(
            s.url_for("intake").unwrap().expose_secret(),
            "host=db user=u sslmode=verify-full sslrootcert=/etc/ca.pem"
        );
        s.sslrootcert = Some(PathBuf::from("/etc/my ca.pem"));
        let error = s.url_for("intake").unwrap_err().to_string();
        assert!(error.contains("database.sslrootcert"), "{error}");
        // Without TLS settings the URL is as given.
        let plain = DatabaseSettings::default();
        assert_eq!(
            plain.url_for("intake").unwrap().expose_secret(),
            plain.url()
        );
    }
}
