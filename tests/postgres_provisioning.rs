//! Provisioning SQL against a real Postgres: every privilege claim is proven by logging in as
//! the role and trying.
//!
//! The server comes from PGHOST/PGPORT/PGUSER/PGPASSWORD (a superuser), or from
//! the test environment's env file (`$SERVICEDB_TESTENV_DIR/env`, default `target/testenv/env`,
//! written by `hack/testenv.sh up`). Each test uses its own database and
//! roles with a random suffix, so tests run in parallel on one server, and drops them at the end.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use servicedb::postgres::connect::{ConnectParams, SslMode, connect};
use servicedb::postgres::deprovision::deprovision;
use servicedb::postgres::identifiers::{
    Ident, QualifiedName, RoleNames, cdc_publication, outbox_notify_channel, outbox_publication,
    quote_ident,
};
use servicedb::postgres::inspect::inspect;
use servicedb::postgres::ownership::{ObjectKind, OwnerMark};
use servicedb::postgres::passwords::{Password, PersistedPassword};
use servicedb::postgres::plan::{CdcPlan, DatabasePlan, RolePlan};
use servicedb::postgres::provision::{ProvisionError, provision, set_role_password};
use servicedb::postgres::slots::drop_slot;
use tokio_postgres::Client;

/// Bound on every wait in these tests.
const TIMEOUT: Duration = Duration::from_secs(30);

struct Server {
    host: String,
    port: u16,
    user: String,
    password: String,
}

fn server() -> Server {
    // The shared environment's env file (`SERVICEDB_TESTENV_DIR` honoured), unless PG* is set.
    let vars: HashMap<String, String> = if std::env::var("PGHOST").is_err() {
        support::testenv_vars_if_up().unwrap_or_else(|| {
            panic!(
                "set PGHOST/PGPORT/PGUSER/PGPASSWORD or run hack/testenv.sh up (no env file in {})",
                support::testenv_dir().display()
            )
        })
    } else {
        HashMap::new()
    };
    let get = |k: &str| std::env::var(k).ok().or_else(|| vars.get(k).cloned());
    Server {
        host: get("PGHOST").unwrap_or_else(|| "127.0.0.1".to_owned()),
        port: get("PGPORT")
            .map(|p| p.parse().expect("PGPORT"))
            .unwrap_or(5432),
        user: get("PGUSER").unwrap_or_else(|| "postgres".to_owned()),
        password: get("PGPASSWORD").expect("PGPASSWORD"),
    }
}

fn superuser() -> ConnectParams {
    let s = server();
    let mut p = ConnectParams::new(
        s.host,
        s.port,
        s.user,
        Password::from_plaintext(s.password),
        "postgres",
    );
    p.connect_timeout = TIMEOUT;
    p
}

fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

fn ident(s: &str) -> Ident {
    Ident::new(s).unwrap()
}

fn persisted(p: &Password) -> PersistedPassword {
    PersistedPassword::assume_persisted(p.clone())
}

/// A service's names and passwords, and the plan the controller would build for it.
struct Service {
    roles: RoleNames,
    database: Ident,
    owner: OwnerMark,
    app_pw: Password,
    relay_pw: Password,
    cdc_pw: Password,
}

impl Service {
    fn new(prefix: &str) -> Self {
        let service = format!("t-{prefix}-{}", suffix());
        let roles = RoleNames::for_service(&service).unwrap();
        Service {
            database: roles.app.clone(),
            roles,
            owner: OwnerMark::new(
                "t-ns",
                service.replace('_', "-"),
                uuid::Uuid::new_v4().to_string(),
            )
            .unwrap(),
            app_pw: Password::generate(),
            relay_pw: Password::generate(),
            cdc_pw: Password::generate(),
        }
    }

    /// App + Poll relay + outbox, passwords set (first provisioning).
    fn plan(&self) -> DatabasePlan {
        let mut plan = DatabasePlan::new(self.database.clone(), self.owner.clone(), &self.roles);
        plan.app = plan.app.with_password(persisted(&self.app_pw), true);
        plan.relay = Some(
            RolePlan::new(self.roles.relay.clone()).with_password(persisted(&self.relay_pw), true),
        );
        plan.outbox = Some(QualifiedName::parse("outbox").unwrap());
        plan
    }

    /// The same plan in steady state: the passwords from the Secrets, none to reset.
    fn steady_plan(&self) -> DatabasePlan {
        let mut plan = self.plan();
        steady(&mut plan);
        plan
    }

    /// The cdc role's plan with its password.
    fn cdc_role(&self, replication: bool) -> RolePlan {
        RolePlan {
            replication,
            ..RolePlan::new(self.roles.cdc.clone())
        }
        .with_password(persisted(&self.cdc_pw), true)
    }

    fn role_names(&self) -> Vec<Ident> {
        self.roles.all().into_iter().cloned().collect()
    }

    fn login(&self, role: &Ident, password: &Password) -> ConnectParams {
        superuser()
            .with_dbname(self.database.as_str())
            .with_login(role.as_str(), password.clone())
    }

    async fn app(&self) -> Client {
        connect(&self.login(&self.roles.app, &self.app_pw))
            .await
            .expect("app login")
    }

    async fn relay(&self) -> Client {
        connect(&self.login(&self.roles.relay, &self.relay_pw))
            .await
            .expect("relay login")
    }

    async fn cleanup(&self) {
        deprovision(
            &superuser(),
            &self.owner,
            &self.database,
            &self.role_names(),
        )
        .await
        .expect("deprovision");
    }

    /// The relay's claim through the outbox owner's function.
    const CLAIM: &'static str = "SELECT id, seq FROM servicedb.outbox_claim(100)";
}

