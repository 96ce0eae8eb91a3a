//! Poll mode: claim a batch in `seq` order with `FOR UPDATE SKIP LOCKED`, publish it, delete it and commit, as the single holder of an advisory lock (Postgres I/O).
//!
//! The advisory lock is session-level and held by the same connection that claims and deletes:
//! if that session dies, Postgres releases the lock and rolls back the claim together, so a
//! standby never sees the lock free while a half-done claim still holds rows.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use uuid::Uuid;

use super::super::envelope::OutboxEvent;
use super::super::publish::{Backoff, PublishError};
use super::super::{Ctx, RelayError, pg};

/// How often a standby retries the lock.
const STANDBY_RETRY: Duration = Duration::from_secs(1);

/// Runs Poll mode until shutdown (Ok) or a fatal error.
pub async fn run(ctx: &Ctx) -> Result<(), RelayError> {
    let mut backoff = Backoff::default();
    loop {
        if ctx.shutdown.is_cancelled() {
            return Ok(());
        }
        match session(ctx, &mut backoff).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                ctx.metrics.active.set(0);
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "poll session failed; reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = ctx.shutdown.cancelled() => return Ok(()),
                }
            }
        }
    }
}

async fn session(ctx: &Ctx, backoff: &mut Backoff) -> Result<(), RelayError> {
    let notify = Arc::new(Notify::new());
    let mut client = pg::connect(&ctx.pg, Some(notify.clone())).await?;
    let table = &ctx.v.table;
    let key = table.lock_key();
    let mut announced = false;
    loop {
        let got: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await?
            .get(0);
        if got {
            break;
        }
        if !announced {
            tracing::info!(%table, "another relay publishes this outbox; standing by");
            announced = true;
        }
        ctx.metrics.active.set(0);
        tokio::select! {
            () = tokio::time::sleep(STANDBY_RETRY) => {}
            () = ctx.shutdown.cancelled() => return Ok(()),
        }
    }
    tracing::info!(%table, "holding the publisher lock; relaying");
    ctx.metrics.active.set(1);
    backoff.reset();
    // The wake-up is a latency aid only; without the trigger the poll interval is the backstop.
    let channel = super::super::config::quote_ident(&table.notify_channel());
    if let Err(e) = client.batch_execute(&format!("LISTEN {channel}")).await {
        tracing::debug!(error = %e, "LISTEN failed; relying on the poll interval");
    }
    let q = table.quoted();
    let claim = client
        .prepare(&format!(
            "SELECT id, aggregatetype, aggregateid, type, payload::text, headers::text, \
             extract(epoch from created_at)::float8 \
             FROM {q} ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED"
        ))
        .await?;
    let delete = client
        .prepare(&format!("DELETE FROM {q} WHERE id = ANY($1)"))
        .await?;
    let limit = i64::from(ctx.v.config.batch_size);
    let interval = Duration::from_millis(ctx.v.config.poll_interval_ms);
    loop {
        if ctx.shutdown.is_cancelled() {
            return Ok(());
        }
        let started = Instant::now();
        let tx = client.transaction().await?;
        let rows = tx.query(&claim, &[&limit]).await?;
        if rows.is_empty() {
            tx.commit().await?;
            tokio::select! {
                () = notify.notified() => {}
                () = tokio::time::sleep(interval) => {}
                () = ctx.shutdown.cancelled() => return Ok(()),
            }
            continue;
        }
        let mut events = Vec::with_capacity(rows.len());
        let mut ids: Vec<Uuid> = Vec::with_capacity(rows.len());
        for r in &rows {
            let created: Option<f64> = r.try_get(6)?;
            let ev = OutboxEvent {
                id: r.try_get(0)?,
                aggregatetype: r.try_get(1)?,
                aggregateid: r.try_get(2)?,
                event_type: r.try_get(3)?,
                payload: r.try_get(4)?,
                headers: r.try_get(5)?,
                created_at: created
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(|s| UNIX_EPOCH + Duration::from_secs_f64(s)),
            };
            ids.push(ev.id);
            events.push(ev);
        }
        drop(rows);
        match ctx.publisher.publish(&events).await {
            Ok(()) => {}
            // Dropping `tx` rolls the claim back: the rows stay for the next relay.
            Err(PublishError::Aborted) => return Ok(()),
            Err(e @ PublishError::Rejected { .. }) => return Err(RelayError::Publish(e)),
        }
        tx.execute(&delete, &[&ids]).await?;
        tx.commit().await?;
        ctx.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        if let Some(oldest) = events.first().and_then(|e| e.created_at) {
            tracing::trace!(
                events = events.len(),
                age_ms = SystemTime::now()
                    .duration_since(oldest)
                    .unwrap_or_default()
                    .as_millis() as u64,
                "batch committed"
            );
        }
    }
}
