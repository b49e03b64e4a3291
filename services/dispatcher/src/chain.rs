//! Chained productions: productions whose profile declares `inputs`, whose
//! jobs take other productions' output files. The dispatcher learns of
//! those files from `job.output` (its own events, consumed like anyone's)
//! and stores each once (its producer and LFN are the key, so a repeated
//! event changes nothing). A chained production takes its parents' files in
//! arrival order, as the profile groups them, in the planning task's
//! transactions: which files of a parent it took is a prefix of that
//! parent's files, kept as the last one taken (its link's `taken_seq`), and
//! each job names the files it took. A chained production stays open until
//! every parent ended and delivered the outputs of each of its DONE jobs;
//! then the last, partial group becomes a job and it closes like any
//! production once its jobs ended.

use std::collections::{BTreeMap, BTreeSet};

use prodsys_core::events::PRODUCTION_DISPATCHED;
use prodsys_core::inputs::inputs_note;
use prodsys_core::profile::input_job;
use prodsys_core::{Profile, ProfileSet};
use prodsys_db::OutboxEvent;
use prodsys_db::deadpool_postgres::Transaction;
use prodsys_proto as pb;
use prodsys_server::outbox_event;

use crate::store::{self, JobRows};

/// The producing profiles whose files a chained profile may take: `None`
/// when some chained profile takes the named production's files whatever
/// its profile.
pub fn source_profiles(profiles: &ProfileSet) -> Option<Vec<String>> {
    let mut sources = Vec::new();
    for profile in profiles.iter() {
        if let Some(inputs) = profile.inputs() {
            match &inputs.profile {
                Some(name) => sources.push(name.clone()),
                None => return None,
            }
        }
    }
    Some(sources)
}

