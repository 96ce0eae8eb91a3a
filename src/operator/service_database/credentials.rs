//! The credential lifecycle of the database's roles: found or generated, persisted in a
//! Secret, applied to the role — the state type (pure) and the Secret writes (Kubernetes I/O).
//!
//! Passwords are the one thing that must never be lost: a password is generated once, written
//! to its Secret before the role gets it, and marked `applied` after. A password reaches SQL
//! only through [`Persisted`], which only [`persist`] makes (after the Secrets were written):
//! the type, not a comment, keeps a password nobody stored off the server.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::runtime::events::EventType;

use super::decide::{Desire, was_recorded};
use super::fetch::CredentialSecrets;
use super::instance::Target;
use crate::api::service_database::ServiceDatabase;
use crate::operator::Context;
use crate::operator::apply::{ApplyError, delete_if_exists};
use crate::postgres::{DatabasePlan, Ident, Password, PersistedPassword};
use crate::specs::credentials::{
    self, Credentials, PASSWORD_APPLIED, PASSWORD_BOOTSTRAP, PASSWORD_PENDING,
    PASSWORD_REGENERATED, credential_secret, secret_value, stored_password,
};
use crate::specs::instance;

/// Where a role's password stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialState {
    /// No Secret, and status never listed one: first creation, generated now.
    New,
    /// No Secret although status listed it — a person deleted it — or a Secret written for
    /// that case whose password the role does not have yet. Announced once applied.
    Regenerated,
    /// The Secret holds a password the role may not have yet (a run interrupted between
    /// writing the Secret and setting the password): set it, nothing was lost.
    Pending,
    /// The password is in a managed instance's first-start SQL, which sets it when the pod
    /// first starts.
    Bootstrap,
    /// The role has the password.
    Applied,
}

impl CredentialState {
    /// The state of a password found in its Secret, from the Secret's annotation.
    pub fn found(annotation: Option<&str>) -> Self {
        match annotation {
            Some(PASSWORD_APPLIED) => CredentialState::Applied,
            Some(PASSWORD_BOOTSTRAP) => CredentialState::Bootstrap,
            Some(PASSWORD_REGENERATED) => CredentialState::Regenerated,
            // `pending`, or a Secret without the annotation: setting it again is harmless.
            _ => CredentialState::Pending,
        }
    }

    /// The state of a password generated now because no Secret holds one; `recorded` is
    /// whether status listed the Secret (then a person deleted it).
    pub fn missing(recorded: bool) -> Self {
        if recorded {
            CredentialState::Regenerated
        } else {
            CredentialState::New
        }
    }

    /// The managed instance is created now: every password the role does not have goes into
    /// its first-start SQL.
    pub fn into_bootstrap(self) -> Self {
        match self {
            CredentialState::Applied => CredentialState::Applied,
            _ => CredentialState::Bootstrap,
        }
    }

    /// The managed instance's pod is Ready: it ran its first-start SQL.
    pub fn instance_ready(self) -> Self {
        match self {
            CredentialState::Bootstrap => CredentialState::Applied,
            other => other,
        }
    }

    /// Provisioning succeeded with this password in the plan.
    pub fn provisioned(self) -> Self {
        CredentialState::Applied
    }

    /// Whether provisioning must set the password on an existing role (not only create a
    /// missing role with it).
    pub fn must_set(self) -> bool {
        self != CredentialState::Applied
    }

    /// The `servicedb.io/password-state` the Secret carries in this state.
    pub fn annotation(self) -> &'static str {
        match self {
            CredentialState::Applied => PASSWORD_APPLIED,
            CredentialState::Bootstrap => PASSWORD_BOOTSTRAP,
            CredentialState::Regenerated => PASSWORD_REGENERATED,
            CredentialState::New | CredentialState::Pending => PASSWORD_PENDING,
        }
    }
}

/// One role's credentials.
pub struct Credential {
    /// The Secret that holds them.
    pub secret_name: String,
    /// `app`, `relay` or `cdc` (label and Secret key in status).
    pub purpose: &'static str,
    /// The role.
    pub role: Ident,
    password: Password,
    /// Where the password stands.
    pub state: CredentialState,
}

