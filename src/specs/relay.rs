//! Builders for an OutboxRelay: its config file, ConfigMap, ServiceAccount and Deployment (pure, no I/O).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, PodSpec, PodTemplateSpec, Probe, SecretKeySelector, ServiceAccount, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::instance::{DATABASE_LABEL, RELAY_COMPONENT};
use super::labels::{selector_labels, standard_labels};
use super::pod;
use crate::api::outbox_relay::{
    DEFAULT_BATCH_SIZE, DEFAULT_POLL_INTERVAL_MS, OutboxRelaySpec, RelayMode,
};
use crate::postgres::identifiers::{
    FUNCTIONS_SCHEMA, QualifiedName, outbox_publication, relay_slot_name,
};
use crate::relay::config::RelayConfig;

/// Where the config file is mounted in the relay container.
pub const CONFIG_DIR: &str = "/etc/servicedb";
/// The config file's key in the ConfigMap and name in [`CONFIG_DIR`].
pub const CONFIG_KEY: &str = "relay.yaml";
/// The port of /healthz, /readyz and /metrics.
pub const METRICS_PORT: i32 = 9090;
/// The uid the relay runs as (the distroless `nonroot` user).
pub const RELAY_UID: i64 = 65532;
/// The pod annotation whose change rolls the relay pods.
pub const CHECKSUM_ANNOTATION: &str = "servicedb.io/config-checksum";
/// Where the `-relay` Secret's `ca.crt` is mounted (read-only) when it has one.
pub const CA_DIR: &str = "/etc/servicedb-ca";
/// libpq environment variables and the credential Secret keys they come from.
pub const PG_ENV: [(&str, &str); 6] = [
    ("PGHOST", "host"),
    ("PGPORT", "port"),
    ("PGDATABASE", "database"),
    ("PGUSER", "username"),
    ("PGPASSWORD", "password"),
    ("PGSSLMODE", "sslmode"),
];

/// Names of an OutboxRelay's children.
#[derive(Clone, Debug)]
pub struct RelayNames {
    base: String,
}

impl RelayNames {
    /// Names for the OutboxRelay called `base`.
    pub fn new(base: &str) -> Self {
        RelayNames {
            base: base.to_owned(),
        }
    }
    /// Deployment and ServiceAccount.
    pub fn deployment(&self) -> String {
        format!("{}-relay", self.base)
    }
    /// ConfigMap with the config file.
    pub fn config_map(&self) -> String {
        format!("{}-relay-config", self.base)
    }
}

/// The replication slot a Logical relay owns; named in `crate::postgres::identifiers` with the
/// other names derived for Postgres (kept here under its old name for existing callers).
pub use crate::postgres::identifiers::relay_slot_name as slot_name;

/// The relay config the Deployment runs with.
///
/// The publication and slot names come from `crate::postgres::identifiers`, the functions the
/// provisioner creates them with, so the relay and the database can never disagree on a name.
pub fn relay_config(
    spec: &OutboxRelaySpec,
    namespace: &str,
    relay_name: &str,
    database: &str,
    outbox_table: &str,
) -> RelayConfig {
    // Admission and the ServiceDatabase controller validated the table name; should it still
    // not parse, it is passed on as written and the relay refuses it with the reason.
    let table = QualifiedName::parse(outbox_table).ok();
    let logical = spec.mode == RelayMode::Logical;
    RelayConfig {
        mode: spec.mode,
        table: table
            .as_ref()
            .map_or_else(|| outbox_table.to_owned(), ToString::to_string),
        // The CRD bounds both (1..10000, 10..60000), so the fallback is for objects that
        // bypassed admission.
        batch_size: u32::try_from(spec.batch_size).unwrap_or(DEFAULT_BATCH_SIZE.into()),
        poll_interval_ms: u64::try_from(spec.poll_interval_ms)
            .unwrap_or(DEFAULT_POLL_INTERVAL_MS.into()),
        sink: spec.sink.clone(),
        format: spec.format,
        source: format!("/servicedb/{namespace}/{database}"),
        slot: logical.then(|| relay_slot_name(namespace, relay_name)),
        publication: table
            .as_ref()
            .filter(|_| logical)
            .map(|t| outbox_publication(t).to_string()),
        listen: format!("0.0.0.0:{METRICS_PORT}"),
        dead_letter: None,
        // The relay role has no privilege on the outbox itself: it goes through the outbox
        // owner's functions (see the README, "Roles: who may do what").
        functions_schema: Some(FUNCTIONS_SCHEMA.to_owned()),
    }
}

/// Everything the Deployment builder needs.
#[derive(Clone, Debug)]
pub struct RelayParams<'a> {
    /// OutboxRelay name.
    pub name: &'a str,
    /// Namespace.
    pub namespace: &'a str,
    /// Controller ownerReference to the OutboxRelay.
    pub owner: Option<OwnerReference>,
    /// The spec.
    pub spec: &'a OutboxRelaySpec,
    /// The ServiceDatabase published.
    pub database: &'a str,
    /// The relay credentials Secret of that ServiceDatabase.
    pub relay_secret: &'a str,
    /// Image (the operator's own).
    pub image: &'a str,
    /// Checksum of the config file and the Secret's contents: a change rolls the pods.
    pub checksum: String,
    /// The relay Secret carries `ca.crt`: mount it and point `PGSSLROOTCERT` at it.
    pub ca: bool,
}

