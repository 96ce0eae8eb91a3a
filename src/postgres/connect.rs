//! Opening a Postgres connection with libpq's `sslmode` semantics over rustls (does network I/O).
//!
//! The one client-side implementation of TLS and authentication policy: the operator's own
//! connections and the relay's (`crate::relay::pg`) both go through [`open`].
//!
//! | sslmode       | TLS                        | certificate checked            | channel binding |
//! |---------------|----------------------------|--------------------------------|-----------------|
//! | `disable`     | never                      | -                              | -               |
//! | `prefer`      | if the server offers it    | no (libpq's behaviour)         | when offered    |
//! | `require`     | always                     | no (libpq's behaviour)         | required        |
//! | `verify-ca`   | always                     | chain, against the CA          | required        |
//! | `verify-full` | always                     | chain and host name            | required        |
//!
//! "Channel binding required" is libpq's `channel_binding=require`: the server must
//! authenticate with SCRAM-SHA-256-PLUS bound to the TLS certificate it presented
//! (`tls-server-end-point`), so a man in the middle holding another certificate cannot relay the
//! exchange even where the certificate itself is not verified (`require`). It also means a
//! server that answers with `trust`, `password` or `md5` is refused.
//!
//! In every mode, including `disable` and `prefer` without TLS, a server asking for the password
//! in cleartext (`password`) or as MD5 is refused before anything is sent: the connection's
//! byte stream is watched by [`AuthGuard`] until authentication completes. SCRAM never reveals
//! the password, even to a fake server.
//!
//! For `verify-*` the CA is the PEM given in [`ConnectParams::ca_pem`] (an admin Secret's
//! `ca.crt`, a `caSecretRef`, the namespace CA of a managed instance, or `PGSSLROOTCERT`), or
//! the public web PKI roots when none is given (managed clouds that use public CAs).

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use sha2::Digest;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::Client;
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};
use tracing::{debug, warn};

pub use crate::api::service_database::SslMode;

use super::PgError;
use super::passwords::Password;

