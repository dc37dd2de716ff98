#!/usr/bin/env bash
# `make run`: the embedded gateway (no broker) with the example nodes and the mock CRM.
# Both run in the foreground of this script; Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
CRM_LISTEN=${CRM_LISTEN:-127.0.0.1:8081}

"$BIN/callerid-mock-crm" --listen "$CRM_LISTEN" --table examples/mock_crm_table.yaml &
crm_pid=$!
trap 'kill "$crm_pid" 2>/dev/null || true; wait "$crm_pid" 2>/dev/null || true' EXIT

echo "mock CRM on http://$CRM_LISTEN (pid $crm_pid); gateway on ${CALLERID_AGI_LISTEN:-0.0.0.0:4573}"
echo "try: $BIN/callerid-asterisk-sim --port 4573 --node 1 --entries 12345"
export CALLERID_NODES=${CALLERID_NODES:-examples/nodes.yaml}
export CALLERID_JUMP_TEMPLATES=${CALLERID_JUMP_TEMPLATES:-'{"*": "oml-dest-{type},{id},1"}'}
"$BIN/agi-gateway" --embedded "$@"
