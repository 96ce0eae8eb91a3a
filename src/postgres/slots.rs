//! Replication slots: their derived names (pure), dropping them for a Logical relay that is gone
//! and for database teardown, and reading how much WAL a slot retains (does database I/O).
//!
//! A slot nobody reads pins WAL forever and eventually fills the disk, so dropping it must
//! succeed even while a (dying) relay still streams from it: the walsender is terminated first,
//! then the drop is retried until the slot is released, within a bound.

use std::time::Duration;

use tokio_postgres::Client;
use tracing::{debug, info};

use super::PgError;
use super::connect::{ConnectError, ConnectParams, connect};

/// How long to wait for a terminated walsender to release its slot.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a slot could not be dropped.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// Could not connect.
    #[error("connecting to drop a replication slot: {0}")]
    Connect(#[source] ConnectError),
    /// Looking the slot up failed.
    #[error("looking up replication slot {slot}: {source}")]
    Lookup {
        /// Slot.
        slot: String,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// Terminating the walsender that holds the slot failed (the admin needs membership of
    /// the relay role or `pg_signal_backend`).
    #[error("terminating the session (pid {pid}) using replication slot {slot}: {source}")]
    Terminate {
        /// Slot.
        slot: String,
        /// The walsender's pid.
        pid: i32,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// `pg_drop_replication_slot` failed (the admin needs REPLICATION or superuser).
    #[error("dropping replication slot {slot}: {source}")]
    Drop {
        /// Slot.
        slot: String,
        /// The server's answer.
        #[source]
        source: PgError,
    },
    /// The slot stayed in use after its session was terminated.
    #[error("replication slot {slot} is still in use after {after:?}")]
    StillActive {
        /// Slot.
        slot: String,
        /// How long we waited.
        after: Duration,
    },
}

impl SlotError {
    /// A short, stable category for Event reasons and metric labels.
    pub fn category(&self) -> &'static str {
        match self {
            SlotError::Connect(e) => e.category(),
            SlotError::Lookup { .. } => "ReadCatalogFailed",
            SlotError::Terminate { .. } => "TerminateSlotSessionFailed",
            SlotError::Drop { .. } => "DropSlotFailed",
            SlotError::StillActive { .. } => "SlotStillActive",
        }
    }
}

pub use super::identifiers::{
    CDC_SLOT_KIND, RELAY_SLOT_KIND, RELAY_SLOT_PREFIX, derived_slot_name,
};

/// Names of the logical replication slots on the server: in `database` only, or in every
/// database when `None` (a managed instance may lower `wal_level` only when there is none).
pub async fn logical_slots(
    admin: &ConnectParams,
    database: Option<&str>,
) -> Result<Vec<String>, SlotError> {
    let client = connect(&admin.for_ddl())
        .await
        .map_err(SlotError::Connect)?;
    let rows = client
        .query(
            "SELECT slot_name::text FROM pg_catalog.pg_replication_slots \
             WHERE slot_type = 'logical' AND ($1::text IS NULL OR database = $1) ORDER BY 1",
            &[&database],
        )
        .await
        .map_err(|e| SlotError::Lookup {
            slot: "(all logical slots)".to_owned(),
            source: e.into(),
        })?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The relay slots in `database` that belong to none of `in_use` (slot names of the
/// OutboxRelays that still exist): left behind by a relay whose cleanup could not drop them.
pub fn orphaned_relay_slots(found: &[String], in_use: &[String]) -> Vec<String> {
    found
        .iter()
        .filter(|s| s.starts_with(RELAY_SLOT_PREFIX) && !in_use.contains(s))
        .cloned()
        .collect()
}

/// Drops replication slot `slot` if it exists; `Ok(false)` when there was nothing to drop.
/// `admin` may point at any database: slots are cluster-wide for this purpose.
pub async fn drop_slot(admin: &ConnectParams, slot: &str) -> Result<bool, SlotError> {
    let client = connect(&admin.for_ddl())
        .await
        .map_err(SlotError::Connect)?;
    drop_slot_with(&client, slot, RELEASE_TIMEOUT).await
}

/// [`drop_slot`] on an open connection.
pub async fn drop_slot_with(
    client: &Client,
    slot: &str,
    release_timeout: Duration,
) -> Result<bool, SlotError> {
    let deadline = tokio::time::Instant::now() + release_timeout;
    loop {
        let row = client
            .query_opt(
                "SELECT active_pid FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(|e| SlotError::Lookup {
                slot: slot.to_owned(),
                source: e.into(),
            })?;
        let Some(row) = row else {
            debug!(slot, "replication slot already gone");
            return Ok(false);
        };
        if let Some(pid) = row.get::<_, Option<i32>>(0) {
            info!(
                slot,
                pid, "terminating the session using the replication slot"
            );
            client
                .execute("SELECT pg_catalog.pg_terminate_backend($1)", &[&pid])
                .await
                .map_err(|e| SlotError::Terminate {
                    slot: slot.to_owned(),
                    pid,
                    source: e.into(),
                })?;
        }
        match client
            .execute("SELECT pg_catalog.pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Ok(_) => {
                info!(slot, "dropped replication slot");
                return Ok(true);
            }
            Err(e) => {
                let e = PgError(e);
                match e.sqlstate() {
                    // undefined_object: dropped concurrently.
                    Some("42704") => return Ok(false),
                    // object_in_use: the terminated walsender has not exited yet.
                    Some("55006") if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Some("55006") => {
                        return Err(SlotError::StillActive {
                            slot: slot.to_owned(),
                            after: release_timeout,
                        });
                    }
                    _ => {
                        return Err(SlotError::Drop {
                            slot: slot.to_owned(),
                            source: e,
                        });
                    }
                }
            }
        }
    }
}

/// The WAL a replication slot holds back, as Postgres reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotLag {
    /// Bytes of WAL between the server's current write position and what the slot's consumer
    /// confirmed (`pg_current_wal_lsn() - confirmed_flush_lsn`): what the slot keeps on disk
    /// for its consumer. `None` while the slot has never confirmed anything (a physical slot,
    /// or a logical slot still in its initial snapshot).
    pub retained_bytes: Option<i64>,
    /// `pg_replication_slots.wal_status`: `reserved`, `extended`, `unreserved` (about to be
    /// invalidated by `max_slot_wal_keep_size`) or `lost` (WAL already removed: the consumer
    /// cannot continue and needs a new snapshot).
    pub wal_status: Option<String>,
    /// Whether a session is streaming from the slot right now.
    pub active: bool,
}

