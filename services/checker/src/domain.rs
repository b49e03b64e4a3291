//! The checker's decisions over plain types: a request checked against its
//! profile and the deployment's WMS installations, compared with the
//! productions of its neighbourhood (same fingerprint, same identity but
//! other statistics, files of the same identity) and with what the catalog
//! holds, and a batch of such decisions given production IDs (each request
//! seeing the decisions before it). No SQL, no broker, no gRPC.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use prodsys_core::container::{ResolvedTemplate, TEMPLATE_KEY};
use prodsys_core::{PlanEstimate, Pointing, Profile, ProfileSet, Violation};

/// A production ID: the profile's prefix and a six-digit (or longer) number.
pub fn production_id(prefix: &str, number: i64) -> String {
    format!("{prefix}-{number:06}")
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

/// What a request asks for, from gRPC or from an event.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub request_id: &'a str,
    pub profile: &'a str,
    pub backend: &'a str,
    pub vo: &'a str,
    pub parameters_json: &'a str,
    pub extend: bool,
    pub reuse_existing: bool,
    /// Forwarding destinations the request names, added to the profile's
    /// defaults or (with `forward_replace`) instead of them.
    pub forward: &'a [String],
    pub forward_replace: bool,
}

/// An overlap with another production.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlap {
    pub production_id: String,
    pub description: String,
}

/// The job plan a request would get, as the API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanSummary {
    pub jobs: u64,
    pub units_per_job: u64,
    pub total_units: u64,
    pub first_run: u64,
    pub last_run: u64,
}

/// The checker's verdict on a request, in full.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Validation {
    pub acceptable: bool,
    pub violations: Vec<Violation>,
    pub fingerprint: String,
    pub existing_production_id: String,
    pub overlaps: Vec<Overlap>,
    pub plan: Option<PlanSummary>,
    pub estimate: Option<PlanEstimate>,
    /// Per identity of the request's files, what the catalog holds of it.
    pub explanations: Vec<String>,
    /// The parameters as they would be produced (profile and period applied).
    pub parameters_json: String,
    /// The observation period the request names, if any.
    pub period: String,
    /// The pointing of one production of a period's request.
    pub pointing: String,
    /// A period's request: the verdict on each pointing it selects.
    pub pointings: Vec<Validation>,
}

/// One production a request may become: the pointing of the observation
/// period it simulates (none for a request without a period), its
/// parameters, and the ID its decision goes by inside a batch.
#[derive(Debug, Clone)]
pub struct Share {
    pub pointing: Option<Pointing>,
    pub parameters_json: String,
    pub id: String,
}

/// A request as the productions it may become.
#[derive(Debug, Clone, Default)]
pub struct Expanded {
    /// The observation period it names; empty when none.
    pub period: String,
    /// One per pointing; the request itself when it names no period.
    pub shares: Vec<Share>,
    /// Why the period refuses it (unknown period, off-grid pointing,
    /// contradicted condition, or the schema on its completed parameters).
    pub refused: Vec<Violation>,
}

impl Expanded {
    /// Whether the request named an observation period.
    pub fn has_period(&self) -> bool {
        !self.period.is_empty()
    }
}

/// What the catalog holds of one identity of a request's files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    pub file_count: u64,
    pub total_bytes: u64,
    /// The productions that wrote them; empty for files registered from elsewhere.
    pub production_ids: Vec<String>,
    pub example_lfns: Vec<String>,
    /// Identity keys some of the files do not carry.
    pub missing_keys: Vec<String>,
    pub last_run: u64,
    /// Files of the same kind that differ in some keys, and those keys.
    pub differing_production_ids: Vec<String>,
    pub differing_keys: Vec<String>,
}

/// What the catalog holds of each identity of a request's files (one per
/// NSB level, say), labelled by the per-file values it stands for.
pub type CatalogAnswer = Vec<(String, Held)>;

/// A candidate after the checks that need nothing stored: its profile, its
/// parameters as the profile completed them and its base fingerprint.
pub struct Prepared<'p> {
    pub validation: Validation,
    pub checked: Option<(&'p Profile, serde_json::Value, String)>,
}

/// The checker's answer, before anything is written.
pub struct Evaluation<'p> {
    pub validation: Validation,
    pub accepted: Option<Accepted<'p>>,
}

pub struct Accepted<'p> {
    pub profile: &'p Profile,
    pub parameters: serde_json::Value,
    pub base_fingerprint: String,
    pub file_base: Option<String>,
    pub run_number_offset: i64,
    pub last_run: i64,
}

/// A production the checker knows of, as far as a decision needs it.
#[derive(Debug, Clone)]
pub struct Known {
    pub production_id: String,
    pub fingerprint: String,
    pub parameters: serde_json::Value,
    pub last_run: i64,
}

/// The productions that share a fingerprint or a base fingerprint with the
/// candidates of one batch, kept up to date as the batch's own decisions
/// accept more: a request sees every decision taken before it, in the same
/// batch or an earlier one.
#[derive(Default)]
pub struct Neighbourhood {
    /// The productions chained candidates name as their input, by ID, with
    /// their profile and parameters.
    parents: HashMap<String, (String, serde_json::Value)>,
    by_fingerprint: HashMap<String, String>,
    by_base: HashMap<String, Vec<Known>>,
    /// By file-base fingerprint, with each one's base fingerprint.
    by_file_base: HashMap<String, Vec<(String, Known)>>,
}

impl Neighbourhood {
    /// A production a chained candidate names as its input, with its
    /// profile and parameters.
    pub fn add_parent(
        &mut self,
        production_id: String,
        profile: String,
        parameters: serde_json::Value,
    ) {
        self.parents.insert(production_id, (profile, parameters));
    }

