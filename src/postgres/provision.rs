//! Converges a service's database, roles, grants, outbox and publications to a
//! [`DatabasePlan`] (does database I/O).
//!
//! Idempotent by construction: every step reads the catalog first and acts only on a
//! difference, so a second run issues no DDL and reports no change. Works with a superuser
//! admin (managed instances) and with a CREATEDB+CREATEROLE admin (RDS-like servers): such an
//! admin makes itself a member of each role it creates, which is what Postgres requires to
//! create a database owned by a role, to act as it (`SET ROLE`) and to signal its sessions.
//!
//! Inside the service's database everything is created *as the app role* (`SET LOCAL ROLE`),
//! so the app owns its schema objects (it can ALTER and migrate them) and no object ends up
//! owned by the admin. Those steps run in one transaction: a failure leaves nothing
//! half-applied.

use std::collections::BTreeSet;

use tokio_postgres::{Client, GenericClient, Transaction};
use tracing::{debug, info};

use super::connect::{ConnectError, ConnectParams, connect};
use super::identifiers::{Ident, QualifiedName, cdc_publication, outbox_publication};
use super::passwords::Password;
use super::sql::{self, Publish, RoleAttributes, TablePrivilege};
use super::{PgError, inspect};

/// A role to converge.
#[derive(Clone, Debug)]
pub struct RolePlan {
    /// Role name.
    pub name: Ident,
    /// A password to set now: on creation, and when its credentials Secret was lost. `None`
    /// leaves an existing password alone; the controller decides, never this module.
    pub set_password: Option<Password>,
    /// REPLICATION attribute (Logical relay, CDC). Revoked when no longer asked for. Ignored
    /// for the app role, which never gets it.
    pub replication: bool,
}

impl RolePlan {
    /// A role without REPLICATION and without a password change.
    pub fn new(name: Ident) -> Self {
        RolePlan {
            name,
            set_password: None,
            replication: false,
        }
    }
}

/// The CDC role and the tables it may read.
#[derive(Clone, Debug)]
pub struct CdcPlan {
    /// The role Debezium logs in as (usually with `replication: true`).
    pub role: RolePlan,
    /// Tables it may SELECT and that the CDC publication carries. Tables that do not exist
    /// (yet: the app creates them in its migrations) are reported, and picked up on a later run.
    pub tables: Vec<QualifiedName>,
}

/// Everything the operator maintains in and around one service's database.
#[derive(Clone, Debug)]
pub struct DatabasePlan {
    /// The database, owned by the app role.
    pub database: Ident,
    /// The owner role.
    pub app: RolePlan,
    /// The relay role: SELECT and DELETE on the outbox only.
    pub relay: Option<RolePlan>,
    /// The CDC role and its tables; also drives the `<db>_cdc_pub` publication.
    pub cdc: Option<CdcPlan>,
    /// Extensions to create (`CREATE EXTENSION IF NOT EXISTS ... CASCADE`).
    pub extensions: Vec<Ident>,
    /// The outbox table, when enabled.
    pub outbox: Option<QualifiedName>,
    /// Maintain the `<table>_pub` publication (a Logical relay needs it); dropped when false.
    pub outbox_publication: bool,
    /// Also grant the relay `UPDATE (created_at)` on the outbox. Postgres requires UPDATE on
    /// at least one column for `SELECT ... FOR UPDATE [SKIP LOCKED]`, so a Poll relay that
    /// claims rows with row locks needs this; one harmless column keeps the grant minimal.
    /// Revoked when false.
    pub relay_row_locks: bool,
}

impl DatabasePlan {
    /// A plan with just the database and its owner.
    pub fn new(database: Ident, app: RolePlan) -> Self {
        DatabasePlan {
            database,
            app,
            relay: None,
            cdc: None,
            extensions: Vec::new(),
            outbox: None,
            outbox_publication: false,
            relay_row_locks: false,
        }
    }

    /// The plan for a ServiceDatabase spec (pure). `logical_relay` is true while any
    /// OutboxRelay in `Logical` mode points at this database: it adds REPLICATION to the relay
    /// role and maintains the outbox publication (both removed again when it turns false).
    ///
    /// The relay role exists whenever the outbox is enabled (its Secret does too) and always
    /// gets the row-lock grant, so a `Poll` relay works without the controller tracking modes.
    /// The cdc role gets REPLICATION (Debezium streams from a slot). No password is set: the
    /// controller fills `set_password` when it has generated one or lost a Secret.
    pub fn for_spec(
        spec: &crate::api::ServiceDatabaseSpec,
        logical_relay: bool,
    ) -> Result<Self, super::IdentError> {
        let roles = super::RoleNames::for_service(&spec.owner.service)?;
        let mut plan =
            DatabasePlan::new(Ident::new(spec.database_name())?, RolePlan::new(roles.app));
        plan.extensions = spec
            .database
            .extensions
            .iter()
            .map(|e| Ident::new(e.0.as_str()))
            .collect::<Result<_, _>>()?;
        if let Some(outbox) = spec.enabled_outbox() {
            plan.outbox = Some(QualifiedName::parse(&outbox.table)?);
            plan.relay = Some(RolePlan {
                replication: logical_relay,
                ..RolePlan::new(roles.relay)
            });
            plan.outbox_publication = logical_relay;
            // The relay claims a batch with `DELETE ... RETURNING` inside its transaction (its
            // advisory lock makes it the only claimant), so SELECT and DELETE suffice: no row
            // locks, no UPDATE grant.
            plan.relay_row_locks = false;
        }
        if let Some(cdc) = &spec.cdc {
            plan.cdc = Some(CdcPlan {
                role: RolePlan {
                    replication: true,
                    ..RolePlan::new(roles.cdc)
                },
                tables: cdc
                    .tables
                    .iter()
                    .map(|t| QualifiedName::parse(&t.0))
                    .collect::<Result<_, _>>()?,
            });
        }
        Ok(plan)
    }

