//! The plan of everything the operator maintains in and around one service's database:
//! database, roles, passwords, outbox, CDC and retired roles (pure, no I/O).
//!
//! Built from a ServiceDatabase spec by [`DatabasePlan::for_spec`]; converged on a server by
//! [`super::provision::provision`] and rendered as first-start SQL by
//! `crate::specs::bootstrap`. Keeping it apart from the I/O lets both consumers, and the
//! controller's decisions, be unit-tested without a server.

use super::identifiers::{Ident, QualifiedName, RoleNames};
use super::ownership::OwnerMark;
use super::passwords::PersistedPassword;
use super::sql::RoleAttributes;

/// The password a role plan carries: always the one its credentials Secret holds.
#[derive(Clone, Debug)]
pub struct RolePassword {
    /// The password, known to be stored in its Secret.
    pub password: PersistedPassword,
    /// Set it on an existing role too (first provisioning, a Secret that was lost and
    /// regenerated, a password not yet confirmed applied). A role that has to be created is
    /// always created with it, `reset` or not: that is how drift repair restores a dropped role
    /// with the password its Secret still holds.
    pub reset: bool,
}

/// A role to converge.
#[derive(Clone, Debug)]
pub struct RolePlan {
    /// Role name.
    pub name: Ident,
    /// The password from its Secret; `None` only for plans that never create the role (tests,
    /// tools) — a role created without one cannot log in.
    pub password: Option<RolePassword>,
    /// REPLICATION attribute (Logical relay, CDC). Revoked when no longer asked for. Ignored
    /// for the app role, which never gets it.
    pub replication: bool,
}

impl RolePlan {
    /// A role without REPLICATION and without a password.
    pub fn new(name: Ident) -> Self {
        RolePlan {
            name,
            password: None,
            replication: false,
        }
    }

    /// The same plan carrying `password`, set on an existing role only when `reset`.
    pub fn with_password(mut self, password: PersistedPassword, reset: bool) -> Self {
        self.password = Some(RolePassword { password, reset });
        self
    }
}

/// The CDC role and the tables it may read.
#[derive(Clone, Debug)]
pub struct CdcPlan {
    /// The role Debezium logs in as ([`DatabasePlan::for_spec`] gives it REPLICATION: Debezium
    /// streams from a slot).
    pub role: RolePlan,
    /// Tables it may SELECT and that the CDC publication carries. Tables that do not exist
    /// (yet: the app creates them in its migrations) are reported, and picked up on a later run.
    pub tables: Vec<QualifiedName>,
}

/// Everything the operator maintains in and around one service's database.
#[derive(Clone, Debug)]
pub struct DatabasePlan {
    /// The database, owned by the app role.
    pub database: Ident,
    /// The ServiceDatabase this plan is for: written as the mark of every database and role
    /// created, and required on every existing one before it is changed.
    pub owner: OwnerMark,
    /// Adopt an existing database or role that carries no mark (mark it, make the app role the
    /// owner, revoke CONNECT from PUBLIC). Objects marked as another ServiceDatabase's are
    /// never adopted.
    pub adopt: bool,
    /// The owner role.
    pub app: RolePlan,
    /// The relay role: EXECUTE on the outbox functions only (+ REPLICATION for Logical).
    pub relay: Option<RolePlan>,
    /// The CDC role and its tables; also drives the `<db>_cdc_pub` publication.
    pub cdc: Option<CdcPlan>,
    /// Extensions to create (`CREATE EXTENSION IF NOT EXISTS ... CASCADE`).
    pub extensions: Vec<Ident>,
    /// The outbox table, when enabled.
    pub outbox: Option<QualifiedName>,
    /// The NOLOGIN role owning the outbox table and the relay's functions (created when the
    /// outbox is enabled).
    pub outbox_owner: Ident,
    /// Maintain the `<table>_pub` publication (a Logical relay needs it); dropped when false.
    pub outbox_publication: bool,
    /// Roles whose purpose was removed (relay when the outbox is disabled, cdc when `cdc` is
    /// removed): if they exist and are ours, their privileges are revoked and they are
    /// dropped (or, when they still hold something, made NOLOGIN NOREPLICATION with a warning).
    pub retired_roles: Vec<Ident>,
}

impl DatabasePlan {
    /// A plan with just the database and its owner role.
    pub fn new(database: Ident, owner: OwnerMark, roles: &RoleNames) -> Self {
        DatabasePlan {
            database,
            owner,
            adopt: false,
            app: RolePlan::new(roles.app.clone()),
            relay: None,
            cdc: None,
            extensions: Vec::new(),
            outbox: None,
            outbox_owner: roles.outbox.clone(),
            outbox_publication: false,
            retired_roles: Vec::new(),
        }
    }

