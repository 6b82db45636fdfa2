{{/*
Ferry's chart shares its objects with the kustomize base: files/ holds links
to deploy/'s YAML, which these helpers render with the release's namespace and
the base's common label, and which the templates patch with the values.
*/}}

{{/* ferry.docs: the objects of a base file (list root path), as YAML documents. */}}
{{- define "ferry.docs" -}}
{{- $root := index . 0 -}}
{{- range regexSplit "(?m)^---\\s*$" ($root.Files.Get (index . 1)) -1 }}
{{- $o := fromYaml . }}
{{- if $o }}
{{ include "ferry.object" (list $root $o) }}
{{- end }}
{{- end }}
{{- end -}}

{{/* ferry.load: the one object of a base file (list root path), as a dict to patch. */}}
{{- define "ferry.load" -}}
{{- toJson (fromYaml ((index . 0).Files.Get (index . 1))) -}}
{{- end -}}

{{/* ferry.object: one object (list root dict) in the release namespace, labelled. */}}
{{- define "ferry.object" -}}
{{- $root := index . 0 -}}
{{- $o := index . 1 -}}
{{- $labels := default dict $o.metadata.labels -}}
{{- $_ := set $labels "app.kubernetes.io/part-of" "ferry" -}}
{{- $_ := set $o.metadata "labels" $labels -}}
{{- if hasKey $o.metadata "namespace" }}{{ $_ := set $o.metadata "namespace" $root.Release.Namespace }}{{ end -}}
{{- if eq $o.kind "Namespace" }}{{ $_ := set $o.metadata "name" $root.Release.Namespace }}{{ end -}}
{{- range $o.subjects }}{{ if hasKey . "namespace" }}{{ $_ := set . "namespace" $root.Release.Namespace }}{{ end }}{{ end -}}
---
{{ toYaml $o }}
{{- end -}}

{{/* ferry.image: repository:tag of one of .Values.images (list root name). */}}
{{- define "ferry.image" -}}
{{- $i := index (index . 0).Values.images (index . 1) -}}
{{- printf "%s:%s" $i.repository (default (index . 0).Chart.AppVersion $i.tag) -}}
{{- end -}}

{{/* ferry.container: set a container's image and pull policy (list root name container). */}}
{{- define "ferry.container" -}}
{{- $root := index . 0 -}}
{{- $c := index . 2 -}}
{{- $_ := set $c "image" (include "ferry.image" (list $root (index . 1))) -}}
{{- with (index $root.Values.images (index . 1)).pullPolicy }}{{ $_ := set $c "imagePullPolicy" . }}{{ end -}}
{{- end -}}

{{/* ferry.args: args with each --flag=value of the dict (list args dict) replaced. */}}
{{- define "ferry.args" -}}
{{- $set := index . 1 -}}
{{- $out := list -}}
{{- range index . 0 -}}
{{- $flag := regexFind "^--[a-z-]+" . -}}
{{- if and $flag (hasKey $set $flag) -}}
{{- $out = append $out (printf "%s=%v" $flag (index $set $flag)) -}}
{{- else -}}
{{- $out = append $out . -}}
{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}
