//! ServiceDatabase against the real environment: external mode provisions on the test Postgres
//! with least privilege; passwords survive restarts; deletion policies; outages; managed mode's
//! children, readiness and garbage collection.

mod support;

use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use servicedb::api::ServiceDatabase;

use support::harness::{
    Operator, connect_uri, create_admin_secret, external_sdb, secret_string, wait_condition,
};

async fn create(ns: &support::TestNamespace, obj: serde_json::Value) -> Result<ServiceDatabase> {
    let sdb: ServiceDatabase = serde_json::from_value(obj)?;
    Ok(ns
        .api::<ServiceDatabase>()
        .create(&PostParams::default(), &sdb)
        .await?)
}

async fn database_exists(name: &str) -> Result<bool> {
    let admin = support::pg_connect(&support::env().pg_config("postgres")).await?;
    Ok(admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some())
}

async fn uri_of(ns: &support::TestNamespace, secret: &str) -> Result<String> {
    let s = ns.api::<Secret>().get(secret).await?;
    secret_string(&s, "uri")
}

/// Every role's password, by Secret name.
async fn passwords(ns: &support::TestNamespace, secrets: &[&str]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for s in secrets {
        out.push(secret_string(
            &ns.api::<Secret>().get(s).await?,
            "password",
        )?);
    }
    Ok(out)
}

#[tokio::test]
async fn external_database_gets_exactly_least_privilege_roles() -> Result<()> {
    let ns = support::TestNamespace::new("sdb-priv").await?;
    let _op = Operator::start(&ns.name).await?;
    create_admin_secret(&ns, "pg-admin").await?;
    let a = format!("orders-{}", support::random_suffix());
    let b = format!("billing-{}", support::random_suffix());
    create(&ns, external_sdb("orders", &a, "Delete")).await?;
    create(&ns, external_sdb("billing", &b, "Delete")).await?;
    let api = ns.api::<ServiceDatabase>();
    let orders = wait_condition(&api, "orders", "Ready", "True", support::TIMEOUT).await?;
    wait_condition(&api, "billing", "Ready", "True", support::TIMEOUT).await?;
    let status = orders.status.clone().expect("status");
    assert_eq!(
        status.phase,
        Some(servicedb::api::service_database::Phase::Ready)
    );
    assert_eq!(
        status.database.as_deref(),
        Some(a.replace('-', "_").as_str())
    );
    for cond in ["Ready", "InstanceReady", "DatabaseReady", "OutboxReady"] {
        assert!(
            status
                .conditions
                .iter()
                .any(|c| c.type_ == cond && c.status == "True"),
            "{cond} not True: {:?}",
            status.conditions
        );
    }

    // Secrets carry the service-binding keys.
    let app_secret = ns.api::<Secret>().get("orders-app").await?;
    for key in [
        "type", "provider", "host", "port", "database", "username", "password", "uri", "jdbc-uri",
        "pgpass",
    ] {
        secret_string(&app_secret, key)?;
    }
    assert_eq!(secret_string(&app_secret, "type")?, "postgresql");

    // The app role owns its database: it can create tables and write the outbox.
    let app = connect_uri(&uri_of(&ns, "orders-app").await?).await?;
    app.batch_execute("CREATE TABLE private_orders (id int primary key, secret text); INSERT INTO private_orders VALUES (1, 'x')").await?;
    app.execute(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES (gen_random_uuid(), 'order', '1', 'created', '{}')",
        &[],
    )
    .await?;

    // The relay role claims outbox rows through the outbox owner's function, and does nothing
    // else (not even read the table directly).
    let relay = connect_uri(&uri_of(&ns, "orders-relay").await?).await?;
    let rows = relay
        .query("SELECT id FROM servicedb.outbox_claim(10)", &[])
        .await?;
    assert_eq!(rows.len(), 1);
    let denied = relay
        .query("SELECT id FROM outbox", &[])
        .await
        .expect_err("relay read the outbox table directly");
    assert_eq!(denied.code().map(|c| c.code()), Some("42501"), "{denied}");
    let denied = relay
        .query("SELECT * FROM private_orders", &[])
        .await
        .expect_err("relay read an app table");
    assert_eq!(denied.code().map(|c| c.code()), Some("42501"), "{denied}");

    // Neither app can connect to the other's database.
    let billing_uri = uri_of(&ns, "billing-app").await?;
    let orders_uri = uri_of(&ns, "orders-app").await?;
    let billing_db = b.replace('-', "_");
    let cross = orders_uri.replacen(
        &format!("/{}?", a.replace('-', "_")),
        &format!("/{billing_db}?"),
        1,
    );
    let err = connect_uri(&cross)
        .await
        .expect_err("orders app connected to the billing database");
    assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{err}");
    drop(billing_uri);

    // A role with no grants cannot connect at all: CONNECT is revoked from PUBLIC.
    let admin = support::pg_connect(&support::env().pg_config("postgres")).await?;
    let stranger = format!("stranger_{}", support::random_suffix());
    admin
        .batch_execute(&format!(
            "CREATE ROLE {stranger} LOGIN PASSWORD 'stranger-pw'"
        ))
        .await?;
    let e = support::env();
    let stranger_uri = format!(
        "postgresql://{stranger}:stranger-pw@{}:{}/{}",
        e.pg_host,
        e.pg_port,
        a.replace('-', "_")
    );
    let err = connect_uri(&stranger_uri)
        .await
        .expect_err("a role without grants connected");
    assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{err}");
    admin
        .batch_execute(&format!("DROP ROLE {stranger}"))
        .await?;
    Ok(())
}

