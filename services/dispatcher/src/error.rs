//! The dispatcher's one error type, mapped once onto what the consumer does
//! with a message (the dispatcher answers no gRPC calls of its own beyond
//! health and reflection).

use prodsys_messaging::HandlerError;

#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    /// Undecodable, or against the contract (an unknown profile, no job
    /// plan): can never succeed.
    #[error("{0}")]
    Permanent(String),
    /// A dependency (PostgreSQL, a backend) unreachable or timing out: may pass.
    #[error("transient: {0:#}")]
    Transient(anyhow::Error),
    /// Anything else.
    #[error(transparent)]
    Unexpected(anyhow::Error),
}

pub type Result<T, E = DispatcherError> = std::result::Result<T, E>;

impl From<anyhow::Error> for DispatcherError {
    /// Transient when the classifier of `prodsys-messaging` says the failure may pass.
    fn from(error: anyhow::Error) -> Self {
        match HandlerError::classify(error) {
            HandlerError::Transient(error) => Self::Transient(error),
            HandlerError::Permanent(reason) => Self::Permanent(reason),
            HandlerError::Unexpected(error) => Self::Unexpected(error),
        }
    }
}

impl From<prodsys_db::tokio_postgres::Error> for DispatcherError {
    fn from(error: prodsys_db::tokio_postgres::Error) -> Self {
        anyhow::Error::from(error).into()
    }
}

impl From<prodsys_db::deadpool_postgres::PoolError> for DispatcherError {
    fn from(error: prodsys_db::deadpool_postgres::PoolError) -> Self {
        anyhow::Error::from(error).into()
    }
}

impl From<DispatcherError> for HandlerError {
    fn from(error: DispatcherError) -> Self {
        match error {
            DispatcherError::Transient(error) => HandlerError::Transient(error),
            DispatcherError::Permanent(reason) => HandlerError::Permanent(reason),
            DispatcherError::Unexpected(error) => HandlerError::Unexpected(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_maps_onto_one_consumer_outcome() {
        let lost =
            DispatcherError::from(prodsys_messaging::Transient::wrap(anyhow::anyhow!("down")));
        assert!(matches!(
            HandlerError::from(lost),
            HandlerError::Transient(_)
        ));
        let bug = DispatcherError::from(anyhow::anyhow!("a bug"));
        assert!(matches!(
            HandlerError::from(bug),
            HandlerError::Unexpected(_)
        ));
        assert!(matches!(
            HandlerError::from(DispatcherError::Permanent("bad".into())),
            HandlerError::Permanent(reason) if reason == "bad"
        ));
    }
}
