//! The dispatcher's decisions, as functions over plain values: no SQL, no
//! broker, no backend calls, no clock read behind the caller's back. What a
//! job's attempt is called and where it runs, the command it runs, what a
//! failed attempt becomes, which productions a batch plans at once, whether a
//! remembered cancel applies, and a finished production's counts.

pub mod placement;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use prodsys_core::profile::render;
use prodsys_core::{JobPlan, JobState, PlannedJob, ProductionState, Profile, ProfileSet};
use prodsys_proto as pb;
use uuid::Uuid;

use crate::backend::JobSpec;
use crate::outputs::Scanned;

/// A job with what its templates need.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub production_id: String,
    pub job_index: i64,
    pub run_number: i64,
    pub seed: i64,
    pub units: i64,
    pub attempt: i32,
    pub state: JobState,
    pub workdir: Option<String>,
    pub profile: String,
    pub vo: String,
    pub parameters: serde_json::Value,
    /// Its production's first forwarding destination, if any.
    pub output_destination: Option<String>,
    /// Attempts moved off an installation before they started (costing no retry).
    pub moved: i32,
}

impl JobRow {
    pub fn planned(&self) -> PlannedJob {
        PlannedJob {
            index: self.job_index as u64,
            run_number: self.run_number as u64,
            seed: self.seed as u64,
            units: self.units as u64,
        }
    }

    /// The attempt's name on the backend: unique per deployment and attempt, stable across restarts.
    pub fn tag(&self, deployment: &str) -> String {
        format!(
            "{deployment}.{}.{:06}.a{}",
            self.production_id, self.job_index, self.attempt
        )
    }

    /// The attempt's own directory under the work directory.
    pub fn workdir_in(&self, work_dir: &Path) -> PathBuf {
        work_dir
            .join(&self.production_id)
            .join(format!("{:06}.a{}", self.job_index, self.attempt))
    }
}

/// What the backend is given to run one attempt of `job`: the profile's
/// command and environment rendered for it, in its directory under `work_dir`.
/// A chained production's job gets its `inputs` (URLs) as `{input_files}`
/// (paths where they are local files), `{input_list}` (the list file the
/// scheduler writes in its directory) and `{input_count}`.
///
/// A job on an installation that does not share the work directory gets
/// `remote`: `{output_url}` is then the directory of its outputs on its
/// production's storage (else `file://` and its output directory), and its
/// input list travels with it (`input_list`).
pub fn job_spec(
    profile: &Profile,
    job: &JobRow,
    work_dir: &Path,
    deployment: &str,
    inputs: &[String],
    remote: Option<crate::remote::RemoteOutputs>,
) -> JobSpec {
    let workdir = job.workdir_in(work_dir);
    let output_dir = workdir.join(&profile.outputs().dir);
    let mut vars = profile.job_variables(
        &job.parameters,
        &job.production_id,
        &job.vo,
        &job.planned(),
        job.attempt as u32,
        &output_dir.to_string_lossy(),
    );
    if let Some(remote) = &remote {
        vars.insert("output_url".into(), remote.output_url.clone());
    }
    let mut input_list = None;
    if let Some(spec) = profile.inputs() {
        let files: Vec<&str> = inputs
            .iter()
            .map(|u| prodsys_core::inputs::input_location(u))
            .collect();
        vars.insert("input_files".into(), files.join(" "));
        let list = workdir.join(&spec.list_file);
        vars.insert("input_list".into(), list.to_string_lossy().into_owned());
        vars.insert("input_count".into(), inputs.len().to_string());
        if remote.is_some() {
            let text: String = files.iter().map(|f| format!("{f}\n")).collect();
            input_list = Some((list, text));
        }
    }
    let prodsys_core::profile::JobCommand { program, args, env } = profile
        .job_command(&job.parameters, &vars)
        .unwrap_or_else(|reason| {
            // Only a production accepted without its template gets here:
            // the attempt fails, saying why.
            let script = "echo \"$1\" >&2; exit 127";
            prodsys_core::profile::JobCommand {
                program: "/bin/sh".into(),
                args: vec!["-c".into(), script.into(), "prodsys".into(), reason],
                env: Vec::new(),
            }
        });
    let estimate = profile.estimate(job.units as u64);
    JobSpec {
        tag: job.tag(deployment),
        production_id: job.production_id.clone(),
        program,
        args,
        env,
        workdir,
        output_dir,
        cpu_seconds: estimate.cpu_seconds,
        memory_mb: estimate.memory_mb,
        disk_mb: estimate.disk_mb,
        remote,
        input_list,
    }
}

