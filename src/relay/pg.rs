//! Postgres connections for the relay from libpq settings, with optional TLS and LISTEN/NOTIFY forwarding (network I/O).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
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

/// Accepts any server certificate: libpq's `sslmode=require`/`prefer` encrypt without
/// verifying, and the relay matches them.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_config(mode: SslMode) -> Option<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .ok()?;
    match mode {
        SslMode::Disable => None,
        SslMode::Prefer | SslMode::Require => Some(
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
                .with_no_client_auth(),
        ),
        SslMode::VerifyFull => {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            Some(builder.with_root_certificates(roots).with_no_client_auth())
        }
    }
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
    match tls_config(env.sslmode) {
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
