//! The operator's admin connection to the server that holds a ServiceDatabase's database
//! (Kubernetes reads): one home for both controllers.
//!
//! External servers: the admin Secret (`username`, `password`, optional `ca.crt`) or
//! `caSecretRef`, never a host outside `--allowed-external-hosts`. Managed instances: the
//! superuser Secret over the instance's Service, `verify-full` against the namespace CA.

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;

use super::Context;
use crate::api::service_database::{ExternalInstance, ServiceDatabase};
use crate::postgres::{ConnectParams, Password, SslMode};
use crate::specs::credentials::{self, secret_value, stored_password};
use crate::specs::instance::POSTGRES_PORT;
use crate::specs::labels::DatabaseNames;
use crate::specs::tls::CertPair;

/// Why no admin connection can be made.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Something the connection needs is missing or refused (a Secret, a key, the host is not
    /// allowed): the user has to act. The message names what, never a secret.
    #[error("{0}")]
    Unavailable(String),
    /// Reading a Secret failed.
    #[error("could not read Secret {name}: {source}")]
    Read {
        /// The Secret.
        name: String,
        /// Cause.
        source: kube::Error,
    },
    /// Reading the namespace CA failed.
    #[error("{0}")]
    Tls(#[from] super::tls::Error),
}

impl super::Categorized for AdminError {
    fn category(&self) -> &'static str {
        match self {
            AdminError::Unavailable(_) => "AdminSecretMissing",
            AdminError::Read { .. } => "ReadFailed",
            AdminError::Tls(e) => e.category(),
        }
    }
}

/// The admin connection to the server holding `sdb`'s database.
pub async fn admin_connection(
    ctx: &Context,
    sdb: &ServiceDatabase,
) -> Result<ConnectParams, AdminError> {
    let ns = sdb.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    match (&sdb.spec.instance.managed, &sdb.spec.instance.external) {
        (_, Some(external)) => external_admin(ctx, &secrets, external).await,
        (Some(_), None) => {
            let names = DatabaseNames::new(&sdb.name_any());
            let secret = read_secret(&secrets, &names.superuser_secret()).await?;
            let Some(ca) = super::tls::read_namespace_ca(ctx, &ns).await? else {
                return Err(AdminError::Unavailable(format!(
                    "the namespace CA Secret {} is missing",
                    crate::specs::tls::CA_SECRET
                )));
            };
            match secret.as_ref().and_then(stored_password) {
                Some(password) => Ok(managed_admin(
                    ctx,
                    managed_host(&names, &ns),
                    Password::from_plaintext(password),
                    &ca,
                )),
                None => Err(AdminError::Unavailable(format!(
                    "superuser Secret {} not found",
                    names.superuser_secret()
                ))),
            }
        }
        (None, None) => Err(AdminError::Unavailable(
            "the ServiceDatabase names no instance".to_owned(),
        )),
    }
}

/// The host name of a managed instance's Service, as its server certificate carries it.
pub fn managed_host(names: &DatabaseNames, ns: &str) -> String {
    format!("{}.{ns}.svc", names.instance())
}

/// The operator's superuser connection to a managed instance: `verify-full` against the
/// namespace CA, by the Service name the server certificate carries.
pub fn managed_admin(
    ctx: &Context,
    host: String,
    password: Password,
    ca: &CertPair,
) -> ConnectParams {
    ConnectParams {
        ssl_mode: SslMode::VerifyFull,
        ca_pem: Some(ca.cert_pem.clone().into_bytes()),
        connect_timeout: ctx.settings.connect_timeout,
        ..ConnectParams::new(host, POSTGRES_PORT as u16, "postgres", password, "postgres")
    }
}

/// The admin connection of an external instance.
pub async fn external_admin(
    ctx: &Context,
    secrets: &Api<Secret>,
    external: &ExternalInstance,
) -> Result<ConnectParams, AdminError> {
    // Backstop for every caller (provisioning, slot and database cleanup): never connect to a
    // host outside the operator's allow-list.
    ctx.settings
        .guard_rails
        .allowed_external_hosts
        .check(&external.host)
        .map_err(AdminError::Unavailable)?;
    let secret_name = &external.admin_secret_ref.name;
    let Some(secret) = read_secret(secrets, secret_name).await? else {
        return Err(AdminError::Unavailable(format!(
            "admin Secret {secret_name} not found"
        )));
    };
    let (Some(user), Some(password)) = (
        secret_value(&secret, credentials::USERNAME_KEY),
        stored_password(&secret),
    ) else {
        return Err(AdminError::Unavailable(format!(
            "admin Secret {secret_name} needs the keys username and password"
        )));
    };
    // The CA: `caSecretRef` if set (it must exist), else the admin Secret's `ca.crt`.
    let ca_pem = match &external.ca_secret_ref {
        Some(r) => {
            let Some(ca_secret) = read_secret(secrets, &r.name).await? else {
                return Err(AdminError::Unavailable(format!(
                    "CA Secret {} not found",
                    r.name
                )));
            };
            let pem = secret_value(&ca_secret, &r.key).filter(|v| !v.trim().is_empty());
            Some(pem.ok_or_else(|| {
                AdminError::Unavailable(format!("CA Secret {} has no key {}", r.name, r.key))
            })?)
        }
        None => secret_value(&secret, credentials::CA_CERT_KEY).filter(|v| !v.trim().is_empty()),
    };
    let ssl_mode = external.effective_ssl_mode(ca_pem.is_some());
    let port = u16::try_from(external.port).unwrap_or(5432);
    Ok(ConnectParams {
        ssl_mode,
        ca_pem: ca_pem.map(String::into_bytes),
        connect_timeout: ctx.settings.connect_timeout,
        ..ConnectParams::new(
            external.host.clone(),
            port,
            user,
            Password::from_plaintext(password),
            external.admin_database.clone(),
        )
    })
}

async fn read_secret(secrets: &Api<Secret>, name: &str) -> Result<Option<Secret>, AdminError> {
    secrets
        .get_opt(name)
        .await
        .map_err(|source| AdminError::Read {
            name: name.to_owned(),
            source,
        })
}
