{{/* Common names and labels. */}}
{{- define "arctl.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object: call with (dict "root" $ "name" COMPONENT). */}}
{{- define "arctl.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: arctl
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{ include "arctl.selector" . }}
{{- end -}}

{{- define "arctl.selector" -}}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/name: {{ .name }}
{{- end -}}

{{- define "arctl.sharedClaim" -}}
{{- if .Values.sharedVolume.existingClaim -}}
{{- .Values.sharedVolume.existingClaim -}}
{{- else -}}
{{- printf "%s-data" (include "arctl.fullname" .) -}}
{{- end -}}
{{- end -}}
