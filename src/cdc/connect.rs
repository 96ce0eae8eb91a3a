//! A Kafka Connect REST client for the operator's connectors (does network I/O).
//!
//! Built on the hyper + rustls stack that `kube` already links (no extra HTTP crate). Every
//! call is bounded by a timeout covering connect, TLS, request and the whole response body;
//! answers larger than [`MAX_RESPONSE_BYTES`] are refused. Optional basic auth (the header is
//! marked sensitive) and a CA bundle for `https://` (the public web PKI roots otherwise).
//!
//! Nothing this module returns carries a password: the basic-auth password and any strings
//! given in [`ConnectSettings::redact`] are scrubbed from every server-provided text (error
//! messages, task traces) before it reaches an error, a status or a log line. Connector configs
//! themselves never contain the database password (see [`super::config`]).
//!
//! [`ConnectClient::converge`] is the idempotent registration: it reads the config Connect holds
//! and PUTs only on a difference, so a no-op resync costs one GET and no write.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tracing::{debug, info};

use super::config::ConnectorConfig;
use crate::postgres::Password;

/// Default bound on one REST call (connect + TLS + request + response body).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on establishing the TCP connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response body accepted; Connect's answers for one connector are a few KiB.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Longest server-provided text (error message, trace line) kept.
pub const MAX_MESSAGE_LEN: usize = 500;

/// How often [`ConnectClient::delete`] polls for STOPPED (every 500 ms) before resetting offsets.
const STOP_POLLS: u32 = 60;

/// Basic-auth credentials for Connect's REST API (`rest.extension.classes` with JAAS, or a
/// proxy in front of it). `Debug` hides the password.
#[derive(Clone)]
pub struct BasicAuth {
    /// User name.
    pub username: String,
    /// Password.
    pub password: Password,
}

impl fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BasicAuth")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Where and how to reach a Kafka Connect cluster.
#[derive(Clone, Debug)]
pub struct ConnectSettings {
    /// Base URL of the REST API (`http://connect.kafka:8083`, or `https://...`; a path prefix
    /// is kept for Connect behind a proxy). Credentials in the URL are refused: use
    /// [`ConnectSettings::basic_auth`].
    pub url: String,
    /// Optional basic auth.
    pub basic_auth: Option<BasicAuth>,
    /// PEM CA bundle to verify an `https://` Connect against; the web PKI roots when `None`.
    pub ca_pem: Option<Vec<u8>>,
    /// Bound on each call.
    pub timeout: Duration,
    /// Bound on the TCP connect.
    pub connect_timeout: Duration,
    /// Further secrets (the cdc role's password) scrubbed from any text Connect returns, in
    /// case a connector's error echoes one.
    pub redact: Vec<Password>,
}

impl ConnectSettings {
    /// Settings for `url` with the default timeouts, no auth, no CA bundle.
    pub fn new(url: impl Into<String>) -> Self {
        ConnectSettings {
            url: url.into(),
            basic_auth: None,
            ca_pem: None,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            redact: Vec::new(),
        }
    }
}

/// Which REST call failed, for messages and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// `GET /connectors/{name}/config`.
    GetConfig,
    /// `PUT /connectors/{name}/config`.
    PutConfig,
    /// `GET /connectors/{name}/status`.
    Status,
    /// `POST /connectors/{name}/restart`.
    Restart,
    /// `PUT /connectors/{name}/stop`.
    Stop,
    /// `DELETE /connectors/{name}/offsets`.
    ResetOffsets,
    /// `DELETE /connectors/{name}`.
    Delete,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::GetConfig => "reading the config of",
            Operation::PutConfig => "writing the config of",
            Operation::Status => "reading the status of",
            Operation::Restart => "restarting",
            Operation::Stop => "stopping",
            Operation::ResetOffsets => "resetting the offsets of",
            Operation::Delete => "deleting",
        })
    }
}

