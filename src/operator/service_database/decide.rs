//! What a ServiceDatabase should be, from its spec and its neighbours (pure): the database plan,
//! the names, whether logical decoding is needed, where applications connect, and whether a
//! managed instance may lower `wal_level`.

use kube::{Resource, ResourceExt};

use crate::api::OutboxRelay;
use crate::api::outbox_relay::RelayMode;
use crate::api::service_database::{Endpoint, ServiceDatabase};
use crate::operator::guard_rails::GuardRails;
use crate::operator::validate::{Invalid, validate};
use crate::postgres::{DatabasePlan, OwnerMark, QualifiedName, RoleNames};
use crate::specs::instance::POSTGRES_PORT;
use crate::specs::labels::DatabaseNames;

/// What the database side needs, derived from the spec and its neighbours.
pub struct Desire {
    /// Names of the children.
    pub names: DatabaseNames,
    /// Names of the roles.
    pub roles: RoleNames,
    /// The plan without passwords; [`super::credentials::Persisted::plan`] adds them.
    pub plan: DatabasePlan,
    /// A Logical relay publishes this database: the instance needs `wal_level=logical`.
    pub logical_relay: bool,
    /// How status describes the instance (`managed, Postgres 16`, `external, host:port`).
    pub instance_text: String,
    /// Where applications connect.
    pub endpoint: Endpoint,
}

impl Desire {
    /// The outbox table, when the outbox is enabled.
    pub fn outbox(&self) -> Option<&QualifiedName> {
        self.plan.outbox.as_ref()
    }

    /// The database's name.
    pub fn database(&self) -> &str {
        self.plan.database.as_str()
    }
}

/// What the database side needs, after [`validate`]: nothing is applied or connected to for a
/// spec that fails it.
pub fn desire(
    sdb: &ServiceDatabase,
    relays: &[OutboxRelay],
    rails: &GuardRails,
) -> Result<Desire, Invalid> {
    validate(&sdb.spec, rails)?;
    // A relay being deleted keeps its slot until its own cleanup drops it; wal_level stays
    // logical for that slot by the instance's slot check, not by this flag.
    let logical_relay = relays
        .iter()
        .any(|r| r.spec.mode == RelayMode::Logical && r.meta().deletion_timestamp.is_none());
    let roles = RoleNames::for_service(&sdb.spec.owner.service).map_err(|e| Invalid {
        reason: "InvalidOwnerService",
        message: e.to_string(),
    })?;
    let ns = sdb.namespace().unwrap_or_default();
    let owner =
        OwnerMark::new(ns.clone(), sdb.name_any(), sdb.uid().unwrap_or_default()).map_err(|e| {
            Invalid {
                reason: "InvalidIdentifier",
                message: e.to_string(),
            }
        })?;
    // The schema already enforces identifier patterns; this is the second line of defence.
    let mut plan =
        DatabasePlan::for_spec(&sdb.spec, owner, logical_relay).map_err(|e| Invalid {
            reason: "InvalidIdentifier",
            message: e.to_string(),
        })?;
    // A managed instance's server belongs to this ServiceDatabase alone (and instances
    // bootstrapped before marks existed carry none): adopting there takes nothing from anyone.
    plan.adopt |= sdb.spec.instance.managed.is_some();
    let names = DatabaseNames::new(&sdb.name_any());
    let (instance_text, endpoint) = presentation(sdb, &names, &ns);
    Ok(Desire {
        names,
        roles,
        plan,
        logical_relay,
        instance_text,
        endpoint,
    })
}

/// How status describes the instance and where applications connect.
fn presentation(sdb: &ServiceDatabase, names: &DatabaseNames, ns: &str) -> (String, Endpoint) {
    match (&sdb.spec.instance.managed, &sdb.spec.instance.external) {
        (Some(managed), _) => (
            format!("managed, Postgres {}", managed.version),
            Endpoint {
                host: crate::operator::admin::managed_host(names, ns),
                port: POSTGRES_PORT,
            },
        ),
        (None, Some(external)) => (
            format!("external, {}:{}", external.host, external.port),
            Endpoint {
                host: external.host.clone(),
                port: external.port,
            },
        ),
        // The CRD requires exactly one of the two.
        (None, None) => (
            String::new(),
            Endpoint {
                host: String::new(),
                port: 0,
            },
        ),
    }
}

/// Whether status already listed the Secret of `purpose`: a missing Secret then means a person
/// deleted it (as opposed to first creation).
pub fn was_recorded(sdb: &ServiceDatabase, purpose: &str) -> bool {
    let Some(secrets) = sdb.status.as_ref().and_then(|s| s.secrets.as_ref()) else {
        return false;
    };
    match purpose {
        "app" => secrets.app.is_some(),
        "relay" => secrets.relay.is_some(),
        "cdc" => secrets.cdc.is_some(),
        _ => false,
    }
}

/// What `wal_level` a managed instance whose spec no longer needs logical decoding gets.
#[derive(Debug, PartialEq, Eq)]
pub enum WalLevel {
    /// `replica`: nothing needs logical decoding and no logical slot is left.
    Lower,
    /// Stay `logical` for the given reason: Postgres refuses to start with `wal_level=replica`
    /// while a logical slot exists, so it is lowered only after every one is gone (checked).
    Keep(String),
}