/// LFN, URL and metadata of each file an attempt left in its output directory.
pub fn describe_outputs(
    profile: &Profile,
    job: &JobRow,
    scanned: &[Scanned],
) -> Vec<pb::OutputFile> {
    let output_dir =
        PathBuf::from(job.workdir.as_deref().unwrap_or_default()).join(&profile.outputs().dir);
    let mut vars = profile.job_variables(
        &job.parameters,
        &job.production_id,
        &job.vo,
        &job.planned(),
        job.attempt as u32,
        &output_dir.to_string_lossy(),
    );
    let mut files = Vec::with_capacity(scanned.len());
    for file in scanned {
        vars.insert("file_name".into(), file.name.clone());
        files.push(pb::OutputFile {
            class_id: 0,
            lfn: render(&profile.outputs().lfn, &vars),
            size: file.size,
            adler32: file.adler32.clone(),
            url: file.url.clone(),
            metadata: profile.output_metadata(&vars),
            production_id: job.production_id.clone(),
            job_index: job.job_index as u64,
        });
    }
    files
}

/// What a failed attempt becomes, and under which attempt number: retried
/// (CREATED, next attempt) while the profile allows, else EXHAUSTED. The
/// limit counts the attempts that ran: `moved` of them were moved off an
/// installation before they started, and cost nothing.
pub fn after_failure(attempt: i32, moved: i32, max_attempts: u32) -> (JobState, i32) {
    if (attempt.saturating_sub(moved.max(0)).max(0) as u32) < max_attempts {
        (JobState::Created, attempt + 1)
    } else {
        (JobState::Exhausted, attempt)
    }
}

/// A finished production's state from its job rows: all done → COMPLETED,
/// some → PARTIALLY_COMPLETED, none → FAILED.
pub fn outcome(states: &[(JobState, u64)]) -> ProductionState {
    let done = states
        .iter()
        .filter(|(s, _)| *s == JobState::Done)
        .map(|(_, n)| n)
        .sum();
    let total = states.iter().map(|(_, n)| n).sum();
    ProductionState::outcome(done, total)
}

/// A closed production's job counts: its rows per state, and every job
/// without a row (never planned, or removed unstarted by a cancel) as cancelled.
pub fn final_counts(states: &[(JobState, u64)], job_total: u64) -> pb::JobCounts {
    let mut counts = prodsys_core::JobCounts::default();
    for (state, n) in states {
        counts.add(*state, *n);
    }
    counts.cancelled += job_total.saturating_sub(counts.total());
    counts.into()
}

/// When an event was made: the time in its UUIDv7 ID (every prodsys event's), else `now`.
pub fn event_time(
    event_id: Uuid,
    now: chrono::DateTime<chrono::Utc>,
) -> chrono::DateTime<chrono::Utc> {
    event_id
        .get_timestamp()
        .and_then(|t| {
            let (seconds, nanos) = t.to_unix();
            chrono::DateTime::from_timestamp(seconds as i64, nanos)
        })
        .unwrap_or(now)
}

/// An accepted production, checked and planned, before anything is written.
pub struct Prepared<'a> {
    pub plan: JobPlan,
    /// When the checker accepted it (the event's UUIDv7 time).
    pub accepted_at: chrono::DateTime<chrono::Utc>,
    pub estimate: pb::ResourceEstimate,
    pub parameters: serde_json::Value,
    pub request_id: Uuid,
    pub accepted: &'a pb::RequestAccepted,
}

/// Checks an accepted production against the loaded profiles and the
/// deployment's job ceiling, and plans it; why not, if it cannot be (the
/// event is then dead-lettered with that reason).
/// Whether `id` is `<prefix>-<digits>`, as the checker gives IDs.
pub fn is_production_id_of(prefix: &str, id: &str) -> bool {
    id.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|n| !n.is_empty() && n.len() <= 18 && n.bytes().all(|b| b.is_ascii_digit()))
}

