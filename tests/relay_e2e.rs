//! End-to-end tests of `servicedb relay` against real Postgres, Kafka and NATS JetStream processes: delivery and per-aggregate order, crashes, outages, fail-over, slots (process and network I/O).
//!
//! `RELAY_E2E_EVENTS` sets the events per delivery run (default 20,000 over 1,000 aggregates
//! for CI on two cores; the acceptance figure is 100,000: `RELAY_E2E_EVENTS=100000`).

mod support;

use std::time::Duration;

use support::relay::*;
use support::{kafka_create_topic, wait_until};

const AGGREGATES: usize = 1000;
const LONG: Duration = Duration::from_secs(600);

fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Poll,
    Logical,
}

fn base(mode: Mode, db: &str, batch: u32) -> String {
    let m = if mode == Mode::Poll {
        "Poll"
    } else {
        "Logical"
    };
    format!(
        "mode: {m}\ntable: public.outbox\nbatchSize: {batch}\npollIntervalMs: 100\nsource: /servicedb/test/{db}\nslot: s_{db}\n"
    )
}

fn kafka_config(mode: Mode, db: &str, bootstrap: &str, topic: &str, batch: u32) -> String {
    format!(
        "{}sink:\n  kafka:\n    bootstrapServers: \"{bootstrap}\"\n    topic: \"{topic}\"\n",
        base(mode, db, batch)
    )
}

fn nats_config(mode: Mode, db: &str, url: &str, prefix: &str, batch: u32) -> String {
    format!(
        "{}sink:\n  nats:\n    url: \"{url}\"\n    subject: \"{prefix}.{{aggregatetype}}.{{type}}\"\n    stream: \"S{prefix}\"\n",
        base(mode, db, batch)
    )
}

async fn prepare(mode: Mode) -> anyhow::Result<String> {
    let pg = postgres();
    let db = pg.outbox_database("relay").await?;
    if mode == Mode::Logical {
        pg.create_publication(&db).await?;
    }
    Ok(db)
}

