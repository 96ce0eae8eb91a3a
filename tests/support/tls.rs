//! Throwaway TLS Postgres servers for the TLS tests: certificates from the operator's own issuer (`servicedb::specs::tls`), any pg_hba and settings, run as `postgres` and killed with the test binary; and a TLS-terminating man in the middle (process, file and network I/O).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use servicedb::specs::tls::{CertPair, generate_ca, issue_server_cert};

use super::free_port;
use super::relay::{PG_BIN, spawn_bound, tmpdir};

/// The password every throwaway server's `postgres` role gets.
pub const PASSWORD: &str = "tls-test-password";

/// A new CA and a server certificate from it for `names` (the operator's issuer).
pub fn ca_and_server_cert(names: &[&str]) -> Result<(CertPair, CertPair)> {
    let now = jiff::Timestamp::now();
    let ca = generate_ca("tls-tests", now)?;
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let (cert, _) = issue_server_cert(&ca, &names, now)?;
    Ok((ca, cert))
}

/// How a throwaway server is set up.
pub struct ServerSpec {
    /// `pg_hba.conf` contents (a `local all all trust` line is added first for set-up).
    pub hba: String,
    /// Server certificate and key; `None` runs without TLS.
    pub cert: Option<CertPair>,
    /// Mode of the key file.
    pub key_mode: u32,
    /// The key file is owned by root and group `postgres` (a kubelet-written Secret with
    /// `fsGroup`) instead of by `postgres`.
    pub key_owned_by_root: bool,
    /// Extra `-c` settings (added after the TLS ones).
    pub settings: Vec<(String, String)>,
    /// How the `postgres` role's password is stored: `scram-sha-256` or `md5`.
    pub password_encryption: &'static str,
}

impl ServerSpec {
    /// TLS with `cert`, `hostssl` scram-sha-256 only.
    pub fn tls(cert: CertPair) -> Self {
        ServerSpec {
            hba: "hostssl all all 127.0.0.1/32 scram-sha-256\n".to_owned(),
            cert: Some(cert),
            key_mode: 0o600,
            key_owned_by_root: false,
            settings: Vec::new(),
            password_encryption: "scram-sha-256",
        }
    }
}

/// A running throwaway server.
pub struct TlsServer {
    pub port: u16,
    pub dir: PathBuf,
    child: Mutex<Option<Child>>,
}

