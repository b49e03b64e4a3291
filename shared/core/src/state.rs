//! The production and job state machines. Every service that changes a state
//! asks these types whether the move is allowed; nothing else decides it.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("illegal {entity} transition {from} -> {to}")]
    IllegalTransition {
        entity: &'static str,
        from: String,
        to: String,
    },
    #[error("unknown {entity} state {0:?}", entity = .1)]
    Unknown(String, &'static str),
}

macro_rules! state_enum {
    ($name:ident, $entity:literal, { $($variant:ident => $text:literal),+ $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The name stored in the database and printed to users.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = StateError;
            fn from_str(s: &str) -> Result<Self, StateError> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(StateError::Unknown(other.to_string(), $entity)),
                }
            }
        }
    };
}

state_enum!(ProductionState, "production", {
    Received => "RECEIVED",
    Validating => "VALIDATING",
    Accepted => "ACCEPTED",
    Rejected => "REJECTED",
    Dispatching => "DISPATCHING",
    Running => "RUNNING",
    Completed => "COMPLETED",
    PartiallyCompleted => "PARTIALLY_COMPLETED",
    Failed => "FAILED",
    Cancelling => "CANCELLING",
    Cancelled => "CANCELLED",
    WaitingForInput => "WAITING_FOR_INPUT",
});

state_enum!(JobState, "job", {
    Created => "CREATED",
    Submitted => "SUBMITTED",
    Queued => "QUEUED",
    Running => "RUNNING",
    Done => "DONE",
    Failed => "FAILED",
    Cancelled => "CANCELLED",
    Exhausted => "EXHAUSTED",
});

impl ProductionState {
    pub fn is_terminal(self) -> bool {
        use ProductionState::*;
        matches!(
            self,
            Rejected | Completed | PartiallyCompleted | Failed | Cancelled
        )
    }

    /// Whether the production may move from `self` to `to`.
    pub fn can_become(self, to: ProductionState) -> bool {
        use ProductionState::*;
        if self.is_terminal() {
            return false;
        }
        match (self, to) {
            (_, Cancelling) => self != Cancelling,
            (Cancelling, Cancelled) => true,
            (Cancelling, _) => false,
            (Received, Validating | Accepted | Rejected) => true,
            (Validating, Accepted | Rejected) => true,
            (Accepted, Dispatching) => true,
            // A chained production before its first input file arrived.
            (Accepted | Dispatching, WaitingForInput) => true,
            (WaitingForInput, Running) => true,
            // Its parents ended with nothing for it.
            (WaitingForInput, Completed | PartiallyCompleted | Failed) => true,
            (Dispatching, Running) => true,
            // A production whose every job finished before anyone saw it running.
            (Dispatching | Running, Completed | PartiallyCompleted | Failed) => true,
            _ => false,
        }
    }

    /// `to` if the move is legal, the reason otherwise.
    pub fn transition(self, to: ProductionState) -> Result<ProductionState, StateError> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(StateError::IllegalTransition {
                entity: "production",
                from: self.to_string(),
                to: to.to_string(),
            })
        }
    }

    /// How far along the life cycle a state is; a read model never moves backwards.
    pub fn rank(self) -> u8 {
        use ProductionState::*;
        match self {
            Received => 0,
            Validating => 1,
            Accepted | Rejected => 2,
            // Never both: a chained production waits, others dispatch.
            Dispatching | WaitingForInput => 3,
            Running => 4,
            Cancelling => 5,
            Completed | PartiallyCompleted | Failed | Cancelled => 6,
        }
    }

    /// The final state of a production whose jobs all ended, by the stated rule:
    /// every job done → COMPLETED; some done → PARTIALLY_COMPLETED; none → FAILED.
    pub fn outcome(done: u64, total: u64) -> ProductionState {
        if total > 0 && done == total {
            ProductionState::Completed
        } else if done > 0 {
            ProductionState::PartiallyCompleted
        } else {
            ProductionState::Failed
        }
    }
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Done | JobState::Cancelled | JobState::Exhausted
        )
    }

    /// Whether the job may move from `self` to `to`. FAILED is not final: the
    /// job is either retried (back to CREATED as a new attempt) or EXHAUSTED.
    pub fn can_become(self, to: JobState) -> bool {
        use JobState::*;
        match (self, to) {
            (Done | Cancelled | Exhausted, _) => false,
            (_, Cancelled) => true,
            (Created, Submitted) => true,
            (Submitted, Queued | Running | Done | Failed) => true,
            (Queued, Running | Done | Failed) => true,
            (Running, Done | Failed) => true,
            (Failed, Created | Exhausted) => true,
            _ => false,
        }
    }

    pub fn transition(self, to: JobState) -> Result<JobState, StateError> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(StateError::IllegalTransition {
                entity: "job",
                from: self.to_string(),
                to: to.to_string(),
            })
        }
    }

    /// Order within one attempt, so a read model ignores a late, older transition.
    pub fn rank(self) -> u8 {
        use JobState::*;
        match self {
            Created => 0,
            Submitted => 1,
            Queued => 2,
            Running => 3,
            Failed => 4,
            Done | Cancelled | Exhausted => 5,
        }
    }
}

