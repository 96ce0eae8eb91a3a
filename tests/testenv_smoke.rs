//! Smoke tests proving that every component of the test environment (`hack/testenv.sh`) is real:
//! the Kubernetes control plane (CRDs, garbage collection, Deployments, RBAC), Postgres logical
//! replication, Kafka, NATS JetStream, Kafka Connect with Debezium, and Helm.

mod support;

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
};
use support::{TIMEOUT, TestNamespace, wait_until};

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("valid object")
}

#[tokio::test]
async fn crd_and_custom_resource_round_trip() -> Result<()> {
    let ns = TestNamespace::new("smoke-crd").await?;
    let client = ns.client.clone();
    let group = format!("{}.smoke.servicedb.io", support::random_suffix());
    let crd: CustomResourceDefinition = from_json(serde_json::json!({
        "metadata": {"name": format!("widgets.{group}")},
        "spec": {
            "group": group,
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget", "listKind": "WidgetList"},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {"size": {"type": "integer", "minimum": 1}}}
                }}}
            }]
        }
    }));
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd).await?;
    let crd_name = format!("widgets.{group}");
    wait_until("CRD Established", TIMEOUT, || {
        let (crds, crd_name) = (crds.clone(), crd_name.clone());
        async move {
            let c = crds.get(&crd_name).await.ok()?;
            c.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        }
    })
    .await?;

    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(&group, "v1", "Widget"),
        "widgets",
    );
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns.name, &ar);
    let w: DynamicObject = from_json(serde_json::json!({
        "apiVersion": format!("{group}/v1"), "kind": "Widget",
        "metadata": {"name": "w1"}, "spec": {"size": 3}
    }));
    // The schema is enforced by the real apiserver: size 0 violates `minimum: 1`.
    let bad: DynamicObject = from_json(serde_json::json!({
        "apiVersion": format!("{group}/v1"), "kind": "Widget",
        "metadata": {"name": "w0"}, "spec": {"size": 0}
    }));
    wait_until("Widget create accepted", TIMEOUT, || {
        let (widgets, w) = (widgets.clone(), w.clone());
        async move { widgets.create(&PostParams::default(), &w).await.ok() }
    })
    .await?;
    assert!(
        widgets.create(&PostParams::default(), &bad).await.is_err(),
        "schema validation must reject size 0"
    );
    let back = widgets.get("w1").await?;
    assert_eq!(back.data["spec"]["size"], 3);
    crds.delete(&crd_name, &DeleteParams::default()).await?;
    Ok(())
}