/// No password to reset any more (the controller's steady state).
fn steady(plan: &mut DatabasePlan) {
    for role in [
        Some(&mut plan.app),
        plan.relay.as_mut(),
        plan.cdc.as_mut().map(|c| &mut c.role),
    ]
    .into_iter()
    .flatten()
    {
        if let Some(p) = &mut role.password {
            p.reset = false;
        }
    }
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

async fn superuser_in(db: &Ident) -> Client {
    connect(&superuser().with_dbname(db.as_str()))
        .await
        .expect("superuser login")
}

#[tokio::test]
async fn each_role_gets_exactly_its_privileges_and_nothing_else() {
    let svc = Service::new("privs");
    let report = provision(&superuser(), &svc.plan())
        .await
        .expect("provision");
    assert!(report.changed());
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);

    // The app owns its database: it creates tables and writes the outbox with Debezium's five
    // columns only (ours are defaulted).
    let app = svc.app().await;
    app.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, total int);
         INSERT INTO orders VALUES (1, 10);
         INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload)
           VALUES (gen_random_uuid(), 'order', '1', 'created', '{}'),
                  (gen_random_uuid(), 'order', '2', 'created', '{}');",
    )
    .await
    .expect("app creates a table and writes the outbox");
    let owner: String = app
        .query_one("SELECT tableowner::text FROM pg_tables WHERE schemaname = 'public' AND tablename = 'outbox'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        owner,
        svc.roles.outbox.as_str(),
        "the outbox belongs to the outbox role, neither to the app nor to the relay"
    );

    // The relay claims outbox rows through the outbox owner's function, and can do nothing else.
    let relay = svc.relay().await;
    let rows = relay
        .query("SELECT id, seq FROM servicedb.outbox_claim(1)", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let lag: i64 = relay
        .query_one("SELECT lag_rows FROM servicedb.outbox_lag()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(lag, 1);
    for denied in [
        "SELECT * FROM orders",
        "SELECT id FROM outbox",
        "DELETE FROM outbox",
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type) VALUES (gen_random_uuid(), 'a', 'b', 'c')",
        "UPDATE outbox SET payload = '{}'",
        "TRUNCATE outbox",
        "CREATE TABLE relay_owned (id int)",
        "CREATE FUNCTION servicedb.x() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "SELECT servicedb.outbox_guard()",
    ] {
        let err = relay.batch_execute(denied).await.expect_err(denied);
        assert_eq!(sqlstate(&err), Some("42501"), "{denied}: {err:?}");
    }

    // Nobody else gets in: a fresh role with LOGIN but no grant cannot even connect.
    let stranger = ident(&format!("t_stranger_{}", suffix()));
    let stranger_pw = Password::generate();
    let su = connect(&superuser()).await.unwrap();
    su.batch_execute(&format!(
        "CREATE ROLE {} LOGIN PASSWORD '{}'",
        stranger.quoted(),
        stranger_pw.scram_verifier().as_str()
    ))
    .await
    .unwrap();
    let refused = connect(&svc.login(&stranger, &stranger_pw))
        .await
        .expect_err("stranger connects");
    assert_eq!(refused.sqlstate(), Some("42501"), "{refused}");
    assert_eq!(refused.category(), "ConnectRejected");
    su.batch_execute(&format!("DROP ROLE {}", stranger.quoted()))
        .await
        .unwrap();

    // What status reads back agrees.
    let seen = inspect(
        &superuser(),
        &svc.database,
        &svc.role_names()[..2],
        svc.plan().outbox.as_ref(),
    )
    .await
    .unwrap();
    assert_eq!(seen.database_owner.as_deref(), Some(svc.roles.app.as_str()));
    assert!(seen.roles_exist());
    assert!(seen.outbox.as_ref().unwrap().ready(), "{:?}", seen.outbox);

    svc.cleanup().await;
}

#[tokio::test]
async fn an_app_role_cannot_connect_to_another_services_database() {
    let (a, b) = (Service::new("iso_a"), Service::new("iso_b"));
    provision(&superuser(), &a.plan()).await.unwrap();
    provision(&superuser(), &b.plan()).await.unwrap();
    let err = connect(
        &a.login(&a.roles.app, &a.app_pw)
            .with_dbname(b.database.as_str()),
    )
    .await
    .expect_err("a's app role connects to b's database");
    assert_eq!(err.sqlstate(), Some("42501"), "{err}");
    let err = connect(
        &b.login(&b.roles.relay, &b.relay_pw)
            .with_dbname(a.database.as_str()),
    )
    .await
    .expect_err("b's relay role connects to a's database");
    assert_eq!(err.sqlstate(), Some("42501"), "{err}");
    a.cleanup().await;
    b.cleanup().await;
}

