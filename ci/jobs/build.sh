#!/usr/bin/env bash
# One leg of the build matrix: `ci/jobs/build.sh linux/amd64` (or linux/arm64)
# builds that platform's images and pushes them by content tag and digest
# only; no human tag moves. The content tags are a pure function of the
# inputs, so the smoke and promote jobs find these images again. Each leg can
# run on a native runner of its platform, or under QEMU.
set -euo pipefail
platform=${1:?usage: ci/jobs/build.sh linux/amd64|linux/arm64}
source "$(dirname "$0")/common.sh"
invoke engine.up
invoke build --platform "$platform"
