//! CDC against the real test environment: a database provisioned the way the operator does it
//! (`postgres::provision` with a cdc plan), a `<name>-cdc` Secret read by Strimzi's
//! KubernetesSecretConfigProvider through a Role bound to Connect's service account, and a
//! Debezium connector built by `cdc::config` and registered by `cdc::connect` in a real Kafka
//! Connect 4.3 with Debezium 3.6, streaming into the real Kafka.
//!
//! The Connect worker: `SERVICEDB_TEST_CONNECT_URL` (plus `SERVICEDB_TEST_CONNECT_CONFIG_TOPIC`)
//! names one to use; otherwise the shared environment's worker when its env file says it has
//! the config providers (`KAFKA_CONNECT_CONFIG_PROVIDERS`); otherwise these tests start a private
//! worker on the shared Kafka with `hack/testenv.sh connect-worker` (same worker properties as
//! the shared one, its own group and storage topics), which dies with the test binary.

mod support;

use support::harness;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::PostParams;
use servicedb::cdc::config::{ConnectorInput, connector_config, slot_name};
use servicedb::cdc::connect::{ConnectClient, ConnectSettings, Health, Outcome, State};
use servicedb::postgres::identifiers::{Ident, QualifiedName, RoleNames};
use servicedb::postgres::plan::{CdcPlan, DatabasePlan, RolePlan};
use servicedb::postgres::provision::provision;
use servicedb::postgres::slots::{drop_slot, slot_lag};
use servicedb::postgres::{ConnectParams, OwnerMark, Password, PersistedPassword, SslMode};
use support::{TIMEOUT, TestNamespace, env, random_suffix, wait_until};

/// Connect is slow to start a task on a busy 2-core machine; never assert on speed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(240);

// ---- the Connect worker -------------------------------------------------------------------------

struct Worker {
    url: String,
    /// Connect's config topic, to prove the password is not in it.
    config_topic: String,
    /// Kept so the private worker lives as long as the test binary.
    _child: Option<Mutex<Child>>,
}

fn worker() -> &'static Worker {
    static W: OnceLock<Worker> = OnceLock::new();
    W.get_or_init(|| start_worker().expect("a Kafka Connect worker with config providers"))
}

fn start_worker() -> Result<Worker> {
    if let Ok(url) = std::env::var("SERVICEDB_TEST_CONNECT_URL") {
        let config_topic = std::env::var("SERVICEDB_TEST_CONNECT_CONFIG_TOPIC")
            .unwrap_or_else(|_| "_connect-configs".to_owned());
        return Ok(Worker {
            url,
            config_topic,
            _child: None,
        });
    }
    let e = env();
    if e.vars
        .get("KAFKA_CONNECT_CONFIG_PROVIDERS")
        .is_some_and(|p| p.split(',').any(|p| p == "secrets"))
    {
        return Ok(Worker {
            url: e.kafka_connect_url.clone(),
            config_topic: "_connect-configs".to_owned(),
            _child: None,
        });
    }
    // The shared worker predates the config providers: run our own with the same properties.
    let dir = std::env::temp_dir().join(format!("servicedb-cdc-worker-{}", random_suffix()));
    std::fs::create_dir_all(&dir)?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("hack/testenv.sh");
    let log = std::fs::File::create(dir.join("worker.log"))?;
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--", "bash"])
        .arg(&script)
        .arg("connect-worker")
        .arg(&dir)
        .env("SERVICEDB_TESTENV_DIR", &e.dir)
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null());
    let child = spawn_bound(cmd)?;
    let deadline = std::time::Instant::now() + CONNECT_TIMEOUT;
    let url = loop {
        if let Ok(url) = std::fs::read_to_string(dir.join("url")) {
            let url = url.trim().to_owned();
            if http_get_ok(&format!("{url}/connector-plugins")) {
                break url;
            }
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "private Connect worker not ready after {CONNECT_TIMEOUT:?}; see {}",
                dir.join("worker.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let props = std::fs::read_to_string(dir.join("connect-distributed.properties"))?;
    let config_topic = props
        .lines()
        .find_map(|l| l.strip_prefix("config.storage.topic="))
        .ok_or_else(|| anyhow!("no config.storage.topic in the worker properties"))?
        .to_owned();
    Ok(Worker {
        url,
        config_topic,
        _child: Some(Mutex::new(child)),
    })
}

/// Spawns from one long-lived thread: PDEATHSIG fires when the spawning *thread* exits, and a
/// test's thread ends with the test, while the worker must serve every test of the binary.
fn spawn_bound(cmd: Command) -> Result<Child> {
    type Req = (Command, mpsc::Sender<std::io::Result<Child>>);
    static S: OnceLock<Mutex<mpsc::Sender<Req>>> = OnceLock::new();
    let tx = S.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Req>();
        std::thread::spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
            loop {
                std::thread::park();
            }
        });
        Mutex::new(tx)
    });
    let (reply, rx) = mpsc::channel();
    tx.lock()
        .map_err(|_| anyhow!("spawner poisoned"))?
        .send((cmd, reply))?;
    Ok(rx.recv()??)
}