fn meta(name: String, p: &RelayParams<'_>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(p.namespace.to_owned()),
        labels: Some(standard_labels(RELAY_COMPONENT, p.name)),
        owner_references: p.owner.clone().map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// The ConfigMap holding the config file.
pub fn config_map(p: &RelayParams<'_>, config_yaml: String) -> ConfigMap {
    ConfigMap {
        metadata: meta(RelayNames::new(p.name).config_map(), p),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_owned(), config_yaml)])),
        ..ConfigMap::default()
    }
}

/// The ServiceAccount: the relay needs no Kubernetes API access, so no token is mounted.
pub fn service_account(p: &RelayParams<'_>) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(RelayNames::new(p.name).deployment(), p),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

fn http_probe(path: &str, period: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("metrics".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(3),
        ..Probe::default()
    }
}

/// The Deployment running `servicedb relay --config /etc/servicedb/relay.yaml`.
pub fn deployment(p: &RelayParams<'_>) -> Deployment {
    let names = RelayNames::new(p.name);
    let mut pod_labels = standard_labels(RELAY_COMPONENT, p.name);
    pod_labels.insert(DATABASE_LABEL.to_owned(), p.database.to_owned());
    let env = PG_ENV
        .iter()
        .map(|(var, key)| EnvVar {
            name: (*var).to_owned(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: p.relay_secret.to_owned(),
                    key: (*key).to_owned(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        })
        .chain([EnvVar {
            name: "RUST_LOG".to_owned(),
            value: Some("info".to_owned()),
            ..EnvVar::default()
        }])
        .chain(p.ca.then(|| EnvVar {
            name: "PGSSLROOTCERT".to_owned(),
            value: Some(format!("{CA_DIR}/{}", super::credentials::CA_CERT_KEY)),
            ..EnvVar::default()
        }))
        .collect();
    let mut mounts = vec![
        pod::mount("config", CONFIG_DIR, true),
        pod::mount("tmp", "/tmp", false),
    ];
    let mut volumes = vec![
        Volume {
            name: "config".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.config_map(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        pod::empty_dir("tmp"),
    ];
    if p.ca {
        mounts.push(pod::mount("ca", CA_DIR, true));
        volumes.push(Volume {
            name: "ca".to_owned(),
            // Only the CA: the password stays in the environment, never in a file.
            secret: Some(k8s_openapi::api::core::v1::SecretVolumeSource {
                secret_name: Some(p.relay_secret.to_owned()),
                items: Some(vec![k8s_openapi::api::core::v1::KeyToPath {
                    key: super::credentials::CA_CERT_KEY.to_owned(),
                    path: super::credentials::CA_CERT_KEY.to_owned(),
                    ..Default::default()
                }]),
                default_mode: Some(0o444),
                ..Default::default()
            }),
            ..Volume::default()
        });
    }
    let container = Container {
        name: "relay".to_owned(),
        image: Some(p.image.to_owned()),
        args: Some(vec![
            "relay".to_owned(),
            "--config".to_owned(),
            format!("{CONFIG_DIR}/{CONFIG_KEY}"),
        ]),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".to_owned()),
            container_port: METRICS_PORT,
            ..ContainerPort::default()
        }]),
        resources: p.spec.resources.clone(),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        security_context: Some(pod::restricted_container(RELAY_UID)),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    Deployment {
        metadata: meta(names.deployment(), p),
        spec: Some(DeploymentSpec {
            replicas: Some(p.spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(RELAY_COMPONENT, p.name)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([(
                        CHECKSUM_ANNOTATION.to_owned(),
                        p.checksum.clone(),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    service_account_name: Some(names.deployment()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(30),
                    security_context: Some(pod::restricted_pod(None)),
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> OutboxRelaySpec {
        serde_json::from_value(serde_json::json!({
            "databaseRef": {"name": "orders"},
            "sink": {"kafka": {"bootstrapServers": "k:9092"}}
        }))
        .unwrap()
    }

    #[test]
    fn a_relay_secret_with_a_ca_is_mounted_read_only_and_named_by_pgsslrootcert() {
        let spec = spec();
        let mut p = RelayParams {
            name: "orders-events",
            namespace: "shop",
            owner: None,
            spec: &spec,
            database: "orders",
            relay_secret: "orders-relay",
            image: "servicedb:dev",
            checksum: "x".into(),
            ca: true,
        };
        let d = deployment(&p);
        let pod = d.spec.unwrap().template.spec.unwrap();
        let c = &pod.containers[0];
        let env = c.env.clone().unwrap();
        let root = env.iter().find(|e| e.name == "PGSSLROOTCERT").unwrap();
        assert_eq!(root.value.as_deref(), Some("/etc/servicedb-ca/ca.crt"));
        assert!(env.iter().any(|e| e.name == "PGSSLMODE"));
        let m = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.mount_path == CA_DIR)
            .unwrap();
        assert_eq!(m.read_only, Some(true));
        let v = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == m.name)
            .unwrap();
        let secret = v.secret.unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("orders-relay"));
        let items = secret.items.unwrap();
        assert_eq!(items.len(), 1, "only ca.crt, never the password");
        assert_eq!(items[0].key, "ca.crt");

        p.ca = false;
        let d = deployment(&p);
        let c = &d.spec.unwrap().template.spec.unwrap().containers[0];
        assert!(
            !c.env
                .clone()
                .unwrap()
                .iter()
                .any(|e| e.name == "PGSSLROOTCERT")
        );
    }
}
