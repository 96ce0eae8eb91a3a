//! Poll mode: claim a batch in `seq` order (deleting it in an open transaction), publish it, and commit only after every ack, as the single holder of an advisory lock (Postgres I/O).
//!
//! The advisory lock is session-level and held by the same connection that claims and deletes:
//! if that session dies, Postgres releases the lock and rolls back the claim together, so a
//! standby never sees the lock free while a half-done claim still holds rows.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

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
    let channel = table.notify_channel().quoted();
    if let Err(e) = client.batch_execute(&format!("LISTEN {channel}")).await {
        tracing::debug!(error = %e, "LISTEN failed; relying on the poll interval");
    }
    let claim = prepare_claim(&client, ctx).await?;
    let interval = Duration::from_millis(ctx.v.config.poll_interval_ms);
    loop {
        if ctx.shutdown.is_cancelled() {
            return Ok(());
        }
        match claim_and_publish(&mut client, &claim, ctx).await? {
            Claimed::Published(_) => {}
            Claimed::Aborted => return Ok(()),
            Claimed::Empty => {
                tokio::select! {
                    () = notify.notified() => {}
                    () = tokio::time::sleep(interval) => {}
                    () = ctx.shutdown.cancelled() => return Ok(()),
                }
            }
        }
    }
}

/// What one claim did.
pub(super) enum Claimed {
    /// The outbox was empty.
    Empty,
    /// This many events were published and their rows deleted.
    Published(usize),
    /// Shutdown interrupted publishing; the claim was rolled back.
    Aborted,
}

/// The claim statement: delete a batch in an open transaction, committed only after every ack.
/// `FOR UPDATE SKIP LOCKED` would need the UPDATE privilege; the relay role has none, and the
/// caller is the only claimant (advisory lock, or the slot in Logical mode). A rolled-back
/// claim (crash, broker down, shutdown) leaves the rows in place. The sub-select sees every
/// committed row, late commits included: there is no `seq > last_seen`. With
/// `functionsSchema` set the same DELETE runs inside the outbox owner's SECURITY DEFINER
/// function, in this same transaction, so the semantics are identical.
pub(super) async fn prepare_claim(
    client: &tokio_postgres::Client,
    ctx: &Ctx,
) -> Result<tokio_postgres::Statement, RelayError> {
    Ok(client.prepare(&ctx.v.sql.claim).await?)
}

/// Claim one batch, publish it in `seq` order, wait for every ack, then commit the delete.
pub(super) async fn claim_and_publish(
    client: &mut tokio_postgres::Client,
    claim: &tokio_postgres::Statement,
    ctx: &Ctx,
) -> Result<Claimed, RelayError> {
    let limit = i64::from(ctx.v.config.batch_size);
    let started = Instant::now();
    let tx = client.transaction().await?;
    let rows = tx.query(claim, &[&limit]).await?;
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(Claimed::Empty);
    }
    let mut claimed = Vec::with_capacity(rows.len());
    for r in &rows {
        let seq: i64 = r.try_get(0)?;
        let created: Option<f64> = r.try_get(7)?;
        let ev = OutboxEvent {
            id: r.try_get(1)?,
            aggregatetype: r.try_get(2)?,
            aggregateid: r.try_get(3)?,
            event_type: r.try_get(4)?,
            payload: r.try_get(5)?,
            headers: r.try_get(6)?,
            created_at: created
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| UNIX_EPOCH + Duration::from_secs_f64(s)),
        };
        claimed.push((seq, ev));
    }
    drop(rows);
    // RETURNING has no order: publish in `seq` order.
    claimed.sort_unstable_by_key(|(seq, _)| *seq);
    let events: Vec<OutboxEvent> = claimed.into_iter().map(|(_, e)| e).collect();
    match ctx.publisher.publish(&events).await {
        Ok(()) => {}
        // Dropping `tx` rolls the claim back: the rows stay for the next relay.
        Err(PublishError::Aborted) => return Ok(Claimed::Aborted),
        Err(e @ PublishError::Rejected { .. }) => return Err(RelayError::Publish(e)),
    }
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
    Ok(Claimed::Published(events.len()))
}
