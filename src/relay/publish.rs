//! Turns a batch of outbox events into acknowledged broker messages: render, send, retry transient failures with backoff, dead-letter or refuse rejected ones (drives a `Sink`, no direct I/O).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::envelope::{Message, OutboxEvent, Renderer};
use super::sink::{Sink, SinkError};
use crate::metrics::RelayMetrics;

/// Why a batch was not fully published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The sink refused an event and there is no dead-letter destination (or it refused too).
    #[error(
        "event {event_id} was rejected by the sink: {reason}; fix or remove the row, or configure deadLetter"
    )]
    Rejected { event_id: Uuid, reason: String },
    /// Shutting down and the broker did not acknowledge within the drain time: nothing of this
    /// batch is committed, so it is published again by the next relay.
    #[error("shut down before the broker acknowledged the batch")]
    Aborted,
}

/// Exponential backoff with jitter, 100 ms doubling to 10 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: Duration::from_millis(100),
        }
    }
}

impl Backoff {
    /// The next delay (jittered by up to 25%).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(10));
        let jitter = rand::random_range(0..=d.as_millis() as u64 / 4);
        d + Duration::from_millis(jitter)
    }
    pub fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
}

/// Publishes batches through a sink.
pub struct Publisher {
    pub sink: Arc<dyn Sink>,
    pub renderer: Renderer,
    pub dead_letter: Option<String>,
    pub metrics: RelayMetrics,
    pub shutdown: CancellationToken,
    /// How long a batch may still take after shutdown was requested.
    pub drain: Duration,
}

impl Publisher {
    /// Resolves when every event is acknowledged (or dead-lettered). Transient failures are
    /// retried, only for the failed messages and in their original order, until they succeed.
    pub async fn publish(&self, events: &[OutboxEvent]) -> Result<(), PublishError> {
        let mut messages = Vec::with_capacity(events.len());
        let mut rejected: Vec<(Message, String)> = Vec::new();
        for ev in events {
            let m = self.renderer.render(ev);
            match self.sink.check_destination(&m.destination) {
                Ok(()) => messages.push(m),
                Err(reason) => rejected.push((m, reason)),
            }
        }
        let failed = self.send_until_done(messages, &mut rejected).await?;
        debug_assert!(failed.is_empty());
        if rejected.is_empty() {
            return Ok(());
        }
        self.metrics.fail("rejected", rejected.len() as u64);
        let Some(dead_letter) = &self.dead_letter else {
            let (m, reason) = rejected.swap_remove(0);
            return Err(PublishError::Rejected {
                event_id: m.event_id,
                reason,
            });
        };
        let mut dl = Vec::with_capacity(rejected.len());
        for (mut m, reason) in rejected {
            tracing::warn!(event_id = %m.event_id, %reason, dead_letter, "event rejected; sending it to the dead-letter destination");
            m.headers.push((
                "servicedb-original-destination".into(),
                m.destination.clone(),
            ));
            m.headers.push(("servicedb-error".into(), reason));
            m.destination = dead_letter.clone();
            dl.push(m);
        }
        let n = dl.len() as u64;
        let mut rejected_again = Vec::new();
        self.send_until_done(dl, &mut rejected_again).await?;
        if let Some((m, reason)) = rejected_again.into_iter().next() {
            return Err(PublishError::Rejected {
                event_id: m.event_id,
                reason: format!("the dead-letter destination refused it too: {reason}"),
            });
        }
        self.metrics.dead_lettered.inc_by(n);
        Ok(())
    }

