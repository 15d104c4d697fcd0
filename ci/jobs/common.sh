# Sourced by the job scripts in ci/jobs/: go to the repository root, require
# a publish registry, make sure the .venv and the tools engine.up calls are
# there (ci/jobs/setup.sh) and put the .venv first on PATH.
#
# The jobs run on separate machines (one per platform, then smoke, then
# promote), so they can only meet in a real registry: ORCH_REGISTRY must name
# one. The embedded 127.0.0.1:5000 would be a different, empty registry in
# every job.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [ -z "${ORCH_REGISTRY:-}" ]; then
  echo "error: set ORCH_REGISTRY to the registry to publish to (e.g. ghcr.io/acme): each CI job runs on its own" \
       "machine, and they only meet in a shared registry" >&2
  exit 1
fi
bash ci/jobs/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