async fn wait_active(relay: &Relay) -> anyhow::Result<()> {
    wait_until(
        "the relay to become the active publisher",
        Duration::from_secs(120),
        || async { relay.metric("servicedb_relay_active").await == Some(1.0) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}; relay log:\n{}", relay.log_tail()))
}

enum Broker {
    Kafka { bootstrap: String, topic: String },
    Nats { url: String, prefix: String },
}

impl Broker {
    async fn kafka() -> anyhow::Result<Self> {
        let bootstrap = kafka_bootstrap();
        let topic = format!("relay-{}", suffix());
        kafka_create_topic(&bootstrap, &topic, 4).await?;
        Ok(Broker::Kafka { bootstrap, topic })
    }
    fn nats(url: String) -> Self {
        Broker::Nats {
            url,
            prefix: format!("t{}", suffix()),
        }
    }
    fn config(&self, mode: Mode, db: &str, batch: u32) -> String {
        match self {
            Broker::Kafka { bootstrap, topic } => kafka_config(mode, db, bootstrap, topic, batch),
            Broker::Nats { url, prefix } => nats_config(mode, db, url, prefix, batch),
        }
    }
    async fn read(&self, n: usize, timeout: Duration) -> anyhow::Result<Vec<Delivered>> {
        match self {
            Broker::Kafka { bootstrap, topic } => kafka_read(bootstrap, topic, n, timeout).await,
            Broker::Nats { url, prefix } => nats_read(url, &format!("S{prefix}"), n, timeout).await,
        }
    }
}

/// N events over 1,000 aggregates, produced while the relay runs: every one delivered, order
/// per aggregate exact, outbox emptied, SIGTERM exits 0.
async fn delivers_everything_in_order(mode: Mode, broker: Broker) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let n = events_per_run();
    let pg = postgres();
    let db = prepare(mode).await?;
    let mut relay = Relay::start(pg, &db, &broker.config(mode, &db, 500))?;
    wait_active(&relay).await?;
    produce(pg, &db, n, AGGREGATES, 200, "order").await?;
    let delivered = broker.read(n, LONG).await?;
    let check = check_delivery(&delivered, n)
        .map_err(|e| anyhow::anyhow!("{e}\nrelay log:\n{}", relay.log_tail()))?;
    assert_eq!(check.duplicates, 0, "no duplicates without a crash");
    wait_until(
        "the outbox to be emptied",
        Duration::from_secs(120),
        || async { outbox_rows(pg, &db).await.ok() == Some(0) },
    )
    .await?;
    assert!(
        relay
            .metric("servicedb_relay_published_total")
            .await
            .unwrap_or(0.0)
            >= n as f64
    );
    relay.sigterm();
    assert_eq!(
        relay.wait_exit(Duration::from_secs(60))?,
        Some(0),
        "SIGTERM exits 0"
    );
    eprintln!(
        "{mode:?}: {} events delivered in order, {} duplicates",
        check.distinct, check.duplicates
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_mode_to_kafka_delivers_every_event_in_order_per_aggregate() -> anyhow::Result<()> {
    delivers_everything_in_order(Mode::Poll, Broker::kafka().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_mode_to_nats_delivers_every_event_in_order_per_aggregate() -> anyhow::Result<()> {
    delivers_everything_in_order(Mode::Poll, Broker::nats(nats().url())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_mode_to_kafka_delivers_every_event_in_order_per_aggregate() -> anyhow::Result<()> {
    delivers_everything_in_order(Mode::Logical, Broker::kafka().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_mode_to_nats_delivers_every_event_in_order_per_aggregate() -> anyhow::Result<()> {
    delivers_everything_in_order(Mode::Logical, Broker::nats(nats().url())).await
}

/// Five SIGKILLs at random points while events stream in: nothing lost, duplicates bounded by
/// the in-flight work of each killed relay.
async fn survives_five_kills(mode: Mode, broker: Broker) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let n = events_per_run();
    let batch = 200u32;
    let pg = postgres();
    let db = prepare(mode).await?;
    let config = broker.config(mode, &db, batch);
    let mut relay = Relay::start(pg, &db, &config)?;
    wait_active(&relay).await?;
    let producer = {
        let db = db.clone();
        tokio::spawn(async move { produce(postgres(), &db, n, AGGREGATES, 50, "order").await })
    };
    for kill in 0..5 {
        let wait = rand::random_range(300..2500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        relay.kill9();
        eprintln!("kill {kill} after {wait} ms");
        relay = Relay::start(pg, &db, &config)?;
    }
    producer.await??;
    let delivered = broker.read(n, LONG).await?;
    let check = check_delivery(&delivered, n)
        .map_err(|e| anyhow::anyhow!("{e}\nrelay log:\n{}", relay.log_tail()))?;
    // Poll: a killed relay re-sends at most its claimed batch. Logical: its in-flight batch plus
    // what was acked but not yet reported to the slot (status every 20 ms) — bounded by two batches.
    let per_kill = if mode == Mode::Poll {
        batch as usize
    } else {
        2 * batch as usize
    };
    assert!(
        check.duplicates <= 5 * per_kill,
        "{} duplicates for 5 kills (bound {})",
        check.duplicates,
        5 * per_kill
    );
    eprintln!(
        "{mode:?} after 5 kills: {} delivered, {} duplicates",
        check.distinct, check.duplicates
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_relay_killed_five_times_loses_nothing_and_keeps_order() -> anyhow::Result<()> {
    survives_five_kills(Mode::Poll, Broker::kafka().await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_relay_killed_five_times_loses_nothing_and_keeps_order() -> anyhow::Result<()> {
    // Kafka, not NATS: JetStream would deduplicate the re-sent events by Nats-Msg-Id and hide them.
    survives_five_kills(Mode::Logical, Broker::kafka().await?).await
}

/// NATS stopped for 30 s mid-stream: /readyz goes 503, nothing is lost, the relay resumes.
async fn survives_nats_outage(mode: Mode) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let n = events_per_run() / 2;
    let own = Nats::start()?;
    let broker = Broker::nats(own.url());
    let pg = postgres();
    let db = prepare(mode).await?;
    let relay = Relay::start(pg, &db, &broker.config(mode, &db, 500))?;
    wait_active(&relay).await?;
    let producer = {
        let db = db.clone();
        tokio::spawn(async move { produce(postgres(), &db, n, AGGREGATES, 50, "order").await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    own.stop()?;
    wait_until(
        "/readyz to report the broker down",
        Duration::from_secs(30),
        || async { relay.http_get("/readyz").await.map(|r| r.0).ok() == Some(503) },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(30)).await;
    own.start_again()?;
    producer.await??;
    let delivered = broker.read(n, LONG).await?;
    check_delivery(&delivered, n)
        .map_err(|e| anyhow::anyhow!("{e}\nrelay log:\n{}", relay.log_tail()))?;
    wait_until("/readyz to recover", Duration::from_secs(60), || async {
        relay.http_get("/readyz").await.map(|r| r.0).ok() == Some(200)
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_relay_survives_a_30s_nats_outage_without_loss() -> anyhow::Result<()> {
    survives_nats_outage(Mode::Poll).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_relay_survives_a_30s_nats_outage_without_loss() -> anyhow::Result<()> {
    survives_nats_outage(Mode::Logical).await
}

/// Kafka stopped for 30 s mid-stream (a private broker): nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_relay_survives_a_30s_kafka_outage_without_loss() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let n = events_per_run() / 2;
    let own = Kafka::start()?;
    let topic = format!("relay-{}", suffix());
    kafka_create_topic(&own.bootstrap(), &topic, 4).await?;
    let broker = Broker::Kafka {
        bootstrap: own.bootstrap(),
        topic,
    };
    let pg = postgres();
    let db = prepare(Mode::Poll).await?;
    let relay = Relay::start(pg, &db, &broker.config(Mode::Poll, &db, 500))?;
    wait_active(&relay).await?;
    let producer = {
        let db = db.clone();
        tokio::spawn(async move { produce(postgres(), &db, n, AGGREGATES, 50, "order").await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    own.stop()?;
    tokio::time::sleep(Duration::from_secs(30)).await;
    own.start_again()?;
    producer.await??;
    let delivered = broker.read(n, LONG).await?;
    check_delivery(&delivered, n)
        .map_err(|e| anyhow::anyhow!("{e}\nrelay log:\n{}", relay.log_tail()))?;
    Ok(())
}

/// Postgres killed and restarted mid-stream (a crash, not a clean stop): the relay reconnects
/// and nothing is lost.
async fn survives_postgres_restart(mode: Mode) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let n = events_per_run() / 2;
    let pg = postgres();
    let db = prepare(mode).await?;
    let broker = Broker::nats(nats().url());
    let relay = Relay::start(pg, &db, &broker.config(mode, &db, 500))?;
    wait_active(&relay).await?;
    let producer = {
        let db = db.clone();
        tokio::spawn(async move { produce(postgres(), &db, n, AGGREGATES, 50, "order").await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tokio::task::spawn_blocking(|| postgres().restart_after(Duration::from_secs(3))).await??;
    producer.await??;
    let delivered = broker.read(n, LONG).await?;
    let check = check_delivery(&delivered, n)
        .map_err(|e| anyhow::anyhow!("{e}\nrelay log:\n{}", relay.log_tail()))?;
    eprintln!(
        "{mode:?} after a Postgres restart: {} delivered, {} duplicates",
        check.distinct, check.duplicates
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_relay_reconnects_after_postgres_restarts_without_loss() -> anyhow::Result<()> {
    survives_postgres_restart(Mode::Poll).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_relay_reconnects_after_postgres_restarts_without_loss() -> anyhow::Result<()> {
    survives_postgres_restart(Mode::Logical).await
}

/// Two relays on one outbox: only one publishes; kill it and the other takes over.
async fn standby_takes_over(mode: Mode) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let n = 4000;
    let pg = postgres();
    let db = prepare(mode).await?;
    let broker = Broker::nats(nats().url());
    let config = broker.config(mode, &db, 200);
    let mut a = Relay::start(pg, &db, &config)?;
    wait_active(&a).await?;
    let b = Relay::start(pg, &db, &config)?;
    wait_until(
        "the standby to serve metrics",
        Duration::from_secs(60),
        || async { b.metric("servicedb_relay_active").await == Some(0.0) },
    )
    .await?;
    produce(pg, &db, n / 2, 100, 50, "order").await?;
    let first = broker.read(n / 2, LONG).await?;
    check_delivery(&first, n / 2)?;
    assert_eq!(
        b.metric("servicedb_relay_published_total").await,
        Some(0.0),
        "the standby published nothing"
    );
    assert_eq!(b.metric("servicedb_relay_active").await, Some(0.0));
    wait_until(
        "a healthy standby to be ready",
        Duration::from_secs(30),
        || async { b.http_get("/readyz").await.map(|r| r.0).ok() == Some(200) },
    )
    .await?;
    a.kill9();
    wait_active(&b).await?;
    let producer = {
        let db = db.clone();
        tokio::spawn(
            async move { produce_range(postgres(), &db, n / 2, n, 100, 50, "order").await },
        )
    };
    producer.await??;
    let all = broker.read(n, LONG).await?;
    check_delivery(&all, n)?;
    assert!(
        b.metric("servicedb_relay_published_total")
            .await
            .unwrap_or(0.0)
            >= (n / 2) as f64
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_standby_takes_over_when_the_active_relay_dies() -> anyhow::Result<()> {
    standby_takes_over(Mode::Poll).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_standby_takes_over_when_the_active_relay_dies() -> anyhow::Result<()> {
    standby_takes_over(Mode::Logical).await
}

async fn confirmed_flush(pg: &Postgres, slot: &str) -> anyhow::Result<i64> {
    let c = pg.connect("postgres").await?;
    let r = c
        .query_one(
            "SELECT coalesce(pg_wal_lsn_diff(confirmed_flush_lsn, '0/0'), 0)::int8 FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_slot_confirmed_position_advances_on_an_idle_outbox() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let pg = postgres();
    let db = prepare(Mode::Logical).await?;
    let broker = Broker::nats(nats().url());
    let relay = Relay::start(pg, &db, &broker.config(Mode::Logical, &db, 100))?;
    wait_active(&relay).await?;
    let slot = format!("s_{db}");
    let before = confirmed_flush(pg, &slot).await?;
    // WAL that is not outbox traffic: another table in this database and another database.
    let c = pg.connect(&db).await?;
    c.batch_execute(
        "CREATE TABLE other (x int); INSERT INTO other SELECT generate_series(1, 10000);",
    )
    .await?;
    let target: i64 = c
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8",
            &[],
        )
        .await?
        .get(0);
    wait_until(
        "confirmed_flush_lsn to pass the idle WAL",
        Duration::from_secs(120),
        || async { confirmed_flush(pg, &slot).await.unwrap_or(0) >= target },
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}; before {before}, target {target}; log:\n{}",
            relay.log_tail()
        )
    })?;
    let retained = relay.metric("servicedb_relay_slot_retained_bytes").await;
    assert!(retained.is_some(), "slot retained bytes exported");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_mode_relays_rows_the_application_deletes_right_after_insert() -> anyhow::Result<()>
{
    let _serial = SERIAL.lock().await;
    let pg = postgres();
    let db = prepare(Mode::Logical).await?;
    // Debezium's pattern publishes deletes too; the relay must ignore them and relay the insert.
    pg.connect(&db)
        .await?
        .batch_execute(
            "ALTER PUBLICATION outbox_pub SET (publish = 'insert, update, delete, truncate')",
        )
        .await?;
    let broker = Broker::nats(nats().url());
    let relay = Relay::start(pg, &db, &broker.config(Mode::Logical, &db, 100))?;
    wait_active(&relay).await?;
    let c = pg.connect(&db).await?;
    for i in 0..50 {
        let same_tx = i % 2 == 0;
        let insert = format!(
            "INSERT INTO public.outbox (id, aggregatetype, aggregateid, type, payload) VALUES \
             ('{}', 'order', 'a{}', 'created', '{{\"agg\":\"a{}\",\"n\":{i}}}')",
            uuid::Uuid::new_v4(),
            i % 5,
            i % 5
        );
        if same_tx {
            c.batch_execute(&format!(
                "BEGIN; {insert}; DELETE FROM public.outbox; COMMIT;"
            ))
            .await?;
        } else {
            c.batch_execute(&format!("{insert}; DELETE FROM public.outbox;"))
                .await?;
        }
    }
    let delivered = broker.read(50, Duration::from_secs(120)).await?;
    check_delivery(&delivered, 50)
        .map_err(|e| anyhow::anyhow!("{e}\nrelay log:\n{}", relay.log_tail()))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_mode_publishes_rows_written_before_its_slot_existed() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let pg = postgres();
    let db = prepare(Mode::Logical).await?;
    // The service writes before the relay (and so its slot) exists: a slot never streams
    // these, so the relay must publish them from the table when it creates the slot.
    produce(pg, &db, 300, 10, 10, "order").await?;
    let broker = Broker::nats(nats().url());
    let relay = Relay::start(pg, &db, &broker.config(Mode::Logical, &db, 100))?;
    wait_active(&relay).await?;
    // And what is written afterwards is streamed as usual.
    produce_range(pg, &db, 300, 400, 10, 10, "order").await?;
    let delivered = broker.read(400, Duration::from_secs(120)).await?;
    check_delivery(&delivered, 400)
        .map_err(|e| anyhow::anyhow!("{e}\nrelay log:\n{}", relay.log_tail()))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logical_mode_without_a_publication_it_may_not_create_fails_naming_it() -> anyhow::Result<()>
{
    let _serial = SERIAL.lock().await;
    let pg = postgres();
    let db = prepare(Mode::Poll).await?; // no publication
    let broker = Broker::nats(nats().url());
    let mut relay = Relay::start(pg, &db, &broker.config(Mode::Logical, &db, 100))?;
    let code = relay.wait_exit(Duration::from_secs(60))?;
    assert_ne!(code, Some(0));
    let log = std::fs::read_to_string(&relay.log)?;
    assert!(
        log.contains("CREATE PUBLICATION outbox_pub FOR TABLE public.outbox"),
        "{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_sink_rejects_stops_the_relay_naming_the_event_id() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let pg = postgres();
    let db = prepare(Mode::Poll).await?;
    let broker = Broker::nats(nats().url());
    let id = uuid::Uuid::new_v4();
    pg.connect(&db)
        .await?
        .batch_execute(&format!(
            "INSERT INTO public.outbox (id, aggregatetype, aggregateid, type, payload) VALUES ('{id}', 'bad type', 'a', 'created', '{{}}')"
        ))
        .await?;
    let mut relay = Relay::start(pg, &db, &broker.config(Mode::Poll, &db, 100))?;
    let code = relay.wait_exit(Duration::from_secs(60))?;
    assert_ne!(code, Some(0));
    let log = std::fs::read_to_string(&relay.log)?;
    assert!(log.contains(&id.to_string()), "{log}");
    assert_eq!(
        outbox_rows(pg, &db).await?,
        1,
        "the rejected event stays in the outbox"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_events_go_to_the_dead_letter_subject_and_the_rest_flow_on() -> anyhow::Result<()>
{
    let _serial = SERIAL.lock().await;
    let pg = postgres();
    let db = prepare(Mode::Poll).await?;
    let broker = Broker::nats(nats().url());
    let Broker::Nats { prefix, .. } = &broker else {
        unreachable!()
    };
    let c = pg.connect(&db).await?;
    c.batch_execute(
        "INSERT INTO public.outbox (id, aggregatetype, aggregateid, type, payload) VALUES \
         (gen_random_uuid(), 'order', 'a0', 'created', '{\"agg\":\"a0\",\"n\":0}'), \
         (gen_random_uuid(), 'bad type', 'a0', 'created', '{\"agg\":\"dead\",\"n\":100}'), \
         (gen_random_uuid(), 'order', 'a0', 'created', '{\"agg\":\"a0\",\"n\":1}')",
    )
    .await?;
    let config = format!(
        "{}deadLetter: \"{prefix}.dead\"\n",
        broker.config(Mode::Poll, &db, 100)
    );
    let relay = Relay::start(pg, &db, &config)?;
    let delivered = broker.read(3, Duration::from_secs(120)).await?;
    assert_eq!(delivered.len(), 3, "log:\n{}", relay.log_tail());
    let dead: Vec<_> = delivered
        .iter()
        .filter(|d| d.destination == format!("{prefix}.dead"))
        .collect();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0]
            .headers
            .get("servicedb-error")
            .is_some_and(|e| e.contains("bad type")),
        "{:?}",
        dead[0].headers
    );
    assert_eq!(
        relay.metric("servicedb_relay_dead_lettered_total").await,
        Some(1.0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_binary_mode_sets_ce_headers_and_keeps_user_headers_on_kafka()
-> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let pg = postgres();
    let db = prepare(Mode::Poll).await?;
    let broker = Broker::kafka().await?;
    let id = uuid::Uuid::new_v4();
    pg.connect(&db)
        .await?
        .batch_execute(&format!(
            "INSERT INTO public.outbox (id, aggregatetype, aggregateid, type, payload, headers) VALUES \
             ('{id}', 'order', 'o-7', 'OrderCreated', '{{\"agg\":\"o-7\",\"n\":0}}', '{{\"traceparent\":\"00-abc-01\"}}')"
        ))
        .await?;
    let config = format!(
        "{}format: CloudEvents\n",
        broker.config(Mode::Poll, &db, 100)
    );
    let _relay = Relay::start(pg, &db, &config)?;
    let delivered = broker.read(1, Duration::from_secs(120)).await?;
    let d = delivered
        .first()
        .ok_or_else(|| anyhow::anyhow!("nothing delivered"))?;
    assert_eq!(d.key.as_deref(), Some("o-7"));
    assert_eq!(d.headers.get("ce_id"), Some(&id.to_string()));
    assert_eq!(
        d.headers.get("ce_type").map(String::as_str),
        Some("OrderCreated")
    );
    assert_eq!(
        d.headers.get("ce_source"),
        Some(&format!("/servicedb/test/{db}"))
    );
    assert_eq!(d.headers.get("ce_subject").map(String::as_str), Some("o-7"));
    assert_eq!(
        d.headers.get("ce_specversion").map(String::as_str),
        Some("1.0")
    );
    assert_eq!(
        d.headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(
        d.headers.get("traceparent").map(String::as_str),
        Some("00-abc-01")
    );
    Ok(())
}