    /// Sends `messages`, retrying transient failures; moves rejected ones to `rejected`.
    async fn send_until_done(
        &self,
        mut messages: Vec<Message>,
        rejected: &mut Vec<(Message, String)>,
    ) -> Result<Vec<Message>, PublishError> {
        let mut backoff = Backoff::default();
        while !messages.is_empty() {
            tracing::trace!(messages = messages.len(), "publish attempt");
            let outcomes = tokio::select! {
                o = self.sink.publish(&messages) => o,
                () = self.drain_expired() => return Err(PublishError::Aborted),
            };
            tracing::trace!("publish attempt done");
            let mut retry = Vec::new();
            let mut last_error = None;
            let mut ok = 0u64;
            for (m, outcome) in messages.into_iter().zip(outcomes) {
                match outcome {
                    Ok(()) => ok += 1,
                    Err(SinkError::Rejected(reason)) => rejected.push((m, reason)),
                    Err(SinkError::Transient(reason)) => {
                        last_error = Some(reason);
                        retry.push(m);
                    }
                }
            }
            self.metrics.published.inc_by(ok);
            if let Some(error) = last_error {
                self.metrics.fail("transient", retry.len() as u64);
                let delay = backoff.next_delay();
                tracing::warn!(
                    sink = self.sink.kind(),
                    failed = retry.len(),
                    %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "broker did not acknowledge every event; retrying the failed ones"
                );
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = self.drain_expired() => return Err(PublishError::Aborted),
                }
            }
            messages = retry;
        }
        Ok(messages)
    }

    async fn drain_expired(&self) {
        self.shutdown.cancelled().await;
        tokio::time::sleep(self.drain).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::outbox_relay::EventFormat;
    use crate::relay::config::{Template, kafka_topic_char};
    use async_trait::async_trait;
    use std::sync::Mutex;

    /// A sink that fails scripted attempts and records what it acknowledged.
    #[derive(Default)]
    struct ScriptedSink {
        attempts: Mutex<u32>,
        acked: Mutex<Vec<(String, String)>>,
        fail_first_attempt_for: Option<String>,
    }

    #[async_trait]
    impl Sink for ScriptedSink {
        fn kind(&self) -> &'static str {
            "scripted"
        }
        fn ce_prefix(&self) -> &'static str {
            "ce_"
        }
        fn check_destination(&self, d: &str) -> Result<(), String> {
            if d.contains("bad") {
                Err("bad topic".into())
            } else {
                Ok(())
            }
        }
        async fn publish(&self, messages: &[Message]) -> Vec<Result<(), SinkError>> {
            let attempt = {
                let mut a = self.attempts.lock().unwrap();
                *a += 1;
                *a
            };
            messages
                .iter()
                .map(|m| {
                    if attempt == 1
                        && self.fail_first_attempt_for.as_deref() == Some(m.key.as_str())
                    {
                        return Err(SinkError::Transient("timeout".into()));
                    }
                    if m.body.as_deref() == Some(b"\"too big\"".as_slice())
                        && m.destination != "dlq"
                    {
                        return Err(SinkError::Rejected("too large".into()));
                    }
                    self.acked
                        .lock()
                        .unwrap()
                        .push((m.destination.clone(), m.key.clone()));
                    Ok(())
                })
                .collect()
        }
        async fn probe(&self) -> Result<(), SinkError> {
            Ok(())
        }
    }

    fn ev(agg: &str, ty: &str, body: &str) -> OutboxEvent {
        OutboxEvent {
            id: Uuid::new_v4(),
            aggregatetype: ty.into(),
            aggregateid: agg.into(),
            event_type: "t".into(),
            payload: Some(body.into()),
            headers: None,
            created_at: None,
        }
    }

    fn publisher(sink: Arc<ScriptedSink>, dead_letter: Option<&str>) -> Publisher {
        Publisher {
            sink,
            renderer: Renderer {
                format: EventFormat::Raw,
                source: "/s".into(),
                template: Template::parse("t", "{aggregatetype}", kafka_topic_char).unwrap(),
                ce_prefix: "ce_",
            },
            dead_letter: dead_letter.map(str::to_owned),
            metrics: RelayMetrics::register(&mut Default::default()),
            shutdown: CancellationToken::new(),
            drain: Duration::from_secs(1),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_until_every_event_is_acked() {
        let sink = Arc::new(ScriptedSink {
            fail_first_attempt_for: Some("a".into()),
            ..Default::default()
        });
        let p = publisher(sink.clone(), None);
        p.publish(&[ev("a", "x", "1"), ev("b", "x", "2"), ev("a", "x", "3")])
            .await
            .unwrap();
        let acked = sink.acked.lock().unwrap().clone();
        let keys: Vec<_> = acked.iter().map(|(_, k)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["b", "a", "a"],
            "the failed ones are re-sent in their original order"
        );
        assert_eq!(p.metrics.published.get(), 3);
    }

    #[tokio::test]
    async fn a_rejected_event_stops_the_relay_naming_the_event_id() {
        let sink = Arc::new(ScriptedSink::default());
        let p = publisher(sink, None);
        let bad = ev("a", "x", "\"too big\"");
        let err = p
            .publish(&[ev("b", "x", "1"), bad.clone()])
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&bad.id.to_string()), "{err}");
    }

    #[tokio::test]
    async fn rejected_events_go_to_the_dead_letter_destination_when_configured() {
        let sink = Arc::new(ScriptedSink::default());
        let p = publisher(sink.clone(), Some("dlq"));
        p.publish(&[
            ev("b", "bad topic", "1"),
            ev("a", "x", "\"too big\""),
            ev("c", "x", "3"),
        ])
        .await
        .unwrap();
        let acked = sink.acked.lock().unwrap().clone();
        assert_eq!(acked.iter().filter(|(d, _)| d == "dlq").count(), 2);
        assert_eq!(p.metrics.dead_lettered.get(), 2);
    }

    #[test]
    fn backoff_grows_to_ten_seconds() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(125));
        for _ in 0..20 {
            b.next_delay();
        }
        assert!(b.next_delay() <= Duration::from_millis(12_500));
    }
}
