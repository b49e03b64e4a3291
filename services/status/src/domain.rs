//! The status service's decisions over plain types: how a batch of events
//! folds into one change per production and per job (never backwards: events
//! arrive late and out of order), how a production's job counts are tallied,
//! and when a production is held or settled. No SQL, no broker, no gRPC.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use prodsys_core::{JobCounts, JobState, ProductionState};
use uuid::Uuid;

/// Productions in a page when none was asked for.
pub const DEFAULT_PAGE: u32 = 100;
/// Most productions in one page.
pub const MAX_PAGE: u32 = 1000;

/// The page size to answer with: `requested`, at most [`MAX_PAGE`], or
/// [`DEFAULT_PAGE`] when none was asked for.
pub fn page_size(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    }
}

/// One job's transition, as `job.status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobTransition {
    pub production_id: String,
    pub job_index: u64,
    pub attempt: u32,
    /// `None` for a state this version does not know: it orders first and is
    /// not recorded.
    pub state: Option<JobState>,
    pub raw_status: String,
    /// The WMS installation the attempt was placed on; empty while it waits.
    pub installation: String,
}

impl JobTransition {
    /// Later attempts come after earlier ones; within an attempt, the
    /// further state comes after.
    pub fn order(&self) -> (u32, u8) {
        (self.attempt, self.state.map_or(0, JobState::rank))
    }
}

/// A WMS installation's health, as the dispatcher announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallationHealth {
    pub installation: String,
    pub healthy: bool,
    pub reason: String,
    pub since_unix_ms: i64,
}

/// What one batch says about one production.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProductionUpdate {
    pub state: Option<ProductionState>,
    pub job_total: Option<i64>,
    pub request_id: Option<Uuid>,
    pub profile: Option<String>,
    pub vo: Option<String>,
    pub backend: Option<String>,
    /// The resource estimate, as encoded on the wire.
    pub estimate: Option<Vec<u8>>,
    /// The observation period and pointing of a period's production.
    pub period: Option<String>,
    pub pointing: Option<String>,
}

impl ProductionUpdate {
    /// Keeps the furthest state (events may arrive late or out of order).
    pub fn advance(&mut self, state: ProductionState) {
        if self.state.is_none_or(|s| state.rank() > s.rank()) {
            self.state = Some(state);
        }
    }
}

/// The final job counts of the productions a batch saw end, one row per
/// state with jobs, column by column.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FinalCounts {
    pub productions: Vec<String>,
    pub states: Vec<&'static str>,
    pub counts: Vec<i64>,
}

