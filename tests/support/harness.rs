//! Operator test harness: CRDs installed once, a namespace-scoped operator process per test, and
//! waits on conditions (Kubernetes and process I/O). Builds on the rest of `tests/support`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::OnceCell;

/// Install both CRDs (server-side apply) and wait until the apiserver serves them. Once per test
/// binary; idempotent across binaries.
pub async fn install_crds() -> Result<()> {
    static DONE: OnceCell<()> = OnceCell::const_new();
    DONE.get_or_try_init(|| async {
        let client = super::kube_client().await?;
        let api: Api<CustomResourceDefinition> = Api::all(client);
        for crd in servicedb::api::crds() {
            let name = crd.name_any();
            api.patch(
                &name,
                &PatchParams::apply("servicedb-tests").force(),
                &Patch::Apply(&crd),
            )
            .await?;
            super::wait_until(&format!("CRD {name} established"), super::TIMEOUT, || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    let crd = api.get(&name).await.ok()?;
                    let established = crd
                        .status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    established.then_some(())
                }
            })
            .await?;
        }
        anyhow::Ok(())
    })
    .await?;
    Ok(())
}

/// The `servicedb` binary the operator tests run: `$SERVICEDB_BIN` when set, else Cargo's.
/// Worktrees that share one target directory overwrite each other's `target/debug/servicedb`;
/// a copy taken right after this worktree's build, named by `SERVICEDB_BIN`, is the one tested.
pub fn servicedb_bin() -> PathBuf {
    std::env::var_os("SERVICEDB_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_servicedb")))
}

/// A `servicedb operator` process watching one namespace; killed on drop.
pub struct Operator {
    child: tokio::process::Child,
    pub log: PathBuf,
    namespace: String,
    /// Port of its /healthz, /readyz and /metrics.
    pub port: u16,
}

/// How [`Operator::start_with`] starts an operator process.
#[derive(Clone, Debug, Default)]
pub struct OperatorOptions {
    /// Take part in leader election on a Lease (the default name) in the watched namespace.
    /// Off by default: [`Operator::start`] runs one process with `--leader-elect=false`.
    pub leader_elect: bool,
    /// `POD_NAME` of the process: the `reportingInstance` of its Events and the prefix of its
    /// Lease identity. Also names its log file.
    pub pod_name: Option<String>,
    /// A kubeconfig to use instead of the test environment's (one through a [`Proxy`]).
    pub kubeconfig: Option<PathBuf>,
    /// Further command-line flags.
    pub extra_args: Vec<String>,
}

impl Operator {
    /// Start the operator binary against the test environment, scoped to `namespace`, with
    /// leader election off (exactly one process).
    pub async fn start(namespace: &str) -> Result<Self> {
        Self::start_with_options(namespace, OperatorOptions::default()).await
    }

    /// [`Operator::start`] with extra command-line flags.
    pub async fn start_with(namespace: &str, extra_args: &[&str]) -> Result<Self> {
        let options = OperatorOptions {
            extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
            ..OperatorOptions::default()
        };
        Self::start_with_options(namespace, options).await
    }

