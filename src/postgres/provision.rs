//! Converges a service's database, roles, grants, outbox and publications to a
//! [`DatabasePlan`] (does database I/O; the plan itself is built, purely, in [`super::plan`]).
//!
//! Ownership first: before changing anything, every database and role the plan names is read
//! back with its ownership mark ([`super::ownership`]). An object marked as another
//! ServiceDatabase's, or unmarked without [`DatabasePlan::adopt`], stops the run with
//! [`ProvisionError::NameConflict`] before a single statement changes anything.
//!
//! Idempotent by construction: every step reads the catalog first and acts only on a
//! difference, so a second run issues no DDL and reports no change. Works with a superuser
//! admin (managed instances) and with a CREATEDB+CREATEROLE admin (RDS-like servers): such an
//! admin makes itself a member of each role it creates (never of a role that is not ours),
//! which is what Postgres requires to create a database owned by a role, to act as it
//! (`SET ROLE`) and to signal its sessions.
//!
//! Who owns what inside the database: the app role owns the database, its schema and its
//! tables; the NOLOGIN outbox role owns the outbox table and the `servicedb` schema with the
//! SECURITY DEFINER functions the relay calls (the relay has no table privileges at all);
//! publications belong to the admin.
//!
//! Order and atomicity: roles, the admin's memberships and the database are converged first,
//! over the admin database and outside a transaction (`CREATE DATABASE` cannot run in one);
//! everything inside the service's database then runs in one transaction, so a failure there
//! leaves nothing half-applied; retired roles are dropped last, after that commit, each on its
//! own (a role that cannot be dropped is disarmed instead).

use std::collections::BTreeSet;

use tokio_postgres::{Client, GenericClient, Transaction};
use tracing::{debug, info};

