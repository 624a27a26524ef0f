#!/usr/bin/env bash
# docker/smoke.sh [--keep] [--clean-cache]: the cluster stack the way a user meets it.
#
# Starts dockerd if none answers (and stops only that one), builds the images (on a local
# debootstrap Debian base where the configured base cannot be pulled), brings up
# docker/compose.yaml with a generated .env (random secrets, in a temp dir), waits for every
# healthcheck, runs docker/smoke-study.yaml from the Ray head against the MLflow server, stops
# one Ray worker and restarts the MLflow server while trials train, then checks from the host
# (MLflow's client on 127.0.0.1, headless Chromium) that every trial finished once with its
# metrics, on a worker node, and that the dashboard renders the study. Tears everything down
# with `compose down -v` and removes the ablate image unless --keep.
#
# Build cache (kept between runs, removed by --clean-cache): the local Debian base, the
# dependency stage of the image and the PostgreSQL stand-in, tagged ablate-cache/*, and a
# wheelhouse under ABLATE_DOCKER_CACHE (default ~/.cache/ablate/docker). The wheelhouse is
# filled by the host's pip (which works wherever the host installs ablate, intercepting TLS
# proxies included) and served to the build on 127.0.0.1, so no CA bundle or secret enters
# an image. Needs: docker (+ dockerd), docker compose or docker-compose, debootstrap where no
# registry answers, and a Python with ablate's dev install (PYTHON, default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
KEEP=0
CLEAN_CACHE=0
for arg in "$@"; do
  case "$arg" in
    --keep) KEEP=1 ;;
    --clean-cache) CLEAN_CACHE=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "smoke.sh: unknown argument $arg (use --keep, --clean-cache)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
CACHE=${ABLATE_DOCKER_CACHE:-$HOME/.cache/ablate/docker}
TORCH_SPEC=${ABLATE_DOCKER_TORCH:-torch==2.14.1 torchvision==0.29.1}
WHEEL_PORT=${ABLATE_WHEELHOUSE_PORT:-8799}
PROJECT=ablate-smoke-$$
IMAGE=ablate:smoke-$$
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ablate-smoke.XXXXXX")
chmod 700 "$WORK"
DOCKERD_PID=""
WHEEL_PID=""
STUDY_PID=""
COMPOSE=()
STARTED=$SECONDS

log() { echo "[smoke +$((SECONDS - STARTED))s] $*"; }
die() { echo "smoke.sh: $*" >&2; exit 1; }

