//! The CDC step: register, watch and remove the Debezium connector in Kafka Connect, and watch
//! the WAL its replication slot retains (Kafka Connect REST, Kubernetes reads, one catalog
//! read). A failing connector never fails the database: it is reported in `CdcReady` and
//! `status.cdc`, and the database's own `Ready` stays about the database.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::events::EventType;

use super::decide::Desire;
use super::instance::Target;
use super::provisioning::Provisioned;
use crate::api::service_database::{
    CdcSecretProvider, CdcSpec, CdcStatus, DEFAULT_CDC_LAG_WARNING_BYTES, KafkaConnectRef,
    ServiceDatabase,
};
use crate::cdc::config::{self, ConnectorInput, SecretProvider};
use crate::cdc::{BasicAuth, ConnectClient, ConnectSettings, Health, Outcome};
use crate::operator::Context;
use crate::operator::conditions::Desired;
use crate::postgres::{self, ConnectParams, Password, QualifiedName};
use crate::specs::credentials::{self, secret_value, stored_password};

/// The retained WAL shown in status is rounded down to this, so a moving slot does not rewrite
/// status on every resync (the metric has the exact figure).
const STATUS_WAL_GRANULARITY: i64 = 16 * 1024 * 1024;

/// What the CDC step found.
#[derive(Clone, Debug, PartialEq)]
pub struct CdcReport {
    /// `CdcReady`.
    pub condition: Desired,
    /// `status.cdc`.
    pub status: CdcStatus,
    /// Look again sooner than the resync (not running yet, failed, Connect down).
    pub recheck: Option<Duration>,
}

/// The connector's settings from the spec and where the database is (pure).
pub fn connector_input(
    sdb: &ServiceDatabase,
    cdc: &CdcSpec,
    desire: &Desire,
    target: &Target,
) -> ConnectorInput {
    let tables = cdc
        .tables
        .iter()
        .filter_map(|t| QualifiedName::parse(&t.0).ok())
        .collect();
    let mut input = ConnectorInput::new(
        sdb.namespace().unwrap_or_default(),
        sdb.name_any(),
        target.endpoint.host.clone(),
        u16::try_from(target.endpoint.port).unwrap_or(5432),
        desire.plan.database.clone(),
        desire.roles.cdc.clone(),
        target.admin.ssl_mode,
        tables,
        cdc.topic_prefix.clone(),
    );
    input.credentials_secret = desire.names.cdc_secret();
    input.secret_provider = secret_provider(cdc.secret_provider.as_ref());
    input.ssl_root_cert = cdc.ssl_root_cert_path.clone();
    input.extra = cdc.settings.clone();
    input
}

fn secret_provider(spec: Option<&CdcSecretProvider>) -> SecretProvider {
    let alias = |a: &Option<String>, default: &str| a.clone().unwrap_or_else(|| default.to_owned());
    match spec {
        Some(CdcSecretProvider {
            directory: Some(d), ..
        }) => SecretProvider::Directory {
            alias: alias(&d.alias, config::DIRECTORY_ALIAS),
            path: d.path.clone(),
        },
        Some(CdcSecretProvider { file: Some(f), .. }) => SecretProvider::File {
            alias: alias(&f.alias, config::FILE_ALIAS),
            path: f.path.clone(),
            key: f.key.clone(),
        },
        Some(CdcSecretProvider {
            kubernetes_secret: Some(k),
            ..
        }) => SecretProvider::KubernetesSecret {
            alias: alias(&k.alias, config::STRIMZI_SECRETS_ALIAS),
        },
        _ => SecretProvider::default(),
    }
}

/// A client for the Connect cluster `r` names; `redact` are secrets its errors must not carry.
async fn client(
    ctx: &Context,
    ns: &str,
    r: &KafkaConnectRef,
    redact: Vec<Password>,
) -> Result<ConnectClient, String> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let read = |name: String| {
        let secrets = secrets.clone();
        async move {
            secrets
                .get_opt(&name)
                .await
                .map_err(|e| format!("could not read Secret {name}: {e}"))?
                .ok_or_else(|| format!("Secret {name} not found"))
        }
    };
    let basic_auth = match &r.basic_auth_secret_ref {
        Some(s) => {
            let secret = read(s.name.clone()).await?;
            let username = secret_value(&secret, credentials::USERNAME_KEY);
            match (username, stored_password(&secret)) {
                (Some(username), Some(password)) => Some(BasicAuth {
                    username,
                    password: Password::from_plaintext(password),
                }),
                _ => return Err(format!("Secret {} needs username and password", s.name)),
            }
        }
        None => None,
    };
    let ca_pem = match &r.ca_secret_ref {
        Some(c) => {
            let secret = read(c.name.clone()).await?;
            let pem = secret_value(&secret, &c.key)
                .ok_or_else(|| format!("Secret {} has no key {}", c.name, c.key))?;
            Some(pem.into_bytes())
        }
        None => None,
    };
    let mut redact = redact;
    redact.extend(basic_auth.as_ref().map(|b| b.password.clone()));
    ConnectClient::new(&ConnectSettings {
        basic_auth,
        ca_pem,
        redact,
        ..ConnectSettings::new(r.url.clone())
    })
    .map_err(|e| e.to_string())
}

