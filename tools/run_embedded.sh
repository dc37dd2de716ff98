#!/usr/bin/env bash
# `make run`: the embedded gateway (no broker) with the example nodes and the mock CRM, on
# loopback unless CALLERID_AGI_LISTEN / CALLERID_HTTP_LISTEN / CRM_LISTEN say otherwise.
# Both run as children of this script. Ctrl-C, TERM or HUP (to this script, or to make, which
# passes TERM on) stops both: the trap sends them TERM by PID and waits for them. If either
# exits by itself, the other is stopped too. Should this script die without its trap running
# (SIGKILL), the children get TERM from the kernel (setpriv --pdeathsig, where available).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
CRM_LISTEN=${CRM_LISTEN:-127.0.0.1:8081}
export CALLERID_AGI_LISTEN=${CALLERID_AGI_LISTEN:-127.0.0.1:4573}
export CALLERID_HTTP_LISTEN=${CALLERID_HTTP_LISTEN:-127.0.0.1:9100}
# Only this machine may talk FastAGI to the demo (the simulator, a local Asterisk).
export CALLERID_AGI_ALLOWED_PEERS=${CALLERID_AGI_ALLOWED_PEERS:-127.0.0.1/32,::1/128}
export CALLERID_NODES=${CALLERID_NODES:-examples/nodes.yaml}
export CALLERID_JUMP_TEMPLATES=${CALLERID_JUMP_TEMPLATES:-'{"*": "oml-dest-{type},{id},1"}'}

die_with_me=()
if setpriv --help 2>/dev/null | grep -q -- --pdeathsig; then
  die_with_me=(setpriv --pdeathsig TERM --)
fi

pids=()
stop() {
  trap - INT TERM HUP
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap 'stop; exit 129' HUP
trap stop EXIT

"${die_with_me[@]}" "$BIN/callerid-mock-crm" --listen "$CRM_LISTEN" \
  --table examples/mock_crm_table.yaml &
pids+=($!)
"${die_with_me[@]}" "$BIN/agi-gateway" --embedded "$@" &
pids+=($!)

agi_port=${CALLERID_AGI_LISTEN##*:}
echo "mock CRM on http://$CRM_LISTEN (pid ${pids[0]}); gateway FastAGI on $CALLERID_AGI_LISTEN," \
  "metrics on http://$CALLERID_HTTP_LISTEN (pid ${pids[1]}); Ctrl-C stops both"
echo "try: $BIN/callerid-asterisk-sim --port $agi_port --node 1 --entries 12345"

# Until either exits (or a signal runs a trap above); then stop the other.
status=0
wait -n "${pids[@]}" || status=$?
exit "$status"
