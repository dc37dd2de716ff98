#!/bin/sh
# redis-server with no config file: protected mode off, as in the official image (which
# patches the default), because a container's clients come from its network, not loopback.
set -e
if [ "$1" = redis-server ]; then
  shift
  case "${1:-}" in
    ""|-*) set -- redis-server --protected-mode no "$@" ;;
    *) ;;  # a config file: it says what it wants
  esac
  [ "${1:-}" = redis-server ] || set -- redis-server "$@"
fi
exec "$@"
