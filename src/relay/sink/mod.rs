//! The `Sink` trait every broker implements, and the factory that builds the configured one (the implementations do network I/O).
//!
//! Sources never see a broker: they hand events to [`crate::relay::publish::Publisher`], which
//! renders messages and drives a `Sink`. Adding a sink means one new module here and one arm in
//! [`build`]; no source changes.

pub mod kafka;
pub mod nats;

use std::sync::Arc;

use async_trait::async_trait;

use super::config::Validated;
use super::envelope::Message;

/// Why a message was not acknowledged.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SinkError {
    /// Worth retrying: broker unreachable, timeout, leader change.
    #[error("transient broker error: {0}")]
    Transient(String),
    /// The broker (or the sink's own checks) refuses this message; retrying cannot help.
    #[error("message rejected: {0}")]
    Rejected(String),
}

/// Errors building a sink.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("creating the Kafka producer: {0}")]
    Kafka(String),
    #[error("connecting to NATS: {0}")]
    Nats(String),
    #[error("the config has no sink")]
    NoSink,
}

/// A broker. `publish` sends every message with many in flight and resolves once each one is
/// acknowledged or failed; outcomes are in input order. Messages of one key must reach the
/// broker in input order when all succeed.
#[async_trait]
pub trait Sink: Send + Sync {
    /// `kafka`, `nats`, ... for logs and metrics.
    fn kind(&self) -> &'static str;
    /// The CloudEvents binary-mode header prefix of this protocol binding.
    fn ce_prefix(&self) -> &'static str;
    /// Checks an expanded destination (topic, subject); `Err(reason)` rejects the event.
    fn check_destination(&self, destination: &str) -> Result<(), String>;
    /// Publishes and waits for all acknowledgements.
    async fn publish(&self, messages: &[Message]) -> Vec<Result<(), SinkError>>;
    /// Whether the broker answers now (for `/readyz`).
    async fn probe(&self) -> Result<(), SinkError>;
}

/// Builds the configured sink.
pub async fn build(v: &Validated) -> Result<Arc<dyn Sink>, BuildError> {
    match (&v.config.sink.kafka, &v.config.sink.nats) {
        (Some(k), _) => Ok(Arc::new(kafka::KafkaSink::new(k)?)),
        (None, Some(n)) => Ok(Arc::new(nats::NatsSink::connect(n, &v.template).await?)),
        (None, None) => Err(BuildError::NoSink),
    }
}
