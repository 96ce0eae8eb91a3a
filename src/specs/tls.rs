//! Certificates of managed instances: the per-namespace CA and each instance's server certificate, issued with rcgen, and their Secrets (pure, no I/O; the clock is an argument).
//!
//! Why the operator issues certificates itself rather than requiring cert-manager: a managed
//! instance must serve TLS from its first start on every cluster, including those without
//! cert-manager, and the operator already owns the instance's lifecycle (a renewed certificate
//! must restart or reload Postgres anyway). A platform team that wants its own CA can create the
//! `servicedb-ca` Secret (keys `tls.crt` and `tls.key`, a CA certificate and its key) before the
//! first managed ServiceDatabase of a namespace: the operator then issues from it.
//!
//! The CA is like a password: created once per namespace and never regenerated while its Secret
//! exists (it has no ownerReference, so deleting ServiceDatabases leaves it). If it is deleted, the
//! next reconcile creates a new one, every server certificate in the namespace is re-issued from
//! it (their Secrets record which CA issued them), the instances restart with the new certificate
//! and the credential Secrets carry the new `ca.crt`.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};

use super::labels::{DatabaseNames, MANAGER, PART_OF, standard_labels};

/// The per-namespace CA Secret.
pub const CA_SECRET: &str = "servicedb-ca";
/// The certificate key of a `kubernetes.io/tls` Secret.
pub const CERT_KEY: &str = "tls.crt";
/// The private key's key of a `kubernetes.io/tls` Secret.
pub const KEY_KEY: &str = "tls.key";
/// The CA certificate's key (in the CA Secret, the server Secret and the credential Secrets).
pub const CA_KEY: &str = "ca.crt";
/// Records which CA and which names a server certificate was issued for: a change re-issues it.
pub const ISSUED_FOR_ANNOTATION: &str = "servicedb.io/tls-issued-for";
/// When a server certificate is due for renewal (RFC 3339): two thirds into its life.
pub const RENEW_AFTER_ANNOTATION: &str = "servicedb.io/tls-renew-after";
/// Life of a server certificate.
pub const SERVER_CERT_DAYS: i64 = 365;
/// Life of a generated CA.
pub const CA_DAYS: i64 = 3650;

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen failed (key generation, encoding).
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The CA Secret exists but cannot be used; it is never overwritten.
    #[error("Secret {CA_SECRET} is not a usable CA ({0}); fix or delete it")]
    InvalidCa(String),
    /// A time outside what certificates can express.
    #[error("certificate validity: {0}")]
    Time(String),
}

/// A certificate and its private key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct CertPair {
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The private key (PKCS#8 PEM).
    pub key_pem: String,
}

impl std::fmt::Debug for CertPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertPair")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

fn offset(t: jiff::Timestamp) -> Result<time::OffsetDateTime, TlsError> {
    time::OffsetDateTime::from_unix_timestamp(t.as_second())
        .map_err(|e| TlsError::Time(e.to_string()))
}

fn plus_days(t: jiff::Timestamp, days: i64) -> Result<jiff::Timestamp, TlsError> {
    t.checked_add(jiff::SignedDuration::from_hours(days * 24))
        .map_err(|e| TlsError::Time(e.to_string()))
}

/// An hour before `t`: certificates start early so a node with a slightly slow clock accepts
/// them at once.
fn backdated(t: jiff::Timestamp) -> Result<jiff::Timestamp, TlsError> {
    t.checked_sub(jiff::SignedDuration::from_hours(1))
        .map_err(|e| TlsError::Time(e.to_string()))
}

