//! Builders for a managed Postgres instance: StatefulSet, Services, ConfigMap, NetworkPolicy (pure, no I/O).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSpec, PodTemplateSpec, Probe,
    SecretKeySelector, SecretVolumeSource, Service, ServicePort, ServiceSpec, Volume,
    VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::labels::{DatabaseNames, selector_labels, standard_labels};
use super::pod;
use crate::api::service_database::{CdcSpec, DeletionPolicy, ManagedInstance};

/// The Postgres port inside the pod and on the Services.
pub const POSTGRES_PORT: i32 = 5432;
/// The uid of the `postgres` user in the official images (Debian and Alpine variants).
pub const POSTGRES_UID: i64 = 999;
/// Component label value of instance pods.
pub const POSTGRES_COMPONENT: &str = "postgres";
/// Component label value of relay pods; the NetworkPolicy admits them.
pub const RELAY_COMPONENT: &str = "relay";
/// Label put on relay pods naming the ServiceDatabase they publish, so the NetworkPolicy can admit
/// exactly the relays of this database.
pub const DATABASE_LABEL: &str = "servicedb.io/database";
/// Label that admits Kafka Connect pods running a ServiceDatabase's CDC connector; its value is
/// `<namespace>.<servicedatabase>`.
pub const CDC_ACCESS_LABEL: &str = "servicedb.io/cdc-access";
/// The key of the superuser Secret holding the bootstrap SQL run on first start.
pub const BOOTSTRAP_KEY: &str = "bootstrap.sql";
/// Where the data volume is mounted; PGDATA is a subdirectory so `lost+found` never bothers initdb.
const DATA_MOUNT: &str = "/var/lib/postgresql/data";
/// Where the server certificate Secret (`<name>-db-tls`) is mounted.
pub const TLS_MOUNT: &str = "/etc/servicedb-tls";
/// Mode of the mounted certificate files. The kubelet writes Secret files as root and, with the
/// pod's `fsGroup` (999), makes them group-owned by it: `root:999 0640`, which Postgres accepts
/// for a key (owned by root, not world-readable) and can read through the group.
pub const TLS_FILE_MODE: i32 = 0o640;

/// Everything the instance builders need, already validated.
#[derive(Clone, Debug)]
pub struct InstanceParams<'a> {
    /// ServiceDatabase name.
    pub name: &'a str,
    /// Namespace.
    pub namespace: &'a str,
    /// Controller ownerReference to the ServiceDatabase.
    pub owner: Option<OwnerReference>,
    /// The managed instance spec.
    pub managed: &'a ManagedInstance,
    /// Deletion policy: decides whether the volume outlives the StatefulSet.
    pub deletion_policy: DeletionPolicy,
    /// Whether a Logical relay or CDC needs `wal_level=logical`.
    pub logical_decoding: bool,
    /// Pods of the owning service allowed in.
    pub owner_pods: LabelSelector,
    /// Namespace the operator runs in (admitted by the NetworkPolicy), if known.
    pub operator_namespace: Option<&'a str>,
    /// CDC settings: Kafka Connect pods labelled for this database are admitted only when set.
    pub cdc: Option<&'a CdcSpec>,
    /// A checksum of the configuration, put on the pod template so a change restarts the pod.
    pub config_checksum: String,
}

