//! Postgres connections for the relay from libpq settings, with optional TLS and LISTEN/NOTIFY forwarding (network I/O).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;

use super::config::{PgEnv, SslMode};

/// A Postgres connection error; never contains the password.
#[derive(Debug, thiserror::Error)]
#[error("connecting to Postgres at {host}:{port} as {user}: {message}")]
pub struct ConnectError {
    host: String,
    port: u16,
    user: String,
    message: String,
}

/// The TLS settings for a mode: the operator's own (`crate::postgres::connect::tls_config`), so
/// the relay and the operator treat `sslmode` identically. `None` for `disable`.
fn tls_config(mode: SslMode) -> Result<Option<rustls::ClientConfig>, String> {
    use crate::api::service_database::SslMode as Libpq;
    let libpq = match mode {
        SslMode::Disable => return Ok(None),
        SslMode::Prefer => Libpq::Prefer,
        SslMode::Require => Libpq::Require,
        SslMode::VerifyFull => Libpq::VerifyFull,
    };
    crate::postgres::connect::tls_config(libpq, None)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Opens a connection; notifications on the connection wake `notify` (if given).
pub async fn connect(
    env: &PgEnv,
    notify: Option<Arc<Notify>>,
) -> Result<tokio_postgres::Client, ConnectError> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&env.host)
        .port(env.port)
        .user(&env.user)
        .dbname(&env.database)
        .application_name(&env.application_name)
        // Nothing the relay runs may resolve to an object someone else can create.
        .options("-c search_path=pg_catalog")
        .connect_timeout(Duration::from_secs(10))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .ssl_mode(match env.sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
    if let Some(p) = &env.password {
        cfg.password(p);
    }
    let err = |e: tokio_postgres::Error| ConnectError {
        host: env.host.clone(),
        port: env.port,
        user: env.user.clone(),
        message: super::pg_error(&e),
    };
    let tls = tls_config(env.sslmode).map_err(|message| ConnectError {
        host: env.host.clone(),
        port: env.port,
        user: env.user.clone(),
        message,
    })?;
    match tls {
        None => {
            let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.map_err(err)?;
            spawn_connection(conn, notify);
            Ok(client)
        }
        Some(tls) => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
            let (client, conn) = cfg.connect(tls).await.map_err(err)?;
            spawn_connection(conn, notify);
            Ok(client)
        }
    }
}

fn spawn_connection<S, T>(mut conn: tokio_postgres::Connection<S, T>, notify: Option<Arc<Notify>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
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
