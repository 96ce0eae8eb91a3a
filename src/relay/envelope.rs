//! Outbox events and the broker messages rendered from them, Raw or CloudEvents binary mode (pure, no I/O).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use crate::api::outbox_relay::EventFormat;

use super::config::Template;

/// One row of the outbox table.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxEvent {
    pub id: Uuid,
    pub aggregatetype: String,
    pub aggregateid: String,
    pub event_type: String,
    /// The `payload` jsonb as JSON text; `None` for SQL NULL (a Kafka tombstone).
    pub payload: Option<String>,
    /// The `headers` jsonb as JSON text, if any.
    pub headers: Option<String>,
    /// When the event was written (Poll: `created_at`; Logical: the commit time).
    pub created_at: Option<SystemTime>,
}

/// A message ready for a sink.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub event_id: Uuid,
    /// Topic or subject.
    pub destination: String,
    /// Partitioning key: the aggregate id.
    pub key: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

/// How messages are rendered: format, CloudEvents source, destination template and the header
/// naming of the sink's protocol binding.
#[derive(Clone, Debug)]
pub struct Renderer {
    pub format: EventFormat,
    pub source: String,
    pub template: Template,
    /// CloudEvents attribute header prefix: `ce_` for Kafka, `ce-` for NATS (the protocol bindings).
    pub ce_prefix: &'static str,
}

/// Header names the relay sets; user headers with these names are dropped, so a payload can
/// never spoof the event id.
fn is_reserved(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    matches!(
        lower.as_str(),
        "id" | "type" | "aggregatetype" | "content-type" | "nats-msg-id"
    ) || lower.starts_with("ce_")
        || lower.starts_with("ce-")
        || lower.starts_with("nats-")
}

impl Renderer {
    /// Renders one event into a message.
    pub fn render(&self, ev: &OutboxEvent) -> Message {
        let mut headers = Vec::with_capacity(8);
        let id = ev.id.to_string();
        match self.format {
            EventFormat::Raw => {
                headers.push(("id".to_owned(), id));
                headers.push(("type".to_owned(), ev.event_type.clone()));
                headers.push(("aggregatetype".to_owned(), ev.aggregatetype.clone()));
            }
            EventFormat::CloudEvents => {
                let p = self.ce_prefix;
                headers.push((format!("{p}specversion"), "1.0".to_owned()));
                headers.push((format!("{p}id"), id));
                headers.push((format!("{p}type"), ev.event_type.clone()));
                headers.push((format!("{p}source"), self.source.clone()));
                headers.push((format!("{p}subject"), ev.aggregateid.clone()));
                if let Some(t) = ev.created_at {
                    headers.push((format!("{p}time"), rfc3339(t)));
                }
                headers.push(("content-type".to_owned(), "application/json".to_owned()));
            }
        }
        if let Some(h) = &ev.headers {
            headers.extend(user_headers(h));
        }
        Message {
            event_id: ev.id,
            destination: self.template.render(&ev.aggregatetype, &ev.event_type),
            key: ev.aggregateid.clone(),
            headers,
            body: ev.payload.as_ref().map(|p| p.as_bytes().to_vec()),
        }
    }
}

/// The entries of the `headers` jsonb object: strings as they are, other values as JSON text.
/// Anything that is not an object contributes nothing; reserved names are skipped.
pub fn user_headers(json: &str) -> Vec<(String, String)> {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    map.into_iter()
        .filter(|(k, _)| !k.is_empty() && !is_reserved(k))
        .filter_map(|(k, v)| match v {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some((k, s)),
            other => Some((k, other.to_string())),
        })
        .collect()
}

/// RFC 3339 UTC timestamp with microseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    match jiff::Timestamp::from_microsecond(d.as_micros() as i64) {
        Ok(ts) => format!("{ts:.6}"),
        Err(_) => "1970-01-01T00:00:00Z".to_owned(),
    }
}

/// Converts PostgreSQL's epoch (2000-01-01) microseconds to a `SystemTime`.
pub fn pg_micros_to_system_time(micros: i64) -> SystemTime {
    const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;
    let base = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
    if micros >= 0 {
        base + Duration::from_micros(micros as u64)
    } else {
        base - Duration::from_micros(micros.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::config::kafka_topic_char;

    fn event() -> OutboxEvent {
        OutboxEvent {
            id: Uuid::parse_str("8d6f1b5e-3c1a-4f3e-9d51-4f0e7a5b2c11").unwrap(),
            aggregatetype: "order".into(),
            aggregateid: "42".into(),
            event_type: "created".into(),
            payload: Some(r#"{"total": 10}"#.into()),
            headers: Some(
                r#"{"traceparent":"00-abc","n":1,"id":"spoof","ce_id":"spoof","z":null}"#.into(),
            ),
            created_at: Some(UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456)),
        }
    }

    fn renderer(format: EventFormat) -> Renderer {
        Renderer {
            format,
            source: "/servicedb/shop/orders".into(),
            template: Template::parse("t", "outbox.event.{aggregatetype}", kafka_topic_char)
                .unwrap(),
            ce_prefix: "ce_",
        }
    }

    fn header<'a>(m: &'a Message, name: &str) -> Option<&'a str> {
        m.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn raw_format_matches_debeziums_outbox_router() {
        let m = renderer(EventFormat::Raw).render(&event());
        assert_eq!(m.destination, "outbox.event.order");
        assert_eq!(m.key, "42");
        assert_eq!(m.body.as_deref(), Some(br#"{"total": 10}"#.as_slice()));
        assert_eq!(
            header(&m, "id"),
            Some("8d6f1b5e-3c1a-4f3e-9d51-4f0e7a5b2c11")
        );
        assert_eq!(header(&m, "type"), Some("created"));
        assert_eq!(header(&m, "aggregatetype"), Some("order"));
        assert_eq!(header(&m, "traceparent"), Some("00-abc"));
        assert_eq!(header(&m, "n"), Some("1"));
        assert_eq!(
            m.headers.iter().filter(|(k, _)| k == "id").count(),
            1,
            "user header cannot spoof id"
        );
        assert!(header(&m, "z").is_none());
    }

    #[test]
    fn cloudevents_binary_mode_carries_attributes_as_headers() {
        let m = renderer(EventFormat::CloudEvents).render(&event());
        assert_eq!(header(&m, "ce_specversion"), Some("1.0"));
        assert_eq!(
            header(&m, "ce_id"),
            Some("8d6f1b5e-3c1a-4f3e-9d51-4f0e7a5b2c11")
        );
        assert_eq!(header(&m, "ce_type"), Some("created"));
        assert_eq!(header(&m, "ce_source"), Some("/servicedb/shop/orders"));
        assert_eq!(header(&m, "ce_subject"), Some("42"));
        assert_eq!(header(&m, "ce_time"), Some("2023-11-14T22:13:20.123456Z"));
        assert_eq!(header(&m, "content-type"), Some("application/json"));
        assert_eq!(m.headers.iter().filter(|(k, _)| k == "ce_id").count(), 1);
        assert!(header(&m, "id").is_none());
    }

    #[test]
    fn null_payload_becomes_a_tombstone() {
        let mut e = event();
        e.payload = None;
        e.headers = Some("[1,2]".into());
        let m = renderer(EventFormat::Raw).render(&e);
        assert!(m.body.is_none());
        assert_eq!(m.headers.len(), 3, "non-object headers contribute nothing");
    }

    #[test]
    fn postgres_epoch_converts_to_unix_time() {
        let t = pg_micros_to_system_time(0);
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap().as_secs(), 946_684_800);
    }
}