/// Default bound on establishing a connection (TCP, TLS and authentication together).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and as whom to connect. `Debug` never shows the password.
#[derive(Clone)]
pub struct ConnectParams {
    /// Host name or IP address; also the name the certificate is verified against. A path
    /// starting with `/` is a Unix-domain socket directory (no TLS there, as in libpq).
    pub host: String,
    /// libpq's `hostaddr`: the address to connect to instead of resolving `host`, which still
    /// names the server for certificate verification.
    pub hostaddr: Option<IpAddr>,
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
    /// TCP keepalive idle time; `None` leaves keepalives off (short-lived operator sessions).
    pub keepalive_idle: Option<Duration>,
    /// Session `search_path` (a fixed, operator-chosen list, never user text). The relay pins
    /// `pg_catalog` so nothing it runs resolves to an object someone else can create.
    pub search_path: Option<&'static str>,
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
            hostaddr: None,
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
            keepalive_idle: None,
            search_path: None,
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
            .field("hostaddr", &self.hostaddr)
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
    /// The server asked for an authentication method that could reveal the password or
    /// skips channel binding where it is required; nothing secret was sent.
    #[error("connecting to {host}:{port}: refused the server's authentication: {reason}")]
    InsecureAuthentication {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// What the server asked for.
        reason: String,
    },
    /// The socket could not be opened (DNS, connection refused, no route).
    #[error("connecting to {host}:{port}: {source}")]
    Socket {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// The failure.
        source: io::Error,
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
            ConnectError::Unreachable { .. } | ConnectError::Socket { .. } => "ServerUnreachable",
            ConnectError::InsecureAuthentication { .. } => "InsecureAuthentication",
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
    let (client, connection) = open(params).await?;
    let (host, port, dbname) = (params.host.clone(), params.port, params.dbname.clone());
    tokio::spawn(async move {
        match connection.await {
            Ok(()) => debug!(%host, port, %dbname, "postgres connection closed"),
            Err(e) => {
                warn!(%host, port, %dbname, error = %PgError(e), "postgres connection failed")
            }
        }
    });
    Ok(client)
}

/// A connection opened by [`open`]: drive it (await it, or poll its messages) for the client
/// to work.
pub type PgConnection =
    tokio_postgres::Connection<AuthGuard<Socket>, AuthGuard<TlsSession<AuthGuard<Socket>>>>;

/// Opens a connection and returns its driver for the caller to run (the relay polls it for
/// notifications). TLS, channel binding and the authentication guard follow the module table.
pub async fn open(params: &ConnectParams) -> Result<(Client, PgConnection), ConnectError> {
    let unix = params.host.starts_with('/');
    if unix && !matches!(params.ssl_mode, SslMode::Disable | SslMode::Prefer) {
        // libpq silently skips TLS on a Unix socket; a mode that promises TLS must not.
        return Err(ConnectError::CaCertificate {
            ssl_mode: params.ssl_mode.as_libpq(),
            reason: "TLS is not possible over a Unix-domain socket; use a TCP host".to_owned(),
        });
    }
    let tls_host = if unix {
        "localhost"
    } else {
        params.host.as_str()
    };
    let tls = PgTls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(tls_config(
            params.ssl_mode,
            params.ca_pem.as_deref(),
        )?)),
        server_name: ServerName::try_from(tls_host.to_owned()).map_err(|e| {
            ConnectError::CaCertificate {
                ssl_mode: params.ssl_mode.as_libpq(),
                reason: format!("{:?} is not a valid TLS server name: {e}", params.host),
            }
        })?,
    };

    // Over a Unix socket there is no TLS to negotiate (and a `prefer` SSLRequest would be
    // answered `N` anyway); everything else is libpq's meaning.
    let (tls_mode, channel_binding) = match (unix, params.ssl_mode) {
        (true, _) | (_, SslMode::Disable) => (
            tokio_postgres::config::SslMode::Disable,
            tokio_postgres::config::ChannelBinding::Disable,
        ),
        (false, SslMode::Prefer) => (
            tokio_postgres::config::SslMode::Prefer,
            tokio_postgres::config::ChannelBinding::Prefer,
        ),
        // tokio-postgres knows only disable/prefer/require; verification is rustls' job.
        (false, SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull) => (
            tokio_postgres::config::SslMode::Require,
            tokio_postgres::config::ChannelBinding::Require,
        ),
    };
    let mut config = tokio_postgres::Config::new();
    config
        .user(&params.user)
        .password(params.password.expose())
        .dbname(&params.dbname)
        .application_name(&params.application_name)
        .ssl_mode(tls_mode)
        .channel_binding(channel_binding);

    let mut options = Vec::new();
    if let Some(t) = params.lock_timeout {
        options.push(format!("-c lock_timeout={}", t.as_millis()));
    }
    if let Some(t) = params.statement_timeout {
        options.push(format!("-c statement_timeout={}", t.as_millis()));
    }
    if let Some(path) = params.search_path {
        options.push(format!("-c search_path={path}"));
    }
    if !options.is_empty() {
        config.options(options.join(" "));
    }

    // One bound on the whole handshake: a server that accepts and then stalls in TLS or
    // authentication must not hang a reconcile.
    let connecting = async {
        let socket = Socket::open(params)
            .await
            .map_err(|source| ConnectError::Socket {
                host: params.host.clone(),
                port: params.port,
                source,
            })?;
        let guarded = AuthGuard::new(socket, tls_mode != tokio_postgres::config::SslMode::Disable);
        config
            .connect_raw(guarded, tls)
            .await
            .map_err(|e| classify(params, e))
    };
    let pair = match tokio::time::timeout(params.connect_timeout, connecting).await {
        Err(_) => {
            return Err(ConnectError::Timeout {
                host: params.host.clone(),
                port: params.port,
                after: params.connect_timeout,
            });
        }
        Ok(result) => result?,
    };
    debug!(host = %params.host, port = params.port, user = %params.user, dbname = %params.dbname,
        ssl_mode = params.ssl_mode.as_libpq(), "connected to postgres");
    Ok(pair)
}

