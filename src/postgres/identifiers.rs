//! Postgres identifiers the operator may put into SQL, their quoting, and the names derived from
//! a service (pure, no I/O).
//!
//! Every name that reaches a SQL string goes through [`Ident`] (validated) and is then quoted by
//! [`quote_ident`]. Validation is deliberately stricter than Postgres (lowercase letters, digits,
//! `_`, at most 63 bytes — the CRD admission pattern) so that a quoted name is also exactly the
//! name `psql` users type unquoted. Quoting is kept anyway: it is the second lock on the door for
//! the day someone bypasses admission or loosens the pattern.
//!
//! Literals are never built from user text. [`Literal`] can only be made from values the
//! operator itself generates (SCRAM verifiers, names derived from a validated [`Ident`]).

use std::fmt;

use sha2::{Digest, Sha256};

/// Postgres truncates identifiers longer than `NAMEDATALEN - 1` bytes; we refuse them instead,
/// because a silently truncated role name would not match the name written into a Secret.
pub const MAX_IDENT_LEN: usize = 63;

/// Why a string is not an acceptable identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentError {
    /// The string was empty.
    #[error("identifier is empty")]
    Empty,
    /// Longer than 63 bytes.
    #[error("identifier {ident:?} is {len} bytes long; Postgres allows at most 63")]
    TooLong {
        /// The offending identifier.
        ident: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A character outside `[a-z0-9_]`, or a leading digit.
    #[error(
        "identifier {ident:?} must start with a lowercase letter or '_' and contain only lowercase letters, digits and '_'"
    )]
    InvalidCharacter {
        /// The offending identifier.
        ident: String,
    },
    /// A qualified name with more than one dot, or an empty part.
    #[error("{name:?} is not a table name of the form 'table' or 'schema.table'")]
    InvalidQualifiedName {
        /// The offending name.
        name: String,
    },
    /// A service name that does not map to a role name.
    #[error("service name {service:?} does not give a valid role name: {reason}")]
    InvalidServiceName {
        /// The offending service name.
        service: String,
        /// What is wrong with the derived name.
        reason: Box<IdentError>,
    },
}

impl IdentError {
    /// A short, stable category for Event reasons and metric labels.
    pub fn category(&self) -> &'static str {
        "InvalidIdentifier"
    }
}

/// A validated Postgres identifier: `^[a-z_][a-z0-9_]*$`, at most 63 bytes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ident(String);

impl Ident {
    /// Validates `s` as an identifier.
    pub fn new(s: impl Into<String>) -> Result<Self, IdentError> {
        let s = s.into();
        let mut chars = s.chars();
        let Some(first) = chars.next() else {
            return Err(IdentError::Empty);
        };
        if s.len() > MAX_IDENT_LEN {
            return Err(IdentError::TooLong {
                len: s.len(),
                ident: s,
            });
        }
        let first_ok = first.is_ascii_lowercase() || first == '_';
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !(first_ok && rest_ok) {
            return Err(IdentError::InvalidCharacter { ident: s });
        }
        Ok(Ident(s))
    }

    /// The `public` schema.
    pub fn public() -> Ident {
        Ident("public".to_owned())
    }

    /// The unquoted name, for bind parameters and catalog lookups.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name quoted for SQL text: `"orders_api"`.
    pub fn quoted(&self) -> String {
        quote_ident(&self.0)
    }

    /// `self` followed by `suffix`, shortened deterministically when the result would exceed
    /// 63 bytes: the head of `self`, `_`, 8 hex digits of SHA-256 of the whole of `self`, then
    /// `suffix`. Distinct long names therefore stay distinct, and the same input always gives
    /// the same name (the relay derives its channel and publication names with this too).
    ///
    /// Used for names of objects the operator owns (publications, triggers, channels), which
    /// nobody types by hand, so a hashed name is acceptable where an error would wedge an
    /// otherwise valid resource. `suffix` must be short, lowercase and start with `_`.
    pub fn with_suffix(&self, suffix: &str) -> Ident {
        let whole = format!("{}{}", self.0, suffix);
        if whole.len() <= MAX_IDENT_LEN {
            return Ident(whole);
        }
        let digest = Sha256::digest(self.0.as_bytes());
        let hash: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
        // ASCII only (validated), so byte slicing is on a char boundary.
        let keep = MAX_IDENT_LEN.saturating_sub(suffix.len() + 1 + hash.len());
        Ident(format!(
            "{}_{}{}",
            &self.0[..keep.min(self.0.len())],
            hash,
            suffix
        ))
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ident({:?})", self.0)
    }
}

impl std::str::FromStr for Ident {
    type Err = IdentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ident::new(s)
    }
}