fn as_postgres(args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "setpriv",
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--reset-env",
        "--pdeathsig",
        "KILL",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

fn chown(path: &Path, owner: &str) -> Result<()> {
    let ok = Command::new("chown")
        .arg(owner)
        .arg(path)
        .status()?
        .success();
    if !ok {
        bail!("chown {owner} {} failed", path.display());
    }
    Ok(())
}

fn write(path: &Path, text: &str, mode: u32, owner: &str) -> Result<()> {
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    chown(path, owner)
}

impl TlsServer {
    /// Initialises and starts a server; `settings` may name `{dir}` for the server's directory.
    pub fn start(spec: ServerSpec) -> Result<Self> {
        let dir = tmpdir("tls-pg")?;
        chown(&dir, "postgres:")?;
        let data = dir.join("data");
        let initdb = format!("{PG_BIN}/initdb");
        let args = as_postgres(&[
            &initdb,
            "-D",
            data.to_str().unwrap_or_default(),
            "-U",
            "postgres",
            "--auth=trust",
            "-N",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
        ]);
        let out = Command::new(&args[0]).args(&args[1..]).output()?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let hba = dir.join("pg_hba.conf");
        write(
            &hba,
            &format!("local all all trust\n{}", spec.hba),
            0o600,
            "postgres:",
        )?;
        let d = dir.to_str().unwrap_or_default().to_owned();
        let mut settings: Vec<(String, String)> = vec![
            ("listen_addresses".into(), "127.0.0.1".into()),
            ("hba_file".into(), hba.to_str().unwrap_or_default().into()),
            (
                "password_encryption".into(),
                spec.password_encryption.into(),
            ),
            ("log_connections".into(), "on".into()),
            ("fsync".into(), "off".into()),
            ("shared_buffers".into(), "32MB".into()),
        ];
        if let Some(cert) = &spec.cert {
            let tls = dir.join("tls");
            std::fs::create_dir_all(&tls)?;
            std::fs::set_permissions(&tls, std::fs::Permissions::from_mode(0o755))?;
            write(&tls.join("tls.crt"), &cert.cert_pem, 0o644, "postgres:")?;
            let key_owner = if spec.key_owned_by_root {
                "root:postgres"
            } else {
                "postgres:postgres"
            };
            write(
                &tls.join("tls.key"),
                &cert.key_pem,
                spec.key_mode,
                key_owner,
            )?;
            settings.push(("ssl".into(), "on".into()));
            settings.push((
                "ssl_cert_file".into(),
                tls.join("tls.crt").to_str().unwrap_or_default().into(),
            ));
            settings.push((
                "ssl_key_file".into(),
                tls.join("tls.key").to_str().unwrap_or_default().into(),
            ));
        }
        for (k, v) in spec.settings {
            settings.push((k, v.replace("{dir}", &d)));
        }
        let server = TlsServer {
            port: free_port()?,
            dir,
            child: Mutex::new(None),
        };
        let port = server.port.to_string();
        let postgres = format!("{PG_BIN}/postgres");
        let mut argv = vec![
            postgres.clone(),
            "-D".into(),
            data.to_str().unwrap_or_default().into(),
            "-k".into(),
            d.clone(),
            "-p".into(),
            port.clone(),
        ];
        for (k, v) in &settings {
            argv.push("-c".into());
            argv.push(format!("{k}={v}"));
        }
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let args = as_postgres(&refs);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = spawn_bound(&refs, &server.log_path(), &[])?;
        *server.child.lock().map_err(|_| anyhow!("poisoned"))? = Some(child);
        // Ready once the local socket answers; then the password, stored as asked.
        let start = Instant::now();
        loop {
            if server
                .psql(&format!("ALTER ROLE postgres PASSWORD '{PASSWORD}'"))
                .is_ok()
            {
                return Ok(server);
            }
            if server.exited() || start.elapsed() > Duration::from_secs(60) {
                bail!("postgres did not start:\n{}", server.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn exited(&self) -> bool {
        self.child
            .lock()
            .ok()
            .and_then(|mut c| c.as_mut().and_then(|c| c.try_wait().ok().flatten()))
            .is_some()
    }

    /// Runs SQL as the superuser over the local socket.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let out = Command::new("psql")
            .args([
                "-h",
                self.dir.to_str().unwrap_or_default(),
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-XAtqc",
                sql,
            ])
            .output()?;
        if !out.status.success() {
            bail!("psql: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Writes the CA to a file (for PGSSLROOTCERT) and returns its path.
    pub fn write_ca(&self, ca: &CertPair) -> Result<PathBuf> {
        let p = self.dir.join("root.crt");
        std::fs::write(&p, &ca.cert_pem).context("writing the CA file")?;
        Ok(p)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        if let Ok(mut c) = self.child.lock()
            && let Some(mut c) = c.take()
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---- a TLS-terminating man in the middle ----------------------------------------------------

/// Accepts Postgres clients on 127.0.0.1, answers their SSLRequest and terminates their TLS
/// with its own certificate, then opens its own TLS session to `upstream` and relays the
/// decrypted bytes both ways: what an attacker on the path does against `sslmode=require`.
pub struct Mitm {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Mitm {
    pub async fn start(upstream_port: u16) -> Result<Self> {
        let (_, own) = ca_and_server_cert(&["127.0.0.1", "localhost"])?;
        use rustls::pki_types::pem::PemObject;
        let certs = vec![
            rustls::pki_types::CertificateDer::from_pem_slice(own.cert_pem.as_bytes())
                .map_err(|e| anyhow!("{e}"))?,
        ];
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(own.key_pem.as_bytes())
            .map_err(|e| anyhow!("{e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
        // Upstream: the operator's own "accept any certificate" mode.
        let client_cfg =
            servicedb::postgres::connect::tls_config(servicedb::postgres::SslMode::Require, None)?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let connector = connector.clone();
                tokio::spawn(async move {
                    let _ = relay(client, upstream_port, acceptor, connector).await;
                });
            }
        });
        Ok(Mitm { port, task })
    }
}

impl Drop for Mitm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    mut client: tokio::net::TcpStream,
    upstream_port: u16,
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut req = [0u8; 8];
    client.read_exact(&mut req).await?;
    client.write_all(b"S").await?;
    let mut client = acceptor.accept(client).await?;
    let mut up = tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await?;
    up.write_all(&req).await?;
    let mut answer = [0u8; 1];
    up.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        bail!("upstream refused TLS");
    }
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let mut up = connector.connect(name, up).await?;
    tokio::io::copy_bidirectional(&mut client, &mut up).await?;
    Ok(())
}
