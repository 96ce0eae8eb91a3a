//! OutboxRelay against the real environment: the operator renders a Deployment, ConfigMap and
//! ServiceAccount wired to the ServiceDatabase; running exactly what the Deployment says moves
//! outbox rows to Kafka and NATS; a Logical relay's slot goes with it; a missing database waits.

mod support;

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use kube::ResourceExt;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use servicedb::api::{OutboxRelay, ServiceDatabase};

use support::harness::{
    Operator, RelayRunner, connect_uri, create_admin_secret, external_sdb, secret_string,
    wait_condition,
};

async fn create_sdb(ns: &support::TestNamespace, name: &str) -> Result<String> {
    create_admin_secret(ns, "pg-admin").await?;
    let service = format!("{name}-{}", support::random_suffix());
    let sdb: ServiceDatabase = serde_json::from_value(external_sdb(name, &service, "Delete"))?;
    ns.api::<ServiceDatabase>()
        .create(&PostParams::default(), &sdb)
        .await?;
    wait_condition(
        &ns.api::<ServiceDatabase>(),
        name,
        "Ready",
        "True",
        support::TIMEOUT,
    )
    .await?;
    Ok(service)
}

async fn create_relay(
    ns: &support::TestNamespace,
    name: &str,
    spec: serde_json::Value,
) -> Result<OutboxRelay> {
    let relay: OutboxRelay = serde_json::from_value(json!({
        "apiVersion": "servicedb.io/v1alpha1", "kind": "OutboxRelay", "metadata": {"name": name}, "spec": spec
    }))?;
    Ok(ns
        .api::<OutboxRelay>()
        .create(&PostParams::default(), &relay)
        .await?)
}

async fn insert_events(
    ns: &support::TestNamespace,
    sdb: &str,
    aggregatetype: &str,
    n: usize,
) -> Result<Vec<String>> {
    let uri = secret_string(
        &ns.api::<k8s_openapi::api::core::v1::Secret>()
            .get(&format!("{sdb}-app"))
            .await?,
        "uri",
    )?;
    let app = connect_uri(&uri).await?;
    let mut ids = Vec::new();
    for i in 0..n {
        let id = uuid::Uuid::new_v4();
        app.execute(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES ($1, $2, $3, 'created', $4)",
            &[&id, &aggregatetype, &format!("agg-{}", i % 3), &json!({"n": i})],
        )
        .await?;
        ids.push(id.to_string());
    }
    Ok(ids)
}

#[tokio::test]
async fn a_kafka_relay_deployment_runs_as_rendered_and_delivers_outbox_events() -> Result<()> {
    let ns = support::TestNamespace::new("obr-kafka").await?;
    let _op = Operator::start(&ns.name).await?;
    create_sdb(&ns, "shop").await?;
    let aggregatetype = format!("order{}", support::random_suffix());
    let relay = create_relay(&ns, "shop-events", json!({
        "databaseRef": {"name": "shop"},
        "sink": {"kafka": {"bootstrapServers": support::env().kafka_bootstrap_servers, "topic": "outbox.event.{aggregatetype}"}},
        "batchSize": 50,
        "pollIntervalMs": 50,
    }))
    .await?;

    // The children, owned by the relay, wired to the ServiceDatabase's relay Secret.
    let deployment: Deployment =
        support::wait_until("the relay Deployment", support::TIMEOUT, || {
            let api = ns.api::<Deployment>();
            async move { api.get_opt("shop-events-relay").await.ok().flatten() }
        })
        .await?;
    let uid = relay.uid().expect("uid");
    assert!(
        deployment
            .owner_references()
            .iter()
            .any(|o| o.uid == uid && o.controller == Some(true))
    );
    let pod = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("pod spec");
    let c = &pod.containers[0];
    assert_eq!(
        c.args.clone().unwrap_or_default(),
        vec!["relay", "--config", "/etc/servicedb/relay.yaml"]
    );
    let env_from_secret: Vec<(String, String, String)> = c
        .env
        .iter()
        .flatten()
        .filter_map(|e| {
            let r = e.value_from.as_ref()?.secret_key_ref.as_ref()?;
            Some((e.name.clone(), r.name.clone(), r.key.clone()))
        })
        .collect();
    for var in [
        "PGHOST",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGPASSWORD",
        "PGSSLMODE",
    ] {
        assert!(
            env_from_secret
                .iter()
                .any(|(n, s, _)| n == var && s == "shop-relay"),
            "{var} not from shop-relay: {env_from_secret:?}"
        );
    }
    assert_eq!(
        c.security_context
            .as_ref()
            .and_then(|s| s.read_only_root_filesystem),
        Some(true)
    );
    assert_eq!(
        c.readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
            .as_deref(),
        Some("/readyz")
    );
    let cm = ns
        .api::<ConfigMap>()
        .get("shop-events-relay-config")
        .await?;
    assert!(cm.owner_references().iter().any(|o| o.uid == uid));
    let config = cm.data.expect("data")["relay.yaml"].clone();
    assert!(config.contains("table: public.outbox"), "{config}");
    // The relay reaches the outbox only through the outbox owner's functions.
    assert!(config.contains("functionsSchema: servicedb"), "{config}");
    let sa = ns.api::<ServiceAccount>().get("shop-events-relay").await?;
    assert_eq!(sa.automount_service_account_token, Some(false));

    // Run exactly what the Deployment says, then publish.
    let runner = RelayRunner::start(&ns.name).await?;
    wait_condition(
        &ns.api::<OutboxRelay>(),
        "shop-events",
        "Ready",
        "True",
        support::TIMEOUT,
    )
    .await?;
    let ids = insert_events(&ns, "shop", &aggregatetype, 20).await?;
    let records = support::kafka_consume(
        &format!("outbox.event.{aggregatetype}"),
        ids.len(),
        support::TIMEOUT,
    )
    .await?;
    let got: Vec<String> = records
        .iter()
        .filter_map(|r| {
            r.headers
                .iter()
                .find(|(k, _)| k == "id")
                .and_then(|(_, v)| v.clone())
        })
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .collect();
    let mut want = ids.clone();
    want.sort();
    let mut seen = got.clone();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, want, "every event arrives");
    let status = ns
        .api::<OutboxRelay>()
        .get("shop-events")
        .await?
        .status
        .expect("status");
    assert_eq!(status.ready_replicas, Some(1));
    assert_eq!(status.sink.as_deref(), Some("kafka"));
    runner.stop().await?;
    Ok(())
}