impl SlotLag {
    /// True when `max_slot_wal_keep_size` is about to remove, or has removed, WAL this slot
    /// still needs.
    pub fn at_risk(&self) -> bool {
        matches!(self.wal_status.as_deref(), Some("unreserved" | "lost"))
    }
}

/// The query behind [`slot_lag`]: one row for slot `$1`, none when it does not exist.
/// `pg_current_wal_lsn()` fails on a standby, which is fine: slots the operator watches live
/// on the primary.
pub const SLOT_LAG_SQL: &str = "SELECT (pg_catalog.pg_current_wal_lsn() - confirmed_flush_lsn)::int8, \
     wal_status, active \
     FROM pg_catalog.pg_replication_slots WHERE slot_name = $1";

/// Why a slot's lag could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading the retained WAL of replication slot {slot}: {source}")]
pub struct SlotLagError {
    /// Slot.
    pub slot: String,
    /// The server's answer.
    #[source]
    pub source: PgError,
}

impl SlotLagError {
    /// A short, stable category for Event reasons and metric labels.
    pub fn category(&self) -> &'static str {
        "ReadCatalogFailed"
    }
}

/// Reads how much WAL slot `slot` retains; `Ok(None)` when there is no such slot. Any
/// connection to the server will do (slots are cluster-wide in `pg_replication_slots`); reading
/// it needs no privilege beyond login.
pub async fn slot_lag(client: &Client, slot: &str) -> Result<Option<SlotLag>, SlotLagError> {
    let row = client
        .query_opt(SLOT_LAG_SQL, &[&slot])
        .await
        .map_err(|e| SlotLagError {
            slot: slot.to_owned(),
            source: e.into(),
        })?;
    Ok(row.map(|row| SlotLag {
        retained_bytes: row.get(0),
        wal_status: row.get(1),
        active: row.get(2),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_relay_slots_without_a_relay_are_orphans() {
        let found = vec![
            "obr_orders_events_1a2b3c4d".to_owned(),
            "obr_gone_relay_deadbeef".to_owned(),
            "debezium_orders".to_owned(),
        ];
        let in_use = vec!["obr_orders_events_1a2b3c4d".to_owned()];
        assert_eq!(
            orphaned_relay_slots(&found, &in_use),
            vec!["obr_gone_relay_deadbeef".to_owned()]
        );
        assert!(orphaned_relay_slots(&found[..1], &in_use).is_empty());
    }

    #[test]
    fn derived_slot_names_are_valid_unique_per_owner_and_stable() {
        let relay = derived_slot_name("obr", "shop", "Orders-Events");
        assert_eq!(relay, derived_slot_name("obr", "shop", "Orders-Events"));
        assert!(relay.starts_with("obr_orders_events_"), "{relay}");
        assert_ne!(relay, derived_slot_name("obr", "shop2", "Orders-Events"));
        assert_ne!(relay, derived_slot_name("obr", "shop", "orders_events"));
        assert_ne!(relay, derived_slot_name("cdc", "shop", "Orders-Events"));
        let longest = derived_slot_name("cdc", &"n".repeat(63), &"x".repeat(253));
        assert!(longest.len() <= 63, "{longest} is {} bytes", longest.len());
        for s in [relay, longest] {
            assert!(
                s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{s}"
            );
        }
    }

    #[test]
    fn slot_lag_is_at_risk_only_when_wal_is_about_to_go_or_gone() {
        let lag = |status: &str| SlotLag {
            retained_bytes: Some(1),
            wal_status: Some(status.to_owned()),
            active: true,
        };
        assert!(!lag("reserved").at_risk());
        assert!(!lag("extended").at_risk());
        assert!(lag("unreserved").at_risk());
        assert!(lag("lost").at_risk());
    }
}
