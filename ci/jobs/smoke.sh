#!/usr/bin/env bash
# Smoke-test what the build jobs pushed: every variant of the current inputs,
# pulled by content-tag digest (arm64 under QEMU). Builds nothing when the
# build jobs ran. Extra arguments go to `invoke smoke` (e.g. --json).
set -euo pipefail
source "$(dirname "$0")/common.sh"
invoke engine.up
invoke smoke "$@"
