//! The SQL text of every statement the operator issues (pure, no I/O).
//!
//! Only [`Ident`]/[`QualifiedName`] (validated, then quoted) and [`Literal`] (operator-generated
//! values) are interpolated; values that can be bind parameters (catalog lookups) are, in the
//! I/O modules. Keeping the text here makes it reviewable in one place and testable without a
//! server.

use std::collections::BTreeSet;

use super::identifiers::{
    Ident, Literal, QualifiedName, outbox_notify_channel, outbox_notify_trigger, outbox_seq_index,
};
use super::passwords::ScramVerifier;

/// Role attributes the operator manages, as in `pg_roles`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoleAttributes {
    /// `rolcanlogin`.
    pub login: bool,
    /// `rolsuper`.
    pub superuser: bool,
    /// `rolcreatedb`.
    pub createdb: bool,
    /// `rolcreaterole`.
    pub createrole: bool,
    /// `rolinherit`.
    pub inherit: bool,
    /// `rolreplication`.
    pub replication: bool,
    /// `rolbypassrls`.
    pub bypassrls: bool,
}

impl RoleAttributes {
    /// The relay and CDC roles: they can log in and nothing else. NOINHERIT because they are
    /// never meant to be members of other roles; should someone grant one, its privileges are
    /// still not picked up silently.
    pub fn service_role(replication: bool) -> Self {
        RoleAttributes {
            login: true,
            superuser: false,
            createdb: false,
            createrole: false,
            inherit: false,
            replication,
            bypassrls: false,
        }
    }

    /// The app role: like [`Self::service_role`] without REPLICATION, but INHERIT. On Postgres
    /// 15+ schema `public` belongs to `pg_database_owner`, whose privileges the database owner
    /// gets only through inheritance: a NOINHERIT owner could not create tables in `public`.
    pub fn app_role() -> Self {
        RoleAttributes {
            inherit: true,
            ..Self::service_role(false)
        }
    }

    fn options(&self) -> [(&'static str, &'static str, bool); 7] {
        [
            ("LOGIN", "NOLOGIN", self.login),
            ("SUPERUSER", "NOSUPERUSER", self.superuser),
            ("CREATEDB", "NOCREATEDB", self.createdb),
            ("CREATEROLE", "NOCREATEROLE", self.createrole),
            ("INHERIT", "NOINHERIT", self.inherit),
            ("REPLICATION", "NOREPLICATION", self.replication),
            ("BYPASSRLS", "NOBYPASSRLS", self.bypassrls),
        ]
    }
}

/// The options that turn `current` into `desired`, only those that differ. Only differing
/// options are sent because on Postgres 15 merely mentioning SUPERUSER/REPLICATION/BYPASSRLS
/// in `ALTER ROLE` needs superuser, even to restate the current value.
pub fn attribute_changes(current: &RoleAttributes, desired: &RoleAttributes) -> Vec<&'static str> {
    current
        .options()
        .iter()
        .zip(desired.options())
        .filter(|(c, d)| c.2 != d.2)
        .map(|(_, (yes, no, want))| if want { yes } else { no })
        .collect()
}

/// `CREATE ROLE` with every attribute spelled out. `CREATE` checks attribute values, not their
/// mention, so a non-superuser admin may say NOSUPERUSER/NOREPLICATION here (unlike `ALTER`).
pub fn create_role(
    role: &Ident,
    attrs: &RoleAttributes,
    verifier: Option<&ScramVerifier>,
) -> String {
    let mut sql = format!("CREATE ROLE {} WITH", role.quoted());
    for (yes, no, on) in attrs.options() {
        sql.push(' ');
        sql.push_str(if on { yes } else { no });
    }
    if let Some(v) = verifier {
        sql.push_str(" PASSWORD ");
        sql.push_str(Literal::from_verifier(v).as_sql());
    }
    sql
}

