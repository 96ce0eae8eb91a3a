//! The OutboxRelay controller: relay Deployment wired to its ServiceDatabase, slot lifecycle, status (Kubernetes and database I/O).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::instrument;

use super::Context;
use super::SKIP_CLEANUP_ANNOTATION;
use super::admin::{AdminError, admin_connection};
use super::apply::{ApplyError, Outcome};
use super::conditions::{self, Desired};
use crate::api::outbox_relay::{OutboxRelayStatus, RelayMode};
use crate::api::{OutboxRelay, ServiceDatabase};
use crate::specs::labels::{DatabaseNames, MANAGER, controller_ref};
use crate::specs::relay::{self, RelayNames, RelayParams};

/// Finalizer that drops a Logical relay's replication slot.
pub const FINALIZER: &str = "servicedb.io/replication-slot";

/// Why an OutboxRelay reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Applying a child failed.
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
    /// Rendering the config file failed (a bug).
    #[error("could not render the relay config: {0}")]
    Render(#[source] serde_yaml::Error),
    /// Writing status failed.
    #[error("could not write status: {0}")]
    Status(#[source] kube::Error),
    /// Dropping the slot failed (or the server could not be reached to drop it).
    #[error("could not drop replication slot {slot}: {message}")]
    SlotNotDropped {
        /// Slot name.
        slot: String,
        /// Why.
        message: String,
    },
    /// Reading what the database's admin connection needs failed.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// The finalizer helper failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// The object has no namespace.
    #[error("object has no namespace")]
    NoNamespace,
}

impl super::Categorized for Error {
    fn category(&self) -> &'static str {
        match self {
            Error::Apply(_) => "ApplyFailed",
            Error::Read { .. } => "ReadFailed",
            Error::Render(_) => "RenderFailed",
            Error::Status(_) => "StatusFailed",
            Error::SlotNotDropped { .. } => "DropSlotFailed",
            Error::Admin(e) => e.category(),
            Error::Finalizer(_) => "FinalizerFailed",
            Error::NoNamespace => "NoNamespace",
        }
    }
}

/// The relays in `relays` that publish `sdb`'s outbox (for re-reconciling them when it changes).
pub fn relays_of_database(
    relays: &[Arc<OutboxRelay>],
    sdb: &ServiceDatabase,
) -> Vec<ObjectRef<OutboxRelay>> {
    relays
        .iter()
        .filter(|r| r.namespace() == sdb.namespace() && r.spec.database_ref.name == sdb.name_any())
        .map(|r| ObjectRef::from_obj(r.as_ref()))
        .collect()
}

/// Entry point for the controller runtime.
#[instrument(skip_all, fields(name = %relay.name_any(), namespace = relay.namespace().as_deref().unwrap_or("")))]
pub async fn reconcile(relay: Arc<OutboxRelay>, ctx: Arc<Context>) -> Result<Action, Error> {
    super::observed::<OutboxRelay, _>(&ctx, async {
        let ns = relay.namespace().ok_or(Error::NoNamespace)?;
        let api: Api<OutboxRelay> = Api::namespaced(ctx.client.clone(), &ns);
        finalizer(&api, FINALIZER, relay, |event| async {
            match event {
                Finalizer::Apply(relay) => apply_spec(&relay, &ctx).await,
                Finalizer::Cleanup(relay) => cleanup(&relay, &ctx).await,
            }
        })
        .await
        .map_err(|e| Error::Finalizer(Box::new(e)))
    })
    .await
}

/// Transient errors retry with a per-object exponential backoff.
pub fn error_policy(relay: Arc<OutboxRelay>, err: &Error, ctx: Arc<Context>) -> Action {
    super::retry_with_backoff(relay.as_ref(), err, &ctx)
}

/// What a relay needs from its ServiceDatabase, or why it has to wait for it.
enum Resolution {
    /// The database, its outbox and the relay Secret exist.
    Ready {
        /// The ServiceDatabase.
        sdb: Box<ServiceDatabase>,
        /// The relay role's credentials Secret.
        secret: Box<Secret>,
    },
    /// Something the relay needs is not there yet.
    Waiting {
        /// CamelCase reason.
        reason: &'static str,
        /// What is missing.
        message: String,
    },
}