pub fn prepare<'a>(
    profiles: &ProfileSet,
    max_jobs: u64,
    accepted_at: chrono::DateTime<chrono::Utc>,
    accepted: &'a pb::RequestAccepted,
) -> Result<Prepared<'a>, String> {
    let profile = profiles
        .get(&accepted.profile)
        .ok_or_else(|| format!("unknown profile {:?}", accepted.profile))?;
    // The ID becomes a directory under the work directory, and the
    // parameters a command line: neither is trusted because an event says so.
    if !is_production_id_of(profile.id_prefix(), &accepted.production_id) {
        return Err(format!(
            "production_id {:?} is not an ID of profile {} ({}-NNNNNN)",
            accepted.production_id,
            profile.name(),
            profile.id_prefix()
        ));
    }
    let parameters: serde_json::Value = serde_json::from_str(&accepted.parameters_json)
        .map_err(|e| format!("parameters are not JSON: {e}"))?;
    // As the request was checked: without the resolved container template
    // the checker adds (a container job's command is built from it).
    let mut requested = parameters.clone();
    if let Some(fields) = requested.as_object_mut() {
        fields.remove(prodsys_core::container::TEMPLATE_KEY);
    }
    let mut violations = profile.validate(&accepted.vo, &requested);
    // The template's image is the one thing of it that runs: it must be one
    // the VO may run, whatever the event says.
    if let (Some(containers), Some(template)) = (
        profile.containers(),
        parameters.get(prodsys_core::container::TEMPLATE_KEY),
    ) {
        let image = template.get("image").and_then(|i| i.as_str()).unwrap_or("");
        if !containers.policy.allows(&accepted.vo, image) {
            violations.push(prodsys_core::Violation::new(
                "parameters.template.image",
                format!("{image:?} is not an image {} may run", accepted.vo),
            ));
        }
    }
    if !violations.is_empty() {
        let found: Vec<String> = violations
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect();
        return Err(format!(
            "the accepted request breaks its profile: {}",
            found.join("; ")
        ));
    }
    // A chained production starts with no job: they come with its inputs.
    let plan = match profile.inputs() {
        Some(_) => JobPlan::empty(&accepted.fingerprint, accepted.run_number_offset),
        None => profile
            .plan(
                &parameters,
                &accepted.fingerprint,
                accepted.run_number_offset,
            )
            .ok_or("parameters give no job plan")?,
    };
    // Refused at submit time; a request accepted before a lower limit was
    // set is not planned either.
    if let Some(violation) = profile.check_job_count(&plan, max_jobs) {
        return Err(format!("{}: {}", violation.field, violation.description));
    }
    let request_id =
        Uuid::parse_str(&accepted.request_id).map_err(|e| format!("request_id: {e}"))?;
    Ok(Prepared {
        accepted_at,
        estimate: profile.resource_estimate(&plan).into(),
        plan,
        parameters,
        request_id,
        accepted,
    })
}

/// The productions whose remembered cancel applies, of `accepted` (ID, when
/// accepted): asked for after the production was accepted. One asked for
/// before named an ID not given yet: it is dropped, not applied to whoever
/// got the ID.
pub fn cancels_applying<'a>(
    accepted: impl IntoIterator<Item = (&'a str, chrono::DateTime<chrono::Utc>)>,
    pending: &HashMap<String, chrono::DateTime<chrono::Utc>>,
) -> HashSet<String> {
    accepted
        .into_iter()
        .filter(|(id, at)| pending.get(*id).is_some_and(|asked| asked >= at))
        .map(|(id, _)| id.to_string())
        .collect()
}

/// How each production of a batch (whether its cancel came first, its job
/// count) is recorded, with the jobs created at once: CANCELLING with none if
/// its cancel came first; else RUNNING, planned whole now while the batch's
/// jobs fit in `inline_jobs`, or left to the planning task (0).
pub fn recording(
    batch: impl IntoIterator<Item = (bool, u64)>,
    inline_jobs: u64,
) -> Vec<(ProductionState, u64)> {
    let mut budget = inline_jobs;
    batch
        .into_iter()
        .map(|(cancelled, jobs)| {
            if cancelled {
                (ProductionState::Cancelling, 0)
            } else if jobs <= budget {
                budget -= jobs;
                (ProductionState::Running, jobs)
            } else {
                (ProductionState::Running, 0)
            }
        })
        .collect()
}