/// Registers the connector once every captured table exists, and reports its state and its
/// slot's retained WAL.
pub async fn converge(
    ctx: &Context,
    sdb: &ServiceDatabase,
    cdc: &CdcSpec,
    desire: &Desire,
    target: &Target,
    provisioned: &Provisioned,
    cdc_password: Option<Password>,
) -> CdcReport {
    let missing_tables = &provisioned.missing_cdc_tables;
    let ns = sdb.namespace().unwrap_or_default();
    let name = sdb.name_any();
    let mut status = CdcStatus {
        connector: config::connector_name(&ns, &name),
        kafka_connect: cdc.kafka_connect.clone(),
        slot: config::slot_name(&ns, &name),
        state: None,
        retained_wal_bytes: None,
    };
    let restart_key = format!("cdc-restart/{ns}/{name}");
    let not_ready = |condition: Desired, status: CdcStatus, after: Duration| CdcReport {
        condition,
        status,
        recheck: Some(after),
    };
    if !missing_tables.is_empty() {
        // The app creates its tables after its database exists: nothing to capture yet.
        let message = format!("tables not found yet: {}", missing_tables.join(", "));
        let after = ctx.backoff.next(&restart_key).min(super::RECHECK);
        return not_ready(
            Desired::fail("CdcReady", "TablesMissing", message),
            status,
            after,
        );
    }
    let desired = match config::connector_config(&connector_input(sdb, cdc, desire, target)) {
        Ok(desired) => desired,
        Err(e) => {
            let condition = Desired::fail("CdcReady", e.category(), e.to_string());
            return not_ready(condition, status, super::RECHECK);
        }
    };
    let redact = cdc_password.into_iter().collect();
    let connect = match client(ctx, &ns, &cdc.kafka_connect, redact).await {
        Ok(c) => c,
        Err(message) => {
            let condition = Desired::fail("CdcReady", "KafkaConnectSettings", message);
            return not_ready(condition, status, super::RECHECK);
        }
    };
    if provisioned.cdc_password_rotated {
        // The worker resolved the old password when it started the task: start it again.
        restart_all(ctx, sdb, &connect, &desired.name).await;
    }
    let health = register_and_watch(ctx, sdb, &connect, &desired).await;
    ctx.metrics.connect_requests(&connect.request_counts());
    if let Watched::Failed(reason) = &health {
        ctx.event(
            sdb,
            EventType::Warning,
            "ConnectorFailed",
            "Watch",
            reason.clone(),
        )
        .await;
        restart(ctx, sdb, &connect, &desired.name).await;
        ctx.metrics.connect_requests(&connect.request_counts());
    }
    let (condition, state, recheck) = readiness(health);
    let recheck = match (&condition.reason[..], recheck) {
        // Failed: restarted now, again after a growing delay until it runs.
        ("ConnectorFailed", _) => Some(ctx.backoff.next(&restart_key)),
        (_, None) => {
            ctx.backoff.reset(&restart_key);
            None
        }
        (_, later) => later,
    };
    status.state = Some(state);
    let lag = retained_wal(&target.admin.with_dbname(desire.database()), &status.slot).await;
    ctx.metrics.set_cdc_retained_wal(&ns, &name, lag);
    status.retained_wal_bytes = lag.map(|b| b - b % STATUS_WAL_GRANULARITY);
    let limit = cdc
        .lag_warning_bytes
        .unwrap_or(DEFAULT_CDC_LAG_WARNING_BYTES);
    if let Some(message) = lag_warning(lag, limit, &status.slot) {
        ctx.event(
            sdb,
            EventType::Warning,
            "SlotLagHigh",
            "Watch",
            message.clone(),
        )
        .await;
        if condition.status == Some(true) {
            return CdcReport {
                condition: Desired::fail("CdcReady", "SlotLagHigh", message),
                status,
                recheck: Some(super::RECHECK),
            };
        }
    }
    CdcReport {
        condition,
        status,
        recheck,
    }
}

