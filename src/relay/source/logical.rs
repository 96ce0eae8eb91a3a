//! Logical mode: stream outbox inserts from a pgoutput slot, publish them with one batch in flight while the next accumulates, and confirm a commit's LSN only after the broker acked it (Postgres and replication I/O).
//!
//! The slot is the single-publisher guard: Postgres lets one walsender use a slot, so a second
//! relay gets "slot is active" and stands by until the first one's session ends. Rows are
//! deleted after their events are acknowledged (best effort, off the streaming path): the slot,
//! not the table, is the checkpoint, so a failed delete only leaves a row behind and never causes
//! a re-send; it keeps the table small and makes a later switch to Poll mode safe.

use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use uuid::Uuid;

use super::super::envelope::{OutboxEvent, pg_micros_to_system_time};
use super::super::publish::{Backoff, PublishError, Publisher};
use super::super::{Ctx, RelayError, pg};
use super::pgoutput::{Decoded, Decoder};
use super::replication::{PgwireStream, ReplError, ReplEvent, ReplicationStream};
use crate::metrics::RelayMetrics;
use crate::postgres::identifiers::quote_ident;

/// How often a standby retries the slot.
const STANDBY_RETRY: Duration = Duration::from_secs(2);

/// Runs Logical mode until shutdown (Ok) or a fatal error.
pub async fn run(ctx: &Ctx) -> Result<(), RelayError> {
    let mut backoff = Backoff::default();
    let mut standing_by = false;
    loop {
        if ctx.shutdown.is_cancelled() {
            return Ok(());
        }
        let delay = match session(ctx, &mut backoff).await {
            Ok(()) => return Ok(()),
            Err(RelayError::Replication(ReplError::SlotBusy(_))) => {
                ctx.metrics.active.set(0);
                if !standing_by {
                    tracing::info!(slot = %ctx.v.slot, "another relay streams from this slot; standing by");
                    standing_by = true;
                }
                STANDBY_RETRY
            }
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                ctx.metrics.active.set(0);
                standing_by = false;
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "logical session failed; reconnecting");
                delay
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = ctx.shutdown.cancelled() => return Ok(()),
        }
    }
}

async fn session(ctx: &Ctx, backoff: &mut Backoff) -> Result<(), RelayError> {
    let mut client = pg::connect(&ctx.pg, None).await?;
    ensure_publication(&client, ctx).await?;
    if ensure_slot(&client, &ctx.v.slot).await? {
        // Rows committed before the slot existed will never be streamed: publish them the Poll
        // way first (this session now owns the slot, so it is the only claimant). Rows committed
        // after the slot was created may go out twice (both paths); the event id dedups them.
        let claim = super::poll::prepare_claim(&client, ctx).await?;
        let mut drained = 0;
        loop {
            match super::poll::claim_and_publish(&mut client, &claim, ctx).await? {
                super::poll::Claimed::Published(n) => drained += n,
                super::poll::Claimed::Empty => break,
                super::poll::Claimed::Aborted => return Ok(()),
            }
        }
        tracing::info!(
            events = drained,
            "published the rows written before the slot existed"
        );
    }
    let mut stream = PgwireStream::start(&ctx.pg, &ctx.v.slot, &ctx.v.publication).await?;
    tracing::info!(slot = %ctx.v.slot, publication = %ctx.v.publication, "streaming from the slot; relaying");
    ctx.metrics.active.set(1);
    backoff.reset();

    // Deletes run on their own task so the stream never waits for them.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<Uuid>>();
    let delete_sql = ctx.v.sql.delete.clone();
    let deleter = tokio::spawn(async move {
        while let Some(mut ids) = rx.recv().await {
            while let Ok(more) = rx.try_recv() {
                ids.extend(more);
            }
            if let Err(e) = client.query(&delete_sql, &[&ids]).await {
                tracing::warn!(error = %e, rows = ids.len(), "deleting relayed rows failed; they stay in the table (already published, never re-sent in Logical mode)");
            }
        }
    });
    let parts = LoopParts {
        publisher: &ctx.publisher,
        metrics: &ctx.metrics,
        batch_size: ctx.v.config.batch_size as usize,
        shutdown: &ctx.shutdown,
    };
    let decoder = Decoder::new(ctx.v.table.schema(), ctx.v.table.name());
    let result = stream_loop(&mut stream, decoder, &parts, |ids| {
        let _ = tx.send(ids);
    })
    .await;
    drop(tx);
    // Let pending deletes finish (bounded) before the connection goes.
    let _ = tokio::time::timeout(Duration::from_secs(5), deleter).await;
    result
}

