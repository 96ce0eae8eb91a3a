//! Leader election against the real control plane: two `servicedb operator` processes share one
//! Lease and exactly one reconciles; a leader killed with SIGKILL is replaced within the lease
//! duration and the new leader converges a new ServiceDatabase; a leader cut off from the
//! apiserver (through a stoppable proxy) stops reconciling before its successor takes the Lease,
//! and never writes again; a leader stopped with SIGTERM hands the Lease over at once.
//!
//! Evidence is read from each process's own /metrics (API writes and reconciles, which count
//! per process) on its own listen port, from the Lease, and from the Events' reporting instance.

mod support;

use support::harness;

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, ensure};
use harness::{Operator, OperatorOptions, create_admin_secret, external_sdb, wait_condition};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, PostParams};
use servicedb::api::ServiceDatabase;

/// The binary's defaults, which the tests run with (the shipped timings are what is proven).
const LEASE_NAME: &str = "servicedb-operator";
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// Per-process evidence from its /metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Activity {
    writes: f64,
    reconciles: f64,
}

async fn activity(op: &Operator) -> Result<Activity> {
    Ok(Activity {
        writes: op.metric("servicedb_operator_api_writes_total").await?,
        reconciles: op.metric("servicedb_operator_reconciles_total").await?,
    })
}

async fn elected(ns: &support::TestNamespace, pod: &str) -> Result<Operator> {
    Operator::start_with_options(
        &ns.name,
        OperatorOptions {
            leader_elect: true,
            pod_name: Some(pod.to_owned()),
            kubeconfig: None,
            extra_args: Vec::new(),
        },
    )
    .await
}

async fn wait_leader(op: &Operator, who: &str) -> Result<()> {
    support::wait_until(&format!("{who} to lead"), support::TIMEOUT, || async {
        op.is_leader().await.then_some(())
    })
    .await
}

fn holder(lease: &Lease) -> String {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .unwrap_or_default()
}

async fn lease(ns: &support::TestNamespace) -> Result<Lease> {
    Ok(ns.api::<Lease>().get(LEASE_NAME).await?)
}

/// Create an external ServiceDatabase `name` on the shared Postgres (deletion drops it).
async fn create_sdb(ns: &support::TestNamespace, name: &str) -> Result<String> {
    let service = format!("le-{name}-{}", support::random_suffix());
    let sdb: ServiceDatabase = serde_json::from_value(external_sdb(name, &service, "Delete"))?;
    ns.api::<ServiceDatabase>()
        .create(&PostParams::default(), &sdb)
        .await?;
    Ok(service)
}

async fn wait_ready(ns: &support::TestNamespace, name: &str) -> Result<()> {
    wait_condition(
        &ns.api::<ServiceDatabase>(),
        name,
        "Ready",
        "True",
        support::TIMEOUT,
    )
    .await?;
    Ok(())
}

