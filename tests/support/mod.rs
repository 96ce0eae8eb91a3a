//! The one test harness shared by every integration suite (and the relay benchmark): the real
//! test environment on loopback (`hack/testenv.sh`: etcd + kube-apiserver +
//! kube-controller-manager, Postgres 15, Kafka, Kafka Connect with Debezium, NATS JetStream),
//! and the helpers every suite needs exactly once.
//!
//! Use it from an integration test with `mod support;`. In this module:
//!
//! - [`env()`] attaches to the shared environment through `target/testenv/env`, starting it with
//!   `hack/testenv.sh up` first (idempotent, quick when it is already up). One environment serves
//!   every test; tests isolate themselves by namespace and database.
//! - [`TestNamespace::new`] creates a fresh namespace (random suffix) and deletes it on drop.
//! - [`fresh_database`] creates a fresh Postgres database.
//! - [`kube_client`] / [`impersonating_client`] build `kube::Client`s from the env's admin kubeconfig.
//! - [`mark_pod_ready`] / [`mark_pods_ready`] set pod status through `pods/status` (there is no kubelet).
//! - [`wait_until`] polls with a timeout. Every wait in here has a timeout: tests never hang forever.
//! - [`free_port`], [`http_request`] / [`http_get`], [`die_with_parent`]: ports, loopback HTTP
//!   (Kafka Connect's REST API, `/readyz`, `/metrics`) and child processes bound to the test.
//! - [`kafka_client_config`], [`kafka_create_topic`], [`kafka_consume`], [`nats_collect`] and
//!   [`jetstream_read`] read what a test produced.
//!
//! Submodules, for the suites that need them:
//!
//! - [`harness`]: CRDs installed once, a namespace-scoped operator process per test, condition
//!   waits, a stoppable TCP proxy, the development relay runner.
//! - [`relay`]: Postgres, Kafka and NATS processes private to one test binary (so tests may stop
//!   them), the `servicedb relay` process, and delivery checks.
//! - [`tls`]: throwaway TLS Postgres servers and a TLS-terminating man in the middle.
#![allow(dead_code)]

pub mod harness;
pub mod relay;
pub mod tls;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// Default limit for waits on the environment (a busy 2-core machine is slow; never assert on speed).
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// The shared test environment, as described by `target/testenv/env`.
#[derive(Debug, Clone)]
pub struct TestEnv {
    /// Every `KEY='value'` of the env file (PATH excluded).
    pub vars: HashMap<String, String>,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub pg_host: String,
    pub pg_port: u16,
    pub pg_user: String,
    pub pg_password: String,
    pub kafka_bootstrap_servers: String,
    pub kafka_connect_url: String,
    pub nats_url: String,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
}

impl TestEnv {
    pub fn var(&self, key: &str) -> &str {
        self.vars
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{key} missing from the env file"))
    }

    /// A `std::process::Command` for a binary of the env (`kubectl`, `helm`, ...) with the env's
    /// variables (KUBECONFIG, PG*, ...) set.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        let mut cmd = std::process::Command::new(program);
        cmd.envs(&self.vars);
        cmd
    }

    /// A tokio-postgres config for `database` as the superuser.
    pub fn pg_config(&self, database: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.pg_host)
            .port(self.pg_port)
            .user(&self.pg_user)
            .password(&self.pg_password)
            .dbname(database)
            .connect_timeout(Duration::from_secs(10));
        c
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The test environment's run dir: `SERVICEDB_TESTENV_DIR`, default `target/testenv`.
pub fn testenv_dir() -> PathBuf {
    std::env::var_os("SERVICEDB_TESTENV_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/testenv"))
}

/// The environment's variables if it is up, without starting it (for tests that use a shared
/// service when there is one and start their own otherwise).
pub fn testenv_vars_if_up() -> Option<HashMap<String, String>> {
    let text = std::fs::read_to_string(testenv_dir().join("env")).ok()?;
    Some(parse_env_file(&text))
}

/// Parses the sourceable env file: lines `export KEY='value'` (values never contain quotes).
pub fn parse_env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| *k != "PATH")
        .map(|(k, v)| {
            (
                k.to_string(),
                v.trim_matches(|c| c == '\'' || c == '"').to_string(),
            )
        })
        .collect()
}

