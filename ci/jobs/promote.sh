#!/usr/bin/env bash
# Promote: `invoke publish` assembles one OCI index per image and backend from
# the per-platform images the build jobs pushed, moves the human tags to them
# and writes each service's backend manifest last (smoke.ran recorded).
#
# It runs smoke again on purpose, for every digest the currently promoted
# backend manifest has not already smoke-tested: the gate travels with the
# command that promotes, so a promote job can never move a tag to an untested
# image, whatever ran before it. (`--no-smoke` would record smoke.ran: false.)
# The separate smoke job exists to fail fast and give its own report.
#
# Every image, index and backend manifest is signed with the release key
# ($ORCH_SIGNING_KEY or $ORCH_SIGNING_KEY_FILE, from the CI's secrets) before
# any tag moves; without one, a registry other than this machine's loopback
# is refused.
set -euo pipefail
source "$(dirname "$0")/common.sh"
invoke engine.up
invoke publish "$@"
