//! Leader election on a coordination.k8s.io/v1 Lease (Kubernetes I/O): of all operator processes
//! sharing a Lease, only the holder runs the controllers; the others wait as standbys.
//!
//! The protocol is client-go's, implemented here because kube 5 has no leader election of its own
//! and the maintained crates (kube-leader-election, kube-coordinate) are built for older kube
//! versions:
//!
//! - Every write to the Lease is a `PUT` carrying the `resourceVersion` that was read (optimistic
//!   concurrency): of two candidates racing for the same version exactly one wins, the other gets
//!   409 Conflict.
//! - A candidate may take a Lease held by someone else only after it has seen the Lease record
//!   stay unchanged for the holder's `leaseDurationSeconds`, measured on the candidate's own
//!   monotonic clock from the moment it first saw that version. Wall-clock times in the Lease
//!   (`renewTime`, `acquireTime`) are informational only, so clock skew between nodes cannot make
//!   two leaders. A Lease with no holder (released) is free at once.
//! - The leader renews every `retry_period`. If no renewal has succeeded for `renew_deadline`
//!   (measured from the moment the last successful renewal was *sent*, on the monotonic clock),
//!   or a renewal finds another holder, leadership is lost and the controllers are stopped at
//!   once. Because `renew_deadline < lease_duration`, the old leader has stopped before any
//!   candidate can consider the Lease expired: a candidate saw the last renewal no earlier than
//!   it was sent, and waits a whole `lease_duration` after that. The difference
//!   (`lease_duration - renew_deadline`, 5 s by default) is the margin for stopping the
//!   controllers and for the two processes' clocks running at slightly different rates.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::http::Leadership;

/// Default name of the Lease.
pub const DEFAULT_LEASE_NAME: &str = "servicedb-operator";
/// Default lease duration: how long standbys wait, after the last renewal they saw, before
/// taking over (the worst-case failover time after a crash).
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// Default renew deadline: how long a leader keeps reconciling without a successful renewal.
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// Default retry period: how often the leader renews and standbys look at the Lease.
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);

/// Where the Lease is and how it is timed.
#[derive(Clone, Debug)]
pub struct ElectionConfig {
    /// Namespace of the Lease (the operator's own namespace).
    pub namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This process's identity, written as the Lease's `holderIdentity`; unique per process.
    pub identity: String,
    /// See [`DEFAULT_LEASE_DURATION`]; a whole number of seconds (the Lease stores seconds).
    pub lease_duration: Duration,
    /// See [`DEFAULT_RENEW_DEADLINE`]; must be shorter than the lease duration.
    pub renew_deadline: Duration,
    /// See [`DEFAULT_RETRY_PERIOD`]; must be shorter than the renew deadline.
    pub retry_period: Duration,
}

/// A timing that would allow two leaders or none.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Lease duration not a whole, positive number of seconds.
    #[error("the lease duration must be a whole number of seconds, at least 1 (got {0:?})")]
    LeaseDuration(Duration),
    /// renew deadline >= lease duration: an old leader could still write after a takeover.
    #[error(
        "the renew deadline ({renew:?}) must be shorter than the lease duration ({lease:?}): otherwise a leader could still be writing when a standby takes over"
    )]
    RenewNotShorterThanLease {
        /// Renew deadline.
        renew: Duration,
        /// Lease duration.
        lease: Duration,
    },
    /// retry period >= renew deadline: a single slow renewal would lose the lease.
    #[error(
        "the retry period ({retry:?}) must be positive and shorter than the renew deadline ({renew:?})"
    )]
    RetryNotShorterThanRenew {
        /// Retry period.
        retry: Duration,
        /// Renew deadline.
        renew: Duration,
    },
    /// Empty namespace, name or identity.
    #[error("the lease {0} must not be empty")]
    Empty(&'static str),
}

impl ElectionConfig {
    /// A configuration with the default timings.
    pub fn new(namespace: String, lease_name: String, identity: String) -> Self {
        ElectionConfig {
            namespace,
            lease_name,
            identity,
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        }
    }