/// Why a Kafka Connect call failed. No variant carries a password: server texts are scrubbed
/// and credentials are never part of a URL.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The settings cannot work (bad URL, unusable CA bundle).
    #[error("invalid Kafka Connect settings: {0}")]
    InvalidSettings(String),
    /// No HTTP answer: connection refused, DNS, TLS handshake.
    #[error("Kafka Connect unreachable while {op} connector {connector}: {reason}")]
    Unreachable {
        /// The call.
        op: Operation,
        /// The connector.
        connector: String,
        /// What failed.
        reason: String,
    },
    /// No complete answer within the timeout.
    #[error("Kafka Connect did not answer within {after:?} while {op} connector {connector}")]
    Timeout {
        /// The call.
        op: Operation,
        /// The connector.
        connector: String,
        /// The bound.
        after: Duration,
    },
    /// An HTTP error status, with Connect's message.
    #[error("Kafka Connect answered {status} while {op} connector {connector}: {message}")]
    Status {
        /// The call.
        op: Operation,
        /// The connector.
        connector: String,
        /// The HTTP status.
        status: u16,
        /// Connect's `message` (scrubbed, shortened).
        message: String,
    },
    /// An answer that is not what Connect's API documents.
    #[error("unexpected answer from Kafka Connect while {op} connector {connector}: {reason}")]
    Decode {
        /// The call.
        op: Operation,
        /// The connector.
        connector: String,
        /// What was wrong.
        reason: String,
    },
}

impl ConnectError {
    /// A short, stable category for Event reasons, condition reasons and metric labels.
    pub fn category(&self) -> &'static str {
        match self {
            ConnectError::InvalidSettings(_) => "InvalidKafkaConnectSettings",
            ConnectError::Unreachable { .. } => "KafkaConnectUnreachable",
            ConnectError::Timeout { .. } => "KafkaConnectTimeout",
            ConnectError::Status { status, .. } => match *status {
                400 | 422 => "ConnectorConfigRejected",
                401 | 403 => "KafkaConnectUnauthorized",
                409 => "KafkaConnectRebalancing",
                _ => "KafkaConnectError",
            },
            ConnectError::Decode { .. } => "KafkaConnectBadResponse",
        }
    }

    /// True when Connect could not be asked (down, slow, rebalancing, 5xx): the connector's
    /// state is unknown (`CdcReady=Unknown`), not known to be bad. Retry with backoff.
    pub fn is_unavailable(&self) -> bool {
        match self {
            ConnectError::Unreachable { .. } | ConnectError::Timeout { .. } => true,
            ConnectError::Status { status, .. } => *status == 409 || *status >= 500,
            ConnectError::InvalidSettings(_) | ConnectError::Decode { .. } => false,
        }
    }
}

/// What [`ConnectClient::converge`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Connect already held the desired config: no write.
    Unchanged,
    /// The connector did not exist and was created.
    Created,
    /// The connector existed with another config, which was replaced.
    Updated,
}

/// How many calls of each kind a client has made (for tests and the benchmark: a no-op resync
/// must make no PUT).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// GETs (config and status).
    pub get: u64,
    /// PUTs.
    pub put: u64,
    /// POSTs (restarts).
    pub post: u64,
    /// DELETEs.
    pub delete: u64,
}

#[derive(Default, Debug)]
struct Counters {
    get: AtomicU64,
    put: AtomicU64,
    post: AtomicU64,
    delete: AtomicU64,
}

/// A connector's or task's state as Connect reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Not yet assigned to a worker.
    Unassigned,
    /// Running.
    Running,
    /// Paused by an administrator.
    Paused,
    /// Failed; see the trace.
    Failed,
    /// Being restarted.
    Restarting,
    /// Stopped by an administrator (config kept, no tasks).
    Stopped,
    /// A state this client does not know (newer Connect).
    Other(String),
}

impl State {
    fn parse(s: &str) -> State {
        match s {
            "UNASSIGNED" => State::Unassigned,
            "RUNNING" => State::Running,
            "PAUSED" => State::Paused,
            "FAILED" => State::Failed,
            "RESTARTING" => State::Restarting,
            "STOPPED" => State::Stopped,
            other => State::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Unassigned => "UNASSIGNED",
            State::Running => "RUNNING",
            State::Paused => "PAUSED",
            State::Failed => "FAILED",
            State::Restarting => "RESTARTING",
            State::Stopped => "STOPPED",
            State::Other(s) => s,
        })
    }
}

/// The useful part of a Java stack trace: its first line, and the last `Caused by:` line (the
/// root cause, usually the one that names the real problem).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    /// The first line (exception class and message), shortened.
    pub first_line: String,
    /// The innermost `Caused by:` line without that prefix, when there is one.
    pub root_cause: Option<String>,
}