use super::connect::{ConnectError, ConnectParams, connect};
use super::identifiers::{
    Ident, QualifiedName, cdc_publication, extensions_schema, functions_schema,
    outbox_notify_trigger, outbox_publication,
};
use super::ownership::{Holder, ObjectKind, OwnerMark};
use super::passwords::PersistedPassword;
use super::plan::{DatabasePlan, RolePassword};
use super::sql::{self, Publish, RoleAttributes, TablePrivilege};
use super::{PgError, inspect};

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
    /// A database or role with the plan's name exists and is not this ServiceDatabase's:
    /// marked as another's (`holder`), or unmarked and adoption was not asked for. Nothing was
    /// changed.
    #[error("{}", name_conflict_message(*kind, name, holder.as_ref()))]
    NameConflict {
        /// Database or role.
        kind: ObjectKind,
        /// Its name.
        name: String,
        /// The ServiceDatabase (namespace, name) whose mark it carries; `None` when it has no
        /// mark this operator can read.
        holder: Option<(String, String)>,
    },
    /// The `servicedb` schema exists and belongs to someone other than the outbox role.
    #[error(
        "schema {schema} exists and is owned by {owner}, not by {expected}: it holds the relay's functions, so the operator will not use it"
    )]
    ForeignSchema {
        /// Schema.
        schema: Ident,
        /// Its owner.
        owner: String,
        /// The outbox role.
        expected: Ident,
    },
    /// Creating or replacing the relay's outbox functions, or their grants, failed.
    #[error("maintaining the outbox functions in schema servicedb: {source}")]
    OutboxFunctions {
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// Revoking the privileges of a retired role failed.
    #[error("revoking the privileges of retired role {role}: {source}")]
    RetireRole {
        /// Role.
        role: Ident,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// Writing an ownership mark failed.
    #[error("marking {kind} {name} as this ServiceDatabase's: {source}")]
    Mark {
        /// Database or role.
        kind: ObjectKind,
        /// Its name.
        name: String,
        /// The server's answer.
        #[source]
        source: PgError,
    },
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
    /// Handing an existing outbox table to the outbox role failed.
    #[error("making the outbox role the owner of outbox table {table}: {source}")]
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
            E::NameConflict { .. } => "NameConflict",
            E::ForeignSchema { .. } => "NameConflict",
            E::OutboxFunctions { .. } => "OutboxFunctionsFailed",
            E::Mark { .. } => "MarkFailed",
            E::RetireRole { .. } => "RetireRoleFailed",
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
            E::RoleMissing { .. } | E::NameConflict { .. } | E::ForeignSchema { .. } => None,
            E::OutboxFunctions { source }
            | E::Mark { source, .. }
            | E::RetireRole { source, .. } => source.sqlstate(),
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

fn name_conflict_message(
    kind: ObjectKind,
    name: &str,
    holder: Option<&(String, String)>,
) -> String {
    match holder {
        Some((ns, sdb)) => format!(
            "{kind} {name} already exists and belongs to ServiceDatabase {ns}/{sdb}; it was left unchanged (give this ServiceDatabase another owner.service or database.name)"
        ),
        None => format!(
            "{kind} {name} already exists and carries no ownership mark of this ServiceDatabase; it was left unchanged (if it is not another ServiceDatabase's, set database.adopt: true to adopt it, or choose another owner.service or database.name)"
        ),
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

    // Every object is checked before any is changed: a conflict on the database must not
    // leave roles altered.
    let claims = check_ownership(&client, &who, plan).await?;
    for (role, attributes, password) in plan.all_roles() {
        ensure_role(
            &client,
            &role,
            &attributes,
            password,
            &claims,
            plan,
            &mut report,
        )
        .await?;
        ensure_admin_membership(&client, &who, &role, &mut report).await?;
    }
    ensure_database(&client, plan, &claims, &mut report).await?;
    let retired = retirable_roles(&client, plan, &mut report).await?;
    drop(client);

    let mut db = connect_to(admin, plan.database.as_str()).await?;
    let tx_err = |e: tokio_postgres::Error| ProvisionError::Transaction {
        database: plan.database.clone(),
        source: e.into(),
    };
    let mut tx = db.transaction().await.map_err(tx_err)?;
    secure_public_schema_owner(&mut tx, &who, plan, &mut report).await?;
    ensure_extensions(&tx, &who, plan, &mut report).await?;
    if plan.outbox.is_some() {
        ensure_functions_schema(&tx, plan, &mut report).await?;
    }

    // As the app role: it owns what it creates here and it is the grantor.
    act_as(&tx, plan, Some(&plan.app.name)).await?;
    revoke_public_create(&tx, &mut report).await?;
    if let Some(outbox) = &plan.outbox {
        ensure_outbox_schema(&tx, outbox, &plan.outbox_owner, &mut report).await?;
    }

    if let Some(outbox) = &plan.outbox {
        // An outbox owned by anyone else (the app, with older operator versions) is handed to
        // the outbox role; only the admin can do that.
        act_as(&tx, plan, None).await?;
        ensure_outbox_owner(&tx, outbox, &plan.outbox_owner, &mut report).await?;
        // As the outbox role: the table, its trigger and the relay's functions are its own.
        act_as(&tx, plan, Some(&plan.outbox_owner)).await?;
        ensure_outbox(&tx, outbox, &plan.outbox_owner, &mut report).await?;
        ensure_outbox_functions(
            &tx,
            outbox,
            plan.relay.as_ref().map(|r| &r.name),
            &mut report,
        )
        .await?;
        let app_privs = BTreeSet::from([
            TablePrivilege::Select,
            TablePrivilege::Insert,
            TablePrivilege::Delete,
        ]);
        ensure_table_privileges(&tx, &plan.app.name, outbox, &app_privs, &mut report).await?;
        if let Some(relay) = &plan.relay {
            // Grants from before the functions existed (SELECT, DELETE, UPDATE (created_at)).
            ensure_table_privileges(&tx, &relay.name, outbox, &BTreeSet::new(), &mut report)
                .await?;
            revoke_row_lock_column(&tx, &relay.name, outbox, &mut report).await?;
        }
    }
    // CDC tables belong to the app (the outbox to the outbox role): their owner grants SELECT.
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
            cdc_tables.push(table.clone());
        }
        act_as(&tx, plan, Some(&plan.app.name)).await?;
        for table in &cdc_tables {
            let privs = BTreeSet::from([TablePrivilege::Select]);
            let owned_by_outbox = Some(table) == plan.outbox.as_ref();
            if owned_by_outbox {
                // The app owns the schema and grants USAGE on it; the outbox role the table.
                ensure_schema_usage(&tx, &cdc.role.name, &table.schema, &mut report).await?;
                act_as(&tx, plan, Some(&plan.outbox_owner)).await?;
            }
            ensure_table_privileges(&tx, &cdc.role.name, table, &privs, &mut report).await?;
            if owned_by_outbox {
                act_as(&tx, plan, Some(&plan.app.name)).await?;
            }
        }
    }

    // Publications belong to the admin: it may add the app's tables and the outbox role's
    // alike (ownership rights through membership), and neither the app nor the relay can
    // alter them.
    act_as(&tx, plan, None).await?;
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
    for role in &retired {
        // Revokes every privilege the role holds here, and CONNECT on the database.
        exec(&tx, &sql::drop_owned_by(role))
            .await
            .map_err(|source| ProvisionError::RetireRole {
                role: role.clone(),
                source,
            })?;
    }
    tx.commit().await.map_err(tx_err)?;
    drop(db);

    if !retired.is_empty() {
        let client = connect_to(admin, &admin.dbname).await?;
        for role in &retired {
            drop_retired_role(&client, role, &mut report).await;
        }
    }
    Ok(report)
}

/// `SET LOCAL ROLE role`, or back to the admin (`RESET ROLE`) for `None`.
async fn act_as(tx: &Transaction<'_>, plan: &DatabasePlan, role: Option<&Ident>) -> Result<()> {
    let statement = match role {
        Some(r) => sql::set_role(r),
        None => sql::RESET_ROLE.to_owned(),
    };
    exec(tx, &statement)
        .await
        .map_err(|source| ProvisionError::Transaction {
            database: plan.database.clone(),
            source,
        })
}

/// What the ownership check decided for the objects that exist.
#[derive(Debug, Default)]
struct Claims {
    /// Existing objects (by name) that are ours or adopted, with whether to (re)write the mark.
    remark_roles: BTreeSet<String>,
    remark_database: bool,
}

/// A role's or database's ownership comment.
async fn role_comment(client: &Client, role: &Ident) -> Result<Option<Option<String>>> {
    Ok(client
        .query_opt(
            "SELECT pg_catalog.shobj_description(oid, 'pg_authid') FROM pg_catalog.pg_roles WHERE rolname = $1",
            &[&role.as_str()],
        )
        .await
        .map_err(catalog("role mark"))?
        .map(|r| r.get(0)))
}

pub(crate) async fn database_comment(
    client: &Client,
    db: &Ident,
) -> Result<Option<(String, Option<String>)>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT pg_catalog.pg_get_userbyid(datdba)::text, pg_catalog.shobj_description(oid, 'pg_database') \
             FROM pg_catalog.pg_database WHERE datname = $1",
            &[&db.as_str()],
        )
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

