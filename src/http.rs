//! A small HTTP server for `/healthz`, `/readyz` and `/metrics` (network I/O), shared by the relay and the operator.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Errors of the HTTP server.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("serving HTTP: {0}")]
    Serve(std::io::Error),
}

/// A cheap, cloneable readiness flag: `/readyz` answers 200 while it is set.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Whether this process leads (holds the operator's leader Lease), for `/leader` and the body of
/// `/readyz`. Readiness itself does not depend on it: a healthy standby is ready too.
#[derive(Clone, Debug, Default)]
pub struct Leadership(Arc<AtomicBool>);

impl Leadership {
    pub fn set(&self, leading: bool) {
        self.0.store(leading, Ordering::SeqCst);
    }
    pub fn is_leader(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    readiness: Readiness,
    leadership: Option<Leadership>,
}

/// The router: `/healthz` (the process serves requests), `/readyz` (the readiness flag) and
/// `/metrics` (OpenMetrics text of the registry).
pub fn router(registry: Arc<Registry>, readiness: Readiness) -> Router {
    router_with_leadership(registry, readiness, None)
}

/// [`router`], plus `/leader` when `leadership` is given: 200 `leader` while this process leads,
/// 503 `standby` otherwise; `/readyz` then answers `ok: leader` or `ok: standby`.
pub fn router_with_leadership(
    registry: Arc<Registry>,
    readiness: Readiness,
    leadership: Option<Leadership>,
) -> Router {
    let mut routes = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    if leadership.is_some() {
        routes = routes.route("/leader", get(leader));
    }
    routes.with_state(AppState {
        registry,
        readiness,
        leadership,
    })
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if !s.readiness.is_ready() {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready");
    }
    match &s.leadership {
        None => (StatusCode::OK, "ok"),
        Some(l) if l.is_leader() => (StatusCode::OK, "ok: leader"),
        Some(_) => (StatusCode::OK, "ok: standby"),
    }
}

async fn leader(State(s): State<AppState>) -> impl IntoResponse {
    match &s.leadership {
        Some(l) if l.is_leader() => (StatusCode::OK, "leader"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "standby"),
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "encoding metrics failed".to_owned(),
        ),
    }
}

/// Binds `addr` (so a port conflict fails start-up) and returns the bound address and the
/// serving future, which ends when `shutdown` is cancelled.
pub async fn bind(
    addr: SocketAddr,
    registry: Arc<Registry>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = Result<(), HttpError>>), HttpError> {
    bind_with_leadership(addr, registry, readiness, None, shutdown).await
}

/// [`bind`] with [`router_with_leadership`].
pub async fn bind_with_leadership(
    addr: SocketAddr,
    registry: Arc<Registry>,
    readiness: Readiness,
    leadership: Option<Leadership>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, impl Future<Output = Result<(), HttpError>>), HttpError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| HttpError::Bind { addr, source })?;
    let app = router_with_leadership(registry, readiness, leadership);
    let fut = async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(HttpError::Serve)
    };
    Ok((local, fut))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get_path(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn readyz_follows_the_readiness_flag_and_metrics_are_served() {
        let mut reg = Registry::default();
        let c: prometheus_client::metrics::counter::Counter = Default::default();
        reg.register("things", "Things", c.clone());
        c.inc();
        let ready = Readiness::default();
        let token = CancellationToken::new();
        let (addr, fut) = bind(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(reg),
            ready.clone(),
            token.clone(),
        )
        .await
        .unwrap();
        let server = tokio::spawn(fut);
        assert!(get_path(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get_path(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        ready.set(true);
        assert!(get_path(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get_path(addr, "/metrics").await.contains("things_total 1"));
        token.cancel();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_standby_is_ready_and_leader_answers_whether_it_leads() {
        let ready = Readiness::default();
        let leadership = Leadership::default();
        let token = CancellationToken::new();
        let (addr, fut) = bind_with_leadership(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(Registry::default()),
            ready.clone(),
            Some(leadership.clone()),
            token.clone(),
        )
        .await
        .unwrap();
        let server = tokio::spawn(fut);
        ready.set(true);
        let standby = get_path(addr, "/readyz").await;
        assert!(standby.starts_with("HTTP/1.1 200"), "{standby}");
        assert!(standby.ends_with("ok: standby"), "{standby}");
        assert!(get_path(addr, "/leader").await.starts_with("HTTP/1.1 503"));
        leadership.set(true);
        assert!(get_path(addr, "/readyz").await.ends_with("ok: leader"));
        assert!(get_path(addr, "/leader").await.starts_with("HTTP/1.1 200"));
        token.cancel();
        server.await.unwrap().unwrap();
    }
}