#[tokio::test]
async fn passwords_survive_operator_restarts_and_resyncs_and_noop_resyncs_write_nothing()
-> Result<()> {
    let ns = support::TestNamespace::new("sdb-pw").await?;
    let op = Operator::start(&ns.name).await?;
    create_admin_secret(&ns, "pg-admin").await?;
    let service = format!("pw-{}", support::random_suffix());
    create(&ns, external_sdb("pw", &service, "Delete")).await?;
    let api = ns.api::<ServiceDatabase>();
    wait_condition(&api, "pw", "Ready", "True", support::TIMEOUT).await?;
    let names = ["pw-app", "pw-relay"];
    let before = passwords(&ns, &names).await?;
    let versions = |ns: &support::TestNamespace| {
        let secrets = ns.api::<Secret>();
        async move {
            let mut v = Vec::new();
            for n in names {
                v.push(secrets.get(n).await?.resource_version());
            }
            anyhow::Ok(v)
        }
    };
    let secret_versions = versions(&ns).await?;
    let status_before = api.get("pw").await?.status;

    // Kill the operator hard and start a new one.
    op.kill().await?;
    let op2 = Operator::start(&ns.name).await?;
    // Ten forced resyncs: each annotation change triggers a reconcile. The next change waits
    // (bounded) until the operator has reconciled once more, so a slow machine does not
    // coalesce them into fewer reconciles.
    for i in 0..10 {
        let seen = op2
            .counter_total("servicedb_operator_reconciles_total")
            .await?;
        api.patch(
            "pw",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"test/resync": i.to_string()}}})),
        )
        .await?;
        let _ = support::wait_until("a reconcile", Duration::from_secs(10), || {
            let op2 = &op2;
            async move {
                let now = op2
                    .counter_total("servicedb_operator_reconciles_total")
                    .await
                    .ok()?;
                (now > seen).then_some(())
            }
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reconciles = op2
        .counter_total("servicedb_operator_reconciles_total")
        .await?;
    assert!(
        reconciles >= 5.0,
        "the forced resyncs did not reconcile: {reconciles}"
    );
    let writes = op2
        .counter_total("servicedb_operator_api_writes_total")
        .await?;
    assert_eq!(
        writes, 0.0,
        "a restarted operator wrote to the apiserver during no-op resyncs"
    );
    assert_eq!(passwords(&ns, &names).await?, before, "a password changed");
    assert_eq!(
        versions(&ns).await?,
        secret_versions,
        "a no-op resync rewrote a Secret"
    );
    assert_eq!(
        api.get("pw").await?.status,
        status_before,
        "a no-op resync changed status"
    );
    // And the passwords still log in.
    connect_uri(&uri_of(&ns, "pw-app").await?).await?;
    connect_uri(&uri_of(&ns, "pw-relay").await?).await?;
    Ok(())
}

#[tokio::test]
async fn a_deleted_credentials_secret_gets_a_new_password_and_an_event() -> Result<()> {
    let ns = support::TestNamespace::new("sdb-lost").await?;
    let _op = Operator::start(&ns.name).await?;
    create_admin_secret(&ns, "pg-admin").await?;
    let service = format!("lost-{}", support::random_suffix());
    create(&ns, external_sdb("lost", &service, "Delete")).await?;
    let api = ns.api::<ServiceDatabase>();
    wait_condition(&api, "lost", "Ready", "True", support::TIMEOUT).await?;
    let old_uri = uri_of(&ns, "lost-app").await?;
    let secrets = ns.api::<Secret>();
    // A reconcile already running when the Secret goes may write it back with the password it
    // had just read: still valid, nothing lost. Delete again until the operator sees it missing.
    let mut new_uri = old_uri.clone();
    for _ in 0..5 {
        let _ = secrets.delete("lost-app", &DeleteParams::default()).await;
        new_uri = support::wait_until(
            "the app Secret to come back with its password applied",
            support::TIMEOUT,
            || {
                let secrets = secrets.clone();
                async move {
                    let s = secrets.get_opt("lost-app").await.ok()??;
                    let applied = s
                        .annotations()
                        .get("servicedb.io/password-state")
                        .is_some_and(|v| v == "applied");
                    applied.then(|| secret_string(&s, "uri").ok()).flatten()
                }
            },
        )
        .await?;
        if new_uri != old_uri {
            break;
        }
    }
    ensure!(
        new_uri != old_uri,
        "the recreated Secret kept the old password"
    );
    connect_uri(&new_uri).await?;
    let err = connect_uri(&old_uri)
        .await
        .expect_err("the old password still works");
    assert_eq!(err.code().map(|c| c.code()), Some("28P01"), "{err}");
    let events: Api<k8s_openapi::api::events::v1::Event> = ns.api();
    support::wait_until("a CredentialsRegenerated Event", support::TIMEOUT, || {
        let events = events.clone();
        async move {
            let list = events.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| e.reason.as_deref() == Some("CredentialsRegenerated"))
                .then_some(())
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn retain_keeps_the_database_and_delete_drops_it() -> Result<()> {
    let ns = support::TestNamespace::new("sdb-del").await?;
    let _op = Operator::start(&ns.name).await?;
    create_admin_secret(&ns, "pg-admin").await?;
    let kept = format!("kept-{}", support::random_suffix());
    let gone = format!("gone-{}", support::random_suffix());
    create(&ns, external_sdb("kept", &kept, "Retain")).await?;
    create(&ns, external_sdb("gone", &gone, "Delete")).await?;
    let api = ns.api::<ServiceDatabase>();
    wait_condition(&api, "kept", "Ready", "True", support::TIMEOUT).await?;
    wait_condition(&api, "gone", "Ready", "True", support::TIMEOUT).await?;
    let kept_uri = uri_of(&ns, "kept-app").await?;
    api.delete("kept", &DeleteParams::default()).await?;
    api.delete("gone", &DeleteParams::default()).await?;
    for name in ["kept", "gone"] {
        support::wait_until(&format!("{name} to be deleted"), support::TIMEOUT, || {
            let api = api.clone();
            async move {
                api.get_opt(name)
                    .await
                    .ok()
                    .and_then(|o| o.is_none().then_some(()))
            }
        })
        .await?;
    }
    assert!(
        database_exists(&kept.replace('-', "_")).await?,
        "Retain dropped the database"
    );
    assert!(
        !database_exists(&gone.replace('-', "_")).await?,
        "Delete kept the database"
    );
    // Retain kept the app Secret, orphaned, and its password still logs in.
    let secret = ns.api::<Secret>().get("kept-app").await?;
    assert!(
        secret.owner_references().is_empty(),
        "retained Secret still has an owner"
    );
    connect_uri(&kept_uri).await?;
    // Clean the retained database off the shared server.
    let admin = support::pg_connect(&support::env().pg_config("postgres")).await?;
    let db = kept.replace('-', "_");
    // One statement per call: DROP DATABASE cannot run in the implicit transaction of a batch.
    admin
        .batch_execute(&format!("DROP DATABASE \"{db}\" WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("DROP ROLE \"{db}_relay\""))
        .await?;
    admin.batch_execute(&format!("DROP ROLE \"{db}\"")).await?;
    admin
        .batch_execute(&format!("DROP ROLE \"{db}_outbox\""))
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_stopped_server_turns_degraded_and_ready_again_once_back() -> Result<()> {
    let ns = support::TestNamespace::new("sdb-down").await?;
    let _op = Operator::start(&ns.name).await?;
    create_admin_secret(&ns, "pg-admin").await?;
    let e = support::env();
    let mut proxy = support::harness::Proxy::start(&format!("{}:{}", e.pg_host, e.pg_port)).await?;
    proxy.stop();
    let service = format!("down-{}", support::random_suffix());
    let mut obj = external_sdb("down", &service, "Delete");
    obj["spec"]["instance"]["external"]["port"] = json!(proxy.port);
    create(&ns, obj).await?;
    let api = ns.api::<ServiceDatabase>();
    let degraded = wait_condition(&api, "down", "DatabaseReady", "False", support::TIMEOUT).await?;
    assert_eq!(
        degraded.status.and_then(|s| s.phase),
        Some(servicedb::api::service_database::Phase::Degraded)
    );
    proxy.resume().await?;
    wait_condition(&api, "down", "Ready", "True", Duration::from_secs(360)).await?;
    Ok(())
}

#[tokio::test]
async fn managed_instance_children_are_owned_labelled_ready_and_collected() -> Result<()> {
    let ns = support::TestNamespace::new("sdb-managed").await?;
    let _op = Operator::start(&ns.name).await?;
    let obj = json!({
        "apiVersion": "servicedb.io/v1alpha1", "kind": "ServiceDatabase",
        "metadata": {"name": "orders"},
        "spec": {
            "owner": {"service": "orders"},
            "instance": {"managed": {"version": 17, "storage": {"size": "1Gi"}, "parameters": {"max_connections": "50"}}},
            "outbox": {"table": "outbox"},
        }
    });
    let sdb = create(&ns, obj).await?;
    let api = ns.api::<ServiceDatabase>();
    wait_condition(&api, "orders", "InstanceReady", "False", support::TIMEOUT).await?;

    let sts: StatefulSet = support::wait_until("the StatefulSet", support::TIMEOUT, || {
        let a = ns.api::<StatefulSet>();
        async move { a.get_opt("orders-db").await.ok().flatten() }
    })
    .await?;
    let uid = sdb.uid().expect("uid");
    let owned_by_sdb =
        |refs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference]| {
            refs.iter()
                .any(|r| r.uid == uid && r.controller == Some(true) && r.kind == "ServiceDatabase")
        };
    assert!(owned_by_sdb(sts.owner_references()));
    assert_eq!(
        sts.labels()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("servicedb-operator")
    );
    let pod_spec = sts
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("pod spec");
    let c = &pod_spec.containers[0];
    assert_eq!(c.image.as_deref(), Some("postgres:17"));
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert!(
        c.args
            .as_ref()
            .expect("args")
            .contains(&"max_connections=50".to_owned())
    );
    let claim = &sts
        .spec
        .as_ref()
        .and_then(|s| s.volume_claim_templates.clone())
        .expect("claims")[0];
    assert_eq!(
        claim
            .spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .map(|r| r["storage"].0.clone()),
        Some("1Gi".to_owned())
    );

    for name in ["orders-db", "orders-db-hl"] {
        let svc = ns.api::<Service>().get(name).await?;
        assert!(owned_by_sdb(svc.owner_references()), "{name}");
    }
    assert!(owned_by_sdb(
        ns.api::<ConfigMap>()
            .get("orders-db-config")
            .await?
            .owner_references()
    ));
    for name in ["orders-superuser", "orders-app", "orders-relay"] {
        let s = ns.api::<Secret>().get(name).await?;
        assert!(owned_by_sdb(s.owner_references()), "{name}");
    }
    let bootstrap = secret_string(
        &ns.api::<Secret>().get("orders-superuser").await?,
        "bootstrap.sql",
    )?;
    assert!(
        bootstrap.contains("CREATE DATABASE \"orders\" OWNER \"orders\""),
        "{bootstrap}"
    );
    assert!(
        !bootstrap.contains(&secret_string(
            &ns.api::<Secret>().get("orders-app").await?,
            "password"
        )?),
        "plaintext password in bootstrap"
    );

    // TLS: the namespace CA (no owner: it outlives every database), the instance's server
    // certificate issued from it and mounted for Postgres, and every client told to verify.
    let ca = ns.api::<Secret>().get("servicedb-ca").await?;
    assert!(
        ca.owner_references().is_empty(),
        "the CA must outlive the database"
    );
    let ca_pem = secret_string(&ca, "tls.crt")?;
    let tls = ns.api::<Secret>().get("orders-db-tls").await?;
    assert!(owned_by_sdb(tls.owner_references()));
    assert_eq!(secret_string(&tls, "ca.crt")?, ca_pem);
    assert!(secret_string(&tls, "tls.key")?.contains("PRIVATE KEY"));
    for name in ["orders-app", "orders-relay", "orders-superuser"] {
        let s = ns.api::<Secret>().get(name).await?;
        assert_eq!(secret_string(&s, "ca.crt")?, ca_pem, "{name}");
        assert_eq!(secret_string(&s, "sslmode")?, "verify-full", "{name}");
        assert!(
            secret_string(&s, "uri")?.ends_with("?sslmode=verify-full"),
            "{name}"
        );
    }
    let args = c.args.clone().unwrap_or_default();
    for setting in ["ssl=on", "ssl_min_protocol_version=TLSv1.2"] {
        assert!(
            args.contains(&setting.to_owned()),
            "{setting} not in {args:?}"
        );
    }
    let tls_volume = pod_spec
        .volumes
        .as_ref()
        .and_then(|v| v.iter().find(|v| v.name == "tls"))
        .and_then(|v| v.secret.clone())
        .expect("tls volume");
    assert_eq!(tls_volume.secret_name.as_deref(), Some("orders-db-tls"));
    assert_eq!(tls_volume.default_mode, Some(0o640));
    assert_eq!(
        pod_spec.security_context.as_ref().and_then(|s| s.fs_group),
        Some(999)
    );

    // NetworkPolicy: default-deny ingress to the instance, 5432 only from the owner, its relays and CDC.
    let np = ns.api::<NetworkPolicy>().get("orders-db").await?;
    assert!(owned_by_sdb(np.owner_references()));
    let spec = np.spec.expect("np spec");
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_owned()]));
    let rules = spec.ingress.expect("ingress");
    assert_eq!(rules.len(), 1);
    let ports = rules[0].ports.clone().expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(
        ports[0].port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(5432))
    );
    let peers = serde_json::to_string(&rules[0].from)?;
    assert!(
        peers.contains(r#""app.kubernetes.io/name":"orders""#),
        "{peers}"
    );
    assert!(
        peers.contains(r#""servicedb.io/database":"orders""#),
        "{peers}"
    );

    // The StatefulSet controller creates the pod; mark it Ready as a kubelet would.
    let pods = ns.api::<Pod>();
    support::wait_until("the instance pod", support::TIMEOUT, || {
        let pods = pods.clone();
        async move { pods.get_opt("orders-db-0").await.ok().flatten() }
    })
    .await?;
    support::mark_pod_ready(&ns.client, &ns.name, "orders-db-0").await?;
    // A Ready pod is not enough: the operator converges the database over the instance's
    // Service on every reconcile, and this test environment runs no real instance behind the
    // pod, so the database is reported unreachable instead of Ready.
    wait_condition(&api, "orders", "InstanceReady", "True", support::TIMEOUT).await?;
    let degraded =
        wait_condition(&api, "orders", "DatabaseReady", "False", support::TIMEOUT).await?;
    assert_eq!(
        degraded.status.and_then(|s| s.phase),
        Some(servicedb::api::service_database::Phase::Degraded)
    );

    // Deleting the CR garbage-collects every child (the controller manager runs the GC).
    api.delete("orders", &DeleteParams::default()).await?;
    support::wait_until(
        "the StatefulSet, Services, ConfigMap and NetworkPolicy to be collected",
        support::TIMEOUT,
        || {
            let ns = &ns;
            async move {
                let sts = ns.api::<StatefulSet>().get_opt("orders-db").await.ok()?;
                let svc = ns.api::<Service>().get_opt("orders-db").await.ok()?;
                let cm = ns
                    .api::<ConfigMap>()
                    .get_opt("orders-db-config")
                    .await
                    .ok()?;
                let np = ns.api::<NetworkPolicy>().get_opt("orders-db").await.ok()?;
                (sts.is_none() && svc.is_none() && cm.is_none() && np.is_none()).then_some(())
            }
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_broken_servicedatabase_reports_why_and_does_not_hold_up_the_others() -> Result<()> {
    let ns = support::TestNamespace::new("sdb-broken").await?;
    let _op = Operator::start(&ns.name).await?;
    create_admin_secret(&ns, "pg-admin").await?;
    // Points at an admin Secret that does not exist.
    let mut broken = external_sdb(
        "broken",
        &format!("broken-{}", support::random_suffix()),
        "Delete",
    );
    broken["spec"]["instance"]["external"]["adminSecretRef"]["name"] = json!("no-such-secret");
    create(&ns, broken).await?;
    let fine_service = format!("fine-{}", support::random_suffix());
    create(&ns, external_sdb("fine", &fine_service, "Delete")).await?;
    let api = ns.api::<ServiceDatabase>();
    wait_condition(&api, "fine", "Ready", "True", support::TIMEOUT).await?;
    let broken = wait_condition(&api, "broken", "Ready", "False", support::TIMEOUT).await?;
    let status = broken.status.expect("status");
    assert_eq!(
        status.phase,
        Some(servicedb::api::service_database::Phase::Pending)
    );
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready condition");
    assert_eq!(ready.reason, "AdminSecretMissing");
    assert!(
        ready.message.contains("no-such-secret"),
        "{}",
        ready.message
    );
    // Fixing the reference lets it converge.
    api.patch(
        "broken",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"spec": {"instance": {"external": {"adminSecretRef": {"name": "pg-admin"}}}}}),
        ),
    )
    .await?;
    wait_condition(&api, "broken", "Ready", "True", support::TIMEOUT).await?;
    Ok(())
}

/// Owner, ACL and mark of a database, and each role's stored verifier and mark: what a takeover
/// would change.
async fn server_state(db: &str) -> Result<Vec<Option<String>>> {
    let admin = support::pg_connect(&support::env().pg_config("postgres")).await?;
    let mut out: Vec<Option<String>> = Vec::new();
    if let Some(r) = admin
        .query_opt(
            "SELECT pg_get_userbyid(datdba)::text, datacl::text, shobj_description(oid, 'pg_database') \
             FROM pg_database WHERE datname = $1",
            &[&db],
        )
        .await?
    {
        out.extend([r.get(0), r.get(1), r.get(2)]);
    }
    for role in [db.to_owned(), format!("{db}_relay"), format!("{db}_outbox")] {
        let r = admin
            .query_opt(
                "SELECT rolpassword, shobj_description(oid, 'pg_authid') FROM pg_authid WHERE rolname = $1",
                &[&role],
            )
            .await?;
        out.extend(r.map(|r| [r.get(0), r.get(1)]).unwrap_or_default());
    }
    Ok(out)
}

fn condition_message(sdb: &ServiceDatabase, type_: &str) -> (String, String) {
    sdb.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

#[tokio::test]
async fn the_same_service_in_two_namespaces_is_a_name_conflict_and_the_first_stays_intact()
-> Result<()> {
    let first = support::TestNamespace::new("sdb-own-a").await?;
    let second = support::TestNamespace::new("sdb-own-b").await?;
    let _op1 = Operator::start(&first.name).await?;
    let _op2 = Operator::start(&second.name).await?;
    create_admin_secret(&first, "pg-admin").await?;
    create_admin_secret(&second, "pg-admin").await?;
    let service = format!("shared-{}", support::random_suffix());
    let db = service.replace('-', "_");
    create(&first, external_sdb("orders", &service, "Delete")).await?;
    wait_condition(
        &first.api::<ServiceDatabase>(),
        "orders",
        "Ready",
        "True",
        support::TIMEOUT,
    )
    .await?;
    let first_uri = uri_of(&first, "orders-app").await?;
    let before = server_state(&db).await?;

    create(&second, external_sdb("orders", &service, "Delete")).await?;
    let api2 = second.api::<ServiceDatabase>();
    let conflicted = wait_condition(&api2, "orders", "Ready", "False", support::TIMEOUT).await?;
    let (reason, message) = condition_message(&conflicted, "Ready");
    assert_eq!(reason, "NameConflict", "{message}");
    assert!(
        message.contains(&format!("{}/orders", first.name)),
        "the message does not name the holder: {message}"
    );
    assert_eq!(
        server_state(&db).await?,
        before,
        "the first's objects changed"
    );
    connect_uri(&first_uri).await?;

    // Deleting the second (policy Delete) drops nothing of the first's.
    api2.delete("orders", &DeleteParams::default()).await?;
    support::wait_until("the second to be deleted", support::TIMEOUT, || {
        let api = api2.clone();
        async move {
            api.get_opt("orders")
                .await
                .ok()
                .and_then(|o| o.is_none().then_some(()))
        }
    })
    .await?;
    assert_eq!(
        server_state(&db).await?,
        before,
        "Delete of the second touched the first's"
    );
    connect_uri(&first_uri).await?;
    Ok(())
}

#[tokio::test]
async fn a_database_and_role_made_by_hand_are_adopted_only_with_the_opt_in() -> Result<()> {
    let ns = support::TestNamespace::new("sdb-adopt").await?;
    let _op = Operator::start(&ns.name).await?;
    create_admin_secret(&ns, "pg-admin").await?;
    let service = format!("legacy-{}", support::random_suffix());
    let db = service.replace('-', "_");
    let admin = support::pg_connect(&support::env().pg_config("postgres")).await?;
    admin
        .batch_execute(&format!("CREATE ROLE \"{db}\" LOGIN PASSWORD 'dba-pw'"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE \"{db}\" OWNER \"{db}\""))
        .await?;
    let before = server_state(&db).await?;

    let mut obj = external_sdb("legacy", &service, "Delete");
    create(&ns, obj.clone()).await?;
    let api = ns.api::<ServiceDatabase>();
    let conflicted = wait_condition(&api, "legacy", "Ready", "False", support::TIMEOUT).await?;
    let (reason, message) = condition_message(&conflicted, "Ready");
    assert_eq!(reason, "NameConflict", "{message}");
    assert!(message.contains("adopt"), "{message}");
    assert_eq!(
        server_state(&db).await?,
        before,
        "an unmarked object was changed"
    );

    // The opt-in adopts them: the app logs in with the operator's password.
    obj["spec"]["database"] = json!({"adopt": true});
    api.patch(
        "legacy",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"database": {"adopt": true}}})),
    )
    .await?;
    wait_condition(&api, "legacy", "Ready", "True", support::TIMEOUT).await?;
    connect_uri(&uri_of(&ns, "legacy-app").await?).await?;
    let mark: Option<String> = admin
        .query_one(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
            &[&db],
        )
        .await?
        .get(0);
    assert!(
        mark.is_some_and(|m| m.contains(&format!("ns={} name=legacy", ns.name))),
        "not marked"
    );
    api.delete("legacy", &DeleteParams::default()).await?;
    support::wait_until("the database to be dropped", support::TIMEOUT, || async {
        (!database_exists(&db).await.ok()?).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_dropped_app_role_comes_back_with_its_secrets_password_and_removing_cdc_locks_its_role_out()
-> Result<()> {
    let ns = support::TestNamespace::new("sdb-drift").await?;
    let op = Operator::start(&ns.name).await?;
    create_admin_secret(&ns, "pg-admin").await?;
    let service = format!("drift-{}", support::random_suffix());
    let db = service.replace('-', "_");
    let mut obj = external_sdb("drift", &service, "Delete");
    obj["spec"]["cdc"] = json!({
        "tables": ["public.outbox"],
        "kafkaConnect": {"url": "http://127.0.0.1:1"},
        "topicPrefix": "drift",
    });
    create(&ns, obj).await?;
    let api = ns.api::<ServiceDatabase>();
    wait_condition(&api, "drift", "DatabaseReady", "True", support::TIMEOUT).await?;
    let app_uri = uri_of(&ns, "drift-app").await?;
    let cdc_uri = uri_of(&ns, "drift-cdc").await?;
    connect_uri(&cdc_uri).await?;

    // A DBA drops the app role (handing its objects to the admin first, as Postgres requires).
    let admin = support::pg_connect(&support::env().pg_config("postgres")).await?;
    let in_db = support::pg_connect(&support::env().pg_config(&db)).await?;
    in_db
        .batch_execute(&format!(
            "REASSIGN OWNED BY \"{db}\" TO CURRENT_USER; DROP OWNED BY \"{db}\""
        ))
        .await?;
    drop(in_db);
    admin.batch_execute(&format!("DROP ROLE \"{db}\"")).await?;
    assert!(connect_uri(&app_uri).await.is_err());
    // Any change (or the resync) reconciles; the role comes back with the Secret's password.
    api.patch(
        "drift",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"test/poke": "1"}}})),
    )
    .await?;
    support::wait_until("the app role to log in again", support::TIMEOUT, || {
        let uri = app_uri.clone();
        async move { connect_uri(&uri).await.ok().map(|_| ()) }
    })
    .await?;
    assert_eq!(
        uri_of(&ns, "drift-app").await?,
        app_uri,
        "the Secret changed"
    );

    // Removing cdc retires its role: it cannot log in any more.
    api.patch(
        "drift",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"cdc": null}})),
    )
    .await?;
    support::wait_until("the cdc role to be locked out", support::TIMEOUT, || {
        let uri = cdc_uri.clone();
        async move { connect_uri(&uri).await.is_err().then_some(()) }
    })
    .await?;
    drop(op);
    Ok(())
}