fn conflict(kind: ObjectKind, name: &str, holder: &Holder) -> ProvisionError {
    ProvisionError::NameConflict {
        kind,
        name: name.to_owned(),
        holder: match holder {
            Holder::Other(Some(m)) => Some((m.namespace.clone(), m.name.clone())),
            _ => None,
        },
    }
}

/// Reads the mark of every existing database and role the plan names and decides, before
/// anything is changed: ours (re-mark when the uid is stale), adopt (unmarked + `adopt`), or
/// [`ProvisionError::NameConflict`]. A database with no mark whose owner is one of our own
/// marked roles is ours too: `CREATE DATABASE` cannot share a transaction with its
/// `COMMENT`, so a run interrupted between the two leaves exactly that.
async fn check_ownership(client: &Client, who: &Admin, plan: &DatabasePlan) -> Result<Claims> {
    let mut claims = Claims::default();
    let mut ours = BTreeSet::new();
    for (role, _, _) in plan.all_roles() {
        let Some(comment) = role_comment(client, &role).await? else {
            ours.insert(role.as_str().to_owned()); // will be created, marked
            continue;
        };
        if role.as_str() == who.name {
            // Never adopt the admin itself, whatever its comment says.
            return Err(conflict(
                ObjectKind::Role,
                role.as_str(),
                &Holder::Other(None),
            ));
        }
        match Holder::of(comment.as_deref(), &plan.owner) {
            Holder::Ours { stale_uid } => {
                if stale_uid {
                    claims.remark_roles.insert(role.as_str().to_owned());
                }
            }
            Holder::Unmarked if plan.adopt => {
                claims.remark_roles.insert(role.as_str().to_owned());
            }
            holder => return Err(conflict(ObjectKind::Role, role.as_str(), &holder)),
        }
        ours.insert(role.as_str().to_owned());
    }
    if let Some((owner, comment)) = database_comment(client, &plan.database)
        .await
        .map_err(catalog("database mark"))?
    {
        match Holder::of(comment.as_deref(), &plan.owner) {
            Holder::Ours { stale_uid } => claims.remark_database = stale_uid,
            Holder::Unmarked if plan.adopt || owner == plan.app.name.as_str() => {
                claims.remark_database = true;
            }
            holder => {
                return Err(conflict(
                    ObjectKind::Database,
                    plan.database.as_str(),
                    &holder,
                ));
            }
        }
    }
    Ok(claims)
}

