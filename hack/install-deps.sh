#!/usr/bin/env bash
# Installs/builds everything the test environment needs, idempotently, cached by version under
# $SERVICEDB_CACHE (default ~/.cache/servicedb). Only a cold machine pays for the builds.
#
#   hack/install-deps.sh            # everything
#   hack/install-deps.sh kube etcd  # only some parts: apt kube etcd helm nats kafka debezium providers
#
# Kubernetes is built from the Go module proxy: a throwaway module requires k8s.io/kubernetes
# and gets one `replace k8s.io/<m> => k8s.io/<m> v0.M.P` per staging module, derived from the
# published go.mod of that version (which requires them at v0.0.0 and replaces them with local
# paths that do not exist in the module zip).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mkdir -p "${SERVICEDB_BIN}" "${SERVICEDB_CACHE}/build"
NICE="nice -n 10"

# ---------------------------------------------------------------------------------------------
install_apt() {
  local want=(openssl cmake libcurl4-openssl-dev libsasl2-dev build-essential python3 curl jq unzip maven openjdk-17-jdk-headless)
  [[ -x "${PG_BIN}/postgres" ]] || want+=(postgresql-15)
  local missing=() p
  for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "apt: installing ${missing[*]}"
    [[ $(id -u) == 0 ]] || die "need root for apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    log "apt: all present"
  fi
  id postgres >/dev/null 2>&1 || die "no 'postgres' user (install postgresql-15)"
}

# ---------------------------------------------------------------------------------------------
# build_kube VERSION: builds kube-apiserver, kube-controller-manager and kubectl into kube_dir.
build_kube() {
  local v="$1" minor patch major
  local out; out="$(kube_dir "$v")"
  [[ -f "${out}/.complete" ]] && { log "kubernetes ${v}: cached in ${out}"; return 0; }
  major="${v#v}"; major="${major%%.*}"
  minor="${v#v*.}"; minor="${minor%%.*}"
  patch="${v##*.}"
  local stagingv="v0.${minor}.${patch}"
  local work="${SERVICEDB_CACHE}/build/kubernetes-${v}"
  rm -rf "$work"; mkdir -p "$work"
  log "kubernetes ${v}: fetching k8s.io/kubernetes go.mod"
  local gomod
  gomod="$(cd "$work" && go mod download -json "k8s.io/kubernetes@${v}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  local godirective
  godirective="$(awk '$1=="go"{print $2; exit}' "$gomod")"
  # A version whose go.mod needs a newer Go than the local one (v1.37 may need 1.27) builds with the
  # Go toolchain that the module proxy serves (golang.org/toolchain).
  local localgo; localgo="$(go env GOVERSION)"; localgo="${localgo#go}"
  if [[ "$(printf '%s\n%s\n' "$godirective" "$localgo" | sort -V | tail -1)" != "$localgo" ]]; then
    export GOTOOLCHAIN="${KUBE_GOTOOLCHAIN:-go1.27.3}"
    log "kubernetes ${v}: go.mod needs Go ${godirective}; using GOTOOLCHAIN=${GOTOOLCHAIN}"
  fi
  # Staging modules: every k8s.io/* module the published go.mod requires at v0.0.0.
  local staging
  staging="$(awk '
      /^require[[:space:]]*\(/ {inreq=1; next}
      inreq && /^\)/ {inreq=0; next}
      inreq && $1 ~ /^k8s\.io\// && $2=="v0.0.0" {print $1}
      /^require[[:space:]]+k8s\.io\// && $3=="v0.0.0" {print $2}
    ' "$gomod" | sort -u)"
  [[ -n "$staging" ]] || die "kubernetes ${v}: found no staging modules in ${gomod}"
  log "kubernetes ${v}: $(echo "$staging" | wc -l) staging modules at ${stagingv}"
  {
    echo "module servicedb.local/kubebuild"
    echo
    echo "go ${godirective}"
    echo
    echo "require k8s.io/kubernetes ${v}"
    echo
    local m
    for m in $staging; do echo "replace ${m} => ${m} ${stagingv}"; done
  } > "${work}/go.mod"
  # Non-staging replace directives of the published go.mod (pinned versions) must be kept too.
  awk '
      /^replace[[:space:]]*\(/ {inr=1; next}
      inr && /^\)/ {inr=0; next}
      inr && $2=="=>" && $3 !~ /^\.\// {print "replace " $0}
      /^replace[[:space:]]/ && $3=="=>" && $4 !~ /^\.\// {print}
    ' "$gomod" >> "${work}/go.mod"
  local pkgs="k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl"
  log "kubernetes ${v}: resolving modules (go get, pinned to ${v})"
  local getargs=() q
  for q in $pkgs; do getargs+=("${q}@${v}"); done
  (cd "$work" && $NICE go get "${getargs[@]}") || return 1
  grep -q "k8s.io/kubernetes ${v}\$" "${work}/go.mod" || die "kubernetes ${v}: go get moved k8s.io/kubernetes off ${v}"
  local ld="-s -w"
  local pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X ${pkg}.gitVersion=${v} -X ${pkg}.gitMajor=${major} -X ${pkg}.gitMinor=${minor}"
    ld+=" -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=1970-01-01T00:00:00Z"
  done
  log "kubernetes ${v}: building (this takes 10-20 min cold on 2 cores)"
  mkdir -p "${out}.tmp"
  (cd "$work" && $NICE go build -trimpath -ldflags "$ld" -o "${out}.tmp/" $pkgs) || return 1
  rm -rf "$out"; mv "${out}.tmp" "$out"
  "${out}/kube-apiserver" --version
  touch "${out}/.complete"
  log "kubernetes ${v}: built into ${out}"
}