/// `ALTER ROLE ... WITH <options>`.
pub fn alter_role(role: &Ident, options: &[&str]) -> String {
    format!("ALTER ROLE {} WITH {}", role.quoted(), options.join(" "))
}

/// `ALTER ROLE ... PASSWORD '<verifier>'`: only the verifier reaches the server.
pub fn alter_role_password(role: &Ident, verifier: &ScramVerifier) -> String {
    format!(
        "ALTER ROLE {} PASSWORD {}",
        role.quoted(),
        Literal::from_verifier(verifier).as_sql()
    )
}

/// Makes the (non-superuser) admin a member of `role`, so it can own objects on its behalf
/// (`CREATE DATABASE ... OWNER`, `SET ROLE`), connect to the database the role owns and
/// signal its backends (the last two need INHERIT). On 16+ the options are explicit because
/// CREATEROLE's automatic self-grant has neither.
pub fn grant_role_to_admin(role: &Ident, admin: &str, server_version_num: i32) -> String {
    let admin = super::identifiers::quote_ident(admin);
    if server_version_num >= 160_000 {
        format!(
            "GRANT {} TO {admin} WITH SET TRUE, INHERIT TRUE",
            role.quoted()
        )
    } else {
        format!("GRANT {} TO {admin}", role.quoted())
    }
}

/// `CREATE DATABASE ... OWNER ...` (cannot run inside a transaction block).
pub fn create_database(db: &Ident, owner: &Ident) -> String {
    format!("CREATE DATABASE {} OWNER {}", db.quoted(), owner.quoted())
}

/// `ALTER DATABASE ... OWNER TO ...`.
pub fn alter_database_owner(db: &Ident, owner: &Ident) -> String {
    format!("ALTER DATABASE {} OWNER TO {}", db.quoted(), owner.quoted())
}

/// Nobody but the roles we grant may connect or create temporary tables.
pub fn revoke_database_from_public(db: &Ident) -> String {
    format!(
        "REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC",
        db.quoted()
    )
}

/// `GRANT CONNECT ON DATABASE`.
pub fn grant_connect(db: &Ident, role: &Ident) -> String {
    format!(
        "GRANT CONNECT ON DATABASE {} TO {}",
        db.quoted(),
        role.quoted()
    )
}

/// `CREATE EXTENSION IF NOT EXISTS ... CASCADE` (CASCADE installs what it depends on).
pub fn create_extension(ext: &Ident) -> String {
    format!("CREATE EXTENSION IF NOT EXISTS {} CASCADE", ext.quoted())
}

/// Postgres 14 and older let PUBLIC create objects in `public`.
pub fn revoke_create_on_public_schema() -> String {
    "REVOKE CREATE ON SCHEMA public FROM PUBLIC".to_owned()
}

/// `ALTER SCHEMA ... OWNER TO ...`.
pub fn alter_schema_owner(schema: &Ident, owner: &Ident) -> String {
    format!(
        "ALTER SCHEMA {} OWNER TO {}",
        schema.quoted(),
        owner.quoted()
    )
}

/// `CREATE SCHEMA` (run as the app role, which therefore owns it).
pub fn create_schema(schema: &Ident) -> String {
    format!("CREATE SCHEMA IF NOT EXISTS {}", schema.quoted())
}

/// The outbox table: Debezium's outbox-router columns (`id`, `aggregatetype`, `aggregateid`,
/// `type`, `payload`) and ours, all defaulted so applications insert only Debezium's five.
/// `seq` gives the relay a commit-independent total order to read in; `created_at` feeds the
/// lag metric.
pub fn create_outbox_table(table: &QualifiedName) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (\n\
         \x20   id uuid PRIMARY KEY,\n\
         \x20   aggregatetype text NOT NULL,\n\
         \x20   aggregateid text NOT NULL,\n\
         \x20   type text NOT NULL,\n\
         \x20   payload jsonb,\n\
         \x20   headers jsonb,\n\
         \x20   created_at timestamptz NOT NULL DEFAULT now(),\n\
         \x20   seq bigint GENERATED ALWAYS AS IDENTITY\n\
         )",
        table.quoted()
    )
}