async fn ensure_role(
    client: &Client,
    role: &Ident,
    desired: &RoleAttributes,
    password: Option<&RolePassword>,
    claims: &Claims,
    plan: &DatabasePlan,
    report: &mut ProvisionReport,
) -> Result<()> {
    match inspect::role_attributes(client, role)
        .await
        .map_err(catalog("role"))?
    {
        None => {
            // Created and marked in one transaction: never a role of ours without its mark.
            let verifier = password.map(|p| p.password.scram_verifier());
            let statement = format!(
                "{}; {}",
                sql::create_role(role, desired, verifier.as_ref()),
                sql::comment_on_role(role, &plan.owner)
            );
            exec_secret(client, &statement)
                .await
                .map_err(|source| ProvisionError::CreateRole {
                    role: role.clone(),
                    source,
                })?;
            report.change(format!("created role {role}"));
        }
        Some(current) => {
            if claims.remark_roles.contains(role.as_str()) {
                exec(client, &sql::comment_on_role(role, &plan.owner))
                    .await
                    .map_err(|source| ProvisionError::Mark {
                        kind: ObjectKind::Role,
                        name: role.to_string(),
                        source,
                    })?;
                report.change(format!("marked role {role} as {}", plan.owner.key()));
            }
            let changes = sql::attribute_changes(&current, desired);
            if !changes.is_empty() {
                exec(client, &sql::alter_role(role, &changes))
                    .await
                    .map_err(|source| ProvisionError::AlterRole {
                        role: role.clone(),
                        source,
                    })?;
                report.change(format!("altered role {role}: {}", changes.join(" ")));
            }
            if let Some(p) = password.filter(|p| p.reset) {
                exec_secret(
                    client,
                    &sql::alter_role_password(role, &p.password.scram_verifier()),
                )
                .await
                .map_err(|source| ProvisionError::SetPassword {
                    role: role.clone(),
                    source,
                })?;
                report.change(format!("set the password of role {role}"));
            }
        }
    }
    Ok(())
}

/// A non-superuser admin must be a member of a role to create a database it owns, `SET ROLE`
/// to it, and terminate its sessions. Superusers need nothing. Called only for roles that
/// passed the ownership check.
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
    claims: &Claims,
    report: &mut ProvisionReport,
) -> Result<()> {
    let db = &plan.database;
    let mark_err = |source| ProvisionError::Mark {
        kind: ObjectKind::Database,
        name: db.to_string(),
        source,
    };
    let owner = database_comment(client, db)
        .await
        .map_err(catalog("database"))?
        .map(|(owner, _)| owner);
    match owner {
        None => {
            // Not in a transaction: CREATE DATABASE refuses to run in one. The mark follows at
            // once; an interruption in between is recognised by the owner (check_ownership).
            exec(client, &sql::create_database(db, &plan.app.name))
                .await
                .map_err(|source| ProvisionError::CreateDatabase {
                    database: db.clone(),
                    source,
                })?;
            exec(client, &sql::comment_on_database(db, &plan.owner))
                .await
                .map_err(mark_err)?;
            report.change(format!("created database {db} owned by {}", plan.app.name));
        }
        Some(owner) => {
            if owner != plan.app.name.as_str() {
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
            if claims.remark_database {
                exec(client, &sql::comment_on_database(db, &plan.owner))
                    .await
                    .map_err(mark_err)?;
                report.change(format!("marked database {db} as {}", plan.owner.key()));
            }
        }
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

/// The retired roles that exist and are ours (or unmarked, when adopting); others are left
/// alone with a warning.
async fn retirable_roles(
    client: &Client,
    plan: &DatabasePlan,
    report: &mut ProvisionReport,
) -> Result<Vec<Ident>> {
    let mut out = Vec::new();
    for role in &plan.retired_roles {
        let Some(comment) = role_comment(client, role).await? else {
            continue;
        };
        match Holder::of(comment.as_deref(), &plan.owner) {
            Holder::Ours { .. } => {}
            Holder::Unmarked if plan.adopt => {}
            _ => {
                report.warnings.push(format!(
                    "role {role} is no longer needed but is not marked as this ServiceDatabase's: left unchanged"
                ));
                continue;
            }
        }
        let owns: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_shdepend WHERE deptype = 'o' \
                 AND refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass \
                 AND refobjid = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = $1))",
                &[&role.as_str()],
            )
            .await
            .map_err(catalog("objects owned by a retired role"))?
            .get(0);
        if owns {
            // DROP OWNED would drop what it owns: only disarm it.
            disarm_role(client, role, "it owns objects", report).await;
        } else {
            out.push(role.clone());
        }
    }
    Ok(out)
}

