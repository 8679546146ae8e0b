#!/usr/bin/env bash
# `make compose-test`: bring compose.yaml up for real on a machine with no Docker daemon and no
# image registry, exercise it through the public doors, and tear it down (issue 21).
#
#   1. podman + runc from apt; runc and the cgroupfs manager in containers.conf (crun fails on
#      hybrid cgroups); podman-compose from PyPI into .venv.
#   2. A Debian bookworm root filesystem (debootstrap, Python 3.11 from Debian) imported as
#      localhost/loopmesh-base; a Go image on it (this machine's Go toolchain). Both are cached:
#      podman keeps them, and they are rebuilt only when missing.
#   3. Every image of compose.yaml + compose.local.yaml built on that base (Dockerfile with
#      PYTHON_IMAGE/GO_IMAGE pointed at it; Kafka, Triton and Redis from infra/local/).
#   4. The core stack up (no observability profile) with token auth on (fresh tokens in
#      LOOPMESH_AUTH__TOKENS: one for the smoke, one with the "features" role for the gateway),
#      waiting on every healthcheck.
#   5. scripts/compose_smoke.py through the public ports with that token: ingest -> predict ->
#      feedback -> retrain -> canary -> promotion, then restarts of the ingestion, feedback and
#      trainer containers that must lose nothing they acknowledged.
#   6. Teardown (containers, network, volumes); images stay unless COMPOSE_TEST_CLEAN=1.
#
# Steps run in order; COMPOSE_TEST_STEPS="setup base images up smoke down" picks some.
# COMPOSE_TEST_SERVICES="ingestion feedback" builds and starts only those and what they
# depend on (the smoke then checks the two doors and their restarts only): for a machine
# without the disk for every image (the trainer's image is 5.8 GB with PyPI's CUDA torch,
# which it gets where PyTorch's CPU index cannot be reached; CPU-only torch leaves out the
# 2.7 GB of CUDA libraries).
# COMPOSE_TEST_KEEP=1 leaves the stack up after the smoke (for a look at it).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-.venv}"
PROJECT=loopmesh
BASE_IMAGE=localhost/loopmesh-base:bookworm
GO_IMAGE=localhost/loopmesh-go:bookworm
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
STEPS="${COMPOSE_TEST_STEPS:-setup base images up smoke down}"
# The base's Python is Debian's 3.11 (the project pins 3.11); venv and pip come with it.
BASE_PACKAGES=python3,python3-venv,python3-pip,python-is-python3,ca-certificates,passwd
export LOOPMESH_TAG="${LOOPMESH_TAG:-dev}"

log() { printf '\n[compose-test %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
has_step() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }
timed() {
  local name=$1 t0=$SECONDS
  shift
  "$@"
  printf '[compose-test] step %-7s %4ds\n' "$name" $((SECONDS - t0)) | tee -a "$TIMINGS"
}
LOGS=.loopmesh/compose-test
TIMINGS="${COMPOSE_TEST_TIMINGS:-$LOGS/timings.txt}"
mkdir -p "$LOGS" "$(dirname "$TIMINGS")"
: >"$TIMINGS"

COMPOSE_FILES=(-f compose.yaml -f compose.local.yaml)
# Limits a container may get here (compose.local.yaml gives them to triton, the one service
# with ulimits of its own): no more than this shell's own hard limits.
export LOCAL_NOFILE LOCAL_NPROC
LOCAL_NOFILE="$(ulimit -Hn)"; [ "$LOCAL_NOFILE" = unlimited ] && LOCAL_NOFILE=1048576
# nproc capped: where the engine runs under limits, 65536 was refused and 32768 passed.
LOCAL_NPROC="$(ulimit -Hu)"
{ [ "$LOCAL_NPROC" = unlimited ] || [ "$LOCAL_NPROC" -gt 32768 ]; } && LOCAL_NPROC=32768
# No collector without the observability profile: no OTLP export (compose.yaml's default).
export LOOPMESH_TELEMETRY__OTLP_ENDPOINT="${LOOPMESH_TELEMETRY__OTLP_ENDPOINT-}"
export LOOPMESH_BASE_IMAGE="$BASE_IMAGE" LOOPMESH_GO_IMAGE="$GO_IMAGE"
# The trainer's torch: CPU-only from PyTorch's own index (compose.local.yaml's default,
# about 3.5 GB smaller than PyPI's CUDA build) where that index answers. Where it does not
# (a machine that reaches PyPI only), an empty TORCH_INDEX builds with PyPI's torch, as the
# public image does: an unreachable extra index would cost pip retries on every package.
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
if [ -z "${TORCH_INDEX+set}" ]; then
  if "$VENV/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' \
    "$TORCH_CPU_INDEX/torch/" >/dev/null 2>&1; then
    export TORCH_INDEX="$TORCH_CPU_INDEX"
  else
    export TORCH_INDEX=""
  fi