    /// Refuse timings under which the safety argument of this module does not hold.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.namespace.is_empty() {
            return Err(ConfigError::Empty("namespace"));
        }
        if self.lease_name.is_empty() {
            return Err(ConfigError::Empty("name"));
        }
        if self.identity.is_empty() {
            return Err(ConfigError::Empty("identity"));
        }
        if self.lease_duration.subsec_nanos() != 0
            || self.lease_duration.is_zero()
            || i32::try_from(self.lease_duration.as_secs()).is_err()
        {
            return Err(ConfigError::LeaseDuration(self.lease_duration));
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(ConfigError::RenewNotShorterThanLease {
                renew: self.renew_deadline,
                lease: self.lease_duration,
            });
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err(ConfigError::RetryNotShorterThanRenew {
                retry: self.retry_period,
                renew: self.renew_deadline,
            });
        }
        Ok(())
    }

    fn lease_duration_seconds(&self) -> i32 {
        // validate() guarantees the value fits.
        i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }
}

/// A process identity for `holderIdentity`: the pod name (or host name) and a random suffix, so a
/// restarted container never mistakes its predecessor's Lease for its own, and two processes on
/// one machine never share an identity.
pub fn default_identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "servicedb-operator".to_owned());
    let suffix: u32 = rand::random();
    format!("{base}_{suffix:08x}")
}

/// A failed request to the apiserver about the Lease.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// GET failed.
    #[error("reading Lease {lease}: {source}")]
    Get {
        /// `namespace/name`.
        lease: String,
        /// The client error.
        source: kube::Error,
    },
    /// POST failed (other than "already exists").
    #[error("creating Lease {lease}: {source}")]
    Create {
        /// `namespace/name`.
        lease: String,
        /// The client error.
        source: kube::Error,
    },
    /// Renewals kept conflicting with writes by others while the Lease still named this process.
    #[error("writing Lease {lease}: it kept changing while it named this process")]
    KeptChanging {
        /// `namespace/name`.
        lease: String,
    },
    /// PUT failed (other than a conflict).
    #[error("updating Lease {lease}: {source}")]
    Update {
        /// `namespace/name`.
        lease: String,
        /// The client error.
        source: kube::Error,
    },
}

/// Why a leader stopped leading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lost {
    /// No renewal succeeded within the renew deadline (apiserver unreachable, too slow, failing).
    RenewDeadlinePassed,
    /// A renewal found another holder.
    TakenBy(String),
    /// The Lease was deleted under the leader.
    Deleted,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::RenewDeadlinePassed => {
                f.write_str("no renewal succeeded within the renew deadline")
            }
            Lost::TakenBy(holder) => write!(f, "the Lease is now held by {holder}"),
            Lost::Deleted => f.write_str("the Lease was deleted"),
        }
    }
}

/// Leader-election metrics.
#[derive(Clone, Debug, Default)]
pub struct LeaderMetrics {
    /// 1 while this process holds the Lease and runs the controllers, else 0.
    pub leader: Gauge,
    /// Times this process acquired the Lease.
    pub acquired: Counter,
    /// Times this process lost the Lease while leading (not counting a release on shutdown).
    pub lost: Counter,
    /// Failed requests about the Lease.
    pub errors: Counter,
}

impl LeaderMetrics {
    /// Create the metrics and register them in `registry` (`servicedb_operator_leader`, ...).
    pub fn register(registry: &mut Registry) -> Self {
        let m = LeaderMetrics::default();
        let r = registry.sub_registry_with_prefix("servicedb_operator");
        r.register(
            "leader",
            "1 while this process holds the leader Lease and runs the controllers, else 0",
            m.leader.clone(),
        );
        r.register(
            "leader_acquired",
            "Times this process acquired the leader Lease",
            m.acquired.clone(),
        );
        r.register(
            "leader_lost",
            "Times this process lost the leader Lease while leading",
            m.lost.clone(),
        );
        r.register(
            "leader_election_errors",
            "Failed requests to the apiserver about the leader Lease",
            m.errors.clone(),
        );
        m
    }
}

/// What a standby last saw of the Lease, and when (monotonic).
struct Observed {
    resource_version: Option<String>,
    at: Instant,
}

/// One participant in the election: reads and writes the Lease.
pub struct Elector {
    api: Api<Lease>,
    config: ElectionConfig,
    /// The Lease as this process last wrote it, while it believes it leads.
    held: Option<Lease>,
    /// When the last successful acquire or renew request was sent (monotonic).
    last_renew: Instant,
    observed: Option<Observed>,
    /// When a Lease error was last logged at warn level (errors repeat every retry period).
    last_warned: Option<Instant>,
    metrics: LeaderMetrics,
}