#[tokio::test]
async fn provisioning_twice_changes_nothing() {
    let svc = Service::new("twice");
    let mut plan = svc.plan();
    plan.outbox = Some(QualifiedName::parse("events.outbox").unwrap());
    plan.relay.as_mut().unwrap().replication = true;
    plan.outbox_publication = true;
    plan.extensions = vec![ident("pgcrypto")];
    plan.cdc = Some(CdcPlan {
        role: svc.cdc_role(true),
        tables: vec![QualifiedName::parse("events.outbox").unwrap()],
    });
    let first = provision(&superuser(), &plan)
        .await
        .expect("first provision");
    assert!(first.changed());

    // The controller's steady state: no passwords to set.
    steady(&mut plan);
    let second = provision(&superuser(), &plan)
        .await
        .expect("second provision");
    assert_eq!(
        second.changes,
        Vec::<String>::new(),
        "second run changed things"
    );
    assert!(
        second.warnings.is_empty() && second.missing_cdc_tables.is_empty(),
        "{second:?}"
    );

    // The publications exist with the right tables, and the relay may lock rows.
    let su = superuser_in(&svc.database).await;
    let pubs: Vec<(String, String)> = su
        .query("SELECT pubname::text, schemaname || '.' || tablename FROM pg_publication_tables ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let outbox = QualifiedName::parse("events.outbox").unwrap();
    let mut expected = vec![
        (
            cdc_publication(&svc.database).to_string(),
            "events.outbox".to_owned(),
        ),
        (
            outbox_publication(&outbox).to_string(),
            "events.outbox".to_owned(),
        ),
    ];
    expected.sort();
    assert_eq!(pubs, expected);
    svc.relay()
        .await
        .batch_execute(Service::CLAIM)
        .await
        .unwrap();

    // Drift is repaired: REPLICATION goes when no longer asked for, and privileges granted by
    // hand beyond the plan are revoked.
    su.batch_execute(&format!(
        "GRANT INSERT, TRUNCATE ON events.outbox TO {}",
        svc.roles.relay.quoted()
    ))
    .await
    .unwrap();
    plan.relay.as_mut().unwrap().replication = false;
    plan.outbox_publication = false;
    let third = provision(&superuser(), &plan).await.unwrap();
    let relay = svc.roles.relay.as_str();
    assert_eq!(
        third.changes,
        vec![
            format!("altered role {relay}: NOREPLICATION"),
            format!("revoked INSERT, TRUNCATE on events.outbox from {relay}"),
            format!("dropped publication {}", outbox_publication(&outbox)),
        ]
    );
    assert!(
        provision(&superuser(), &plan)
            .await
            .unwrap()
            .changes
            .is_empty()
    );
    svc.cleanup().await;
}

#[tokio::test]
async fn the_outbox_trigger_notifies_its_channel_after_an_insert() {
    let svc = Service::new("notify");
    provision(&superuser(), &svc.plan()).await.unwrap();
    let outbox = svc.plan().outbox.unwrap();

    // A raw connection whose messages we poll, to see the NOTIFY arrive.
    let s = server();
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&s.host)
        .port(s.port)
        .user(svc.roles.relay.as_str())
        .password(svc.relay_pw.expose());
    cfg.dbname(svc.database.as_str());
    let (listener, mut conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(msg)) = futures::StreamExt::next(&mut stream).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = msg {
                let _ = tx.send(n.channel().to_owned());
            }
        }
    });
    listener
        .batch_execute(&format!(
            "LISTEN {}",
            outbox_notify_channel(&outbox).quoted()
        ))
        .await
        .unwrap();
    svc.app()
        .await
        .batch_execute("INSERT INTO outbox (id, aggregatetype, aggregateid, type) VALUES (gen_random_uuid(), 'a', '1', 't')")
        .await
        .unwrap();
    let channel = tokio::time::timeout(TIMEOUT, rx.recv())
        .await
        .expect("no NOTIFY within the timeout");
    assert_eq!(channel.as_deref(), Some("outbox_outbox"));
    drop(listener);
    svc.cleanup().await;
}

#[tokio::test]
async fn a_password_set_from_a_verifier_logs_in_and_only_the_verifier_is_stored() {
    let svc = Service::new("pw");
    provision(&superuser(), &svc.plan()).await.unwrap();
    let su = connect(&superuser()).await.unwrap();

    let rolpassword: String = su
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&svc.roles.app.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        rolpassword.starts_with("SCRAM-SHA-256$4096:"),
        "{rolpassword}"
    );
    assert!(!rolpassword.contains(svc.app_pw.expose()));
    svc.app().await; // the generated password works

    // The Secret was lost: a new password, the old one stops working.
    let new_pw = Password::generate();
    set_role_password(
        &superuser(),
        &svc.owner,
        &svc.roles.app,
        &persisted(&new_pw),
    )
    .await
    .unwrap();
    let old = connect(&svc.login(&svc.roles.app, &svc.app_pw))
        .await
        .expect_err("old password still works");
    assert_eq!(old.sqlstate(), Some("28P01"), "{old}");
    connect(&svc.login(&svc.roles.app, &new_pw))
        .await
        .expect("new password works");
    let after: String = su
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&svc.roles.app.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    assert!(after.starts_with("SCRAM-SHA-256$4096:") && after != rolpassword);
    assert!(!after.contains(new_pw.expose()));

    // Statements the server saw (and would log with log_statement=all) hold no plaintext:
    // when the test runs against a server whose log file we can read, check it.
    if let Ok(log) = std::env::var("SERVICEDB_TEST_PG_LOG") {
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains(&svc.roles.app.to_string()),
            "the log at {log} is not this server's"
        );
        for pw in [&svc.app_pw, &svc.relay_pw, &new_pw] {
            assert!(
                !text.contains(pw.expose()),
                "plaintext password in the server log"
            );
        }
    }

    let missing = set_role_password(
        &superuser(),
        &svc.owner,
        &ident("t_no_such_role_x"),
        &persisted(&new_pw),
    )
    .await
    .unwrap_err();
    assert_eq!(missing.category(), "RoleMissing");
    svc.cleanup().await;
}