/// The notes of `name`'s Events with `reason`.
async fn event_notes(ns: &support::TestNamespace, name: &str, reason: &str) -> Result<Vec<String>> {
    let events = ns.api::<Event>().list(&Default::default()).await?;
    Ok(events
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                && e.reason.as_deref() == Some(reason)
        })
        .map(|e| e.note.unwrap_or_default())
        .collect())
}

/// Wait for an Event of `name` with `reason`; returns the notes.
async fn wait_event(ns: &support::TestNamespace, name: &str, reason: &str) -> Result<Vec<String>> {
    support::wait_until(
        &format!("a {reason} Event on {name}"),
        support::TIMEOUT,
        || async {
            event_notes(ns, name, reason)
                .await
                .ok()
                .filter(|n| !n.is_empty())
        },
    )
    .await
}

fn ready_condition(
    sdb: &ServiceDatabase,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    sdb.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .cloned()
        .expect("Ready condition")
}

fn managed_sdb(name: &str, managed: serde_json::Value) -> serde_json::Value {
    let mut m = json!({"version": 17, "storage": {"size": "1Gi"}});
    if let (Some(m), Some(extra)) = (m.as_object_mut(), managed.as_object()) {
        m.extend(extra.clone());
    }
    json!({
        "apiVersion": "servicedb.io/v1alpha1", "kind": "ServiceDatabase",
        "metadata": {"name": name},
        "spec": {"owner": {"service": name}, "instance": {"managed": m}}
    })
}

