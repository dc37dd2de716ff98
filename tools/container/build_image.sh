#!/usr/bin/env bash
# `make image`: the project image (Dockerfile) as CALLERID_IMAGE (default callerid:local, the
# name docker-compose.yml runs), on the Python base build_bases.sh picks (the official
# python:3.11-slim, or its offline stand-in). Rebuilt only when the build context, the
# Dockerfile or the base change (CALLERID_IMAGE_REBUILD=1 forces it); the engine's layer
# cache keeps what did not change (a code change still reinstalls the package: one pip step).
# Prints the size at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
source tools/container/lib.sh
bash tools/container/build_bases.sh
# shellcheck source=/dev/null
source "$CACHE/images.env"
ENGINE=$CALLERID_CONTAINER_ENGINE
IMAGE=${CALLERID_IMAGE:-callerid:local}

# What the build sees: the files .dockerignore lets in (the Dockerfile says which).
context_files() {
  find pyproject.toml README.md services shared tools examples -type f \
    ! -path 'tools/container/*' ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*/.mypy_cache/*' \
    ! -path '*/.pytest_cache/*' ! -path '*/.ruff_cache/*' -print0 | LC_ALL=C sort -z
}
inputs=$( {
  sha256sum Dockerfile .dockerignore
  context_files | xargs -0 sha256sum
  image_id "$CALLERID_PYTHON_BASE"
} | sha256sum | cut -c1-16)

podman_build_network_opts
build_if_changed "$IMAGE" . "$inputs" --build-arg "PYTHON_BASE=$CALLERID_PYTHON_BASE" \
  "${BUILD_OPTS[@]}"
size=$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")
say "$IMAGE: $((size / 1000000)) MB, on $CALLERID_PYTHON_BASE ($ENGINE)"
