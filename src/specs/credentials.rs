//! Credential Secrets with service-binding keys (pure, no I/O).
//!
//! The keys follow the servicebinding.io PostgreSQL convention (`type`, `provider`, `host`,
//! `port`, `database`, `username`, `password`) plus the keys CloudNativePG's `-app` Secret has
//! (`dbname`, `user`, `uri`, `jdbc-uri`, `pgpass`), so either kind of consumer works unchanged.
//!
//! When the server's certificate is verified against a CA (a managed instance's namespace CA,
//! or an external server's `caSecretRef`/admin `ca.crt`), the Secret carries it: `ca.crt` is the
//! PEM, and `sslrootcert` is the name of that file inside the Secret (`ca.crt`). With the Secret
//! mounted as a directory (servicebinding.io: `$SERVICE_BINDING_ROOT/<binding>/`), the CA is the
//! `ca.crt` file beside it, which is what binding libraries resolve `sslrootcert` against; a libpq
//! client sets `sslrootcert`/`PGSSLROOTCERT` to that file's path. `sslmode` in `uri` and
//! `jdbc-uri` is the mode in force.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use super::labels::standard_labels;

/// The annotation recording whether the Secret's password was applied to its role.
///
/// A Secret is written `pending` before the role's password is set and `applied` after, so an
/// operator killed in between re-applies the password instead of leaving the two apart.
pub const PASSWORD_STATE_ANNOTATION: &str = "servicedb.io/password-state";
/// Value of [`PASSWORD_STATE_ANNOTATION`] before the role has the password.
pub const PASSWORD_PENDING: &str = "pending";
/// Value of [`PASSWORD_STATE_ANNOTATION`] while the password waits in a managed instance's
/// bootstrap SQL for its first start.
pub const PASSWORD_BOOTSTRAP: &str = "bootstrap";
/// Value of [`PASSWORD_STATE_ANNOTATION`] before the role has a password that was generated
/// because a person deleted the Secret: kept in the Secret (not only in memory) so the
/// `CredentialsRegenerated` Event is still emitted when the password is applied by a later
/// reconcile than the one that generated it.
pub const PASSWORD_REGENERATED: &str = "regenerated";
/// Value of [`PASSWORD_STATE_ANNOTATION`] once the role has the password.
pub const PASSWORD_APPLIED: &str = "applied";
/// The key holding the password in every credential Secret.
pub const PASSWORD_KEY: &str = "password";
/// The key holding the user name in every credential Secret.
pub const USERNAME_KEY: &str = "username";
/// The key holding the CA's PEM, when there is one.
pub const CA_CERT_KEY: &str = "ca.crt";
/// The key naming the CA file relative to the Secret's mount directory.
pub const SSLROOTCERT_KEY: &str = "sslrootcert";

/// What a credential Secret describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// Host applications connect to.
    pub host: String,
    /// Port applications connect to.
    pub port: i32,
    /// Database name.
    pub database: String,
    /// Role name.
    pub username: String,
    /// The role's password.
    pub password: String,
    /// libpq sslmode clients should use.
    pub ssl_mode: String,
    /// PEM of the CA that verifies the server, if clients should verify against a private CA.
    pub ca_pem: Option<String>,
}

