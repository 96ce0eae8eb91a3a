//! Reads back what exists — database, roles, outbox — for status, and the catalog lookups the
//! other modules share (does database I/O; read-only, every value a bind parameter).

use std::collections::BTreeSet;

use tokio_postgres::GenericClient;

use super::PgError;
use super::connect::{ConnectError, ConnectParams, connect};
use super::identifiers::{Ident, QualifiedName};
use super::sql::{RoleAttributes, TablePrivilege};

/// What exists on the server for one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inspection {
    /// `server_version_num` (150004, 170002, ...).
    pub server_version_num: i32,
    /// Owner of the database, `None` when the database does not exist.
    pub database_owner: Option<String>,
    /// The roles asked about, in order.
    pub roles: Vec<RoleState>,
    /// The outbox, when asked about and the database exists.
    pub outbox: Option<OutboxState>,
}

impl Inspection {
    /// True when the database exists.
    pub fn database_exists(&self) -> bool {
        self.database_owner.is_some()
    }

    /// True when every role asked about exists.
    pub fn roles_exist(&self) -> bool {
        self.roles.iter().all(|r| r.attributes.is_some())
    }
}

/// One role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleState {
    /// Name.
    pub name: Ident,
    /// Its attributes; `None` when it does not exist.
    pub attributes: Option<RoleAttributes>,
}

/// The outbox table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxState {
    /// The table.
    pub table: QualifiedName,
    /// Its owner; `None` when it does not exist.
    pub owner: Option<String>,
    /// Shape problems (missing columns, wrong types); empty when it is as the relay expects.
    pub problems: Vec<String>,
}

impl OutboxState {
    /// Exists with the expected shape.
    pub fn ready(&self) -> bool {
        self.owner.is_some() && self.problems.is_empty()
    }
}

/// Why inspection failed.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// Could not connect.
    #[error("connecting to database {database}: {source}")]
    Connect {
        /// Database.
        database: String,
        /// Why.
        #[source]
        source: ConnectError,
    },
    /// A catalog query failed.
    #[error("reading the catalog ({what}): {source}")]
    Query {
        /// What we looked up.
        what: &'static str,
        /// The server's answer.
        #[source]
        source: PgError,
    },
}

impl InspectError {
    /// A short, stable category for Event reasons and metric labels.
    pub fn category(&self) -> &'static str {
        match self {
            InspectError::Connect { source, .. } => source.category(),
            InspectError::Query { .. } => "ReadCatalogFailed",
        }
    }
}

/// Reads the state of `database`, `roles` and (inside the database) `outbox`.
pub async fn inspect(
    admin: &ConnectParams,
    database: &Ident,
    roles: &[Ident],
    outbox: Option<&QualifiedName>,
) -> Result<Inspection, InspectError> {
    let q = |what| {
        move |e: tokio_postgres::Error| InspectError::Query {
            what,
            source: e.into(),
        }
    };
    let client = connect(admin)
        .await
        .map_err(|source| InspectError::Connect {
            database: admin.dbname.clone(),
            source,
        })?;
    let server_version_num: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(q("server version"))?
        .get(0);
    let database_owner: Option<String> = client
        .query_opt(
            "SELECT pg_catalog.pg_get_userbyid(datdba)::text FROM pg_catalog.pg_database WHERE datname = $1",
            &[&database.as_str()],
        )
        .await
        .map_err(q("database"))?
        .map(|r| r.get(0));
    let mut role_states = Vec::with_capacity(roles.len());
    for role in roles {
        let attributes = role_attributes(&client, role).await.map_err(q("role"))?;
        role_states.push(RoleState {
            name: role.clone(),
            attributes,
        });
    }
    drop(client);

    let outbox = match (outbox, &database_owner) {
        (Some(table), Some(_)) => {
            let db = connect(&admin.with_dbname(database.as_str()))
                .await
                .map_err(|source| InspectError::Connect {
                    database: database.to_string(),
                    source,
                })?;
            let owner = table_owner(&db, table).await.map_err(q("outbox table"))?;
            let problems = if owner.is_some() {
                outbox_column_problems(
                    &table_columns(&db, table)
                        .await
                        .map_err(q("outbox columns"))?,
                )
            } else {
                Vec::new()
            };
            Some(OutboxState {
                table: table.clone(),
                owner,
                problems,
            })
        }
        _ => None,
    };
    Ok(Inspection {
        server_version_num,
        database_owner,
        roles: role_states,
        outbox,
    })
}

/// The columns the relay and Debezium's outbox router rely on, with `format_type` spellings.
pub const OUTBOX_COLUMNS: [(&str, &str); 8] = [
    ("id", "uuid"),
    ("aggregatetype", "text"),
    ("aggregateid", "text"),
    ("type", "text"),
    ("payload", "jsonb"),
    ("headers", "jsonb"),
    ("created_at", "timestamp with time zone"),
    ("seq", "bigint"),
];