/// A new CA for `namespace`, valid from an hour before `now` (clock skew) for [`CA_DAYS`].
pub fn generate_ca(namespace: &str, now: jiff::Timestamp) -> Result<CertPair, TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, MANAGER);
    dn.push(DnType::CommonName, format!("servicedb CA {namespace}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = offset(backdated(now)?)?;
    params.not_after = offset(plus_days(now, CA_DAYS)?)?;
    let cert = params.self_signed(&key)?;
    Ok(CertPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The CA Secret: no ownerReference (it serves every instance of the namespace and outlives
/// them), type `kubernetes.io/tls` with `tls.crt`, `tls.key` and `ca.crt` (the same
/// certificate, for consumers that look for `ca.crt`).
pub fn ca_secret(namespace: &str, ca: &CertPair) -> Secret {
    let mut labels = standard_labels("ca", CA_SECRET);
    labels.insert("app.kubernetes.io/part-of".to_owned(), PART_OF.to_owned());
    Secret {
        metadata: ObjectMeta {
            name: Some(CA_SECRET.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            (
                CERT_KEY.to_owned(),
                ByteString(ca.cert_pem.clone().into_bytes()),
            ),
            (
                KEY_KEY.to_owned(),
                ByteString(ca.key_pem.clone().into_bytes()),
            ),
            (
                CA_KEY.to_owned(),
                ByteString(ca.cert_pem.clone().into_bytes()),
            ),
        ])),
        ..Secret::default()
    }
}

fn value(secret: &Secret, key: &str) -> Option<String> {
    super::credentials::secret_value(secret, key).filter(|v| !v.trim().is_empty())
}

/// The CA held by the CA Secret, checked to be able to issue.
pub fn ca_from_secret(secret: &Secret) -> Result<CertPair, TlsError> {
    let (Some(cert_pem), Some(key_pem)) = (value(secret, CERT_KEY), value(secret, KEY_KEY)) else {
        return Err(TlsError::InvalidCa(format!(
            "keys {CERT_KEY} and {KEY_KEY} are required"
        )));
    };
    let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::InvalidCa(e.to_string()))?;
    Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| TlsError::InvalidCa(e.to_string()))?;
    Ok(CertPair { cert_pem, key_pem })
}

/// The DNS names a managed instance answers to: the Service and the headless Service in every
/// form a client in the cluster may use, and the pod's own name.
pub fn server_names(name: &str, namespace: &str) -> Vec<String> {
    let names = DatabaseNames::new(name);
    let mut out = Vec::new();
    for service in [names.instance(), names.headless_service()] {
        out.push(service.clone());
        out.push(format!("{service}.{namespace}"));
        out.push(format!("{service}.{namespace}.svc"));
        out.push(format!("{service}.{namespace}.svc.cluster.local"));
    }
    let pod = format!("{}-0.{}", names.instance(), names.headless_service());
    out.push(format!("{pod}.{namespace}.svc"));
    out.push(format!("{pod}.{namespace}.svc.cluster.local"));
    out
}

/// A server certificate for `names` from `ca`, valid for [`SERVER_CERT_DAYS`] from `now`, and
/// the time it is due for renewal (two thirds into its life).
pub fn issue_server_cert(
    ca: &CertPair,
    names: &[String],
    now: jiff::Timestamp,
) -> Result<(CertPair, jiff::Timestamp), TlsError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|e| TlsError::InvalidCa(e.to_string()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)
        .map_err(|e| TlsError::InvalidCa(e.to_string()))?;
    // ECDSA P-256 with SHA-256: Postgres derives the channel-binding hash from the signature
    // algorithm, and SHA-256 is what every client computes for it.
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, MANAGER);
    dn.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    params.distinguished_name = dn;
    for n in names {
        let san = match n.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                n.clone()
                    .try_into()
                    .map_err(|e: rcgen::Error| TlsError::Generate(e))?,
            ),
        };
        params.subject_alt_names.push(san);
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let not_before = backdated(now)?;
    let not_after = plus_days(now, SERVER_CERT_DAYS)?;
    params.not_before = offset(not_before)?;
    params.not_after = offset(not_after)?;
    let cert = params.signed_by(&key, &issuer)?;
    let life = not_after.duration_since(not_before);
    let renew_after = not_before
        .checked_add(life * 2 / 3)
        .map_err(|e| TlsError::Time(e.to_string()))?;
    Ok((
        CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
        renew_after,
    ))
}