    /// Start the operator binary scoped to `namespace`, as `options` say; returns once /readyz
    /// answers (a standby is ready too: see [`Operator::is_leader`]).
    pub async fn start_with_options(namespace: &str, options: OperatorOptions) -> Result<Self> {
        install_crds().await?;
        let env = super::env();
        let log_name = match &options.pod_name {
            Some(pod) => format!("operator-{namespace}-{pod}.log"),
            None => format!("operator-{namespace}.log"),
        };
        let log = env.dir.join("logs").join(log_name);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let port = super::free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let mut command = tokio::process::Command::new(servicedb_bin());
        // Never outlive the test binary, even when it is killed.
        super::die_with_parent(&mut command);
        command.args([
            "operator",
            "--listen",
            &listen,
            "--watch-namespace",
            namespace,
            "--resync-seconds",
            "20",
        ]);
        if options.leader_elect {
            command.args(["--leader-elect=true", "--leader-elect-namespace", namespace]);
        } else {
            command.arg("--leader-elect=false");
        }
        if let Some(pod) = &options.pod_name {
            command.env("POD_NAME", pod);
        }
        let kubeconfig = options.kubeconfig.as_ref().unwrap_or(&env.kubeconfig);
        let child = command
            .args(&options.extra_args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .env(
                "SERVICEDB_RELAY_IMAGE",
                "ghcr.io/servicedb/servicedb-operator:test",
            )
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .kill_on_drop(true)
            .spawn()
            .context("spawning servicedb operator")?;
        let operator = Operator {
            child,
            log,
            namespace: namespace.to_owned(),
            port,
        };
        super::wait_until("the operator's /readyz", super::TIMEOUT, || async {
            super::http_get(port, "/readyz")
                .await
                .is_ok_and(|(code, _)| code == 200)
        })
        .await?;
        Ok(operator)
    }

    /// Whether the process says it leads (`/leader` answers 200).
    pub async fn is_leader(&self) -> bool {
        super::http_get(self.port, "/leader")
            .await
            .is_ok_and(|(code, _)| code == 200)
    }

    /// The value of one metric line `name` (exactly that name, any labels summed) in /metrics;
    /// 0 when absent. Unlike [`Operator::counter_total`], `servicedb_operator_leader` does not
    /// also match `servicedb_operator_leader_acquired_total`.
    pub async fn metric(&self, name: &str) -> Result<f64> {
        let (code, body) = super::http_request(
            "GET",
            &format!("http://127.0.0.1:{}/metrics", self.port),
            None,
        )
        .await?;
        anyhow::ensure!(code == 200, "/metrics answered {code}");
        Ok(body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Send SIGTERM (what the kubelet does first) and wait up to `timeout` for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let pid = self.child.id().context("the operator already exited")?;
        let pid = i32::try_from(pid)?;
        // SAFETY: kill(2) on a child this struct owns and has not reaped.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        anyhow::ensure!(rc == 0, "kill -TERM {pid} failed");
        Ok(tokio::time::timeout(timeout, self.child.wait())
            .await
            .context("the operator did not exit after SIGTERM")??)
    }

    /// The sum of a counter family in the operator's /metrics (0 when absent).
    pub async fn counter_total(&self, name: &str) -> Result<f64> {
        let (code, body) = super::http_get(self.port, "/metrics").await?;
        anyhow::ensure!(code == 200, "/metrics answered {code}");
        Ok(body
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Kill the process (SIGKILL) and wait for it: a crash, as far as the cluster can tell.
    pub async fn kill(mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// The operator's log so far, for assertion messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Wait until `name`'s condition `type_` has status `status`; returns the object.
pub async fn wait_condition<K>(
    api: &Api<K>,
    name: &str,
    type_: &str,
    status: &str,
    timeout: Duration,
) -> Result<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + serde::Serialize,
{
    super::wait_until(&format!("{name} {type_}={status}"), timeout, || {
        let api = api.clone();
        async move {
            let obj = api.get(name).await.ok()?;
            let value = serde_json::to_value(&obj).ok()?;
            let conds = value.pointer("/status/conditions")?.as_array()?.clone();
            conds
                .iter()
                .any(|c| c["type"] == type_ && c["status"] == status)
                .then_some(obj)
        }
    })
    .await
}

/// The string value of a Secret's key.
pub fn secret_string(secret: &Secret, key: &str) -> Result<String> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .ok_or_else(|| anyhow!("Secret has no key {key}"))?;
    Ok(String::from_utf8(bytes.0.clone())?)
}

/// Create the `pg-admin` Secret pointing at the test Postgres superuser.
pub async fn create_admin_secret(ns: &super::TestNamespace, name: &str) -> Result<()> {
    let env = super::env();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "stringData": {"username": env.pg_user, "password": env.pg_password}
    }))?;
    ns.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await?;
    Ok(())
}

/// An external ServiceDatabase on the test Postgres, as JSON, for `service` (role names derive
/// from it, and roles are server-wide, so tests use unique services).
pub fn external_sdb(name: &str, service: &str, policy: &str) -> serde_json::Value {
    let env = super::env();
    serde_json::json!({
        "apiVersion": "servicedb.io/v1alpha1",
        "kind": "ServiceDatabase",
        "metadata": {"name": name},
        "spec": {
            "owner": {"service": service},
            "instance": {"external": {"host": env.pg_host, "port": env.pg_port, "adminSecretRef": {"name": "pg-admin"}, "sslMode": "disable"}},
            "outbox": {"table": "outbox"},
            "deletionPolicy": policy,
        }
    })
}

/// A copy of the test environment's kubeconfig whose apiserver address is `127.0.0.1:port` (a
/// [`Proxy`] in front of the apiserver), written into `dir`. TLS still verifies: the proxy
/// forwards bytes, and the apiserver's certificate names 127.0.0.1.
pub fn kubeconfig_through(port: u16, dir: &std::path::Path) -> Result<PathBuf> {
    let env = super::env();
    let mut kc = kube::config::Kubeconfig::read_from(&env.kubeconfig)?;
    for named in &mut kc.clusters {
        if let Some(cluster) = named.cluster.as_mut() {
            let server = cluster
                .server
                .as_deref()
                .context("a cluster without server")?;
            let (scheme, _) = server
                .split_once("://")
                .context("a server without scheme")?;
            cluster.server = Some(format!("{scheme}://127.0.0.1:{port}"));
        }
    }
    let path = dir.join("kubeconfig-through-proxy");
    std::fs::write(&path, serde_yaml::to_string(&kc)?)?;
    Ok(path)
}

/// The `host:port` of the test environment's apiserver.
pub fn apiserver_address() -> Result<String> {
    let env = super::env();
    let url = env.var("KUBE_APISERVER_URL");
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    anyhow::ensure!(
        authority.contains(':'),
        "no port in KUBE_APISERVER_URL {url}"
    );
    Ok(authority.to_owned())
}

/// Connect with a Secret's `uri` (what an application does).
pub async fn connect_uri(uri: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(uri, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A TCP proxy on 127.0.0.1 in front of `target`, that a test can stop and start again: a
/// database server "going away" and "coming back" without touching the shared Postgres.
pub struct Proxy {
    pub port: u16,
    target: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// Listen on a free port and forward to `target`.
    pub async fn start(target: &str) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let mut proxy = Proxy {
            port,
            target: target.to_owned(),
            task: None,
        };
        proxy.task = Some(Self::serve(listener, proxy.target.clone()));
        Ok(proxy)
    }

    fn serve(listener: tokio::net::TcpListener, target: String) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                conns.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        })
    }