fi
compose() { "$VENV/bin/podman-compose" -p "$PROJECT" "${COMPOSE_FILES[@]}" "$@"; }

# The services to run: COMPOSE_TEST_SERVICES (and what they depend on), else every service
# outside a profile; printed one depends_on layer per line, in start order.
layers() {
  compose config | COMPOSE_TEST_SERVICES="${COMPOSE_TEST_SERVICES:-}" "$VENV/bin/python" -c '
import os, sys, yaml
services = yaml.safe_load(sys.stdin)["services"]
deps = {n: set(s.get("depends_on") or ()) for n, s in services.items()}
wanted = os.environ["COMPOSE_TEST_SERVICES"].split()
if wanted:
    active, todo = set(), list(wanted)
    while todo:
        name = todo.pop()
        if name not in active:
            active.add(name)
            todo.extend(deps[name])
else:
    active = {n for n, s in services.items() if not s.get("profiles")}
done = set()
while len(done) < len(active):
    layer = sorted(n for n in active - done if deps[n] & active <= done)
    if not layer:
        sys.exit(f"depends_on has a cycle among {sorted(active - done)}")
    print(" ".join(layer))
    done |= set(layer)
'
}

# ------------------------------------------------------------------------------ 1. engine
setup() {
  local need=()
  for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || need+=("$tool"); done
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]} (apt)"
    sudo_ apt-get update -qq
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      podman runc debootstrap uidmap slirp4netns fuse-overlayfs containernetworking-plugins \
      iptables >/dev/null
  fi
  # runc + cgroupfs: crun fails on this kernel's hybrid cgroups, and without systemd the
  # systemd cgroup manager cannot work. A drop-in, so a machine's own containers.conf stays.
  # Rootful podman gives containers nofile=1048576 and nproc=unlimited by default; where this
  # process may not raise them (a sandbox: "error setting rlimit type 7"), runc refuses to
  # start anything. The defaults become what this shell has (nproc capped: the same check
  # refused 65536 where 32768 passed).
  local conf=/etc/containers/containers.conf.d/50-loopmesh-compose-test.conf want
  local nofile=$LOCAL_NOFILE nproc=$LOCAL_NPROC
  want="$(printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]\n\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n' \
    "$nofile" "$nofile" "$nproc" "$nproc")"
  if [ "$(cat "$conf" 2>/dev/null)" != "$want" ]; then
    log "podman: runc + cgroupfs, ulimits nofile=$nofile nproc=$nproc ($conf)"
    sudo_ mkdir -p "$(dirname "$conf")"
    printf '%s\n' "$want" | sudo_ tee "$conf" >/dev/null
  fi
  test -x "$VENV/bin/python" || make deps
  if ! "$VENV/bin/podman-compose" version >/dev/null 2>&1; then
    log "podman-compose (PyPI) into $VENV"
    "$VENV/bin/python" -m pip install -q "podman-compose==1.5.0"
  fi
  podman info --format 'podman {{.Version.Version}}: {{.Host.OCIRuntime.Name}}, {{.Host.CgroupManager}}, {{.Store.GraphDriverName}}'
}