/// Decides whether an instance running with `wal_level=logical` that its spec no longer needs
/// may restart with `replica`, from the instance's logical slots.
pub fn lower_wal_level(slots: Result<&[String], &str>) -> WalLevel {
    match slots {
        Ok([]) => WalLevel::Lower,
        Ok(slots) => WalLevel::Keep(format!(
            "logical replication slots still exist: {}",
            slots.join(", ")
        )),
        Err(why) => WalLevel::Keep(format!(
            "could not check the instance for logical replication slots ({why})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::service_database::{SecretNames, ServiceDatabaseStatus};

    fn sdb(spec: serde_json::Value) -> ServiceDatabase {
        let mut sdb: ServiceDatabase = serde_json::from_value(serde_json::json!({
            "apiVersion": "servicedb.io/v1alpha1",
            "kind": "ServiceDatabase",
            "metadata": {"name": "orders", "namespace": "shop", "uid": "u-1"},
            "spec": spec,
        }))
        .unwrap();
        sdb.status = None;
        sdb
    }

    fn external() -> serde_json::Value {
        serde_json::json!({
            "owner": {"service": "orders"},
            "instance": {"external": {"host": "pg.internal", "port": 5433,
                                      "adminSecretRef": {"name": "pg-admin"}}},
        })
    }

    fn relay(mode: &str, deleting: bool) -> OutboxRelay {
        let mut r: OutboxRelay = serde_json::from_value(serde_json::json!({
            "apiVersion": "servicedb.io/v1alpha1",
            "kind": "OutboxRelay",
            "metadata": {"name": "events", "namespace": "shop"},
            "spec": {"databaseRef": {"name": "orders"}, "mode": mode,
                     "sink": {"kafka": {"bootstrapServers": "k:9092"}}},
        }))
        .unwrap();
        if deleting {
            r.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::now(),
                ));
        }
        r
    }

    #[test]
    fn an_external_database_is_described_by_its_server_and_not_adopted_by_default() {
        let d = desire(&sdb(external()), &[], &GuardRails::default()).unwrap();
        assert_eq!(d.instance_text, "external, pg.internal:5433");
        assert_eq!(d.endpoint.host, "pg.internal");
        assert_eq!(d.endpoint.port, 5433);
        assert_eq!(d.database(), "orders");
        assert!(!d.plan.adopt);
        assert!(!d.logical_relay);
    }

    #[test]
    fn a_managed_instance_is_reached_by_its_service_and_always_adopted() {
        let spec = serde_json::json!({
            "owner": {"service": "orders"},
            "instance": {"managed": {"version": 16, "storage": {"size": "1Gi"}}},
        });
        let d = desire(&sdb(spec), &[], &GuardRails::default()).unwrap();
        assert_eq!(d.instance_text, "managed, Postgres 16");
        assert_eq!(d.endpoint.host, "orders-db.shop.svc");
        assert_eq!(d.endpoint.port, 5432);
        assert!(d.plan.adopt);
    }

    #[test]
    fn only_a_live_logical_relay_needs_logical_decoding() {
        let rails = GuardRails::default();
        let cases = [
            (vec![], false),
            (vec![relay("Poll", false)], false),
            (vec![relay("Logical", false)], true),
            (vec![relay("Logical", true)], false),
        ];
        for (relays, want) in cases {
            let d = desire(&sdb(external()), &relays, &rails).unwrap();
            assert_eq!(d.logical_relay, want);
        }
    }

    #[test]
    fn a_spec_that_fails_validation_gets_no_plan() {
        let mut spec = external();
        spec["database"] = serde_json::json!({"name": "template1"});
        let err = desire(&sdb(spec), &[], &GuardRails::default())
            .err()
            .expect("template1 is reserved");
        assert_eq!(
            err.reason,
            crate::operator::validate::RESERVED_DATABASE_NAME
        );
    }

    #[test]
    fn a_secret_counts_as_deleted_only_when_status_listed_it() {
        let mut s = sdb(external());
        assert!(!was_recorded(&s, "app"));
        s.status = Some(ServiceDatabaseStatus {
            secrets: Some(SecretNames {
                app: Some("orders-app".into()),
                relay: None,
                cdc: None,
            }),
            ..Default::default()
        });
        assert!(was_recorded(&s, "app"));
        assert!(!was_recorded(&s, "relay"));
        assert!(!was_recorded(&s, "superuser"));
    }

    #[test]
    fn wal_level_is_lowered_only_when_no_logical_slot_is_left() {
        assert_eq!(lower_wal_level(Ok(&[])), WalLevel::Lower);
        let slots = ["obr_orders_events_1a2b3c4d".to_owned()];
        assert!(matches!(
            lower_wal_level(Ok(&slots)),
            WalLevel::Keep(why) if why.contains("obr_orders_events_1a2b3c4d")
        ));
        assert!(matches!(
            lower_wal_level(Err("ServerUnreachable")),
            WalLevel::Keep(why) if why.contains("could not check")
        ));
    }
}
