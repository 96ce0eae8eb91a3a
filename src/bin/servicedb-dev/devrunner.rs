//! Development runner: runs relay pods as local processes where no kubelet exists (Kubernetes and process I/O).
//!
//! `make dev` and the operator↔relay contract tests use it instead of a kubelet. For every relay
//! pod the operator's Deployment produced, it starts `servicedb relay` with exactly that pod's
//! args and env (secretKeyRefs resolved) and its mounted ConfigMaps written to a local directory,
//! then reports the process's `/readyz` back as the pod's Ready condition. Two local deviations,
//! both unavoidable on one machine: mount paths are re-rooted under a directory of this runner,
//! and the relay config's `listen` moves to a free loopback port so several relays can run.
//! It is a development tool, not a production path.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

use servicedb::specs::instance::RELAY_COMPONENT;

/// Label selector of relay pods.
pub const RELAY_POD_SELECTOR: &str =
    "app.kubernetes.io/name=relay,app.kubernetes.io/part-of=servicedb";

/// Why a pod could not be turned into a local process.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// The pod has no containers.
    #[error("pod {0} has no container")]
    NoContainer(String),
    /// An env var or volume refers to a Secret or ConfigMap key that does not exist (yet).
    #[error("pod {pod}: {what} not found")]
    Missing {
        /// Pod name.
        pod: String,
        /// What is missing.
        what: String,
    },
    /// Writing a mounted file failed.
    #[error("writing {path}: {source}")]
    Write {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The relay config could not be rewritten.
    #[error("rewriting the relay config: {0}")]
    Config(#[from] serde_yaml::Error),
    /// The apiserver failed.
    #[error("Kubernetes: {0}")]
    Kube(#[from] kube::Error),
}

/// A pod resolved into a local process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalProcess {
    /// Arguments after the program (the container's `args`), mount paths re-rooted.
    pub args: Vec<String>,
    /// Environment, resolved.
    pub env: BTreeMap<String, String>,
    /// Files of mounted ConfigMaps and Secrets, at re-rooted paths.
    pub files: BTreeMap<PathBuf, Vec<u8>>,
}

fn secret_key(secrets: &BTreeMap<String, Secret>, name: &str, key: &str) -> Option<Vec<u8>> {
    secrets
        .get(name)?
        .data
        .as_ref()?
        .get(key)
        .map(|v| v.0.clone())
}

fn config_map_key(cms: &BTreeMap<String, ConfigMap>, name: &str, key: &str) -> Option<Vec<u8>> {
    cms.get(name)?
        .data
        .as_ref()?
        .get(key)
        .map(|v| v.clone().into_bytes())
}

/// Where a container path lands under `root`.
pub fn reroot(root: &Path, container_path: &str) -> PathBuf {
    root.join(container_path.trim_start_matches('/'))
}

/// Resolve `pod`'s first container into a local process rooted at `root` (pure).
pub fn resolve_pod(
    pod: &Pod,
    secrets: &BTreeMap<String, Secret>,
    config_maps: &BTreeMap<String, ConfigMap>,
    root: &Path,
) -> Result<LocalProcess, DevError> {
    let pod_name = pod.name_any();
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| DevError::NoContainer(pod_name.clone()))?;
    let container: &Container = spec
        .containers
        .first()
        .ok_or_else(|| DevError::NoContainer(pod_name.clone()))?;
    let missing = |what: String| DevError::Missing {
        pod: pod_name.clone(),
        what,
    };

    let mut env = BTreeMap::new();
    for var in container.env.iter().flatten() {
        let value = if let Some(v) = &var.value {
            v.clone().into_bytes()
        } else if let Some(src) = &var.value_from {
            if let Some(r) = &src.secret_key_ref {
                secret_key(secrets, &r.name, &r.key)
                    .ok_or_else(|| missing(format!("Secret {} key {}", r.name, r.key)))?
            } else if let Some(r) = &src.config_map_key_ref {
                config_map_key(config_maps, &r.name, &r.key)
                    .ok_or_else(|| missing(format!("ConfigMap {} key {}", r.name, r.key)))?
            } else {
                continue;
            }
        } else {
            Vec::new()
        };
        env.insert(
            var.name.clone(),
            String::from_utf8_lossy(&value).into_owned(),
        );
    }

    let mut files = BTreeMap::new();
    let mut mounts: Vec<(String, String)> = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        mounts.push((mount.mount_path.clone(), mount.name.clone()));
        let Some(volume) = spec.volumes.iter().flatten().find(|v| v.name == mount.name) else {
            continue;
        };
        let dir = reroot(root, &mount.mount_path);
        if let Some(cm) = &volume.config_map {
            let data = config_maps
                .get(&cm.name)
                .ok_or_else(|| missing(format!("ConfigMap {}", cm.name)))?;
            for (k, v) in data.data.iter().flatten() {
                files.insert(dir.join(k), v.clone().into_bytes());
            }
        } else if let Some(s) = &volume.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let data = secrets
                .get(&name)
                .ok_or_else(|| missing(format!("Secret {name}")))?;
            // Only the listed keys, as the kubelet does (the relay's CA mount lists `ca.crt`
            // alone, never the password).
            let listed: Option<Vec<&str>> = s
                .items
                .as_ref()
                .map(|items| items.iter().map(|i| i.key.as_str()).collect());
            for (k, v) in data.data.iter().flatten() {
                if listed.as_ref().is_none_or(|l| l.contains(&k.as_str())) {
                    files.insert(dir.join(k), v.0.clone());
                }
            }
        }
    }
    // Longest mount path first, so nested mounts re-root correctly.
    mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    // Plain env values naming a mounted file (PGSSLROOTCERT) follow the re-rooted mount.
    for value in env.values_mut() {
        if mounts
            .iter()
            .any(|(path, _)| value.starts_with(&format!("{path}/")))
        {
            *value = reroot(root, value).to_string_lossy().into_owned();
        }
    }
    let args = container
        .args
        .iter()
        .flatten()
        .map(
            |a| match mounts.iter().find(|(path, _)| a.starts_with(path.as_str())) {
                Some(_) => reroot(root, a).to_string_lossy().into_owned(),
                None => a.clone(),
            },
        )
        .collect();
    Ok(LocalProcess { args, env, files })
}