#[tokio::test]
async fn deprovision_drops_slots_database_and_roles_and_can_run_again() {
    let svc = Service::new("deprov");
    let mut plan = svc.plan();
    plan.relay.as_mut().unwrap().replication = true;
    plan.outbox_publication = true;
    provision(&superuser(), &plan).await.unwrap();
    let slot = format!("t_slot_{}", suffix());
    superuser_in(&svc.database)
        .await
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .unwrap();
    let sessions = svc.app().await; // an open session does not block the drop

    let report = deprovision(&superuser(), &svc.owner, &svc.database, &svc.role_names())
        .await
        .expect("deprovision");
    assert_eq!(
        report.changes,
        vec![
            format!("dropped replication slot {slot}"),
            format!("dropped database {}", svc.database),
            format!("dropped role {}", svc.roles.app),
            format!("dropped role {}", svc.roles.relay),
            format!("dropped role {}", svc.roles.outbox),
        ]
    );
    assert!(report.skipped.is_empty(), "{report:?}");
    let su = connect(&superuser()).await.unwrap();
    let left: i64 = su
        .query_one(
            "SELECT (SELECT count(*) FROM pg_database WHERE datname = $1) \
                  + (SELECT count(*) FROM pg_roles WHERE rolname = ANY($2)) \
                  + (SELECT count(*) FROM pg_replication_slots WHERE slot_name = $3)",
            &[
                &svc.database.as_str(),
                &svc.role_names()
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>(),
                &slot,
            ],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    assert!(sessions.is_closed() || sessions.simple_query("SELECT 1").await.is_err());
    let again = deprovision(&superuser(), &svc.owner, &svc.database, &svc.role_names())
        .await
        .unwrap();
    assert!(again.changes.is_empty());
}

#[tokio::test]
async fn drop_slot_terminates_an_active_walsender_and_is_idempotent() {
    let svc = Service::new("slot");
    provision(&superuser(), &svc.plan()).await.unwrap();
    let slot = format!("t_slot_{}", suffix());
    superuser_in(&svc.database)
        .await
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
            &[&slot],
        )
        .await
        .unwrap();
    // A real walsender streaming from the slot.
    let s = server();
    let mut recv = tokio::process::Command::new("/usr/lib/postgresql/15/bin/pg_recvlogical")
        .args([
            "-h",
            &s.host,
            "-p",
            &s.port.to_string(),
            "-U",
            &s.user,
            "-d",
            svc.database.as_str(),
        ])
        .args(["-S", &slot, "--start", "-f", "/dev/null", "--no-loop"])
        .env("PGPASSWORD", &s.password)
        .kill_on_drop(true)
        .spawn()
        .expect("pg_recvlogical");
    let su = connect(&superuser()).await.unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let active: bool = su
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        if active {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot never became active"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert!(
        drop_slot(&superuser(), &slot)
            .await
            .expect("drop active slot")
    );
    assert!(
        !drop_slot(&superuser(), &slot)
            .await
            .expect("drop missing slot")
    );
    let status = tokio::time::timeout(TIMEOUT, recv.wait())
        .await
        .expect("pg_recvlogical did not exit")
        .unwrap();
    assert!(!status.success(), "the walsender was terminated");
    svc.cleanup().await;
}

#[tokio::test]
async fn cdc_role_reads_only_its_tables_and_missing_tables_are_reported_then_picked_up() {
    let svc = Service::new("cdc");
    let mut plan = svc.plan();
    let orders = QualifiedName::parse("public.orders").unwrap();
    let absent = QualifiedName::parse("public.absent").unwrap();
    plan.cdc = Some(CdcPlan {
        role: svc.cdc_role(true),
        tables: vec![orders.clone(), absent.clone()],
    });
    let first = provision(&superuser(), &plan).await.unwrap();
    assert_eq!(
        first.missing_cdc_tables,
        vec![orders.clone(), absent.clone()]
    );

    svc.app()
        .await
        .batch_execute("CREATE TABLE orders (id int PRIMARY KEY); INSERT INTO orders VALUES (7)")
        .await
        .unwrap();
    let second = provision(&superuser(), &plan).await.unwrap();
    assert_eq!(second.missing_cdc_tables, vec![absent]);
    let pub_name = cdc_publication(&svc.database);
    assert!(
        second
            .changes
            .contains(&format!("added 1 table(s) to publication {pub_name}")),
        "{second:?}"
    );

    let cdc = connect(&svc.login(&svc.roles.cdc, &svc.cdc_pw))
        .await
        .expect("cdc login");
    let n: i64 = cdc
        .query_one("SELECT count(*) FROM orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let err = cdc
        .batch_execute("SELECT * FROM outbox")
        .await
        .expect_err("cdc reads the outbox");
    assert_eq!(sqlstate(&err), Some("42501"));
    let err = cdc
        .batch_execute("DELETE FROM orders")
        .await
        .expect_err("cdc deletes");
    assert_eq!(sqlstate(&err), Some("42501"));
    svc.cleanup().await;
}

#[tokio::test]
async fn a_createdb_createrole_admin_that_is_not_superuser_can_do_all_of_it() {
    let admin_role = ident(&format!("t_admin_{}", suffix()));
    let admin_pw = Password::generate();
    let su = connect(&superuser()).await.unwrap();
    su.batch_execute(&format!(
        "CREATE ROLE {} LOGIN CREATEDB CREATEROLE NOSUPERUSER PASSWORD '{}'",
        admin_role.quoted(),
        admin_pw.scram_verifier().as_str()
    ))
    .await
    .unwrap();
    let admin = superuser().with_login(admin_role.as_str(), admin_pw.clone());

    let svc = Service::new("nonsu");
    let mut plan = svc.plan();
    plan.outbox = Some(QualifiedName::parse("events.outbox").unwrap());
    plan.extensions = vec![ident("pgcrypto")]; // trusted: the database owner may create it
    plan.cdc = Some(CdcPlan {
        role: svc.cdc_role(false),
        tables: vec![QualifiedName::parse("events.outbox").unwrap()],
    });
    let report = provision(&admin, &plan)
        .await
        .expect("non-superuser provision");
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    steady(&mut plan);
    assert_eq!(
        provision(&admin, &plan).await.unwrap().changes,
        Vec::<String>::new()
    );

    // Same privileges as with a superuser admin, and nothing owned by the admin: the app owns
    // its tables and schema, the outbox role the outbox (with its index and sequence).
    let app = svc.app().await;
    app.batch_execute(
        "CREATE TABLE t (id int);
         INSERT INTO events.outbox (id, aggregatetype, aggregateid, type) VALUES (gen_random_uuid(), 'a', '1', 't')",
    )
    .await
    .unwrap();
    let owners: Vec<String> = app
        .query(
            "SELECT DISTINCT pg_get_userbyid(relowner)::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname IN ('public', 'events') \
             UNION SELECT pg_get_userbyid(nspowner)::text FROM pg_namespace WHERE nspname = 'events' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        owners,
        vec![svc.roles.app.to_string(), svc.roles.outbox.to_string()]
    );
    let relay = svc.relay().await;
    relay
        .batch_execute(Service::CLAIM)
        .await
        .expect("relay claims");
    assert_eq!(
        sqlstate(&relay.batch_execute("SELECT * FROM t").await.unwrap_err()),
        Some("42501")
    );

    let new_pw = Password::generate();
    set_role_password(&admin, &svc.owner, &svc.roles.relay, &persisted(&new_pw))
        .await
        .expect("non-superuser sets a password");
    connect(&svc.login(&svc.roles.relay, &new_pw))
        .await
        .expect("relay logs in with the new password");

    // REPLICATION: Postgres 15 reserves it to superusers (16+ to roles that have it); either it
    // works or the error says which step and why.
    let mut logical = plan.clone();
    logical.relay.as_mut().unwrap().replication = true;
    let version: i32 = su
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    match provision(&admin, &logical).await {
        Ok(_) => assert!(
            version >= 160_000,
            "Postgres {version} let a non-superuser grant REPLICATION"
        ),
        Err(e) => {
            assert_eq!(e.category(), "AlterRoleFailed", "{e}");
            assert_eq!(e.sqlstate(), Some("42501"), "{e}");
            assert!(e.to_string().contains("replication"), "{e}");
        }
    }

    let gone = deprovision(&admin, &svc.owner, &svc.database, &svc.role_names())
        .await
        .expect("non-superuser deprovision");
    assert!(
        gone.changes
            .contains(&format!("dropped database {}", svc.database)),
        "{gone:?}"
    );
    su.batch_execute(&format!("DROP ROLE {}", admin_role.quoted()))
        .await
        .unwrap();
}

#[tokio::test]
async fn hostile_identifiers_are_rejected_or_harmlessly_quoted() {
    let hostile = "x\"; drop table y; --";
    assert!(Ident::new(hostile).is_err());
    assert!(QualifiedName::parse(hostile).is_err());
    assert!(QualifiedName::parse(&format!("public.{hostile}")).is_err());
    assert!(RoleNames::for_service("orders\"; DROP ROLE postgres; --").is_err());
    // There is no way to build a plan from such a name: `Ident` has no unchecked constructor.

    // And quoting alone neutralises it: the statement creates one oddly named table, and
    // the table the "injection" names survives.
    let svc = Service::new("inject");
    provision(&superuser(), &svc.plan()).await.unwrap();
    let app = svc.app().await;
    app.batch_execute("CREATE TABLE y (id int)").await.unwrap();
    app.batch_execute(&format!("CREATE TABLE {} (id int)", quote_ident(hostile)))
        .await
        .unwrap();
    let tables: Vec<String> = app
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        tables,
        vec!["outbox".to_owned(), hostile.to_owned(), "y".to_owned()]
    );
    svc.cleanup().await;
}