fn is_status(err: &kube::Error, code: u16) -> bool {
    matches!(err, kube::Error::Api(s) if s.code == code)
}

fn now() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

impl Elector {
    /// An elector for `config` (which must be valid, see [`ElectionConfig::validate`]).
    pub fn new(client: Client, config: ElectionConfig, metrics: LeaderMetrics) -> Self {
        Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
            held: None,
            last_renew: Instant::now(),
            observed: None,
            last_warned: None,
            metrics,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ElectionConfig {
        &self.config
    }

    fn lease_ref(&self) -> String {
        format!("{}/{}", self.config.namespace, self.config.lease_name)
    }

    /// Count and log a failed request; at warn level at most every 30 s, so an apiserver outage
    /// or missing RBAC does not flood the log every retry period.
    fn report(&mut self, err: &LeaseError) {
        self.metrics.errors.inc();
        let due = self
            .last_warned
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(30));
        if due {
            self.last_warned = Some(Instant::now());
            warn!(error = %err, "leader election request failed (retrying)");
        } else {
            debug!(error = %err, "leader election request failed (retrying)");
        }
    }

    /// Wait until this process holds the Lease; returns when it does. Cancel by dropping.
    pub async fn acquire(&mut self) {
        loop {
            match self.try_acquire().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => self.report(&e),
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }

    /// One attempt to take the Lease: create it, take it over once it expired or was released,
    /// or keep it if it names this process. `Ok(true)` when this process now holds it.
    pub async fn try_acquire(&mut self) -> Result<bool, LeaseError> {
        let sent = Instant::now();
        let current = self
            .api
            .get_opt(&self.config.lease_name)
            .await
            .map_err(|source| LeaseError::Get {
                lease: self.lease_ref(),
                source,
            })?;
        let Some(mut lease) = current else {
            return self.create(sent).await;
        };
        let rv = lease.resource_version();
        let seen_at = Instant::now();
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|o| o.resource_version != rv);
        if changed {
            self.observed = Some(Observed {
                resource_version: rv,
                at: seen_at,
            });
        }
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.config.identity.as_str());
        if let Some(holder) = &holder
            && !mine
        {
            // The holder's own duration decides, so processes with different settings stay safe.
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.config.lease_duration, Duration::from_secs);
            let unchanged_for = self
                .observed
                .as_ref()
                .map_or(Duration::ZERO, |o| o.at.elapsed());
            if unchanged_for < duration {
                debug!(%holder, ?unchanged_for, "the Lease is held; standing by");
                return Ok(false);
            }
            info!(%holder, ?unchanged_for, "the Lease expired; taking it over");
        }
        let stamp = now();
        if !mine {
            spec.acquire_time = Some(stamp.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.holder_identity = Some(self.config.identity.clone());
        spec.lease_duration_seconds = Some(self.config.lease_duration_seconds());
        spec.renew_time = Some(stamp);
        match self
            .api
            .replace(&self.config.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(written) => {
                self.took(written, sent);
                Ok(true)
            }
            // Another candidate (or the holder's renewal) wrote first: not ours this round.
            Err(e) if is_status(&e, 409) => Ok(false),
            Err(source) => Err(LeaseError::Update {
                lease: self.lease_ref(),
                source,
            }),
        }
    }

    async fn create(&mut self, sent: Instant) -> Result<bool, LeaseError> {
        let stamp = now();
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.config.lease_name.clone()),
                namespace: Some(self.config.namespace.clone()),
                labels: Some(
                    [(
                        "app.kubernetes.io/managed-by".to_owned(),
                        crate::specs::labels::MANAGER.to_owned(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.config.identity.clone()),
                lease_duration_seconds: Some(self.config.lease_duration_seconds()),
                acquire_time: Some(stamp.clone()),
                renew_time: Some(stamp),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(written) => {
                self.took(written, sent);
                Ok(true)
            }
            Err(e) if is_status(&e, 409) => Ok(false),
            Err(source) => Err(LeaseError::Create {
                lease: self.lease_ref(),
                source,
            }),
        }
    }

    fn took(&mut self, written: Lease, sent: Instant) {
        self.held = Some(written);
        self.last_renew = sent;
        self.observed = None;
        self.metrics.acquired.inc();
        info!(
            lease = %self.lease_ref(),
            identity = %self.config.identity,
            "acquired the leader Lease"
        );
    }

    /// Renew the Lease every retry period until leadership is lost; returns why. Never returns
    /// later than the renew deadline after the last successful renewal was sent.
    pub async fn hold(&mut self) -> Lost {
        let lost = self.renew_until_lost().await;
        // Whatever the Lease says now, this process must not act on its old copy again.
        self.held = None;
        lost
    }

    async fn renew_until_lost(&mut self) -> Lost {
        loop {
            let deadline = self.last_renew + self.config.renew_deadline;
            tokio::select! {
                () = tokio::time::sleep(self.config.retry_period) => {}
                () = tokio::time::sleep_until(deadline) => return Lost::RenewDeadlinePassed,
            }
            let sent = Instant::now();
            match tokio::time::timeout_at(deadline, self.renew()).await {
                Err(_elapsed) => return Lost::RenewDeadlinePassed,
                Ok(Ok(None)) => self.last_renew = sent,
                Ok(Ok(Some(lost))) => return lost,
                Ok(Err(e)) => self.report(&e),
            }
        }
    }

    /// One renewal: `Ok(None)` when renewed, `Ok(Some(_))` when the Lease is no longer ours.
    async fn renew(&mut self) -> Result<Option<Lost>, LeaseError> {
        let Some(mut lease) = self.held.clone() else {
            return Ok(Some(Lost::RenewDeadlinePassed));
        };
        // Two tries: the second after a conflict caused by someone else touching the Lease (an
        // annotation, a label) while it still names this process.
        for _ in 0..2 {
            lease.spec.get_or_insert_with(LeaseSpec::default).renew_time = Some(now());
            match self
                .api
                .replace(&self.config.lease_name, &PostParams::default(), &lease)
                .await
            {
                Ok(written) => {
                    self.held = Some(written);
                    return Ok(None);
                }
                Err(e) if is_status(&e, 409) => {
                    let current =
                        self.api
                            .get_opt(&self.config.lease_name)
                            .await
                            .map_err(|source| LeaseError::Get {
                                lease: self.lease_ref(),
                                source,
                            })?;
                    let Some(current) = current else {
                        return Ok(Some(Lost::Deleted));
                    };
                    let holder = current
                        .spec
                        .as_ref()
                        .and_then(|s| s.holder_identity.clone())
                        .unwrap_or_default();
                    if holder != self.config.identity {
                        return Ok(Some(Lost::TakenBy(holder)));
                    }
                    lease = current;
                }
                Err(e) if is_status(&e, 404) => return Ok(Some(Lost::Deleted)),
                Err(source) => {
                    return Err(LeaseError::Update {
                        lease: self.lease_ref(),
                        source,
                    });
                }
            }
        }
        Err(LeaseError::KeptChanging {
            lease: self.lease_ref(),
        })
    }

    /// Give the Lease up (graceful shutdown), so a standby takes over at once instead of
    /// waiting for it to expire. Only call once the controllers have stopped.
    pub async fn release(&mut self) -> Result<(), LeaseError> {
        let Some(mut lease) = self.held.take() else {
            return Ok(());
        };
        // Two tries: our copy may be one renewal behind (a renewal cut short by the shutdown).
        for _ in 0..2 {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(now());
            match self
                .api
                .replace(&self.config.lease_name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => {
                    info!(lease = %self.lease_ref(), "released the leader Lease");
                    return Ok(());
                }
                Err(e) if is_status(&e, 409) => {
                    let current =
                        self.api
                            .get_opt(&self.config.lease_name)
                            .await
                            .map_err(|source| LeaseError::Get {
                                lease: self.lease_ref(),
                                source,
                            })?;
                    match current {
                        Some(current)
                            if current
                                .spec
                                .as_ref()
                                .and_then(|s| s.holder_identity.as_deref())
                                == Some(self.config.identity.as_str()) =>
                        {
                            lease = current;
                        }
                        // Someone else holds it already, or it is gone: nothing to release.
                        _ => return Ok(()),
                    }
                }
                Err(e) if is_status(&e, 404) => return Ok(()),
                Err(source) => {
                    return Err(LeaseError::Update {
                        lease: self.lease_ref(),
                        source,
                    });
                }
            }
        }
        Err(LeaseError::KeptChanging {
            lease: self.lease_ref(),
        })
    }
}

/// Run `work` only while this process leads: stand by until the Lease is acquired, start `work`,
/// renew; on losing the Lease stop `work` at once (its task is aborted, so no reconcile runs
/// past the next await point) and stand by again. On `shutdown`, stop `work` gracefully (bounded
/// by the renew deadline, renewing meanwhile), then release the Lease.
///
/// `work` gets a token that asks it to stop gracefully; it is also aborted when that is too slow.
pub async fn run_while_leading<F, Fut>(
    mut elector: Elector,
    leadership: Leadership,
    metrics: LeaderMetrics,
    shutdown: CancellationToken,
    mut work: F,
) where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let identity = elector.config().identity.clone();
    let set_leading = |leading: bool| {
        leadership.set(leading);
        metrics.leader.set(i64::from(leading));
    };
    loop {
        info!(%identity, lease = %elector.lease_ref(), "standing by for the leader Lease");
        tokio::select! {
            () = elector.acquire() => {}
            () = shutdown.cancelled() => return,
        }
        let stop = CancellationToken::new();
        let mut task = tokio::spawn(work(stop.clone()));
        set_leading(true);
        info!(%identity, "leading: controllers started");
        let lost = tokio::select! {
            lost = elector.hold() => Some(lost),
            () = shutdown.cancelled() => None,
            _ = &mut task => {
                // The controllers end only when asked to; keep the process honest anyway.
                error!("the controllers stopped on their own; releasing the Lease");
                set_leading(false);
                release(&mut elector).await;
                return;
            }
        };
        if let Some(lost) = lost {
            // Never two writers: abort first, log after.
            task.abort();
            let _ = (&mut task).await;
            stop.cancel();
            set_leading(false);
            metrics.lost.inc();
            error!(reason = %lost, %identity, "lost the leader Lease: controllers stopped");
            continue;
        }
        // Graceful shutdown: let in-flight reconciles finish while still renewing, bounded by
        // the renew deadline, then make sure nothing runs and hand the Lease over.
        info!("shutting down: stopping the controllers before releasing the Lease");
        stop.cancel();
        let grace = elector.config().renew_deadline;
        let (finished, still_held) = tokio::select! {
            _ = &mut task => (true, true),
            lost = elector.hold() => {
                warn!(reason = %lost, "lost the leader Lease while shutting down");
                (false, false)
            }
            () = tokio::time::sleep(grace) => (false, true),
        };
        if !finished {
            task.abort();
            let _ = task.await;
        }
        set_leading(false);
        if still_held {
            release(&mut elector).await;
        }
        return;
    }
}

