//! Intake's one error type: the shared [`Failure`] (its `Conflict` is an
//! idempotency key used for a different request), mapped once onto gRPC codes
//! and onto what the consumer does with a message.

pub use prodsys_server::Failure;

pub type IntakeError = Failure;

pub type Result<T, E = IntakeError> = std::result::Result<T, E>;
