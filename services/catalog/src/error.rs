//! The catalog's one error type: the shared [`Failure`], mapped once onto
//! gRPC codes and onto what the consumer does with a message.

pub use prodsys_server::Failure;

pub type CatalogError = Failure;

pub type Result<T, E = CatalogError> = std::result::Result<T, E>;
