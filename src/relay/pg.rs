//! Postgres connections for the relay from libpq settings, through the operator's one TLS and authentication implementation, with LISTEN/NOTIFY forwarding (network I/O).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;

use super::config::PgEnv;
use crate::postgres::connect::{ConnectParams, PgConnection, open};
use crate::postgres::passwords::Password;

/// A Postgres connection error; never contains the password.
#[derive(Debug, thiserror::Error)]
#[error("connecting to Postgres at {host}:{port} as {user}: {message}")]
pub struct ConnectError {
    host: String,
    port: u16,
    user: String,
    message: String,
}

/// The operator's connection parameters for the relay's libpq settings. `PGSSLROOTCERT` is
/// read on every connect, so a CA rotated in the mounted Secret is picked up by the next
/// reconnect.
pub fn connect_params(env: &PgEnv) -> Result<ConnectParams, String> {
    let ca_pem = match &env.sslrootcert {
        Some(path) if env.sslmode.verifies() => Some(
            std::fs::read(path)
                .map_err(|e| format!("reading PGSSLROOTCERT {}: {e}", path.display()))?,
        ),
        _ => None,
    };
    Ok(ConnectParams {
        hostaddr: env.hostaddr,
        ssl_mode: env.sslmode,
        ca_pem,
        connect_timeout: Duration::from_secs(10),
        keepalive_idle: Some(Duration::from_secs(30)),
        // Nothing the relay runs may resolve to an object someone else can create.
        search_path: Some("pg_catalog"),
        application_name: env.application_name.clone(),
        ..ConnectParams::new(
            env.host.clone(),
            env.port,
            env.user.clone(),
            Password::from_plaintext(env.password.clone().unwrap_or_default()),
            env.database.clone(),
        )
    })
}

/// Opens a connection; notifications on the connection wake `notify` (if given).
pub async fn connect(
    env: &PgEnv,
    notify: Option<Arc<Notify>>,
) -> Result<tokio_postgres::Client, ConnectError> {
    let err = |message: String| ConnectError {
        host: env.host.clone(),
        port: env.port,
        user: env.user.clone(),
        message,
    };
    let params = connect_params(env).map_err(err)?;
    let (client, conn) = open(&params).await.map_err(|e| err(e.to_string()))?;
    spawn_connection(conn, notify);
    Ok(client)
}

fn spawn_connection(mut conn: PgConnection, notify: Option<Arc<Notify>>) {
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(_)) => {
                    if let Some(n) = &notify {
                        n.notify_one();
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "Postgres connection ended");
                    break;
                }
            }
        }
    });
}