# ------------------------------------------------------------------------------ 2. base images
base() {
  if podman image exists "$BASE_IMAGE"; then
    log "$BASE_IMAGE cached"
  else
    local dir
    dir="$(mktemp -d /var/tmp/loopmesh-rootfs.XXXXXX)"
    log "debootstrap bookworm -> $dir"
    sudo_ debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$dir" \
      "$DEBIAN_MIRROR" >"$dir.log" 2>&1 || { tail -30 "$dir.log"; exit 1; }
    # The CAs this machine adds (/usr/local/share/ca-certificates: a TLS-intercepting egress
    # proxy, say) are trusted in the images too, or pip reaches no index from a build.
    if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
      sudo_ cp /usr/local/share/ca-certificates/*.crt "$dir/usr/local/share/ca-certificates/"
      sudo_ chroot "$dir" update-ca-certificates >/dev/null
    fi
    # Like python:3.11-slim: no apt lists or package files left in the image.
    sudo_ rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb
    sudo_ tar -C "$dir" -c . | podman import \
      --change 'CMD ["/bin/bash"]' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      - "$BASE_IMAGE"
    sudo_ rm -rf "$dir" "$dir.log"
  fi
  if podman image exists "$GO_IMAGE"; then
    log "$GO_IMAGE cached"
  else
    # No golang image can be pulled: this machine's Go toolchain (the one `make deps` uses),
    # copied onto the base. go.mod's modules still come from the Go module proxy.
    local goroot ctx
    goroot="$(go env GOROOT)"
    ctx="$(mktemp -d)"
    log "$GO_IMAGE from $goroot ($(go version))"
    tar -C "$goroot" -czf "$ctx/go.tgz" --exclude=./pkg/obj --exclude=./test .
    cat >"$ctx/Containerfile" <<EOF
FROM $BASE_IMAGE
RUN mkdir -p /usr/local/go
ADD go.tgz /usr/local/go
ENV PATH=/usr/local/go/bin:/go/bin:\$PATH GOPATH=/go GOTOOLCHAIN=local
WORKDIR /go
EOF
    podman build -q -t "$GO_IMAGE" "$ctx"
    rm -rf "$ctx"
  fi
}

# ------------------------------------------------------------------------------ 3. images
images() {
  # Kafka's jars: the same Maven Central classpath `loopmesh run` uses, cached the same way.
  local kafka_version libs
  kafka_version="$("$VENV/bin/python" -c 'from loopmesh.devstack.kafka import KAFKA_VERSION; print(KAFKA_VERSION)')"
  libs="${LOOPMESH_CACHE_DIR:-$HOME/.cache/loopmesh}/kafka-$kafka_version/libs"
  test -f "$libs/../libs.complete" -o -f "$libs/libs.complete" || "$VENV/bin/loopmesh" infra fetch
  rm -rf infra/local/.kafka-libs
  mkdir -p infra/local/.kafka-libs
  cp "$libs"/*.jar infra/local/.kafka-libs/
  if [ -n "$TORCH_INDEX" ]; then
    log "trainer: torch from $TORCH_INDEX"
  else
    log "trainer: torch from PyPI, the CUDA build ($TORCH_CPU_INDEX does not answer here)"
  fi
  # One at a time: 2 cores, and a failing build names itself.
  # A service whose image another one already built (topic-init's is ingestion's, feast-init's
  # the features service's) is not built twice.
  local svc image
  compose config | COMPOSE_TEST_ORDER="$(layers | tr '\n' ' ')" "$VENV/bin/python" -c '
import os, sys, yaml
services = yaml.safe_load(sys.stdin)["services"]
seen = set()
for name in os.environ["COMPOSE_TEST_ORDER"].split():
    svc = services[name]
    if "build" in svc and svc["image"] not in seen:
        seen.add(svc["image"])
        print(name, svc["image"])
' >"$LOGS/builds.txt"
  while read -r svc image; do
    log "build $svc ($image)"
    compose build "$svc" </dev/null
  done <"$LOGS/builds.txt"
  rm -rf infra/local/.kafka-libs
  podman images --filter reference='*loopmesh*' --format '{{.Repository}}:{{.Tag}} {{.Size}}'
}

# ------------------------------------------------------------------------------ 4. up
# Token auth on, as a deployment runs it: compose.yaml takes LOOPMESH_AUTH__TOKENS and the
# gateway's LOOPMESH_AUTH__CLIENT_TOKEN from the environment. Fresh tokens at each `up`, kept
# in $LOGS/auth.env for the smoke (and a later COMPOSE_TEST_STEPS=smoke on a kept stack).
AUTH_ENV="$LOGS/auth.env"
new_tokens() {
  (umask 077 && "$VENV/bin/python" -c '
import json, secrets
smoke, gateway = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
tokens = [
    {"name": "compose-smoke", "token": smoke, "roles": ["ingest", "feedback", "predict", "operator"]},
    {"name": "gateway", "token": gateway, "roles": ["features"]},
]
print(f"LOOPMESH_AUTH__TOKENS=\x27{json.dumps(tokens)}\x27")
print(f"LOOPMESH_AUTH__CLIENT_TOKEN={gateway}")
print(f"LOOPMESH_CLIENT__TOKEN={smoke}")
' >"$AUTH_ENV")
}
load_tokens() {
  set -a
  # shellcheck disable=SC1090
  . "$AUTH_ENV"
  set +a
}

# podman-compose on podman 4.3 ignores `condition: service_healthy` (and podman runs
# healthchecks from systemd timers, which a machine without systemd lacks), so the stack
# comes up here in the order of its depends_on: one layer at a time, each waited on (healthy,
# or exited 0 for a one-shot) before the next starts, as `docker compose up --wait` would.
up() {
  local layers
  new_tokens
  load_tokens
  layers="$(layers)"
  local -a order
  mapfile -t order <<<"$layers"
  for layer in "${order[@]}"; do
    log "up: $layer"
    # shellcheck disable=SC2086
    start_layer $layer
    # shellcheck disable=SC2086
    wait_healthy 600 $layer </dev/null
  done
  log "stack up: $(podman ps --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}' | wc -l) containers running"
}

# `compose up` of one layer. A published port (127.0.0.1:500xx) that another process holds
# for a moment (on a shared machine, a test's ephemeral port) fails a container's start:
# its container is removed and the layer started again, twice at most.
start_layer() {
  local try svc
  for try in 1 2 3; do
    compose up -d --no-deps "$@" </dev/null >>"$LOGS/up.log" 2>&1 && return 0
    if [ $try = 3 ] || ! tail -30 "$LOGS/up.log" | grep -q 'address already in use'; then
      tail -20 "$LOGS/up.log"
      return 1
    fi
    log "a published port is taken ($(grep -o 'listen tcp4 [0-9.:]*' "$LOGS/up.log" | tail -1)): again in 10 s"
    for svc in "$@"; do
      [ "$(podman inspect -f '{{.State.Status}}' "${PROJECT}_${svc}_1" 2>/dev/null)" = running ] \
        || podman rm -f "${PROJECT}_${svc}_1" >/dev/null 2>&1 || true
    done
    sleep 10
  done
}

# Every named service's container healthy (its healthcheck, run here: nothing else runs it),
# running (no healthcheck) or exited 0 (a one-shot); a non-zero exit fails at once.
wait_healthy() {
  local deadline=$((SECONDS + $1)) pending c state
  shift
  while :; do
    pending=""
    for svc in "$@"; do
      c="${PROJECT}_${svc}_1"
      state="$(podman inspect -f '{{.State.Status}}' "$c" 2>/dev/null || echo missing)"
      if [ "$state" = exited ]; then
        [ "$(podman inspect -f '{{.State.ExitCode}}' "$c")" = 0 ] && continue
        log "$c exited with $(podman inspect -f '{{.State.ExitCode}}' "$c")"
        podman logs --tail 40 "$c" 2>&1 || true
        return 1
      fi
      if [ -n "$(podman inspect -f '{{if .Config.Healthcheck}}y{{end}}' "$c" 2>/dev/null)" ]; then
        podman healthcheck run "$c" >/dev/null 2>&1 || pending="$pending $svc"
      elif [ "$state" != running ]; then
        pending="$pending $svc($state)"
      elif [ "$(podman inspect -f '{{.HostConfig.RestartPolicy.Name}}' "$c")" = no ] \
        || [ -z "$(podman inspect -f '{{.HostConfig.RestartPolicy.Name}}' "$c")" ]; then
        pending="$pending $svc(one-shot running)"  # service_completed_successfully
      fi
    done
    [ -z "$pending" ] && return 0
    if [ $SECONDS -ge $deadline ]; then
      log "not healthy in time:$pending"
      for svc in $pending; do podman logs --tail 30 "${PROJECT}_${svc%%(*}_1" 2>&1 || true; done
      return 1
    fi
    sleep 3
  done
}

# ------------------------------------------------------------------------------ 5. smoke
smoke() {
  log "smoke through the public doors"
  # A partial stack (COMPOSE_TEST_SERVICES) of the two doors gets their part of the smoke.
  local only=()
  [ -n "${COMPOSE_TEST_SERVICES:-}" ] && only=(--doors-only)
  [ -f "$AUTH_ENV" ] && load_tokens
  "$VENV/bin/python" scripts/compose_smoke.py --restart "podman restart ${PROJECT}_%s_1" "${only[@]}"
}

# ------------------------------------------------------------------------------ 6. down
down() {
  log "compose down (containers, network, volumes)"
  compose down -v || true
  if [ "${COMPOSE_TEST_CLEAN:-0}" = 1 ]; then
    podman images --filter reference='*loopmesh*' -q | xargs -r podman rmi -f
  fi
}

START=$SECONDS
trap 'rc=$?; if [ $rc != 0 ] && has_step down && [ "${COMPOSE_TEST_KEEP:-0}" != 1 ]; then down; fi; exit $rc' EXIT
for step in setup base images up smoke; do
  if has_step "$step"; then timed "$step" "$step"; fi
done
if has_step down && [ "${COMPOSE_TEST_KEEP:-0}" != 1 ]; then timed down down; fi
trap - EXIT
printf '[compose-test] total %ds\n' $((SECONDS - START)) | tee -a "$TIMINGS"
