#!/usr/bin/env bash
# The main job, from a fresh Debian machine: install, start the engine and
# registry, pin or fetch the bases, lock, render, then build, smoke-test and
# publish the example services (tts, stt) for every backend, with their
# backend manifests. Prints how long each stage took.
set -euo pipefail
cd "$(dirname "$0")/.."
stage() {
  local name=$1; shift
  local t0=$SECONDS
  "$@"
  echo "main: ${name} took $((SECONDS - t0)) s" >&2
}
stage setup bash ci/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
stage engine.up invoke engine.up
stage lock invoke lock
stage render invoke render
stage publish invoke publish
echo "main: done in ${SECONDS} s" >&2
