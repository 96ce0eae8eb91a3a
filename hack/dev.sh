#!/usr/bin/env bash
# `make dev`: the local default, doing real work. Starts the test environment (a real
# kube-apiserver + controller manager, Postgres, Kafka, NATS on 127.0.0.1), installs the CRDs,
# runs the operator, applies the examples pointed at the local services, runs every relay pod
# the operator creates as a local process (servicedb-dev run-relays: there is no kubelet), and
# shows an event travelling from an outbox to Kafka and to NATS. Ctrl-C stops the operator and
# the relays; `make dev-down` stops the environment.
#
#   SERVICEDB_DEV_EXIT=1 make dev    # stop after the demonstration instead of waiting for Ctrl-C
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source hack/lib.sh

NS="${SERVICEDB_DEV_NAMESPACE:-servicedb-dev}"
DEV_DIR="${REPO_ROOT}/target/dev"
mkdir -p "${DEV_DIR}"

bash hack/install-deps.sh
bash hack/testenv.sh up
# shellcheck disable=SC1091
source target/testenv/env
cargo build --bins
BIN="${CARGO_TARGET_DIR:-${REPO_ROOT}/target}/debug"

log "installing the CRDs"
"${BIN}/servicedb" crd | kubectl apply --server-side --force-conflicts --field-manager servicedb-dev -f - >/dev/null
kubectl wait --for condition=established --timeout=60s crd/servicedatabases.servicedb.io crd/outboxrelays.servicedb.io >/dev/null

kubectl create namespace "${NS}" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
# The external examples' admin: the local Postgres superuser.
kubectl -n "${NS}" create secret generic pg-admin \
  --from-literal=username="${PGUSER}" --from-literal=password="${PGPASSWORD}" \
  --dry-run=client -o yaml | kubectl apply -f - >/dev/null

# The external examples' CA (caSecretRef pg-ca): the local Postgres's own private CA when it serves
# TLS (hack/testenv.sh), and the examples then run with the default verify-full; a local server
# without TLS runs them with sslMode: disable (the CA, any PEM, is then unused).
if [[ -s "${PGSSLROOTCERT:-}" ]] && [[ "$(psql -XAtqc 'show ssl' 2>/dev/null)" == on ]]; then
  CA_FILE="${PGSSLROOTCERT}"; SSL_MODE=verify-full
else
  CA_FILE="${KUBE_CA_FILE}"; SSL_MODE=disable
fi
kubectl -n "${NS}" create secret generic pg-ca --from-file=ca.crt="${CA_FILE}" \
  --dry-run=client -o yaml | kubectl apply -f - >/dev/null

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  log "operator and relays stopped; the environment is still up (make dev-down stops it)"
}
trap cleanup EXIT

log "starting the operator (log: target/dev/operator.log)"
KUBECONFIG="${KUBECONFIG}" RUST_LOG="${RUST_LOG:-info,kube=warn}" \
  "${BIN}/servicedb" operator --listen 127.0.0.1:0 --watch-namespace "${NS}" \
  --leader-elect-namespace "${NS}" --relay-image servicedb-operator:dev >"${DEV_DIR}/operator.log" 2>&1 &
pids+=($!)
log "starting the development relay runner (log: target/dev/relays.log)"
RUST_LOG="${RUST_LOG:-info,kube=warn}" "${BIN}/servicedb-dev" run-relays --namespace "${NS}" \
  --program "${BIN}/servicedb" --work-dir "${DEV_DIR}/relays" >"${DEV_DIR}/relays.log" 2>&1 &
pids+=($!)

