#!/usr/bin/env bash
# The images the project image and the compose stack start from, and where they come from.
# Writes $CACHE/images.env (CALLERID_PYTHON_BASE, CALLERID_RABBITMQ_IMAGE,
# CALLERID_REDIS_IMAGE, CALLERID_PROMETHEUS_IMAGE, CALLERID_GRAFANA_IMAGE) for
# build_image.sh and stack.sh. CALLERID_IMAGE_SOURCE picks, for each one:
#   auto (default)  the upstream image if the engine has it or can pull it, else the local one
#   upstream        the upstream image, or fail
#   local           the local one, built from deploy/images/ on a Debian base made offline
# The local ones: debootstrap (--variant=minbase bookworm, from the Debian mirror this host's
# apt uses, or CALLERID_DEBIAN_MIRROR) makes localhost/callerid-base/debian:bookworm; on it,
# deploy/images/{python,rabbitmq,redis,prometheus}/Dockerfile install Debian's packages.
# Grafana has no local stand-in: without its upstream image CALLERID_GRAFANA_IMAGE is empty
# and `make stack-up` leaves it out. Each image is rebuilt only when its inputs change (the
# io.callerid.inputs label; CALLERID_IMAGE_REBUILD=1 forces it); the debootstrap tree is kept
# as a tarball in the cache, so a wiped engine storage re-imports it in seconds.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tools/container/lib.sh
ENGINE=$(find_engine)
SOURCE=${CALLERID_IMAGE_SOURCE:-auto}
case "$SOURCE" in auto | upstream | local) ;; *)
  die "CALLERID_IMAGE_SOURCE=$SOURCE: expected auto, upstream or local" ;;
esac
# Bump when the way the Debian tree is made changes (not its inputs below).
DEBIAN_FORMAT=1
SUITE=bookworm
LOCAL=localhost/callerid-base
mkdir -p "$CACHE"

# The Debian mirror (and security mirror) this host's apt is configured with.
host_mirror() {
  local suffix=$1
  grep -rhoE "^(URIs:|deb)[[:space:]]+https?://[^[:space:]]+/$suffix/?([[:space:]]|$)" \
    /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | awk '{print $2}' | sed 's:/$::' | head -n 1
}

# Upstream image if wanted and available (present, or pulled), else nothing.
upstream() {
  local image=$1
  [ "$SOURCE" != local ] || return 1
  if "$ENGINE" image inspect "$image" >/dev/null 2>&1 \
    || timeout "${CALLERID_PULL_TIMEOUT:-120}" "$ENGINE" pull -q "$image" >/dev/null 2>&1; then
    echo "$image"
    return 0
  fi
  [ "$SOURCE" != upstream ] || die "CALLERID_IMAGE_SOURCE=upstream, but $image cannot be" \
    "pulled: let the engine reach its registry, or use CALLERID_IMAGE_SOURCE=auto"
  return 1
}