cleanup() {
  local rc=$?
  set +e
  [ -n "$STUDY_PID" ] && kill "$STUDY_PID" 2>/dev/null
  if [ ${#COMPOSE[@]} -gt 0 ] && [ -f "$WORK/.env" ]; then
    if [ $rc -ne 0 ]; then
      log "failed (exit $rc); last logs of the stack:"
      "${COMPOSE[@]}" logs --tail 40 2>&1 | tail -200
    fi
    if [ $KEEP -eq 1 ]; then
      log "--keep: the stack stays up (project $PROJECT, env $WORK/.env)"
    else
      "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1
    fi
  fi
  if [ $KEEP -eq 0 ]; then
    docker image rm "$IMAGE" >/dev/null 2>&1
    if [ $CLEAN_CACHE -eq 1 ]; then
      docker image rm ablate-cache/deps:latest ablate-cache/postgres:latest \
        ablate-cache/debian:bookworm >/dev/null 2>&1
      rm -rf "$CACHE"
    fi
    rm -rf "$WORK"
  fi
  [ -n "$WHEEL_PID" ] && kill "$WHEEL_PID" 2>/dev/null
  if [ -n "$DOCKERD_PID" ] && [ $KEEP -eq 0 ]; then
    kill "$DOCKERD_PID" 2>/dev/null && wait "$DOCKERD_PID" 2>/dev/null
  fi
  log "exit $rc after $((SECONDS - STARTED)) s"
  exit $rc
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# --- the engine -------------------------------------------------------------------------
command -v docker >/dev/null || die "no docker client (Debian: apt-get install -y docker.io)"
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || die "no Docker engine answers and no dockerd to start"
  log "starting dockerd"
  dockerd >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log"; die "dockerd did not start"; }
fi
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then COMPOSE=(docker-compose)
else die "neither 'docker compose' nor docker-compose (Debian: apt-get install -y docker-compose)"
fi
export DOCKER_BUILDKIT=0  # the classic builder: no buildx plugin needed, same cache rules
COMPOSE_FILES=(-p "$PROJECT" -f docker/compose.yaml --env-file "$WORK/.env")

# --- base images --------------------------------------------------------------------------
pullable() { docker image inspect "$1" >/dev/null 2>&1 || timeout 120 docker pull -q "$1" >/dev/null 2>&1; }
BASE=${ABLATE_BASE_IMAGE:-python:3.11-slim-bookworm}
if ! pullable "$BASE"; then
  BASE=ablate-cache/debian:bookworm
  if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || die "no registry answers and no debootstrap (apt-get install -y debootstrap)"
    log "no registry: building $BASE with debootstrap"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian \
      >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
    tar -C "$WORK/rootfs" -c . | docker import - "$BASE" >/dev/null
    rm -rf "$WORK/rootfs"
  fi
fi
POSTGRES_IMAGE=${POSTGRES_IMAGE:-postgres:16-bookworm}
if ! pullable "$POSTGRES_IMAGE"; then
  POSTGRES_IMAGE=ablate-cache/postgres:latest
  log "building $POSTGRES_IMAGE (Debian's PostgreSQL) on $BASE"
  docker build -q --network host --build-arg BASE="$BASE" -t "$POSTGRES_IMAGE" docker/postgres >/dev/null
fi
log "base $BASE, PostgreSQL $POSTGRES_IMAGE"

# --- wheelhouse (content-addressed: the build cache follows the requirements) -----------------
REQS="$WORK/requirements.txt"
"$PY" - "$REQS" "$TORCH_SPEC" <<'EOF'
import sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
open(sys.argv[1], "w").write("\n".join(sys.argv[2].split() + deps + ["psycopg[binary]>=3.1", "setuptools"]) + "\n")
EOF
WH_ID=$( (cat "$REQS"; "$PY" -c 'import sys; print(sys.version_info[:2])') | sha256sum | cut -c1-16)
WH="$CACHE/wheelhouse/$WH_ID"
if [ ! -f "$WH/.complete" ]; then
  log "filling the wheelhouse $WH with the host's pip"
  mkdir -p "$WH"
  "$PY" -m pip download -q --only-binary=:all: -d "$WH" -r "$REQS" 2>&1 | grep -v "is ignored" || true
  ls "$WH"/torch-*.whl >/dev/null 2>&1 || die "pip could not download $TORCH_SPEC into $WH"
  touch "$WH/.complete"
  # one wheelhouse is cache enough (each is a few GB): drop those of older requirements
  find "$CACHE/wheelhouse" -mindepth 1 -maxdepth 1 -type d ! -name "$WH_ID" -exec rm -rf {} +
fi
port_free() { "$PY" -c "import socket,sys; s=socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])))" "$1" 2>/dev/null; }
free_port() { "$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
port_free "$WHEEL_PORT" || WHEEL_PORT=$(free_port)  # another port misses the build cache
"$PY" -m http.server "$WHEEL_PORT" --bind 127.0.0.1 --directory "$CACHE/wheelhouse" \
  >"$WORK/wheelhouse.log" 2>&1 &
WHEEL_PID=$!

# --- images -----------------------------------------------------------------------------------
REV=$(git rev-parse HEAD 2>/dev/null || echo unknown)
BUILD_ARGS=(--network host --build-arg BASE="$BASE"
            --build-arg WHEELHOUSE="http://127.0.0.1:$WHEEL_PORT/$WH_ID/")
t0=$SECONDS
log "building the dependency stage (cached: ablate-cache/deps)"
docker build -q "${BUILD_ARGS[@]}" --target deps -t ablate-cache/deps:latest \
  -f docker/Dockerfile . >/dev/null
log "building $IMAGE"
docker build -q "${BUILD_ARGS[@]}" --build-arg GIT_REVISION="$REV" -t "$IMAGE" \
  -f docker/Dockerfile . >/dev/null
BUILD_S=$((SECONDS - t0))
# cache images a rebuild replaced (labelled org.ablate.cache) are dangling now: drop them
docker image prune -f --filter label=org.ablate.cache=1 >/dev/null
kill "$WHEEL_PID" 2>/dev/null; WHEEL_PID=""
log "images built in ${BUILD_S} s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.1f GB", $1/1e9}'))"

# --- the stack --------------------------------------------------------------------------------
secret() { "$PY" -c "import secrets; print(secrets.token_hex(24))"; }
MLFLOW_PORT=$(free_port); DASHBOARD_PORT=$(free_port); RAY_DASHBOARD_PORT=$(free_port)
umask 077
cat >"$WORK/.env" <<EOF
POSTGRES_USER=ablate
POSTGRES_PASSWORD=$(secret)
RAY_AUTH_TOKEN=$(secret)
BIND_ADDRESS=127.0.0.1
MLFLOW_PORT=$MLFLOW_PORT
DASHBOARD_PORT=$DASHBOARD_PORT
RAY_DASHBOARD_PORT=$RAY_DASHBOARD_PORT
ABLATE_IMAGE=$IMAGE
POSTGRES_IMAGE=$POSTGRES_IMAGE
GIT_REVISION=$REV
EOF
umask 022
COMPOSE=("${COMPOSE[@]}" "${COMPOSE_FILES[@]}")
t0=$SECONDS
log "compose up (2 Ray workers)"
"${COMPOSE[@]}" up -d --no-build --scale ray-worker=2 >"$WORK/up.log" 2>&1 \
  || { cat "$WORK/up.log"; die "compose up failed"; }
healthy() {
  local ids st n=0 ok=0
  ids=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")
  for id in $ids; do
    n=$((n + 1))
    st=$(docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id")
    [ "$st" = "running healthy" ] && ok=$((ok + 1))
  done
  [ "$n" -eq 6 ] && [ "$ok" -eq "$n" ]
}
for _ in $(seq 150); do healthy && break; sleep 2; done
healthy || { docker ps -a --filter "label=com.docker.compose.project=$PROJECT"; die "not every service turned healthy in 300 s"; }
log "6 containers healthy after $((SECONDS - t0)) s"

# published ports answer on 127.0.0.1 only
for p in $MLFLOW_PORT $DASHBOARD_PORT $RAY_DASHBOARD_PORT; do
  bound=$(docker ps --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Ports}}' | tr ',' '\n' | grep -- "->" | grep ":$p->" || true)
  [ -n "$bound" ] || die "port $p is not published"
  echo "$bound" | grep -qv "127.0.0.1:$p->" && die "port $p is published beyond 127.0.0.1: $bound"
done
curl -fsS "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null || die "MLflow does not answer on 127.0.0.1:$MLFLOW_PORT"
log "ports $MLFLOW_PORT (MLflow), $DASHBOARD_PORT (dashboard), $RAY_DASHBOARD_PORT (Ray) on 127.0.0.1 only"

cid() { "${COMPOSE[@]}" ps -q "$1"; }
ip_of() { docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$1"; }
HEAD=$(cid ray-head)
WORKERS=$(cid ray-worker)
HEAD_IP=$(ip_of "$HEAD")
WORKER_IPS=$(for w in $WORKERS; do ip_of "$w"; done | paste -sd, -)
log "Ray head $HEAD_IP, workers $WORKER_IPS"

# --- the study, with a worker stopped and MLflow restarted under it ------------------------
URI=http://127.0.0.1:$MLFLOW_PORT
docker cp docker/smoke-study.yaml "$HEAD:/tmp/smoke-study.yaml"
TRIALS=$("$PY" -m ablate.cli validate docker/smoke-study.yaml | grep -o '[0-9]\+ trials' | head -1 | cut -d' ' -f1)
[ -n "$TRIALS" ] || die "could not count the smoke study's trials"
EPOCHS=$(grep -o 'epochs: [0-9]\+' docker/smoke-study.yaml | head -1 | cut -d' ' -f2)
t0=$SECONDS
log "running the smoke study ($TRIALS trials) on the stack"
docker exec "$HEAD" ablate run /tmp/smoke-study.yaml --address auto \
  --tracking-uri http://mlflow:5000 >"$WORK/study.log" 2>&1 &
STUDY_PID=$!
"$PY" docker/smoke_check.py wait-epoch "$URI" docker_smoke --timeout 600
VICTIM=$(echo "$WORKERS" | head -1)
log "a trial reported an epoch: stopping Ray worker $(ip_of "$VICTIM")"
docker stop -t 5 "$VICTIM" >/dev/null
sleep 5
log "restarting the MLflow server"
"${COMPOSE[@]}" restart mlflow >/dev/null 2>&1
rc=0; wait "$STUDY_PID" || rc=$?
STUDY_PID=""
STUDY_S=$((SECONDS - t0))
tail -25 "$WORK/study.log"
[ $rc -eq 0 ] || die "the smoke study exited $rc"
log "smoke study done in ${STUDY_S} s"

# --- checks from the host ---------------------------------------------------------------------
"$PY" docker/smoke_check.py verify "$URI" docker_smoke --trials "$TRIALS" --epochs "$EPOCHS" \
  --head-ip "$HEAD_IP" --worker-ips "$WORKER_IPS"
curl -fsS "http://127.0.0.1:$DASHBOARD_PORT/_stcore/health" | grep -q ok \
  || die "the dashboard's health endpoint does not answer ok"
"$PY" docker/smoke_check.py browse "http://127.0.0.1:$DASHBOARD_PORT" docker_smoke
log "PASS: build ${BUILD_S} s, study ${STUDY_S} s, total $((SECONDS - STARTED)) s"