/// `CdcReady`, the state shown in status, and when to look again, from what Connect said
/// (pure; a failed connector's restart cadence is the caller's backoff).
fn readiness(health: Watched) -> (Desired, String, Option<Duration>) {
    match health {
        Watched::Running => (
            Desired::ok(
                "CdcReady",
                "Running",
                "the connector and its task are RUNNING",
            ),
            "RUNNING".to_owned(),
            None,
        ),
        Watched::Failed(reason) => (
            Desired::fail("CdcReady", "ConnectorFailed", reason),
            "FAILED".to_owned(),
            Some(super::RECHECK),
        ),
        Watched::Starting(state, reason) => (
            Desired::fail("CdcReady", "ConnectorNotRunning", reason),
            state,
            Some(super::RECHECK),
        ),
        Watched::Unreachable(message) => (
            Desired::unknown("CdcReady", "KafkaConnectUnreachable", message),
            "Unknown".to_owned(),
            Some(super::RECHECK),
        ),
        Watched::Refused(message) => (
            Desired::fail("CdcReady", "KafkaConnectRefused", message),
            "Unknown".to_owned(),
            Some(super::RECHECK),
        ),
    }
}

/// The warning for a slot retaining more than `limit` bytes of WAL (pure).
fn lag_warning(lag: Option<i64>, limit: i64, slot: &str) -> Option<String> {
    let bytes = lag.filter(|b| *b > limit)?;
    Some(format!(
        "replication slot {slot} retains {} MiB of WAL (warning above {} MiB): the connector is not keeping up or is stopped",
        bytes / (1024 * 1024),
        limit / (1024 * 1024)
    ))
}

/// What Connect said about the connector.
enum Watched {
    Running,
    Failed(String),
    /// State name and why it is not running.
    Starting(String, String),
    Unreachable(String),
    Refused(String),
}

/// Puts the desired config (only when Connect holds another) and reads the connector's state.
async fn register_and_watch(
    ctx: &Context,
    sdb: &ServiceDatabase,
    connect: &ConnectClient,
    desired: &config::ConnectorConfig,
) -> Watched {
    let failed = |e: crate::cdc::ConnectError| {
        if e.is_unavailable() {
            Watched::Unreachable(format!("Kafka Connect cannot be reached: {e}"))
        } else {
            Watched::Refused(e.to_string())
        }
    };
    match connect.converge(desired).await {
        Ok(Outcome::Unchanged) => {}
        Ok(outcome) => {
            let what = match outcome {
                Outcome::Created => "registered",
                _ => "updated",
            };
            ctx.event(
                sdb,
                EventType::Normal,
                "ConnectorApplied",
                "Apply",
                format!("{what} connector {} in Kafka Connect", desired.name),
            )
            .await;
        }
        Err(e) => return failed(e),
    }
    match connect.status(&desired.name).await {
        Ok(Some(status)) => match status.health() {
            Health::Running => Watched::Running,
            Health::Failed { reason } => Watched::Failed(reason),
            Health::NotRunning { reason } => {
                Watched::Starting(status.connector.state.to_string(), reason)
            }
        },
        Ok(None) => Watched::Starting(
            "Missing".to_owned(),
            "the connector is not in Kafka Connect yet".to_owned(),
        ),
        Err(e) => failed(e),
    }
}

/// Restarts the failed connector and tasks (running tasks are left alone).
async fn restart(ctx: &Context, sdb: &ServiceDatabase, connect: &ConnectClient, name: &str) {
    match connect.restart_failed(name).await {
        Ok(true) => {
            ctx.event(
                sdb,
                EventType::Normal,
                "ConnectorRestarted",
                "Restart",
                format!("restarted the failed parts of connector {name}"),
            )
            .await;
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "could not restart the connector"),
    }
}

/// Restarts the connector and all its tasks after the cdc role's password changed.
async fn restart_all(ctx: &Context, sdb: &ServiceDatabase, connect: &ConnectClient, name: &str) {
    match connect.restart_all(name).await {
        Ok(true) => {
            ctx.event(
                sdb,
                EventType::Normal,
                "ConnectorRestarted",
                "Restart",
                format!("restarted connector {name}: the cdc role has a new password"),
            )
            .await;
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(error = %e, "could not restart the connector after a password change")
        }
    }
}

/// The WAL the slot retains, when it can be read.
async fn retained_wal(admin: &ConnectParams, slot: &str) -> Option<i64> {
    let client = match postgres::connect(admin).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "could not connect to read the slot's lag");
            return None;
        }
    };
    match postgres::slots::slot_lag(&client, slot).await {
        Ok(lag) => lag.and_then(|l| l.retained_bytes),
        Err(e) => {
            tracing::debug!(error = %e, "could not read the slot's lag");
            None
        }
    }
}

