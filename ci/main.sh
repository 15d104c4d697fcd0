#!/usr/bin/env bash
# The main job, from a fresh Debian machine: install, start the engine and
# registry, pin a base, lock, render, then build and push the example
# services (tts, stt) for both backends (cuda, cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
invoke engine.up
invoke lock
invoke render
invoke build --backend all
