//! The `ReplicationStream` trait the Logical source reads from, and its pgwire-replication implementation (network I/O).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};

use super::super::config::{PgEnv, SslMode};
use pgwire_replication::SslMode as WireMode;

/// A replication stream error.
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    /// Another session holds the slot: this relay is a standby.
    #[error("replication slot is in use by another session: {0}")]
    SlotBusy(String),
    #[error("replication stream: {0}")]
    Stream(String),
}

/// What the Logical source needs from a replication connection.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplEvent {
    Begin {
        commit_time_micros: i64,
    },
    /// A pgoutput message other than Begin/Commit.
    Data(Bytes),
    Commit {
        end_lsn: u64,
    },
    /// The server's WAL position while nothing for us is pending.
    KeepAlive {
        wal_end: u64,
    },
}

/// A logical replication stream on one slot.
#[async_trait]
pub trait ReplicationStream: Send {
    /// The next event; `Ok(None)` when the stream ended cleanly.
    async fn next(&mut self) -> Result<Option<ReplEvent>, ReplError>;
    /// Everything up to `lsn` is durable at the broker; the slot may advance to it.
    fn confirm(&self, lsn: u64);
}

/// The pgwire-replication implementation.
pub struct PgwireStream {
    client: ReplicationClient,
}

fn slot_busy(msg: &str) -> bool {
    msg.contains("is active for PID") || msg.contains("55006") || msg.contains("is active for")
}

impl PgwireStream {
    /// Connects and starts streaming from the slot's confirmed position.
    pub async fn start(env: &PgEnv, slot: &str, publication: &str) -> Result<Self, ReplError> {
        let tls = replication_tls(env);
        // PGHOSTADDR: dial the address, verify (SNI) against the host name.
        let dial = env
            .hostaddr
            .map(|a| a.to_string())
            .unwrap_or_else(|| env.host.clone());
        let cfg = ReplicationConfig::new(
            dial,
            env.user.clone(),
            env.password.clone().unwrap_or_default(),
            env.database.clone(),
            slot.to_owned(),
            publication.to_owned(),
        )
        .with_port(env.port)
        .with_tls(tls)
        .with_start_lsn(Lsn::ZERO)
        .with_status_interval(Duration::from_millis(20))
        .with_wakeup_interval(Duration::from_secs(5))
        .with_application_name(env.application_name.clone());
        let mut client = ReplicationClient::connect(cfg)
            .await
            .map_err(|e| classify(e.to_string()))?;
        client
            .wait_started()
            .await
            .map_err(|e| classify(e.to_string()))?;
        Ok(Self { client })
    }
}

/// The replication connection's TLS settings for the relay's libpq settings.
///
/// pgwire-replication has its own TLS and authentication code (it takes no stream from us), so
/// it cannot share [`crate::postgres::connect`]: it verifies like libpq (same modes, the same
/// `PGSSLROOTCERT`), refuses MD5 (built without that feature), but neither binds SCRAM to the
/// TLS channel nor refuses a cleartext password request. Use `verify-full` with Logical relays;
/// docs/relay.md says so.
fn replication_tls(env: &PgEnv) -> TlsConfig {
    let ca = env.sslrootcert.clone();
    let mut tls = match env.sslmode {
        SslMode::Disable => TlsConfig::disabled(),
        SslMode::Prefer => TlsConfig {
            mode: WireMode::Prefer,
            ..TlsConfig::disabled()
        },
        SslMode::Require => TlsConfig::require(),
        SslMode::VerifyCa => TlsConfig::verify_ca(ca),
        SslMode::VerifyFull => TlsConfig::verify_full(ca),
    };
    // The name the certificate is checked against: `host` (also when connecting to
    // `hostaddr`). pgwire-replication refuses verify-full with an IP-literal host unless the
    // name is given explicitly; given, rustls checks it against the certificate's IP SANs, as
    // libpq does.
    if env.hostaddr.is_some() || env.host.parse::<std::net::IpAddr>().is_ok() {
        tls = tls.with_sni_hostname(env.host.clone());
    }
    tls
}

fn classify(msg: String) -> ReplError {
    if slot_busy(&msg) {
        ReplError::SlotBusy(msg)
    } else {
        ReplError::Stream(msg)
    }
}

#[async_trait]
impl ReplicationStream for PgwireStream {
    async fn next(&mut self) -> Result<Option<ReplEvent>, ReplError> {
        loop {
            let ev = self
                .client
                .recv()
                .await
                .map_err(|e| classify(e.to_string()))?;
            return Ok(match ev {
                None => None,
                Some(ReplicationEvent::Begin {
                    commit_time_micros, ..
                }) => Some(ReplEvent::Begin { commit_time_micros }),
                Some(ReplicationEvent::XLogData { data, .. }) => Some(ReplEvent::Data(data)),
                Some(ReplicationEvent::Commit { end_lsn, .. }) => Some(ReplEvent::Commit {
                    end_lsn: end_lsn.as_u64(),
                }),
                Some(ReplicationEvent::KeepAlive { wal_end, .. }) => Some(ReplEvent::KeepAlive {
                    wal_end: wal_end.as_u64(),
                }),
                Some(ReplicationEvent::Message { .. }) => continue,
                Some(ReplicationEvent::StoppedAt { .. }) => None,
            });
        }
    }

    fn confirm(&self, lsn: u64) {
        self.client.update_applied_lsn(Lsn::from_u64(lsn));
    }
}

impl Drop for PgwireStream {
    fn drop(&mut self) {
        self.client.stop();
    }
}
