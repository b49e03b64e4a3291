//! A catalog with a history: millions of files of a hundred thousand CTA
//! productions, held as the system holds them (the checker's productions
//! with the fingerprints the profile gives them, the catalog's files with the
//! typed metadata the profile declares), filled with set-based SQL into the
//! services' own tables. Then the queries people run against it (`FindFiles`
//! with typed conditions, the streamed answer) and requests submitted
//! against it, one in ten a duplicate or an overlap, beside the same on an
//! empty catalog in the same run.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use prodsys_core::ProfileSet;
use prodsys_core::profile::MetadataType;
use prodsys_proto as pb;
use serde_json::{Value, json};

use crate::percentile_ms;
use crate::stack::{Bench, PhaseLoad, SubmitResult};

const PROFILE: &str = "cta-irf-mc";
const VO: &str = "vo.cta.in2p3.fr";
/// Productions each statement of the fill writes the files of.
const FILL_CHUNK: usize = 500;
/// Connections the fill writes on at once.
const FILL_CONNECTIONS: usize = 2;

const SITES: [&str; 2] = ["LaPalma", "Paranal"];
const PARTICLES: [&str; 5] = ["gamma", "gamma-diffuse", "proton", "electron", "helium"];
const ZENITHS: [u32; 4] = [20, 40, 52, 60];
const POINTINGS: [&str; 2] = ["North", "South"];
const LAYOUTS: [&str; 8] = [
    "Prod6-Hyperarray",
    "Prod6-Alpha",
    "Prod6-Beta",
    "Prod5-Baseline",
    "Prod5-Threshold",
    "Prod6-LST-subarray",
    "Prod6-MST-subarray",
    "Prod6-SST-subarray",
];
/// NSB levels of a production: disjoint sets, as the checker lets them be
/// (two productions of one identity never share a level).
const NSB_SETS: [&[u32]; 2] = [&[1, 5], &[19]];
const SPECTRAL: [f64; 2] = [-2.0, -1.5];
/// Productions of one campaign: every combination of the above.
const PER_CAMPAIGN: u64 = 2 * 5 * 4 * 2 * 8 * 2 * 2;

/// Sizes of the history measurements.
#[derive(Debug, Clone, Copy)]
pub struct HistoryPlan {
    pub files: u64,
    pub productions: u64,
    /// First pages asked for, one after the other.
    pub find_queries: usize,
    pub submit_duration: Duration,
    pub submit_clients: usize,
}

#[derive(Debug, Clone, Default)]
pub struct FindResult {
    pub queries: usize,
    pub page_size: u32,
    /// Files on the first pages, all queries together.
    pub files: u64,
    /// Pages asked `metadata_by_class` (what a class's files share once),
    /// as prodctl asks.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The same pages with every file's whole metadata.
    pub whole_p50_ms: f64,
    pub whole_p99_ms: f64,
    /// An example of the queries, as `prodctl files` takes them.
    pub example: String,
}

#[derive(Debug, Clone, Default)]
pub struct StreamResult {
    pub query: String,
    pub files: u64,
    pub pages: u64,
    pub seconds: f64,
    pub files_per_s: f64,
    /// Until the first page arrived.
    pub first_ms: f64,
    pub load: PhaseLoad,
}

#[derive(Debug, Clone, Default)]
pub struct HistoryResult {
    pub productions: u64,
    pub files: u64,
    pub jobs_per_production: u64,
    /// Seconds to fill the checker's productions, the catalog's files and
    /// records, and rebuild the catalog's indexes and statistics.
    pub fill_seconds: f64,
    pub index_seconds: f64,
    pub vacuum_seconds: f64,
    pub catalog_bytes: i64,
    pub find: Option<FindResult>,
    pub stream: Option<StreamResult>,
    /// The same closed loop on the empty catalog (before the fill), and with
    /// the history (after), requests decided per second.
    pub empty: Option<SubmitResult>,
    pub history: Option<SubmitResult>,
}

