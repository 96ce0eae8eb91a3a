//! The relay's configuration file (`servicedb relay --config FILE`) and libpq environment: parsing and validation (reads files and the environment only).
//!
//! The file is the resolved form of an `OutboxRelay` spec; the operator renders it into a
//! ConfigMap. YAML (and therefore JSON) is accepted; unknown fields are refused so a typo never
//! silently falls back to a default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::api::outbox_relay::{
    DEFAULT_BATCH_SIZE, DEFAULT_POLL_INTERVAL_MS, EventFormat, RelayMode, Sink,
};
use crate::postgres::identifiers::{
    Ident, QualifiedName, default_relay_slot, outbox_notify_channel, outbox_publication,
};

/// Errors reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing config file {path}: {source}")]
    Parse {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("invalid environment variable {name}: {reason}")]
    Env { name: &'static str, reason: String },
}

/// The relay configuration file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayConfig {
    /// `Poll` or `Logical`.
    #[serde(default)]
    pub mode: RelayMode,
    /// Schema-qualified outbox table (`public.outbox`); an unqualified name means `public`.
    pub table: String,
    /// Maximum events per published batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// Poll mode: wait between polls of an empty outbox (LISTEN/NOTIFY may wake earlier).
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Where events go.
    pub sink: Sink,
    /// Raw or CloudEvents (binary mode).
    #[serde(default)]
    pub format: EventFormat,
    /// CloudEvents `source` attribute, e.g. `/servicedb/<namespace>/<database>`.
    #[serde(default = "default_source")]
    pub source: String,
    /// Logical mode: replication slot name (default derived from the table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// Logical mode: publication name (default `<table>_pub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publication: Option<String>,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Topic (Kafka) or subject (NATS) for events the sink rejects. Without it the relay stops
    /// with an error naming the event id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<String>,
    /// Schema of the outbox access functions (`outbox_claim(bigint)`, `outbox_delete(uuid[])`,
    /// `outbox_lag()`), SECURITY DEFINER functions owned by the outbox's owner. When set, the
    /// relay claims, deletes and measures lag only through them and needs no privilege on the
    /// table itself (the operator renders `servicedb`). When absent, it uses direct SQL on the
    /// table (SELECT and DELETE privileges), as against any Debezium-style outbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub functions_schema: Option<String>,
}

fn default_batch_size() -> u32 {
    DEFAULT_BATCH_SIZE.into()
}
fn default_poll_interval_ms() -> u64 {
    DEFAULT_POLL_INTERVAL_MS.into()
}
fn default_source() -> String {
    "/servicedb/relay".to_owned()
}
fn default_listen() -> String {
    "0.0.0.0:9090".to_owned()
}

/// A validated, schema-qualified table name. The names derived from it (NOTIFY channel,
/// publication, default slot) come from `crate::postgres::identifiers`, the same functions the
/// operator's provisioning uses, so relay and database always agree on them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableName(QualifiedName);

