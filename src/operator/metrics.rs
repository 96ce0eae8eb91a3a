//! The operator's Prometheus metrics: reconciles, their errors and duration, API writes and drift repairs (no I/O).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels naming the reconciled kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `ServiceDatabase` or `OutboxRelay`.
    pub kind: String,
}

/// Labels of a failed reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `ServiceDatabase` or `OutboxRelay`.
    pub kind: String,
    /// The error category (also the Event reason).
    pub category: String,
}

/// Labels of a write to the apiserver.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// Kind of the object written (`Secret`, `StatefulSet`, `ServiceDatabase/status`, ...).
    pub resource: String,
}

/// Labels of a request to a Kafka Connect REST API.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// `GET`, `PUT`, `POST` or `DELETE`.
    pub method: String,
}

/// Labels naming one object.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// Operator metrics. Cloning shares the underlying values.
#[derive(Clone, Debug)]
pub struct OperatorMetrics {
    /// Reconciles run, by kind.
    pub reconciles: Family<KindLabels, Counter>,
    /// Reconciles that failed, by kind and error category.
    pub errors: Family<ErrorLabels, Counter>,
    /// Reconcile duration, by kind.
    pub duration: Family<KindLabels, Histogram, fn() -> Histogram>,
    /// Objects and statuses written to the apiserver: stays flat while nothing changes.
    pub writes: Family<WriteLabels, Counter>,
    /// Children applied again because they had been changed by someone else (a hand edit), by
    /// kind of child.
    pub drift_repairs: Family<WriteLabels, Counter>,
    /// Deletions that gave up on cleanup outside the cluster after the cleanup timeout, by kind
    /// (the database or slot was left on the server; an Event names it).
    pub cleanups_abandoned: Family<KindLabels, Counter>,
    /// Replication slots of a ServiceDatabase's database that belong to no OutboxRelay any
    /// more and could not be dropped yet (retried on every reconcile), by ServiceDatabase.
    pub leaked_slots: Family<ObjectLabels, Gauge>,
    /// WAL (bytes) the CDC connector's replication slot retains, by ServiceDatabase.
    pub cdc_retained_wal: Family<ObjectLabels, Gauge>,
    /// Requests sent to Kafka Connect REST APIs, by method: a no-op resync sends GETs only.
    pub connect_requests: Family<MethodLabels, Counter>,
}

impl OperatorMetrics {
    /// Create the metrics and register them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        fn histogram() -> Histogram {
            Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ])
        }
        let metrics = OperatorMetrics {
            reconciles: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(histogram),
            writes: Family::default(),
            drift_repairs: Family::default(),
            cleanups_abandoned: Family::default(),
            leaked_slots: Family::default(),
            cdc_retained_wal: Family::default(),
            connect_requests: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("servicedb_operator");
        r.register("reconciles", "Reconciles run", metrics.reconciles.clone());
        r.register(
            "reconcile_errors",
            "Reconciles that failed",
            metrics.errors.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            metrics.duration.clone(),
        );
        r.register(
            "api_writes",
            "Objects and statuses written to the apiserver",
            metrics.writes.clone(),
        );
        r.register(
            "drift_repairs",
            "Children applied again because they no longer matched what was applied",
            metrics.drift_repairs.clone(),
        );
        r.register(
            "cleanups_abandoned",
            "Deletions that gave up on cleanup outside the cluster after the cleanup timeout",
            metrics.cleanups_abandoned.clone(),
        );
        r.register(
            "leaked_replication_slots",
            "Replication slots left by deleted OutboxRelays that could not be dropped yet",
            metrics.leaked_slots.clone(),
        );
        r.register(
            "cdc_slot_retained_wal_bytes",
            "WAL the CDC connector's replication slot retains",
            metrics.cdc_retained_wal.clone(),
        );
        r.register(
            "connect_requests",
            "Requests sent to Kafka Connect REST APIs",
            metrics.connect_requests.clone(),
        );
        metrics
    }

    /// Set the WAL the CDC slot of ServiceDatabase `namespace/name` retains; `None` removes the
    /// series (no cdc, or not known).
    pub fn set_cdc_retained_wal(&self, namespace: &str, name: &str, bytes: Option<i64>) {
        let labels = ObjectLabels {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        match bytes {
            Some(b) => {
                self.cdc_retained_wal.get_or_create(&labels).set(b);
            }
            None => {
                self.cdc_retained_wal.remove(&labels);
            }
        }
    }

    /// Count Kafka Connect requests a client made.
    pub fn connect_requests(&self, counts: &crate::cdc::RequestCounts) {
        for (method, n) in [
            ("GET", counts.get),
            ("PUT", counts.put),
            ("POST", counts.post),
            ("DELETE", counts.delete),
        ] {
            if n > 0 {
                self.connect_requests
                    .get_or_create(&MethodLabels {
                        method: method.to_owned(),
                    })
                    .inc_by(n);
            }
        }
    }

    /// Record a deletion of `kind` that gave up on its cleanup.
    pub fn abandoned_cleanup(&self, kind: &str) {
        self.cleanups_abandoned
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Set the number of leaked slots of ServiceDatabase `namespace/name`; a zero removes the
    /// series so the label set stays bounded by the objects that have a problem.
    pub fn set_leaked_slots(&self, namespace: &str, name: &str, count: usize) {
        let labels = ObjectLabels {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        if count == 0 {
            self.leaked_slots.remove(&labels);
        } else {
            self.leaked_slots
                .get_or_create(&labels)
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Record one reconcile of `kind` that took `seconds` and failed with `error_category`, if any.
    pub fn observe(&self, kind: &str, seconds: f64, error_category: Option<&str>) {
        let labels = KindLabels {
            kind: kind.to_owned(),
        };
        self.reconciles.get_or_create(&labels).inc();
        self.duration.get_or_create(&labels).observe(seconds);
        if let Some(category) = error_category {
            self.errors
                .get_or_create(&ErrorLabels {
                    kind: kind.to_owned(),
                    category: category.to_owned(),
                })
                .inc();
        }
    }

    /// Record that a child of kind `resource` was applied again after a hand edit.
    pub fn repaired(&self, resource: &str) {
        self.drift_repairs
            .get_or_create(&WriteLabels {
                resource: resource.to_owned(),
            })
            .inc();
    }

    /// Record a write of `resource`.
    pub fn wrote(&self, resource: &str) {
        self.writes
            .get_or_create(&WriteLabels {
                resource: resource.to_owned(),
            })
            .inc();
    }
}