#[tokio::test]
async fn owner_reference_garbage_collection() -> Result<()> {
    let ns = TestNamespace::new("smoke-gc").await?;
    let cms: Api<ConfigMap> = ns.api();
    let owner = cms
        .create(
            &PostParams::default(),
            &from_json(serde_json::json!({"metadata": {"name": "owner"}})),
        )
        .await?;
    let uid = owner.metadata.uid.clone().unwrap();
    cms.create(
        &PostParams::default(),
        &from_json(
            serde_json::json!({"metadata": {"name": "child", "ownerReferences": [{
                "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid
            }]}}),
        ),
    )
    .await?;
    cms.delete("owner", &DeleteParams::background()).await?;
    wait_until("child garbage-collected", TIMEOUT, || {
        let cms = cms.clone();
        async move { matches!(cms.get_opt("child").await, Ok(None)).then_some(()) }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn deployment_creates_replicaset_and_pods() -> Result<()> {
    let ns = TestNamespace::new("smoke-deploy").await?;
    let deployments: Api<Deployment> = ns.api();
    deployments
        .create(
            &PostParams::default(),
            &from_json(serde_json::json!({
                "metadata": {"name": "web"},
                "spec": {
                    "replicas": 2,
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {
                        "metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1"}]}
                    }
                }
            })),
        )
        .await?;
    let rss: Api<ReplicaSet> = ns.api();
    wait_until("a ReplicaSet owned by the Deployment", TIMEOUT, || {
        let rss = rss.clone();
        async move {
            let list = rss
                .list(&ListParams::default().labels("app=web"))
                .await
                .ok()?;
            list.items
                .iter()
                .any(|rs| {
                    rs.metadata
                        .owner_references
                        .iter()
                        .flatten()
                        .any(|o| o.kind == "Deployment" && o.name == "web")
                })
                .then_some(())
        }
    })
    .await?;
    // No kubelet: mark the pods Ready ourselves, and the Deployment becomes available.
    let pods = support::mark_pods_ready(&ns.client, &ns.name, "app=web", 2).await?;
    assert_eq!(pods.len(), 2);
    let pod_api: Api<Pod> = ns.api();
    let p = pod_api.get(&pods[0]).await?;
    assert_eq!(p.status.and_then(|s| s.phase).as_deref(), Some("Running"));
    wait_until("Deployment availableReplicas=2", TIMEOUT, || {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get("web").await.ok()?;
            (d.status?.available_replicas? == 2).then_some(())
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn rbac_denies_what_a_role_does_not_allow() -> Result<()> {
    let ns = TestNamespace::new("smoke-rbac").await?;
    let pp = PostParams::default();
    ns.api::<ServiceAccount>()
        .create(
            &pp,
            &from_json(serde_json::json!({"metadata": {"name": "limited"}})),
        )
        .await?;
    ns.api::<Role>()
        .create(
            &pp,
            &from_json(serde_json::json!({
                "metadata": {"name": "read-configmaps"},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]
            })),
        )
        .await?;
    ns.api::<RoleBinding>()
        .create(
            &pp,
            &from_json(serde_json::json!({
                "metadata": {"name": "limited-read-configmaps"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-configmaps"},
                "subjects": [{"kind": "ServiceAccount", "name": "limited", "namespace": ns.name}]
            })),
        )
        .await?;
    let sa_client =
        support::impersonating_client(&format!("system:serviceaccount:{}:limited", ns.name))
            .await?;
    let cms: Api<ConfigMap> = Api::namespaced(sa_client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(sa_client, &ns.name);
    // RBAC caches settle quickly but not instantly: wait until the allowed call works...
    wait_until("configmaps list allowed", TIMEOUT, || {
        let cms = cms.clone();
        async move { cms.list(&ListParams::default()).await.ok() }
    })
    .await?;
    // ...then the call the Role does not allow must be forbidden.
    match secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "expected Forbidden, got {s:?}"),
        other => panic!("listing secrets must be forbidden, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn postgres_creates_a_logical_replication_slot() -> Result<()> {
    let db = support::fresh_database("smoke_pg").await?;
    let client = db.connect().await?;
    let slot = format!("smoke_{}", support::random_suffix());
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await?;
    let row = client
        .query_one(
            "SELECT plugin, slot_type, database FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    assert_eq!(row.get::<_, String>(0), "pgoutput");
    assert_eq!(row.get::<_, String>(1), "logical");
    assert_eq!(row.get::<_, String>(2), db.name);
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await?;
    Ok(())
}

#[tokio::test]
async fn kafka_round_trips_a_message() -> Result<()> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let topic = format!("smoke-{}", support::random_suffix());
    let bootstrap = &support::env().kafka_bootstrap_servers;
    support::kafka_create_topic(bootstrap, &topic, 1).await?;
    let producer: FutureProducer = support::kafka_client_config(bootstrap)
        .set("enable.idempotence", "true")
        .create()?;
    producer
        .send(
            FutureRecord::to(&topic).key("k1").payload("hello").headers(
                OwnedHeaders::new().insert(Header {
                    key: "id",
                    value: Some("e1"),
                }),
            ),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)?;
    let got = support::kafka_consume(&topic, 1, TIMEOUT).await?;
    assert_eq!(got[0].key.as_deref(), Some(&b"k1"[..]));
    assert_eq!(got[0].payload.as_deref(), Some(&b"hello"[..]));
    assert_eq!(
        got[0].headers,
        vec![("id".to_string(), Some(b"e1".to_vec()))]
    );
    Ok(())
}

#[tokio::test]
async fn jetstream_acks_and_deduplicates() -> Result<()> {
    use async_nats::jetstream;
    let client = support::nats_client().await?;
    let js = jetstream::new(client.clone());
    let name = format!("SMOKE_{}", support::random_suffix().to_uppercase());
    let subject = format!("smoke.{name}");
    js.create_stream(jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("{subject}.>")],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let publish = |id: &'static str, body: &'static str| {
        let (js, subject) = (js.clone(), format!("{subject}.created"));
        async move {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id);
            js.publish_with_headers(subject, headers, body.into())
                .await?
                .await
        }
    };
    // Core NATS as well: a plain subscription sees JetStream-published messages on its subject.
    let mut sub = client.subscribe(format!("{subject}.>")).await?;
    client.flush().await?;
    let first = publish("event-1", "one").await?;
    assert!(!first.duplicate);
    assert_eq!(first.stream, name);
    let again = publish("event-1", "one again").await?;
    assert!(
        again.duplicate,
        "a repeated Nats-Msg-Id must be deduplicated"
    );
    let second = publish("event-2", "two").await?;
    assert!(!second.duplicate);
    let seen = support::nats_collect(&mut sub, 3, TIMEOUT).await?;
    assert_eq!(
        seen.len(),
        3,
        "core subscribers see every publish, deduplicated or not"
    );
    let msgs = support::jetstream_read(&client, &name, 2, TIMEOUT).await?;
    assert_eq!(
        msgs.iter().map(|m| m.payload.to_vec()).collect::<Vec<_>>(),
        vec![b"one".to_vec(), b"two".to_vec()]
    );
    let mut stream = js.get_stream(&name).await?;
    assert_eq!(stream.info().await?.state.messages, 2);
    js.delete_stream(&name).await?;
    Ok(())
}

#[tokio::test]
async fn kafka_connect_lists_the_debezium_postgres_connector() -> Result<()> {
    let url = format!("{}/connector-plugins", support::env().kafka_connect_url);
    let (status, body) = support::http_request("GET", &url, None).await?;
    assert_eq!(status, 200, "{body}");
    let plugins: serde_json::Value = serde_json::from_str(&body)?;
    assert!(
        plugins
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["class"] == "io.debezium.connector.postgresql.PostgresConnector"),
        "Debezium Postgres connector not listed: {body}"
    );
    Ok(())
}

#[test]
fn helm_version_answers() {
    let e = support::env();
    let out = e
        .command(&e.helm)
        .args(["version", "--short"])
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(v.starts_with("v3."), "unexpected helm version: {v}");
}

#[test]
fn apiserver_reports_its_real_version() {
    let e = support::env();
    let out = e
        .command(&e.kubectl)
        .args(["version", "-o", "json"])
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["serverVersion"]["gitVersion"],
        e.var("KUBERNETES_VERSION")
    );
}