impl Trace {
    fn parse(trace: &str, scrub: &dyn Fn(&str) -> String) -> Option<Trace> {
        let first = trace.lines().map(str::trim).find(|l| !l.is_empty())?;
        let root_cause = trace
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("Caused by:"))
            .map(|l| scrub(l.trim()));
        Some(Trace {
            first_line: scrub(first),
            root_cause,
        })
    }
}

impl fmt::Display for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.first_line)?;
        if let Some(cause) = &self.root_cause {
            write!(f, " (caused by: {cause})")?;
        }
        Ok(())
    }
}

/// The connector's or one task's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskState {
    /// Task id (`None` for the connector itself).
    pub id: Option<i32>,
    /// The state.
    pub state: State,
    /// The worker running it (`127.0.0.1:8083`).
    pub worker_id: Option<String>,
    /// The failure's trace, when FAILED.
    pub trace: Option<Trace>,
}

/// `GET /connectors/{name}/status`, typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectorStatus {
    /// The connector's name.
    pub name: String,
    /// The connector instance.
    pub connector: TaskState,
    /// Its tasks (Debezium's Postgres connector has one).
    pub tasks: Vec<TaskState>,
}

/// What a status means for `CdcReady`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// The connector and every task (at least one) are RUNNING.
    Running,
    /// The connector or a task FAILED; `reason` names which and the trace's first line
    /// (scrubbed). A restart may help.
    Failed {
        /// Human-readable, one line.
        reason: String,
    },
    /// Neither running nor failed: starting, rebalancing, paused, stopped, or no task yet.
    NotRunning {
        /// Human-readable, one line.
        reason: String,
    },
}

#[derive(Deserialize)]
struct RawStatus {
    name: String,
    connector: RawState,
    #[serde(default)]
    tasks: Vec<RawState>,
}

#[derive(Deserialize)]
struct RawState {
    #[serde(default)]
    id: Option<i32>,
    state: String,
    #[serde(default)]
    worker_id: Option<String>,
    #[serde(default)]
    trace: Option<String>,
}

impl ConnectorStatus {
    /// Parses a status answer; `scrub` is applied to every trace line kept.
    pub fn parse(body: &[u8], scrub: &dyn Fn(&str) -> String) -> Result<Self, serde_json::Error> {
        let raw: RawStatus = serde_json::from_slice(body)?;
        let convert = |r: RawState| TaskState {
            id: r.id,
            state: State::parse(&r.state),
            worker_id: r.worker_id,
            trace: r.trace.as_deref().and_then(|t| Trace::parse(t, scrub)),
        };
        Ok(ConnectorStatus {
            name: raw.name,
            connector: convert(raw.connector),
            tasks: raw.tasks.into_iter().map(convert).collect(),
        })
    }

    /// The tasks in state FAILED.
    pub fn failed_tasks(&self) -> impl Iterator<Item = &TaskState> {
        self.tasks.iter().filter(|t| t.state == State::Failed)
    }

    /// What this status means for readiness (pure). A failed connector or task wins over
    /// anything not running, so a FAILED task is reported even while another restarts.
    pub fn health(&self) -> Health {
        let describe = |what: String, t: &TaskState| match &t.trace {
            Some(trace) => format!("{what} FAILED: {trace}"),
            None => format!("{what} FAILED"),
        };
        if self.connector.state == State::Failed {
            return Health::Failed {
                reason: shorten(&describe("connector".to_owned(), &self.connector)),
            };
        }
        if let Some(t) = self.failed_tasks().next() {
            let what = format!("task {}", t.id.unwrap_or_default());
            return Health::Failed {
                reason: shorten(&describe(what, t)),
            };
        }
        if self.connector.state != State::Running {
            return Health::NotRunning {
                reason: format!("connector is {}", self.connector.state),
            };
        }
        if self.tasks.is_empty() {
            return Health::NotRunning {
                reason: "connector is RUNNING but has no task yet".to_owned(),
            };
        }
        if let Some(t) = self.tasks.iter().find(|t| t.state != State::Running) {
            return Health::NotRunning {
                reason: format!("task {} is {}", t.id.unwrap_or_default(), t.state),
            };
        }
        Health::Running
    }
}

