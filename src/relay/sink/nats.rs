//! NATS JetStream sink: `Nats-Msg-Id` = event id, publishes pipelined then acks awaited (network I/O).

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_trait::async_trait;
use tokio::sync::OnceCell;

use super::{BuildError, Sink, SinkError};
use crate::api::outbox_relay::NatsSink as NatsSinkSpec;
use crate::relay::config::{Template, check_nats_subject};
use crate::relay::envelope::Message;

/// Publishes to NATS JetStream.
pub struct NatsSink {
    client: async_nats::Client,
    js: jetstream::Context,
    /// `(stream name, subjects)` to create when missing.
    stream: Option<(String, String)>,
    stream_ready: OnceCell<()>,
}

impl NatsSink {
    /// Connects (retrying in the background if the server is not up yet).
    pub async fn connect(spec: &NatsSinkSpec, template: &Template) -> Result<Self, BuildError> {
        let client = async_nats::ConnectOptions::new()
            .name("servicedb-relay")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .client_capacity(65_536)
            .connect(spec.url.as_str())
            .await
            .map_err(|e| BuildError::Nats(e.to_string()))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(10))
            // A batch is at most 10,000 messages; more pending acks than this means acks were
            // lost, which should fail the attempt rather than wait for a permit forever.
            .max_ack_inflight(20_000)
            .backpressure_on_inflight(false)
            .build(client.clone());
        Ok(Self {
            client,
            js,
            stream: spec.stream.clone().map(|s| (s, template.nats_wildcard())),
            stream_ready: OnceCell::new(),
        })
    }

    async fn ensure_stream(&self) -> Result<(), SinkError> {
        let Some((name, subject)) = &self.stream else {
            return Ok(());
        };
        self.stream_ready
            .get_or_try_init(|| async {
                self.js
                    .get_or_create_stream(stream::Config {
                        name: name.clone(),
                        subjects: vec![subject.clone()],
                        duplicate_window: Duration::from_secs(120),
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
                    .map_err(|e| SinkError::Transient(format!("ensuring stream {name}: {e}")))
            })
            .await
            .map(|_| ())
    }
}

fn header_ok(name: &str, value: &str) -> bool {
    !name.is_empty()
        && name.chars().all(|c| c.is_ascii_graphic() && c != ':')
        && !value.contains(['\r', '\n'])
}

fn classify(e: &jetstream::context::PublishError) -> SinkError {
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded => SinkError::Rejected(e.to_string()),
        PublishErrorKind::Other if e.to_string().contains("exceeds maximum") => {
            SinkError::Rejected(e.to_string())
        }
        _ => SinkError::Transient(e.to_string()),
    }
}

#[async_trait]
impl Sink for NatsSink {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn ce_prefix(&self) -> &'static str {
        "ce-"
    }

    fn check_destination(&self, destination: &str) -> Result<(), String> {
        check_nats_subject(destination)
    }

    async fn publish(&self, messages: &[Message]) -> Vec<Result<(), SinkError>> {
        // Bound the whole attempt: across a disconnect an ack can be lost without its future
        // ever resolving. Re-sending is safe: JetStream drops copies by Nats-Msg-Id.
        let limit = ATTEMPT_TIMEOUT + Duration::from_millis(messages.len() as u64);
        match tokio::time::timeout(limit, self.publish_inner(messages)).await {
            Ok(outcomes) => outcomes,
            Err(_) => {
                let e = SinkError::Transient(format!("no acknowledgement within {limit:?}"));
                messages.iter().map(|_| Err(e.clone())).collect()
            }
        }
    }

    async fn probe(&self) -> Result<(), SinkError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => {
                tokio::time::timeout(Duration::from_secs(3), self.client.flush())
                    .await
                    .map_err(|_| SinkError::Transient("flush timed out".into()))?
                    .map_err(|e| SinkError::Transient(e.to_string()))
            }
            other => Err(SinkError::Transient(format!("NATS connection is {other}"))),
        }
    }
}

/// Upper bound of one publish attempt (plus 1 ms per message).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);

impl NatsSink {
    async fn publish_inner(&self, messages: &[Message]) -> Vec<Result<(), SinkError>> {
        if let Err(e) = self.ensure_stream().await {
            return messages.iter().map(|_| Err(e.clone())).collect();
        }
        let mut pending = Vec::with_capacity(messages.len());
        for m in messages {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", m.event_id.to_string().as_str());
            let mut bad = None;
            for (k, v) in &m.headers {
                if header_ok(k, v) {
                    headers.append(k.as_str(), v.as_str());
                } else {
                    bad = Some(k.clone());
                }
            }
            if let Some(k) = bad {
                pending.push(Err(SinkError::Rejected(format!(
                    "header {k:?} is not valid in NATS"
                ))));
                continue;
            }
            let body = bytes::Bytes::from(m.body.clone().unwrap_or_default());
            let publish = jetstream::message::PublishMessage::build()
                .payload(body)
                .headers(headers);
            pending.push(
                self.js
                    .send_publish(m.destination.clone(), publish)
                    .await
                    .map_err(|e| classify(&e)),
            );
        }
        let mut out = Vec::with_capacity(pending.len());
        tracing::trace!(n = pending.len(), "all sent; awaiting acks");
        for p in pending {
            out.push(match p {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| classify(&e)),
                Err(e) => Err(e),
            });
        }
        out
    }
}