debian_base() {
  local tag=$LOCAL/debian:$SUITE
  local mirror=${CALLERID_DEBIAN_MIRROR:-$(host_mirror debian)}
  local security=${CALLERID_DEBIAN_SECURITY_MIRROR:-$(host_mirror debian-security)}
  [ -n "$mirror" ] || die "no Debian mirror in /etc/apt/sources.list*: set" \
    "CALLERID_DEBIAN_MIRROR (e.g. http://deb.debian.org/debian)"
  local inputs
  inputs=$(inputs_hash "$DEBIAN_FORMAT $SUITE minbase $mirror $security" deploy/images/debian)
  local tarball=$CACHE/debian-$SUITE-$inputs.tar
  if [ "${CALLERID_IMAGE_REBUILD:-}" != 1 ] && [ "$(image_inputs "$tag")" = "$inputs" ]; then
    say "$tag is up to date (inputs $inputs)"
    echo "$tag"
    return
  fi
  if [ "${CALLERID_IMAGE_REBUILD:-}" = 1 ] || [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || die "making $tag needs debootstrap: run" \
      "tools/container/ensure_podman.sh as root (or apt-get install debootstrap)"
    [ "$(id -u)" = 0 ] || die "making $tag with debootstrap needs root"
    local tree=$CACHE/debian-$SUITE.tree started=$SECONDS
    rm -rf "$tree"
    say "debootstrap --variant=minbase $SUITE from $mirror (about a minute)"
    debootstrap --variant=minbase "$SUITE" "$tree" "$mirror" >"$CACHE/debootstrap.log" 2>&1 || {
      tail -n 20 "$CACHE/debootstrap.log" >&2
      die "debootstrap failed: the whole log is $CACHE/debootstrap.log"
    }
    {
      echo "deb $mirror $SUITE main"
      echo "deb $mirror $SUITE-updates main"
      [ -z "$security" ] || echo "deb $security $SUITE-security main"
    } >"$tree/etc/apt/sources.list"
    install -m 0755 deploy/images/debian/policy-rc.d "$tree/usr/sbin/policy-rc.d"
    install -m 0644 deploy/images/debian/dpkg-excludes "$tree/etc/dpkg/dpkg.cfg.d/excludes"
    install -m 0644 deploy/images/debian/apt-slim.conf "$tree/etc/apt/apt.conf.d/90slim"
    rm -rf "$tree"/var/cache/apt/archives/*.deb "$tree"/var/cache/apt/*.bin \
      "$tree"/var/lib/apt/lists/* "$tree"/usr/share/doc/* "$tree"/usr/share/man/* \
      "$tree"/usr/share/info/* "$tree"/var/log/*.log "$tree"/var/log/apt/*
    find "$tree/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias \
      -exec rm -rf {} +
    rm -f "$CACHE"/debian-"$SUITE"-*.tar
    tar --numeric-owner -C "$tree" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf "$tree"
    say "made the $SUITE tree in $((SECONDS - started)) s"
  fi
  "$ENGINE" import --change "LABEL $INPUTS_LABEL=$inputs" --change 'CMD ["bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$tarball" "$tag" >/dev/null 2>"$CACHE/import.log" || {
    cat "$CACHE/import.log" >&2
    die "importing $tarball as $tag failed"
  }
  say "imported $tag from $tarball"
  echo "$tag"
}

# An image from deploy/images/NAME/Dockerfile on the Debian base.
local_image() {
  local name=$1 tag=$2 debian=$3
  local inputs
  inputs=$(inputs_hash "deploy/images/$name" "$(image_id "$debian")")
  podman_build_network_opts
  build_if_changed "$tag" "deploy/images/$name" "$inputs" \
    --build-arg "DEBIAN_BASE=$debian" "${BUILD_OPTS[@]}"
  echo "$tag"
}

debian=""
need_debian() { [ -n "$debian" ] || debian=$(debian_base); }

python=$(upstream docker.io/library/python:3.11-slim) \
  || { need_debian; python=$(local_image python "$LOCAL/python:3.11-$SUITE" "$debian"); }
rabbitmq=$(upstream docker.io/library/rabbitmq:3.13-management) \
  || { need_debian; rabbitmq=$(local_image rabbitmq "$LOCAL/rabbitmq:3-$SUITE" "$debian"); }
redis=$(upstream docker.io/library/redis:7-alpine) \
  || { need_debian; redis=$(local_image redis "$LOCAL/redis:7-$SUITE" "$debian"); }
prometheus=$(upstream docker.io/prom/prometheus:v2.53.2) \
  || { need_debian; prometheus=$(local_image prometheus "$LOCAL/prometheus:2-$SUITE" "$debian"); }
grafana=$(upstream docker.io/grafana/grafana:11.2.0) || grafana=""

cat >"$CACHE/images.env.part" <<ENV
# Written by tools/container/build_bases.sh ($SOURCE, engine $ENGINE).
CALLERID_CONTAINER_ENGINE=$ENGINE
CALLERID_PYTHON_BASE=$python
CALLERID_RABBITMQ_IMAGE=$rabbitmq
CALLERID_REDIS_IMAGE=$redis
CALLERID_PROMETHEUS_IMAGE=$prometheus
CALLERID_GRAFANA_IMAGE=$grafana
ENV
mv "$CACHE/images.env.part" "$CACHE/images.env"
say "bases: python $python, rabbitmq $rabbitmq, redis $redis, prometheus $prometheus," \
  "grafana ${grafana:-none (no registry: the stack runs without it)}"
