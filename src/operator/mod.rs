//! The controllers: shared context, start-up checks, and the run loop for both kinds (Kubernetes I/O).

pub mod admin;
pub mod apply;
pub mod conditions;
pub mod guard_rails;
pub mod leader;
pub mod metrics;
pub mod outbox_relay;
pub mod secret_guard;
pub mod service_database;
pub mod tls;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::{OutboxRelay, ServiceDatabase};

/// Annotation that lets a ServiceDatabase (or OutboxRelay) go without cleanup.
pub const SKIP_CLEANUP_ANNOTATION: &str = "servicedb.io/skip-cleanup";

/// Settings of the operator process.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Namespace the operator runs in, admitted by instance NetworkPolicies.
    pub operator_namespace: Option<String>,
    /// Image of relay Deployments (the operator's own image).
    pub relay_image: String,
    /// Maximum reconciles running at once, per kind.
    pub concurrency: u16,
    /// Periodic re-reconcile of every object, as a safety net against drift.
    pub resync: Duration,
    /// Bound on opening a database connection.
    pub connect_timeout: Duration,
    /// Watch only this namespace (a namespace-scoped install); all namespaces when `None`.
    pub watch_namespace: Option<String>,
    /// How long a deletion retries cleanup outside the cluster (drop a database, a slot) before
    /// it gives up with a Warning Event and a metric, so no namespace deletion hangs forever.
    pub cleanup_timeout: Duration,
    /// Allowed images, preload libraries and external hosts.
    pub guard_rails: guard_rails::GuardRails,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            operator_namespace: None,
            relay_image: "servicedb-operator:latest".to_owned(),
            concurrency: 8,
            resync: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(5),
            watch_namespace: None,
            cleanup_timeout: Duration::from_secs(600),
            guard_rails: guard_rails::GuardRails::default(),
        }
    }
}

/// What every reconcile gets.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes Events on the reconciled objects.
    pub recorder: Recorder,
    /// Process settings.
    pub settings: Settings,
    /// Per-object retry delays.
    pub backoff: Backoff,
    /// Reconcile and write metrics.
    pub metrics: metrics::OperatorMetrics,
}

/// Per-object exponential backoff for failed reconciles: 1s, 2s, 4s, ... capped at five minutes,
/// reset by a success. A failing object never delays the others.
#[derive(Default)]
pub struct Backoff {
    failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

impl Backoff {
    /// The delay before the next attempt for `key`, counting this failure.
    pub fn next(&self, key: &str) -> Duration {
        let mut map = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        Duration::from_secs(1u64 << (*n - 1).min(8)).min(Duration::from_secs(300))
    }

    /// Forget the failures of `key` after a success.
    pub fn reset(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(key);
    }
}

impl Context {
    /// Server-side apply a child (see [`apply::apply`]), counting real writes and drift repairs.
    pub async fn apply<K>(
        &self,
        namespace: &str,
        desired: K,
    ) -> Result<apply::Outcome, apply::ApplyError>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::Serialize
            + serde::de::DeserializeOwned,
    {
        let write = apply::apply(&self.client, namespace, desired).await?;
        match write {
            apply::Write::Unchanged => {}
            apply::Write::Applied => self.metrics.wrote(&K::kind(&())),
            apply::Write::Repaired => {
                self.metrics.wrote(&K::kind(&()));
                self.metrics.repaired(&K::kind(&()));
            }
        }
        Ok(write.into())
    }

    /// Publish an Event on `obj`; failures are logged, never fatal (Events are advisory).
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = KubeEvent {
            type_,
            reason: reason.to_owned(),
            note: Some(truncate(note, 1000)),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            warn!(error = %e, reason, "could not publish an Event");
        }
    }
}

/// How long `obj` has been waiting for its deletion to finish (zero when not being deleted).
pub fn deleting_for<K: Resource<DynamicType = ()>>(obj: &K) -> Duration {
    obj.meta()
        .deletion_timestamp
        .as_ref()
        .and_then(|t| {
            let elapsed = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
            Duration::try_from(elapsed).ok()
        })
        .unwrap_or_default()
}