/// True when `url` answers 200 with the Debezium connector listed. Runs on a thread of its own:
/// the caller may be inside a test's runtime, which cannot block on another.
fn http_get_ok(url: &str) -> bool {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return false;
        };
        rt.block_on(async {
            matches!(support::http_request("GET", &url, None).await,
                Ok((200, body)) if body.contains("PostgresConnector"))
        })
    })
    .join()
    .unwrap_or(false)
}

// ---- fixture ------------------------------------------------------------------------------------

/// One ServiceDatabase's worth of CDC: database, roles, publication, Secret, RBAC, connector.
struct Fixture {
    ns: TestNamespace,
    name: String,
    database: String,
    roles: RoleNames,
    cdc_password: Password,
    plan: DatabasePlan,
    topic_prefix: String,
    client: ConnectClient,
    input: ConnectorInput,
}

fn admin() -> ConnectParams {
    let e = env();
    let mut p = ConnectParams::new(
        e.pg_host.clone(),
        e.pg_port,
        e.pg_user.clone(),
        Password::from_plaintext(e.pg_password.clone()),
        "postgres",
    );
    p.ssl_mode = SslMode::Disable;
    p.connect_timeout = TIMEOUT;
    p
}

impl Fixture {
    async fn new(prefix: &str) -> Result<Self> {
        let ns = TestNamespace::new(prefix).await?;
        let suffix = random_suffix();
        let service = format!("cdc_{suffix}");
        let database = format!("cdc_{suffix}");
        let roles = RoleNames::for_service(&service)?;
        let cdc_password = Password::generate();
        let owner = OwnerMark::new(ns.name.clone(), "orders", format!("uid-{suffix}"))?;
        let mut plan = DatabasePlan::new(Ident::new(database.as_str())?, owner, &roles);
        plan.app = plan.app.with_password(
            PersistedPassword::assume_persisted(Password::generate()),
            true,
        );
        plan.cdc = Some(CdcPlan {
            role: RolePlan {
                replication: true,
                ..RolePlan::new(roles.cdc.clone())
            }
            .with_password(
                PersistedPassword::assume_persisted(cdc_password.clone()),
                true,
            ),
            tables: vec![QualifiedName::parse("public.orders")?],
        });
        // As in real life the app creates its tables after its database was provisioned: the
        // first run reports them missing, the next one grants and publishes them.
        let first = provision(&admin(), &plan).await?;
        assert_eq!(
            first
                .missing_cdc_tables
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["public.orders"]
        );
        let db = Self::superuser(&database).await?;
        db.batch_execute(&format!(
            "SET ROLE {app};
             CREATE TABLE public.orders (id int PRIMARY KEY, item text NOT NULL, qty int NOT NULL);
             CREATE TABLE public.other (id int PRIMARY KEY, secret_note text);
             INSERT INTO public.orders VALUES (1, 'seed', 1);",
            app = roles.app.quoted()
        ))
        .await?;
        // Passwords are set once; later runs leave them alone, as the controller's do.
        for role in [Some(&mut plan.app), plan.cdc.as_mut().map(|c| &mut c.role)]
            .into_iter()
            .flatten()
        {
            if let Some(p) = role.password.as_mut() {
                p.reset = false;
            }
        }
        let second = provision(&admin(), &plan).await?;
        assert!(second.missing_cdc_tables.is_empty(), "{second:?}");

        let name = "orders".to_owned();
        let secret = format!("{name}-cdc");
        ns.api::<Secret>()
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({
                    "metadata": {"name": secret},
                    "stringData": {"username": roles.cdc.as_str(), "password": cdc_password.expose()}
                }))?,
            )
            .await?;
        grant_connect_access(&ns, &secret).await?;

        let topic_prefix = format!("cdc.{suffix}");
        let e = env();
        let input = ConnectorInput::new(
            ns.name.clone(),
            name.clone(),
            e.pg_host.clone(),
            e.pg_port,
            Ident::new(database.as_str())?,
            roles.cdc.clone(),
            SslMode::Disable,
            vec![QualifiedName::parse("public.orders")?],
            topic_prefix.clone(),
        );
        let client = ConnectClient::new(&ConnectSettings {
            redact: vec![cdc_password.clone()],
            ..ConnectSettings::new(worker().url.clone())
        })?;
        Ok(Fixture {
            ns,
            name,
            database,
            roles,
            cdc_password,
            plan,
            topic_prefix,
            client,
            input,
        })
    }

    async fn superuser(database: &str) -> Result<tokio_postgres::Client> {
        support::pg_connect(&env().pg_config(database)).await
    }

    fn slot(&self) -> String {
        slot_name(&self.ns.name, &self.name)
    }

    async fn wait_for_health(&self, what: &str, want: fn(&Health) -> bool) -> Result<Health> {
        let connector = connector_config(&self.input)?.name;
        wait_until(what, CONNECT_TIMEOUT, || {
            let (client, connector) = (self.client.clone(), connector.clone());
            async move {
                let status = client.status(&connector).await.ok()??;
                let health = status.health();
                want(&health).then_some(health)
            }
        })
        .await
    }

    /// Waits until Debezium has created its slot: from then on every commit is streamed.
    async fn wait_for_slot(&self) -> Result<()> {
        let db = Self::superuser("postgres").await?;
        let slot = self.slot();
        wait_until("the connector's replication slot", CONNECT_TIMEOUT, || {
            let (db, slot) = (&db, slot.clone());
            async move { slot_lag(db, &slot).await.ok().flatten().map(|_| ()) }
        })
        .await
    }

    /// Deletes the connector, then drops its slot (the operator's order).
    async fn cleanup(&self) -> Result<()> {
        let name = connector_config(&self.input)?.name;
        self.client.delete(&name).await?;
        wait_until("the connector gone", CONNECT_TIMEOUT, || {
            let (client, name) = (self.client.clone(), name.clone());
            async move {
                client
                    .status(&name)
                    .await
                    .ok()
                    .and_then(|s| s.is_none().then_some(()))
            }
        })
        .await?;
        drop_slot(&admin(), &self.slot()).await?;
        Ok(())
    }
}

