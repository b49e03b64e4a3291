//! Writes each finished production's record, once it is complete (every
//! DONE job's outputs taken, the request known), as a Workflow Run RO-Crate
//! at `<records_dir>/<production>/ro-crate-metadata.json`, and catalogues
//! it as a file of the production under its own directory of LFNs (with
//! size and adler32, and a replica on each destination its outputs go to),
//! so the record travels with the data. The crate of a production is the
//! same bytes however often it is written (a crash between writing and
//! committing writes it again, identically).
//!
//! A sweep (any catalog process; rows taken `FOR UPDATE SKIP LOCKED`)
//! finds the records due: a consumer cannot tell in its own transaction,
//! since the last output and the completion may be committed side by side.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prodsys_config::CatalogSettings;
use prodsys_db::Db;
use prodsys_proto as pb;
use tokio_util::sync::CancellationToken;

use crate::domain::record;
use crate::store;

/// Records written per sweep transaction.
const SWEEP_BATCH: i64 = 20;

/// How often the recorder looks for records due.
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);

pub struct Recorder {
    db: Db,
    /// Absolute: the record files' URLs name it.
    records_dir: PathBuf,
}

impl Recorder {
    /// None when `records_dir` is empty (records are served, not written).
    pub fn new(db: Db, settings: &CatalogSettings) -> anyhow::Result<Option<Self>> {
        if settings.records_dir.as_os_str().is_empty() {
            return Ok(None);
        }
        let records_dir = std::path::absolute(&settings.records_dir)
            .with_context(|| format!("catalog.records_dir {}", settings.records_dir.display()))?;
        Ok(Some(Self { db, records_dir }))
    }

    pub fn spawn(self, shutdown: CancellationToken) {
        tokio::spawn(Arc::new(self).sweep(shutdown));
    }

    async fn sweep(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
                _ = shutdown.cancelled() => return,
            }
            loop {
                match self.write_due().await {
                    Ok(n) if n as i64 == SWEEP_BATCH => continue,
                    Ok(_) => break,
                    Err(error) => {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            "writing production records failed"
                        );
                        break;
                    }
                }
            }
        }
    }

    /// Writes and catalogues the records due; how many.
    async fn write_due(&self) -> anyhow::Result<usize> {
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        let due = store::records_due(&tx, SWEEP_BATCH).await?;
        // Registering beside a forwarding plan: the shared locks a
        // registration takes, so a plan never misses the record's replicas.
        let registering: Vec<&str> = due.iter().map(String::as_str).collect();
        store::lock_forwarding(&tx, &registering, &[]).await?;
        for production_id in &due {
            let Some(mut found) = store::production_record(&tx, production_id).await? else {
                continue;
            };
            let first = store::first_output_lfn(&tx, production_id).await?;
            let lfn = record::record_lfn(production_id, &found.vo, first.as_deref());
            found.record_lfn = lfn.clone();
            let text = record::to_ro_crate(&found);
            let path = self
                .records_dir
                .join(production_id)
                .join(record::RO_CRATE_FILE);
            let (size, adler32) = write_file(&path, text.into_bytes()).await?;
            let file = pb::OutputFile {
                class_id: 0,
                lfn: lfn.clone(),
                size,
                adler32,
                url: format!("file://{}", path.display()),
                metadata: Default::default(),
                production_id: production_id.clone(),
                job_index: 0,
            };
            let metadata = serde_json::Value::Object(record::record_metadata(
                store::common_metadata(&tx, production_id).await?,
                production_id,
            ));
            store::register_record_file(&tx, &file, &metadata).await?;
            tracing::info!(%production_id, %lfn, size, "production record catalogued");
        }
        tx.commit().await?;
        Ok(due.len())
    }
}

/// Writes `bytes` to `path` whole (a temporary file, then a rename);
/// their size and adler32.
async fn write_file(path: &Path, bytes: Vec<u8>) -> anyhow::Result<(u64, String)> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let dir = path.parent().context("a record file has a directory")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        let (size, adler32) = prodsys_core::checksum::adler32_hex(bytes.as_slice())?;
        Ok((size, adler32))
    })
    .await?
}
