#!/bin/sh
# RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS name the user a new node creates, as with
# the official image: written to a conf.d file the node reads at boot.
set -e
if [ -n "${RABBITMQ_DEFAULT_USER:-}" ] || [ -n "${RABBITMQ_DEFAULT_PASS:-}" ]; then
  {
    echo "default_user = ${RABBITMQ_DEFAULT_USER:-guest}"
    echo "default_pass = ${RABBITMQ_DEFAULT_PASS:-guest}"
  } >/etc/rabbitmq/conf.d/20-default-user.conf
fi
# Debian's /usr/sbin/rabbitmq-server is a wrapper that keeps the server as its child (SIGTERM
# reaches only the wrapper, so a stop waits out the engine's timeout and kills the node) and
# sends the log to a file. The server script itself stops the node cleanly on SIGTERM and logs
# to stdout: run it as PID 1.
if [ "$1" = rabbitmq-server ]; then
  shift
  set -- /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
fi
exec "$@"