/// The documented RBAC (README, CDC): `get` on the one `<name>-cdc` Secret for Connect's
/// service account, which Strimzi's config provider reads it with.
async fn grant_connect_access(ns: &TestNamespace, secret: &str) -> Result<()> {
    let (sa_ns, sa_name) = env()
        .vars
        .get("KAFKA_CONNECT_SERVICE_ACCOUNT")
        .and_then(|s| s.split_once('/'))
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .unwrap_or(("kafka".to_owned(), "kafka-connect".to_owned()));
    // The documented RBAC (README, CDC): `get` on this one Secret for Connect's account.
    ns.api::<Role>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("kafka-connect-{secret}")},
                "rules": [{"apiGroups": [""], "resources": ["secrets"],
                           "resourceNames": [secret], "verbs": ["get"]}]
            }))?,
        )
        .await?;
    ns.api::<RoleBinding>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("kafka-connect-{secret}")},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                            "name": format!("kafka-connect-{secret}")},
                "subjects": [{"kind": "ServiceAccount", "name": sa_name, "namespace": sa_ns}]
            }))?,
        )
        .await?;

    Ok(())
}

/// Every record of `topic` (all partitions, from the start, up to the current end).
async fn read_whole_topic(topic: &str) -> Result<Vec<Option<Vec<u8>>>> {
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = support::kafka_client_config(&env().kafka_bootstrap_servers)
        .set("group.id", format!("servicedb-test-{}", random_suffix()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(30))?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .ok_or_else(|| anyhow!("topic {topic} not found"))?;
    consumer.subscribe(&[topic])?;
    let mut out = Vec::new();
    let mut at_end = std::collections::HashSet::new();
    tokio::time::timeout(TIMEOUT, async {
        while at_end.len() < partitions {
            match consumer.recv().await {
                Ok(m) => out.push(m.payload().map(<[u8]>::to_vec)),
                Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                    at_end.insert(p);
                }
                Err(e) => return Err(anyhow!(e)),
            }
        }
        Ok(())
    })
    .await
    .context("reading the whole topic timed out")??;
    Ok(out)
}

