//! The ServiceDatabase controller: validate → build → apply → provision → status (Kubernetes and database I/O).
//!
//! Passwords are the one thing that must never be lost: a password is generated once, written to
//! its Secret marked `pending` before the role gets it, and marked `applied` after. Nothing here
//! ever regenerates a password that a Secret still holds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, instrument};

use super::Context;
use super::apply::{ApplyError, Outcome, delete_if_exists};
use super::conditions::{self, Desired};
use super::guard_rails::GuardRails;
use super::validate::{Invalid, validate};
use crate::api::OutboxRelay;
use crate::api::outbox_relay::RelayMode;
use crate::api::service_database::{
    DeletionPolicy, Endpoint, ExternalInstance, Phase, SecretNames, ServiceDatabase,
    ServiceDatabaseStatus,
};
use crate::postgres::{
    self, ConnectParams, DatabasePlan, Ident, OwnerMark, Password, PersistedPassword,
    QualifiedName, RoleNames, SslMode as PgSslMode,
};
use crate::specs::bootstrap;
use crate::specs::credentials::{
    self, Credentials, PASSWORD_APPLIED, PASSWORD_BOOTSTRAP, PASSWORD_PENDING,
    PASSWORD_REGENERATED, credential_secret, password_applied, secret_value, stored_password,
};
use crate::specs::instance::{self, InstanceParams, POSTGRES_PORT};
use crate::specs::labels::{DatabaseNames, controller_ref};
use crate::specs::tls::CertPair;

/// Finalizer guarding cleanup outside the cluster (external databases) and Secret retention.
pub const FINALIZER: &str = "servicedb.io/cleanup";
/// Annotation that lets a ServiceDatabase (or OutboxRelay) go without cleanup.
pub const SKIP_CLEANUP_ANNOTATION: &str = "servicedb.io/skip-cleanup";

