//! Opening a Postgres connection with libpq's `sslmode` semantics over rustls (does network I/O).
//!
//! | sslmode       | TLS                        | certificate checked            |
//! |---------------|----------------------------|--------------------------------|
//! | `disable`     | never                      | -                              |
//! | `prefer`      | if the server offers it    | no (libpq's behaviour)         |
//! | `require`     | always                     | no (libpq's behaviour)         |
//! | `verify-ca`   | always                     | chain, against the CA          |
//! | `verify-full` | always                     | chain and host name            |
//!
//! For `verify-*` the CA is the PEM given in [`ConnectParams::ca_pem`] (an admin Secret's
//! `ca.crt`), or the public web PKI roots when none is given (managed clouds that use public
//! CAs). The connection task is spawned on the current tokio runtime; dropping the returned
//! client closes the connection.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{debug, warn};

pub use crate::api::service_database::SslMode;

use super::PgError;
use super::passwords::Password;

/// Default bound on establishing a connection (TCP, TLS and authentication together).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and as whom to connect. `Debug` never shows the password.
#[derive(Clone)]
pub struct ConnectParams {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Role to log in as.
    pub user: String,
    /// Its password.
    pub password: Password,
    /// Database to connect to.
    pub dbname: String,
    /// TLS mode, with libpq's meaning.
    pub ssl_mode: SslMode,
    /// PEM of the CA to verify the server against (`verify-ca`/`verify-full`).
    pub ca_pem: Option<Vec<u8>>,
    /// Bound on TCP connect + TLS + authentication.
    pub connect_timeout: Duration,
    /// `application_name`, so DBAs can tell the operator's sessions apart in `pg_stat_activity`.
    pub application_name: String,
    /// Session `lock_timeout`: DDL waiting behind an application's long transaction fails
    /// after this instead of stalling a reconcile forever. `None` keeps the server's setting.
    pub lock_timeout: Option<Duration>,
    /// Session `statement_timeout`. `None` keeps the server's setting.
    pub statement_timeout: Option<Duration>,
}

impl ConnectParams {
    /// Parameters with `sslmode=prefer`, no CA, the default timeout and application name
    /// `servicedb-operator`.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        user: impl Into<String>,
        password: Password,
        dbname: impl Into<String>,
    ) -> Self {
        ConnectParams {
            host: host.into(),
            port,
            user: user.into(),
            password,
            dbname: dbname.into(),
            ssl_mode: SslMode::Prefer,
            ca_pem: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            application_name: "servicedb-operator".to_owned(),
            lock_timeout: None,
            statement_timeout: None,
        }
    }

    /// These parameters with the bounds the operator's own DDL sessions use: 10 s to get a
    /// lock, 5 min per statement (CREATE DATABASE copies a template; keep it generous).
    pub fn for_ddl(&self) -> Self {
        ConnectParams {
            lock_timeout: Some(self.lock_timeout.unwrap_or(Duration::from_secs(10))),
            statement_timeout: Some(self.statement_timeout.unwrap_or(Duration::from_secs(300))),
            ..self.clone()
        }
    }

    /// The same server and TLS settings, another database.
    pub fn with_dbname(&self, dbname: impl Into<String>) -> Self {
        ConnectParams {
            dbname: dbname.into(),
            ..self.clone()
        }
    }

    /// The same server, database and TLS settings, another login.
    pub fn with_login(&self, user: impl Into<String>, password: Password) -> Self {
        ConnectParams {
            user: user.into(),
            password,
            ..self.clone()
        }
    }
}

impl fmt::Debug for ConnectParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("dbname", &self.dbname)
            .field("ssl_mode", &self.ssl_mode)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("lock_timeout", &self.lock_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .finish_non_exhaustive()
    }
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The CA PEM held no usable certificate.
    #[error("invalid CA certificate for sslmode {ssl_mode}: {reason}")]
    CaCertificate {
        /// The requested mode.
        ssl_mode: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// Building the rustls configuration failed.
    #[error("TLS configuration: {0}")]
    TlsConfig(#[source] rustls::Error),
    /// The server did not finish connecting in time.
    #[error("connecting to {host}:{port} timed out after {after:?}")]
    Timeout {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// The bound that was hit.
        after: Duration,
    },
    /// The server rejected the login (wrong password, no such role, pg_hba, no CONNECT).
    #[error("connecting to {host}:{port} as {user} (database {dbname}) was refused: {source}")]
    Rejected {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// Login role.
        user: String,
        /// Database.
        dbname: String,
        /// The server's answer.
        source: PgError,
    },
    /// Network, TLS or protocol failure.
    #[error("connecting to {host}:{port}: {source}")]
    Unreachable {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// The failure.
        source: PgError,
    },
}

impl ConnectError {
    /// A short, stable category for Event reasons and metric labels.
    pub fn category(&self) -> &'static str {
        match self {
            ConnectError::CaCertificate { .. } | ConnectError::TlsConfig(_) => "TlsConfigInvalid",
            ConnectError::Timeout { .. } => "ConnectTimeout",
            ConnectError::Rejected { .. } => "ConnectRejected",
            ConnectError::Unreachable { .. } => "ServerUnreachable",
        }
    }

    /// The SQLSTATE the server sent, if it answered at all (`28P01` wrong password, `42501`
    /// no CONNECT privilege, `3D000` no such database, ...).
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ConnectError::Rejected { source, .. } | ConnectError::Unreachable { source, .. } => {
                source.sqlstate()
            }
            _ => None,
        }
    }
}

