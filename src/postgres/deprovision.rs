//! Tears down a service's database and roles for `deletionPolicy: Delete` (does database I/O).
//!
//! Drops only what is marked as this ServiceDatabase's ([`super::ownership`]): a database or
//! role without our mark (never ours, or its mark removed) or with another's is left alone and
//! listed in [`DeprovisionReport::skipped`]. Safe to repeat and safe when things are already
//! gone. Logical slots of our database are dropped first (Postgres refuses to drop a database
//! that has any), then the database with `WITH (FORCE)` (sessions terminated), then the roles.

use tokio_postgres::Client;
use tracing::info;

use super::PgError;
use super::connect::{ConnectError, ConnectParams, connect};
use super::identifiers::Ident;
use super::ownership::{Holder, OwnerMark};
use super::provision::{admin_info, admin_is_member, database_comment};
use super::slots::{RELEASE_TIMEOUT, SlotError, drop_slot_with};
use super::sql;

/// What a teardown did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeprovisionReport {
    /// One line per object dropped; empty when everything was already gone.
    pub changes: Vec<String>,
    /// Objects that exist but were left alone, each with the reason (not marked as ours, or
    /// still holding something). The controller turns these into a Warning Event.
    pub skipped: Vec<String>,
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

/// Drops `database` (its slots, then the database, terminating sessions) and then `roles`,
/// each only when marked as `owner`'s. `admin` points at the admin database. Pass every role
/// the service may have had (app, relay, cdc, outbox owner) even if some were never created:
/// missing ones are skipped silently.
pub async fn deprovision(
    admin: &ConnectParams,
    owner: &OwnerMark,
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

    // Which roles are ours, read before anything is dropped.
    let mut our_roles = Vec::new();
    for role in roles {
        let comment: Option<Option<String>> = client
            .query_opt(
                "SELECT pg_catalog.shobj_description(oid, 'pg_authid') FROM pg_catalog.pg_roles WHERE rolname = $1",
                &[&role.as_str()],
            )
            .await
            .map_err(catalog("role"))?
            .map(|r| r.get(0));
        let Some(comment) = comment else { continue };
        match Holder::of(comment.as_deref(), owner) {
            Holder::Ours { .. } => our_roles.push(role.clone()),
            Holder::Unmarked => report.skip(format!(
                "role {role}: not marked as {}'s, left in place",
                owner.key()
            )),
            Holder::Other(Some(m)) => report.skip(format!(
                "role {role}: belongs to ServiceDatabase {}, left in place",
                m.key()
            )),
            Holder::Other(None) => report.skip(format!(
                "role {role}: carries an ownership mark this operator cannot read, left in place"
            )),
        }
    }

    if let Some((db_owner, comment)) = database_comment(&client, database)
        .await
        .map_err(catalog("database"))?
    {
        // Same rule as provisioning: unmarked but owned by one of our marked roles is ours (a
        // run interrupted between CREATE DATABASE and its COMMENT).
        let ours = match Holder::of(comment.as_deref(), owner) {
            Holder::Ours { .. } => true,
            Holder::Unmarked => our_roles.iter().any(|r| r.as_str() == db_owner),
            Holder::Other(_) => false,
        };
        if ours {
            drop_database(&client, &who, database, &db_owner, &our_roles, &mut report).await?;
        } else {
            report.skip(format!(
                "database {database}: not marked as {}'s, left in place",
                owner.key()
            ));
        }
    }

    for role in &our_roles {
        let exists = client
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1",
                &[&role.as_str()],
            )
            .await
            .map_err(catalog("role"))?
            .is_some();
        if !exists {
            continue;
        }
        match exec(&client, &sql::drop_role(role)).await {
            Ok(()) => report.change(format!("dropped role {role}")),
            // Still owns objects or holds privileges somewhere we do not drop (a database
            // that is not ours): leave it, and say so.
            Err(e) if e.sqlstate() == Some("2BP01") => {
                report.skip(format!("role {role}: {e}; left in place"));
            }
            Err(source) => {
                return Err(DeprovisionError::DropRole {
                    role: role.clone(),
                    source,
                });
            }
        }
    }
    Ok(report)
}

async fn drop_database(
    client: &Client,
    who: &super::provision::Admin,
    database: &Ident,
    db_owner: &str,
    our_roles: &[Ident],
    report: &mut DeprovisionReport,
) -> Result<(), DeprovisionError> {
    let catalog = |what| {
        move |e: tokio_postgres::Error| DeprovisionError::ReadCatalog {
            what,
            source: e.into(),
        }
    };
    // A non-superuser may drop only a database whose owner it is a member of. Provisioning
    // granted that; a half-finished provisioning may not have.
    if let Some(owner) = our_roles.iter().find(|r| r.as_str() == db_owner)
        && !who.superuser
        && !admin_is_member(client, who, owner)
            .await
            .map_err(catalog("membership"))?
    {
        exec(
            client,
            &sql::grant_role_to_admin(owner, &who.name, who.server_version_num),
        )
        .await
        .map_err(|source| DeprovisionError::GrantMembership {
            role: owner.clone(),
            source,
        })?;
    }
    // Only the slots of our own database.
    let slots = client
        .query(
            "SELECT slot_name::text FROM pg_catalog.pg_replication_slots WHERE database = $1",
            &[&database.as_str()],
        )
        .await
        .map_err(catalog("replication slots"))?;
    for row in slots {
        let slot: String = row.get(0);
        if drop_slot_with(client, &slot, RELEASE_TIMEOUT)
            .await
            .map_err(|source| DeprovisionError::DropSlot {
                database: database.clone(),
                source,
            })?
        {
            report.change(format!("dropped replication slot {slot}"));
        }
    }
    exec(client, &sql::drop_database(database))
        .await
        .map_err(|source| DeprovisionError::DropDatabase {
            database: database.clone(),
            source,
        })?;
    report.change(format!("dropped database {database}"));
    Ok(())
}

impl DeprovisionReport {
    fn change(&mut self, what: String) {
        info!(change = %what, "deprovisioned");
        self.changes.push(what);
    }

    fn skip(&mut self, what: String) {
        info!(skipped = %what, "left in place");
        self.skipped.push(what);
    }
}

async fn exec(client: &Client, statement: &str) -> Result<(), PgError> {
    tracing::debug!(%statement, "executing");
    client.batch_execute(statement).await.map_err(PgError)
}