/// The shared environment: attaches through the env file, running `hack/testenv.sh up` first
/// (it does nothing when the environment is already up). Panics with the script's output if it
/// cannot be started. `SERVICEDB_TESTENV_DIR` overrides the run dir (default `target/testenv`).
pub fn env() -> &'static TestEnv {
    static ENV: OnceLock<TestEnv> = OnceLock::new();
    ENV.get_or_init(|| {
        let root = repo_root();
        let dir = testenv_dir();
        let out = std::process::Command::new("bash")
            .arg(root.join("hack/testenv.sh"))
            .arg("up")
            .env("SERVICEDB_TESTENV_DIR", &dir)
            .output()
            .expect("run hack/testenv.sh up");
        if !out.status.success() {
            panic!(
                "hack/testenv.sh up failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        load_env(&dir).expect("read the test environment's env file")
    })
}

fn load_env(dir: &Path) -> Result<TestEnv> {
    let file = dir.join("env");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?;
    let vars = parse_env_file(&text);
    let get = |k: &str| {
        vars.get(k)
            .cloned()
            .ok_or_else(|| anyhow!("{k} missing in {}", file.display()))
    };
    Ok(TestEnv {
        dir: dir.to_path_buf(),
        kubeconfig: get("KUBECONFIG")?.into(),
        pg_host: get("PGHOST")?,
        pg_port: get("PGPORT")?.parse()?,
        pg_user: get("PGUSER")?,
        pg_password: get("PGPASSWORD")?,
        kafka_bootstrap_servers: get("KAFKA_BOOTSTRAP_SERVERS")?,
        kafka_connect_url: get("KAFKA_CONNECT_URL")?,
        nats_url: get("NATS_URL")?,
        kubectl: get("KUBECTL")?.into(),
        helm: get("HELM")?.into(),
        vars,
    })
}

/// A short random lowercase suffix, valid in Kubernetes names and SQL identifiers.
pub fn random_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..6)
        .map(|_| (b'a' + rng.random_range(0..26u8)) as char)
        .collect()
}

/// What a [`wait_until`] probe may answer: `bool` (done or not) or `Option<T>` (done with a
/// value). One wait serves both styles.
pub trait Probe {
    /// What the wait returns once the probe succeeds.
    type Output;
    /// `Some` when the condition holds.
    fn ready(self) -> Option<Self::Output>;
}

impl Probe for bool {
    type Output = ();
    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Probe for Option<T> {
    type Output = T;
    fn ready(self) -> Option<T> {
        self
    }
}

/// Polls `f` every 200 ms until it answers `true` or `Some`, failing after `timeout`.
pub async fn wait_until<P, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<P::Output>
where
    P: Probe,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = P>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await.ready() {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---- Ports, HTTP and child processes ------------------------------------------------------------

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `GET http://127.0.0.1:<port><path>`; returns (status, body).
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    http_request("GET", &format!("http://127.0.0.1:{port}{path}"), None).await
}

/// Make a child process die when the test binary dies, however it dies (SIGKILL included), so
/// no operator or relay outlives its test.
pub fn die_with_parent(command: &mut tokio::process::Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the parent;
    // it is the only call made between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

// ---- Kubernetes ------------------------------------------------------------------------------

async fn kube_config() -> Result<kube::Config> {
    // kube uses rustls; the process needs one crypto provider (ring, as in Cargo.toml).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = Kubeconfig::read_from(&env().kubeconfig)?;
    Ok(kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?)
}

/// An admin (`system:masters`) client. Create one per test: a client belongs to its tokio runtime.
pub async fn kube_client() -> Result<kube::Client> {
    Ok(kube::Client::try_from(kube_config().await?)?)
}

/// A client that impersonates `user` (e.g. `system:serviceaccount:<ns>:<name>`), so a test gets
/// exactly that identity's RBAC. Service-account groups are added for service-account users.
pub async fn impersonating_client(user: &str) -> Result<kube::Client> {
    let mut cfg = kube_config().await?;
    cfg.auth_info.impersonate = Some(user.to_string());
    if let Some(rest) = user.strip_prefix("system:serviceaccount:") {
        let ns = rest.split(':').next().unwrap_or_default();
        cfg.auth_info.impersonate_groups = Some(vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{ns}"),
            "system:authenticated".into(),
        ]);
    }
    Ok(kube::Client::try_from(cfg)?)
}

/// A fresh namespace `<prefix>-<random>`, labelled `servicedb.io/test=true`, ready for pods (its
/// `default` ServiceAccount exists). Deleted (without waiting) on drop.
pub struct TestNamespace {
    pub name: String,
    pub client: kube::Client,
}

impl TestNamespace {
    pub async fn new(prefix: &str) -> Result<Self> {
        let client = kube_client().await?;
        let name = format!("{}-{}", prefix.to_lowercase(), random_suffix());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"servicedb.io/test": "true"}}
        }))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &name);
        wait_until("the namespace's default ServiceAccount", TIMEOUT, || {
            let sas = sas.clone();
            async move { sas.get_opt("default").await.ok().flatten() }
        })
        .await?;
        Ok(Self { name, client })
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::env::var_os("SERVICEDB_TEST_KEEP_NAMESPACES").is_some() {
            return;
        }
        // Best effort, on a thread of its own: Drop cannot await, and the test's runtime may be
        // shutting down. Bounded by a timeout.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    let client = kube_client().await?;
                    Api::<Namespace>::all(client)
                        .delete(&name, &DeleteParams::background())
                        .await?;
                    anyhow::Ok(())
                })
                .await;
            });
        })
        .join();
    }
}

