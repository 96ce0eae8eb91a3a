//! The CRD types — the API contract — and the generation of their CustomResourceDefinitions (no I/O).

pub mod outbox_relay;
pub mod parameters;
pub mod service_database;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use outbox_relay::{OutboxRelay, OutboxRelaySpec, OutboxRelayStatus};
pub use service_database::{ServiceDatabase, ServiceDatabaseSpec, ServiceDatabaseStatus};

/// Both CustomResourceDefinitions, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![ServiceDatabase::crd(), OutboxRelay::crd()]
}

/// Both CRDs as one multi-document YAML stream, exactly what `servicedb crd` prints and
/// `crds/` holds.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
