//! The `servicedb` binary: CLI wiring only (operator | relay | crd).

use std::io::Write;

use anyhow::Context;
use clap::{ArgAction, Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "servicedb",
    version,
    about = "Database per service for Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up; boxing the operator's flags would only obscure the clap derive.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Print both CustomResourceDefinitions as YAML.
    Crd,
    /// Run the controllers for ServiceDatabase and OutboxRelay.
    Operator {
        /// Address of /healthz, /readyz and /metrics.
        #[arg(long, env = "SERVICEDB_LISTEN", default_value = "0.0.0.0:8080")]
        listen: std::net::SocketAddr,
        /// Image of relay Deployments (normally the operator's own image).
        #[arg(
            long,
            env = "SERVICEDB_RELAY_IMAGE",
            default_value = "servicedb-operator:latest"
        )]
        relay_image: String,
        /// Namespace the operator runs in; instance NetworkPolicies admit its pods.
        #[arg(long, env = "POD_NAMESPACE")]
        namespace: Option<String>,
        /// Watch only this namespace instead of all namespaces.
        #[arg(long, env = "SERVICEDB_WATCH_NAMESPACE")]
        watch_namespace: Option<String>,
        /// Maximum reconciles running at once, per kind.
        #[arg(long, env = "SERVICEDB_CONCURRENCY", default_value_t = 8)]
        concurrency: u16,
        /// Seconds between drift-check resyncs of every object.
        #[arg(long, env = "SERVICEDB_RESYNC_SECONDS", default_value_t = 300)]
        resync_seconds: u64,
        /// Seconds a deletion keeps retrying cleanup outside the cluster (dropping a database or
        /// a replication slot) before it gives up with a Warning Event and lets the object go.
        #[arg(long, env = "SERVICEDB_CLEANUP_TIMEOUT_SECONDS", default_value_t = 600)]
        cleanup_timeout_seconds: u64,
        /// Images managed instances may run: comma-separated repository patterns, compared in
        /// Docker's normalised form (`postgres` = `docker.io/library/postgres`), any tag or
        /// digest. `REPO` allows that repository, `PREFIX/*` every repository under PREFIX,
        /// `*` any image.
        #[arg(
            long,
            env = "SERVICEDB_ALLOWED_IMAGES",
            default_value = servicedb::operator::guard_rails::DEFAULT_ALLOWED_IMAGES
        )]
        allowed_images: servicedb::operator::guard_rails::ImagePolicy,
        /// Libraries `shared_preload_libraries` may load: comma-separated plain names (empty:
        /// none).
        #[arg(
            long,
            env = "SERVICEDB_ALLOWED_PRELOAD_LIBRARIES",
            default_value = servicedb::operator::guard_rails::DEFAULT_ALLOWED_PRELOAD_LIBRARIES
        )]
        allowed_preload_libraries: servicedb::operator::guard_rails::PreloadPolicy,
        /// Hosts external instances may name: comma-separated CIDRs or addresses (checked
        /// against literal IPs) and DNS names, `.suffix` for a domain (checked against names;
        /// never resolved). Empty: unrestricted.
        #[arg(long, env = "SERVICEDB_ALLOWED_EXTERNAL_HOSTS", default_value = "")]
        allowed_external_hosts: servicedb::operator::guard_rails::HostPolicy,
        #[command(flatten)]
        election: ElectionArgs,
    },
    /// Run one outbox relay: move committed outbox events to Kafka or NATS JetStream.
    /// The database comes from PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD, PGSSLMODE.
    Relay {
        /// The relay configuration file (YAML or JSON).
        #[arg(long, value_name = "FILE")]
        config: std::path::PathBuf,
    },
}

/// Leader election of `servicedb operator` (see src/operator/leader.rs for the protocol).
#[derive(Args)]
struct ElectionArgs {
    /// Elect a leader through a coordination.k8s.io Lease, so several replicas can run and only
    /// one reconciles. `--leader-elect=false` only where exactly one process runs (local
    /// development); the Lease's namespace is --leader-elect-namespace, else POD_NAMESPACE.
    #[arg(
        long = "leader-elect",
        env = "SERVICEDB_LEADER_ELECT",
        default_value_t = true,
        action = ArgAction::Set,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    leader_elect: bool,
    /// Namespace of the Lease (default: the operator's own namespace, POD_NAMESPACE).
    #[arg(long, env = "SERVICEDB_LEADER_ELECT_NAMESPACE")]
    leader_elect_namespace: Option<String>,
    /// Name of the Lease. Operators sharing it elect one leader among them.
    #[arg(long, env = "SERVICEDB_LEADER_ELECT_LEASE_NAME", default_value = servicedb::operator::leader::DEFAULT_LEASE_NAME)]
    leader_elect_lease_name: String,
    /// Seconds a standby waits after the last renewal it saw before taking over.
    #[arg(
        long,
        env = "SERVICEDB_LEADER_ELECT_LEASE_DURATION",
        default_value_t = 15
    )]
    leader_elect_lease_duration: u64,
    /// Seconds a leader keeps reconciling without a successful renewal (< lease duration).
    #[arg(
        long,
        env = "SERVICEDB_LEADER_ELECT_RENEW_DEADLINE",
        default_value_t = 10
    )]
    leader_elect_renew_deadline: u64,
    /// Seconds between renewals, and between a standby's looks at the Lease (< renew deadline).
    #[arg(long, env = "SERVICEDB_LEADER_ELECT_RETRY_PERIOD", default_value_t = 2)]
    leader_elect_retry_period: u64,
}

