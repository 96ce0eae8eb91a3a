//! `make bench-relay`: the outbox relay's throughput, commit-to-broker latency and memory for Poll and Logical mode to Kafka and NATS, next to the rate Postgres accepts outbox inserts (starts real processes; network I/O).
//!
//! Per (mode, sink) it measures, with the release `servicedb relay` binary:
//! - drain: `BENCH_EVENTS` (default 100,000) events over 1,000 aggregates already in the outbox;
//!   events/s from the first to the last broker acknowledgement (the relay's own counter);
//! - live: 16 clients inserting single-event transactions as fast as Postgres accepts them for
//!   `BENCH_SECONDS` (default 10) while the relay runs; p50/p99 latency from just before each
//!   client's INSERT (autocommit) to a consumer receiving the event (an upper bound of
//!   commit-to-ack), and the delivered rate;
//! - the relay's peak RSS (VmHWM) over both.
//!
//! The insert ceiling (16 clients, single-event transactions, no relay) is measured first in
//! the same run. Nothing here asserts on speed.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use support::relay::*;
use support::{kafka_create_topic, wait_until};

const CLIENTS: usize = 16;
const AGGREGATES: usize = 1000;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// 16 clients inserting single-event outbox transactions until `deadline`; returns the count.
async fn insert_load(
    pg: &'static Postgres,
    db: &str,
    seconds: u64,
    first_n: i64,
    aggtype: &'static str,
) -> Result<u64> {
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for client_no in 0..CLIENTS {
        let db = db.to_owned();
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            let c = pg.connect(&db).await?;
            let stmt = c
                .prepare(
                    "INSERT INTO public.outbox (id, aggregatetype, aggregateid, type, payload) \
                     VALUES ($1, $4, $2, 'created', $3::text::jsonb)",
                )
                .await?;
            let mut i: i64 = 0;
            while Instant::now() < deadline {
                // Unique n per event: client-major numbering, increasing per client.
                let n = first_n + (i * CLIENTS as i64) + client_no as i64;
                let agg = format!("c{client_no}-{}", i % (AGGREGATES / CLIENTS) as i64);
                let payload = format!("{{\"agg\":\"{agg}\",\"n\":{n},\"ts\":{}}}", now_us());
                c.execute(&stmt, &[&uuid::Uuid::new_v4(), &agg, &payload, &aggtype])
                    .await?;
                count.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(count.load(Ordering::Relaxed))
}

/// CPU time (user + system) the process has used, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn percentile(sorted: &[i64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

#[derive(Clone, Copy, PartialEq)]
enum Sink {
    Kafka,
    Nats,
}

struct Row {
    mode: &'static str,
    sink: &'static str,
    drain_rate: f64,
    live_inserted: u64,
    live_rate: f64,
    p50: f64,
    p99: f64,
    rss: f64,
    drain_cpu_us: f64,
    live_cpu_us: f64,
}

async fn run_case(mode: &'static str, sink: Sink, events: usize, seconds: u64) -> Result<Row> {
    let pg = postgres();
    let db = pg.outbox_database("bench").await?;
    if mode == "Logical" {
        pg.create_publication(&db).await?;
    }
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let (sink_yaml, topic) = match sink {
        Sink::Kafka => {
            let b = kafka_bootstrap();
            // The live events get their own topic so the consumer does not read the backlog.
            kafka_create_topic(&b, &format!("bench-{tag}-order"), 4).await?;
            kafka_create_topic(&b, &format!("bench-{tag}-live"), 4).await?;
            (
                format!(
                    "  kafka:\n    bootstrapServers: \"{b}\"\n    topic: \"bench-{tag}-{{aggregatetype}}\"\n"
                ),
                format!("bench-{tag}-live"),
            )
        }
        Sink::Nats => (
            format!(
                "  nats:\n    url: \"{}\"\n    subject: \"b{tag}.{{aggregatetype}}.{{type}}\"\n    stream: \"Sb{tag}\"\n",
                nats().url()
            ),
            format!("Sb{tag}"),
        ),
    };
    let config = format!(
        "mode: {mode}\ntable: public.outbox\nbatchSize: 1000\npollIntervalMs: 50\nslot: s_{db}\nsink:\n{sink_yaml}"
    );
    if mode == "Logical" {
        // Create the slot first so the backlog is in its stream.
        let mut r = Relay::start(pg, &db, &config)?;
        wait_until("slot", Duration::from_secs(60), || async {
            r.metric("servicedb_relay_active").await == Some(1.0)
        })
        .await?;
        r.sigterm();
        r.wait_exit(Duration::from_secs(30))?;
    }
    // Drain a backlog.
    produce(pg, &db, events, AGGREGATES, 1000, "order").await?;
    let relay = Relay::start(pg, &db, &config)?;
    let pid = relay.pid().ok_or_else(|| anyhow!("no pid"))?;
    let mut first: Option<(Instant, f64)> = None;
    let last;
    let give_up = Instant::now() + Duration::from_secs(600);
    loop {
        let p = relay
            .metric("servicedb_relay_published_total")
            .await
            .unwrap_or(0.0);
        if p > 0.0 && first.is_none() {
            first = Some((Instant::now(), p));
        }
        if p >= events as f64 {
            last = Instant::now();
            break;
        }
        if Instant::now() > give_up {
            return Err(anyhow!(
                "drain did not finish; relay log:\n{}",
                relay.log_tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (t0, p0) = first.unwrap_or((last, 0.0));
    let drain_rate = (events as f64 - p0) / last.duration_since(t0).as_secs_f64().max(1e-3);
    let cpu_after_drain = cpu_seconds(pid);

    // Live load with a consumer running.
    let consumer = {
        let topic = topic.clone();
        let total_hint = usize::MAX;
        tokio::spawn(async move {
            match sink {
                Sink::Kafka => {
                    kafka_read(
                        &kafka_bootstrap(),
                        &topic,
                        total_hint,
                        Duration::from_secs(seconds + 40),
                    )
                    .await
                }
                Sink::Nats => {
                    let filter = format!("b{}.live.>", &topic[2..]);
                    nats_read_filtered(
                        &nats().url(),
                        &topic,
                        Some(&filter),
                        total_hint,
                        Duration::from_secs(seconds + 40),
                    )
                    .await
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let live_started = Instant::now();
    let inserted = insert_load(pg, &db, seconds, 10_000_000, "live").await?;
    let live_secs = live_started.elapsed().as_secs_f64();
    let target = events as f64 + inserted as f64;
    let caught_up = wait_until(
        "the relay to publish the live load",
        Duration::from_secs(120),
        || async {
            relay
                .metric("servicedb_relay_published_total")
                .await
                .unwrap_or(0.0)
                >= target
        },
    )
    .await;
    let live_done = live_started.elapsed().as_secs_f64();
    let rss = peak_rss_mb(pid);
    let live_cpu = cpu_seconds(pid) - cpu_after_drain;
    let delivered = consumer.await??;
    caught_up?;
    let mut lat: Vec<i64> = delivered
        .iter()
        .filter(|d| d.n >= 10_000_000)
        .filter_map(|d| Some(d.received_us - d.ts_us?))
        .collect();
    lat.sort_unstable();
    drop(relay);
    Ok(Row {
        mode,
        sink: if sink == Sink::Kafka { "Kafka" } else { "NATS" },
        drain_rate,
        live_inserted: inserted,
        live_rate: inserted as f64 / live_done.max(live_secs),
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
        rss,
        drain_cpu_us: cpu_after_drain * 1e6 / events as f64,
        live_cpu_us: live_cpu * 1e6 / (inserted.max(1)) as f64,
    })
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let events = env_usize("BENCH_EVENTS", 100_000);
        let seconds = env_usize("BENCH_SECONDS", 10) as u64;
        let bin = relay_binary();
        eprintln!("relay binary: {}", bin.display());
        let pg = postgres();
        let db = pg.outbox_database("ceiling").await?;
        let ceiling_n = insert_load(pg, &db, seconds, 0, "order").await?;
        let ceiling = ceiling_n as f64 / seconds as f64;
        eprintln!("insert ceiling: {ceiling:.0} single-event transactions/s from {CLIENTS} clients");
        let mut rows = Vec::new();
        for (mode, sink) in [("Poll", Sink::Kafka), ("Poll", Sink::Nats), ("Logical", Sink::Kafka), ("Logical", Sink::Nats)] {
            let _serial = SERIAL.lock().await;
            match run_case(mode, sink, events, seconds).await {
                Ok(r) => rows.push(r),
                Err(e) => eprintln!("{mode} to {sink}: failed: {e}", sink = if sink == Sink::Kafka { "Kafka" } else { "NATS" }),
            }
        }
        println!();
        println!("Outbox relay benchmark: {events} backlog events, {seconds}s live load from {CLIENTS} clients, batchSize 1000");
        println!("Insert ceiling (16 clients, single-event transactions, no relay): {ceiling:.0} events/s");
        println!();
        println!("| mode    | sink  | drain events/s | drain / insert ceiling | live inserted/s | live delivered / ceiling | p50 ms | p99 ms | peak RSS MB | relay CPU µs/event drain, live |");
        println!("|---------|-------|---------------:|-----------------------:|----------------:|-------------------------:|-------:|-------:|------------:|-------------------------------:|");
        for r in &rows {
            println!(
                "| {:<7} | {:<5} | {:>14.0} | {:>22.2} | {:>15.0} | {:>24.2} | {:>6.1} | {:>6.1} | {:>11.1} | {:>15.1}, {:>13.1} |",
                r.mode,
                r.sink,
                r.drain_rate,
                r.drain_rate / ceiling,
                r.live_inserted as f64 / seconds as f64,
                r.live_rate / ceiling,
                r.p50,
                r.p99,
                r.rss,
                r.drain_cpu_us,
                r.live_cpu_us
            );
        }
        Ok(())
    })
}