#[tokio::test]
async fn connection_failures_are_told_apart() {
    let wrong = superuser().with_login("postgres", Password::from_plaintext("wrong"));
    let e = connect(&wrong).await.expect_err("wrong password accepted");
    assert_eq!(
        (e.category(), e.sqlstate()),
        ("ConnectRejected", Some("28P01")),
        "{e}"
    );

    // A port nobody listens on.
    let port = support::free_port().unwrap();
    let mut p = superuser();
    p.host = "127.0.0.1".to_owned();
    p.port = port;
    let e = connect(&p).await.expect_err("closed port");
    assert_eq!(e.category(), "ServerUnreachable", "{e}");

    // A server that accepts TCP and then says nothing: bounded by the connect timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    p.port = silent.local_addr().unwrap().port();
    p.ssl_mode = SslMode::Disable;
    p.connect_timeout = Duration::from_millis(500);
    let e = tokio::time::timeout(TIMEOUT, connect(&p))
        .await
        .expect("connect hung")
        .expect_err("silent");
    assert_eq!(e.category(), "ConnectTimeout", "{e}");
}

/// A variable of the test environment: the process environment, else the environment's env file.
fn testenv_var(key: &str) -> Option<String> {
    std::env::var(key)
        .ok()
        .or_else(|| support::testenv_vars_if_up()?.remove(key))
}

#[tokio::test]
async fn sslmodes_encrypt_and_verify_as_libpq_does() {
    // The shared server when it serves TLS with the environment's private CA
    // (hack/testenv.sh), else a throwaway TLS server with a CA of its own: never skipped.
    let su = connect(&superuser()).await.unwrap();
    let ssl: String = su.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    let env_ca = testenv_var("SERVICEDB_TEST_PG_CA_FILE").and_then(|f| std::fs::read(f).ok());
    let mut _throwaway = None;
    let (base, ca) = match env_ca {
        Some(ca) if ssl == "on" => (superuser(), ca),
        _ => {
            let (ca, cert) = support::tls::ca_and_server_cert(&["127.0.0.1"]).unwrap();
            let mut spec = support::tls::ServerSpec::tls(cert);
            spec.hba = "host all all 127.0.0.1/32 scram-sha-256\n".into();
            let pg = support::tls::TlsServer::start(spec).unwrap();
            let mut p = ConnectParams::new(
                "127.0.0.1",
                pg.port,
                "postgres",
                Password::from_plaintext(support::tls::PASSWORD),
                "postgres",
            );
            p.connect_timeout = TIMEOUT;
            _throwaway = Some(pg);
            (p, ca.cert_pem.into_bytes())
        }
    };
    let encrypted = |c: Client| async move {
        c.query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get::<_, bool>(0)
    };
    for (mode, tls) in [
        (SslMode::Disable, false),
        (SslMode::Prefer, true),
        (SslMode::Require, true),
    ] {
        let mut p = base.clone();
        p.ssl_mode = mode;
        assert_eq!(encrypted(connect(&p).await.unwrap()).await, tls, "{mode:?}");
    }
    // verify-*: against the server's CA, and refused with the public roots (no CA given).
    for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
        let mut p = base.clone();
        p.ssl_mode = mode;
        p.ca_pem = Some(ca.clone());
        assert!(
            encrypted(connect(&p).await.expect("verified connection")).await,
            "{mode:?}"
        );
        p.ca_pem = None; // public roots: must not trust a private CA
        let e = connect(&p).await.expect_err("unverified server accepted");
        assert_eq!(e.category(), "ServerUnreachable", "{e}");
    }
}