/// Drops a retired role whose privileges in the service's database were revoked; when that
/// fails (privileges or objects elsewhere) it is made NOLOGIN NOREPLICATION instead.
async fn drop_retired_role(client: &Client, role: &Ident, report: &mut ProvisionReport) {
    match exec(client, &sql::drop_role(role)).await {
        Ok(()) => report.change(format!("dropped retired role {role}")),
        Err(e) => disarm_role(client, role, &e.to_string(), report).await,
    }
}

async fn disarm_role(client: &Client, role: &Ident, why: &str, report: &mut ProvisionReport) {
    let current = match inspect::role_attributes(client, role).await {
        Ok(Some(c)) => c,
        Ok(None) => return,
        Err(e) => {
            report
                .warnings
                .push(format!("retired role {role}: reading it failed: {e}"));
            return;
        }
    };
    let desired = RoleAttributes {
        login: false,
        replication: false,
        ..current
    };
    let changes = sql::attribute_changes(&current, &desired);
    if !changes.is_empty() {
        if let Err(e) = exec(client, &sql::alter_role(role, &changes)).await {
            report.warnings.push(format!(
                "retired role {role} could not be dropped ({why}) nor disarmed: {e}"
            ));
            return;
        }
        report.change(format!("disabled login of retired role {role}"));
        report.warnings.push(format!(
            "retired role {role} could not be dropped ({why}): it was made NOLOGIN NOREPLICATION instead"
        ));
    }
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

/// Extensions, without ever running an extension script with a search_path the app can write
/// to (the CVE-2018-1058 class): trusted extensions are created as the app role (it owns the
/// database, which is all Postgres asks); untrusted ones need a superuser admin, which creates
/// them into the admin-owned schema `servicedb_ext` with `search_path` pinned to that schema
/// and `pg_catalog` (the app gets USAGE on it, nothing more).
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
        let trusted: bool = tx
            .query_opt(
                "SELECT v.trusted FROM pg_catalog.pg_available_extension_versions v \
                 JOIN pg_catalog.pg_available_extensions a ON a.name = v.name AND a.default_version = v.version \
                 WHERE v.name = $1",
                &[&ext.as_str()],
            )
            .await
            .map_err(catalog("extension"))?
            .is_none_or(|r| r.get(0));
        if trusted || !admin.superuser {
            exec(tx, &sql::set_role(&plan.app.name))
                .await
                .map_err(err)?;
            exec(tx, &sql::create_extension(ext)).await.map_err(err)?;
            exec(tx, sql::RESET_ROLE).await.map_err(err)?;
        } else {
            let schema = extensions_schema();
            exec(tx, &sql::create_schema(&schema)).await.map_err(err)?;
            exec(tx, &sql::grant_schema_usage(&schema, &plan.app.name))
                .await
                .map_err(err)?;
            exec(tx, &sql::set_local_search_path(&schema))
                .await
                .map_err(err)?;
            exec(tx, &sql::create_extension_in(ext, &schema))
                .await
                .map_err(err)?;
            exec(tx, "SET LOCAL search_path TO DEFAULT")
                .await
                .map_err(err)?;
        }
        report.change(format!("created extension {ext}"));
    }
    Ok(())
}

