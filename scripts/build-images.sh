#!/usr/bin/env bash
# Build every image of the stack, in order: base, redis (no-registry setups), gateway, tokenizer, lm,
# decoder. Usage: scripts/build-images.sh [engine]   (engine: podman (default when present) or docker)
#
# Settings (environment):
#   GLMV_DEBIAN_IMAGE     Debian bookworm root for the base and redis images (default debian:bookworm-slim)
#   GLMV_BASE_IMAGE       tag given to the base image (default glmvoice/base:0.1.0)
#   GLMV_TORCH_INDEX      wheel index for torch (default: the CPU index; "" for none)
#   GLMV_WHEELS_DIR       a local directory of wheels (torch) mounted into podman builds as find-links
#   GLMV_PIP_CERT         a CA bundle mounted into podman builds for pip (TLS-intercepting proxies)
#   GLMV_BUILD_LOGS       where each build's log goes (default .run/build-logs)
#   GLMV_IMAGES           which images to build (default: "base redis gateway tokenizer lm decoder")
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE=${1:-$(command -v podman >/dev/null 2>&1 && echo podman || echo docker)}
DEBIAN_IMAGE=${GLMV_DEBIAN_IMAGE:-debian:bookworm-slim}
BASE_IMAGE=${GLMV_BASE_IMAGE:-glmvoice/base:0.1.0}
IMAGES=${GLMV_IMAGES:-base redis gateway tokenizer lm decoder}
VERSION=0.1.0
LOGS=${GLMV_BUILD_LOGS:-.run/build-logs}
mkdir -p "$LOGS"

common=()
# podman's default OCI image format drops HEALTHCHECK; the docker format keeps it.
[ "$ENGINE" = podman ] && common+=(--format docker)
torch=()
if [ "${GLMV_TORCH_INDEX+set}" = set ]; then
  torch+=(--build-arg "TORCH_INDEX=${GLMV_TORCH_INDEX}")
fi
if [ -n "${GLMV_WHEELS_DIR:-}" ]; then
  [ "$ENGINE" = podman ] || { echo "build-images: GLMV_WHEELS_DIR needs podman (build volumes)" >&2; exit 2; }
  torch+=(-v "${GLMV_WHEELS_DIR}:/wheels:ro" --build-arg TORCH_FIND_LINKS=/wheels)
fi
if [ -n "${GLMV_PIP_CERT:-}" ]; then
  [ "$ENGINE" = podman ] || { echo "build-images: GLMV_PIP_CERT needs podman (build volumes)" >&2; exit 2; }
  common+=(-v "${GLMV_PIP_CERT}:/run/pip-ca.crt:ro" --build-arg PIP_CERT=/run/pip-ca.crt)
fi

build() {
  local tag=$1 dockerfile=$2
  shift 2
  local t0=$SECONDS
  local log="$LOGS/${tag//[\/:]/_}.log"
  echo "build-images: $tag from $dockerfile (log: $log)" >&2
  if ! "$ENGINE" build -f "$dockerfile" -t "$tag" "$@" . >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "build-images: building $tag failed (full log: $log)" >&2
    return 1
  fi
  echo "build-images: $tag built in $((SECONDS - t0)) s" >&2
}

for image in $IMAGES; do
  case $image in
    base) build "$BASE_IMAGE" deploy/containers/base/Dockerfile --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE" \
      ${common[@]+"${common[@]}"} ;;
    redis) build glmvoice/redis:7 deploy/containers/redis/Dockerfile --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE" \
      ${common[@]+"${common[@]}"} ;;
    gateway) build "glmvoice/gateway:$VERSION" gateway/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" \
      ${common[@]+"${common[@]}"} ;;
    tokenizer | lm | decoder)
      build "glmvoice/$image:$VERSION" "services/$image/Dockerfile" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        ${common[@]+"${common[@]}"} ${torch[@]+"${torch[@]}"} ;;
    *) echo "build-images: unknown image $image" >&2; exit 2 ;;
  esac
done
