//! PostgreSQL for one service: a pool whose connections live in the service's
//! own schema, embedded migrations applied under an advisory lock (replicas may
//! start together), the transactional outbox (an event row commits with the
//! business row and a NOTIFY wakes the relay) and the inbox (an event's effect
//! happens once, however often it is delivered). Connections use TLS as
//! the URL's libpq parameters say ([`tls`]).

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::Transaction;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use uuid::Uuid;

pub use deadpool_postgres;
pub use tokio_postgres;

pub mod migrate;
pub mod tls;
pub use migrate::Migration;
pub use tls::PgTls;

/// A service's database: a pool whose `search_path` is the service's schema.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    schema: String,
    /// What tokio-postgres reads of the URL (the TLS parameters taken off).
    url: String,
    tls: PgTls,
    ssl_mode: tokio_postgres::config::SslMode,
    /// What this pool's outbox writes put in their NOTIFY (see [`Db::notifier`]).
    notifier: std::sync::Arc<str>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

/// An event waiting in the outbox.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub event_id: Uuid,
    /// Short type, also the routing key (`request.received`).
    pub event_type: String,
    /// CloudEvents subject: the production ID, or the request ID before there is one.
    pub subject: String,
    pub payload: Vec<u8>,
    /// A queue to send this to directly (an AMQP reply), instead of the events exchange.
    pub reply_to: Option<String>,
    pub content_type: String,
}

/// An outbox row read back by the relay.
#[derive(Debug, Clone)]
pub struct PendingEvent {
    pub id: i64,
    pub event: OutboxEvent,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// A connection string's tokio-postgres configuration and TLS connector.
pub fn connection(url: &str) -> anyhow::Result<(tokio_postgres::Config, PgTls)> {
    let (url, options) = tls::split_url(url)?;
    let (ssl_mode, connector) = tls::connector(&options)?;
    let mut config = tokio_postgres::Config::from_str(&url).context("invalid database URL")?;
    config.ssl_mode(ssl_mode);
    Ok((config, connector))
}

/// One connection (not pooled) with `url`, TLS as it says; its connection
/// task runs in the background.
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (config, tls) = connection(url)?;
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "database connection ended");
        }
    });
    Ok(client)
}

fn config_for(url: &str, schema: &str) -> anyhow::Result<tokio_postgres::Config> {
    let mut config = tokio_postgres::Config::from_str(url).context("invalid database URL")?;
    // Statements are prepared once per connection (see `Cached`) but planned
    // on every execution: a generic plan made while a table was small (a
    // sequential scan) would otherwise be kept as the table grows to millions.
    // No JIT: every statement here is short, and a plan whose cost estimate
    // is large only for a branch that never runs (the catalog's existence
    // check has one) spent seconds compiling itself on every execution
    // (3.2 s of a 4.5 s FindExisting call with ten million files).
    config.options(format!(
        "-c search_path={schema} -c plan_cache_mode=force_custom_plan -c jit=off"
    ));
    config.application_name(format!("prodsys-{schema}"));
    config.connect_timeout(Duration::from_secs(5));
    Ok(config)
}

