//! The API contract without a cluster: committed CRDs match the types, examples parse.

use std::path::Path;

use servicedb::api::{OutboxRelay, ServiceDatabase};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn committed_crds_match_what_servicedb_crd_prints() {
    let committed =
        std::fs::read_to_string(repo().join("crds/servicedb.io_crds.yaml")).expect("read crds/");
    let generated = servicedb::api::crds_yaml().expect("render CRDs");
    assert!(
        committed == generated,
        "crds/ is stale: run `make crds` and commit the result"
    );
    // Helm installs the CRDs from the chart's own copy; `make crds` writes both.
    let chart = std::fs::read_to_string(
        repo().join("charts/servicedb-operator/crds/servicedb.io_crds.yaml"),
    )
    .expect("read the chart's crds/");
    assert!(
        chart == generated,
        "charts/servicedb-operator/crds/ is stale: run `make crds` and commit the result"
    );
}

#[test]
fn servicedb_crd_prints_both_crds() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_servicedb"))
        .arg("crd")
        .output()
        .expect("run servicedb crd");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert!(text.contains("name: servicedatabases.servicedb.io"));
    assert!(text.contains("name: outboxrelays.servicedb.io"));
}

#[test]
fn every_example_parses_against_the_api_types() {
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("examples")).expect("examples/") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read example");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).expect("yaml");
            let kind = value
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or_default()
                .to_owned();
            match kind.as_str() {
                "ServiceDatabase" => {
                    let sdb: ServiceDatabase = serde_yaml::from_value(value)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    let m = sdb.spec.instance.managed.is_some();
                    let x = sdb.spec.instance.external.is_some();
                    assert!(
                        m != x,
                        "{}: exactly one of managed/external",
                        path.display()
                    );
                }
                "OutboxRelay" => {
                    let r: OutboxRelay = serde_yaml::from_value(value)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    assert!(
                        r.spec.sink.kafka.is_some() != r.spec.sink.nats.is_some(),
                        "{}: one sink",
                        path.display()
                    );
                }
                other => panic!("{}: unexpected kind {other:?}", path.display()),
            }
            seen += 1;
        }
    }
    assert!(
        seen >= 4,
        "expected at least four example objects, saw {seen}"
    );
}

use serde::Deserialize;