/// True when Connect's stored `actual` config is `desired` (pure). Connect echoes the
/// connector's `name` inside the config; that key is ignored when it matches.
pub fn config_matches(desired: &ConnectorConfig, actual: &BTreeMap<String, String>) -> bool {
    let mut actual = actual.clone();
    if actual.get("name") == Some(&desired.name) {
        actual.remove("name");
    }
    actual == desired.config
}

/// A client for one Kafka Connect cluster. Cheap to clone (shares the connection pool and the
/// request counters).
#[derive(Clone)]
pub struct ConnectClient {
    base: String,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    auth: Option<HeaderValue>,
    timeout: Duration,
    redact: Arc<Vec<String>>,
    counters: Arc<Counters>,
}

impl fmt::Debug for ConnectClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectClient")
            .field("base", &self.base)
            .field("auth", &self.auth.as_ref().map(|_| "<basic>"))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ConnectClient {
    /// A client for `settings` (no I/O yet).
    pub fn new(settings: &ConnectSettings) -> Result<Self, ConnectError> {
        let base = base_url(&settings.url)?;
        let tls = tls_config(settings.ca_pem.as_deref())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(settings.connect_timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        let mut redact: Vec<String> = settings
            .redact
            .iter()
            .map(|p| p.expose().to_owned())
            .collect();
        let auth = match &settings.basic_auth {
            None => None,
            Some(a) => {
                redact.push(a.password.expose().to_owned());
                let token = base64::engine::general_purpose::STANDARD.encode(format!(
                    "{}:{}",
                    a.username,
                    a.password.expose()
                ));
                let mut v = HeaderValue::from_str(&format!("Basic {token}")).map_err(|_| {
                    ConnectError::InvalidSettings(
                        "basic-auth credentials are not valid in an HTTP header".to_owned(),
                    )
                })?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        // Scrubbing an empty string would mangle every message.
        redact.retain(|s| !s.is_empty());
        Ok(ConnectClient {
            base,
            http: client,
            auth,
            timeout: settings.timeout,
            redact: Arc::new(redact),
            counters: Arc::new(Counters::default()),
        })
    }

    /// The calls made so far by this client and its clones.
    pub fn request_counts(&self) -> RequestCounts {
        RequestCounts {
            get: self.counters.get.load(Ordering::Relaxed),
            put: self.counters.put.load(Ordering::Relaxed),
            post: self.counters.post.load(Ordering::Relaxed),
            delete: self.counters.delete.load(Ordering::Relaxed),
        }
    }

    /// The config Connect holds for `name` (with the `name` key it echoes), `None` when there
    /// is no such connector. Config-provider references come back unresolved.
    pub async fn get_config(
        &self,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, ConnectError> {
        let op = Operation::GetConfig;
        let (status, body) = self
            .send(
                op,
                name,
                Method::GET,
                &connector_path(name, "/config"),
                None,
            )
            .await?;
        match status {
            StatusCode::OK => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| self.decode(op, name, e)),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.status_error(op, name, status, &body)),
        }
    }

    /// `PUT /connectors/{name}/config`: creates or replaces the connector (idempotent on
    /// Connect's side). Returns [`Outcome::Created`] or [`Outcome::Updated`].
    pub async fn put_config(&self, desired: &ConnectorConfig) -> Result<Outcome, ConnectError> {
        let op = Operation::PutConfig;
        let name = desired.name.as_str();
        let body = serde_json::to_vec(&desired.config).map_err(|e| self.decode(op, name, e))?;
        let (status, resp) = self
            .send(
                op,
                name,
                Method::PUT,
                &connector_path(name, "/config"),
                Some(body),
            )
            .await?;
        match status {
            StatusCode::CREATED => Ok(Outcome::Created),
            StatusCode::OK => Ok(Outcome::Updated),
            _ => Err(self.status_error(op, name, status, &resp)),
        }
    }

    /// Makes Connect hold `desired`, writing only when what it holds differs: a no-op costs
    /// one GET and no PUT (no connector restart, no rebalance).
    pub async fn converge(&self, desired: &ConnectorConfig) -> Result<Outcome, ConnectError> {
        if let Some(actual) = self.get_config(&desired.name).await?
            && config_matches(desired, &actual)
        {
            debug!(connector = %desired.name, "connector config unchanged");
            return Ok(Outcome::Unchanged);
        }
        let outcome = self.put_config(desired).await?;
        info!(connector = %desired.name, ?outcome, "registered connector config");
        Ok(outcome)
    }

    /// The connector's and its tasks' states; `None` when there is no such connector.
    pub async fn status(&self, name: &str) -> Result<Option<ConnectorStatus>, ConnectError> {
        let op = Operation::Status;
        let (status, body) = self
            .send(
                op,
                name,
                Method::GET,
                &connector_path(name, "/status"),
                None,
            )
            .await?;
        match status {
            StatusCode::OK => ConnectorStatus::parse(&body, &|s| self.scrub(s))
                .map(Some)
                .map_err(|e| self.decode(op, name, e)),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.status_error(op, name, status, &body)),
        }
    }

    /// Restarts the failed parts of the connector (`includeTasks=true&onlyFailed=true`):
    /// running tasks are left alone. `Ok(false)` when there is no such connector.
    pub async fn restart_failed(&self, name: &str) -> Result<bool, ConnectError> {
        self.restart(name, true).await
    }

    /// Restarts the connector and every task, running or not (after the password the worker
    /// resolved at task start was rotated). `Ok(false)` when there is no such connector.
    pub async fn restart_all(&self, name: &str) -> Result<bool, ConnectError> {
        self.restart(name, false).await
    }

    async fn restart(&self, name: &str, only_failed: bool) -> Result<bool, ConnectError> {
        let op = Operation::Restart;
        let path = connector_path(
            name,
            &format!("/restart?includeTasks=true&onlyFailed={only_failed}"),
        );
        let (status, body) = self.send(op, name, Method::POST, &path, None).await?;
        match status {
            StatusCode::OK | StatusCode::ACCEPTED | StatusCode::NO_CONTENT => {
                info!(
                    connector = name,
                    only_failed, "requested a restart of the connector"
                );
                Ok(true)
            }
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.status_error(op, name, status, &body)),
        }
    }

    /// Deletes the connector (its tasks stop; its slot stays until the operator drops it).
    /// `Ok(false)` when there was nothing to delete.
    ///
    /// First it stops the connector and deletes its source offsets (KIP-875, Connect ≥ 3.6):
    /// Connect keeps offsets by connector name after a plain delete, so a connector created
    /// again under the same name would resume from an LSN its new slot never had and fail.
    pub async fn delete(&self, name: &str) -> Result<bool, ConnectError> {
        if !self.stop_and_forget_offsets(name).await? {
            return Ok(false);
        }
        let op = Operation::Delete;
        let (status, body) = self
            .send(op, name, Method::DELETE, &connector_path(name, ""), None)
            .await?;
        match status {
            StatusCode::OK | StatusCode::NO_CONTENT => {
                info!(connector = name, "deleted connector");
                Ok(true)
            }
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.status_error(op, name, status, &body)),
        }
    }

    /// Stops the connector, waits (bounded) until it is STOPPED and deletes its offsets.
    /// `Ok(false)` when there is no such connector.
    async fn stop_and_forget_offsets(&self, name: &str) -> Result<bool, ConnectError> {
        let op = Operation::Stop;
        let (status, body) = self
            .send(op, name, Method::PUT, &connector_path(name, "/stop"), None)
            .await?;
        match status {
            StatusCode::OK | StatusCode::ACCEPTED | StatusCode::NO_CONTENT => {}
            StatusCode::NOT_FOUND => return Ok(false),
            _ => return Err(self.status_error(op, name, status, &body)),
        }
        for _ in 0..STOP_POLLS {
            match self.status(name).await? {
                None => return Ok(false),
                Some(s) if s.connector.state == State::Stopped => break,
                Some(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        let op = Operation::ResetOffsets;
        let (status, body) = self
            .send(
                op,
                name,
                Method::DELETE,
                &connector_path(name, "/offsets"),
                None,
            )
            .await?;
        match status {
            StatusCode::OK | StatusCode::NO_CONTENT => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.status_error(op, name, status, &body)),
        }
    }

    async fn send(
        &self,
        op: Operation,
        connector: &str,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ConnectError> {
        let counter = match method {
            Method::PUT => &self.counters.put,
            Method::POST => &self.counters.post,
            Method::DELETE => &self.counters.delete,
            _ => &self.counters.get,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let uri: Uri = format!("{}{}", self.base, path)
            .parse()
            .map_err(|e: http::uri::InvalidUri| ConnectError::InvalidSettings(e.to_string()))?;
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ConnectError::InvalidSettings(e.to_string()))?;
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| ConnectError::Unreachable {
                    op,
                    connector: connector.to_owned(),
                    reason: self.scrub(&error_chain(&e)),
                })?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| ConnectError::Decode {
                    op,
                    connector: connector.to_owned(),
                    reason: self.scrub(&format!("reading the response body: {e}")),
                })?
                .to_bytes();
            Ok((status, body))
        };
        let result = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ConnectError::Timeout {
                op,
                connector: connector.to_owned(),
                after: self.timeout,
            })?;
        if let Ok((status, _)) = &result {
            debug!(connector, %op, status = status.as_u16(), "kafka connect call");
        }
        result
    }

    fn status_error(
        &self,
        op: Operation,
        connector: &str,
        status: StatusCode,
        body: &[u8],
    ) -> ConnectError {
        #[derive(Deserialize)]
        struct ErrorBody {
            message: Option<String>,
        }
        let message = serde_json::from_slice::<ErrorBody>(body)
            .ok()
            .and_then(|b| b.message)
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
        ConnectError::Status {
            op,
            connector: connector.to_owned(),
            status: status.as_u16(),
            message: self.scrub(message.trim()),
        }
    }

    fn decode(&self, op: Operation, connector: &str, e: serde_json::Error) -> ConnectError {
        ConnectError::Decode {
            op,
            connector: connector.to_owned(),
            reason: self.scrub(&e.to_string()),
        }
    }

    /// Removes every known secret from server-provided text and shortens it.
    fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in self.redact.iter() {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "<redacted>");
            }
        }
        shorten(&out)
    }
}