/// Why a reconcile failed; each variant is one failing step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Applying or deleting a child failed.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// Reading from the apiserver failed.
    #[error("could not read {what}: {source}")]
    Read {
        /// What was read.
        what: String,
        /// Cause.
        source: kube::Error,
    },
    /// Writing status failed.
    #[error("could not write status: {0}")]
    Status(#[source] kube::Error),
    /// Provisioning in the database failed (the server is reachable but said no, or is down).
    #[error("{0}")]
    Provision(#[from] postgres::ProvisionError),
    /// Dropping the database failed.
    #[error("{0}")]
    Deprovision(#[from] postgres::deprovision::DeprovisionError),
    /// Holding or releasing the Secret cleanup needs failed.
    #[error(transparent)]
    Guard(#[from] super::secret_guard::GuardError),
    /// Reading replication slots failed.
    #[error("{0}")]
    Slots(#[from] postgres::slots::SlotError),
    /// The finalizer helper failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// The object has no namespace (never happens for a namespaced kind).
    #[error("object has no namespace")]
    NoNamespace,
    /// The managed instance's CA or server certificate could not be made.
    #[error("TLS: {0}")]
    Tls(#[from] super::tls::Error),
    /// The spec cannot be acted on (reported as a condition, not retried).
    #[error("{message}")]
    Invalid {
        /// CamelCase reason.
        reason: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl super::Categorized for Error {
    fn category(&self) -> &'static str {
        match self {
            Error::Apply(_) => "ApplyFailed",
            Error::Read { .. } => "ReadFailed",
            Error::Status(_) => "StatusFailed",
            Error::Provision(e) => e.category(),
            Error::Deprovision(e) => e.category(),
            Error::Guard(_) => "SecretGuardFailed",
            Error::Slots(e) => e.category(),
            Error::Finalizer(_) => "FinalizerFailed",
            Error::NoNamespace => "NoNamespace",
            Error::Tls(e) => e.category(),
            Error::Invalid { reason, .. } => reason,
        }
    }
}

/// Entry point for the controller runtime.
#[instrument(skip_all, fields(name = %sdb.name_any(), namespace = sdb.namespace().as_deref().unwrap_or("")))]
pub async fn reconcile(sdb: Arc<ServiceDatabase>, ctx: Arc<Context>) -> Result<Action, Error> {
    super::observed::<ServiceDatabase, _>(&ctx, async {
        let ns = sdb.namespace().ok_or(Error::NoNamespace)?;
        if let Some(wait) = wait_for_relays_to_go(&sdb, &ctx, &ns).await? {
            return Ok(wait);
        }
        let api: Api<ServiceDatabase> = Api::namespaced(ctx.client.clone(), &ns);
        finalizer(&api, FINALIZER, sdb, |event| async {
            match event {
                Finalizer::Apply(sdb) => apply_spec(&sdb, &ctx).await,
                Finalizer::Cleanup(sdb) => cleanup(&sdb, &ctx).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
    })
    .await
}

/// A ServiceDatabase being deleted waits (bounded by the cleanup timeout) until the
/// OutboxRelays of its database that are being deleted too are gone: their cleanup drops their
/// replication slots through this database's admin credentials, which must still be there. In
/// a namespace deletion everything is deleted at once; this is what orders it.
async fn wait_for_relays_to_go(
    sdb: &ServiceDatabase,
    ctx: &Context,
    ns: &str,
) -> Result<Option<Action>, Error> {
    let deleting = sdb.meta().deletion_timestamp.is_some();
    let ours = sdb.finalizers().iter().any(|f| f == FINALIZER);
    if !deleting || !ours || super::deleting_for(sdb) >= ctx.settings.cleanup_timeout {
        return Ok(None);
    }
    let going: Vec<String> = relays_of(ctx, ns, &sdb.name_any())
        .await?
        .iter()
        .filter(|r| r.meta().deletion_timestamp.is_some())
        .map(ResourceExt::name_any)
        .collect();
    if going.is_empty() {
        return Ok(None);
    }
    info!(relays = ?going, "waiting for the relays being deleted to drop their slots");
    Ok(Some(Action::requeue(Duration::from_secs(2))))
}

/// Transient errors retry with a per-object exponential backoff (capped at five minutes).
pub fn error_policy(sdb: Arc<ServiceDatabase>, err: &Error, ctx: Arc<Context>) -> Action {
    super::retry_with_backoff(sdb.as_ref(), err, &ctx)
}

/// What the database side needs, derived from the spec and its neighbours.
struct Desire {
    names: DatabaseNames,
    roles: RoleNames,
    /// The plan without passwords; [`plan_for`] adds the ones to set.
    plan: DatabasePlan,
    /// A Logical relay publishes this database: instance needs `wal_level=logical`.
    logical_relay: bool,
}

impl Desire {
    fn outbox(&self) -> Option<&QualifiedName> {
        self.plan.outbox.as_ref()
    }
}

/// What the database side needs, after [`validate`]: nothing is applied or connected to for a
/// spec that fails it.
fn desire(
    sdb: &ServiceDatabase,
    relays: &[OutboxRelay],
    rails: &GuardRails,
) -> Result<Desire, Invalid> {
    validate(&sdb.spec, rails)?;
    // A relay being deleted keeps its slot until its own cleanup drops it; wal_level stays
    // logical for that slot by the instance's slot check, not by this flag.
    let logical_relay = relays
        .iter()
        .any(|r| r.spec.mode == RelayMode::Logical && r.meta().deletion_timestamp.is_none());
    let roles = RoleNames::for_service(&sdb.spec.owner.service).map_err(|e| Invalid {
        reason: "InvalidOwnerService",
        message: e.to_string(),
    })?;
    let owner = OwnerMark::new(
        sdb.namespace().unwrap_or_default(),
        sdb.name_any(),
        sdb.uid().unwrap_or_default(),
    )
    .map_err(|e| Invalid {
        reason: "InvalidIdentifier",
        message: e.to_string(),
    })?;
    // The schema already enforces identifier patterns; this is the second line of defence.
    let mut plan =
        DatabasePlan::for_spec(&sdb.spec, owner, logical_relay).map_err(|e| Invalid {
            reason: "InvalidIdentifier",
            message: e.to_string(),
        })?;
    // A managed instance's server belongs to this ServiceDatabase alone (and instances
    // bootstrapped before marks existed carry none): adopting there takes nothing from anyone.
    plan.adopt |= sdb.spec.instance.managed.is_some();
    Ok(Desire {
        names: DatabaseNames::new(&sdb.name_any()),
        roles,
        plan,
        logical_relay,
    })
}

/// Relays in the namespace that publish this database's outbox, including those being deleted.
async fn relays_of(ctx: &Context, ns: &str, name: &str) -> Result<Vec<OutboxRelay>, Error> {
    let api: Api<OutboxRelay> = Api::namespaced(ctx.client.clone(), ns);
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::Read {
            what: "OutboxRelays".to_owned(),
            source,
        })?;
    Ok(list
        .items
        .into_iter()
        .filter(|r| r.spec.database_ref.name == name)
        .collect())
}

/// One role's credentials as found or generated in this reconcile.
struct RoleCredentials {
    secret_name: String,
    purpose: &'static str,
    role: Ident,
    password: Password,
    /// The role is known to have this password.
    applied: bool,
    /// The password is in the managed instance's bootstrap SQL: applied once the pod is Ready.
    bootstrap: bool,
    /// The Secret did not exist: its password was generated now.
    generated: bool,
    /// The password replaces one whose Secret a person deleted (generated now while status
    /// listed the Secret, or found in a Secret marked `regenerated`).
    replaces_lost: bool,
}

async fn load_credentials(
    secrets: &Api<Secret>,
    secret_name: String,
    purpose: &'static str,
    role: Ident,
) -> Result<RoleCredentials, Error> {
    let existing = secrets
        .get_opt(&secret_name)
        .await
        .map_err(|source| Error::Read {
            what: format!("Secret {secret_name}"),
            source,
        })?;
    Ok(
        match existing
            .as_ref()
            .and_then(|s| stored_password(s).map(|p| (p, s)))
        {
            Some((password, secret)) => RoleCredentials {
                secret_name,
                purpose,
                role,
                password: Password::from_plaintext(password),
                applied: password_applied(secret),
                bootstrap: credentials::password_state(secret) == Some(PASSWORD_BOOTSTRAP),
                generated: false,
                replaces_lost: credentials::password_state(secret) == Some(PASSWORD_REGENERATED),
            },
            None => RoleCredentials {
                secret_name,
                purpose,
                role,
                password: Password::generate(),
                applied: false,
                bootstrap: false,
                generated: true,
                replaces_lost: false,
            },
        },
    )
}

/// Where the operator and applications reach the database.
struct Target {
    /// Host and port applications use (Secrets, status).
    endpoint: Endpoint,
    /// libpq sslmode applications should use.
    app_ssl_mode: String,
    /// The CA applications verify the server against (`ca.crt` in their Secrets).
    ca_pem: Option<String>,
    /// The operator's admin connection, when it can be made (external: admin Secret present).
    admin: Option<ConnectParams>,
}

async fn apply_spec(sdb: &ServiceDatabase, ctx: &Context) -> Result<Action, Error> {
    let ns = sdb.namespace().ok_or(Error::NoNamespace)?;
    let name = sdb.name_any();
    let key = super::object_key(sdb);
    let relays = relays_of(ctx, &ns, &name).await?;
    let desire = match desire(sdb, &relays, &ctx.settings.guard_rails) {
        Ok(d) => d,
        Err(invalid) => {
            ctx.event(
                sdb,
                EventType::Warning,
                invalid.reason,
                "Validate",
                invalid.message.clone(),
            )
            .await;
            write_status(
                ctx,
                sdb,
                Phase::Pending,
                None,
                None,
                vec![Desired::fail("Ready", invalid.reason, invalid.message)],
            )
            .await?;
            // An invalid spec waits for the next edit.
            return Ok(Action::await_change());
        }
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let owner = controller_ref(sdb);

    // Credentials first: found in their Secrets or generated now, never regenerated.
    let mut creds = vec![
        load_credentials(
            &secrets,
            desire.names.app_secret(),
            "app",
            desire.roles.app.clone(),
        )
        .await?,
    ];
    if desire.outbox().is_some() {
        creds.push(
            load_credentials(
                &secrets,
                desire.names.relay_secret(),
                "relay",
                desire.roles.relay.clone(),
            )
            .await?,
        );
    }
    if sdb.spec.cdc.is_some() {
        creds.push(
            load_credentials(
                &secrets,
                desire.names.cdc_secret(),
                "cdc",
                desire.roles.cdc.clone(),
            )
            .await?,
        );
    }

    // A Secret status listed is gone: a person deleted it, and its new password says so in the
    // Secret until applied (the Event may come from a later reconcile than this one).
    for c in creds.iter_mut().filter(|c| c.generated) {
        c.replaces_lost = was_recorded(sdb, c.purpose);
    }

    // The instance and where to reach it.
    let (target, instance_ready, instance_text) =
        match (&sdb.spec.instance.managed, &sdb.spec.instance.external) {
            (Some(managed), _) => {
                let superuser = load_credentials(
                    &secrets,
                    desire.names.superuser_secret(),
                    "superuser",
                    desire.roles.app.clone(),
                )
                .await?;
                if superuser.generated {
                    // First creation: every password goes into the bootstrap SQL.
                    for c in creds.iter_mut().filter(|c| !c.applied) {
                        c.bootstrap = true;
                    }
                }
                let host = format!("{}.{ns}.svc", desire.names.instance());
                let endpoint = Endpoint {
                    host: host.clone(),
                    port: POSTGRES_PORT,
                };
                // TLS first: the instance starts with ssl=on and the certificate mounted.
                let ca = super::tls::namespace_ca(ctx, &ns).await?;
                let server_cert =
                    super::tls::server_certificate(ctx, &ns, &name, owner.clone(), &ca).await?;
                let plan = plan_for(&desire, &creds, true);
                // The bootstrap SQL is written once, with the first Secret: it only ever runs on an
                // empty data directory, and rewriting it would change the Secret on every resync.
                let bootstrap_sql = match superuser.generated {
                    true => bootstrap::bootstrap_sql(&plan),
                    false => secrets
                        .get_opt(&desire.names.superuser_secret())
                        .await
                        .map_err(|source| Error::Read {
                            what: "superuser Secret".to_owned(),
                            source,
                        })?
                        .and_then(|s| secret_value(&s, instance::BOOTSTRAP_KEY))
                        .unwrap_or_default(),
                };
                let mut su_secret = credential_secret(
                    &superuser.secret_name,
                    &ns,
                    &name,
                    "superuser",
                    owner.clone(),
                    &Credentials {
                        host: host.clone(),
                        port: POSTGRES_PORT,
                        database: "postgres".to_owned(),
                        username: "postgres".to_owned(),
                        password: superuser.password.expose().to_owned(),
                        ssl_mode: PgSslMode::VerifyFull.as_libpq().to_owned(),
                        ca_pem: Some(ca.cert_pem.clone()),
                    },
                    PASSWORD_APPLIED,
                );
                su_secret.data.get_or_insert_with(BTreeMap::new).insert(
                    instance::BOOTSTRAP_KEY.to_owned(),
                    k8s_openapi::ByteString(bootstrap_sql.into_bytes()),
                );
                ctx.apply(&ns, su_secret).await?;
                // Relays drop their slots with this Secret when everything is deleted at once.
                super::secret_guard::hold(ctx, &ns, &desire.names.superuser_secret(), &name)
                    .await?;
                let admin = managed_admin(ctx, host.clone(), superuser.password.clone(), &ca);
                let spec_needs_logical = desire.logical_relay || sdb.spec.cdc.is_some();
                let logical_decoding = spec_needs_logical
                    || logical_decoding_still_needed(
                        ctx,
                        sdb,
                        &ns,
                        &desire.names.instance(),
                        &admin,
                    )
                    .await?;

                let owner_pods =
                    sdb.spec.owner.pod_selector.clone().unwrap_or_else(|| {
                        instance::default_owner_selector(&sdb.spec.owner.service)
                    });
                let mut params = InstanceParams {
                    name: &name,
                    namespace: &ns,
                    owner: owner.clone(),
                    managed,
                    deletion_policy: sdb.spec.deletion_policy,
                    logical_decoding,
                    owner_pods,
                    operator_namespace: ctx.settings.operator_namespace.as_deref(),
                    cdc: sdb.spec.cdc.as_ref(),
                    config_checksum: String::new(),
                };
                let config_map = instance::config_map(&params);
                // The certificate is in the checksum: Postgres reads it at start, so a renewed
                // one restarts the pod (once every ~8 months; see specs::tls).
                params.config_checksum = super::apply::desired_hash(&(
                    &config_map.data,
                    instance::server_settings(&params),
                    &server_cert,
                ))
                .unwrap_or_default();
                let mut changed = Vec::new();
                if ctx.apply(&ns, config_map).await? == Outcome::Applied {
                    changed.push("ConfigMap");
                }
                if ctx.apply(&ns, instance::headless_service(&params)).await? == Outcome::Applied {
                    changed.push("headless Service");
                }
                if ctx.apply(&ns, instance::service(&params)).await? == Outcome::Applied {
                    changed.push("Service");
                }
                if ctx.apply(&ns, instance::network_policy(&params)).await? == Outcome::Applied {
                    changed.push("NetworkPolicy");
                }
                if ctx.apply(&ns, instance::stateful_set(&params)).await? == Outcome::Applied {
                    changed.push("StatefulSet");
                }
                if !changed.is_empty() {
                    ctx.event(
                        sdb,
                        EventType::Normal,
                        "InstanceApplied",
                        "Apply",
                        format!("applied {}", changed.join(", ")),
                    )
                    .await;
                }
                let ready = instance_pod_ready(ctx, &ns, &name).await?;
                // A Ready instance ran its bootstrap, so it holds every password that was in it.
                if ready {
                    for c in creds.iter_mut().filter(|c| c.bootstrap) {
                        c.applied = true;
                    }
                }
                let text = format!("managed, Postgres {}", managed.version);
                (
                    Target {
                        endpoint,
                        app_ssl_mode: PgSslMode::VerifyFull.as_libpq().to_owned(),
                        ca_pem: Some(ca.cert_pem),
                        admin: Some(admin),
                    },
                    ready,
                    text,
                )
            }
            (None, Some(external)) => {
                let admin = external_admin(ctx, &secrets, external).await?;
                let endpoint = Endpoint {
                    host: external.host.clone(),
                    port: external.port,
                };
                let text = format!("external, {}:{}", external.host, external.port);
                match admin {
                    Ok(admin) => {
                        let admin_secret = external.admin_secret_ref.name.as_str();
                        super::secret_guard::hold(ctx, &ns, admin_secret, &name).await?;
                        if sdb.status.as_ref().and_then(|s| s.observed_generation)
                            != sdb.meta().generation
                        {
                            // The admin Secret reference may have changed: release the old one.
                            super::secret_guard::release_all_except(
                                ctx,
                                &ns,
                                &[admin_secret],
                                &name,
                            )
                            .await?;
                        }
                        let ssl = admin.ssl_mode.as_libpq().to_owned();
                        // Applications verify against the same CA the operator does.
                        let ca_pem = admin
                            .ca_pem
                            .as_ref()
                            .filter(|_| admin.ssl_mode != PgSslMode::Disable)
                            .map(|pem| String::from_utf8_lossy(pem).into_owned());
                        (
                            Target {
                                endpoint,
                                app_ssl_mode: ssl,
                                ca_pem,
                                admin: Some(admin),
                            },
                            true,
                            text,
                        )
                    }
                    Err(message) => {
                        ctx.event(
                            sdb,
                            EventType::Warning,
                            "AdminSecretMissing",
                            "Connect",
                            message.clone(),
                        )
                        .await;
                        write_status(
                            ctx,
                            sdb,
                            Phase::Pending,
                            Some(text),
                            Some(endpoint),
                            vec![
                                Desired::fail("Ready", "AdminSecretMissing", message.clone()),
                                Desired::fail("InstanceReady", "AdminSecretMissing", message),
                            ],
                        )
                        .await?;
                        return Ok(Action::requeue(Duration::from_secs(30)));
                    }
                }
            }
            (None, None) => return Ok(Action::await_change()),
        };

    // Credential Secrets, written before any role gets a new password.
    let database = desire.plan.database.as_str().to_owned();
    for c in &creds {
        let state = match (c.applied, c.bootstrap) {
            (true, _) => PASSWORD_APPLIED,
            (false, true) => PASSWORD_BOOTSTRAP,
            (false, false) if c.replaces_lost => PASSWORD_REGENERATED,
            (false, false) => PASSWORD_PENDING,
        };
        let secret = role_secret(&ns, &name, owner.clone(), &target, &database, c, state);
        ctx.apply(&ns, secret).await?;
    }
    // Secrets no longer wanted (outbox disabled, cdc removed).
    if desire.outbox().is_none()
        && delete_if_exists::<Secret>(&ctx.client, &ns, &desire.names.relay_secret()).await?
    {
        ctx.event(
            sdb,
            EventType::Normal,
            "SecretDeleted",
            "Delete",
            format!(
                "deleted Secret {} (outbox disabled)",
                desire.names.relay_secret()
            ),
        )
        .await;
    }
    if sdb.spec.cdc.is_none()
        && delete_if_exists::<Secret>(&ctx.client, &ns, &desire.names.cdc_secret()).await?
    {
        ctx.event(
            sdb,
            EventType::Normal,
            "SecretDeleted",
            "Delete",
            format!("deleted Secret {} (cdc removed)", desire.names.cdc_secret()),
        )
        .await;
    }

    let mut conds = Vec::new();
    if !instance_ready {
        let msg = "waiting for the instance pod to be Ready".to_owned();
        conds.push(Desired::fail("Ready", "InstanceNotReady", msg.clone()));
        conds.push(Desired::fail("InstanceReady", "PodNotReady", msg));
        write_status(
            ctx,
            sdb,
            Phase::Provisioning,
            Some(instance_text),
            Some(target.endpoint.clone()),
            conds,
        )
        .await?;
        return Ok(Action::requeue(Duration::from_secs(30)));
    }

    // Provision in the database on every reconcile, managed or external: idempotent (catalog
    // reads only when nothing drifted), so a failed first-start script, a role dropped by hand
    // or a relay added later are repaired instead of reported Ready.
    let mut missing_cdc = Vec::new();
    if let Some(admin) = &target.admin {
        let plan = plan_for(&desire, &creds, false);
        match postgres::provision::provision(admin, &plan).await {
            Ok(report) => {
                ctx.backoff.reset(&key);
                if report.changed() {
                    ctx.event(
                        sdb,
                        EventType::Normal,
                        "Provisioned",
                        "Provision",
                        report.changes.join("; "),
                    )
                    .await;
                }
                for w in &report.warnings {
                    ctx.event(
                        sdb,
                        EventType::Warning,
                        "ProvisionWarning",
                        "Provision",
                        w.clone(),
                    )
                    .await;
                }
                missing_cdc = report
                    .missing_cdc_tables
                    .iter()
                    .map(|t| t.to_string())
                    .collect();
                for c in creds.iter_mut().filter(|c| !c.applied) {
                    // A pending Secret that is not marked `regenerated` held a password the role
                    // did not have yet (an interrupted first run): nothing was lost.
                    if c.replaces_lost {
                        ctx.event(
                            sdb,
                            EventType::Warning,
                            "CredentialsRegenerated",
                            "SetPassword",
                            format!("Secret {} was deleted: set a new password on role {} and recreated the Secret", c.secret_name, c.role.as_str()),
                        )
                        .await;
                    }
                    c.applied = true;
                    let secret = role_secret(
                        &ns,
                        &name,
                        owner.clone(),
                        &target,
                        &database,
                        c,
                        PASSWORD_APPLIED,
                    );
                    ctx.apply(&ns, secret).await?;
                }
            }
            Err(e) => {
                let reason = e.category();
                // Status and Events get a summary; the full error only the operator's log.
                debug!(error = %e, "provisioning failed");
                let message = postgres::summary::user_message(&e);
                ctx.event(
                    sdb,
                    EventType::Warning,
                    reason,
                    "Provision",
                    message.clone(),
                )
                .await;
                let phase = Phase::Degraded;
                write_status(
                    ctx,
                    sdb,
                    phase,
                    Some(instance_text),
                    Some(target.endpoint.clone()),
                    vec![
                        Desired::fail("Ready", reason, message.clone()),
                        Desired::ok("InstanceReady", "Ready", "the instance is ready"),
                        Desired::fail("DatabaseReady", reason, message),
                    ],
                )
                .await?;
                return Ok(Action::requeue(ctx.backoff.next(&key)));
            }
        }
    }

    if let Some(admin) = &target.admin {
        collect_orphaned_slots(ctx, sdb, &ns, admin, &database).await;
    }
    conds.push(Desired::ok(
        "Ready",
        "Provisioned",
        "the database, roles and credentials are in place",
    ));
    conds.push(Desired::ok(
        "InstanceReady",
        "Ready",
        "the instance is ready",
    ));
    conds.push(Desired::ok(
        "DatabaseReady",
        "Provisioned",
        format!("database {database} and its roles exist"),
    ));
    if let Some(outbox) = desire.outbox() {
        conds.push(Desired::ok(
            "OutboxReady",
            "Provisioned",
            format!("outbox table {outbox} exists"),
        ));
    }
    if sdb.spec.cdc.is_some() {
        if missing_cdc.is_empty() {
            conds.push(Desired::ok(
                "CdcReady",
                "Provisioned",
                "the cdc role and publication cover every table",
            ));
        } else {
            conds.push(Desired::fail(
                "CdcReady",
                "TablesMissing",
                format!("tables not found yet: {}", missing_cdc.join(", ")),
            ));
        }
    }
    write_status(
        ctx,
        sdb,
        Phase::Ready,
        Some(instance_text),
        Some(target.endpoint),
        conds,
    )
    .await?;
    Ok(Action::requeue(ctx.settings.resync))
}

/// Whether status already listed the Secret of `purpose`: a missing Secret then means a person
/// deleted it (as opposed to first creation).
fn was_recorded(sdb: &ServiceDatabase, purpose: &str) -> bool {
    let Some(secrets) = sdb.status.as_ref().and_then(|s| s.secrets.as_ref()) else {
        return false;
    };
    match purpose {
        "app" => secrets.app.is_some(),
        "relay" => secrets.relay.is_some(),
        "cdc" => secrets.cdc.is_some(),
        _ => false,
    }
}

fn role_secret(
    ns: &str,
    name: &str,
    owner: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
    target: &Target,
    database: &str,
    c: &RoleCredentials,
    state: &str,
) -> Secret {
    credential_secret(
        &c.secret_name,
        ns,
        name,
        c.purpose,
        owner,
        &Credentials {
            host: target.endpoint.host.clone(),
            port: target.endpoint.port,
            database: database.to_owned(),
            username: c.role.as_str().to_owned(),
            password: c.password.expose().to_owned(),
            ssl_mode: target.app_ssl_mode.clone(),
            ca_pem: target.ca_pem.clone(),
        },
        state,
    )
}

/// The database plan: every role carries the password its Secret holds (a role re-created by
/// drift repair gets it back); it is set on an existing role only when the Secret is not
/// `applied` (or, for a bootstrap, always).
///
/// Invariant: the passwords come from Secrets read back in this reconcile or written as
/// `pending` before `provision` runs. The bootstrap script is rendered before the role Secrets
/// are written, but it only runs when the pod starts; should the operator stop in between, the
/// next reconcile finds no Secret, generates and stores a new password and sets it (`reset`).
fn plan_for(desire: &Desire, creds: &[RoleCredentials], bootstrap: bool) -> DatabasePlan {
    let mut plan = desire.plan.clone();
    let password = |purpose: &str| {
        creds.iter().find(|c| c.purpose == purpose).map(|c| {
            (
                PersistedPassword::assume_persisted(c.password.clone()),
                bootstrap || !c.applied,
            )
        })
    };
    if let Some((p, reset)) = password("app") {
        plan.app = plan.app.with_password(p, reset);
    }
    if let Some(relay) = &mut plan.relay
        && let Some((p, reset)) = password("relay")
    {
        *relay = relay.clone().with_password(p, reset);
    }
    if let Some(cdc) = &mut plan.cdc
        && let Some((p, reset)) = password("cdc")
    {
        cdc.role = cdc.role.clone().with_password(p, reset);
    }
    plan
}

/// The admin connection of an external instance, or a message saying what is missing.
async fn external_admin(
    ctx: &Context,
    secrets: &Api<Secret>,
    external: &ExternalInstance,
) -> Result<Result<ConnectParams, String>, Error> {
    // Backstop for every caller (slot and database cleanup): never connect to a host outside
    // the operator's allow-list.
    if let Err(message) = ctx
        .settings
        .guard_rails
        .allowed_external_hosts
        .check(&external.host)
    {
        return Ok(Err(message));
    }
    let secret_name = &external.admin_secret_ref.name;
    let Some(secret) = secrets
        .get_opt(secret_name)
        .await
        .map_err(|source| Error::Read {
            what: format!("Secret {secret_name}"),
            source,
        })?
    else {
        return Ok(Err(format!("admin Secret {secret_name} not found")));
    };
    let (Some(user), Some(password)) = (
        secret_value(&secret, credentials::USERNAME_KEY),
        stored_password(&secret),
    ) else {
        return Ok(Err(format!(
            "admin Secret {secret_name} needs the keys username and password"
        )));
    };
    // The CA: `caSecretRef` if set (it must exist), else the admin Secret's `ca.crt`.
    let ca_pem = match &external.ca_secret_ref {
        Some(r) => {
            let Some(ca_secret) = secrets
                .get_opt(&r.name)
                .await
                .map_err(|source| Error::Read {
                    what: format!("Secret {}", r.name),
                    source,
                })?
            else {
                return Ok(Err(format!("CA Secret {} not found", r.name)));
            };
            match secret_value(&ca_secret, &r.key).filter(|v| !v.trim().is_empty()) {
                Some(pem) => Some(pem),
                None => {
                    return Ok(Err(format!("CA Secret {} has no key {}", r.name, r.key)));
                }
            }
        }
        None => secret_value(&secret, credentials::CA_CERT_KEY).filter(|v| !v.trim().is_empty()),
    };
    let ssl_mode = external.effective_ssl_mode(ca_pem.is_some());
    let port = u16::try_from(external.port).unwrap_or(5432);
    Ok(Ok(ConnectParams {
        ssl_mode,
        ca_pem: ca_pem.map(String::into_bytes),
        connect_timeout: ctx.settings.connect_timeout,
        ..ConnectParams::new(
            external.host.clone(),
            port,
            user,
            Password::from_plaintext(password),
            external.admin_database.clone(),
        )
    }))
}

/// What `wal_level` a managed instance whose spec no longer needs logical decoding gets.
#[derive(Debug, PartialEq, Eq)]
enum WalLevel {
    /// `replica`: nothing needs logical decoding and no logical slot is left.
    Lower,
    /// Stay `logical` for the given reason: Postgres refuses to start with `wal_level=replica`
    /// while a logical slot exists, so it is lowered only after every one is gone (checked).
    Keep(String),
}

/// Decides whether an instance running with `wal_level=logical` that its spec no longer needs
/// may restart with `replica`, from the instance's logical slots (pure).
fn lower_wal_level(slots: Result<&[String], &str>) -> WalLevel {
    match slots {
        Ok([]) => WalLevel::Lower,
        Ok(slots) => WalLevel::Keep(format!(
            "logical replication slots still exist: {}",
            slots.join(", ")
        )),
        Err(why) => WalLevel::Keep(format!(
            "could not check the instance for logical replication slots ({why})"
        )),
    }
}

/// True when the instance must keep `wal_level=logical` although the spec no longer asks for
/// it: it runs with it today and a logical slot remains (or could not be ruled out).
async fn logical_decoding_still_needed(
    ctx: &Context,
    sdb: &ServiceDatabase,
    ns: &str,
    stateful_set: &str,
    admin: &ConnectParams,
) -> Result<bool, Error> {
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let running_logical = api
        .get_opt(stateful_set)
        .await
        .map_err(|source| Error::Read {
            what: format!("StatefulSet {stateful_set}"),
            source,
        })?
        .and_then(|sts| sts.spec)
        .and_then(|spec| spec.template.spec)
        .is_some_and(|pod| {
            pod.containers
                .iter()
                .any(|c| c.args.iter().flatten().any(|a| a == "wal_level=logical"))
        });
    if !running_logical {
        return Ok(false);
    }
    let slots = postgres::slots::logical_slots(admin, None).await;
    let decision = lower_wal_level(match &slots {
        Ok(s) => Ok(s.as_slice()),
        Err(e) => Err(e.category()),
    });
    match decision {
        WalLevel::Lower => {
            info!("no logical slot is left: lowering wal_level to replica");
            Ok(false)
        }
        WalLevel::Keep(why) => {
            ctx.event(
                sdb,
                EventType::Normal,
                "WalLevelKept",
                "Apply",
                format!("wal_level stays logical: {why}"),
            )
            .await;
            Ok(true)
        }
    }
}

/// Drops the replication slots of this database that a deleted OutboxRelay left behind (its
/// cleanup could not reach the server, or gave up): a slot nobody reads pins WAL forever.
/// Best effort and repeated on every reconcile; what cannot be dropped is counted in
/// `servicedb_operator_leaked_replication_slots` and reported in an Event.
async fn collect_orphaned_slots(
    ctx: &Context,
    sdb: &ServiceDatabase,
    ns: &str,
    admin: &ConnectParams,
    database: &str,
) {
    let found = match postgres::slots::logical_slots(admin, Some(database)).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %e, "could not list the replication slots of the database");
            return;
        }
    };
    // The relays are listed again *after* the slots: a relay's slot is created by its pod, after
    // the OutboxRelay exists, so every slot just seen belongs to a relay in this fresh list. The
    // list this reconcile started with may predate a relay that created its slot meanwhile.
    let relays = match relays_of(ctx, ns, &sdb.name_any()).await {
        Ok(relays) => relays,
        Err(e) => {
            tracing::warn!(error = %e, "could not list the OutboxRelays");
            return;
        }
    };
    let in_use: Vec<String> = relays
        .iter()
        .map(|r| crate::specs::relay::slot_name(ns, &r.name_any()))
        .collect();
    let mut leaked = 0;
    for slot in postgres::slots::orphaned_relay_slots(&found, &in_use) {
        match postgres::slots::drop_slot(admin, &slot).await {
            Ok(_) => {
                ctx.event(
                    sdb,
                    EventType::Normal,
                    "OrphanedSlotDropped",
                    "DropSlot",
                    format!("dropped replication slot {slot}: its OutboxRelay is gone"),
                )
                .await;
            }
            Err(e) => {
                leaked += 1;
                ctx.event(
                    sdb,
                    EventType::Warning,
                    "OrphanedSlotNotDropped",
                    "DropSlot",
                    format!(
                        "replication slot {slot} belongs to no OutboxRelay and pins WAL; dropping it failed ({}), retrying",
                        e.category()
                    ),
                )
                .await;
            }
        }
    }
    ctx.metrics.set_leaked_slots(ns, &sdb.name_any(), leaked);
}

/// The operator's superuser connection to a managed instance: `verify-full` against the
/// namespace CA, by the Service name the server certificate carries.
fn managed_admin(ctx: &Context, host: String, password: Password, ca: &CertPair) -> ConnectParams {
    ConnectParams {
        ssl_mode: PgSslMode::VerifyFull,
        ca_pem: Some(ca.cert_pem.clone().into_bytes()),
        connect_timeout: ctx.settings.connect_timeout,
        ..ConnectParams::new(host, POSTGRES_PORT as u16, "postgres", password, "postgres")
    }
}

/// Whether the managed instance's pod reports Ready.
async fn instance_pod_ready(ctx: &Context, ns: &str, name: &str) -> Result<bool, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let selector = format!(
        "app.kubernetes.io/name={},app.kubernetes.io/instance={name}",
        instance::POSTGRES_COMPONENT
    );
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::Read {
            what: "instance pods".to_owned(),
            source,
        })?;
    Ok(list.items.iter().any(|p| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    }))
}

/// Write status unless it is unchanged (a no-op reconcile writes nothing).
async fn write_status(
    ctx: &Context,
    sdb: &ServiceDatabase,
    phase: Phase,
    instance_text: Option<String>,
    endpoint: Option<Endpoint>,
    desired: Vec<Desired>,
) -> Result<(), Error> {
    let ns = sdb.namespace().ok_or(Error::NoNamespace)?;
    let names = DatabaseNames::new(&sdb.name_any());
    let current = sdb.status.clone().unwrap_or_default();
    let outbox = sdb.spec.enabled_outbox().is_some();
    let status = ServiceDatabaseStatus {
        observed_generation: sdb.meta().generation,
        phase: Some(phase),
        instance: instance_text,
        endpoint,
        database: Some(sdb.spec.database_name()),
        secrets: Some(SecretNames {
            app: Some(names.app_secret()),
            relay: outbox.then(|| names.relay_secret()),
            cdc: sdb.spec.cdc.as_ref().map(|_| names.cdc_secret()),
        }),
        conditions: conditions::merge(
            &current.conditions,
            &desired,
            sdb.meta().generation,
            Timestamp::now(),
        ),
    };
    if status == current {
        return Ok(());
    }
    if current.phase != Some(phase) {
        info!(?phase, "phase changed");
    }
    let api: Api<ServiceDatabase> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch_status(
        &sdb.name_any(),
        &PatchParams::apply(crate::specs::labels::MANAGER).force(),
        &Patch::Apply(json!({
            "apiVersion": "servicedb.io/v1alpha1",
            "kind": "ServiceDatabase",
            "status": status,
        })),
    )
    .await
    .map_err(Error::Status)?;
    ctx.metrics.wrote("ServiceDatabase/status");
    Ok(())
}

/// Deletion: keep or drop the data as the policy says, never wedge a namespace deletion.
///
/// Cleanup outside the cluster (dropping an external database) is retried with backoff while it
/// fails (the finalizer stays); after `--cleanup-timeout` it gives up with a Warning Event and a
/// metric and lets the object go — leaving the data in place, never losing it by accident.
async fn cleanup(sdb: &ServiceDatabase, ctx: &Context) -> Result<Action, Error> {
    let ns = sdb.namespace().ok_or(Error::NoNamespace)?;
    let name = sdb.name_any();
    let names = DatabaseNames::new(&name);
    let key = super::object_key(sdb);
    let skip = sdb
        .annotations()
        .get(SKIP_CLEANUP_ANNOTATION)
        .is_some_and(|v| v == "true");
    match sdb.spec.deletion_policy {
        DeletionPolicy::Retain => {
            // The data stays, and so must the Secrets that hold its passwords: orphan them so
            // garbage collection leaves them, and a re-created ServiceDatabase adopts them.
            for secret in [
                names.app_secret(),
                names.superuser_secret(),
                names.relay_secret(),
                names.cdc_secret(),
            ] {
                orphan_secret(ctx, &ns, &secret).await?;
            }
            ctx.event(
                sdb,
                EventType::Normal,
                "Retained",
                "Delete",
                "deletionPolicy Retain: kept the data and the credential Secrets".to_owned(),
            )
            .await;
        }
        DeletionPolicy::Delete if skip => {
            ctx.event(
                sdb,
                EventType::Warning,
                "CleanupSkipped",
                "Delete",
                format!("{SKIP_CLEANUP_ANNOTATION} is set: not dropping the database"),
            )
            .await;
        }
        DeletionPolicy::Delete => {
            if let Some(external) = &sdb.spec.instance.external {
                if let Err(failure) = drop_external_database(sdb, ctx, &ns, external).await {
                    let gave_up = super::deleting_for(sdb) >= ctx.settings.cleanup_timeout;
                    let message = if gave_up {
                        format!(
                            "{}; gave up after {:?}: database {} and its roles are left on the server",
                            postgres::summary::user_message(&failure),
                            ctx.settings.cleanup_timeout,
                            sdb.spec.database_name()
                        )
                    } else {
                        format!(
                            "{}; retrying with backoff for up to {:?} after deletion. Set the annotation {SKIP_CLEANUP_ANNOTATION}: \"true\" to delete without dropping the database",
                            postgres::summary::user_message(&failure),
                            ctx.settings.cleanup_timeout
                        )
                    };
                    let reason = if gave_up {
                        "CleanupAbandoned"
                    } else {
                        "CleanupFailed"
                    };
                    ctx.event(sdb, EventType::Warning, reason, "Delete", message.clone())
                        .await;
                    if !gave_up {
                        let _ = write_status(
                            ctx,
                            sdb,
                            Phase::Deleting,
                            None,
                            None,
                            vec![Desired::fail("Ready", "CleanupFailed", message)],
                        )
                        .await;
                        return Err(failure);
                    }
                    ctx.metrics.abandoned_cleanup("ServiceDatabase");
                } else {
                    ctx.backoff.reset(&key);
                }
            }
            // Managed: the StatefulSet's PVC retention policy (whenDeleted: Delete) and garbage
            // collection of the owned children remove the rest.
        }
    }
    // Cleanup is done: let go of the Secrets it needed (the last hold lets a namespace go).
    super::secret_guard::release_all_except(ctx, &ns, &[], &name).await?;
    Ok(Action::await_change())
}

/// Drops an external database and its roles (deletionPolicy Delete).
async fn drop_external_database(
    sdb: &ServiceDatabase,
    ctx: &Context,
    ns: &str,
    external: &ExternalInstance,
) -> Result<(), Error> {
    // A spec that fails validation was never provisioned under its current rules (a reserved
    // name, a host outside the allow-list): touch nothing, let go.
    let desire = match desire(sdb, &[], &ctx.settings.guard_rails) {
        Ok(d) => d,
        Err(invalid) => {
            ctx.event(
                sdb,
                EventType::Warning,
                "CleanupSkipped",
                "Delete",
                format!("not dropping anything: {}", invalid.message),
            )
            .await;
            return Ok(());
        }
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let admin = match external_admin(ctx, &secrets, external).await? {
        Ok(admin) => admin,
        Err(message) => {
            return Err(Error::Invalid {
                reason: "AdminSecretMissing",
                message,
            });
        }
    };
    let roles: Vec<Ident> = desire.roles.all().into_iter().cloned().collect();
    let report = postgres::deprovision::deprovision(
        &admin,
        &desire.plan.owner,
        &desire.plan.database,
        &roles,
    )
    .await?;
    if !report.skipped.is_empty() {
        ctx.event(
            sdb,
            EventType::Warning,
            "NotOurs",
            "Delete",
            format!("left alone: {}", report.skipped.join("; ")),
        )
        .await;
    }
    ctx.event(
        sdb,
        EventType::Normal,
        "Deprovisioned",
        "Delete",
        if report.changes.is_empty() {
            "nothing to drop: the database and roles were already gone".to_owned()
        } else {
            format!("dropped: {}", report.changes.join("; "))
        },
    )
    .await;
    Ok(())
}

async fn orphan_secret(ctx: &Context, ns: &str, name: &str) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let Some(secret) = api
        .get_metadata_opt(name)
        .await
        .map_err(|source| Error::Read {
            what: format!("Secret {name}"),
            source,
        })?
    else {
        return Ok(());
    };
    if secret
        .metadata
        .owner_references
        .as_ref()
        .is_none_or(|o| o.is_empty())
    {
        return Ok(());
    }
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"ownerReferences": null}})),
    )
    .await
    .map_err(|source| Error::Read {
        what: format!("Secret {name} (orphaning)"),
        source,
    })?;
    Ok(())
}

