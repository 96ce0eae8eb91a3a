//! The Helm chart against the real control plane: it lints and renders a hardened operator with
//! exactly the RBAC the controllers use; it installs and uninstalls cleanly; and the real
//! `servicedb operator` binary, authenticated as the chart's ServiceAccount (a token from the
//! TokenRequest API, no admin credentials), reconciles a ServiceDatabase to Ready and gives an
//! OutboxRelay its Deployment, while that identity is refused everything outside the role.

mod support;

use support::harness;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, Node, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::Deserialize;
use serde_json::{Value, json};
use servicedb::api::{OutboxRelay, ServiceDatabase};

/// Upper bound for one helm or kubectl invocation: tests never hang.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    repo().join("charts/servicedb-operator")
}

/// Run a command of the test environment (helm, kubectl) with its variables, bounded by
/// [`COMMAND_TIMEOUT`]; fails with stderr when the command fails. Returns stdout.
async fn run(program: &Path, args: &[&str]) -> Result<String> {
    let env = support::env();
    let mut cmd = tokio::process::Command::new(program);
    cmd.envs(&env.vars)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let what = format!("{} {}", program.display(), args.join(" "));
    let out = tokio::time::timeout(COMMAND_TIMEOUT, cmd.output())
        .await
        .with_context(|| format!("{what}: timed out after {COMMAND_TIMEOUT:?}"))?
        .with_context(|| format!("{what}: could not run"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}{stderr}",
        out.status
    );
    Ok(stdout)
}

async fn helm(args: &[&str]) -> Result<String> {
    run(&support::env().helm, args).await
}

/// `helm template` with the chart, for Kubernetes 1.36, parsed into objects.
async fn render(extra: &[&str]) -> Result<Vec<Value>> {
    let chart = chart();
    let chart = chart.to_str().context("chart path is not UTF-8")?;
    let mut args = vec![
        "template",
        "sdb",
        chart,
        "--namespace",
        "servicedb-system",
        "--kube-version",
        "1.36.0",
    ];
    args.extend_from_slice(extra);
    let yaml = helm(&args).await?;
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&yaml) {
        let value = Value::deserialize(doc)?;
        if !value.is_null() {
            objects.push(value);
        }
    }
    Ok(objects)
}

fn find<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found = find(objects, kind);
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind}, got {}",
        found.len()
    );
    found[0]
}

/// The namespaced rules the controllers need, in the chart's order. Changing what the operator
/// touches must change this list, and the chart with it.
fn expected_namespaced_rules() -> Vec<Value> {
    let five = json!(["get", "list", "watch", "create", "patch"]);
    vec![
        json!({"apiGroups": ["servicedb.io"], "resources": ["servicedatabases", "outboxrelays"], "verbs": ["get", "list", "watch", "patch"]}),
        json!({"apiGroups": ["servicedb.io"], "resources": ["servicedatabases/status", "outboxrelays/status"], "verbs": ["patch"]}),
        json!({"apiGroups": ["servicedb.io"], "resources": ["servicedatabases/finalizers", "outboxrelays/finalizers"], "verbs": ["update"]}),
        json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]}),
        json!({"apiGroups": [""], "resources": ["configmaps", "services", "serviceaccounts"], "verbs": five}),
        json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}),
        json!({"apiGroups": ["apps"], "resources": ["statefulsets", "deployments"], "verbs": five}),
        json!({"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": five}),
        json!({"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]}),
    ]
}

fn expected_crd_rule() -> Value {
    json!({
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "resourceNames": ["servicedatabases.servicedb.io", "outboxrelays.servicedb.io"],
        "verbs": ["get"],
    })
}

/// The one object of `kind` in `namespace`.
fn one_in<'a>(objects: &'a [Value], kind: &str, namespace: &str) -> &'a Value {
    let found: Vec<&Value> = find(objects, kind)
        .into_iter()
        .filter(|o| o["metadata"]["namespace"] == namespace)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind} in {namespace}, got {}",
        found.len()
    );
    found[0]
}

/// Leader election: create a Lease in the release namespace, read and renew only the named one.
fn expected_lease_rules(lease: &str) -> Value {
    json!([
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [lease], "verbs": ["get", "update"]},
    ])
}

fn env_of(container: &Value, name: &str) -> Option<Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .cloned()
}