impl TableName {
    /// Parses `schema.table` or `table` (schema `public`).
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let (schema, name) = match s.split_once('.') {
            Some((schema, name)) => (schema, name),
            None => ("public", s),
        };
        Ok(Self(QualifiedName {
            schema: identifier("table schema", schema)?,
            name: identifier("table name", name)?,
        }))
    }

    /// The schema.
    pub fn schema(&self) -> &str {
        self.0.schema.as_str()
    }

    /// The table's own name.
    pub fn name(&self) -> &str {
        self.0.name.as_str()
    }

    /// The table quoted for SQL: `"public"."outbox"`. The parts are validated identifiers, and
    /// are quoted anyway so that no reserved word can change the statement.
    pub fn quoted(&self) -> String {
        self.0.quoted()
    }

    /// The NOTIFY channel the operator's outbox trigger signals.
    pub fn notify_channel(&self) -> Ident {
        outbox_notify_channel(&self.0)
    }

    /// The publication a Logical relay streams from unless the config names one.
    pub fn publication(&self) -> Ident {
        outbox_publication(&self.0)
    }

    /// The advisory-lock key of the single active publisher of this table.
    pub fn lock_key(&self) -> i64 {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(format!("servicedb-relay:{}", self.0));
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&digest[..8]);
        i64::from_be_bytes(bytes)
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Lowercase SQL identifiers only (`crate::postgres::identifiers::Ident`: `[a-z_][a-z0-9_]*`,
/// at most 63 bytes). Slot and publication names reach the replication protocol unquoted, so
/// the same rule keeps them safe there. `what` names the field in the error.
pub fn identifier(what: &str, s: &str) -> Result<Ident, ConfigError> {
    Ident::new(s).map_err(|e| {
        ConfigError::Invalid(format!(
            "{what} {s:?} must be a lowercase identifier ([a-z_][a-z0-9_]*, at most 63 characters): {e}"
        ))
    })
}

/// A topic or subject template with `{aggregatetype}` and `{type}` placeholders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<TemplatePart>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum TemplatePart {
    Literal(String),
    AggregateType,
    Type,
}

impl Template {
    /// Parses a template; `allowed` says which literal characters are legal.
    pub fn parse(what: &str, s: &str, allowed: fn(char) -> bool) -> Result<Self, ConfigError> {
        if s.is_empty() {
            return Err(ConfigError::Invalid(format!("{what} template is empty")));
        }
        let mut parts = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            if let Some(tail) = rest.strip_prefix("{aggregatetype}") {
                parts.push(TemplatePart::AggregateType);
                rest = tail;
            } else if let Some(tail) = rest.strip_prefix("{type}") {
                parts.push(TemplatePart::Type);
                rest = tail;
            } else {
                let end = rest.find('{').unwrap_or(rest.len());
                let literal = &rest[..end];
                if literal.is_empty() {
                    return Err(ConfigError::Invalid(format!(
                        "{what} template {s:?}: only {{aggregatetype}} and {{type}} placeholders are supported"
                    )));
                }
                if let Some(bad) = literal.chars().find(|c| !allowed(*c)) {
                    return Err(ConfigError::Invalid(format!(
                        "{what} template {s:?} contains the character {bad:?}, which is not allowed"
                    )));
                }
                parts.push(TemplatePart::Literal(literal.to_owned()));
                rest = &rest[end..];
            }
        }
        Ok(Self { parts })
    }

    /// Expands the template for one event.
    pub fn render(&self, aggregatetype: &str, event_type: &str) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                TemplatePart::Literal(l) => out.push_str(l),
                TemplatePart::AggregateType => out.push_str(aggregatetype),
                TemplatePart::Type => out.push_str(event_type),
            }
        }
        out
    }

    /// True when the template has no placeholder.
    pub fn is_literal(&self) -> bool {
        self.parts
            .iter()
            .all(|p| matches!(p, TemplatePart::Literal(_)))
    }

    /// NATS: the stream subject that captures every expansion: the literal tokens before the
    /// first token holding a placeholder, then `>` (`orders.{aggregatetype}.{type}` → `orders.>`).
    pub fn nats_wildcard(&self) -> String {
        if self.is_literal() {
            return self.render("", "");
        }
        // Render with a marker that cannot occur in literals, then cut at its first token.
        let marked = self.render("\u{1}", "\u{1}");
        let mut tokens = Vec::new();
        for token in marked.split('.') {
            if token.contains('\u{1}') {
                tokens.push(">");
                break;
            }
            tokens.push(token);
        }
        tokens.join(".")
    }
}

/// Characters allowed in a Kafka topic name.
pub fn kafka_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Characters allowed in a NATS subject literal (tokens are separated by `.`).
pub fn nats_subject_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Kafka properties the relay's guarantees rest on; the file may not override them.
pub const RESERVED_KAFKA_PROPERTIES: &[&str] = &[
    "enable.idempotence",
    "acks",
    "max.in.flight.requests.per.connection",
    "bootstrap.servers",
    "retries",
    "enable.gapless.guarantee",
];

