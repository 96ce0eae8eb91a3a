//! The `ServiceDatabase` custom resource: "service X owns a Postgres database" (types only, no I/O).
//!
//! Doc comments on fields are user documentation: they become `kubectl explain` text.
//! Admission rules (schema patterns and CEL) live next to the fields they guard, so the
//! apiserver — not the controller — rejects a bad spec.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::core::Rule;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Postgres database owned by exactly one microservice.
///
/// The operator provisions an isolated instance (`managed`) or an isolated database on an existing
/// server (`external`), least-privilege roles with generated passwords in Secrets, a NetworkPolicy,
/// the transactional outbox table, and optionally the role and publication a Debezium CDC
/// connector reads with.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "servicedb.io",
    version = "v1alpha1",
    kind = "ServiceDatabase",
    namespaced,
    status = "ServiceDatabaseStatus",
    shortname = "sdb",
    category = "servicedb",
    doc = "ServiceDatabase: a Postgres database owned by one microservice, with least-privilege credentials, network isolation, a transactional outbox and optional CDC.",
    printcolumn(name = "Service", type_ = "string", json_path = ".spec.owner.service"),
    printcolumn(name = "Instance", type_ = "string", json_path = ".status.instance"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint.host"),
    printcolumn(name = "CDC", type_ = "string", json_path = ".status.cdc.state"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 47").message("metadata.name must be at most 47 characters: child objects append suffixes such as '-superuser' and Service names must fit in 63"),
)]
#[x_kube(
    validation = reserved_database_name_rule(),
    validation = admin_database_rule(),
    validation = Rule::new("(has(self.database.name) ? self.database.name : self.owner.service.replace('-', '_')) == (has(oldSelf.database.name) ? oldSelf.database.name : oldSelf.owner.service.replace('-', '_'))").message("the database name is immutable: create a new ServiceDatabase to move data to another database"),
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceDatabaseSpec {
    /// The microservice that owns this database. Role names, Secret contents and the NetworkPolicy
    /// derive from it.
    pub owner: OwnerSpec,

    /// Where the database lives: exactly one of `managed` (an isolated Postgres run by the
    /// operator) or `external` (an isolated database and roles on a server you run). The kind
    /// cannot change after creation.
    pub instance: InstanceSpec,

    /// The database inside the instance.
    #[serde(default)]
    pub database: DatabaseSpec,

    /// The transactional outbox table. Omit it (or set `enabled: false`) for a database without
    /// an outbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox: Option<OutboxSpec>,

    /// Optional change data capture: a replication role with SELECT on the listed tables, its
    /// credentials Secret, a publication of those tables, and a Debezium Postgres connector the
    /// operator registers in Kafka Connect, watches (`CdcReady`) and removes with `cdc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdc: Option<CdcSpec>,

    /// What happens to the data when this ServiceDatabase is deleted. `Retain` (default) keeps
    /// the volume (managed) or the database and roles (external) and the `-app` Secret; `Delete`
    /// drops them. Data is never dropped unless this says `Delete`.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// The owning microservice.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OwnerSpec {
    /// Name of the owning microservice (a DNS-1035 label, at most 40 characters). Immutable.
    /// Role names derive from it (`orders-api` gives `orders_api`, `orders_api_relay`, ...).
    #[x_kube(validation = Rule::new("self == oldSelf").message("owner.service is immutable"))]
    #[schemars(
        regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"),
        length(min = 1, max = 40)
    )]
    pub service: String,

    /// Pods allowed to connect to a managed instance (port 5432). Defaults to pods labelled
    /// `app.kubernetes.io/name: <owner.service>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

/// Exactly one of `managed` or `external`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.managed) != has(self.external)").message("instance must set exactly one of managed or external"),
    validation = Rule::new("has(self.managed) == has(oldSelf.managed)").message("the instance kind (managed or external) is immutable"),
)]
pub struct InstanceSpec {
    /// An isolated single-instance Postgres run by the operator (StatefulSet, volume, Services,
    /// NetworkPolicy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedInstance>,

