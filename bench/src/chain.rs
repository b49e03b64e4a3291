//! A chain whose parent delivers many files (issue 14): a CTA simulation
//! production (accepted, its one job holding the local slot) and a DL1
//! processing production chained after it (one job per simulation file),
//! then the parent's `job.output` events as the dispatcher publishes them
//! for DONE jobs, each file as a CTA simulation job describes it.
//!
//! Two measurements on the same pair: **paced**, one event of
//! `files_per_event` files every `pace_ms`, each timed from the moment it
//! was handed to the broker until the dispatcher's job total of the chained
//! production holds a job for every file of it and of all before it (the
//! child's jobs are made in the transaction that takes the inputs); and
//! **bulk**, `files` more files published at once, timed until the chained
//! production has a job for every one (the input bookkeeping's rate). At the
//! end every input must have been used exactly once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use prodsys_core::events::JOB_OUTPUT;
use prodsys_proto as pb;

use crate::amqp;
use crate::stack::{Bench, PhaseLoad, catalog_file};

#[derive(Debug, Clone, Copy)]
pub struct ChainPlan {
    /// Files the parent delivers in the bulk measurement.
    pub files: u64,
    /// Files per `job.output` event (one job's outputs).
    pub files_per_event: u64,
    /// Events of the paced measurement, one every `pace_ms`.
    pub paced_events: u64,
    pub pace_ms: u64,
}

#[derive(Debug, Clone, Default)]
pub struct ChainResult {
    pub parent: String,
    pub child: String,
    pub files_per_event: u64,
    pub paced_events: u64,
    pub pace_ms: u64,
    /// From an event handed to the broker until the child had a job for
    /// each of its files (and of every event before it).
    pub lag_p50_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
    /// The bulk measurement: files, and first publish → a job for every one.
    pub files: u64,
    pub seconds: f64,
    pub publish_seconds: f64,
    pub files_per_s: f64,
    /// Afterwards: the child's jobs, its inputs taken by a job, and the
    /// inputs taken by more than one job or by none (both must be 0).
    pub jobs: i64,
    pub inputs_used: i64,
    pub misused: i64,
    pub load: PhaseLoad,
}

impl ChainResult {
    pub fn files_all(&self) -> u64 {
        self.files + self.paced_events * self.files_per_event
    }
}

