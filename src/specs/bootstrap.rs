//! The first-start SQL of a managed instance, rendered from a database plan (pure, no I/O).
//!
//! The official postgres image runs `/docker-entrypoint-initdb.d/*.sql` once, as the superuser,
//! on an empty data directory, before the server listens on TCP. Rendering the same plan the
//! controller converges later means the pod turns Ready only with the database, roles, grants
//! and outbox in place. Passwords appear only as SCRAM verifiers; every identifier is quoted by
//! the SQL builders in [`crate::postgres::sql`].

use std::collections::BTreeSet;

use crate::postgres::identifiers::{cdc_publication, functions_schema, outbox_publication};
use crate::postgres::sql::{self, Publish, RoleAttributes, TablePrivilege};
use crate::postgres::{DatabasePlan, Ident, RolePlan};

fn create_role(role: &RolePlan, attrs: RoleAttributes) -> String {
    let verifier = role.password.as_ref().map(|p| p.password.scram_verifier());
    sql::create_role(&role.name, &attrs, verifier.as_ref())
}

/// The bootstrap script for `plan`, for psql (`\connect` switches into the new database). It
/// leaves the instance exactly as [`crate::postgres::provision::provision`] would: marks,
/// owners, the outbox role and the relay's functions, so the first reconcile after start
/// finds nothing to change.
pub fn bootstrap_sql(plan: &DatabasePlan) -> String {
    let mut out: Vec<String> =
        vec!["-- Written by servicedb-operator; runs once on an empty data directory.".to_owned()];
    let mut roles = vec![create_role(&plan.app, RoleAttributes::app_role())];
    let mut names = vec![plan.app.name.clone()];
    if let Some(relay) = &plan.relay {
        roles.push(create_role(
            relay,
            RoleAttributes::service_role(relay.replication),
        ));
        names.push(relay.name.clone());
    }
    if let Some(cdc) = &plan.cdc {
        roles.push(create_role(
            &cdc.role,
            RoleAttributes::service_role(cdc.role.replication),
        ));
        names.push(cdc.role.name.clone());
    }
    if plan.outbox.is_some() {
        roles.push(sql::create_role(
            &plan.outbox_owner,
            &RoleAttributes::outbox_owner(),
            None,
        ));
        names.push(plan.outbox_owner.clone());
    }
    out.extend(roles);
    for name in &names {
        out.push(sql::comment_on_role(name, &plan.owner));
    }
    out.push(sql::create_database(&plan.database, &plan.app.name));
    out.push(sql::comment_on_database(&plan.database, &plan.owner));
    out.push(sql::revoke_database_from_public(&plan.database));
    for role in plan.relay.iter().chain(plan.cdc.as_ref().map(|c| &c.role)) {
        out.push(sql::grant_connect(&plan.database, &role.name));
    }
    out.push(format!("\\connect {}", plan.database.quoted()));
    out.push(sql::revoke_create_on_public_schema());
    out.push(sql::alter_schema_owner(&Ident::public(), &plan.app.name));
    // As the app (trusted extensions need nothing more; an untrusted one fails loudly here and
    // is created by the controller's provisioning with a pinned search_path instead).
    out.push(sql::set_role(&plan.app.name).replace("SET LOCAL ROLE", "SET ROLE"));
    for ext in &plan.extensions {
        out.push(sql::create_extension(ext));
    }
    out.push(sql::RESET_ROLE.to_owned());
    if let Some(outbox) = &plan.outbox {
        let owner = &plan.outbox_owner;
        out.push(sql::create_schema_owned_by(&functions_schema(), owner));
        if !outbox.in_public_schema() {
            out.push(sql::create_schema(&outbox.schema));
            out.push(sql::alter_schema_owner(&outbox.schema, &plan.app.name));
        }
        out.push(format!(
            "GRANT USAGE, CREATE ON SCHEMA {} TO {}",
            outbox.schema.quoted(),
            owner.quoted()
        ));
        out.push(format!("SET ROLE {}", owner.quoted()));
        out.push(sql::create_outbox_table(outbox));
        out.push(sql::create_outbox_seq_index(outbox));
        out.push(sql::create_outbox_notify_function(outbox));
        out.push(sql::revoke_function_from_public(&format!(
            "{}.{}()",
            functions_schema().quoted(),
            crate::postgres::identifiers::outbox_notify_trigger(outbox).quoted()
        )));
        out.push(sql::create_outbox_notify_trigger(outbox));
        for f in sql::outbox_functions(outbox) {
            out.push(f.create.clone());
            out.push(sql::revoke_function_from_public(&f.signature()));
            if let (true, Some(relay)) = (f.for_relay, &plan.relay) {
                out.push(sql::grant_execute(&f.signature(), &relay.name));
            }
        }
        if let Some(relay) = &plan.relay {
            out.push(sql::grant_schema_usage(&functions_schema(), &relay.name));
        }
        let privs = BTreeSet::from([
            TablePrivilege::Select,
            TablePrivilege::Insert,
            TablePrivilege::Delete,
        ]);
        out.push(sql::grant_table(&privs, outbox, &plan.app.name));
        if let Some(cdc) = plan.cdc.as_ref().filter(|c| c.tables.contains(outbox)) {
            let privs = BTreeSet::from([TablePrivilege::Select]);
            out.push(sql::grant_table(&privs, outbox, &cdc.role.name));
        }
        out.push(sql::RESET_ROLE.to_owned());
        if plan.outbox_publication {
            out.push(sql::create_publication(
                &outbox_publication(outbox),
                std::slice::from_ref(outbox),
                Publish::InsertsOnly,
            ));
        }
    }
    if plan.cdc.is_some() {
        // CDC tables are created later by the application's migrations; the controller grants
        // and publishes them once they exist. The empty publication is there from the start.
        out.push(sql::create_publication(
            &cdc_publication(&plan.database),
            &[],
            Publish::Everything,
        ));
    }
    let mut script = out.join(";\n");
    script.push_str(";\n");
    // psql meta-commands must not end with ';'.
    script.replace(
        &format!("\\connect {};", plan.database.quoted()),
        &format!("\\connect {}", plan.database.quoted()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::{OwnerMark, Password, PersistedPassword, QualifiedName, RoleNames};

    #[test]
    fn bootstrap_quotes_identifiers_and_carries_only_verifiers() {
        let password = Password::generate();
        let roles = RoleNames::for_service("orders").expect("names");
        let owner = OwnerMark::new("shop", "orders", "u-1").expect("mark");
        let mut plan = DatabasePlan::new(Ident::new("orders").expect("ident"), owner, &roles);
        plan.app = plan
            .app
            .with_password(PersistedPassword::assume_persisted(password.clone()), true);
        plan.relay = Some(
            RolePlan {
                replication: true,
                ..RolePlan::new(roles.relay.clone())
            }
            .with_password(
                PersistedPassword::assume_persisted(Password::generate()),
                true,
            ),
        );
        plan.outbox = Some(QualifiedName::parse("events.outbox").expect("name"));
        plan.outbox_publication = true;
        let sql = bootstrap_sql(&plan);
        assert!(
            sql.contains("CREATE DATABASE \"orders\" OWNER \"orders\" TEMPLATE template0"),
            "{sql}"
        );
        for marked in [
            "COMMENT ON ROLE \"orders\" IS 'servicedb.io/owner=v1 ns=shop name=orders uid=u-1'",
            "COMMENT ON ROLE \"orders_relay\" IS",
            "COMMENT ON ROLE \"orders_outbox\" IS",
            "COMMENT ON DATABASE \"orders\" IS",
        ] {
            assert!(sql.contains(marked), "{marked} missing: {sql}");
        }
        assert!(
            sql.contains(
                "CREATE SCHEMA IF NOT EXISTS \"servicedb\" AUTHORIZATION \"orders_outbox\""
            )
        );
        assert!(sql.contains("GRANT EXECUTE ON FUNCTION \"servicedb\".\"outbox_claim\"(batch bigint) TO \"orders_relay\""));
        assert!(
            !sql.lines()
                .any(|l| l.contains(" ON TABLE ") && l.contains("TO \"orders_relay\"")),
            "the relay gets no table privileges: {sql}"
        );
        assert!(sql.contains("\\connect \"orders\"\n"), "{sql}");
        assert!(sql.contains("SCRAM-SHA-256$"), "{sql}");
        assert!(
            !sql.contains(password.expose()),
            "plaintext password leaked into bootstrap SQL"
        );
        assert!(sql.contains("CREATE PUBLICATION \"outbox_pub\""), "{sql}");
    }
}