    /// An isolated database and roles on a Postgres server the operator does not run (RDS, Cloud
    /// SQL, a shared development server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalInstance>,
}

/// An isolated Postgres instance run by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ManagedInstance {
    /// Postgres major version (14 to 18). May go up, never down. There is no `pg_upgrade` step
    /// yet: raising it runs the new image on the old data directory, which Postgres refuses to
    /// start, so change it only on an instance whose data you can re-create.
    #[x_kube(validation = Rule::new("self >= oldSelf").message("the Postgres major version may not go down"))]
    #[schemars(range(min = 14, max = 18))]
    pub version: i32,

    /// Container image. Defaults to the official `postgres:<version>` image. The operator runs
    /// only images its `--allowed-images` allow (by default the official `postgres` image, any
    /// tag or digest); any other image leaves the instance unapplied with `Ready=False`,
    /// reason `ImageNotAllowed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// The data volume.
    pub storage: StorageSpec,

    /// CPU and memory requests and limits of the Postgres container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// `postgresql.conf` overrides, limited to an allow-list of ordinary tuning settings
    /// (memory, planner, logging, statistics, autovacuum, timeouts, locks, locale and client
    /// defaults). Settings that run commands (`*_command`), load code (`*_preload_libraries`
    /// other than `shared_preload_libraries`, `dynamic_library_path`, `jit_provider`), name
    /// files, or that the operator owns (addresses, ports, `ssl*`, `wal_level`,
    /// `password_encryption`) are rejected. `shared_preload_libraries` takes plain library
    /// names, and only those the operator allows (`--allowed-preload-libraries`) are loaded.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(
        validation = super::parameters::cel_name_rule(),
        validation = super::parameters::cel_runs_code_rule(),
        validation = super::parameters::cel_operator_owned_rule(),
        validation = super::parameters::cel_allowed_rule(),
        validation = super::parameters::cel_preload_form_rule(),
    )]
    #[schemars(extend("maxProperties" = 64))]
    pub parameters: BTreeMap<String, String>,
}

/// The data volume of a managed instance.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Volume size as a Kubernetes quantity (`1Gi`). May grow, never shrink.
    #[x_kube(
        validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("storage.size must be a positive quantity such as 1Gi"),
        validation = Rule::new("quantity(self).compareTo(quantity(oldSelf)) >= 0").message("storage.size may grow but never shrink"),
    )]
    #[schemars(length(min = 1, max = 32))]
    pub size: String,

    /// StorageClass of the volume; the cluster default when omitted. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("storage.storageClassName is immutable"))]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
}

/// A Postgres server the operator does not run.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalInstance {
    /// Hostname or IP address of the server.
    #[schemars(
        regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9.:]*[A-Za-z0-9])?$"),
        length(min = 1, max = 253)
    )]
    pub host: String,

    /// Port of the server.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// A Secret in this namespace with keys `username` and `password` of a role with CREATEDB
    /// and CREATEROLE (not necessarily a superuser). Its optional key `ca.crt` is used as the
    /// CA when `caSecretRef` is not set.
    pub admin_secret_ref: SecretRef,

    /// Database the admin connects to for CREATE DATABASE and CREATE ROLE.
    #[serde(default = "default_admin_database")]
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,62}$"))]
    pub admin_database: String,

    /// TLS towards the server, with libpq's meaning. Default: `verify-full` when a CA is given
    /// (`caSecretRef`, or a `ca.crt` key in the admin Secret), `require` otherwise. Where TLS is
    /// used SCRAM channel binding is required (`require` and the `verify-*` modes), and no mode
    /// answers a server asking for the password in cleartext or as MD5. `prefer` is accepted
    /// for compatibility but is insecure: an attacker on the path can strip TLS. `require`
    /// encrypts and binds the login to the TLS session but, without a CA, does not prove which
    /// server answers. Applications get the same mode in their Secrets' `sslmode`, `uri` and
    /// `jdbc-uri`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_mode: Option<SslMode>,

    /// A Secret in this namespace holding the PEM of the CA that signed the server's
    /// certificate (a private CA, or e.g. the AWS RDS bundle). The operator verifies the server
    /// against it and copies it into the credential Secrets (`ca.crt`) so applications and
    /// relays verify too. Without it, the admin Secret's `ca.crt` is used if present, else
    /// `verify-ca`/`verify-full` trust the public web roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<CaSecretRef>,
}

