#!/usr/bin/env bash
# Install what the tool needs on a Debian 12 machine, idempotently:
# Debian's docker.io (engine + a CLI with built-in BuildKit), docker-registry,
# mmdebstrap (base images when none can be pulled), qemu-user-static and
# binfmt-support (running arm64 containers), and a .venv with the package.
set -euo pipefail
cd "$(dirname "$0")/.."

# Every package a code path calls. --no-install-recommends is deliberate, so
# anything a tool only "recommends" but we need is listed by name: arch-test
# (mmdebstrap's foreign-architecture check), nix-bin (the flake checks),
# gpgv + debian-archive-keyring (system_packages: the archive's InRelease
# signature is checked before any index is trusted), git (ci/test.sh and the
# bad-input tests check that the suite leaves nothing in the checkout with
# `git status`; a minimal Debian 12 has no git), and two that a full Debian
# install has but a minbase root (a container) lacks: procps (pkill:
# bench/first_run.sh's cleanup) and iproute2 (ip: the second-engine tests).
# gcc and libc6-dev build the stand-ins for the NVIDIA libraries
# (tests/gpu_standins.py) that bench/gpu_check.py's tests load.
packages=(python3 python3-venv python3-pip ca-certificates openssl docker.io docker-registry
          mmdebstrap arch-test qemu-user-static binfmt-support uidmap nix-bin gpgv debian-archive-keyring
          git procps iproute2 gcc libc6-dev)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "setup: missing ${missing[*]}; run as root or install them" >&2; exit 1; fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The venv is made from Debian's python3 (installed above), not whichever
# python3 comes first on PATH (a pyenv or /usr/local build here would hide
# what a fresh Debian 12 runs: 3.11.2). An existing .venv is left as it is.
#
# The tool's own dependencies come from requirements/tool.lock, every file
# checked against its sha256: the lock is part of the build (blob digests are
# made of the exact isal's output, pinned in pyproject.toml). It covers
# pyproject.toml's dependencies and the test extra, for Python 3.11+ on
# linux x86_64 and aarch64 (one universal file, platform markers inside);
# tests/unit/test_tool_lock.py checks it against pyproject.toml. After
# changing a dependency, regenerate it from the repository root with
#   uv pip compile pyproject.toml --extra test --universal --python-version 3.11 --generate-hashes -o requirements/tool.lock
# (add --upgrade to move every pin to the newest release).
[ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
stamp=.venv/.orchestrator-installed
want=$(cat pyproject.toml requirements/tool.lock | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the orchestrator package into .venv from requirements/tool.lock"
  # pip's own configuration (find-links, indexes) is honoured; only its
  # noise about file:// index entries that lack a package is filtered out.
  log=$(mktemp)
  if ! { .venv/bin/pip install -q --require-hashes -r requirements/tool.lock &&
         .venv/bin/pip install -q --no-deps -e .; } >"$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" >&2 || true
    echo "setup: installing requirements/tool.lock and the package into .venv failed" >&2
    exit 1
  fi
  grep -v "is ignored: it is neither a file nor a directory" "$log" || true
  rm -f "$log"
  echo "$want" > "$stamp"
fi