fn topics_with_prefix(prefix: &str) -> Result<Vec<String>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer =
        support::kafka_client_config(&env().kafka_bootstrap_servers).create()?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(30))?;
    Ok(metadata
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .filter(|t| t.starts_with(prefix))
        .collect())
}

/// Debezium creates a table's topic with its first event (the snapshot's); subscribing before
/// that fails with an unknown topic.
async fn wait_for_topic(topic: &str) -> Result<()> {
    wait_until(&format!("topic {topic}"), CONNECT_TIMEOUT, || async move {
        topics_with_prefix(topic)
            .ok()
            .and_then(|t| t.iter().any(|t| t == topic).then_some(()))
    })
    .await
}

fn op_and_id(payload: &[u8]) -> Result<(String, i64, serde_json::Value)> {
    let v: serde_json::Value = serde_json::from_slice(payload)?;
    let p = &v["payload"];
    let op = p["op"]
        .as_str()
        .ok_or_else(|| anyhow!("no op in {v}"))?
        .to_owned();
    let row = if op == "d" { &p["before"] } else { &p["after"] };
    let id = row["id"].as_i64().ok_or_else(|| anyhow!("no id in {v}"))?;
    Ok((op, id, row.clone()))
}

// ---- tests --------------------------------------------------------------------------------------

