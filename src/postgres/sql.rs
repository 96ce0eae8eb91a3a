//! The SQL text of every statement the operator issues (pure, no I/O).
//!
//! Only [`Ident`]/[`QualifiedName`] (validated, then quoted) and [`Literal`] (operator-generated
//! values) are interpolated; values that can be bind parameters (catalog lookups) are, in the
//! I/O modules. Keeping the text here makes it reviewable in one place and testable without a
//! server.

use std::collections::BTreeSet;

use super::identifiers::{
    Ident, Literal, QualifiedName, functions_schema, outbox_notify_channel, outbox_notify_trigger,
    outbox_seq_index, quote_ident,
};
use super::ownership::OwnerMark;
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

    /// The outbox owner: cannot log in, inherits nothing; it only owns the outbox and the
    /// functions the relay calls.
    pub fn outbox_owner() -> Self {
        RoleAttributes {
            login: false,
            ..Self::service_role(false)
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

/// `CREATE DATABASE ... OWNER ... TEMPLATE template0` (cannot run inside a transaction block).
/// `template0` because `template1` is writable by whoever the server's superusers let write
/// it: a new database must never inherit another tenant's objects.
pub fn create_database(db: &Ident, owner: &Ident) -> String {
    format!(
        "CREATE DATABASE {} OWNER {} TEMPLATE template0",
        db.quoted(),
        owner.quoted()
    )
}

/// `COMMENT ON DATABASE ... IS '<mark>'`.
pub fn comment_on_database(db: &Ident, mark: &OwnerMark) -> String {
    format!(
        "COMMENT ON DATABASE {} IS {}",
        db.quoted(),
        Literal::from_mark(mark).as_sql()
    )
}

/// `COMMENT ON ROLE ... IS '<mark>'`.
pub fn comment_on_role(role: &Ident, mark: &OwnerMark) -> String {
    format!(
        "COMMENT ON ROLE {} IS {}",
        role.quoted(),
        Literal::from_mark(mark).as_sql()
    )
}

/// `REVOKE CONNECT ON DATABASE` (a retired role).
pub fn revoke_connect(db: &Ident, role: &Ident) -> String {
    format!(
        "REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM {}",
        db.quoted(),
        role.quoted()
    )
}

/// `DROP OWNED BY`: in the current database, revokes every privilege granted to the role (and
/// drops what it owns; called only for roles that own nothing).
pub fn drop_owned_by(role: &Ident) -> String {
    format!("DROP OWNED BY {}", role.quoted())
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

/// `CREATE EXTENSION ... SCHEMA <schema> CASCADE`, for untrusted extensions a superuser
/// creates: the script runs with its target schema first in `search_path`, so that schema must
/// be one the app cannot write.
pub fn create_extension_in(ext: &Ident, schema: &Ident) -> String {
    format!(
        "CREATE EXTENSION IF NOT EXISTS {} SCHEMA {} CASCADE",
        ext.quoted(),
        schema.quoted()
    )
}

/// `SET LOCAL search_path` to a fixed, admin-owned list (extension scripts run as superuser).
pub fn set_local_search_path(schema: &Ident) -> String {
    format!(
        "SET LOCAL search_path = {}, pg_catalog, pg_temp",
        schema.quoted()
    )
}

/// `CREATE SCHEMA ... AUTHORIZATION ...`.
pub fn create_schema_owned_by(schema: &Ident, owner: &Ident) -> String {
    format!(
        "CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}",
        schema.quoted(),
        owner.quoted()
    )
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
/// The function lives in [`FUNCTIONS_SCHEMA`], owned by the outbox role, so the app (which owns
/// the outbox's schema) cannot replace its body.
pub fn create_outbox_notify_function(table: &QualifiedName) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {}.{}() RETURNS trigger LANGUAGE plpgsql \
         SET search_path = pg_catalog, pg_temp AS \
         $servicedb$ BEGIN PERFORM pg_catalog.pg_notify(TG_ARGV[0], ''); RETURN NULL; END $servicedb$",
        functions_schema().quoted(),
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
        functions_schema().quoted(),
        name.quoted(),
        Literal::from_ident(&outbox_notify_channel(table)).as_sql()
    )
}

/// `DROP TRIGGER IF EXISTS` (a notify trigger calling a function the outbox role does not own,
/// left by an older operator version).
pub fn drop_trigger(table: &QualifiedName, trigger: &Ident) -> String {
    format!(
        "DROP TRIGGER IF EXISTS {} ON {}",
        trigger.quoted(),
        table.quoted()
    )
}

/// One function the relay reaches the outbox through: its name, argument types as
/// `pg_get_function_identity_arguments` prints them, body, and full `CREATE OR REPLACE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxFunction {
    /// Name in [`FUNCTIONS_SCHEMA`].
    pub name: &'static str,
    /// `pg_get_function_identity_arguments` spelling, for lookups and GRANTs.
    pub args: &'static str,
    /// The body (`prosrc`), compared to decide whether to replace it.
    pub body: String,
    /// SECURITY DEFINER (the relay-facing ones) or not (the guard).
    pub definer: bool,
    /// The relay gets EXECUTE on it.
    pub for_relay: bool,
    /// The `CREATE OR REPLACE FUNCTION` statement.
    pub create: String,
}

impl OutboxFunction {
    /// `"servicedb"."name"(args)`, for GRANT/REVOKE.
    pub fn signature(&self) -> String {
        format!(
            "{}.{}({})",
            functions_schema().quoted(),
            quote_ident(self.name),
            self.args
        )
    }
}

/// Name of the claim function (`DELETE ... RETURNING` a batch in `seq` order).
pub const CLAIM_FUNCTION: &str = "outbox_claim";
/// Name of the delete-by-ids function (Logical mode deletes what it streamed).
pub const DELETE_FUNCTION: &str = "outbox_delete";
/// Name of the lag function (rows waiting, age of the oldest).
pub const LAG_FUNCTION: &str = "outbox_lag";
/// Name of the guard every other function calls first.
pub const GUARD_FUNCTION: &str = "outbox_guard";

/// The functions the relay uses instead of table privileges, for `table`.
///
/// Every relay-facing function is SECURITY DEFINER as the outbox role, with a pinned
/// `search_path`, and first calls the guard: the named relation must be a plain table owned
/// by the outbox role, without forced row security, without rules, and with no trigger whose
/// function the outbox role does not own. SQL functions parse their whole body before running
/// it, so the relation is resolved and locked before the guard checks it, and it cannot be
/// swapped until the caller's transaction ends. Whatever the app does to the outbox's schema
/// (it owns it), no code of its choosing runs as the outbox role, let alone as the relay.
pub fn outbox_functions(table: &QualifiedName) -> Vec<OutboxFunction> {
    let schema = functions_schema().quoted();
    let t = table.quoted();
    let rel = Literal::from_qualified(table);
    let rel = rel.as_sql();
    let guard_body = format!(
        " DECLARE rel pg_catalog.regclass := {rel}::pg_catalog.regclass; \
         me pg_catalog.oid := (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = current_user); \
         BEGIN \
         IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = rel AND c.relkind = 'r' \
         AND c.relowner = me AND NOT c.relforcerowsecurity) THEN \
         RAISE EXCEPTION 'servicedb: % is not a table owned by %', rel, current_user USING ERRCODE = '42501'; \
         END IF; \
         IF EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite w WHERE w.ev_class = rel) \
         OR EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g JOIN pg_catalog.pg_proc p ON p.oid = g.tgfoid \
         WHERE g.tgrelid = rel AND NOT g.tgisinternal AND p.proowner <> me) THEN \
         RAISE EXCEPTION 'servicedb: % has rules or triggers the outbox role does not own', rel USING ERRCODE = '42501'; \
         END IF; \
         END "
    );
    let guard_call = format!("SELECT {schema}.{}();", quote_ident(GUARD_FUNCTION));
    let claim_body = format!(
        " {guard_call} \
         DELETE FROM {t} WHERE id IN (SELECT id FROM {t} ORDER BY seq LIMIT $1) \
         RETURNING seq, id, aggregatetype, aggregateid, type, payload::pg_catalog.text, \
         headers::pg_catalog.text, pg_catalog.date_part('epoch', created_at)::pg_catalog.float8 "
    );
    let delete_body = format!(
        " {guard_call} \
         WITH d AS (DELETE FROM {t} WHERE id = ANY ($1) RETURNING 1) \
         SELECT pg_catalog.count(*) FROM d "
    );
    let lag_body = format!(
        " {guard_call} \
         SELECT (SELECT pg_catalog.max(seq) FROM {t}) - (SELECT pg_catalog.min(seq) FROM {t}) + 1, \
         (SELECT pg_catalog.date_part('epoch', pg_catalog.now() - created_at)::pg_catalog.float8 \
         FROM {t} ORDER BY seq LIMIT 1) "
    );
    let make = |name: &'static str,
                args: &'static str,
                params: &str,
                returns: &str,
                language: &str,
                body: String,
                definer: bool,
                for_relay: bool| {
        let create = format!(
            "CREATE OR REPLACE FUNCTION {schema}.{}({params}) RETURNS {returns} LANGUAGE {language} \
             {}SET search_path = pg_catalog, pg_temp AS $servicedb${body}$servicedb$",
            quote_ident(name),
            if definer { "SECURITY DEFINER " } else { "" },
        );
        OutboxFunction {
            name,
            args,
            body,
            definer,
            for_relay,
            create,
        }
    };
    vec![
        make(
            GUARD_FUNCTION,
            "",
            "",
            "void",
            "plpgsql",
            guard_body,
            false,
            false,
        ),
        make(
            CLAIM_FUNCTION,
            "batch bigint",
            "batch bigint",
            "TABLE (seq bigint, id uuid, aggregatetype text, aggregateid text, \"type\" text, \
             payload text, headers text, created_epoch double precision)",
            "sql",
            claim_body,
            true,
            true,
        ),
        make(
            DELETE_FUNCTION,
            "ids uuid[]",
            "ids uuid[]",
            "bigint",
            "sql",
            delete_body,
            true,
            true,
        ),
        make(
            LAG_FUNCTION,
            "",
            "",
            "TABLE (lag_rows bigint, lag_seconds double precision)",
            "sql",
            lag_body,
            true,
            true,
        ),
    ]
}

/// `REVOKE ALL ON FUNCTION ... FROM PUBLIC` (functions are executable by PUBLIC by default).
pub fn revoke_function_from_public(signature: &str) -> String {
    format!("REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")
}

/// `GRANT EXECUTE ON FUNCTION`.
pub fn grant_execute(signature: &str, role: &Ident) -> String {
    format!("GRANT EXECUTE ON FUNCTION {signature} TO {}", role.quoted())
}

/// `REVOKE EXECUTE ON FUNCTION`.
pub fn revoke_execute(signature: &str, role: &Ident) -> String {
    format!(
        "REVOKE EXECUTE ON FUNCTION {signature} FROM {}",
        role.quoted()
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

/// `ALTER SCHEMA ... OWNER`/`ALTER TABLE ... OWNER` are above; `RESET ROLE` ends a `SET ROLE`.
pub const RESET_ROLE: &str = "RESET ROLE";

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
            "CREATE DATABASE \"orders\" OWNER \"orders_api\" TEMPLATE template0"
        );
        assert_eq!(
            create_outbox_seq_index(&t),
            "CREATE INDEX IF NOT EXISTS \"outbox_seq_idx\" ON \"events\".\"outbox\" (seq)"
        );
        assert_eq!(
            create_outbox_notify_trigger(&t),
            "CREATE TRIGGER \"outbox_notify\" AFTER INSERT ON \"events\".\"outbox\" FOR EACH STATEMENT EXECUTE FUNCTION \"servicedb\".\"outbox_notify\"('outbox_outbox')"
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
    fn marks_are_written_as_comments() {
        let mark = OwnerMark::new("shop", "orders", "0b7c-9a3e").unwrap();
        assert_eq!(
            comment_on_role(&ident("orders_api"), &mark),
            "COMMENT ON ROLE \"orders_api\" IS 'servicedb.io/owner=v1 ns=shop name=orders uid=0b7c-9a3e'"
        );
        assert!(
            comment_on_database(&ident("orders"), &mark)
                .starts_with("COMMENT ON DATABASE \"orders\" IS 'servicedb.io/owner=v1 ")
        );
    }

    #[test]
    fn relay_functions_are_definers_with_a_pinned_search_path_that_check_the_table_first() {
        let t = QualifiedName::parse("events.outbox").unwrap();
        let fns = outbox_functions(&t);
        let names: Vec<_> = fns.iter().map(|f| f.name).collect();
        assert_eq!(
            names,
            vec![
                GUARD_FUNCTION,
                CLAIM_FUNCTION,
                DELETE_FUNCTION,
                LAG_FUNCTION
            ]
        );
        for f in &fns {
            assert!(
                f.create.contains("SET search_path = pg_catalog, pg_temp"),
                "{}",
                f.create
            );
            assert_eq!(
                f.create.contains("SECURITY DEFINER"),
                f.definer,
                "{}",
                f.create
            );
            assert!(
                f.create
                    .starts_with("CREATE OR REPLACE FUNCTION \"servicedb\".")
            );
            if f.for_relay {
                assert!(
                    f.body
                        .trim_start()
                        .starts_with("SELECT \"servicedb\".\"outbox_guard\"();"),
                    "{}",
                    f.body
                );
                assert!(f.body.contains("\"events\".\"outbox\""));
            }
        }
        assert_eq!(
            fns[1].signature(),
            "\"servicedb\".\"outbox_claim\"(batch bigint)"
        );
        assert!(
            fns[0]
                .body
                .contains("'\"events\".\"outbox\"'::pg_catalog.regclass")
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