#[tokio::test]
async fn provisioning_behind_an_application_lock_fails_after_the_lock_timeout_instead_of_hanging() {
    let svc = Service::new("locked");
    provision(&superuser(), &svc.plan()).await.unwrap();
    // Remove the trigger so the next run must take a lock on the outbox, then hold that lock.
    superuser_in(&svc.database)
        .await
        .batch_execute("DROP TRIGGER outbox_notify ON outbox")
        .await
        .unwrap();
    let app = svc.app().await;
    app.batch_execute("BEGIN; LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    let mut admin = superuser();
    admin.lock_timeout = Some(Duration::from_millis(500));
    let err = tokio::time::timeout(TIMEOUT, provision(&admin, &svc.steady_plan()))
        .await
        .expect("provision hung behind the lock")
        .expect_err("provision succeeded despite the lock");
    assert_eq!(
        (err.category(), err.sqlstate()),
        ("CreateOutboxFailed", Some("55P03")),
        "{err}"
    );

    app.batch_execute("ROLLBACK").await.unwrap();
    let report = provision(&admin, &svc.steady_plan()).await.unwrap();
    assert_eq!(
        report.changes,
        vec!["created NOTIFY trigger outbox_notify on public.outbox".to_owned()]
    );
    svc.cleanup().await;
}

/// Everything about a database and roles that a takeover would change: owner, ACL, marks and
/// stored password verifiers.
async fn snapshot(db: &Ident, roles: &[Ident]) -> Vec<Option<String>> {
    let su = connect(&superuser()).await.unwrap();
    let mut out: Vec<Option<String>> = su
        .query_opt(
            "SELECT pg_get_userbyid(datdba)::text, datacl::text, shobj_description(oid, 'pg_database') \
             FROM pg_database WHERE datname = $1",
            &[&db.as_str()],
        )
        .await
        .unwrap()
        .map(|r| vec![r.get(0), r.get(1), r.get(2)])
        .unwrap_or_default();
    for role in roles {
        let row = su
            .query_opt(
                "SELECT rolpassword, rolcanlogin::text || rolreplication::text || rolinherit::text, \
                 shobj_description(oid, 'pg_authid'), \
                 (SELECT string_agg(m.member::regrole::text, ',') FROM pg_auth_members m WHERE m.roleid = a.oid) \
                 FROM pg_authid a WHERE rolname = $1",
                &[&role.as_str()],
            )
            .await
            .unwrap();
        match row {
            Some(r) => out.extend([r.get(0), r.get(1), r.get(2), r.get(3)]),
            None => out.push(None),
        }
    }
    out
}

async fn comment_of_role(role: &Ident) -> Option<String> {
    connect(&superuser())
        .await
        .unwrap()
        .query_one(
            "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = $1",
            &[&role.as_str()],
        )
        .await
        .unwrap()
        .get(0)
}

async fn comment_of_database(db: &Ident) -> Option<String> {
    connect(&superuser())
        .await
        .unwrap()
        .query_one(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
            &[&db.as_str()],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn another_servicedatabases_objects_are_a_name_conflict_and_stay_untouched() {
    let first = Service::new("mine");
    provision(&superuser(), &first.plan()).await.unwrap();
    let mark = first.owner.format();
    assert_eq!(
        comment_of_database(&first.database).await.as_deref(),
        Some(mark.as_str())
    );
    for role in [&first.roles.app, &first.roles.relay, &first.roles.outbox] {
        assert_eq!(
            comment_of_role(role).await.as_deref(),
            Some(mark.as_str()),
            "{role}"
        );
    }
    let before = snapshot(&first.database, &first.role_names()).await;

    // The same service name in another namespace: same derived names, another owner, new
    // passwords, and even adopt=true.
    let mut second = Service::new("mine");
    second.roles = first.roles.clone();
    second.database = first.database.clone();
    second.owner = OwnerMark::new("t-other-ns", first.owner.name.clone(), "u-2").unwrap();
    let mut plan = second.plan();
    plan.adopt = true;
    let err = provision(&superuser(), &plan).await.expect_err("took over");
    assert_eq!(err.category(), "NameConflict", "{err}");
    match &err {
        ProvisionError::NameConflict { kind, name, holder } => {
            assert_eq!(*kind, ObjectKind::Role);
            assert_eq!(name, first.roles.app.as_str());
            assert_eq!(
                holder.as_ref(),
                Some(&("t-ns".to_owned(), first.owner.name.clone()))
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string()
            .contains(&format!("t-ns/{}", first.owner.name)),
        "{err}"
    );
    assert_eq!(
        snapshot(&first.database, &first.role_names()).await,
        before,
        "something changed"
    );
    first.app().await; // the first's password still works
    assert!(
        connect(&second.login(&first.roles.app, &second.app_pw))
            .await
            .is_err()
    );

    // A conflict on the database alone (its roles are free) changes no role either.
    let third = Service::new("dbonly");
    let mut plan = third.plan();
    plan.database = first.database.clone();
    let err = provision(&superuser(), &plan)
        .await
        .expect_err("took the database");
    assert!(
        matches!(
            &err,
            ProvisionError::NameConflict {
                kind: ObjectKind::Database,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        snapshot(&third.database, &third.role_names())
            .await
            .iter()
            .all(Option::is_none),
        "roles were created before the database conflict was found"
    );

    // Deleting the second leaves the first's objects.
    let report = deprovision(
        &superuser(),
        &second.owner,
        &first.database,
        &first.role_names(),
    )
    .await
    .unwrap();
    assert!(report.changes.is_empty(), "{report:?}");
    assert_eq!(report.skipped.len(), 4, "{report:?}");
    assert_eq!(snapshot(&first.database, &first.role_names()).await, before);
    first.cleanup().await;
}

#[tokio::test]
async fn unmarked_objects_are_adopted_only_when_asked_and_a_recreated_owner_readopts_its_own() {
    let svc = Service::new("hand");
    let su = connect(&superuser()).await.unwrap();
    let dba_pw = Password::generate();
    su.batch_execute(&format!(
        "CREATE ROLE {} LOGIN PASSWORD '{}'",
        svc.roles.app.quoted(),
        dba_pw.scram_verifier().as_str(),
    ))
    .await
    .unwrap();
    su.batch_execute(&format!(
        "CREATE DATABASE {} OWNER {}",
        svc.database.quoted(),
        svc.roles.app.quoted()
    ))
    .await
    .unwrap();
    su.batch_execute(&format!(
        "GRANT CONNECT ON DATABASE {} TO PUBLIC",
        svc.database.quoted()
    ))
    .await
    .unwrap();
    let before = snapshot(&svc.database, &svc.role_names()).await;

    let err = provision(&superuser(), &svc.plan())
        .await
        .expect_err("adopted");
    match &err {
        ProvisionError::NameConflict { holder, .. } => assert!(holder.is_none()),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("database.adopt: true"), "{err}");
    assert_eq!(snapshot(&svc.database, &svc.role_names()).await, before);
    connect(&svc.login(&svc.roles.app, &dba_pw))
        .await
        .expect("the DBA's password changed");
    // Delete never drops unmarked objects.
    let report = deprovision(&superuser(), &svc.owner, &svc.database, &svc.role_names())
        .await
        .unwrap();
    assert!(
        report.changes.is_empty() && report.skipped.len() == 2,
        "{report:?}"
    );
    assert_eq!(snapshot(&svc.database, &svc.role_names()).await, before);

    // With the opt-in: marked, owned, PUBLIC locked out, password from the plan.
    let mut plan = svc.plan();
    plan.adopt = true;
    let report = provision(&superuser(), &plan).await.expect("adopt");
    assert!(
        report.changes.contains(&format!(
            "marked role {} as {}",
            svc.roles.app,
            svc.owner.key()
        )),
        "{report:?}"
    );
    assert_eq!(
        comment_of_database(&svc.database).await,
        Some(svc.owner.format())
    );
    svc.app().await;
    let public_connect: bool = su
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_database d, aclexplode(d.datacl) a \
             WHERE d.datname = $1 AND a.grantee = 0 AND a.privilege_type = 'CONNECT')",
            &[&svc.database.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!public_connect);

    // The ServiceDatabase is deleted with Retain and created again: same namespace and name,
    // new uid. It re-adopts its own objects without the opt-in and rewrites the uid.
    let mut again = svc.steady_plan();
    again.owner = OwnerMark::new("t-ns", svc.owner.name.clone(), "new-uid").unwrap();
    let report = provision(&superuser(), &again).await.expect("re-adopt");
    assert!(
        report
            .changes
            .iter()
            .any(|c| c.starts_with("marked database")),
        "{report:?}"
    );
    assert_eq!(
        comment_of_role(&svc.roles.app).await,
        Some(again.owner.format())
    );
    assert!(
        provision(&superuser(), &again)
            .await
            .unwrap()
            .changes
            .is_empty()
    );
    deprovision(&superuser(), &again.owner, &svc.database, &svc.role_names())
        .await
        .unwrap();
}

#[tokio::test]
async fn new_databases_are_created_from_template0_and_carry_no_template1_objects() {
    // template1 of the shared server is not ours to touch: check what the database was made
    // from through what only template0 guarantees (no objects outside the catalogs and no
    // extensions beyond plpgsql), and the statement itself in the unit tests.
    let svc = Service::new("tmpl");
    provision(&superuser(), &svc.plan()).await.unwrap();
    let su = superuser_in(&svc.database).await;
    let extensions: Vec<String> = su
        .query("SELECT extname::text FROM pg_extension ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(extensions, vec!["plpgsql".to_owned()]);
    svc.cleanup().await;
}

#[tokio::test]
async fn a_role_dropped_by_hand_comes_back_with_the_password_from_its_secret() {
    let svc = Service::new("drift");
    provision(&superuser(), &svc.plan()).await.unwrap();
    superuser_in(&svc.database)
        .await
        .batch_execute(&format!("DROP OWNED BY {}", svc.roles.relay.quoted()))
        .await
        .unwrap();
    connect(&superuser())
        .await
        .unwrap()
        .batch_execute(&format!("DROP ROLE {}", svc.roles.relay.quoted()))
        .await
        .unwrap();
    // Steady state: nothing to reset, yet the re-created role gets the stored password.
    let report = provision(&superuser(), &svc.steady_plan()).await.unwrap();
    assert!(
        report
            .changes
            .contains(&format!("created role {}", svc.roles.relay)),
        "{report:?}"
    );
    svc.relay()
        .await
        .batch_execute(Service::CLAIM)
        .await
        .expect("the re-created relay role logs in and claims");
    svc.cleanup().await;
}

#[tokio::test]
async fn a_retired_cdc_role_is_dropped_and_cannot_log_in() {
    let svc = Service::new("retire");
    let mut plan = svc.plan();
    plan.cdc = Some(CdcPlan {
        role: svc.cdc_role(true),
        tables: vec![QualifiedName::parse("outbox").unwrap()],
    });
    provision(&superuser(), &plan).await.unwrap();
    connect(&svc.login(&svc.roles.cdc, &svc.cdc_pw))
        .await
        .expect("cdc login");

    let mut plan = svc.steady_plan();
    plan.retired_roles = vec![svc.roles.cdc.clone()];
    let report = provision(&superuser(), &plan).await.unwrap();
    assert!(
        report
            .changes
            .contains(&format!("dropped retired role {}", svc.roles.cdc)),
        "{report:?}"
    );
    let err = connect(&svc.login(&svc.roles.cdc, &svc.cdc_pw))
        .await
        .expect_err("the retired cdc role logs in");
    assert_eq!(err.sqlstate(), Some("28P01"), "{err}");
    assert!(
        provision(&superuser(), &plan)
            .await
            .unwrap()
            .changes
            .is_empty()
    );

    // A foreign role with the retired name is left alone.
    let other = Service::new("retire-other");
    let su = connect(&superuser()).await.unwrap();
    su.batch_execute(&format!("CREATE ROLE {} LOGIN", other.roles.cdc.quoted()))
        .await
        .unwrap();
    let mut plan = other.steady_plan();
    plan.retired_roles = vec![other.roles.cdc.clone()];
    let report = provision(&superuser(), &plan).await.unwrap();
    assert!(
        report.warnings.iter().any(|w| w.contains("not marked")),
        "{report:?}"
    );
    su.batch_execute(&format!("DROP ROLE {}", other.roles.cdc.quoted()))
        .await
        .unwrap();
    other.cleanup().await;
    svc.cleanup().await;
}

#[tokio::test]
async fn the_app_cannot_make_the_relay_run_code_of_its_choosing() {
    let svc = Service::new("spy");
    provision(&superuser(), &svc.plan()).await.unwrap();
    let app = svc.app().await;
    app.batch_execute(
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type) VALUES (gen_random_uuid(), 'a', '1', 't')",
    )
    .await
    .unwrap();
    app.batch_execute(
        "CREATE TABLE spy (who text, replication bool);
         GRANT INSERT ON spy TO PUBLIC;
         CREATE FUNCTION record() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO public.spy SELECT current_user, rolreplication FROM pg_roles WHERE rolname = current_user;
           RETURN OLD; END $$;",
    )
    .await
    .unwrap();
    // The app owns neither the outbox nor the relay's functions.
    for denied in [
        "CREATE TRIGGER t BEFORE DELETE ON outbox FOR EACH ROW EXECUTE FUNCTION record()",
        "CREATE RULE r AS ON DELETE TO outbox DO ALSO INSERT INTO spy VALUES ('rule', false)",
        "ALTER TABLE outbox ENABLE ROW LEVEL SECURITY",
        "ALTER FUNCTION servicedb.outbox_claim(bigint) SECURITY INVOKER",
        "CREATE OR REPLACE FUNCTION servicedb.outbox_guard() RETURNS void LANGUAGE sql AS ''",
        "CREATE TABLE servicedb.outbox (id int)",
        "SELECT * FROM servicedb.outbox_claim(1)",
    ] {
        let err = app.batch_execute(denied).await.expect_err(denied);
        assert_eq!(sqlstate(&err), Some("42501"), "{denied}: {err:?}");
    }
    let relay = svc.relay().await;
    assert_eq!(relay.query(Service::CLAIM, &[]).await.unwrap().len(), 1);

    // The app owns schema public: it drops the outbox and puts a view with an INSTEAD OF
    // trigger in its place. The relay's claim refuses to touch it; the trigger never runs.
    app.batch_execute(
        "DROP TABLE outbox;
         CREATE VIEW outbox AS SELECT gen_random_uuid() AS id, 'a'::text AS aggregatetype, '1'::text AS aggregateid,
           't'::text AS type, NULL::jsonb AS payload, NULL::jsonb AS headers, now() AS created_at, 1::bigint AS seq;
         CREATE TRIGGER t INSTEAD OF DELETE ON outbox FOR EACH ROW EXECUTE FUNCTION record();
         GRANT SELECT, DELETE ON outbox TO PUBLIC;",
    )
    .await
    .unwrap();
    for call in [
        Service::CLAIM,
        "SELECT servicedb.outbox_delete(ARRAY[gen_random_uuid()])",
        "SELECT * FROM servicedb.outbox_lag()",
    ] {
        let err = relay.batch_execute(call).await.expect_err(call);
        assert_eq!(sqlstate(&err), Some("42501"), "{call}: {err:?}");
    }
    // Even a direct DELETE by the relay is not allowed... and would run as the relay: that is
    // exactly why the relay has no table privileges. Nothing ran as anyone.
    let spied: i64 = app
        .query_one("SELECT count(*) FROM spy", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(spied, 0, "the app's trigger ran during the relay's claim");

    // And provisioning puts a real outbox back (the view is the app's; a table of the same
    // name cannot coexist, so provisioning fails loudly rather than touching the app's view).
    drop(relay);
    svc.cleanup().await;
}

#[tokio::test]
async fn a_bootstrapped_instance_is_already_converged() {
    // The managed instance's first-start script, run by psql as the superuser (what the
    // postgres image's entrypoint does), leaves nothing for provisioning to change.
    let svc = Service::new("boot");
    let mut plan = svc.plan();
    plan.relay.as_mut().unwrap().replication = true;
    plan.outbox_publication = true;
    plan.extensions = vec![ident("pgcrypto")];
    plan.cdc = Some(CdcPlan {
        role: svc.cdc_role(true),
        tables: vec![],
    });
    let script = servicedb::specs::bootstrap::bootstrap_sql(&plan);
    let s = server();
    let file = std::env::temp_dir().join(format!("bootstrap-{}.sql", svc.database));
    std::fs::write(&file, &script).unwrap();
    let out = tokio::process::Command::new("/usr/lib/postgresql/15/bin/psql")
        .args([
            "-v",
            "ON_ERROR_STOP=1",
            "-X",
            "-q",
            "-h",
            &s.host,
            "-p",
            &s.port.to_string(),
        ])
        .args(["-U", &s.user, "-d", "postgres", "-f"])
        .arg(&file)
        .env("PGPASSWORD", &s.password)
        .output()
        .await
        .expect("psql");
    assert!(
        out.status.success(),
        "bootstrap failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(&file);
    steady(&mut plan);
    let report = provision(&superuser(), &plan).await.unwrap();
    assert_eq!(report.changes, Vec::<String>::new(), "{report:?}");
    assert!(report.warnings.is_empty(), "{report:?}");
    svc.relay()
        .await
        .batch_execute(Service::CLAIM)
        .await
        .unwrap();
    svc.cleanup().await;
}
