//! Keeps the Secret a ServiceDatabase's cleanup needs (the external admin Secret, the managed
//! superuser Secret) until that cleanup is done (Kubernetes I/O).
//!
//! Deleting a namespace deletes every object in it at once: without this guard the admin
//! Secret is gone while the ServiceDatabase still waits on its finalizer to drop the database,
//! and the cleanup can never finish. Each ServiceDatabase puts a finalizer of its own on the
//! Secret (`servicedb.io/needed-by-<name>`), so several ServiceDatabases sharing one admin
//! Secret never remove each other's hold; the Secret stays readable (Terminating) until the
//! last of them has cleaned up and released it.
//!
//! The order relied on: the namespace controller marks everything deleted → the OutboxRelays'
//! cleanup drops their slots (the ServiceDatabase waits for them, bounded) → the
//! ServiceDatabase's cleanup drops the database and roles (Delete) → it releases its hold on the
//! Secret → its own finalizer goes → the Secret goes → the namespace goes.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use serde_json::json;
use tracing::info;

use super::Context;

/// The prefix of the per-ServiceDatabase finalizer on a Secret it needs for cleanup.
pub const FINALIZER_PREFIX: &str = "servicedb.io/needed-by-";

/// The finalizer ServiceDatabase `name` puts on the Secrets its cleanup needs. Object names of
/// ServiceDatabases are at most 47 characters (CRD rule), so the name part stays within the
/// 63 characters a qualified finalizer name allows.
pub fn finalizer_for(name: &str) -> String {
    format!("{FINALIZER_PREFIX}{name}")
}

/// Why holding or releasing a Secret failed.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// Reading the Secret failed.
    #[error("could not read Secret {secret}: {source}")]
    Read {
        /// Secret name.
        secret: String,
        /// Cause.
        source: kube::Error,
    },
    /// Patching the Secret's finalizers failed (a concurrent change retries on the next run).
    #[error("could not update the finalizers of Secret {secret}: {source}")]
    Patch {
        /// Secret name.
        secret: String,
        /// Cause.
        source: kube::Error,
    },
}

/// Puts `sdb`'s finalizer on Secret `secret` unless it is there (no write when it is) or the
/// Secret does not exist. A Secret already being deleted is not held anew: it is going anyway.
pub async fn hold(
    ctx: &Context,
    namespace: &str,
    secret: &str,
    sdb: &str,
) -> Result<(), GuardError> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(meta) = api
        .get_metadata_opt(secret)
        .await
        .map_err(|source| GuardError::Read {
            secret: secret.to_owned(),
            source,
        })?
    else {
        return Ok(());
    };
    let finalizer = finalizer_for(sdb);
    let current = meta.metadata.finalizers.clone().unwrap_or_default();
    if current.contains(&finalizer) || meta.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    let mut finalizers = current;
    finalizers.push(finalizer);
    write_finalizers(ctx, &api, &meta, finalizers).await?;
    info!(secret, "holding the Secret until cleanup is done");
    Ok(())
}

/// Releases `sdb`'s hold on every Secret of the namespace except `keep` (the admin Secret
/// reference changed, or the ServiceDatabase is going). One list of Secret metadata.
pub async fn release_all_except(
    ctx: &Context,
    namespace: &str,
    keep: &[&str],
    sdb: &str,
) -> Result<(), GuardError> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let list = api
        .list_metadata(&ListParams::default())
        .await
        .map_err(|source| GuardError::Read {
            secret: "(list)".to_owned(),
            source,
        })?;
    let finalizer = finalizer_for(sdb);
    for meta in list.items.iter().filter(|m| {
        m.metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.contains(&finalizer))
            && m.metadata
                .name
                .as_deref()
                .is_some_and(|n| !keep.contains(&n))
    }) {
        release_meta(ctx, &api, meta, sdb).await?;
    }
    Ok(())
}

async fn release_meta(
    ctx: &Context,
    api: &Api<Secret>,
    meta: &PartialObjectMeta<Secret>,
    sdb: &str,
) -> Result<(), GuardError> {
    let finalizer = finalizer_for(sdb);
    let name = meta.metadata.name.clone().unwrap_or_default();
    let current = meta.metadata.finalizers.clone().unwrap_or_default();
    if !current.contains(&finalizer) {
        return Ok(());
    }
    let remaining: Vec<String> = current.into_iter().filter(|f| *f != finalizer).collect();
    write_finalizers(ctx, api, meta, remaining).await?;
    info!(secret = %name, "released the Secret");
    Ok(())
}

/// Replaces the Secret's finalizer list with a merge patch guarded by the resourceVersion it
/// was computed from: a concurrent change by another ServiceDatabase makes this one fail with a
/// conflict (and retry) instead of overwriting the other's finalizer.
async fn write_finalizers(
    ctx: &Context,
    api: &Api<Secret>,
    meta: &PartialObjectMeta<Secret>,
    finalizers: Vec<String>,
) -> Result<(), GuardError> {
    let name = meta.metadata.name.clone().unwrap_or_default();
    let patch = Patch::Merge(json!({"metadata": {
        "resourceVersion": meta.metadata.resource_version,
        "finalizers": finalizers,
    }}));
    api.patch(&name, &PatchParams::default(), &patch)
        .await
        .map_err(|source| GuardError::Patch {
            secret: name.clone(),
            source,
        })?;
    ctx.metrics.wrote("Secret/finalizer");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finalizer_names_are_qualified_names_within_limits() {
        let longest = "a".repeat(47);
        let f = finalizer_for(&longest);
        let (prefix, name) = f.split_once('/').unwrap();
        assert_eq!(prefix, "servicedb.io");
        assert!(name.len() <= 63, "{name}");
    }
}