/// Point a relay config's `listen` at `addr` (the one local deviation in the config file).
pub fn rewrite_listen(config_yaml: &[u8], addr: &str) -> Result<Vec<u8>, serde_yaml::Error> {
    let mut value: serde_yaml::Value = serde_yaml::from_slice(config_yaml)?;
    if let Some(map) = value.as_mapping_mut() {
        map.insert(
            serde_yaml::Value::from("listen"),
            serde_yaml::Value::from(addr),
        );
    }
    Ok(serde_yaml::to_string(&value)?.into_bytes())
}

struct Running {
    child: tokio::process::Child,
    port: u16,
    ready: Option<bool>,
    uid: String,
}

/// Run relay pods of `namespace` (all namespaces when `None`) as local processes until
/// `shutdown` resolves. `program` is the `servicedb` binary; `work_dir` holds re-rooted mounts
/// and logs.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    program: PathBuf,
    work_dir: PathBuf,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DevError> {
    tokio::pin!(shutdown);
    let mut running: HashMap<(String, String), Running> = HashMap::new();
    loop {
        if let Err(e) = step(
            &client,
            namespace.as_deref(),
            &program,
            &work_dir,
            &mut running,
        )
        .await
        {
            warn!(error = %e, "dev runner step failed");
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    for (_, mut r) in running.drain() {
        let _ = r.child.kill().await;
    }
    Ok(())
}

async fn step(
    client: &Client,
    namespace: Option<&str>,
    program: &Path,
    work_dir: &Path,
    running: &mut HashMap<(String, String), Running>,
) -> Result<(), DevError> {
    let pods: Api<Pod> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let list = pods
        .list(&ListParams::default().labels(RELAY_POD_SELECTOR))
        .await?;
    let live: Vec<&Pod> = list
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();

    // Stop processes whose pod is gone (deleted, or replaced by a rollout).
    let wanted: Vec<(String, String, String)> = live
        .iter()
        .map(|p| {
            (
                p.namespace().unwrap_or_default(),
                p.name_any(),
                p.uid().unwrap_or_default(),
            )
        })
        .collect();
    let stale: Vec<(String, String)> = running
        .iter()
        .filter(|((ns, name), r)| {
            !wanted
                .iter()
                .any(|(wns, wname, uid)| wns == ns && wname == name && *uid == r.uid)
        })
        .map(|(k, _)| k.clone())
        .collect();
    for key in stale {
        if let Some(mut r) = running.remove(&key) {
            info!(pod = %key.1, "pod gone: stopping its relay");
            let _ = r.child.kill().await;
        }
    }

    for pod in live {
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let key = (ns.clone(), name.clone());
        if !running.contains_key(&key) {
            match start(client, pod, program, work_dir).await {
                Ok(r) => {
                    info!(pod = %name, port = r.port, "started a relay for the pod");
                    running.insert(key.clone(), r);
                }
                Err(e) => {
                    warn!(pod = %name, error = %e, "cannot start the pod's relay yet");
                    continue;
                }
            }
        }
        let Some(r) = running.get_mut(&key) else {
            continue;
        };
        let exited = matches!(r.child.try_wait(), Ok(Some(_)));
        let ready = !exited && probe(r.port, "/readyz").await;
        if r.ready != Some(ready) {
            set_pod_ready(client, &ns, &name, pod, ready).await?;
            r.ready = Some(ready);
        }
        if exited {
            // Like a kubelet's restart: start again on the next step.
            running.remove(&key);
        }
    }
    Ok(())
}

async fn start(
    client: &Client,
    pod: &Pod,
    program: &Path,
    work_dir: &Path,
) -> Result<Running, DevError> {
    let ns = pod.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let secrets: BTreeMap<String, Secret> = secrets
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|s| (s.name_any(), s))
        .collect();
    let cms: BTreeMap<String, ConfigMap> = cms
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|c| (c.name_any(), c))
        .collect();
    let root = work_dir.join(&ns).join(pod.name_any());
    let mut process = resolve_pod(pod, &secrets, &cms, &root)?;
    let port = free_port().await.map_err(|source| DevError::Write {
        path: root.clone(),
        source,
    })?;
    for (path, bytes) in &mut process.files {
        if path.file_name().and_then(|f| f.to_str()) == Some(servicedb::specs::relay::CONFIG_KEY) {
            *bytes = rewrite_listen(bytes, &format!("127.0.0.1:{port}"))?;
        }
    }
    for (path, bytes) in &process.files {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| DevError::Write {
                path: parent.to_owned(),
                source,
            })?;
        }
        std::fs::write(path, bytes).map_err(|source| DevError::Write {
            path: path.clone(),
            source,
        })?;
    }
    let log_path = root.join("relay.log");
    let log = std::fs::File::create(&log_path).map_err(|source| DevError::Write {
        path: log_path.clone(),
        source,
    })?;
    let log_err = log.try_clone().map_err(|source| DevError::Write {
        path: log_path.clone(),
        source,
    })?;
    let mut command = tokio::process::Command::new(program);
    die_with_parent(&mut command);
    let child = command
        .args(&process.args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(&process.env)
        .stdout(log)
        .stderr(log_err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| DevError::Write {
            path: program.to_owned(),
            source,
        })?;
    Ok(Running {
        child,
        port,
        ready: None,
        uid: pod.uid().unwrap_or_default(),
    })
}