impl TryFrom<&str> for Ident {
    type Error = IdentError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Ident::new(s)
    }
}

/// Quotes any string as a Postgres identifier: wraps it in `"` and doubles embedded `"`.
///
/// Correct for arbitrary input (that is what the doubling is for), but the operator only ever
/// passes [`Ident`]s; this free function exists for names read back from catalogs.
pub fn quote_ident(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// A table (or other relation) name with its schema; `public` when none is given.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct QualifiedName {
    /// The schema.
    pub schema: Ident,
    /// The relation name.
    pub name: Ident,
}

impl QualifiedName {
    /// Parses `outbox` (schema `public`) or `events.outbox`.
    pub fn parse(s: &str) -> Result<Self, IdentError> {
        let invalid = || IdentError::InvalidQualifiedName { name: s.to_owned() };
        let mut parts = s.split('.');
        let (schema, name) = match (parts.next(), parts.next(), parts.next()) {
            (Some(name), None, None) => ("public", name),
            (Some(schema), Some(name), None) => (schema, name),
            _ => return Err(invalid()),
        };
        if schema.is_empty() || name.is_empty() {
            return Err(invalid());
        }
        Ok(QualifiedName {
            schema: Ident::new(schema)?,
            name: Ident::new(name)?,
        })
    }

    /// `"schema"."name"`, for SQL text.
    pub fn quoted(&self) -> String {
        format!("{}.{}", self.schema.quoted(), self.name.quoted())
    }

    /// True when the schema is `public` (nothing to create).
    pub fn in_public_schema(&self) -> bool {
        self.schema.as_str() == "public"
    }
}

impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

impl std::str::FromStr for QualifiedName {
    type Err = IdentError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        QualifiedName::parse(s)
    }
}

/// A SQL string literal built only from values the operator generates itself.
///
/// Utility statements (`CREATE ROLE ... PASSWORD`, trigger arguments) cannot take bind
/// parameters, so a few literals must appear in SQL text. There is deliberately no constructor
/// from an arbitrary `&str`: user text can never become a literal.
#[derive(Clone, PartialEq, Eq)]
pub struct Literal(String);

impl Literal {
    /// A SCRAM-SHA-256 verifier computed by [`super::passwords`]. Its alphabet (base64, digits,
    /// `$`, `:`) needs no escaping; it is escaped anyway, by the same rule as libpq.
    pub(crate) fn from_verifier(verifier: &super::passwords::ScramVerifier) -> Literal {
        Literal(quote_literal(verifier.as_str()))
    }

    /// A validated identifier used as a value (a NOTIFY channel name in a trigger argument).
    pub fn from_ident(ident: &Ident) -> Literal {
        Literal(quote_literal(ident.as_str()))
    }

    /// A quoted relation name used as a value (`'"public"."outbox"'::regclass`).
    pub fn from_qualified(name: &QualifiedName) -> Literal {
        Literal(quote_literal(&name.quoted()))
    }

    /// An ownership mark (its parts are validated Kubernetes names and uids).
    pub fn from_mark(mark: &super::ownership::OwnerMark) -> Literal {
        Literal(quote_literal(&mark.format()))
    }

    /// The quoted literal, ready for SQL text.
    pub fn as_sql(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // May hold a verifier: not secret, but not useful in logs either.
        f.write_str("Literal(..)")
    }
}

/// libpq's literal escaping (doubles `'`, uses `E'...'` when backslashes are present), kept
/// private: callers go through [`Literal`].
fn quote_literal(s: &str) -> String {
    postgres_protocol::escape::escape_literal(s)
}

/// The roles a service gets, derived from `owner.service`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RoleNames {
    /// The owner role (`orders_api`): owns the database, its schema and the outbox.
    pub app: Ident,
    /// The relay role (`orders_api_relay`): reads and deletes outbox rows.
    pub relay: Ident,
    /// The CDC role (`orders_api_cdc`): replication plus SELECT on the CDC tables.
    pub cdc: Ident,
    /// The outbox owner (`orders_api_outbox`): NOLOGIN; owns the outbox table and the
    /// SECURITY DEFINER functions the relay calls, so neither the app nor the relay owns them.
    pub outbox: Ident,
}

impl RoleNames {
    /// `orders-api` gives `orders_api`, `orders_api_relay`, `orders_api_cdc`. Unlike
    /// [`Ident::with_suffix`], these are never shortened: they are written into Secrets and
    /// typed by people, so a name that does not fit is an error.
    pub fn for_service(service: &str) -> Result<Self, IdentError> {
        let base = service.replace('-', "_");
        let make = |name: String| {
            Ident::new(name).map_err(|e| IdentError::InvalidServiceName {
                service: service.to_owned(),
                reason: Box::new(e),
            })
        };
        Ok(RoleNames {
            app: make(base.clone())?,
            relay: make(format!("{base}_relay"))?,
            cdc: make(format!("{base}_cdc"))?,
            outbox: make(format!("{base}_outbox"))?,
        })
    }