/// The per-object key of the retry backoff: `<kind>/<namespace>/<name>`.
pub fn object_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

/// Run one reconcile of `K`, recording its outcome and duration in the metrics.
pub async fn observed<K, E>(
    ctx: &Context,
    reconcile: impl std::future::Future<Output = Result<kube::runtime::controller::Action, E>>,
) -> Result<kube::runtime::controller::Action, E>
where
    K: Resource<DynamicType = ()>,
    E: Categorized,
{
    let started = std::time::Instant::now();
    let result = reconcile.await;
    ctx.metrics.observe(
        &K::kind(&()),
        started.elapsed().as_secs_f64(),
        result.as_ref().err().map(Categorized::category),
    );
    result
}

/// The error policy of both controllers: retry the failed object alone, with its own
/// exponential backoff, so one broken object never delays the others.
pub fn retry_with_backoff<K, E>(
    obj: &K,
    err: &E,
    ctx: &Context,
) -> kube::runtime::controller::Action
where
    K: Resource<DynamicType = ()>,
    E: Categorized + std::fmt::Display,
{
    let delay = ctx.backoff.next(&object_key(obj));
    warn!(error = %err, category = err.category(), retry_in = ?delay, "reconcile failed");
    kube::runtime::controller::Action::requeue(delay)
}

/// An error with a short category, used as metric label and Event reason.
pub trait Categorized {
    /// The category (`ApplyFailed`, `ServerUnreachable`, ...).
    fn category(&self) -> &'static str;
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Why the operator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A CRD is not installed.
    #[error(
        "the CustomResourceDefinition {0} is not installed: install it with `servicedb crd | kubectl apply --server-side -f -` (or the Helm chart) and start the operator again"
    )]
    CrdMissing(String),
    /// The apiserver could not be asked.
    #[error("could not read CustomResourceDefinition {name}: {source}")]
    CrdLookup {
        /// CRD name.
        name: String,
        /// The client error.
        source: kube::Error,
    },
}

/// Check that both CRDs are installed, so the operator fails fast with a clear message.
pub async fn check_crds(client: &Client) -> Result<(), StartError> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crate::api::crds() {
        let name = crd.name_any();
        match crds.get_opt(&name).await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(StartError::CrdMissing(name)),
            Err(source) => return Err(StartError::CrdLookup { name, source }),
        }
    }
    Ok(())
}

/// An Api over every namespace, or only the watched one.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The watch of one kind of child: metadata only (`Api<PartialObjectMeta<_>>`), limited to
/// objects this operator labelled. The controllers need only owner references from children.
fn children() -> watcher::Config {
    watcher::Config::default().labels(&format!(
        "app.kubernetes.io/managed-by={}",
        crate::specs::labels::MANAGER
    ))
}