/// `s` cut to [`MAX_MESSAGE_LEN`] characters (with `...`), on one line.
fn shorten(s: &str) -> String {
    let one_line = s.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= MAX_MESSAGE_LEN {
        return one_line;
    }
    let mut out: String = one_line.chars().take(MAX_MESSAGE_LEN).collect();
    out.push_str("...");
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// `/connectors/<percent-encoded name><rest>`.
fn connector_path(name: &str, rest: &str) -> String {
    let mut out = String::from("/connectors/");
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out.push_str(rest);
    out
}

/// Validates the base URL and returns it without a trailing slash.
fn base_url(url: &str) -> Result<String, ConnectError> {
    let uri: Uri = url.parse().map_err(|_| {
        ConnectError::InvalidSettings("the Kafka Connect URL is not a valid URL".to_owned())
    })?;
    let authority = uri.authority().ok_or_else(|| {
        ConnectError::InvalidSettings("the Kafka Connect URL has no host".to_owned())
    })?;
    // Do not echo the URL here: it may hold the credentials we refuse.
    if authority.as_str().contains('@') {
        return Err(ConnectError::InvalidSettings(
            "credentials in the Kafka Connect URL are not allowed; use basic auth from a Secret"
                .to_owned(),
        ));
    }
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(ConnectError::InvalidSettings(format!(
                "Kafka Connect URL {url:?} must start with http:// or https://"
            )));
        }
    }
    if uri.query().is_some() {
        return Err(ConnectError::InvalidSettings(format!(
            "Kafka Connect URL {url:?} must not have a query"
        )));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

fn tls_config(ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, ConnectError> {
    let invalid = |what: String| ConnectError::InvalidSettings(format!("CA bundle: {what}"));
    let roots = crate::postgres::connect::pem_root_store(ca_pem).map_err(invalid)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_scrub(s: &str) -> String {
        s.to_owned()
    }

    const RUNNING: &str = r#"{"name":"servicedb.shop.orders","connector":{"state":"RUNNING","worker_id":"127.0.0.1:8083"},
        "tasks":[{"id":0,"state":"RUNNING","worker_id":"127.0.0.1:8083"}],"type":"source"}"#;

    const FAILED_TASK: &str = r#"{"name":"servicedb.shop.orders","connector":{"state":"RUNNING","worker_id":"w1"},
        "tasks":[{"id":0,"state":"FAILED","worker_id":"w1","trace":"org.apache.kafka.connect.errors.ConnectException: An exception occurred in the change event producer. This connector will be stopped.\n\tat io.debezium.pipeline.ErrorHandler.setProducerThrowable(ErrorHandler.java:67)\nCaused by: org.postgresql.util.PSQLException: ERROR: publication \"orders_cdc_pub\" does not exist\n\tat org.postgresql.core.v3.QueryExecutorImpl.receiveErrorResponse(QueryExecutorImpl.java:2733)\n"}],"type":"source"}"#;

    #[test]
    fn a_running_connector_with_running_tasks_is_healthy() {
        let s = ConnectorStatus::parse(RUNNING.as_bytes(), &no_scrub).unwrap();
        assert_eq!(s.name, "servicedb.shop.orders");
        assert_eq!(s.connector.state, State::Running);
        assert_eq!(s.connector.worker_id.as_deref(), Some("127.0.0.1:8083"));
        assert_eq!(s.tasks.len(), 1);
        assert_eq!(s.tasks[0].id, Some(0));
        assert_eq!(s.health(), Health::Running);
    }

    #[test]
    fn a_failed_task_reports_its_trace_first_line_and_root_cause() {
        let s = ConnectorStatus::parse(FAILED_TASK.as_bytes(), &no_scrub).unwrap();
        assert_eq!(s.tasks[0].state, State::Failed);
        let trace = s.tasks[0].trace.as_ref().unwrap();
        assert_eq!(
            trace.first_line,
            "org.apache.kafka.connect.errors.ConnectException: An exception occurred in the change event producer. This connector will be stopped."
        );
        assert_eq!(
            trace.root_cause.as_deref(),
            Some(
                "org.postgresql.util.PSQLException: ERROR: publication \"orders_cdc_pub\" does not exist"
            )
        );
        let Health::Failed { reason } = s.health() else {
            panic!("not failed: {:?}", s.health())
        };
        assert!(
            reason.starts_with("task 0 FAILED: org.apache.kafka"),
            "{reason}"
        );
        assert!(reason.contains("does not exist"), "{reason}");
        assert!(!reason.contains('\n'));
        assert_eq!(s.failed_tasks().count(), 1);
    }

    #[test]
    fn status_states_map_to_health() {
        let status = |connector: &str, tasks: &[&str]| {
            let tasks: Vec<String> = tasks
                .iter()
                .enumerate()
                .map(|(i, t)| format!(r#"{{"id":{i},"state":"{t}","worker_id":"w"}}"#))
                .collect();
            let json = format!(
                r#"{{"name":"c","connector":{{"state":"{connector}","worker_id":"w"}},"tasks":[{}]}}"#,
                tasks.join(",")
            );
            ConnectorStatus::parse(json.as_bytes(), &no_scrub)
                .unwrap()
                .health()
        };
        let not_running = |h: Health| matches!(h, Health::NotRunning { .. });
        let failed = |h: Health| matches!(h, Health::Failed { .. });
        assert_eq!(status("RUNNING", &["RUNNING", "RUNNING"]), Health::Running);
        assert!(not_running(status("RUNNING", &[])));
        assert!(not_running(status("UNASSIGNED", &[])));
        assert!(not_running(status("PAUSED", &["PAUSED"])));
        assert!(not_running(status("STOPPED", &[])));
        assert!(not_running(status("RUNNING", &["RESTARTING"])));
        assert!(not_running(status("RUNNING", &["UNASSIGNED"])));
        assert!(failed(status("FAILED", &[])));
        assert!(failed(status("RUNNING", &["RUNNING", "FAILED"])));
        assert!(failed(status("RESTARTING", &["FAILED"])));
        assert_eq!(
            status("RUNNING", &["SOMETHING_NEW"]),
            Health::NotRunning {
                reason: "task 0 is SOMETHING_NEW".to_owned()
            }
        );
    }

    #[test]
    fn traces_are_scrubbed_of_known_secrets() {
        let json = r#"{"name":"c","connector":{"state":"FAILED","worker_id":"w",
            "trace":"java.lang.Exception: password s3cret rejected\nCaused by: x: s3cret"},"tasks":[]}"#;
        let client = ConnectClient::new(&ConnectSettings {
            redact: vec![Password::from_plaintext("s3cret")],
            ..ConnectSettings::new("http://127.0.0.1:1")
        })
        .unwrap();
        let s = ConnectorStatus::parse(json.as_bytes(), &|t| client.scrub(t)).unwrap();
        let Health::Failed { reason } = s.health() else {
            panic!()
        };
        assert!(!reason.contains("s3cret"), "{reason}");
        assert!(reason.contains("<redacted>"), "{reason}");
    }

    #[test]
    fn config_matches_ignores_the_echoed_name_only() {
        let desired = ConnectorConfig {
            name: "servicedb.shop.orders".into(),
            config: BTreeMap::from([("a".to_owned(), "1".to_owned())]),
        };
        let mut actual = desired.config.clone();
        assert!(config_matches(&desired, &actual));
        actual.insert("name".into(), "servicedb.shop.orders".into());
        assert!(config_matches(&desired, &actual));
        actual.insert("name".into(), "other".into());
        assert!(!config_matches(&desired, &actual));
        actual.remove("name");
        actual.insert("b".into(), "2".into());
        assert!(!config_matches(&desired, &actual), "an extra key is a diff");
        let changed = BTreeMap::from([("a".to_owned(), "2".to_owned())]);
        assert!(!config_matches(&desired, &changed));
    }

    #[test]
    fn urls_with_credentials_or_other_schemes_are_refused_without_echoing_them() {
        let err =
            ConnectClient::new(&ConnectSettings::new("http://u:hunter2@connect:8083")).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert_eq!(err.category(), "InvalidKafkaConnectSettings");
        for bad in ["connect:8083", "ftp://connect", "http://c:8083/?x=1", ""] {
            assert!(
                ConnectClient::new(&ConnectSettings::new(bad)).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(base_url("http://c:8083/").unwrap(), "http://c:8083");
        assert_eq!(base_url("https://c/prefix/").unwrap(), "https://c/prefix");
    }

    #[test]
    fn a_ca_bundle_without_certificates_is_refused() {
        let settings = ConnectSettings {
            ca_pem: Some(b"not a pem".to_vec()),
            ..ConnectSettings::new("https://c:8083")
        };
        assert!(matches!(
            ConnectClient::new(&settings),
            Err(ConnectError::InvalidSettings(_))
        ));
    }

    #[test]
    fn connector_names_are_percent_encoded_in_paths() {
        assert_eq!(
            connector_path("servicedb.shop.orders", "/status"),
            "/connectors/servicedb.shop.orders/status"
        );
        assert_eq!(connector_path("a b/c", ""), "/connectors/a%20b%2Fc");
    }

    #[test]
    fn the_basic_auth_password_is_hidden_from_debug_and_scrubbed() {
        let settings = ConnectSettings {
            basic_auth: Some(BasicAuth {
                username: "connect".into(),
                password: Password::from_plaintext("pa55word"),
            }),
            ..ConnectSettings::new("http://127.0.0.1:1")
        };
        assert!(!format!("{settings:?}").contains("pa55word"));
        let client = ConnectClient::new(&settings).unwrap();
        assert!(!format!("{client:?}").contains("pa55word"));
        assert_eq!(client.scrub("bad pa55word"), "bad <redacted>");
    }

    #[test]
    fn error_categories_tell_unavailable_from_rejected() {
        let status = |status| ConnectError::Status {
            op: Operation::PutConfig,
            connector: "c".into(),
            status,
            message: String::new(),
        };
        assert_eq!(status(400).category(), "ConnectorConfigRejected");
        assert!(!status(400).is_unavailable());
        assert_eq!(status(409).category(), "KafkaConnectRebalancing");
        assert!(status(409).is_unavailable());
        assert!(status(503).is_unavailable());
        assert_eq!(status(401).category(), "KafkaConnectUnauthorized");
    }

    #[tokio::test]
    async fn an_unreachable_connect_is_an_unavailable_error() {
        // Port 1 on loopback: nothing listens there.
        let client = ConnectClient::new(&ConnectSettings::new("http://127.0.0.1:1")).unwrap();
        let err = client.status("x").await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        assert_eq!(err.category(), "KafkaConnectUnreachable");
        assert_eq!(client.request_counts().get, 1);
    }
}
