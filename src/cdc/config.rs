//! The Debezium Postgres connector's config, built from validated inputs (pure, no I/O).
//!
//! One function, [`connector_config`], turns a [`ConnectorInput`] into the exact map the
//! operator PUTs to `PUT /connectors/{name}/config`. Everything that decides whether the
//! connector is safe is fixed here and cannot be overridden:
//!
//! - the password is never in the map: `database.password` is a KIP-297 config-provider
//!   reference ([`SecretProvider`]) that Kafka Connect resolves in its workers, so it is neither
//!   in the REST answers nor in Connect's config topic;
//! - the connector reads the operator's own publication ([`cdc_publication`]) and may not
//!   create one (`publication.autocreate.mode=disabled`: the cdc role has no right to);
//! - the slot is named by the operator ([`slot_name`]), unique per ServiceDatabase, and never
//!   dropped by Debezium (`slot.drop.on.stop=false`): the operator drops it after the
//!   connector is deleted, in that order, so Connect cannot recreate it;
//! - a heartbeat keeps an idle database from pinning WAL.
//!
//! Extra Debezium settings go through [`validate_extra`]: keys in [`OWNED_SETTINGS`] (or under
//! [`OWNED_PREFIXES`]) are refused, and so is any value with a config-provider reference
//! (`${...}`), which would let whoever writes a ServiceDatabase read other Secrets through
//! Connect's service account.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::postgres::SslMode;
use crate::postgres::identifiers::{Ident, QualifiedName, cdc_publication};
use crate::postgres::slots::derived_slot_name;

/// The Debezium connector class.
pub const CONNECTOR_CLASS: &str = "io.debezium.connector.postgresql.PostgresConnector";
/// Prefix of every connector name the operator registers (see [`connector_name`]).
pub const CONNECTOR_NAME_PREFIX: &str = "servicedb";
/// Prefix of the replication slot of a ServiceDatabase's connector (see [`slot_name`]).
pub const SLOT_PREFIX: &str = "cdc";
/// The key of the password in the `<name>-cdc` Secret.
pub const PASSWORD_KEY: &str = "password";
/// The default heartbeat interval: often enough that a quiet database releases WAL within
/// seconds, rarely enough to cost nothing.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// Debezium's `errors.max.retries` default. Debezium 3.6 itself defaults to -1 (retry forever):
/// a connector that lost its REPLICATION privilege then stays RUNNING in Connect's status,
/// retrying every 10 s while its slot pins WAL, so `CdcReady` could never turn False (seen in
/// tests/cdc_connector.rs). A bounded number of retries turns a lasting failure into a FAILED
/// task within about a minute; the operator's own bounded restart with backoff takes over from
/// there. Overridable through the extra settings.
pub const DEFAULT_ERRORS_MAX_RETRIES: u32 = 5;
/// The prefix of the logical decoding messages [`HeartbeatAction::EmitMessage`] writes; the
/// connector is told to skip them, so they advance the slot without reaching any topic.
pub const HEARTBEAT_MESSAGE_PREFIX: &str = "servicedb_heartbeat";
/// The alias under which Strimzi's `KubernetesSecretConfigProvider` is registered in a
/// Connect worker (`config.providers=secrets`), as in Strimzi's documentation.
pub const STRIMZI_SECRETS_ALIAS: &str = "secrets";
/// The alias of Kafka's `DirectoryConfigProvider` in the worker (`config.providers=dir`).
pub const DIRECTORY_ALIAS: &str = "dir";
/// The alias of Kafka's `FileConfigProvider` in the worker (`config.providers=file`).
pub const FILE_ALIAS: &str = "file";

