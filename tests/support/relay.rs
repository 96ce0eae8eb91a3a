//! Harness for the relay's end-to-end tests: real Postgres, Kafka and NATS processes on loopback, the real `servicedb relay` binary, and checks of what reached the broker (process and network I/O).
//!
//! Every service here is private to the test binary (started from the cached binaries that
//! `hack/` builds), so tests may stop and restart them (outages) without touching the shared
//! environment. Set `RELAY_TEST_KAFKA` to a bootstrap address to use an existing Kafka for the
//! tests that do not stop the broker. Children die with the test binary: they are spawned from
//! one long-lived thread with `setpriv --pdeathsig KILL`.
//!
//! Waits, ports, HTTP and Kafka topics use the shared helpers of `tests/support`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;

use super::{free_port, http_get, kafka_client_config};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub fn cache() -> PathBuf {
    std::env::var_os("SERVICEDB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/servicedb")
        })
}

/// Events per acceptance run: 20,000 by default (CI on 2 cores), `RELAY_E2E_EVENTS=100000`
/// for the full acceptance figure.
pub fn events_per_run() -> usize {
    std::env::var("RELAY_E2E_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

/// Serialises the heavy tests so they do not fight for the two cores.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---- process spawning from a thread that lives as long as the test binary -----------------

type SpawnReq = (Command, mpsc::Sender<std::io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnReq>> {
    static S: OnceLock<Mutex<mpsc::Sender<SpawnReq>>> = OnceLock::new();
    S.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnReq>();
        std::thread::spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
            // Keep the thread (the children's parent for PDEATHSIG) alive until exit.
            loop {
                std::thread::park();
            }
        });
        Mutex::new(tx)
    })
}

/// Spawns `args` (program first) as a child that is killed when the test binary exits.
pub fn spawn_bound(args: &[&str], log: &Path, envs: &[(&str, &str)]) -> Result<Child> {
    let mut cmd = Command::new("setpriv");
    cmd.arg("--pdeathsig").arg("KILL").arg("--");
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = std::fs::File::create(log)?;
    cmd.stdout(out.try_clone()?)
        .stderr(out)
        .stdin(Stdio::null());
    let (tx, rx) = mpsc::channel();
    spawner()
        .lock()
        .map_err(|_| anyhow!("spawner poisoned"))?
        .send((cmd, tx))?;
    Ok(rx.recv()??)
}

pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
        .is_ok()
}