/// How the relay reads, deletes and measures the outbox: the SQL of each operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxSql {
    /// Claims a batch: `$1` = limit (bigint); returns seq, id, aggregatetype, aggregateid,
    /// type, payload (text), headers (text), created_at as epoch seconds (float8).
    pub claim: String,
    /// Deletes rows by id: `$1` = uuid[].
    pub delete: String,
    /// One row: rows waiting (bigint, may be NULL), age of the oldest in seconds (float8).
    pub lag: String,
}

impl OutboxSql {
    /// Direct SQL on `table`, or calls into the functions in `functions_schema`.
    pub fn new(table: &TableName, functions_schema: Option<&str>) -> Self {
        match functions_schema {
            Some(schema) => {
                let s = crate::postgres::identifiers::quote_ident(schema);
                OutboxSql {
                    claim: format!(
                        "SELECT seq, id, aggregatetype, aggregateid, \"type\", payload, headers, created_epoch \
                         FROM {s}.outbox_claim($1::bigint)"
                    ),
                    delete: format!("SELECT {s}.outbox_delete($1::uuid[])"),
                    lag: format!("SELECT lag_rows, lag_seconds FROM {s}.outbox_lag()"),
                }
            }
            None => {
                let q = table.quoted();
                OutboxSql {
                    claim: format!(
                        "DELETE FROM {q} WHERE id IN (SELECT id FROM {q} ORDER BY seq LIMIT $1) \
                         RETURNING seq, id, aggregatetype, aggregateid, type, payload::text, headers::text, \
                         extract(epoch from created_at)::float8"
                    ),
                    delete: format!("DELETE FROM {q} WHERE id = ANY($1)"),
                    lag: format!(
                        "SELECT (SELECT max(seq) FROM {q}) - (SELECT min(seq) FROM {q}) + 1, \
                         (SELECT extract(epoch from now() - created_at)::float8 FROM {q} ORDER BY seq LIMIT 1)"
                    ),
                }
            }
        }
    }
}

/// The configuration after validation: every derived name computed once.
#[derive(Clone, Debug)]
pub struct Validated {
    pub config: RelayConfig,
    pub table: TableName,
    pub slot: String,
    pub publication: String,
    pub listen: SocketAddr,
    pub template: Template,
    pub sql: OutboxSql,
}