    /// All four names, app first, the outbox owner last (it is dropped after the others).
    pub fn all(&self) -> [&Ident; 4] {
        [&self.app, &self.relay, &self.cdc, &self.outbox]
    }
}

/// The publication a Logical relay streams from: `<table>_pub`.
pub fn outbox_publication(outbox: &QualifiedName) -> Ident {
    outbox.name.with_suffix("_pub")
}

/// The NOTIFY channel the outbox trigger signals after inserts: `<table>_outbox`. The relay
/// LISTENs on it as a latency aid; polling remains the backstop.
pub fn outbox_notify_channel(outbox: &QualifiedName) -> Ident {
    outbox.name.with_suffix("_outbox")
}

/// The trigger (and its function, in the outbox's schema) that sends the NOTIFY.
pub fn outbox_notify_trigger(outbox: &QualifiedName) -> Ident {
    outbox.name.with_suffix("_notify")
}

/// The index on the outbox ordering column.
pub fn outbox_seq_index(outbox: &QualifiedName) -> Ident {
    outbox.name.with_suffix("_seq_idx")
}

/// The schema holding the outbox functions the relay calls (owned by the outbox role; neither
/// the app nor the relay may create in it).
pub const FUNCTIONS_SCHEMA: &str = "servicedb";

/// [`FUNCTIONS_SCHEMA`] as an identifier.
pub fn functions_schema() -> Ident {
    Ident(FUNCTIONS_SCHEMA.to_owned())
}

/// The schema untrusted extensions go into when a superuser creates them (owned by the admin;
/// the app gets USAGE only, so it cannot plant objects the extension script would pick up).
pub const EXTENSIONS_SCHEMA: &str = "servicedb_ext";

/// [`EXTENSIONS_SCHEMA`] as an identifier.
pub fn extensions_schema() -> Ident {
    Ident(EXTENSIONS_SCHEMA.to_owned())
}

/// The publication Debezium reads for CDC: `<dbname>_cdc_pub`.
pub fn cdc_publication(database: &Ident) -> Ident {
    database.with_suffix("_cdc_pub")
}

/// The prefix of every replication slot an OutboxRelay creates: the operator recognises its
/// relays' slots by it (an orphaned `obr_…` slot is dropped by its ServiceDatabase).
pub const RELAY_SLOT_PREFIX: &str = "obr_";

/// The replication slot a Logical OutboxRelay owns: `obr_<name>_<hash>`. Unique per namespace
/// and name (the hash covers both, since slots are server-wide and two namespaces may share a
/// server), at most 63 bytes, and only characters Postgres allows in slot names.
pub fn relay_slot_name(namespace: &str, name: &str) -> String {
    derived_slot_name(RELAY_SLOT_KIND, namespace, name)
}

/// The [`derived_slot_name`] prefix of Logical relays' slots (see [`RELAY_SLOT_PREFIX`]).
pub const RELAY_SLOT_KIND: &str = "obr";
/// The [`derived_slot_name`] prefix of CDC connectors' slots.
pub const CDC_SLOT_KIND: &str = "cdc";

/// The name of a replication slot owned by the Kubernetes object `namespace/name`:
/// `<prefix>_<stem>_<hash>`, where `stem` is `name` lowercased with every other character turned
/// into `_` and cut to 40 characters, and `hash` is 8 hex digits of SHA-256 of `namespace/name`.
///
/// The hash makes the name unique per namespace and name (a stem alone is not: `orders-events`
/// and `orders_events` give the same stem, and namespaces are not in it); the stem keeps it
/// readable in `pg_replication_slots`. The result is at most 63 bytes and only uses characters
/// Postgres allows in slot names (`[a-z0-9_]`), given a `prefix` of that alphabet of at most 14
/// bytes. Different owners use different prefixes (`obr` for Logical relays, `cdc` for Debezium
/// connectors), so a relay and a ServiceDatabase with the same name never share a slot.
pub fn derived_slot_name(prefix: &str, namespace: &str, name: &str) -> String {
    let digest = Sha256::digest(format!("{namespace}/{name}").as_bytes());
    let suffix: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let stem: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("{prefix}_{stem}_{suffix}")
}

