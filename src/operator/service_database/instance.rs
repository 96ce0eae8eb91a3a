//! The instance step: where the database lives and how the operator reaches it — an external
//! server's admin connection, or a managed instance's CA, superuser, children and pod
//! readiness (Kubernetes I/O, one catalog read for `wal_level`).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tracing::info;

use super::Error;
use super::credentials::{Persisted, Superuser};
use super::decide::{Desire, WalLevel, lower_wal_level};
use crate::api::service_database::{Endpoint, ExternalInstance, ManagedInstance, ServiceDatabase};
use crate::operator::Context;
use crate::operator::admin::{external_admin, managed_admin};
use crate::operator::apply::Outcome;
use crate::postgres::{self, ConnectParams, SslMode};
use crate::specs::bootstrap;
use crate::specs::credentials::{Credentials, PASSWORD_APPLIED, credential_secret};
use crate::specs::instance::{self, InstanceParams, POSTGRES_PORT};
use crate::specs::labels::controller_ref;
use crate::specs::tls::CertPair;

/// Where the operator and applications reach the database.
pub struct Target {
    /// Host and port applications use (Secrets, status).
    pub endpoint: Endpoint,
    /// libpq sslmode applications should use.
    pub app_ssl_mode: String,
    /// The CA applications verify the server against (`ca.crt` in their Secrets).
    pub ca_pem: Option<String>,
    /// The operator's admin connection.
    pub admin: ConnectParams,
}

/// An external server: its admin connection (the admin Secret is held for cleanup) and what
/// applications get — the same sslmode and CA the operator verifies with.
pub async fn external_target(
    ctx: &Context,
    sdb: &ServiceDatabase,
    desire: &Desire,
    external: &ExternalInstance,
) -> Result<Target, Error> {
    let ns = sdb.namespace().ok_or(Error::NoNamespace)?;
    let name = sdb.name_any();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let admin = external_admin(ctx, &secrets, external).await?;
    let admin_secret = external.admin_secret_ref.name.as_str();
    crate::operator::secret_guard::hold(ctx, &ns, admin_secret, &name).await?;
    if sdb.status.as_ref().and_then(|s| s.observed_generation) != sdb.meta().generation {
        // The admin Secret reference may have changed: release the old one.
        crate::operator::secret_guard::release_all_except(ctx, &ns, &[admin_secret], &name).await?;
    }
    let ca_pem = admin
        .ca_pem
        .as_ref()
        .filter(|_| admin.ssl_mode != SslMode::Disable)
        .map(|pem| String::from_utf8_lossy(pem).into_owned());
    Ok(Target {
        endpoint: desire.endpoint.clone(),
        app_ssl_mode: admin.ssl_mode.as_libpq().to_owned(),
        ca_pem,
        admin,
    })
}

/// A managed instance: the namespace CA (created on first use) and the superuser connection
/// over the instance's Service, `verify-full`.
pub async fn managed_target(
    ctx: &Context,
    ns: &str,
    desire: &Desire,
    superuser: &Superuser,
) -> Result<(Target, CertPair), Error> {
    let ca = crate::operator::tls::namespace_ca(ctx, ns).await?;
    let admin = managed_admin(
        ctx,
        desire.endpoint.host.clone(),
        superuser.password.clone(),
        &ca,
    );
    let target = Target {
        endpoint: desire.endpoint.clone(),
        app_ssl_mode: SslMode::VerifyFull.as_libpq().to_owned(),
        ca_pem: Some(ca.cert_pem.clone()),
        admin,
    };
    Ok((target, ca))
}

/// Applies a managed instance — the superuser Secret with the first-start SQL, the server
/// certificate, ConfigMap, Services, NetworkPolicy, StatefulSet — and says whether its pod is
/// Ready. The first-start SQL is rendered from stored passwords only.
pub async fn apply_managed(
    ctx: &Context,
    sdb: &ServiceDatabase,
    desire: &Desire,
    managed: &ManagedInstance,
    superuser: &Superuser,
    persisted: &Persisted,
    (target, ca): (&Target, &CertPair),
) -> Result<bool, Error> {
    let ns = sdb.namespace().ok_or(Error::NoNamespace)?;
    let name = sdb.name_any();
    let owner = controller_ref(sdb);
    let server_cert =
        crate::operator::tls::server_certificate(ctx, &ns, &name, owner.clone(), ca).await?;
    apply_superuser_secret(ctx, sdb, desire, superuser, persisted, target).await?;
    // Relays drop their slots with this Secret when everything is deleted at once.
    crate::operator::secret_guard::hold(ctx, &ns, &desire.names.superuser_secret(), &name).await?;
    let spec_needs_logical = desire.logical_relay || sdb.spec.cdc.is_some();
    let logical_decoding = spec_needs_logical
        || logical_decoding_still_needed(ctx, sdb, &desire.names.instance(), &target.admin).await?;
    let owner_pods = sdb
        .spec
        .owner
        .pod_selector
        .clone()
        .unwrap_or_else(|| instance::default_owner_selector(&sdb.spec.owner.service));
    let mut params = InstanceParams {
        name: &name,
        namespace: &ns,
        owner,
        managed,
        deletion_policy: sdb.spec.deletion_policy,
        logical_decoding,
        owner_pods,
        operator_namespace: ctx.settings.operator_namespace.as_deref(),
        cdc: sdb.spec.cdc.as_ref(),
        config_checksum: String::new(),
    };
    apply_children(ctx, sdb, &mut params, &server_cert).await?;
    instance_pod_ready(ctx, &ns, &name).await
}