impl RelayConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Validated, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let config: RelayConfig =
            serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.display().to_string(),
                source,
            })?;
        config.validate()
    }

    /// Checks every field and derives names.
    pub fn validate(self) -> Result<Validated, ConfigError> {
        let table = TableName::parse(&self.table)?;
        if !(1..=10_000).contains(&self.batch_size) {
            return Err(ConfigError::Invalid(format!(
                "batchSize {} must be between 1 and 10000",
                self.batch_size
            )));
        }
        if !(10..=60_000).contains(&self.poll_interval_ms) {
            return Err(ConfigError::Invalid(format!(
                "pollIntervalMs {} must be between 10 and 60000",
                self.poll_interval_ms
            )));
        }
        let slot = match &self.slot {
            Some(s) => s.clone(),
            None => default_relay_slot(&table.0),
        };
        identifier("slot", &slot)?;
        let publication = match &self.publication {
            Some(p) => identifier("publication", p)?.to_string(),
            None => table.publication().to_string(),
        };
        if let Some(schema) = &self.functions_schema {
            identifier("functionsSchema", schema)?;
        }
        let listen: SocketAddr = self.listen.parse().map_err(|e| {
            ConfigError::Invalid(format!(
                "listen {:?} is not an address:port: {e}",
                self.listen
            ))
        })?;
        if self.source.is_empty() || self.source.chars().any(|c| c.is_control()) {
            return Err(ConfigError::Invalid(
                "source must be a non-empty URI reference without control characters".into(),
            ));
        }
        let template = match (&self.sink.kafka, &self.sink.nats) {
            (Some(k), None) => {
                if k.bootstrap_servers.trim().is_empty() {
                    return Err(ConfigError::Invalid(
                        "sink.kafka.bootstrapServers is empty".into(),
                    ));
                }
                if let Some(key) = k
                    .properties
                    .keys()
                    .find(|k| RESERVED_KAFKA_PROPERTIES.contains(&k.as_str()))
                {
                    return Err(ConfigError::Invalid(format!(
                        "sink.kafka.properties may not set {key:?}: the relay's guarantees depend on it"
                    )));
                }
                if let Some(dl) = &self.dead_letter {
                    Template::parse("deadLetter", dl, kafka_topic_char)?;
                    check_kafka_topic(dl)
                        .map_err(|r| ConfigError::Invalid(format!("deadLetter: {r}")))?;
                }
                let t = Template::parse("sink.kafka.topic", &k.topic, kafka_topic_char)?;
                if k.topic.len() > 249 {
                    return Err(ConfigError::Invalid(
                        "sink.kafka.topic is longer than 249".into(),
                    ));
                }
                t
            }
            (None, Some(n)) => {
                if !(n.url.starts_with("nats://") || n.url.starts_with("tls://")) {
                    return Err(ConfigError::Invalid(format!(
                        "sink.nats.url {:?} must start with nats:// or tls://",
                        n.url
                    )));
                }
                if let Some(stream) = &n.stream
                    && (stream.is_empty()
                        || stream.len() > 64
                        || !stream
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                {
                    return Err(ConfigError::Invalid(format!(
                        "sink.nats.stream {stream:?} must match [A-Za-z0-9_-]{{1,64}}"
                    )));
                }
                let t = Template::parse("sink.nats.subject", &n.subject, nats_subject_char)?;
                check_nats_subject(&t.render("x", "x")).map_err(|r| {
                    ConfigError::Invalid(format!("sink.nats.subject {:?}: {r}", n.subject))
                })?;
                if let Some(dl) = &self.dead_letter {
                    check_nats_subject(dl)
                        .map_err(|r| ConfigError::Invalid(format!("deadLetter {dl:?}: {r}")))?;
                }
                t
            }
            _ => {
                return Err(ConfigError::Invalid(
                    "sink must set exactly one of kafka or nats".into(),
                ));
            }
        };
        let sql = OutboxSql::new(&table, self.functions_schema.as_deref());
        Ok(Validated {
            config: self,
            sql,
            table,
            slot,
            publication,
            listen,
            template,
        })
    }
}

/// Checks an expanded Kafka topic name.
pub fn check_kafka_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > 249 {
        return Err(format!("topic {topic:?} must be 1 to 249 characters"));
    }
    if topic == "." || topic == ".." {
        return Err(format!("topic {topic:?} is not allowed"));
    }
    if let Some(c) = topic.chars().find(|c| !kafka_topic_char(*c)) {
        return Err(format!(
            "topic {topic:?} contains {c:?}; allowed: [A-Za-z0-9._-]"
        ));
    }
    Ok(())
}

/// Checks an expanded NATS subject (no wildcards, no empty tokens, no whitespace).
pub fn check_nats_subject(subject: &str) -> Result<(), String> {
    if subject.is_empty() || subject.len() > 255 {
        return Err(format!("subject {subject:?} must be 1 to 255 characters"));
    }
    if subject.split('.').any(str::is_empty) {
        return Err(format!("subject {subject:?} has an empty token"));
    }
    if let Some(c) = subject.chars().find(|c| !nats_subject_char(*c)) {
        return Err(format!(
            "subject {subject:?} contains {c:?}; allowed: [A-Za-z0-9._-]"
        ));
    }
    Ok(())
}