pub fn wait_port(port: u16, what: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while !port_open(port) {
        if start.elapsed() > timeout {
            bail!("{what} did not open port {port} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

pub fn tmpdir(prefix: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "servicedb-relay-{prefix}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

// ---- Postgres ----------------------------------------------------------------------------

/// A throwaway Postgres 15 (trust auth on loopback, `wal_level=logical`) run as `postgres`.
pub struct Postgres {
    pub port: u16,
    pub dir: PathBuf,
    child: Mutex<Option<Child>>,
}

fn as_postgres(args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "setpriv",
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--reset-env",
        // Changing the uid clears an inherited parent-death signal, so set it here again:
        // without it the server outlives the test binary.
        "--pdeathsig",
        "KILL",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

impl Postgres {
    pub fn start() -> Result<Self> {
        let dir = tmpdir("pg")?;
        Command::new("chown").arg("postgres:").arg(&dir).status()?;
        let data = dir.join("data");
        let initdb = format!("{PG_BIN}/initdb");
        let args = as_postgres(&[
            &initdb,
            "-D",
            data.to_str().unwrap_or_default(),
            "-U",
            "postgres",
            "--auth=trust",
            "-N",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
        ]);
        let out = Command::new(&args[0]).args(&args[1..]).output()?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let pg = Self {
            port: free_port()?,
            dir,
            child: Mutex::new(None),
        };
        pg.run()?;
        Ok(pg)
    }

    fn run(&self) -> Result<()> {
        let data = self.dir.join("data");
        let port = self.port.to_string();
        let postgres = format!("{PG_BIN}/postgres");
        let sock = self.dir.to_str().unwrap_or_default().to_owned();
        let args = as_postgres(&[
            &postgres,
            "-D",
            data.to_str().unwrap_or_default(),
            "-k",
            &sock,
            "-p",
            &port,
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "wal_level=logical",
            "-c",
            "max_replication_slots=20",
            "-c",
            "max_wal_senders=20",
            "-c",
            "max_connections=200",
            "-c",
            "fsync=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "shared_buffers=128MB",
            "-c",
            "log_min_messages=warning",
            "-c",
            "wal_sender_timeout=10s",
        ]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = spawn_bound(&refs, &self.dir.join("postgres.log"), &[])?;
        *self.child.lock().map_err(|_| anyhow!("poisoned"))? = Some(child);
        let start = Instant::now();
        loop {
            let ok = Command::new("psql")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-XAtqc",
                    "select 1",
                ])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!(
                    "postgres did not start; see {}",
                    self.dir.join("postgres.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Kills the server (SIGKILL: a crash, not a clean stop) and starts it again on the same port.
    pub fn restart_after(&self, down: Duration) -> Result<()> {
        if let Some(mut c) = self.child.lock().map_err(|_| anyhow!("poisoned"))?.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The postmaster's children notice its death; wait until the port is free.
        let start = Instant::now();
        while port_open(self.port) && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(down);
        let pid = self.dir.join("data/postmaster.pid");
        let _ = std::fs::remove_file(pid);
        self.run()
    }

    pub fn config(&self, db: &str, user: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.port)
            .user(user)
            .dbname(db)
            .connect_timeout(Duration::from_secs(10));
        c
    }

    pub async fn connect(&self, db: &str) -> Result<tokio_postgres::Client> {
        let (client, conn) = self
            .config(db, "postgres")
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// A fresh database with the outbox table (the exact DDL the operator uses) and a relay
    /// role with SELECT and DELETE on it only (plus REPLICATION). Returns the database name.
    pub async fn outbox_database(&self, prefix: &str) -> Result<String> {
        let db = format!(
            "{prefix}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let admin = self.connect("postgres").await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await?;
        admin
            .batch_execute(
                "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'relay') THEN \
                 CREATE ROLE relay LOGIN REPLICATION; END IF; END $$;",
            )
            .await?;
        let c = self.connect(&db).await?;
        c.batch_execute(
            "CREATE TABLE public.outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, aggregateid text NOT NULL, \
             type text NOT NULL, payload jsonb, headers jsonb, created_at timestamptz NOT NULL DEFAULT now(), \
             seq bigint GENERATED ALWAYS AS IDENTITY); CREATE INDEX outbox_seq_idx ON public.outbox (seq); \
             GRANT SELECT, DELETE ON public.outbox TO relay;",
        )
        .await?;
        Ok(db)
    }

    pub async fn create_publication(&self, db: &str) -> Result<()> {
        self.connect(db)
            .await?
            .batch_execute("CREATE PUBLICATION outbox_pub FOR TABLE public.outbox")
            .await?;
        Ok(())
    }
}

/// Postgres shared by the tests of this binary.
pub fn postgres() -> &'static Postgres {
    static PG: OnceLock<Postgres> = OnceLock::new();
    PG.get_or_init(|| Postgres::start().expect("start postgres"))
}

/// Inserts `n` events over `aggregates` aggregates in transactions of `per_tx` rows, as an
/// application would (five Debezium columns). Payload `{"agg": "a<k>", "n": <i>}`; `n` grows per
/// aggregate in commit order. Returns when all are committed. Through a Postgres restart it
/// reconnects and repeats the interrupted transaction (which may have committed: the copy then
/// shows up as a duplicate `n`, never as a gap).
pub async fn produce(
    pg: &Postgres,
    db: &str,
    n: usize,
    aggregates: usize,
    per_tx: usize,
    aggtype: &str,
) -> Result<()> {
    produce_range(pg, db, 0, n, aggregates, per_tx, aggtype).await
}

/// [`produce`] for events `from..n`.
pub async fn produce_range(
    pg: &Postgres,
    db: &str,
    from: usize,
    n: usize,
    aggregates: usize,
    per_tx: usize,
    aggtype: &str,
) -> Result<()> {
    let mut c = pg.connect(db).await?;
    let mut i = from;
    while i < n {
        let end = (i + per_tx).min(n);
        let sql = format!(
            "INSERT INTO public.outbox (id, aggregatetype, aggregateid, type, payload) \
             SELECT gen_random_uuid(), '{aggtype}', 'a' || (g % {aggregates}), 'created', \
                    jsonb_build_object('agg', 'a' || (g % {aggregates}), 'n', g) \
             FROM generate_series({i}, {}) g ORDER BY g",
            end - 1
        );
        let started = Instant::now();
        loop {
            match c.batch_execute(&sql).await {
                Ok(()) => break,
                Err(e) if started.elapsed() < Duration::from_secs(120) => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if let Ok(fresh) = pg.connect(db).await {
                        c = fresh;
                    }
                    let _ = e;
                }
                Err(e) => return Err(e.into()),
            }
        }
        i = end;
    }
    Ok(())
}

// ---- NATS --------------------------------------------------------------------------------

pub struct Nats {
    pub port: u16,
    pub dir: PathBuf,
    child: Mutex<Option<Child>>,
}

impl Nats {
    pub fn start() -> Result<Self> {
        let n = Self {
            port: free_port()?,
            dir: tmpdir("nats")?,
            child: Mutex::new(None),
        };
        n.run()?;
        Ok(n)
    }
    fn run(&self) -> Result<()> {
        let bin = cache().join("bin/nats-server-v2.15.2");
        let port = self.port.to_string();
        let sd = self.dir.join("js");
        let child = spawn_bound(
            &[
                bin.to_str().unwrap_or_default(),
                "-a",
                "127.0.0.1",
                "-p",
                &port,
                "-js",
                "-sd",
                sd.to_str().unwrap_or_default(),
            ],
            &self.dir.join("nats.log"),
            &[],
        )?;
        *self.child.lock().map_err(|_| anyhow!("poisoned"))? = Some(child);
        wait_port(self.port, "nats", Duration::from_secs(30))
    }
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
    pub fn stop(&self) -> Result<()> {
        if let Some(mut c) = self.child.lock().map_err(|_| anyhow!("poisoned"))?.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }
    pub fn start_again(&self) -> Result<()> {
        self.run()
    }
}

pub fn nats() -> &'static Nats {
    static N: OnceLock<Nats> = OnceLock::new();
    N.get_or_init(|| Nats::start().expect("start nats"))
}

/// Reads every message of `stream` until `n` distinct event ids were seen (or `timeout`).
/// Returns `(aggregateid-from-payload, n, msg id)` in stream order.
pub async fn nats_read(
    url: &str,
    stream: &str,
    n: usize,
    timeout: Duration,
) -> Result<Vec<Delivered>> {
    nats_read_filtered(url, stream, None, n, timeout).await
}

/// [`nats_read`] of the subjects matching `filter` only.
pub async fn nats_read_filtered(
    url: &str,
    stream: &str,
    filter: Option<&str>,
    n: usize,
    timeout: Duration,
) -> Result<Vec<Delivered>> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull};
    let client = async_nats::connect(url).await?;
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + timeout;
    let s = loop {
        match js.get_stream(stream).await {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(300)).await
            }
            Err(e) => bail!("stream {stream}: {e}"),
        }
    };
    let consumer = s
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            filter_subject: filter.unwrap_or_default().to_owned(),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut out = Vec::new();
    let mut ids = HashSet::new();
    while ids.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, messages.next()).await {
            Ok(Some(Ok(m))) => {
                let id = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Msg-Id"))
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                let headers: BTreeMap<String, String> = m
                    .headers
                    .as_ref()
                    .map(|h| {
                        h.iter()
                            .map(|(k, v)| {
                                (
                                    k.to_string(),
                                    v.first().map(|x| x.to_string()).unwrap_or_default(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                ids.insert(id.clone());
                out.push(Delivered::from_payload(
                    &m.payload,
                    id,
                    headers,
                    m.subject.to_string(),
                    None,
                ));
            }
            Ok(Some(Err(e))) => bail!("reading the stream: {e}"),
            Ok(None) | Err(_) => break,
        }
    }
    Ok(out)
}

// ---- Kafka -------------------------------------------------------------------------------

pub struct Kafka {
    pub port: u16,
    pub dir: PathBuf,
    child: Mutex<Option<Child>>,
}

impl Kafka {
    pub fn start() -> Result<Self> {
        let dir = tmpdir("kafka")?;
        let port = free_port()?;
        let cport = free_port()?;
        std::fs::write(
            dir.join("server.properties"),
            format!(
                "process.roles=broker,controller\nnode.id=1\ncontroller.quorum.voters=1@127.0.0.1:{cport}\n\
                 listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}\n\
                 advertised.listeners=PLAINTEXT://127.0.0.1:{port}\ncontroller.listener.names=CONTROLLER\n\
                 inter.broker.listener.name=PLAINTEXT\nlistener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
                 log.dirs={}\nnum.partitions=4\ndefault.replication.factor=1\nmin.insync.replicas=1\nauto.create.topics.enable=true\n\
                 offsets.topic.replication.factor=1\noffsets.topic.num.partitions=1\ntransaction.state.log.replication.factor=1\n\
                 transaction.state.log.min.isr=1\ntransaction.state.log.num.partitions=1\nshare.coordinator.state.topic.replication.factor=1\n\
                 share.coordinator.state.topic.min.isr=1\ngroup.initial.rebalance.delay.ms=0\nlog.flush.interval.ms=100000\n",
                dir.join("data").display()
            ),
        )?;
        std::fs::write(
            dir.join("log4j2.properties"),
            "status = error\nappender.console.type = Console\nappender.console.name = STDOUT\nappender.console.layout.type = PatternLayout\nappender.console.layout.pattern = [%d] %p %m (%c)%n\nrootLogger.level = WARN\nrootLogger.appenderRef.stdout.ref = STDOUT\n",
        )?;
        let lib = format!("{}/*", cache().join("kafka-4.3.1/lib").display());
        let log4j = format!(
            "-Dlog4j2.configurationFile={}",
            dir.join("log4j2.properties").display()
        );
        let props = dir.join("server.properties");
        let out = Command::new("java")
            .args([
                "-Xmx256m",
                "-XX:TieredStopAtLevel=1",
                "-cp",
                &lib,
                &log4j,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                "q1Sh-9_ISia_zwGINzRvyQ",
                "-c",
                props.to_str().unwrap_or_default(),
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "kafka storage format failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let k = Self {
            port,
            dir,
            child: Mutex::new(None),
        };
        k.run()?;
        Ok(k)
    }
    fn run(&self) -> Result<()> {
        let lib = format!("{}/*", cache().join("kafka-4.3.1/lib").display());
        let log4j = format!(
            "-Dlog4j2.configurationFile={}",
            self.dir.join("log4j2.properties").display()
        );
        let props = self.dir.join("server.properties");
        let child = spawn_bound(
            &[
                "java",
                "-Xms128m",
                "-Xmx512m",
                "-XX:+UseSerialGC",
                "-Djava.awt.headless=true",
                "-cp",
                &lib,
                &log4j,
                "kafka.Kafka",
                props.to_str().unwrap_or_default(),
            ],
            &self.dir.join("kafka.log"),
            &[],
        )?;
        *self.child.lock().map_err(|_| anyhow!("poisoned"))? = Some(child);
        wait_port(self.port, "kafka", Duration::from_secs(180))?;
        Ok(())
    }
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    pub fn stop(&self) -> Result<()> {
        if let Some(mut c) = self.child.lock().map_err(|_| anyhow!("poisoned"))?.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }
    pub fn start_again(&self) -> Result<()> {
        self.run()
    }
}

/// The shared test environment's Kafka, if the environment is up (never starts it).
fn testenv_kafka() -> Option<String> {
    super::testenv_vars_if_up()?.remove("KAFKA_BOOTSTRAP_SERVERS")
}

/// Kafka for the tests that do not stop it: `RELAY_TEST_KAFKA` if set, else the shared test
/// environment's (when its env file exists and the broker answers), else a private one.
pub fn kafka_bootstrap() -> String {
    static K: OnceLock<String> = OnceLock::new();
    K.get_or_init(|| {
        match std::env::var("RELAY_TEST_KAFKA")
            .ok()
            .or_else(testenv_kafka)
        {
            Some(b)
                if b.rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .is_some_and(port_open) =>
            {
                b
            }
            _ => {
                static OWN: OnceLock<Kafka> = OnceLock::new();
                OWN.get_or_init(|| Kafka::start().expect("start kafka"))
                    .bootstrap()
            }
        }
    })
    .clone()
}

/// Reads `topic` from the beginning until `n` distinct event ids (header `id` or `ce_id`) were
/// seen or `timeout` passes. Returns records in partition order (per-key order is what counts).
pub async fn kafka_read(
    bootstrap: &str,
    topic: &str,
    n: usize,
    timeout: Duration,
) -> Result<Vec<Delivered>> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Headers, Message};
    let consumer: StreamConsumer = kafka_client_config(bootstrap)
        .set(
            "group.id",
            format!("relay-test-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    consumer.subscribe(&[topic])?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut ids = HashSet::new();
    while ids.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left.min(Duration::from_secs(5)), consumer.recv()).await {
            Ok(Ok(m)) => {
                let mut headers = BTreeMap::new();
                if let Some(h) = m.headers() {
                    for hd in h.iter() {
                        headers.insert(
                            hd.key.to_owned(),
                            String::from_utf8_lossy(hd.value.unwrap_or_default()).into_owned(),
                        );
                    }
                }
                let id = headers
                    .get("id")
                    .or_else(|| headers.get("ce_id"))
                    .cloned()
                    .unwrap_or_default();
                ids.insert(id.clone());
                let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
                out.push(Delivered::from_payload(
                    m.payload().unwrap_or_default(),
                    id,
                    headers,
                    m.topic().to_owned(),
                    key,
                ));
            }
            Ok(Err(e)) => bail!("consuming: {e}"),
            Err(_) => continue,
        }
    }
    Ok(out)
}

// ---- what reached the broker --------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Delivered {
    pub agg: String,
    pub n: i64,
    /// Payload `ts` (µs since the Unix epoch, set by the benchmark's writers), if any.
    pub ts_us: Option<i64>,
    /// When this process received the message (µs since the Unix epoch).
    pub received_us: i64,
    pub id: String,
    pub headers: BTreeMap<String, String>,
    pub destination: String,
    pub key: Option<String>,
}

impl Delivered {
    fn from_payload(
        payload: &[u8],
        id: String,
        headers: BTreeMap<String, String>,
        destination: String,
        key: Option<String>,
    ) -> Self {
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
        Self {
            agg: v["agg"].as_str().unwrap_or_default().to_owned(),
            n: v["n"].as_i64().unwrap_or(-1),
            ts_us: v["ts"].as_i64(),
            received_us: now_us(),
            id,
            headers,
            destination,
            key,
        }
    }
}

pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Result of checking a delivery against `0..expected` produced by [`produce`].
#[derive(Debug)]
pub struct Check {
    pub distinct: usize,
    pub duplicates: usize,
}

/// Every event `0..expected` delivered; per aggregate, first deliveries in increasing `n`;
/// duplicates counted.
pub fn check_delivery(delivered: &[Delivered], expected: usize) -> Result<Check> {
    let mut seen = HashSet::new();
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut duplicates = 0;
    for d in delivered {
        if !seen.insert(d.n) {
            duplicates += 1;
            continue;
        }
        if let Some(prev) = last.get(d.agg.as_str())
            && *prev >= d.n
        {
            bail!(
                "order broken for aggregate {}: event {} arrived after {}",
                d.agg,
                d.n,
                prev
            );
        }
        last.insert(&d.agg, d.n);
    }
    let missing: Vec<usize> = (0..expected)
        .filter(|i| !seen.contains(&(*i as i64)))
        .take(10)
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} of {expected} events missing, e.g. {missing:?} ({} delivered, {duplicates} duplicates)",
            expected - seen.len().min(expected),
            delivered.len()
        );
    }
    Ok(Check {
        distinct: seen.len(),
        duplicates,
    })
}

// ---- the relay process ----------------------------------------------------------------------

fn supports_relay(bin: &Path) -> bool {
    Command::new(bin)
        .args(["relay", "--help"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The `servicedb` binary to test: `RELAY_BIN`, else cargo's. The target directory may be shared
/// by several work trees, so the uplifted binary can be another branch's build; then fall back to
/// the newest hashed build in `deps/` that has the `relay` subcommand.
pub fn relay_binary() -> PathBuf {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| {
        if let Some(b) = std::env::var_os("RELAY_BIN") {
            return PathBuf::from(b);
        }
        let cargo = PathBuf::from(env!("CARGO_BIN_EXE_servicedb"));
        if supports_relay(&cargo) {
            return cargo;
        }
        let deps = cargo.parent().map(|p| p.join("deps")).unwrap_or_default();
        let mut candidates: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&deps)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("servicedb-") && !n.contains('.'))
            })
            .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
            .collect();
        candidates.sort();
        candidates
            .into_iter()
            .rev()
            .map(|(_, p)| p)
            .find(|p| supports_relay(p))
            .unwrap_or(cargo)
    })
    .clone()
}

