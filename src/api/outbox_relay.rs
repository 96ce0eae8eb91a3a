//! The `OutboxRelay` custom resource: "publish service X's outbox to Kafka or NATS" (types only, no I/O).
//!
//! The relay's own configuration file (`servicedb relay --config FILE`) reuses [`Sink`],
//! [`RelayMode`] and [`EventFormat`], so the CR and the file can never disagree on a field.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Publishes the committed events of a ServiceDatabase's outbox to Kafka or NATS JetStream:
/// at least once, in order per aggregate, with exactly one active publisher.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "servicedb.io",
    version = "v1alpha1",
    kind = "OutboxRelay",
    namespaced,
    status = "OutboxRelayStatus",
    shortname = "obr",
    category = "servicedb",
    doc = "OutboxRelay: moves committed outbox events of a ServiceDatabase to Kafka or NATS JetStream, at least once and in order per aggregate.",
    printcolumn(name = "Database", type_ = "string", json_path = ".spec.databaseRef.name"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Sink", type_ = "string", json_path = ".status.sink"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 47").message("metadata.name must be at most 47 characters: child objects append suffixes and the slot name derives from it"),
)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRelaySpec {
    /// The ServiceDatabase in this namespace whose outbox is published. It must have the outbox
    /// enabled.
    #[x_kube(validation = Rule::new("self == oldSelf").message("databaseRef is immutable: create a new OutboxRelay for another database"))]
    pub database_ref: LocalObjectRef,

    /// How committed events are read. `Poll` works on any Postgres; `Logical` streams from a
    /// replication slot for the lowest latency and needs `wal_level=logical`.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("mode is immutable: a Logical relay owns a replication slot; create a new OutboxRelay to switch"))]
    pub mode: RelayMode,

    /// Maximum number of events published and acknowledged per batch (1 to 10000).
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 10000))]
    pub batch_size: i32,

    /// Poll mode: how long to wait between polls of an empty outbox, in milliseconds. A
    /// LISTEN/NOTIFY wake-up shortens it when the database allows; this is the backstop.
    #[serde(default = "default_poll_interval_ms")]
    #[schemars(range(min = 10, max = 60000))]
    pub poll_interval_ms: i32,

    /// Where events go: exactly one of `kafka` or `nats`.
    pub sink: Sink,

    /// The message format.
    #[serde(default)]
    pub format: EventFormat,

    /// Number of relay pods. Extra pods are hot standbys: exactly one publishes at a time.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 5))]
    pub replicas: i32,

    /// CPU and memory of the relay container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// A reference to an object in the same namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalObjectRef {
    /// Name of the object.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
        length(min = 1, max = 63)
    )]
    pub name: String,
}

/// How the relay reads the outbox.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RelayMode {
    /// Claim a batch by deleting it (`DELETE … RETURNING`, in order) in a transaction, publish
    /// it, then commit; a crash before the commit rolls the delete back, so nothing is lost.
    /// An advisory lock makes one replica the only claimant; the others stand by.
    #[default]
    Poll,
    /// Stream inserts from a pgoutput replication slot.
    Logical,
}

/// The message format on the broker.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EventFormat {
    /// The value is the payload, as Debezium's outbox event router emits it; id, type and
    /// aggregatetype travel as headers.
    #[default]
    Raw,
    /// CloudEvents in binary mode: the payload is the body, `ce_*` attributes are headers.
    CloudEvents,
}

/// Exactly one of `kafka` or `nats`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.kafka) != has(self.nats)").message("sink must set exactly one of kafka or nats"))]
pub struct Sink {
    /// Publish to Kafka with an idempotent producer; the key is the aggregate id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSink>,
    /// Publish to NATS JetStream; `Nats-Msg-Id` is the event id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsSink>,
}

/// A Kafka sink.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSink {
    /// Comma-separated `host:port` list of brokers.
    #[schemars(
        regex(pattern = r"^[A-Za-z0-9.\-]+:[0-9]{1,5}(,[A-Za-z0-9.\-]+:[0-9]{1,5})*$"),
        length(max = 1024)
    )]
    pub bootstrap_servers: String,

    /// Topic template; `{aggregatetype}` and `{type}` expand per event. The default,
    /// `outbox.event.{aggregatetype}`, is Debezium's outbox routing.
    #[serde(default = "default_kafka_topic")]
    #[schemars(
        regex(pattern = r"^([A-Za-z0-9._-]|\{aggregatetype\}|\{type\})+$"),
        length(max = 249)
    )]
    pub topic: String,

    /// Extra librdkafka producer settings (compression, batching, timeouts, ...). TLS and SASL
    /// are not available yet: the relay is built without them. Settings that the relay's
    /// guarantees rest on (idempotence, acks, ordering) cannot be overridden.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new("self.all(k, !(k in ['enable.idempotence', 'acks', 'max.in.flight.requests.per.connection', 'bootstrap.servers', 'retries', 'enable.gapless.guarantee']))").message("properties may not override enable.idempotence, acks, max.in.flight.requests.per.connection, bootstrap.servers, retries or enable.gapless.guarantee"))]
    #[schemars(extend("maxProperties" = 64))]
    pub properties: std::collections::BTreeMap<String, String>,
}

/// A NATS JetStream sink.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NatsSink {
    /// Server URL (`nats://nats.nats:4222`).
    #[schemars(regex(pattern = r"^(nats|tls)://[^\s]+$"), length(max = 512))]
    pub url: String,

    /// Subject template; `{aggregatetype}` and `{type}` expand per event.
    #[serde(default = "default_nats_subject")]
    #[schemars(
        regex(pattern = r"^([A-Za-z0-9_-]|\.|\{aggregatetype\}|\{type\})+$"),
        length(max = 255)
    )]
    pub subject: String,

    /// JetStream stream that captures the subjects. When set and missing, the relay creates it
    /// with the subject template's wildcard form; when omitted, a stream must already exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,64}$"))]
    pub stream: Option<String>,
}

/// Observed state of an OutboxRelay.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRelayStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The sink kind and target (`kafka`, `nats`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<String>,

    /// Relay pods that are ready (one publishes, the rest stand by).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,

    /// Logical mode: the replication slot this relay owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,

    /// Conditions: Ready, DatabaseReady, Available.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// The default of `batchSize`, here and in the relay's config file. A `u16` so that it converts
/// losslessly into the CRD's `i32` and the config file's `u32`.
pub const DEFAULT_BATCH_SIZE: u16 = 500;

/// The default of `pollIntervalMs`, here and in the relay's config file (`u16`: see above).
pub const DEFAULT_POLL_INTERVAL_MS: u16 = 250;

fn default_batch_size() -> i32 {
    DEFAULT_BATCH_SIZE.into()
}

fn default_poll_interval_ms() -> i32 {
    DEFAULT_POLL_INTERVAL_MS.into()
}

fn default_replicas() -> i32 {
    1
}

/// Debezium's default outbox routing.
pub fn default_kafka_topic() -> String {
    "outbox.event.{aggregatetype}".to_owned()
}

/// The default NATS subject template.
pub fn default_nats_subject() -> String {
    "outbox.{aggregatetype}.{type}".to_owned()
}

impl Sink {
    /// A short name of the sink kind, for status and metrics labels.
    pub fn kind(&self) -> &'static str {
        match (&self.kafka, &self.nats) {
            (Some(_), _) => "kafka",
            (None, Some(_)) => "nats",
            (None, None) => "none",
        }
    }
}
