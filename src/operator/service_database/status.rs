//! A ServiceDatabase's status: computed once per reconcile from where the pipeline got to (pure)
//! and written once, only when it changed (Kubernetes I/O).

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::info;

use super::Error;
use super::cdc::CdcReport;
use crate::api::service_database::{
    CdcStatus, Endpoint, Phase, SecretNames, ServiceDatabase, ServiceDatabaseStatus,
};
use crate::operator::Context;
use crate::operator::conditions::{self, Desired};
use crate::specs::labels::DatabaseNames;

/// Where a reconcile got to: everything status says.
#[derive(Debug, Clone, PartialEq)]
pub enum Reached {
    /// The spec cannot be acted on; nothing was applied.
    Invalid {
        /// CamelCase reason.
        reason: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The admin connection of an external server cannot be made (a Secret or key missing).
    AdminUnavailable {
        /// How status describes the instance.
        instance: String,
        /// Where applications connect.
        endpoint: Endpoint,
        /// What is missing.
        message: String,
    },
    /// The managed instance's children are applied; its pod is not Ready yet.
    InstanceStarting {
        /// How status describes the instance.
        instance: String,
        /// Where applications connect.
        endpoint: Endpoint,
    },
    /// Provisioning in the database failed.
    ProvisionFailed {
        /// How status describes the instance.
        instance: String,
        /// Where applications connect.
        endpoint: Endpoint,
        /// Error category.
        reason: &'static str,
        /// Summary without the server's or the network's words.
        message: String,
    },
    /// Everything is in place.
    Ready {
        /// How status describes the instance.
        instance: String,
        /// Where applications connect.
        endpoint: Endpoint,
        /// The database.
        database: String,
        /// The outbox table, when enabled.
        outbox: Option<String>,
        /// With `cdc`: the connector's readiness and status.
        cdc: Option<Box<CdcReport>>,
        /// `cdc` was removed but its connector or slot could not be removed yet.
        cdc_retiring: Option<Box<CdcStatus>>,
    },
    /// Deletion is waiting for cleanup that failed.
    CleanupFailed(String),
}

/// The phase, instance text, endpoint and conditions status should show (pure).
pub fn aim(reached: &Reached) -> (Phase, Option<String>, Option<Endpoint>, Vec<Desired>) {
    match reached {
        Reached::Invalid { reason, message } => (
            Phase::Pending,
            None,
            None,
            vec![Desired::fail("Ready", *reason, message.clone())],
        ),
        Reached::AdminUnavailable {
            instance,
            endpoint,
            message,
        } => (
            Phase::Pending,
            Some(instance.clone()),
            Some(endpoint.clone()),
            vec![
                Desired::fail("Ready", "AdminSecretMissing", message.clone()),
                Desired::fail("InstanceReady", "AdminSecretMissing", message.clone()),
            ],
        ),
        Reached::InstanceStarting { instance, endpoint } => {
            let msg = "waiting for the instance pod to be Ready";
            (
                Phase::Provisioning,
                Some(instance.clone()),
                Some(endpoint.clone()),
                vec![
                    Desired::fail("Ready", "InstanceNotReady", msg),
                    Desired::fail("InstanceReady", "PodNotReady", msg),
                ],
            )
        }
        Reached::ProvisionFailed {
            instance,
            endpoint,
            reason,
            message,
        } => (
            Phase::Degraded,
            Some(instance.clone()),
            Some(endpoint.clone()),
            vec![
                Desired::fail("Ready", *reason, message.clone()),
                Desired::ok("InstanceReady", "Ready", "the instance is ready"),
                Desired::fail("DatabaseReady", *reason, message.clone()),
            ],
        ),
        Reached::Ready {
            instance,
            endpoint,
            database,
            outbox,
            cdc,
            ..
        } => (
            Phase::Ready,
            Some(instance.clone()),
            Some(endpoint.clone()),
            ready_conditions(
                database,
                outbox.as_deref(),
                cdc.as_ref().map(|c| &c.condition),
            ),
        ),
        Reached::CleanupFailed(message) => (
            Phase::Deleting,
            None,
            None,
            vec![Desired::fail("Ready", "CleanupFailed", message.clone())],
        ),
    }
}

fn ready_conditions(database: &str, outbox: Option<&str>, cdc: Option<&Desired>) -> Vec<Desired> {
    let mut conds = vec![
        Desired::ok(
            "Ready",
            "Provisioned",
            "the database, roles and credentials are in place",
        ),
        Desired::ok("InstanceReady", "Ready", "the instance is ready"),
        Desired::ok(
            "DatabaseReady",
            "Provisioned",
            format!("database {database} and its roles exist"),
        ),
    ];
    if let Some(outbox) = outbox {
        conds.push(Desired::ok(
            "OutboxReady",
            "Provisioned",
            format!("outbox table {outbox} exists"),
        ));
    }
    conds.extend(cdc.cloned());
    conds
}

/// The status for `reached` (pure): conditions whose status did not flip keep their times, so
/// a no-op reconcile computes the status it already has.
pub fn compute(sdb: &ServiceDatabase, reached: &Reached, now: Timestamp) -> ServiceDatabaseStatus {
    let (phase, instance, endpoint, desired) = aim(reached);
    let names = DatabaseNames::new(&sdb.name_any());
    let current = sdb.status.clone().unwrap_or_default();
    let outbox = sdb.spec.enabled_outbox().is_some();
    // What is known of the connector: this reconcile's report, what removal left, or (when the
    // reconcile stopped early) what status already said.
    let cdc = match reached {
        Reached::Ready {
            cdc, cdc_retiring, ..
        } => cdc
            .as_ref()
            .map(|c| c.status.clone())
            .or(cdc_retiring.as_deref().cloned()),
        _ => current.cdc.clone(),
    };
    ServiceDatabaseStatus {
        observed_generation: sdb.meta().generation,
        cdc,
        phase: Some(phase),
        instance,
        endpoint,
        database: Some(sdb.spec.database_name()),
        secrets: Some(SecretNames {
            app: Some(names.app_secret()),
            relay: outbox.then(|| names.relay_secret()),
            cdc: sdb.spec.cdc.as_ref().map(|_| names.cdc_secret()),
        }),
        conditions: conditions::merge(&current.conditions, &desired, sdb.meta().generation, now),
    }
}

/// Writes the status for `reached`, unless it is what the object already has.
pub async fn write(ctx: &Context, sdb: &ServiceDatabase, reached: &Reached) -> Result<(), Error> {
    let ns = sdb.namespace().ok_or(Error::NoNamespace)?;
    let status = compute(sdb, reached, Timestamp::now());
    let current = sdb.status.clone().unwrap_or_default();
    if status == current {
        return Ok(());
    }
    if current.phase != status.phase {
        info!(phase = ?status.phase, "phase changed");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Endpoint {
        Endpoint {
            host: "pg".into(),
            port: 5432,
        }
    }

    fn ready(cdc: Option<Desired>) -> Reached {
        Reached::Ready {
            instance: "external, pg:5432".into(),
            endpoint: endpoint(),
            database: "orders".into(),
            outbox: Some("public.outbox".into()),
            cdc: cdc.map(|condition| {
                Box::new(CdcReport {
                    condition,
                    status: CdcStatus {
                        connector: "servicedb.shop.orders".into(),
                        kafka_connect: serde_json::from_value(
                            serde_json::json!({"url": "http://connect:8083"}),
                        )
                        .unwrap(),
                        slot: "cdc_orders_1".into(),
                        state: None,
                        retained_wal_bytes: None,
                    },
                    recheck: None,
                })
            }),
            cdc_retiring: None,
        }
    }

    fn summary(r: &Reached) -> (Phase, Vec<(&'static str, bool, String)>) {
        let (phase, _, _, conds) = aim(r);
        (
            phase,
            conds
                .into_iter()
                .map(|c| (c.type_, c.status == Some(true), c.reason))
                .collect(),
        )
    }

    #[test]
    fn each_stage_has_its_phase_and_conditions() {
        let t = |s: &str| s.to_owned();
        let table = vec![
            (
                Reached::Invalid {
                    reason: "ReservedDatabaseName",
                    message: "no".into(),
                },
                (
                    Phase::Pending,
                    vec![("Ready", false, t("ReservedDatabaseName"))],
                ),
            ),
            (
                Reached::AdminUnavailable {
                    instance: "external".into(),
                    endpoint: endpoint(),
                    message: "admin Secret pg-admin not found".into(),
                },
                (
                    Phase::Pending,
                    vec![
                        ("Ready", false, t("AdminSecretMissing")),
                        ("InstanceReady", false, t("AdminSecretMissing")),
                    ],
                ),
            ),
            (
                Reached::InstanceStarting {
                    instance: "managed".into(),
                    endpoint: endpoint(),
                },
                (
                    Phase::Provisioning,
                    vec![
                        ("Ready", false, t("InstanceNotReady")),
                        ("InstanceReady", false, t("PodNotReady")),
                    ],
                ),
            ),
            (
                Reached::ProvisionFailed {
                    instance: "external".into(),
                    endpoint: endpoint(),
                    reason: "ServerUnreachable",
                    message: "could not connect".into(),
                },
                (
                    Phase::Degraded,
                    vec![
                        ("Ready", false, t("ServerUnreachable")),
                        ("InstanceReady", true, t("Ready")),
                        ("DatabaseReady", false, t("ServerUnreachable")),
                    ],
                ),
            ),
            (
                ready(None),
                (
                    Phase::Ready,
                    vec![
                        ("Ready", true, t("Provisioned")),
                        ("InstanceReady", true, t("Ready")),
                        ("DatabaseReady", true, t("Provisioned")),
                        ("OutboxReady", true, t("Provisioned")),
                    ],
                ),
            ),
            (
                Reached::CleanupFailed("could not connect".into()),
                (Phase::Deleting, vec![("Ready", false, t("CleanupFailed"))]),
            ),
        ];
        for (reached, want) in table {
            assert_eq!(summary(&reached), want, "{reached:?}");
        }
    }

    #[test]
    fn cdc_readiness_is_the_cdc_steps_condition_and_never_the_databases() {
        let cdc = |r: &Reached| {
            summary(r)
                .1
                .into_iter()
                .find(|c| c.0 == "CdcReady")
                .map(|c| (c.1, c.2))
        };
        assert_eq!(cdc(&ready(None)), None);
        let running = Desired::ok("CdcReady", "Running", "ok");
        assert_eq!(
            cdc(&ready(Some(running))),
            Some((true, "Running".to_owned()))
        );
        let failed = Desired::fail("CdcReady", "ConnectorFailed", "task 0 FAILED");
        let r = ready(Some(failed));
        assert_eq!(cdc(&r), Some((false, "ConnectorFailed".to_owned())));
        // The database stays Ready while its connector fails.
        assert_eq!(summary(&r).1[0], ("Ready", true, "Provisioned".to_owned()));
        assert_eq!(summary(&r).0, Phase::Ready);
    }
}
