{{/* Names, labels, images, expert placement and shared pod pieces for the dsv2 chart. */}}

{{- define "dsv2.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dsv2.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "dsv2.routerName" -}}
{{- printf "%s-router" (include "dsv2.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The StatefulSet and its headless Service share this name, so pod DNS is <name>-<i>.<name>. */}}
{{- define "dsv2.expertName" -}}
{{- printf "%s-expert" (include "dsv2.fullname" .) | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "dsv2.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "dsv2.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "dsv2.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dsv2.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "dsv2.image" -}}
{{- $root := .root -}}
{{- $tag := printf "%s-%s" (default $root.Chart.AppVersion $root.Values.images.tag) $root.Values.images.flavor -}}
{{- if $root.Values.images.registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $root.Values.images.registry) .repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .repository $tag -}}
{{- end -}}
{{- end -}}

{{/* --device: explicit value, else cuda:0 (the one GPU the pod sees) when it has GPUs. */}}
{{- define "dsv2.device" -}}
{{- if .device -}}{{ .device }}{{- else if gt (int .gpus) 0 -}}cuda:0{{- else -}}cpu{{- end -}}
{{- end -}}

{{/* Placement mode actually used: groups | contiguous. Fails on impossible combinations. */}}
{{- define "dsv2.placementMode" -}}
{{- $e := int .Values.model.routedExperts -}}
{{- $g := int .Values.model.expertGroups -}}
{{- $n := int .Values.experts.shards -}}
{{- $mode := .Values.placement.mode -}}
{{- if eq $mode "auto" -}}
{{- if and (gt $g 0) (eq (mod $g $n) 0) -}}groups{{- else -}}contiguous{{- end -}}
{{- else if eq $mode "groups" -}}
{{- if ne (mod $g $n) 0 -}}
{{- fail (printf "placement.mode=groups needs model.expertGroups (%d) divisible by experts.shards (%d); use contiguous" $g $n) -}}
{{- end -}}
groups
{{- else -}}
contiguous
{{- end -}}
{{- end -}}

{{/*
Expert range "first-last" of shard .ordinal. Routing groups are contiguous blocks of
routedExperts/expertGroups experts, so "whole groups per shard" is also a contiguous range.
*/}}
{{- define "dsv2.expertRange" -}}
{{- $root := .root -}}
{{- $i := int .ordinal -}}
{{- $e := int $root.Values.model.routedExperts -}}
{{- $g := int $root.Values.model.expertGroups -}}
{{- $n := int $root.Values.experts.shards -}}
{{- $start := 0 -}}
{{- $len := 0 -}}
{{- if eq (include "dsv2.placementMode" $root) "groups" -}}
{{- $len = mul (div $g $n) (div $e $g) -}}
{{- $start = mul $i $len -}}
{{- else -}}
{{- $q := div $e $n -}}
{{- $r := mod $e $n -}}
{{- $start = add (mul $i $q) (min $i $r) -}}
{{- $len = add $q (ternary 1 0 (lt $i $r)) -}}
{{- end -}}
{{- printf "%d-%d" $start (sub (add $start $len) 1) -}}
{{- end -}}

{{/* Number of shards holding each expert (experts.replicas, 1 when unset). */}}
{{- define "dsv2.replicas" -}}
{{- int (default 1 .Values.experts.replicas) -}}
{{- end -}}

{{/*
--experts list of shard .ordinal with replicas: its own range and those of the next replicas-1
shards, wrapping around (what the binaries' Placement::replicated computes, so the router's
--placement MODE --replicas R names the same sets), e.g. "23-45,46-68" for shard 1 of 7, R=2.
*/}}
{{- define "dsv2.expertSet" -}}
{{- $root := .root -}}
{{- $i := int .ordinal -}}
{{- $n := int $root.Values.experts.shards -}}
{{- $out := list -}}
{{- range $j := until (int (include "dsv2.replicas" $root)) -}}
{{- $out = append $out (include "dsv2.expertRange" (dict "root" $root "ordinal" (mod (add $i $j) $n))) -}}
{{- end -}}
{{- join "," $out -}}
{{- end -}}

{{- define "dsv2.validate" -}}
{{- $v := .Values -}}
{{- $e := int $v.model.routedExperts -}}
{{- $g := int $v.model.expertGroups -}}
{{- $n := int $v.experts.shards -}}
{{- if and (eq $v.model.source "none") (ne $v.model.dir "tiny") -}}
{{- fail (printf "model.dir=%q needs model.source pvc or init (only the embedded \"tiny\" model needs no volume)" $v.model.dir) -}}
{{- end -}}
{{- if and (ne $v.model.source "none") (not (hasPrefix (printf "%s/" (trimSuffix "/" $v.model.mountPath)) $v.model.dir)) -}}
{{- fail (printf "model.dir=%q must lie under model.mountPath=%q" $v.model.dir $v.model.mountPath) -}}
{{- end -}}
{{- if and (eq $v.model.source "pvc") (not $v.model.pvc.claimName) (not $v.model.pvc.create) -}}
{{- fail "model.source=pvc needs model.pvc.claimName or model.pvc.create=true" -}}
{{- end -}}
{{- if and (eq $v.model.source "init") (eq $v.model.init.volume "pvc") (not $v.model.pvc.claimName) (not $v.model.pvc.create) -}}
{{- fail "model.init.volume=pvc needs model.pvc.claimName or model.pvc.create=true" -}}
{{- end -}}
{{- if gt $e 0 -}}
{{- if gt $n $e -}}
{{- fail (printf "experts.shards (%d) exceeds model.routedExperts (%d)" $n $e) -}}
{{- end -}}
{{- if ne (mod $e $g) 0 -}}
{{- fail (printf "model.expertGroups (%d) does not divide model.routedExperts (%d)" $g $e) -}}
{{- end -}}
{{- else if ne $v.placement.mode "auto" -}}
{{- fail "placement.mode other than auto needs model.routedExperts (the chart computes the ranges); with routedExperts=0 the binaries place experts themselves" -}}
{{- end -}}
{{- $reps := int (include "dsv2.replicas" .) -}}
{{- if lt $reps 1 -}}
{{- fail (printf "experts.replicas (%d) must be at least 1 (1 = each expert on one shard, no failover)" $reps) -}}
{{- end -}}
{{- if gt $reps $n -}}
{{- fail (printf "experts.replicas (%d) exceeds experts.shards (%d): each expert can be on at most every shard" $reps $n) -}}
{{- end -}}
{{- if and $v.tls.enabled (not $v.tls.secretName) -}}
{{- fail "tls.enabled needs tls.secretName" -}}
{{- end -}}
{{- if and $v.auth.enabled (not $v.auth.secretName) -}}
{{- fail "auth.enabled needs auth.secretName" -}}
{{- end -}}
{{- if and $v.serviceMonitor.enabled (not $v.metrics.enabled) -}}
{{- fail "serviceMonitor.enabled needs metrics.enabled" -}}
{{- end -}}
{{- $r := $v.router -}}
{{- if and (eq (toString $r.kvCacheDtype) "fp8") (eq (include "dsv2.device" $r) "cpu") -}}
{{- fail "router.kvCacheDtype=fp8 needs a GPU router (router.gpus > 0 or router.device cuda:N): the CPU backend has no FP8 cache" -}}
{{- end -}}
{{- if and (not (kindIs "invalid" $r.kvCacheGb)) (not (kindIs "invalid" $r.kvCacheBlocks)) -}}
{{- fail "router.kvCacheGb and router.kvCacheBlocks both size the KV cache: set one" -}}
{{- end -}}
{{- end -}}

{{- define "dsv2.modelClaimName" -}}
{{- default (printf "%s-model" (include "dsv2.fullname" .)) .Values.model.pvc.claimName -}}
{{- end -}}

{{/* Whether a component ("router" or "expert") serves TLS: the router with tls.enabled, the
shards only when tls.internal (the router then dials them over https://). */}}
{{- define "dsv2.servesTls" -}}
{{- $v := .root.Values -}}
{{- if and $v.tls.enabled (or (eq .component "router") $v.tls.internal) -}}true{{- end -}}
{{- end -}}

{{/* Whether a component requires client certificates: the router with tls.clientAuth (its
public API), the shards with tls.internal and tls.internalClientAuth (only the router, which
presents the pod certificate, gets in). */}}
{{- define "dsv2.mutualTls" -}}
{{- $v := .root.Values -}}
{{- if include "dsv2.servesTls" . -}}
{{- if or (and (eq .component "router") $v.tls.clientAuth) (and (eq .component "expert") $v.tls.internalClientAuth) -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/* Env shared by both servers: logging, the TLS and auth flags of the component ("router" or
"expert"; each flag of the binaries reads the DSV2_* variable named here), and the component's
own env list. */}}
{{- define "dsv2.env" -}}
{{- $v := .root.Values -}}
{{- $tls := $v.tls.mountPath -}}
- name: DSV2_LOG_FORMAT
  value: {{ $v.logging.format | quote }}
- name: DSV2_LOG
  value: {{ $v.logging.level | quote }}
- name: XDG_CACHE_HOME
  value: /var/cache/dsv2
{{- if include "dsv2.servesTls" . }}
- name: DSV2_TLS_CERT
  value: {{ printf "%s/tls.crt" $tls | quote }}
- name: DSV2_TLS_KEY
  value: {{ printf "%s/tls.key" $tls | quote }}
{{- end }}
{{- if include "dsv2.mutualTls" . }}
- name: DSV2_TLS_CLIENT_CA
  value: {{ printf "%s/ca.crt" $tls | quote }}
{{- end }}
{{- if and (eq .component "router") $v.tls.enabled $v.tls.internal }}
- name: DSV2_SHARD_CA
  value: {{ printf "%s/ca.crt" $tls | quote }}
{{- if $v.tls.internalClientAuth }}
- name: DSV2_SHARD_CLIENT_CERT
  value: {{ printf "%s/tls.crt" $tls | quote }}
- name: DSV2_SHARD_CLIENT_KEY
  value: {{ printf "%s/tls.key" $tls | quote }}
{{- end }}
{{- end }}
{{- if $v.auth.enabled }}
{{- if eq .component "router" }}
- name: DSV2_AUTH_TOKEN_FILE
  value: {{ printf "%s/%s" $v.auth.mountPath $v.auth.tokensKey | quote }}
- name: DSV2_SHARD_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $v.auth.secretName }}
      key: {{ $v.auth.shardTokenKey }}
{{- else }}
- name: DSV2_SHARD_TOKEN_FILE
  value: {{ printf "%s/%s" $v.auth.mountPath $v.auth.shardTokenKey | quote }}
{{- end }}
{{- end }}
{{- with .env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* resources from values plus nvidia.com/gpu in both requests and limits when gpus > 0. */}}
{{- define "dsv2.resources" -}}
{{- $r := deepCopy (default dict .resources) -}}
{{- if gt (int .gpus) 0 -}}
{{- $limits := deepCopy (default dict (get $r "limits")) -}}
{{- $requests := deepCopy (default dict (get $r "requests")) -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $requests "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $r "limits" $limits -}}
{{- $_ := set $r "requests" $requests -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}

{{/*
gRPC probes on grpc.health.v1 (open without a token). Where the component serves plain gRPC the
kubelet's native grpc probe is used; where it serves TLS (which that probe cannot speak)
grpc-health-probe from the image runs as an exec probe. The exec probe skips certificate
verification: it dials 127.0.0.1, a name the cert need not carry; where the component requires
client certificates it presents the pod's own certificate.
*/}}
{{- define "dsv2.probe" -}}
{{- $v := .root.Values -}}
{{- if include "dsv2.servesTls" . }}
exec:
  command:
    - grpc-health-probe
    - {{ printf "-addr=127.0.0.1:%d" (int .port) | quote }}
    - {{ printf "-service=%s" .service | quote }}
    - -tls
    - -tls-no-verify
    {{- if include "dsv2.mutualTls" . }}
    - {{ printf "-tls-client-cert=%s/tls.crt" $v.tls.mountPath | quote }}
    - {{ printf "-tls-client-key=%s/tls.key" $v.tls.mountPath | quote }}
    {{- end }}
{{- else }}
grpc:
  port: {{ int .port }}
  service: {{ .service | quote }}
{{- end }}
periodSeconds: {{ int .probe.periodSeconds }}
failureThreshold: {{ int .probe.failureThreshold }}
timeoutSeconds: {{ int .probe.timeoutSeconds }}
{{- end -}}

{{- define "dsv2.probes" -}}
startupProbe:
  {{- include "dsv2.probe" (dict "root" .root "component" .component "port" .port "service" .service "probe" .probes.startup) | trim | nindent 2 }}
readinessProbe:
  {{- include "dsv2.probe" (dict "root" .root "component" .component "port" .port "service" .service "probe" .probes.readiness) | trim | nindent 2 }}
livenessProbe:
  {{- include "dsv2.probe" (dict "root" .root "component" .component "port" .port "service" "" "probe" .probes.liveness) | trim | nindent 2 }}
{{- end -}}

{{/* Volumes shared by both pod templates: scratch dirs, the model, TLS, the auth secret. */}}
{{- define "dsv2.volumes" -}}
{{- $v := .Values -}}
- name: tmp
  emptyDir: {}
- name: cache
  emptyDir: {}
{{- if or (eq $v.model.source "pvc") (and (eq $v.model.source "init") (eq $v.model.init.volume "pvc")) }}
- name: model
  persistentVolumeClaim:
    claimName: {{ include "dsv2.modelClaimName" . }}
    readOnly: {{ eq $v.model.source "pvc" }}
{{- else if eq $v.model.source "init" }}
- name: model
  emptyDir:
    sizeLimit: {{ $v.model.init.emptyDirSizeLimit }}
{{- end }}
{{- if $v.tls.enabled }}
- name: tls
  secret:
    secretName: {{ $v.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- if $v.auth.enabled }}
- name: auth
  secret:
    secretName: {{ $v.auth.secretName }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "dsv2.volumeMounts" -}}
{{- $v := .Values -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /var/cache/dsv2
{{- if ne $v.model.source "none" }}
- name: model
  mountPath: {{ $v.model.mountPath }}
  readOnly: true
{{- end }}
{{- if $v.tls.enabled }}
- name: tls
  mountPath: {{ $v.tls.mountPath }}
  readOnly: true
{{- end }}
{{- if $v.auth.enabled }}
- name: auth
  mountPath: {{ $v.auth.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "dsv2.initContainers" -}}
{{- $v := .Values -}}
{{- if eq $v.model.source "init" }}
- name: fetch-model
  image: {{ $v.model.init.image }}
  imagePullPolicy: {{ $v.model.init.imagePullPolicy }}
  command:
    {{- toYaml $v.model.init.command | nindent 4 }}
  env:
    - name: HOME
      value: /tmp
    - name: MODEL_MOUNT
      value: {{ $v.model.mountPath | quote }}
    - name: MODEL_DIR
      value: {{ $v.model.dir | quote }}
    {{- with $v.model.init.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  {{- with $v.model.init.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: model
      mountPath: {{ $v.model.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end -}}

{{- define "dsv2.shardScheme" -}}
{{- if and .Values.tls.enabled .Values.tls.internal -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{/* Arguments as one POSIX-shell word list: each one single-quoted, embedded quotes escaped. */}}
{{- define "dsv2.shellWords" -}}
{{- $out := list -}}
{{- range . -}}
{{- $out = append $out (printf "'%s'" (replace "'" "'\\''" (toString .))) -}}
{{- end -}}
{{- join " " $out -}}
{{- end -}}
