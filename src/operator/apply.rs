//! Server-side apply of child objects under one field manager, skipping unchanged ones (Kubernetes I/O).
//!
//! A no-op resync must not write: each applied object carries a hash of what we applied, and an
//! object whose stored hash matches the desired one is not sent again.

use std::fmt::Debug;

use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

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

/// Whether an apply changed anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The stored object already matched: nothing was sent.
    Unchanged,
    /// The object was created or updated.
    Applied,
}

/// Hash of a desired object, stable across runs.
pub fn desired_hash<K: Serialize>(obj: &K) -> Result<String, serde_json::Error> {
    let bytes = serde_json::to_vec(obj)?;
    Ok(format!("{:x}", Sha256::digest(bytes)))
}

/// Server-side apply `desired` in `namespace` unless the stored object was applied from the same
/// desired state. Returns the outcome.
pub async fn apply<K>(
    client: &Client,
    namespace: &str,
    mut desired: K,
) -> Result<Outcome, ApplyError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let name = desired.name_any();
    let kind = K::kind(&()).to_string();
    let hash = desired_hash(&desired).map_err(|source| ApplyError::Serialize {
        kind: kind.clone(),
        name: name.clone(),
        source,
    })?;
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let current = api
        .get_metadata_opt(&name)
        .await
        .map_err(|source| ApplyError::Api {
            verb: "read",
            kind: kind.clone(),
            name: name.clone(),
            source,
        })?;
    if current
        .as_ref()
        .and_then(|c| c.annotations().get(APPLIED_HASH_ANNOTATION))
        == Some(&hash)
    {
        return Ok(Outcome::Unchanged);
    }
    desired
        .annotations_mut()
        .insert(APPLIED_HASH_ANNOTATION.to_owned(), hash);
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&desired),
    )
    .await
    .map_err(|source| ApplyError::Api {
        verb: "apply",
        kind,
        name,
        source,
    })?;
    Ok(Outcome::Applied)
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