log "applying the examples, pointed at the local Postgres, Kafka and NATS"
for f in examples/*.yaml; do
  sed -e "s|host: postgres.example.internal|host: ${PGHOST}|" \
      -e "s|port: 5432|port: ${PGPORT}|" \
      -e "s|# sslMode: verify-full |sslMode: ${SSL_MODE} |" \
      -e "s|kafka.kafka.svc:9092|${KAFKA_BOOTSTRAP_SERVERS}|" \
      -e "s|nats://nats.nats.svc:4222|${NATS_URL}|" \
      -e "s|http://connect.kafka.svc:8083|${KAFKA_CONNECT_URL}|" \
      -e "s|/etc/pg-ca/ca.crt|${CA_FILE}|" "$f" \
    | kubectl -n "${NS}" apply --server-side --field-manager servicedb-dev -f - >/dev/null
done

# Kafka Connect reads the catalog-cdc password through Strimzi's config provider as its service
# account: the documented Role (README, CDC), exactly `get` on that one Secret.
connect_sa="${KAFKA_CONNECT_SERVICE_ACCOUNT:-kafka/kafka-connect}"
kubectl -n "${NS}" create role kafka-connect-catalog-cdc --verb=get --resource=secrets \
  --resource-name=catalog-cdc --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n "${NS}" create rolebinding kafka-connect-catalog-cdc --role=kafka-connect-catalog-cdc \
  --serviceaccount="${connect_sa/\//:}" --dry-run=client -o yaml | kubectl apply -f - >/dev/null

for sdb in payments inventory catalog; do
  kubectl -n "${NS}" wait --for condition=Ready --timeout=180s "servicedatabase/${sdb}" >/dev/null
done
for obr in payments-events inventory-events; do
  kubectl -n "${NS}" wait --for condition=Ready --timeout=180s "outboxrelay/${obr}" >/dev/null
done
kubectl -n "${NS}" get servicedb
echo

uri_of() { kubectl -n "${NS}" get secret "$1" -o jsonpath='{.data.uri}' | base64 -d; }
id="$(cat /proc/sys/kernel/random/uuid)"
log "inserting event ${id} into the payments outbox (as the payments app role)"
psql -q "$(uri_of payments-app)" -c \
  "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES ('${id}', 'payment', 'p-42', 'PaymentCaptured', '{\"amount\": 42}')"
RUST_LOG=warn "${BIN}/servicedb-dev" consume-kafka --topic outbox.event.payment --id "${id}" --timeout-seconds 120
id2="$(cat /proc/sys/kernel/random/uuid)"
log "inserting event ${id2} into the inventory outbox and deleting it in the same transaction"
psql -q "$(uri_of inventory-app)" -c "BEGIN; INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES ('${id2}', 'item', 'sku-7', 'StockReserved', '{\"qty\": 1}'); DELETE FROM outbox WHERE id = '${id2}'; COMMIT;"
RUST_LOG=warn "${BIN}/servicedb-dev" consume-nats --stream INVENTORY --id "${id2}" --timeout-seconds 120

log "CDC: the catalog app creates its captured table; the operator registers the connector"
psql -q "$(uri_of catalog-app)" -c "CREATE TABLE IF NOT EXISTS public.products (id int PRIMARY KEY, name text NOT NULL)"
kubectl -n "${NS}" wait --for condition=CdcReady --timeout=300s servicedatabase/catalog >/dev/null
kubectl -n "${NS}" get servicedatabase catalog
psql -q "$(uri_of catalog-app)" -c "INSERT INTO public.products VALUES ($((RANDOM)), 'book') ON CONFLICT DO NOTHING"
log "the change as Debezium published it on cdc.catalog.public.products:"
# Debezium creates the topic with its first event (the snapshot): retry until it exists.
for attempt in $(seq 1 30); do
  if RUST_LOG=off "${BIN}/servicedb-dev" consume-kafka --topic cdc.catalog.public.products \
      --count 1 --timeout-seconds 30 2>/dev/null; then
    break
  fi
  [[ ${attempt} == 30 ]] && die "no change event on cdc.catalog.public.products"
  sleep 2
done

cat <<EOT

make dev is running: operator and relays log to target/dev/. In another shell:
  source target/testenv/env
  kubectl -n ${NS} get servicedb
  psql "\$(kubectl -n ${NS} get secret payments-app -o jsonpath='{.data.uri}' | base64 -d)" \\
    -c "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES (gen_random_uuid(), 'payment', 'p-1', 'PaymentCaptured', '{}')"
  ${BIN}/servicedb-dev consume-kafka --topic outbox.event.payment --count 2
EOT
if [[ "${SERVICEDB_DEV_EXIT:-0}" == 1 ]]; then exit 0; fi
log "Ctrl-C to stop"
wait
