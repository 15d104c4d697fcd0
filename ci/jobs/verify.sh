#!/usr/bin/env bash
# Verify the release the way a host would, after promote: `invoke verify`
# reads every service's backend manifest from the registry and checks the
# signatures of the manifest and of every image and index it names against
# the public keys under trust.keys in project.yaml (never this machine's own
# key: ORCH_STATE_DIR is a fresh directory here), each image's signed
# provenance, and that the registry still serves what the manifest names.
# It needs read access only, never the signing key. Exit 2 names the
# artifact that failed.
set -euo pipefail
source "$(dirname "$0")/common.sh"
ORCH_STATE_DIR="$(mktemp -d)"
export ORCH_STATE_DIR
trap 'rm -rf "$ORCH_STATE_DIR"' EXIT
invoke verify "$@"
