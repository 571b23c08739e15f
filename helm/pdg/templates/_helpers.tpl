{{/*
Names, labels and the pieces every pdg pod shares: its environment, its
volumes and their mounts.
*/}}

{{- define "pdg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The resource name prefix. At most 39 characters: the longest name made from
it, the audit CronJob's, gets "-audit-verify" (13) and must stay within 52
(its Jobs add 11 characters).
*/}}
{{- define "pdg.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 39 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 39 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 39 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pdg.writerName" -}}
{{- printf "%s-writer" (include "pdg.fullname" .) }}
{{- end }}

{{- define "pdg.migrationsName" -}}
{{- printf "%s-migrations" (include "pdg.fullname" .) }}
{{- end }}

{{- define "pdg.auditVerifyName" -}}
{{- printf "%s-audit-verify" (include "pdg.fullname" .) }}
{{- end }}

{{- define "pdg.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pdg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pdg.labels" -}}
helm.sh/chart: {{ include "pdg.chart" . }}
{{ include "pdg.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pdg
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one component: (dict "root" $ "component" "gateway") */}}
{{- define "pdg.componentLabels" -}}
{{ include "pdg.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "pdg.componentSelectorLabels" -}}
{{ include "pdg.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "pdg.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pdg.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pdg.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "pdg.secretName" -}}
{{- .Values.secret.existingSecret | default (include "pdg.fullname" .) }}
{{- end }}

{{/*
PDG_PUBLIC_URL: the value, else the first ingress host (https when a TLS
entry names it), else nothing (pdg's own default).
*/}}
{{- define "pdg.publicUrl" -}}
{{- if .Values.publicUrl }}
{{- .Values.publicUrl }}
{{- else if and .Values.ingress.enabled .Values.ingress.hosts }}
{{- $host := (first .Values.ingress.hosts).host }}
{{- $scheme := "http" }}
{{- range .Values.ingress.tls }}
{{- if has $host (.hosts | default list) }}
{{- $scheme = "https" }}
{{- end }}
{{- end }}
{{- printf "%s://%s" $scheme $host }}
{{- end }}
{{- end }}

{{/* Where the container finds its files. */}}
{{- define "pdg.paths.config" -}}/etc/pdg/config{{- end }}
{{- define "pdg.paths.secrets" -}}/etc/pdg/secrets{{- end }}
{{- define "pdg.paths.data" -}}/var/lib/pdg{{- end }}

{{/*
The Secret's keys a pod reads, as volume items: the key names of
`secret.keys` mapped to fixed file names, so that a Secret of one's own may
name its keys freely and a missing key stops the pod at its start. Only the
gateways read the metrics token. Called with (dict "root" $ "gateway" bool).
*/}}
{{- define "pdg.secretItems" -}}
{{- $keys := .root.Values.secret.keys -}}
- key: {{ $keys.databaseUrl }}
  path: database-url
- key: {{ $keys.redisUrl }}
  path: redis-url
- key: {{ $keys.ledgerSigningKey }}
  path: ledger-signing-key.pem
- key: {{ $keys.ledgerLogKey }}
  path: ledger-log-key.pem
- key: {{ $keys.personalDigestKey }}
  path: personal-digest.key
{{- if and .gateway .root.Values.metrics.token.enabled }}
- key: {{ $keys.metricsToken }}
  path: metrics-token
{{- end }}
{{- if .root.Values.signingKeys.passphrase.enabled }}
- key: {{ $keys.keyPassphrase }}
  path: key-passphrase
{{- end }}
{{- end }}

{{/*
The environment every long-running pdg pod shares (gateways, writer, audit
job): the same settings file, the same storage and the same ledger keys.
The ledger's checkpoint key, its log key and the personal-digest key must be
one on the writer and every gateway, so they come from the Secret and never
from a pod's own data folder (where pdg would make new ones). No token
signing key file is set: token-signing keys are then shared by every replica
through the database.
*/}}
{{- define "pdg.sharedEnv" -}}
{{- $secrets := include "pdg.paths.secrets" . -}}
- name: PDG_CONFIG
  value: {{ include "pdg.paths.config" . }}/pdg.toml
- name: PDG_DATA_DIR
  value: {{ include "pdg.paths.data" . }}
- name: PDG_DATABASE_URL_FILE
  value: {{ $secrets }}/database-url
- name: PDG_REDIS_URL_FILE
  value: {{ $secrets }}/redis-url
- name: PDG_REDIS_CLUSTER
  value: {{ .Values.redis.cluster | toString | quote }}
- name: PDG_LEDGER_SIGNING_KEY_FILE
  value: {{ $secrets }}/ledger-signing-key.pem
- name: PDG_LEDGER_LOG_KEY_FILE
  value: {{ $secrets }}/ledger-log-key.pem
- name: PDG_PERSONAL_DIGEST_KEY_FILE
  value: {{ $secrets }}/personal-digest.key
{{- if .Values.signingKeys.passphrase.enabled }}
- name: PDG_KEY_PASSPHRASE_FILE
  value: {{ $secrets }}/key-passphrase
{{- end }}
{{- with include "pdg.publicUrl" . }}
- name: PDG_PUBLIC_URL
  value: {{ . | quote }}
{{- end }}
{{- if .Values.migrations.enabled }}
# The migrations hook ran `pdg db upgrade` before these pods were changed.
- name: PDG_AUTO_MIGRATE
  value: "false"
{{- end }}
{{- end }}

{{- define "pdg.volumeMounts" -}}
- name: config
  mountPath: {{ include "pdg.paths.config" . }}
  readOnly: true
- name: secrets
  mountPath: {{ include "pdg.paths.secrets" . }}
  readOnly: true
- name: data
  mountPath: {{ include "pdg.paths.data" . }}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* The volumes of a pdg pod: (dict "root" $ "gateway" bool). */}}
{{- define "pdg.volumes" -}}
- name: config
  configMap:
    name: {{ include "pdg.fullname" .root }}
- name: secrets
  secret:
    secretName: {{ include "pdg.secretName" .root }}
    defaultMode: 0440
    items:
      {{- include "pdg.secretItems" . | nindent 6 }}
- name: data
  emptyDir:
    sizeLimit: {{ .root.Values.scratchSizeLimit }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .root.Values.scratchSizeLimit }}
{{- end }}

{{/*
Pod-level settings every pdg pod shares. enableServiceLinks is off: for a
Service named `pdg` Kubernetes would otherwise inject PDG_PORT=tcp://…,
PDG_SERVICE_HOST and the like; PDG_PORT would override the port setting, and
pdg refuses to start on a PDG_* name that nearly spells a setting.
*/}}
{{- define "pdg.podSpecCommon" -}}
enableServiceLinks: false
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* The PromQL selector of this release's gateways, as scraped. */}}
{{- define "pdg.promSelector" -}}
namespace="{{ .Release.Namespace }}",job="{{ include "pdg.fullname" . }}"
{{- end }}

{{/* gateway.listenAddress as the host of a HOST:PORT (IPv6 in brackets). */}}
{{- define "pdg.listenHost" -}}
{{- $host := .Values.gateway.listenAddress }}
{{- if contains ":" $host }}{{ printf "[%s]" $host }}{{ else }}{{ $host }}{{ end }}
{{- end }}

{{/* A number (from YAML, a float64) as an integer, a percentage as a quoted string. */}}
{{- define "pdg.intOrPercent" -}}
{{- if kindIs "string" . }}{{ . | quote }}{{ else }}{{ int . }}{{ end }}
{{- end }}