pub struct Relay {
    pub child: Option<Child>,
    pub metrics_port: u16,
    pub log: PathBuf,
}

impl Relay {
    /// Starts `servicedb relay --config <file>` with PG* for `db` as role `relay`.
    pub fn start(pg: &Postgres, db: &str, config_yaml: &str) -> Result<Self> {
        let dir = tmpdir("relay")?;
        let port = free_port()?;
        let cfg = dir.join("relay.yaml");
        let mut f = std::fs::File::create(&cfg)?;
        f.write_all(format!("{config_yaml}\nlisten: \"127.0.0.1:{port}\"\n").as_bytes())?;
        let log = dir.join("relay.log");
        let log_filter =
            std::env::var("RELAY_TEST_RUST_LOG").unwrap_or_else(|_| "info,servicedb=debug".into());
        let bin = relay_binary();
        let bin = bin.to_str().unwrap_or_default();
        let pgport = pg.port.to_string();
        let child = spawn_bound(
            &[bin, "relay", "--config", cfg.to_str().unwrap_or_default()],
            &log,
            &[
                ("PGHOST", "127.0.0.1"),
                ("PGPORT", &pgport),
                ("PGDATABASE", db),
                ("PGUSER", "relay"),
                ("PGSSLMODE", "disable"),
                ("RUST_LOG", &log_filter),
            ],
        )
        .context("spawning the relay")?;
        Ok(Self {
            child: Some(child),
            metrics_port: port,
            log,
        })
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn sigterm(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
        }
    }

    /// Waits for exit; returns the exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let start = Instant::now();
        let c = self.child.as_mut().ok_or_else(|| anyhow!("no child"))?;
        loop {
            if let Some(s) = c.try_wait()? {
                self.child = None;
                return Ok(s.code());
            }
            if start.elapsed() > timeout {
                bail!(
                    "relay did not exit within {timeout:?}; log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub async fn http_get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.metrics_port, path).await
    }

    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics").await.ok()?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Rows still in the outbox.
pub async fn outbox_rows(pg: &Postgres, db: &str) -> Result<i64> {
    Ok(pg
        .connect(db)
        .await?
        .query_one("SELECT count(*) FROM public.outbox", &[])
        .await?
        .get(0))
}