#[test]
fn chart_crds_are_exactly_the_generated_crds() {
    let chart = std::fs::read_to_string(chart().join("crds/servicedb.io_crds.yaml"))
        .expect("read the chart's CRDs");
    let committed =
        std::fs::read_to_string(repo().join("crds/servicedb.io_crds.yaml")).expect("read crds/");
    assert!(
        chart == committed,
        "charts/servicedb-operator/crds/servicedb.io_crds.yaml differs from crds/servicedb.io_crds.yaml: \
         cp crds/servicedb.io_crds.yaml charts/servicedb-operator/crds/"
    );
}

#[test]
fn chart_app_version_is_the_crate_version() {
    let text = std::fs::read_to_string(chart().join("Chart.yaml")).expect("read Chart.yaml");
    let chart: Value = serde_yaml::from_str(&text).expect("parse Chart.yaml");
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn chart_lints_clean_and_renders_a_hardened_least_privilege_operator() -> Result<()> {
    let chart = chart();
    let chart = chart.to_str().context("chart path is not UTF-8")?;
    let lint = helm(&["lint", chart, "--strict", "--kube-version", "1.36.0"]).await?;
    assert!(lint.contains("0 chart(s) failed"), "{lint}");
    assert!(
        !lint.contains("[WARNING]") && !lint.contains("[ERROR]"),
        "{lint}"
    );

    let objects = render(&[]).await?;
    let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    let mut sorted = kinds.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount"
        ],
        "{kinds:?}"
    );

    // The Deployment: non-root, read-only, no capabilities, seccomp, probes, downward API.
    let deployment = one(&objects, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    // HA by default: two replicas, one leader, rolled without ever dropping to zero.
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(
        deployment["spec"]["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
    );
    assert_eq!(
        pod["affinity"],
        json!({"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100,
            "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname",
                "labelSelector": {"matchLabels": {
                    "app.kubernetes.io/name": "servicedb-operator",
                    "app.kubernetes.io/instance": "sdb",
                }},
            },
        }]}}),
        "soft anti-affinity spreads the replicas over nodes"
    );
    assert_eq!(pod["serviceAccountName"], "sdb-servicedb-operator");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    // Instance NetworkPolicies admit the operator's pods by this exact label.
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"],
        "servicedb-operator"
    );
    let containers = pod["containers"].as_array().context("containers")?;
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(c["image"], "ghcr.io/servicedb/servicedb-operator:0.1.0");
    assert_eq!(c["args"], json!(["operator"]));
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "http"})
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "http"})
    );
    assert_eq!(
        c["ports"],
        json!([{"name": "http", "containerPort": 8080, "protocol": "TCP"}])
    );
    assert_eq!(
        env_of(c, "POD_NAME").context("POD_NAME")?["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        env_of(c, "POD_NAMESPACE").context("POD_NAMESPACE")?["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        env_of(c, "SERVICEDB_LISTEN").context("SERVICEDB_LISTEN")?["value"],
        "0.0.0.0:8080"
    );
    // Relays run the operator's own image unless told otherwise.
    assert_eq!(
        env_of(c, "SERVICEDB_RELAY_IMAGE").context("relay image")?["value"],
        "ghcr.io/servicedb/servicedb-operator:0.1.0"
    );
    assert_eq!(
        env_of(c, "SERVICEDB_CONCURRENCY").context("concurrency")?["value"],
        "8"
    );
    assert_eq!(
        env_of(c, "SERVICEDB_RESYNC_SECONDS").context("resync")?["value"],
        "300"
    );
    assert!(
        env_of(c, "SERVICEDB_WATCH_NAMESPACE").is_none(),
        "cluster-wide by default"
    );
    // Guard rails: the official postgres image, two observing preload libraries, any host.
    assert_eq!(
        env_of(c, "SERVICEDB_ALLOWED_IMAGES").context("allowed images")?["value"],
        "postgres"
    );
    assert_eq!(
        env_of(c, "SERVICEDB_ALLOWED_PRELOAD_LIBRARIES").context("preload libraries")?["value"],
        "pg_stat_statements,auto_explain"
    );
    assert_eq!(
        env_of(c, "SERVICEDB_ALLOWED_EXTERNAL_HOSTS").context("external hosts")?["value"],
        ""
    );
    for (name, value) in [
        ("SERVICEDB_LEADER_ELECT", "true"),
        (
            "SERVICEDB_LEADER_ELECT_LEASE_NAME",
            "sdb-servicedb-operator",
        ),
        ("SERVICEDB_LEADER_ELECT_LEASE_DURATION", "15"),
        ("SERVICEDB_LEADER_ELECT_RENEW_DEADLINE", "10"),
        ("SERVICEDB_LEADER_ELECT_RETRY_PERIOD", "2"),
    ] {
        assert_eq!(
            env_of(c, name).with_context(|| name.to_owned())?["value"],
            value,
            "{name}"
        );
    }

    // A drain always leaves one replica.
    let pdb = one(&objects, "PodDisruptionBudget");
    assert_eq!(pdb["metadata"]["namespace"], "servicedb-system");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        json!({"app.kubernetes.io/name": "servicedb-operator", "app.kubernetes.io/instance": "sdb"})
    );

    // The Lease: a Role in the release namespace only, bound to the operator.
    let lease_role = one_in(&objects, "Role", "servicedb-system");
    assert_eq!(
        lease_role["metadata"]["name"],
        "sdb-servicedb-operator-leader-election"
    );
    assert_eq!(
        lease_role["rules"],
        expected_lease_rules("sdb-servicedb-operator")
    );
    let lease_binding = one_in(&objects, "RoleBinding", "servicedb-system");
    assert_eq!(
        lease_binding["roleRef"]["name"],
        lease_role["metadata"]["name"]
    );
    assert_eq!(
        lease_binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "sdb-servicedb-operator", "namespace": "servicedb-system"}])
    );

    let service = one(&objects, "Service");
    assert_eq!(service["spec"]["ports"][0]["name"], "http-metrics");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");

    // RBAC: exactly the controllers' rules, bound to the chart's ServiceAccount.
    let role = one(&objects, "ClusterRole");
    let mut expected = expected_namespaced_rules();
    expected.push(expected_crd_rule());
    assert_eq!(role["rules"], Value::Array(expected));
    let binding = one(&objects, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "sdb-servicedb-operator", "namespace": "servicedb-system"}])
    );

    // Namespace-scoped: a Role in the watched namespace, and cluster-wide only the CRD check.
    let objects = render(&[
        "--set",
        "watchNamespace=shop",
        "--set",
        "relayImage=example.org/relay:1",
        "--set",
        "resyncSeconds=1000000",
    ])
    .await?;
    let role = one_in(&objects, "Role", "shop");
    assert_eq!(role["rules"], Value::Array(expected_namespaced_rules()));
    let binding = one_in(&objects, "RoleBinding", "shop");
    assert_eq!(binding["subjects"][0]["namespace"], "servicedb-system");
    assert_eq!(
        one(&objects, "ClusterRole")["rules"],
        json!([expected_crd_rule()])
    );
    assert_eq!(
        one(&objects, "ClusterRoleBinding")["roleRef"]["name"],
        "sdb-servicedb-operator-crds"
    );
    let c = &one(&objects, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        env_of(c, "SERVICEDB_WATCH_NAMESPACE").context("watch namespace")?["value"],
        "shop"
    );
    assert_eq!(
        env_of(c, "SERVICEDB_RELAY_IMAGE").context("relay image")?["value"],
        "example.org/relay:1"
    );
    assert_eq!(
        env_of(c, "SERVICEDB_RESYNC_SECONDS").context("resync")?["value"],
        "1000000"
    );

    // The Lease stays in the release namespace whatever is watched.
    assert_eq!(
        one_in(&objects, "Role", "servicedb-system")["rules"],
        expected_lease_rules("sdb-servicedb-operator")
    );

    // One replica without leader election: no Lease, no PodDisruptionBudget (it would block
    // every drain), never two operators side by side.
    let objects = render(&[
        "--set",
        "replicas=1",
        "--set",
        "leaderElection.enabled=false",
    ])
    .await?;
    assert!(find(&objects, "PodDisruptionBudget").is_empty());
    assert!(find(&objects, "Role").is_empty());
    let deployment = one(&objects, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(deployment["spec"]["strategy"], json!({"type": "Recreate"}));
    let c = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        env_of(c, "SERVICEDB_LEADER_ELECT").context("leader elect")?["value"],
        "false"
    );
    assert!(env_of(c, "SERVICEDB_LEADER_ELECT_LEASE_NAME").is_none());
    // ... and more replicas than one without it is refused.
    let refused = render(&["--set", "leaderElection.enabled=false"]).await;
    let err = format!(
        "{:#}",
        refused
            .err()
            .context("2 replicas without leader election rendered")?
    );
    assert!(err.contains("needs leaderElection.enabled=true"), "{err}");
    // A lease name of one's own; a hard anti-affinity.
    let objects = render(&[
        "--set",
        "leaderElection.leaseName=my-lease",
        "--set",
        "podAntiAffinity=hard",
    ])
    .await?;
    assert_eq!(
        one_in(&objects, "Role", "servicedb-system")["rules"],
        expected_lease_rules("my-lease")
    );
    let pod = &one(&objects, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(
        env_of(&pod["containers"][0], "SERVICEDB_LEADER_ELECT_LEASE_NAME").context("lease name")?["value"],
        "my-lease"
    );
    assert_eq!(
        pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"],
        "kubernetes.io/hostname"
    );

    // Guard-rail values become the operator's flags (as their environment variables).
    let objects = render(&[
        "--set",
        "guardRails.allowedImages={registry.internal/db/*,postgres}",
        "--set-json",
        "guardRails.allowedPreloadLibraries=[]",
        "--set",
        "guardRails.allowedExternalHosts={10.0.0.0/8,.db.internal}",
    ])
    .await?;
    let c = &one(&objects, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        env_of(c, "SERVICEDB_ALLOWED_IMAGES").context("allowed images")?["value"],
        "registry.internal/db/*,postgres"
    );
    assert_eq!(
        env_of(c, "SERVICEDB_ALLOWED_PRELOAD_LIBRARIES").context("preload libraries")?["value"],
        ""
    );
    assert_eq!(
        env_of(c, "SERVICEDB_ALLOWED_EXTERNAL_HOSTS").context("external hosts")?["value"],
        "10.0.0.0/8,.db.internal"
    );

    // Optional objects.
    let objects = render(&[
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "nameOverride=sdbop",
    ])
    .await?;
    let monitor = one(&objects, "ServiceMonitor");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "http-metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    let policy = one(&objects, "NetworkPolicy");
    assert_eq!(policy["spec"]["ingress"][0]["ports"][0]["port"], "http");
    let deployment = one(&objects, "Deployment");
    assert_eq!(deployment["metadata"]["name"], "sdb-sdbop");
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"],
        "servicedb-operator"
    );
    Ok(())
}

