#!/usr/bin/env bash
# The real test environment on loopback: etcd + kube-apiserver (RBAC) + kube-controller-manager,
# PostgreSQL 15 (wal_level=logical), Kafka (KRaft, single node), Kafka Connect with the Debezium
# Postgres plugin, and NATS with JetStream. Everything listens on 127.0.0.1 on free ports.
#
#   hack/testenv.sh up       # build/fetch what is missing (cached), start everything, write target/testenv/env
#   hack/testenv.sh status   # exit 0 when every component answers
#   hack/testenv.sh down     # stop everything this env started (tracked PIDs); nothing is left running
#   hack/testenv.sh connect-worker DIR   # run a private Connect worker (foreground) on the env's Kafka
#
# `up` is idempotent: if the env file exists and every component answers, it does nothing.
# Attach a shell:  source target/testenv/env; kubectl get ns
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

RUN_DIR="${SERVICEDB_TESTENV_DIR:-${REPO_ROOT}/target/testenv}"
LOGS="${RUN_DIR}/logs"
PIDS="${RUN_DIR}/pids"
CERTS="${RUN_DIR}/certs"
ENV_FILE="${RUN_DIR}/env"
# Components in start order; `down` stops them in reverse.
COMPONENTS=(etcd postgres nats kafka kube-apiserver kafka-connect kube-controller-manager)
WAIT_TIMEOUT="${SERVICEDB_TESTENV_TIMEOUT:-300}"   # seconds per component; generous on a busy 2-core box
JAVA_OPTS_COMMON=(-Xms128m -Xmx512m -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true)

