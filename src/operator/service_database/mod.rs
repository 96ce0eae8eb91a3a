//! The ServiceDatabase controller as a pipeline: fetch → decide → apply → status.
//!
//! One reconcile reads top to bottom in [`apply_spec`] and [`converge`]:
//! - [`fetch`]: the relays of the database and the credential Secrets (reads only);
//! - [`decide`]: the plan, names, endpoint and logical-decoding need (pure);
//! - [`credentials`]: each role's password state (pure) and the Secret writes — a password
//!   reaches SQL only after its Secret is stored;
//! - [`instance`]: the external server's admin connection, or the managed instance's CA,
//!   superuser Secret and children;
//! - [`provisioning`]: the database, roles, grants, outbox and publications on the server;
//! - [`status`]: computed once from where the reconcile got to, written once if it changed.
//!
//! A failing step returns its error; [`Error::reached`] is the one place that turns an error into
//! status and a Warning Event, and [`error_policy`] decides when to retry. Deletion is
//! [`cleanup`].

mod cdc;
mod cleanup;
mod credentials;
mod decide;
mod fetch;
mod instance;
mod provisioning;
mod status;

use std::sync::Arc;
use std::time::Duration;

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Error as FinalizerError, Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use tracing::{info, instrument};

pub use super::SKIP_CLEANUP_ANNOTATION;
use super::admin::AdminError;
use super::apply::ApplyError;
use super::validate::Invalid;
use super::{Categorized, Context};
use crate::api::ServiceDatabase;
use crate::postgres;
use credentials::SecretTarget;
use decide::Desire;
use status::Reached;

/// Finalizer guarding cleanup outside the cluster (external databases) and Secret retention.
pub const FINALIZER: &str = "servicedb.io/cleanup";

/// How long a reconcile waits before looking again at something only a person can fix (a
/// missing admin Secret) or that takes its time (a starting pod).
const RECHECK: Duration = Duration::from_secs(30);

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
    /// The admin connection cannot be made (a Secret or key missing, host not allowed).
    #[error(transparent)]
    Admin(#[from] AdminError),
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
    /// Removing the CDC connector or its slot failed (retried with backoff).
    #[error("CDC connector: {0}")]
    Connector(String),
    /// The finalizer helper failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<FinalizerError<Error>>),
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

impl From<Invalid> for Error {
    fn from(invalid: Invalid) -> Self {
        Error::Invalid {
            reason: invalid.reason,
            message: invalid.message,
        }
    }
}

impl Categorized for Error {
    fn category(&self) -> &'static str {
        match self.root() {
            Error::Apply(_) => "ApplyFailed",
            Error::Read { .. } => "ReadFailed",
            Error::Status(_) => "StatusFailed",
            Error::Admin(e) => e.category(),
            Error::Provision(e) => e.category(),
            Error::Deprovision(e) => e.category(),
            Error::Guard(_) => "SecretGuardFailed",
            Error::Slots(e) => e.category(),
            Error::Connector(_) => "ConnectorCleanupFailed",
            Error::Finalizer(_) => "FinalizerFailed",
            Error::NoNamespace => "NoNamespace",
            Error::Tls(e) => e.category(),
            Error::Invalid { reason, .. } => reason,
        }
    }
}

impl Error {
    /// The step's own error when it came through the finalizer helper.
    fn root(&self) -> &Error {
        match self {
            Error::Finalizer(e) => match e.as_ref() {
                FinalizerError::ApplyFailed(inner) | FinalizerError::CleanupFailed(inner) => {
                    inner.root()
                }
                _ => self,
            },
            other => other,
        }
    }

    /// What status says about this error; `None` for failures that are not the user's to fix
    /// (apiserver reads and writes): status keeps what it said, the error is logged and retried.
    fn reached(&self, desire: Option<&Desire>) -> Option<Reached> {
        match (self.root(), desire) {
            (Error::Invalid { reason, message }, _) => Some(Reached::Invalid {
                reason,
                message: message.clone(),
            }),
            (Error::Admin(AdminError::Unavailable(message)), Some(d)) => {
                Some(Reached::AdminUnavailable {
                    instance: d.instance_text.clone(),
                    endpoint: d.endpoint.clone(),
                    message: message.clone(),
                })
            }
            (Error::Provision(e), Some(d)) => Some(Reached::ProvisionFailed {
                instance: d.instance_text.clone(),
                endpoint: d.endpoint.clone(),
                reason: e.category(),
                // A summary; the full error goes only to the operator's log.
                message: postgres::summary::user_message(e),
            }),
            _ => None,
        }
    }

    /// The Warning Event for this error: reason, action and note (never the server's words).
    fn event(&self) -> Option<(&'static str, &'static str, String)> {
        match self.root() {
            Error::Invalid { reason, message } => Some((reason, "Validate", message.clone())),
            Error::Admin(AdminError::Unavailable(message)) => {
                Some(("AdminSecretMissing", "Connect", message.clone()))
            }
            Error::Provision(e) => Some((
                e.category(),
                "Provision",
                postgres::summary::user_message(e),
            )),
            _ => None,
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
                Finalizer::Cleanup(sdb) => cleanup::cleanup(&sdb, &ctx).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
    })
    .await
}