/// The pipeline: resolve the database → apply the children → status from the Deployment.
async fn apply_spec(relay: &OutboxRelay, ctx: &Context) -> Result<Action, Error> {
    let ns = relay.namespace().ok_or(Error::NoNamespace)?;
    let (sdb, secret) = match resolve(relay, ctx, &ns).await? {
        Resolution::Ready { sdb, secret } => (sdb, secret),
        Resolution::Waiting { reason, message } => {
            ctx.event(
                relay,
                EventType::Warning,
                reason,
                "Resolve",
                message.clone(),
            )
            .await;
            let conds = vec![
                Desired::fail("Ready", reason, message.clone()),
                Desired::fail("DatabaseReady", reason, message),
            ];
            write_status(ctx, relay, None, conds).await?;
            // The ServiceDatabase watch wakes this relay when the database changes; the
            // requeue is only a safety net.
            return Ok(Action::requeue(Duration::from_secs(60)));
        }
    };
    apply_children(ctx, relay, &ns, &sdb, &secret).await?;
    let (ready_replicas, available) = deployment_readiness(ctx, &ns, &relay.name_any()).await?;
    let db_ready = sdb
        .status
        .as_ref()
        .is_some_and(|s| conditions::is_true(&s.conditions, "Ready"));
    let conds = relay_conditions(
        &relay.spec.database_ref.name,
        db_ready,
        available,
        ready_replicas,
    );
    write_status(ctx, relay, Some(ready_replicas), conds).await?;
    ctx.backoff.reset(&super::object_key(relay));
    // Deployment status changes arrive through the owns() watch; this is the drift safety net.
    Ok(Action::requeue(ctx.settings.resync))
}

/// The relay's ServiceDatabase (not being deleted, outbox enabled) and its relay Secret.
async fn resolve(relay: &OutboxRelay, ctx: &Context, ns: &str) -> Result<Resolution, Error> {
    let sdb_name = &relay.spec.database_ref.name;
    let sdbs: Api<ServiceDatabase> = Api::namespaced(ctx.client.clone(), ns);
    let sdb = sdbs.get_opt(sdb_name).await.map_err(|source| Error::Read {
        what: format!("ServiceDatabase {sdb_name}"),
        source,
    })?;
    let waiting = |reason: &'static str, message: String| Resolution::Waiting { reason, message };
    let Some(sdb) = sdb.filter(|s| s.meta().deletion_timestamp.is_none()) else {
        return Ok(waiting(
            "DatabaseNotFound",
            format!("waiting for ServiceDatabase {sdb_name} in namespace {ns}"),
        ));
    };
    if sdb.spec.enabled_outbox().is_none() {
        return Ok(waiting(
            "OutboxDisabled",
            format!("ServiceDatabase {sdb_name} does not have the outbox enabled"),
        ));
    }
    let relay_secret = DatabaseNames::new(sdb_name).relay_secret();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let secret = secrets
        .get_opt(&relay_secret)
        .await
        .map_err(|source| Error::Read {
            what: format!("Secret {relay_secret}"),
            source,
        })?;
    Ok(match secret {
        Some(secret) => Resolution::Ready {
            sdb: Box::new(sdb),
            secret: Box::new(secret),
        },
        None => waiting(
            "CredentialsNotReady",
            format!("waiting for Secret {relay_secret} of ServiceDatabase {sdb_name}"),
        ),
    })
}

/// The relay's ConfigMap, ServiceAccount and Deployment, with an Event naming what changed.
async fn apply_children(
    ctx: &Context,
    relay: &OutboxRelay,
    ns: &str,
    sdb: &ServiceDatabase,
    secret: &Secret,
) -> Result<(), Error> {
    let name = relay.name_any();
    let sdb_name = &relay.spec.database_ref.name;
    let Some(outbox) = sdb.spec.enabled_outbox() else {
        return Ok(());
    };
    let relay_secret = DatabaseNames::new(sdb_name).relay_secret();
    let config = relay::relay_config(
        &relay.spec,
        ns,
        &name,
        &sdb.spec.database_name(),
        &outbox.table,
    );
    let config_yaml = serde_yaml::to_string(&config).map_err(Error::Render)?;
    let params = RelayParams {
        name: &name,
        namespace: ns,
        owner: controller_ref(relay),
        spec: &relay.spec,
        database: sdb_name,
        relay_secret: &relay_secret,
        image: &ctx.settings.relay_image,
        checksum: checksum(&config_yaml, secret.data.as_ref()),
        ca: crate::specs::credentials::secret_value(secret, crate::specs::credentials::CA_CERT_KEY)
            .is_some_and(|v| !v.is_empty()),
    };
    let mut changed = Vec::new();
    if ctx
        .apply(ns, relay::config_map(&params, config_yaml))
        .await?
        == Outcome::Applied
    {
        changed.push("ConfigMap");
    }
    if ctx.apply(ns, relay::service_account(&params)).await? == Outcome::Applied {
        changed.push("ServiceAccount");
    }
    if ctx.apply(ns, relay::deployment(&params)).await? == Outcome::Applied {
        changed.push("Deployment");
    }
    if !changed.is_empty() {
        ctx.event(
            relay,
            EventType::Normal,
            "Applied",
            "Apply",
            format!("applied {}", changed.join(", ")),
        )
        .await;
    }
    Ok(())
}