install_kube() {
  local v cached
  if cached="$(cached_kube_version)"; then log "kubernetes ${cached}: cached"; return 0; fi
  for v in ${KUBE_VERSIONS}; do
    local vlog="${SERVICEDB_CACHE}/build/kubernetes-${v}.log"
    mkdir -p "${SERVICEDB_CACHE}/build"
    if build_kube "$v" 2>&1 | tee "$vlog" >&2; [[ ${PIPESTATUS[0]} == 0 ]]; then
      return 0
    fi
    log "kubernetes ${v}: build FAILED (log: ${vlog}); trying the next version"
  done
  die "no Kubernetes version in '${KUBE_VERSIONS}' built"
}

# ---------------------------------------------------------------------------------------------
# go_wrapper_build NAME MODULE VERSION PACKAGE OUTFILE: builds PACKAGE from a throwaway module that
# requires MODULE@VERSION (works where `go install` refuses because of replace directives).
go_wrapper_build() {
  local name="$1" module="$2" version="$3" package="$4" outfile="$5"
  [[ -x "$outfile" ]] && { log "${name} ${version}: cached"; return 0; }
  local work="${SERVICEDB_CACHE}/build/${name}-${version}"
  rm -rf "$work"; mkdir -p "$work"
  local gov; gov="$(go env GOVERSION)"; gov="${gov#go}"
  printf 'module servicedb.local/%sbuild\n\ngo %s\n' "$name" "${gov%.*}" > "${work}/go.mod"
  log "${name} ${version}: building ${package}"
  (cd "$work" && $NICE go get "${package}@${version}") || die "${name}: go get failed"
  # Extra ldflags may name the k8s version the module was built against: @K8S_MAJOR@/@K8S_MINOR@.
  local ld="${6:-}"
  if [[ "$ld" == *@K8S_* ]]; then
    local cg; cg="$(cd "$work" && go list -m -f '{{.Version}}' k8s.io/client-go)"   # v0.M.P
    cg="${cg#v0.}"
    ld="${ld//@K8S_MAJOR@/1}"; ld="${ld//@K8S_MINOR@/${cg%%.*}}"
  fi
  (cd "$work" && $NICE go build -trimpath -ldflags "-s -w ${ld}" -o "${outfile}.tmp" "$package") || die "${name}: build failed"
  mv "${outfile}.tmp" "$outfile"
  log "${name} ${version}: built ${outfile}"
}

