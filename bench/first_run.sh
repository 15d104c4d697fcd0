#!/usr/bin/env bash
# The README's first command (`bash ci/main.sh`) as close to a fresh machine
# as one can get on a used one: a clean clone of HEAD, an empty state dir
# (so a new registry with empty storage on its own port), an empty blob
# cache, and BuildKit's cache pruned unless --keep-buildkit. What stays: the
# Debian packages (apt) and dockerd. Bases come from the registry they were
# pinned in when it answers (as on a machine that has one), otherwise they are
# bootstrapped; pass --bootstrap to stop the pinned registry from being used.
#
# Usage: bash bench/first_run.sh [--keep-buildkit] [--port 5056] > bench/out/first_run.txt
set -euo pipefail
keep=0; port=5056
while [ $# -gt 0 ]; do
  case "$1" in
    --keep-buildkit) keep=1 ;;
    --port) port=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/orch-first-run.XXXXXX)
trap 'pkill -f "docker-registry serve $work/state" || true; rm -rf "$work"' EXIT
git clone -q "$root" "$work/main"
[ "$keep" = 1 ] || docker builder prune -af >/dev/null
cd "$work/main"
export ORCH_STATE_DIR=$work/state ORCH_CACHE_DIR=$work/cache ORCH_REGISTRY=127.0.0.1:$port
echo "first run: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, commit $(git rev-parse --short HEAD)"
start=$SECONDS
bash ci/main.sh 2>&1 | grep -E '^main:|^\[base\]|built in|uploaded .* MB in|^smoke |index sha256|backends ->|^uploaded '
echo "first run: ${SECONDS} s in all"