    /// Stop listening and cut every open connection.
    pub fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listen again on the same port.
    pub async fn resume(&mut self) -> Result<()> {
        let listener = super::wait_until(
            "the proxy port to be free again",
            super::TIMEOUT,
            || async {
                tokio::net::TcpListener::bind(("127.0.0.1", self.port))
                    .await
                    .ok()
            },
        )
        .await?;
        self.task = Some(Self::serve(listener, self.target.clone()));
        Ok(())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `servicedb-dev run-relays` for one namespace: relay pods become local `servicedb relay`
/// processes with exactly the pods' args, env and mounted config. Killed on drop.
pub struct RelayRunner {
    child: tokio::process::Child,
}

impl RelayRunner {
    /// Start the runner for `namespace`.
    pub async fn start(namespace: &str) -> Result<Self> {
        let env = super::env();
        let work = env.dir.join("dev-relays").join(namespace);
        std::fs::create_dir_all(&work)?;
        let log =
            std::fs::File::create(env.dir.join("logs").join(format!("relays-{namespace}.log")))?;
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_servicedb-dev"))
            .args([
                "run-relays",
                "--namespace",
                namespace,
                "--program",
                env!("CARGO_BIN_EXE_servicedb"),
            ])
            .arg("--work-dir")
            .arg(&work)
            .env("KUBECONFIG", &env.kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .context("spawning servicedb-dev run-relays")?;
        Ok(RelayRunner { child })
    }

    /// Stop the runner and every relay it started.
    pub async fn stop(mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}