impl FinalCounts {
    pub fn push(&mut self, production_id: &str, counts: &JobCounts) {
        for (state, n) in counts.by_state() {
            if n > 0 {
                self.productions.push(production_id.to_string());
                self.states.push(state.as_str());
                self.counts.push(n as i64);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.productions.is_empty()
    }
}

/// Everything one batch of events changes in the read model, merged so
/// that one statement writes each kind (a row may change once per statement).
#[derive(Debug, Default)]
pub struct Projection {
    pub productions: BTreeMap<String, ProductionUpdate>,
    /// Latest transition per job across the batch.
    latest: HashMap<(String, u64), JobTransition>,
    pub finals: FinalCounts,
    /// In the order they arrived (rare: one statement each).
    pub health: Vec<InstallationHealth>,
    /// Chained productions: input files used (the most any event said),
    /// and the note of the one that ended.
    pub inputs: BTreeMap<String, (u64, Option<String>)>,
    /// Federated productions' installations: (production, installation).
    pub members: Vec<(String, String)>,
}

impl Projection {
    pub fn accepted(
        &mut self,
        production_id: String,
        request_id: Option<Uuid>,
        profile: String,
        vo: String,
        backend: String,
    ) {
        let p = self.productions.entry(production_id).or_default();
        p.advance(ProductionState::Accepted);
        p.request_id = request_id;
        p.profile = Some(profile);
        p.vo = Some(vo);
        p.backend = Some(backend);
    }

    /// The observation period and pointing a production simulates, when
    /// its request named a period.
    pub fn pointing(&mut self, production_id: String, period: String, pointing: String) {
        if period.is_empty() {
            return;
        }
        let p = self.productions.entry(production_id).or_default();
        p.period = Some(period);
        p.pointing = Some(pointing);
    }

    /// The installations a production naming a group (or `any`) may run on.
    pub fn members(&mut self, production_id: &str, installations: Vec<String>) {
        self.members.extend(
            installations
                .into_iter()
                .map(|i| (production_id.to_string(), i)),
        );
    }

    /// A production's jobs planned: RUNNING, or WAITING_FOR_INPUT for a
    /// chained production with no job yet. A chained production sends this
    /// again each time its job total grows (the larger total is kept).
    pub fn dispatched(
        &mut self,
        production_id: String,
        job_total: u64,
        estimate: Option<Vec<u8>>,
        waiting_for_input: bool,
    ) {
        let p = self.productions.entry(production_id).or_default();
        p.advance(if waiting_for_input && job_total == 0 {
            ProductionState::WaitingForInput
        } else {
            ProductionState::Running
        });
        p.job_total = Some(p.job_total.unwrap_or(0).max(job_total as i64));
        if estimate.is_some() {
            p.estimate = estimate;
        }
    }

    /// What a chained production's event says of its inputs: how many its
    /// jobs took, and (when it ended) its note.
    pub fn inputs(&mut self, production_id: String, used: u64, note: Option<String>) {
        let entry = self.inputs.entry(production_id).or_default();
        entry.0 = entry.0.max(used);
        if note.is_some() {
            entry.1 = note;
        }
    }

    pub fn completed(
        &mut self,
        production_id: String,
        state: ProductionState,
        counts: Option<&JobCounts>,
    ) {
        if let Some(counts) = counts {
            self.finals.push(&production_id, counts);
        }
        self.productions
            .entry(production_id)
            .or_default()
            .advance(state);
    }

    /// Keeps `t` if it is the newest transition of its job in the batch.
    pub fn job(&mut self, t: JobTransition) {
        let key = (t.production_id.clone(), t.job_index);
        let newer = match self.latest.get(&key) {
            Some(old) => t.order() > old.order(),
            None => true,
        };
        if newer {
            self.latest.insert(key, t);
        }
    }

    pub fn health(&mut self, report: InstallationHealth) {
        self.health.push(report);
    }

    /// The batch's changes: production updates, final counts, installation
    /// reports, the newest transition of each job, and every production
    /// touched (whose watchers are told).
    pub fn finish(self) -> Changes {
        let transitions: Vec<JobTransition> = self.latest.into_values().collect();
        let mut touched: BTreeSet<String> = self.productions.keys().cloned().collect();
        touched.extend(self.inputs.keys().cloned());
        touched.extend(transitions.iter().map(|t| t.production_id.clone()));
        Changes {
            inputs: self.inputs,
            members: self.members,
            productions: self.productions,
            finals: self.finals,
            health: self.health,
            transitions,
            touched: touched.into_iter().collect(),
        }
    }
}

/// What a batch writes, ready for the store.
#[derive(Debug)]
pub struct Changes {
    pub productions: BTreeMap<String, ProductionUpdate>,
    /// Chained productions' inputs used, and note.
    pub inputs: BTreeMap<String, (u64, Option<String>)>,
    /// Federated productions' installations: (production, installation).
    pub members: Vec<(String, String)>,
    pub finals: FinalCounts,
    pub health: Vec<InstallationHealth>,
    /// At most one per job.
    pub transitions: Vec<JobTransition>,
    /// In production-ID order.
    pub touched: Vec<String>,
}

/// A production as the read model holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Production {
    pub production_id: String,
    pub request_id: Option<Uuid>,
    pub profile: String,
    pub vo: String,
    pub backend: String,
    /// `None` for a state this version does not know.
    pub state: Option<ProductionState>,
    pub job_total: u64,
    pub counts: JobCounts,
    pub updated_unix_ms: i64,
    /// The resource estimate, as encoded on the wire.
    pub estimate: Option<Vec<u8>>,
    pub held_reason: String,
    /// Empty unless its request named an observation period.
    pub period: String,
    pub pointing: String,
    /// A chained production's input files used so far, and its note.
    pub inputs_used: u64,
    pub inputs_note: String,
}

/// A production's jobs by state: `counts` as stored (state name, jobs), and
/// the jobs no event has mentioned yet as CREATED. Unknown state names are
/// left out.
pub fn tally<'a>(job_total: u64, counts: impl IntoIterator<Item = (&'a str, i64)>) -> JobCounts {
    let mut tally = JobCounts::default();
    let mut seen = 0;
    for (state, n) in counts {
        if let Ok(state) = state.parse::<JobState>() {
            let n = n as u64;
            tally.add(state, n);
            seen += n;
        }
    }
    tally.created += job_total.saturating_sub(seen);
    tally
}

/// A production's jobs per installation from its counters (installation,
/// state name, jobs), in installation order; unknown states and emptied
/// counters are left out.
pub fn per_installation<'a>(
    counters: impl IntoIterator<Item = (&'a str, &'a str, i64)>,
) -> Vec<(String, JobCounts)> {
    let mut by: BTreeMap<String, JobCounts> = BTreeMap::new();
    for (installation, state, n) in counters {
        if let (Ok(state), true) = (state.parse::<JobState>(), n > 0) {
            by.entry(installation.to_string())
                .or_default()
                .add(state, n as u64);
        }
    }
    by.into_iter().filter(|(_, c)| c.total() > 0).collect()
}

