//! Schema migrations as files: `migrations/NNNN_name.sql` beside a crate's
//! `Cargo.toml`, embedded at compile time by [`migrations!`](crate::migrations)
//! and applied in version order (gaps allowed). Each applied migration's
//! checksum is recorded in the schema's `_migrations` table; a service whose
//! applied migration file has changed since refuses to start, naming the
//! version and the file, before it applies anything.

use std::collections::{HashMap, HashSet};

use anyhow::Context;
use sha2::{Digest, Sha256};

/// One schema change: a file of `migrations/` and its SQL, embedded.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// `NNNN_name.sql`: the version, then what it does.
    pub file: &'static str,
    pub sql: &'static str,
}

/// Embeds migration files of the calling crate's `migrations/` directory:
/// `prodsys_db::migrations!["0001_requests.sql", "0002_priority.sql"]` is a
/// `&'static [Migration]`. Cargo rebuilds the crate when a listed file changes.
#[macro_export]
macro_rules! migrations {
    ($($file:literal),* $(,)?) => {
        &[$($crate::Migration {
            file: $file,
            sql: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/", $file)),
        }),*]
    };
}

/// The tables every service has (its outbox and inbox), before its own.
pub const BASE: &[Migration] =
    crate::migrations!["0000_outbox_and_inbox.sql", "0030_inbox_by_age.sql"];

impl Migration {
    /// The version, from the file name's leading digits.
    pub fn version(&self) -> anyhow::Result<i32> {
        let digits = self.file.split('_').next().unwrap_or_default();
        anyhow::ensure!(
            !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()),
            "migration file {:?} must be named NNNN_name.sql",
            self.file
        );
        digits
            .parse()
            .with_context(|| format!("version of migration file {:?}", self.file))
    }

    /// What the migration does, from its file name (`0002_extension_requests.sql`
    /// is "extension requests").
    pub fn name(&self) -> String {
        let stem = self.file.strip_suffix(".sql").unwrap_or(self.file);
        stem.split_once('_')
            .map_or(stem, |(_, name)| name)
            .replace('_', " ")
    }

    /// SHA-256 of the SQL (line endings normalised, so a checkout that turns
    /// `\n` into `\r\n` does not count as a change), in hex.
    pub fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.replace("\r\n", "\n").as_bytes()))
    }
}

/// Applies [`BASE`] and `migrations` to `schema`; the caller holds the lock.
pub(crate) async fn run(
    client: &mut deadpool_postgres::Object,
    schema: &str,
    migrations: &[Migration],
) -> anyhow::Result<()> {
    let mut all = BASE
        .iter()
        .chain(migrations)
        .map(|m| Ok((m.version()?, m)))
        .collect::<anyhow::Result<Vec<(i32, &Migration)>>>()?;
    all.sort_by_key(|(version, _)| *version);
    if let Some(pair) = all.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        anyhow::bail!(
            "migrations {} and {} of schema {schema} have the same version {}",
            pair[0].1.file,
            pair[1].1.file,
            pair[0].0
        );
    }
    client
        .batch_execute(&format!(
            "-- Created only when missing: a service's own role (prodsys db-roles)
             -- owns its schema but may not create schemas in the database.
             DO $schema$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = '{schema}') THEN
                     CREATE SCHEMA {schema};
                 END IF;
             END $schema$;
             CREATE TABLE IF NOT EXISTS {schema}._migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );
             -- The runner's own migration: the checksum of each applied file
             -- (NULL in rows written before there were checksums: filled below).
             ALTER TABLE {schema}._migrations ADD COLUMN IF NOT EXISTS checksum text;"
        ))
        .await
        .context("creating the schema")?;
    let applied: HashMap<i32, Option<String>> = client
        .query(
            &format!("SELECT version, checksum FROM {schema}._migrations"),
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Every applied file is checked before anything is applied.
    for (version, migration) in &all {
        if let Some(Some(recorded)) = applied.get(version) {
            let now = migration.checksum();
            anyhow::ensure!(
                *recorded == now,
                "migration {version} ({}) of schema {schema} has changed since it was applied \
                 (checksum {recorded} applied, {now} now): an applied migration must stay as it \
                 was; restore the file and put the change in a new migration",
                migration.file
            );
        }
    }
    let known: HashSet<i32> = all.iter().map(|(version, _)| *version).collect();
    for version in applied.keys().filter(|v| !known.contains(v)) {
        tracing::warn!(
            version,
            "applied migration has no file in this build (the database is newer)"
        );
    }
    for (version, migration) in &all {
        if let Some(None) = applied.get(version) {
            client
                .execute(
                    &format!(
                        "UPDATE {schema}._migrations SET checksum = $2
                         WHERE version = $1 AND checksum IS NULL"
                    ),
                    &[version, &migration.checksum()],
                )
                .await
                .context("recording the checksum of an applied migration")?;
        }
    }
    for (version, migration) in all {
        if applied.contains_key(&version) {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(&format!("SET LOCAL search_path TO {schema}"))
            .await?;
        tx.batch_execute(migration.sql).await.with_context(|| {
            format!(
                "migration {version} ({}) of schema {schema}",
                migration.file
            )
        })?;
        tx.execute(
            &format!(
                "INSERT INTO {schema}._migrations (version, name, checksum) VALUES ($1, $2, $3)"
            ),
            &[&version, &migration.name(), &migration.checksum()],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, file = migration.file, "migration applied");
    }
    Ok(())
}
