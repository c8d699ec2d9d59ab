#!/usr/bin/env bash
# CI stage with real containers: build every image, check that the gateway image has no torch, start
# the compose stack on dev checkpoints, speak one turn through the containerised gateway, roll a new
# decoder version out while sessions talk (`glmv rollout`), tear everything down.
#
# Engine: Debian's podman with runc (crun fails on hybrid cgroups), installed with apt when missing;
# its settings live in a containers.conf of this stage's own (CONTAINERS_CONF), nothing system-wide.
# No registry is needed: the Debian root is made with debootstrap and imported, and torch comes from
# the host's local wheel directory (pip's find-links) mounted into the builds.
# Cached across runs under GLMV_CI_CACHE (default /var/cache/glmvoice-ci): the Debian root, the
# engine's image store keeps every layer. Skipped, with a message and exit 0, only where no engine can
# run here (not root and no podman, apt cannot install it, or a container cannot start);
# GLMV_CONTAINER_CI=0 skips it on purpose.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${GLMV_CI_CACHE:-/var/cache/glmvoice-ci}
WORK=${GLMV_CI_WORK:-$PWD/.run/container-ci}
PROJECT=glmvoice-ci
DEBIAN_IMAGE=localhost/glmvoice-ci/debian:bookworm
PY=.venv/bin/python
T0=$SECONDS
PASSED=0  # checks passed, for the closing "N passed, N failed" line

log() { printf 'container-ci [%4ss]: %s\n' "$((SECONDS - T0))" "$*" >&2; }
skip() {
  log "SKIPPED: no container engine can run here: $*"
  exit 0
}

if [ "${GLMV_CONTAINER_CI:-1}" = 0 ]; then
  log "SKIPPED: GLMV_CONTAINER_CI=0"
  exit 0
fi

# --- the engine -----------------------------------------------------------------------------------
missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || missing+=(runc)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
[ -x /usr/lib/podman/netavark ] || missing+=(netavark aardvark-dns)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    skip "missing ${missing[*]} and cannot install them (not root, or no apt-get)"
  fi
  log "installing ${missing[*]} with apt"
  apt-get update -qq >/dev/null 2>&1 || true
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >"$CACHE.apt.log" 2>&1; then
    tail -n 20 "$CACHE.apt.log" >&2
    skip "apt-get could not install ${missing[*]}"
  fi
fi
[ "$(id -u)" -eq 0 ] || skip "rootless podman is not set up for this stage (run as root)"

mkdir -p "$CACHE" "$WORK"
export CONTAINERS_CONF="$CACHE/containers.conf"
cat >"$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
podman info >/dev/null 2>"$WORK/podman-info.err" || skip "podman info: $(tail -n 3 "$WORK/podman-info.err")"