/// Sorts a failed handshake into the caller-facing categories.
fn classify(params: &ConnectParams, e: tokio_postgres::Error) -> ConnectError {
    use std::error::Error as _;
    let refused = e
        .source()
        .and_then(|s| s.downcast_ref::<io::Error>())
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<AuthRefused>())
        .map(|r| r.0.to_owned());
    // tokio-postgres' own refusal under `channel_binding=require` (trust, password, md5, or
    // SCRAM without -PLUS); it has no public error kind, so its fixed message is matched.
    let source = PgError(e);
    let unbound = source
        .to_string()
        .contains("server did not use channel binding");
    if let Some(reason) = refused {
        return ConnectError::InsecureAuthentication {
            host: params.host.clone(),
            port: params.port,
            reason,
        };
    }
    if unbound {
        return ConnectError::InsecureAuthentication {
            host: params.host.clone(),
            port: params.port,
            reason: "the server did not authenticate with SCRAM-SHA-256-PLUS (channel binding), \
                     which sslmode require, verify-ca and verify-full need"
                .to_owned(),
        };
    }
    if source.sqlstate().is_some() {
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
    }
}

/// The client's socket: TCP, or a Unix-domain socket when the host is a directory.
#[derive(Debug)]
pub enum Socket {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix-domain socket connection.
    Unix(UnixStream),
}

