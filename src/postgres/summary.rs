//! Summaries of connection failures for status conditions and Events: a category (refused, timed out, authentication, TLS, DNS, ...) instead of the server's or the network stack's words (pure, no I/O).
//!
//! Whoever may create a ServiceDatabase chooses `external.host` and `port`. If status echoed the
//! raw failure ("Connection refused (os error 111)", a banner, a TLS alert, a server's message),
//! the operator would be a port scanner and banner grabber for the internal network. Status and
//! Events therefore carry only the category; the full error goes to the operator's own debug log.
//! Errors from a server after a successful login (SQL errors) are not connection failures and
//! are left as they are.

use std::error::Error as StdError;
use std::io;

use super::connect::ConnectError;

/// What kind of connection failure happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Nothing listens on the port.
    Refused,
    /// No answer in time.
    Timeout,
    /// No route to the host or network.
    Unreachable,
    /// The host name did not resolve.
    Dns,
    /// The server does not offer TLS but the mode requires it.
    TlsUnsupported,
    /// The server's certificate was not accepted.
    TlsCertificate,
    /// The TLS handshake failed otherwise.
    Tls,
    /// The operator's TLS settings are unusable (a bad `ca.crt`).
    TlsConfig,
    /// The login was refused (wrong password, no such role, pg_hba).
    Authentication,
    /// The server asked for cleartext or MD5, or skipped channel binding where it is required:
    /// refused by the client before anything secret was sent.
    InsecureAuthentication,
    /// The database does not exist.
    NoDatabase,
    /// The role may not connect to the database.
    Permission,
    /// The server has no free connection slots.
    TooManyConnections,
    /// The server is starting up or shutting down.
    NotAvailable,
    /// Any other error the server answered with, by SQLSTATE.
    Server(String),
    /// Anything else on the network or in the protocol.
    Network,
}

/// What is known about a failure, read from the error chain (see [`Evidence::of`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evidence {
    /// The SQLSTATE, when the server answered with an error.
    pub sqlstate: Option<String>,
    /// The first I/O error kind in the chain.
    pub io_kind: Option<io::ErrorKind>,
    /// Name resolution failed.
    pub dns: bool,
    /// The failure happened in the TLS handshake.
    pub tls: bool,
    /// The server said it does not support TLS.
    pub tls_unsupported: bool,
    /// A certificate was rejected.
    pub bad_certificate: bool,
    /// Authentication failed on the client side (SCRAM verification, unsupported method).
    pub authentication: bool,
}

