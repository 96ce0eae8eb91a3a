//! Tears down a service's database and roles for `deletionPolicy: Delete` (does database I/O).
//!
//! Safe to repeat and safe when things are already gone: every step is `IF EXISTS`. Logical
//! slots of the database are dropped first (Postgres refuses to drop a database that has
//! any), then the database with `WITH (FORCE)` (sessions terminated), then the roles.

use tokio_postgres::Client;
use tracing::info;

use super::PgError;
use super::connect::{ConnectError, ConnectParams, connect};
use super::identifiers::Ident;
use super::provision::{admin_info, admin_is_member};
use super::slots::{RELEASE_TIMEOUT, SlotError, drop_slot_with};
use super::sql;

/// What a teardown did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeprovisionReport {
    /// One line per object dropped; empty when everything was already gone.
    pub changes: Vec<String>,
}

/// Why a teardown failed.
#[derive(Debug, thiserror::Error)]
pub enum DeprovisionError {
    /// Could not connect.
    #[error("connecting to drop database {database}: {source}")]
    Connect {
        /// Database being dropped.
        database: Ident,
        /// Why.
        #[source]
        source: ConnectError,
    },
    /// A catalog query failed.
    #[error("reading the catalog ({what}): {source}")]
    ReadCatalog {
        /// What we looked up.
        what: &'static str,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// Becoming a member of the database owner (needed by a non-superuser admin) failed.
    #[error("granting role {role} to the admin: {source}")]
    GrantMembership {
        /// Role.
        role: Ident,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// A replication slot of the database could not be dropped.
    #[error("dropping the replication slots of database {database}: {source}")]
    DropSlot {
        /// Database.
        database: Ident,
        /// Why.
        #[source]
        source: SlotError,
    },
    /// `DROP DATABASE` failed.
    #[error("dropping database {database}: {source}")]
    DropDatabase {
        /// Database.
        database: Ident,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// `DROP ROLE` failed (e.g. it still owns objects in another database).
    #[error("dropping role {role}: {source}")]
    DropRole {
        /// Role.
        role: Ident,
        /// The server's answer.
        #[source]
        source: PgError,
    },
}

impl DeprovisionError {
    /// A short, stable category for Event reasons and metric labels.
    pub fn category(&self) -> &'static str {
        match self {
            DeprovisionError::Connect { source, .. } => source.category(),
            DeprovisionError::ReadCatalog { .. } => "ReadCatalogFailed",
            DeprovisionError::GrantMembership { .. } => "GrantMembershipFailed",
            DeprovisionError::DropSlot { source, .. } => source.category(),
            DeprovisionError::DropDatabase { .. } => "DropDatabaseFailed",
            DeprovisionError::DropRole { .. } => "DropRoleFailed",
        }
    }
}

/// Drops `database` (its slots, then the database, terminating sessions) and then `roles`.
/// `admin` points at the admin database. Pass every role the service may have had (app,
/// relay, cdc) even if some were never created: missing ones are skipped.
pub async fn deprovision(
    admin: &ConnectParams,
    database: &Ident,
    roles: &[Ident],
) -> Result<DeprovisionReport, DeprovisionError> {
    let mut report = DeprovisionReport::default();
    let client = connect(&admin.for_ddl())
        .await
        .map_err(|source| DeprovisionError::Connect {
            database: database.clone(),
            source,
        })?;
    let catalog = |what| {
        move |e: tokio_postgres::Error| DeprovisionError::ReadCatalog {
            what,
            source: e.into(),
        }
    };
    let who = admin_info(&client).await.map_err(catalog("admin role"))?;

    let owner: Option<String> = client
        .query_opt(
            "SELECT pg_catalog.pg_get_userbyid(datdba)::text FROM pg_catalog.pg_database WHERE datname = $1",
            &[&database.as_str()],
        )
        .await
        .map_err(catalog("database"))?
        .map(|r| r.get(0));
    if let Some(owner) = owner {
        // A non-superuser may drop only a database whose owner it is a member of. Provisioning
        // granted that; a half-finished provisioning may not have.
        if let Some(owner) = roles.iter().find(|r| r.as_str() == owner)
            && !who.superuser
            && !admin_is_member(&client, &who, owner)
                .await
                .map_err(catalog("membership"))?
        {
            exec(
                &client,
                &sql::grant_role_to_admin(owner, &who.name, who.server_version_num),
            )
            .await
            .map_err(|source| DeprovisionError::GrantMembership {
                role: owner.clone(),
                source,
            })?;
        }
        let slots = client
            .query(
                "SELECT slot_name::text FROM pg_catalog.pg_replication_slots WHERE database = $1",
                &[&database.as_str()],
            )
            .await
            .map_err(catalog("replication slots"))?;
        for row in slots {
            let slot: String = row.get(0);
            if drop_slot_with(&client, &slot, RELEASE_TIMEOUT)
                .await
                .map_err(|source| DeprovisionError::DropSlot {
                    database: database.clone(),
                    source,
                })?
            {
                report.change(format!("dropped replication slot {slot}"));
            }
        }
        exec(&client, &sql::drop_database(database))
            .await
            .map_err(|source| DeprovisionError::DropDatabase {
                database: database.clone(),
                source,
            })?;
        report.change(format!("dropped database {database}"));
    }

    for role in roles {
        let exists = client
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1",
                &[&role.as_str()],
            )
            .await
            .map_err(catalog("role"))?
            .is_some();
        if exists {
            exec(&client, &sql::drop_role(role))
                .await
                .map_err(|source| DeprovisionError::DropRole {
                    role: role.clone(),
                    source,
                })?;
            report.change(format!("dropped role {role}"));
        }
    }
    Ok(report)
}

impl DeprovisionReport {
    fn change(&mut self, what: String) {
        info!(change = %what, "deprovisioned");
        self.changes.push(what);
    }
}

async fn exec(client: &Client, statement: &str) -> Result<(), PgError> {
    tracing::debug!(%statement, "executing");
    client.batch_execute(statement).await.map_err(PgError)
}