# ---------------------------------------------------------------------------------------------
pid_of() { [[ -f "${PIDS}/$1.pid" ]] && cat "${PIDS}/$1.pid"; }
alive() { local p; p="$(pid_of "$1")" && [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null; }

# start NAME CMD...: starts CMD in its own session (so it outlives `make` and can be killed as a
# group), output to logs/NAME.log, PID to pids/NAME.pid.
start() {
  local name="$1"; shift
  setsid "$@" >"${LOGS}/${name}.log" 2>&1 </dev/null 9>&- &
  echo $! > "${PIDS}/${name}.pid"
  log "${name}: started pid $! (log: ${LOGS}/${name}.log)"
}

fail_with_log() {
  local name="$1"
  log "---- last lines of ${LOGS}/${name}.log ----"
  tail -n 40 "${LOGS}/${name}.log" >&2 || true
  die "${name} did not become ready"
}

curl_k8s() { curl -sf --max-time 5 --cacert "${CERTS}/ca.crt" --cert "${CERTS}/admin.crt" --key "${CERTS}/admin.key" "$@"; }

# ---------------------------------------------------------------------------------------------
gen_certs() {
  mkdir -p "$CERTS"
  local o="-loglevel error"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=servicedb-testenv-ca" \
    -keyout "${CERTS}/ca.key" -out "${CERTS}/ca.crt" 2>/dev/null
  # sign NAME SUBJECT EXTENSIONS
  sign() {
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "${CERTS}/$1.key" -out "${CERTS}/$1.csr" 2>/dev/null
    printf '%s\n' "$3" > "${CERTS}/$1.ext"
    openssl x509 -req -in "${CERTS}/$1.csr" -CA "${CERTS}/ca.crt" -CAkey "${CERTS}/ca.key" -CAcreateserial \
      -days 3650 -extfile "${CERTS}/$1.ext" -out "${CERTS}/$1.crt" 2>/dev/null
    rm -f "${CERTS}/$1.csr" "${CERTS}/$1.ext"
  }
  sign serving "/CN=kube-apiserver" "$(printf '%s\n' \
    'basicConstraints=CA:FALSE' 'keyUsage=digitalSignature,keyEncipherment' 'extendedKeyUsage=serverAuth' \
    'subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc')"
  local client=$'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth'
  sign admin "/O=system:masters/CN=servicedb-admin" "$client"
  sign kcm "/CN=system:kube-controller-manager" "$client"
  openssl genrsa -out "${CERTS}/sa.key" 2048 2>/dev/null
  openssl rsa -in "${CERTS}/sa.key" -pubout -out "${CERTS}/sa.pub" 2>/dev/null
  chmod 600 "${CERTS}"/*.key
}

# write_kubeconfig FILE SERVER USER_CERT_NAME
write_kubeconfig() {
  cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: servicedb-testenv
  cluster:
    server: $2
    certificate-authority-data: $(base64 -w0 < "${CERTS}/ca.crt")
users:
- name: $3
  user:
    client-certificate-data: $(base64 -w0 < "${CERTS}/$3.crt")
    client-key-data: $(base64 -w0 < "${CERTS}/$3.key")
contexts:
- name: servicedb-testenv
  context: {cluster: servicedb-testenv, user: $3, namespace: default}
current-context: servicedb-testenv
EOF
  chmod 600 "$1"
}

# ---------------------------------------------------------------------------------------------
check_etcd() { curl -sf --max-time 5 "http://127.0.0.1:${ETCD_PORT}/health" | grep -q '"health":"true"'; }
check_apiserver() { [[ "$(curl_k8s "https://127.0.0.1:${APISERVER_PORT}/readyz")" == ok ]]; }
# The controller manager is working when its serviceaccount + root-CA controllers have acted.
check_kcm() {
  curl_k8s "https://127.0.0.1:${APISERVER_PORT}/api/v1/namespaces/default/serviceaccounts/default" >/dev/null &&
  curl_k8s "https://127.0.0.1:${APISERVER_PORT}/api/v1/namespaces/default/configmaps/kube-root-ca.crt" >/dev/null
}
check_postgres() {
  PGPASSWORD="$PG_PASSWORD" psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -XAtq \
    -c "select current_setting('wal_level')" 2>/dev/null | grep -qx logical
}
check_kafka() {
  java -Xmx128m -XX:TieredStopAtLevel=1 -cp "$(kafka_lib)/*" -Dlog4j2.configurationFile="${RUN_DIR}/log4j2-tools.properties" \
    org.apache.kafka.tools.BrokerApiVersionsCommand --bootstrap-server "127.0.0.1:${KAFKA_PORT}" 2>/dev/null | grep -q '127.0.0.1'
}
check_connect() {
  curl -sf --max-time 5 "http://127.0.0.1:${CONNECT_PORT}/connector-plugins" | grep -q 'io.debezium.connector.postgresql.PostgresConnector'
}
check_nats() { curl -sf --max-time 5 "http://127.0.0.1:${NATS_MONITOR_PORT}/healthz?js-enabled-only=true" | grep -q ok; }

# ---------------------------------------------------------------------------------------------
write_log4j() {
  cat > "${RUN_DIR}/log4j2.properties" <<'EOF'
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.reflections.name = org.reflections
logger.reflections.level = ERROR
EOF
  sed -e 's/rootLogger.level = INFO/rootLogger.level = ERROR/' "${RUN_DIR}/log4j2.properties" > "${RUN_DIR}/log4j2-tools.properties"
}

start_etcd() {
  start etcd "$(etcd_bin)" --name testenv --data-dir "${RUN_DIR}/etcd" \
    --listen-client-urls "http://127.0.0.1:${ETCD_PORT}" --advertise-client-urls "http://127.0.0.1:${ETCD_PORT}" \
    --listen-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-cluster "testenv=http://127.0.0.1:${ETCD_PEER_PORT}" --unsafe-no-fsync=true \
    --listen-metrics-urls "" --log-level warn
}

start_apiserver() {
  start kube-apiserver "${KUBE_BIN}/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:${ETCD_PORT}" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "${APISERVER_PORT}" \
    --cert-dir "${CERTS}" --tls-cert-file "${CERTS}/serving.crt" --tls-private-key-file "${CERTS}/serving.key" \
    --client-ca-file "${CERTS}/ca.crt" --authorization-mode RBAC \
    --service-cluster-ip-range 10.0.0.0/24 --endpoint-reconciler-type none \
    --service-account-issuer https://kubernetes.default.svc --service-account-key-file "${CERTS}/sa.pub" \
    --service-account-signing-key-file "${CERTS}/sa.key" \
    --enable-priority-and-fairness=false --allow-privileged=true --profiling=false
}

start_kcm() {
  write_kubeconfig "${RUN_DIR}/kcm.kubeconfig" "https://127.0.0.1:${APISERVER_PORT}" kcm
  start kube-controller-manager "${KUBE_BIN}/kube-controller-manager" \
    --kubeconfig "${RUN_DIR}/kcm.kubeconfig" --leader-elect=false \
    --bind-address 127.0.0.1 --secure-port 0 \
    --use-service-account-credentials=true \
    --service-account-private-key-file "${CERTS}/sa.key" --root-ca-file "${CERTS}/ca.crt" \
    --cluster-signing-cert-file "${CERTS}/ca.crt" --cluster-signing-key-file "${CERTS}/ca.key" \
    --service-cluster-ip-range 10.0.0.0/24 --profiling=false
}

# gen_pg_certs DIR: a private CA and a server certificate for the shared Postgres (SANs
# 127.0.0.1 and localhost, ECDSA P-256) as DIR/pg-ca.{crt,key} and DIR/pg-server.{crt,key}.
# Kept when present, so a run dir keeps its CA for its whole life.
gen_pg_certs() {
  local d="$1"; mkdir -p "$d"
  [[ -s "$d/pg-ca.crt" && -s "$d/pg-server.crt" && -s "$d/pg-server.key" ]] && return 0
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
  openssl req -x509 "${ec[@]}" -days 3650 -sha256 -subj "/CN=servicedb-testenv-postgres-ca" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -keyout "$d/pg-ca.key" -out "$d/pg-ca.crt" 2>/dev/null || die "openssl: Postgres CA"
  openssl req "${ec[@]}" -subj "/CN=localhost" -keyout "$d/pg-server.key" -out "$d/pg-server.csr" 2>/dev/null \
    || die "openssl: Postgres server key"
  printf '%s\n' basicConstraints=CA:FALSE keyUsage=digitalSignature,keyEncipherment \
    extendedKeyUsage=serverAuth subjectAltName=IP:127.0.0.1,DNS:localhost > "$d/pg-server.ext"
  openssl x509 -req -sha256 -in "$d/pg-server.csr" -CA "$d/pg-ca.crt" -CAkey "$d/pg-ca.key" -CAcreateserial \
    -days 3650 -extfile "$d/pg-server.ext" -out "$d/pg-server.crt" 2>/dev/null || die "openssl: Postgres server certificate"
  rm -f "$d/pg-server.csr" "$d/pg-server.ext"
  chmod 600 "$d"/pg-*.key
}

# install_pg_tls CERTS DIR: copies the server certificate and key where the postgres user can
# read them (the key 0600, owned by postgres, as Postgres demands) and prints the server
# settings that serve TLS with them.
install_pg_tls() {
  local certs="$1" dir="$2"
  install -o postgres -g postgres -m 0644 "$certs/pg-server.crt" "$dir/server.crt"
  install -o postgres -g postgres -m 0600 "$certs/pg-server.key" "$dir/server.key"
  printf '%s\n' -c ssl=on -c "ssl_cert_file=$dir/server.crt" -c "ssl_key_file=$dir/server.key" \
    -c ssl_min_protocol_version=TLSv1.2
}

# pg_tls_check: the TLS part alone, on a throwaway server: certificates in a temporary dir, a
# Postgres 15 with exactly the shared server's TLS settings, and psql connecting with
# sslmode=verify-full against the CA by name and by address. Starts and stops its own server.
pg_tls_check() {
  local tmp; tmp="$(mktemp -d /tmp/servicedb-pg-tls-check.XXXXXX)"
  chown postgres: "$tmp"; chmod 700 "$tmp"
  local port; port="$(free_port)"
  gen_pg_certs "$tmp/certs"
  as_postgres "${PG_BIN}/initdb" -D "$tmp/data" -U postgres --auth=trust -N >/dev/null 2>&1 || die "initdb failed"
  local tls; mapfile -t tls < <(install_pg_tls "$tmp/certs" "$tmp")
  as_postgres "${PG_BIN}/pg_ctl" -D "$tmp/data" -l "$tmp/log" -w \
    -o "-k $tmp -p $port -c listen_addresses=127.0.0.1 ${tls[*]}" start >/dev/null || { cat "$tmp/log" >&2; die "postgres did not start"; }
  local ok=1 host out
  for host in localhost 127.0.0.1; do
    out="$(psql "host=$host port=$port user=postgres dbname=postgres sslmode=verify-full sslrootcert=$tmp/certs/pg-ca.crt" \
      -XAtqc "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()" 2>&1)"
    log "verify-full via $host: $out"
    [[ "$out" == t\|TLSv1.[23] ]] || ok=0
  done
  as_postgres "${PG_BIN}/pg_ctl" -D "$tmp/data" -m fast stop >/dev/null || true
  rm -rf "$tmp"
  ((ok)) || die "TLS check failed"
  log "TLS check passed"
}

start_postgres() {
  # The data dir lives under /tmp: the postgres user may not be able to traverse the work tree
  # (e.g. a clone under /root). RUN_DIR/postgres links to it; `down` removes it.
  local data; data="$(mktemp -d /tmp/servicedb-testenv-pg.XXXXXX)"
  ln -sfn "$data" "${RUN_DIR}/postgres"
  chown postgres: "$data"; chmod 700 "$data"
  local pw="${RUN_DIR}/postgres.pw"
  printf '%s\n' "$PG_PASSWORD" > "$pw"; chown postgres: "$pw"; chmod 600 "$pw"
  as_postgres "${PG_BIN}/initdb" -D "$data/data" -U postgres --auth=scram-sha-256 --pwfile="$pw" \
    --encoding=UTF8 --locale=C.UTF-8 -N > "${LOGS}/postgres-initdb.log" 2>&1 || { rm -f "$pw"; fail_with_log postgres-initdb; }
  rm -f "$pw"
  # TLS with the run dir's private CA; pg_hba keeps `host` lines, so sslmode=disable works too.
  gen_pg_certs "$CERTS"
  local tls; mapfile -t tls < <(install_pg_tls "$CERTS" "$data")
  start postgres setpriv --reuid=postgres --regid=postgres --init-groups --reset-env \
    "${PG_BIN}/postgres" -D "$data/data" -k "$data" -p "$PG_PORT" \
    -c listen_addresses=127.0.0.1 -c wal_level=logical -c max_replication_slots=64 -c max_wal_senders=64 \
    -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
    -c shared_buffers=128MB -c logging_collector=off -c log_min_messages=warning "${tls[@]}"
}
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups --reset-env "$@"; }

# A KRaft cluster id (base64url of 16 random bytes); like Kafka's own, never starting with '-'.
kafka_cluster_id() {
  python3 -c 'import uuid,base64
while True:
    s = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not s.startswith("-"): print(s); break'
}

start_kafka() {
  local dir="${RUN_DIR}/kafka"
  mkdir -p "$dir/data"
  cat > "${dir}/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:${KAFKA_CONTROLLER_PORT}
listeners=PLAINTEXT://127.0.0.1:${KAFKA_PORT},CONTROLLER://127.0.0.1:${KAFKA_CONTROLLER_PORT}
advertised.listeners=PLAINTEXT://127.0.0.1:${KAFKA_PORT}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=${dir}/data
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
  java -Xmx256m -cp "$(kafka_lib)/*" -Dlog4j2.configurationFile="${RUN_DIR}/log4j2-tools.properties" \
    kafka.tools.StorageTool format --cluster-id="$(kafka_cluster_id)" \
    -c "${dir}/server.properties" > "${LOGS}/kafka-format.log" 2>&1 || fail_with_log kafka-format
  start kafka java "${JAVA_OPTS_COMMON[@]}" -cp "$(kafka_lib)/*" \
    -Dlog4j2.configurationFile="${RUN_DIR}/log4j2.properties" -Dkafka.logs.dir="${LOGS}" \
    kafka.Kafka "${dir}/server.properties"
}

# The identity Connect's config provider uses against the apiserver: what a Strimzi Connect pod's
# service account would be. Tests bind a Role granting `get` on one Secret to it (README, CDC).
CONNECT_SA_NAMESPACE=kafka
CONNECT_SA_NAME=kafka-connect

# sign_connect_cert OUTDIR: a client cert for system:serviceaccount:kafka:kafka-connect signed by
# the environment's CA (RBAC matches a ServiceAccount subject by this user name and groups).
sign_connect_cert() {
  local out="$1"
  mkdir -p "$out"
  printf '%s\n' 'basicConstraints=CA:FALSE' 'keyUsage=digitalSignature,keyEncipherment' \
    'extendedKeyUsage=clientAuth' > "${out}/connect.ext"
  openssl req -newkey rsa:2048 -nodes -keyout "${out}/connect.key" -out "${out}/connect.csr" \
    -subj "/O=system:serviceaccounts/O=system:serviceaccounts:${CONNECT_SA_NAMESPACE}/CN=system:serviceaccount:${CONNECT_SA_NAMESPACE}:${CONNECT_SA_NAME}" 2>/dev/null
  openssl x509 -req -in "${out}/connect.csr" -CA "${CERTS}/ca.crt" -CAkey "${CERTS}/ca.key" \
    -CAcreateserial -CAserial "${out}/ca.srl" -days 3650 -extfile "${out}/connect.ext" \
    -out "${out}/connect.crt" 2>/dev/null
  rm -f "${out}/connect.csr" "${out}/connect.ext"
  chmod 600 "${out}/connect.key"
}

# write_connect_worker DIR PORT GROUP_ID TOPIC_PREFIX: everything one Connect worker needs in DIR:
# its client cert + kubeconfig (for Strimzi's KubernetesSecretConfigProvider, through the fabric8
# client, which reads KUBECONFIG), the directory the dir/file config providers may read
# (DIR/secrets), and connect-distributed.properties. Used by `up` for the shared worker and by
# `connect-worker` for a private one (a distinct group and distinct storage topics).
write_connect_worker() {
  local dir="$1" port="$2" group="$3" topics="$4"
  [[ -n "$dir" && -n "$port" && -n "$group" && -n "$topics" ]] || die "write_connect_worker: missing argument"
  mkdir -p "${dir}/secrets"
  sign_connect_cert "${dir}/certs"
  cat > "${dir}/connect.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: servicedb-testenv
  cluster:
    server: https://127.0.0.1:${APISERVER_PORT}
    certificate-authority-data: $(base64 -w0 < "${CERTS}/ca.crt")
users:
- name: ${CONNECT_SA_NAME}
  user:
    client-certificate-data: $(base64 -w0 < "${dir}/certs/connect.crt")
    client-key-data: $(base64 -w0 < "${dir}/certs/connect.key")
contexts:
- name: servicedb-testenv
  context: {cluster: servicedb-testenv, user: ${CONNECT_SA_NAME}, namespace: ${CONNECT_SA_NAMESPACE}}
current-context: servicedb-testenv
EOF
  chmod 600 "${dir}/connect.kubeconfig"
  cat > "${dir}/connect-distributed.properties" <<EOF
bootstrap.servers=127.0.0.1:${KAFKA_PORT}
group.id=${group}
key.converter=org.apache.kafka.connect.json.JsonConverter
value.converter=org.apache.kafka.connect.json.JsonConverter
config.storage.topic=${topics}-configs
config.storage.replication.factor=1
offset.storage.topic=${topics}-offsets
offset.storage.replication.factor=1
offset.storage.partitions=5
status.storage.topic=${topics}-status
status.storage.replication.factor=1
status.storage.partitions=5
offset.flush.interval.ms=1000
listeners=http://127.0.0.1:${port}
rest.advertised.host.name=127.0.0.1
rest.advertised.port=${port}
plugin.path=$(connect_plugin_path)
connector.client.config.override.policy=All
scheduled.rebalance.max.delay.ms=0
plugin.discovery=service_load
# KIP-297 config providers: connector configs hold \${provider:path:key} references, never
# passwords. Strimzi's reads Secrets through the Kubernetes API; Kafka's directory and file
# providers read Secrets mounted into the pods (here: files under ${dir}/secrets).
config.providers=secrets,dir,file
config.providers.secrets.class=io.strimzi.kafka.KubernetesSecretConfigProvider
config.providers.dir.class=org.apache.kafka.common.config.provider.DirectoryConfigProvider
config.providers.dir.param.allowed.paths=${dir}/secrets
config.providers.file.class=org.apache.kafka.common.config.provider.FileConfigProvider
config.providers.file.param.allowed.paths=${dir}/secrets
EOF
}

# connect_java DIR: sets CONNECT_CMD to the command line of a Connect worker configured by
# write_connect_worker (an array: the class path holds a glob that must reach java unexpanded).
connect_java() {
  CONNECT_CMD=(java "${JAVA_OPTS_COMMON[@]}" -cp "$(kafka_lib)/*"
    -Dlog4j2.configurationFile="${RUN_DIR}/log4j2.properties"
    org.apache.kafka.connect.cli.ConnectDistributed "$1/connect-distributed.properties")
}

start_connect() {
  local dir="${RUN_DIR}/kafka-connect"
  write_connect_worker "$dir" "$CONNECT_PORT" servicedb-testenv-connect _connect
  connect_java "$dir"
  KUBECONFIG="${dir}/connect.kubeconfig" start kafka-connect "${CONNECT_CMD[@]}"
}

# A private Connect worker on the running environment's Kafka, to try a worker config without
# restarting the shared one: writes its files into DIR, then runs in the foreground (exec), so
# the caller owns the process. Its URL is written to DIR/url.
connect_worker() {
  local dir="$1"
  [[ -n "$dir" ]] || die "usage: $0 connect-worker DIR"
  load_ports || die "no running environment in ${RUN_DIR}"
  mkdir -p "$dir"; dir="$(cd "$dir" && pwd)"
  local port; port="$(free_port)"
  local id; id="servicedb-worker-$(openssl rand -hex 4)"
  write_connect_worker "$dir" "$port" "$id" "_${id}"
  echo "http://127.0.0.1:${port}" > "${dir}/url"
  export KUBECONFIG="${dir}/connect.kubeconfig"
  connect_java "$dir"
  exec "${CONNECT_CMD[@]}"
}

start_nats() {
  mkdir -p "${RUN_DIR}/nats"
  start nats "$(nats_bin)" -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MONITOR_PORT" -js -sd "${RUN_DIR}/nats"
}

# ---------------------------------------------------------------------------------------------
write_env() {
  local bin="${RUN_DIR}/bin"
  mkdir -p "$bin"
  ln -sf "${KUBE_BIN}/kubectl" "${bin}/kubectl"
  ln -sf "${KUBE_BIN}/kube-apiserver" "${bin}/kube-apiserver"
  ln -sf "${KUBE_BIN}/kube-controller-manager" "${bin}/kube-controller-manager"
  ln -sf "$(helm_bin)" "${bin}/helm"
  ln -sf "$(etcd_bin)" "${bin}/etcd"
  ln -sf "$(nats_bin)" "${bin}/nats-server"
  local tmp="${ENV_FILE}.tmp"
  cat > "$tmp" <<EOF
# servicedb-operator test environment ($(date -u +%Y-%m-%dT%H:%M:%SZ)). Source it: . target/testenv/env
# One KEY='value' per line; the PATH line is last (parsers may skip it).
export SERVICEDB_TESTENV_DIR='${RUN_DIR}'
export SERVICEDB_TESTENV_BIN='${bin}'
export KUBECONFIG='${RUN_DIR}/kubeconfig'
export KUBERNETES_VERSION='${KUBE_VERSION}'
export KUBE_APISERVER_URL='https://127.0.0.1:${APISERVER_PORT}'
export KUBE_CA_FILE='${CERTS}/ca.crt'
export ETCD_ENDPOINTS='http://127.0.0.1:${ETCD_PORT}'
export KUBECTL='${bin}/kubectl'
export HELM='${bin}/helm'
export PGHOST='127.0.0.1'
export PGPORT='${PG_PORT}'
export PGUSER='postgres'
export PGPASSWORD='${PG_PASSWORD}'
export PGDATABASE='postgres'
export PGSSLMODE='disable'
export PGSSLROOTCERT='${CERTS}/pg-ca.crt'
export SERVICEDB_TEST_PG_CA_FILE='${CERTS}/pg-ca.crt'
export KAFKA_BOOTSTRAP_SERVERS='127.0.0.1:${KAFKA_PORT}'
export KAFKA_CONTROLLER_PORT='${KAFKA_CONTROLLER_PORT}'
export KAFKA_LIB='$(kafka_lib)'
export KAFKA_CONNECT_URL='http://127.0.0.1:${CONNECT_PORT}'
export KAFKA_CONNECT_CONFIG_PROVIDERS='secrets,dir,file'
export KAFKA_CONNECT_SERVICE_ACCOUNT='${CONNECT_SA_NAMESPACE}/${CONNECT_SA_NAME}'
export KAFKA_CONNECT_SECRETS_DIR='${RUN_DIR}/kafka-connect/secrets'
export NATS_URL='nats://127.0.0.1:${NATS_PORT}'
export NATS_MONITOR_URL='http://127.0.0.1:${NATS_MONITOR_PORT}'
export PATH="${bin}:\${PATH}"
EOF
  mv "$tmp" "$ENV_FILE"
}

# Loads the ports of a running env from its ports file.
load_ports() { [[ -f "${RUN_DIR}/ports" ]] && source "${RUN_DIR}/ports"; }

status() {
  [[ -f "$ENV_FILE" ]] && load_ports || { log "not up (no ${ENV_FILE})"; return 1; }
  local ok=0 c
  for c in "${COMPONENTS[@]}"; do
    if ! alive "$c"; then log "${c}: not running"; ok=1; fi
  done
  check_etcd || { log "etcd: not answering"; ok=1; }
  check_apiserver || { log "kube-apiserver: /readyz not ok"; ok=1; }
  check_kcm || { log "kube-controller-manager: default ServiceAccount/root CA missing"; ok=1; }
  check_postgres || { log "postgres: not answering"; ok=1; }
  port_open "$KAFKA_PORT" || { log "kafka: port ${KAFKA_PORT} closed"; ok=1; }
  check_connect || { log "kafka-connect: no Debezium plugin listed"; ok=1; }
  check_nats || { log "nats: /healthz not ok"; ok=1; }
  return $ok
}

up() {
  local t0=$SECONDS
  if [[ -f "$ENV_FILE" ]] && status 2>/dev/null; then
    log "test environment already up: source ${ENV_FILE}"
    return 0
  fi
  if [[ -d "$PIDS" ]]; then log "stale or partial environment found: cleaning it"; down; fi
  # If anything below fails, stop what was started: a failed `up` leaves nothing running.
  UP_OK=0
  trap '[[ ${UP_OK:-0} == 1 ]] || { log "up failed: stopping what was started (logs kept in ${LOGS})"; down; }' EXIT
  "${HACK_DIR}/install-deps.sh"
  KUBE_VERSION="$(cached_kube_version)" || die "no Kubernetes binaries cached"
  KUBE_BIN="$(kube_dir "$KUBE_VERSION")"
  local t1=$SECONDS
  rm -rf "$RUN_DIR"; mkdir -p "$LOGS" "$PIDS"
  local ports; mapfile -t ports < <(free_ports 10)
  ETCD_PORT=${ports[0]} ETCD_PEER_PORT=${ports[1]} APISERVER_PORT=${ports[2]} PG_PORT=${ports[3]}
  KAFKA_PORT=${ports[4]} KAFKA_CONTROLLER_PORT=${ports[5]} CONNECT_PORT=${ports[6]}
  NATS_PORT=${ports[7]} NATS_MONITOR_PORT=${ports[8]}
  PG_PASSWORD="$(openssl rand -hex 16)"
  cat > "${RUN_DIR}/ports" <<EOF
ETCD_PORT=${ETCD_PORT}
ETCD_PEER_PORT=${ETCD_PEER_PORT}
APISERVER_PORT=${APISERVER_PORT}
PG_PORT=${PG_PORT}
PG_PASSWORD=${PG_PASSWORD}
KAFKA_PORT=${KAFKA_PORT}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT}
CONNECT_PORT=${CONNECT_PORT}
NATS_PORT=${NATS_PORT}
NATS_MONITOR_PORT=${NATS_MONITOR_PORT}
KUBE_VERSION=${KUBE_VERSION}
EOF
  chmod 600 "${RUN_DIR}/ports"
  gen_certs
  write_log4j
  write_kubeconfig "${RUN_DIR}/kubeconfig" "https://127.0.0.1:${APISERVER_PORT}" admin

  # Start what does not depend on anything, then the dependants as their dependencies get ready.
  start_etcd
  start_nats
  start_postgres
  start_kafka
  wait_for etcd "$WAIT_TIMEOUT" "$(pid_of etcd)" check_etcd || fail_with_log etcd
  start_apiserver
  wait_for kafka "$WAIT_TIMEOUT" "$(pid_of kafka)" check_kafka || fail_with_log kafka
  start_connect
  wait_for kube-apiserver "$WAIT_TIMEOUT" "$(pid_of kube-apiserver)" check_apiserver || fail_with_log kube-apiserver
  start_kcm
  wait_for postgres "$WAIT_TIMEOUT" "$(pid_of postgres)" check_postgres || fail_with_log postgres
  wait_for nats "$WAIT_TIMEOUT" "$(pid_of nats)" check_nats || fail_with_log nats
  wait_for kube-controller-manager "$WAIT_TIMEOUT" "$(pid_of kube-controller-manager)" check_kcm || fail_with_log kube-controller-manager
  wait_for kafka-connect "$WAIT_TIMEOUT" "$(pid_of kafka-connect)" check_connect || fail_with_log kafka-connect
  write_env
  UP_OK=1
  log "test environment up in $((SECONDS - t0))s (start alone: $((SECONDS - t1))s): source ${ENV_FILE}"
}

# stop NAME...: SIGTERM (SIGINT = fast shutdown for postgres) to each process group, then waits
# for all of them; SIGKILL for what is still running after 30s.
stop() {
  local name pid sig pids=() names=()
  for name in "$@"; do
    pid="$(pid_of "$name")" || continue
    [[ -n "$pid" ]] || continue
    if kill -0 "$pid" 2>/dev/null; then
      sig=TERM; [[ "$name" == postgres ]] && sig=INT
      kill -"$sig" -- "-$pid" 2>/dev/null || kill -"$sig" "$pid" 2>/dev/null || true
      pids+=("$pid"); names+=("$name")
    fi
    rm -f "${PIDS}/${name}.pid"
  done
  local i j running
  for ((i = 0; i < 60; i++)); do
    running=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && running=1; done
    ((running)) || break
    sleep 0.5
  done
  for j in "${!pids[@]}"; do
    if kill -0 "${pids[$j]}" 2>/dev/null; then
      log "${names[$j]}: still running after 30s, killing"
      kill -KILL -- "-${pids[$j]}" 2>/dev/null || kill -KILL "${pids[$j]}" 2>/dev/null || true
    fi
    log "${names[$j]}: stopped (pid ${pids[$j]})"
  done
}

down() {
  # Dependants first (Connect needs Kafka to shut down cleanly), then what they depend on.
  stop kube-controller-manager kafka-connect nats postgres
  stop kube-apiserver kafka
  stop etcd
  rm -f "$ENV_FILE"
  if [[ -L "${RUN_DIR}/postgres" ]]; then
    local pgdata; pgdata="$(readlink "${RUN_DIR}/postgres")"
    [[ "$pgdata" == /tmp/servicedb-testenv-pg.* ]] && rm -rf "$pgdata"
    rm -f "${RUN_DIR}/postgres"
  fi
  log "test environment down (logs kept in ${LOGS})"
}

# Sourcing this file (instead of running it) only defines the functions.
[[ "${BASH_SOURCE[0]}" != "$0" ]] && return 0

# One up/down at a time (several test binaries or make jobs may call `up` at once).
with_lock() {
  mkdir -p "$(dirname "$RUN_DIR")"
  exec 9>"${RUN_DIR}.lock"
  flock -w 900 9 || die "could not lock ${RUN_DIR}.lock"
  "$@"
}

case "${1:-}" in
  up) with_lock up ;;
  down) with_lock down ;;
  status) if status; then log "test environment up: source ${ENV_FILE}"; else exit 1; fi ;;
  pg-tls-check) pg_tls_check ;;
  connect-worker) connect_worker "${2:-}" ;;
  *) echo "usage: $0 up|down|status|pg-tls-check|connect-worker DIR" >&2; exit 2 ;;
esac
