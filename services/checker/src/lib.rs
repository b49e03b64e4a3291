//! Checker: decides whether a received request becomes a production, before
//! a single CPU hour is spent. It validates the parameters against the
//! profile (requests also come from event publishers), computes the physics
//! fingerprint, refuses an exact duplicate by naming the production that has
//! that identity, reports overlaps (same identity but other statistics or an
//! intersecting range, or output files of the same identity: NSB levels in
//! common) and accepts them only as explicit extensions with new run numbers.
//! It compares each identity of a request's files with what the catalog holds
//! (from prodsys or registered elsewhere) and explains what matched and which
//! keys differ. It assigns a human-readable production ID from a per-VO
//! sequence that never reuses a number. `Evaluate` answers the same question
//! without storing anything (intake's `ValidateRequest`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use anyhow::Context;
use prodsys_core::events::{REQUEST_ACCEPTED, REQUEST_RECEIVED, REQUEST_REJECTED, REQUEST_REUSED};
use prodsys_core::{Profile, ProfileSet, Violation};
use prodsys_db::Cached;
use prodsys_db::deadpool_postgres::Transaction;
use prodsys_db::{Db, Migration, OutboxEvent};
use prodsys_messaging::{BatchHandler, Incoming, Outcome};
use prodsys_proto as pb;
use prodsys_server::{Foundation, Running, ServiceError, decode_event, outbox_event};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use uuid::Uuid;

pub const SERVICE: &str = "checker";

pub const MIGRATIONS: &[Migration] = prodsys_db::migrations![
    "0001_productions_and_id_sequences.sql",
    "0002_overlaps_and_run_ranges.sql",
    "0020_file_base_fingerprints.sql",
    "0050_id_sequences_by_prefix.sql",
];

pub async fn start(
    settings: &prodsys_config::Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let profiles = Arc::new(
        ProfileSet::load_dir(&settings.profiles_dir).context("loading production profiles")?,
    );
    let foundation = Foundation::start(
        settings,
        SERVICE,
        MIGRATIONS,
        &[REQUEST_RECEIVED],
        &[],
        &shutdown,
    )
    .await?;
    let catalog = tonic::transport::Endpoint::from_shared(settings.checker.catalog_url.clone())
        .context("checker.catalog_url")?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(10))
        .connect_lazy();
    let checker = Checker {
        db: foundation.db.clone(),
        profiles,
        installations: settings.dispatcher.installations().into_keys().collect(),
        destinations: settings.forwarding.destinations.keys().cloned().collect(),
        max_jobs: settings.dispatcher.max_jobs_per_production,
        catalog: pb::catalog_service_client::CatalogServiceClient::new(catalog),
    };
    foundation.consume(settings, checker.clone(), &shutdown);
    let max = settings.grpc.max_message_bytes;
    let (routes, reporter) = prodsys_server::base_routes()?;
    let routes = routes.add_service(
        pb::checker_service_server::CheckerServiceServer::new(checker)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
    );
    foundation
        .serve_grpc(
            &settings.grpc.host,
            settings.checker.port,
            routes,
            reporter,
            &["prodsys.v1.CheckerService"],
            &shutdown,
        )
        .await
}

#[derive(Clone)]
struct Checker {
    db: Db,
    profiles: Arc<ProfileSet>,
    /// The WMS installations a request may choose.
    installations: Vec<String>,
    /// The forwarding destinations a request may name (none: nothing is forwarded).
    destinations: Vec<String>,
    /// The deployment's ceiling on one production's jobs.
    max_jobs: u64,
    catalog: pb::catalog_service_client::CatalogServiceClient<tonic::transport::Channel>,
}

/// Most identities asked of the catalog in one call (its limit).
const CATALOG_QUERIES_PER_CALL: usize = 1000;

/// A production ID: the profile's prefix and a six-digit (or longer) number.
pub fn production_id(prefix: &str, number: i64) -> String {
    format!("{prefix}-{number:06}")
}

/// What a request asks for, from gRPC or from an event.
struct Candidate<'a> {
    profile: &'a str,
    backend: &'a str,
    vo: &'a str,
    parameters_json: &'a str,
    extend: bool,
    reuse_existing: bool,
    forward: &'a [String],
    forward_replace: bool,
}

/// The checker's answer, before anything is written.
struct Evaluation<'p> {
    validation: pb::Validation,
    accepted: Option<Accepted<'p>>,
}