#[tokio::test]
async fn an_image_or_preload_library_outside_the_allow_list_is_refused_and_nothing_is_applied()
-> Result<()> {
    let ns = support::TestNamespace::new("sdb-guard-image").await?;
    // Default guard rails: the official postgres image; pg_stat_statements and auto_explain.
    let _op = Operator::start(&ns.name).await?;
    create(
        &ns,
        managed_sdb("evil", json!({"image": "evil.example/postgres:17"})),
    )
    .await?;
    create(
        &ns,
        managed_sdb(
            "preload",
            json!({"parameters": {"shared_preload_libraries": "pg_stat_statements,basebackup_to_shell"}}),
        ),
    )
    .await?;
    create(
        &ns,
        managed_sdb(
            "fine",
            json!({"image": "docker.io/library/postgres:17", "parameters": {"shared_preload_libraries": "pg_stat_statements"}}),
        ),
    )
    .await?;
    let api = ns.api::<ServiceDatabase>();

    let evil = wait_condition(&api, "evil", "Ready", "False", support::TIMEOUT).await?;
    let ready = ready_condition(&evil);
    assert_eq!(ready.reason, "ImageNotAllowed", "{ready:?}");
    assert!(
        ready.message.contains("evil.example/postgres:17")
            && ready.message.contains("--allowed-images"),
        "{}",
        ready.message
    );
    let notes = wait_event(&ns, "evil", "ImageNotAllowed").await?;
    assert!(notes[0].contains("evil.example/postgres:17"), "{notes:?}");

    let preload = wait_condition(&api, "preload", "Ready", "False", support::TIMEOUT).await?;
    let ready = ready_condition(&preload);
    assert_eq!(ready.reason, "ParameterNotAllowed", "{ready:?}");
    assert!(
        ready.message.contains("not allowed: basebackup_to_shell"),
        "{}",
        ready.message
    );
    wait_event(&ns, "preload", "ParameterNotAllowed").await?;

    // The same operator renders an allowed spec: the refusals are not a broken operator.
    let sts: StatefulSet = support::wait_until("the allowed StatefulSet", support::TIMEOUT, || {
        let a = ns.api::<StatefulSet>();
        async move { a.get_opt("fine-db").await.ok().flatten() }
    })
    .await?;
    let image = sts
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.containers.first().and_then(|c| c.image.clone()));
    assert_eq!(image.as_deref(), Some("docker.io/library/postgres:17"));

    // Nothing at all was applied for the refused ones: no pod with that image can exist.
    for name in ["evil", "preload"] {
        assert!(
            ns.api::<StatefulSet>()
                .get_opt(&format!("{name}-db"))
                .await?
                .is_none(),
            "{name}: a StatefulSet was applied"
        );
        assert!(
            ns.api::<Secret>()
                .get_opt(&format!("{name}-superuser"))
                .await?
                .is_none(),
            "{name}: a Secret was applied"
        );
    }
    Ok(())
}