/// A failing installation, as the read model remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failing<'a> {
    pub installation: &'a str,
    pub reason: &'a str,
    pub since_unix_ms: i64,
}

fn since(unix_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(unix_ms).map_or_else(String::new, |t| {
        format!(" since {}", t.format("%Y-%m-%d %H:%M:%S UTC"))
    })
}

/// Why a production's jobs are not moving (empty when they are not held):
/// the installation it names is failing, or, for one naming a group of
/// installations or `any` (`backend`), every installation it may run on
/// is. `failing` holds the failing ones only when that is so.
pub fn held_reason(
    state: Option<ProductionState>,
    backend: &str,
    failing: &[Failing<'_>],
) -> String {
    let waiting = matches!(
        state,
        Some(
            ProductionState::Accepted
                | ProductionState::Dispatching
                | ProductionState::WaitingForInput
                | ProductionState::Running
                | ProductionState::Cancelling
        )
    );
    match failing {
        _ if !waiting => String::new(),
        [] => String::new(),
        [one] if one.installation == backend => format!(
            "held: WMS installation {backend} is failing{} ({}); its jobs wait until it answers",
            since(one.since_unix_ms),
            one.reason
        ),
        every => {
            let each: Vec<String> = every
                .iter()
                .map(|f| format!("{}{}: {}", f.installation, since(f.since_unix_ms), f.reason))
                .collect();
            format!(
                "held: every WMS installation of {backend} is failing ({}); its jobs wait until one answers",
                each.join("; ")
            )
        }
    }
}

/// Every job of the production counted in a final state. Consumers project
/// concurrently, so a production's end may be recorded a moment before the
/// last transitions of its jobs; a watch ends once both are in.
pub fn is_settled(counts: &JobCounts) -> bool {
    counts.created + counts.submitted + counts.queued + counts.running + counts.failed == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transition(job_index: u64, attempt: u32, state: Option<JobState>) -> JobTransition {
        JobTransition {
            production_id: "CTA-000001".into(),
            job_index,
            attempt,
            state,
            raw_status: String::new(),
            installation: String::new(),
        }
    }

    #[test]
    fn a_batch_keeps_the_furthest_state_of_each_production() {
        let mut p = Projection::default();
        p.completed("CTA-000001".into(), ProductionState::Completed, None);
        // Late: accepted and dispatched after the end, in the same batch.
        p.accepted(
            "CTA-000001".into(),
            None,
            "cta-irf-mc".into(),
            "vo.cta.in2p3.fr".into(),
            "local".into(),
        );
        p.dispatched("CTA-000001".into(), 10, None, false);
        let changes = p.finish();
        let u = &changes.productions["CTA-000001"];
        assert_eq!(u.state, Some(ProductionState::Completed));
        assert_eq!(u.job_total, Some(10));
        assert_eq!(u.profile.as_deref(), Some("cta-irf-mc"));
        assert_eq!(changes.touched, vec!["CTA-000001".to_string()]);
    }

    #[test]
    fn a_chained_production_waits_for_input_until_its_first_jobs_and_keeps_its_largest_total() {
        let mut p = Projection::default();
        p.dispatched("DL-1".into(), 0, None, true);
        let u = &p.productions["DL-1"];
        assert_eq!(u.state, Some(ProductionState::WaitingForInput));
        p.dispatched("DL-1".into(), 4, None, false);
        p.dispatched("DL-1".into(), 2, None, false);
        let u = &p.productions["DL-1"];
        assert_eq!(u.state, Some(ProductionState::Running));
        assert_eq!(u.job_total, Some(4));
    }

    #[test]
    fn a_dispatch_without_an_estimate_keeps_an_earlier_one() {
        let mut p = Projection::default();
        p.dispatched("P-1".into(), 3, Some(vec![1, 2]), false);
        p.dispatched("P-1".into(), 3, None, false);
        assert_eq!(
            p.finish().productions["P-1"].estimate.as_deref(),
            Some(&[1u8, 2][..])
        );
    }

    #[test]
    fn each_job_keeps_its_newest_transition_of_the_batch() {
        let mut p = Projection::default();
        p.job(transition(0, 1, Some(JobState::Running)));
        p.job(transition(0, 1, Some(JobState::Queued)));
        p.job(transition(1, 1, Some(JobState::Failed)));
        p.job(transition(1, 2, Some(JobState::Created)));
        p.job(transition(2, 1, None));
        let mut changes = p.finish();
        changes.transitions.sort_by_key(|t| t.job_index);
        let kept: Vec<(u64, u32, Option<JobState>)> = changes
            .transitions
            .iter()
            .map(|t| (t.job_index, t.attempt, t.state))
            .collect();
        assert_eq!(
            kept,
            vec![
                (0, 1, Some(JobState::Running)),
                (1, 2, Some(JobState::Created)),
                (2, 1, None),
            ]
        );
        assert_eq!(changes.touched, vec!["CTA-000001".to_string()]);
    }

    #[test]
    fn final_counts_have_a_row_per_state_with_jobs() {
        let mut finals = FinalCounts::default();
        let counts = JobCounts {
            done: 7,
            exhausted: 1,
            ..JobCounts::default()
        };
        finals.push("P-1", &counts);
        assert_eq!(finals.states, vec!["DONE", "EXHAUSTED"]);
        assert_eq!(finals.counts, vec![7, 1]);
        assert_eq!(finals.productions, vec!["P-1", "P-1"]);
    }

    #[test]
    fn jobs_no_event_mentioned_are_created_and_unknown_states_are_left_out() {
        let counts = tally(10, [("DONE", 4), ("RUNNING", 2), ("BOGUS", 3)]);
        assert_eq!(counts.done, 4);
        assert_eq!(counts.running, 2);
        assert_eq!(counts.created, 4);
        assert_eq!(counts.total(), 10);
        // More counted than the total (a late total): nothing is invented.
        assert_eq!(tally(1, [("DONE", 2)]).created, 0);
    }

    #[test]
    fn a_production_is_held_only_while_it_waits_on_a_failing_installation() {
        let failing = [Failing {
            installation: "slurm-local",
            reason: "sbatch: connection refused",
            since_unix_ms: 0,
        }];
        let held = held_reason(Some(ProductionState::Running), "slurm-local", &failing);
        assert_eq!(
            held,
            "held: WMS installation slurm-local is failing since 1970-01-01 00:00:00 UTC \
             (sbatch: connection refused); its jobs wait until it answers"
        );
        assert_eq!(
            held_reason(Some(ProductionState::Completed), "slurm-local", &failing),
            ""
        );
        assert_eq!(held_reason(None, "slurm-local", &failing), "");
        assert_eq!(
            held_reason(Some(ProductionState::Running), "slurm-local", &[]),
            ""
        );
    }

    #[test]
    fn a_group_s_production_is_held_naming_each_of_its_failing_installations() {
        let failing = [
            Failing {
                installation: "dirac-cta",
                reason: "connection refused",
                since_unix_ms: 0,
            },
            Failing {
                installation: "slurm-local",
                reason: "sinfo: timeout",
                since_unix_ms: 60_000,
            },
        ];
        assert_eq!(
            held_reason(Some(ProductionState::Running), "cta-grid", &failing),
            "held: every WMS installation of cta-grid is failing (dirac-cta since \
             1970-01-01 00:00:00 UTC: connection refused; slurm-local since 1970-01-01 \
             00:01:00 UTC: sinfo: timeout); its jobs wait until one answers"
        );
        // A group of one failing installation still names the group.
        assert!(
            held_reason(Some(ProductionState::Running), "any", &failing[..1])
                .starts_with("held: every WMS installation of any is failing (dirac-cta")
        );
    }

    #[test]
    fn settled_when_no_job_can_still_move() {
        let mut counts = JobCounts {
            done: 3,
            cancelled: 1,
            exhausted: 1,
            ..JobCounts::default()
        };
        assert!(is_settled(&counts));
        counts.failed = 1;
        assert!(!is_settled(&counts));
    }

    #[test]
    fn page_sizes_default_and_cap() {
        assert_eq!(page_size(0), DEFAULT_PAGE);
        assert_eq!(page_size(5), 5);
        assert_eq!(page_size(5000), MAX_PAGE);
    }

    #[test]
    fn jobs_per_installation_come_from_the_counters_leaving_out_emptied_ones() {
        let by = per_installation([
            ("local-b", "DONE", 3),
            ("local-a", "RUNNING", 1),
            ("local-a", "DONE", 2),
            ("local-b", "RUNNING", 0),
            ("gone", "RUNNING", 0),
            ("local-a", "NO_SUCH_STATE", 4),
        ]);
        let names: Vec<&str> = by.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["local-a", "local-b"]);
        assert_eq!((by[0].1.done, by[0].1.running, by[0].1.total()), (2, 1, 3));
        assert_eq!((by[1].1.done, by[1].1.total()), (3, 3));
    }
}
