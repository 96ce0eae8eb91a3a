//! Deletion that always finishes and never leaks: a namespace deletion drops a Delete-policy
//! database, its roles and its relay's slot within a bound; a slot a relay left behind is
//! dropped by its database; a cleanup that cannot succeed gives up after the cleanup timeout
//! (leaving the data); a managed instance keeps `wal_level=logical` while a slot may remain.
//! Against the real control plane and Postgres.

mod support;

use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use servicedb::api::{OutboxRelay, ServiceDatabase};

use support::harness::{Operator, create_admin_secret, external_sdb, wait_condition};

async fn create_sdb(ns: &support::TestNamespace, obj: serde_json::Value) -> Result<()> {
    let sdb: ServiceDatabase = serde_json::from_value(obj)?;
    ns.api::<ServiceDatabase>()
        .create(&PostParams::default(), &sdb)
        .await?;
    Ok(())
}

async fn create_logical_relay(
    ns: &support::TestNamespace,
    name: &str,
    database: &str,
    skip_cleanup: bool,
) -> Result<()> {
    let mut meta = json!({"name": name});
    if skip_cleanup {
        meta["annotations"] = json!({"servicedb.io/skip-cleanup": "true"});
    }
    let relay: OutboxRelay = serde_json::from_value(json!({
        "apiVersion": "servicedb.io/v1alpha1", "kind": "OutboxRelay", "metadata": meta,
        "spec": {
            "databaseRef": {"name": database},
            "mode": "Logical",
            "sink": {"kafka": {"bootstrapServers": support::env().kafka_bootstrap_servers}},
        }
    }))?;
    ns.api::<OutboxRelay>()
        .create(&PostParams::default(), &relay)
        .await?;
    Ok(())
}

async fn admin() -> Result<tokio_postgres::Client> {
    support::pg_connect(&support::env().pg_config("postgres")).await
}

/// Creates the slot a Logical relay pod would create (no relay pod runs in this environment).
async fn create_relay_slot(database: &str, slot: &str) -> Result<()> {
    let db = support::pg_connect(&support::env().pg_config(database)).await?;
    db.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&slot],
    )
    .await?;
    Ok(())
}

async fn slot_exists(slot: &str) -> Result<bool> {
    Ok(admin()
        .await?
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .is_some())
}

async fn database_exists(name: &str) -> Result<bool> {
    Ok(admin()
        .await?
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some())
}

async fn role_exists(name: &str) -> Result<bool> {
    Ok(admin()
        .await?
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .await?
        .is_some())
}

async fn wait_for_event(ns: &support::TestNamespace, reason: &str) -> Result<Event> {
    let events: Api<Event> = ns.api();
    support::wait_until(&format!("a {reason} Event"), support::TIMEOUT, || {
        let events = events.clone();
        async move {
            events
                .list(&Default::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some(reason))
        }
    })
    .await
}

