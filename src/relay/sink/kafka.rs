//! Kafka sink: an idempotent rdkafka producer, key = aggregate id, many sends in flight (network I/O).

use std::time::Duration;

use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::{BuildError, Sink, SinkError};
use crate::api::outbox_relay::KafkaSink as KafkaSinkSpec;
use crate::relay::config::check_kafka_topic;
use crate::relay::envelope::Message;

/// Publishes to Kafka.
pub struct KafkaSink {
    producer: FutureProducer,
}

impl KafkaSink {
    /// Creates the producer. It connects lazily, so an unreachable broker is not an error here.
    pub fn new(spec: &KafkaSinkSpec) -> Result<Self, BuildError> {
        let mut cfg = ClientConfig::new();
        // Defaults tuned for throughput that the user may change.
        cfg.set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("queue.buffering.max.messages", "200000")
            .set("batch.num.messages", "10000")
            // No delivery timeout: librdkafka keeps retrying through a broker outage, in order,
            // instead of failing messages and leaving the relay to re-send them out of order.
            .set("message.timeout.ms", "0")
            .set("socket.keepalive.enable", "true");
        for (k, v) in &spec.properties {
            cfg.set(k, v);
        }
        // What ordering and no-loss rest on; validation refuses these keys in `properties`.
        cfg.set("bootstrap.servers", &spec.bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5");
        let producer: FutureProducer =
            cfg.create().map_err(|e| BuildError::Kafka(e.to_string()))?;
        Ok(Self { producer })
    }
}

/// Errors that no retry can fix.
fn classify(e: &KafkaError) -> SinkError {
    let code = match e {
        KafkaError::MessageProduction(code) => Some(*code),
        _ => e.rdkafka_error_code(),
    };
    match code {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::MessageBatchTooLarge,
        ) => SinkError::Rejected(e.to_string()),
        _ => SinkError::Transient(e.to_string()),
    }
}

#[async_trait]
impl Sink for KafkaSink {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn ce_prefix(&self) -> &'static str {
        "ce_"
    }

    fn check_destination(&self, destination: &str) -> Result<(), String> {
        check_kafka_topic(destination)
    }

    async fn publish(&self, messages: &[Message]) -> Vec<Result<(), SinkError>> {
        let mut pending = Vec::with_capacity(messages.len());
        for m in messages {
            let mut headers = OwnedHeaders::new_with_capacity(m.headers.len());
            for (k, v) in &m.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
            let mut record = FutureRecord::to(&m.destination)
                .key(m.key.as_bytes())
                .headers(headers);
            if let Some(body) = &m.body {
                record = record.payload(body.as_slice());
            }
            // Enqueue; a full local queue drains as acks arrive, so wait and try again.
            let outcome = loop {
                match self.producer.send_result(record) {
                    Ok(fut) => break Ok(fut),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((e, _)) => break Err(classify(&e)),
                }
            };
            pending.push(outcome);
        }
        let mut out = Vec::with_capacity(pending.len());
        for p in pending {
            out.push(match p {
                Ok(fut) => match fut.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(classify(&e)),
                    Err(_) => Err(SinkError::Transient("delivery report dropped".into())),
                },
                Err(e) => Err(e),
            });
        }
        out
    }

    async fn probe(&self) -> Result<(), SinkError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Duration::from_secs(3))
                .map(|_| ())
        })
        .await
        .map_err(|e| SinkError::Transient(e.to_string()))?
        .map_err(|e| SinkError::Transient(e.to_string()))
    }
}

impl Drop for KafkaSink {
    fn drop(&mut self) {
        // Everything the relay committed was acked already; this only bounds shutdown.
        let _ = self.producer.flush(Duration::from_secs(1));
    }
}