/// Compares an existing table's `(column, type)` list with [`OUTBOX_COLUMNS`] (pure).
pub fn outbox_column_problems(actual: &[(String, String)]) -> Vec<String> {
    OUTBOX_COLUMNS
        .iter()
        .filter_map(|(name, ty)| match actual.iter().find(|(n, _)| n == name) {
            None => Some(format!("column {name} ({ty}) is missing")),
            Some((_, t)) if t != ty => Some(format!("column {name} is {t}, expected {ty}")),
            Some(_) => None,
        })
        .collect()
}

pub(crate) async fn role_attributes<C: GenericClient + Sync>(
    client: &C,
    role: &Ident,
) -> Result<Option<RoleAttributes>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolinherit, rolreplication, rolbypassrls \
             FROM pg_catalog.pg_roles WHERE rolname = $1",
            &[&role.as_str()],
        )
        .await?
        .map(|r| RoleAttributes {
            login: r.get(0),
            superuser: r.get(1),
            createdb: r.get(2),
            createrole: r.get(3),
            inherit: r.get(4),
            replication: r.get(5),
            bypassrls: r.get(6),
        }))
}

/// Owner of any relation with this name (table, index, ...), `None` when there is none.
pub(crate) async fn relation_exists<C: GenericClient + Sync>(
    client: &C,
    rel: &QualifiedName,
) -> Result<Option<String>, tokio_postgres::Error> {
    relation_owner(client, rel, false).await
}

/// Owner of the table (plain or partitioned), `None` when there is none.
pub(crate) async fn table_owner<C: GenericClient + Sync>(
    client: &C,
    table: &QualifiedName,
) -> Result<Option<String>, tokio_postgres::Error> {
    relation_owner(client, table, true).await
}

async fn relation_owner<C: GenericClient + Sync>(
    client: &C,
    rel: &QualifiedName,
    tables_only: bool,
) -> Result<Option<String>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT pg_catalog.pg_get_userbyid(c.relowner)::text FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND (NOT $3 OR c.relkind IN ('r', 'p'))",
            &[&rel.schema.as_str(), &rel.name.as_str(), &tables_only],
        )
        .await?
        .map(|r| r.get(0)))
}

pub(crate) async fn schema_exists<C: GenericClient + Sync>(
    client: &C,
    schema: &Ident,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1",
            &[&schema.as_str()],
        )
        .await?
        .is_some())
}

pub(crate) async fn table_columns<C: GenericClient + Sync>(
    client: &C,
    table: &QualifiedName,
) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod) \
             FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&table.schema.as_str(), &table.name.as_str()],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Privileges granted directly to `role` on `table`, from the ACL itself (ownership and
/// PUBLIC grants are not counted: this is what we granted, hence what we may revoke).
pub(crate) async fn table_privileges<C: GenericClient + Sync>(
    client: &C,
    table: &QualifiedName,
    role: &Ident,
) -> Result<BTreeSet<TablePrivilege>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.privilege_type FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace, \
             aclexplode(COALESCE(c.relacl, acldefault('r', c.relowner))) a \
             WHERE n.nspname = $1 AND c.relname = $2 \
             AND a.grantee = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $3)",
            &[&table.schema.as_str(), &table.name.as_str(), &role.as_str()],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| TablePrivilege::parse(r.get(0)))
        .collect())
}

/// Tables of a publication, `None` when the publication does not exist. Names that do not
/// pass [`Ident`] validation (tables someone added by hand) are kept out: we never touch them.
pub(crate) async fn publication_tables<C: GenericClient + Sync>(
    client: &C,
    publication: &Ident,
) -> Result<Option<BTreeSet<QualifiedName>>, tokio_postgres::Error> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[&publication.as_str()],
        )
        .await?
        .is_some();
    if !exists {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_catalog.pg_publication_tables WHERE pubname = $1",
            &[&publication.as_str()],
        )
        .await?;
    Ok(Some(
        rows.iter()
            .filter_map(|r| {
                let schema = Ident::new(r.get::<_, String>(0)).ok()?;
                let name = Ident::new(r.get::<_, String>(1)).ok()?;
                Some(QualifiedName { schema, name })
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outbox_with_every_column_has_no_problems() {
        let cols: Vec<_> = OUTBOX_COLUMNS
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        assert!(outbox_column_problems(&cols).is_empty());
    }

    #[test]
    fn missing_and_mistyped_outbox_columns_are_reported() {
        let cols = vec![("id".to_owned(), "text".to_owned())];
        let problems = outbox_column_problems(&cols);
        assert_eq!(problems[0], "column id is text, expected uuid");
        assert_eq!(problems.len(), OUTBOX_COLUMNS.len());
    }
}