/// A production row to insert.
pub struct NewProduction<'a> {
    pub production_id: &'a str,
    pub request_id: Uuid,
    pub profile: &'a str,
    pub vo: &'a str,
    pub parameters: &'a serde_json::Value,
    pub fingerprint: &'a str,
    pub backend: &'a str,
    pub run_number_offset: u64,
    pub job_total: u64,
    pub priority: i32,
    pub state: ProductionState,
    /// Jobs created with the row (the rest are left to the planning task).
    pub planned_jobs: u64,
    pub accepted_at: chrono::DateTime<chrono::Utc>,
    /// The first forwarding destination, where jobs on an installation that
    /// does not share the work directory write their outputs.
    pub output_destination: Option<&'a str>,
}

/// The rows of a batch of productions, recorded as [`recording`] says.
pub fn new_productions<'a>(
    prepared: &'a [Prepared<'a>],
    cancelled: &HashSet<String>,
    inline_jobs: u64,
) -> Vec<NewProduction<'a>> {
    let states = recording(
        prepared.iter().map(|p| {
            (
                cancelled.contains(&p.accepted.production_id),
                p.plan.job_count,
            )
        }),
        inline_jobs,
    );
    prepared
        .iter()
        .zip(states)
        .map(|(p, (state, planned_jobs))| NewProduction {
            production_id: &p.accepted.production_id,
            request_id: p.request_id,
            profile: &p.accepted.profile,
            vo: &p.accepted.vo,
            parameters: &p.parameters,
            fingerprint: &p.accepted.fingerprint,
            backend: &p.accepted.backend,
            run_number_offset: p.accepted.run_number_offset,
            job_total: p.plan.job_count,
            priority: p.accepted.priority,
            state,
            planned_jobs,
            accepted_at: p.accepted_at,
            output_destination: p.accepted.forward.first().map(String::as_str),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_accepted_request_is_checked_again_before_it_becomes_paths_and_commands() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let profiles = ProfileSet::load_dir(&root.join("profiles")).unwrap();
        let example: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("examples/cta-irf-mc.json")).unwrap(),
        )
        .unwrap();
        let accepted =
            |production_id: &str, vo: &str, parameters: &serde_json::Value| pb::RequestAccepted {
                request_id: Uuid::now_v7().to_string(),
                production_id: production_id.into(),
                profile: "cta-irf-mc".into(),
                vo: vo.into(),
                fingerprint: "f".repeat(64),
                parameters_json: parameters.to_string(),
                backend: "local".into(),
                ..Default::default()
            };
        let at = chrono::Utc::now();
        let parameters = &example["parameters"];
        let vo = example["vo"].as_str().unwrap();
        let fine = accepted("CTA-000042", vo, parameters);
        assert!(prepare(&profiles, 1_000_000, at, &fine).is_ok());
        for id in [
            "CTA-000001/../../etc",
            "KM3-000001",
            "CTA-",
            "CTA-12a",
            "../CTA-1",
        ] {
            let event = accepted(id, vo, parameters);
            let reason = prepare(&profiles, 1_000_000, at, &event).err().unwrap();
            assert!(
                reason.contains("is not an ID of profile cta-irf-mc"),
                "{reason}"
            );
        }
        let other_vo = accepted("CTA-000043", "km3net.org", parameters);
        let reason = prepare(&profiles, 1_000_000, at, &other_vo).err().unwrap();
        assert!(reason.contains("vo:"), "{reason}");
        let mut injected = parameters.clone();
        injected["site"] = "LaPalma; rm -rf /".into();
        let event = accepted("CTA-000044", vo, &injected);
        let reason = prepare(&profiles, 1_000_000, at, &event).err().unwrap();
        assert!(reason.contains("parameters.site"), "{reason}");

        // A container production's resolved template: its image must be one
        // the VO may run.
        let km3net: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("examples/km3net-container-sim.json")).unwrap(),
        )
        .unwrap();
        let with_image = |image: &str| {
            let mut parameters = km3net["parameters"].clone();
            parameters[prodsys_core::container::TEMPLATE_KEY] = serde_json::json!({
                "name": "gseagen-7.4.1", "image": image, "runtime": "podman",
            });
            pb::RequestAccepted {
                profile: "km3net-container-sim".into(),
                ..accepted("KM-000001", "km3net.org", &parameters)
            }
        };
        let digest = format!("sha256:{}", "ab".repeat(32));
        let allowed = with_image(&format!("localhost/km3net/toysim@{digest}"));
        assert!(prepare(&profiles, 1_000_000, at, &allowed).is_ok());
        let forged = with_image(&format!("docker.io/evil/miner@{digest}"));
        let reason = prepare(&profiles, 1_000_000, at, &forged).err().unwrap();
        assert!(reason.contains("parameters.template.image"), "{reason}");
    }

    #[test]
    fn a_failed_attempt_is_retried_until_the_profile_s_limit_then_exhausted() {
        assert_eq!(after_failure(1, 0, 3), (JobState::Created, 2));
        assert_eq!(after_failure(2, 0, 3), (JobState::Created, 3));
        assert_eq!(after_failure(3, 0, 3), (JobState::Exhausted, 3));
        assert_eq!(after_failure(1, 0, 1), (JobState::Exhausted, 1));
    }

    #[test]
    fn attempts_moved_before_they_started_cost_no_retry() {
        // Attempt 3 is the job's second run: attempt 2 was released unstarted.
        assert_eq!(after_failure(3, 1, 3), (JobState::Created, 4));
        assert_eq!(after_failure(4, 1, 3), (JobState::Exhausted, 4));
        // Moved once with one attempt allowed: its first run still may fail once only.
        assert_eq!(after_failure(2, 1, 1), (JobState::Exhausted, 2));
        // The same attempt without the move would have exhausted the job.
        assert_eq!(after_failure(2, 1, 2), (JobState::Created, 3));
        assert_eq!(after_failure(2, 0, 2), (JobState::Exhausted, 2));
    }

    #[test]
    fn jobs_without_a_row_count_as_cancelled_and_the_outcome_follows_the_done_ones() {
        let states = [(JobState::Done, 3), (JobState::Exhausted, 1)];
        let counts = final_counts(&states, 10);
        assert_eq!(counts.done, 3);
        assert_eq!(counts.cancelled, 6);
        assert_eq!(prodsys_core::JobCounts::from(counts).total(), 10);
        assert_eq!(outcome(&states), ProductionState::PartiallyCompleted);
        assert_eq!(outcome(&[(JobState::Done, 2)]), ProductionState::Completed);
        assert_eq!(
            outcome(&[(JobState::Exhausted, 2)]),
            ProductionState::Failed
        );
    }

    #[test]
    fn an_event_s_time_is_the_one_in_its_uuid_v7_else_now() {
        let now = chrono::Utc::now();
        let then = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, 1_700_000_000, 0);
        assert_eq!(event_time(Uuid::new_v7(ts), now), then);
        assert_eq!(event_time(Uuid::new_v4(), now), now);
    }

    #[test]
    fn a_batch_plans_inline_while_its_jobs_fit_and_a_cancel_that_came_first_applies_only_if_asked_after_acceptance()
     {
        let at = |s| chrono::DateTime::from_timestamp(s, 0).unwrap();
        // A's cancel was asked after A was accepted; C's before (another production's ID).
        let pending = HashMap::from([("A".to_string(), at(150)), ("C".to_string(), at(50))]);
        let cancelled =
            cancels_applying([("A", at(100)), ("B", at(100)), ("C", at(100))], &pending);
        assert_eq!(cancelled, HashSet::from(["A".to_string()]));
        let states = recording([(true, 5), (false, 10), (false, 2), (false, 7)], 8);
        assert_eq!(
            states,
            [
                (ProductionState::Cancelling, 0),
                // 10 jobs do not fit in 8: left to the planning task.
                (ProductionState::Running, 0),
                (ProductionState::Running, 2),
                // 2 of the 8 are taken: 7 no longer fit.
                (ProductionState::Running, 0),
            ]
        );
    }
}
