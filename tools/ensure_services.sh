#!/usr/bin/env bash
# Make sure the local RabbitMQ and Redis the integration tests use are up: install them from
# Debian's packages if missing, start them if stopped, and wait until they answer.
set -euo pipefail

need_root() { [ "$(id -u)" = 0 ] || { echo "ensure_services: run as root or start $1 yourself" >&2; exit 1; }; }
apt_updated=""
apt_install() {
  need_root "$1"
  [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 60); do port_open "$1" && return 0; sleep 1; done
  echo "ensure_services: $2 did not come up on port $1" >&2; exit 1
}

if ! port_open 6379; then
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port 6379 Redis
fi

if ! port_open 5672; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  rabbitmq-server -detached
  wait_port 5672 RabbitMQ
fi
echo "ensure_services: Redis and RabbitMQ are up"