/// The parent's `job.output` of job `job`: files `first..first + n`.
fn output_event(exchange: &str, parent: &str, job: u64, first: u64, n: u64) -> amqp::Message {
    let output = pb::JobOutput {
        production_id: parent.to_string(),
        job_index: job,
        attempt: 1,
        files: (first..first + n)
            .map(|i| catalog_file(parent, job, i))
            .collect(),
        ..Default::default()
    };
    amqp::event(
        exchange,
        JOB_OUTPUT,
        parent,
        prost::Message::encode_to_vec(&output),
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

impl Bench {
    /// The chained production's job total as the dispatcher holds it.
    async fn job_total(&self, child: &str) -> anyhow::Result<i64> {
        Ok(self
            .db
            .query_opt(
                "SELECT job_total FROM dispatcher.productions WHERE production_id = $1",
                &[&child],
            )
            .await?
            .map_or(0, |row| row.get(0)))
    }

    /// Waits until the child's job total reaches `total`; when it did.
    async fn until_jobs(
        &self,
        child: &str,
        total: i64,
        limit: Duration,
    ) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            if self.job_total(child).await? >= total {
                return Ok(Instant::now());
            }
            self.ensure_services_run()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "{child} did not reach {total} jobs within {limit:?} (it has {})",
                self.job_total(child).await?
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn chain(&self, plan: &ChainPlan) -> anyhow::Result<ChainResult> {
        let exchange = format!("{}prodsys.events", self.env.prefix);
        // The parent: a simulation of the shipped example, accepted; its one
        // job holds the local slot, so the child's jobs wait as CREATED.
        let client = self.client();
        let (n, request) = client.request();
        let (parent, _) = self.accepted_production(n, request).await?;
        let example = prodsys_testkit::repo_root().join("examples/cta-dl1.json");
        let mut child_request: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&example)?)
                .with_context(|| format!("reading {}", example.display()))?;
        child_request["parameters"]["input_production"] = parent.clone().into();
        let (n, _) = client.request();
        let request = pb::SubmitRequestRequest {
            profile: child_request["profile"].as_str().unwrap_or_default().into(),
            vo: child_request["vo"].as_str().unwrap_or_default().into(),
            parameters_json: child_request["parameters"].to_string(),
            submitter: "bench".into(),
            ..Default::default()
        };
        let (child, _) = self.accepted_production(n, request).await?;
        // Linked to its parent by the dispatcher before any file comes.
        let deadline = Instant::now() + Duration::from_secs(60);
        while self
            .db
            .query_opt(
                "SELECT 1 FROM dispatcher.chain_links WHERE child = $1 AND parent = $2",
                &[&child, &parent],
            )
            .await?
            .is_none()
        {
            self.ensure_services_run()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "{child} was never linked to {parent}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let per = plan.files_per_event;
        let sampler = self.sample().await?;
        // Paced: one event every pace_ms, each noted as it is handed over.
        let published: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let pacer = {
            let channel = amqp::confirm_channel(self.amqp_connection()).await?;
            let (exchange, parent, published) =
                (exchange.clone(), parent.clone(), published.clone());
            let (events, pace) = (plan.paced_events, Duration::from_millis(plan.pace_ms));
            tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                for k in 0..events {
                    tokio::time::sleep_until(start + pace * k as u32).await;
                    let message = output_event(&exchange, &parent, k, k * per, per);
                    published
                        .lock()
                        .expect("publish times")
                        .push(Instant::now());
                    amqp::publish_all(&channel, std::iter::once(message), 1).await?;
                }
                anyhow::Ok(())
            })
        };
        // The child's job total, seen every few milliseconds.
        let mut seen: Vec<(Instant, i64)> = Vec::new();
        let paced_total = (plan.paced_events * per) as i64;
        let deadline = Instant::now()
            + Duration::from_millis(plan.pace_ms * plan.paced_events)
            + Duration::from_secs(120);
        loop {
            let total = self.job_total(&child).await?;
            seen.push((Instant::now(), total));
            if total >= paced_total {
                break;
            }
            self.ensure_services_run()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "{child} did not make its paced jobs in time ({total} of {paced_total})"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        pacer.await.context("the paced publisher")??;
        let published = published.lock().expect("publish times").clone();
        let mut lags: Vec<f64> = published
            .iter()
            .enumerate()
            .filter_map(|(k, at)| {
                let wanted = ((k as u64 + 1) * per) as i64;
                let (when, _) = seen.iter().find(|(_, total)| *total >= wanted)?;
                Some(when.saturating_duration_since(*at).as_secs_f64() * 1000.0)
            })
            .collect();
        lags.sort_by(f64::total_cmp);

        // Bulk: every other file at once.
        let events = plan.files.div_ceil(per);
        let first = plan.paced_events * per;
        let messages = {
            let (exchange, parent) = (exchange.clone(), parent.clone());
            let (files, paced) = (plan.files, plan.paced_events);
            (0..events).map(move |e| {
                let from = first + e * per;
                let n = per.min(first + files - from);
                output_event(&exchange, &parent, paced + e, from, n)
            })
        };
        let start = Instant::now();
        let publisher = self.publish_in_background(messages);
        let all = (first + plan.files) as i64;
        let done = self
            .until_jobs(&child, all, Duration::from_secs(600))
            .await?;
        let seconds = done.duration_since(start).as_secs_f64();
        let publish_seconds = publisher.await.context("the bulk publisher")??;
        let load = sampler.finish(&self.db).await;

        let row = self
            .db
            .query_one(
                "WITH taken AS (
                     SELECT i.lfn FROM dispatcher.jobs j,
                            jsonb_array_elements_text(j.inputs) AS i(lfn)
                     WHERE j.production_id = $1),
                   delivered AS (
                     SELECT d.lfn FROM dispatcher.chain_links l
                     JOIN dispatcher.delivered_files d ON d.production_id = l.parent
                     WHERE l.child = $1 AND d.metadata @> l.conditions)
                 SELECT (SELECT count(*) FROM dispatcher.jobs WHERE production_id = $1),
                        (SELECT count(*) FROM taken),
                        -- taken twice, or delivered and never taken
                        (SELECT count(*) - count(DISTINCT lfn) FROM taken)
                          + (SELECT count(*) FROM delivered
                             WHERE lfn NOT IN (SELECT lfn FROM taken))",
                &[&child],
            )
            .await?;
        Ok(ChainResult {
            parent,
            child,
            files_per_event: per,
            paced_events: plan.paced_events,
            pace_ms: plan.pace_ms,
            lag_p50_ms: percentile(&lags, 0.5),
            lag_p99_ms: percentile(&lags, 0.99),
            lag_max_ms: lags.last().copied().unwrap_or(f64::NAN),
            files: plan.files,
            seconds,
            publish_seconds,
            files_per_s: plan.files as f64 / seconds,
            jobs: row.get(0),
            inputs_used: row.get(1),
            misused: row.get(2),
            load,
        })
    }
}
