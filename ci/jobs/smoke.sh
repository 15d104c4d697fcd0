#!/usr/bin/env bash
# Smoke-test what the build jobs pushed: every variant of the current inputs,
# found by content tag, loaded into the engine from the blob cache or, on a
# fresh runner, streamed from the registry, and run by its config digest
# (arm64 under QEMU). Builds nothing when the build jobs ran. Extra arguments
# go to `invoke smoke` (e.g. --json).
set -euo pipefail
source "$(dirname "$0")/common.sh"
invoke engine.up
invoke smoke "$@"