/// Takes a batch's `job.output` events: records the deliveries and their
/// files, which the chained productions linked to their producers take (the
/// planning task makes jobs of them); how many files were new.
pub async fn take_outputs(
    tx: &Transaction<'_>,
    outputs: &[pb::JobOutput],
    sources: Option<&[String]>,
) -> anyhow::Result<u64> {
    if outputs.is_empty() {
        return Ok(0);
    }
    let producers: Vec<String> = outputs
        .iter()
        .map(|o| o.production_id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    store::lock_sources(tx, &producers).await?;
    // Only the files of productions a chained production may take are kept:
    // outputs of another profile's productions, or of productions this
    // dispatcher does not hold (another deployment's, an external
    // publisher's), are not even encoded.
    let takers = store::taking_producers(tx, &producers, sources).await?;
    if takers.is_empty() {
        return Ok(0);
    }
    let mut files = store::DeliveredFiles::default();
    let mut jobs = Vec::with_capacity(outputs.len());
    for output in outputs
        .iter()
        .filter(|o| takers.binary_search(&o.production_id).is_ok())
    {
        jobs.push((output.production_id.clone(), output.job_index as i64));
        for file in &output.files {
            files.productions.push(output.production_id.clone());
            files.lfns.push(file.lfn.clone());
            files.urls.push(file.url.clone());
            files.metadata.push(serde_json::to_value(
                file.metadata
                    .iter()
                    .collect::<std::collections::BTreeMap<_, _>>(),
            )?);
        }
    }
    let stored = store::record_deliveries(tx, &jobs, &files).await?;
    if stored > 0 {
        tracing::debug!(stored, "files delivered for chained productions");
    }
    Ok(stored)
}

/// The chained productions to advance when productions ended.
pub async fn ended(tx: &Transaction<'_>, productions: &[String]) -> anyhow::Result<Vec<String>> {
    if productions.is_empty() {
        return Ok(Vec::new());
    }
    store::children_of(tx, productions).await
}

/// The parents a newly recorded chained production takes its inputs from.
pub async fn parents_of(
    tx: &Transaction<'_>,
    profile: &Profile,
    production_id: &str,
    parameters: &serde_json::Value,
) -> anyhow::Result<Vec<String>> {
    let Some(inputs) = profile.inputs() else {
        return Ok(Vec::new());
    };
    Ok(match (inputs.parent(parameters), &inputs.profile) {
        (Some(parent), _) => vec![parent],
        (None, Some(of)) => store::productions_of_profile(tx, of, production_id).await?,
        (None, None) => Vec::new(),
    })
}

/// Links a newly recorded chained production to its parents; it takes the
/// files they delivered already as it takes later ones. The caller holds the
/// parents' source locks.
pub async fn link(
    tx: &Transaction<'_>,
    profile: &Profile,
    production_id: &str,
    parameters: &serde_json::Value,
    parents: &[String],
) -> anyhow::Result<()> {
    let conditions = serde_json::to_value(profile.input_conditions(parameters))?;
    let delivered = store::link_chained(tx, production_id, parents, &conditions).await?;
    tracing::info!(%production_id, ?parents, %conditions, already_delivered = delivered,
        "chained production waits for input");
    Ok(())
}

/// Makes jobs of the waiting inputs of each of `children` as its profile
/// groups them; for a child whose every parent ended, the last group too,
/// and its inputs are complete (closed at once if its jobs all ended). The
/// events to publish (`production.dispatched` with the grown job total,
/// `production.completed`).
pub async fn advance(
    tx: &Transaction<'_>,
    profiles: &ProfileSet,
    children: &[String],
) -> anyhow::Result<(Vec<OutboxEvent>, u64)> {
    let mut events = Vec::new();
    let mut created_all = 0;
    let sorted: BTreeSet<&String> = children.iter().collect();
    for child in sorted {
        let Some(row) = store::lock_chained(tx, child).await? else {
            continue;
        };
        let Some(profile) = profiles.get(&row.profile) else {
            tracing::warn!(production_id = %child, profile = %row.profile, "cannot take inputs: unknown profile");
            continue;
        };
        let Some(spec) = profile.inputs() else {
            continue;
        };
        let parents = store::parents(tx, child).await?;
        let all_ended = parents.iter().all(|(_, _, ended)| *ended);
        // Grouped by a key, nothing becomes a job before every parent ended.
        let waiting = if spec.group_by.is_some() && !all_ended {
            store::Waiting::default()
        } else {
            store::waiting_inputs(tx, child, spec.group_by.is_some()).await?
        };
        let groups = spec.group(&waiting.inputs, all_ended);
        let mut jobs = JobRows::default();
        // The last file taken of each parent: groups are taken in arrival
        // order, so what is taken of a parent is a prefix of its files.
        let mut last: BTreeMap<&str, i64> = BTreeMap::new();
        let mut taken = 0u64;
        let mut job_total = row.job_total;
        for group in &groups {
            let job = input_job(
                &row.fingerprint,
                row.run_number_offset as u64,
                job_total as u64,
                group.len() as u64,
            );
            let lfns: Vec<&str> = group
                .iter()
                .map(|&i| waiting.inputs[i].lfn.as_str())
                .collect();
            jobs.push_taking(child, &job, &lfns);
            for &i in group {
                let (parent, seq) = &waiting.origins[i];
                let last_seq = last.entry(parent.as_str()).or_default();
                *last_seq = (*last_seq).max(*seq);
            }
            taken += group.len() as u64;
            job_total += 1;
        }
        let created = groups.len() as u64;
        created_all += created;
        jobs.flush(tx).await?;
        let (parents_taken, last_taken): (Vec<&str>, Vec<i64>) = last.into_iter().unzip();
        store::mark_taken(tx, child, &parents_taken, &last_taken).await?;
        let note = if all_ended {
            let states: Vec<(String, Option<prodsys_core::ProductionState>)> = parents
                .iter()
                .map(|(id, state, _)| (id.clone(), *state))
                .collect();
            inputs_note(&states)
        } else {
            String::new()
        };
        store::update_chained(tx, child, job_total, all_ended, &note, taken).await?;
        if created > 0 || all_ended {
            let (_, used) = store::inputs_summary(tx, child).await?;
            tracing::info!(production_id = %child, created, job_total, inputs_used = used,
                inputs_complete = all_ended, %note, "chained production took inputs");
            events.push(dispatched(profile, child, &row, job_total as u64, used));
        }
        if all_ended && let Some(event) = crate::scheduler::close_if_finished(tx, child).await? {
            events.push(event);
        }
    }
    Ok((events, created_all))
}

/// `production.dispatched` of a chained production whose job total grew
/// (or that waits for its first input: `job_total` 0).
pub fn dispatched(
    profile: &Profile,
    production_id: &str,
    row: &store::Chained,
    job_total: u64,
    inputs_used: u64,
) -> OutboxEvent {
    let per_job = profile.inputs().map_or(1, |i| i.group_size);
    let job = profile.estimate(per_job);
    let files = profile.estimate(inputs_used.max(1));
    let estimate = pb::ResourceEstimate {
        cpu_seconds_per_job: job.cpu_seconds,
        cpu_hours_total: if job_total == 0 {
            0.0
        } else {
            files.cpu_seconds / 3600.0
        },
        memory_mb: job.memory_mb,
        disk_mb_per_job: job.disk_mb,
        disk_gb_total: if job_total == 0 {
            0.0
        } else {
            files.disk_mb / 1024.0
        },
    };
    outbox_event(
        PRODUCTION_DISPATCHED,
        production_id,
        &pb::ProductionDispatched {
            production_id: production_id.to_string(),
            job_total,
            backend: row.backend.clone(),
            estimate: Some(estimate),
            waiting_for_input: job_total == 0,
            inputs_used,
            // Told once, when the production was first dispatched.
            installations: Vec::new(),
        },
    )
}