impl Socket {
    async fn open(params: &ConnectParams) -> io::Result<Socket> {
        if params.host.starts_with('/') {
            let path = format!(
                "{}/.s.PGSQL.{}",
                params.host.trim_end_matches('/'),
                params.port
            );
            return Ok(Socket::Unix(UnixStream::connect(path).await?));
        }
        let tcp = match params.hostaddr {
            Some(addr) => TcpStream::connect((addr, params.port)).await?,
            None => TcpStream::connect((params.host.as_str(), params.port)).await?,
        };
        tcp.set_nodelay(true)?;
        if let Some(idle) = params.keepalive_idle {
            socket2::SockRef::from(&tcp)
                .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(idle))?;
        }
        Ok(Socket::Tcp(tcp))
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The error [`AuthGuard`] ends a connection with; its text says what the server asked for.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthRefused(&'static str);

/// Watches the server's side of a connection until authentication completes and fails the
/// read that carries an `AuthenticationCleartextPassword` or `AuthenticationMD5Password`
/// request, so the client never answers it. After `AuthenticationOk` it only passes bytes on.
///
/// Below TLS it is created expecting the one-byte answer to an SSLRequest: `S` means TLS
/// follows (and the guard above the TLS session takes over), `N` means the plaintext protocol
/// goes on here and is watched.
#[derive(Debug)]
pub struct AuthGuard<S> {
    inner: S,
    state: GuardState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GuardState {
    /// The next server byte answers the SSLRequest.
    SslAnswer,
    /// Reading a message header (type byte and length); `have` bytes of it seen.
    Header { have: u8, kind: u8, len: [u8; 4] },
    /// Reading the auth request code of an `R` message of body length `body`.
    AuthCode { have: u8, code: [u8; 4], body: u32 },
    /// Skipping `left` bytes of the current message body.
    Skip { left: u32 },
    /// Authentication finished (or TLS took over): bytes pass untouched.
    Done,
}

impl<S> AuthGuard<S> {
    /// A guard on a fresh connection; `ssl_request` says whether the client starts with an
    /// SSLRequest (whose one-byte answer is not a message).
    pub fn new(inner: S, ssl_request: bool) -> Self {
        let state = if ssl_request {
            GuardState::SslAnswer
        } else {
            GuardState::Header {
                have: 0,
                kind: 0,
                len: [0; 4],
            }
        };
        AuthGuard { inner, state }
    }

    /// Feeds bytes the server sent; an error means the connection must end.
    fn inspect(&mut self, bytes: &[u8]) -> Result<(), AuthRefused> {
        for &b in bytes {
            self.state = match self.state {
                GuardState::Done => return Ok(()),
                GuardState::SslAnswer => match b {
                    b'S' => GuardState::Done,
                    b'N' => GuardState::Header {
                        have: 0,
                        kind: 0,
                        len: [0; 4],
                    },
                    // An old server's ErrorResponse to the SSLRequest: read it as a message.
                    other => GuardState::Header {
                        have: 1,
                        kind: other,
                        len: [0; 4],
                    },
                },
                GuardState::Header { have: 0, .. } => GuardState::Header {
                    have: 1,
                    kind: b,
                    len: [0; 4],
                },
                GuardState::Header {
                    have,
                    kind,
                    mut len,
                } => {
                    len[usize::from(have - 1)] = b;
                    if have < 4 {
                        GuardState::Header {
                            have: have + 1,
                            kind,
                            len,
                        }
                    } else {
                        let body = u32::from_be_bytes(len).saturating_sub(4);
                        match (kind, body) {
                            (b'R', 4..) => GuardState::AuthCode {
                                have: 0,
                                code: [0; 4],
                                body,
                            },
                            (_, 0) => GuardState::Header {
                                have: 0,
                                kind: 0,
                                len: [0; 4],
                            },
                            (_, left) => GuardState::Skip { left },
                        }
                    }
                }
                GuardState::AuthCode {
                    have,
                    mut code,
                    body,
                } => {
                    code[usize::from(have)] = b;
                    if have < 3 {
                        GuardState::AuthCode {
                            have: have + 1,
                            code,
                            body,
                        }
                    } else {
                        match i32::from_be_bytes(code) {
                            0 => GuardState::Done,
                            3 => {
                                return Err(AuthRefused(
                                    "the server asked for the password in cleartext \
                                     (pg_hba method `password`); only SCRAM is answered",
                                ));
                            }
                            5 => {
                                return Err(AuthRefused(
                                    "the server asked for an MD5 password hash (pg_hba method \
                                     `md5` with an MD5-stored password); only SCRAM is answered",
                                ));
                            }
                            _ if body > 4 => GuardState::Skip { left: body - 4 },
                            _ => GuardState::Header {
                                have: 0,
                                kind: 0,
                                len: [0; 4],
                            },
                        }
                    }
                }
                GuardState::Skip { left } => {
                    if left > 1 {
                        GuardState::Skip { left: left - 1 }
                    } else {
                        GuardState::Header {
                            have: 0,
                            kind: 0,
                            len: [0; 4],
                        }
                    }
                }
            };
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.state != GuardState::Done
                    && let Err(refused) = this.inspect(&buf.filled()[before..])
                {
                    // The bytes read are dropped with the connection: the client never sees
                    // the request, so it never answers it.
                    buf.set_filled(before);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        refused,
                    )));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: TlsStream + Unpin> TlsStream for AuthGuard<S> {
    fn channel_binding(&self) -> ChannelBinding {
        self.inner.channel_binding()
    }
}

/// The TLS connector [`open`] uses: rustls, with an [`AuthGuard`] above the session.
///
/// Our own rather than tokio-postgres-rustls 0.13, whose channel binding parses the whole
/// certificate as a `TbsCertificate`, fails, and so never offers `tls-server-end-point`:
/// `channel_binding=require` could then never succeed.
pub struct PgTls {
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
}

impl<S> TlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = AuthGuard<TlsSession<S>>;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<Self::Stream>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let session = self.connector.connect(self.server_name, stream).await?;
            // A fresh TLS session starts with the server's first protocol message.
            Ok(AuthGuard::new(TlsSession(session), false))
        })
    }
}

/// A client TLS session that knows its RFC 5929 `tls-server-end-point` channel binding.
pub struct TlsSession<S>(tokio_rustls::client::TlsStream<S>);