    /// Every role with the attributes it should have.
    fn roles(&self) -> impl Iterator<Item = (&RolePlan, RoleAttributes)> {
        std::iter::once((&self.app, RoleAttributes::app_role()))
            .chain(
                self.relay
                    .iter()
                    .map(|r| (r, RoleAttributes::service_role(r.replication))),
            )
            .chain(
                self.cdc
                    .iter()
                    .map(|c| (&c.role, RoleAttributes::service_role(c.role.replication))),
            )
    }
}

/// What a provisioning run did and found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProvisionReport {
    /// One line per change made (`created role orders_api`), in order. Empty on a no-op run.
    pub changes: Vec<String>,
    /// CDC tables that do not exist (yet).
    pub missing_cdc_tables: Vec<QualifiedName>,
    /// Things that are not as they should be but that the admin may not fix (an outbox table
    /// with a foreign shape, a `public` schema it cannot take over on Postgres 14).
    pub warnings: Vec<String>,
}

impl ProvisionReport {
    /// True when the run changed anything.
    pub fn changed(&self) -> bool {
        !self.changes.is_empty()
    }

    fn change(&mut self, what: String) {
        info!(change = %what, "provisioned");
        self.changes.push(what);
    }
}

/// Why provisioning failed. Each variant names the step; `source` carries the server's words.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// Could not connect (admin database or the service's database).
    #[error("connecting to database {database}: {source}")]
    Connect {
        /// Database we tried.
        database: String,
        /// Why.
        #[source]
        source: ConnectError,
    },
    /// A catalog query failed.
    #[error("reading the catalog ({what}): {source}")]
    ReadCatalog {
        /// What we were looking up.
        what: &'static str,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// `CREATE ROLE` failed (on Postgres 15 a non-superuser cannot create REPLICATION roles).
    #[error("creating role {role}: {source}")]
    CreateRole {
        /// Role.
        role: Ident,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// `ALTER ROLE` (attributes) failed.
    #[error("changing attributes of role {role}: {source}")]
    AlterRole {
        /// Role.
        role: Ident,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// Setting a password failed.
    #[error("setting the password of role {role}: {source}")]
    SetPassword {
        /// Role.
        role: Ident,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// The role whose password was to be set does not exist.
    #[error("role {role} does not exist")]
    RoleMissing {
        /// Role.
        role: Ident,
    },
    /// Granting the admin membership of a role failed.
    #[error("granting role {role} to the admin: {source}")]
    GrantMembership {
        /// Role.
        role: Ident,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// `CREATE DATABASE` failed.
    #[error("creating database {database}: {source}")]
    CreateDatabase {
        /// Database.
        database: Ident,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// Handing the database to the app role failed.
    #[error("making {owner} the owner of database {database}: {source}")]
    AlterDatabaseOwner {
        /// Database.
        database: Ident,
        /// Intended owner.
        owner: Ident,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// Revoking CONNECT/TEMPORARY from PUBLIC failed.
    #[error("revoking PUBLIC access to database {database}: {source}")]
    RestrictDatabase {
        /// Database.
        database: Ident,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// `GRANT CONNECT` failed.
    #[error("granting CONNECT on {database} to {role}: {source}")]
    GrantConnect {
        /// Database.
        database: Ident,
        /// Role.
        role: Ident,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// `CREATE EXTENSION` failed (not installed, or not trusted and the admin is no superuser).
    #[error("creating extension {extension}: {source}")]
    CreateExtension {
        /// Extension.
        extension: Ident,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// Locking down the `public` schema failed.
    #[error("securing schema public: {source}")]
    SecurePublicSchema {
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// Creating the outbox's schema failed.
    #[error("creating schema {schema}: {source}")]
    CreateSchema {
        /// Schema.
        schema: Ident,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// Creating the outbox table, its index or its trigger failed.
    #[error("creating outbox table {table}: {source}")]
    CreateOutbox {
        /// Table.
        table: QualifiedName,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// Handing an existing outbox table to the app role failed.
    #[error("making the app role the owner of outbox table {table}: {source}")]
    AlterOutboxOwner {
        /// Table.
        table: QualifiedName,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// Granting or revoking table/schema privileges failed.
    #[error("setting privileges of {role} on {table}: {source}")]
    GrantPrivileges {
        /// Role.
        role: Ident,
        /// Table.
        table: QualifiedName,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// Creating, altering or dropping a publication failed.
    #[error("maintaining publication {publication}: {source}")]
    Publication {
        /// Publication.
        publication: Ident,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// BEGIN/COMMIT/SET ROLE failed.
    #[error("transaction in database {database}: {source}")]
    Transaction {
        /// Database.
        database: Ident,
        /// The server's answer.
        #[source]
        source: PgError,
    },
}

impl ProvisionError {
    /// A short, stable category for Event reasons and metric labels.
    pub fn category(&self) -> &'static str {
        use ProvisionError as E;
        match self {
            E::Connect { source, .. } => source.category(),
            E::ReadCatalog { .. } => "ReadCatalogFailed",
            E::CreateRole { .. } => "CreateRoleFailed",
            E::AlterRole { .. } => "AlterRoleFailed",
            E::SetPassword { .. } => "SetPasswordFailed",
            E::RoleMissing { .. } => "RoleMissing",
            E::GrantMembership { .. } => "GrantMembershipFailed",
            E::CreateDatabase { .. } => "CreateDatabaseFailed",
            E::AlterDatabaseOwner { .. } => "AlterDatabaseOwnerFailed",
            E::RestrictDatabase { .. } => "RestrictDatabaseFailed",
            E::GrantConnect { .. } => "GrantConnectFailed",
            E::CreateExtension { .. } => "CreateExtensionFailed",
            E::SecurePublicSchema { .. } => "SecurePublicSchemaFailed",
            E::CreateSchema { .. } => "CreateSchemaFailed",
            E::CreateOutbox { .. } => "CreateOutboxFailed",
            E::AlterOutboxOwner { .. } => "AlterOutboxOwnerFailed",
            E::GrantPrivileges { .. } => "GrantPrivilegesFailed",
            E::Publication { .. } => "PublicationFailed",
            E::Transaction { .. } => "TransactionFailed",
        }
    }

    /// The SQLSTATE, when the server answered (`42501` = insufficient privilege).
    pub fn sqlstate(&self) -> Option<&str> {
        use ProvisionError as E;
        match self {
            E::Connect { source, .. } => source.sqlstate(),
            E::RoleMissing { .. } => None,
            E::ReadCatalog { source, .. }
            | E::CreateRole { source, .. }
            | E::AlterRole { source, .. }
            | E::SetPassword { source, .. }
            | E::GrantMembership { source, .. }
            | E::CreateDatabase { source, .. }
            | E::AlterDatabaseOwner { source, .. }
            | E::RestrictDatabase { source, .. }
            | E::GrantConnect { source, .. }
            | E::CreateExtension { source, .. }
            | E::SecurePublicSchema { source, .. }
            | E::CreateSchema { source, .. }
            | E::CreateOutbox { source, .. }
            | E::AlterOutboxOwner { source, .. }
            | E::GrantPrivileges { source, .. }
            | E::Publication { source, .. }
            | E::Transaction { source, .. } => source.sqlstate(),
        }
    }
}

type Result<T, E = ProvisionError> = std::result::Result<T, E>;

/// Who the admin is, which decides how much it may do itself.
#[derive(Clone, Debug)]
pub(crate) struct Admin {
    pub(crate) name: String,
    pub(crate) superuser: bool,
    pub(crate) server_version_num: i32,
}

pub(crate) async fn admin_info(client: &Client) -> Result<Admin, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_user::text, r.rolsuper, current_setting('server_version_num')::int \
             FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    Ok(Admin {
        name: row.get(0),
        superuser: row.get(1),
        server_version_num: row.get(2),
    })
}

async fn connect_to(params: &ConnectParams, database: &str) -> Result<Client> {
    connect(&params.with_dbname(database).for_ddl())
        .await
        .map_err(|source| ProvisionError::Connect {
            database: database.to_owned(),
            source,
        })
}

fn catalog(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> ProvisionError {
    move |e| ProvisionError::ReadCatalog {
        what,
        source: e.into(),
    }
}

/// Runs a statement that holds no secret; its text is logged at debug level.
async fn exec<C: GenericClient + Sync>(client: &C, statement: &str) -> Result<(), PgError> {
    debug!(%statement, "executing");
    client.batch_execute(statement).await.map_err(PgError)
}

/// Runs a statement carrying a password verifier; its text is never logged.
async fn exec_secret(client: &Client, statement: &str) -> Result<(), PgError> {
    client.batch_execute(statement).await.map_err(PgError)
}

/// Converges the server to `plan`. `admin` points at the admin database (`postgres`) with a
/// superuser or a CREATEDB+CREATEROLE role. Safe to run any number of times.
pub async fn provision(admin: &ConnectParams, plan: &DatabasePlan) -> Result<ProvisionReport> {
    let mut report = ProvisionReport::default();
    let client = connect_to(admin, &admin.dbname).await?;
    let who = admin_info(&client).await.map_err(catalog("admin role"))?;
    debug!(admin = %who.name, superuser = who.superuser, version = who.server_version_num,
        database = %plan.database, "provisioning");

    for (role, attributes) in plan.roles() {
        ensure_role(&client, role, &attributes, &mut report).await?;
        ensure_admin_membership(&client, &who, &role.name, &mut report).await?;
    }
    ensure_database(&client, plan, &mut report).await?;
    drop(client);

    let mut db = connect_to(admin, plan.database.as_str()).await?;
    let tx_err = |e: tokio_postgres::Error| ProvisionError::Transaction {
        database: plan.database.clone(),
        source: e.into(),
    };
    let mut tx = db.transaction().await.map_err(tx_err)?;
    secure_public_schema_owner(&mut tx, &who, plan, &mut report).await?;
    if let Some(outbox) = &plan.outbox {
        ensure_outbox_owner(&tx, outbox, &plan.app.name, &mut report).await?;
    }
    ensure_extensions(&tx, &who, plan, &mut report).await?;

    // From here on, act as the app role: it owns what gets created and it is the grantor.
    exec(&tx, &sql::set_role(&plan.app.name))
        .await
        .map_err(|source| ProvisionError::Transaction {
            database: plan.database.clone(),
            source,
        })?;
    revoke_public_create(&tx, &mut report).await?;
    if let Some(outbox) = &plan.outbox {
        ensure_outbox(&tx, outbox, &mut report).await?;
        if let Some(relay) = &plan.relay {
            let privs = BTreeSet::from([TablePrivilege::Select, TablePrivilege::Delete]);
            ensure_table_privileges(&tx, &relay.name, outbox, &privs, &mut report).await?;
            ensure_row_lock_column(&tx, &relay.name, outbox, plan.relay_row_locks, &mut report)
                .await?;
        }
    }
    let mut cdc_tables = Vec::new();
    if let Some(cdc) = &plan.cdc {
        for table in &cdc.tables {
            if inspect::table_owner(&tx, table)
                .await
                .map_err(catalog("cdc table"))?
                .is_none()
            {
                report.missing_cdc_tables.push(table.clone());
                continue;
            }
            let privs = BTreeSet::from([TablePrivilege::Select]);
            ensure_table_privileges(&tx, &cdc.role.name, table, &privs, &mut report).await?;
            cdc_tables.push(table.clone());
        }
    }
    let outbox_pub = plan.outbox.as_ref().map(|o| (outbox_publication(o), o));
    match outbox_pub {
        Some((name, table)) if plan.outbox_publication => {
            let tables = std::slice::from_ref(table);
            ensure_publication(&tx, &name, tables, Publish::InsertsOnly, &mut report).await?;
        }
        Some((name, _)) => drop_publication_if_exists(&tx, &name, &mut report).await?,
        None => {}
    }
    let cdc_pub = cdc_publication(&plan.database);
    if plan.cdc.is_some() {
        ensure_publication(&tx, &cdc_pub, &cdc_tables, Publish::Everything, &mut report).await?;
    } else {
        drop_publication_if_exists(&tx, &cdc_pub, &mut report).await?;
    }
    tx.commit().await.map_err(tx_err)?;
    Ok(report)
}

async fn ensure_role(
    client: &Client,
    role: &RolePlan,
    desired: &RoleAttributes,
    report: &mut ProvisionReport,
) -> Result<()> {
    let verifier = role.set_password.as_ref().map(Password::scram_verifier);
    match inspect::role_attributes(client, &role.name)
        .await
        .map_err(catalog("role"))?
    {
        None => {
            exec_secret(
                client,
                &sql::create_role(&role.name, desired, verifier.as_ref()),
            )
            .await
            .map_err(|source| ProvisionError::CreateRole {
                role: role.name.clone(),
                source,
            })?;
            report.change(format!("created role {}", role.name));
        }
        Some(current) => {
            let changes = sql::attribute_changes(&current, desired);
            if !changes.is_empty() {
                exec(client, &sql::alter_role(&role.name, &changes))
                    .await
                    .map_err(|source| ProvisionError::AlterRole {
                        role: role.name.clone(),
                        source,
                    })?;
                report.change(format!("altered role {}: {}", role.name, changes.join(" ")));
            }
            if let Some(v) = &verifier {
                exec_secret(client, &sql::alter_role_password(&role.name, v))
                    .await
                    .map_err(|source| ProvisionError::SetPassword {
                        role: role.name.clone(),
                        source,
                    })?;
                report.change(format!("set the password of role {}", role.name));
            }
        }
    }
    Ok(())
}

/// A non-superuser admin must be a member of a role to create a database it owns, `SET ROLE`
/// to it, and terminate its sessions. Superusers need nothing.
async fn ensure_admin_membership(
    client: &Client,
    admin: &Admin,
    role: &Ident,
    report: &mut ProvisionReport,
) -> Result<()> {
    if admin.superuser {
        return Ok(());
    }
    if !admin_is_member(client, admin, role)
        .await
        .map_err(catalog("role membership"))?
    {
        exec(
            client,
            &sql::grant_role_to_admin(role, &admin.name, admin.server_version_num),
        )
        .await
        .map_err(|source| ProvisionError::GrantMembership {
            role: role.clone(),
            source,
        })?;
        report.change(format!("granted role {role} to admin {}", admin.name));
    }
    Ok(())
}

/// True when the admin is a direct member of `role` with what it needs (on 16+ a membership
/// row may exist without SET/INHERIT: CREATEROLE's implicit ADMIN grant).
pub(crate) async fn admin_is_member(
    client: &Client,
    admin: &Admin,
    role: &Ident,
) -> Result<bool, tokio_postgres::Error> {
    let options = if admin.server_version_num >= 160_000 {
        " AND m.set_option AND m.inherit_option"
    } else {
        ""
    };
    let query = format!(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_auth_members m \
         JOIN pg_catalog.pg_roles r ON r.oid = m.roleid \
         WHERE r.rolname = $1 AND m.member = \
         (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user){options})"
    );
    Ok(client.query_one(&query, &[&role.as_str()]).await?.get(0))
}

async fn ensure_database(
    client: &Client,
    plan: &DatabasePlan,
    report: &mut ProvisionReport,
) -> Result<()> {
    let db = &plan.database;
    let owner: Option<String> = client
        .query_opt(
            "SELECT pg_catalog.pg_get_userbyid(datdba)::text FROM pg_catalog.pg_database WHERE datname = $1",
            &[&db.as_str()],
        )
        .await
        .map_err(catalog("database"))?
        .map(|r| r.get(0));
    match owner {
        None => {
            // Not in a transaction: CREATE DATABASE refuses to run in one.
            exec(client, &sql::create_database(db, &plan.app.name))
                .await
                .map_err(|source| ProvisionError::CreateDatabase {
                    database: db.clone(),
                    source,
                })?;
            report.change(format!("created database {db} owned by {}", plan.app.name));
        }
        Some(owner) if owner != plan.app.name.as_str() => {
            exec(client, &sql::alter_database_owner(db, &plan.app.name))
                .await
                .map_err(|source| ProvisionError::AlterDatabaseOwner {
                    database: db.clone(),
                    owner: plan.app.name.clone(),
                    source,
                })?;
            report.change(format!(
                "changed the owner of database {db} from {owner} to {}",
                plan.app.name
            ));
        }
        Some(_) => {}
    }

    let public_privs = database_privileges(client, db, None).await?;
    if public_privs
        .iter()
        .any(|p| p == "CONNECT" || p == "TEMPORARY")
    {
        exec(client, &sql::revoke_database_from_public(db))
            .await
            .map_err(|source| ProvisionError::RestrictDatabase {
                database: db.clone(),
                source,
            })?;
        report.change(format!(
            "revoked CONNECT and TEMPORARY on database {db} from PUBLIC"
        ));
    }
    // The app owns the database and holds CONNECT through ownership; the others need a grant.
    let grantees = plan.relay.iter().chain(plan.cdc.as_ref().map(|c| &c.role));
    for role in grantees {
        let privs = database_privileges(client, db, Some(&role.name)).await?;
        if !privs.iter().any(|p| p == "CONNECT") {
            exec(client, &sql::grant_connect(db, &role.name))
                .await
                .map_err(|source| ProvisionError::GrantConnect {
                    database: db.clone(),
                    role: role.name.clone(),
                    source,
                })?;
            report.change(format!("granted CONNECT on database {db} to {}", role.name));
        }
    }
    Ok(())
}

/// Privileges granted directly on a database to `role` (PUBLIC when `None`), read from the ACL
/// itself rather than `has_database_privilege`, which would also count ownership and membership.
async fn database_privileges(
    client: &Client,
    db: &Ident,
    role: Option<&Ident>,
) -> Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT a.privilege_type FROM pg_catalog.pg_database d, \
             aclexplode(COALESCE(d.datacl, acldefault('d', d.datdba))) a \
             WHERE d.datname = $1 AND a.grantee = \
             COALESCE((SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $2), 0)",
            &[&db.as_str(), &role.map(Ident::as_str)],
        )
        .await
        .map_err(catalog("database privileges"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// On Postgres 15+ `public` belongs to `pg_database_owner`, i.e. to the app as database owner:
/// nothing to do. On 14 it belongs to the bootstrap superuser and PUBLIC may create in it; hand
/// it to the app (superusers can; a non-superuser admin gets a warning, not a failure, since
/// the database is usable and the server's policy is not ours to override).
async fn secure_public_schema_owner(
    tx: &mut Transaction<'_>,
    admin: &Admin,
    plan: &DatabasePlan,
    report: &mut ProvisionReport,
) -> Result<()> {
    let public = Ident::public();
    let owner: Option<String> = tx
        .query_opt(
            "SELECT pg_catalog.pg_get_userbyid(nspowner)::text FROM pg_catalog.pg_namespace WHERE nspname = 'public'",
            &[],
        )
        .await
        .map_err(catalog("schema public"))?
        .map(|r| r.get(0));
    let Some(owner) = owner else {
        return Ok(()); // dropped by someone: nothing to secure
    };
    if owner == "pg_database_owner" || owner == plan.app.name.as_str() {
        return Ok(());
    }
    let sp = tx
        .savepoint("public_schema")
        .await
        .map_err(|e| ProvisionError::SecurePublicSchema { source: e.into() })?;
    match exec(&sp, &sql::alter_schema_owner(&public, &plan.app.name)).await {
        Ok(()) => {
            sp.commit()
                .await
                .map_err(|e| ProvisionError::SecurePublicSchema { source: e.into() })?;
            report.change(format!("made {} the owner of schema public", plan.app.name));
        }
        Err(e) if !admin.superuser && e.sqlstate() == Some("42501") => {
            sp.rollback()
                .await
                .map_err(|e| ProvisionError::SecurePublicSchema { source: e.into() })?;
            report.warnings.push(format!(
                "schema public is owned by {owner} and the admin may not hand it to {}: {e}",
                plan.app.name
            ));
        }
        Err(source) => return Err(ProvisionError::SecurePublicSchema { source }),
    }
    Ok(())
}

async fn revoke_public_create(tx: &Transaction<'_>, report: &mut ProvisionReport) -> Result<()> {
    let public_can_create: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n, \
             aclexplode(COALESCE(n.nspacl, acldefault('n', n.nspowner))) a \
             WHERE n.nspname = 'public' AND a.grantee = 0 AND a.privilege_type = 'CREATE')",
            &[],
        )
        .await
        .map_err(catalog("schema public privileges"))?
        .get(0);
    if public_can_create {
        exec(tx, &sql::revoke_create_on_public_schema())
            .await
            .map_err(|source| ProvisionError::SecurePublicSchema { source })?;
        report.change("revoked CREATE on schema public from PUBLIC".to_owned());
    }
    Ok(())
}

/// Superusers create extensions themselves (untrusted ones need it); a non-superuser admin
/// creates them as the app role, which as database owner may create trusted extensions.
async fn ensure_extensions(
    tx: &Transaction<'_>,
    admin: &Admin,
    plan: &DatabasePlan,
    report: &mut ProvisionReport,
) -> Result<()> {
    for ext in &plan.extensions {
        let exists = tx
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_extension WHERE extname = $1",
                &[&ext.as_str()],
            )
            .await
            .map_err(catalog("extension"))?
            .is_some();
        if exists {
            continue;
        }
        let err = |source| ProvisionError::CreateExtension {
            extension: ext.clone(),
            source,
        };
        if !admin.superuser {
            exec(tx, &sql::set_role(&plan.app.name))
                .await
                .map_err(err)?;
        }
        exec(tx, &sql::create_extension(ext)).await.map_err(err)?;
        if !admin.superuser {
            exec(tx, "RESET ROLE").await.map_err(err)?;
        }
        report.change(format!("created extension {ext}"));
    }
    Ok(())
}

/// An outbox table created earlier by someone else (an older operator, a DBA) is handed to
/// the app; the admin does this before switching to the app role, which could not.
async fn ensure_outbox_owner(
    tx: &Transaction<'_>,
    outbox: &QualifiedName,
    app: &Ident,
    report: &mut ProvisionReport,
) -> Result<()> {
    if let Some(owner) = inspect::table_owner(tx, outbox)
        .await
        .map_err(catalog("outbox table"))?
        && owner != app.as_str()
    {
        exec(tx, &sql::alter_table_owner(outbox, app))
            .await
            .map_err(|source| ProvisionError::AlterOutboxOwner {
                table: outbox.clone(),
                source,
            })?;
        report.change(format!(
            "changed the owner of {outbox} from {owner} to {app}"
        ));
    }
    Ok(())
}

async fn ensure_outbox(
    tx: &Transaction<'_>,
    outbox: &QualifiedName,
    report: &mut ProvisionReport,
) -> Result<()> {
    let create_err = |source| ProvisionError::CreateOutbox {
        table: outbox.clone(),
        source,
    };
    if !outbox.in_public_schema()
        && !inspect::schema_exists(tx, &outbox.schema)
            .await
            .map_err(catalog("schema"))?
    {
        exec(tx, &sql::create_schema(&outbox.schema))
            .await
            .map_err(|source| ProvisionError::CreateSchema {
                schema: outbox.schema.clone(),
                source,
            })?;
        report.change(format!("created schema {}", outbox.schema));
    }
    match inspect::table_owner(tx, outbox)
        .await
        .map_err(catalog("outbox table"))?
    {
        None => {
            exec(tx, &sql::create_outbox_table(outbox))
                .await
                .map_err(create_err)?;
            report.change(format!("created outbox table {outbox}"));
        }
        Some(_) => {
            let columns = inspect::table_columns(tx, outbox)
                .await
                .map_err(catalog("outbox columns"))?;
            for problem in inspect::outbox_column_problems(&columns) {
                report
                    .warnings
                    .push(format!("outbox table {outbox}: {problem}"));
            }
        }
    }
    let index = super::identifiers::outbox_seq_index(outbox);
    let index_table = QualifiedName {
        schema: outbox.schema.clone(),
        name: index.clone(),
    };
    if inspect::relation_exists(tx, &index_table)
        .await
        .map_err(catalog("outbox index"))?
        .is_none()
    {
        exec(tx, &sql::create_outbox_seq_index(outbox))
            .await
            .map_err(create_err)?;
        report.change(format!("created index {index} on {outbox}"));
    }
    let trigger = super::identifiers::outbox_notify_trigger(outbox);
    if !inspect::trigger_exists(tx, outbox, &trigger)
        .await
        .map_err(catalog("outbox trigger"))?
    {
        exec(tx, &sql::create_outbox_notify_function(outbox))
            .await
            .map_err(create_err)?;
        exec(tx, &sql::create_outbox_notify_trigger(outbox))
            .await
            .map_err(create_err)?;
        report.change(format!("created NOTIFY trigger {trigger} on {outbox}"));
    }
    Ok(())
}

/// Makes `role`'s direct privileges on `table` exactly `desired` (revoking extras someone
/// granted by hand), plus USAGE on the table's schema.
async fn ensure_table_privileges(
    tx: &Transaction<'_>,
    role: &Ident,
    table: &QualifiedName,
    desired: &BTreeSet<TablePrivilege>,
    report: &mut ProvisionReport,
) -> Result<()> {
    let err = |source| ProvisionError::GrantPrivileges {
        role: role.clone(),
        table: table.clone(),
        source,
    };
    let has_usage: bool = tx
        .query_one(
            "SELECT pg_catalog.has_schema_privilege($1, $2, 'USAGE')",
            &[&role.as_str(), &table.schema.as_str()],
        )
        .await
        .map_err(catalog("schema privileges"))?
        .get(0);
    if !has_usage {
        exec(tx, &sql::grant_schema_usage(&table.schema, role))
            .await
            .map_err(err)?;
        report.change(format!(
            "granted USAGE on schema {} to {role}",
            table.schema
        ));
    }
    let current = inspect::table_privileges(tx, table, role)
        .await
        .map_err(catalog("table privileges"))?;
    let missing: BTreeSet<_> = desired.difference(&current).copied().collect();
    let extra: BTreeSet<_> = current.difference(desired).copied().collect();
    if !missing.is_empty() {
        exec(tx, &sql::grant_table(&missing, table, role))
            .await
            .map_err(err)?;
        report.change(format!("granted {} on {table} to {role}", names(&missing)));
    }
    if !extra.is_empty() {
        exec(tx, &sql::revoke_table(&extra, table, role))
            .await
            .map_err(err)?;
        report.change(format!("revoked {} on {table} from {role}", names(&extra)));
    }
    Ok(())
}

/// The column whose UPDATE privilege lets the relay take row locks (see
/// [`DatabasePlan::relay_row_locks`]).
pub const ROW_LOCK_COLUMN: &str = "created_at";

async fn ensure_row_lock_column(
    tx: &Transaction<'_>,
    role: &Ident,
    table: &QualifiedName,
    desired: bool,
    report: &mut ProvisionReport,
) -> Result<()> {
    let err = |source| ProvisionError::GrantPrivileges {
        role: role.clone(),
        table: table.clone(),
        source,
    };
    // Column ACLs live in pg_attribute.attacl, not in the table ACL read above.
    let granted: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a \
             JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace, aclexplode(a.attacl) x \
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = $3 \
             AND x.privilege_type = 'UPDATE' \
             AND x.grantee = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $4))",
            &[
                &table.schema.as_str(),
                &table.name.as_str(),
                &ROW_LOCK_COLUMN,
                &role.as_str(),
            ],
        )
        .await
        .map_err(catalog("column privileges"))?
        .get(0);
    if desired && !granted {
        exec(tx, &sql::grant_column_update(table, ROW_LOCK_COLUMN, role))
            .await
            .map_err(err)?;
        report.change(format!(
            "granted UPDATE ({ROW_LOCK_COLUMN}) on {table} to {role}"
        ));
    } else if !desired && granted {
        exec(tx, &sql::revoke_column_update(table, ROW_LOCK_COLUMN, role))
            .await
            .map_err(err)?;
        report.change(format!(
            "revoked UPDATE ({ROW_LOCK_COLUMN}) on {table} from {role}"
        ));
    }
    Ok(())
}

fn names(privs: &BTreeSet<TablePrivilege>) -> String {
    privs
        .iter()
        .map(|p| p.as_sql())
        .collect::<Vec<_>>()
        .join(", ")
}

async fn ensure_publication(
    tx: &Transaction<'_>,
    name: &Ident,
    tables: &[QualifiedName],
    publish: Publish,
    report: &mut ProvisionReport,
) -> Result<()> {
    let err = |source| ProvisionError::Publication {
        publication: name.clone(),
        source,
    };
    match inspect::publication_tables(tx, name)
        .await
        .map_err(catalog("publication"))?
    {
        None => {
            exec(tx, &sql::create_publication(name, tables, publish))
                .await
                .map_err(err)?;
            report.change(format!("created publication {name}"));
        }
        Some(current) => {
            let desired: BTreeSet<_> = tables.iter().cloned().collect();
            let add: Vec<_> = desired.difference(&current).cloned().collect();
            let remove: Vec<_> = current.difference(&desired).cloned().collect();
            if !add.is_empty() {
                exec(tx, &sql::alter_publication_tables(name, true, &add))
                    .await
                    .map_err(err)?;
                report.change(format!(
                    "added {} table(s) to publication {name}",
                    add.len()
                ));
            }
            if !remove.is_empty() {
                exec(tx, &sql::alter_publication_tables(name, false, &remove))
                    .await
                    .map_err(err)?;
                report.change(format!(
                    "removed {} table(s) from publication {name}",
                    remove.len()
                ));
            }
        }
    }
    Ok(())
}

async fn drop_publication_if_exists(
    tx: &Transaction<'_>,
    name: &Ident,
    report: &mut ProvisionReport,
) -> Result<()> {
    if inspect::publication_tables(tx, name)
        .await
        .map_err(catalog("publication"))?
        .is_some()
    {
        exec(tx, &sql::drop_publication(name))
            .await
            .map_err(|source| ProvisionError::Publication {
                publication: name.clone(),
                source,
            })?;
        report.change(format!("dropped publication {name}"));
    }
    Ok(())
}

/// Sets a new password on an existing role (its credentials Secret was lost). Only the SCRAM
/// verifier is sent. Note: on Postgres 15 a non-superuser admin may not alter a REPLICATION
/// role at all.
pub async fn set_role_password(
    admin: &ConnectParams,
    role: &Ident,
    password: &Password,
) -> Result<()> {
    let client = connect_to(admin, &admin.dbname).await?;
    if inspect::role_attributes(&client, role)
        .await
        .map_err(catalog("role"))?
        .is_none()
    {
        return Err(ProvisionError::RoleMissing { role: role.clone() });
    }
    exec_secret(
        &client,
        &sql::alter_role_password(role, &password.scram_verifier()),
    )
    .await
    .map_err(|source| ProvisionError::SetPassword {
        role: role.clone(),
        source,
    })?;
    info!(%role, "set a new password");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> crate::api::ServiceDatabaseSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn a_spec_with_outbox_and_cdc_gives_three_roles_and_their_objects() {
        let s = spec(
            "owner: {service: orders-api}\n\
             instance: {external: {host: pg, adminSecretRef: {name: a}}}\n\
             database: {extensions: [pgcrypto]}\n\
             outbox: {table: events.outbox}\n\
             cdc: {tables: [public.orders], kafkaConnect: {url: 'http://c:8083'}, topicPrefix: cdc}\n",
        );
        let plan = DatabasePlan::for_spec(&s, true).unwrap();
        assert_eq!(plan.database.as_str(), "orders_api");
        assert_eq!(plan.app.name.as_str(), "orders_api");
        let relay = plan.relay.as_ref().unwrap();
        assert_eq!(
            (relay.name.as_str(), relay.replication),
            ("orders_api_relay", true)
        );
        assert!(plan.outbox_publication && !plan.relay_row_locks);
        assert_eq!(plan.outbox.as_ref().unwrap().to_string(), "events.outbox");
        let cdc = plan.cdc.as_ref().unwrap();
        assert_eq!(
            (cdc.role.name.as_str(), cdc.role.replication),
            ("orders_api_cdc", true)
        );
        assert_eq!(cdc.tables[0].to_string(), "public.orders");
        assert_eq!(plan.extensions, vec![Ident::new("pgcrypto").unwrap()]);
        assert!(plan.roles().all(|(r, _)| r.set_password.is_none()));
    }

    #[test]
    fn a_spec_without_outbox_has_no_relay_role() {
        let s = spec(
            "owner: {service: billing}\n\
             instance: {external: {host: pg, adminSecretRef: {name: a}}}\n\
             database: {name: billing_db}\n\
             outbox: {enabled: false}\n",
        );
        let plan = DatabasePlan::for_spec(&s, false).unwrap();
        assert_eq!(plan.database.as_str(), "billing_db");
        assert!(plan.relay.is_none() && plan.outbox.is_none() && plan.cdc.is_none());
    }
}