    /// Why a chained candidate cannot take its inputs from the production
    /// its parameters name: none by that ID, or one whose files it would
    /// not take (another profile, or metadata that does not match what it
    /// selects: see [`prodsys_core::inputs::connection_violations`]).
    fn parent_violations(
        &self,
        profiles: &ProfileSet,
        profile: &Profile,
        parameters: &serde_json::Value,
    ) -> Vec<Violation> {
        let Some(inputs) = profile.inputs() else {
            return Vec::new();
        };
        let Some(parent) = inputs.parent(parameters) else {
            return Vec::new();
        };
        let field = format!(
            "parameters.{}",
            inputs.production.as_deref().unwrap_or_default()
        );
        let Some((of, parent_parameters)) = self.parents.get(&parent) else {
            return vec![Violation::new(
                field,
                format!(
                    "no production {parent} was accepted; a chained production takes the outputs of an accepted one"
                ),
            )];
        };
        match profiles.get(of) {
            Some(parent_profile) => prodsys_core::inputs::connection_violations(
                &field,
                profile,
                parameters,
                &parent,
                parent_profile,
                parent_parameters,
            ),
            None => vec![Violation::new(
                field,
                format!(
                    "{parent} is a production of profile {of}, which this deployment no longer has"
                ),
            )],
        }
    }

    pub fn add(&mut self, base: String, file_base: Option<String>, production: Known) {
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

/// The fingerprints, base fingerprints and file-base fingerprints whose
/// productions make the neighbourhood of `prepared`.
pub struct Lookups {
    /// Productions chained candidates name as their input.
    pub parents: Vec<String>,
    pub fingerprints: Vec<String>,
    pub bases: Vec<String>,
    pub file_bases: Vec<String>,
}

impl Lookups {
    pub fn of<'a, 'p: 'a>(prepared: impl IntoIterator<Item = &'a Prepared<'p>>) -> Self {
        let mut lookups = Lookups {
            parents: Vec::new(),
            fingerprints: Vec::new(),
            bases: Vec::new(),
            file_bases: Vec::new(),
        };
        for p in prepared {
            let Some((profile, parameters, base)) = &p.checked else {
                continue;
            };
            lookups.fingerprints.push(p.validation.fingerprint.clone());
            lookups
                .parents
                .extend(profile.inputs().and_then(|i| i.parent(parameters)));
            lookups.bases.push(base.clone());
            lookups
                .file_bases
                .extend(profile.file_base_fingerprint(parameters));
        }
        lookups
    }

    pub fn is_empty(&self) -> bool {
        self.fingerprints.is_empty() && self.bases.is_empty()
    }
}

/// What a deployment accepts: its profiles, its WMS installations and its
/// ceiling on one production's jobs.
pub struct Rules {
    pub profiles: Arc<ProfileSet>,
    /// The WMS installations a request may choose.
    pub installations: Vec<String>,
    /// Groups of installations a request may choose instead (and `any`).
    pub federation: prodsys_config::FederationSettings,
    /// The forwarding destinations a request may name (none: nothing is forwarded).
    pub destinations: Vec<String>,
    /// The installations that do not share the dispatcher's work directory:
    /// a request naming one must forward its outputs somewhere (its jobs
    /// write them to the first destination).
    pub remote_installations: Vec<String>,
    /// The deployment's ceiling on one production's jobs.
    pub max_jobs: u64,
}

impl Rules {
    /// The ID prefixes of the profiles (`CTA`, `KM3NET`, …).
    pub fn id_prefixes(&self) -> Vec<&str> {
        self.profiles.iter().map(|p| p.id_prefix()).collect()
    }

    /// The productions `candidate` may become: one per pointing of the
    /// observation period it names (each with the period's conditions and
    /// its pointing), or itself, unchanged, when it names none.
    pub fn expand(&self, candidate: &Candidate<'_>) -> Expanded {
        let itself = || Expanded {
            period: String::new(),
            shares: vec![Share {
                pointing: None,
                parameters_json: candidate.parameters_json.to_string(),
                id: candidate.request_id.to_string(),
            }],
            refused: Vec::new(),
        };
        let Some(period) = self.named_period(candidate) else {
            return itself();
        };
        match self.profiles.expand_request(
            candidate.profile,
            candidate.vo,
            candidate.parameters_json,
        ) {
            Ok((_, None, _)) => itself(),
            Ok((_, Some(_), expansions)) => Expanded {
                period,
                shares: expansions
                    .into_iter()
                    .enumerate()
                    .map(|(i, e)| Share {
                        pointing: e.pointing,
                        parameters_json: e.parameters.to_string(),
                        id: format!("{}#{i}", candidate.request_id),
                    })
                    .collect(),
                refused: Vec::new(),
            },
            Err(refused) => Expanded {
                period,
                shares: Vec::new(),
                refused,
            },
        }
    }

    /// The observation period a candidate names, when its profile takes periods.
    fn named_period(&self, candidate: &Candidate<'_>) -> Option<String> {
        let spec = self.profiles.get(candidate.profile)?.period_spec()?;
        let parameters: serde_json::Value = serde_json::from_str(candidate.parameters_json).ok()?;
        Some(parameters.get(&spec.parameter)?.as_str()?.to_string())
    }

    /// A candidate the period refused: its violations, and the installation's.
    pub fn refuse(&self, candidate: &Candidate<'_>, refused: &[Violation]) -> Prepared<'_> {
        let mut validation = Validation::default();
        self.check_installation(candidate, &mut validation);
        validation.violations.extend(refused.iter().cloned());
        Prepared {
            validation,
            checked: None,
        }
    }

    /// An installation, a group of them or `any`, with at least one
    /// installation serving the candidate's VO.
    fn check_installation(&self, candidate: &Candidate<'_>, validation: &mut Validation) {
        let installations = self.installations.iter().cloned().collect();
        if let Err(reason) =
            self.federation
                .members(candidate.backend, candidate.vo, &installations)
        {
            validation
                .violations
                .push(Violation::new("backend", reason));
        }
    }

    /// Each share of an expanded candidate prepared as a candidate of its
    /// own (see [`Rules::prepare`]), or the refusal when the period refused it.
    pub fn prepare_shares<'c>(
        &self,
        candidate: &Candidate<'c>,
        expanded: &'c Expanded,
        recorded: &Recorded,
    ) -> Vec<(Candidate<'c>, Prepared<'_>)> {
        if expanded.shares.is_empty() {
            return vec![(*candidate, self.refuse(candidate, &expanded.refused))];
        }
        expanded
            .shares
            .iter()
            .map(|share| {
                let c = Candidate {
                    request_id: &share.id,
                    parameters_json: &share.parameters_json,
                    ..*candidate
                };
                let prepared = self.prepare(&c, recorded);
                (c, prepared)
            })
            .collect()
    }