/// A production's jobs counted by state (serialised with these field names:
/// the status service's JSON shows them so).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct JobCounts {
    pub created: u64,
    pub submitted: u64,
    pub queued: u64,
    pub running: u64,
    pub done: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub exhausted: u64,
}

impl JobCounts {
    /// Counts `n` more jobs in `state`.
    pub fn add(&mut self, state: JobState, n: u64) {
        let slot = match state {
            JobState::Created => &mut self.created,
            JobState::Submitted => &mut self.submitted,
            JobState::Queued => &mut self.queued,
            JobState::Running => &mut self.running,
            JobState::Done => &mut self.done,
            JobState::Failed => &mut self.failed,
            JobState::Cancelled => &mut self.cancelled,
            JobState::Exhausted => &mut self.exhausted,
        };
        *slot += n;
    }

    /// Jobs in every state.
    pub fn total(&self) -> u64 {
        self.created
            + self.submitted
            + self.queued
            + self.running
            + self.done
            + self.failed
            + self.cancelled
            + self.exhausted
    }

    /// The count of each state, in the states' order.
    pub fn by_state(&self) -> [(JobState, u64); 8] {
        [
            (JobState::Created, self.created),
            (JobState::Submitted, self.submitted),
            (JobState::Queued, self.queued),
            (JobState::Running, self.running),
            (JobState::Done, self.done),
            (JobState::Failed, self.failed),
            (JobState::Cancelled, self.cancelled),
            (JobState::Exhausted, self.exhausted),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_happy_path_is_legal() {
        use ProductionState::*;
        let path = [
            Received,
            Validating,
            Accepted,
            Dispatching,
            Running,
            Completed,
        ];
        for pair in path.windows(2) {
            assert!(pair[0].can_become(pair[1]), "{} -> {}", pair[0], pair[1]);
        }
    }

    #[test]
    fn a_chained_production_waits_for_input_then_runs_or_ends_with_nothing() {
        use ProductionState::*;
        assert!(Accepted.can_become(WaitingForInput));
        assert!(WaitingForInput.can_become(Running));
        assert!(WaitingForInput.can_become(Failed));
        assert!(WaitingForInput.can_become(Cancelling));
        assert!(!Running.can_become(WaitingForInput));
        assert!(WaitingForInput.rank() < Running.rank());
        assert!(WaitingForInput.rank() > Accepted.rank());
    }

    #[test]
    fn terminal_productions_never_move() {
        for from in ProductionState::ALL.iter().filter(|s| s.is_terminal()) {
            for to in ProductionState::ALL {
                assert!(!from.can_become(*to), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn illegal_production_moves_are_refused_with_names() {
        let err = ProductionState::Received
            .transition(ProductionState::Running)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "illegal production transition RECEIVED -> RUNNING"
        );
        assert!(ProductionState::Running.can_become(ProductionState::Cancelling));
        assert!(!ProductionState::Cancelling.can_become(ProductionState::Running));
    }

    #[test]
    fn jobs_retry_through_failed_and_end_exhausted() {
        use JobState::*;
        assert!(Failed.can_become(Created));
        assert!(Failed.can_become(Exhausted));
        assert!(!Done.can_become(Running));
        assert!(!Created.can_become(Running));
        assert!(Running.can_become(Cancelled));
    }

    #[test]
    fn names_round_trip_through_text() {
        for s in ProductionState::ALL {
            assert_eq!(s.as_str().parse::<ProductionState>().unwrap(), *s);
        }
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().unwrap(), *s);
        }
        assert!("BOGUS".parse::<JobState>().is_err());
    }

    #[test]
    fn job_counts_add_up() {
        let mut counts = JobCounts::default();
        counts.add(JobState::Done, 3);
        counts.add(JobState::Exhausted, 1);
        counts.add(JobState::Done, 2);
        assert_eq!(counts.done, 5);
        assert_eq!(counts.total(), 6);
        assert_eq!(counts.by_state()[4], (JobState::Done, 5));
    }

    #[test]
    fn outcome_rule() {
        assert_eq!(ProductionState::outcome(3, 3), ProductionState::Completed);
        assert_eq!(
            ProductionState::outcome(1, 3),
            ProductionState::PartiallyCompleted
        );
        assert_eq!(ProductionState::outcome(0, 3), ProductionState::Failed);
    }
}
