#!/usr/bin/env bash
# The relay benchmark (`make bench-relay`): builds the release binary and runs benches/relay.rs,
# which starts its own Postgres and NATS (and uses the test environment's Kafka when
# target/testenv/env exists, else starts one) and prints a table with ratios.
#   BENCH_EVENTS=100000 BENCH_SECONDS=10 hack/bench-relay.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --bin servicedb
# Pin the binary just built: a target directory shared by several work trees may be rewritten.
target="${CARGO_TARGET_DIR:-target}"
bin_dir="$(mktemp -d)"
cp "${target}/release/servicedb" "${bin_dir}/servicedb"
trap 'rm -rf "${bin_dir}"' EXIT
RELAY_BIN="${bin_dir}/servicedb" cargo bench --bench relay
