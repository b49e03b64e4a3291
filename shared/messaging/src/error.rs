//! Whether a failure is worth waiting out. A handler's error is *transient*
//! when the same work may well succeed later unchanged: a dependency down or
//! timing out, a database connection lost or failing over, a serialization
//! conflict. The consumer holds such a batch (unacknowledged, retried in
//! process with backoff) instead of spending the queue's delivery limit on it.
//! Everything else is either permanent (the handler says so with
//! [`crate::Outcome::DeadLetter`]) or unexpected (requeued under the
//! delivery limit, so a true poison message still ends in the dead-letter queue).

use std::error::Error as StdError;

use prodsys_db::{deadpool_postgres, tokio_postgres};

/// Marks an error as transient: `Err(Transient::wrap(error))` keeps `error`
/// (and its causes) under a "transient" context.
#[derive(Debug, Clone, thiserror::Error)]
#[error("transient: {0}")]
pub struct Transient(pub String);

impl Transient {
    /// `error`, marked transient.
    pub fn wrap(error: impl Into<anyhow::Error>) -> anyhow::Error {
        error.into().context(Transient("may pass; retrying".into()))
    }
}

/// A failure at a service's consumer boundary, mapped once onto what
/// happens to the message: `Transient` holds the batch and retries it,
/// `Permanent` dead-letters the message (a batch failing so is split first to
/// find it), `Unexpected` requeues it under the delivery limit. A handler
/// returns it inside its `anyhow::Error`.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// A dependency is unreachable or timing out: hold and retry.
    #[error("transient: {0:#}")]
    Transient(anyhow::Error),
    /// The message can never succeed: dead-letter it with this reason.
    #[error("permanent: {0}")]
    Permanent(String),
    /// Anything else: requeue under the delivery limit.
    #[error(transparent)]
    Unexpected(anyhow::Error),
}

impl HandlerError {
    /// Classifies `error` (see [`is_transient`]).
    pub fn classify(error: anyhow::Error) -> Self {
        if is_transient(&error) {
            HandlerError::Transient(error)
        } else {
            HandlerError::Unexpected(error)
        }
    }
}

/// Whether `error`, or anything in its chain of causes, is a failure that
/// may pass by itself: a [`Transient`] marker or [`HandlerError::Transient`],
/// a gRPC status meaning "try again" (UNAVAILABLE, DEADLINE_EXCEEDED,
/// RESOURCE_EXHAUSTED, ABORTED, a client-side timeout, UNKNOWN caused by the
/// transport), a tonic transport error, a lost or refused PostgreSQL
/// connection (SQLSTATE class 08, 57P01–57P03, 53300), a serialization
/// failure or deadlock (40001, 40P01), a pool that timed out or could not
/// connect, an I/O error of the connection kind, or an elapsed timeout.
pub fn is_transient(error: &anyhow::Error) -> bool {
    // Finds a context anywhere in the chain too, which `chain()` does not show by type.
    if error.downcast_ref::<Transient>().is_some() {
        return true;
    }
    if matches!(
        error.downcast_ref::<HandlerError>(),
        Some(HandlerError::Transient(_))
    ) {
        return true;
    }
    error.chain().any(cause_is_transient)
}

/// The same test for a plain error and its sources.
pub fn error_is_transient(error: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(cause) = next {
        if cause_is_transient(cause) {
            return true;
        }
        next = cause.source();
    }
    false
}

fn cause_is_transient(cause: &(dyn StdError + 'static)) -> bool {
    if cause.is::<Transient>() || cause.is::<tokio::time::error::Elapsed>() {
        return true;
    }
    if let Some(HandlerError::Transient(_)) = cause.downcast_ref::<HandlerError>() {
        return true;
    }
    if let Some(status) = cause.downcast_ref::<tonic::Status>() {
        return status_is_transient(status);
    }
    if cause.is::<tonic::transport::Error>() {
        return true;
    }
    if let Some(error) = cause.downcast_ref::<tokio_postgres::Error>() {
        return postgres_is_transient(error);
    }
    if let Some(error) = cause.downcast_ref::<deadpool_postgres::PoolError>() {
        return match error {
            deadpool_postgres::PoolError::Timeout(_) => true,
            deadpool_postgres::PoolError::Backend(e) => {
                postgres_is_transient(e) || e.code().is_none()
            }
            _ => false,
        };
    }
    if let Some(io) = cause.downcast_ref::<std::io::Error>() {
        use std::io::ErrorKind::*;
        return matches!(
            io.kind(),
            ConnectionRefused
                | ConnectionReset
                | ConnectionAborted
                | NotConnected
                | BrokenPipe
                | TimedOut
                | UnexpectedEof
                | AddrNotAvailable
                | HostUnreachable
                | NetworkUnreachable
                | NetworkDown
        );
    }
    false
}

/// Whether a gRPC answer means "the same call may succeed later".
pub fn status_is_transient(status: &tonic::Status) -> bool {
    use tonic::Code;
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted => {
            true
        }
        // A client-side timeout (the channel's request timeout) is CANCELLED.
        Code::Cancelled => true,
        Code::Unknown => status.source().is_some_and(|source| {
            source.is::<tonic::transport::Error>() || error_is_transient(source)
        }),
        _ => false,
    }
}

fn postgres_is_transient(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    match error.code() {
        Some(code) => {
            let code = code.code();
            code.starts_with("08")
                || matches!(
                    code,
                    "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01"
                )
        }
        // No SQLSTATE: the connection itself failed (I/O, TLS, timeout).
        None => error
            .source()
            .is_some_and(|s| s.is::<std::io::Error>() || s.is::<tokio::time::error::Elapsed>()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn grpc_statuses_are_classified_through_context() {
        let down: anyhow::Error =
            anyhow::Error::new(tonic::Status::unavailable("tcp connect error"))
                .context("asking the catalog");
        assert!(is_transient(&down));
        let timeout = anyhow::Error::new(tonic::Status::cancelled("Timeout expired"));
        assert!(is_transient(&timeout));
        let bug = anyhow::Error::new(tonic::Status::invalid_argument("bad")).context("asking");
        assert!(!is_transient(&bug));
        let internal = anyhow::Error::new(tonic::Status::internal("boom"));
        assert!(!is_transient(&internal));
    }

    #[test]
    fn markers_and_io_errors_are_transient() {
        let marked = Transient::wrap(anyhow::anyhow!("catalog down")).context("deciding");
        assert!(is_transient(&marked));
        let refused: anyhow::Result<()> =
            Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)).context("connecting");
        assert!(is_transient(&refused.unwrap_err()));
        assert!(!is_transient(&anyhow::anyhow!("a plain bug")));
        assert!(is_transient(&anyhow::Error::new(HandlerError::Transient(
            anyhow::anyhow!("x")
        ))));
        assert!(!is_transient(&anyhow::Error::new(HandlerError::Permanent(
            "undecodable".into()
        ))));
    }
}