/// An invalid spec waits for the next edit; a missing admin Secret is looked at again every
/// 30 s (nothing watches it); everything else retries with a per-object exponential backoff
/// (capped at five minutes).
pub fn error_policy(sdb: Arc<ServiceDatabase>, err: &Error, ctx: Arc<Context>) -> Action {
    match err.root() {
        Error::Invalid { .. } => Action::await_change(),
        Error::Admin(AdminError::Unavailable(_)) => Action::requeue(RECHECK),
        _ => super::retry_with_backoff(sdb.as_ref(), err, &ctx),
    }
}

/// The pipeline: fetch the relays, decide, converge, then one status write and (on failure)
/// one Warning Event.
async fn apply_spec(sdb: &ServiceDatabase, ctx: &Context) -> Result<Action, Error> {
    let ns = sdb.namespace().ok_or(Error::NoNamespace)?;
    let relays = fetch::relays_of(ctx, &ns, &sdb.name_any()).await?;
    let desire = decide::desire(sdb, &relays, &ctx.settings.guard_rails);
    let result = match &desire {
        Ok(desire) => converge(sdb, ctx, &ns, desire).await,
        Err(invalid) => Err(invalid.clone().into()),
    };
    let reached = match &result {
        Ok(reached) => Some(reached.clone()),
        Err(e) => e.reached(desire.as_ref().ok()),
    };
    if let Some((reason, action, note)) = result.as_ref().err().and_then(Error::event) {
        ctx.event(sdb, EventType::Warning, reason, action, note)
            .await;
    }
    if let Some(reached) = &reached {
        status::write(ctx, sdb, reached).await?;
    }
    let reached = result?;
    ctx.backoff.reset(&super::object_key(sdb));
    Ok(Action::requeue(next_look(&reached, ctx.settings.resync)))
}

/// When to reconcile again after a reconcile that got to `reached`: soon while something is on
/// its way (a pod starting, a connector not running yet, a removal to retry), else at the resync.
fn next_look(reached: &Reached, resync: Duration) -> Duration {
    match reached {
        Reached::InstanceStarting { .. } => RECHECK,
        Reached::Ready {
            cdc_retiring: Some(_),
            ..
        } => RECHECK,
        Reached::Ready { cdc: Some(c), .. } => c.recheck.unwrap_or(resync).min(resync),
        _ => resync,
    }
}

/// The apply steps for a valid spec: credentials, instance, Secrets, provisioning.
async fn converge(
    sdb: &ServiceDatabase,
    ctx: &Context,
    ns: &str,
    desire: &Desire,
) -> Result<Reached, Error> {
    let found = fetch::credential_secrets(ctx, ns, sdb, desire).await?;
    let (creds, superuser) = credentials::load_all(sdb, desire, &found);
    let (target, managed) = match (
        &sdb.spec.instance.managed,
        superuser,
        &sdb.spec.instance.external,
    ) {
        (Some(managed), Some(superuser), _) => {
            let (target, ca) = instance::managed_target(ctx, ns, desire, &superuser).await?;
            (target, Some((managed, superuser, ca)))
        }
        (None, _, Some(external)) => (
            instance::external_target(ctx, sdb, desire, external).await?,
            None,
        ),
        // The CRD requires exactly one of the two.
        _ => {
            return Err(Error::Invalid {
                reason: "NoInstance",
                message: "spec.instance names neither managed nor external".to_owned(),
            });
        }
    };
    let to = SecretTarget {
        ns,
        name: &sdb.name_any(),
        owner: crate::specs::labels::controller_ref(sdb),
        target: &target,
        database: desire.database(),
    };
    // Every Secret is stored before any role gets its password.
    let mut persisted = credentials::persist(ctx, &to, creds).await?;
    let ready = match &managed {
        Some((spec, superuser, ca)) => {
            let instance = (&target, ca);
            instance::apply_managed(ctx, sdb, desire, spec, superuser, &persisted, instance).await?
        }
        None => true,
    };
    if !ready {
        return Ok(Reached::InstanceStarting {
            instance: desire.instance_text.clone(),
            endpoint: desire.endpoint.clone(),
        });
    }
    // A Ready instance ran its first-start SQL, so it holds every password that was in it.
    persisted.instance_ready();
    // A removed `cdc`: its connector and slot go before provisioning drops the publication.
    let cdc_retiring = cdc::retire_removed(ctx, sdb, &target).await.map(Box::new);
    // The cdc Secret stays while its connector is not removed: Connect resolves the password
    // reference even to stop the connector and reset its offsets.
    credentials::remove_unneeded(ctx, sdb, ns, desire, cdc_retiring.is_none()).await?;
    let provisioned =
        provisioning::converge(ctx, sdb, desire, &target, &mut persisted, &to).await?;
    provisioning::collect_orphaned_slots(ctx, sdb, ns, &target.admin, desire.database()).await;
    let cdc = match &sdb.spec.cdc {
        Some(spec) => {
            let password = persisted.password("cdc").cloned();
            let report =
                cdc::converge(ctx, sdb, spec, desire, &target, &provisioned, password).await;
            Some(Box::new(report))
        }
        None => None,
    };
    Ok(Reached::Ready {
        instance: desire.instance_text.clone(),
        endpoint: desire.endpoint.clone(),
        database: desire.database().to_owned(),
        outbox: desire.outbox().map(ToString::to_string),
        cdc,
        cdc_retiring,
    })
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
    let going: Vec<String> = fetch::relays_of(ctx, ns, &sdb.name_any())
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