#[tokio::test]
async fn deleting_the_namespace_drops_the_database_roles_and_relay_slot_within_a_bound()
-> Result<()> {
    let ns = support::TestNamespace::new("sdb-nsdel").await?;
    let _op = Operator::start(&ns.name).await?;
    create_admin_secret(&ns, "pg-admin").await?;
    let service = format!("nsdel{}", support::random_suffix());
    create_sdb(&ns, external_sdb("shop", &service, "Delete")).await?;
    let api = ns.api::<ServiceDatabase>();
    wait_condition(&api, "shop", "Ready", "True", support::TIMEOUT).await?;
    create_logical_relay(&ns, "events", "shop", false).await?;
    let slot = servicedb::postgres::identifiers::relay_slot_name(&ns.name, "events");
    create_relay_slot(&service, &slot).await?;

    // The admin Secret is held for the ServiceDatabase's cleanup.
    support::wait_until("the admin Secret's hold", support::TIMEOUT, || {
        let secrets = ns.api::<Secret>();
        async move {
            let s = secrets.get("pg-admin").await.ok()?;
            s.metadata
                .finalizers?
                .contains(&"servicedb.io/needed-by-shop".to_owned())
                .then_some(())
        }
    })
    .await?;

    // Everything in the namespace is deleted at once, admin Secret included.
    let namespaces: Api<Namespace> = Api::all(ns.client.clone());
    namespaces
        .delete(&ns.name, &DeleteParams::default())
        .await?;
    support::wait_until("the namespace to be gone", Duration::from_secs(180), || {
        let namespaces = namespaces.clone();
        let name = ns.name.clone();
        async move {
            namespaces
                .get_opt(&name)
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await?;

    ensure!(
        !database_exists(&service).await?,
        "database {service} still exists"
    );
    for role in [service.clone(), format!("{service}_relay")] {
        ensure!(!role_exists(&role).await?, "role {role} still exists");
    }
    ensure!(!slot_exists(&slot).await?, "slot {slot} still exists");
    Ok(())
}

#[tokio::test]
async fn a_slot_left_behind_by_a_deleted_relay_is_dropped_by_its_database() -> Result<()> {
    let ns = support::TestNamespace::new("sdb-orphan").await?;
    let _op = Operator::start(&ns.name).await?;
    create_admin_secret(&ns, "pg-admin").await?;
    let service = format!("orphan{}", support::random_suffix());
    create_sdb(&ns, external_sdb("shop", &service, "Delete")).await?;
    let api = ns.api::<ServiceDatabase>();
    wait_condition(&api, "shop", "Ready", "True", support::TIMEOUT).await?;

    // `kept` still exists; `gone` is deleted with skip-cleanup, so its slot stays behind.
    create_logical_relay(&ns, "kept", "shop", false).await?;
    create_logical_relay(&ns, "gone", "shop", true).await?;
    let kept = servicedb::postgres::identifiers::relay_slot_name(&ns.name, "kept");
    let gone = servicedb::postgres::identifiers::relay_slot_name(&ns.name, "gone");
    create_relay_slot(&service, &kept).await?;
    create_relay_slot(&service, &gone).await?;
    ns.api::<OutboxRelay>()
        .delete("gone", &DeleteParams::default())
        .await?;

    support::wait_until("the orphaned slot to be dropped", support::TIMEOUT, || {
        let gone = gone.clone();
        async move { (!slot_exists(&gone).await.ok()?).then_some(()) }
    })
    .await?;
    let event = wait_for_event(&ns, "OrphanedSlotDropped").await?;
    ensure!(
        event.note.as_deref().unwrap_or_default().contains(&gone),
        "{event:?}"
    );
    ensure!(
        slot_exists(&kept).await?,
        "the slot of a live relay was dropped"
    );

    // Clean up the live relay's slot through the operator: deleting it drops the slot.
    ns.api::<OutboxRelay>()
        .delete("kept", &DeleteParams::default())
        .await?;
    support::wait_until(
        "the live relay's slot to be dropped",
        support::TIMEOUT,
        || {
            let kept = kept.clone();
            async move { (!slot_exists(&kept).await.ok()?).then_some(()) }
        },
    )
    .await?;
    api.delete("shop", &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn a_cleanup_that_cannot_succeed_gives_up_after_the_timeout_and_keeps_the_data() -> Result<()>
{
    let ns = support::TestNamespace::new("sdb-giveup").await?;
    let op = Operator::start_with(&ns.name, &["--cleanup-timeout-seconds", "15"]).await?;
    create_admin_secret(&ns, "pg-admin").await?;
    let service = format!("giveup{}", support::random_suffix());
    create_sdb(&ns, external_sdb("shop", &service, "Delete")).await?;
    let api = ns.api::<ServiceDatabase>();
    wait_condition(&api, "shop", "Ready", "True", support::TIMEOUT).await?;

    // The server becomes unreachable (a closed port), then the object is deleted.
    let closed = support::free_port()?;
    api.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"instance": {"external": {"port": closed}}}})),
    )
    .await?;
    api.delete("shop", &DeleteParams::default()).await?;
    support::wait_until(
        "the ServiceDatabase to be gone",
        Duration::from_secs(120),
        || {
            let api = api.clone();
            async move { api.get_opt("shop").await.ok()?.is_none().then_some(()) }
        },
    )
    .await?;
    let event = wait_for_event(&ns, "CleanupAbandoned").await?;
    ensure!(
        event.note.as_deref().unwrap_or_default().contains(&service),
        "{event:?}"
    );
    ensure!(
        database_exists(&service).await?,
        "an abandoned cleanup must leave the data in place"
    );
    ensure!(
        op.counter_total("servicedb_operator_cleanups_abandoned_total")
            .await?
            >= 1.0
    );
    // The admin Secret is released: it can be deleted.
    let secrets = ns.api::<Secret>();
    let s = secrets.get("pg-admin").await?;
    ensure!(
        s.metadata.finalizers.unwrap_or_default().is_empty(),
        "the admin Secret is still held"
    );
    // Tidy the server: the test owns this database.
    let admin = admin().await?;
    for statement in [
        format!("DROP DATABASE IF EXISTS \"{service}\" WITH (FORCE)"),
        format!("DROP ROLE IF EXISTS \"{service}_relay\""),
        format!("DROP ROLE IF EXISTS \"{service}\""),
    ] {
        admin.batch_execute(&statement).await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_managed_instance_keeps_wal_level_logical_while_slots_cannot_be_ruled_out() -> Result<()>
{
    let ns = support::TestNamespace::new("sdb-wal").await?;
    let _op = Operator::start(&ns.name).await?;
    create_sdb(
        &ns,
        json!({
            "apiVersion": "servicedb.io/v1alpha1", "kind": "ServiceDatabase",
            "metadata": {"name": "orders"},
            "spec": {
                "owner": {"service": "orders"},
                "instance": {"managed": {"version": 17, "storage": {"size": "1Gi"}}},
                "outbox": {"table": "outbox"},
            }
        }),
    )
    .await?;
    // skip-cleanup: this environment cannot reach a managed instance to drop the slot.
    create_logical_relay(&ns, "events", "orders", true).await?;
    let sts_api = ns.api::<StatefulSet>();
    let logical = |sts: &StatefulSet| {
        serde_json::to_string(&sts.spec)
            .unwrap_or_default()
            .contains("wal_level=logical")
    };
    support::wait_until(
        "wal_level=logical on the instance",
        support::TIMEOUT,
        || {
            let sts_api = sts_api.clone();
            async move {
                let sts = sts_api.get_opt("orders-db").await.ok()??;
                logical(&sts).then_some(())
            }
        },
    )
    .await?;

    ns.api::<OutboxRelay>()
        .delete("events", &DeleteParams::default())
        .await?;
    // The instance cannot be asked for its slots (no pod runs here): wal_level must stay.
    let event = wait_for_event(&ns, "WalLevelKept").await?;
    ensure!(
        event
            .note
            .as_deref()
            .unwrap_or_default()
            .contains("could not check"),
        "{event:?}"
    );
    let sts = sts_api.get("orders-db").await?;
    ensure!(
        logical(&sts),
        "wal_level was lowered without checking for slots"
    );
    Ok(())
}