/// Deletes the connector `recorded` names, then drops its slot (so Connect cannot recreate
/// anything): when `cdc` is removed and when the ServiceDatabase is deleted. `admin` is the
/// server's admin connection, when there is one.
pub async fn remove(
    ctx: &Context,
    sdb: &ServiceDatabase,
    recorded: &CdcStatus,
    admin: Option<&ConnectParams>,
) -> Result<(), String> {
    let ns = sdb.namespace().unwrap_or_default();
    let connect = client(ctx, &ns, &recorded.kafka_connect, Vec::new()).await?;
    let deleted = connect.delete(&recorded.connector).await;
    ctx.metrics.connect_requests(&connect.request_counts());
    if deleted.map_err(|e| format!("deleting connector {}: {e}", recorded.connector))? {
        ctx.event(
            sdb,
            EventType::Normal,
            "ConnectorDeleted",
            "Delete",
            format!(
                "deleted connector {} from Kafka Connect",
                recorded.connector
            ),
        )
        .await;
    }
    if let Some(admin) = admin {
        let database = admin.with_dbname(sdb.spec.database_name());
        let dropped = postgres::slots::drop_slot(&database, &recorded.slot)
            .await
            .map_err(|e| postgres::summary::user_message(&e))?;
        if dropped {
            ctx.event(
                sdb,
                EventType::Normal,
                "SlotDropped",
                "Delete",
                format!("dropped replication slot {}", recorded.slot),
            )
            .await;
        }
    }
    ctx.metrics.set_cdc_retained_wal(&ns, &sdb.name_any(), None);
    Ok(())
}

/// `cdc` was removed from the spec: delete the connector and its slot before provisioning
/// drops the publication and retires the role. Returns what is still to remove (kept in
/// status and retried) when that failed.
pub async fn retire_removed(
    ctx: &Context,
    sdb: &ServiceDatabase,
    target: &Target,
) -> Option<CdcStatus> {
    if sdb.spec.cdc.is_some() {
        return None;
    }
    let recorded = sdb.status.as_ref().and_then(|s| s.cdc.clone())?;
    if sdb
        .annotations()
        .get(crate::operator::SKIP_CLEANUP_ANNOTATION)
        .is_some_and(|v| v == "true")
    {
        ctx.event(
            sdb,
            EventType::Warning,
            "CleanupSkipped",
            "Delete",
            format!(
                "{} is set: connector {} and slot {} are left for you to remove",
                crate::operator::SKIP_CLEANUP_ANNOTATION,
                recorded.connector,
                recorded.slot
            ),
        )
        .await;
        return None;
    }
    match remove(ctx, sdb, &recorded, Some(&target.admin)).await {
        Ok(()) => None,
        Err(message) => {
            ctx.event(
                sdb,
                EventType::Warning,
                "ConnectorNotRemoved",
                "Delete",
                format!("{message}; retrying"),
            )
            .await;
            Some(recorded)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_connects_answer() {
        let table = [
            (Watched::Running, Some(true), "Running", "RUNNING", false),
            (
                Watched::Failed("task 0 FAILED: boom".into()),
                Some(false),
                "ConnectorFailed",
                "FAILED",
                true,
            ),
            (
                Watched::Starting("UNASSIGNED".into(), "starting".into()),
                Some(false),
                "ConnectorNotRunning",
                "UNASSIGNED",
                true,
            ),
            (
                Watched::Unreachable("down".into()),
                None,
                "KafkaConnectUnreachable",
                "Unknown",
                true,
            ),
            (
                Watched::Refused("401".into()),
                Some(false),
                "KafkaConnectRefused",
                "Unknown",
                true,
            ),
        ];
        for (watched, status, reason, state, recheck) in table {
            let (c, s, r) = readiness(watched);
            assert_eq!(
                (c.status, c.reason.as_str(), s.as_str()),
                (status, reason, state)
            );
            assert_eq!(r.is_some(), recheck, "{reason}");
        }
    }

    #[test]
    fn lag_warns_only_above_the_limit() {
        let mib = 1024 * 1024;
        assert_eq!(lag_warning(None, mib, "s"), None);
        assert_eq!(lag_warning(Some(mib), mib, "s"), None);
        let w = lag_warning(Some(300 * mib), 256 * mib, "cdc_x").unwrap();
        assert!(
            w.contains("cdc_x") && w.contains("300 MiB") && w.contains("256 MiB"),
            "{w}"
        );
    }
}
