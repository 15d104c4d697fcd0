#!/usr/bin/env bash
# The test command: install, start the engine and registry, check that locks
# and Dockerfiles are current, then run the whole suite against the real
# engine. With CI=true, engine-dependent tests fail instead of skipping.
# Every run prints its 30 slowest setups, calls and teardowns (--durations=30):
# a test that grows slow shows in the log of the change that made it so.
# The suite must write nothing into the checkout: a file that is not ignored
# and was not there before the run fails the job, named.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# The Ryuk reaper image cannot be pulled offline; tests remove what they start.
export TESTCONTAINERS_RYUK_DISABLED=true
base_inputs() { python -c 'import json, sys; print(json.load(sys.stdin)["inputs-sha256"])'; }
# A fresh runner bootstraps the bases from deb.debian.org, which keeps only the
# newest packages: once Debian updates one, a committed pin cannot be rebuilt
# and engine.up re-pins (it says which packages moved). That is the archive
# moving, not a stale commit, so only then are the locks built on the base
# re-made here, loudly, for the project and for the fixture the tests copy
# (before the suite starts: the suite itself must leave the checkout alone).
# A pin made for another recipe (inputs-sha256 differs) still fails the check.
# The second project's bootstrap is free: one per archive state per machine.
check_locks() (  # a subshell: ORCH_PROJECT stays with this project
    pin="$1/locks/base.json"
    export ORCH_PROJECT="$1/project.yaml"
    invoke engine.up --bootstrap-now
    if ! git diff --quiet -- "$pin" \
        && [ "$(git show "HEAD:$pin" | base_inputs)" = "$(base_inputs <"$pin")" ]; then
        echo "ci: the Debian archive moved since $pin was committed; re-locking what is built on the base" \
             "(run \`ORCH_PROJECT=$ORCH_PROJECT invoke engine.up lock render\` and commit to pin the new base)" >&2
        invoke lock
        invoke render
    fi
    invoke lock --check
    invoke render --check
)
check_locks .
check_locks tests/fixtures/mini

leftovers() { git status --porcelain --untracked-files=all | LC_ALL=C sort; }
before="$(mktemp)"
after="$(mktemp)"
trap 'rm -f "$before" "$after"' EXIT
leftovers >"$before"

status=0
python -m pytest -q -p no:cacheprovider --durations=30 "$@" || status=$?

leftovers >"$after"
new="$(LC_ALL=C comm -13 "$before" "$after")"
if [ -n "$new" ]; then
    echo "error: the test suite left files in the checkout (tests must copy fixtures to a tmp dir):" >&2
    printf '%s\n' "$new" | sed 's/^/  /' >&2
    exit 1
fi
exit "$status"