fn meta(name: String, p: &InstanceParams<'_>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(p.namespace.to_owned()),
        labels: Some(standard_labels(POSTGRES_COMPONENT, p.name)),
        owner_references: p.owner.clone().map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// The image for the instance: the spec's, or the official `postgres:<major>`.
pub fn image(managed: &ManagedInstance) -> String {
    managed
        .image
        .clone()
        .unwrap_or_else(|| format!("postgres:{}", managed.version))
}

/// `pg_hba.conf`: TLS and scram-sha-256 over TCP for everyone (`hostssl`: a plaintext TCP
/// connection matches no line and is refused; the NetworkPolicy decides who reaches the port),
/// local socket trust only for the entrypoint's bootstrap.
pub fn pg_hba_conf() -> String {
    [
        "# Managed by servicedb-operator.",
        "local   all             all                                     trust",
        "hostssl all             all             127.0.0.1/32            scram-sha-256",
        "hostssl all             all             ::1/128                 scram-sha-256",
        "hostssl all             all             0.0.0.0/0               scram-sha-256",
        "hostssl all             all             ::/0                    scram-sha-256",
        "hostssl replication     all             0.0.0.0/0               scram-sha-256",
        "hostssl replication     all             ::/0                    scram-sha-256",
        "",
    ]
    .join("\n")
}

/// Server settings passed as `-c key=value` arguments: the user's parameters first, then the
/// settings the operator owns (which the CRD forbids users to set).
pub fn server_settings(p: &InstanceParams<'_>) -> Vec<(String, String)> {
    let mut settings: Vec<(String, String)> = p
        .managed
        .parameters
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    settings.push((
        "hba_file".to_owned(),
        "/etc/servicedb/pg_hba.conf".to_owned(),
    ));
    settings.push(("password_encryption".to_owned(), "scram-sha-256".to_owned()));
    settings.push(("listen_addresses".to_owned(), "*".to_owned()));
    // TLS with the certificate the operator issues (specs::tls); TLS 1.0/1.1 are refused.
    settings.push(("ssl".to_owned(), "on".to_owned()));
    settings.push(("ssl_cert_file".to_owned(), format!("{TLS_MOUNT}/tls.crt")));
    settings.push(("ssl_key_file".to_owned(), format!("{TLS_MOUNT}/tls.key")));
    settings.push(("ssl_min_protocol_version".to_owned(), "TLSv1.2".to_owned()));
    if p.logical_decoding {
        settings.push(("wal_level".to_owned(), "logical".to_owned()));
        // A relay or connector that stops consuming must never fill the disk with WAL.
        if !p.managed.parameters.contains_key("max_slot_wal_keep_size") {
            settings.push(("max_slot_wal_keep_size".to_owned(), "1GB".to_owned()));
        }
    }
    settings
}

/// The ConfigMap holding `pg_hba.conf`.
pub fn config_map(p: &InstanceParams<'_>) -> ConfigMap {
    let names = DatabaseNames::new(p.name);
    ConfigMap {
        metadata: meta(names.config_map(), p),
        data: Some(BTreeMap::from([("pg_hba.conf".to_owned(), pg_hba_conf())])),
        ..ConfigMap::default()
    }
}

/// The ClusterIP Service applications connect to.
pub fn service(p: &InstanceParams<'_>) -> Service {
    let names = DatabaseNames::new(p.name);
    Service {
        metadata: meta(names.instance(), p),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(POSTGRES_COMPONENT, p.name)),
            ports: Some(vec![ServicePort {
                name: Some("postgres".to_owned()),
                port: POSTGRES_PORT,
                target_port: Some(IntOrString::String("postgres".to_owned())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The headless Service the StatefulSet's pod is named under.
pub fn headless_service(p: &InstanceParams<'_>) -> Service {
    let names = DatabaseNames::new(p.name);
    Service {
        metadata: meta(names.headless_service(), p),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(POSTGRES_COMPONENT, p.name)),
            ports: Some(vec![ServicePort {
                name: Some("postgres".to_owned()),
                port: POSTGRES_PORT,
                target_port: Some(IntOrString::String("postgres".to_owned())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn pg_isready_probe(period: i32, failure_threshold: i32, initial_delay: i32) -> Probe {
    Probe {
        exec: Some(ExecAction {
            // -h 127.0.0.1: during bootstrap the entrypoint's temporary server listens on the
            // socket only, so the pod turns ready only once bootstrap is complete.
            command: Some(
                [
                    "pg_isready",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    "5432",
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                ]
                .map(str::to_owned)
                .to_vec(),
            ),
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failure_threshold),
        initial_delay_seconds: Some(initial_delay),
        timeout_seconds: Some(5),
        ..Probe::default()
    }
}

/// The StatefulSet running one Postgres pod with its volume.
pub fn stateful_set(p: &InstanceParams<'_>) -> StatefulSet {
    let names = DatabaseNames::new(p.name);
    let superuser_secret = names.superuser_secret();
    let mut pod_labels = standard_labels(POSTGRES_COMPONENT, p.name);
    pod_labels.insert(DATABASE_LABEL.to_owned(), p.name.to_owned());
    let args: Vec<String> = server_settings(p)
        .into_iter()
        .flat_map(|(k, v)| ["-c".to_owned(), format!("{k}={v}")])
        .collect();
    let env = vec![
        EnvVar {
            name: "POSTGRES_PASSWORD".to_owned(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: superuser_secret.clone(),
                    key: super::credentials::PASSWORD_KEY.to_owned(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
        EnvVar {
            name: "PGDATA".to_owned(),
            value: Some(format!("{DATA_MOUNT}/pgdata")),
            ..EnvVar::default()
        },
        EnvVar {
            name: "POSTGRES_INITDB_ARGS".to_owned(),
            value: Some("--auth-host=scram-sha-256 --auth-local=trust".to_owned()),
            ..EnvVar::default()
        },
    ];
    let container = Container {
        name: "postgres".to_owned(),
        image: Some(image(p.managed)),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("postgres".to_owned()),
            container_port: POSTGRES_PORT,
            ..ContainerPort::default()
        }]),
        resources: p.managed.resources.clone(),
        readiness_probe: Some(pg_isready_probe(5, 3, 5)),
        liveness_probe: Some(pg_isready_probe(10, 6, 30)),
        security_context: Some(pod::restricted_container(POSTGRES_UID)),
        volume_mounts: Some(vec![
            pod::mount("data", DATA_MOUNT, false),
            pod::mount("config", "/etc/servicedb", true),
            pod::mount("bootstrap", "/docker-entrypoint-initdb.d", true),
            pod::mount("tls", TLS_MOUNT, true),
            // The read-only root filesystem needs writable socket and scratch directories.
            pod::mount("run", "/var/run/postgresql", false),
            pod::mount("tmp", "/tmp", false),
        ]),
        ..Container::default()
    };
    let volumes = vec![
        Volume {
            name: "config".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.config_map(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "bootstrap".to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(superuser_secret),
                items: Some(vec![k8s_openapi::api::core::v1::KeyToPath {
                    key: BOOTSTRAP_KEY.to_owned(),
                    path: "10-servicedb-bootstrap.sql".to_owned(),
                    ..Default::default()
                }]),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tls".to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names.tls_secret()),
                items: Some(
                    ["tls.crt", "tls.key"]
                        .map(|k| k8s_openapi::api::core::v1::KeyToPath {
                            key: k.to_owned(),
                            path: k.to_owned(),
                            ..Default::default()
                        })
                        .to_vec(),
                ),
                default_mode: Some(TLS_FILE_MODE),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        pod::empty_dir("run"),
        pod::empty_dir("tmp"),
    ];
    let retention = match p.deletion_policy {
        DeletionPolicy::Retain => "Retain",
        DeletionPolicy::Delete => "Delete",
    };
    StatefulSet {
        metadata: meta(names.instance(), p),
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(names.headless_service()),
            selector: LabelSelector {
                match_labels: Some(selector_labels(POSTGRES_COMPONENT, p.name)),
                ..LabelSelector::default()
            },
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(retention.to_owned()),
                    when_scaled: Some("Retain".to_owned()),
                },
            ),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([(
                        "servicedb.io/config-checksum".to_owned(),
                        p.config_checksum.clone(),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(volumes),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(60),
                    security_context: Some(pod::restricted_pod(Some(POSTGRES_UID))),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some("data".to_owned()),
                    labels: Some(standard_labels(POSTGRES_COMPONENT, p.name)),
                    ..ObjectMeta::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
                    storage_class_name: p.managed.storage.storage_class_name.clone(),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([(
                            "storage".to_owned(),
                            Quantity(p.managed.storage.size.clone()),
                        )])),
                        ..VolumeResourceRequirements::default()
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                ..PersistentVolumeClaim::default()
            }]),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

/// The NetworkPolicy: default-deny ingress to the instance, then port 5432 from the owner's pods,
/// this database's relay pods, the operator, and — only when `cdc` is set — Kafka Connect pods
/// labelled for this database's CDC in `cdc.kafkaConnect.namespace` (default: this namespace).
/// Any pod can carry any label, so the label alone must never admit pods from every namespace.
pub fn network_policy(p: &InstanceParams<'_>) -> NetworkPolicy {
    let names = DatabaseNames::new(p.name);
    let mut relay_labels = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            RELAY_COMPONENT.to_owned(),
        ),
        (
            "app.kubernetes.io/part-of".to_owned(),
            super::labels::PART_OF.to_owned(),
        ),
    ]);
    relay_labels.insert(DATABASE_LABEL.to_owned(), p.name.to_owned());
    let mut peers = vec![
        NetworkPolicyPeer {
            pod_selector: Some(p.owner_pods.clone()),
            ..NetworkPolicyPeer::default()
        },
        NetworkPolicyPeer {
            pod_selector: Some(LabelSelector {
                match_labels: Some(relay_labels),
                ..LabelSelector::default()
            }),
            ..NetworkPolicyPeer::default()
        },
    ];
    if let Some(cdc) = p.cdc {
        // No namespaceSelector means the policy's own namespace.
        let namespace_selector = cdc
            .kafka_connect
            .namespace
            .as_deref()
            .filter(|ns| *ns != p.namespace)
            .map(|ns| LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "kubernetes.io/metadata.name".to_owned(),
                    ns.to_owned(),
                )])),
                ..LabelSelector::default()
            });
        peers.push(NetworkPolicyPeer {
            namespace_selector,
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    CDC_ACCESS_LABEL.to_owned(),
                    format!("{}.{}", p.namespace, p.name),
                )])),
                ..LabelSelector::default()
            }),
            ..NetworkPolicyPeer::default()
        });
    }
    if let Some(op_ns) = p.operator_namespace {
        peers.push(NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "kubernetes.io/metadata.name".to_owned(),
                    op_ns.to_owned(),
                )])),
                ..LabelSelector::default()
            }),
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/name".to_owned(),
                    "servicedb-operator".to_owned(),
                )])),
                ..LabelSelector::default()
            }),
            ..NetworkPolicyPeer::default()
        });
    }
    NetworkPolicy {
        metadata: meta(names.instance(), p),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(POSTGRES_COMPONENT, p.name)),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(peers),
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(POSTGRES_PORT)),
                    protocol: Some("TCP".to_owned()),
                    ..NetworkPolicyPort::default()
                }]),
            }]),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// The default selector of the owner's pods: `app.kubernetes.io/name: <service>`.
