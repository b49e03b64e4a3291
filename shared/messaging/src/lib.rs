//! RabbitMQ for prodsys, and the only crate that touches lapin.
//!
//! - [`Broker`] owns the connection in a supervisor that reconnects with
//!   backoff and redeclares the service's topology after every reconnect.
//! - [`Publisher`] publishes persistent, mandatory messages and waits for the
//!   broker's confirms with a timeout; a nack or an unroutable return is an error.
//! - [`run_consumer`] hands batches of deliveries to a [`BatchHandler`], which
//!   answers with an [`Outcome`] per delivery; dead-lettered messages go to the
//!   service's dead-letter queue with the reason in a header.
//! - [`relay`] moves committed outbox rows to the broker.

pub mod access;
pub mod backoff;
pub mod broker;
pub mod consumer;
pub mod envelope;
pub mod error;
pub mod publisher;
pub mod relay;
pub mod topology;

pub use backoff::Backoff;
pub use broker::Broker;
pub use consumer::{BatchHandler, Holding, Incoming, Outcome, run_consumer};
pub use envelope::CloudEvent;
pub use error::{HandlerError, Transient, is_transient};
pub use publisher::{Outgoing, Publisher};
pub use topology::{Names, Topology};

pub use lapin;