impl Db {
    /// Builds the pool; no connection is made until one is needed.
    pub fn new(url: &str, schema: &str, pool_size: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(
            schema.chars().all(|c| c.is_ascii_lowercase() || c == '_') && !schema.is_empty(),
            "schema name {schema:?} must be lower-case letters and underscores"
        );
        let (url, options) = tls::split_url(url)?;
        let (ssl_mode, tls) = tls::connector(&options)?;
        let mut config = config_for(&url, schema)?;
        config.ssl_mode(ssl_mode);
        let manager = Manager::from_config(
            config,
            tls.clone(),
            ManagerConfig {
                // A pooled connection the server has closed (restart, failover, admin kill)
                // is found out at checkout, not by the request that uses it.
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(2))
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .context("building the database pool")?;
        Ok(Self {
            pool,
            schema: schema.to_string(),
            url,
            tls,
            ssl_mode,
            notifier: Uuid::new_v4().simple().to_string().into(),
        })
    }

    /// The payload of the NOTIFY that this pool's outbox writes send on
    /// commit (one per pool, so one per replica of a service): its relay
    /// looks at the outbox when its own commits notify, and leaves what
    /// another replica committed to that replica's relay, instead of every
    /// replica's relay taking a transaction to find the rows gone.
    pub fn notifier(&self) -> &str {
        &self.notifier
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    pub async fn client(&self) -> anyhow::Result<deadpool_postgres::Object> {
        self.pool.get().await.context("no database connection")
    }

    /// True when a trivial query answers.
    pub async fn ping(&self) -> bool {
        match self.pool.get().await {
            Ok(client) => client.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    }

    /// Creates the schema and applies the base migrations and `migrations`
    /// not applied yet, all under an advisory lock held for the run; refuses
    /// (before applying anything) when an applied migration's file changed.
    #[tracing::instrument(skip(self, migrations), fields(schema = %self.schema))]
    pub async fn migrate(&self, migrations: &[Migration]) -> anyhow::Result<()> {
        let mut client = self.client().await?;
        let key = advisory_key(&self.schema);
        client
            .execute("SELECT pg_advisory_lock($1)", &[&key])
            .await
            .context("taking the migration lock")?;
        let result = migrate::run(&mut client, &self.schema, migrations).await;
        client
            .execute("SELECT pg_advisory_unlock($1)", &[&key])
            .await
            .context("releasing the migration lock")?;
        result
    }

    /// The NOTIFY channel that wakes this service's outbox relay.
    pub fn outbox_channel(&self) -> String {
        format!("{}_outbox", self.schema)
    }

    /// Opens a dedicated connection that LISTENs on `channel`. Every
    /// notification arrives on `Listener::notifications`, which closes when
    /// the connection is lost.
    pub async fn listen(&self, channel: &str) -> anyhow::Result<Listener> {
        let mut config = config_for(&self.url, &self.schema)?;
        config.ssl_mode(self.ssl_mode);
        let (client, mut connection) = config
            .connect(self.tls.clone())
            .await
            .context("opening the LISTEN connection")?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(n.payload().to_string()).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "LISTEN connection lost");
                        break;
                    }
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN \"{}\"", channel.replace('"', "\"\"")))
            .await
            .context("LISTEN")?;
        Ok(Listener {
            _client: client,
            notifications: rx,
        })
    }
}

/// A LISTEN connection; dropping it closes the connection.
pub struct Listener {
    _client: tokio_postgres::Client,
    pub notifications: mpsc::UnboundedReceiver<String>,
}

