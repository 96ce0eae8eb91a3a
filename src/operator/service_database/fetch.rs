//! The fetch step: what a ServiceDatabase's reconcile reads before it decides anything — the
//! relays of its database and its credential Secrets (Kubernetes reads only).

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams};

use super::Error;
use super::decide::Desire;
use crate::api::OutboxRelay;
use crate::api::service_database::ServiceDatabase;
use crate::operator::Context;

/// Relays in the namespace that publish this database's outbox, including those being deleted.
pub async fn relays_of(ctx: &Context, ns: &str, name: &str) -> Result<Vec<OutboxRelay>, Error> {
    let api: Api<OutboxRelay> = Api::namespaced(ctx.client.clone(), ns);
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|source| Error::Read {
            what: "OutboxRelays".to_owned(),
            source,
        })?;
    Ok(list
        .items
        .into_iter()
        .filter(|r| r.spec.database_ref.name == name)
        .collect())
}

/// The credential Secrets the spec needs, as the apiserver holds them (`None`: absent).
pub struct CredentialSecrets {
    /// The owner role's.
    pub app: Option<Secret>,
    /// The relay role's, when the outbox is enabled.
    pub relay: Option<Secret>,
    /// The cdc role's, when `cdc` is set.
    pub cdc: Option<Secret>,
    /// A managed instance's superuser's.
    pub superuser: Option<Secret>,
}

/// Reads the credential Secrets the spec needs.
pub async fn credential_secrets(
    ctx: &Context,
    ns: &str,
    sdb: &ServiceDatabase,
    desire: &Desire,
) -> Result<CredentialSecrets, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let read = |name: String, wanted: bool| {
        let secrets = secrets.clone();
        async move {
            if !wanted {
                return Ok(None);
            }
            secrets.get_opt(&name).await.map_err(|source| Error::Read {
                what: format!("Secret {name}"),
                source,
            })
        }
    };
    let names = &desire.names;
    Ok(CredentialSecrets {
        app: read(names.app_secret(), true).await?,
        relay: read(names.relay_secret(), desire.outbox().is_some()).await?,
        cdc: read(names.cdc_secret(), sdb.spec.cdc.is_some()).await?,
        superuser: read(
            names.superuser_secret(),
            sdb.spec.instance.managed.is_some(),
        )
        .await?,
    })
}