/// The `servicedb` schema, owned by the outbox role (created by the admin: the outbox role
/// has no CREATE on the database). A schema of that name owned by anyone else is refused.
async fn ensure_functions_schema(
    tx: &Transaction<'_>,
    plan: &DatabasePlan,
    report: &mut ProvisionReport,
) -> Result<()> {
    let schema = functions_schema();
    let owner: Option<String> = tx
        .query_opt(
            "SELECT pg_catalog.pg_get_userbyid(nspowner)::text FROM pg_catalog.pg_namespace WHERE nspname = $1",
            &[&schema.as_str()],
        )
        .await
        .map_err(catalog("schema servicedb"))?
        .map(|r| r.get(0));
    match owner {
        None => {
            exec(
                tx,
                &sql::create_schema_owned_by(&schema, &plan.outbox_owner),
            )
            .await
            .map_err(|source| ProvisionError::CreateSchema {
                schema: schema.clone(),
                source,
            })?;
            report.change(format!(
                "created schema {schema} owned by {}",
                plan.outbox_owner
            ));
        }
        Some(o) if o == plan.outbox_owner.as_str() => {}
        Some(o) => {
            return Err(ProvisionError::ForeignSchema {
                schema,
                owner: o,
                expected: plan.outbox_owner.clone(),
            });
        }
    }
    Ok(())
}

/// As the app: the outbox's schema exists, and the outbox role may use and create in it (it
/// creates the table; a non-superuser admin can only hand a table to a role that may create in
/// its schema).
async fn ensure_outbox_schema(
    tx: &Transaction<'_>,
    outbox: &QualifiedName,
    outbox_owner: &Ident,
    report: &mut ProvisionReport,
) -> Result<()> {
    let schema_err = |source| ProvisionError::CreateSchema {
        schema: outbox.schema.clone(),
        source,
    };
    if !outbox.in_public_schema()
        && !inspect::schema_exists(tx, &outbox.schema)
            .await
            .map_err(catalog("schema"))?
    {
        exec(tx, &sql::create_schema(&outbox.schema))
            .await
            .map_err(schema_err)?;
        report.change(format!("created schema {}", outbox.schema));
    }
    let row = tx
        .query_one(
            "SELECT pg_catalog.has_schema_privilege($1, $2, 'USAGE'), pg_catalog.has_schema_privilege($1, $2, 'CREATE')",
            &[&outbox_owner.as_str(), &outbox.schema.as_str()],
        )
        .await
        .map_err(catalog("schema privileges"))?;
    let (usage, create): (bool, bool) = (row.get(0), row.get(1));
    if !(usage && create) {
        exec(
            tx,
            &format!(
                "GRANT USAGE, CREATE ON SCHEMA {} TO {}",
                outbox.schema.quoted(),
                outbox_owner.quoted()
            ),
        )
        .await
        .map_err(schema_err)?;
        report.change(format!(
            "granted USAGE, CREATE on schema {} to {outbox_owner}",
            outbox.schema
        ));
    }
    Ok(())
}

/// An outbox table owned by anyone but the outbox role (the app, with operator versions before
/// the outbox role existed) is handed to it; its index and sequence follow.
async fn ensure_outbox_owner(
    tx: &Transaction<'_>,
    outbox: &QualifiedName,
    outbox_owner: &Ident,
    report: &mut ProvisionReport,
) -> Result<()> {
    if let Some(owner) = inspect::table_owner(tx, outbox)
        .await
        .map_err(catalog("outbox table"))?
        && owner != outbox_owner.as_str()
    {
        exec(tx, &sql::alter_table_owner(outbox, outbox_owner))
            .await
            .map_err(|source| ProvisionError::AlterOutboxOwner {
                table: outbox.clone(),
                source,
            })?;
        report.change(format!(
            "changed the owner of {outbox} from {owner} to {outbox_owner}"
        ));
    }
    Ok(())
}