/// Stable lock key per schema (FNV-1a), so every replica of a service takes the same lock.
fn advisory_key(schema: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in format!("prodsys.migrate.{schema}").bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// Adds `events` to the outbox inside the caller's transaction, and wakes
/// `db`'s relay when (and only if) that transaction commits.
pub async fn enqueue(tx: &Transaction<'_>, db: &Db, events: &[OutboxEvent]) -> anyhow::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let subjects: Vec<&str> = events.iter().map(|e| e.subject.as_str()).collect();
    let payloads: Vec<&[u8]> = events.iter().map(|e| e.payload.as_slice()).collect();
    let replies: Vec<Option<&str>> = events.iter().map(|e| e.reply_to.as_deref()).collect();
    let content_types: Vec<&str> = events.iter().map(|e| e.content_type.as_str()).collect();
    let insert = tx
        .prepare_cached(
            "INSERT INTO outbox (event_id, event_type, subject, payload, reply_to, content_type)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::text[])",
        )
        .await?;
    tx.execute(
        &insert,
        &[&ids, &types, &subjects, &payloads, &replies, &content_types],
    )
    .await
    .context("writing the outbox")?;
    tx.execute_cached(
        "SELECT pg_notify($1, $2)",
        &[&db.outbox_channel(), &db.notifier()],
    )
    .await?;
    Ok(())
}

/// Records `event_ids` as handled inside the caller's transaction and returns
/// the ones seen for the first time: only those may take effect.
pub async fn claim(tx: &Transaction<'_>, event_ids: &[Uuid]) -> anyhow::Result<HashSet<Uuid>> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO inbox (event_id) SELECT unnest($1::uuid[])
             ON CONFLICT DO NOTHING RETURNING event_id",
        )
        .await?;
    let rows = tx
        .query(&stmt, &[&event_ids])
        .await
        .context("writing the inbox")?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Plans the transaction's next statements with nested loops over indexes
/// only, until [`plan_freely`]: for statements that find the rows a batch
/// names by their keys, whatever the statistics say (taken before the rows
/// that matter existed, they lead the planner to hash a whole table against
/// a batch). A row such a statement updates through its join is rechecked
/// by PostgreSQL when another transaction changed it meanwhile, which a row
/// address found first is not.
///
/// Such a plan depends neither on the batch nor on the statistics, so it is
/// made once per connection and statement (a generic plan) instead of on
/// every execution as elsewhere (`plan_cache_mode=force_custom_plan`): the
/// status service's upsert spent 0.5 ms planning a batch of a few jobs
/// beside 0.3 ms executing it.
pub async fn plan_by_key(tx: &Transaction<'_>) -> anyhow::Result<()> {
    tx.batch_execute(
        "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off;
         SET LOCAL enable_seqscan = off; SET LOCAL plan_cache_mode = force_generic_plan",
    )
    .await
    .context("planning by key")
}

/// Plans the transaction's next statements as the server is configured
/// again, after [`plan_by_key`].
pub async fn plan_freely(tx: &Transaction<'_>) -> anyhow::Result<()> {
    tx.batch_execute(
        "RESET enable_hashjoin; RESET enable_mergejoin; RESET enable_seqscan;
         RESET plan_cache_mode",
    )
    .await
    .context("planning freely")
}

/// Deletes inbox rows older than `retention`, `batch` rows per statement
/// (each its own short transaction, so pruning never holds many locks);
/// returns how many went. A redelivery older than `retention` would then
/// take effect again, so keep it longer than any message can wait in a queue.
pub async fn prune_inbox(db: &Db, retention: Duration, batch: i64) -> anyhow::Result<u64> {
    let client = db.client().await?;
    let seconds = retention.as_secs_f64();
    let mut total = 0;
    loop {
        let deleted = client
            .execute_cached(
                "DELETE FROM inbox WHERE event_id IN (
                     SELECT event_id FROM inbox
                     WHERE received_at < now() - make_interval(secs => $1)
                     ORDER BY received_at LIMIT $2)",
                &[&seconds, &batch],
            )
            .await
            .context("pruning the inbox")?;
        total += deleted;
        if deleted < batch as u64 {
            return Ok(total);
        }
        // Leave room to the service's own transactions between batches.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Takes up to `limit` unsent outbox rows, oldest first, deleting them in
/// the caller's transaction (rows another relay holds are skipped): the
/// caller publishes them and commits only once the broker confirmed them,
/// or rolls back and they are there again. One statement instead of a read
/// and a delete. The transaction commits without waiting for its WAL to
/// reach the disk (`synchronous_commit = off`): a server crash in the
/// moment after can only bring back rows already published, which are then
/// published again and dropped by the consumers' inboxes as duplicates.
pub async fn take_pending(tx: &Transaction<'_>, limit: i64) -> anyhow::Result<Vec<PendingEvent>> {
    let stmt = tx
        .prepare_cached(
            "DELETE FROM outbox WHERE id IN (
                 SELECT id FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING id, event_id, event_type, subject, payload, created_at, reply_to, content_type",
        )
        .await?;
    // One round trip for both.
    let ((), rows) = futures::try_join!(
        async {
            tx.batch_execute("SET LOCAL synchronous_commit = off")
                .await
                .context("relaxing the relay's commit")
        },
        async {
            tx.query(&stmt, &[&limit])
                .await
                .context("taking outbox rows")
        },
    )?;
    let mut events: Vec<PendingEvent> = rows
        .iter()
        .map(|r| PendingEvent {
            id: r.get(0),
            event: OutboxEvent {
                event_id: r.get(1),
                event_type: r.get(2),
                subject: r.get(3),
                payload: r.get(4),
                reply_to: r.get(6),
                content_type: r.get(7),
            },
            created_at: r.get(5),
        })
        .collect();
    // RETURNING keeps no order: published in the order committed.
    events.sort_unstable_by_key(|e| e.id);
    Ok(events)
}

/// Statements through the connection's statement cache: parsed and planned
/// once per connection instead of on every call (an unprepared statement
/// costs the server a Parse/Describe round trip each time). For SQL whose
/// text is one of a bounded set; never for text that embeds values.
pub trait Cached: deadpool_postgres::GenericClient {
    fn query_cached<'a>(
        &'a self,
        sql: &'a str,
        params: &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)],
    ) -> impl std::future::Future<Output = Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>>
    + Send
    + 'a {
        async move {
            let statement = self.prepare_cached(sql).await?;
            self.query(&statement, params).await
        }
    }

    fn query_one_cached<'a>(
        &'a self,
        sql: &'a str,
        params: &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)],
    ) -> impl std::future::Future<Output = Result<tokio_postgres::Row, tokio_postgres::Error>> + Send + 'a
    {
        async move {
            let statement = self.prepare_cached(sql).await?;
            self.query_one(&statement, params).await
        }
    }

    fn query_opt_cached<'a>(
        &'a self,
        sql: &'a str,
        params: &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)],
    ) -> impl std::future::Future<
        Output = Result<Option<tokio_postgres::Row>, tokio_postgres::Error>,
    > + Send
    + 'a {
        async move {
            let statement = self.prepare_cached(sql).await?;
            self.query_opt(&statement, params).await
        }
    }

    fn execute_cached<'a>(
        &'a self,
        sql: &'a str,
        params: &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)],
    ) -> impl std::future::Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a {
        async move {
            let statement = self.prepare_cached(sql).await?;
            self.execute(&statement, params).await
        }
    }
}

impl<C: deadpool_postgres::GenericClient> Cached for C {}