#[tokio::test]
async fn a_logical_nats_relay_delivers_and_its_slot_is_dropped_with_it() -> Result<()> {
    let ns = support::TestNamespace::new("obr-nats").await?;
    let _op = Operator::start(&ns.name).await?;
    let service = create_sdb(&ns, "stock").await?;
    let stream = format!("STOCK{}", support::random_suffix().to_uppercase());
    let subject_root = format!("stock{}", support::random_suffix());
    create_relay(&ns, "stock-events", json!({
        "databaseRef": {"name": "stock"},
        "mode": "Logical",
        "sink": {"nats": {"url": support::env().nats_url, "subject": format!("{subject_root}.{{aggregatetype}}.{{type}}"), "stream": stream}},
        "format": "CloudEvents",
    }))
    .await?;
    let runner = RelayRunner::start(&ns.name).await?;
    let ready = wait_condition(
        &ns.api::<OutboxRelay>(),
        "stock-events",
        "Ready",
        "True",
        support::TIMEOUT,
    )
    .await?;
    let slot = ready.status.and_then(|s| s.slot).expect("status.slot");
    let ids = insert_events(&ns, "stock", "item", 10).await?;
    let nats = support::nats_client().await?;
    let msgs = support::wait_until("the stream", support::TIMEOUT, || {
        let nats = nats.clone();
        let stream = stream.clone();
        async move {
            support::jetstream_read(&nats, &stream, 10, Duration::from_secs(5))
                .await
                .ok()
        }
    })
    .await?;
    let mut got: Vec<String> = msgs
        .iter()
        .filter_map(|m| {
            m.headers
                .as_ref()?
                .get("Nats-Msg-Id")
                .map(|v| v.as_str().to_owned())
        })
        .collect();
    got.sort();
    let mut want = ids;
    want.sort();
    assert_eq!(got, want);

    // The slot exists while the relay does; deleting the relay drops it.
    let admin = support::pg_connect(&support::env().pg_config(&service.replace('-', "_"))).await?;
    let exists = admin
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .is_some();
    assert!(exists, "slot {slot} missing while the relay runs");
    runner.stop().await?;
    ns.api::<OutboxRelay>()
        .delete("stock-events", &DeleteParams::default())
        .await?;
    support::wait_until("the slot to be dropped", support::TIMEOUT, || {
        let admin = &admin;
        let slot = slot.clone();
        async move {
            let row = admin
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .ok()?;
            row.is_none().then_some(())
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_relay_whose_database_is_deleted_waits_with_a_clear_condition() -> Result<()> {
    let ns = support::TestNamespace::new("obr-wait").await?;
    let _op = Operator::start(&ns.name).await?;
    create_sdb(&ns, "gone").await?;
    create_relay(
        &ns,
        "gone-events",
        json!({
            "databaseRef": {"name": "gone"},
            "sink": {"kafka": {"bootstrapServers": support::env().kafka_bootstrap_servers}},
        }),
    )
    .await?;
    wait_condition(
        &ns.api::<OutboxRelay>(),
        "gone-events",
        "DatabaseReady",
        "True",
        support::TIMEOUT,
    )
    .await?;
    ns.api::<ServiceDatabase>()
        .delete("gone", &DeleteParams::default())
        .await?;
    let waiting = wait_condition(
        &ns.api::<OutboxRelay>(),
        "gone-events",
        "DatabaseReady",
        "False",
        support::TIMEOUT,
    )
    .await?;
    let cond = waiting
        .status
        .expect("status")
        .conditions
        .into_iter()
        .find(|c| c.type_ == "DatabaseReady")
        .expect("condition");
    assert_eq!(cond.reason, "DatabaseNotFound", "{cond:?}");
    assert!(
        cond.message.contains("waiting for ServiceDatabase gone"),
        "{cond:?}"
    );
    // And a relay for a database that never existed waits the same way.
    create_relay(
        &ns,
        "early",
        json!({
            "databaseRef": {"name": "later"},
            "sink": {"kafka": {"bootstrapServers": support::env().kafka_bootstrap_servers}},
        }),
    )
    .await?;
    wait_condition(
        &ns.api::<OutboxRelay>(),
        "early",
        "Ready",
        "False",
        support::TIMEOUT,
    )
    .await?;
    Ok(())
}