/// As the outbox role: the table, its index and its NOTIFY trigger (whose function lives in
/// `servicedb`). A notify trigger calling a function the outbox role does not own (older
/// versions put it in the outbox's schema, owned by the app) is replaced; any other such
/// trigger is reported: the relay's functions refuse to run while it exists.
async fn ensure_outbox(
    tx: &Transaction<'_>,
    outbox: &QualifiedName,
    outbox_owner: &Ident,
    report: &mut ProvisionReport,
) -> Result<()> {
    let create_err = |source| ProvisionError::CreateOutbox {
        table: outbox.clone(),
        source,
    };
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
    let trigger = outbox_notify_trigger(outbox);
    let triggers = tx
        .query(
            "SELECT t.tgname::text, pg_catalog.pg_get_userbyid(p.proowner)::text \
             FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid \
             WHERE t.tgrelid = $1::text::pg_catalog.regclass AND NOT t.tgisinternal",
            &[&outbox.quoted()],
        )
        .await
        .map_err(catalog("outbox triggers"))?;
    let mut ours = false;
    for row in &triggers {
        let (name, owner): (String, String) = (row.get(0), row.get(1));
        if owner == outbox_owner.as_str() {
            ours |= name == trigger.as_str();
        } else if name == trigger.as_str() {
            exec(tx, &sql::drop_trigger(outbox, &trigger))
                .await
                .map_err(create_err)?;
            report.change(format!(
                "dropped trigger {trigger} on {outbox} (its function belongs to {owner})"
            ));
        } else {
            report.warnings.push(format!(
                "trigger {name} on {outbox} runs a function owned by {owner}: the relay will not claim outbox rows until it is dropped"
            ));
        }
    }
    if !ours {
        exec(tx, &sql::create_outbox_notify_function(outbox))
            .await
            .map_err(create_err)?;
        exec(
            tx,
            &sql::revoke_function_from_public(&format!(
                "{}.{}()",
                functions_schema().quoted(),
                trigger.quoted()
            )),
        )
        .await
        .map_err(create_err)?;
        exec(tx, &sql::create_outbox_notify_trigger(outbox))
            .await
            .map_err(create_err)?;
        report.change(format!("created NOTIFY trigger {trigger} on {outbox}"));
    }
    Ok(())
}

/// As the outbox role: the relay's functions exist with the expected body, PUBLIC may not
/// execute them, and the relay may execute exactly the relay-facing ones (and use the schema).
async fn ensure_outbox_functions(
    tx: &Transaction<'_>,
    outbox: &QualifiedName,
    relay: Option<&Ident>,
    report: &mut ProvisionReport,
) -> Result<()> {
    let err = |source| ProvisionError::OutboxFunctions { source };
    let schema = functions_schema();
    for f in sql::outbox_functions(outbox) {
        let current = tx
            .query_opt(
                "SELECT p.prosrc, p.prosecdef, \
                 EXISTS (SELECT 1 FROM aclexplode(COALESCE(p.proacl, acldefault('f', p.proowner))) a \
                         WHERE a.grantee = 0), \
                 (SELECT COALESCE(array_agg(r.rolname::text ORDER BY r.rolname), '{}') \
                  FROM aclexplode(COALESCE(p.proacl, acldefault('f', p.proowner))) a \
                  JOIN pg_catalog.pg_roles r ON r.oid = a.grantee WHERE a.grantee <> p.proowner) \
                 FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
                 WHERE n.nspname = $1 AND p.proname = $2 \
                 AND pg_catalog.pg_get_function_identity_arguments(p.oid) = $3",
                &[&schema.as_str(), &f.name, &f.args],
            )
            .await
            .map_err(catalog("outbox functions"))?;
        let (up_to_date, public, grantees) = match &current {
            Some(r) => (
                r.get::<_, String>(0) == f.body && r.get::<_, bool>(1) == f.definer,
                r.get::<_, bool>(2),
                r.get::<_, Vec<String>>(3),
            ),
            None => (false, true, Vec::new()),
        };
        if !up_to_date {
            exec(tx, &f.create).await.map_err(err)?;
            report.change(format!(
                "{} function {schema}.{}",
                if current.is_some() {
                    "replaced"
                } else {
                    "created"
                },
                f.name
            ));
        }
        if public {
            exec(tx, &sql::revoke_function_from_public(&f.signature()))
                .await
                .map_err(err)?;
            if current.is_some() {
                report.change(format!(
                    "revoked EXECUTE on {schema}.{} from PUBLIC",
                    f.name
                ));
            }
        }
        let wanted: Vec<&Ident> = relay.filter(|_| f.for_relay).into_iter().collect();
        for g in &grantees {
            if !wanted.iter().any(|w| w.as_str() == g)
                && let Ok(role) = Ident::new(g.as_str())
            {
                exec(tx, &sql::revoke_execute(&f.signature(), &role))
                    .await
                    .map_err(err)?;
                report.change(format!("revoked EXECUTE on {schema}.{} from {g}", f.name));
            }
        }
        for w in wanted {
            if !grantees.iter().any(|g| g == w.as_str()) {
                exec(tx, &sql::grant_execute(&f.signature(), w))
                    .await
                    .map_err(err)?;
                report.change(format!("granted EXECUTE on {schema}.{} to {w}", f.name));
            }
        }
    }
    if let Some(relay) = relay {
        let has_usage: bool = tx
            .query_one(
                "SELECT pg_catalog.has_schema_privilege($1, $2, 'USAGE')",
                &[&relay.as_str(), &schema.as_str()],
            )
            .await
            .map_err(catalog("schema privileges"))?
            .get(0);
        if !has_usage {
            exec(tx, &sql::grant_schema_usage(&schema, relay))
                .await
                .map_err(err)?;
            report.change(format!("granted USAGE on schema {schema} to {relay}"));
        }
    }
    Ok(())
}