    /// The checks that need nothing stored but the derived templates a
    /// candidate may name (`recorded`): installation, schema, rules, template.
    pub fn prepare(&self, candidate: &Candidate<'_>, recorded: &Recorded) -> Prepared<'_> {
        let mut validation = Validation::default();
        self.check_installation(candidate, &mut validation);
        match self.profiles.validate_request(
            candidate.profile,
            candidate.vo,
            candidate.parameters_json,
        ) {
            Ok((profile, parameters)) => {
                let parameters =
                    match profile.resolve_template(candidate.vo, &parameters, Some(recorded)) {
                        Ok(Some(template)) => profile.with_template(parameters, &template),
                        Ok(None) => parameters,
                        Err(violations) => {
                            validation.violations.extend(violations);
                            return Prepared {
                                validation,
                                checked: None,
                            };
                        }
                    };
                match profile.destinations(
                    &parameters,
                    candidate.forward,
                    candidate.forward_replace,
                    &self.destinations,
                ) {
                    Err(unknown) => validation.violations.extend(unknown),
                    Ok(resolved) => {
                        if resolved.is_empty()
                            && self
                                .remote_installations
                                .iter()
                                .any(|r| r == candidate.backend)
                        {
                            validation.violations.push(Violation::new(
                                "forward",
                                format!(
                                    "installation {} does not share the dispatcher's work \
                                     directory: its jobs write their outputs to the \
                                     production's first forwarding destination, and this \
                                     request forwards to none",
                                    candidate.backend
                                ),
                            ));
                        }
                    }
                }
                validation.fingerprint = profile.fingerprint(&parameters);
                let base = profile.base_fingerprint(&parameters);
                Prepared {
                    validation,
                    checked: Some((profile, parameters, base)),
                }
            }
            Err(violations) => {
                validation.violations = violations;
                Prepared {
                    validation,
                    checked: None,
                }
            }
        }
    }

    /// Everything the checker knows about a prepared candidate, given the
    /// productions in its neighbourhood and what the catalog holds.
    pub fn evaluate<'p>(
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
        validation.parameters_json = parameters.to_string();
        let mut violations = std::mem::take(&mut validation.violations);
        violations.extend(known.parent_violations(&self.profiles, profile, &parameters));
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
                validation.overlaps.push(Overlap {
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
                validation.overlaps.push(Overlap {
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
            validation.plan = Some(PlanSummary {
                jobs: plan.job_count,
                units_per_job: plan.per_job,
                total_units: plan.total_units,
                first_run: plan.run_number_offset + 1,
                last_run: plan.run_number_offset + plan.job_count,
            });
            validation.estimate = Some(profile.resource_estimate(plan));
            violations.extend(profile.check_job_count(plan, self.max_jobs));
        } else if profile.inputs().is_none() {
            violations.push(Violation::new("parameters", "give no job plan"));
        }
        validation.violations = violations;
        validation.acceptable = validation.violations.is_empty();
        // A chained production has no plan: its jobs follow its input files.
        let last_run = match (&plan, profile.inputs()) {
            (Some(plan), _) => Some((plan.run_number_offset + plan.job_count) as i64),
            (None, Some(_)) => Some(run_number_offset),
            (None, None) => None,
        };
        let accepted = match (validation.acceptable, last_run) {
            (true, Some(last_run)) => Some(Accepted {
                profile,
                parameters,
                base_fingerprint,
                file_base,
                run_number_offset,
                last_run,
            }),
            _ => None,
        };
        Evaluation {
            validation,
            accepted,
        }
    }

    /// Evaluates a batch's candidates in order, each seeing the decisions
    /// before it: a candidate accepted as a new production joins `known`
    /// under a placeholder ID until the sequence gives it its own.
    pub fn evaluate_batch<'p>(
        &self,
        pending: Vec<(Candidate<'_>, Prepared<'p>, Option<CatalogAnswer>)>,
        known: &mut Neighbourhood,
    ) -> Vec<Evaluation<'p>> {
        let mut evaluations = Vec::with_capacity(pending.len());
        for (candidate, prepared, catalog) in pending {
            let evaluation = self.evaluate(prepared, &candidate, known, catalog.as_ref());
            if let Some(accepted) = &evaluation.accepted
                && evaluation.validation.existing_production_id.is_empty()
            {
                // Placeholder ID until the sequence is read; unique within the batch.
                known.add(
                    accepted.base_fingerprint.clone(),
                    accepted.file_base.clone(),
                    Known {
                        production_id: placeholder(candidate.request_id),
                        fingerprint: evaluation.validation.fingerprint.clone(),
                        parameters: accepted.parameters.clone(),
                        last_run: accepted.last_run,
                    },
                );
            }
            evaluations.push(evaluation);
        }
        evaluations
    }
}

/// How many new production IDs a batch's evaluations need, per ID prefix.
pub fn numbers_wanted<'p>(evaluations: &[Evaluation<'p>]) -> BTreeMap<&'p str, i64> {
    let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
    for e in evaluations {
        if let Some(accepted) = &e.accepted
            && e.validation.existing_production_id.is_empty()
        {
            *wanted.entry(accepted.profile.id_prefix()).or_default() += 1;
        }
    }
    wanted
}

/// The verdict on one request of a batch.
pub enum Verdict<'p> {
    /// The same simulation exists and the request asked to reuse it.
    Reused {
        validation: Validation,
    },
    Rejected {
        validation: Validation,
    },
    /// A new production, with its ID.
    Accepted {
        production_id: String,
        validation: Validation,
        accepted: Accepted<'p>,
    },
}

impl Verdict<'_> {
    /// What the verdict says of the request.
    pub fn validation(&self) -> &Validation {
        match self {
            Verdict::Reused { validation }
            | Verdict::Rejected { validation }
            | Verdict::Accepted { validation, .. } => validation,
        }
    }
}

