//! The relay's Prometheus metrics, registered in a `prometheus_client` registry (no I/O).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Why an event was not published on an attempt.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// `transient` (retried), `rejected` (the sink refused the event) or `dead_letter`.
    pub reason: String,
}

/// Relay metrics. Cloning shares the underlying values.
#[derive(Clone, Debug)]
pub struct RelayMetrics {
    /// Events acknowledged by the broker.
    pub published: Counter,
    /// Failed publish attempts, by reason.
    pub failed: Family<FailureLabels, Counter>,
    /// Events sent to the dead-letter destination.
    pub dead_lettered: Counter,
    /// Time from claiming a batch to its commit (Poll) or confirmation (Logical).
    pub batch_seconds: Histogram,
    /// Events in the outbox not yet published (upper bound from the sequence range).
    pub lag_rows: Gauge,
    /// Age of the oldest unpublished event.
    pub lag_seconds: Gauge<f64, AtomicU64>,
    /// Logical mode: WAL the slot retains (`pg_current_wal_lsn() - restart_lsn`).
    pub slot_retained_bytes: Gauge,
    /// 1 while this replica is the active publisher, 0 while it stands by.
    pub active: Gauge,
    /// 1 while the broker answers.
    pub broker_up: Gauge,
}

impl RelayMetrics {
    /// Creates the metrics and registers them under `servicedb_relay_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            published: Counter::default(),
            failed: Family::default(),
            dead_lettered: Counter::default(),
            batch_seconds: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            lag_rows: Gauge::default(),
            lag_seconds: Gauge::default(),
            slot_retained_bytes: Gauge::default(),
            active: Gauge::default(),
            broker_up: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("servicedb_relay");
        r.register(
            "published",
            "Events acknowledged by the broker",
            m.published.clone(),
        );
        r.register(
            "failed",
            "Failed publish attempts by reason",
            m.failed.clone(),
        );
        r.register(
            "dead_lettered",
            "Events sent to the dead-letter destination",
            m.dead_lettered.clone(),
        );
        r.register(
            "batch_duration_seconds",
            "Time from claiming a batch to committing or confirming it",
            m.batch_seconds.clone(),
        );
        r.register(
            "lag_rows",
            "Unpublished events in the outbox (upper bound)",
            m.lag_rows.clone(),
        );
        r.register(
            "lag_seconds",
            "Age of the oldest unpublished event",
            m.lag_seconds.clone(),
        );
        r.register(
            "slot_retained_bytes",
            "WAL retained by the replication slot (Logical mode)",
            m.slot_retained_bytes.clone(),
        );
        r.register(
            "active",
            "1 while this replica is the active publisher",
            m.active.clone(),
        );
        r.register(
            "broker_up",
            "1 while the broker answers",
            m.broker_up.clone(),
        );
        m
    }

    /// Counts a failure with a reason label.
    pub fn fail(&self, reason: &str, n: u64) {
        self.failed
            .get_or_create(&FailureLabels {
                reason: reason.to_owned(),
            })
            .inc_by(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_with_the_relay_prefix() {
        let mut reg = Registry::default();
        let m = RelayMetrics::register(&mut reg);
        m.published.inc_by(3);
        m.fail("transient", 2);
        m.lag_seconds.set(1.5);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(out.contains("servicedb_relay_published_total 3"), "{out}");
        assert!(
            out.contains("servicedb_relay_failed_total{reason=\"transient\"} 2"),
            "{out}"
        );
        assert!(out.contains("servicedb_relay_lag_seconds 1.5"), "{out}");
        assert!(
            out.contains("servicedb_relay_batch_duration_seconds_bucket"),
            "{out}"
        );
        assert!(out.contains("servicedb_relay_slot_retained_bytes"), "{out}");
    }
}
