{{/*
Names and labels. The manifests these templates build are also built, from the same
values, by `raymoe k8s render` (cluster/k8s_manifests.py); keep the two in step
(tests/unit/test_helm_chart.py compares them where helm is installed).
*/}}
{{- define "raymoe.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "raymoe.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "raymoe.labels" -}}
{{ include "raymoe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The served model name: model.name, else the last part of model.path. */}}
{{- define "raymoe.modelName" -}}
{{- default (last (splitList "/" (trimSuffix "/" .Values.model.path))) .Values.model.name -}}
{{- end -}}

{{/* The raymoe deployment config the pods read (/etc/raymoe/deployment.yaml). */}}
{{- define "raymoe.deploymentConfig" -}}
{{- $cfg := deepCopy .Values.raymoe -}}
{{- $_ := set $cfg "model" (printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) .Values.model.path) -}}
{{- $ray := default (dict) $cfg.ray -}}
{{- $_ := set $ray "address" nil -}}
{{- $_ := set $cfg "ray" $ray -}}
{{- if .Values.placementPlan -}}
{{- $placement := default (dict) $cfg.placement -}}
{{- $_ := set $placement "plan" "/etc/raymoe/plan.yaml" -}}
{{- $_ := set $cfg "placement" $placement -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* serveConfigV2: the raymoe Serve application (deploy/serve_config.yaml, in-cluster). */}}
{{- define "raymoe.serveConfig" -}}
{{- $args := dict "config" "/etc/raymoe/deployment.yaml" "model_name" (include "raymoe.modelName" .) "api_key_env" "RAYMOE_API_KEY" -}}
{{- $app := dict "name" "raymoe" "route_prefix" "/" "import_path" "raymoe.deploy.server:build_app" "args" $args -}}
{{- $grpc := dict "port" .Values.serve.grpcPort "grpc_servicer_functions" (list "raymoe.deploy.grpc_stubs.add_RaymoeServiceServicer_to_server") -}}
{{- $cfg := dict "proxy_location" "HeadOnly" "http_options" (dict "host" "0.0.0.0" "port" .Values.serve.httpPort) "grpc_options" $grpc "applications" (list $app) -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/*
The rules values.schema.json cannot state (the same as `raymoe k8s render` checks).
*/}}
{{- define "raymoe.validate" -}}
{{- $ranks := int (default 2 .Values.raymoe.expert_ranks) -}}
{{- $nodes := int .Values.workers.nodes -}}
{{- $label := dig "ray" "node_label" "" .Values.raymoe -}}
{{- if and $label (ne (mod $ranks $nodes) 0) -}}
{{- fail (printf "chart value 'workers.nodes' = %d: must divide raymoe.expert_ranks = %d (plan node of rank r is r // (ranks / nodes)); change either, or set raymoe.ray.node_label: null" $nodes $ranks) -}}
{{- end -}}
{{- $gpus := dig "resources" "gpus_per_actor" "auto" .Values.raymoe -}}
{{- $perActor := ternary 1.0 (float64 $gpus) (eq (toString $gpus) "auto") -}}
{{- $need := mulf $perActor (float64 (div $ranks $nodes)) -}}
{{- if and $label (gt (int .Values.workers.gpusPerNode) 0) (lt (float64 .Values.workers.gpusPerNode) $need) -}}
{{- fail (printf "chart value 'workers.gpusPerNode' = %v: each node runs %d expert ranks of %v GPU: needs at least %v" .Values.workers.gpusPerNode (div $ranks $nodes) $perActor $need) -}}
{{- end -}}
{{- if and (eq .Values.model.storage.type "uri") (not .Values.model.storage.uri.uri) -}}
{{- fail "chart value 'model.storage.uri.uri' = '': set the checkpoint's URI, e.g. s3://bucket/models/NAME" -}}
{{- end -}}
{{- if .Values.placementPlan -}}
{{- $plan := fromYaml .Values.placementPlan -}}
{{- if ne (int $plan.num_ranks) $ranks -}}
{{- fail (printf "chart value 'placementPlan' = 'num_ranks: %v': raymoe.expert_ranks is %d; rebuild the plan with `raymoe plan --ranks %d`" $plan.num_ranks $ranks $ranks) -}}
{{- end -}}
{{- if not (has (int $plan.num_nodes) (list 1 $nodes)) -}}
{{- fail (printf "chart value 'workers.nodes' = %d: the plan places ranks on %v nodes; set workers.nodes=%v or rebuild the plan with --nodes %d" $nodes $plan.num_nodes $plan.num_nodes $nodes) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
A Ray pod. Arguments (dict): root, role (head|worker), group (head/workers values),
gpus, ports (list), withModel, component, results (mount /results).
*/}}
{{- define "raymoe.podTemplate" -}}
{{- $v := .root.Values -}}
{{- $modelDir := printf "%s/%s" (trimSuffix "/" $v.model.mountPath) $v.model.path -}}
{{- $res := deepCopy (default (dict) .group.resources) -}}
{{- if .gpus -}}
{{- $limits := default (dict) $res.limits -}}
{{- $_ := set $limits $v.workers.gpuResource .gpus -}}
{{- $_ := set $res "limits" $limits -}}
{{- $requests := default (dict) $res.requests -}}
{{- $_ := set $requests $v.workers.gpuResource .gpus -}}
{{- $_ := set $res "requests" $requests -}}
{{- end -}}
metadata:
  labels:
    {{- include "raymoe.selectorLabels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  containers:
    - name: ray-{{ .role }}
      image: "{{ $v.image.repository }}:{{ $v.image.tag }}"
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- if or $v.apiKey.existingSecret .group.env }}
      env:
        {{- if $v.apiKey.existingSecret }}
        - name: RAYMOE_API_KEY
          valueFrom:
            secretKeyRef:
              name: {{ $v.apiKey.existingSecret }}
              key: {{ $v.apiKey.key }}
        {{- end }}
        {{- with .group.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      ports:
        {{- toYaml .ports | nindent 8 }}
      resources:
        {{- toYaml $res | nindent 8 }}
      volumeMounts:
        - name: raymoe-config
          mountPath: /etc/raymoe
          readOnly: true
        - name: dshm
          mountPath: /dev/shm
        {{- if .withModel }}
        - name: model
          mountPath: {{ $v.model.mountPath }}
          readOnly: true
        {{- end }}
        {{- if .results }}
        - name: results
          mountPath: /results
        {{- end }}
  volumes:
    - name: raymoe-config
      configMap:
        name: {{ include "raymoe.fullname" .root }}-config
    - name: dshm
      emptyDir:
        medium: Memory
    {{- if .withModel }}
    {{- $storage := $v.model.storage }}
    - name: model
      {{- if eq $storage.type "pvc" }}
      persistentVolumeClaim:
        claimName: {{ $storage.pvc.claimName }}
        readOnly: {{ ne $storage.pvc.readOnly false }}
      {{- else if eq $storage.type "hostPath" }}
      hostPath:
        path: {{ $storage.hostPath.path }}
        type: {{ default "Directory" $storage.hostPath.type }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ $storage.uri.sizeLimit | quote }}
      {{- end }}
    {{- end }}
    {{- if .results }}
    - name: results
      {{- if $v.benchmark.resultsClaim }}
      persistentVolumeClaim:
        claimName: {{ $v.benchmark.resultsClaim }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    {{- end }}
  {{- if and .withModel (eq $v.model.storage.type "uri") }}
  {{- $uri := $v.model.storage.uri }}
  initContainers:
    - name: fetch-model
      image: {{ $uri.image }}
      command:
        {{- toYaml $uri.command | nindent 8 }}
      env:
        - name: MODEL_URI
          value: {{ $uri.uri | quote }}
        - name: MODEL_DIR
          value: {{ $modelDir | quote }}
        {{- with $uri.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $uri.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: model
          mountPath: {{ $v.model.mountPath }}
  {{- end }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/*
A RayCluster spec. Arguments (dict): root, nodes, gpusPerNode, prefix (node|bench),
withModel, component ("" = head/worker), results.
*/}}
{{- define "raymoe.clusterSpec" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $ctx := . -}}
{{- $label := dig "ray" "node_label" "" $v.raymoe -}}
{{- $headPorts := list (dict "name" "gcs-server" "containerPort" 6379) (dict "name" "dashboard" "containerPort" 8265) (dict "name" "client" "containerPort" 10001) (dict "name" "serve" "containerPort" $v.serve.httpPort) (dict "name" "grpc" "containerPort" $v.serve.grpcPort) (dict "name" "metrics" "containerPort" 8080) -}}
{{- $workerPorts := list (dict "name" "metrics" "containerPort" 8080) -}}
rayVersion: {{ $v.rayVersion | quote }}
{{- if eq $v.rayAuth.mode "token" }}
authOptions:
  mode: token
{{- end }}
headGroupSpec:
  rayStartParams:
    {{- toYaml (merge (deepCopy (default (dict) $v.head.rayStartParams)) (dict "num-cpus" "0" "dashboard-host" "0.0.0.0")) | nindent 4 }}
  template:
    {{- include "raymoe.podTemplate" (dict "root" $root "role" "head" "group" $v.head "gpus" 0 "ports" $headPorts "withModel" $ctx.withModel "component" (default "head" $ctx.component) "results" $ctx.results) | nindent 4 }}
workerGroupSpecs:
{{- range $node := until (int $ctx.nodes) }}
  - groupName: {{ printf "%s-%d" $ctx.prefix $node }}
    replicas: 1
    minReplicas: 1
    maxReplicas: 1
    rayStartParams:
      {{- toYaml (default (dict) $v.workers.rayStartParams) | nindent 6 }}
    {{- if $label }}
    labels:
      {{ $label | quote }}: {{ $node | quote }}
    {{- end }}
    template:
      {{- include "raymoe.podTemplate" (dict "root" $root "role" "worker" "group" $v.workers "gpus" $ctx.gpusPerNode "ports" $workerPorts "withModel" $ctx.withModel "component" (default "worker" $ctx.component) "results" false) | nindent 6 }}
{{- end }}
{{- if and (eq (default "disaggregated" $v.raymoe.layout) "disaggregated") (eq $ctx.prefix "node") }}
{{- $frontend := dict "resources" $v.workers.frontend.resources "nodeSelector" $v.workers.nodeSelector "tolerations" $v.workers.tolerations "affinity" $v.workers.affinity "env" $v.workers.env }}
  - groupName: {{ $ctx.prefix }}-frontend
    replicas: 1
    minReplicas: 1
    maxReplicas: 1
    rayStartParams:
      {{- toYaml (default (dict) $v.workers.rayStartParams) | nindent 6 }}
    template:
      {{- include "raymoe.podTemplate" (dict "root" $root "role" "worker" "group" $frontend "gpus" $v.workers.frontend.gpus "ports" $workerPorts "withModel" $ctx.withModel "component" (default "worker" $ctx.component) "results" false) | nindent 6 }}
{{- end }}
{{- end -}}

{{/* The benchmark job's entrypoint: the commands, then the JSON results to the log. */}}
{{- define "raymoe.benchmarkEntrypoint" -}}
{{- $script := join "; " (concat (list "set -e" "mkdir -p /results") .Values.benchmark.commands (list "for f in /results/*.json; do echo \"== $f\"; cat \"$f\"; echo; done")) -}}
{{- printf "bash -c '%s'" (replace "'" "'\"'\"'" $script) -}}
{{- end -}}