struct Accepted<'p> {
    profile: &'p Profile,
    parameters: serde_json::Value,
    base_fingerprint: String,
    file_base: Option<String>,
    run_number_offset: i64,
    last_run: i64,
}

/// A production the checker knows of, as far as a decision needs it.
#[derive(Clone)]
struct Known {
    production_id: String,
    fingerprint: String,
    parameters: serde_json::Value,
    last_run: i64,
}

/// The productions that share a fingerprint or a base fingerprint with the
/// candidates of one batch, read with one query each, and kept up to date
/// as the batch's own decisions accept more: a request sees every decision
/// taken before it, in the same batch or an earlier one.
#[derive(Default)]
struct Neighbourhood {
    by_fingerprint: HashMap<String, String>,
    by_base: HashMap<String, Vec<Known>>,
    /// By file-base fingerprint, with each one's base fingerprint.
    by_file_base: HashMap<String, Vec<(String, Known)>>,
}

impl Neighbourhood {
    async fn load(
        tx: &Transaction<'_>,
        fingerprints: &[String],
        bases: &[String],
        file_bases: &[String],
    ) -> anyhow::Result<Self> {
        let mut known = Neighbourhood::default();
        if fingerprints.is_empty() && bases.is_empty() {
            return Ok(known);
        }
        // Two index scans, not one OR: a generic plan for an OR of two
        // ANY(array) conditions scans the whole table once it has grown.
        // Until the table is first analysed, the planner takes each base
        // fingerprint to match half a percent of it, and a batch's hundred
        // of them most of it: a whole-table scan (50 ms a batch at 40,000
        // productions). Both lookups are only ever index probes.
        tx.batch_execute("SET LOCAL enable_seqscan = off").await?;
        let mut seen = HashSet::new();
        let rows = tx
            .query_cached(
                "SELECT production_id, fingerprint, base_fingerprint, parameters, last_run, file_base
                 FROM productions WHERE fingerprint = ANY($1)
                 UNION ALL
                 SELECT production_id, fingerprint, base_fingerprint, parameters, last_run, file_base
                 FROM productions WHERE base_fingerprint = ANY($2)
                 UNION ALL
                 SELECT production_id, fingerprint, base_fingerprint, parameters, last_run, file_base
                 FROM productions WHERE file_base = ANY($3)",
                &[&fingerprints, &bases, &file_bases],
            )
            .await?;
        tx.batch_execute("RESET enable_seqscan").await?;
        for row in rows {
            if !seen.insert(row.get::<_, String>(0)) {
                continue;
            }
            let file_base: String = row.get(5);
            known.add(
                row.get(2),
                (!file_base.is_empty()).then_some(file_base),
                Known {
                    production_id: row.get(0),
                    fingerprint: row.get(1),
                    parameters: row.get(3),
                    last_run: row.get(4),
                },
            );
        }
        Ok(known)
    }

    fn add(&mut self, base: String, file_base: Option<String>, production: Known) {
        self.by_fingerprint.insert(
            production.fingerprint.clone(),
            production.production_id.clone(),
        );
        if let Some(file_base) = file_base {
            self.by_file_base
                .entry(file_base)
                .or_default()
                .push((base.clone(), production.clone()));
        }
        self.by_base.entry(base).or_default().push(production);
    }

    /// Productions whose files may share an identity with the candidate's
    /// (same file-base fingerprint) though their base differs, by production ID.
    fn file_relatives<'a>(&'a self, file_base: &str, base: &str) -> Vec<&'a Known> {
        let mut relatives: Vec<&Known> = self
            .by_file_base
            .get(file_base)
            .map(|all| {
                all.iter()
                    .filter(|(b, _)| b != base)
                    .map(|(_, k)| k)
                    .collect()
            })
            .unwrap_or_default();
        relatives.sort_by(|a, b| a.production_id.cmp(&b.production_id));
        relatives
    }

    fn existing(&self, fingerprint: &str) -> Option<&str> {
        self.by_fingerprint.get(fingerprint).map(String::as_str)
    }

    /// Same identity except statistics or ranges, by production ID.
    fn relatives<'a>(&'a self, base: &str, fingerprint: &'a str) -> Vec<&'a Known> {
        let mut relatives: Vec<&Known> = self
            .by_base
            .get(base)
            .map(|all| {
                all.iter()
                    .filter(|k| k.fingerprint != fingerprint)
                    .collect()
            })
            .unwrap_or_default();
        relatives.sort_by(|a, b| a.production_id.cmp(&b.production_id));
        relatives
    }
}