/// Settings the operator owns: an extra setting with one of these keys is refused. They
/// decide where the connector connects, as whom, what it reads and whether the slot and
/// publication stay the operator's.
pub const OWNED_SETTINGS: &[&str] = &[
    "name",
    "connector.class",
    "tasks.max",
    "plugin.name",
    "database.hostname",
    "database.port",
    "database.user",
    "database.password",
    "database.dbname",
    "database.sslmode",
    "database.sslrootcert",
    "topic.prefix",
    "publication.name",
    "publication.autocreate.mode",
    "slot.name",
    "slot.drop.on.stop",
    "table.include.list",
    "table.exclude.list",
    "schema.include.list",
    "schema.exclude.list",
    "heartbeat.interval.ms",
    "heartbeat.action.query",
    "message.prefix.include.list",
    "message.prefix.exclude.list",
    "signal.data.collection",
];

/// Settings the builder writes with a default that the extra settings may override.
pub const OVERRIDABLE_DEFAULTS: &[&str] = &["snapshot.mode", "errors.max.retries"];

/// Key prefixes the operator owns: TLS material and credentials (`database.ssl*`), and the
/// pre-2.0 spelling of the topic prefix.
pub const OWNED_PREFIXES: &[&str] = &["database.ssl", "database.server."];

/// Bounds on the escape hatch, so a ServiceDatabase cannot carry a megabyte of connector config.
pub const MAX_EXTRA_SETTINGS: usize = 50;
/// Longest accepted extra value.
pub const MAX_EXTRA_VALUE_LEN: usize = 4096;

/// How Kafka Connect gets the cdc role's password (KIP-297 config providers). The connector
/// config holds only the reference; the worker resolves it when it starts the task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretProvider {
    /// Strimzi's `io.strimzi.kafka.KubernetesSecretConfigProvider` reads the Secret through the
    /// Kubernetes API: `${secrets:<namespace>/<name>-cdc:password}`. Connect's service account
    /// needs `get` on that one Secret. What a stock Strimzi deployment uses; the default.
    KubernetesSecret {
        /// The provider's alias in the worker config.
        alias: String,
    },
    /// Kafka's `DirectoryConfigProvider`: the `<name>-cdc` Secret is mounted into the Connect
    /// pods as a directory (one file per key): `${dir:<path>:password}`.
    Directory {
        /// The provider's alias in the worker config.
        alias: String,
        /// Absolute path of the mounted Secret inside the Connect pods.
        path: String,
    },
    /// Kafka's `FileConfigProvider`: a properties file mounted into the Connect pods:
    /// `${file:<path>:<key>}`.
    File {
        /// The provider's alias in the worker config.
        alias: String,
        /// Absolute path of the properties file inside the Connect pods.
        path: String,
        /// The property holding the password.
        key: String,
    },
}

impl Default for SecretProvider {
    fn default() -> Self {
        SecretProvider::KubernetesSecret {
            alias: STRIMZI_SECRETS_ALIAS.to_owned(),
        }
    }
}

impl SecretProvider {
    /// The `${alias:path:key}` reference to the password in Secret `secret` of `namespace`.
    pub fn password_reference(&self, namespace: &str, secret: &str) -> Result<String, ConfigError> {
        match self {
            SecretProvider::KubernetesSecret { alias } => {
                check_alias(alias)?;
                check_reference_part("namespace", namespace)?;
                check_reference_part("secret name", secret)?;
                Ok(format!("${{{alias}:{namespace}/{secret}:{PASSWORD_KEY}}}"))
            }
            SecretProvider::Directory { alias, path } => {
                check_alias(alias)?;
                check_path(path)?;
                Ok(format!("${{{alias}:{path}:{PASSWORD_KEY}}}"))
            }
            SecretProvider::File { alias, path, key } => {
                check_alias(alias)?;
                check_path(path)?;
                check_reference_part("key", key)?;
                Ok(format!("${{{alias}:{path}:{key}}}"))
            }
        }
    }
}