impl ExternalInstance {
    /// The sslmode in force: the spec's, else `verify-full` when a CA is given, else `require`.
    pub fn effective_ssl_mode(&self, ca_given: bool) -> SslMode {
        match (self.ssl_mode, ca_given) {
            (Some(mode), _) => mode,
            (None, true) => SslMode::VerifyFull,
            (None, false) => SslMode::Require,
        }
    }
}

/// A reference to a Secret in the same namespace.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Name of the Secret.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        length(min = 1, max = 253)
    )]
    pub name: String,
}

/// A key of a Secret in the same namespace holding a PEM CA bundle.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CaSecretRef {
    /// Name of the Secret.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        length(min = 1, max = 253)
    )]
    pub name: String,

    /// The key holding the PEM (one or more certificates). Default `ca.crt`.
    #[serde(default = "default_ca_key")]
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]+$"), length(min = 1, max = 253))]
    pub key: String,
}

/// libpq's `sslmode`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS. Passwords are still sent only by SCRAM (never in cleartext or as MD5).
    #[serde(rename = "disable")]
    Disable,
    /// Insecure, accepted for compatibility: TLS if the server offers it, without certificate
    /// verification; an attacker on the path can remove it.
    #[serde(rename = "prefer")]
    Prefer,
    /// TLS and SCRAM channel binding required; the certificate is not verified.
    #[serde(rename = "require")]
    Require,
    /// TLS and channel binding required; the certificate verified against the CA (not the
    /// host name).
    #[serde(rename = "verify-ca")]
    VerifyCa,
    /// TLS and channel binding required; the certificate verified against the CA and the host
    /// name.
    #[serde(rename = "verify-full")]
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling, as used in connection URIs and `PGSSLMODE`.
    pub fn as_libpq(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Parses libpq's spelling (`PGSSLMODE`). `allow` (try without TLS first) is read as
    /// `disable`.
    pub fn from_libpq(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" | "allow" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// Whether the server certificate is checked against a CA.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// The database inside the instance.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Database name: lowercase letters, digits and `_`, at most 63 bytes. Defaults to
    /// `owner.service` with `-` replaced by `_`. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,62}$"))]
    pub name: Option<String>,

    /// Extensions to create in the database (`CREATE EXTENSION IF NOT EXISTS`). On external
    /// servers the admin role must be allowed to create them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub extensions: Vec<Identifier>,

    /// Adopt a database and roles with the derived names that already exist on the server but
    /// carry no servicedb ownership mark (created by hand, or by an operator version before
    /// marks). Adoption marks them as this ServiceDatabase's, makes the owner role the
    /// database's owner, revokes CONNECT and TEMPORARY from PUBLIC, and from then on manages
    /// the roles' attributes, passwords and grants like its own (and `deletionPolicy: Delete`
    /// drops them). Objects marked as another ServiceDatabase's are never adopted. Default
    /// false: an unmarked object with the same name is a `NameConflict`. Implied on managed
    /// instances, whose server belongs to this ServiceDatabase alone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopt: bool,
}

/// A Postgres identifier: lowercase letters, digits and `_`, starting with a letter or `_`, at
/// most 63 bytes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(transparent)]
pub struct Identifier(#[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,62}$"))] pub String);

/// The transactional outbox table.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutboxSpec {
    /// Create and maintain the outbox table.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// Table name, optionally schema-qualified (`outbox`, `events.outbox`). Columns are
    /// compatible with Debezium's outbox event router: `id uuid`, `aggregatetype`,
    /// `aggregateid`, `type`, `payload jsonb`, plus `created_at`, an ordering column and
    /// `headers`, all defaulted.
    #[serde(default = "default_outbox_table")]
    #[schemars(regex(pattern = r"^([a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,62}$"))]
    pub table: String,
}

impl Default for OutboxSpec {
    fn default() -> Self {
        OutboxSpec {
            enabled: true,
            table: default_outbox_table(),
        }
    }
}

/// Change data capture through a Debezium Postgres connector that the operator registers in
/// Kafka Connect (named `servicedb.<namespace>.<name>`), watches (`CdcReady`, `status.cdc`) and
/// removes with `cdc` or the ServiceDatabase.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CdcSpec {
    /// Tables to capture, schema-qualified (`public.orders`). The cdc role gets SELECT on these
    /// only.
    #[schemars(length(min = 1, max = 100))]
    pub tables: Vec<QualifiedTable>,

    /// The Kafka Connect cluster that runs the connector (its REST API, and the namespace of its
    /// pods, which a managed instance's NetworkPolicy admits).
    pub kafka_connect: KafkaConnectRef,

    /// Prefix of the Kafka topics the connector writes (`<prefix>.<schema>.<table>`).
    #[schemars(regex(pattern = r"^[A-Za-z0-9._-]{1,200}$"))]
    pub topic_prefix: String,

    /// How Kafka Connect reads the cdc role's password (a KIP-297 config provider configured on
    /// the Connect workers). The connector config holds only a `${...}` reference, never the
    /// password. Default: Strimzi's `KubernetesSecretConfigProvider` under the alias `secrets`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_provider: Option<CdcSecretProvider>,

    /// For `verify-ca`/`verify-full` servers: the path of the CA file inside the Connect pods
    /// (`database.sslrootcert`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^/[^\s${}]*$"), length(max = 1024))]
    pub ssl_root_cert_path: Option<String>,

    /// Extra Debezium connector settings (`snapshot.mode`, `errors.max.retries`, converters,
    /// ...). Settings the operator owns — where the connector connects, as whom, what it reads,
    /// its slot, publication and heartbeat — and config-provider references are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(
        validation = Rule::new("self.all(k, k.matches('^[A-Za-z0-9._-]{1,255}$'))").message("setting names are 1-255 letters, digits, '.', '_' and '-'"),
        validation = cdc_owned_settings_rule(),
        validation = Rule::new("self.all(k, !self[k].contains('${'))").message("settings may not contain config-provider references ('${'): only the operator references Secrets"),
    )]
    #[schemars(schema_with = "cdc_settings_schema")]
    pub settings: BTreeMap<String, String>,

    /// Retained WAL (bytes) of the connector's slot above which `CdcReady` turns False with
    /// reason `SlotLagHigh` and a Warning Event. Default 256 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1048576))]
    pub lag_warning_bytes: Option<i64>,
}