async fn release(elector: &mut Elector) {
    let bound = elector.config().retry_period;
    match tokio::time::timeout(bound, elector.release()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "could not release the leader Lease; it will expire"),
        Err(_) => warn!("releasing the leader Lease timed out; it will expire"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ElectionConfig {
        ElectionConfig::new("ns".into(), "lease".into(), "me".into())
    }

    #[test]
    fn the_default_timings_are_valid() {
        config().validate().unwrap();
        assert!(DEFAULT_RENEW_DEADLINE < DEFAULT_LEASE_DURATION);
    }

    #[test]
    fn a_renew_deadline_not_shorter_than_the_lease_is_refused() {
        let mut c = config();
        c.renew_deadline = c.lease_duration;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::RenewNotShorterThanLease { .. })
        ));
    }

    #[test]
    fn a_retry_period_not_shorter_than_the_renew_deadline_is_refused() {
        let mut c = config();
        c.retry_period = c.renew_deadline;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::RetryNotShorterThanRenew { .. })
        ));
        c.retry_period = Duration::ZERO;
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_fractional_or_zero_lease_duration_is_refused() {
        let mut c = config();
        c.lease_duration = Duration::from_millis(15_500);
        assert!(matches!(c.validate(), Err(ConfigError::LeaseDuration(_))));
        c.lease_duration = Duration::ZERO;
        assert!(c.validate().is_err());
    }

    #[test]
    fn an_empty_namespace_is_refused() {
        let mut c = config();
        c.namespace.clear();
        assert!(matches!(c.validate(), Err(ConfigError::Empty("namespace"))));
    }

    #[test]
    fn identities_differ_between_processes_on_one_machine() {
        assert_ne!(default_identity(), default_identity());
    }
}