impl ElectionArgs {
    /// The election's configuration, `None` when disabled; an error when it cannot be safe.
    fn config(
        self,
        pod_namespace: Option<&str>,
    ) -> anyhow::Result<Option<servicedb::operator::leader::ElectionConfig>> {
        use std::time::Duration;
        if !self.leader_elect {
            return Ok(None);
        }
        let namespace = self
            .leader_elect_namespace
            .or_else(|| pod_namespace.map(str::to_owned))
            .filter(|ns| !ns.is_empty())
            .context(
                "leader election needs the namespace of its Lease: set POD_NAMESPACE (the Helm \
                 chart does) or --leader-elect-namespace, or run a single process with \
                 --leader-elect=false",
            )?;
        let config = servicedb::operator::leader::ElectionConfig {
            namespace,
            lease_name: self.leader_elect_lease_name,
            identity: servicedb::operator::leader::default_identity(),
            lease_duration: Duration::from_secs(self.leader_elect_lease_duration),
            renew_deadline: Duration::from_secs(self.leader_elect_renew_deadline),
            retry_period: Duration::from_secs(self.leader_elect_retry_period),
        };
        config.validate().context("leader election settings")?;
        Ok(Some(config))
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Two rustls crypto providers end up in the dependency tree; pick one for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Crd => {
            let yaml = servicedb::api::crds_yaml().context("rendering the CRDs")?;
            std::io::stdout().write_all(yaml.as_bytes())?;
        }
        Command::Operator {
            listen,
            relay_image,
            namespace,
            watch_namespace,
            concurrency,
            resync_seconds,
            cleanup_timeout_seconds,
            allowed_images,
            allowed_preload_libraries,
            allowed_external_hosts,
            election,
        } => {
            servicedb::telemetry::init();
            let election = election.config(namespace.as_deref())?;
            let settings = servicedb::operator::Settings {
                operator_namespace: namespace,
                relay_image,
                concurrency,
                resync: std::time::Duration::from_secs(resync_seconds),
                watch_namespace,
                cleanup_timeout: std::time::Duration::from_secs(cleanup_timeout_seconds),
                guard_rails: servicedb::operator::guard_rails::GuardRails {
                    allowed_images,
                    allowed_preload_libraries,
                    allowed_external_hosts,
                },
                ..servicedb::operator::Settings::default()
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(run_operator(listen, settings, election))?;
        }
        Command::Relay { config } => {
            servicedb::telemetry::init();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(servicedb::relay::run_from_file(&config))?;
        }
    }
    Ok(())
}

async fn run_operator(
    listen: std::net::SocketAddr,
    settings: servicedb::operator::Settings,
    election: Option<servicedb::operator::leader::ElectionConfig>,
) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (in-cluster config or KUBECONFIG)")?;
    servicedb::operator::check_crds(&client).await?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = servicedb::operator::metrics::OperatorMetrics::register(&mut registry);
    let leader_metrics = servicedb::operator::leader::LeaderMetrics::register(&mut registry);
    let registry = std::sync::Arc::new(registry);
    let readiness = servicedb::http::Readiness::default();
    let leadership = servicedb::http::Leadership::default();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (addr, server) = servicedb::http::bind_with_leadership(
        listen,
        registry,
        readiness.clone(),
        Some(leadership.clone()),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%addr, "serving /healthz, /readyz, /leader and /metrics");
    let server = tokio::spawn(server);
    readiness.set(true);
    let stop = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        stop.cancel();
    });
    let elector = election.map(|config| {
        tracing::info!(
            lease = %format!("{}/{}", config.namespace, config.lease_name),
            identity = %config.identity,
            lease_duration = ?config.lease_duration,
            renew_deadline = ?config.renew_deadline,
            retry_period = ?config.retry_period,
            "leader election enabled"
        );
        servicedb::operator::leader::Elector::new(client.clone(), config, leader_metrics.clone())
    });
    if elector.is_none() {
        tracing::warn!("leader election disabled: run exactly one operator process");
    }
    servicedb::operator::run_elected(
        client,
        settings,
        metrics,
        elector,
        leader_metrics,
        leadership,
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    server.await.context("joining the HTTP server")??;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}