# --- the Debian root (debootstrap, cached) --------------------------------------------------------
if ! podman image exists "$DEBIAN_IMAGE"; then
  rootfs_tar="$CACHE/bookworm-rootfs.tar"
  if [ ! -s "$rootfs_tar" ]; then
    log "debootstrap: Debian bookworm root with python3-venv and libsndfile1 (once; cached in $CACHE)"
    rm -rf "$CACHE/rootfs.tmp"
    debootstrap --variant=minbase --include=python3-venv,ca-certificates,libsndfile1 \
      bookworm "$CACHE/rootfs.tmp" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
      || { tail -n 20 "$WORK/debootstrap.log" >&2; log "debootstrap failed"; exit 1; }
    rm -rf "$CACHE"/rootfs.tmp/var/cache/apt/archives/*.deb "$CACHE"/rootfs.tmp/var/lib/apt/lists/* \
      "$CACHE"/rootfs.tmp/usr/share/doc "$CACHE"/rootfs.tmp/usr/share/man
    tar -C "$CACHE/rootfs.tmp" -cf "$rootfs_tar.tmp" . && mv "$rootfs_tar.tmp" "$rootfs_tar"
    rm -rf "$CACHE/rootfs.tmp"
  fi
  log "importing the Debian root as $DEBIAN_IMAGE"
  podman import --quiet --change 'CMD ["/bin/bash"]' "$rootfs_tar" "$DEBIAN_IMAGE" >/dev/null
fi
podman run --rm --network none "$DEBIAN_IMAGE" true 2>"$WORK/podman-run.err" \
  || skip "a container cannot start: $(tail -n 3 "$WORK/podman-run.err")"
log "engine: $(podman --version), runtime runc, image store $(podman info --format '{{.Store.GraphRoot}}')"

# --- images -----------------------------------------------------------------------------------------
wheels=${PIP_FIND_LINKS:-$("$PY" -m pip config get global.find-links 2>/dev/null || true)}
if [ -n "$wheels" ] && compgen -G "$wheels/torch-2.13.0*.whl" >/dev/null; then
  export GLMV_WHEELS_DIR=$wheels GLMV_TORCH_INDEX=""
  log "torch from the local wheels in $wheels"
fi
cert=${PIP_CERT:-$("$PY" -m pip config get global.cert 2>/dev/null || true)}
[ -n "$cert" ] || cert=/etc/ssl/certs/ca-certificates.crt
[ -f "$cert" ] && export GLMV_PIP_CERT=$cert
export GLMV_DEBIAN_IMAGE=$DEBIAN_IMAGE GLMV_BUILD_LOGS=$WORK/build-logs
scripts/build-images.sh podman
podman image prune -f >/dev/null  # images the rebuilt tags replaced (their layers stay cached)
PASSED=$((PASSED + 1))

if podman run --rm --no-healthcheck --entrypoint python glmvoice/gateway:0.1.0 -c \
  "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('torch') is None else 1)"; then
  log "gateway image: no torch"
  PASSED=$((PASSED + 1))
else
  log "FAILED: the gateway image has torch installed"
  exit 1
fi

# --- the compose stack on dev checkpoints -------------------------------------------------------------
compose() { "$PY" -m podman_compose -p "$PROJECT" -f compose.yaml "$@"; }
dump_and_down() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    for name in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}'); do
      echo "----- last log lines of $name" >&2
      podman logs --tail 25 "$name" >&2 2>&1 || true
    done
  fi
  log "tearing the stack down"
  for id in $(podman ps -aq --filter label=glmvoice.rollout); do podman rm -f -t 5 "$id" >/dev/null 2>&1 || true; done
  compose down -v -t 10 >"$WORK/compose-down.log" 2>&1 || true
  if [ -n "${API_PID:-}" ]; then kill "$API_PID" 2>/dev/null || true; fi
  if [ $rc -eq 0 ]; then log "passed in $((SECONDS - T0)) s"; else log "FAILED (exit $rc)"; fi
  echo "container-ci: $PASSED passed, $((rc != 0)) failed"
  exit $rc
}
for id in $(podman ps -aq --filter label=glmvoice.rollout); do podman rm -f -t 5 "$id" >/dev/null 2>&1 || true; done
compose down -v -t 5 >/dev/null 2>&1 || true

log "dev checkpoints"
.venv/bin/glmv models make-dev --out "$WORK/models" >/dev/null
chmod -R a+rX "$WORK/models"
port=$("$PY" -c 'from glmv_gateway.stack import free_port; print(free_port())')
rm -rf "$WORK/versions" && mkdir -p "$WORK/versions" && cp deploy/compose/versions.json "$WORK/versions/"
chmod -R a+rX "$WORK/versions"
export GLMV_MODELS_DIR=$WORK/models GLMV_GATEWAY_PUBLISH=$port GLMV_REDIS_IMAGE=glmvoice/redis:7
export GLMV_VERSIONS_DIR=$WORK/versions GLMV_GATEWAY_VERSIONS_FILE=/etc/glmvoice/versions/versions.json
export COMPOSE_PROFILES=cpu GLMV_TORCH_THREADS=1  # three model services on a small CI machine
trap dump_and_down EXIT
log "compose up (project $PROJECT, gateway on 127.0.0.1:$port)"
compose up -d --no-build >"$WORK/compose-up.log" 2>&1 || { tail -n 30 "$WORK/compose-up.log" >&2; exit 1; }

"$PY" - "$port" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/readyz"
deadline, last = time.monotonic() + 300, ""
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            if r.status == 200:
                sys.exit(0)
    except Exception as e:  # not up yet
        last = str(e)
    time.sleep(1)
sys.exit(f"the containerised gateway was not ready in 300 s: {last}")
PY
log "stack ready; one turn through the containerised gateway"
.venv/bin/glmv chat --url "http://127.0.0.1:$port" --api-key dev-key --audio samples/question.wav \
  --out "$WORK/reply.wav" | tee "$WORK/turn.log"
[ -s "$WORK/reply.wav" ] || { log "FAILED: the turn returned no audio"; exit 1; }
log "turn spoken: $(grep -o 'reply audio: .*' "$WORK/turn.log")"
PASSED=$((PASSED + 1))

# --- a rollout with the Docker SDK while sessions talk --------------------------------------------------
if ! podman run --rm --no-healthcheck --entrypoint python glmvoice/gateway:0.1.0 -c "import glmv_gateway.versions" \
  2>/dev/null; then
  log "rollout stage SKIPPED: this gateway has no component version registry (glmv_gateway.versions)"
  exit 0
fi
log "rollout: podman's Docker-compatible API socket"
sock="$WORK/podman.sock"
rm -f "$sock"
podman system service --time=0 "unix://$sock" >"$WORK/podman-service.log" 2>&1 &
API_PID=$!
for _ in $(seq 1 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { log "FAILED: podman system service did not open $sock"; exit 1; }
.venv/bin/glmv-decoder make-dev --out "$WORK/models-v2/decoder" --seed 1 >/dev/null
.venv/bin/glmv-decoder make-dev --out "$WORK/models-v3/decoder" --seed 2 --codebook-size 32 >/dev/null
chmod -R a+rX "$WORK/models-v2" "$WORK/models-v3"
network="${PROJECT}_glmv"
rollout_cmd() {  # version, model dir -> the glmv rollout command as a JSON list
  "$PY" -c 'import json, sys; print(json.dumps(sys.argv[1:]))' .venv/bin/glmv rollout decoder \
    --version "$1" --image glmvoice/decoder:0.1.0 --model-dir "$2" \
    --versions-file "$WORK/versions/versions.json" --network "$network" --canary-seconds 5 \
    --health-timeout 240 --drain-timeout 15 --env GLMV_DECODER_TORCH_THREADS=1 --docker-host "unix://$sock"
}
"$PY" scripts/ci/rollout_check.py --url "http://127.0.0.1:$port" \
  --versions-file "$WORK/versions/versions.json" \
  --rollout "$(rollout_cmd v2 "$WORK/models-v2/decoder")" \
  --bad-rollout "$(rollout_cmd v3 "$WORK/models-v3/decoder")" --bad-container glmvoice-decoder-v3 \
  --old-container "${PROJECT}_decoder_1"
PASSED=$((PASSED + 2))
log "rollout stage passed"
