//! CDC through Debezium on Kafka Connect: the Kafka Connect REST client ([`connect`], does
//! network I/O) and the pure connector-config builder ([`config`]).
//!
//! What the ServiceDatabase reconcile does with these, as one step after provisioning (the
//! database side — cdc role, grants, `<db>_cdc_pub` publication — is `postgres::provision`):
//!
//! 1. build the desired connector with [`config::connector_config`] from a
//!    [`config::ConnectorInput`] (host/port/sslmode of the instance, the cdc role, the tables,
//!    `topicPrefix`, the secret provider);
//! 2. [`connect::ConnectClient::converge`] it (one GET; a PUT only on a difference);
//! 3. read [`connect::ConnectClient::status`] and map [`connect::ConnectorStatus::health`] to
//!    `CdcReady`; on [`connect::Health::Failed`] call
//!    [`connect::ConnectClient::restart_failed`] with backoff;
//! 4. read the slot's retained WAL with [`crate::postgres::slots::slot_lag`] for
//!    [`config::slot_name`].
//!
//! On removal: [`connect::ConnectClient::delete`] first, then drop the slot
//! ([`crate::postgres::slots::drop_slot`]) and the publication, in that order.

pub mod config;
pub mod connect;

pub use config::{
    ConfigError, ConnectorConfig, ConnectorInput, HeartbeatAction, SecretProvider,
    connector_config, connector_name, slot_name, validate_extra,
};
pub use connect::{
    BasicAuth, ConnectClient, ConnectError, ConnectSettings, ConnectorStatus, Health, Outcome,
    RequestCounts, State,
};