/// A credential Secret named `name` for `creds`.
///
/// `password_state` is [`PASSWORD_PENDING`] or [`PASSWORD_APPLIED`]; `purpose` (`app`, `relay`,
/// `cdc`, `superuser`) becomes the component label.
pub fn credential_secret(
    name: &str,
    namespace: &str,
    instance: &str,
    purpose: &str,
    owner: Option<OwnerReference>,
    creds: &Credentials,
    password_state: &str,
) -> Secret {
    let mut labels = standard_labels("credentials", instance);
    labels.insert(
        super::labels::COMPONENT_LABEL.to_owned(),
        purpose.to_owned(),
    );
    let Credentials {
        host,
        port,
        database,
        username,
        password,
        ssl_mode,
        ca_pem,
    } = creds;
    // Generated passwords are alphanumeric; user and database names match ^[a-z_][a-z0-9_]*$.
    // Nothing here needs percent-encoding, which keeps the URIs readable.
    let uri =
        format!("postgresql://{username}:{password}@{host}:{port}/{database}?sslmode={ssl_mode}");
    let jdbc_uri = format!(
        "jdbc:postgresql://{host}:{port}/{database}?user={username}&password={password}&sslmode={ssl_mode}"
    );
    let pgpass = format!("{host}:{port}:{database}:{username}:{password}\n");
    let mut data = BTreeMap::from([
        ("type".to_owned(), "postgresql".to_owned()),
        ("provider".to_owned(), "servicedb".to_owned()),
        ("host".to_owned(), host.clone()),
        ("port".to_owned(), port.to_string()),
        ("database".to_owned(), database.clone()),
        ("dbname".to_owned(), database.clone()),
        (USERNAME_KEY.to_owned(), username.clone()),
        ("user".to_owned(), username.clone()),
        (PASSWORD_KEY.to_owned(), password.clone()),
        ("sslmode".to_owned(), ssl_mode.clone()),
        ("uri".to_owned(), uri),
        ("jdbc-uri".to_owned(), jdbc_uri),
        ("pgpass".to_owned(), pgpass),
    ]);
    if let Some(ca) = ca_pem {
        data.insert(CA_CERT_KEY.to_owned(), ca.clone());
        data.insert(SSLROOTCERT_KEY.to_owned(), CA_CERT_KEY.to_owned());
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                PASSWORD_STATE_ANNOTATION.to_owned(),
                password_state.to_owned(),
            )])),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        type_: Some("servicebinding.io/postgresql".to_owned()),
        // `data`, not `stringData`: the apiserver never stores stringData, so applying it would
        // make every no-op reconcile look like a change.
        data: Some(
            data.into_iter()
                .map(|(k, v)| (k, ByteString(v.into_bytes())))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// The password stored in an existing credential Secret, if any.
pub fn stored_password(secret: &Secret) -> Option<String> {
    secret_value(secret, PASSWORD_KEY).filter(|p| !p.is_empty())
}

/// A value of a Secret as UTF-8, whether the Secret came back with `data` or `stringData`.
pub fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(v.0.clone()).ok();
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(key))
        .cloned()
}

/// The Secret's password state annotation, if any.
pub fn password_state(secret: &Secret) -> Option<&str> {
    secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PASSWORD_STATE_ANNOTATION))
        .map(String::as_str)
}

/// Whether the Secret's password is known to be set on its role.
pub fn password_applied(secret: &Secret) -> bool {
    password_state(secret) == Some(PASSWORD_APPLIED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials {
            host: "orders-db.shop.svc".into(),
            port: 5432,
            database: "orders".into(),
            username: "orders".into(),
            password: "s3cr3t".into(),
            ssl_mode: "require".into(),
            ca_pem: None,
        }
    }

    #[test]
    fn credential_secret_carries_service_binding_and_cloudnativepg_keys() {
        let s = credential_secret(
            "orders-app",
            "shop",
            "orders",
            "app",
            None,
            &creds(),
            PASSWORD_APPLIED,
        );
        let d: BTreeMap<String, String> = s
            .data
            .clone()
            .expect("data")
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8(v.0).expect("utf-8")))
            .collect();
        for key in [
            "type", "provider", "host", "port", "database", "username", "password", "uri",
            "jdbc-uri", "pgpass", "dbname", "user",
        ] {
            assert!(d.contains_key(key), "missing {key}");
        }
        assert_eq!(d["type"], "postgresql");
        assert_eq!(
            d["uri"],
            "postgresql://orders:s3cr3t@orders-db.shop.svc:5432/orders?sslmode=require"
        );
        assert_eq!(
            d["pgpass"],
            "orders-db.shop.svc:5432:orders:orders:s3cr3t\n"
        );
        assert_eq!(s.type_.as_deref(), Some("servicebinding.io/postgresql"));
        assert!(password_applied(&s));
        assert_eq!(stored_password(&s).as_deref(), Some("s3cr3t"));
        assert!(!d.contains_key(CA_CERT_KEY) && !d.contains_key(SSLROOTCERT_KEY));
    }

    #[test]
    fn a_verified_server_puts_the_ca_and_the_mode_in_the_secret() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let c = Credentials {
            ssl_mode: "verify-full".into(),
            ca_pem: Some(pem.into()),
            ..creds()
        };
        let s = credential_secret(
            "orders-app",
            "shop",
            "orders",
            "app",
            None,
            &c,
            PASSWORD_APPLIED,
        );
        assert_eq!(secret_value(&s, CA_CERT_KEY).as_deref(), Some(pem));
        assert_eq!(secret_value(&s, SSLROOTCERT_KEY).as_deref(), Some("ca.crt"));
        assert_eq!(secret_value(&s, "sslmode").as_deref(), Some("verify-full"));
        assert!(
            secret_value(&s, "uri")
                .unwrap()
                .ends_with("?sslmode=verify-full")
        );
        assert!(
            secret_value(&s, "jdbc-uri")
                .unwrap()
                .ends_with("&sslmode=verify-full")
        );
    }
}