/// Default of [`CdcSpec::lag_warning_bytes`].
pub const DEFAULT_CDC_LAG_WARNING_BYTES: i64 = 256 * 1024 * 1024;

/// How Kafka Connect resolves the cdc role's password: exactly one of the three.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.kubernetesSecret), has(self.directory), has(self.file)].filter(x, x).size() == 1").message("set exactly one of kubernetesSecret, directory, file"))]
pub struct CdcSecretProvider {
    /// Strimzi's `io.strimzi.kafka.KubernetesSecretConfigProvider`: reads Secret `<name>-cdc`
    /// through the Kubernetes API (`${secrets:<namespace>/<name>-cdc:password}`). Connect's
    /// service account needs `get` on that one Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes_secret: Option<ProviderAlias>,
    /// Kafka's `DirectoryConfigProvider`: Secret `<name>-cdc` mounted into the Connect pods
    /// at `path` (`${dir:<path>:password}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<ProviderPath>,
    /// Kafka's `FileConfigProvider`: a properties file in the Connect pods holding the
    /// password under `key` (`${file:<path>:<key>}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<ProviderFile>,
}

/// A config provider's alias in the Connect worker configuration.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProviderAlias {
    /// The alias (`config.providers=<alias>`). Default `secrets`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"))]
    pub alias: Option<String>,
}

