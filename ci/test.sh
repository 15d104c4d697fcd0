#!/usr/bin/env bash
# The test command: install, start the engine and registry, check that locks
# and Dockerfiles are current, then run the whole suite against the real
# engine. With CI=true, engine-dependent tests fail instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# The Ryuk reaper image cannot be pulled offline; tests remove what they start.
export TESTCONTAINERS_RYUK_DISABLED=true
invoke engine.up
invoke lock --check
invoke render --check
python -m pytest -q -p no:cacheprovider "$@"
