//! The first-start SQL of a managed instance, rendered from a database plan (pure, no I/O).
//!
//! The official postgres image runs `/docker-entrypoint-initdb.d/*.sql` once, as the superuser,
//! on an empty data directory, before the server listens on TCP. Rendering the same plan the
//! controller converges later means the pod turns Ready only with the database, roles, grants
//! and outbox in place. Passwords appear only as SCRAM verifiers; every identifier is quoted by
//! the SQL builders in [`crate::postgres::sql`].

use std::collections::BTreeSet;

use crate::postgres::identifiers::{cdc_publication, outbox_publication};
use crate::postgres::sql::{self, Publish, RoleAttributes, TablePrivilege};
use crate::postgres::{DatabasePlan, RolePlan};

fn create_role(role: &RolePlan, attrs: RoleAttributes) -> String {
    let verifier = role.set_password.as_ref().map(|p| p.scram_verifier());
    sql::create_role(&role.name, &attrs, verifier.as_ref())
}

/// The bootstrap script for `plan`, for psql (`\connect` switches into the new database).
pub fn bootstrap_sql(plan: &DatabasePlan) -> String {
    let mut out: Vec<String> =
        vec!["-- Written by servicedb-operator; runs once on an empty data directory.".to_owned()];
    out.push(create_role(&plan.app, RoleAttributes::app_role()));
    if let Some(relay) = &plan.relay {
        out.push(create_role(
            relay,
            RoleAttributes::service_role(relay.replication),
        ));
    }
    if let Some(cdc) = &plan.cdc {
        out.push(create_role(
            &cdc.role,
            RoleAttributes::service_role(cdc.role.replication),
        ));
    }
    out.push(sql::create_database(&plan.database, &plan.app.name));
    out.push(sql::revoke_database_from_public(&plan.database));
    for role in plan.relay.iter().chain(plan.cdc.as_ref().map(|c| &c.role)) {
        out.push(sql::grant_connect(&plan.database, &role.name));
    }
    out.push(format!("\\connect {}", plan.database.quoted()));
    out.push(sql::revoke_create_on_public_schema());
    out.push(sql::alter_schema_owner(
        &crate::postgres::Ident::public(),
        &plan.app.name,
    ));
    for ext in &plan.extensions {
        out.push(sql::create_extension(ext));
    }
    if let Some(outbox) = &plan.outbox {
        if !outbox.in_public_schema() {
            out.push(sql::create_schema(&outbox.schema));
            out.push(sql::alter_schema_owner(&outbox.schema, &plan.app.name));
        }
        out.push(sql::create_outbox_table(outbox));
        out.push(sql::create_outbox_seq_index(outbox));
        out.push(sql::create_outbox_notify_function(outbox));
        out.push(sql::create_outbox_notify_trigger(outbox));
        out.push(sql::alter_table_owner(outbox, &plan.app.name));
        if let Some(relay) = &plan.relay {
            out.push(sql::grant_schema_usage(&outbox.schema, &relay.name));
            let privs = BTreeSet::from([TablePrivilege::Select, TablePrivilege::Delete]);
            out.push(sql::grant_table(&privs, outbox, &relay.name));
            if plan.relay_row_locks {
                out.push(sql::grant_column_update(outbox, "created_at", &relay.name));
            }
        }
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
    use crate::postgres::{Ident, Password, QualifiedName};

    #[test]
    fn bootstrap_quotes_identifiers_and_carries_only_verifiers() {
        let password = Password::generate();
        let app = RolePlan {
            name: Ident::new("orders").expect("ident"),
            set_password: Some(password.clone()),
            replication: false,
        };
        let mut plan = DatabasePlan::new(Ident::new("orders").expect("ident"), app);
        plan.relay = Some(RolePlan {
            name: Ident::new("orders_relay").expect("ident"),
            set_password: Some(Password::generate()),
            replication: true,
        });
        plan.outbox = Some(QualifiedName::parse("events.outbox").expect("name"));
        plan.outbox_publication = true;
        let sql = bootstrap_sql(&plan);
        assert!(
            sql.contains("CREATE DATABASE \"orders\" OWNER \"orders\""),
            "{sql}"
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