/// A directory config provider and where the Secret is mounted.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProviderPath {
    /// The alias. Default `dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"))]
    pub alias: Option<String>,
    /// Absolute path of the mounted Secret inside the Connect pods.
    #[schemars(regex(pattern = r"^/[A-Za-z0-9._/-]*$"), length(max = 1024))]
    pub path: String,
}

/// A file config provider, the file and the key holding the password.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProviderFile {
    /// The alias. Default `file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"))]
    pub alias: Option<String>,
    /// Absolute path of the properties file inside the Connect pods.
    #[schemars(regex(pattern = r"^/[A-Za-z0-9._/-]*$"), length(max = 1024))]
    pub path: String,
    /// The property holding the password.
    #[schemars(regex(pattern = r"^[A-Za-z0-9._-]{1,255}$"))]
    pub key: String,
}

/// The schema of `cdc.settings`: bounded, so the apiserver can afford its CEL rules.
fn cdc_settings_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": 50,
        "additionalProperties": {"type": "string", "maxLength": 4096},
    })
}

/// CEL: no extra CDC setting the operator owns (the lists live in `cdc::config`).
fn cdc_owned_settings_rule() -> Rule {
    let owned: Vec<String> = crate::cdc::config::OWNED_SETTINGS
        .iter()
        .map(|k| format!("'{k}'"))
        .collect();
    let prefixes: Vec<String> = crate::cdc::config::OWNED_PREFIXES
        .iter()
        .map(|p| format!("k.lowerAscii().startsWith('{p}')"))
        .collect();
    Rule::new(format!(
        "self.all(k, !(k.lowerAscii() in [{}]) && !({}))",
        owned.join(", "),
        prefixes.join(" || ")
    ))
    .message("settings may not set what the operator owns: connection, credentials, TLS, tables, topic prefix, slot, publication, heartbeat and signalling (see cdc::config::OWNED_SETTINGS)")
}

/// A schema-qualified table name, `schema.table`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(transparent)]
pub struct QualifiedTable(
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,62}\.[a-z_][a-z0-9_]{0,62}$"))] pub String,
);

/// Where Kafka Connect's REST API answers.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KafkaConnectRef {
    /// Base URL of the Kafka Connect REST API (`http://connect.kafka:8083`).
    #[schemars(regex(pattern = r"^https?://[^\s]+$"), length(max = 512))]
    pub url: String,

    /// Secret with keys `username` and `password` for Connect's REST API (HTTP basic auth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth_secret_ref: Option<SecretRef>,

    /// CA bundle that signed an `https://` Connect's certificate (default: the public web roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<CaSecretRef>,

    /// Namespace of the Kafka Connect pods. A managed instance's NetworkPolicy admits pods
    /// labelled `servicedb.io/cdc-access: <namespace>.<name>` of this ServiceDatabase from this
    /// namespace only; defaults to the ServiceDatabase's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
        length(min = 1, max = 63)
    )]
    pub namespace: Option<String>,
}

/// What deleting a ServiceDatabase does to its data.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeletionPolicy {
    /// Keep the data and the `-app` Secret (default).
    #[default]
    Retain,
    /// Drop the database and roles (external) or the volume (managed).
    Delete,
}