impl Evidence {
    /// Walk an error chain. Library texts are compared only against the fixed strings
    /// tokio-postgres and the standard library use for these cases; nothing read here is ever
    /// shown.
    pub fn of(err: &(dyn StdError + 'static)) -> Evidence {
        let mut ev = Evidence::default();
        let mut current: Option<&(dyn StdError + 'static)> = Some(err);
        while let Some(e) = current {
            if let Some(pg) = e.downcast_ref::<tokio_postgres::Error>() {
                if let Some(code) = pg.code() {
                    ev.sqlstate.get_or_insert_with(|| code.code().to_owned());
                }
                match pg.to_string().as_str() {
                    "error performing TLS handshake" => ev.tls = true,
                    "authentication error" => ev.authentication = true,
                    _ => {}
                }
            }
            if let Some(io_err) = e.downcast_ref::<io::Error>() {
                ev.io_kind.get_or_insert(io_err.kind());
                let text = io_err.to_string();
                if text.starts_with("failed to lookup address information")
                    || text == "could not resolve any addresses"
                {
                    ev.dns = true;
                }
                if let Some(inner) = io_err.get_ref()
                    && inner.downcast_ref::<rustls::Error>().is_some()
                {
                    ev.tls = true;
                    if matches!(
                        inner.downcast_ref::<rustls::Error>(),
                        Some(rustls::Error::InvalidCertificate(_))
                    ) {
                        ev.bad_certificate = true;
                    }
                }
            }
            if let Some(tls_err) = e.downcast_ref::<rustls::Error>() {
                ev.tls = true;
                if matches!(tls_err, rustls::Error::InvalidCertificate(_)) {
                    ev.bad_certificate = true;
                }
            }
            if e.to_string() == "server does not support TLS" {
                ev.tls = true;
                ev.tls_unsupported = true;
            }
            current = e.source();
        }
        ev
    }

    /// The category (pure).
    pub fn failure(&self) -> ConnectFailure {
        if let Some(code) = &self.sqlstate {
            return match code.as_str() {
                "28P01" | "28000" => ConnectFailure::Authentication,
                "3D000" => ConnectFailure::NoDatabase,
                "42501" => ConnectFailure::Permission,
                "53300" => ConnectFailure::TooManyConnections,
                "57P03" | "57P01" => ConnectFailure::NotAvailable,
                other => ConnectFailure::Server(other.to_owned()),
            };
        }
        if self.tls_unsupported {
            return ConnectFailure::TlsUnsupported;
        }
        if self.bad_certificate {
            return ConnectFailure::TlsCertificate;
        }
        if self.tls {
            return ConnectFailure::Tls;
        }
        if self.authentication {
            return ConnectFailure::Authentication;
        }
        if self.dns {
            return ConnectFailure::Dns;
        }
        match self.io_kind {
            Some(io::ErrorKind::ConnectionRefused) => ConnectFailure::Refused,
            Some(io::ErrorKind::TimedOut) => ConnectFailure::Timeout,
            Some(io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable) => {
                ConnectFailure::Unreachable
            }
            _ => ConnectFailure::Network,
        }
    }
}

impl ConnectFailure {
    /// A short description, free of anything the server or the network said (pure).
    pub fn describe(&self, dbname: &str) -> String {
        match self {
            ConnectFailure::Refused => "connection refused".to_owned(),
            ConnectFailure::Timeout => "timed out".to_owned(),
            ConnectFailure::Unreachable => "host or network unreachable".to_owned(),
            ConnectFailure::Dns => "the host name could not be resolved".to_owned(),
            ConnectFailure::TlsUnsupported => {
                "TLS failed: the server does not support TLS".to_owned()
            }
            ConnectFailure::TlsCertificate => {
                "TLS failed: the server's certificate was not accepted".to_owned()
            }
            ConnectFailure::Tls => "TLS handshake failed".to_owned(),
            ConnectFailure::TlsConfig => {
                "invalid TLS settings (check ca.crt in the admin Secret)".to_owned()
            }
            ConnectFailure::Authentication => {
                "authentication failed (wrong user or password, or pg_hba.conf refused the login)"
                    .to_owned()
            }
            ConnectFailure::InsecureAuthentication => {
                "refused the server's authentication method (cleartext, MD5 or no channel binding); no password was sent"
                    .to_owned()
            }
            ConnectFailure::NoDatabase => format!("database {dbname} does not exist"),
            ConnectFailure::Permission => {
                format!("permission denied: the role may not connect to database {dbname}")
            }
            ConnectFailure::TooManyConnections => "the server has too many connections".to_owned(),
            ConnectFailure::NotAvailable => "the server is starting up or shutting down".to_owned(),
            ConnectFailure::Server(code) => {
                format!("the server refused the connection (SQLSTATE {code})")
            }
            ConnectFailure::Network => "network or protocol error".to_owned(),
        }
    }
}

impl ConnectError {
    /// The category of this failure.
    pub fn failure(&self) -> ConnectFailure {
        // `if let` rather than an exhaustive match: a variant added later falls back to
        // reading its error chain.
        if let ConnectError::Timeout { .. } = self {
            return ConnectFailure::Timeout;
        }
        if let ConnectError::CaCertificate { .. } | ConnectError::TlsConfig(_) = self {
            return ConnectFailure::TlsConfig;
        }
        if let ConnectError::InsecureAuthentication { .. } = self {
            return ConnectFailure::InsecureAuthentication;
        }
        Evidence::of(self).failure()
    }

    /// What status and Events say about this failure: where, as whom, and the category, never
    /// the server's or the network stack's text.
    pub fn summary(&self) -> String {
        let (target, dbname) = match self {
            ConnectError::Rejected {
                host,
                port,
                user,
                dbname,
                ..
            } => (format!("{host}:{port} as {user}"), dbname.as_str()),
            ConnectError::Unreachable { host, port, .. }
            | ConnectError::Socket { host, port, .. }
            | ConnectError::InsecureAuthentication { host, port, .. }
            | ConnectError::Timeout { host, port, .. } => (format!("{host}:{port}"), ""),
            _ => (String::new(), ""),
        };
        let what = self.failure().describe(dbname);
        if target.is_empty() {
            format!("could not connect: {what}")
        } else {
            format!("could not connect to {target}: {what}")
        }
    }
}

/// The user-facing text of any error that may wrap a [`ConnectError`] (`ProvisionError`,
/// `DeprovisionError`, `SlotError`, ...): the outer context is kept and the connection failure
/// replaced by its [`ConnectError::summary`]. Errors without a connection failure are shown as
/// they are.
pub fn user_message(err: &(dyn StdError + 'static)) -> String {
    let full = err.to_string();
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(ce) = e.downcast_ref::<ConnectError>() {
            let raw = ce.to_string();
            let context = full
                .strip_suffix(raw.as_str())
                .map(|c| c.trim_end_matches([' ', ':']))
                .filter(|c| !c.is_empty());
            return match context {
                Some(c) => format!("{c}: {}", ce.summary()),
                None => ce.summary(),
            };
        }
        current = e.source();
    }
    full
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ev() -> Evidence {
        Evidence::default()
    }

    #[test]
    fn failures_are_categorised_from_the_evidence() {
        let table: Vec<(Evidence, ConnectFailure)> = vec![
            (
                Evidence {
                    io_kind: Some(io::ErrorKind::ConnectionRefused),
                    ..ev()
                },
                ConnectFailure::Refused,
            ),
            (
                Evidence {
                    io_kind: Some(io::ErrorKind::TimedOut),
                    ..ev()
                },
                ConnectFailure::Timeout,
            ),
            (
                Evidence {
                    io_kind: Some(io::ErrorKind::HostUnreachable),
                    ..ev()
                },
                ConnectFailure::Unreachable,
            ),
            (
                Evidence {
                    io_kind: Some(io::ErrorKind::Other),
                    dns: true,
                    ..ev()
                },
                ConnectFailure::Dns,
            ),
            (
                Evidence {
                    tls: true,
                    tls_unsupported: true,
                    ..ev()
                },
                ConnectFailure::TlsUnsupported,
            ),
            (
                Evidence {
                    tls: true,
                    bad_certificate: true,
                    io_kind: Some(io::ErrorKind::InvalidData),
                    ..ev()
                },
                ConnectFailure::TlsCertificate,
            ),
            (
                Evidence {
                    tls: true,
                    io_kind: Some(io::ErrorKind::UnexpectedEof),
                    ..ev()
                },
                ConnectFailure::Tls,
            ),
            (
                Evidence {
                    authentication: true,
                    ..ev()
                },
                ConnectFailure::Authentication,
            ),
            (
                Evidence {
                    sqlstate: Some("28P01".into()),
                    ..ev()
                },
                ConnectFailure::Authentication,
            ),
            (
                Evidence {
                    sqlstate: Some("28000".into()),
                    ..ev()
                },
                ConnectFailure::Authentication,
            ),
            (
                Evidence {
                    sqlstate: Some("3D000".into()),
                    ..ev()
                },
                ConnectFailure::NoDatabase,
            ),
            (
                Evidence {
                    sqlstate: Some("42501".into()),
                    ..ev()
                },
                ConnectFailure::Permission,
            ),
            (
                Evidence {
                    sqlstate: Some("53300".into()),
                    ..ev()
                },
                ConnectFailure::TooManyConnections,
            ),
            (
                Evidence {
                    sqlstate: Some("57P03".into()),
                    ..ev()
                },
                ConnectFailure::NotAvailable,
            ),
            (
                Evidence {
                    sqlstate: Some("XX000".into()),
                    ..ev()
                },
                ConnectFailure::Server("XX000".into()),
            ),
            (
                Evidence {
                    io_kind: Some(io::ErrorKind::UnexpectedEof),
                    ..ev()
                },
                ConnectFailure::Network,
            ),
            (ev(), ConnectFailure::Network),
        ];
        for (evidence, expected) in table {
            assert_eq!(evidence.failure(), expected, "{evidence:?}");
        }
    }

    #[test]
    fn descriptions_name_the_category_and_nothing_else() {
        let table = [
            (ConnectFailure::Refused, "connection refused"),
            (ConnectFailure::Timeout, "timed out"),
            (ConnectFailure::Dns, "could not be resolved"),
            (ConnectFailure::Tls, "TLS"),
            (ConnectFailure::TlsCertificate, "certificate"),
            (ConnectFailure::Authentication, "authentication failed"),
            (ConnectFailure::NoDatabase, "database orders does not exist"),
            (ConnectFailure::Permission, "permission denied"),
            (ConnectFailure::Server("XX000".into()), "SQLSTATE XX000"),
            (ConnectFailure::Network, "network or protocol error"),
        ];
        for (failure, expected) in table {
            let text = failure.describe("orders");
            assert!(text.contains(expected), "{failure:?}: {text}");
        }
    }

    #[test]
    fn a_timeout_is_summarised_with_host_and_port() {
        let e = ConnectError::Timeout {
            host: "10.0.0.9".into(),
            port: 22,
            after: Duration::from_secs(5),
        };
        assert_eq!(e.failure(), ConnectFailure::Timeout);
        assert_eq!(e.summary(), "could not connect to 10.0.0.9:22: timed out");
    }

    #[test]
    fn a_bad_ca_is_a_tls_settings_problem() {
        let e = ConnectError::CaCertificate {
            ssl_mode: "verify-full",
            reason: "garbage from the Secret".into(),
        };
        assert_eq!(e.failure(), ConnectFailure::TlsConfig);
        assert!(!e.summary().contains("garbage"), "{}", e.summary());
    }

    /// A real refused connection: the raw error says "os error 111", the summary does not.
    #[tokio::test]
    async fn a_refused_connection_is_summarised_without_the_os_text() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let params = crate::postgres::ConnectParams {
            ssl_mode: crate::postgres::SslMode::Disable,
            connect_timeout: Duration::from_secs(5),
            ..crate::postgres::ConnectParams::new(
                "127.0.0.1",
                port,
                "u",
                crate::postgres::Password::from_plaintext("p"),
                "d",
            )
        };
        let err = crate::postgres::connect(&params).await.unwrap_err();
        assert!(err.to_string().contains("os error"), "{err}");
        assert_eq!(err.failure(), ConnectFailure::Refused);
        assert_eq!(
            err.summary(),
            format!("could not connect to 127.0.0.1:{port}: connection refused")
        );
    }

    /// A "server" that answers with a banner: nothing of it reaches the summary.
    #[tokio::test]
    async fn a_non_postgres_answer_is_not_echoed() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let _ = s
                    .write_all(b"SSH-2.0-OpenSSH_9.6 internal-bastion\r\n")
                    .await;
            }
        });
        let params = crate::postgres::ConnectParams {
            ssl_mode: crate::postgres::SslMode::Disable,
            connect_timeout: Duration::from_secs(5),
            ..crate::postgres::ConnectParams::new(
                "127.0.0.1",
                port,
                "u",
                crate::postgres::Password::from_plaintext("p"),
                "d",
            )
        };
        let err = crate::postgres::connect(&params).await.unwrap_err();
        let summary = err.summary();
        assert!(
            !summary.contains("SSH") && !summary.contains("bastion"),
            "{summary}"
        );
        assert!(summary.contains(&format!("127.0.0.1:{port}")), "{summary}");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("connecting to database orders: {source}")]
    struct Wrapper {
        #[source]
        source: ConnectError,
    }

    #[test]
    fn wrapped_connection_errors_keep_their_context() {
        let e = Wrapper {
            source: ConnectError::Timeout {
                host: "h".into(),
                port: 1,
                after: Duration::from_secs(1),
            },
        };
        assert_eq!(
            user_message(&e),
            "connecting to database orders: could not connect to h:1: timed out"
        );
        let plain = io::Error::other("permission denied to create role");
        assert_eq!(user_message(&plain), "permission denied to create role");
    }
}
