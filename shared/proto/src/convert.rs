//! Conversions between the domain's plain types (`prodsys-core`) and their
//! protobuf messages, at the edge where a service speaks gRPC or AMQP.

use prodsys_core::profile::{IdentityQuery, MetadataRange};
use prodsys_core::{JobCounts, JobState, Period, PlanEstimate, ProductionState, Violation};

use crate::v1 as pb;

/// A state enum of the domain and its protobuf enum, converted both ways.
pub trait StateProto: Sized {
    type Proto;

    fn to_proto(self) -> Self::Proto;

    /// The state a wire value names; `None` for UNSPECIFIED and for a
    /// number this version does not know.
    fn from_proto(value: i32) -> Option<Self>;
}

macro_rules! state_proto {
    ($name:ident, $pb:ty, { $($variant:ident),+ $(,)? }) => {
        impl StateProto for $name {
            type Proto = $pb;

            fn to_proto(self) -> $pb {
                match self { $($name::$variant => <$pb>::$variant),+ }
            }

            fn from_proto(value: i32) -> Option<Self> {
                match <$pb>::try_from(value).ok()? {
                    $(<$pb>::$variant => Some($name::$variant),)+
                    <$pb>::Unspecified => None,
                }
            }
        }
    };
}

state_proto!(ProductionState, pb::ProductionState, {
    Received,
    Validating,
    Accepted,
    Rejected,
    Dispatching,
    Running,
    Completed,
    PartiallyCompleted,
    Failed,
    Cancelling,
    Cancelled,
    WaitingForInput,
});

state_proto!(JobState, pb::JobState, {
    Created,
    Submitted,
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
    Exhausted,
});

impl From<Violation> for pb::FieldViolation {
    fn from(v: Violation) -> Self {
        Self {
            field: v.field,
            description: v.description,
        }
    }
}

impl From<pb::FieldViolation> for Violation {
    fn from(v: pb::FieldViolation) -> Self {
        Self {
            field: v.field,
            description: v.description,
        }
    }
}

impl From<JobCounts> for pb::JobCounts {
    fn from(c: JobCounts) -> Self {
        Self {
            created: c.created,
            submitted: c.submitted,
            queued: c.queued,
            running: c.running,
            done: c.done,
            failed: c.failed,
            cancelled: c.cancelled,
            exhausted: c.exhausted,
        }
    }
}

impl From<pb::JobCounts> for JobCounts {
    fn from(c: pb::JobCounts) -> Self {
        Self {
            created: c.created,
            submitted: c.submitted,
            queued: c.queued,
            running: c.running,
            done: c.done,
            failed: c.failed,
            cancelled: c.cancelled,
            exhausted: c.exhausted,
        }
    }
}

impl From<PlanEstimate> for pb::ResourceEstimate {
    fn from(e: PlanEstimate) -> Self {
        Self {
            cpu_seconds_per_job: e.cpu_seconds_per_job,
            cpu_hours_total: e.cpu_hours_total,
            memory_mb: e.memory_mb,
            disk_mb_per_job: e.disk_mb_per_job,
            disk_gb_total: e.disk_gb_total,
        }
    }
}

impl From<IdentityQuery> for pb::FindExistingRequest {
    fn from(q: IdentityQuery) -> Self {
        Self {
            metadata: q.metadata,
            if_present: q.if_present,
            ranges: q.ranges.into_iter().map(Into::into).collect(),
            run_key: q.run_key,
        }
    }
}

impl From<MetadataRange> for pb::MetadataRange {
    fn from(r: MetadataRange) -> Self {
        Self {
            min_key: r.min_key,
            max_key: r.max_key,
            min: r.min,
            max: r.max,
        }
    }
}

impl From<&Period> for pb::PeriodInfo {
    fn from(p: &Period) -> Self {
        pb::PeriodInfo {
            name: p.name.clone(),
            profile: p.profile.clone(),
            description: p.description.clone(),
            site: p.site.clone(),
            array_layout: p.array_layout.clone(),
            nsb_levels: p.nsb_levels.clone(),
            atmosphere: p.atmosphere.clone(),
            valid_from: p.valid_from.clone(),
            valid_until: p.valid_until.clone(),
            pointings: p
                .pointings
                .iter()
                .map(|q| pb::Pointing {
                    zenith_deg: q.zenith_deg,
                    azimuth_deg: q.azimuth_deg,
                    label: q.label(),
                })
                .collect(),
        }
    }
}

/// The periods of `profiles` of `profile` and named `name` (either empty: any).
pub fn list_periods(
    profiles: &prodsys_core::ProfileSet,
    profile: &str,
    name: &str,
) -> pb::ListPeriodsResponse {
    pb::ListPeriodsResponse {
        periods: profiles
            .periods()
            .filter(|p| profile.is_empty() || p.profile == profile)
            .filter(|p| name.is_empty() || p.name == name)
            .map(Into::into)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_the_wire() {
        for s in ProductionState::ALL {
            assert_eq!(ProductionState::from_proto(s.to_proto() as i32), Some(*s));
            // The same names on both sides.
            assert_eq!(s.to_proto().as_str_name(), format!("PRODUCTION_STATE_{s}"));
        }
        for s in JobState::ALL {
            assert_eq!(JobState::from_proto(s.to_proto() as i32), Some(*s));
            assert_eq!(s.to_proto().as_str_name(), format!("JOB_STATE_{s}"));
        }
        assert_eq!(ProductionState::from_proto(0), None);
        assert_eq!(JobState::from_proto(0), None);
        assert_eq!(JobState::from_proto(999), None);
    }

    #[test]
    fn counts_violations_and_queries_keep_every_field() {
        let counts = JobCounts {
            created: 1,
            submitted: 2,
            queued: 3,
            running: 4,
            done: 5,
            failed: 6,
            cancelled: 7,
            exhausted: 8,
        };
        assert_eq!(JobCounts::from(pb::JobCounts::from(counts)), counts);
        let v = Violation::new("parameters.site", "is required");
        assert_eq!(Violation::from(pb::FieldViolation::from(v.clone())), v);
        let query = IdentityQuery {
            metadata: [("site".to_string(), "LaPalma".to_string())].into(),
            if_present: [("nsb".to_string(), "1".to_string())].into(),
            ranges: vec![MetadataRange {
                min_key: "energy_min".into(),
                max_key: "energy_max".into(),
                min: 0.003,
                max: 330.0,
            }],
            run_key: "run_number".into(),
        };
        let asked = pb::FindExistingRequest::from(query);
        assert_eq!(asked.metadata["site"], "LaPalma");
        assert_eq!(asked.if_present["nsb"], "1");
        assert_eq!(asked.ranges[0].max_key, "energy_max");
        assert_eq!(asked.ranges[0].max, 330.0);
        assert_eq!(asked.run_key, "run_number");
    }
}