/// Whether the heartbeat also writes to the database.
///
/// `heartbeat.interval.ms` alone makes Debezium confirm the last LSN it *processed* to the
/// slot at each heartbeat. When nothing the connector captures changes for a long time while
/// the server writes other WAL (other tables of the database, other databases on a shared
/// external server), there is no processed LSN to confirm and the slot keeps that WAL.
/// [`HeartbeatAction::EmitMessage`] closes the gap: at each heartbeat the connector runs
/// `pg_logical_emit_message(false, ...)`, a non-transactional logical decoding message in
/// *this* database's stream, which it processes (and skips, see
/// [`HEARTBEAT_MESSAGE_PREFIX`]) and then confirms. It writes no table, so the cdc role keeps
/// SELECT-only rights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HeartbeatAction {
    /// Only `heartbeat.interval.ms`.
    None,
    /// `heartbeat.action.query` emitting a logical decoding message (default).
    #[default]
    EmitMessage,
}

/// Everything the builder needs, already validated by the caller (admission and the
/// controller's decide step).
#[derive(Clone, Debug)]
pub struct ConnectorInput {
    /// The ServiceDatabase's namespace.
    pub namespace: String,
    /// The ServiceDatabase's name.
    pub name: String,
    /// Where Connect reaches Postgres: the managed instance's Service DNS name
    /// (`<name>-db.<ns>.svc`), or the external server's host.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The database.
    pub database: Ident,
    /// The cdc role (`RoleNames::cdc`).
    pub user: Ident,
    /// The Secret holding the cdc role's password (`DatabaseNames::cdc_secret`, `<name>-cdc`).
    pub credentials_secret: String,
    /// How Connect resolves the password.
    pub secret_provider: SecretProvider,
    /// The instance's sslmode, passed to Debezium as `database.sslmode`.
    pub ssl_mode: SslMode,
    /// For `verify-ca`/`verify-full`: the CA file's path inside the Connect pods.
    pub ssl_root_cert: Option<String>,
    /// Captured tables (`spec.cdc.tables`); they are also what the publication carries.
    pub tables: Vec<QualifiedName>,
    /// `topic.prefix`: topics are `<prefix>.<schema>.<table>`.
    pub topic_prefix: String,
    /// `heartbeat.interval.ms`.
    pub heartbeat_interval: Duration,
    /// See [`HeartbeatAction`].
    pub heartbeat_action: HeartbeatAction,
    /// A signal table for incremental snapshots (`signal.data.collection`); `None` leaves
    /// source signalling off. The operator must also put it in the publication.
    pub signal_table: Option<QualifiedName>,
    /// Extra Debezium settings, checked by [`validate_extra`]; they may override the
    /// [`OVERRIDABLE_DEFAULTS`], never an owned setting.
    pub extra: BTreeMap<String, String>,
}

impl ConnectorInput {
    /// An input with the defaults: Strimzi's secret provider, the `<name>-cdc` Secret, a 10 s
    /// heartbeat with [`HeartbeatAction::EmitMessage`], no signal table, no extras.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        host: impl Into<String>,
        port: u16,
        database: Ident,
        user: Ident,
        ssl_mode: SslMode,
        tables: Vec<QualifiedName>,
        topic_prefix: impl Into<String>,
    ) -> Self {
        let name = name.into();
        ConnectorInput {
            namespace: namespace.into(),
            credentials_secret: format!("{name}-cdc"),
            name,
            host: host.into(),
            port,
            database,
            user,
            secret_provider: SecretProvider::default(),
            ssl_mode,
            ssl_root_cert: None,
            tables,
            topic_prefix: topic_prefix.into(),
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            heartbeat_action: HeartbeatAction::default(),
            signal_table: None,
            extra: BTreeMap::new(),
        }
    }
}

/// A connector as Kafka Connect knows it: its name and config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectorConfig {
    /// The connector's name (also echoed by Connect as the `name` key of its config).
    pub name: String,
    /// The config map, without `name`.
    pub config: BTreeMap<String, String>,
}