install_etcd() {
  go_wrapper_build etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3 "$(etcd_bin)"
}
install_helm() {
  go_wrapper_build helm helm.sh/helm/v3 "$HELM_VERSION" helm.sh/helm/v3/cmd/helm "$(helm_bin)" \
    "-X helm.sh/helm/v3/internal/version.version=${HELM_VERSION} -X helm.sh/helm/v3/internal/version.gitTreeState=clean \
     -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=@K8S_MAJOR@ -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=@K8S_MINOR@ \
     -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=@K8S_MAJOR@ -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=@K8S_MINOR@"
}
install_nats() {
  go_wrapper_build nats-server github.com/nats-io/nats-server/v2 "$NATS_VERSION" github.com/nats-io/nats-server/v2 "$(nats_bin)"
}

# ---------------------------------------------------------------------------------------------
# mvn_copy_deps DIR OUTDIR EXTRA_ARGS DEPENDENCY_XML...: writes a throwaway pom with the given
# <dependency> elements and copies the resolved jars into OUTDIR.
mvn_copy_deps() {
  local dir="$1" outdir="$2" extra="$3"; shift 3
  rm -rf "$dir" "${outdir}.tmp"; mkdir -p "$dir"
  {
    echo '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
    echo '<groupId>local.servicedb</groupId><artifactId>deps</artifactId><version>1</version><packaging>pom</packaging>'
    echo '<dependencies>'
    printf '%s\n' "$@"
    echo '</dependencies></project>'
  } > "${dir}/pom.xml"
  # shellcheck disable=SC2086
  (cd "$dir" && mvn -B -q dependency:copy-dependencies -DoutputDirectory="${outdir}.tmp" \
      -DincludeScope=runtime $extra) || die "maven failed in ${dir}"
  rm -rf "$outdir"; mv "${outdir}.tmp" "$outdir"
}

dep() { echo "<dependency><groupId>$1</groupId><artifactId>$2</artifactId><version>$3</version></dependency>"; }

install_kafka() {
  local lib; lib="$(kafka_lib)"
  [[ -f "${lib}/.complete" ]] && { log "kafka ${KAFKA_VERSION}: cached"; return 0; }
  log "kafka ${KAFKA_VERSION}: resolving broker + Connect runtime from Maven Central"
  # Kafka 4.x logs through slf4j 1.7 -> log4j2 (log4j-core comes with kafka-server).
  mvn_copy_deps "${SERVICEDB_CACHE}/build/kafka-${KAFKA_VERSION}" "$lib" "" \
    "$(dep org.apache.kafka kafka_2.13 "$KAFKA_VERSION")" \
    "$(dep org.apache.kafka connect-runtime "$KAFKA_VERSION")" \
    "$(dep org.apache.kafka connect-json "$KAFKA_VERSION")" \
    "$(dep org.apache.kafka connect-transforms "$KAFKA_VERSION")" \
    "$(dep org.apache.kafka kafka-tools "$KAFKA_VERSION")" \
    "$(dep org.apache.logging.log4j log4j-slf4j-impl "$LOG4J_VERSION")" \
    "$(dep org.apache.logging.log4j log4j-core "$LOG4J_VERSION")" \
    "$(dep org.apache.logging.log4j log4j-api "$LOG4J_VERSION")"
  ls "$lib"/kafka_2.13-*.jar "$lib"/connect-runtime-*.jar "$lib"/kafka-tools-*.jar >/dev/null || die "kafka jars missing in $lib"
  touch "${lib}/.complete"
  log "kafka ${KAFKA_VERSION}: $(ls "$lib" | wc -l) jars in ${lib}"
}

