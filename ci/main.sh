#!/usr/bin/env bash
# The main job, from a fresh Debian machine: install, start the engine and
# registry, pin bases, lock, render, then build, push and publish the example
# services (tts, stt) for both backends (cuda, cpu) with their backend manifests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
invoke engine.up
invoke lock
invoke render
invoke publish