/// A TCP listener on `ip` that counts the connections it accepts (and closes them).
async fn counting_listener(
    ip: &str,
) -> Result<(u16, std::sync::Arc<std::sync::atomic::AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
    let port = listener.local_addr()?.port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(stream);
        }
    });
    Ok((port, accepted))
}

#[tokio::test]
async fn an_external_host_outside_the_allow_list_is_refused_without_a_connection() -> Result<()> {
    let ns = support::TestNamespace::new("sdb-guard-host").await?;
    let _op = Operator::start_with(
        &ns.name,
        &[
            "--allowed-external-hosts",
            "10.0.0.0/8,.db.internal,127.0.0.2",
        ],
    )
    .await?;
    create_admin_secret(&ns, "pg-admin").await?;
    let (port, accepted) = counting_listener("127.0.0.1").await?;
    let service = format!("blocked-{}", support::random_suffix());
    let mut obj = external_sdb("blocked", &service, "Delete");
    obj["spec"]["instance"]["external"]["host"] = json!("127.0.0.1");
    obj["spec"]["instance"]["external"]["port"] = json!(port);
    create(&ns, obj).await?;
    let api = ns.api::<ServiceDatabase>();
    let blocked = wait_condition(&api, "blocked", "Ready", "False", support::TIMEOUT).await?;
    let ready = ready_condition(&blocked);
    assert_eq!(ready.reason, "ExternalHostNotAllowed", "{ready:?}");
    assert!(
        ready.message.contains("127.0.0.1") && ready.message.contains("--allowed-external-hosts"),
        "{}",
        ready.message
    );
    wait_event(&ns, "blocked", "ExternalHostNotAllowed").await?;
    // No Secret carries the address either: nothing was applied.
    assert!(ns.api::<Secret>().get_opt("blocked-app").await?.is_none());

    // Deleting it (deletionPolicy Delete) does not connect either, and does not hang.
    api.delete("blocked", &DeleteParams::default()).await?;
    support::wait_until("the ServiceDatabase to be gone", support::TIMEOUT, || {
        let api = api.clone();
        async move { api.get_opt("blocked").await.ok()?.is_none().then_some(()) }
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the operator connected to a host outside --allowed-external-hosts"
    );

    // Control: the same operator does connect to an allowed host, and such a listener sees it.
    let (allowed_port, allowed_accepted) = counting_listener("127.0.0.2").await?;
    let mut obj = external_sdb(
        "allowed",
        &format!("allowed-{}", support::random_suffix()),
        "Retain",
    );
    obj["spec"]["instance"]["external"]["host"] = json!("127.0.0.2");
    obj["spec"]["instance"]["external"]["port"] = json!(allowed_port);
    create(&ns, obj).await?;
    support::wait_until("a connection to the allowed host", support::TIMEOUT, || {
        let n = allowed_accepted.load(std::sync::atomic::Ordering::SeqCst);
        async move { (n > 0).then_some(()) }
    })
    .await?;
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    Ok(())
}

#[tokio::test]
async fn connection_errors_in_status_are_summarised_without_the_networks_or_servers_words()
-> Result<()> {
    let ns = support::TestNamespace::new("sdb-guard-conn").await?;
    let _op = Operator::start(&ns.name).await?;
    create_admin_secret(&ns, "pg-admin").await?;
    // A closed port, and a port where something that is not Postgres answers with a banner.
    let closed = support::free_port()?;
    let banner = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let banner_port = banner.local_addr()?.port();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = banner.accept().await {
            let _ = s
                .write_all(b"SSH-2.0-OpenSSH_9.6 internal-bastion-7\r\n")
                .await;
        }
    });
    for (name, port) in [("refused", closed), ("banner", banner_port)] {
        let mut obj = external_sdb(
            name,
            &format!("{name}-{}", support::random_suffix()),
            "Retain",
        );
        obj["spec"]["instance"]["external"]["host"] = json!("127.0.0.1");
        obj["spec"]["instance"]["external"]["port"] = json!(port);
        create(&ns, obj).await?;
    }
    let api = ns.api::<ServiceDatabase>();
    let refused =
        wait_condition(&api, "refused", "DatabaseReady", "False", support::TIMEOUT).await?;
    let message = ready_condition(&refused).message;
    assert!(
        message.contains(&format!("127.0.0.1:{closed}")) && message.contains("connection refused"),
        "{message}"
    );
    assert!(
        !message.contains("os error") && !message.contains("Connection refused"),
        "raw OS text in status: {message}"
    );
    let banner = wait_condition(&api, "banner", "DatabaseReady", "False", support::TIMEOUT).await?;
    let message = ready_condition(&banner).message;
    assert!(
        !message.contains("SSH") && !message.contains("bastion"),
        "the server's words in status: {message}"
    );
    assert!(message.contains("network or protocol error"), "{message}");
    // Events say no more than status.
    for name in ["refused", "banner"] {
        let events = ns.api::<Event>().list(&Default::default()).await?;
        for e in events
            .items
            .iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        {
            let note = e.note.clone().unwrap_or_default();
            assert!(
                !note.contains("os error") && !note.contains("SSH"),
                "{name}: raw text in an Event: {note}"
            );
        }
    }
    Ok(())
}