/// Why no connector config could be built. Messages name keys, never values that could be
/// secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// An extra setting the operator owns.
    #[error("extra CDC setting {key:?} is managed by the operator and cannot be set")]
    OwnedSetting {
        /// The refused key.
        key: String,
    },
    /// An extra value with a config-provider reference.
    #[error(
        "extra CDC setting {key:?} contains a config-provider reference ('${{'); only the operator may reference Secrets"
    )]
    ProviderReference {
        /// The refused key.
        key: String,
    },
    /// A malformed extra key or value.
    #[error("extra CDC setting {key:?} is invalid: {reason}")]
    InvalidExtra {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// More extra settings than [`MAX_EXTRA_SETTINGS`].
    #[error("{count} extra CDC settings; at most {MAX_EXTRA_SETTINGS} are allowed")]
    TooManyExtras {
        /// How many were given.
        count: usize,
    },
    /// No table to capture.
    #[error("CDC needs at least one table")]
    NoTables,
    /// A topic prefix Kafka would not accept as a topic name part.
    #[error("topic prefix {0:?} must be 1-200 characters of letters, digits, '.', '_' and '-'")]
    InvalidTopicPrefix(String),
    /// A secret-provider setting that would break the `${alias:path:key}` syntax.
    #[error("secret provider {what} {value:?} is invalid: {reason}")]
    InvalidSecretProvider {
        /// Which part.
        what: &'static str,
        /// The offending value (an alias, path or name: never secret).
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A heartbeat interval of zero (Debezium reads 0 as "no heartbeat").
    #[error("the heartbeat interval must be at least one second")]
    InvalidHeartbeat,
    /// An empty host.
    #[error("the database host is empty")]
    EmptyHost,
}

impl ConfigError {
    /// A short, stable category for Event reasons and metric labels.
    pub fn category(&self) -> &'static str {
        "InvalidCdcConfig"
    }
}

/// The connector's name on the Connect cluster: `servicedb.<namespace>.<name>`.
///
/// Unique on a shared Connect cluster: namespaces are DNS labels and so never contain a dot,
/// which makes the first dot after the prefix an unambiguous separator (`a-b` + `c` and `a` +
/// `b-c` stay distinct, unlike a `-` separator). Made only of `[a-z0-9.-]`, so it needs no
/// escaping in a URL path. The `servicedb.` prefix marks connectors the operator owns; it
/// never touches another name.
pub fn connector_name(namespace: &str, name: &str) -> String {
    format!("{CONNECTOR_NAME_PREFIX}.{namespace}.{name}")
}

/// The connector's replication slot: `cdc_<name stem>_<hash of namespace/name>`, derived like a
/// Logical relay's (shared [`derived_slot_name`]), unique per ServiceDatabase, at most 63
/// bytes, valid as a slot name.
pub fn slot_name(namespace: &str, name: &str) -> String {
    derived_slot_name(SLOT_PREFIX, namespace, name)
}

/// Escapes a `schema.table` for Debezium's include lists, which are anchored regular
/// expressions: the dot must match only a dot. Identifiers are `[a-z0-9_]`, nothing else needs
/// escaping.
fn include_pattern(table: &QualifiedName) -> String {
    format!("{}\\.{}", table.schema, table.name)
}