/// The relay Deployment's ready replicas and whether any is available.
async fn deployment_readiness(ctx: &Context, ns: &str, name: &str) -> Result<(i32, bool), Error> {
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let deployment = deployments
        .get_opt(&RelayNames::new(name).deployment())
        .await
        .map_err(|source| Error::Read {
            what: "relay Deployment".to_owned(),
            source,
        })?;
    let status = deployment.as_ref().and_then(|d| d.status.as_ref());
    let ready_replicas = status.and_then(|s| s.ready_replicas).unwrap_or(0);
    let available = status.and_then(|s| s.available_replicas).unwrap_or(0) > 0;
    Ok((ready_replicas, available))
}

/// The relay's conditions from its database's readiness and its Deployment's (pure).
fn relay_conditions(
    sdb_name: &str,
    db_ready: bool,
    available: bool,
    ready_replicas: i32,
) -> Vec<Desired> {
    let ready = match (db_ready, available) {
        (true, true) => Desired::ok(
            "Ready",
            "Publishing",
            "the relay is available and its database is ready",
        ),
        (false, _) => Desired::fail(
            "Ready",
            "DatabaseNotReady",
            format!("ServiceDatabase {sdb_name} is not Ready"),
        ),
        (true, false) => Desired::fail("Ready", "RelayUnavailable", "no relay pod is ready"),
    };
    let database = if db_ready {
        Desired::ok(
            "DatabaseReady",
            "Ready",
            format!("ServiceDatabase {sdb_name} is Ready"),
        )
    } else {
        Desired::fail(
            "DatabaseReady",
            "DatabaseNotReady",
            format!("ServiceDatabase {sdb_name} is not Ready"),
        )
    };
    let pods = if available {
        Desired::ok(
            "Available",
            "MinimumReplicasAvailable",
            format!("{ready_replicas} relay pod(s) ready; one publishes"),
        )
    } else {
        Desired::fail("Available", "NoReadyReplicas", "no relay pod is ready")
    };
    vec![ready, database, pods]
}

/// Checksum of the config file and the credentials: a change to either rolls the pods.
fn checksum(
    config_yaml: &str,
    secret_data: Option<&BTreeMap<String, k8s_openapi::ByteString>>,
) -> String {
    let mut h = Sha256::new();
    h.update(config_yaml.as_bytes());
    for (k, v) in secret_data.into_iter().flatten() {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(&v.0);
        h.update([0]);
    }
    format!("{:x}", h.finalize())
}

async fn write_status(
    ctx: &Context,
    relay: &OutboxRelay,
    ready_replicas: Option<i32>,
    desired: Vec<Desired>,
) -> Result<(), Error> {
    let ns = relay.namespace().ok_or(Error::NoNamespace)?;
    let current = relay.status.clone().unwrap_or_default();
    let status = OutboxRelayStatus {
        observed_generation: relay.meta().generation,
        sink: Some(relay.spec.sink.kind().to_owned()),
        ready_replicas: ready_replicas.or(current.ready_replicas),
        slot: (relay.spec.mode == RelayMode::Logical)
            .then(|| crate::postgres::identifiers::relay_slot_name(&ns, &relay.name_any())),
        conditions: conditions::merge(
            &current.conditions,
            &desired,
            relay.meta().generation,
            Timestamp::now(),
        ),
    };
    if status == current {
        return Ok(());
    }
    let api: Api<OutboxRelay> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch_status(
        &relay.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(
            json!({"apiVersion": "servicedb.io/v1alpha1", "kind": "OutboxRelay", "status": status}),
        ),
    )
    .await
    .map_err(Error::Status)?;
    ctx.metrics.wrote("OutboxRelay/status");
    Ok(())
}