/// Marks a pod Running and Ready (and its containers ready) through the `pods/status`
/// subresource, as a kubelet would. There is no kubelet in the test environment.
pub async fn mark_pod_ready(client: &kube::Client, namespace: &str, name: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = pods.get(name).await?;
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let containers: Vec<_> = pod
        .spec
        .as_ref()
        .map(|s| s.containers.iter().collect())
        .unwrap_or_default();
    let statuses: Vec<_> = containers
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
                "ready": true, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": now}}
            })
        })
        .collect();
    let cond =
        |t: &str| serde_json::json!({"type": t, "status": "True", "lastTransitionTime": now});
    let patch = serde_json::json!({
        "status": {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": now,
            "conditions": [cond("PodScheduled"), cond("Initialized"), cond("ContainersReady"), cond("Ready")],
            "containerStatuses": statuses,
        }
    });
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Waits until `count` pods match `label_selector` in `namespace`, marks each Ready, and returns
/// their names.
pub async fn mark_pods_ready(
    client: &kube::Client,
    namespace: &str,
    label_selector: &str,
    count: usize,
) -> Result<Vec<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels(label_selector);
    let names = wait_until(
        &format!("{count} pods matching {label_selector}"),
        TIMEOUT,
        || {
            let (pods, lp) = (pods.clone(), lp.clone());
            async move {
                let list = pods.list(&lp).await.ok()?;
                let names: Vec<String> = list
                    .items
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .filter_map(|p| p.metadata.name.clone())
                    .collect();
                (names.len() >= count).then_some(names)
            }
        },
    )
    .await?;
    for n in &names {
        mark_pod_ready(client, namespace, n).await?;
    }
    Ok(names)
}

// ---- Postgres ----------------------------------------------------------------------------------

/// A fresh database `<prefix>_<random>` on the shared Postgres.
pub struct TestDatabase {
    pub name: String,
    pub config: tokio_postgres::Config,
}

impl TestDatabase {
    /// Connects as the superuser; the connection task runs on the current runtime.
    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        pg_connect(&self.config).await
    }
}

pub async fn pg_connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio::time::timeout(TIMEOUT, config.connect(tokio_postgres::NoTls))
        .await
        .context("timed out connecting to Postgres")??;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

pub async fn fresh_database(prefix: &str) -> Result<TestDatabase> {
    let e = env();
    let name = format!(
        "{}_{}",
        prefix.to_lowercase().replace('-', "_"),
        random_suffix()
    );
    let admin = pg_connect(&e.pg_config("postgres")).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await?;
    Ok(TestDatabase {
        config: e.pg_config(&name),
        name,
    })
}

// ---- Kafka -------------------------------------------------------------------------------------