/// A Helm release in a namespace, uninstalled on drop (best effort, bounded by helm's timeout).
struct Release {
    name: String,
    namespace: String,
    uninstalled: bool,
}

impl Release {
    async fn install(name: &str, namespace: &str, sets: &[String]) -> Result<Self> {
        let chart = chart();
        let chart = chart.to_str().context("chart path is not UTF-8")?;
        let mut args = vec![
            "install",
            name,
            chart,
            "--namespace",
            namespace,
            "--timeout",
            "60s",
        ];
        for s in sets {
            args.extend(["--set", s.as_str()]);
        }
        // The CRDs may already exist (other tests install them): Helm then skips its crds/.
        helm(&args).await?;
        Ok(Release {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            uninstalled: false,
        })
    }

    async fn uninstall(mut self) -> Result<()> {
        helm(&[
            "uninstall",
            &self.name,
            "--namespace",
            &self.namespace,
            "--timeout",
            "60s",
        ])
        .await?;
        self.uninstalled = true;
        Ok(())
    }

    fn fullname(&self) -> String {
        format!("{}-servicedb-operator", self.name)
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if self.uninstalled {
            return;
        }
        let env = support::env();
        let _ = std::process::Command::new(&env.helm)
            .envs(&env.vars)
            .args([
                "uninstall",
                &self.name,
                "--namespace",
                &self.namespace,
                "--timeout",
                "60s",
            ])
            .stdin(Stdio::null())
            .output();
    }
}