    /// The plan for a ServiceDatabase spec (pure). `logical_relay` is true while any
    /// OutboxRelay in `Logical` mode points at this database: it adds REPLICATION to the relay
    /// role and maintains the outbox publication (both removed again when it turns false).
    ///
    /// The relay role exists whenever the outbox is enabled (its Secret does too). The cdc
    /// role gets REPLICATION (Debezium streams from a slot). Roles of purposes the spec does
    /// not have are listed in `retired_roles`. Passwords are the controller's to fill in
    /// ([`RolePlan::with_password`]); `adopt` comes from `database.adopt`.
    pub fn for_spec(
        spec: &crate::api::ServiceDatabaseSpec,
        owner: OwnerMark,
        logical_relay: bool,
    ) -> Result<Self, super::IdentError> {
        let roles = super::RoleNames::for_service(&spec.owner.service)?;
        let mut plan = DatabasePlan::new(Ident::new(spec.database_name())?, owner, &roles);
        plan.adopt = spec.database.adopt;
        plan.extensions = spec
            .database
            .extensions
            .iter()
            .map(|e| Ident::new(e.0.as_str()))
            .collect::<Result<_, _>>()?;
        if let Some(outbox) = spec.enabled_outbox() {
            plan.outbox = Some(QualifiedName::parse(&outbox.table)?);
            plan.relay = Some(RolePlan {
                replication: logical_relay,
                ..RolePlan::new(roles.relay.clone())
            });
            plan.outbox_publication = logical_relay;
        } else {
            plan.retired_roles.push(roles.relay.clone());
        }
        if let Some(cdc) = &spec.cdc {
            plan.cdc = Some(CdcPlan {
                role: RolePlan {
                    replication: true,
                    ..RolePlan::new(roles.cdc.clone())
                },
                tables: cdc
                    .tables
                    .iter()
                    .map(|t| QualifiedName::parse(&t.0))
                    .collect::<Result<_, _>>()?,
            });
        } else {
            plan.retired_roles.push(roles.cdc.clone());
        }
        Ok(plan)
    }

    /// Every login role with the attributes it should have.
    pub fn roles(&self) -> impl Iterator<Item = (&RolePlan, RoleAttributes)> {
        std::iter::once((&self.app, RoleAttributes::app_role()))
            .chain(
                self.relay
                    .iter()
                    .map(|r| (r, RoleAttributes::service_role(r.replication))),
            )
            .chain(
                self.cdc
                    .iter()
                    .map(|c| (&c.role, RoleAttributes::service_role(c.role.replication))),
            )
    }

    /// Every role the plan creates or changes, with its attributes and password: the login
    /// roles, then the outbox owner when the outbox is enabled.
    pub(crate) fn all_roles(&self) -> Vec<(Ident, RoleAttributes, Option<&RolePassword>)> {
        let mut out: Vec<_> = self
            .roles()
            .map(|(r, a)| (r.name.clone(), a, r.password.as_ref()))
            .collect();
        if self.outbox.is_some() {
            out.push((
                self.outbox_owner.clone(),
                RoleAttributes::outbox_owner(),
                None,
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> crate::api::ServiceDatabaseSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn owner() -> OwnerMark {
        OwnerMark::new("shop", "orders", "uid-1").unwrap()
    }

    #[test]
    fn a_spec_with_outbox_and_cdc_gives_three_roles_and_their_objects() {
        let s = spec(
            "owner: {service: orders-api}\n\
             instance: {external: {host: pg, adminSecretRef: {name: a}}}\n\
             database: {extensions: [pgcrypto]}\n\
             outbox: {table: events.outbox}\n\
             cdc: {tables: [public.orders], kafkaConnect: {url: 'http://c:8083'}, topicPrefix: cdc}\n",
        );
        let plan = DatabasePlan::for_spec(&s, owner(), true).unwrap();
        assert_eq!(plan.database.as_str(), "orders_api");
        assert_eq!(plan.app.name.as_str(), "orders_api");
        assert_eq!(plan.owner, owner());
        assert!(!plan.adopt);
        let relay = plan.relay.as_ref().unwrap();
        assert_eq!(
            (relay.name.as_str(), relay.replication),
            ("orders_api_relay", true)
        );
        assert!(plan.outbox_publication);
        assert_eq!(plan.outbox.as_ref().unwrap().to_string(), "events.outbox");
        assert_eq!(plan.outbox_owner.as_str(), "orders_api_outbox");
        let cdc = plan.cdc.as_ref().unwrap();
        assert_eq!(
            (cdc.role.name.as_str(), cdc.role.replication),
            ("orders_api_cdc", true)
        );
        assert_eq!(cdc.tables[0].to_string(), "public.orders");
        assert_eq!(plan.extensions, vec![Ident::new("pgcrypto").unwrap()]);
        assert!(plan.roles().all(|(r, _)| r.password.is_none()));
        assert!(plan.retired_roles.is_empty());
        let all: Vec<_> = plan
            .all_roles()
            .into_iter()
            .map(|r| r.0.to_string())
            .collect();
        assert_eq!(
            all,
            [
                "orders_api",
                "orders_api_relay",
                "orders_api_cdc",
                "orders_api_outbox"
            ]
        );
    }

    #[test]
    fn a_spec_without_outbox_or_cdc_retires_their_roles() {
        let s = spec(
            "owner: {service: billing}\n\
             instance: {external: {host: pg, adminSecretRef: {name: a}}}\n\
             database: {name: billing_db, adopt: true}\n\
             outbox: {enabled: false}\n",
        );
        let plan = DatabasePlan::for_spec(&s, owner(), false).unwrap();
        assert_eq!(plan.database.as_str(), "billing_db");
        assert!(plan.adopt);
        assert!(plan.relay.is_none() && plan.outbox.is_none() && plan.cdc.is_none());
        let retired: Vec<_> = plan.retired_roles.iter().map(|r| r.to_string()).collect();
        assert_eq!(retired, ["billing_relay", "billing_cdc"]);
        assert_eq!(
            plan.all_roles().len(),
            1,
            "no outbox owner without an outbox"
        );
    }
}