/// The index the relay reads in order by.
pub fn create_outbox_seq_index(table: &QualifiedName) -> String {
    format!(
        "CREATE INDEX IF NOT EXISTS {} ON {} (seq)",
        outbox_seq_index(table).quoted(),
        table.quoted()
    )
}

/// The trigger function: one NOTIFY per inserting statement (not per row: a wake-up is all the
/// relay needs, and NOTIFYs with equal payloads in one transaction are folded anyway). The
/// channel comes in as a trigger argument so the body holds no interpolated text.
/// `pg_catalog` is spelled out so a hostile `search_path` cannot redirect the call.
pub fn create_outbox_notify_function(table: &QualifiedName) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {}.{}() RETURNS trigger LANGUAGE plpgsql AS \
         $servicedb$ BEGIN PERFORM pg_catalog.pg_notify(TG_ARGV[0], ''); RETURN NULL; END $servicedb$",
        table.schema.quoted(),
        outbox_notify_trigger(table).quoted()
    )
}

/// The statement-level AFTER INSERT trigger calling the function above.
pub fn create_outbox_notify_trigger(table: &QualifiedName) -> String {
    let name = outbox_notify_trigger(table);
    format!(
        "CREATE TRIGGER {} AFTER INSERT ON {} FOR EACH STATEMENT EXECUTE FUNCTION {}.{}({})",
        name.quoted(),
        table.quoted(),
        table.schema.quoted(),
        name.quoted(),
        Literal::from_ident(&outbox_notify_channel(table)).as_sql()
    )
}

/// `ALTER TABLE ... OWNER TO ...`.
pub fn alter_table_owner(table: &QualifiedName, owner: &Ident) -> String {
    format!("ALTER TABLE {} OWNER TO {}", table.quoted(), owner.quoted())
}

/// `GRANT USAGE ON SCHEMA`.
pub fn grant_schema_usage(schema: &Ident, role: &Ident) -> String {
    format!(
        "GRANT USAGE ON SCHEMA {} TO {}",
        schema.quoted(),
        role.quoted()
    )
}

/// Table privileges as `aclexplode` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TablePrivilege {
    /// SELECT.
    Select,
    /// INSERT.
    Insert,
    /// UPDATE.
    Update,
    /// DELETE.
    Delete,
    /// TRUNCATE.
    Truncate,
    /// REFERENCES.
    References,
    /// TRIGGER.
    Trigger,
    /// MAINTAIN (Postgres 17+).
    Maintain,
}

impl TablePrivilege {
    /// The SQL keyword.
    pub fn as_sql(self) -> &'static str {
        match self {
            TablePrivilege::Select => "SELECT",
            TablePrivilege::Insert => "INSERT",
            TablePrivilege::Update => "UPDATE",
            TablePrivilege::Delete => "DELETE",
            TablePrivilege::Truncate => "TRUNCATE",
            TablePrivilege::References => "REFERENCES",
            TablePrivilege::Trigger => "TRIGGER",
            TablePrivilege::Maintain => "MAINTAIN",
        }
    }

    /// Parses `aclexplode(...).privilege_type`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "SELECT" => TablePrivilege::Select,
            "INSERT" => TablePrivilege::Insert,
            "UPDATE" => TablePrivilege::Update,
            "DELETE" => TablePrivilege::Delete,
            "TRUNCATE" => TablePrivilege::Truncate,
            "REFERENCES" => TablePrivilege::References,
            "TRIGGER" => TablePrivilege::Trigger,
            "MAINTAIN" => TablePrivilege::Maintain,
            _ => return None,
        })
    }
}

