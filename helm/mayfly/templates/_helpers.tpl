{{/*
Names. The full name is cut to 40 characters so that every suffix used below
("-server-headless" being the longest) keeps resource names within 63.
*/}}
{{- define "mayfly.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "mayfly.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "mayfly.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mayfly.serverName" -}}{{ include "mayfly.fullname" . }}-server{{- end -}}
{{- define "mayfly.agentName" -}}{{ include "mayfly.fullname" . }}-agent{{- end -}}
{{- define "mayfly.bundleConfigMap" -}}{{ include "mayfly.fullname" . }}-bundle{{- end -}}
{{- define "mayfly.policyConfigMap" -}}{{ include "mayfly.fullname" . }}-server-policy{{- end -}}

{{- define "mayfly.serverServiceAccount" -}}
{{- default (include "mayfly.serverName" .) .Values.server.serviceAccount.name -}}
{{- end -}}

{{- define "mayfly.agentServiceAccount" -}}
{{- default (include "mayfly.agentName" .) .Values.agent.serviceAccount.name -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "mayfly.labels" -}}
helm.sh/chart: {{ include "mayfly.chart" . }}
app.kubernetes.io/name: {{ include "mayfly.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: mayfly
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "server"). */}}
{{- define "mayfly.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mayfly.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of one component's objects: (dict "ctx" $ "component" "server"). */}}
{{- define "mayfly.componentLabels" -}}
{{ include "mayfly.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* An image reference from an image block: (dict "ctx" $ "image" .Values.server.image). */}}
{{- define "mayfly.image" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The node API address agents dial: the server Service's cluster DNS name. */}}
{{- define "mayfly.serverAddress" -}}
{{- printf "%s.%s.svc:%d" (include "mayfly.serverName" .) .Release.Namespace (int .Values.server.service.nodeApiPort) -}}
{{- end -}}

{{- define "mayfly.socketPath" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.agent.socketDir) .Values.agent.socketName -}}
{{- end -}}

{{/* Fixed paths inside the pods. */}}
{{- define "mayfly.serverDataDir" -}}/var/lib/mayfly/server{{- end -}}
{{- define "mayfly.agentDataDir" -}}/var/lib/mayfly/agent{{- end -}}
{{- define "mayfly.policyDir" -}}/etc/mayfly/policy{{- end -}}
{{- define "mayfly.bundleDir" -}}/run/mayfly/bundle{{- end -}}
{{- define "mayfly.bundleKey" -}}bundle.pem{{- end -}}
{{- define "mayfly.psatTokenDir" -}}/var/run/secrets/tokens{{- end -}}
{{- define "mayfly.psatTokenFile" -}}mayfly-agent{{- end -}}
{{- define "mayfly.saDir" -}}/var/run/secrets/kubernetes.io/serviceaccount{{- end -}}

{{/*
A TOML basic string. JSON string escapes (\", \\, \n, \uXXXX) are valid TOML escapes, so
toJson of a string is a valid TOML string whatever it contains.
*/}}
{{- define "mayfly.toml" -}}{{ toJson . }}{{- end -}}

{{/* Checks of combinations the schema cannot express. */}}
{{- define "mayfly.validate" -}}
{{- if and (not .Values.server.policy.builtin) (empty .Values.server.policy.files) -}}
{{- fail "server.policy.builtin=false needs server.policy.files: with neither, no request (not even the admin API) would be permitted" -}}
{{- end -}}
{{- range $name, $_ := .Values.server.policy.files -}}
{{- if not (hasSuffix ".cedar" $name) -}}
{{- fail (printf "server.policy.files: %q must end in .cedar (the server loads only *.cedar files of the directory)" $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
