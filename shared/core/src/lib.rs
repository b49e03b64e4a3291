//! The domain of prodsys, free of I/O and of wire types (`prodsys-proto`
//! converts them at the edges): the production and job state machines,
//! production profiles (validation, fingerprint, job plan, templates), the
//! names of the events the services exchange, and file checksums.

pub mod checksum;
pub mod container;
pub mod events;
pub mod inputs;
pub mod period;
pub mod profile;
pub mod state;
pub mod violation;

pub use period::{Period, Pointing};
pub use profile::{JobPlan, PlanEstimate, PlannedJob, Profile, ProfileSet, is_production_id};
pub use state::{JobCounts, JobState, ProductionState};
pub use violation::Violation;
