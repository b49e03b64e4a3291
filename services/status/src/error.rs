//! The status service's one error type: the shared [`Failure`], mapped once
//! onto gRPC codes and onto what the consumer does with a message.

pub use prodsys_server::Failure;

pub type StatusError = Failure;

pub type Result<T, E = StatusError> = std::result::Result<T, E>;