/// The connector config for `input` (pure). Fails only on input that validation upstream
/// should already have refused.
pub fn connector_config(input: &ConnectorInput) -> Result<ConnectorConfig, ConfigError> {
    if input.tables.is_empty() {
        return Err(ConfigError::NoTables);
    }
    if input.host.is_empty() {
        return Err(ConfigError::EmptyHost);
    }
    check_topic_prefix(&input.topic_prefix)?;
    if input.heartbeat_interval < Duration::from_secs(1) {
        return Err(ConfigError::InvalidHeartbeat);
    }
    validate_extra(&input.extra)?;

    let password = input
        .secret_provider
        .password_reference(&input.namespace, &input.credentials_secret)?;
    let mut tables: Vec<&QualifiedName> = input.tables.iter().collect();
    tables.sort();
    tables.dedup();
    let include = tables
        .iter()
        .map(|t| include_pattern(t))
        .collect::<Vec<_>>()
        .join(",");

    let mut c = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        c.insert(k.to_owned(), v);
    };
    // Defaults first: the escape hatch may override these.
    set("snapshot.mode", "initial".into());
    set("errors.max.retries", DEFAULT_ERRORS_MAX_RETRIES.to_string());
    for (k, v) in &input.extra {
        set(k, v.clone());
    }
    // Owned settings last, so nothing above can shadow them.
    set("connector.class", CONNECTOR_CLASS.into());
    set("tasks.max", "1".into());
    set("plugin.name", "pgoutput".into());
    set("database.hostname", input.host.clone());
    set("database.port", input.port.to_string());
    set("database.user", input.user.to_string());
    set("database.password", password);
    set("database.dbname", input.database.to_string());
    set("database.sslmode", input.ssl_mode.as_libpq().into());
    if let Some(ca) = &input.ssl_root_cert {
        check_path(ca)?;
        set("database.sslrootcert", ca.clone());
    }
    set("topic.prefix", input.topic_prefix.clone());
    set(
        "publication.name",
        cdc_publication(&input.database).to_string(),
    );
    set("publication.autocreate.mode", "disabled".into());
    set("slot.name", slot_name(&input.namespace, &input.name));
    set("slot.drop.on.stop", "false".into());
    set("table.include.list", include);
    set(
        "heartbeat.interval.ms",
        input.heartbeat_interval.as_millis().to_string(),
    );
    if input.heartbeat_action == HeartbeatAction::EmitMessage {
        set(
            "heartbeat.action.query",
            format!(
                "SELECT pg_catalog.pg_logical_emit_message(false, '{HEARTBEAT_MESSAGE_PREFIX}', '')"
            ),
        );
        set(
            "message.prefix.exclude.list",
            HEARTBEAT_MESSAGE_PREFIX.into(),
        );
    }
    if let Some(signal) = &input.signal_table {
        set("signal.data.collection", signal.to_string());
    }
    Ok(ConnectorConfig {
        name: connector_name(&input.namespace, &input.name),
        config: c,
    })
}

/// Checks the escape hatch of extra Debezium settings (pure; for admission-time checks in the
/// controller's validate step as well as for the builder).
pub fn validate_extra(extra: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    if extra.len() > MAX_EXTRA_SETTINGS {
        return Err(ConfigError::TooManyExtras { count: extra.len() });
    }
    for (key, value) in extra {
        let invalid = |reason: &str| ConfigError::InvalidExtra {
            key: key.clone(),
            reason: reason.to_owned(),
        };
        if key.is_empty()
            || key.len() > 255
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(invalid(
                "keys are 1-255 characters of letters, digits, '.', '_' and '-'",
            ));
        }
        if is_owned(key) {
            return Err(ConfigError::OwnedSetting { key: key.clone() });
        }
        if value.contains("${") {
            return Err(ConfigError::ProviderReference { key: key.clone() });
        }
        if value.len() > MAX_EXTRA_VALUE_LEN {
            return Err(invalid("value longer than 4096 bytes"));
        }
        if value.chars().any(char::is_control) {
            return Err(invalid("value contains control characters"));
        }
    }
    Ok(())
}

/// True when `key` is a setting the operator owns. Case-insensitive: Connect's keys are
/// case-sensitive, but a near-miss like `Slot.Name` is refused rather than silently ignored.
pub fn is_owned(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    OWNED_SETTINGS.contains(&key.as_str()) || OWNED_PREFIXES.iter().any(|p| key.starts_with(p))
}

fn check_topic_prefix(prefix: &str) -> Result<(), ConfigError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 200
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::InvalidTopicPrefix(prefix.to_owned()))
    }
}