/// Opens a connection and spawns its driver task on the current runtime.
pub async fn connect(params: &ConnectParams) -> Result<Client, ConnectError> {
    let tls = MakeRustlsConnect::new(tls_config(params.ssl_mode, params.ca_pem.as_deref())?);

    let mut config = tokio_postgres::Config::new();
    config
        .host(&params.host)
        .port(params.port)
        .user(&params.user)
        .password(params.password.expose())
        .dbname(&params.dbname)
        .application_name(&params.application_name)
        .connect_timeout(params.connect_timeout)
        .ssl_mode(match params.ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            // tokio-postgres knows only disable/prefer/require; verification is rustls' job.
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });

    let mut options = Vec::new();
    if let Some(t) = params.lock_timeout {
        options.push(format!("-c lock_timeout={}", t.as_millis()));
    }
    if let Some(t) = params.statement_timeout {
        options.push(format!("-c statement_timeout={}", t.as_millis()));
    }
    if !options.is_empty() {
        config.options(options.join(" "));
    }

    // `connect_timeout` bounds only the TCP connect; a server that accepts and then stalls in
    // TLS or authentication must not hang a reconcile, so the whole handshake is bounded too.
    let connecting = config.connect(tls);
    let (client, connection) = match tokio::time::timeout(params.connect_timeout, connecting).await
    {
        Err(_) => {
            return Err(ConnectError::Timeout {
                host: params.host.clone(),
                port: params.port,
                after: params.connect_timeout,
            });
        }
        Ok(Err(e)) => {
            let source = PgError(e);
            return Err(if source.sqlstate().is_some() {
                ConnectError::Rejected {
                    host: params.host.clone(),
                    port: params.port,
                    user: params.user.clone(),
                    dbname: params.dbname.clone(),
                    source,
                }
            } else {
                ConnectError::Unreachable {
                    host: params.host.clone(),
                    port: params.port,
                    source,
                }
            });
        }
        Ok(Ok(pair)) => pair,
    };

    let (host, port, dbname) = (params.host.clone(), params.port, params.dbname.clone());
    tokio::spawn(async move {
        match connection.await {
            Ok(()) => debug!(%host, port, %dbname, "postgres connection closed"),
            Err(e) => {
                warn!(%host, port, %dbname, error = %PgError(e), "postgres connection failed")
            }
        }
    });
    debug!(host = %params.host, port = params.port, user = %params.user, dbname = %params.dbname,
        ssl_mode = params.ssl_mode.as_libpq(), "connected to postgres");
    Ok(client)
}

/// The rustls configuration for a mode (pure).
pub fn tls_config(ssl_mode: SslMode, ca_pem: Option<&[u8]>) -> Result<ClientConfig, ConnectError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(ConnectError::TlsConfig)?;
    let config = match ssl_mode {
        // With `disable` the connector is never used; any valid config will do.
        SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification {
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
        SslMode::VerifyFull => builder
            .with_root_certificates(root_store(ssl_mode, ca_pem)?)
            .with_no_client_auth(),
        SslMode::VerifyCa => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(root_store(ssl_mode, ca_pem)?),
                provider,
            )
            .build()
            .map_err(|e| ConnectError::CaCertificate {
                ssl_mode: ssl_mode.as_libpq(),
                reason: e.to_string(),
            })?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly { inner }))
                .with_no_client_auth()
        }
    };
    Ok(config)
}

fn root_store(ssl_mode: SslMode, ca_pem: Option<&[u8]>) -> Result<RootCertStore, ConnectError> {
    let invalid = |reason: String| ConnectError::CaCertificate {
        ssl_mode: ssl_mode.as_libpq(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    match ca_pem {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| invalid(e.to_string()))?;
                roots.add(cert).map_err(|e| invalid(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(invalid("no certificate found in the PEM".to_owned()));
            }
        }
    }
    Ok(roots)
}

/// `prefer`/`require`: encrypt, but accept any certificate, as libpq does. Handshake
/// signatures are still checked so the session keys belong to whoever holds the certificate.
#[derive(Debug)]
struct NoVerification {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NoVerification {
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `verify-ca`: the full web-PKI check except the host name. rustls checks the chain before the
/// name, so a name mismatch error means the chain was already accepted.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_modes_reject_a_pem_without_certificates() {
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let err = tls_config(mode, Some(b"not a pem")).unwrap_err();
            assert_eq!(err.category(), "TlsConfigInvalid");
        }
    }

    #[test]
    fn unverified_modes_need_no_ca() {
        for mode in [SslMode::Disable, SslMode::Prefer, SslMode::Require] {
            tls_config(mode, None).unwrap();
        }
        // verify-* without a CA fall back to the public roots.
        tls_config(SslMode::VerifyFull, None).unwrap();
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let p = ConnectParams::new("h", 5432, "u", Password::from_plaintext("s3cr3tpw"), "d");
        assert!(!format!("{p:?}").contains("s3cr3tpw"));
    }
}