#[tokio::test]
async fn helm_install_creates_a_restricted_pod_and_uninstall_removes_everything_but_the_crds()
-> Result<()> {
    let ns = support::TestNamespace::new("helm-install").await?;
    // Pod Security Admission at "restricted": the ReplicaSet controller can create the operator's
    // pod only if its security settings pass the restricted profile.
    Api::<Namespace>::all(ns.client.clone())
        .patch(
            &ns.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            }}})),
        )
        .await?;
    let release =
        Release::install(&format!("helm-{}", support::random_suffix()), &ns.name, &[]).await?;
    let full = release.fullname();
    let client = ns.client.clone();

    // Both CRDs exist: created by Helm from crds/, or already present and skipped by it.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in ["servicedatabases.servicedb.io", "outboxrelays.servicedb.io"] {
        crds.get(name)
            .await
            .with_context(|| format!("CRD {name}"))?;
    }
    ns.api::<ServiceAccount>().get(&full).await?;
    ns.api::<Service>().get(&format!("{full}-metrics")).await?;
    let deployment = ns.api::<Deployment>().get(&full).await?;
    assert_eq!(
        deployment
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("app.kubernetes.io/managed-by"))
            .map(String::as_str),
        Some("Helm")
    );
    let role = Api::<ClusterRole>::all(client.clone()).get(&full).await?;
    assert_eq!(
        serde_json::to_value(&role.rules)?.as_array().map(Vec::len),
        Some(10)
    );
    Api::<ClusterRoleBinding>::all(client.clone())
        .get(&full)
        .await?;
    let lease_role = format!("{full}-leader-election");
    ns.api::<Role>().get(&lease_role).await?;
    ns.api::<RoleBinding>().get(&lease_role).await?;
    ns.api::<PodDisruptionBudget>().get(&full).await?;

    let selector = format!("app.kubernetes.io/instance={}", release.name);
    let pods = ns.api::<Pod>();
    let found = support::wait_until(
        "the operator pod (admitted under the restricted Pod Security profile)",
        support::TIMEOUT,
        || {
            let (pods, selector) = (pods.clone(), selector.clone());
            async move {
                pods.list(&ListParams::default().labels(&selector))
                    .await
                    .ok()?
                    .items
                    .into_iter()
                    .next()
            }
        },
    )
    .await;
    let pod = match found {
        Ok(pod) => pod,
        Err(e) => {
            // Say why: a rejected pod shows up as a ReplicaFailure condition on the ReplicaSet.
            let sets = ns
                .api::<ReplicaSet>()
                .list(&ListParams::default().labels(&selector))
                .await?;
            let conditions: Vec<_> = sets
                .items
                .iter()
                .filter_map(|rs| rs.status.as_ref()?.conditions.clone())
                .collect();
            bail!("{e}; ReplicaSet conditions: {conditions:?}");
        }
    };
    let spec = pod.spec.context("pod spec")?;
    assert_eq!(spec.service_account_name.as_deref(), Some(full.as_str()));

    let name = release.name.clone();
    release.uninstall().await?;
    support::wait_until("the release's objects to be gone", support::TIMEOUT, || {
        let (client, ns_name, full) = (client.clone(), ns.name.clone(), full.clone());
        async move {
            let gone = Api::<Deployment>::namespaced(client.clone(), &ns_name)
                .get_opt(&full)
                .await
                .ok()?
                .is_none()
                && Api::<ServiceAccount>::namespaced(client.clone(), &ns_name)
                    .get_opt(&full)
                    .await
                    .ok()?
                    .is_none()
                && Api::<Service>::namespaced(client.clone(), &ns_name)
                    .get_opt(&format!("{full}-metrics"))
                    .await
                    .ok()?
                    .is_none()
                && Api::<ClusterRole>::all(client.clone())
                    .get_opt(&full)
                    .await
                    .ok()?
                    .is_none()
                && Api::<ClusterRoleBinding>::all(client.clone())
                    .get_opt(&full)
                    .await
                    .ok()?
                    .is_none()
                && Api::<Role>::namespaced(client.clone(), &ns_name)
                    .get_opt(&format!("{full}-leader-election"))
                    .await
                    .ok()?
                    .is_none()
                && Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns_name)
                    .get_opt(&full)
                    .await
                    .ok()?
                    .is_none();
            gone.then_some(())
        }
    })
    .await?;
    let list = helm(&["list", "--namespace", &ns.name, "--all", "--short"]).await?;
    assert!(
        !list.lines().any(|l| l.trim() == name),
        "release still listed: {list}"
    );
    // Helm never deletes CRDs (nor the custom resources in them).
    for crd in ["servicedatabases.servicedb.io", "outboxrelays.servicedb.io"] {
        crds.get(crd)
            .await
            .with_context(|| format!("CRD {crd} after uninstall"))?;
    }
    Ok(())
}

