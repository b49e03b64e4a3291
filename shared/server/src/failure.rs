//! The one error type of a service's domain and store, mapped once onto gRPC
//! codes ([`tonic::Status`]) and onto what the consumer does with a message
//! ([`HandlerError`]). Each service names it after itself
//! (`pub type CatalogError = Failure;`).

use prodsys_core::Violation;
use prodsys_messaging::HandlerError;

use crate::ServiceError;

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The call breaks the API's rules: answered with every field violation.
    #[error("invalid request: {}", summary(.0))]
    Invalid(Vec<Violation>),
    #[error("{0}")]
    NotFound(String),
    /// The call contradicts what is already recorded (an idempotency key
    /// used for a different request).
    #[error("{0}")]
    Conflict(String),
    /// The caller's token does not allow it (another user's production).
    #[error("{0}")]
    Denied(String),
    /// Undecodable or against the contract: can never succeed.
    #[error("{0}")]
    Permanent(String),
    /// A dependency (PostgreSQL, a peer service, a backend) unreachable or
    /// timing out: may pass.
    #[error("transient: {0:#}")]
    Transient(anyhow::Error),
    /// Anything else.
    #[error(transparent)]
    Unexpected(anyhow::Error),
}

fn summary(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<anyhow::Error> for Failure {
    /// Transient when the classifier of `prodsys-messaging` says the failure may pass.
    fn from(error: anyhow::Error) -> Self {
        match HandlerError::classify(error) {
            HandlerError::Transient(error) => Self::Transient(error),
            HandlerError::Permanent(reason) => Self::Permanent(reason),
            HandlerError::Unexpected(error) => Self::Unexpected(error),
        }
    }
}

impl From<prodsys_db::tokio_postgres::Error> for Failure {
    fn from(error: prodsys_db::tokio_postgres::Error) -> Self {
        anyhow::Error::from(error).into()
    }
}

impl From<prodsys_db::deadpool_postgres::PoolError> for Failure {
    fn from(error: prodsys_db::deadpool_postgres::PoolError) -> Self {
        anyhow::Error::from(error).into()
    }
}

impl From<Failure> for tonic::Status {
    fn from(error: Failure) -> Self {
        let error = match error {
            Failure::Invalid(violations) => ServiceError::Validation(violations),
            Failure::NotFound(what) => ServiceError::NotFound(what),
            Failure::Conflict(what) => ServiceError::Conflict(what),
            Failure::Permanent(reason) => return tonic::Status::invalid_argument(reason),
            Failure::Denied(reason) => return tonic::Status::permission_denied(reason),
            // UNAVAILABLE, as the shared mapping answers every transient failure.
            Failure::Transient(error) => {
                ServiceError::Unexpected(prodsys_messaging::Transient::wrap(error))
            }
            Failure::Unexpected(error) => ServiceError::Unexpected(error),
        };
        error.into()
    }
}

impl From<Failure> for HandlerError {
    fn from(error: Failure) -> Self {
        match error {
            Failure::Transient(error) => HandlerError::Transient(error),
            Failure::Unexpected(error) => HandlerError::Unexpected(error),
            other @ (Failure::Invalid(_)
            | Failure::NotFound(_)
            | Failure::Conflict(_)
            | Failure::Denied(_)
            | Failure::Permanent(_)) => HandlerError::Permanent(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_maps_onto_one_code_and_one_consumer_outcome() {
        let invalid = Failure::Invalid(vec![Violation::new("lfn", "relative")]);
        assert_eq!(
            tonic::Status::from(invalid).code(),
            tonic::Code::InvalidArgument
        );
        let lost = Failure::from(prodsys_messaging::Transient::wrap(anyhow::anyhow!("down")));
        assert!(matches!(lost, Failure::Transient(_)));
        assert_eq!(tonic::Status::from(lost).code(), tonic::Code::Unavailable);
        let lost = Failure::from(prodsys_messaging::Transient::wrap(anyhow::anyhow!("down")));
        assert!(matches!(
            HandlerError::from(lost),
            HandlerError::Transient(_)
        ));
        let bug = Failure::from(anyhow::anyhow!("a bug"));
        assert!(matches!(bug, Failure::Unexpected(_)));
        assert!(matches!(
            HandlerError::from(bug),
            HandlerError::Unexpected(_)
        ));
        assert!(matches!(
            HandlerError::from(Failure::Permanent("bad".into())),
            HandlerError::Permanent(reason) if reason == "bad"
        ));
        assert!(matches!(
            HandlerError::from(Failure::Invalid(vec![Violation::new("a", "b")])),
            HandlerError::Permanent(reason) if reason.contains("a: b")
        ));
        assert_eq!(
            tonic::Status::from(Failure::NotFound("none".into())).code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            tonic::Status::from(Failure::Conflict("used".into())).code(),
            tonic::Code::AlreadyExists
        );
        assert!(matches!(
            HandlerError::from(Failure::Conflict("used".into())),
            HandlerError::Permanent(reason) if reason == "used"
        ));
        assert_eq!(
            tonic::Status::from(Failure::Permanent("bad".into())).code(),
            tonic::Code::InvalidArgument
        );
    }
}
