//! The provisioning step: converge the database, roles, grants, outbox and publications on the
//! server (database I/O through `postgres::provision`), then collect replication slots that
//! deleted relays left behind.

use kube::ResourceExt;
use kube::runtime::events::EventType;
use tracing::debug;

use super::Error;
use super::credentials::{self, Persisted, SecretTarget};
use super::decide::Desire;
use super::instance::Target;
use crate::api::service_database::ServiceDatabase;
use crate::operator::Context;
use crate::postgres::{self, ConnectParams};

/// Provisions in the database, idempotently (catalog reads only when nothing drifted), so a
/// failed first-start script, a role dropped by hand or a relay added later are repaired
/// instead of reported Ready.
pub async fn converge(
    ctx: &Context,
    sdb: &ServiceDatabase,
    desire: &Desire,
    target: &Target,
    persisted: &mut Persisted,
    to: &SecretTarget<'_>,
) -> Result<Provisioned, Error> {
    let plan = persisted.plan(desire, false);
    let report = postgres::provision::provision(&target.admin, &plan)
        .await
        .inspect_err(|e| debug!(error = %e, "provisioning failed"))?;
    if report.changed() {
        ctx.event(
            sdb,
            EventType::Normal,
            "Provisioned",
            "Provision",
            report.changes.join("; "),
        )
        .await;
    }
    for w in &report.warnings {
        ctx.event(
            sdb,
            EventType::Warning,
            "ProvisionWarning",
            "Provision",
            w.clone(),
        )
        .await;
    }
    let rotated = credentials::applied(ctx, sdb, to, persisted).await?;
    Ok(Provisioned {
        missing_cdc_tables: report
            .missing_cdc_tables
            .iter()
            .map(|t| t.to_string())
            .collect(),
        cdc_password_rotated: rotated.contains(&"cdc"),
    })
}

/// What provisioning reports to the steps after it.
pub struct Provisioned {
    /// `cdc` tables that do not exist yet.
    pub missing_cdc_tables: Vec<String>,
    /// The cdc role got a new password now (its Secret had been deleted).
    pub cdc_password_rotated: bool,
}

/// Drops the replication slots of this database that a deleted OutboxRelay left behind (its
/// cleanup could not reach the server, or gave up): a slot nobody reads pins WAL forever.
/// Best effort and repeated on every reconcile; what cannot be dropped is counted in
/// `servicedb_operator_leaked_replication_slots` and reported in an Event.
pub async fn collect_orphaned_slots(
    ctx: &Context,
    sdb: &ServiceDatabase,
    ns: &str,
    admin: &ConnectParams,
    database: &str,
) {
    let found = match postgres::slots::logical_slots(admin, Some(database)).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %e, "could not list the replication slots of the database");
            return;
        }
    };
    // The relays are listed again *after* the slots: a relay's slot is created by its pod, after
    // the OutboxRelay exists, so every slot just seen belongs to a relay in this fresh list. The
    // list this reconcile started with may predate a relay that created its slot meanwhile.
    let relays = match super::fetch::relays_of(ctx, ns, &sdb.name_any()).await {
        Ok(relays) => relays,
        Err(e) => {
            tracing::warn!(error = %e, "could not list the OutboxRelays");
            return;
        }
    };
    let in_use: Vec<String> = relays
        .iter()
        .map(|r| crate::specs::relay::slot_name(ns, &r.name_any()))
        .collect();
    let mut leaked = 0;
    for slot in postgres::slots::orphaned_relay_slots(&found, &in_use) {
        match postgres::slots::drop_slot(admin, &slot).await {
            Ok(_) => {
                ctx.event(
                    sdb,
                    EventType::Normal,
                    "OrphanedSlotDropped",
                    "DropSlot",
                    format!("dropped replication slot {slot}: its OutboxRelay is gone"),
                )
                .await;
            }
            Err(e) => {
                leaked += 1;
                ctx.event(
                    sdb,
                    EventType::Warning,
                    "OrphanedSlotNotDropped",
                    "DropSlot",
                    format!(
                        "replication slot {slot} belongs to no OutboxRelay and pins WAL; dropping it failed ({}), retrying",
                        e.category()
                    ),
                )
                .await;
            }
        }
    }
    ctx.metrics.set_leaked_slots(ns, &sdb.name_any(), leaked);
}
