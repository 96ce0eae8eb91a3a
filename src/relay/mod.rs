//! The outbox relay engine behind `servicedb relay --config FILE`: wires config, sink, source, metrics, health server and signals together (does I/O).
//!
//! Data flow: a source (Poll or Logical) reads committed outbox events in order and hands
//! batches to the [`publish::Publisher`], which renders them ([`envelope`]) and drives the
//! configured [`sink::Sink`] until every event is acknowledged; only then does the source
//! delete/commit (Poll) or confirm the LSN (Logical). That ordering is the at-least-once
//! guarantee; one active publisher (advisory lock or slot) is the per-aggregate order guarantee.

pub mod config;
pub mod envelope;
pub mod pg;
pub mod publish;
pub mod sink;
pub mod source;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::api::outbox_relay::RelayMode;
use crate::http::{self, Readiness};
use crate::metrics::RelayMetrics;
use config::{ConfigError, PgEnv, RelayConfig, Validated};
use envelope::Renderer;
use publish::{PublishError, Publisher};

/// How long a batch may still take after SIGTERM before it is abandoned (uncommitted, so it
/// is published again later). Below Kubernetes' default 30 s grace period.
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(20);

/// Everything that can stop the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Connect(#[from] pg::ConnectError),
    #[error("Postgres: {}", pg_error(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("building the sink: {0}")]
    Sink(#[from] sink::BuildError),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error(transparent)]
    Replication(#[from] source::replication::ReplError),
    #[error("decoding the replication stream: {0}")]
    Decode(#[from] source::pgoutput::DecodeError),
    #[error("{0}")]
    Setup(String),
    #[error("installing signal handlers: {0}")]
    Signal(std::io::Error),
}

impl RelayError {
    /// Errors that a reconnect cannot fix: the relay exits non-zero with the message.
    pub fn is_fatal(&self) -> bool {
        match self {
            RelayError::Config(_)
            | RelayError::Sink(_)
            | RelayError::Http(_)
            | RelayError::Decode(_)
            | RelayError::Setup(_)
            | RelayError::Signal(_) => true,
            RelayError::Publish(e) => matches!(e, PublishError::Rejected { .. }),
            // Class 42: undefined table/column, insufficient privilege — a deployment mistake.
            RelayError::Db(e) => e.code().is_some_and(|c| c.code().starts_with("42")),
            RelayError::Connect(_) | RelayError::Replication(_) => false,
        }
    }
}

/// A Postgres error with the server's message and SQLSTATE (tokio-postgres' own `Display` says
/// only "db error").
pub fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// What the sources share.
pub struct Ctx {
    pub v: Validated,
    pub pg: PgEnv,
    pub publisher: Publisher,
    pub metrics: RelayMetrics,
    pub shutdown: CancellationToken,
}

/// `servicedb relay --config FILE`: runs until SIGTERM/SIGINT (Ok) or a fatal error.
pub async fn run_from_file(path: &Path) -> Result<(), RelayError> {
    let v = RelayConfig::load(path)?;
    let pg = PgEnv::from_env()?;
    run(v, pg).await
}

/// Runs a relay with an already validated configuration.
pub async fn run(v: Validated, pg: PgEnv) -> Result<(), RelayError> {
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;

    let mut registry = Registry::default();
    let metrics = RelayMetrics::register(&mut registry);
    let readiness = Readiness::default();
    let http_token = CancellationToken::new();
    let (addr, server) = http::bind(
        v.listen,
        Arc::new(registry),
        readiness.clone(),
        http_token.clone(),
    )
    .await?;
    let server = tokio::spawn(server);
    tracing::info!(
        mode = ?v.config.mode,
        table = %v.table,
        sink = v.config.sink.kind(),
        format = ?v.config.format,
        batch_size = v.config.batch_size,
        listen = %addr,
        db_host = %pg.host,
        db_name = %pg.database,
        db_user = %pg.user,
        "starting the outbox relay"
    );

    let sink = sink::build(&v).await?;
    let publisher = Publisher {
        sink: sink.clone(),
        renderer: Renderer {
            format: v.config.format,
            source: v.config.source.clone(),
            template: v.template.clone(),
            ce_prefix: sink.ce_prefix(),
        },
        dead_letter: v.config.dead_letter.clone(),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        drain: SHUTDOWN_DRAIN,
    };
    let ctx = Ctx {
        v,
        pg,
        publisher,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    };

    let background = CancellationToken::new();
    let db_up = Readiness::default();
    tokio::spawn(probe_broker(
        sink,
        metrics.clone(),
        db_up.clone(),
        readiness,
        background.clone(),
    ));
    tokio::spawn(monitor_db(
        ctx.pg.clone(),
        ctx.v.clone(),
        metrics,
        db_up,
        background.clone(),
    ));

    let result = match ctx.v.config.mode {
        RelayMode::Poll => source::poll::run(&ctx).await,
        RelayMode::Logical => source::logical::run(&ctx).await,
    };
    background.cancel();
    http_token.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    match &result {
        Ok(()) => tracing::info!("outbox relay stopped"),
        Err(e) => tracing::error!(error = %e, "outbox relay failed"),
    }
    result
}

fn spawn_signal_handler(token: CancellationToken) -> Result<(), RelayError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(RelayError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RelayError::Signal)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: finishing the in-flight batch"),
            _ = int.recv() => tracing::info!("SIGINT: finishing the in-flight batch"),
        }
        token.cancel();
    });
    Ok(())
}

/// Ready = the broker answers and the database is reachable. A healthy standby is ready too:
/// it can take over at once, and readiness only gates traffic to /metrics.
async fn probe_broker(
    sink: Arc<dyn sink::Sink>,
    metrics: RelayMetrics,
    db_up: Readiness,
    readiness: Readiness,
    token: CancellationToken,
) {
    loop {
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(5), sink.probe()).await,
            Ok(Ok(()))
        );
        metrics.broker_up.set(i64::from(ok));
        let ready = ok && db_up.is_ready();
        if ready != readiness.is_ready() {
            tracing::info!(
                broker_up = ok,
                db_up = db_up.is_ready(),
                ready,
                "readiness changed"
            );
        }
        readiness.set(ready);
        let wait = if ready {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = token.cancelled() => return,
        }
    }
}

/// Lag and slot metrics from a separate connection, every 5 s; its success is the DB health.
async fn monitor_db(
    pg: PgEnv,
    v: Validated,
    metrics: RelayMetrics,
    db_up: Readiness,
    token: CancellationToken,
) {
    let lag_sql = v.sql.lag.clone();
    let slot_sql = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8 \
                    FROM pg_replication_slots WHERE slot_name = $1";
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = pg::connect(&pg, None).await.ok();
        }
        let mut ok = false;
        if let Some(c) = &client {
            match c.query_one(&lag_sql, &[]).await {
                Ok(row) => {
                    ok = true;
                    let rows: Option<i64> = row.get(0);
                    let secs: Option<f64> = row.get(1);
                    metrics.lag_rows.set(rows.unwrap_or(0));
                    metrics.lag_seconds.set(secs.unwrap_or(0.0).max(0.0));
                }
                Err(e) => tracing::debug!(error = %e, "lag query failed"),
            }
            if v.config.mode == RelayMode::Logical
                && let Ok(rows) = c.query(slot_sql, &[&v.slot]).await
                && let Some(row) = rows.first()
            {
                let bytes: Option<f64> = row.get(0);
                metrics.slot_retained_bytes.set(bytes.unwrap_or(0.0) as i64);
            }
        }
        db_up.set(ok);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(if ok { 5 } else { 1 })) => {}
            () = token.cancelled() => return,
        }
    }
}