// ---- the RBAC proof ---------------------------------------------------------------------------

/// A kubeconfig that authenticates with a token of `sa` in `namespace`, obtained from the
/// TokenRequest API: the operator then has exactly that ServiceAccount's permissions.
async fn service_account_kubeconfig(namespace: &str, sa: &str, dir: &Path) -> Result<PathBuf> {
    let env = support::env();
    let token = run(
        &env.kubectl,
        &[
            "--namespace",
            namespace,
            "create",
            "token",
            sa,
            "--duration",
            "3600s",
        ],
    )
    .await?;
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testenv", "cluster": {"server": env.var("KUBE_APISERVER_URL"), "certificate-authority": env.var("KUBE_CA_FILE")}}],
        "users": [{"name": sa, "user": {"token": token.trim()}}],
        "contexts": [{"name": sa, "context": {"cluster": "testenv", "user": sa, "namespace": namespace}}],
        "current-context": sa,
    });
    let path = dir.join("kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&kubeconfig)?)?;
    Ok(path)
}

async fn client_from(kubeconfig: &Path) -> Result<kube::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = Kubeconfig::read_from(kubeconfig)?;
    Ok(kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?,
    )?)
}

fn is_forbidden<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> Result<()> {
    match result {
        Err(kube::Error::Api(status)) if status.code == 403 => Ok(()),
        other => bail!("expected 403 Forbidden, got {other:?}"),
    }
}

