//! Names of the events on `prodsys.events`: the routing key is the short type,
//! the CloudEvents `type` attribute is its reverse-DNS form.

pub const REQUEST_RECEIVED: &str = "request.received";
pub const REQUEST_ACCEPTED: &str = "request.accepted";
pub const REQUEST_REJECTED: &str = "request.rejected";
/// An exact duplicate answered with the existing production, as the request asked.
pub const REQUEST_REUSED: &str = "request.reused";
pub const PRODUCTION_DISPATCHED: &str = "production.dispatched";
pub const JOB_STATUS: &str = "job.status";
pub const JOB_OUTPUT: &str = "job.output";
pub const PRODUCTION_COMPLETED: &str = "production.completed";
pub const PRODUCTION_CANCEL: &str = "production.cancel";
/// A WMS installation started failing or answers again.
pub const INSTALLATION_HEALTH: &str = "installation.health";
/// The catalog copied some of a production's files to its destinations: the counts.
pub const FORWARDING_PROGRESS: &str = "forwarding.progress";
/// A finished production's outputs are verified on every destination it asked for.
pub const PRODUCTION_FORWARDED: &str = "production.forwarded";

/// CloudEvents `type` of a short event type: `request.received` → `org.prodsys.request.received.v1`.
pub fn cloudevent_type(short: &str) -> String {
    format!("org.prodsys.{short}.v1")
}

/// Short type of a CloudEvents `type`, if it is one of ours.
pub fn short_type(cloudevent_type: &str) -> Option<&str> {
    cloudevent_type
        .strip_prefix("org.prodsys.")
        .and_then(|rest| rest.strip_suffix(".v1"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_round_trip() {
        let t = cloudevent_type(JOB_STATUS);
        assert_eq!(t, "org.prodsys.job.status.v1");
        assert_eq!(short_type(&t), Some(JOB_STATUS));
        assert_eq!(short_type("com.example.other"), None);
    }
}
