//! TLS against real Postgres 15 servers with a private CA: the operator's `connect()` and the relay's connection code verify as libpq does, require channel binding, refuse cleartext and MD5 password requests; and a server started with exactly the settings, pg_hba and certificate files a managed instance renders serves TLS that both verify (process and network I/O).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use servicedb::api::service_database::{DeletionPolicy, ManagedInstance};
use servicedb::postgres::connect::{ConnectParams, SslMode, connect};
use servicedb::postgres::passwords::Password;
use servicedb::relay::config::PgEnv;
use servicedb::specs::instance::{self, InstanceParams, TLS_FILE_MODE, TLS_MOUNT};
use servicedb::specs::tls::{generate_ca, issue_server_cert, server_names};
use tokio_postgres::Client;

use support::tls::{Mitm, PASSWORD, ServerSpec, TlsServer, ca_and_server_cert};

fn params(port: u16, mode: SslMode, ca: Option<&str>) -> ConnectParams {
    ConnectParams {
        ssl_mode: mode,
        ca_pem: ca.map(|c| c.as_bytes().to_vec()),
        connect_timeout: Duration::from_secs(20),
        ..ConnectParams::new(
            "127.0.0.1",
            port,
            "postgres",
            Password::from_plaintext(PASSWORD),
            "postgres",
        )
    }
}

/// Sessions from 127.0.0.1 that the server authorized, from its `log_connections` lines
/// (`<time> [<pid>] LOG:  connection received: host=127.0.0.1 ...`, then the same pid's
/// `connection authorized`).
fn tcp_logins(log: &str) -> usize {
    let pid = |line: &str| {
        line.split('[')
            .nth(1)
            .and_then(|r| r.split(']').next())
            .map(str::to_owned)
    };
    let tcp: std::collections::HashSet<String> = log
        .lines()
        .filter(|l| l.contains("connection received: host=127.0.0.1"))
        .filter_map(pid)
        .collect();
    log.lines()
        .filter(|l| l.contains("connection authorized"))
        .filter_map(pid)
        .filter(|p| tcp.contains(p))
        .count()
}