fn check_alias(alias: &str) -> Result<(), ConfigError> {
    let ok = alias
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && alias.len() <= 64
        && alias
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::InvalidSecretProvider {
            what: "alias",
            value: alias.to_owned(),
            reason: "must start with a letter and contain only letters, digits, '_' and '-'",
        })
    }
}

/// A part of `${alias:path:key}` must not contain the syntax's own delimiters.
fn check_reference_part(what: &'static str, value: &str) -> Result<(), ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::InvalidSecretProvider {
            what,
            value: value.to_owned(),
            reason: "must be 1-253 characters of letters, digits, '.', '_' and '-'",
        })
    }
}

fn check_path(path: &str) -> Result<(), ConfigError> {
    let ok = path.starts_with('/')
        && path.len() <= 1024
        && !path.contains("..")
        && path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::InvalidSecretProvider {
            what: "path",
            value: path.to_owned(),
            reason: "must be an absolute path of letters, digits, '/', '.', '_' and '-' without '..'",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> ConnectorInput {
        ConnectorInput::new(
            "shop",
            "orders",
            "orders-db.shop.svc",
            5432,
            Ident::new("orders").unwrap(),
            Ident::new("orders_cdc").unwrap(),
            SslMode::Require,
            vec![QualifiedName::parse("public.orders").unwrap()],
            "cdc.orders",
        )
    }

    fn get<'a>(c: &'a ConnectorConfig, k: &str) -> Option<&'a str> {
        c.config.get(k).map(String::as_str)
    }

    #[test]
    fn the_minimal_input_gives_a_pgoutput_connector_on_the_operators_publication_and_slot() {
        let c = connector_config(&input()).unwrap();
        assert_eq!(c.name, "servicedb.shop.orders");
        let slot = slot_name("shop", "orders");
        let expected = [
            ("connector.class", CONNECTOR_CLASS),
            ("tasks.max", "1"),
            ("plugin.name", "pgoutput"),
            ("database.hostname", "orders-db.shop.svc"),
            ("database.port", "5432"),
            ("database.user", "orders_cdc"),
            ("database.password", "${secrets:shop/orders-cdc:password}"),
            ("database.dbname", "orders"),
            ("database.sslmode", "require"),
            ("topic.prefix", "cdc.orders"),
            ("publication.name", "orders_cdc_pub"),
            ("publication.autocreate.mode", "disabled"),
            ("slot.name", slot.as_str()),
            ("slot.drop.on.stop", "false"),
            ("table.include.list", "public\\.orders"),
            ("snapshot.mode", "initial"),
            ("errors.max.retries", "5"),
            ("heartbeat.interval.ms", "10000"),
            (
                "heartbeat.action.query",
                "SELECT pg_catalog.pg_logical_emit_message(false, 'servicedb_heartbeat', '')",
            ),
            ("message.prefix.exclude.list", "servicedb_heartbeat"),
        ];
        for (k, v) in expected {
            assert_eq!(get(&c, k), Some(v), "{k}");
        }
        assert_eq!(c.config.len(), expected.len(), "{:#?}", c.config);
        assert!(
            !c.config.contains_key("name"),
            "Connect adds the name itself"
        );
        assert!(!c.config.contains_key("signal.data.collection"));
    }

    #[test]
    fn the_password_is_a_config_provider_reference_for_every_provider() {
        let table: [(SecretProvider, &str); 4] = [
            (
                SecretProvider::default(),
                "${secrets:shop/orders-cdc:password}",
            ),
            (
                SecretProvider::KubernetesSecret {
                    alias: "k8s".into(),
                },
                "${k8s:shop/orders-cdc:password}",
            ),
            (
                SecretProvider::Directory {
                    alias: DIRECTORY_ALIAS.into(),
                    path: "/opt/kafka/external-configuration/orders-cdc".into(),
                },
                "${dir:/opt/kafka/external-configuration/orders-cdc:password}",
            ),
            (
                SecretProvider::File {
                    alias: FILE_ALIAS.into(),
                    path: "/mnt/cdc/orders.properties".into(),
                    key: "orders.password".into(),
                },
                "${file:/mnt/cdc/orders.properties:orders.password}",
            ),
        ];
        for (provider, reference) in table {
            let mut i = input();
            i.secret_provider = provider;
            let c = connector_config(&i).unwrap();
            assert_eq!(get(&c, "database.password"), Some(reference));
        }
    }

    #[test]
    fn secret_provider_parts_that_would_break_the_reference_syntax_are_refused() {
        let bad = [
            SecretProvider::KubernetesSecret { alias: "".into() },
            SecretProvider::KubernetesSecret {
                alias: "a:b".into(),
            },
            SecretProvider::Directory {
                alias: "dir".into(),
                path: "relative/path".into(),
            },
            SecretProvider::Directory {
                alias: "dir".into(),
                path: "/a:b".into(),
            },
            SecretProvider::Directory {
                alias: "dir".into(),
                path: "/a/../etc".into(),
            },
            SecretProvider::File {
                alias: "file".into(),
                path: "/a/b".into(),
                key: "x}".into(),
            },
        ];
        for provider in bad {
            let mut i = input();
            i.secret_provider = provider.clone();
            assert!(
                matches!(
                    connector_config(&i),
                    Err(ConfigError::InvalidSecretProvider { .. })
                ),
                "{provider:?} accepted"
            );
        }
    }

    #[test]
    fn connector_names_are_distinct_where_a_dash_separator_would_collide() {
        assert_ne!(connector_name("a-b", "c"), connector_name("a", "b-c"));
        assert_eq!(connector_name("shop", "orders"), "servicedb.shop.orders");
    }

    #[test]
    fn tables_become_an_escaped_sorted_include_list() {
        let mut i = input();
        i.tables = ["sales.orders", "public.items", "public.items"]
            .iter()
            .map(|t| QualifiedName::parse(t).unwrap())
            .collect();
        let c = connector_config(&i).unwrap();
        assert_eq!(
            get(&c, "table.include.list"),
            Some("public\\.items,sales\\.orders")
        );
        i.tables.clear();
        assert_eq!(connector_config(&i), Err(ConfigError::NoTables));
    }

    #[test]
    fn sslmode_heartbeat_signal_table_and_ca_follow_the_input() {
        let table = [
            (SslMode::Disable, "disable"),
            (SslMode::Prefer, "prefer"),
            (SslMode::VerifyCa, "verify-ca"),
            (SslMode::VerifyFull, "verify-full"),
        ];
        for (mode, expected) in table {
            let mut i = input();
            i.ssl_mode = mode;
            assert_eq!(
                get(&connector_config(&i).unwrap(), "database.sslmode"),
                Some(expected)
            );
        }
        let mut i = input();
        i.heartbeat_interval = Duration::from_secs(30);
        i.heartbeat_action = HeartbeatAction::None;
        i.signal_table = Some(QualifiedName::parse("public.debezium_signal").unwrap());
        i.ssl_root_cert = Some("/etc/cdc-ca/ca.crt".into());
        let c = connector_config(&i).unwrap();
        assert_eq!(get(&c, "heartbeat.interval.ms"), Some("30000"));
        assert_eq!(get(&c, "heartbeat.action.query"), None);
        assert_eq!(get(&c, "message.prefix.exclude.list"), None);
        assert_eq!(
            get(&c, "signal.data.collection"),
            Some("public.debezium_signal")
        );
        assert_eq!(get(&c, "database.sslrootcert"), Some("/etc/cdc-ca/ca.crt"));
        i.heartbeat_interval = Duration::ZERO;
        assert_eq!(connector_config(&i), Err(ConfigError::InvalidHeartbeat));
    }

    #[test]
    fn extras_override_defaults_and_are_added() {
        let mut i = input();
        i.extra = BTreeMap::from([
            ("snapshot.mode".to_owned(), "no_data".to_owned()),
            ("decimal.handling.mode".to_owned(), "string".to_owned()),
            ("tombstones.on.delete".to_owned(), "false".to_owned()),
        ]);
        let c = connector_config(&i).unwrap();
        assert_eq!(get(&c, "snapshot.mode"), Some("no_data"));
        assert_eq!(get(&c, "decimal.handling.mode"), Some("string"));
        assert_eq!(get(&c, "tombstones.on.delete"), Some("false"));
    }

    #[test]
    fn every_owned_setting_is_refused_as_an_extra() {
        for key in OWNED_SETTINGS {
            let extra = BTreeMap::from([(key.to_string(), "x".to_owned())]);
            assert_eq!(
                validate_extra(&extra),
                Err(ConfigError::OwnedSetting {
                    key: key.to_string()
                }),
                "{key}"
            );
        }
        for key in [
            "database.sslcert",
            "database.sslkey",
            "database.sslpassword",
            "database.server.name",
            "Slot.Name",
            "DATABASE.PASSWORD",
        ] {
            let extra = BTreeMap::from([(key.to_owned(), "x".to_owned())]);
            assert!(
                matches!(
                    validate_extra(&extra),
                    Err(ConfigError::OwnedSetting { .. })
                ),
                "{key} accepted"
            );
        }
    }

    #[test]
    fn every_setting_the_builder_writes_is_owned_or_an_overridable_default() {
        let mut i = input();
        i.signal_table = Some(QualifiedName::parse("public.signal").unwrap());
        i.ssl_root_cert = Some("/ca.crt".into());
        let c = connector_config(&i).unwrap();
        for key in c.config.keys() {
            assert!(
                is_owned(key) || OVERRIDABLE_DEFAULTS.contains(&key.as_str()),
                "{key} is neither owned nor a documented default"
            );
        }
    }

    #[test]
    fn extras_with_provider_references_bad_keys_or_values_are_refused() {
        let refused = |k: &str, v: &str| {
            validate_extra(&BTreeMap::from([(k.to_owned(), v.to_owned())])).unwrap_err()
        };
        assert_eq!(
            refused(
                "transforms.x.password",
                "${secrets:other-ns/db-admin:password}"
            ),
            ConfigError::ProviderReference {
                key: "transforms.x.password".into()
            }
        );
        assert!(matches!(
            refused("a key", "x"),
            ConfigError::InvalidExtra { .. }
        ));
        assert!(matches!(refused("", "x"), ConfigError::InvalidExtra { .. }));
        assert!(matches!(
            refused("k", "a\nb"),
            ConfigError::InvalidExtra { .. }
        ));
        assert!(matches!(
            refused("k", &"x".repeat(MAX_EXTRA_VALUE_LEN + 1)),
            ConfigError::InvalidExtra { .. }
        ));
        let many: BTreeMap<String, String> = (0..=MAX_EXTRA_SETTINGS)
            .map(|n| (format!("k{n}"), "v".to_owned()))
            .collect();
        assert!(matches!(
            validate_extra(&many),
            Err(ConfigError::TooManyExtras { .. })
        ));
    }

    #[test]
    fn topic_prefixes_outside_kafkas_alphabet_are_refused() {
        for bad in ["", "a b", "a/b", &"x".repeat(201)] {
            let mut i = input();
            i.topic_prefix = bad.to_owned();
            assert!(
                matches!(
                    connector_config(&i),
                    Err(ConfigError::InvalidTopicPrefix(_))
                ),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn the_slot_name_is_unique_per_database_and_valid() {
        let a = slot_name("shop", "orders");
        assert!(a.starts_with("cdc_orders_"), "{a}");
        assert_ne!(a, slot_name("shop2", "orders"));
        assert_ne!(
            a,
            crate::specs::relay::slot_name("shop", "orders"),
            "a relay and a connector of the same name never share a slot"
        );
    }
}