install_debezium() {
  local plugins; plugins="$(debezium_plugin_dir)"
  local dir="${plugins}/debezium-connector-postgres"
  [[ -f "${plugins}/.complete" ]] && { log "debezium ${DEBEZIUM_VERSION}: cached"; return 0; }
  log "debezium ${DEBEZIUM_VERSION}: resolving the Postgres connector plugin"
  mkdir -p "$plugins"
  # The plugin gets its own dir under plugin.path, without Kafka and slf4j jars (Connect provides them).
  mvn_copy_deps "${SERVICEDB_CACHE}/build/debezium-${DEBEZIUM_VERSION}" "$dir" \
    "-DexcludeGroupIds=org.apache.kafka,org.slf4j,org.apache.logging.log4j" \
    "$(dep io.debezium debezium-connector-postgres "$DEBEZIUM_VERSION")"
  local found=""
  local j
  for j in "$dir"/*.jar; do
    if unzip -l "$j" 2>/dev/null | grep -q 'io/debezium/transforms/outbox/EventRouter.class'; then found="$j"; fi
  done
  [[ -n "$found" ]] || die "debezium: io/debezium/transforms/outbox/EventRouter.class not in ${dir}"
  log "debezium: EventRouter found in $(basename "$found")"
  touch "${plugins}/.complete"
  log "debezium ${DEBEZIUM_VERSION}: $(ls "$dir" | wc -l) jars in ${dir}"
}

# Strimzi's KubernetesSecretConfigProvider as an isolated Connect plugin (its own dir under
# plugin.path; its jar has the ServiceLoader manifest that plugin.discovery=service_load needs).
# Kafka and slf4j jars are left out: Connect provides them to every plugin.
install_config_providers() {
  local plugins; plugins="$(config_provider_plugin_dir)"
  local dir="${plugins}/strimzi-kubernetes-config-provider"
  [[ -f "${plugins}/.complete" ]] && { log "strimzi config provider ${STRIMZI_CONFIG_PROVIDER_VERSION}: cached"; return 0; }
  log "strimzi config provider ${STRIMZI_CONFIG_PROVIDER_VERSION}: resolving from Maven Central"
  mkdir -p "$plugins"
  mvn_copy_deps "${SERVICEDB_CACHE}/build/strimzi-config-provider-${STRIMZI_CONFIG_PROVIDER_VERSION}" "$dir" \
    "-DexcludeGroupIds=org.apache.kafka,org.slf4j" \
    "$(dep io.strimzi kafka-kubernetes-config-provider "$STRIMZI_CONFIG_PROVIDER_VERSION")"
  unzip -p "$dir/kafka-kubernetes-config-provider-${STRIMZI_CONFIG_PROVIDER_VERSION}.jar" \
      META-INF/services/org.apache.kafka.common.config.provider.ConfigProvider 2>/dev/null \
    | grep -q 'io.strimzi.kafka.KubernetesSecretConfigProvider' \
    || die "strimzi config provider: no ServiceLoader entry for KubernetesSecretConfigProvider"
  touch "${plugins}/.complete"
  log "strimzi config provider ${STRIMZI_CONFIG_PROVIDER_VERSION}: $(ls "$dir" | wc -l) jars in ${dir}"
}

# ---------------------------------------------------------------------------------------------
main() {
  local parts=("$@")
  ((${#parts[@]})) || parts=(apt kube etcd helm nats kafka debezium providers)
  local p
  for p in "${parts[@]}"; do
    case "$p" in
      apt) install_apt ;;
      kube) install_kube ;;
      etcd) install_etcd ;;
      helm) install_helm ;;
      nats) install_nats ;;
      kafka) install_kafka ;;
      debezium) install_debezium ;;
      providers) install_config_providers ;;
      *) die "unknown part: $p" ;;
    esac
  done
}

main "$@"
