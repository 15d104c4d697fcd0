#!/usr/bin/env bash
# Log in to the publish registry the way docker/login-action does: `docker
# login --password-stdin`, which checks the credentials with the registry and
# stores them in Docker's config.json ($DOCKER_CONFIG, or ~/.docker, or the
# credential helper configured there). Later jobs' `invoke` commands read
# them from there, as does the engine when smoke pulls, so REGISTRY_USERNAME
# and REGISTRY_PASSWORD need not be in their environment.
#
#   ORCH_REGISTRY       host[:port][/namespace] to log in to (the host part is used)
#   REGISTRY_USERNAME   user
#   REGISTRY_PASSWORD   password or token (read from the environment only, never printed)
# Wrong credentials exit non-zero and store nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${ORCH_REGISTRY:?set ORCH_REGISTRY to the registry to log in to}"
if [ -z "${REGISTRY_USERNAME:-}" ] || [ -z "${REGISTRY_PASSWORD:-}" ]; then
  echo "error: set REGISTRY_USERNAME and REGISTRY_PASSWORD (CI secrets) to log in to ${ORCH_REGISTRY}" >&2
  exit 1
fi
host=${ORCH_REGISTRY#*://}
host=${host%%/*}
if ! printf '%s' "$REGISTRY_PASSWORD" | docker login --username "$REGISTRY_USERNAME" --password-stdin "$host"; then
  echo "error: docker login to ${host} as ${REGISTRY_USERNAME} failed (see the message above); check the" \
       "REGISTRY_USERNAME/REGISTRY_PASSWORD secrets" >&2
  exit 1
fi