#[tokio::test]
async fn an_external_server_with_a_private_ca_is_verified_and_applications_get_the_ca() -> Result<()>
{
    // A throwaway TLS Postgres (hostssl + scram only) whose certificate a private CA signed.
    let (ca, cert) = support::tls::ca_and_server_cert(&["127.0.0.1"])?;
    let pg = support::tls::TlsServer::start(support::tls::ServerSpec::tls(cert))?;
    let ns = support::TestNamespace::new("sdb-tls").await?;
    let _op = Operator::start(&ns.name).await?;
    for (name, data) in [
        (
            "pg-admin",
            json!({"username": "postgres", "password": support::tls::PASSWORD}),
        ),
        ("pg-ca", json!({"ca.crt": ca.cert_pem})),
    ] {
        let secret: Secret =
            serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data}))?;
        ns.api::<Secret>()
            .create(&PostParams::default(), &secret)
            .await?;
    }
    // No sslMode: a CA is given, so the mode in force is verify-full.
    create(
        &ns,
        json!({
            "apiVersion": "servicedb.io/v1alpha1", "kind": "ServiceDatabase",
            "metadata": {"name": "billing"},
            "spec": {
                "owner": {"service": "billing"},
                "instance": {"external": {
                    "host": "127.0.0.1", "port": pg.port,
                    "adminSecretRef": {"name": "pg-admin"},
                    "caSecretRef": {"name": "pg-ca"},
                }},
                "outbox": {"table": "outbox"},
            }
        }),
    )
    .await?;
    let api = ns.api::<ServiceDatabase>();
    wait_condition(&api, "billing", "Ready", "True", support::TIMEOUT).await?;

    for name in ["billing-app", "billing-relay"] {
        let s = ns.api::<Secret>().get(name).await?;
        assert_eq!(secret_string(&s, "ca.crt")?, ca.cert_pem, "{name}");
        assert_eq!(secret_string(&s, "sslrootcert")?, "ca.crt", "{name}");
        assert_eq!(secret_string(&s, "sslmode")?, "verify-full", "{name}");
        assert!(
            secret_string(&s, "uri")?.ends_with("?sslmode=verify-full"),
            "{name}"
        );
        assert!(
            secret_string(&s, "jdbc-uri")?.ends_with("&sslmode=verify-full"),
            "{name}"
        );
    }
    // The application logs in with what its Secret holds: verify-full against its ca.crt.
    let app = ns.api::<Secret>().get("billing-app").await?;
    let params = servicedb::postgres::ConnectParams {
        ssl_mode: servicedb::postgres::SslMode::VerifyFull,
        ca_pem: Some(secret_string(&app, "ca.crt")?.into_bytes()),
        ..servicedb::postgres::ConnectParams::new(
            secret_string(&app, "host")?,
            secret_string(&app, "port")?.parse()?,
            secret_string(&app, "username")?,
            servicedb::postgres::Password::from_plaintext(secret_string(&app, "password")?),
            secret_string(&app, "database")?,
        )
    };
    let client = servicedb::postgres::connect(&params).await?;
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?
        .get(0);
    ensure!(ssl, "the application's session is not encrypted");

    // A CA that did not sign the server's certificate: the operator refuses the server.
    let other = servicedb::specs::tls::generate_ca("other", jiff::Timestamp::now())?;
    let secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "other-ca"}, "stringData": {"ca.crt": other.cert_pem}}),
    )?;
    ns.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await?;
    create(
        &ns,
        json!({
            "apiVersion": "servicedb.io/v1alpha1", "kind": "ServiceDatabase",
            "metadata": {"name": "ledger"},
            "spec": {
                "owner": {"service": "ledger"},
                "instance": {"external": {
                    "host": "127.0.0.1", "port": pg.port,
                    "adminSecretRef": {"name": "pg-admin"},
                    "caSecretRef": {"name": "other-ca"},
                }},
            }
        }),
    )
    .await?;
    // Ready=False because of the certificate (the connect attempt happened and failed on it).
    let text = support::wait_until(
        "ledger refused for its certificate",
        support::TIMEOUT,
        || {
            let api = api.clone();
            async move {
                let sdb = api.get("ledger").await.ok()?;
                let ready = sdb
                    .status?
                    .conditions
                    .into_iter()
                    .find(|c| c.type_ == "Ready" && c.status == "False")?;
                let text = format!("{} {}", ready.reason, ready.message).to_lowercase();
                (text.contains("certificate") || text.contains("tls")).then_some(text)
            }
        },
    )
    .await?;
    ensure!(
        pg.psql("SELECT count(*) FROM pg_database WHERE datname = 'ledger'")? == "0",
        "a database was created on an unverified server: {text}"
    );
    Ok(())
}