/// `PGSSLMODE` values: libpq's, with the operator's meaning (`crate::postgres::connect`).
pub use crate::api::service_database::SslMode;

/// Connection settings from libpq's environment variables. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct PgEnv {
    pub host: String,
    /// `PGHOSTADDR`: connect here instead of resolving `host` (which still names the server
    /// for `verify-full`).
    pub hostaddr: Option<std::net::IpAddr>,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub password: Option<String>,
    pub sslmode: SslMode,
    /// `PGSSLROOTCERT`: a PEM file of the CA for `verify-ca`/`verify-full`. `None` (or the
    /// libpq 16 value `system`) means the public web roots.
    pub sslrootcert: Option<std::path::PathBuf>,
    pub application_name: String,
}

impl std::fmt::Debug for PgEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEnv")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .finish()
    }
}

impl PgEnv {
    /// Reads `PGHOST`, `PGHOSTADDR`, `PGPORT`, `PGDATABASE`, `PGUSER`, `PGPASSWORD`,
    /// `PGSSLMODE`, `PGSSLROOTCERT`, `PGAPPNAME` from the process environment with libpq's defaults.
    pub fn from_env() -> Result<Self, ConfigError> {
        let vars: BTreeMap<String, String> = std::env::vars().collect();
        Self::from_map(&vars)
    }

