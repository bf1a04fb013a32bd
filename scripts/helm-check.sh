#!/usr/bin/env bash
# Checks the deployment files: for the chart helm/dsv2 with each values preset and a few
# overrides, `helm lint --strict`, `helm template`, and Kubernetes 1.33 schema validation of every
# rendered manifest (kubernetes-validate --strict, offline: the schemas ship in the package);
# then the pytest file tests/deploy/test_chart.py (placement, expert replicas, GPUs, probes, shard
# wiring, TLS and auth wiring, schema strictness, compose file, Dockerfile).
# Tools come from scripts/install-ci-tools.sh (.tools/). Exits non-zero on any failure; exits 0
# with a SKIPPED line only when helm is not installed at all.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="$ROOT/helm/dsv2"
K8S_VERSION="${K8S_VERSION:-1.33.0}"
VENV="$ROOT/.tools/venv"

HELM="${HELM:-}"
if [[ -n "$HELM" && ! -x "$HELM" ]]; then
    echo "helm-check: FAIL: HELM=$HELM is not an executable" >&2
    exit 1
fi
if [[ -z "$HELM" ]]; then
    if [[ -x "$ROOT/.tools/bin/helm" ]]; then
        HELM="$ROOT/.tools/bin/helm"
    else
        HELM="$(command -v helm || true)"
    fi
fi
if [[ -z "$HELM" || ! -x "$HELM" ]]; then
    echo "helm-check: SKIPPED: helm is not installed (run scripts/install-ci-tools.sh)"
    exit 0
fi
export HELM

for tool in "$VENV/bin/kubernetes-validate" "$VENV/bin/python"; do
    if [[ ! -x "$tool" ]]; then
        echo "helm-check: FAIL: $tool missing (run scripts/install-ci-tools.sh)" >&2
        exit 1
    fi
done

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

TINY="$CHART/values-tiny-cpu.yaml"
GPU8="$CHART/values-deepseek-v2-8gpu.yaml"
# name|helm arguments (word-split; no spaces inside one argument)
CASES=(
    "defaults|"
    "tiny-cpu|-f $TINY"
    "deepseek-v2-8gpu|-f $GPU8"
    "tiny-3-shards|-f $TINY --set experts.shards=3"
    "tiny-4-shards-required-spread|-f $TINY --set experts.shards=4 --set experts.spread=required"
    "8gpu-8-shards-groups|-f $GPU8 --set experts.shards=8 --set placement.mode=groups"
    "8gpu-4-shards-auto|-f $GPU8 --set experts.shards=4 --set placement.mode=auto"
    "8gpu-3-shards-contiguous|-f $GPU8 --set experts.shards=3"
    "tiny-tls|-f $TINY --set tls.enabled=true --set tls.secretName=dsv2-tls"
    "tiny-tls-auth-mtls|-f $TINY --set tls.enabled=true --set tls.secretName=dsv2-tls --set tls.clientAuth=true --set auth.enabled=true --set auth.secretName=dsv2-auth"
    "tiny-tls-public-only|-f $TINY --set tls.enabled=true --set tls.secretName=dsv2-tls --set tls.internal=false"
    "8gpu-tls-servicemonitor|-f $GPU8 --set tls.enabled=true --set tls.secretName=dsv2-tls --set metrics.enabled=true --set serviceMonitor.enabled=true"
    "8gpu-init-into-new-pvc|-f $GPU8 --set model.source=init --set model.init.volume=pvc --set model.pvc.claimName= --set model.pvc.create=true --set model.pvc.accessModes[0]=ReadWriteMany"
    "tiny-metrics-tracing|-f $TINY --set metrics.enabled=true --set tracing.otlpEndpoint=http://otel-collector:4317"
    "tiny-4-shards-replicas-2|-f $TINY --set experts.shards=4 --set experts.replicas=2"
    "8gpu-replicas-2|-f $GPU8 --set experts.replicas=2"
    "tiny-router-flags|-f $TINY --set router.replicas=2 --set router.maxQueue=64 --set router.kvCacheBlocks=4096 --set router.service.type=LoadBalancer"
)

failures=0
fail() { echo "helm-check: FAIL: $*" >&2; failures=$((failures + 1)); }

echo "helm-check: $("$HELM" version --short), kubernetes-validate $("$VENV/bin/kubernetes-validate" --version 2>&1 | tail -n1), schemas for $K8S_VERSION"
for case in "${CASES[@]}"; do
    name="${case%%|*}"
    # shellcheck disable=SC2206 # word splitting of the argument list is intended
    args=(${case#*|})
    if ! "$HELM" lint --strict --quiet "$CHART" "${args[@]}" >"$OUT/$name.lint" 2>&1; then
        cat "$OUT/$name.lint" >&2
        fail "$name: helm lint --strict"
        continue
    fi
    if ! "$HELM" template dsv2 "$CHART" --namespace dsv2 "${args[@]}" >"$OUT/$name.yaml" 2>"$OUT/$name.err"; then
        cat "$OUT/$name.err" >&2
        fail "$name: helm template"
        continue
    fi
    if ! "$VENV/bin/kubernetes-validate" -k "$K8S_VERSION" --strict --quiet "$OUT/$name.yaml" >"$OUT/$name.kv" 2>&1; then
        cat "$OUT/$name.kv" >&2
        fail "$name: kubernetes-validate"
        continue
    fi
    # A kind without a schema only warns; the only such kind the chart may render is the
    # ServiceMonitor CRD (its structure is checked by the pytest file).
    if grep "Couldn't find schema" "$OUT/$name.kv" | grep -v "kind ServiceMonitor with api version monitoring.coreos.com/v1" >&2; then
        fail "$name: a rendered kind has no Kubernetes $K8S_VERSION schema"
        continue
    fi
    docs="$(grep -c '^kind:' "$OUT/$name.yaml")"
    echo "helm-check: ok   $name: lint, template, $docs manifests valid for Kubernetes $K8S_VERSION"
done

echo "helm-check: pytest tests/deploy"
if ! (cd "$ROOT" && "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/deploy); then
    fail "pytest tests/deploy"
fi

if ((failures > 0)); then
    echo "helm-check: $failures check(s) failed" >&2
    exit 1
fi
echo "helm-check: all checks passed"