/// The batch's verdicts, in order: `next` holds the first unused number of
/// each ID prefix the batch needs (see [`numbers_wanted`]). A request that
/// duplicates or overlaps one accepted earlier in its batch names it by
/// its new ID.
pub fn verdicts<'p>(
    request_ids: &[&str],
    evaluations: Vec<Evaluation<'p>>,
    next: &mut HashMap<String, i64>,
) -> Vec<Verdict<'p>> {
    // Placeholder → real production ID, for overlaps named inside the batch.
    let mut renamed: HashMap<String, String> = HashMap::new();
    let mut verdicts = Vec::with_capacity(evaluations.len());
    for (request_id, evaluation) in request_ids.iter().zip(evaluations) {
        let Evaluation {
            mut validation,
            accepted,
        } = evaluation;
        name_placeholders(&mut validation, &renamed);
        if validation.acceptable && !validation.existing_production_id.is_empty() {
            verdicts.push(Verdict::Reused { validation });
            continue;
        }
        let Some(accepted) = accepted else {
            verdicts.push(Verdict::Rejected { validation });
            continue;
        };
        let number = next
            .get_mut(accepted.profile.id_prefix())
            .expect("a number for every prefix");
        let production_id = production_id(accepted.profile.id_prefix(), *number);
        *number += 1;
        renamed.insert(placeholder(request_id), production_id.clone());
        verdicts.push(Verdict::Accepted {
            production_id,
            validation,
            accepted,
        });
    }
    verdicts
}

/// What became of one pointing of a period's request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PointingVerdict {
    pub pointing: Option<Pointing>,
    /// The new production; empty when none was made.
    pub production_id: String,
    pub fingerprint: String,
    /// The production that already has its simulation.
    pub existing_production_id: String,
    /// Why it was not produced.
    pub violations: Vec<Violation>,
}

impl PointingVerdict {
    pub fn of(pointing: Option<Pointing>, verdict: &Verdict<'_>) -> Self {
        let (production_id, validation) = match verdict {
            Verdict::Accepted {
                production_id,
                validation,
                ..
            } => (production_id.clone(), validation),
            Verdict::Reused { validation } | Verdict::Rejected { validation } => {
                (String::new(), validation)
            }
        };
        PointingVerdict {
            pointing,
            production_id,
            fingerprint: validation.fingerprint.clone(),
            existing_production_id: validation.existing_production_id.clone(),
            violations: match verdict {
                Verdict::Rejected { validation } => validation.violations.clone(),
                _ => Vec::new(),
            },
        }
    }
}

/// The label of a share's pointing (`zenith 20 deg, azimuth 180 deg`); empty without one.
pub fn pointing_label(pointing: Option<&Pointing>) -> String {
    pointing.map(Pointing::label).unwrap_or_default()
}

/// A period's request judged as a whole from its pointings' verdicts: it
/// is acceptable when any pointing is (the others are reported, not
/// produced); refused, it carries every pointing's violations, each named by
/// its pointing, once.
pub fn combine(period: &str, pointings: Vec<(Option<Pointing>, Validation)>) -> Validation {
    let mut whole = Validation {
        period: period.to_string(),
        ..Validation::default()
    };
    whole.acceptable = pointings.iter().any(|(_, v)| v.acceptable);
    for (pointing, mut v) in pointings {
        v.pointing = pointing_label(pointing.as_ref());
        v.period = period.to_string();
        if !whole.acceptable {
            for violation in &v.violations {
                let named = Violation::new(
                    violation.field.clone(),
                    match v.pointing.is_empty() {
                        true => violation.description.clone(),
                        false => format!("{}: {}", v.pointing, violation.description),
                    },
                );
                if !whole.violations.contains(&named) {
                    whole.violations.push(named);
                }
            }
            if whole.existing_production_id.is_empty() {
                whole.existing_production_id = v.existing_production_id.clone();
            }
        }
        whole.pointings.push(v);
    }
    whole
}

