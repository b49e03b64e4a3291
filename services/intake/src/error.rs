//! Intake's one error type, mapped once onto gRPC codes and onto what the
//! consumer does with a message.

use prodsys_core::Violation;
use prodsys_messaging::HandlerError;
use prodsys_server::ServiceError;

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// The request breaks its profile or the API's rules.
    #[error("invalid request: {}", summary(.0))]
    Invalid(Vec<Violation>),
    #[error("{0}")]
    NotFound(String),
    /// An idempotency key used for a different request.
    #[error("{0}")]
    Conflict(String),
    /// Undecodable or against the contract: can never succeed.
    #[error("{0}")]
    Permanent(String),
    /// A dependency (PostgreSQL) unreachable or timing out: may pass.
    #[error("transient: {0:#}")]
    Transient(anyhow::Error),
    /// Anything else.
    #[error(transparent)]
    Unexpected(anyhow::Error),
}

pub type Result<T, E = IntakeError> = std::result::Result<T, E>;

fn summary(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<anyhow::Error> for IntakeError {
    /// Transient when the classifier of `prodsys-messaging` says the failure may pass.
    fn from(error: anyhow::Error) -> Self {
        match HandlerError::classify(error) {
            HandlerError::Transient(error) => Self::Transient(error),
            HandlerError::Permanent(reason) => Self::Permanent(reason),
            HandlerError::Unexpected(error) => Self::Unexpected(error),
        }
    }
}

impl From<IntakeError> for tonic::Status {
    fn from(error: IntakeError) -> Self {
        let error = match error {
            IntakeError::Invalid(violations) => ServiceError::Validation(violations),
            IntakeError::NotFound(what) => ServiceError::NotFound(what),
            IntakeError::Conflict(what) => ServiceError::Conflict(what),
            IntakeError::Permanent(reason) => return tonic::Status::invalid_argument(reason),
            // UNAVAILABLE, as the shared mapping answers every transient failure.
            IntakeError::Transient(error) => {
                ServiceError::Unexpected(prodsys_messaging::Transient::wrap(error))
            }
            IntakeError::Unexpected(error) => ServiceError::Unexpected(error),
        };
        error.into()
    }
}

impl From<IntakeError> for HandlerError {
    fn from(error: IntakeError) -> Self {
        match error {
            IntakeError::Transient(error) => HandlerError::Transient(error),
            IntakeError::Unexpected(error) => HandlerError::Unexpected(error),
            other @ (IntakeError::Invalid(_)
            | IntakeError::NotFound(_)
            | IntakeError::Conflict(_)
            | IntakeError::Permanent(_)) => HandlerError::Permanent(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_maps_onto_one_code_and_one_consumer_outcome() {
        let invalid = IntakeError::Invalid(vec![Violation::new("vo", "unknown")]);
        assert_eq!(
            tonic::Status::from(invalid).code(),
            tonic::Code::InvalidArgument
        );
        let lost = IntakeError::from(prodsys_messaging::Transient::wrap(anyhow::anyhow!("down")));
        assert!(matches!(lost, IntakeError::Transient(_)));
        assert_eq!(tonic::Status::from(lost).code(), tonic::Code::Unavailable);
        let bug = IntakeError::from(anyhow::anyhow!("a bug"));
        assert!(matches!(bug, IntakeError::Unexpected(_)));
        assert!(matches!(
            HandlerError::from(bug),
            HandlerError::Unexpected(_)
        ));
        assert!(matches!(
            HandlerError::from(IntakeError::Permanent("bad".into())),
            HandlerError::Permanent(reason) if reason == "bad"
        ));
        assert_eq!(
            tonic::Status::from(IntakeError::Conflict("used".into())).code(),
            tonic::Code::AlreadyExists
        );
        assert_eq!(
            tonic::Status::from(IntakeError::NotFound("none".into())).code(),
            tonic::Code::NotFound
        );
    }
}
