{{/* Chart name. */}}
{{- define "servicedb-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, suffixed with the chart name unless it already contains it. */}}
{{- define "servicedb-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "servicedb-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels. app.kubernetes.io/name is always `servicedb-operator`, whatever nameOverride says:
the NetworkPolicy of every managed instance admits the operator's pods by exactly this label
(src/specs/instance.rs), so renaming it would cut the operator off from its databases.
*/}}
{{- define "servicedb-operator.selectorLabels" -}}
app.kubernetes.io/name: servicedb-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "servicedb-operator.labels" -}}
helm.sh/chart: {{ include "servicedb-operator.chart" . }}
{{ include "servicedb-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: servicedb
{{- end }}

{{- define "servicedb-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "servicedb-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "servicedb-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The leader election Lease: leaderElection.leaseName, else the full name. */}}
{{- define "servicedb-operator.leaseName" -}}
{{- default (include "servicedb-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{- define "servicedb-operator.relayImage" -}}
{{- default (include "servicedb-operator.image" .) .Values.relayImage }}
{{- end }}

{{/*
What the controllers do in the namespaces they watch, derived from src/operator/:
- the two kinds: get/list/watch, patch (the finalizer helper's JSON patch); status: patch (server-side
  apply); finalizers: update (blockOwnerDeletion on children's ownerReferences, enforced where the
  OwnerReferencesPermissionEnforcement admission plugin is on).
- children: list/watch (metadata-only `owns` watches), get (the applied-hash check and reads),
  create + patch (server-side apply, which creates a missing object and needs both verbs).
- secrets: also delete (relay/cdc Secrets of a disabled outbox or removed CDC).
- pods: list (readiness of a managed instance's pod).
- events.k8s.io events: create, patch (kube-runtime's Recorder).
*/}}
{{- define "servicedb-operator.namespacedRules" -}}
- apiGroups: ["servicedb.io"]
  resources: ["servicedatabases", "outboxrelays"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["servicedb.io"]
  resources: ["servicedatabases/status", "outboxrelays/status"]
  verbs: ["patch"]
- apiGroups: ["servicedb.io"]
  resources: ["servicedatabases/finalizers", "outboxrelays/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps", "services", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
- apiGroups: ["apps"]
  resources: ["statefulsets", "deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/* The start-up check reads the two CRDs, and nothing else cluster-wide. */}}
{{- define "servicedb-operator.crdRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  resourceNames: ["servicedatabases.servicedb.io", "outboxrelays.servicedb.io"]
  verbs: ["get"]
{{- end }}