/// The superuser Secret: the password and the first-start SQL. The SQL is written once, with
/// the first Secret: it only ever runs on an empty data directory, and rewriting it would
/// change the Secret on every resync.
async fn apply_superuser_secret(
    ctx: &Context,
    sdb: &ServiceDatabase,
    desire: &Desire,
    superuser: &Superuser,
    persisted: &Persisted,
    target: &Target,
) -> Result<(), Error> {
    let ns = sdb.namespace().ok_or(Error::NoNamespace)?;
    let bootstrap_sql = match superuser.generated {
        true => bootstrap::bootstrap_sql(&persisted.plan(desire, true)),
        false => superuser.bootstrap_sql.clone(),
    };
    let mut secret = credential_secret(
        &desire.names.superuser_secret(),
        &ns,
        &sdb.name_any(),
        "superuser",
        controller_ref(sdb),
        &Credentials {
            host: target.endpoint.host.clone(),
            port: POSTGRES_PORT,
            database: "postgres".to_owned(),
            username: "postgres".to_owned(),
            password: superuser.password.expose().to_owned(),
            ssl_mode: SslMode::VerifyFull.as_libpq().to_owned(),
            ca_pem: target.ca_pem.clone(),
        },
        PASSWORD_APPLIED,
    );
    secret.data.get_or_insert_with(BTreeMap::new).insert(
        instance::BOOTSTRAP_KEY.to_owned(),
        k8s_openapi::ByteString(bootstrap_sql.into_bytes()),
    );
    ctx.apply(&ns, secret).await?;
    Ok(())
}

/// The instance's ConfigMap, Services, NetworkPolicy and StatefulSet, with an Event naming
/// what changed.
async fn apply_children(
    ctx: &Context,
    sdb: &ServiceDatabase,
    params: &mut InstanceParams<'_>,
    server_cert: &str,
) -> Result<(), Error> {
    let ns = params.namespace.to_owned();
    let config_map = instance::config_map(params);
    // The certificate is in the checksum: Postgres reads it at start, so a renewed one
    // restarts the pod (once every ~8 months; see specs::tls).
    params.config_checksum = crate::operator::apply::desired_hash(&(
        &config_map.data,
        instance::server_settings(params),
        server_cert,
    ))
    .unwrap_or_default();
    let mut changed = Vec::new();
    if ctx.apply(&ns, config_map).await? == Outcome::Applied {
        changed.push("ConfigMap");
    }
    if ctx.apply(&ns, instance::headless_service(params)).await? == Outcome::Applied {
        changed.push("headless Service");
    }
    if ctx.apply(&ns, instance::service(params)).await? == Outcome::Applied {
        changed.push("Service");
    }
    if ctx.apply(&ns, instance::network_policy(params)).await? == Outcome::Applied {
        changed.push("NetworkPolicy");
    }
    if ctx.apply(&ns, instance::stateful_set(params)).await? == Outcome::Applied {
        changed.push("StatefulSet");
    }
    if !changed.is_empty() {
        ctx.event(
            sdb,
            EventType::Normal,
            "InstanceApplied",
            "Apply",
            format!("applied {}", changed.join(", ")),
        )
        .await;
    }
    Ok(())
}

/// True when the instance must keep `wal_level=logical` although the spec no longer asks for
/// it: it runs with it today and a logical slot remains (or could not be ruled out).
async fn logical_decoding_still_needed(
    ctx: &Context,
    sdb: &ServiceDatabase,
    stateful_set: &str,
    admin: &ConnectParams,
) -> Result<bool, Error> {
    let ns = sdb.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let running_logical = api
        .get_opt(stateful_set)
        .await
        .map_err(|source| Error::Read {
            what: format!("StatefulSet {stateful_set}"),
            source,
        })?
        .and_then(|sts| sts.spec)
        .and_then(|spec| spec.template.spec)
        .is_some_and(|pod| {
            pod.containers
                .iter()
                .any(|c| c.args.iter().flatten().any(|a| a == "wal_level=logical"))
        });
    if !running_logical {
        return Ok(false);
    }
    let slots = postgres::slots::logical_slots(admin, None).await;
    let decision = lower_wal_level(match &slots {
        Ok(s) => Ok(s.as_slice()),
        Err(e) => Err(e.category()),
    });
    match decision {
        WalLevel::Lower => {
            info!("no logical slot is left: lowering wal_level to replica");
            Ok(false)
        }
        WalLevel::Keep(why) => {
            ctx.event(
                sdb,
                EventType::Normal,
                "WalLevelKept",
                "Apply",
                format!("wal_level stays logical: {why}"),
            )
            .await;
            Ok(true)
        }
    }
}

/// Whether the managed instance's pod reports Ready.
async fn instance_pod_ready(ctx: &Context, ns: &str, name: &str) -> Result<bool, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let selector = format!(
        "app.kubernetes.io/name={},app.kubernetes.io/instance={name}",
        instance::POSTGRES_COMPONENT
    );
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| Error::Read {
            what: "instance pods".to_owned(),
            source,
        })?;
    Ok(list.items.iter().any(|p| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    }))
}
