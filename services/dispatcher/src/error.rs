//! The dispatcher's one error type: the shared [`Failure`], mapped once onto
//! what the consumer does with a message.

pub use prodsys_server::Failure;

pub type DispatcherError = Failure;

pub type Result<T, E = DispatcherError> = std::result::Result<T, E>;
