{{/*
Names, labels, and the configuration file of each role.
*/}}

{{- define "spire-healer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: at most 50 characters, leaving room for "-cluster-leader". */}}
{{- define "spire-healer.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "spire-healer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; `app.kubernetes.io/name` is the Prometheus job. */}}
{{- define "spire-healer.labels" -}}
helm.sh/chart: {{ include "spire-healer.chart" . }}
{{ include "spire-healer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "spire-healer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spire-healer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one role's objects: (dict "root" $ "role" "node"|"cluster"). */}}
{{- define "spire-healer.roleLabels" -}}
{{ include "spire-healer.labels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{- define "spire-healer.roleSelectorLabels" -}}
{{ include "spire-healer.selectorLabels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{/* Service account of a role: (dict "root" $ "role" "node"|"cluster"). */}}
{{- define "spire-healer.serviceAccountName" -}}
{{- $sa := (index .root.Values .role).serviceAccount }}
{{- if $sa.create }}
{{- default (printf "%s-%s" (include "spire-healer.fullname" .root) .role) $sa.name }}
{{- else }}
{{- required (printf "%s.serviceAccount.name is required when %s.serviceAccount.create is false" .role .role) $sa.name }}
{{- end }}
{{- end }}

{{- define "spire-healer.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "spire-healer.databaseSecret" -}}
{{- if .Values.database.url }}
{{- printf "%s-database" (include "spire-healer.fullname" .) }}
{{- else }}
{{- default (printf "%s-database" (include "spire-healer.fullname" .)) .Values.database.existingSecret }}
{{- end }}
{{- end }}

{{- define "spire-healer.databaseSecretKey" -}}
{{- if .Values.database.url }}url{{ else }}{{ .Values.database.existingSecretKey }}{{ end }}
{{- end }}

{{- define "spire-healer.leaseName" -}}
{{- default (printf "%s-cluster" (include "spire-healer.fullname" .)) .Values.leadership.name }}
{{- end }}

{{/*
The configuration of one role as a map: `config`, then `<role>.config`,
then the keys the chart owns. (dict "root" $ "role" "node"|"cluster")
*/}}
{{- define "spire-healer.configMap" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $own := (index $v .role).config | default dict }}
{{- range $where, $c := dict "config" ($v.config | default dict) (printf "%s.config" .role) $own }}
{{- range $key, $why := dict "role" "node for the DaemonSet, cluster for the Deployment" "kubernetes" "set kubernetes.namespaces instead" "leadership" "set leadership.* instead" "policy_file" "put the policy text in policy instead" }}
{{- if hasKey $c $key }}
{{- fail (printf "%s.%s is set by the chart: %s" $where $key $why) }}
{{- end }}
{{- end }}
{{- if hasKey ($c.http | default dict) "listen" }}
{{- fail (printf "%s.http.listen is set by the chart; use http.host and http.port instead" $where) }}
{{- end }}
{{- if hasKey ($c.database | default dict) "url" }}
{{- fail (printf "%s.database.url would put the database password in a ConfigMap; use database.existingSecret (or database.url) instead" $where) }}
{{- end }}
{{- if hasKey ($c.database | default dict) "spool" }}
{{- fail (printf "%s.database.spool is set by the chart (/var/lib/spire-healer, an emptyDir of spool.sizeLimit)" $where) }}
{{- end }}
{{- end }}
{{- $cfg := mustMergeOverwrite (deepCopy ($v.config | default dict)) (deepCopy $own) }}
{{- $owned := dict "role" .role }}
{{- $_ := set $owned "http" (dict "listen" (include "spire-healer.listen" $root)) }}
{{- $_ := set $owned "database" (dict "spool" "/var/lib/spire-healer/spire-healer.spool") }}
{{- if $v.policy }}
{{- $_ := set $owned "policy_file" "/etc/spire-healer/policy.toml" }}
{{- end }}
{{- if or (eq .role "cluster") $v.node.kubernetesAccess }}
{{- $_ := set $owned "kubernetes" (dict "namespaces" $v.kubernetes.namespaces) }}
{{- end }}
{{- if eq .role "cluster" }}
{{- $l := dict "backend" $v.leadership.backend "name" (include "spire-healer.leaseName" $root) "lease_duration" $v.leadership.leaseDuration "renew_every" $v.leadership.renewEvery "retry_every" $v.leadership.retryEvery }}
{{- if eq $v.leadership.backend "lease" }}
{{- $_ := set $l "namespace" $root.Release.Namespace }}
{{- end }}
{{- $_ := set $owned "leadership" $l }}
{{- end }}
{{- toJson (mustMergeOverwrite $cfg $owned) }}
{{- end }}

{{- define "spire-healer.listen" -}}
{{- if contains ":" .Values.http.host }}
{{- printf "[%s]:%d" .Values.http.host (int .Values.http.port) }}
{{- else }}
{{- printf "%s:%d" .Values.http.host (int .Values.http.port) }}
{{- end }}
{{- end }}

{{/* The TOML file of one role: (dict "root" $ "role" "node"|"cluster"). */}}
{{- define "spire-healer.configToml" -}}
# spire-healer configuration, role {{ .role }}: rendered by the spire-healer
# Helm chart from its values (config, {{ .role }}.config); edit those instead.
{{- include "spire-healer.toml.table" (dict "table" (include "spire-healer.configMap" . | fromJson) "path" "") }}
{{- end }}

{{/* Indents the non-empty lines of a text by four spaces (no trailing blanks). */}}
{{- define "spire-healer.indent4" -}}
{{- regexReplaceAll "(?m)^(.)" . "    ${1}" }}
{{- end }}

{{/*
A minimal TOML writer for maps that came from YAML values: keys sorted, plain
values first, then [tables] and [[arrays of tables]]. Whole numbers print as
integers (YAML numbers arrive as floats). Nulls are left out.
(dict "table" MAP "path" "dotted.path")
*/}}
{{- define "spire-healer.toml.table" -}}
{{- $t := .table }}
{{- $path := .path }}
{{- range $k := keys $t | sortAlpha }}
{{- $val := index $t $k }}
{{- if and (not (kindIs "invalid" $val)) (not (kindIs "map" $val)) (not (include "spire-healer.toml.isTableArray" $val)) }}
{{ include "spire-healer.toml.key" $k }} = {{ include "spire-healer.toml.value" $val }}
{{- end }}
{{- end }}
{{- range $k := keys $t | sortAlpha }}
{{- $val := index $t $k }}
{{- $p := include "spire-healer.toml.key" $k }}
{{- if $path }}{{ $p = printf "%s.%s" $path $p }}{{ end }}
{{- if kindIs "map" $val }}
{{- if or (not $val) (include "spire-healer.toml.hasPlain" $val) }}

[{{ $p }}]
{{- end }}
{{- include "spire-healer.toml.table" (dict "table" $val "path" $p) }}
{{- else if include "spire-healer.toml.isTableArray" $val }}
{{- range $e := $val }}

[[{{ $p }}]]
{{- include "spire-healer.toml.table" (dict "table" $e "path" $p) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when a map has a key that is written inline (not a table). */}}
{{- define "spire-healer.toml.hasPlain" -}}
{{- range $k, $val := . }}
{{- if and (not (kindIs "invalid" $val)) (not (kindIs "map" $val)) (not (include "spire-healer.toml.isTableArray" $val)) }}true{{ end }}
{{- end }}
{{- end }}

{{/* "true" for a non-empty list of maps. */}}
{{- define "spire-healer.toml.isTableArray" -}}
{{- if and (kindIs "slice" .) (gt (len .) 0) }}
{{- $all := true }}
{{- range $e := . }}{{ if not (kindIs "map" $e) }}{{ $all = false }}{{ end }}{{ end }}
{{- if $all }}true{{ end }}
{{- end }}
{{- end }}

{{- define "spire-healer.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{- define "spire-healer.toml.value" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ . }}
{{- else if kindIs "float64" . }}{{ if eq . (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if or (kindIs "int" .) (kindIs "int64" .) (kindIs "uint64" .) }}{{ . }}
{{- else if kindIs "slice" . }}[{{ range $i, $e := . }}{{ if $i }}, {{ end }}{{ include "spire-healer.toml.value" $e }}{{ end }}]
{{- else if kindIs "map" . }}{ {{- range $i, $k := keys . | sortAlpha }}{{ if $i }},{{ end }} {{ include "spire-healer.toml.key" $k }} = {{ include "spire-healer.toml.value" (index $ $k) }}{{ end }} }
{{- else }}{{ fail (printf "a configuration value of type %s cannot be written as TOML: %v" (kindOf .) .) }}
{{- end }}
{{- end }}

{{/* "true" when a role talks to the Kubernetes API: (dict "root" $ "role" …). */}}
{{- define "spire-healer.needsToken" -}}
{{- if or (eq .role "cluster") .root.Values.node.kubernetesAccess }}true{{ else }}false{{ end }}
{{- end }}

{{/*
Pod template metadata and spec of a role: (dict "root" $ "role" "node"|"cluster").
*/}}
{{- define "spire-healer.podTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $r := index $v .role }}
{{- $socket := or (eq .role "node") $r.workloadApi }}
{{- $admin := and (eq .role "node") $r.adminSocketHostPath -}}
metadata:
  labels:
    {{- include "spire-healer.roleLabels" . | nindent 4 }}
    {{- with $r.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # A new configuration (or database Secret written by the chart) rolls the pods.
    checksum/config: {{ printf "%s\n%s" (include "spire-healer.configToml" .) $v.policy | sha256sum }}
    {{- if $v.database.url }}
    checksum/database: {{ $v.database.url | sha256sum }}
    {{- end }}
    {{- with $r.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "spire-healer.serviceAccountName" . }}
  automountServiceAccountToken: {{ include "spire-healer.needsToken" . | eq "true" }}
  enableServiceLinks: false
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $r.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ $r.terminationGracePeriodSeconds }}
  securityContext:
    {{- $psc := deepCopy $v.podSecurityContext }}
    {{- if and (eq .role "node") $r.supplementalGroups }}
    {{- $_ := set $psc "supplementalGroups" $r.supplementalGroups }}
    {{- end }}
    {{- toYaml $psc | nindent 4 }}
  containers:
    - name: spire-healer
      image: {{ include "spire-healer.image" $root | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args:
        - --log-format={{ $v.logFormat }}
        - run
        - --config=/etc/spire-healer/spire-healer.toml
        {{- with $r.extraArgs }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      workingDir: /var/lib/spire-healer
      env:
        - name: SPIRE_HEALER_DATABASE_URL
          valueFrom:
            secretKeyRef:
              name: {{ include "spire-healer.databaseSecret" $root }}
              key: {{ include "spire-healer.databaseSecretKey" $root }}
        - name: SPIRE_HEALER_NODE_NAME
          valueFrom:
            fieldRef:
              fieldPath: spec.nodeName
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        {{- with $v.logLevel }}
        - name: RUST_LOG
          value: {{ . | quote }}
        {{- end }}
        {{- with $r.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: metrics
          containerPort: {{ $v.http.port }}
          protocol: TCP
      startupProbe:
        httpGet:
          path: /healthz
          port: metrics
        periodSeconds: 2
        timeoutSeconds: {{ $v.probes.timeoutSeconds }}
        failureThreshold: {{ div $v.probes.startupSeconds 2 | max 1 }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: metrics
        periodSeconds: {{ $v.probes.periodSeconds }}
        timeoutSeconds: {{ $v.probes.timeoutSeconds }}
        failureThreshold: {{ $v.probes.failureThreshold }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: metrics
        periodSeconds: {{ $v.probes.periodSeconds }}
        timeoutSeconds: {{ $v.probes.timeoutSeconds }}
        failureThreshold: {{ $v.probes.failureThreshold }}
      resources:
        {{- toYaml $r.resources | nindent 8 }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/spire-healer
          readOnly: true
        - name: state
          mountPath: /var/lib/spire-healer
        {{- if $socket }}
        - name: agent-socket
          mountPath: /run/spire/agent-sockets
          readOnly: true
        {{- end }}
        {{- if $admin }}
        - name: agent-admin-socket
          mountPath: /run/spire/agent-admin
          readOnly: true
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "spire-healer.fullname" $root }}
        items:
          - key: {{ .role }}.toml
            path: spire-healer.toml
          {{- if $v.policy }}
          - key: policy.toml
            path: policy.toml
          {{- end }}
    - name: state
      emptyDir:
        sizeLimit: {{ $v.spool.sizeLimit }}
    {{- if $socket }}
    - name: agent-socket
      {{- if $v.agentSocket.csiDriver }}
      csi:
        driver: {{ $v.agentSocket.csiDriver }}
        readOnly: true
      {{- else }}
      hostPath:
        path: {{ $v.agentSocket.hostPath }}
        type: DirectoryOrCreate
      {{- end }}
    {{- end }}
    {{- if $admin }}
    - name: agent-admin-socket
      hostPath:
        path: {{ $r.adminSocketHostPath }}
        type: Directory
    {{- end }}
  {{- with $r.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $r.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $r.affinity }}
  affinity:
    {{- toYaml $r.affinity | nindent 4 }}
  {{- else if eq .role "cluster" }}
  affinity:
    podAntiAffinity:
      {{- if eq $r.antiAffinity "hard" }}
      requiredDuringSchedulingIgnoredDuringExecution:
        - topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "spire-healer.roleSelectorLabels" . | nindent 14 }}
      {{- else }}
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 100
          podAffinityTerm:
            topologyKey: kubernetes.io/hostname
            labelSelector:
              matchLabels:
                {{- include "spire-healer.roleSelectorLabels" . | nindent 16 }}
      {{- end }}
  {{- end }}
{{- end }}
