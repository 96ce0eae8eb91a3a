//! Deletion of a ServiceDatabase: keep or drop the data as `deletionPolicy` says, orphan the
//! credential Secrets a `Retain` keeps, and let go of the Secrets cleanup needed (Kubernetes
//! and database I/O).

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use serde_json::json;

use super::Error;
use super::decide::desire;
use super::status::{self, Reached};
use crate::api::service_database::{DeletionPolicy, ExternalInstance, ServiceDatabase};
use crate::operator::admin::external_admin;
use crate::operator::{Context, SKIP_CLEANUP_ANNOTATION};
use crate::postgres::{self, Ident};
use crate::specs::labels::DatabaseNames;

/// Deletion: keep or drop the data as the policy says, never wedge a namespace deletion.
///
/// Cleanup outside the cluster (dropping an external database) is retried with backoff while it
/// fails (the finalizer stays); after `--cleanup-timeout` it gives up with a Warning Event and a
/// metric and lets the object go — leaving the data in place, never losing it by accident.
pub async fn cleanup(sdb: &ServiceDatabase, ctx: &Context) -> Result<Action, Error> {
    let ns = sdb.namespace().ok_or(Error::NoNamespace)?;
    let name = sdb.name_any();
    let names = DatabaseNames::new(&name);
    let key = crate::operator::object_key(sdb);
    let skip = sdb
        .annotations()
        .get(SKIP_CLEANUP_ANNOTATION)
        .is_some_and(|v| v == "true");
    if !skip {
        remove_connector(sdb, ctx).await?;
    }
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
                    let gave_up =
                        crate::operator::deleting_for(sdb) >= ctx.settings.cleanup_timeout;
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
                        let _ = status::write(ctx, sdb, &Reached::CleanupFailed(message)).await;
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
    crate::operator::secret_guard::release_all_except(ctx, &ns, &[], &name).await?;
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
    let admin = external_admin(ctx, &secrets, external).await?;
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

/// The CDC connector goes first, then its slot (whatever the deletion policy: a slot nobody
/// reads pins WAL forever). Retried while Connect or the server is down, up to the cleanup
/// timeout; then given up with an Event and the metric.
async fn remove_connector(sdb: &ServiceDatabase, ctx: &Context) -> Result<(), Error> {
    let recorded = sdb.status.as_ref().and_then(|s| s.cdc.clone());
    let Some(recorded) = recorded else {
        return Ok(());
    };
    let admin = crate::operator::admin::admin_connection(ctx, sdb)
        .await
        .ok();
    let Err(message) = super::cdc::remove(ctx, sdb, &recorded, admin.as_ref()).await else {
        return Ok(());
    };
    if crate::operator::deleting_for(sdb) >= ctx.settings.cleanup_timeout {
        ctx.metrics.abandoned_cleanup("ServiceDatabase");
        let note = format!(
            "{message}; gave up after {:?}: connector {} or slot {} may be left behind",
            ctx.settings.cleanup_timeout, recorded.connector, recorded.slot
        );
        ctx.event(sdb, EventType::Warning, "CleanupAbandoned", "Delete", note)
            .await;
        return Ok(());
    }
    let note = format!(
        "{message}; retrying for up to {:?} after deletion. Set the annotation {SKIP_CLEANUP_ANNOTATION}: \"true\" to delete without removing it",
        ctx.settings.cleanup_timeout
    );
    ctx.event(
        sdb,
        EventType::Warning,
        "CleanupFailed",
        "Delete",
        note.clone(),
    )
    .await;
    let _ = status::write(ctx, sdb, &Reached::CleanupFailed(note.clone())).await;
    Err(Error::Connector(message))
}