/// Compares what the catalog holds of each identity of a request's files
/// with the request: explains each in `validation.explanations`, names the
/// productions this checker does not already report (`known`) as overlaps,
/// and returns, per identity with such outputs, what it holds in words
/// (empty when nothing stands in the way).
fn compare_with_catalog(
    answers: &CatalogAnswer,
    known: &[&str],
    validation: &mut Validation,
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
        validation.overlaps.push(Overlap {
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
fn name_placeholders(validation: &mut Validation, renamed: &HashMap<String, String>) {
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

/// Derived templates recorded earlier, by name.
pub type Recorded = BTreeMap<String, ResolvedTemplate>;

/// The template names requests may look up among the recorded derivations:
/// as their `container_template`, or as the name of a derivation (which must
/// not already name another).
pub fn template_names<'a>(parameters_json: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    parameters_json
        .into_iter()
        .filter_map(|json| serde_json::from_str::<serde_json::Value>(json).ok())
        .flat_map(|parameters| {
            let name = |pointer: &str| Some(parameters.pointer(pointer)?.as_str()?.to_string());
            [name("/container_template"), name("/derived_template/name")]
        })
        .flatten()
        .collect()
}

/// The template of a production's parameters, when a request derived it.
pub fn derived_template(parameters: &serde_json::Value) -> Option<ResolvedTemplate> {
    let template: ResolvedTemplate =
        serde_json::from_value(parameters.get(TEMPLATE_KEY)?.clone()).ok()?;
    template.is_derived().then_some(template)
}

/// The derivations the prepared candidates would record, by position.
pub fn derivations(prepared: &[&Prepared<'_>]) -> Vec<Option<ResolvedTemplate>> {
    prepared
        .iter()
        .map(|p| derived_template(&p.checked.as_ref()?.1))
        .collect()
}

/// Refuses each candidate whose derivation's name `taken` (name → version,
/// as recorded) or an earlier candidate gives to another derivation: a name
/// checked before the decision lock may have been given away since.
pub fn refuse_taken_names(prepared: &mut [&mut Prepared<'_>], mut taken: HashMap<String, String>) {
    for p in prepared.iter_mut() {
        let Some(template) = p.checked.as_ref().and_then(|c| derived_template(&c.1)) else {
            continue;
        };
        match taken.get(&template.name) {
            Some(version) if *version != template.version => {
                p.validation.violations.push(Violation::new(
                    "parameters.derived_template.name",
                    format!(
                        "{:?} already names another derivation (version {version}); choose another name or use it as container_template",
                        template.name
                    ),
                ));
                p.checked = None;
            }
            _ => {
                taken.insert(template.name, template.version);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn rules() -> Rules {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let profiles = ProfileSet::load_dir(&root.join("profiles"))
            .expect("the shipped profiles")
            .with_periods(&root.join("periods"))
            .expect("the shipped periods");
        Rules {
            profiles: Arc::new(profiles),
            installations: vec!["local".into(), "slurm-local".into()],
            federation: prodsys_config::FederationSettings {
                groups: [(
                    "pair".to_string(),
                    vec!["local".to_string(), "slurm-local".to_string()],
                )]
                .into(),
                vos: [("slurm-local".to_string(), vec!["km3net".to_string()])].into(),
                ..Default::default()
            },
            destinations: Vec::new(),
            remote_installations: Vec::new(),
            max_jobs: 1_000_000,
        }
    }

    /// The CTA example's parameters with `n_showers` showers at NSB `nsb_levels`.
    fn parameters(n_showers: u64, nsb_levels: &[u32]) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cta-irf-mc.json");
        let example: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut parameters = example["parameters"].clone();
        parameters["n_showers"] = n_showers.into();
        parameters["nsb_levels"] = serde_json::json!(nsb_levels);
        parameters.to_string()
    }

    fn candidate<'a>(request_id: &'a str, parameters_json: &'a str) -> Candidate<'a> {
        Candidate {
            request_id,
            profile: "cta-irf-mc",
            backend: "local",
            vo: "vo.cta.in2p3.fr",
            parameters_json,
            extend: false,
            reuse_existing: false,
            forward: &[],
            forward_replace: false,
        }
    }

    /// Decides `candidates` as one batch over `known`, numbering from 1.
    fn decide<'p>(
        rules: &'p Rules,
        candidates: &[Candidate<'_>],
        catalog: Vec<Option<CatalogAnswer>>,
        known: &mut Neighbourhood,
    ) -> Vec<Verdict<'p>> {
        let pending = candidates
            .iter()
            .zip(catalog)
            .map(|(c, answer)| (*c, rules.prepare(c, &Recorded::new()), answer))
            .collect();
        let evaluations = rules.evaluate_batch(pending, known);
        let mut next: HashMap<String, i64> = numbers_wanted(&evaluations)
            .into_keys()
            .map(|prefix| (prefix.to_string(), 1))
            .collect();
        let ids: Vec<&str> = candidates.iter().map(|c| c.request_id).collect();
        verdicts(&ids, evaluations, &mut next)
    }

    fn rejected<'v>(verdict: &'v Verdict<'_>) -> &'v Validation {
        match verdict {
            Verdict::Rejected { validation } => validation,
            _ => panic!("expected a rejection"),
        }
    }

    fn accepted<'v>(verdict: &'v Verdict<'_>) -> (&'v str, &'v Validation) {
        match verdict {
            Verdict::Accepted {
                production_id,
                validation,
                ..
            } => (production_id, validation),
            _ => panic!("expected an acceptance"),
        }
    }

    #[test]
    fn production_ids_and_lock_keys() {
        assert_eq!(production_id("CTA", 42), "CTA-000042");
        assert_eq!(production_id("CTA", 1_234_567), "CTA-1234567");
        assert_eq!(decide_lock_key("CTA"), decide_lock_key("CTA"));
        assert_ne!(decide_lock_key("CTA"), decide_lock_key("KM3NET"));
    }

    #[test]
    fn the_same_simulation_twice_in_one_batch_is_refused_naming_the_first() {
        let rules = rules();
        let p = parameters(4000, &[1, 5]);
        let verdicts = decide(
            &rules,
            &[candidate("a", &p), candidate("b", &p)],
            vec![None, None],
            &mut Neighbourhood::default(),
        );
        let (first, validation) = accepted(&verdicts[0]);
        assert!(first.starts_with("CTA-"), "{first}");
        assert_eq!(
            validation.plan.map(|p| (p.jobs, p.first_run, p.last_run)),
            Some((4, 1, 4))
        );
        assert!(validation.estimate.is_some());
        let second = rejected(&verdicts[1]);
        assert_eq!(second.existing_production_id, first);
        assert!(
            second.violations[0]
                .description
                .contains(&format!("already exists as production {first}")),
            "{:?}",
            second.violations
        );
    }

    #[test]
    fn a_reuse_is_answered_with_the_existing_production() {
        let rules = rules();
        let p = parameters(4000, &[1, 5]);
        let mut reuse = candidate("b", &p);
        reuse.reuse_existing = true;
        let verdicts = decide(
            &rules,
            &[candidate("a", &p), reuse],
            vec![None, None],
            &mut Neighbourhood::default(),
        );
        let (first, _) = accepted(&verdicts[0]);
        match &verdicts[1] {
            Verdict::Reused { validation } => {
                assert_eq!(validation.existing_production_id, first)
            }
            _ => panic!("expected a reuse"),
        }
    }

    #[test]
    fn more_statistics_overlap_and_an_extension_runs_after_them() {
        let rules = rules();
        let mut known = Neighbourhood::default();
        let first = parameters(4000, &[1, 5]);
        let more = parameters(8000, &[1, 5]);
        let verdicts = decide(
            &rules,
            &[candidate("a", &first), candidate("b", &more)],
            vec![None, None],
            &mut known,
        );
        let (first_id, _) = accepted(&verdicts[0]);
        let refused = rejected(&verdicts[1]);
        assert_eq!(refused.overlaps[0].production_id, first_id);
        assert_eq!(refused.violations.last().unwrap().field, "extend");
        // The first is known now (under its placeholder); an extension follows its runs.
        let mut extension = candidate("c", &more);
        extension.extend = true;
        let prepared = rules.prepare(&extension, &Recorded::new());
        let evaluation = rules.evaluate(prepared, &extension, &known, None);
        assert!(
            evaluation.validation.acceptable,
            "{:?}",
            evaluation.validation.violations
        );
        assert_eq!(evaluation.validation.plan.unwrap().first_run, 5);
    }

    #[test]
    fn outputs_held_by_the_catalog_need_an_extension_and_are_explained() {
        let rules = rules();
        let p = parameters(4000, &[1]);
        let held = Held {
            file_count: 2,
            total_bytes: 2048,
            production_ids: vec![String::new()],
            example_lfns: vec!["/vo.cta.in2p3.fr/MC/x_nsb1.h5".into()],
            last_run: 10,
            ..Held::default()
        };
        let answer = || Some(vec![("nsb 1".to_string(), held.clone())]);
        let verdicts = decide(
            &rules,
            &[candidate("a", &p)],
            vec![answer()],
            &mut Neighbourhood::default(),
        );
        let refused = rejected(&verdicts[0]);
        assert_eq!(
            refused.explanations,
            vec![
                "nsb 1: 2 file(s) of this identity in the catalog (registered from elsewhere), \
                 e.g. /vo.cta.in2p3.fr/MC/x_nsb1.h5"
            ]
        );
        assert!(
            refused.violations[0].description.starts_with(
                "outputs of this simulation already exist in the catalog: 2 file(s), 2048 bytes"
            ),
            "{:?}",
            refused.violations
        );
        let mut extension = candidate("b", &p);
        extension.extend = true;
        let verdicts = decide(
            &rules,
            &[extension],
            vec![answer()],
            &mut Neighbourhood::default(),
        );
        let (_, validation) = accepted(&verdicts[0]);
        // Its runs follow the catalog's.
        assert_eq!(validation.plan.unwrap().first_run, 11);
    }

    #[test]
    fn an_unknown_installation_is_a_violation() {
        let rules = rules();
        let p = parameters(4000, &[1]);
        let mut c = candidate("a", &p);
        c.backend = "elsewhere";
        let verdicts = decide(&rules, &[c], vec![None], &mut Neighbourhood::default());
        let refused = rejected(&verdicts[0]);
        assert_eq!(refused.violations[0].field, "backend");
        assert!(
            refused.violations[0]
                .description
                .contains("this deployment has local, slurm-local, pair, any")
        );
    }

    #[test]
    fn an_installation_that_shares_no_filesystem_needs_a_destination() {
        let mut rules = rules();
        rules.installations.push("dirac-cta".into());
        rules.remote_installations = vec!["dirac-cta".into()];
        rules.destinations = vec!["eos".into()];
        let p = parameters(4000, &[1]);
        let mut c = candidate("a", &p);
        c.backend = "dirac-cta";
        let verdicts = decide(&rules, &[c], vec![None], &mut Neighbourhood::default());
        let refused = rejected(&verdicts[0]);
        assert_eq!(refused.violations[0].field, "forward");
        assert!(
            refused.violations[0]
                .description
                .contains("installation dirac-cta does not share the dispatcher's work directory"),
            "{refused:?}"
        );
        let forward = ["eos".to_string()];
        let mut c = candidate("b", &p);
        c.backend = "dirac-cta";
        c.forward = &forward;
        let verdicts = decide(&rules, &[c], vec![None], &mut Neighbourhood::default());
        accepted(&verdicts[0]);
    }

    #[test]
    fn a_group_or_any_is_accepted_while_one_of_its_installations_serves_the_vo() {
        let rules = rules();
        let p = parameters(4000, &[1]);
        for backend in ["pair", "any"] {
            let mut c = candidate("a", &p);
            c.backend = backend;
            let verdicts = decide(&rules, &[c], vec![None], &mut Neighbourhood::default());
            accepted(&verdicts[0]);
        }
        // slurm-local serves km3net only: naming it from CTA is refused.
        let mut c = candidate("a", &p);
        c.backend = "slurm-local";
        let verdicts = decide(&rules, &[c], vec![None], &mut Neighbourhood::default());
        let refused = rejected(&verdicts[0]);
        assert_eq!(refused.violations[0].field, "backend");
        assert!(refused.violations[0].description.contains("serves VO"));
    }

    #[test]
    fn a_derivation_name_given_away_since_or_earlier_in_the_batch_is_refused() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let dir = std::env::temp_dir().join(format!("checker-templates-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let source = std::fs::read_to_string(
            root.join("deploy/local/images/km3net-toysim/templates.json.in"),
        )
        .unwrap();
        let image = format!("localhost/km3net/toysim@sha256:{}", "ab".repeat(32));
        std::fs::write(dir.join("km3net.json"), source.replace("@IMAGE@", &image)).unwrap();
        let profiles = ProfileSet::load_dir(&root.join("profiles"))
            .unwrap()
            .with_templates(&dir)
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let rules = Rules {
            profiles: Arc::new(profiles),
            installations: vec!["local".into()],
            federation: Default::default(),
            destinations: Vec::new(),
            remote_installations: Vec::new(),
            max_jobs: 1_000_000,
        };
        let example: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("examples/km3net-container-sim.json")).unwrap(),
        )
        .unwrap();
        let with_yield = |light_yield: f64| {
            let mut p = example["parameters"].clone();
            p["derived_template"]["parameters"]["light_yield"] = light_yield.into();
            p.to_string()
        };
        let (a, b, c) = (with_yield(0.5), with_yield(0.7), with_yield(0.5));
        let candidate = |id, json| Candidate {
            request_id: id,
            profile: "km3net-container-sim",
            backend: "local",
            vo: "km3net.org",
            parameters_json: json,
            extend: false,
            reuse_existing: false,
            forward: &[],
            forward_replace: false,
        };
        let recorded = Recorded::new();
        let mut prepared: Vec<Prepared<'_>> = [("a", &a), ("b", &b), ("c", &c)]
            .iter()
            .map(|(id, json)| rules.prepare(&candidate(id, json), &recorded))
            .collect();
        assert!(prepared.iter().all(|p| p.checked.is_some()));
        let names: Vec<String> = derivations(&prepared.iter().collect::<Vec<_>>())
            .into_iter()
            .flatten()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["gseagen-7.4.1-seawater-v2"; 3]);
        refuse_taken_names(&mut prepared.iter_mut().collect::<Vec<_>>(), HashMap::new());
        // The first takes the name; the second derives another version under
        // it and is refused; the third is the first's derivation again.
        assert!(prepared[0].checked.is_some());
        assert!(prepared[1].checked.is_none());
        assert_eq!(
            prepared[1].validation.violations[0].field,
            "parameters.derived_template.name"
        );
        assert!(prepared[2].checked.is_some());
        // Given away by another replica since: refused too.
        let mut again = [rules.prepare(&candidate("d", &a), &recorded)];
        let taken = HashMap::from([("gseagen-7.4.1-seawater-v2".to_string(), "other".to_string())]);
        refuse_taken_names(&mut again.iter_mut().collect::<Vec<_>>(), taken);
        assert!(again[0].checked.is_none());
    }

    /// The shipped period example's parameters changed by `change`.
    fn period_parameters(change: impl FnOnce(&mut serde_json::Value)) -> String {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cta-irf-mc-period.json");
        let example: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut parameters = example["parameters"].clone();
        change(&mut parameters);
        parameters.to_string()
    }

    type PointingVerdicts<'p> = Vec<(Option<Pointing>, Verdict<'p>)>;

    /// Decides the shares of `candidates` (expanded) as one batch.
    fn decide_expanded<'p>(
        rules: &'p Rules,
        candidates: &[Candidate<'_>],
        known: &mut Neighbourhood,
    ) -> Vec<(Expanded, PointingVerdicts<'p>)> {
        let expanded: Vec<Expanded> = candidates.iter().map(|c| rules.expand(c)).collect();
        let mut shares = Vec::new();
        for (i, (c, e)) in candidates.iter().zip(&expanded).enumerate() {
            let pointings: Vec<Option<Pointing>> = match e.shares.is_empty() {
                true => vec![None],
                false => e.shares.iter().map(|s| s.pointing).collect(),
            };
            for ((c, p), pointing) in rules
                .prepare_shares(c, e, &Recorded::new())
                .into_iter()
                .zip(pointings)
            {
                shares.push((i, c, p, pointing));
            }
        }
        let ids: Vec<String> = shares.iter().map(|s| s.1.request_id.to_string()).collect();
        let placement: Vec<(usize, Option<Pointing>)> = shares.iter().map(|s| (s.0, s.3)).collect();
        let evaluations = rules.evaluate_batch(
            shares.into_iter().map(|s| (s.1, s.2, None)).collect(),
            known,
        );
        let mut next: HashMap<String, i64> = numbers_wanted(&evaluations)
            .into_keys()
            .map(|prefix| (prefix.to_string(), 1))
            .collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let verdicts = verdicts(&ids, evaluations, &mut next);
        let mut grouped: Vec<Vec<(Option<Pointing>, Verdict<'p>)>> =
            candidates.iter().map(|_| Vec::new()).collect();
        for ((i, pointing), verdict) in placement.into_iter().zip(verdicts) {
            grouped[i].push((pointing, verdict));
        }
        expanded.into_iter().zip(grouped).collect()
    }

    #[test]
    fn a_period_request_becomes_a_production_per_pointing_and_a_known_pointing_is_reported() {
        let rules = rules();
        let one = period_parameters(|p| {
            p["zenith_deg"] = 40.into();
            p["pointing"] = "South".into();
        });
        let all = period_parameters(|_| {});
        let decided = decide_expanded(
            &rules,
            &[candidate("a", &one), candidate("b", &all)],
            &mut Neighbourhood::default(),
        );
        // The single pointing first: one production.
        let (expanded, verdicts) = &decided[0];
        assert_eq!(expanded.period, "lapalma-2026-winter");
        assert_eq!(verdicts.len(), 1);
        let (first, _) = accepted(&verdicts[0].1);
        // The whole period: six pointings, the one decided before reported.
        let (expanded, verdicts) = &decided[1];
        assert_eq!(expanded.shares.len(), 6);
        let outcomes: Vec<PointingVerdict> = verdicts
            .iter()
            .map(|(pointing, v)| PointingVerdict::of(*pointing, v))
            .collect();
        let known: Vec<&PointingVerdict> = outcomes
            .iter()
            .filter(|o| o.production_id.is_empty())
            .collect();
        assert_eq!(known.len(), 1, "{outcomes:?}");
        assert_eq!(known[0].existing_production_id, first);
        assert_eq!(
            known[0].pointing,
            Some(Pointing {
                zenith_deg: 40.0,
                azimuth_deg: 0.0
            })
        );
        let ids: std::collections::BTreeSet<&str> = outcomes
            .iter()
            .map(|o| o.production_id.as_str())
            .filter(|id| !id.is_empty())
            .collect();
        assert_eq!(ids.len(), 5);
        assert!(!ids.contains(first));
        let fingerprints: std::collections::BTreeSet<&str> =
            outcomes.iter().map(|o| o.fingerprint.as_str()).collect();
        assert_eq!(fingerprints.len(), 6);
    }

    #[test]
    fn a_period_that_refuses_a_request_names_the_field_and_a_request_without_one_is_itself() {
        let rules = rules();
        let unknown = period_parameters(|p| p["observation_period"] = "1999-summer".into());
        let expanded = rules.expand(&candidate("a", &unknown));
        assert!(expanded.has_period() && expanded.shares.is_empty());
        assert_eq!(expanded.refused[0].field, "parameters.observation_period");
        let off = period_parameters(|p| p["zenith_deg"] = 33.into());
        let decided = decide_expanded(
            &rules,
            &[candidate("b", &off)],
            &mut Neighbourhood::default(),
        );
        let refused = rejected(&decided[0].1[0].1);
        assert_eq!(refused.violations[0].field, "parameters.zenith_deg");
        let plain = parameters(4000, &[1, 5]);
        let expanded = rules.expand(&candidate("c", &plain));
        assert!(!expanded.has_period());
        assert_eq!(expanded.shares.len(), 1);
        assert_eq!(expanded.shares[0].parameters_json, plain);
        assert_eq!(expanded.shares[0].id, "c");
    }

    #[test]
    fn a_period_request_is_acceptable_when_any_pointing_is_and_refused_names_each_pointing() {
        let at = |zenith: f64| {
            Some(Pointing {
                zenith_deg: zenith,
                azimuth_deg: 180.0,
            })
        };
        let fine = Validation {
            acceptable: true,
            ..Validation::default()
        };
        let exists = Validation {
            violations: vec![Violation::new("parameters", "exists")],
            existing_production_id: "CTA-000001".into(),
            ..Validation::default()
        };
        let whole = combine("p", vec![(at(20.0), exists.clone()), (at(40.0), fine)]);
        assert!(whole.acceptable && whole.violations.is_empty());
        assert_eq!(
            whole.pointings[0].pointing,
            "zenith 20 deg, azimuth 180 deg"
        );
        let whole = combine("p", vec![(at(20.0), exists.clone()), (at(40.0), exists)]);
        assert!(!whole.acceptable);
        assert_eq!(
            whole
                .violations
                .iter()
                .map(|v| v.description.as_str())
                .collect::<Vec<_>>(),
            [
                "zenith 20 deg, azimuth 180 deg: exists",
                "zenith 40 deg, azimuth 180 deg: exists"
            ]
        );
        assert_eq!(whole.existing_production_id, "CTA-000001");
    }
}

/// The value of a chain step's input parameter that stands for the
/// production of the step before it.
pub const PREVIOUS: &str = "{previous}";

/// Why the `chain` of steps cannot follow a request of `head` with
/// `head_parameters` for `vo`, as DIRAC's ProdValidator checks production
/// steps: each step's profile must take inputs, its parameters (with the
/// step before standing in for its parent) must be valid, and its input
/// query must match what the step before writes. Violations are on
/// `chain[i]...`.
pub fn chain_violations(
    profiles: &ProfileSet,
    vo: &str,
    head: &Profile,
    head_parameters: &serde_json::Value,
    chain: &[(&str, &str)],
) -> Vec<Violation> {
    let mut violations = Vec::new();
    let mut previous: Option<(&Profile, serde_json::Value, String)> =
        Some((head, head_parameters.clone(), "the request".to_string()));
    for (i, (name, parameters_json)) in chain.iter().enumerate() {
        let at = |field: &str| format!("chain[{i}].{field}");
        let Some(profile) = profiles.get(name) else {
            violations.push(Violation::new(
                at("profile"),
                format!("unknown profile {name:?}"),
            ));
            previous = None;
            continue;
        };
        let Some(inputs) = profile.inputs() else {
            violations.push(Violation::new(
                at("profile"),
                format!("profile {name} takes no input files: every step after the request must"),
            ));
            previous = None;
            continue;
        };
        let mut parameters: serde_json::Value = match serde_json::from_str(parameters_json) {
            Ok(p) => p,
            Err(e) => {
                violations.push(Violation::new(
                    at("parameters"),
                    format!("is not JSON: {e}"),
                ));
                previous = None;
                continue;
            }
        };
        let key = inputs.production.clone().unwrap_or_default();
        let step_name = format!("chain step {i} ({name})");
        if let Some((parent, parent_parameters, parent_name)) = &previous {
            if !key.is_empty() {
                match parameters.get(&key).and_then(|v| v.as_str()) {
                    None | Some(PREVIOUS) => {
                        // The step before, as an ID of its profile would look.
                        parameters[key.as_str()] = format!("{}-0", parent.id_prefix()).into();
                    }
                    Some(other) => violations.push(Violation::new(
                        at(&format!("parameters.{key}")),
                        format!("is {other:?}: a step takes the outputs of the step before it, written {PREVIOUS:?}"),
                    )),
                }
            }
            for v in profile.validate(vo, &parameters) {
                violations.push(Violation::new(
                    format!("chain[{i}].{}", v.field),
                    v.description,
                ));
            }
            violations.extend(prodsys_core::inputs::connection_violations(
                &at(&format!("parameters.{key}")),
                profile,
                &parameters,
                parent_name,
                parent,
                parent_parameters,
            ));
        }
        previous = Some((profile, parameters, step_name));
    }
    violations
}

#[cfg(test)]
mod chain_tests {
    use super::*;

    fn shipped() -> ProfileSet {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../profiles");
        ProfileSet::load_dir(&root).unwrap()
    }

    fn example(name: &str) -> serde_json::Value {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let text = std::fs::read_to_string(root.join(name)).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["parameters"].clone()
    }

    #[test]
    fn a_chain_connects_when_each_step_takes_what_the_one_before_writes() {
        let profiles = shipped();
        let head = profiles.get("cta-irf-mc").unwrap();
        let sim = example("cta-irf-mc.json");
        let mut dl1 = example("cta-dl1.json");
        dl1["input_production"] = PREVIOUS.into();
        let mut irf = example("cta-irf.json");
        irf["input_production"] = PREVIOUS.into();
        let (dl1, irf) = (dl1.to_string(), irf.to_string());
        let vo = "vo.cta.in2p3.fr";
        let good = [("cta-dl1", dl1.as_str()), ("cta-irf", irf.as_str())];
        assert!(chain_violations(&profiles, vo, head, &sim, &good).is_empty());
        // The shipped chain file connects.
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let file: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("cta-chain.json")).unwrap())
                .unwrap();
        let shipped_steps: Vec<(String, String)> = file["chain"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["profile"].as_str().unwrap().to_string(),
                    s["parameters"].to_string(),
                )
            })
            .collect();
        let steps: Vec<(&str, &str)> = shipped_steps
            .iter()
            .map(|(p, j)| (p.as_str(), j.as_str()))
            .collect();
        let v = chain_violations(&profiles, vo, head, &file["parameters"], &steps);
        assert!(v.is_empty(), "{v:?}");
        // The IRF step straight after the simulation: its steps cannot connect.
        let skipped = [("cta-irf", irf.as_str())];
        let v = chain_violations(&profiles, vo, head, &sim, &skipped);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].field, "chain[0].parameters.input_production");
        assert!(
            v[0].description
                .contains("profile cta-irf takes the outputs of cta-dl1"),
            "{v:?}"
        );
        // A step that takes no inputs, an unknown one, bad parameters.
        let sim_text = sim.to_string();
        let bad = [
            ("cta-irf-mc", sim_text.as_str()),
            ("nope", "{}"),
            ("cta-dl1", r#"{"input_production": "{previous}"}"#),
        ];
        let v = chain_violations(&profiles, vo, head, &sim, &bad);
        let fields: Vec<&str> = v.iter().map(|v| v.field.as_str()).collect();
        assert!(fields.contains(&"chain[0].profile"), "{v:?}");
        assert!(fields.contains(&"chain[1].profile"), "{v:?}");
        // After an unknown step there is nothing to connect to; its own
        // parameters are still not checked against a parent.
        assert!(!fields.iter().any(|f| f.starts_with("chain[2]")), "{v:?}");
        let lone = [(
            "cta-dl1",
            r#"{"input_production": "{previous}", "campaign": "P"}"#,
        )];
        let v = chain_violations(&profiles, vo, head, &sim, &lone);
        assert!(
            v.iter()
                .any(|v| v.field == "chain[0].parameters.image_cleaning"),
            "{v:?}"
        );
    }
}