#[tokio::test]
async fn captured_changes_reach_kafka_and_the_password_stays_behind_the_strimzi_provider()
-> Result<()> {
    let f = Fixture::new("cdc-stream").await?;
    let desired = connector_config(&f.input)?;
    assert_eq!(desired.name, format!("servicedb.{}.orders", f.ns.name));
    assert_eq!(
        desired.config["database.password"],
        format!("${{secrets:{}/orders-cdc:password}}", f.ns.name)
    );

    assert_eq!(f.client.converge(&desired).await?, Outcome::Created);
    f.wait_for_slot().await?;
    f.wait_for_health("connector RUNNING", |h| *h == Health::Running)
        .await?;

    // A second converge (a no-op resync) reads and writes nothing.
    let before = f.client.request_counts();
    assert_eq!(f.client.converge(&desired).await?, Outcome::Unchanged);
    let after = f.client.request_counts();
    assert_eq!(after.put, before.put, "a no-op converge must not PUT");
    assert_eq!(after.get, before.get + 1, "a no-op converge is one GET");

    // The app writes: a row in a table nobody captures first, then the captured changes.
    let db = Fixture::superuser(&f.database).await?;
    db.batch_execute(&format!(
        "SET ROLE {app};
         INSERT INTO public.other VALUES (1, 'never-on-kafka');
         INSERT INTO public.orders VALUES (2, 'book', 3);
         UPDATE public.orders SET qty = 4 WHERE id = 2;
         DELETE FROM public.orders WHERE id = 1;",
        app = f.roles.app.quoted()
    ))
    .await?;

    // Snapshot read of the seed row, then insert, update, delete and the delete's tombstone.
    let topic = format!("{}.public.orders", f.topic_prefix);
    wait_for_topic(&topic).await?;
    let records = support::kafka_consume(&topic, 5, CONNECT_TIMEOUT).await?;
    let mut events = Vec::new();
    for r in &records[..4] {
        let payload = r
            .payload
            .as_deref()
            .ok_or_else(|| anyhow!("null payload"))?;
        events.push(op_and_id(payload)?);
    }
    let ops: Vec<(&str, i64)> = events.iter().map(|(o, i, _)| (o.as_str(), *i)).collect();
    assert_eq!(ops, [("r", 1), ("c", 2), ("u", 2), ("d", 1)]);
    assert_eq!(events[1].2["item"], "book");
    assert_eq!(events[1].2["qty"], 3);
    assert_eq!(events[2].2["qty"], 4);
    assert!(records[4].payload.is_none(), "the delete's tombstone");

    // The uncaptured table never reached Kafka (its insert was committed before the captured
    // changes we already received, so it would have been streamed by now).
    let topics = topics_with_prefix(&format!("{}.", f.topic_prefix))?;
    assert_eq!(
        topics.as_slice(),
        std::slice::from_ref(&topic),
        "only the captured table has a topic"
    );
    for r in read_whole_topic(&topic).await?.into_iter().flatten() {
        assert!(!String::from_utf8_lossy(&r).contains("never-on-kafka"));
    }

    // The password is neither in the REST answer nor in Connect's config topic.
    let secret = f.cdc_password.expose();
    let held = f
        .client
        .get_config(&desired.name)
        .await?
        .ok_or_else(|| anyhow!("connector config missing"))?;
    assert!(held.values().all(|v| !v.contains(secret)));
    assert_eq!(
        held["database.password"],
        desired.config["database.password"]
    );
    let config_records = read_whole_topic(&worker().config_topic).await?;
    let ours: Vec<String> = config_records
        .into_iter()
        .flatten()
        .map(|r| String::from_utf8_lossy(&r).into_owned())
        .filter(|r| r.contains(&f.topic_prefix))
        .collect();
    assert!(!ours.is_empty(), "our connector's config is in the topic");
    for r in &ours {
        assert!(
            !r.contains(secret),
            "the password is in Connect's config topic"
        );
    }

    // The slot's retained WAL is readable.
    let pg = Fixture::superuser("postgres").await?;
    let lag = slot_lag(&pg, &f.slot())
        .await?
        .ok_or_else(|| anyhow!("slot missing"))?;
    let retained = lag
        .retained_bytes
        .ok_or_else(|| anyhow!("no confirmed LSN yet"))?;
    assert!(retained >= 0, "{lag:?}");
    assert!(!lag.at_risk(), "{lag:?}");

    // Deleting removes it; the slot is the operator's to drop afterwards.
    f.cleanup().await?;
    assert!(f.client.get_config(&desired.name).await?.is_none());
    assert!(slot_lag(&pg, &f.slot()).await?.is_none(), "slot dropped");
    assert!(
        !f.client.delete(&desired.name).await?,
        "deleting twice finds nothing"
    );
    Ok(())
}