/// Deletion: a Logical relay drops its slot so it never pins WAL; bounded by the skip annotation.
async fn cleanup(relay: &OutboxRelay, ctx: &Context) -> Result<Action, Error> {
    if relay.spec.mode != RelayMode::Logical {
        return Ok(Action::await_change());
    }
    let ns = relay.namespace().ok_or(Error::NoNamespace)?;
    let name = relay.name_any();
    let slot = crate::postgres::identifiers::relay_slot_name(&ns, &name);
    if relay
        .annotations()
        .get(SKIP_CLEANUP_ANNOTATION)
        .is_some_and(|v| v == "true")
    {
        ctx.event(
            relay,
            EventType::Warning,
            "CleanupSkipped",
            "DropSlot",
            format!("{SKIP_CLEANUP_ANNOTATION} is set: replication slot {slot} is left in place"),
        )
        .await;
        return Ok(Action::await_change());
    }
    let sdbs: Api<ServiceDatabase> = Api::namespaced(ctx.client.clone(), &ns);
    let sdb_name = &relay.spec.database_ref.name;
    let Some(sdb) = sdbs.get_opt(sdb_name).await.map_err(|source| Error::Read {
        what: format!("ServiceDatabase {sdb_name}"),
        source,
    })?
    else {
        ctx.metrics.abandoned_cleanup("OutboxRelay");
        ctx.event(
            relay,
            EventType::Warning,
            "SlotNotDropped",
            "DropSlot",
            format!(
                "ServiceDatabase {sdb_name} is gone: cannot reach the server to drop slot {slot}"
            ),
        )
        .await;
        return Ok(Action::await_change());
    };
    let key = super::object_key(relay);
    let result = match admin_connection(ctx, &sdb).await {
        Ok(admin) => {
            crate::postgres::slots::drop_slot(&admin.with_dbname(sdb.spec.database_name()), &slot)
                .await
                .map_err(|e| crate::postgres::summary::user_message(&e))
        }
        Err(AdminError::Unavailable(message)) => Err(message),
        Err(e) => return Err(e.into()),
    };
    match result {
        Ok(dropped) => {
            if dropped {
                ctx.event(
                    relay,
                    EventType::Normal,
                    "SlotDropped",
                    "DropSlot",
                    format!("dropped replication slot {slot}"),
                )
                .await;
            }
            ctx.backoff.reset(&key);
            Ok(Action::await_change())
        }
        Err(why) if super::deleting_for(relay) >= ctx.settings.cleanup_timeout => {
            // Never wedge a deletion forever, never leak silently: the Event and the metric say
            // what is left, and the ServiceDatabase's reconcile drops orphaned relay slots of
            // its database as soon as it can reach the server.
            ctx.metrics.abandoned_cleanup("OutboxRelay");
            ctx.event(
                relay,
                EventType::Warning,
                "SlotDropAbandoned",
                "DropSlot",
                format!(
                    "{why}; gave up after {:?}: replication slot {slot} is left on the server; ServiceDatabase {sdb_name} drops it once it can reach the server",
                    ctx.settings.cleanup_timeout
                ),
            )
            .await;
            Ok(Action::await_change())
        }
        Err(why) => {
            ctx.event(
                relay,
                EventType::Warning,
                "DropSlotFailed",
                "DropSlot",
                format!(
                    "{why}; retrying for up to {:?} after deletion. Set {SKIP_CLEANUP_ANNOTATION}: \"true\" to let go",
                    ctx.settings.cleanup_timeout
                ),
            )
            .await;
            Err(Error::SlotNotDropped { slot, message: why })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_follow_the_database_and_the_pods() {
        let summary = |db, available| {
            relay_conditions("orders", db, available, 2)
                .into_iter()
                .map(|c| (c.type_, c.status == Some(true), c.reason))
                .collect::<Vec<_>>()
        };
        let r = |s: &str| s.to_owned();
        assert_eq!(
            summary(true, true),
            vec![
                ("Ready", true, r("Publishing")),
                ("DatabaseReady", true, r("Ready")),
                ("Available", true, r("MinimumReplicasAvailable")),
            ]
        );
        assert_eq!(
            summary(false, true)[0],
            ("Ready", false, r("DatabaseNotReady"))
        );
        assert_eq!(
            summary(true, false),
            vec![
                ("Ready", false, r("RelayUnavailable")),
                ("DatabaseReady", true, r("Ready")),
                ("Available", false, r("NoReadyReplicas")),
            ]
        );
    }
}