impl Credential {
    /// From the Secret as read (or its absence); `recorded` is whether status listed it.
    pub fn load(
        secret_name: String,
        purpose: &'static str,
        role: Ident,
        secret: Option<&Secret>,
        recorded: bool,
    ) -> Self {
        let found = secret.and_then(|s| stored_password(s).map(|p| (p, s)));
        let (password, state) = match found {
            Some((password, secret)) => (
                Password::from_plaintext(password),
                CredentialState::found(credentials::password_state(secret)),
            ),
            None => (Password::generate(), CredentialState::missing(recorded)),
        };
        Credential {
            secret_name,
            purpose,
            role,
            password,
            state,
        }
    }
}

/// Every role's credentials the spec needs, from the Secrets as read (pure). A managed
/// instance being created (no superuser Secret yet) gets every password the roles do not have
/// in its first-start SQL.
pub fn load_all(
    sdb: &ServiceDatabase,
    desire: &Desire,
    found: &CredentialSecrets,
) -> (Vec<Credential>, Option<Superuser>) {
    let names = &desire.names;
    let roles = &desire.roles;
    let mut wanted = vec![(names.app_secret(), "app", roles.app.clone(), &found.app)];
    if desire.outbox().is_some() {
        wanted.push((
            names.relay_secret(),
            "relay",
            roles.relay.clone(),
            &found.relay,
        ));
    }
    if sdb.spec.cdc.is_some() {
        wanted.push((names.cdc_secret(), "cdc", roles.cdc.clone(), &found.cdc));
    }
    let mut creds: Vec<Credential> = wanted
        .into_iter()
        .map(|(secret_name, purpose, role, secret)| {
            let recorded = was_recorded(sdb, purpose);
            Credential::load(secret_name, purpose, role, secret.as_ref(), recorded)
        })
        .collect();
    let superuser = sdb
        .spec
        .instance
        .managed
        .as_ref()
        .map(|_| Superuser::load(found.superuser.as_ref()));
    if superuser.as_ref().is_some_and(|s| s.generated) {
        for c in &mut creds {
            c.state = c.state.into_bootstrap();
        }
    }
    (creds, superuser)
}

/// Deletes the Secrets of roles the spec no longer has (outbox disabled; cdc removed and its
/// connector gone).
pub async fn remove_unneeded(
    ctx: &Context,
    sdb: &ServiceDatabase,
    ns: &str,
    desire: &Desire,
    cdc_connector_gone: bool,
) -> Result<(), ApplyError> {
    let unneeded = [
        (
            desire.outbox().is_none(),
            desire.names.relay_secret(),
            "outbox disabled",
        ),
        (
            sdb.spec.cdc.is_none() && cdc_connector_gone,
            desire.names.cdc_secret(),
            "cdc removed",
        ),
    ];
    for (_, secret, why) in unneeded.into_iter().filter(|(gone, _, _)| *gone) {
        if delete_if_exists::<Secret>(&ctx.client, ns, &secret).await? {
            ctx.event(
                sdb,
                EventType::Normal,
                "SecretDeleted",
                "Delete",
                format!("deleted Secret {secret} ({why})"),
            )
            .await;
        }
    }
    Ok(())
}

/// The superuser of a managed instance (its password is in the superuser Secret, with the
/// first-start SQL).
pub struct Superuser {
    /// The password.
    pub password: Password,
    /// No Secret held one: the instance is being created now.
    pub generated: bool,
    /// The first-start SQL the Secret holds (empty when generated now).
    pub bootstrap_sql: String,
}

impl Superuser {
    /// From the superuser Secret as read (or its absence).
    pub fn load(secret: Option<&Secret>) -> Self {
        match secret.and_then(|s| stored_password(s).map(|p| (p, s))) {
            Some((p, s)) => Superuser {
                password: Password::from_plaintext(p),
                generated: false,
                bootstrap_sql: secret_value(s, instance::BOOTSTRAP_KEY).unwrap_or_default(),
            },
            None => Superuser {
                password: Password::generate(),
                generated: true,
                bootstrap_sql: String::new(),
            },
        }
    }
}

/// Credentials whose passwords are stored in their Secrets, as the apiserver holds them now:
/// the only source of passwords for SQL (the plan, the first-start script).
pub struct Persisted {
    creds: Vec<Credential>,
    /// The annotation each Secret carries on the server (same order as `creds`).
    written: Vec<&'static str>,
}

impl Persisted {
    /// The stored password of `purpose`'s role (to keep it out of error texts).
    pub fn password(&self, purpose: &str) -> Option<&Password> {
        self.creds
            .iter()
            .find(|c| c.purpose == purpose)
            .map(|c| &c.password)
    }

