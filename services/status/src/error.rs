//! The status service's one error type, mapped once onto gRPC codes and onto what
//! the consumer does with a message.

use prodsys_core::Violation;
use prodsys_messaging::HandlerError;
use prodsys_server::ServiceError;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The call breaks the API's rules.
    #[error("invalid request: {}", summary(.0))]
    Invalid(Vec<Violation>),
    #[error("{0}")]
    NotFound(String),
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

pub type Result<T, E = StatusError> = std::result::Result<T, E>;

fn summary(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<anyhow::Error> for StatusError {
    /// Transient when the classifier of `prodsys-messaging` says the failure may pass.
    fn from(error: anyhow::Error) -> Self {
        match HandlerError::classify(error) {
            HandlerError::Transient(error) => Self::Transient(error),
            HandlerError::Permanent(reason) => Self::Permanent(reason),
            HandlerError::Unexpected(error) => Self::Unexpected(error),
        }
    }
}

impl From<prodsys_db::tokio_postgres::Error> for StatusError {
    fn from(error: prodsys_db::tokio_postgres::Error) -> Self {
        anyhow::Error::from(error).into()
    }
}

impl From<StatusError> for tonic::Status {
    fn from(error: StatusError) -> Self {
        let error = match error {
            StatusError::Invalid(violations) => ServiceError::Validation(violations),
            StatusError::NotFound(what) => ServiceError::NotFound(what),
            StatusError::Permanent(reason) => return tonic::Status::invalid_argument(reason),
            // UNAVAILABLE, as the shared mapping answers every transient failure.
            StatusError::Transient(error) => {
                ServiceError::Unexpected(prodsys_messaging::Transient::wrap(error))
            }
            StatusError::Unexpected(error) => ServiceError::Unexpected(error),
        };
        error.into()
    }
}

impl From<StatusError> for HandlerError {
    fn from(error: StatusError) -> Self {
        match error {
            StatusError::Transient(error) => HandlerError::Transient(error),
            StatusError::Unexpected(error) => HandlerError::Unexpected(error),
            other @ (StatusError::Invalid(_)
            | StatusError::NotFound(_)
            | StatusError::Permanent(_)) => HandlerError::Permanent(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_maps_onto_one_code_and_one_consumer_outcome() {
        let invalid = StatusError::Invalid(vec![Violation::new("production_id", "is required")]);
        assert_eq!(
            tonic::Status::from(invalid).code(),
            tonic::Code::InvalidArgument
        );
        let lost = StatusError::from(prodsys_messaging::Transient::wrap(anyhow::anyhow!("down")));
        assert!(matches!(lost, StatusError::Transient(_)));
        assert_eq!(tonic::Status::from(lost).code(), tonic::Code::Unavailable);
        let bug = StatusError::from(anyhow::anyhow!("a bug"));
        assert!(matches!(bug, StatusError::Unexpected(_)));
        assert!(matches!(
            HandlerError::from(bug),
            HandlerError::Unexpected(_)
        ));
        assert!(matches!(
            HandlerError::from(StatusError::Permanent("bad".into())),
            HandlerError::Permanent(reason) if reason == "bad"
        ));
        assert_eq!(
            tonic::Status::from(StatusError::NotFound("none".into())).code(),
            tonic::Code::NotFound
        );
    }
}