/// A request of a batch on its way to a decision: what it asks, the checks
/// that need nothing stored, and what the catalog holds of its simulation.
struct Pending<'r, 'p> {
    request: &'r pb::RequestReceived,
    candidate: Candidate<'r>,
    prepared: Prepared<'p>,
    catalog: Option<CatalogAnswer>,
}

/// What the catalog holds of each identity of a request's files (one per
/// NSB level, say), labelled by the per-file values it stands for.
type CatalogAnswer = Vec<(String, pb::FindExistingResponse)>;

/// A candidate after the checks that need no database: its profile, its
/// parameters as the profile completed them and its fingerprints.
struct Prepared<'p> {
    validation: pb::Validation,
    checked: Option<(&'p Profile, serde_json::Value, String)>,
}

impl Checker {
    /// The checks that need nothing stored: installation, schema, rules.
    fn prepare(&self, candidate: &Candidate<'_>) -> Prepared<'_> {
        let mut validation = pb::Validation::default();
        if !self.installations.iter().any(|i| i == candidate.backend) {
            validation.violations.push(
                Violation::new(
                    "backend",
                    format!(
                        "unknown WMS installation {:?}; this deployment has {}",
                        candidate.backend,
                        self.installations.join(", ")
                    ),
                )
                .into(),
            );
        }
        match self.profiles.validate_request(
            candidate.profile,
            candidate.vo,
            candidate.parameters_json,
        ) {
            Ok((profile, parameters)) => {
                if let Err(unknown) = profile.destinations(
                    &parameters,
                    candidate.forward,
                    candidate.forward_replace,
                    &self.destinations,
                ) {
                    validation
                        .violations
                        .extend(unknown.into_iter().map(Into::into));
                }
                validation.fingerprint = profile.fingerprint(&parameters);
                let base = profile.base_fingerprint(&parameters);
                Prepared {
                    validation,
                    checked: Some((profile, parameters, base)),
                }
            }
            Err(violations) => {
                validation.violations = violations.into_iter().map(Into::into).collect();
                Prepared {
                    validation,
                    checked: None,
                }
            }
        }
    }

    /// Everything the checker knows about a prepared candidate, given the
    /// productions in its neighbourhood.
    fn evaluate<'p>(
        &self,
        prepared: Prepared<'p>,
        candidate: &Candidate<'_>,
        known: &Neighbourhood,
        catalog: Option<&CatalogAnswer>,
    ) -> Evaluation<'p> {
        let Prepared {
            mut validation,
            checked,
        } = prepared;
        let Some((profile, parameters, base_fingerprint)) = checked else {
            return Evaluation {
                validation,
                accepted: None,
            };
        };
        let fingerprint = validation.fingerprint.clone();
        let mut violations: Vec<Violation> =
            validation.violations.drain(..).map(Into::into).collect();
        if let Some(existing) = known.existing(&fingerprint) {
            // Asked for, the existing production is the answer rather than a refusal.
            if !candidate.reuse_existing {
                violations.push(Violation::new(
                    "parameters",
                    format!("the same simulation already exists as production {existing}"),
                ));
            }
            validation.existing_production_id = existing.to_string();
        }
        let relatives = known.relatives(&base_fingerprint, &fingerprint);
        let mut run_number_offset = 0i64;
        for relative in &relatives {
            run_number_offset = run_number_offset.max(relative.last_run);
            if let Some(description) = profile.overlap(&parameters, &relative.parameters) {
                validation.overlaps.push(pb::Overlap {
                    production_id: relative.production_id.clone(),
                    description,
                });
            }
        }
        // Productions whose files share an identity with some of this one's
        // (NSB 1 of NSB 1+5, for NSB 1+19).
        let file_base = profile.file_base_fingerprint(&parameters);
        let file_relatives = file_base
            .as_deref()
            .map(|fb| known.file_relatives(fb, &base_fingerprint))
            .unwrap_or_default();
        let mut ids: Vec<&str> = relatives.iter().map(|r| r.production_id.as_str()).collect();
        for relative in file_relatives {
            if let Some(description) = profile.per_file_overlap(&parameters, &relative.parameters) {
                run_number_offset = run_number_offset.max(relative.last_run);
                ids.push(&relative.production_id);
                validation.overlaps.push(pb::Overlap {
                    production_id: relative.production_id.clone(),
                    description,
                });
            }
        }
        // Overlaps with productions known here; the catalog's come after.
        let known_overlaps = validation.overlaps.len();
        if let Some(answers) = catalog {
            let held = compare_with_catalog(answers, &ids, &mut validation);
            // An extension's runs follow every run of its identity the catalog holds.
            for (_, found) in answers {
                run_number_offset = run_number_offset.max(found.last_run as i64);
            }
            if !held.is_empty() && !candidate.extend {
                violations.push(Violation::new(
                    "parameters",
                    format!(
                        "outputs of this simulation already exist in the catalog: {}; submit with extend to produce more",
                        held.join("; ")
                    ),
                ));
            }
        }
        if known_overlaps > 0 && !candidate.extend {
            let names: Vec<String> = validation.overlaps[..known_overlaps]
                .iter()
                .map(|o| format!("{} ({})", o.production_id, o.description))
                .collect();
            violations.push(Violation::new(
                "extend",
                format!(
                    "overlaps {}; submit with extend to add new runs to the same simulation",
                    names.join(", ")
                ),
            ));
        }
        let plan = profile.plan(&parameters, &fingerprint, run_number_offset as u64);
        if let Some(plan) = &plan {
            validation.plan = Some(pb::JobPlan {
                jobs: plan.job_count,
                units_per_job: plan.per_job,
                total_units: plan.total_units,
                first_run: plan.run_number_offset + 1,
                last_run: plan.run_number_offset + plan.job_count,
            });
            validation.estimate = Some(profile.resource_estimate(plan));
            violations.extend(profile.check_job_count(plan, self.max_jobs));
        } else {
            violations.push(Violation::new("parameters", "give no job plan"));
        }
        validation.violations = violations.into_iter().map(Into::into).collect();
        validation.acceptable = validation.violations.is_empty();
        let accepted = match (validation.acceptable, plan) {
            (true, Some(plan)) => Some(Accepted {
                profile,
                parameters,
                base_fingerprint,
                file_base,
                run_number_offset,
                last_run: (plan.run_number_offset + plan.job_count) as i64,
            }),
            _ => None,
        };
        Evaluation {
            validation,
            accepted,
        }
    }

    /// What the catalog holds of each prepared candidate's simulation, per
    /// identity of its files, for those that need asking (checked, with a
    /// catalog identity): one call for the whole batch, made before the
    /// decisions take the checker's lock.
    async fn ask_catalog(
        &self,
        prepared: &[Prepared<'_>],
        candidates: &[Candidate<'_>],
    ) -> anyhow::Result<Vec<Option<CatalogAnswer>>> {
        let mut asked = Vec::new();
        let mut queries = Vec::new();
        // Extensions too: their runs must follow those the catalog holds.
        for (i, (p, _)) in prepared.iter().zip(candidates).enumerate() {
            let Some((profile, parameters, _)) = &p.checked else {
                continue;
            };
            for identity in profile.file_identities(parameters) {
                asked.push((i, identity.label));
                queries.push(identity.query);
            }
        }
        let mut found: Vec<Option<CatalogAnswer>> = vec![None; prepared.len()];
        let mut answers = Vec::with_capacity(queries.len());
        while !queries.is_empty() {
            let rest = queries.split_off(queries.len().min(CATALOG_QUERIES_PER_CALL));
            let chunk = std::mem::replace(&mut queries, rest);
            let expected = chunk.len();
            let results = match self
                .catalog
                .clone()
                .find_existing_many(pb::FindExistingManyRequest {
                    queries: chunk.clone(),
                })
                .await
            {
                Ok(answer) => answer.into_inner().results,
                // A catalog older than FindExistingMany (during an upgrade):
                // one call per request, as before it.
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    let mut results = Vec::with_capacity(chunk.len());
                    for query in chunk {
                        results.push(
                            self.catalog
                                .clone()
                                .find_existing(query)
                                .await
                                .context("asking the catalog for existing outputs")?
                                .into_inner(),
                        );
                    }
                    results
                }
                Err(status) => {
                    // The catalog down or slow is waited out (the consumer
                    // holds the batch), never a verdict on the requests.
                    let transient = prodsys_messaging::error::status_is_transient(&status);
                    let error = anyhow::Error::new(status)
                        .context("asking the catalog for existing outputs");
                    return Err(match transient {
                        true => prodsys_messaging::Transient::wrap(error),
                        false => error,
                    });
                }
            };
            anyhow::ensure!(
                results.len() == expected,
                "the catalog answered {} of {expected} queries",
                results.len()
            );
            answers.extend(results);
        }
        for ((i, label), answer) in asked.into_iter().zip(answers) {
            found[i].get_or_insert_with(Vec::new).push((label, answer));
        }
        Ok(found)
    }

    /// Decides a batch of requests inside `tx`, in order, each seeing the
    /// decisions before it; returns the events announcing the verdicts. The
    /// database work is a fixed number of statements however large the batch:
    /// one read of the neighbourhood, one sequence update, one insert.
    async fn decide(
        &self,
        tx: &Transaction<'_>,
        pending: Vec<Pending<'_, '_>>,
    ) -> anyhow::Result<Vec<OutboxEvent>> {
        let requests: Vec<&pb::RequestReceived> = pending.iter().map(|p| p.request).collect();
        let fingerprints: Vec<String> = pending
            .iter()
            .filter(|p| p.prepared.checked.is_some())
            .map(|p| p.prepared.validation.fingerprint.clone())
            .collect();
        let bases: Vec<String> = pending
            .iter()
            .filter_map(|p| p.prepared.checked.as_ref().map(|(_, _, base)| base.clone()))
            .collect();
        let file_bases: Vec<String> = pending
            .iter()
            .filter_map(|p| {
                let (profile, parameters, _) = p.prepared.checked.as_ref()?;
                profile.file_base_fingerprint(parameters)
            })
            .collect();
        let mut known = Neighbourhood::load(tx, &fingerprints, &bases, &file_bases).await?;
        // Verdicts first (IDs need the count per prefix), then one write for all.
        let mut verdicts = Vec::with_capacity(requests.len());
        for Pending {
            request,
            candidate,
            prepared,
            catalog,
        } in pending
        {
            let evaluation = self.evaluate(prepared, &candidate, &known, catalog.as_ref());
            if let Some(accepted) = &evaluation.accepted
                && evaluation.validation.existing_production_id.is_empty()
            {
                // Placeholder ID until the sequence is read; unique within the batch.
                known.add(
                    accepted.base_fingerprint.clone(),
                    accepted.file_base.clone(),
                    Known {
                        production_id: placeholder(&request.request_id),
                        fingerprint: evaluation.validation.fingerprint.clone(),
                        parameters: accepted.parameters.clone(),
                        last_run: accepted.last_run,
                    },
                );
            }
            verdicts.push(evaluation);
        }
        // An ID is the profile's prefix and a number: one sequence per prefix.
        let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
        for e in &verdicts {
            if let Some(accepted) = &e.accepted
                && e.validation.existing_production_id.is_empty()
            {
                *wanted.entry(accepted.profile.id_prefix()).or_default() += 1;
            }
        }
        let mut next: HashMap<String, i64> = HashMap::new();
        if !wanted.is_empty() {
            let (prefixes, counts): (Vec<&str>, Vec<i64>) = wanted.into_iter().unzip();
            for row in tx
                .query_cached(
                    "INSERT INTO id_prefix_sequences (id_prefix, last)
                     SELECT * FROM unnest($1::text[], $2::bigint[])
                     ON CONFLICT (id_prefix) DO UPDATE SET last = id_prefix_sequences.last + EXCLUDED.last
                     RETURNING id_prefix, last",
                    &[&prefixes, &counts],
                )
                .await?
            {
                let prefix: String = row.get(0);
                let last: i64 = row.get(1);
                let count =
                    counts[prefixes.iter().position(|p| *p == prefix).expect("asked for")];
                next.insert(prefix, last - count + 1);
            }
        }
        // Placeholder → real production ID, for overlaps named inside the batch.
        let mut renamed: HashMap<String, String> = HashMap::new();
        let mut rows = NewProductions::default();
        let mut events = Vec::with_capacity(requests.len());
        for (request, evaluation) in requests.iter().zip(verdicts) {
            let Evaluation {
                mut validation,
                accepted,
            } = evaluation;
            name_placeholders(&mut validation, &renamed);
            if validation.acceptable && !validation.existing_production_id.is_empty() {
                let existing = validation.existing_production_id;
                tracing::info!(request_id = %request.request_id, %existing, "request answered with the existing production");
                let event = pb::RequestAccepted {
                    request_id: request.request_id.clone(),
                    production_id: existing.clone(),
                    profile: request.profile.clone(),
                    vo: request.vo.clone(),
                    fingerprint: validation.fingerprint,
                    parameters_json: request.parameters_json.clone(),
                    backend: request.backend.clone(),
                    run_number_offset: 0,
                    correlation_id: request.correlation_id.clone(),
                    priority: request.priority,
                    forward: Vec::new(),
                };
                events.push(outbox_event(REQUEST_REUSED, &existing, &event));
                continue;
            }
            let Some(accepted) = accepted else {
                tracing::info!(request_id = %request.request_id, violations = validation.violations.len(),
                    existing = %validation.existing_production_id, "request rejected");
                let event = pb::RequestRejected {
                    request_id: request.request_id.clone(),
                    violations: validation.violations,
                    existing_production_id: validation.existing_production_id,
                    correlation_id: request.correlation_id.clone(),
                };
                events.push(outbox_event(REQUEST_REJECTED, &request.request_id, &event));
                continue;
            };
            let request_id =
                Uuid::parse_str(&request.request_id).context("request_id is not a UUID")?;
            let number = next
                .get_mut(accepted.profile.id_prefix())
                .expect("a number for every prefix");
            let production_id = production_id(accepted.profile.id_prefix(), *number);
            *number += 1;
            renamed.insert(placeholder(&request.request_id), production_id.clone());
            tracing::info!(request_id = %request.request_id, %production_id,
                extends = validation.overlaps.len(), "request accepted");
            let parameters_json = accepted.parameters.to_string();
            let run_number_offset = accepted.run_number_offset as u64;
            // Checked in `prepare`: an unknown destination refused the request.
            let forward = accepted
                .profile
                .destinations(
                    &accepted.parameters,
                    &request.forward,
                    request.forward_replace,
                    &self.destinations,
                )
                .unwrap_or_default();
            rows.push(
                &production_id,
                &validation.fingerprint,
                request_id,
                request,
                accepted,
            );
            let event = pb::RequestAccepted {
                request_id: request.request_id.clone(),
                production_id: production_id.clone(),
                profile: request.profile.clone(),
                vo: request.vo.clone(),
                fingerprint: validation.fingerprint,
                parameters_json,
                backend: request.backend.clone(),
                run_number_offset,
                correlation_id: request.correlation_id.clone(),
                priority: request.priority,
                forward,
            };
            events.push(outbox_event(REQUEST_ACCEPTED, &production_id, &event));
        }
        rows.insert(tx).await?;
        Ok(events)
    }
}

