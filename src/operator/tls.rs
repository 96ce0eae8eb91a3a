//! TLS material of managed instances in the cluster: the namespace CA Secret (created once) and each instance's server certificate Secret (issued and renewed) (Kubernetes I/O).

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, PostParams};
use tracing::info;

use super::Context;
use super::apply::ApplyError;
use crate::specs::labels::DatabaseNames;
use crate::specs::tls::{self, CertPair, TlsError};

/// Why the TLS material could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a Secret failed.
    #[error("could not read Secret {name}: {source}")]
    Read {
        /// The Secret.
        name: String,
        /// Cause.
        source: kube::Error,
    },
    /// Creating the CA Secret failed.
    #[error("could not create Secret {}: {source}", tls::CA_SECRET)]
    CreateCa {
        /// Cause.
        source: kube::Error,
    },
    /// The CA is unusable or a certificate could not be generated.
    #[error(transparent)]
    Certificate(#[from] TlsError),
    /// Applying the server certificate Secret failed.
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

impl Error {
    /// A short, stable category for Event reasons and metric labels.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Read { .. } => "ReadFailed",
            Error::CreateCa { .. } => "CreateCaFailed",
            Error::Certificate(TlsError::InvalidCa(_)) => "InvalidCa",
            Error::Certificate(_) => "CertificateFailed",
            Error::Apply(_) => "ApplyFailed",
        }
    }
}

/// The namespace CA, if its Secret exists (used where nothing may be created, e.g. cleanup).
pub async fn read_namespace_ca(ctx: &Context, ns: &str) -> Result<Option<CertPair>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let secret = secrets
        .get_opt(tls::CA_SECRET)
        .await
        .map_err(|source| Error::Read {
            name: tls::CA_SECRET.to_owned(),
            source,
        })?;
    Ok(match secret {
        Some(s) => Some(tls::ca_from_secret(&s)?),
        None => None,
    })
}

/// The namespace CA: read, or generated and created when its Secret does not exist. Created
/// with `create`, never applied, so two reconciles racing for a new namespace agree on the one
/// that won and an existing CA is never overwritten.
pub async fn namespace_ca(ctx: &Context, ns: &str) -> Result<CertPair, Error> {
    if let Some(ca) = read_namespace_ca(ctx, ns).await? {
        return Ok(ca);
    }
    let ca = tls::generate_ca(ns, jiff::Timestamp::now())?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    match secrets
        .create(&PostParams::default(), &tls::ca_secret(ns, &ca))
        .await
    {
        Ok(_) => {
            info!(
                namespace = ns,
                "created the namespace CA {}",
                tls::CA_SECRET
            );
            ctx.metrics.wrote("Secret");
            Ok(ca)
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            read_namespace_ca(ctx, ns)
                .await?
                .ok_or_else(|| Error::CreateCa {
                    source: kube::Error::Api(e),
                })
        }
        Err(source) => Err(Error::CreateCa { source }),
    }
}

/// Makes sure the instance's `<name>-db-tls` Secret holds a current certificate from `ca`
/// (issuing or renewing it when needed) and returns that certificate's PEM.
pub async fn server_certificate(
    ctx: &Context,
    ns: &str,
    name: &str,
    owner: Option<OwnerReference>,
    ca: &CertPair,
) -> Result<String, Error> {
    let secret_name = DatabaseNames::new(name).tls_secret();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let existing = secrets
        .get_opt(&secret_name)
        .await
        .map_err(|source| Error::Read {
            name: secret_name.clone(),
            source,
        })?;
    let names = tls::server_names(name, ns);
    let now = jiff::Timestamp::now();
    if let Some(secret) = &existing
        && !tls::needs_issue(Some(secret), ca, &names, now)
        && let Some(pem) = tls::server_cert_pem(secret)
    {
        return Ok(pem);
    }
    let (cert, renew_after) = tls::issue_server_cert(ca, &names, now)?;
    ctx.apply(
        ns,
        tls::server_secret(name, ns, owner, ca, &names, &cert, renew_after),
    )
    .await?;
    info!(namespace = ns, name, %renew_after, "issued the instance's server certificate");
    Ok(cert.cert_pem)
}