/// The operator process, configured with the env of the chart's installed Deployment; killed on drop.
struct ChartOperator {
    _child: tokio::process::Child,
    log: PathBuf,
}

impl ChartOperator {
    async fn start(
        deployment: &Deployment,
        kubeconfig: &Path,
        pod_name: &str,
        pod_namespace: &str,
        watch_namespace: &str,
        log: PathBuf,
    ) -> Result<Self> {
        let container = deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| s.containers.first())
            .context("the Deployment has no container")?;
        let mut cmd = tokio::process::Command::new(harness::servicedb_bin());
        cmd.env_clear();
        for var in container.env.iter().flatten() {
            let field = var
                .value_from
                .as_ref()
                .and_then(|f| f.field_ref.as_ref())
                .map(|f| f.field_path.as_str());
            match (var.value.as_deref(), field) {
                (Some(value), _) => cmd.env(&var.name, value),
                (None, Some("metadata.name")) => cmd.env(&var.name, pod_name),
                (None, Some("metadata.namespace")) => cmd.env(&var.name, pod_namespace),
                // `value: ""` comes back from the apiserver without a value; the kubelet sets
                // such a variable to the empty string.
                (None, None) if var.value_from.is_none() => cmd.env(&var.name, ""),
                (None, other) => bail!(
                    "env {} has a source this test does not emulate: {other:?}",
                    var.name
                ),
            };
        }
        // Not a pod: a free loopback port instead of 0.0.0.0:8080. And always one namespace:
        // an all-namespaces operator here would fight the other tests' operators.
        cmd.env("SERVICEDB_LISTEN", "127.0.0.1:0")
            .env("SERVICEDB_WATCH_NAMESPACE", watch_namespace)
            .env("KUBECONFIG", kubeconfig);
        let args = container.args.clone().unwrap_or_default();
        let out = std::fs::File::create(&log)?;
        let child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .kill_on_drop(true)
            .spawn()
            .context("spawning servicedb operator")?;
        Ok(ChartOperator { _child: child, log })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Install the chart (namespace-scoped or cluster-wide), run the operator as its ServiceAccount
/// and drive a ServiceDatabase and an OutboxRelay through their lifecycle.
async fn operator_works_with_exactly_the_charts_rbac(namespace_scoped: bool) -> Result<()> {
    harness::install_crds().await?;
    let system = support::TestNamespace::new("helm-sys").await?;
    let apps = support::TestNamespace::new("helm-apps").await?;
    let admin = apps.client.clone();
    let release_name = format!("rbac-{}", support::random_suffix());
    let mut sets = vec![
        "image.tag=test".to_owned(),
        "resyncSeconds=20".to_owned(),
        "concurrency=2".to_owned(),
    ];
    if namespace_scoped {
        sets.push(format!("watchNamespace={}", apps.name));
    }
    let release = Release::install(&release_name, &system.name, &sets).await?;
    let sa = release.fullname();
    let deployment = system.api::<Deployment>().get(&sa).await?;
    if namespace_scoped {
        Api::<Role>::namespaced(admin.clone(), &apps.name)
            .get(&sa)
            .await?;
        Api::<RoleBinding>::namespaced(admin.clone(), &apps.name)
            .get(&sa)
            .await?;
        Api::<ClusterRole>::all(admin.clone())
            .get(&format!("{sa}-crds"))
            .await?;
    }

    let dir = tempfile::tempdir()?;
    let kubeconfig = service_account_kubeconfig(&system.name, &sa, dir.path()).await?;
    let as_sa = client_from(&kubeconfig).await?;

    // The identity is really the ServiceAccount, and it is refused what the role does not grant.
    is_forbidden(
        Api::<Node>::all(as_sa.clone())
            .list(&ListParams::default())
            .await,
    )?;
    is_forbidden(
        Api::<CustomResourceDefinition>::all(as_sa.clone())
            .list(&ListParams::default())
            .await,
    )?;
    let dry_run = DeleteParams {
        dry_run: true,
        ..DeleteParams::default()
    };
    is_forbidden(
        Api::<CustomResourceDefinition>::all(as_sa.clone())
            .delete("servicedatabases.servicedb.io", &dry_run)
            .await,
    )?;
    is_forbidden(
        Api::<ClusterRole>::all(as_sa.clone())
            .list(&ListParams::default())
            .await,
    )?;
    is_forbidden(
        Api::<Pod>::namespaced(as_sa.clone(), &apps.name)
            .get("anything")
            .await,
    )?;
    is_forbidden(
        Api::<Pod>::namespaced(as_sa.clone(), &apps.name)
            .delete("anything", &dry_run)
            .await,
    )?;
    is_forbidden(
        Api::<Deployment>::namespaced(as_sa.clone(), &apps.name)
            .delete("anything", &dry_run)
            .await,
    )?;
    is_forbidden(
        Api::<ServiceDatabase>::namespaced(as_sa.clone(), &apps.name)
            .delete("anything", &dry_run)
            .await,
    )?;
    // It may read the two CRDs by name (the start-up check).
    Api::<CustomResourceDefinition>::all(as_sa.clone())
        .get("outboxrelays.servicedb.io")
        .await?;
    if namespace_scoped {
        // Nothing outside the watched namespace, not even in its own.
        is_forbidden(
            Api::<Secret>::namespaced(as_sa.clone(), &system.name)
                .list(&ListParams::default())
                .await,
        )?;
        is_forbidden(
            Api::<Secret>::all(as_sa.clone())
                .list(&ListParams::default())
                .await,
        )?;
        is_forbidden(
            Api::<ServiceDatabase>::all(as_sa.clone())
                .list(&ListParams::default())
                .await,
        )?;
    } else {
        Api::<ServiceDatabase>::all(as_sa.clone())
            .list(&ListParams::default())
            .await?;
    }

    let env = support::env();
    let pod_name = format!("{sa}-5d8f7c9b4-{}", support::random_suffix());
    let log = env
        .dir
        .join("logs")
        .join(format!("operator-{release_name}.log"));
    let operator = ChartOperator::start(
        &deployment,
        &kubeconfig,
        &pod_name,
        &system.name,
        &apps.name,
        log,
    )
    .await?;
    let result = async {
        drive(&apps, &admin, &pod_name).await?;
        // It reconciled as the leader: the chart's Lease in its own namespace names this pod.
        let lease = Api::<Lease>::namespaced(admin.clone(), &system.name)
            .get(&sa)
            .await
            .context("the chart's Lease")?;
        let holder = lease
            .spec
            .and_then(|s| s.holder_identity)
            .unwrap_or_default();
        ensure!(
            holder.starts_with(&format!("{pod_name}_")),
            "Lease held by {holder:?}"
        );
        anyhow::Ok(())
    }
    .await;
    let log = operator.log_text();
    drop(operator);
    if result.is_err() {
        // The operator is gone: let the namespace's deletion not wait on its finalizers.
        strip_finalizers(&apps).await;
    }
    result.with_context(|| format!("operator log:\n{log}"))?;
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the operator was refused something:\n{log}"
    );
    release.uninstall().await?;
    Ok(())
}