fn privilege_list(privs: &BTreeSet<TablePrivilege>) -> String {
    privs
        .iter()
        .map(|p| p.as_sql())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `GRANT <privs> ON TABLE`.
pub fn grant_table(
    privs: &BTreeSet<TablePrivilege>,
    table: &QualifiedName,
    role: &Ident,
) -> String {
    format!(
        "GRANT {} ON TABLE {} TO {}",
        privilege_list(privs),
        table.quoted(),
        role.quoted()
    )
}

/// `REVOKE <privs> ON TABLE`.
pub fn revoke_table(
    privs: &BTreeSet<TablePrivilege>,
    table: &QualifiedName,
    role: &Ident,
) -> String {
    format!(
        "REVOKE {} ON TABLE {} FROM {}",
        privilege_list(privs),
        table.quoted(),
        role.quoted()
    )
}

/// `GRANT UPDATE (<column>)`; `column` is one of our own constants, quoted all the same.
pub fn grant_column_update(table: &QualifiedName, column: &str, role: &Ident) -> String {
    format!(
        "GRANT UPDATE ({}) ON TABLE {} TO {}",
        super::identifiers::quote_ident(column),
        table.quoted(),
        role.quoted()
    )
}

/// `REVOKE UPDATE (<column>)`.
pub fn revoke_column_update(table: &QualifiedName, column: &str, role: &Ident) -> String {
    format!(
        "REVOKE UPDATE ({}) ON TABLE {} FROM {}",
        super::identifiers::quote_ident(column),
        table.quoted(),
        role.quoted()
    )
}

/// What a publication sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Publish {
    /// Inserts only: the outbox relay needs nothing else, and apps may delete rows right after
    /// inserting them (Debezium's insert-then-delete pattern) without producing traffic.
    InsertsOnly,
    /// Postgres' default (insert, update, delete, truncate): CDC.
    Everything,
}