impl HistoryResult {
    /// Requests decided (accepted or rejected) per second with the history,
    /// over the same on the empty catalog.
    pub fn submit_ratio(&self) -> Option<f64> {
        let (empty, history) = (self.empty.as_ref()?, self.history.as_ref()?);
        Some(history.decided_per_s() / empty.decided_per_s())
    }
}

/// Production `p` of the history: its parameters, every one distinct.
pub fn parameters(p: u64) -> Value {
    let particle = PARTICLES[(p / 2 % 5) as usize];
    let (energy_min, energy_max) = match particle {
        "proton" | "helium" => (0.01, 600.0),
        _ => (0.003, 330.0),
    };
    let nsb = NSB_SETS[(p / 640 % 2) as usize];
    json!({
        "site": SITES[(p % 2) as usize],
        "particle": particle,
        "zenith_deg": ZENITHS[(p / 10 % 4) as usize],
        "pointing": POINTINGS[(p / 40 % 2) as usize],
        "array_layout": LAYOUTS[(p / 80 % 8) as usize],
        "nsb_levels": nsb,
        "spectral_index": SPECTRAL[(p / 1280 % 2) as usize],
        "campaign": format!("Prod6-{:02}", p / PER_CAMPAIGN),
        "energy_min_tev": energy_min,
        "energy_max_tev": energy_max,
        "viewcone_deg": if particle == "gamma" { 0 } else { 10 },
        "core_scatter_m": if particle == "gamma" { 1500 } else { 2000 },
        "n_showers": 50_000,
        "showers_per_job": 1000,
        "software": { "corsika": "7.7550", "sim_telarray": "2024-02-05" },
    })
}

/// The request `n` of the run with a history of `productions`: one in ten
/// repeats a production of the history (every other of those exactly, the
/// rest overlapping it on an NSB level); the others are new simulations of
/// an identity the catalog holds files of, with another sim_telarray build
/// (the catalog is asked about, and compares, files of the same pointing).
pub fn history_request(n: u64, productions: u64, tag: &str) -> Value {
    let p = (n.wrapping_mul(7919) + 13) % productions.max(1);
    let mut parameters = parameters(p);
    if n.is_multiple_of(10) {
        if (n / 10).is_multiple_of(2) {
            // An exact repeat.
        } else {
            // NSB 1+5 after NSB 19 or 19+5 after 1+5: an overlap on one level.
            let nsb = NSB_SETS[(p / 640 % 2) as usize];
            parameters["nsb_levels"] = if nsb.contains(&19) {
                json!([1, 19])
            } else {
                json!([5, 19])
            };
        }
    } else {
        parameters["software"]["sim_telarray"] = format!("2025-bench-{tag}-{n}").into();
        parameters["n_showers"] = 1.into();
        parameters["showers_per_job"] = 1.into();
    }
    parameters
}

/// Rows of the checker's `productions` and, per NSB level, the catalog's
/// files of one chunk of the history.
#[derive(Default)]
struct Chunk {
    ids: Vec<String>,
    fingerprints: Vec<String>,
    request_ids: Vec<uuid::Uuid>,
    parameters: Vec<Value>,
    bases: Vec<String>,
    file_bases: Vec<String>,
    // One per file identity (production and NSB level).
    file_ids: Vec<String>,
    dirs: Vec<String>,
    stems: Vec<String>,
    metadata: Vec<String>,
}

/// A metadata value typed as the profiles declare its key.
fn typed(types: &BTreeMap<String, MetadataType>, key: &str, value: &str) -> Value {
    match types.get(key) {
        Some(MetadataType::Integer) => value.parse::<i64>().map_or(value.into(), Value::from),
        Some(MetadataType::Float) => value.parse::<f64>().map_or(value.into(), Value::from),
        _ => value.into(),
    }
}

