#!/usr/bin/env bash
# Make sure the local RabbitMQ and Redis the integration tests use are up: install them from
# Debian's packages if missing (needs root), start them if stopped, and wait until they answer.
# A service the tests are pointed elsewhere for (CALLERID_TEST_AMQP_URL /
# CALLERID_TEST_REDIS_URL, see tests/services.py) is left alone.
set -euo pipefail

need_root() {
  [ "$(id -u)" = 0 ] || {
    echo "ensure_services: $1 is not running here and installing it needs root: run as root," \
      "start it yourself, or point the tests at one with $2" >&2
    exit 1
  }
}
apt_updated=""
apt_install() {
  # Another apt may hold the dpkg lock (unattended upgrades, a second session): wait for it.
  local wait=(-o DPkg::Lock::Timeout=600)
  [ -n "$apt_updated" ] || { apt-get "${wait[@]}" update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get "${wait[@]}" install -y -qq "$@" >/dev/null
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 60); do port_open "$1" && return 0; sleep 1; done
  echo "ensure_services: $2 did not come up on port $1" >&2; exit 1
}

if [ -n "${CALLERID_TEST_REDIS_URL:-}" ]; then
  echo "ensure_services: Redis from CALLERID_TEST_REDIS_URL"
elif ! port_open 6379; then
  command -v redis-server >/dev/null || { need_root Redis CALLERID_TEST_REDIS_URL; apt_install redis-server; }
  redis_dir=/var/lib/redis redis_log=/var/log/redis
  [ "$(id -u)" = 0 ] || { redis_dir=${TMPDIR:-/tmp}/callerid-redis; redis_log=$redis_dir; }
  mkdir -p "$redis_dir" "$redis_log"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir "$redis_dir" --logfile "$redis_log/ci.log"
  wait_port 6379 Redis
fi

# Binaries the HA tests run on private ports of their own (tests/integration/test_cache_ha.py:
# a primary, replicas and sentinels; test_broker_ha.py and test_startup_without_broker.py:
# RabbitMQ nodes), whatever the shared services above are. Without root they are only reported:
# those tests fail under CI=true and skip elsewhere.
ensure_binary() {
  command -v "$1" >/dev/null && return 0
  if [ "$(id -u)" = 0 ]; then
    apt_install "$2"
  else
    echo "ensure_services: $1 is missing and installing it needs root (apt-get install $2):" \
      "the tests that need it skip, or fail under CI=true" >&2
  fi
}
ensure_binary redis-sentinel redis-sentinel

if [ -n "${CALLERID_TEST_AMQP_URL:-}" ]; then
  echo "ensure_services: RabbitMQ from CALLERID_TEST_AMQP_URL"
elif ! port_open 5672; then
  command -v rabbitmq-server >/dev/null || { need_root RabbitMQ CALLERID_TEST_AMQP_URL; apt_install rabbitmq-server; }
  rabbitmq-server -detached
  wait_port 5672 RabbitMQ
fi
ensure_binary rabbitmq-server rabbitmq-server
echo "ensure_services: Redis and RabbitMQ are up"