/// Delete the ServiceDatabases while a leader runs, so their databases are dropped and the
/// namespace is not held by finalizers.
async fn clean_up(ns: &support::TestNamespace, names: &[&str]) -> Result<()> {
    let api = ns.api::<ServiceDatabase>();
    for name in names {
        api.delete(name, &DeleteParams::default()).await?;
    }
    support::wait_until(
        "the ServiceDatabases to be deleted",
        support::TIMEOUT,
        || {
            let api = api.clone();
            async move {
                for name in names {
                    if api.get_opt(name).await.ok()?.is_some() {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await
}

/// The reporting instances (POD_NAME) of the operator's Events in the namespace.
async fn event_reporters(ns: &support::TestNamespace) -> Result<Vec<String>> {
    let mut out: Vec<String> = ns
        .api::<Event>()
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("servicedb-operator"))
        .filter_map(|e| e.reporting_instance)
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

#[tokio::test]
async fn only_the_lease_holder_reconciles_and_a_killed_leader_is_replaced_within_the_lease_duration()
-> Result<()> {
    let ns = support::TestNamespace::new("leader-kill").await?;
    create_admin_secret(&ns, "pg-admin").await?;
    let a = elected(&ns, "op-a").await?;
    wait_leader(&a, "op-a").await?;
    let b = elected(&ns, "op-b").await?;
    ensure!(holder(&lease(&ns).await?).starts_with("op-a_"));

    create_sdb(&ns, "first").await?;
    wait_ready(&ns, "first").await?;
    // Both run side by side for a while (a resync included): only the holder does anything.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let a_did = activity(&a).await?;
    let b_did = activity(&b).await?;
    ensure!(
        a_did.writes > 0.0 && a_did.reconciles > 0.0,
        "the leader did nothing: {a_did:?}"
    );
    ensure!(
        b_did
            == Activity {
                writes: 0.0,
                reconciles: 0.0
            },
        "the standby reconciled or wrote: {b_did:?}\n{}",
        b.log_text()
    );
    ensure!(!b.is_leader().await, "op-b says it leads");
    assert_eq!(a.metric("servicedb_operator_leader").await?, 1.0);
    assert_eq!(b.metric("servicedb_operator_leader").await?, 0.0);
    assert_eq!(event_reporters(&ns).await?, ["op-a"]);

    // kill -9: no release, the Lease must expire.
    a.kill().await?;
    let killed = Instant::now();
    let taken = support::wait_until("op-b to take the Lease", support::TIMEOUT, || async {
        let lease = lease(&ns).await.ok()?;
        holder(&lease).starts_with("op-b_").then_some(lease)
    })
    .await?;
    let took = killed.elapsed();
    // op-b last saw op-a's renewal at most one retry period before the kill and takes over on
    // its first look after the lease duration: never before the Lease could have expired, and
    // within the lease duration plus two retry periods of observation granularity.
    ensure!(
        took >= LEASE_DURATION - 2 * RETRY_PERIOD,
        "op-b took a live Lease after {took:?}"
    );
    ensure!(
        took <= LEASE_DURATION + 2 * RETRY_PERIOD + Duration::from_secs(3),
        "op-b took over only after {took:?}"
    );
    eprintln!("op-b took over {took:?} after op-a was killed");
    assert_eq!(
        taken.spec.as_ref().and_then(|s| s.lease_transitions),
        Some(1)
    );
    wait_leader(&b, "op-b").await?;

    // The new leader converges a ServiceDatabase created after the takeover.
    create_sdb(&ns, "second").await?;
    wait_ready(&ns, "second").await?;
    let b_did = activity(&b).await?;
    ensure!(
        b_did.writes > 0.0 && b_did.reconciles > 0.0,
        "the new leader did nothing: {b_did:?}"
    );
    assert_eq!(event_reporters(&ns).await?, ["op-a", "op-b"]);
    clean_up(&ns, &["first", "second"]).await?;
    Ok(())
}

#[tokio::test]
async fn a_partitioned_leader_stops_reconciling_before_the_new_leader_takes_the_lease() -> Result<()>
{
    let ns = support::TestNamespace::new("leader-split").await?;
    create_admin_secret(&ns, "pg-admin").await?;
    // op-a reaches the apiserver only through the proxy; its /metrics stay reachable directly.
    let mut proxy = harness::Proxy::start(&harness::apiserver_address()?).await?;
    let dir = tempfile::tempdir()?;
    let a = Operator::start_with_options(
        &ns.name,
        OperatorOptions {
            leader_elect: true,
            pod_name: Some("op-a".to_owned()),
            kubeconfig: Some(harness::kubeconfig_through(proxy.port, dir.path())?),
            extra_args: Vec::new(),
        },
    )
    .await?;
    wait_leader(&a, "op-a").await?;
    let b = elected(&ns, "op-b").await?;
    create_sdb(&ns, "first").await?;
    wait_ready(&ns, "first").await?;
    ensure!(activity(&a).await?.writes > 0.0);
    ensure!(activity(&b).await?.reconciles == 0.0);

    // Partition op-a. Watch it (on its own port) and the Lease (as the admin) until op-a has
    // stopped and op-b holds the Lease.
    proxy.stop();
    let mut a_stopped: Option<(SystemTime, Activity)> = None;
    let deadline = Instant::now() + support::TIMEOUT;
    let taken = loop {
        ensure!(
            Instant::now() < deadline,
            "no takeover; op-a:\n{}",
            a.log_text()
        );
        if a_stopped.is_none() && a.metric("servicedb_operator_leader").await? == 0.0 {
            a_stopped = Some((SystemTime::now(), activity(&a).await?));
        }
        let lease = lease(&ns).await?;
        if holder(&lease).starts_with("op-b_") {
            break lease;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (stopped_at, at_stop) = a_stopped.context(
        "op-b took the Lease while op-a still said it led (its gauge was never seen at 0)",
    )?;
    let acquired = taken
        .spec
        .as_ref()
        .and_then(|s| s.acquire_time.clone())
        .context("the Lease has no acquireTime")?
        .0;
    // The test saw op-a's gauge at 0 (set only once its controllers were aborted) no earlier
    // than it happened, and before op-b wrote its acquireTime: no interleaving is possible.
    let stopped_at = jiff::Timestamp::try_from(stopped_at)?;
    ensure!(
        stopped_at < acquired,
        "op-a stopped at {stopped_at}, after op-b acquired the Lease at {acquired}"
    );
    eprintln!(
        "op-a stopped {:?} before op-b acquired the Lease",
        acquired.duration_since(stopped_at)
    );
    wait_leader(&b, "op-b").await?;

    // Heal the partition: op-a sees op-b's Lease and stays a standby; op-b converges a new
    // ServiceDatabase (a live controller in op-a would reconcile it too).
    proxy.resume().await?;
    create_sdb(&ns, "second").await?;
    wait_ready(&ns, "second").await?;
    // op-a has reached the apiserver again once its Lease errors stop growing.
    let errors_metric = "servicedb_operator_leader_election_errors_total";
    let mut errors = a.metric(errors_metric).await?;
    let deadline = Instant::now() + support::TIMEOUT;
    loop {
        tokio::time::sleep(3 * RETRY_PERIOD).await;
        let now = a.metric(errors_metric).await?;
        if now == errors {
            break;
        }
        errors = now;
        ensure!(
            Instant::now() < deadline,
            "op-a never reached the apiserver again:\n{}",
            a.log_text()
        );
    }
    // One more resync period, in which a running controller would have reconciled both objects.
    tokio::time::sleep(Duration::from_secs(21)).await;
    let a_after = activity(&a).await?;
    ensure!(
        a_after == at_stop,
        "op-a worked after it lost the Lease: {at_stop:?} -> {a_after:?}\n{}",
        a.log_text()
    );
    ensure!(!a.is_leader().await, "op-a leads again");
    assert_eq!(
        a.metric("servicedb_operator_leader_lost_total").await?,
        1.0,
        "op-a lost the Lease once"
    );
    assert_eq!(
        a.metric(errors_metric).await?,
        errors,
        "op-a still cannot reach the apiserver"
    );
    let b_did = activity(&b).await?;
    ensure!(b_did.writes > 0.0, "the new leader did nothing: {b_did:?}");
    ensure!(
        holder(&lease(&ns).await?).starts_with("op-b_"),
        "op-b lost the Lease"
    );
    clean_up(&ns, &["first", "second"]).await?;
    Ok(())
}

#[tokio::test]
async fn a_leader_stopped_with_sigterm_releases_the_lease_and_the_standby_takes_over_at_once()
-> Result<()> {
    let ns = support::TestNamespace::new("leader-term").await?;
    let mut a = elected(&ns, "op-a").await?;
    wait_leader(&a, "op-a").await?;
    let b = elected(&ns, "op-b").await?;
    // Let op-b see op-a's Lease first, so an expiry would take the full lease duration.
    tokio::time::sleep(2 * RETRY_PERIOD).await;
    ensure!(!b.is_leader().await);

    let status = a.terminate(support::TIMEOUT).await?;
    let stopped = Instant::now();
    ensure!(status.success(), "op-a exited with {status}");
    ensure!(
        a.log_text().contains("released the leader Lease"),
        "{}",
        a.log_text()
    );
    support::wait_until("op-b to take the Lease", support::TIMEOUT, || async {
        let lease = lease(&ns).await.ok()?;
        holder(&lease).starts_with("op-b_").then_some(())
    })
    .await?;
    let took = stopped.elapsed();
    // A released Lease is free at once: op-b takes it on its next look, well before the
    // lease duration an expiry would need.
    ensure!(
        took < LEASE_DURATION - 2 * RETRY_PERIOD,
        "op-b took over only after {took:?}"
    );
    eprintln!("op-b took over {took:?} after op-a exited");
    wait_leader(&b, "op-b").await?;
    Ok(())
}