/// One consumed Kafka record.
#[derive(Debug, Clone)]
pub struct KafkaRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// A Kafka client config for `bootstrap` (the shared environment's:
/// `&env().kafka_bootstrap_servers`).
pub fn kafka_client_config(bootstrap: &str) -> rdkafka::ClientConfig {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    c
}

/// Creates a topic (replication factor 1) on `bootstrap`; one that already exists is fine.
pub async fn kafka_create_topic(bootstrap: &str, topic: &str, partitions: i32) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        kafka_client_config(bootstrap).create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let res = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &opts,
        )
        .await?;
    for r in res {
        if let Err((t, e)) = r
            && e != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists
        {
            bail!("create topic {t}: {e}");
        }
    }
    Ok(())
}

/// Consumes exactly `n` records from `topic` of the shared environment's Kafka from the beginning (a fresh consumer group), or
/// fails after `timeout`.
pub async fn kafka_consume(topic: &str, n: usize, timeout: Duration) -> Result<Vec<KafkaRecord>> {
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;
    let consumer: StreamConsumer = kafka_client_config(&env().kafka_bootstrap_servers)
        .set("group.id", format!("servicedb-test-{}", random_suffix()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut out = Vec::with_capacity(n);
    tokio::time::timeout(timeout, async {
        while out.len() < n {
            let m = consumer.recv().await?;
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default();
            out.push(KafkaRecord {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
        anyhow::Ok(())
    })
    .await
    .map_err(|_| {
        anyhow!(
            "timed out after {timeout:?}: got {} of {n} records from {topic}",
            out.len()
        )
    })??;
    Ok(out)
}

// ---- NATS --------------------------------------------------------------------------------------

pub async fn nats_client() -> Result<async_nats::Client> {
    let c = tokio::time::timeout(TIMEOUT, async_nats::connect(&env().nats_url))
        .await
        .context("timed out connecting to NATS")??;
    Ok(c)
}

/// Collects `n` messages from a core NATS subscription (`client.subscribe(subject)`; subscribe
/// before the publisher starts), or fails after `timeout`.
pub async fn nats_collect(
    sub: &mut async_nats::Subscriber,
    n: usize,
    timeout: Duration,
) -> Result<Vec<async_nats::Message>> {
    let mut out = Vec::with_capacity(n);
    tokio::time::timeout(timeout, async {
        while out.len() < n {
            match sub.next().await {
                Some(m) => out.push(m),
                None => bail!("subscription closed"),
            }
        }
        anyhow::Ok(())
    })
    .await
    .map_err(|_| {
        anyhow!(
            "timed out after {timeout:?}: got {} of {n} messages",
            out.len()
        )
    })??;
    Ok(out)
}

/// Reads the first `n` messages of JetStream stream `stream` (an ordered, ephemeral consumer from
/// the start), or fails after `timeout`.
pub async fn jetstream_read(
    client: &async_nats::Client,
    stream: &str,
    n: usize,
    timeout: Duration,
) -> Result<Vec<async_nats::Message>> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
    let js = async_nats::jetstream::new(client.clone());
    let stream = js.get_stream(stream).await?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut out = Vec::with_capacity(n);
    tokio::time::timeout(timeout, async {
        while out.len() < n {
            match messages.next().await {
                Some(m) => out.push(m.map_err(|e| anyhow!("{e}"))?.message),
                None => bail!("message stream ended"),
            }
        }
        anyhow::Ok(())
    })
    .await
    .map_err(|_| {
        anyhow!(
            "timed out after {timeout:?}: got {} of {n} messages",
            out.len()
        )
    })??;
    Ok(out)
}

// ---- HTTP ----------------------------------------------------------------------------------------

/// A minimal HTTP/1.0 request to a loopback `http://` URL; returns (status, body). The one HTTP
/// client of the tests: Kafka Connect's REST API, and `/readyz` and `/metrics` through [`http_get`].
pub async fn http_request(method: &str, url: &str, body: Option<&str>) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("not an http:// URL: {url}"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let resp = tokio::time::timeout(Duration::from_secs(60), async {
        let mut s = tokio::net::TcpStream::connect(authority).await?;
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    })
    .await
    .context("HTTP request timed out")??;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP response: {head}"))?;
    Ok((status, body.to_string()))
}