/// Best effort: remove the finalizers of every CR in the namespace (after a failed test).
async fn strip_finalizers(ns: &support::TestNamespace) {
    let patch = Patch::Merge(json!({"metadata": {"finalizers": null}}));
    if let Ok(list) = ns.api::<OutboxRelay>().list(&ListParams::default()).await {
        for r in list.items {
            let _ = ns
                .api::<OutboxRelay>()
                .patch(&r.name_any(), &PatchParams::default(), &patch)
                .await;
        }
    }
    if let Ok(list) = ns
        .api::<ServiceDatabase>()
        .list(&ListParams::default())
        .await
    {
        for s in list.items {
            let _ = ns
                .api::<ServiceDatabase>()
                .patch(&s.name_any(), &PatchParams::default(), &patch)
                .await;
        }
    }
}

async fn drive(apps: &support::TestNamespace, admin: &kube::Client, pod_name: &str) -> Result<()> {
    let env = support::env();
    harness::create_admin_secret(apps, "pg-admin").await?;
    let service = format!("helm-{}", support::random_suffix());
    let sdb: ServiceDatabase =
        serde_json::from_value(harness::external_sdb("orders", &service, "Delete"))?;
    let sdbs = apps.api::<ServiceDatabase>();
    sdbs.create(&PostParams::default(), &sdb).await?;
    let ready = harness::wait_condition(&sdbs, "orders", "Ready", "True", support::TIMEOUT).await?;
    let status = ready.status.context("status")?;
    assert_eq!(
        status.database.as_deref(),
        Some(service.replace('-', "_").as_str())
    );
    for secret in ["orders-app", "orders-relay"] {
        apps.api::<Secret>()
            .get(secret)
            .await
            .with_context(|| format!("Secret {secret}"))?;
    }
    let uri = harness::secret_string(&apps.api::<Secret>().get("orders-app").await?, "uri")?;
    harness::connect_uri(&uri)
        .await?
        .batch_execute("SELECT 1 FROM outbox LIMIT 1")
        .await?;

    let relay: OutboxRelay = serde_json::from_value(json!({
        "apiVersion": "servicedb.io/v1alpha1",
        "kind": "OutboxRelay",
        "metadata": {"name": "orders-events"},
        "spec": {
            "databaseRef": {"name": "orders"},
            "mode": "Poll",
            "sink": {"kafka": {"bootstrapServers": env.kafka_bootstrap_servers, "topic": "orders.{aggregatetype}"}},
        }
    }))?;
    let relays = apps.api::<OutboxRelay>();
    relays.create(&PostParams::default(), &relay).await?;
    let deployments = apps.api::<Deployment>();
    let deployment = support::wait_until("the relay Deployment", support::TIMEOUT, || {
        let deployments = deployments.clone();
        async move {
            deployments
                .get_opt("orders-events-relay")
                .await
                .ok()
                .flatten()
        }
    })
    .await?;
    let image = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.clone());
    assert_eq!(
        image.as_deref(),
        Some("ghcr.io/servicedb/servicedb-operator:test"),
        "relays run the operator's image"
    );
    apps.api::<ServiceAccount>()
        .get("orders-events-relay")
        .await?;
    apps.api::<ConfigMap>()
        .get("orders-events-relay-config")
        .await?;
    // Status of the relay written (no kubelet: its pods never become ready).
    harness::wait_condition(
        &relays,
        "orders-events",
        "DatabaseReady",
        "True",
        support::TIMEOUT,
    )
    .await?;

    // Events through events.k8s.io, reported by this operator instance (POD_NAME).
    let events: Api<Event> = Api::namespaced(admin.clone(), &apps.name);
    support::wait_until("an Event from the operator", support::TIMEOUT, || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items.into_iter().find(|e| {
                e.reporting_controller.as_deref() == Some("servicedb-operator")
                    && e.reporting_instance.as_deref() == Some(pod_name)
            })
        }
    })
    .await?;

    // Finalizers: deletion goes through the operator's cleanup (Delete drops the database).
    relays
        .delete("orders-events", &DeleteParams::default())
        .await?;
    sdbs.delete("orders", &DeleteParams::default()).await?;
    support::wait_until("both objects to be deleted", support::TIMEOUT, || {
        let (relays, sdbs) = (relays.clone(), sdbs.clone());
        async move {
            let gone = relays.get_opt("orders-events").await.ok()?.is_none()
                && sdbs.get_opt("orders").await.ok()?.is_none();
            gone.then_some(())
        }
    })
    .await?;
    let pg = support::pg_connect(&env.pg_config("postgres")).await?;
    let db = service.replace('-', "_");
    let exists = pg
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
        .await?
        .is_some();
    ensure!(!exists, "database {db} was not dropped");
    Ok(())
}

#[tokio::test]
async fn operator_running_as_the_charts_namespaced_service_account_reconciles_and_is_refused_the_rest()
-> Result<()> {
    operator_works_with_exactly_the_charts_rbac(true).await
}

#[tokio::test]
async fn operator_running_as_the_charts_cluster_service_account_reconciles_and_is_refused_the_rest()
-> Result<()> {
    operator_works_with_exactly_the_charts_rbac(false).await
}