#[tokio::test]
async fn a_child_edited_by_hand_is_restored_and_settled_children_are_not_reapplied() -> Result<()> {
    let ns = support::TestNamespace::new("sdb-handedit").await?;
    let op = Operator::start(&ns.name).await?;
    let obj = json!({
        "apiVersion": "servicedb.io/v1alpha1", "kind": "ServiceDatabase",
        "metadata": {"name": "shop"},
        "spec": {
            "owner": {"service": "shop"},
            "instance": {"managed": {"version": 17, "storage": {"size": "1Gi"}}},
            "outbox": {"table": "outbox"},
        }
    });
    create(&ns, obj).await?;
    let (policies, maps) = (ns.api::<NetworkPolicy>(), ns.api::<ConfigMap>());
    let ingress = |np: &NetworkPolicy| np.spec.as_ref().and_then(|s| s.ingress.clone());
    let hba = |cm: &ConfigMap| cm.data.as_ref().and_then(|d| d.get("pg_hba.conf").cloned());
    let applied_policy = support::wait_until("the NetworkPolicy", support::TIMEOUT, || {
        let policies = policies.clone();
        async move { policies.get_opt("shop-db").await.ok().flatten() }
    })
    .await?;
    let applied_hba = hba(&maps.get("shop-db-config").await?);
    ensure!(
        ingress(&applied_policy).is_some_and(|rules| !rules.is_empty()),
        "no ingress rules to strip"
    );
    ensure!(applied_hba.is_some(), "no pg_hba.conf to edit");

    // Someone strips the policy's rules (the instance is now unreachable for its owner) and
    // opens pg_hba.conf to everyone, with kubectl-style patches under their own field manager.
    let by_hand = PatchParams {
        field_manager: Some("kubectl-edit".to_owned()),
        ..PatchParams::default()
    };
    policies
        .patch(
            "shop-db",
            &by_hand,
            &Patch::Merge(json!({"spec": {"ingress": []}})),
        )
        .await?;
    maps.patch(
        "shop-db-config",
        &by_hand,
        &Patch::Merge(json!({"data": {"pg_hba.conf": "host all all 0.0.0.0/0 trust\n"}})),
    )
    .await?;

    support::wait_until(
        "the operator to restore the NetworkPolicy and the ConfigMap",
        support::TIMEOUT,
        || {
            let (policies, maps) = (policies.clone(), maps.clone());
            let (want_rules, want_hba) = (ingress(&applied_policy), applied_hba.clone());
            async move {
                let np = policies.get("shop-db").await.ok()?;
                let cm = maps.get("shop-db-config").await.ok()?;
                (ingress(&np) == want_rules && hba(&cm) == want_hba).then_some(())
            }
        },
    )
    .await?;
    let repairs = op
        .counter_total("servicedb_operator_drift_repairs_total")
        .await?;
    assert!(
        repairs >= 2.0,
        "the restore was not counted as drift repairs: {repairs}"
    );

    // Settled children are compared, not re-sent: forced resyncs repair nothing more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = op
        .counter_total("servicedb_operator_drift_repairs_total")
        .await?;
    let api = ns.api::<ServiceDatabase>();
    for i in 0..3 {
        api.patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"test/resync": i.to_string()}}})),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        op.counter_total("servicedb_operator_drift_repairs_total")
            .await?,
        settled,
        "unchanged children were re-applied as drift; operator log:\n{}",
        op.log_text()
    );
    Ok(())
}