    /// The managed instance's pod is Ready: bootstrap passwords are applied.
    pub fn instance_ready(&mut self) {
        for c in &mut self.creds {
            c.state = c.state.instance_ready();
        }
    }

    /// The database plan with every role's stored password: a role re-created by drift repair
    /// gets it back; it is set on an existing role only when not yet applied (`bootstrap`:
    /// the first-start script sets every password).
    pub fn plan(&self, desire: &Desire, bootstrap: bool) -> DatabasePlan {
        let mut plan = desire.plan.clone();
        let password = |purpose: &str| {
            self.creds.iter().find(|c| c.purpose == purpose).map(|c| {
                // Stored: `persist` wrote it, or it was read back from its Secret.
                let stored = PersistedPassword::assume_persisted(c.password.clone());
                (stored, bootstrap || c.state.must_set())
            })
        };
        if let Some((p, reset)) = password("app") {
            plan.app = plan.app.with_password(p, reset);
        }
        if let Some(relay) = &mut plan.relay
            && let Some((p, reset)) = password("relay")
        {
            *relay = relay.clone().with_password(p, reset);
        }
        if let Some(cdc) = &mut plan.cdc
            && let Some((p, reset)) = password("cdc")
        {
            cdc.role = cdc.role.clone().with_password(p, reset);
        }
        plan
    }
}

/// What a credential Secret says besides the password.
pub struct SecretTarget<'a> {
    /// Namespace.
    pub ns: &'a str,
    /// The ServiceDatabase's name.
    pub name: &'a str,
    /// Its controller reference.
    pub owner: Option<OwnerReference>,
    /// Where applications connect.
    pub target: &'a Target,
    /// The database.
    pub database: &'a str,
}

impl SecretTarget<'_> {
    fn secret(&self, c: &Credential) -> Secret {
        credential_secret(
            &c.secret_name,
            self.ns,
            self.name,
            c.purpose,
            self.owner.clone(),
            &Credentials {
                host: self.target.endpoint.host.clone(),
                port: self.target.endpoint.port,
                database: self.database.to_owned(),
                username: c.role.as_str().to_owned(),
                password: c.password.expose().to_owned(),
                ssl_mode: self.target.app_ssl_mode.clone(),
                ca_pem: self.target.ca_pem.clone(),
            },
            c.state.annotation(),
        )
    }
}

/// Writes every credential Secret (unchanged ones are not re-sent) before any role gets a new
/// password.
pub async fn persist(
    ctx: &Context,
    to: &SecretTarget<'_>,
    creds: Vec<Credential>,
) -> Result<Persisted, ApplyError> {
    for c in &creds {
        ctx.apply(to.ns, to.secret(c)).await?;
    }
    let written = creds.iter().map(|c| c.state.annotation()).collect();
    Ok(Persisted { creds, written })
}

/// Provisioning set every password in the plan: mark them applied, announce passwords that
/// replaced a deleted Secret, and update the Secrets whose state changed. Returns the purposes
/// whose role got a new password now (their clients must reconnect).
pub async fn applied(
    ctx: &Context,
    sdb: &ServiceDatabase,
    to: &SecretTarget<'_>,
    persisted: &mut Persisted,
) -> Result<Vec<&'static str>, ApplyError> {
    let mut rotated = Vec::new();
    for (c, written) in persisted.creds.iter_mut().zip(persisted.written.iter_mut()) {
        if c.state == CredentialState::Regenerated {
            rotated.push(c.purpose);
            ctx.event(
                sdb,
                EventType::Warning,
                "CredentialsRegenerated",
                "SetPassword",
                format!(
                    "Secret {} was deleted: set a new password on role {} and recreated the Secret",
                    c.secret_name,
                    c.role.as_str()
                ),
            )
            .await;
        }
        c.state = c.state.provisioned();
        if *written != c.state.annotation() {
            ctx.apply(to.ns, to.secret(c)).await?;
            *written = c.state.annotation();
        }
    }
    Ok(rotated)
}

#[cfg(test)]
mod tests {
    use super::CredentialState::{self, *};
    use super::*;