/// Productions `range` of the history, numbered after `first_number - 1`.
fn chunk(
    profiles: &ProfileSet,
    types: &BTreeMap<String, MetadataType>,
    range: std::ops::Range<u64>,
    first_number: u64,
) -> anyhow::Result<Chunk> {
    let mut c = Chunk::default();
    for p in range {
        let (profile, parameters) = profiles
            .validate_request(PROFILE, VO, &parameters(p).to_string())
            .map_err(|v| anyhow::anyhow!("history production {p} is not valid: {v:?}"))?;
        let production_id = format!("{}-{:06}", profile.id_prefix(), first_number + p);
        let site = parameters["site"].as_str().unwrap_or_default().to_string();
        let particle = parameters["particle"].as_str().unwrap_or_default();
        let campaign = parameters["campaign"].as_str().unwrap_or_default();
        for identity in profile.file_identities(&parameters) {
            let q = &identity.query;
            let mut metadata: serde_json::Map<String, Value> = q
                .metadata
                .iter()
                .chain(&q.if_present)
                .map(|(k, v)| (k.clone(), typed(types, k, v)))
                .collect();
            for r in &q.ranges {
                metadata.insert(r.min_key.clone(), r.min.into());
                metadata.insert(r.max_key.clone(), r.max.into());
            }
            metadata.insert("production_id".into(), production_id.clone().into());
            metadata.insert(
                "dataset".into(),
                format!("{campaign}_{site}_{particle}_{production_id}").into(),
            );
            let nsb = metadata.get("nsb").cloned().unwrap_or(Value::Null);
            c.file_ids.push(production_id.clone());
            c.dirs.push(format!(
                "/{VO}/MC/{campaign}/{site}/{particle}/sim_telarray/{production_id}/Data/"
            ));
            c.stems.push(format!(
                "___cta-prod6-{}_nsb{nsb}.simtel.zst",
                site.to_lowercase()
            ));
            c.metadata.push(Value::Object(metadata).to_string());
        }
        c.fingerprints.push(profile.fingerprint(&parameters));
        c.bases.push(profile.base_fingerprint(&parameters));
        c.file_bases.push(
            profile
                .file_base_fingerprint(&parameters)
                .unwrap_or_default(),
        );
        c.ids.push(production_id);
        c.request_ids.push(uuid::Uuid::new_v4());
        c.parameters.push(parameters);
    }
    Ok(c)
}

