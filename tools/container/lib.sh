# Shared by tools/container/*.sh (sourced, not run): which engine, where the cache is, and
# whether an image is already built from the same inputs.
#   CALLERID_CONTAINER_ENGINE  podman | docker (default: the first whose engine answers)
#   CALLERID_IMAGE_CACHE       base tarballs and images.env (default ~/.cache/callerid/images;
#                              outside the checkout, so a fresh clone reuses them)
CACHE=${CALLERID_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/callerid/images}
# The label that records what an image was built from; equal inputs, no rebuild.
INPUTS_LABEL=io.callerid.inputs

say() { echo "${0##*/}: $*" >&2; }
die() { say "$*"; exit 1; }

# An engine counts only when it answers: the docker CLI alone, without a daemon, does not.
engine_answers() {
  case "$1" in
    podman) command -v podman >/dev/null && podman info >/dev/null 2>&1 ;;
    docker) command -v docker >/dev/null && docker info >/dev/null 2>&1 ;;
    *) return 1 ;;
  esac
}

find_engine() {
  if [ -n "${CALLERID_CONTAINER_ENGINE:-}" ]; then
    engine_answers "$CALLERID_CONTAINER_ENGINE" \
      || die "CALLERID_CONTAINER_ENGINE=$CALLERID_CONTAINER_ENGINE does not answer" \
        "(\`$CALLERID_CONTAINER_ENGINE info\` fails): start it or unset the variable"
    echo "$CALLERID_CONTAINER_ENGINE"
  elif engine_answers podman; then
    echo podman
  elif engine_answers docker; then
    echo docker
  else
    die "no container engine answers (\`podman info\` and \`docker info\` fail):" \
      "run tools/container/ensure_podman.sh as root to install podman"
  fi
}

# A hash of files and strings: an image's inputs (its Dockerfile, context and parent image).
inputs_hash() {
  local item
  for item in "$@"; do
    if [ -d "$item" ]; then
      (cd "$item" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
    elif [ -f "$item" ]; then
      sha256sum <"$item"
    else
      printf '%s\n' "$item"
    fi
  done | sha256sum | cut -c1-16
}

image_inputs() {
  "$ENGINE" image inspect --format "{{ index .Config.Labels \"$INPUTS_LABEL\" }}" "$1" \
    2>/dev/null || true
}

image_id() { "$ENGINE" image inspect --format '{{.Id}}' "$1"; }

# Build context/Dockerfile as TAG unless TAG already carries these inputs.
#   build_if_changed TAG CONTEXT INPUTS [engine build options...]
build_if_changed() {
  local tag=$1 context=$2 inputs=$3
  shift 3
  if [ "${CALLERID_IMAGE_REBUILD:-}" != 1 ] && [ "$(image_inputs "$tag")" = "$inputs" ]; then
    say "$tag is up to date (inputs $inputs)"
    return 0
  fi
  say "building $tag (inputs $inputs)"
  local started=$SECONDS log previous
  previous=$(image_id "$tag" 2>/dev/null || true)
  mkdir -p "$CACHE/logs"
  log="$CACHE/logs/$(printf '%s' "$tag" | tr -c 'A-Za-z0-9._-' _).log"
  "$ENGINE" build --label "$INPUTS_LABEL=$inputs" -t "$tag" "$@" "$context" >"$log" 2>&1 || {
    tail -n 30 "$log" >&2
    die "building $tag failed: the whole log is $log"
  }
  say "built $tag in $((SECONDS - started)) s"
  # The image this one replaces, untagged now: removed with the layers only it used, so
  # storage does not grow by an image per rebuild (shared layers, like the dependency
  # layer, stay as the new image's). Kept if a container still runs it.
  if [ -n "$previous" ] && [ "$previous" != "$(image_id "$tag")" ]; then
    "$ENGINE" rmi "$previous" >/dev/null 2>&1 || true
  fi
}

# Options that let a podman build reach Debian's mirror and PyPI the way this host does: the
# host network, and the host's CA bundle for pip (a bundle with this network's CAs, which a
# fresh Debian or certifi lacks). Mounted for the build only: nothing of it lands in a layer.
podman_build_network_opts() {
  BUILD_OPTS=(--network host)
  local bundle=${CALLERID_BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
  if [ "$ENGINE" = podman ] && [ -f "$bundle" ]; then
    mkdir -p "$CACHE"
    printf '[global]\ncert = /etc/callerid-build/ca.crt\n' >"$CACHE/pip.conf"
    BUILD_OPTS+=(-v "$bundle:/etc/callerid-build/ca.crt:ro" -v "$CACHE/pip.conf:/etc/pip.conf:ro")
  fi
}