/// Compares what the catalog holds of each identity of a request's files
/// with the request: explains each in `validation.explanations`, names the
/// productions this checker does not already report (`known`) as overlaps,
/// and returns, per identity with such outputs, what it holds in words
/// (empty when nothing stands in the way).
fn compare_with_catalog(
    answers: &CatalogAnswer,
    known: &[&str],
    validation: &mut pb::Validation,
) -> Vec<String> {
    let duplicate = !validation.existing_production_id.is_empty();
    let mut held = Vec::new();
    // Per production, the identities (NSB levels) it holds.
    let mut overlapping: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (label, found) in answers {
        let name = |ids: &[String]| -> String {
            ids.iter()
                .map(|p| {
                    if p.is_empty() {
                        "registered from elsewhere"
                    } else {
                        p.as_str()
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let of = if label.is_empty() {
            "the outputs".to_string()
        } else {
            label.clone()
        };
        let mut words = if found.file_count == 0 {
            format!("{of}: no file of this identity in the catalog")
        } else {
            let mut w = format!(
                "{of}: {} file(s) of this identity in the catalog ({}), e.g. {}",
                found.file_count,
                name(&found.production_ids),
                found.example_lfns.join(", ")
            );
            if !found.missing_keys.is_empty() {
                w.push_str(&format!(
                    "; some do not carry {}, so cannot be told apart by them",
                    found.missing_keys.join(", ")
                ));
            }
            w
        };
        if !found.differing_keys.is_empty() {
            words.push_str(&format!(
                "; files of the same kind ({}) differ in {}",
                name(&found.differing_production_ids),
                found.differing_keys.join(", ")
            ));
        }
        validation.explanations.push(words);
        if found.file_count == 0 || duplicate {
            continue;
        }
        let foreign: Vec<&String> = found
            .production_ids
            .iter()
            .filter(|p| !known.contains(&p.as_str()))
            .collect();
        if foreign.is_empty() {
            continue;
        }
        for p in foreign.iter().filter(|p| !p.is_empty()) {
            overlapping.entry(p.as_str()).or_default().push(label);
        }
        let foreign: Vec<String> = foreign.into_iter().cloned().collect();
        let which = if label.is_empty() {
            String::new()
        } else {
            format!(" for {label}")
        };
        held.push(format!(
            "{} file(s), {} bytes ({}){which}, e.g. {}",
            found.file_count,
            found.total_bytes,
            name(&foreign),
            found.example_lfns.join(", ")
        ));
    }
    for (production_id, labels) in overlapping {
        let labels: Vec<&str> = labels.into_iter().filter(|l| !l.is_empty()).collect();
        let description = if labels.is_empty() {
            "its outputs in the catalog have the same identity".to_string()
        } else {
            format!(
                "{}: its outputs in the catalog have the same identity",
                labels.join(", ")
            )
        };
        validation.overlaps.push(pb::Overlap {
            production_id: production_id.to_string(),
            description,
        });
    }
    held
}

/// The ID a production accepted earlier in the same batch is known by until
/// the sequence is read.
fn placeholder(request_id: &str) -> String {
    format!("\u{0}{request_id}")
}

/// Replaces placeholders with the production IDs assigned since: a request
/// that duplicates or overlaps one accepted earlier in its batch names it.
fn name_placeholders(validation: &mut pb::Validation, renamed: &HashMap<String, String>) {
    let rename = |text: &mut String| {
        if text.contains('\u{0}') {
            for (placeholder, real) in renamed {
                *text = text.replace(placeholder.as_str(), real);
            }
        }
    };
    rename(&mut validation.existing_production_id);
    for o in &mut validation.overlaps {
        rename(&mut o.production_id);
    }
    for v in &mut validation.violations {
        rename(&mut v.description);
    }
}

/// Accepted productions of one batch, column by column for one insert.
#[derive(Default)]
struct NewProductions {
    ids: Vec<String>,
    fingerprints: Vec<String>,
    request_ids: Vec<Uuid>,
    profiles: Vec<String>,
    vos: Vec<String>,
    parameters: Vec<serde_json::Value>,
    backends: Vec<String>,
    offsets: Vec<i64>,
    bases: Vec<String>,
    last_runs: Vec<i64>,
    file_bases: Vec<String>,
}

impl NewProductions {
    fn push(
        &mut self,
        production_id: &str,
        fingerprint: &str,
        request_id: Uuid,
        request: &pb::RequestReceived,
        accepted: Accepted<'_>,
    ) {
        self.ids.push(production_id.to_string());
        self.fingerprints.push(fingerprint.to_string());
        self.request_ids.push(request_id);
        self.profiles.push(request.profile.clone());
        self.vos.push(request.vo.clone());
        self.backends.push(request.backend.clone());
        self.offsets.push(accepted.run_number_offset);
        self.bases.push(accepted.base_fingerprint);
        self.file_bases.push(accepted.file_base.unwrap_or_default());
        self.last_runs.push(accepted.last_run);
        self.parameters.push(accepted.parameters);
    }

    async fn insert(self, tx: &Transaction<'_>) -> anyhow::Result<()> {
        if self.ids.is_empty() {
            return Ok(());
        }
        tx.execute_cached(
            "INSERT INTO productions
                 (production_id, fingerprint, request_id, profile, vo, parameters, backend,
                  run_number_offset, base_fingerprint, last_run, file_base)
             SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::text[], $5::text[],
                                  $6::jsonb[], $7::text[], $8::bigint[], $9::text[], $10::bigint[],
                                  $11::text[])",
            &[
                &self.ids,
                &self.fingerprints,
                &self.request_ids,
                &self.profiles,
                &self.vos,
                &self.parameters,
                &self.backends,
                &self.offsets,
                &self.bases,
                &self.last_runs,
                &self.file_bases,
            ],
        )
        .await
        .context("storing the productions")?;
        Ok(())
    }
}

impl BatchHandler for Checker {
    async fn handle(&self, batch: &[Incoming]) -> anyhow::Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut requests = Vec::new();
        for incoming in batch {
            match decode_event::<pb::RequestReceived>(incoming) {
                Ok(decoded) => {
                    requests.push(decoded);
                    outcomes.push(Outcome::Ack);
                }
                Err(reason) => outcomes.push(Outcome::DeadLetter(reason)),
            }
        }
        // The checks that need nothing stored and the catalog's answers come
        // before the transaction: the decisions hold the checker's lock for
        // database work only. (A request delivered again is checked in vain.)
        let candidates: Vec<Candidate<'_>> = requests.iter().map(|(_, r)| candidate(r)).collect();
        let prepared: Vec<Prepared<'_>> = candidates.iter().map(|c| self.prepare(c)).collect();
        let catalog = self.ask_catalog(&prepared, &candidates).await?;
        let pending: Vec<(Uuid, Pending<'_, '_>)> = requests
            .iter()
            .zip(candidates)
            .zip(prepared)
            .zip(catalog)
            .map(|((((id, request), candidate), prepared), catalog)| {
                let pending = Pending {
                    request,
                    candidate,
                    prepared,
                    catalog,
                };
                (*id, pending)
            })
            .collect();
        // Decisions see each other's productions: one checker at a time
        // decides for a prefix, so identical requests racing through replicas
        // cannot both pass. A production's neighbourhood (its fingerprints)
        // never leaves its profile, nor its ID its prefix's sequence, so
        // replicas deciding for other prefixes need not wait. The locks are
        // taken in one order, so two batches cannot each hold what the other wants.
        let mut keys: Vec<i64> = pending
            .iter()
            .filter_map(|(_, p)| p.prepared.checked.as_ref())
            .map(|(profile, _, _)| decide_lock_key(profile.id_prefix()))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let mut client = self.db.client().await?;
        let tx = client.transaction().await?;
        if !keys.is_empty() {
            tx.execute_cached(
                "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS k",
                &[&keys],
            )
            .await?;
        }
        let ids: Vec<Uuid> = requests.iter().map(|(id, _)| *id).collect();
        let fresh = prodsys_db::claim(&tx, &ids).await?;
        let mut seen = HashSet::new();
        // A request delivered twice in one batch is decided once.
        let pending: Vec<Pending<'_, '_>> = pending
            .into_iter()
            .filter(|(id, _)| fresh.contains(id) && seen.insert(*id))
            .map(|(_, p)| p)
            .collect();
        let events = self.decide(&tx, pending).await?;
        prodsys_db::enqueue(&tx, &self.db.outbox_channel(), &events).await?;
        tx.commit().await?;
        Ok(outcomes)
    }
}

/// The advisory lock under which decisions for productions whose IDs start
/// with `id_prefix` are taken (FNV-1a, stable across builds and replicas).
pub fn decide_lock_key(id_prefix: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in format!("prodsys.checker.decide.{id_prefix}").bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// What a request event asks the checker to decide.
fn candidate(r: &pb::RequestReceived) -> Candidate<'_> {
    Candidate {
        profile: &r.profile,
        backend: &r.backend,
        vo: &r.vo,
        parameters_json: &r.parameters_json,
        extend: r.extend,
        reuse_existing: r.reuse_existing,
        forward: &r.forward,
        forward_replace: r.forward_replace,
    }
}

#[tonic::async_trait]
impl pb::checker_service_server::CheckerService for Checker {
    #[tracing::instrument(skip_all, fields(profile = %request.get_ref().profile))]
    async fn evaluate(
        &self,
        request: Request<pb::SubmitRequestRequest>,
    ) -> Result<Response<pb::Validation>, Status> {
        let r = request.into_inner();
        let candidate = Candidate {
            profile: &r.profile,
            backend: if r.backend.is_empty() {
                "local"
            } else {
                &r.backend
            },
            vo: &r.vo,
            parameters_json: &r.parameters_json,
            extend: r.extend,
            reuse_existing: r.reuse_existing,
            forward: &r.forward,
            forward_replace: r.forward_replace,
        };
        let prepared = self.prepare(&candidate);
        let catalog = self
            .ask_catalog(
                std::slice::from_ref(&prepared),
                std::slice::from_ref(&candidate),
            )
            .await
            .map_err(ServiceError::from)?
            .pop()
            .flatten();
        let mut client = self.db.client().await.map_err(ServiceError::from)?;
        let tx = client
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(|e| ServiceError::Unexpected(e.into()))?;
        let known = match &prepared.checked {
            Some((profile, parameters, base)) => Neighbourhood::load(
                &tx,
                std::slice::from_ref(&prepared.validation.fingerprint),
                std::slice::from_ref(base),
                &Vec::from_iter(profile.file_base_fingerprint(parameters)),
            )
            .await
            .map_err(ServiceError::from)?,
            None => Neighbourhood::default(),
        };
        let evaluation = self.evaluate(prepared, &candidate, &known, catalog.as_ref());
        Ok(Response::new(evaluation.validation))
    }
}