/// Writes one chunk: the checker's productions, then every file of their
/// jobs and the catalog's records of them, in one transaction.
async fn write_chunk(db: &mut tokio_postgres::Client, c: Chunk, jobs: i64) -> anyhow::Result<u64> {
    let tx = db.transaction().await?;
    let n = c.ids.len();
    let text = |v: &str| vec![v.to_string(); n];
    tx.execute(
        "INSERT INTO checker.productions
             (production_id, fingerprint, request_id, profile, vo, parameters, backend,
              run_number_offset, base_fingerprint, last_run, file_base, created_at)
         SELECT id, fp, rid, pr, vo, pa, be, 0, base, $8, fb, now() - interval '1 day'
         FROM unnest($1::text[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::jsonb[],
                     $7::text[], $9::text[], $10::text[]) AS u (id, fp, rid, pr, vo, pa, be, base, fb)",
        &[
            &c.ids,
            &c.fingerprints,
            &c.request_ids,
            &text(PROFILE),
            &text(VO),
            &c.parameters,
            &text("local"),
            &jobs,
            &c.bases,
            &c.file_bases,
        ],
    )
    .await
    .context("the checker's productions")?;
    // Each job wrote one file per NSB level, run number = job index + 1,
    // LFN and metadata as the profile's outputs template gives them; the
    // files of a production's NSB level are one class, with its figures.
    let added: i64 = tx
        .query_one(
            "WITH generated AS MATERIALIZED (
                 SELECT f.production_id, f.metadata, j,
                        f.dir || lpad((j / 1000)::text, 3, '0') || 'xxx/run' || lpad((j + 1)::text, 6, '0') || f.stem AS lfn,
                        400000000 + (hashint8(f.n * 1000003 + j) & 65535) * 1000 AS size,
                        lpad(to_hex(hashint8(f.n * 7919 + j) & 4294967295), 8, '0') AS adler32,
                        'root://eos.cta.example/eos/cta' || f.dir || 'run' || lpad((j + 1)::text, 6, '0') || f.stem AS url
                 FROM (SELECT production_id, dir, stem, metadata::jsonb AS metadata,
                              hashtext(production_id || stem)::bigint AS n
                       FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
                            AS u (production_id, dir, stem, metadata)
                       OFFSET 0) AS f
                 CROSS JOIN LATERAL generate_series(0::bigint, $5::bigint - 1) AS j),
             classes AS (
                 INSERT INTO catalog.file_classes (production_id, metadata, file_count, total_bytes,
                                                   max_run, first_lfns, min_lfn, max_lfn)
                 SELECT production_id, metadata, count(*), sum(size), max(j) + 1,
                        (array_agg(lfn ORDER BY lfn))[1:3], min(lfn), max(lfn)
                 FROM generated GROUP BY production_id, metadata
                 RETURNING class_id, production_id, metadata),
             added AS (
                 INSERT INTO catalog.files (lfn, production_id, job_index, attempt, size, adler32, url,
                                            metadata, class_id, own)
                 SELECT g.lfn, g.production_id, g.j, 1, g.size, g.adler32, g.url,
                        g.metadata || jsonb_build_object('run_number', g.j + 1), c.class_id,
                        jsonb_build_object('run_number', g.j + 1)
                 FROM generated g JOIN classes c USING (production_id, metadata)
                 RETURNING production_id, size),
             totals AS (
                 INSERT INTO catalog.totals (production_id, file_count, total_bytes)
                 SELECT production_id, count(*), sum(size) FROM added GROUP BY production_id
                 RETURNING production_id, file_count, total_bytes),
             records AS (
                 INSERT INTO catalog.productions (production_id, state, file_count, total_bytes, completed_at)
                 SELECT production_id, 'COMPLETED', file_count, total_bytes, now() - interval '1 hour'
                 FROM totals)
             SELECT COALESCE(sum(file_count), 0)::bigint FROM totals",
            &[&c.file_ids, &c.dirs, &c.stems, &c.metadata, &jobs],
        )
        .await
        .context("the catalog's files")?
        .get(0);
    tx.commit().await?;
    Ok(added as u64)
}