/// `CREATE PUBLICATION` for the given tables (an empty publication when there are none, so a
/// CDC connector configured not to create publications finds it).
pub fn create_publication(name: &Ident, tables: &[QualifiedName], publish: Publish) -> String {
    let mut sql = format!("CREATE PUBLICATION {}", name.quoted());
    if !tables.is_empty() {
        sql.push_str(" FOR TABLE ");
        sql.push_str(
            &tables
                .iter()
                .map(QualifiedName::quoted)
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    if publish == Publish::InsertsOnly {
        sql.push_str(" WITH (publish = 'insert')");
    }
    sql
}

/// `ALTER PUBLICATION ... ADD TABLE` / `DROP TABLE`.
pub fn alter_publication_tables(name: &Ident, add: bool, tables: &[QualifiedName]) -> String {
    format!(
        "ALTER PUBLICATION {} {} TABLE {}",
        name.quoted(),
        if add { "ADD" } else { "DROP" },
        tables
            .iter()
            .map(QualifiedName::quoted)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// `DROP PUBLICATION IF EXISTS`.
pub fn drop_publication(name: &Ident) -> String {
    format!("DROP PUBLICATION IF EXISTS {}", name.quoted())
}

/// `SET ROLE` (inside a transaction the caller ends; Postgres resets it on rollback too).
pub fn set_role(role: &Ident) -> String {
    format!("SET LOCAL ROLE {}", role.quoted())
}

/// `DROP DATABASE ... WITH (FORCE)`: terminates remaining sessions first (Postgres 13+).
pub fn drop_database(db: &Ident) -> String {
    format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", db.quoted())
}

/// `DROP ROLE IF EXISTS`.
pub fn drop_role(role: &Ident) -> String {
    format!("DROP ROLE IF EXISTS {}", role.quoted())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::passwords::Password;

    fn ident(s: &str) -> Ident {
        Ident::new(s).unwrap()
    }

    #[test]
    fn only_differing_role_attributes_are_altered() {
        let desired = RoleAttributes::service_role(false);
        assert!(attribute_changes(&desired, &desired).is_empty());
        let current = RoleAttributes {
            replication: true,
            inherit: true,
            ..desired
        };
        assert_eq!(
            attribute_changes(&current, &desired),
            vec!["NOINHERIT", "NOREPLICATION"]
        );
        let current = RoleAttributes {
            login: false,
            ..RoleAttributes::service_role(true)
        };
        assert_eq!(
            attribute_changes(&current, &desired),
            vec!["LOGIN", "NOREPLICATION"]
        );
    }

    #[test]
    fn role_statements_carry_the_verifier_never_the_password() {
        let pw = Password::from_plaintext("plaintextpassword42");
        let v = pw.scram_verifier();
        let create = create_role(
            &ident("orders"),
            &RoleAttributes::service_role(false),
            Some(&v),
        );
        assert!(create.starts_with(
            "CREATE ROLE \"orders\" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS PASSWORD 'SCRAM-SHA-256$4096:"
        ), "{create}");
        let alter = alter_role_password(&ident("orders"), &v);
        for sql in [create, alter] {
            assert!(!sql.contains("plaintextpassword42"));
            assert!(sql.contains(v.as_str()));
        }
    }

    #[test]
    fn every_identifier_is_quoted() {
        let t = QualifiedName::parse("events.outbox").unwrap();
        assert_eq!(
            create_database(&ident("orders"), &ident("orders_api")),
            "CREATE DATABASE \"orders\" OWNER \"orders_api\""
        );
        assert_eq!(
            create_outbox_seq_index(&t),
            "CREATE INDEX IF NOT EXISTS \"outbox_seq_idx\" ON \"events\".\"outbox\" (seq)"
        );
        assert_eq!(
            create_outbox_notify_trigger(&t),
            "CREATE TRIGGER \"outbox_notify\" AFTER INSERT ON \"events\".\"outbox\" FOR EACH STATEMENT EXECUTE FUNCTION \"events\".\"outbox_notify\"('outbox_outbox')"
        );
        let privs = BTreeSet::from([TablePrivilege::Delete, TablePrivilege::Select]);
        assert_eq!(
            grant_table(&privs, &t, &ident("r")),
            "GRANT SELECT, DELETE ON TABLE \"events\".\"outbox\" TO \"r\""
        );
        assert_eq!(
            grant_role_to_admin(&ident("a"), "ad\"min", 150_000),
            "GRANT \"a\" TO \"ad\"\"min\""
        );
    }

    #[test]
    fn the_outbox_has_debezium_columns_and_ours() {
        let sql = create_outbox_table(&QualifiedName::parse("outbox").unwrap());
        for col in [
            "id uuid PRIMARY KEY",
            "aggregatetype text NOT NULL",
            "aggregateid text NOT NULL",
            "type text NOT NULL",
            "payload jsonb",
            "headers jsonb",
            "created_at timestamptz NOT NULL DEFAULT now()",
            "seq bigint GENERATED ALWAYS AS IDENTITY",
        ] {
            assert!(sql.contains(col), "{col} missing from {sql}");
        }
    }

    #[test]
    fn publications_list_their_tables() {
        let a = QualifiedName::parse("public.a").unwrap();
        let b = QualifiedName::parse("s.b").unwrap();
        assert_eq!(
            create_publication(&ident("p"), &[a.clone(), b.clone()], Publish::Everything),
            "CREATE PUBLICATION \"p\" FOR TABLE \"public\".\"a\", \"s\".\"b\""
        );
        assert_eq!(
            create_publication(&ident("p"), &[a], Publish::InsertsOnly),
            "CREATE PUBLICATION \"p\" FOR TABLE \"public\".\"a\" WITH (publish = 'insert')"
        );
        assert_eq!(
            create_publication(&ident("p"), &[], Publish::Everything),
            "CREATE PUBLICATION \"p\""
        );
        assert_eq!(
            alter_publication_tables(&ident("p"), false, &[b]),
            "ALTER PUBLICATION \"p\" DROP TABLE \"s\".\"b\""
        );
    }
}