/// What a server certificate was issued for: the CA certificate and the names (hex SHA-256).
pub fn issued_for(ca: &CertPair, names: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(ca.cert_pem.as_bytes());
    for n in names {
        h.update(b"\0");
        h.update(n.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the instance's server certificate Secret must be (re-)issued: missing, incomplete,
/// issued by another CA or for other names, or due for renewal at `now`.
pub fn needs_issue(
    existing: Option<&Secret>,
    ca: &CertPair,
    names: &[String],
    now: jiff::Timestamp,
) -> bool {
    let Some(secret) = existing else {
        return true;
    };
    if value(secret, CERT_KEY).is_none() || value(secret, KEY_KEY).is_none() {
        return true;
    }
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    if annotations.get(ISSUED_FOR_ANNOTATION) != Some(&issued_for(ca, names)) {
        return true;
    }
    match annotations
        .get(RENEW_AFTER_ANNOTATION)
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
    {
        Some(renew_after) => now >= renew_after,
        None => true,
    }
}

/// The instance's server certificate Secret `<name>-db-tls` (`kubernetes.io/tls`, with the
/// issuing CA as `ca.crt`), owned by the ServiceDatabase.
pub fn server_secret(
    name: &str,
    namespace: &str,
    owner: Option<OwnerReference>,
    ca: &CertPair,
    names: &[String],
    cert: &CertPair,
    renew_after: jiff::Timestamp,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(DatabaseNames::new(name).tls_secret()),
            namespace: Some(namespace.to_owned()),
            labels: Some(standard_labels(super::instance::POSTGRES_COMPONENT, name)),
            annotations: Some(BTreeMap::from([
                (ISSUED_FOR_ANNOTATION.to_owned(), issued_for(ca, names)),
                (RENEW_AFTER_ANNOTATION.to_owned(), renew_after.to_string()),
            ])),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            (
                CERT_KEY.to_owned(),
                ByteString(cert.cert_pem.clone().into_bytes()),
            ),
            (
                KEY_KEY.to_owned(),
                ByteString(cert.key_pem.clone().into_bytes()),
            ),
            (
                CA_KEY.to_owned(),
                ByteString(ca.cert_pem.clone().into_bytes()),
            ),
        ])),
        ..Secret::default()
    }
}

/// The certificate PEM held by a server certificate Secret (for the pod-restart checksum).
pub fn server_cert_pem(secret: &Secret) -> Option<String> {
    value(secret, CERT_KEY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> jiff::Timestamp {
        "2030-01-01T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_generated_ca_round_trips_through_its_secret_and_issues() {
        let ca = generate_ca("shop", now()).unwrap();
        let secret = ca_secret("shop", &ca);
        assert_eq!(secret.metadata.owner_references, None);
        assert_eq!(ca_from_secret(&secret).unwrap(), ca);
        let names = server_names("orders", "shop");
        issue_server_cert(&ca, &names, now()).unwrap();
    }

    #[test]
    fn a_ca_secret_without_a_key_is_refused_not_replaced() {
        let ca = generate_ca("shop", now()).unwrap();
        let mut secret = ca_secret("shop", &ca);
        secret.data.as_mut().unwrap().remove(KEY_KEY);
        assert!(matches!(
            ca_from_secret(&secret),
            Err(TlsError::InvalidCa(_))
        ));
    }

    #[test]
    fn server_names_cover_the_services_and_the_pod() {
        let names = server_names("orders", "shop");
        for n in [
            "orders-db",
            "orders-db.shop",
            "orders-db.shop.svc",
            "orders-db.shop.svc.cluster.local",
            "orders-db-hl",
            "orders-db-hl.shop.svc.cluster.local",
            "orders-db-0.orders-db-hl.shop.svc",
            "orders-db-0.orders-db-hl.shop.svc.cluster.local",
        ] {
            assert!(names.contains(&n.to_owned()), "missing {n}");
        }
    }

    #[test]
    fn server_certificates_are_renewed_two_thirds_into_their_life_or_when_the_ca_changes() {
        let ca = generate_ca("shop", now()).unwrap();
        let names = server_names("orders", "shop");
        let (cert, renew_after) = issue_server_cert(&ca, &names, now()).unwrap();
        let secret = server_secret("orders", "shop", None, &ca, &names, &cert, renew_after);
        assert_eq!(secret.metadata.name.as_deref(), Some("orders-db-tls"));
        assert!(!needs_issue(Some(&secret), &ca, &names, now()));
        let day = jiff::SignedDuration::from_hours(24);
        assert!(!needs_issue(Some(&secret), &ca, &names, now() + day * 240));
        assert!(needs_issue(Some(&secret), &ca, &names, now() + day * 245));
        let other_ca = generate_ca("shop", now()).unwrap();
        assert!(needs_issue(Some(&secret), &other_ca, &names, now()));
        assert!(needs_issue(None, &ca, &names, now()));
        let mut other_names = names.clone();
        other_names.push("extra".to_owned());
        assert!(needs_issue(Some(&secret), &ca, &other_names, now()));
    }

    #[test]
    fn debug_output_never_shows_a_private_key() {
        let ca = generate_ca("shop", now()).unwrap();
        assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
    }
}