/// Run both controllers until `shutdown` resolves.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: metrics::OperatorMetrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let reporter = Reporter {
        controller: crate::specs::labels::MANAGER.to_owned(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        settings,
        backoff: Backoff::default(),
        metrics,
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let signal = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let config = kube::runtime::controller::Config::default().concurrency(ctx.settings.concurrency);

    let ns = ctx.settings.watch_namespace.as_deref();
    let sdb_controller = service_database_controller(
        &client,
        ns,
        config.clone(),
        ctx.clone(),
        signal(stop_rx.clone()),
    );
    // A second watch on OutboxRelays feeds a store that maps a changed ServiceDatabase to the
    // relays that reference it (a ServiceDatabase has no ownerReference to its relays).
    let (relay_reader, relay_writer) = reflector::store::<OutboxRelay>();
    let relay_index = reflector::reflector(
        relay_writer,
        watcher(
            scoped::<OutboxRelay>(&client, ns),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .for_each(|_| futures::future::ready(()));
    let relay_controller = outbox_relay_controller(
        &client,
        ns,
        config,
        ctx.clone(),
        relay_reader,
        signal(stop_rx),
    );

    info!("controllers started");
    tokio::select! {
        _ = async { tokio::join!(sdb_controller, relay_controller) } => {}
        _ = relay_index => {}
    }
    info!("controllers stopped");
}

/// The ServiceDatabase controller: its children, and its relays (a Logical relay needs
/// REPLICATION and a publication, so a relay change re-reconciles its database).
fn service_database_controller(
    client: &Client,
    ns: Option<&str>,
    config: kube::runtime::controller::Config,
    ctx: Arc<Context>,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> impl std::future::Future<Output = ()> {
    let sdb_api: Api<ServiceDatabase> = scoped(client, ns);
    let relays: Api<OutboxRelay> = scoped(client, ns);
    Controller::new(sdb_api, watcher::Config::default().any_semantic())
        .with_config(config)
        .owns(scoped::<PartialObjectMeta<Secret>>(client, ns), children())
        .owns(
            scoped::<PartialObjectMeta<StatefulSet>>(client, ns),
            children(),
        )
        .owns(scoped::<PartialObjectMeta<Service>>(client, ns), children())
        .owns(
            scoped::<PartialObjectMeta<ConfigMap>>(client, ns),
            children(),
        )
        .owns(
            scoped::<PartialObjectMeta<NetworkPolicy>>(client, ns),
            children(),
        )
        .watches(relays, watcher::Config::default(), |relay: OutboxRelay| {
            relay.namespace().map(|ns| {
                kube::runtime::reflector::ObjectRef::new(&relay.spec.database_ref.name).within(&ns)
            })
        })
        .graceful_shutdown_on(stop)
        .run(
            service_database::reconcile,
            service_database::error_policy,
            ctx,
        )
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "ServiceDatabase reconcile failed");
            }
        })
}

/// The OutboxRelay controller: its children, and the ServiceDatabases they publish (looked up
/// in `relays`, a store of every OutboxRelay).
fn outbox_relay_controller(
    client: &Client,
    ns: Option<&str>,
    config: kube::runtime::controller::Config,
    ctx: Arc<Context>,
    relays: reflector::Store<OutboxRelay>,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> impl std::future::Future<Output = ()> {
    let relay_api: Api<OutboxRelay> = scoped(client, ns);
    let sdbs: Api<ServiceDatabase> = scoped(client, ns);
    Controller::new(relay_api, watcher::Config::default().any_semantic())
        .with_config(config)
        .owns(
            scoped::<PartialObjectMeta<Deployment>>(client, ns),
            children(),
        )
        .owns(
            scoped::<PartialObjectMeta<ConfigMap>>(client, ns),
            children(),
        )
        .owns(
            scoped::<PartialObjectMeta<ServiceAccount>>(client, ns),
            children(),
        )
        .watches(
            sdbs,
            watcher::Config::default(),
            move |sdb: ServiceDatabase| outbox_relay::relays_of_database(&relays.state(), &sdb),
        )
        .graceful_shutdown_on(stop)
        .run(outbox_relay::reconcile, outbox_relay::error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "OutboxRelay reconcile failed");
            }
        })
}

/// Run both controllers until `shutdown` is cancelled. With an `elector`, only while this process
/// holds the leader Lease: a standby waits, a leader that loses the Lease stops its controllers at
/// once and stands by again (see [`leader::run_while_leading`]). Without one (leader election
/// disabled), this process always leads.
pub async fn run_elected(
    client: Client,
    settings: Settings,
    metrics: metrics::OperatorMetrics,
    elector: Option<leader::Elector>,
    leader_metrics: leader::LeaderMetrics,
    leadership: crate::http::Leadership,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let Some(elector) = elector else {
        leadership.set(true);
        leader_metrics.leader.set(1);
        run(client, settings, metrics, shutdown.cancelled_owned()).await;
        leadership.set(false);
        leader_metrics.leader.set(0);
        return;
    };
    leader::run_while_leading(elector, leadership, leader_metrics, shutdown, move |stop| {
        run(
            client.clone(),
            settings.clone(),
            metrics.clone(),
            stop.cancelled_owned(),
        )
    })
    .await;
}
