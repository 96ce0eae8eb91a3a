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
use super::apply::{ApplyError, Outcome};
use super::conditions::{self, Desired};
use super::service_database::{SKIP_CLEANUP_ANNOTATION, admin_connection};
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
    /// Looking up the database connection failed.
    #[error(transparent)]
    Database(#[from] Box<super::service_database::Error>),
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
            Error::Database(e) => e.category(),
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

async fn apply_spec(relay: &OutboxRelay, ctx: &Context) -> Result<Action, Error> {
    let ns = relay.namespace().ok_or(Error::NoNamespace)?;
    let name = relay.name_any();
    let sdb_name = &relay.spec.database_ref.name;
    let sdbs: Api<ServiceDatabase> = Api::namespaced(ctx.client.clone(), &ns);
    let sdb = sdbs.get_opt(sdb_name).await.map_err(|source| Error::Read {
        what: format!("ServiceDatabase {sdb_name}"),
        source,
    })?;
    let waiting = |reason: &'static str, message: String| async move {
        ctx.event(
            relay,
            EventType::Warning,
            reason,
            "Resolve",
            message.clone(),
        )
        .await;
        write_status(
            ctx,
            relay,
            None,
            vec![
                Desired::fail("Ready", reason, message.clone()),
                Desired::fail("DatabaseReady", reason, message),
            ],
        )
        .await?;
        // The ServiceDatabase watch wakes this relay when the database changes; the requeue is
        // only a safety net.
        Ok::<_, Error>(Action::requeue(Duration::from_secs(60)))
    };
    let Some(sdb) = sdb.filter(|s| s.meta().deletion_timestamp.is_none()) else {
        return waiting(
            "DatabaseNotFound",
            format!("waiting for ServiceDatabase {sdb_name} in namespace {ns}"),
        )
        .await;
    };
    let Some(outbox) = sdb.spec.enabled_outbox() else {
        return waiting(
            "OutboxDisabled",
            format!("ServiceDatabase {sdb_name} does not have the outbox enabled"),
        )
        .await;
    };
    let relay_secret = DatabaseNames::new(sdb_name).relay_secret();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(secret) = secrets
        .get_opt(&relay_secret)
        .await
        .map_err(|source| Error::Read {
            what: format!("Secret {relay_secret}"),
            source,
        })?
    else {
        return waiting(
            "CredentialsNotReady",
            format!("waiting for Secret {relay_secret} of ServiceDatabase {sdb_name}"),
        )
        .await;
    };

    let config = relay::relay_config(
        &relay.spec,
        &ns,
        &name,
        &sdb.spec.database_name(),
        &outbox.table,
    );
    let config_yaml = serde_yaml::to_string(&config).map_err(Error::Render)?;
    let params = RelayParams {
        name: &name,
        namespace: &ns,
        owner: controller_ref(relay),
        spec: &relay.spec,
        database: sdb_name,
        relay_secret: &relay_secret,
        image: &ctx.settings.relay_image,
        checksum: checksum(&config_yaml, secret.data.as_ref()),
        ca: crate::specs::credentials::secret_value(
            &secret,
            crate::specs::credentials::CA_CERT_KEY,
        )
        .is_some_and(|v| !v.is_empty()),
    };
    let mut changed = Vec::new();
    if ctx
        .apply(&ns, relay::config_map(&params, config_yaml))
        .await?
        == Outcome::Applied
    {
        changed.push("ConfigMap");
    }
    if ctx.apply(&ns, relay::service_account(&params)).await? == Outcome::Applied {
        changed.push("ServiceAccount");
    }
    if ctx.apply(&ns, relay::deployment(&params)).await? == Outcome::Applied {
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

    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let deployment = deployments
        .get_opt(&RelayNames::new(&name).deployment())
        .await
        .map_err(|source| Error::Read {
            what: "relay Deployment".to_owned(),
            source,
        })?;
    let ready_replicas = deployment
        .as_ref()
        .and_then(|d| d.status.as_ref())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let available = deployment
        .as_ref()
        .and_then(|d| d.status.as_ref())
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
        > 0;
    let db_ready = sdb
        .status
        .as_ref()
        .is_some_and(|s| conditions::is_true(&s.conditions, "Ready"));
    let mut conds = Vec::new();
    conds.push(match (db_ready, available) {
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
    });
    conds.push(if db_ready {
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
    });
    conds.push(if available {
        Desired::ok(
            "Available",
            "MinimumReplicasAvailable",
            format!("{ready_replicas} relay pod(s) ready; one publishes"),
        )
    } else {
        Desired::fail("Available", "NoReadyReplicas", "no relay pod is ready")
    });
    write_status(ctx, relay, Some(ready_replicas), conds).await?;
    ctx.backoff.reset(&super::object_key(relay));
    // Deployment status changes arrive through the owns() watch; this is the drift safety net.
    Ok(Action::requeue(ctx.settings.resync))
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
    let result = match admin_connection(ctx, &sdb).await.map_err(Box::new)? {
        Ok(admin) => {
            crate::postgres::slots::drop_slot(&admin.with_dbname(sdb.spec.database_name()), &slot)
                .await
                .map_err(|e| crate::postgres::summary::user_message(&e))
        }
        Err(message) => Err(message),
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