    /// Same as [`PgEnv::from_env`] from an explicit map (for tests).
    pub fn from_map(vars: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        let get = |k: &str| vars.get(k).filter(|v| !v.is_empty()).cloned();
        let host = get("PGHOST").unwrap_or_else(|| "localhost".to_owned());
        let port = match get("PGPORT") {
            Some(p) => p.parse().map_err(|_| ConfigError::Env {
                name: "PGPORT",
                reason: format!("{p:?} is not a port number"),
            })?,
            None => 5432,
        };
        let user = get("PGUSER")
            .or_else(|| get("USER"))
            .ok_or(ConfigError::Env {
                name: "PGUSER",
                reason: "is not set (and neither is USER)".into(),
            })?;
        let database = get("PGDATABASE").unwrap_or_else(|| user.clone());
        // libpq's default is `prefer`; the operator's Deployments always set PGSSLMODE.
        let sslmode = match get("PGSSLMODE") {
            None => SslMode::Prefer,
            Some(m) => SslMode::from_libpq(&m).ok_or_else(|| ConfigError::Env {
                name: "PGSSLMODE",
                reason: format!(
                    "{m:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ),
            })?,
        };
        let hostaddr = match get("PGHOSTADDR") {
            None => None,
            Some(a) => Some(a.parse().map_err(|_| ConfigError::Env {
                name: "PGHOSTADDR",
                reason: format!("{a:?} is not an IP address"),
            })?),
        };
        let sslrootcert = get("PGSSLROOTCERT")
            .filter(|p| p != "system")
            .map(std::path::PathBuf::from);
        Ok(Self {
            host,
            hostaddr,
            port,
            database,
            user,
            password: get("PGPASSWORD"),
            sslmode,
            sslrootcert,
            application_name: get("PGAPPNAME").unwrap_or_else(|| "servicedb-relay".to_owned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Validated, ConfigError> {
        let c: RelayConfig = serde_yaml::from_str(yaml).map_err(|source| ConfigError::Parse {
            path: "test".into(),
            source,
        })?;
        c.validate()
    }

    #[test]
    fn minimal_kafka_config_gets_documented_defaults() {
        let v =
            parse("table: public.outbox\nsink: {kafka: {bootstrapServers: 'k:9092'}}\n").unwrap();
        assert_eq!(v.config.batch_size, 500);
        assert_eq!(v.config.poll_interval_ms, 250);
        assert_eq!(v.config.mode, RelayMode::Poll);
        assert_eq!(v.config.format, EventFormat::Raw);
        assert_eq!(v.publication, "outbox_pub");
        assert_eq!(v.slot, "servicedb_public_outbox");
        assert_eq!(v.listen.to_string(), "0.0.0.0:9090");
        assert_eq!(v.template.render("order", "created"), "outbox.event.order");
    }

    #[test]
    fn json_config_with_every_field_parses() {
        let v = parse(
            r#"{"mode":"Logical","table":"app.events","batchSize":100,"pollIntervalMs":50,
               "sink":{"nats":{"url":"nats://n:4222","subject":"ev.{aggregatetype}.{type}","stream":"EV"}},
               "format":"CloudEvents","source":"/servicedb/shop/orders","slot":"s1","publication":"p1",
               "listen":"127.0.0.1:9999","deadLetter":"ev.dead"}"#,
        )
        .unwrap();
        assert_eq!(v.table.quoted(), "\"app\".\"events\"");
        assert_eq!(v.slot, "s1");
        assert_eq!(v.template.nats_wildcard(), "ev.>");
        assert!(v.sql.claim.starts_with("DELETE FROM \"app\".\"events\""));
    }

    #[test]
    fn a_functions_schema_routes_every_outbox_statement_through_its_functions() {
        let v = parse(
            "table: public.outbox\nfunctionsSchema: servicedb\nsink: {kafka: {bootstrapServers: 'k:9092'}}\n",
        )
        .unwrap();
        for sql in [&v.sql.claim, &v.sql.delete, &v.sql.lag] {
            assert!(sql.contains("\"servicedb\".outbox_"), "{sql}");
            assert!(!sql.contains("\"outbox\""), "{sql}");
        }
        assert!(
            parse(
                "table: outbox\nfunctionsSchema: 'x;y'\nsink: {kafka: {bootstrapServers: 'k:9092'}}"
            )
            .unwrap_err()
            .to_string()
            .contains("functionsSchema")
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = parse("table: outbox\nbatchsize: 5\nsink: {kafka: {bootstrapServers: 'k:9092'}}")
            .unwrap_err();
        assert!(err.to_string().contains("batchsize"), "{err}");
    }

    #[test]
    fn bad_identifiers_and_templates_are_refused_with_the_field_name() {
        for (yaml, needle) in [
            (
                "table: 'public.Out box'\nsink: {kafka: {bootstrapServers: 'k:9092'}}",
                "table name",
            ),
            (
                "table: 'x;drop'\nsink: {kafka: {bootstrapServers: 'k:9092'}}",
                "table name",
            ),
            (
                "table: outbox\nslot: 'a-b'\nsink: {kafka: {bootstrapServers: 'k:9092'}}",
                "slot",
            ),
            (
                "table: outbox\nsink: {kafka: {bootstrapServers: 'k:9092', topic: 'a.{id}'}}",
                "placeholders",
            ),
            (
                "table: outbox\nsink: {kafka: {bootstrapServers: 'k:9092', topic: 'a b'}}",
                "' '",
            ),
            (
                "table: outbox\nsink: {nats: {url: 'nats://n:4222', subject: 'a..{type}'}}",
                "empty token",
            ),
            ("table: outbox\nsink: {nats: {url: 'http://n'}}", "nats://"),
            ("table: outbox\nsink: {}", "exactly one"),
            (
                "table: outbox\nbatchSize: 0\nsink: {kafka: {bootstrapServers: 'k:9092'}}",
                "batchSize",
            ),
            (
                "table: outbox\nlisten: nope\nsink: {kafka: {bootstrapServers: 'k:9092'}}",
                "listen",
            ),
            (
                "table: outbox\nsink: {kafka: {bootstrapServers: 'k:9092', properties: {acks: '1'}}}",
                "acks",
            ),
        ] {
            let err = parse(yaml).unwrap_err().to_string();
            assert!(err.contains(needle), "{yaml}: {err}");
        }
    }

    #[test]
    fn templates_expand_both_placeholders() {
        let t = Template::parse("t", "{aggregatetype}-{type}.x", kafka_topic_char).unwrap();
        assert_eq!(t.render("order", "created"), "order-created.x");
        assert!(!t.is_literal());
        assert_eq!(t.nats_wildcard(), ">");
        let t = Template::parse("t", "a.b", nats_subject_char).unwrap();
        assert_eq!(t.nats_wildcard(), "a.b");
    }

    #[test]
    fn expanded_destinations_are_checked() {
        assert!(check_kafka_topic("outbox.event.order").is_ok());
        assert!(check_kafka_topic("outbox.event.or der").is_err());
        assert!(check_nats_subject("a.b.c").is_ok());
        assert!(check_nats_subject("a.*.c").is_err());
        assert!(check_nats_subject("a..c").is_err());
    }

    #[test]
    fn lock_key_is_stable_and_depends_on_the_table() {
        let a = TableName::parse("public.outbox").unwrap();
        let b = TableName::parse("outbox").unwrap();
        let c = TableName::parse("other.outbox").unwrap();
        assert_eq!(a.lock_key(), b.lock_key());
        assert_ne!(a.lock_key(), c.lock_key());
        assert_eq!(a.notify_channel().as_str(), "outbox_outbox");
    }

    #[test]
    fn derived_names_are_the_ones_the_operator_provisions() {
        // Long enough that `<table>_pub` and `<table>_outbox` no longer fit in 63 bytes: the
        // relay must shorten them exactly as the provisioner does, or it would LISTEN on a
        // channel nobody notifies and look for a publication that does not exist.
        let long = format!("events.{}", "t".repeat(60));
        let v = parse(&format!(
            "table: {long}\nsink: {{kafka: {{bootstrapServers: 'k:9092'}}}}\n"
        ))
        .unwrap();
        let q = QualifiedName::parse(&long).unwrap();
        assert_eq!(v.publication, outbox_publication(&q).as_str());
        assert_eq!(v.table.notify_channel(), outbox_notify_channel(&q));
        assert_eq!(v.slot, default_relay_slot(&q));
        assert!(v.publication.len() <= 63);
    }

    #[test]
    fn libpq_environment_has_libpq_defaults_and_hides_the_password() {
        let mut m = BTreeMap::new();
        m.insert("PGUSER".to_owned(), "relay".to_owned());
        m.insert("PGPASSWORD".to_owned(), "s3cret".to_owned());
        let env = PgEnv::from_map(&m).unwrap();
        assert_eq!(env.host, "localhost");
        assert_eq!(env.port, 5432);
        assert_eq!(env.database, "relay");
        assert_eq!(env.sslmode, SslMode::Prefer);
        assert!(!format!("{env:?}").contains("s3cret"));
        m.insert("PGSSLMODE".to_owned(), "bogus".to_owned());
        assert!(
            PgEnv::from_map(&m)
                .unwrap_err()
                .to_string()
                .contains("PGSSLMODE")
        );
        m.insert("PGSSLMODE".to_owned(), "verify-ca".to_owned());
        m.insert(
            "PGSSLROOTCERT".to_owned(),
            "/etc/servicedb-ca/ca.crt".to_owned(),
        );
        let env = PgEnv::from_map(&m).unwrap();
        assert_eq!(env.sslmode, SslMode::VerifyCa);
        assert_eq!(
            env.sslrootcert.as_deref(),
            Some(std::path::Path::new("/etc/servicedb-ca/ca.crt"))
        );
        m.insert("PGSSLROOTCERT".to_owned(), "system".to_owned());
        assert_eq!(PgEnv::from_map(&m).unwrap().sslrootcert, None);
        m.insert("PGSSLMODE".to_owned(), "require".to_owned());
        m.insert("PGPORT".to_owned(), "x".to_owned());
        assert!(
            PgEnv::from_map(&m)
                .unwrap_err()
                .to_string()
                .contains("PGPORT")
        );
    }
}
