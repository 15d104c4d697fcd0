#!/usr/bin/env bash
# The README's first command (`bash ci/main.sh`) as close to a fresh machine
# as one can get on a used one: a clean clone of HEAD, an empty state dir
# (so a new registry with empty storage on its own port), an empty blob
# cache, and BuildKit's cache and the engine's images pruned unless --keep-buildkit. What stays: the
# Debian packages (apt) and dockerd, and the registry the bases were pinned
# in (127.0.0.1:5000), from which engine.up copies them, unless --bootstrap:
# then the clone's locks/base.json names a closed port as the registry the
# bases were pinned in, so they are bootstrapped as on a machine with no base
# anywhere (amd64 by engine.up, arm64 by the build, in the background). A
# really fresh machine is `bash bench/fresh_machine.sh --first-run cuda,cpu`.
# --backends cuda,cpu cuts the example project to those backends first
# (bench/cut_backends.py), as the 8-minute first-run target counts them.
#
# Usage: bash bench/first_run.sh [--keep-buildkit] [--bootstrap] [--port 5056] [--backends LIST] > bench/out/first_run.txt
set -euo pipefail
keep=0; port=5056; backends=""; bootstrap=0
while [ $# -gt 0 ]; do
  case "$1" in
    --keep-buildkit) keep=1 ;;
    --bootstrap) bootstrap=1 ;;
    --port) port=$2; shift ;;
    --backends) backends=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/orch-first-run.XXXXXX)
trap 'pkill -f "docker-registry serve $work/state" || true; rm -rf "$work"' EXIT
git clone -q "$root" "$work/main"
[ -z "$backends" ] || python3 "$root/bench/cut_backends.py" "$work/main/project.yaml" "$backends"
[ "$bootstrap" = 0 ] || sed -i 's#"pinned_in": "[^/"]*/#"pinned_in": "127.0.0.1:9/#' "$work/main/locks/base.json"
# BuildKit's cache and the engine's images go: smoke loads what it tests (ORCH_CACHE_DIR is empty, so
# uv downloads every wheel again and ORCH_STATE_DIR's record of what smoke keeps starts empty)
[ "$keep" = 1 ] || { docker builder prune -af >/dev/null; docker image prune -af >/dev/null; }
cd "$work/main"
export ORCH_STATE_DIR=$work/state ORCH_CACHE_DIR=$work/cache ORCH_REGISTRY=127.0.0.1:$port
echo "first run: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, commit $(git rev-parse --short HEAD), backends: ${backends:-all}, bases: $([ "$bootstrap" = 1 ] && echo bootstrapped || echo copied)"
start=$SECONDS
# each line prefixed by the seconds since the start, so the output shows where the time goes
ts_lines() { while IFS= read -r line; do printf '%4d s %s\n' $((SECONDS - start)) "$line"; done; }
bash ci/main.sh 2>&1 | ts_lines | grep -E '^ *[0-9]+ s (main:|\[base\]|base: |.*(gzip|zstd) in [0-9.]+ s|.*uv installed|.*registry received|smoke |.*ok +image: engine image ID|.*-> index sha256|.*backends ->|uploaded [0-9,]+ bytes|where the time went| +(build|export|compress|hash|upload|smoke|promote|floor|total) +[0-9.]+ s)'
echo "first run: ${SECONDS} s in all"