/// Fills the checker and the catalog with `plan.productions` productions of
/// about `plan.files` files in all. The catalog's secondary indexes are
/// dropped first and built again afterwards from their own definitions (as
/// a bulk load does), then both tables are vacuumed and analysed.
pub async fn fill(
    bench: &Bench,
    plan: &HistoryPlan,
    result: &mut HistoryResult,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let profiles = ProfileSet::load_dir(&bench.env.settings.profiles_dir)?;
    let types = profiles
        .metadata_types()
        .map_err(|e| anyhow::anyhow!("metadata types: {e}"))?;
    let levels: u64 = (0..plan.productions.min(1280))
        .map(|p| NSB_SETS[(p / 640 % 2) as usize].len() as u64)
        .sum::<u64>()
        .max(1);
    // Files per production: its jobs times its NSB levels.
    let per_level = plan.productions.min(1280) as f64 / levels as f64;
    let jobs = ((plan.files as f64 / plan.productions as f64) * per_level).ceil() as i64;
    result.productions = plan.productions;
    result.jobs_per_production = jobs as u64;

    let db = &bench.db;
    // After the IDs the checker has given (the run on the empty catalog).
    let prefix = profiles
        .get(PROFILE)
        .map_or("CTA".to_string(), |p| p.id_prefix().to_string());
    let issued: i64 = db
        .query_one(
            "SELECT COALESCE(max(last), 0) FROM checker.id_prefix_sequences WHERE id_prefix = $1",
            &[&prefix],
        )
        .await?
        .get(0);
    let first_number = issued as u64 + 1;
    let indexes: Vec<(String, String)> = db
        .query(
            "SELECT indexname, indexdef FROM pg_indexes
             WHERE schemaname = 'catalog' AND tablename = 'files'
               AND indexname NOT IN (SELECT conname FROM pg_constraint WHERE conrelid = 'catalog.files'::regclass)",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (name, _) in &indexes {
        db.batch_execute(&format!("DROP INDEX catalog.{name}"))
            .await?;
    }

    let mut connections = Vec::new();
    for _ in 0..FILL_CONNECTIONS {
        let client = bench.env.db().await?;
        // Compiling each statement's expressions would cost more than it saves.
        client.batch_execute("SET jit = off").await?;
        connections.push(tokio::sync::Mutex::new(client));
    }
    let chunks: Vec<std::ops::Range<u64>> = (0..plan.productions)
        .step_by(FILL_CHUNK)
        .map(|lo| lo..(lo + FILL_CHUNK as u64).min(plan.productions))
        .collect();
    let total = chunks.len();
    let files: u64 = futures::stream::iter(chunks.into_iter().enumerate())
        .map(|(i, range)| {
            let connections = &connections;
            let profiles = &profiles;
            let types = &types;
            async move {
                let rows = chunk(profiles, types, range, first_number)?;
                let mut client = connections[i % FILL_CONNECTIONS].lock().await;
                let added = write_chunk(&mut client, rows, jobs).await?;
                if (i + 1) % 20 == 0 {
                    eprintln!("  {} of {total} chunks of the history written", i + 1);
                }
                anyhow::Ok(added)
            }
        })
        .buffer_unordered(FILL_CONNECTIONS)
        .try_fold(0u64, |sum, n| async move { Ok(sum + n) })
        .await?;
    result.files = files;
    let last = issued + plan.productions as i64;
    db.execute(
        "INSERT INTO checker.id_prefix_sequences (id_prefix, last) VALUES ($1, $2)
         ON CONFLICT (id_prefix) DO UPDATE SET last = greatest(id_prefix_sequences.last, EXCLUDED.last)",
        &[&prefix, &last],
    )
    .await?;

    let indexed = Instant::now();
    // Each index on its own connection, two at a time.
    futures::stream::iter(indexes.iter().enumerate())
        .map(|(i, (_, definition))| {
            let connections = &connections;
            async move {
                let client = connections[i % FILL_CONNECTIONS].lock().await;
                client
                    .batch_execute(&format!("SET maintenance_work_mem = '512MB'; {definition}"))
                    .await
                    .with_context(|| format!("rebuilding {definition}"))
            }
        })
        .buffer_unordered(FILL_CONNECTIONS)
        .try_collect::<Vec<()>>()
        .await?;
    result.index_seconds = indexed.elapsed().as_secs_f64();
    let vacuumed = Instant::now();
    // As autovacuum would have long since done on a catalog this size:
    // visibility map, hint bits and statistics.
    for table in [
        "catalog.files",
        "catalog.file_classes",
        "catalog.totals",
        "catalog.productions",
        "checker.productions",
    ] {
        // One statement a call: VACUUM runs outside a transaction block.
        db.batch_execute(&format!("VACUUM (ANALYZE) {table}"))
            .await
            .with_context(|| format!("VACUUM {table}"))?;
    }
    result.vacuum_seconds = vacuumed.elapsed().as_secs_f64();
    result.catalog_bytes = db
        .query_one(
            "SELECT pg_total_relation_size('catalog.files') + pg_total_relation_size('catalog.file_classes')",
            &[],
        )
        .await?
        .get(0);
    result.fill_seconds = started.elapsed().as_secs_f64();
    Ok(())
}

fn condition(key: &str, operator: pb::ConditionOperator, values: &[&str]) -> pb::MetadataCondition {
    pb::MetadataCondition {
        key: key.into(),
        operator: operator as i32,
        values: values.iter().map(|v| v.to_string()).collect(),
    }
}