async fn ensure_publication(client: &tokio_postgres::Client, ctx: &Ctx) -> Result<(), RelayError> {
    let (p, t) = (&ctx.v.publication, &ctx.v.table);
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1), \
                    EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3)",
            &[p, &t.schema(), &t.name()],
        )
        .await?;
    let (exists, has_table): (bool, bool) = (row.get(0), row.get(1));
    if exists && has_table {
        return Ok(());
    }
    if exists {
        return Err(RelayError::Setup(format!(
            "publication {p} exists but does not include {t}; run: ALTER PUBLICATION {p} ADD TABLE {t}"
        )));
    }
    let create = format!(
        "CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert')",
        quote_ident(p),
        t.quoted()
    );
    match client.batch_execute(&create).await {
        Ok(()) => {
            tracing::info!(publication = %p, table = %t, "created the publication");
            Ok(())
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => Ok(()),
        Err(e) => Err(RelayError::Setup(format!(
            "publication {p} does not exist and this role cannot create it ({}); \
             have an administrator run: CREATE PUBLICATION {p} FOR TABLE {t} WITH (publish = 'insert')",
            e.as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_else(|| e.to_string())
        ))),
    }
}

/// Make sure the slot exists; true when this call created it.
async fn ensure_slot(client: &tokio_postgres::Client, slot: &str) -> Result<bool, RelayError> {
    let rows = client
        .query(
            "SELECT plugin, database FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    if let Some(r) = rows.first() {
        let plugin: Option<String> = r.get(0);
        if plugin.as_deref() != Some("pgoutput") {
            return Err(RelayError::Setup(format!(
                "replication slot {slot} exists but uses plugin {plugin:?}, not pgoutput"
            )));
        }
        return Ok(false);
    }
    match client
        .query(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
    {
        Ok(_) => {
            tracing::info!(%slot, "created the replication slot");
            Ok(true)
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT) => Ok(false),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            Err(RelayError::Setup(format!(
                "replication slot {slot} does not exist and this role cannot create it: the role needs the REPLICATION attribute ({})",
                super::super::pg_error(&e)
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// What the streaming loop needs from the relay.
pub struct LoopParts<'a> {
    pub publisher: &'a Publisher,
    pub metrics: &'a RelayMetrics,
    pub batch_size: usize,
    pub shutdown: &'a tokio_util::sync::CancellationToken,
}

type InFlight<'a> = BoxFuture<'a, (Result<(), PublishError>, Vec<Uuid>, Option<u64>, Instant)>;

/// Reads the stream and publishes with one batch in flight while the next one accumulates, so
/// batches size themselves to the broker's ack latency. A batch carries the end LSN of the last
/// commit read before it was launched; batches complete in order, so confirming that LSN after
/// the batch's acks never confirms an unpublished event. Returns Ok on shutdown after the
/// in-flight work is acknowledged.
pub async fn stream_loop<S: ReplicationStream>(
    stream: &mut S,
    mut decoder: Decoder,
    parts: &LoopParts<'_>,
    mut on_published: impl FnMut(Vec<Uuid>),
) -> Result<(), RelayError> {
    let mut batch: Vec<OutboxEvent> = Vec::with_capacity(parts.batch_size);
    let mut in_flight: Option<InFlight<'_>> = None;
    let mut last_commit: Option<u64> = None;
    let mut in_txn = false;
    let mut commit_time = None;
    loop {
        if in_flight.is_none() {
            if !batch.is_empty() {
                let events = std::mem::replace(&mut batch, Vec::with_capacity(parts.batch_size));
                let lsn = last_commit.take();
                let publisher = parts.publisher;
                in_flight = Some(
                    async move {
                        let started = Instant::now();
                        let r = publisher.publish(&events).await;
                        (r, events.into_iter().map(|e| e.id).collect(), lsn, started)
                    }
                    .boxed(),
                );
            } else if let Some(lsn) = last_commit.take() {
                // Everything read so far is acknowledged.
                stream.confirm(lsn);
            }
        }
        let stopping = parts.shutdown.is_cancelled();
        if stopping && in_flight.is_none() && batch.is_empty() {
            return Ok(());
        }
        let can_read = !stopping && batch.len() < parts.batch_size;
        tokio::select! {
            biased;
            (result, ids, lsn, started) = async { in_flight.as_mut().expect("guarded").await }, if in_flight.is_some() => {
                in_flight = None;
                match result {
                    Ok(()) => {}
                    Err(PublishError::Aborted) => return Ok(()),
                    Err(e @ PublishError::Rejected { .. }) => return Err(RelayError::Publish(e)),
                }
                if let Some(lsn) = lsn {
                    stream.confirm(lsn);
                }
                parts.metrics.batch_seconds.observe(started.elapsed().as_secs_f64());
                on_published(ids);
            }
            () = parts.shutdown.cancelled(), if !stopping => {}
            ev = stream.next(), if can_read => {
                match ev? {
                    None => return Err(RelayError::Replication(ReplError::Stream("the server ended the replication stream".into()))),
                    Some(ReplEvent::Begin { commit_time_micros }) => {
                        in_txn = true;
                        commit_time = Some(pg_micros_to_system_time(commit_time_micros));
                    }
                    Some(ReplEvent::Data(data)) => {
                        if let Decoded::Insert(ev) = decoder.decode(&data, commit_time)? {
                            batch.push(ev);
                        }
                    }
                    Some(ReplEvent::Commit { end_lsn }) => {
                        in_txn = false;
                        last_commit = Some(end_lsn);
                    }
                    Some(ReplEvent::KeepAlive { wal_end }) => {
                        // Idle: nothing read is unacknowledged, so the slot may move to the
                        // server's position and stop pinning WAL.
                        if !in_txn && batch.is_empty() && in_flight.is_none() && last_commit.is_none() {
                            stream.confirm(wal_end);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::outbox_relay::EventFormat;
    use crate::relay::config::{Template, kafka_topic_char};
    use crate::relay::envelope::{Message, Renderer};
    use crate::relay::sink::{Sink, SinkError};
    use crate::relay::source::pgoutput::tests::{insert, relation};
    use async_trait::async_trait;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use tokio_util::sync::CancellationToken;

    /// Records acknowledged keys and, for each confirm, how many messages were acked by then.
    #[derive(Default)]
    struct Log {
        acked: Vec<String>,
        confirms: Vec<(u64, usize)>,
    }

    struct FakeSink(Arc<Mutex<Log>>);

    #[async_trait]
    impl Sink for FakeSink {
        fn kind(&self) -> &'static str {
            "fake"
        }
        fn ce_prefix(&self) -> &'static str {
            "ce_"
        }
        fn check_destination(&self, _: &str) -> Result<(), String> {
            Ok(())
        }
        async fn publish(&self, messages: &[Message]) -> Vec<Result<(), SinkError>> {
            tokio::task::yield_now().await;
            let mut log = self.0.lock().unwrap();
            messages
                .iter()
                .map(|m| {
                    log.acked.push(format!(
                        "{}:{}",
                        m.key,
                        String::from_utf8_lossy(m.body.as_deref().unwrap_or_default())
                    ));
                    Ok(())
                })
                .collect()
        }
        async fn probe(&self) -> Result<(), SinkError> {
            Ok(())
        }
    }

    struct FakeStream {
        events: VecDeque<ReplEvent>,
        log: Arc<Mutex<Log>>,
        done: CancellationToken,
    }

    #[async_trait]
    impl ReplicationStream for FakeStream {
        async fn next(&mut self) -> Result<Option<ReplEvent>, ReplError> {
            if self.events.front() == Some(&ReplEvent::KeepAlive { wal_end: 5000 }) {
                // An idle pause: in-flight batches complete first.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            match self.events.pop_front() {
                Some(e) => Ok(Some(e)),
                None => {
                    self.done.cancel();
                    std::future::pending().await
                }
            }
        }
        fn confirm(&self, lsn: u64) {
            let mut log = self.log.lock().unwrap();
            let acked = log.acked.len();
            log.confirms.push((lsn, acked));
        }
    }

    const COLS: &[&str] = &[
        "id",
        "aggregatetype",
        "aggregateid",
        "type",
        "payload",
        "headers",
    ];

    fn row(agg: &str, n: u32) -> ReplEvent {
        let id = Uuid::new_v4().to_string();
        let body = n.to_string();
        ReplEvent::Data(
            insert(
                16384,
                &[
                    Some(&id),
                    Some("order"),
                    Some(agg),
                    Some("t"),
                    Some(&body),
                    None,
                ],
            )
            .into(),
        )
    }

    #[tokio::test]
    async fn events_stay_in_commit_order_and_an_lsn_is_confirmed_only_after_its_events_are_acked() {
        let log = Arc::new(Mutex::new(Log::default()));
        let mut events = VecDeque::new();
        events.push_back(ReplEvent::Data(
            relation(16384, "public", "outbox", COLS).into(),
        ));
        // 50 transactions of 7 events over 3 aggregates; a keepalive mid-transaction.
        let mut n = 0;
        for tx in 0..50u64 {
            events.push_back(ReplEvent::Begin {
                commit_time_micros: 0,
            });
            for i in 0..7 {
                events.push_back(row(["a", "b", "c"][i % 3], n));
                n += 1;
                if i == 3 {
                    events.push_back(ReplEvent::KeepAlive { wal_end: 1 });
                }
            }
            events.push_back(ReplEvent::Commit { end_lsn: 1000 + tx });
        }
        events.push_back(ReplEvent::KeepAlive { wal_end: 5000 });
        let done = CancellationToken::new();
        let mut stream = FakeStream {
            events,
            log: log.clone(),
            done: done.clone(),
        };
        let publisher = Publisher {
            sink: Arc::new(FakeSink(log.clone())),
            renderer: Renderer {
                format: EventFormat::Raw,
                source: "/s".into(),
                template: Template::parse("t", "x", kafka_topic_char).unwrap(),
                ce_prefix: "ce_",
            },
            dead_letter: None,
            metrics: RelayMetrics::register(&mut Default::default()),
            shutdown: done.clone(),
            drain: Duration::from_secs(5),
        };
        let parts = LoopParts {
            publisher: &publisher,
            metrics: &publisher.metrics,
            batch_size: 16,
            shutdown: &done,
        };
        let mut deleted = 0;
        stream_loop(
            &mut stream,
            Decoder::new("public", "outbox"),
            &parts,
            |ids| deleted += ids.len(),
        )
        .await
        .unwrap();
        let log = log.lock().unwrap();
        assert_eq!(log.acked.len(), 350);
        assert_eq!(deleted, 350);
        for agg in ["a", "b", "c"] {
            let seq: Vec<u32> = log
                .acked
                .iter()
                .filter_map(|s| s.strip_prefix(&format!("{agg}:")))
                .map(|s| s.parse().unwrap())
                .collect();
            assert!(
                seq.windows(2).all(|w| w[0] < w[1]),
                "order of {agg}: {seq:?}"
            );
        }
        // Every confirmed commit LSN had all of its events (7 per transaction) acked before.
        for &(lsn, acked) in &log.confirms {
            if (1000..1050).contains(&lsn) {
                assert!(
                    acked >= ((lsn - 1000 + 1) * 7) as usize,
                    "lsn {lsn} confirmed with {acked} acked"
                );
            }
        }
        assert!(
            !log.confirms.iter().any(|&(l, _)| l == 1),
            "no mid-transaction keepalive confirm"
        );
        assert_eq!(
            log.confirms.iter().map(|c| c.0).max(),
            Some(5000),
            "idle keepalive advances"
        );
    }
}