impl<S> TlsSession<S> {
    /// The hash of the server's certificate with the hash function of its signature algorithm,
    /// MD5 and SHA-1 upgraded to SHA-256 (RFC 5929 section 4.1), as Postgres computes it. `None`
    /// for algorithms Postgres cannot bind to (Ed25519, RSA-PSS): such a server offers no
    /// SCRAM-SHA-256-PLUS, and channel binding then fails closed.
    fn end_point_hash(&self) -> Option<Vec<u8>> {
        use x509_cert::der::Decode;
        let (_, conn) = self.0.get_ref();
        let der = conn.peer_certificates()?.first()?;
        let cert = x509_cert::Certificate::from_der(der.as_ref()).ok()?;
        let hash = match cert.signature_algorithm.oid.to_string().as_str() {
            // md5WithRSA, sha1WithRSA, sha256WithRSA, ecdsa-with-SHA1, ecdsa-with-SHA256
            "1.2.840.113549.1.1.4"
            | "1.2.840.113549.1.1.5"
            | "1.2.840.113549.1.1.11"
            | "1.2.840.10045.4.1"
            | "1.2.840.10045.4.3.2" => sha2::Sha256::digest(der.as_ref()).to_vec(),
            // sha384WithRSA, ecdsa-with-SHA384
            "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => {
                sha2::Sha384::digest(der.as_ref()).to_vec()
            }
            // sha512WithRSA, ecdsa-with-SHA512
            "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => {
                sha2::Sha512::digest(der.as_ref()).to_vec()
            }
            _ => return None,
        };
        Some(hash)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for TlsSession<S> {
    fn channel_binding(&self) -> ChannelBinding {
        match self.end_point_hash() {
            Some(hash) => ChannelBinding::tls_server_end_point(hash),
            None => ChannelBinding::none(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsSession<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsSession<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
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
    pem_root_store(ca_pem).map_err(|reason| ConnectError::CaCertificate {
        ssl_mode: ssl_mode.as_libpq(),
        reason,
    })
}

/// The trust anchors for a server certificate: every certificate in `ca_pem`, or the public
/// web roots when no CA is given. Shared by every TLS client of the crate (Postgres, Kafka
/// Connect); the error says what is wrong with the PEM, never its content.
pub fn pem_root_store(ca_pem: Option<&[u8]>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match ca_pem {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| e.to_string())?;
                roots.add(cert).map_err(|e| e.to_string())?;
            }
            if roots.is_empty() {
                return Err("no certificate found in the PEM".to_owned());
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

    fn auth_request(code: i32, extra: &[u8]) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend_from_slice(&(8 + extra.len() as u32).to_be_bytes());
        m.extend_from_slice(&code.to_be_bytes());
        m.extend_from_slice(extra);
        m
    }

    #[test]
    fn the_guard_refuses_cleartext_and_md5_requests_however_the_bytes_are_split() {
        for (code, extra) in [(3, &b""[..]), (5, &b"salt"[..])] {
            // A notice first, then the request; fed whole and one byte at a time.
            let mut stream = vec![b'N', 0, 0, 0, 6, b'x', 0];
            stream.extend(auth_request(code, extra));
            let mut whole = AuthGuard::new((), false);
            assert!(whole.inspect(&stream).is_err(), "code {code}");
            let mut bytewise = AuthGuard::new((), false);
            let refused = stream.iter().any(|b| bytewise.inspect(&[*b]).is_err());
            assert!(refused, "code {code} byte by byte");
        }
    }

    #[test]
    fn the_guard_lets_scram_through_and_stops_watching_after_authentication_ok() {
        let mut g = AuthGuard::new((), true);
        let mut stream = vec![b'N'];
        stream.extend(auth_request(10, b"SCRAM-SHA-256\0\0"));
        stream.extend(auth_request(11, b"r=abc"));
        stream.extend(auth_request(12, b"v=xyz"));
        stream.extend(auth_request(0, b""));
        g.inspect(&stream).unwrap();
        assert_eq!(g.state, GuardState::Done);
        // After authentication, application data that looks like a request is not inspected.
        g.inspect(&auth_request(3, b"")).unwrap();
    }

    #[test]
    fn the_guard_below_tls_hands_over_when_the_server_accepts_tls() {
        let mut g = AuthGuard::new((), true);
        // 'S', then TLS records (arbitrary bytes) must pass.
        g.inspect(&[b'S', 0x16, 3, 3, 0, 5, b'R', 0, 0, 0, 8, 0, 0, 0, 3])
            .unwrap();
        assert_eq!(g.state, GuardState::Done);
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let p = ConnectParams::new("h", 5432, "u", Password::from_plaintext("s3cr3tpw"), "d");
        assert!(!format!("{p:?}").contains("s3cr3tpw"));
    }
}