/// (ssl, TLS version) of the session, from the server's side.
async fn tls_of(c: &Client) -> (bool, Option<String>) {
    let row = c
        .query_one(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn verify_full_with_a_private_ca_connects_encrypted_and_plain_modes_behave_as_libpq() {
    let (ca, cert) = ca_and_server_cert(&["127.0.0.1", "localhost"]).unwrap();
    // `host` lines: plaintext is allowed by the server, so each mode shows its own choice.
    let mut spec = ServerSpec::tls(cert);
    spec.hba = "host all all 127.0.0.1/32 scram-sha-256\n".into();
    let pg = TlsServer::start(spec).unwrap();
    for (mode, ca_pem, encrypted) in [
        (SslMode::Disable, None, false),
        (SslMode::Prefer, None, true),
        (SslMode::Require, None, true),
        (SslMode::VerifyCa, Some(ca.cert_pem.as_str()), true),
        (SslMode::VerifyFull, Some(ca.cert_pem.as_str()), true),
    ] {
        let c = connect(&params(pg.port, mode, ca_pem))
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        let (ssl, version) = tls_of(&c).await;
        assert_eq!(ssl, encrypted, "{mode:?}");
        if encrypted {
            assert!(
                matches!(version.as_deref(), Some("TLSv1.2" | "TLSv1.3")),
                "{version:?}"
            );
        }
    }
    // verify-* without the CA: the public web roots must not trust a private CA.
    for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
        let e = connect(&params(pg.port, mode, None))
            .await
            .expect_err("a private CA was trusted without being given");
        assert_eq!(e.category(), "ServerUnreachable", "{e}");
    }
    // A CA that did not sign the certificate is refused.
    let other = generate_ca("other", jiff::Timestamp::now()).unwrap();
    let e = connect(&params(pg.port, SslMode::VerifyFull, Some(&other.cert_pem)))
        .await
        .expect_err("a certificate from another CA was accepted");
    assert_eq!(e.category(), "ServerUnreachable", "{e}");
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused_by_verify_full_and_accepted_by_verify_ca() {
    let (ca, cert) = ca_and_server_cert(&["db.example.internal"]).unwrap();
    let pg = TlsServer::start(ServerSpec::tls(cert)).unwrap();
    let e = connect(&params(pg.port, SslMode::VerifyFull, Some(&ca.cert_pem)))
        .await
        .expect_err("verify-full accepted a certificate for another name");
    assert_eq!(e.category(), "ServerUnreachable", "{e}");
    assert!(e.to_string().contains("not valid for name"), "{e}");

    let c = connect(&params(pg.port, SslMode::VerifyCa, Some(&ca.cert_pem)))
        .await
        .expect("verify-ca checks the chain only");
    assert!(tls_of(&c).await.0);

    // libpq's hostaddr: dial the address, verify the name the certificate carries.
    let mut by_name = params(pg.port, SslMode::VerifyFull, Some(&ca.cert_pem));
    by_name.host = "db.example.internal".into();
    by_name.hostaddr = Some("127.0.0.1".parse().unwrap());
    let c = connect(&by_name).await.expect("verify-full by name");
    assert!(tls_of(&c).await.0);
}

#[tokio::test]
async fn servers_asking_for_a_cleartext_or_md5_password_are_refused_in_every_mode() {
    let (ca, cert) = ca_and_server_cert(&["127.0.0.1"]).unwrap();
    for (method, storage, needle) in [
        ("password", "scram-sha-256", "cleartext"),
        ("md5", "md5", "MD5"),
    ] {
        let mut spec = ServerSpec::tls(cert.clone());
        // `host` matches with and without TLS.
        spec.hba = format!("host all all 127.0.0.1/32 {method}\n");
        spec.password_encryption = storage;
        let pg = TlsServer::start(spec).unwrap();
        for mode in [
            SslMode::Disable,
            SslMode::Prefer,
            SslMode::Require,
            SslMode::VerifyFull,
        ] {
            let ca_pem = mode.verifies().then_some(ca.cert_pem.as_str());
            let e = connect(&params(pg.port, mode, ca_pem))
                .await
                .expect_err("the password was offered to a server asking for it insecurely");
            assert_eq!(
                e.category(),
                "InsecureAuthentication",
                "{method} {mode:?}: {e}"
            );
            assert!(e.to_string().contains(needle), "{method} {mode:?}: {e}");
        }
        // The server never received a password: no TCP session logged in or failed a login.
        let log = pg.log();
        assert!(!log.contains("authentication failed"), "{log}");
        assert_eq!(tcp_logins(&log), 0, "{log}");
    }
}

#[tokio::test]
async fn channel_binding_is_used_and_defeats_a_man_in_the_middle_that_require_does_not_detect() {
    let (_ca, cert) = ca_and_server_cert(&["127.0.0.1"]).unwrap();
    let mut spec = ServerSpec::tls(cert);
    spec.hba =
        "hostssl all trusted 127.0.0.1/32 trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n"
            .into();
    let pg = TlsServer::start(spec).unwrap();
    pg.psql("CREATE ROLE trusted LOGIN").unwrap();

    // Directly: require succeeds, which tokio-postgres allows under channel_binding=require
    // only after SCRAM-SHA-256-PLUS; and the session is encrypted.
    let c = connect(&params(pg.port, SslMode::Require, None))
        .await
        .unwrap();
    assert!(tls_of(&c).await.0);

    // A server that skips SCRAM (trust) is refused under require: no channel binding.
    let mut trusted = params(pg.port, SslMode::Require, None);
    trusted.user = "trusted".into();
    let e = connect(&trusted)
        .await
        .expect_err("trust accepted under require");
    assert_eq!(e.category(), "InsecureAuthentication", "{e}");
    assert!(e.to_string().contains("SCRAM-SHA-256-PLUS"), "{e}");
    // ... while prefer (channel binding only if offered) accepts it, as libpq does.
    trusted.ssl_mode = SslMode::Prefer;
    connect(&trusted)
        .await
        .expect("prefer does not require binding");

    // Through a man in the middle with its own certificate: require does not verify the
    // certificate, so TLS succeeds, but the SCRAM exchange is bound to the attacker's
    // certificate and the real server refuses it.
    let mitm = Mitm::start(pg.port).await.unwrap();
    let e = connect(&params(mitm.port, SslMode::Require, None))
        .await
        .expect_err("a man in the middle was not detected");
    assert_eq!(e.category(), "ConnectRejected", "{e}");
    assert!(e.to_string().contains("channel binding"), "{e}");
    assert!(
        pg.log().contains("SCRAM channel binding check failed"),
        "{}",
        pg.log()
    );
}

#[tokio::test]
async fn require_fails_against_a_server_without_tls_and_disable_still_logs_in_by_scram() {
    let pg = TlsServer::start(ServerSpec {
        hba: "host all all 127.0.0.1/32 scram-sha-256\n".into(),
        cert: None,
        key_mode: 0o600,
        key_owned_by_root: false,
        settings: Vec::new(),
        password_encryption: "scram-sha-256",
    })
    .unwrap();
    for mode in [SslMode::Require, SslMode::VerifyCa, SslMode::VerifyFull] {
        let e = connect(&params(pg.port, mode, None))
            .await
            .expect_err("TLS mode without TLS");
        assert_eq!(e.category(), "ServerUnreachable", "{mode:?}: {e}");
    }
    for mode in [SslMode::Disable, SslMode::Prefer] {
        let c = connect(&params(pg.port, mode, None)).await.unwrap();
        assert!(!tls_of(&c).await.0, "{mode:?}");
    }
}

fn relay_env(pg: &TlsServer, host: &str, extra: &[(&str, &str)]) -> PgEnv {
    let mut m = BTreeMap::from([
        ("PGHOST".to_owned(), host.to_owned()),
        ("PGPORT".to_owned(), pg.port.to_string()),
        ("PGUSER".to_owned(), "postgres".to_owned()),
        ("PGPASSWORD".to_owned(), PASSWORD.to_owned()),
        ("PGDATABASE".to_owned(), "postgres".to_owned()),
    ]);
    for (k, v) in extra {
        m.insert((*k).to_owned(), (*v).to_owned());
    }
    PgEnv::from_map(&m).unwrap()
}

#[tokio::test]
async fn the_relay_connects_with_pgsslrootcert_and_verify_full_and_refuses_what_the_operator_refuses()
 {
    let (ca, cert) = ca_and_server_cert(&["127.0.0.1"]).unwrap();
    let pg = TlsServer::start(ServerSpec::tls(cert)).unwrap();
    let ca_file = pg.write_ca(&ca).unwrap();
    let ca_file = ca_file.to_str().unwrap();
    let env = relay_env(
        &pg,
        "127.0.0.1",
        &[("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", ca_file)],
    );
    let c = servicedb::relay::pg::connect(&env, None)
        .await
        .expect("relay verify-full with PGSSLROOTCERT");
    assert!(tls_of(&c).await.0);
    // Without the CA file the public roots do not trust the private CA.
    let env = relay_env(&pg, "127.0.0.1", &[("PGSSLMODE", "verify-full")]);
    assert!(servicedb::relay::pg::connect(&env, None).await.is_err());
    // A missing CA file is an error naming it, not a silent fallback.
    let env = relay_env(
        &pg,
        "127.0.0.1",
        &[
            ("PGSSLMODE", "verify-full"),
            ("PGSSLROOTCERT", "/nonexistent/ca.crt"),
        ],
    );
    let e = servicedb::relay::pg::connect(&env, None).await.unwrap_err();
    assert!(e.to_string().contains("PGSSLROOTCERT"), "{e}");

    // A cleartext-password server is refused by the relay as well.
    let (_, cert) = ca_and_server_cert(&["127.0.0.1"]).unwrap();
    let mut spec = ServerSpec::tls(cert);
    spec.hba = "host all all 127.0.0.1/32 password\n".into();
    let clear = TlsServer::start(spec).unwrap();
    let env = relay_env(&clear, "127.0.0.1", &[("PGSSLMODE", "disable")]);
    let e = servicedb::relay::pg::connect(&env, None).await.unwrap_err();
    assert!(e.to_string().contains("cleartext"), "{e}");
}

#[tokio::test]
async fn a_server_with_the_rendered_managed_instance_tls_serves_what_operator_and_relay_verify() {
    // The managed instance's objects, rendered by the operator's builders.
    let managed: ManagedInstance = serde_json::from_value(serde_json::json!({
        "version": 15, "storage": {"size": "1Gi"}
    }))
    .unwrap();
    let p = InstanceParams {
        name: "orders",
        namespace: "shop",
        owner: None,
        managed: &managed,
        deletion_policy: DeletionPolicy::Retain,
        logical_decoding: false,
        owner_pods: instance::default_owner_selector("orders"),
        operator_namespace: None,
        cdc: None,
        config_checksum: String::new(),
    };
    let now = jiff::Timestamp::now();
    let ca = generate_ca("shop", now).unwrap();
    let (cert, _) = issue_server_cert(&ca, &server_names("orders", "shop"), now).unwrap();

    // Exactly the rendered settings, the mount paths mapped into the server's directory; the
    // key as the kubelet writes it with fsGroup: root:postgres, the rendered mode.
    let settings: Vec<(String, String)> = instance::server_settings(&p)
        .into_iter()
        .filter(|(k, _)| k != "listen_addresses" && k != "hba_file" && k != "password_encryption")
        .map(|(k, v)| (k, v.replace(TLS_MOUNT, "{dir}/tls")))
        .collect();
    for key in [
        "ssl",
        "ssl_cert_file",
        "ssl_key_file",
        "ssl_min_protocol_version",
    ] {
        assert!(settings.iter().any(|(k, _)| k == key), "{key} not rendered");
    }
    let hba: String = instance::pg_hba_conf()
        .lines()
        .filter(|l| !l.starts_with("local"))
        .map(|l| format!("{l}\n"))
        .collect();
    let pg = TlsServer::start(ServerSpec {
        hba,
        cert: Some(cert),
        key_mode: TLS_FILE_MODE as u32,
        key_owned_by_root: true,
        // The TLS settings come from the rendering below, overriding the helper's own.
        settings,
        password_encryption: "scram-sha-256",
    })
    .unwrap();
    assert_eq!(pg.psql("SHOW ssl_min_protocol_version").unwrap(), "TLSv1.2");
    assert!(
        pg.psql("SHOW ssl_key_file")
            .unwrap()
            .ends_with("/tls/tls.key"),
        "the rendered key file is in use"
    );

    // The operator's admin connection: verify-full against the namespace CA, by Service name.
    let mut admin = params(pg.port, SslMode::VerifyFull, Some(&ca.cert_pem));
    admin.host = "orders-db.shop.svc".into();
    admin.hostaddr = Some("127.0.0.1".parse().unwrap());
    let c = connect(&admin).await.expect("operator verify-full");
    assert!(tls_of(&c).await.0);
    // The same by the fully qualified and the pod's names.
    for name in [
        "orders-db.shop.svc.cluster.local",
        "orders-db-0.orders-db-hl.shop.svc",
    ] {
        let mut p = admin.clone();
        p.host = name.into();
        connect(&p).await.unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // pg_hba is hostssl only: plaintext is refused by the server.
    let e = connect(&params(pg.port, SslMode::Disable, None))
        .await
        .expect_err("plaintext accepted by a managed instance");
    assert_eq!(e.sqlstate(), Some("28000"), "{e}");

    // The relay as its Deployment runs it: PGSSLMODE=verify-full, PGSSLROOTCERT the mounted CA.
    let ca_file = pg.write_ca(&ca).unwrap();
    let env = relay_env(
        &pg,
        "orders-db.shop.svc",
        &[
            ("PGHOSTADDR", "127.0.0.1"),
            ("PGSSLMODE", "verify-full"),
            ("PGSSLROOTCERT", ca_file.to_str().unwrap()),
        ],
    );
    let c = servicedb::relay::pg::connect(&env, None)
        .await
        .expect("relay verify-full");
    assert!(tls_of(&c).await.0);
}

#[tokio::test]
async fn postgres_refuses_a_key_file_readable_by_others_so_the_rendered_mode_matters() {
    let (_, cert) = ca_and_server_cert(&["127.0.0.1"]).unwrap();
    let mut spec = ServerSpec::tls(cert);
    spec.key_mode = 0o644;
    spec.key_owned_by_root = true;
    let err = TlsServer::start(spec)
        .err()
        .expect("started with a world-readable key");
    assert!(err.to_string().contains("private key file"), "{err}");
}