/// Query `i` of the first-page measurement: three conditions, one of them a
/// range, over particle, NSB level and zenith angle (they vary, so no answer
/// is served twice from one cache line).
fn find_query(i: usize) -> (pb::FindFilesRequest, String) {
    use pb::ConditionOperator as Op;
    let particle = PARTICLES[i % PARTICLES.len()];
    let nsb = ["1", "5", "19"][i / PARTICLES.len() % 3];
    let (op, symbol, zenith) = match i / 15 % 4 {
        0 => (Op::Ge, ">=", "40"),
        1 => (Op::Lt, "<", "50"),
        2 => (Op::Gt, ">", "20"),
        _ => (Op::Le, "<=", "52"),
    };
    let request = pb::FindFilesRequest {
        conditions: vec![
            condition("particle", Op::Eq, &[particle]),
            condition("nsb", Op::Eq, &[nsb]),
            condition("thetaP", op, &[zenith]),
        ],
        ..Default::default()
    };
    let text =
        format!("--where particle={particle} --where nsb={nsb} --where 'thetaP{symbol}{zenith}'");
    (request, text)
}

/// First pages of `plan.find_queries` three-condition queries, one after
/// the other, each timed from the call to its answer.
pub async fn find(bench: &Bench, plan: &HistoryPlan) -> anyhow::Result<FindResult> {
    let mut catalog = bench.catalog.clone();
    // One of each first, not timed: connections and statements warm.
    for i in 0..3 {
        catalog.find_files(find_query(i).0).await?;
    }
    let mut times = Vec::with_capacity(plan.find_queries);
    let mut whole = Vec::with_capacity(plan.find_queries);
    let mut files = 0;
    let mut page_size = 0;
    for i in 0..plan.find_queries {
        // Each query asked both ways, one after the other.
        for by_class in [true, false] {
            let request = pb::FindFilesRequest {
                metadata_by_class: by_class,
                ..find_query(i).0
            };
            let start = Instant::now();
            let page = catalog
                .find_files(request)
                .await
                .context("FindFiles")?
                .into_inner();
            if by_class {
                times.push(start.elapsed());
                page_size = page_size.max(page.files.len() as u32);
                files += page.files.len() as u64;
            } else {
                whole.push(start.elapsed());
            }
        }
    }
    times.sort_unstable();
    whole.sort_unstable();
    Ok(FindResult {
        queries: plan.find_queries,
        page_size,
        files,
        p50_ms: percentile_ms(&times, 0.5),
        p99_ms: percentile_ms(&times, 0.99),
        max_ms: percentile_ms(&times, 1.0),
        whole_p50_ms: percentile_ms(&whole, 0.5),
        whole_p99_ms: percentile_ms(&whole, 0.99),
        example: find_query(plan.find_queries / 2).1,
    })
}

/// The whole answer of a query for about a tenth of the catalog through
/// `StreamFiles`, timed from the call to the last page.
pub async fn stream(bench: &Bench) -> anyhow::Result<StreamResult> {
    use pb::ConditionOperator as Op;
    let request = pb::FindFilesRequest {
        conditions: vec![
            condition("site", Op::Eq, &["LaPalma"]),
            condition("particle", Op::In, &["proton", "helium"]),
            condition("thetaP", Op::Le, &["40"]),
        ],
        // As prodctl asks: what the files of a class share comes once.
        metadata_by_class: true,
        ..Default::default()
    };
    let query = "--where site=LaPalma --where 'particle in proton,helium' --where 'thetaP<=40'";
    let mut catalog = bench.catalog.clone();
    let sampler = bench.sample().await?;
    let start = Instant::now();
    let mut pages = catalog
        .stream_files(request)
        .await
        .context("StreamFiles")?
        .into_inner();
    let (mut files, mut count, mut first) = (0u64, 0u64, None);
    while let Some(page) = pages.message().await.context("a page of StreamFiles")? {
        first.get_or_insert_with(|| start.elapsed());
        files += page.files.len() as u64;
        count += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    let load = sampler.finish(&bench.db).await;
    Ok(StreamResult {
        query: query.into(),
        files,
        pages: count,
        seconds,
        files_per_s: files as f64 / seconds,
        first_ms: first.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
        load,
    })
}
