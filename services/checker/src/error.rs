//! The checker's one error type: the shared [`Failure`], mapped once onto
//! gRPC codes and onto what the consumer does with a message. A request that
//! breaks its profile is not an error: it gets a verdict (rejected, with its
//! violations).

pub use prodsys_server::Failure;

pub type CheckerError = Failure;

pub type Result<T, E = CheckerError> = std::result::Result<T, E>;