/// Makes `role`'s direct privileges on `table` exactly `desired` (revoking extras someone
/// granted by hand), plus USAGE on the table's schema when `desired` is not empty (an empty
/// set only revokes: it never grants the schema).
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
    if !desired.is_empty() {
        ensure_schema_usage(tx, role, &table.schema, report).await?;
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

/// `role` may use `schema` (granted by whoever runs this: the schema's owner).
async fn ensure_schema_usage(
    tx: &Transaction<'_>,
    role: &Ident,
    schema: &Ident,
    report: &mut ProvisionReport,
) -> Result<()> {
    let has_usage: bool = tx
        .query_one(
            "SELECT pg_catalog.has_schema_privilege($1, $2, 'USAGE')",
            &[&role.as_str(), &schema.as_str()],
        )
        .await
        .map_err(catalog("schema privileges"))?
        .get(0);
    if !has_usage {
        exec(tx, &sql::grant_schema_usage(schema, role))
            .await
            .map_err(|source| ProvisionError::CreateSchema {
                schema: schema.clone(),
                source,
            })?;
        report.change(format!("granted USAGE on schema {schema} to {role}"));
    }
    Ok(())
}

/// Older versions granted the relay `UPDATE (created_at)` for row locks; it now reaches the
/// outbox only through functions, so that grant goes.
async fn revoke_row_lock_column(
    tx: &Transaction<'_>,
    role: &Ident,
    table: &QualifiedName,
    report: &mut ProvisionReport,
) -> Result<()> {
    const COLUMN: &str = "created_at";
    // Column ACLs live in pg_attribute.attacl, not in the table ACL.
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
                &COLUMN,
                &role.as_str(),
            ],
        )
        .await
        .map_err(catalog("column privileges"))?
        .get(0);
    if granted {
        exec(tx, &sql::revoke_column_update(table, COLUMN, role))
            .await
            .map_err(|source| ProvisionError::GrantPrivileges {
                role: role.clone(),
                table: table.clone(),
                source,
            })?;
        report.change(format!("revoked UPDATE ({COLUMN}) on {table} from {role}"));
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

/// Sets a new password on an existing role of `owner`'s (its credentials Secret was lost and
/// written anew). Only the SCRAM verifier is sent. A role not marked as `owner`'s is refused
/// with [`ProvisionError::NameConflict`]. Note: on Postgres 15 a non-superuser admin may not
/// alter a REPLICATION role at all.
pub async fn set_role_password(
    admin: &ConnectParams,
    owner: &OwnerMark,
    role: &Ident,
    password: &PersistedPassword,
) -> Result<()> {
    let client = connect_to(admin, &admin.dbname).await?;
    let Some(comment) = role_comment(&client, role).await? else {
        return Err(ProvisionError::RoleMissing { role: role.clone() });
    };
    match Holder::of(comment.as_deref(), owner) {
        Holder::Ours { .. } => {}
        holder => return Err(conflict(ObjectKind::Role, role.as_str(), &holder)),
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

    #[test]
    fn a_name_conflict_names_the_object_and_its_holder() {
        let e = ProvisionError::NameConflict {
            kind: ObjectKind::Database,
            name: "orders".into(),
            holder: Some(("shop-dev".into(), "orders".into())),
        };
        assert_eq!(e.category(), "NameConflict");
        let text = e.to_string();
        assert!(
            text.contains("database orders") && text.contains("shop-dev/orders"),
            "{text}"
        );
        let e = ProvisionError::NameConflict {
            kind: ObjectKind::Role,
            name: "orders".into(),
            holder: None,
        };
        assert!(e.to_string().contains("database.adopt: true"), "{e}");
    }
}
