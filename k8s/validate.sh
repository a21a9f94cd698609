#!/usr/bin/env bash
# Render every overlay with `kubectl kustomize` and validate it with kubernetes-validate (offline schemas).
# Secrets come from the committed *.env.example files, in a scratch copy: the real tree is never touched.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cp -r "$here" "$scratch/k8s"
find "$scratch/k8s" -name "*.env.example" | while read -r ex; do cp "$ex" "${ex%.example}"; done
validate="${KUBERNETES_VALIDATE:-kubernetes-validate}"
for overlay in "$scratch"/k8s/overlays/*/; do
  name="$(basename "$overlay")"
  kubectl kustomize "$overlay" > "$scratch/$name.yaml"
  if grep -nE 'image: [^ ]*(:latest)?$' "$scratch/$name.yaml" | grep -vE 'image: [^ ]+:[^ ]+$' ; then
    echo "overlay $name: an image without a tag (or :latest)" >&2; exit 1
  fi
  if grep -n 'image: .*:latest' "$scratch/$name.yaml"; then
    echo "overlay $name: an image uses :latest" >&2; exit 1
  fi
  "$validate" --strict --quiet -k 1.30.0 "$scratch/$name.yaml"
  echo "overlay $name: $(grep -c '^kind:' "$scratch/$name.yaml") objects, valid"
done