/// Observed state of a ServiceDatabase.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServiceDatabaseStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Summary of the conditions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// Short description of the instance (`managed, Postgres 17` or `external, pg.internal:5432`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,

    /// Where applications connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,

    /// The database name in the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,

    /// Names of the credential Secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<SecretNames>,

    /// The CDC connector, while `cdc` is set (and until it is removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdc: Option<CdcStatus>,

    /// Conditions: Ready, InstanceReady, DatabaseReady, OutboxReady, CdcReady.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// What the operator knows of the CDC connector.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CdcStatus {
    /// The connector's name in Kafka Connect (`servicedb.<namespace>.<name>`).
    pub connector: String,
    /// The Connect cluster it was registered in (kept so removing `cdc` can still delete it).
    pub kafka_connect: KafkaConnectRef,
    /// Its replication slot.
    pub slot: String,
    /// Connector state: `RUNNING`, `FAILED`, `PAUSED`, `UNASSIGNED`, `RESTARTING`, `Unknown`
    /// (Connect unreachable) or `Missing`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// WAL (bytes) the slot retains for the connector, read on each resync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained_wal_bytes: Option<i64>,
}

/// Summary phase of a ServiceDatabase.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Accepted, waiting on something (a reference, a Secret, a valid spec).
    Pending,
    /// Creating the instance, database or roles.
    Provisioning,
    /// Everything is in place.
    Ready,
    /// Was ready or provisioning and something now fails (server unreachable, ...).
    Degraded,
    /// Being deleted.
    Deleting,
}

/// A network endpoint.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Host name applications use.
    pub host: String,
    /// Port applications use.
    pub port: i32,
}

/// Names of the credential Secrets of a ServiceDatabase.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SecretNames {
    /// The owner role's Secret (the service itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// The relay role's Secret (outbox enabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// The CDC role's Secret (cdc set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdc: Option<String>,
}

/// Database names a ServiceDatabase may never use: the server's own databases, and the
/// administration databases of the common managed clouds (RDS, Cloud SQL, Azure). The external
/// admin's own database (`external.adminDatabase`) is refused too, by its own rule.
pub const RESERVED_DATABASE_NAMES: &[&str] = &[
    "postgres",
    "template0",
    "template1",
    "rdsadmin",
    "cloudsqladmin",
    "azure_maintenance",
    "azure_sys",
];

/// The effective database name in CEL: `database.name`, or `owner.service` with `-` → `_`
/// (the same as [`ServiceDatabaseSpec::database_name`]).
const CEL_DATABASE_NAME: &str =
    "(has(self.database.name) ? self.database.name : self.owner.service.replace('-', '_'))";

fn reserved_database_name_rule() -> Rule {
    let names: Vec<String> = RESERVED_DATABASE_NAMES
        .iter()
        .map(|n| format!("'{n}'"))
        .collect();
    Rule::new(format!("!({CEL_DATABASE_NAME} in [{}])", names.join(", "))).message(
        kube::core::Message::Message(format!(
            "the database name (database.name, or owner.service with '-' replaced by '_') is reserved: {} are the server's and the managed clouds' own databases and are never taken over; set database.name to another name",
            RESERVED_DATABASE_NAMES.join(", ")
        )),
    )
}

fn admin_database_rule() -> Rule {
    Rule::new(format!(
        "!has(self.instance.external) || {CEL_DATABASE_NAME} != self.instance.external.adminDatabase"
    ))
    .message("the database name (database.name, or owner.service with '-' replaced by '_') is reserved: it is the external server's admin database (instance.external.adminDatabase), which the operator connects to and never takes over; set database.name to another name")
}

fn default_port() -> i32 {
    5432
}

fn default_ca_key() -> String {
    "ca.crt".to_owned()
}

fn default_admin_database() -> String {
    "postgres".to_owned()
}

fn default_true() -> bool {
    true
}

fn default_outbox_table() -> String {
    "outbox".to_owned()
}

impl ServiceDatabaseSpec {
    /// The database name: `database.name`, or `owner.service` with `-` replaced by `_`.
    pub fn database_name(&self) -> String {
        self.database
            .name
            .clone()
            .unwrap_or_else(|| self.owner.service.replace('-', "_"))
    }

    /// The outbox settings when the outbox is enabled.
    pub fn enabled_outbox(&self) -> Option<&OutboxSpec> {
        self.outbox.as_ref().filter(|o| o.enabled)
    }
}
