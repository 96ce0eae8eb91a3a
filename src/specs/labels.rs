//! Names and labels of the objects the operator creates (pure, no I/O).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;

/// The field manager of every server-side apply, and the `managed-by` label value.
pub const MANAGER: &str = "servicedb-operator";
/// The `part-of` label value.
pub const PART_OF: &str = "servicedb";
/// The label that tells which component of a ServiceDatabase or OutboxRelay an object is.
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";

/// The standard `app.kubernetes.io/*` labels of a child.
///
/// `name` is the component kind (`postgres`, `relay`, `credentials`), `instance` the owning
/// custom resource's name.
pub fn standard_labels(component: &str, instance: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), component.to_owned()),
        ("app.kubernetes.io/instance".to_owned(), instance.to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGER.to_owned(),
        ),
        ("app.kubernetes.io/part-of".to_owned(), PART_OF.to_owned()),
    ])
}

/// The labels that select one component's pods (a stable subset of [`standard_labels`]).
pub fn selector_labels(component: &str, instance: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), component.to_owned()),
        ("app.kubernetes.io/instance".to_owned(), instance.to_owned()),
    ])
}

/// A controller ownerReference to `owner`, so children are garbage-collected with it.
///
/// Returns `None` only for an object that was never stored (no uid), which the controller never
/// reconciles.
pub fn controller_ref<K: Resource<DynamicType = ()>>(owner: &K) -> Option<OwnerReference> {
    owner.controller_owner_ref(&())
}

/// Child object names derived from a ServiceDatabase's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseNames {
    /// The ServiceDatabase's own name.
    pub base: String,
}

impl DatabaseNames {
    /// Names for the ServiceDatabase called `base`.
    pub fn new(base: &str) -> Self {
        DatabaseNames {
            base: base.to_owned(),
        }
    }
    /// The StatefulSet, the ClusterIP Service and the NetworkPolicy of a managed instance.
    pub fn instance(&self) -> String {
        format!("{}-db", self.base)
    }
    /// The headless Service that gives the StatefulSet's pod a stable DNS name.
    pub fn headless_service(&self) -> String {
        format!("{}-db-hl", self.base)
    }
    /// The ConfigMap with postgresql.conf, pg_hba.conf and the bootstrap script.
    pub fn config_map(&self) -> String {
        format!("{}-db-config", self.base)
    }
    /// The server certificate Secret of a managed instance (`kubernetes.io/tls`).
    pub fn tls_secret(&self) -> String {
        format!("{}-db-tls", self.base)
    }
    /// The superuser Secret of a managed instance.
    pub fn superuser_secret(&self) -> String {
        format!("{}-superuser", self.base)
    }
    /// The owner role's Secret.
    pub fn app_secret(&self) -> String {
        format!("{}-app", self.base)
    }
    /// The relay role's Secret.
    pub fn relay_secret(&self) -> String {
        format!("{}-relay", self.base)
    }
    /// The CDC role's Secret.
    pub fn cdc_secret(&self) -> String {
        format!("{}-cdc", self.base)
    }
    /// The Debezium connector's name in Kafka Connect: `servicedb.<namespace>.<name>` (one home:
    /// [`crate::cdc::connector_name`]).
    pub fn cdc_connector(&self, namespace: &str) -> String {
        crate::cdc::connector_name(namespace, &self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_allowed_name_keeps_every_child_name_within_dns_label_limits() {
        let names = DatabaseNames::new(&"a".repeat(47));
        for name in [
            names.instance(),
            names.headless_service(),
            names.config_map(),
            names.superuser_secret(),
            names.app_secret(),
            names.relay_secret(),
            names.cdc_secret(),
        ] {
            assert!(name.len() <= 63, "{name} is {} bytes", name.len());
        }
    }
}