pub fn default_owner_selector(service: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([(
            "app.kubernetes.io/name".to_owned(),
            service.to_owned(),
        )])),
        ..LabelSelector::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::service_database::{KafkaConnectRef, QualifiedTable, StorageSpec};

    fn managed() -> ManagedInstance {
        ManagedInstance {
            version: 17,
            image: None,
            storage: StorageSpec {
                size: "1Gi".to_owned(),
                storage_class_name: None,
            },
            resources: None,
            parameters: BTreeMap::new(),
        }
    }

    fn cdc(namespace: Option<&str>) -> CdcSpec {
        CdcSpec {
            tables: vec![QualifiedTable("public.orders".to_owned())],
            kafka_connect: KafkaConnectRef {
                url: "http://connect.kafka:8083".to_owned(),
                namespace: namespace.map(str::to_owned),
                basic_auth_secret_ref: None,
                ca_secret_ref: None,
            },
            topic_prefix: "cdc.orders".to_owned(),
            secret_provider: None,
            ssl_root_cert_path: None,
            settings: BTreeMap::new(),
            lag_warning_bytes: None,
        }
    }

    fn peers(cdc: Option<&CdcSpec>) -> Vec<NetworkPolicyPeer> {
        let m = managed();
        let p = InstanceParams {
            name: "orders",
            namespace: "shop",
            owner: None,
            managed: &m,
            deletion_policy: DeletionPolicy::Retain,
            logical_decoding: false,
            owner_pods: default_owner_selector("orders"),
            operator_namespace: Some("servicedb-system"),
            cdc,
            config_checksum: String::new(),
        };
        network_policy(&p)
            .spec
            .and_then(|s| s.ingress)
            .and_then(|i| i.into_iter().next())
            .and_then(|r| r.from)
            .unwrap_or_default()
    }

    fn cdc_peers(peers: &[NetworkPolicyPeer]) -> Vec<&NetworkPolicyPeer> {
        peers
            .iter()
            .filter(|p| {
                p.pod_selector
                    .as_ref()
                    .and_then(|s| s.match_labels.as_ref())
                    .is_some_and(|l| l.contains_key(CDC_ACCESS_LABEL))
            })
            .collect()
    }

    #[test]
    fn without_cdc_no_cdc_access_peer_is_admitted() {
        assert!(cdc_peers(&peers(None)).is_empty());
    }

    #[test]
    fn cdc_access_is_admitted_from_the_own_namespace_by_default() {
        let c = cdc(None);
        let all = peers(Some(&c));
        let found = cdc_peers(&all);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].namespace_selector, None, "own namespace only");
        assert_eq!(
            found[0]
                .pod_selector
                .as_ref()
                .and_then(|s| s.match_labels.clone()),
            Some(BTreeMap::from([(
                CDC_ACCESS_LABEL.to_owned(),
                "shop.orders".to_owned()
            )]))
        );
        // Naming the own namespace is the same.
        let c = cdc(Some("shop"));
        assert_eq!(cdc_peers(&peers(Some(&c)))[0].namespace_selector, None);
    }

    #[test]
    fn cdc_access_from_another_namespace_names_exactly_that_namespace() {
        let c = cdc(Some("kafka"));
        let all = peers(Some(&c));
        let found = cdc_peers(&all);
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0]
                .namespace_selector
                .as_ref()
                .and_then(|s| s.match_labels.clone()),
            Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_owned(),
                "kafka".to_owned()
            )]))
        );
    }

    #[test]
    fn no_peer_admits_every_namespace() {
        let c = cdc(Some("kafka"));
        for peer in peers(Some(&c)) {
            if let Some(ns) = &peer.namespace_selector {
                assert!(
                    ns.match_labels.as_ref().is_some_and(|l| !l.is_empty()),
                    "a peer selects every namespace: {peer:?}"
                );
            }
        }
    }
}
