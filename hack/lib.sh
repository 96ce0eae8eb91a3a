#!/usr/bin/env bash
# Common helpers for servicedb-operator's hack/ scripts. Source it; do not run it.
#
# Everything that is built or downloaded is cached OUTSIDE the work tree under $SERVICEDB_CACHE,
# keyed by version, so only a cold machine pays for it.

set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${HACK_DIR}/.." && pwd)"

export SERVICEDB_CACHE="${SERVICEDB_CACHE:-$HOME/.cache/servicedb}"
SERVICEDB_BIN="${SERVICEDB_CACHE}/bin"

# ---- version pins (cache keys) -------------------------------------------------------------
# Kubernetes: the first version in this list whose binaries are cached (or that builds) is used.
KUBE_VERSIONS="${KUBE_VERSIONS:-v1.36.3 v1.36.1 v1.35.4 v1.34.4 v1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
NATS_VERSION="${NATS_VERSION:-v2.15.2}"
KAFKA_VERSION="${KAFKA_VERSION:-4.3.1}"           # broker and Connect runtime (matches Debezium 3.6)
DEBEZIUM_VERSION="${DEBEZIUM_VERSION:-3.6.1.Final}"
LOG4J_VERSION="${LOG4J_VERSION:-2.25.4}"
# Strimzi's KubernetesSecretConfigProvider (KIP-297) for Connect: 1.2.2 uses fabric8 7.5 with the
# JDK HTTP client and resolves against Kafka 4.3's connect-api.
STRIMZI_CONFIG_PROVIDER_VERSION="${STRIMZI_CONFIG_PROVIDER_VERSION:-1.2.2}"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"

# Go: ordinary module cache; builds are niced so interactive work keeps CPU.
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---- cached artefact locations -------------------------------------------------------------
etcd_bin() { echo "${SERVICEDB_BIN}/etcd-${ETCD_VERSION}"; }
helm_bin() { echo "${SERVICEDB_BIN}/helm-${HELM_VERSION}"; }
nats_bin() { echo "${SERVICEDB_BIN}/nats-server-${NATS_VERSION}"; }
kube_dir() { echo "${SERVICEDB_BIN}/kubernetes-$1"; }   # holds kube-apiserver, kube-controller-manager, kubectl
kafka_lib() { echo "${SERVICEDB_CACHE}/kafka-${KAFKA_VERSION}/lib"; }
debezium_plugin_dir() { echo "${SERVICEDB_CACHE}/debezium-${DEBEZIUM_VERSION}-kafka-${KAFKA_VERSION}/plugins"; }
# Connect's plugin.path: the Debezium plugin dir plus the config-provider plugin dir.
config_provider_plugin_dir() { echo "${SERVICEDB_CACHE}/strimzi-config-provider-${STRIMZI_CONFIG_PROVIDER_VERSION}/plugins"; }
connect_plugin_path() { echo "$(debezium_plugin_dir),$(config_provider_plugin_dir)"; }

# The Kubernetes version whose binaries are cached (first of KUBE_VERSIONS); empty if none.
cached_kube_version() {
  local v
  for v in ${KUBE_VERSIONS}; do
    if [[ -f "$(kube_dir "$v")/.complete" ]]; then echo "$v"; return 0; fi
  done
  return 1
}

# ---- ports ---------------------------------------------------------------------------------
# Prints a free TCP port on 127.0.0.1 (asks the kernel; a small race remains, callers check).
free_port() {
  python3 - <<'PY'
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
PY
}

# Prints N distinct free ports (one per line), all held open until printed.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
n = int(sys.argv[1]); socks = []
for _ in range(n):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
for s in socks: print(s.getsockname()[1])
for s in socks: s.close()
PY
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---- waiting -------------------------------------------------------------------------------
# wait_for DESCRIPTION TIMEOUT_SECONDS PID_OR_EMPTY COMMAND...
# Polls COMMAND (quietly) every 0.5 s until it succeeds. Fails when TIMEOUT passes or when the
# process PID (if given) has died. Polling interval is not a readiness signal, the command is.
wait_for() {
  local what="$1" timeout="$2" pid="$3"; shift 3
  local start=$SECONDS
  while true; do
    if "$@" >/dev/null 2>&1; then
      log "${what}: ready after $((SECONDS - start))s"
      return 0
    fi
    if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
      log "${what}: process ${pid} exited before it was ready"
      return 1
    fi
    if (( SECONDS - start >= timeout )); then
      log "${what}: not ready after ${timeout}s"
      return 1
    fi
    sleep 0.5
  done
}

wait_port() { wait_for "$1 port $2" "${3:-120}" "${4:-}" port_open "$2"; }