#[tokio::test]
async fn a_failed_task_reports_its_trace_and_runs_again_after_the_fix_and_a_restart() -> Result<()>
{
    let f = Fixture::new("cdc-fail").await?;
    let desired = connector_config(&f.input)?;
    f.client.converge(&desired).await?;
    f.wait_for_slot().await?;
    f.wait_for_health("connector RUNNING", |h| *h == Health::Running)
        .await?;

    // Break it: the cdc role loses REPLICATION and its walsender is cut off, so Debezium's
    // reconnect is refused.
    let pg = Fixture::superuser("postgres").await?;
    pg.batch_execute(&format!(
        "ALTER ROLE {} NOREPLICATION",
        f.roles.cdc.quoted()
    ))
    .await?;
    // The walsender must be streaming, or there is nothing to cut off: Debezium keeps the
    // connection that created the slot, and it only streams once the snapshot is done.
    let slot = f.slot();
    let pid: i32 = wait_until(
        "the connector streaming from its slot",
        CONNECT_TIMEOUT,
        || {
            let (pg, slot) = (&pg, slot.clone());
            async move {
                pg.query_opt(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .ok()
                .flatten()
                .and_then(|r| r.get::<_, Option<i32>>(0))
            }
        },
    )
    .await?;
    pg.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await?;
    let failed = f
        .wait_for_health("a FAILED task", |h| matches!(h, Health::Failed { .. }))
        .await?;
    let Health::Failed { reason } = &failed else {
        unreachable!()
    };
    assert!(!reason.contains(f.cdc_password.expose()));
    assert!(!reason.contains('\n'), "{reason}");
    let status = f
        .client
        .status(&desired.name)
        .await?
        .ok_or_else(|| anyhow!("status missing"))?;
    let task = status
        .failed_tasks()
        .next()
        .or((status.connector.state == State::Failed).then_some(&status.connector))
        .ok_or_else(|| anyhow!("nothing failed: {status:?}"))?;
    let trace = task.trace.as_ref().ok_or_else(|| anyhow!("no trace"))?;
    assert!(!trace.first_line.is_empty());
    eprintln!("failed as expected: {reason}");

    // Fix it the way the operator does (provisioning converges the role's attributes again),
    // then restart only what failed.
    provision(&admin(), &f.plan).await?;
    assert!(f.client.restart_failed(&desired.name).await?);
    f.wait_for_health("connector RUNNING again", |h| *h == Health::Running)
        .await?;

    // It streams again.
    let db = Fixture::superuser(&f.database).await?;
    db.batch_execute(&format!(
        "SET ROLE {}; INSERT INTO public.orders VALUES (7, 'after-restart', 1);",
        f.roles.app.quoted()
    ))
    .await?;
    let topic = format!("{}.public.orders", f.topic_prefix);
    wait_for_topic(&topic).await?;
    let records = support::kafka_consume(&topic, 2, CONNECT_TIMEOUT).await?;
    let last = op_and_id(
        records[1]
            .payload
            .as_deref()
            .ok_or_else(|| anyhow!("null payload"))?,
    )?;
    assert_eq!((last.0.as_str(), last.1), ("c", 7));

    f.cleanup().await?;
    Ok(())
}

/// The whole lifecycle through the operator: `spec.cdc` on an external ServiceDatabase whose
/// captured table the app creates later → `CdcReady=False TablesMissing` → connector RUNNING →
/// change events on Kafka → no-op resyncs → `cdc` removed: connector, slot and publication gone.
#[tokio::test]
async fn the_operator_runs_the_connector_of_a_service_database_and_removes_it_with_cdc()
-> Result<()> {
    use harness::{Operator, connect_uri, create_admin_secret, external_sdb, secret_string};
    use kube::api::{Patch, PatchParams};
    use servicedb::api::ServiceDatabase;

    let ns = TestNamespace::new("cdc-op").await?;
    let op = Operator::start(&ns.name).await?;
    create_admin_secret(&ns, "pg-admin").await?;
    let suffix = random_suffix();
    let service = format!("cdcop-{suffix}");
    let database = service.replace('-', "_");
    let prefix = format!("cdcop.{suffix}");
    let mut obj = external_sdb("shop", &service, "Delete");
    obj["spec"]["cdc"] = serde_json::json!({
        "tables": ["public.orders"],
        "kafkaConnect": {"url": worker().url},
        "topicPrefix": prefix,
    });
    let api = ns.api::<ServiceDatabase>();
    api.create(&PostParams::default(), &serde_json::from_value(obj)?)
        .await?;
    grant_connect_access(&ns, "shop-cdc").await?;
    harness::wait_condition(&api, "shop", "DatabaseReady", "True", TIMEOUT).await?;
    let waiting = harness::wait_condition(&api, "shop", "CdcReady", "False", TIMEOUT).await?;
    let cdc_ready = |s: &ServiceDatabase| {
        s.status.as_ref().and_then(|st| {
            st.conditions
                .iter()
                .find(|c| c.type_ == "CdcReady")
                .cloned()
        })
    };
    let c = cdc_ready(&waiting).ok_or_else(|| anyhow!("no CdcReady"))?;
    assert_eq!(c.reason, "TablesMissing", "{c:?}");
    assert!(c.message.contains("public.orders"), "{c:?}");

    // The app creates its tables after its database was provisioned.
    let secrets = ns.api::<Secret>();
    let app_uri = secret_string(&secrets.get("shop-app").await?, "uri")?;
    let app = connect_uri(&app_uri).await?;
    app.batch_execute(
        "CREATE TABLE public.orders (id int PRIMARY KEY, item text NOT NULL, qty int NOT NULL);
         CREATE TABLE public.other (id int PRIMARY KEY, note text);
         INSERT INTO public.orders VALUES (1, 'seed', 1);",
    )
    .await?;
    let running = wait_until("CdcReady=True", CONNECT_TIMEOUT, || {
        let api = api.clone();
        async move {
            let s = api.get("shop").await.ok()?;
            (cdc_ready(&s)?.status == "True").then_some(s)
        }
    })
    .await?;
    let cdc_status = running
        .status
        .as_ref()
        .and_then(|s| s.cdc.clone())
        .ok_or_else(|| anyhow!("no status.cdc"))?;
    let connector = format!("servicedb.{}.shop", ns.name);
    assert_eq!(cdc_status.connector, connector);
    assert_eq!(cdc_status.slot, slot_name(&ns.name, "shop"));
    assert_eq!(cdc_status.state.as_deref(), Some("RUNNING"));
    // The database's readiness is its own.
    assert!(running.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    }));

    app.batch_execute(
        "INSERT INTO public.other VALUES (1, 'never-on-kafka');
         INSERT INTO public.orders VALUES (2, 'book', 3);
         UPDATE public.orders SET qty = 4 WHERE id = 2;
         DELETE FROM public.orders WHERE id = 1;",
    )
    .await?;
    let topic = format!("{prefix}.public.orders");
    wait_for_topic(&topic).await?;
    let records = support::kafka_consume(&topic, 5, CONNECT_TIMEOUT).await?;
    let mut ops = Vec::new();
    for r in &records[..4] {
        let payload = r
            .payload
            .as_deref()
            .ok_or_else(|| anyhow!("null payload"))?;
        let (op, id, _) = op_and_id(payload)?;
        ops.push((op, id));
    }
    let ops: Vec<(&str, i64)> = ops.iter().map(|(o, i)| (o.as_str(), *i)).collect();
    assert_eq!(ops, [("r", 1), ("c", 2), ("u", 2), ("d", 1)]);
    assert!(records[4].payload.is_none(), "the delete's tombstone");
    assert_eq!(
        topics_with_prefix(&format!("{prefix}."))?.as_slice(),
        std::slice::from_ref(&topic),
        "only the captured table has a topic"
    );

    // The password is in no connector config, config topic, operator log or Event.
    let password = secret_string(&secrets.get("shop-cdc").await?, "password")?;
    let client = ConnectClient::new(&ConnectSettings::new(worker().url.clone()))?;
    let held = client
        .get_config(&connector)
        .await?
        .ok_or_else(|| anyhow!("connector config missing"))?;
    assert!(held.values().all(|v| !v.contains(&password)));
    assert_eq!(
        held["database.password"],
        format!("${{secrets:{}/shop-cdc:password}}", ns.name)
    );
    for r in read_whole_topic(&worker().config_topic)
        .await?
        .into_iter()
        .flatten()
    {
        assert!(!String::from_utf8_lossy(&r).contains(&password));
    }
    assert!(
        !op.log_text().contains(&password),
        "the password is in the log"
    );
    let events = ns
        .api::<k8s_openapi::api::events::v1::Event>()
        .list(&Default::default())
        .await?;
    assert!(
        events
            .items
            .iter()
            .all(|e| !e.note.clone().unwrap_or_default().contains(&password))
    );

    // Ten forced resyncs: no PUT to Connect, no write to the apiserver.
    let puts = r#"servicedb_operator_connect_requests_total{method="PUT"}"#;
    let writes = "servicedb_operator_api_writes_total";
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (puts_before, writes_before) = (
        op.counter_total(puts).await?,
        op.counter_total(writes).await?,
    );
    assert_eq!(puts_before, 1.0, "one PUT registered the connector");
    for i in 0..10 {
        api.patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"metadata": {"annotations": {"test/resync": i.to_string()}}}),
            ),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        op.counter_total(puts).await?,
        puts_before,
        "a no-op resync PUT to Connect"
    );
    assert_eq!(
        op.counter_total(writes).await?,
        writes_before,
        "a no-op resync wrote to the apiserver"
    );

    // Removing cdc: the connector goes, then its slot; provisioning drops the publication.
    api.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"cdc": null}})),
    )
    .await?;
    let pg = Fixture::superuser("postgres").await?;
    let slot = slot_name(&ns.name, "shop");
    wait_until(
        "connector, slot and publication gone",
        CONNECT_TIMEOUT,
        || {
            let (client, connector, pg, slot, database) = (
                client.clone(),
                connector.clone(),
                &pg,
                slot.clone(),
                database.clone(),
            );
            async move {
                let connector_gone = client.status(&connector).await.ok()?.is_none();
                let slot_gone = slot_lag(pg, &slot).await.ok()?.is_none();
                let db = Fixture::superuser(&database).await.ok()?;
                let publications = db
                    .query_one(
                        "SELECT count(*) FROM pg_publication WHERE pubname LIKE '%cdc%'",
                        &[],
                    )
                    .await
                    .ok()?
                    .get::<_, i64>(0);
                (connector_gone && slot_gone && publications == 0).then_some(())
            }
        },
    )
    .await?;
    // Status forgets the connector in the same reconcile (its write may land a moment later).
    wait_until("status.cdc cleared", TIMEOUT, || {
        let api = api.clone();
        async move {
            let s = api.get("shop").await.ok()?;
            s.status
                .as_ref()
                .is_some_and(|s| s.cdc.is_none())
                .then_some(())
        }
    })
    .await?;

    // CDC again, then the ServiceDatabase deleted: the connector goes first, then its slot.
    api.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"cdc": {
            "tables": ["public.orders"],
            "kafkaConnect": {"url": worker().url},
            "topicPrefix": prefix,
        }}})),
    )
    .await?;
    wait_until("CdcReady=True again", CONNECT_TIMEOUT, || {
        let api = api.clone();
        async move {
            let s = api.get("shop").await.ok()?;
            (cdc_ready(&s)?.status == "True").then_some(())
        }
    })
    .await?;
    wait_until("the new slot", CONNECT_TIMEOUT, || {
        let (pg, slot) = (&pg, slot.clone());
        async move { slot_lag(pg, &slot).await.ok()?.map(|_| ()) }
    })
    .await?;
    api.delete("shop", &Default::default()).await?;
    wait_until(
        "ServiceDatabase, connector and slot gone",
        CONNECT_TIMEOUT,
        || {
            let (api, client, connector, pg, slot) = (
                api.clone(),
                client.clone(),
                connector.clone(),
                &pg,
                slot.clone(),
            );
            async move {
                let sdb_gone = api.get_opt("shop").await.ok()?.is_none();
                let connector_gone = client.status(&connector).await.ok()?.is_none();
                let slot_gone = slot_lag(pg, &slot).await.ok()?.is_none();
                (sdb_gone && connector_gone && slot_gone).then_some(())
            }
        },
    )
    .await?;
    Ok(())
}
