#!/usr/bin/env bash
# Make sure a container engine answers here, for `make image`, `make stack-up` and
# tests/deploy/ (idempotent, quiet when nothing is to do). A working docker or podman is left
# as it is. Otherwise, as root, Debian's podman is installed with runc, netavark and
# aardvark-dns (a compose project's own bridge network, with service names in DNS), catatonit
# and debootstrap (tools/container/build_bases.sh makes the base images with it when no
# registry is reachable), and configured for a machine like this one:
#   - runc, not crun: crun fails on a hybrid (v1 + v2) cgroup layout;
#   - cgroupfs and a file events log: there is no systemd to manage cgroups or a journal;
#   - default_ulimits no higher than this shell's hard limits: podman's default (nofile
#     1048576) cannot be set where the sandbox caps the hard limit, and every container fails.
# Each is written to /etc/containers/containers.conf.d/50-callerid.conf only when podman's
# effective configuration does not already have it. CALLERID_CONTAINER_ENGINE=docker skips all.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tools/container/lib.sh

[ "${CALLERID_CONTAINER_ENGINE:-podman}" = podman ] || { find_engine >/dev/null; exit 0; }
DROP_IN=/etc/containers/containers.conf.d/50-callerid.conf

apt_install() {
  # Another apt may hold the dpkg lock (unattended upgrades, a second session): wait for it.
  local wait=(-o DPkg::Lock::Timeout=600)
  apt-get "${wait[@]}" update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get "${wait[@]}" install -y -qq --no-install-recommends \
    "$@" >/dev/null
}

missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v debootstrap >/dev/null || missing+=(debootstrap)
[ -x /usr/lib/podman/netavark ] || missing+=(netavark)
[ -x /usr/lib/podman/aardvark-dns ] || missing+=(aardvark-dns)
command -v iptables >/dev/null || missing+=(iptables)
command -v catatonit >/dev/null || [ -x /usr/libexec/podman/catatonit ] || missing+=(catatonit)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    engine_answers podman || engine_answers docker || die "no container engine answers," \
      "and installing ${missing[*]} needs root: run this script as root, or install them"
    exit 0
  fi
  say "installing ${missing[*]} from Debian"
  apt_install "${missing[@]}"
fi

[ "$(id -u)" = 0 ] || exit 0   # a user's podman: configured by that user, not here

# What podman runs with now, whatever file set it: "runtime cgroupManager eventLogger".
effective() {
  podman info --format '{{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}} {{.Host.EventLogger}}'
}
engine_lines=() containers_lines=()
read -r runtime cgroups events <<<"$(effective)"
[ "$runtime" = runc ] || engine_lines+=('runtime = "runc"')
if [ "$cgroups" != cgroupfs ] && ! [ -d /run/systemd/system ]; then
  engine_lines+=('cgroup_manager = "cgroupfs"')
fi
if [ "$events" != file ] && ! [ -d /run/systemd/system ]; then
  engine_lines+=('events_logger = "file"')
fi
# podman asks for nofile=1048576 unless told otherwise; keep within what this shell may set.
hard_nofile=$(ulimit -Hn) hard_nproc=$(ulimit -Hu)
if [ "$hard_nofile" != unlimited ] && [ "$hard_nofile" -lt 1048576 ] \
  && ! grep -qs '^[[:space:]]*default_ulimits' /etc/containers/containers.conf \
    /etc/containers/containers.conf.d/*.conf /usr/share/containers/containers.conf; then
  nproc=$hard_nproc
  [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768
  containers_lines+=("default_ulimits = [\"nofile=$hard_nofile:$hard_nofile\", \"nproc=$nproc:$nproc\"]")
fi
if [ ${#engine_lines[@]} -gt 0 ] || [ ${#containers_lines[@]} -gt 0 ]; then
  mkdir -p "$(dirname "$DROP_IN")"
  {
    echo "# Written by callerid's tools/container/ensure_podman.sh for this machine (see there)."
    if [ ${#containers_lines[@]} -gt 0 ]; then
      echo "[containers]"
      printf '%s\n' "${containers_lines[@]}"
    fi
    if [ ${#engine_lines[@]} -gt 0 ]; then
      echo "[engine]"
      printf '%s\n' "${engine_lines[@]}"
    fi
  } >>"$DROP_IN"
  say "configured podman in $DROP_IN: ${engine_lines[*]} ${containers_lines[*]}"
fi
engine_answers podman || die "podman is installed but \`podman info\` fails: $(podman info 2>&1 | tail -1)"