/// The operator's admin connection to the server holding `sdb`'s database, or a message saying
/// what is missing (used by the OutboxRelay controller to drop slots).
pub async fn admin_connection(
    ctx: &Context,
    sdb: &ServiceDatabase,
) -> Result<Result<ConnectParams, String>, Error> {
    let ns = sdb.namespace().ok_or(Error::NoNamespace)?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    match (&sdb.spec.instance.managed, &sdb.spec.instance.external) {
        (_, Some(external)) => external_admin(ctx, &secrets, external).await,
        (Some(_), None) => {
            let names = DatabaseNames::new(&sdb.name_any());
            let secret = secrets
                .get_opt(&names.superuser_secret())
                .await
                .map_err(|source| Error::Read {
                    what: "superuser Secret".to_owned(),
                    source,
                })?;
            let Some(ca) = super::tls::read_namespace_ca(ctx, &ns).await? else {
                return Ok(Err(format!(
                    "the namespace CA Secret {} is missing",
                    crate::specs::tls::CA_SECRET
                )));
            };
            Ok(match secret.as_ref().and_then(stored_password) {
                Some(password) => Ok(managed_admin(
                    ctx,
                    format!("{}.{ns}.svc", names.instance()),
                    Password::from_plaintext(password),
                    &ca,
                )),
                None => Err(format!(
                    "superuser Secret {} not found",
                    names.superuser_secret()
                )),
            })
        }
        (None, None) => Ok(Err("the ServiceDatabase names no instance".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_level_is_lowered_only_when_no_logical_slot_is_left() {
        assert_eq!(lower_wal_level(Ok(&[])), WalLevel::Lower);
        let slots = ["obr_orders_events_1a2b3c4d".to_owned()];
        assert!(matches!(
            lower_wal_level(Ok(&slots)),
            WalLevel::Keep(why) if why.contains("obr_orders_events_1a2b3c4d")
        ));
        assert!(matches!(
            lower_wal_level(Err("ServerUnreachable")),
            WalLevel::Keep(why) if why.contains("could not check")
        ));
    }
}
