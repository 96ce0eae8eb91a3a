//! Server-side apply of child objects under one field manager, writing only when something
//! would change (Kubernetes I/O).
//!
//! Two things must hold at once: a no-op resync writes nothing, and a child edited by hand
//! (a NetworkPolicy rule deleted, a ConfigMap value changed) is put back. So each applied object
//! carries a hash of the desired state it was applied from, and:
//!
//! - no object, or a different hash: the desired state changed; apply it.
//! - the same hash: our desired state did not change, but the object may have. Ask the
//!   apiserver what applying would produce (server-side apply with `dryRun`, which merges,
//!   defaults and takes back our fields exactly as the real apply would, and persists nothing)
//!   and compare that with the live object. Equal: nothing to do. Different: someone changed
//!   a field we own; apply for real.
//!
//! Comparing against the apiserver's own merge, rather than our object against the live one,
//! keeps fields others own (a controller's annotations, defaults, allocated IPs) out of the
//! comparison without a per-kind list of fields to ignore.

use std::fmt::Debug;

use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tracing::info;

use crate::specs::labels::MANAGER;

/// Annotation holding the hash of the last applied desired state.
pub const APPLIED_HASH_ANNOTATION: &str = "servicedb.io/applied-hash";

/// Why applying or deleting a child failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The object could not be serialized (a bug).
    #[error("could not serialize {kind} {name}: {source}")]
    Serialize {
        /// Kind.
        kind: String,
        /// Name.
        name: String,
        /// Cause.
        source: serde_json::Error,
    },
    /// The apiserver refused or failed the request.
    #[error("could not {verb} {kind} {name}: {source}")]
    Api {
        /// `apply`, `read` or `delete`.
        verb: &'static str,
        /// Kind.
        kind: String,
        /// Name.
        name: String,
        /// Cause.
        source: kube::Error,
    },
}

/// Whether an apply changed anything (what the controllers see).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The stored object already matched: nothing was sent.
    Unchanged,
    /// The object was created or updated.
    Applied,
}

/// What [`apply`] did, with the reason for a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// Nothing: the live object is what applying would produce.
    Unchanged,
    /// Created, or updated to a changed desired state.
    Applied,
    /// The desired state had not changed but the live object had (a hand edit): applied again.
    Repaired,
}

impl From<Write> for Outcome {
    fn from(w: Write) -> Outcome {
        match w {
            Write::Unchanged => Outcome::Unchanged,
            Write::Applied | Write::Repaired => Outcome::Applied,
        }
    }
}

/// Hash of a desired object, stable across runs.
pub fn desired_hash<K: Serialize>(obj: &K) -> Result<String, serde_json::Error> {
    let bytes = serde_json::to_vec(obj)?;
    Ok(format!("{:x}", Sha256::digest(bytes)))
}

/// Server-side apply `desired` in `namespace` when the live object is not already what applying
/// it would produce (see the module documentation).
pub async fn apply<K>(client: &Client, namespace: &str, mut desired: K) -> Result<Write, ApplyError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let name = desired.name_any();
    let kind = K::kind(&()).to_string();
    let serialize = |source| ApplyError::Serialize {
        kind: kind.clone(),
        name: name.clone(),
        source,
    };
    let api_error = |verb: &'static str| {
        let (kind, name) = (kind.clone(), name.clone());
        move |source| ApplyError::Api {
            verb,
            kind,
            name,
            source,
        }
    };
    let hash = desired_hash(&desired).map_err(serialize)?;
    desired
        .annotations_mut()
        .insert(APPLIED_HASH_ANNOTATION.to_owned(), hash.clone());
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let params = PatchParams::apply(MANAGER).force();
    let live = api.get_opt(&name).await.map_err(api_error("read"))?;
    let write = match live {
        Some(live) if live.annotations().get(APPLIED_HASH_ANNOTATION) == Some(&hash) => {
            let merged = api
                .patch(&name, &params.clone().dry_run(), &Patch::Apply(&desired))
                .await
                .map_err(api_error("dry-run apply"))?;
            if comparable(&live).map_err(serialize)? == comparable(&merged).map_err(serialize)? {
                return Ok(Write::Unchanged);
            }
            info!(%kind, %name, "the object differs from what was applied (edited by hand?): applying it again");
            Write::Repaired
        }
        _ => Write::Applied,
    };
    api.patch(&name, &params, &Patch::Apply(&desired))
        .await
        .map_err(api_error("apply"))?;
    Ok(write)
}

/// An object as JSON without what changes on its own: `status` (written by other controllers,
/// possibly between our read and the dry run), `managedFields` (timestamps) and
/// `resourceVersion` (the dry run answers with the version it merged into, which is newer when
/// the object moved in between).
fn comparable<K: Serialize>(obj: &K) -> Result<serde_json::Value, serde_json::Error> {
    let mut value = serde_json::to_value(obj)?;
    if let Some(map) = value.as_object_mut() {
        map.remove("status");
    }
    if let Some(meta) = value
        .get_mut("metadata")
        .and_then(serde_json::Value::as_object_mut)
    {
        meta.remove("managedFields");
        meta.remove("resourceVersion");
    }
    Ok(value)
}

/// Delete `name` if it exists. Returns whether something was deleted.
pub async fn delete_if_exists<K>(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<bool, ApplyError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(source) => Err(ApplyError::Api {
            verb: "delete",
            kind: K::kind(&()).to_string(),
            name: name.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    /// The same ConfigMap as read at different moments: another resource version and another
    /// managed-fields timestamp.
    fn config_map(value: &str, rv: &str, applied_at: &str) -> ConfigMap {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "c", "namespace": "n", "resourceVersion": rv,
                "managedFields": [{"manager": MANAGER, "operation": "Apply", "time": applied_at}],
            },
            "data": {"k": value},
        }))
        .unwrap()
    }

    #[test]
    fn comparison_ignores_versions_and_managed_fields_but_not_content() {
        let a = comparable(&config_map("v", "1", "2026-12-01T10:00:00Z")).unwrap();
        let later = comparable(&config_map("v", "2", "2026-12-02T10:00:00Z")).unwrap();
        assert_eq!(a, later);
        let edited = comparable(&config_map("edited", "1", "2026-12-01T10:00:00Z")).unwrap();
        assert_ne!(a, edited);
    }

    #[test]
    fn a_repair_is_a_write_for_the_controllers() {
        assert_eq!(Outcome::from(Write::Repaired), Outcome::Applied);
        assert_eq!(Outcome::from(Write::Applied), Outcome::Applied);
        assert_eq!(Outcome::from(Write::Unchanged), Outcome::Unchanged);
    }
}