/// The slot of a standalone relay whose config names none: `servicedb_<schema>_<table>`, cut
/// to 63 bytes. Cut rather than hashed like [`Ident::with_suffix`], because existing standalone
/// relays already stream from slots named this way and a new name would start a new slot.
pub fn default_relay_slot(table: &QualifiedName) -> String {
    let mut s = format!("servicedb_{}_{}", table.schema, table.name);
    s.truncate(MAX_IDENT_LEN);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowercase_identifiers_are_accepted() {
        for ok in ["a", "_", "orders", "orders_api2", &"x".repeat(63)] {
            assert_eq!(Ident::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn identifiers_outside_the_admission_pattern_are_rejected() {
        assert_eq!(Ident::new(""), Err(IdentError::Empty));
        assert!(matches!(
            Ident::new("x".repeat(64)),
            Err(IdentError::TooLong { len: 64, .. })
        ));
        for bad in [
            "Orders",
            "1abc",
            "a-b",
            "a b",
            "x\"; drop table y; --",
            "a.b",
            "é",
            "a\0",
        ] {
            assert!(
                matches!(Ident::new(bad), Err(IdentError::InvalidCharacter { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn quoting_doubles_embedded_double_quotes() {
        assert_eq!(quote_ident("orders"), "\"orders\"");
        assert_eq!(
            quote_ident("x\"; drop table y; --"),
            "\"x\"\"; drop table y; --\""
        );
    }

    #[test]
    fn qualified_names_default_to_the_public_schema() {
        let q = QualifiedName::parse("outbox").unwrap();
        assert_eq!((q.schema.as_str(), q.name.as_str()), ("public", "outbox"));
        assert!(q.in_public_schema());
        let q = QualifiedName::parse("events.outbox").unwrap();
        assert_eq!(q.quoted(), "\"events\".\"outbox\"");
        assert_eq!(q.to_string(), "events.outbox");
        for bad in ["", ".", "a.", ".a", "a.b.c", "A.b", "a.b\"c"] {
            assert!(QualifiedName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn roles_derive_from_the_service_name() {
        let r = RoleNames::for_service("orders-api").unwrap();
        assert_eq!(r.app.as_str(), "orders_api");
        assert_eq!(r.relay.as_str(), "orders_api_relay");
        assert_eq!(r.cdc.as_str(), "orders_api_cdc");
        assert_eq!(r.outbox.as_str(), "orders_api_outbox");
        // 57 + "_outbox" = 64 bytes: refused, never truncated (admission caps services at 40).
        assert!(RoleNames::for_service(&"a".repeat(57)).is_err());
        assert!(RoleNames::for_service("Orders").is_err());
    }

    #[test]
    fn derived_object_names_fit_in_63_bytes_and_stay_distinct() {
        let short = QualifiedName::parse("events.outbox").unwrap();
        assert_eq!(outbox_publication(&short).as_str(), "outbox_pub");
        assert_eq!(outbox_notify_channel(&short).as_str(), "outbox_outbox");
        assert_eq!(
            cdc_publication(&Ident::new("orders").unwrap()).as_str(),
            "orders_cdc_pub"
        );

        let a = QualifiedName::parse(&"a".repeat(63)).unwrap();
        let b = QualifiedName::parse(&format!("{}b", "a".repeat(62))).unwrap();
        let (pa, pb) = (outbox_publication(&a), outbox_publication(&b));
        assert_eq!(pa.as_str().len(), 63);
        assert!(pa.as_str().ends_with("_pub"));
        assert_ne!(pa, pb);
        assert_eq!(pa, outbox_publication(&a), "derivation is deterministic");
        assert!(Ident::new(pa.as_str()).is_ok());
    }

    #[test]
    fn slot_names_are_short_lowercase_and_distinct_per_namespace() {
        let a = relay_slot_name("shop", "Orders-Events");
        let b = relay_slot_name("shop2", "Orders-Events");
        assert_ne!(a, b);
        assert!(a.starts_with(RELAY_SLOT_PREFIX), "{a}");
        assert!(a.len() <= 63);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{a}"
        );
        assert!(relay_slot_name("n", &"x".repeat(47)).len() <= 63);
        let table = QualifiedName::parse("outbox").unwrap();
        assert_eq!(default_relay_slot(&table), "servicedb_public_outbox");
        let long = QualifiedName::parse(&format!("{}.{}", "s".repeat(40), "t".repeat(40))).unwrap();
        assert_eq!(default_relay_slot(&long).len(), 63);
    }

    #[test]
    fn literals_come_only_from_operator_values() {
        let channel = Ident::new("outbox_outbox").unwrap();
        assert_eq!(Literal::from_ident(&channel).as_sql(), "'outbox_outbox'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b"), " E'a\\\\b'");
    }
}