/// Make the child die when this runner dies, however it dies (SIGKILL included): a development
/// runner must never leave relays publishing behind it.
pub fn die_with_parent(command: &mut tokio::process::Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the parent;
    // it is the only call made between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

async fn free_port() -> std::io::Result<u16> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(l.local_addr()?.port())
}

/// A minimal HTTP GET: true on a 200 answer.
pub async fn probe(port: u16, path: &str) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        Some(buf.starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

async fn set_pod_ready(
    client: &Client,
    ns: &str,
    name: &str,
    pod: &Pod,
    ready: bool,
) -> Result<(), DevError> {
    let now = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let status = if ready { "True" } else { "False" };
    let cond =
        |t: &str, s: &str| serde_json::json!({"type": t, "status": s, "lastTransitionTime": now});
    let containers: Vec<_> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| {
            serde_json::json!({
                "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
                "ready": ready, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": now}}
            })
        })
        .collect();
    let patch = serde_json::json!({"status": {
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "podIP": "127.0.0.1",
        "startTime": now,
        "conditions": [cond("PodScheduled", "True"), cond("Initialized", "True"), cond("ContainersReady", status), cond("Ready", status)],
        "containerStatuses": containers,
    }});
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    info!(pod = %name, ready, component = RELAY_COMPONENT, "reported readiness");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use servicedb::api::outbox_relay::{KafkaSink, OutboxRelaySpec, RelayMode, Sink};
    use servicedb::specs::relay::{RelayParams, deployment};

    #[test]
    fn a_relay_pod_resolves_to_the_deployments_args_env_and_config() {
        let spec = OutboxRelaySpec {
            database_ref: servicedb::api::outbox_relay::LocalObjectRef {
                name: "orders".into(),
            },
            mode: RelayMode::Poll,
            batch_size: 100,
            poll_interval_ms: 100,
            sink: Sink {
                kafka: Some(KafkaSink {
                    bootstrap_servers: "127.0.0.1:9092".into(),
                    topic: "t".into(),
                    properties: Default::default(),
                }),
                nats: None,
            },
            format: Default::default(),
            replicas: 1,
            resources: None,
        };
        let params = RelayParams {
            name: "orders-events",
            namespace: "shop",
            owner: None,
            spec: &spec,
            database: "orders",
            relay_secret: "orders-relay",
            image: "img",
            checksum: "c".into(),
            ca: false,
        };
        let d = deployment(&params);
        let pod = Pod {
            metadata: Default::default(),
            spec: d.spec.and_then(|s| s.template.spec),
            status: None,
        };
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "orders-relay"},
            "data": {"host": "aG9zdA==", "port": "NTQzMg==", "database": "ZGI=", "username": "dQ==", "password": "cA==", "sslmode": "ZGlzYWJsZQ=="}
        }))
        .expect("secret");
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "orders-events-relay-config"}, "data": {"relay.yaml": "listen: 0.0.0.0:9090\n"}
        }))
        .expect("cm");
        let root = Path::new("/tmp/root");
        let p = resolve_pod(
            &pod,
            &BTreeMap::from([("orders-relay".to_owned(), secret)]),
            &BTreeMap::from([("orders-events-relay-config".to_owned(), cm)]),
            root,
        )
        .expect("resolve");
        assert_eq!(
            p.args,
            vec!["relay", "--config", "/tmp/root/etc/servicedb/relay.yaml"]
        );
        assert_eq!(p.env["PGHOST"], "host");
        assert_eq!(p.env["PGPORT"], "5432");
        assert_eq!(p.env["PGPASSWORD"], "p");
        assert_eq!(p.env["PGSSLMODE"], "disable");
        assert!(
            p.files
                .contains_key(Path::new("/tmp/root/etc/servicedb/relay.yaml"))
        );
        let rewritten =
            rewrite_listen(b"listen: 0.0.0.0:9090\nmode: Poll\n", "127.0.0.1:5555").expect("yaml");
        assert!(
            String::from_utf8(rewritten)
                .expect("utf8")
                .contains("listen: 127.0.0.1:5555")
        );
    }
}
