//! The checker's one error type, mapped once onto gRPC codes and onto what
//! the consumer does with a message. A request that breaks its profile is
//! not an error: it gets a verdict (rejected, with its violations).

use prodsys_messaging::HandlerError;
use prodsys_server::ServiceError;

#[derive(Debug, thiserror::Error)]
pub enum CheckerError {
    /// Undecodable or against the contract: can never succeed.
    #[error("{0}")]
    Permanent(String),
    /// A dependency (PostgreSQL, the catalog) unreachable or timing out: may pass.
    #[error("transient: {0:#}")]
    Transient(anyhow::Error),
    /// Anything else.
    #[error(transparent)]
    Unexpected(anyhow::Error),
}

pub type Result<T, E = CheckerError> = std::result::Result<T, E>;

impl From<anyhow::Error> for CheckerError {
    /// Transient when the classifier of `prodsys-messaging` says the failure may pass.
    fn from(error: anyhow::Error) -> Self {
        match HandlerError::classify(error) {
            HandlerError::Transient(error) => Self::Transient(error),
            HandlerError::Permanent(reason) => Self::Permanent(reason),
            HandlerError::Unexpected(error) => Self::Unexpected(error),
        }
    }
}

impl From<prodsys_db::tokio_postgres::Error> for CheckerError {
    fn from(error: prodsys_db::tokio_postgres::Error) -> Self {
        anyhow::Error::from(error).into()
    }
}

impl From<CheckerError> for tonic::Status {
    fn from(error: CheckerError) -> Self {
        let error = match error {
            CheckerError::Permanent(reason) => return tonic::Status::invalid_argument(reason),
            // UNAVAILABLE, as the shared mapping answers every transient failure.
            CheckerError::Transient(error) => {
                ServiceError::Unexpected(prodsys_messaging::Transient::wrap(error))
            }
            CheckerError::Unexpected(error) => ServiceError::Unexpected(error),
        };
        error.into()
    }
}

impl From<CheckerError> for HandlerError {
    fn from(error: CheckerError) -> Self {
        match error {
            CheckerError::Transient(error) => HandlerError::Transient(error),
            CheckerError::Unexpected(error) => HandlerError::Unexpected(error),
            CheckerError::Permanent(reason) => HandlerError::Permanent(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_maps_onto_one_code_and_one_consumer_outcome() {
        // The catalog down, as the catalog client reports it.
        let down = anyhow::Error::new(tonic::Status::unavailable("tcp connect error"))
            .context("asking the catalog for existing outputs");
        let lost = CheckerError::from(down);
        assert!(matches!(lost, CheckerError::Transient(_)));
        assert_eq!(tonic::Status::from(lost).code(), tonic::Code::Unavailable);
        let lost = CheckerError::from(prodsys_messaging::Transient::wrap(anyhow::anyhow!("down")));
        assert!(matches!(
            HandlerError::from(lost),
            HandlerError::Transient(_)
        ));
        let bug = CheckerError::from(anyhow::anyhow!("a bug"));
        assert!(matches!(bug, CheckerError::Unexpected(_)));
        assert!(matches!(
            HandlerError::from(bug),
            HandlerError::Unexpected(_)
        ));
        assert_eq!(
            tonic::Status::from(CheckerError::from(anyhow::anyhow!("a bug"))).code(),
            tonic::Code::Internal
        );
        assert!(matches!(
            HandlerError::from(CheckerError::Permanent("bad".into())),
            HandlerError::Permanent(reason) if reason == "bad"
        ));
        assert_eq!(
            tonic::Status::from(CheckerError::Permanent("bad".into())).code(),
            tonic::Code::InvalidArgument
        );
    }
}