    #[test]
    fn a_secret_found_keeps_its_state() {
        let table: [(Option<&str>, CredentialState); 6] = [
            (Some("applied"), Applied),
            (Some("bootstrap"), Bootstrap),
            (Some("regenerated"), Regenerated),
            (Some("pending"), Pending),
            (Some("something-else"), Pending),
            (None, Pending),
        ];
        for (annotation, want) in table {
            assert_eq!(CredentialState::found(annotation), want, "{annotation:?}");
        }
    }

    #[test]
    fn every_transition() {
        // (state, into_bootstrap, instance_ready, provisioned, must_set, annotation)
        let table = [
            (New, Bootstrap, New, Applied, true, "pending"),
            (
                Regenerated,
                Bootstrap,
                Regenerated,
                Applied,
                true,
                "regenerated",
            ),
            (Pending, Bootstrap, Pending, Applied, true, "pending"),
            (Bootstrap, Bootstrap, Applied, Applied, true, "bootstrap"),
            (Applied, Applied, Applied, Applied, false, "applied"),
        ];
        for (state, boot, ready, provisioned, must_set, annotation) in table {
            assert_eq!(state.into_bootstrap(), boot, "{state:?} into_bootstrap");
            assert_eq!(state.instance_ready(), ready, "{state:?} instance_ready");
            assert_eq!(state.provisioned(), provisioned, "{state:?} provisioned");
            assert_eq!(state.must_set(), must_set, "{state:?} must_set");
            assert_eq!(state.annotation(), annotation, "{state:?} annotation");
        }
    }

    fn secret(annotation: Option<&str>, password: Option<&str>) -> Secret {
        let mut s = credential_secret(
            "orders-app",
            "shop",
            "orders",
            "app",
            None,
            &Credentials {
                host: "h".into(),
                port: 5432,
                database: "orders".into(),
                username: "orders".into(),
                password: password.unwrap_or_default().into(),
                ssl_mode: "require".into(),
                ca_pem: None,
            },
            annotation.unwrap_or("applied"),
        );
        if annotation.is_none() {
            s.metadata.annotations = None;
        }
        s
    }

    fn load(secret: Option<&Secret>, recorded: bool) -> Credential {
        let role = Ident::new("orders").unwrap();
        Credential::load("orders-app".into(), "app", role, secret, recorded)
    }

    /// The lifecycles the issue names, step by step, with what each step leaves.
    #[test]
    fn lifecycles() {
        // First creation: generated, stored as pending, set, stored as applied.
        let c = load(None, false);
        assert_eq!(c.state, New);
        assert_eq!(c.state.annotation(), "pending");
        assert!(c.state.must_set());
        assert_eq!(c.state.provisioned().annotation(), "applied");

        // A person deleted the Secret: a new password, stored as `regenerated`.
        let c = load(None, true);
        assert_eq!(c.state, Regenerated);
        // Crash between the Secret write and ALTER ROLE: the next reconcile reads the same
        // password back, still to be set and still to be announced.
        let written = secret(Some(c.state.annotation()), Some(c.password.expose()));
        let again = load(Some(&written), true);
        assert_eq!(again.state, Regenerated);
        assert_eq!(again.password.expose(), c.password.expose());
        assert!(again.state.must_set());

        // An interrupted first run: pending Secret, password kept and set.
        let pending = secret(Some("pending"), Some("p"));
        let c = load(Some(&pending), true);
        assert_eq!((c.state, c.password.expose()), (Pending, "p"));

        // Retain re-adoption: the orphaned Secret says applied; the password is kept, not
        // re-set, and still carried by the plan so a missing role is re-created with it.
        let kept = secret(Some("applied"), Some("kept"));
        let c = load(Some(&kept), false);
        assert_eq!((c.state, c.password.expose()), (Applied, "kept"));
        assert!(!c.state.must_set());

        // A Secret without a password is as good as none.
        let empty = secret(Some("applied"), Some(""));
        assert_eq!(load(Some(&empty), false).state, New);

        // A managed instance's first start: bootstrap until its pod is Ready.
        let c = load(None, false);
        let boot = c.state.into_bootstrap();
        assert_eq!(boot.annotation(), "bootstrap");
        assert_eq!(boot.instance_ready(), Applied);
    }

    #[test]
    fn the_superuser_is_generated_only_without_a_secret() {
        assert!(Superuser::load(None).generated);
        let s = secret(Some("applied"), Some("su"));
        let su = Superuser::load(Some(&s));
        assert!(!su.generated);
        assert_eq!(su.password.expose(), "su");
    }
}
