#!/usr/bin/env bash
# Prepare a runner that brings its own Docker (GitHub's ubuntu-24.04 and
# ubuntu-24.04-arm, GitLab's docker:dind jobs) for the job scripts: the
# Debian/Ubuntu tools `invoke engine.up` calls that are missing (with sudo
# when not root) and a .venv with the package. Unlike ci/setup.sh it does not
# install docker.io where a docker CLI is present (it conflicts with
# docker-ce's containerd.io), nor the test-only tools.
set -euo pipefail
cd "$(dirname "$0")/../.."

need=()
command -v docker >/dev/null || need+=(docker.io)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v arch-test >/dev/null || need+=(arch-test)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
[ "$(id -u)" = 0 ] || command -v newuidmap >/dev/null || need+=(uidmap)  # mmdebstrap's unshare mode
case "$(uname -m)" in
  x86_64) emulator=qemu-aarch64-static ;;
  aarch64) emulator=qemu-x86_64-static ;;
  *) emulator= ;;
esac
[ -z "$emulator" ] || command -v "$emulator" >/dev/null || need+=(qemu-user-static)
if [ ${#need[@]} -gt 0 ]; then
  sudo=
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "setup: missing ${need[*]}; run as root or install them" >&2; exit 1; }
    sudo="sudo"
  fi
  echo "setup: installing ${need[*]}"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# mmdebstrap as a normal user (unshare mode) maps subordinate ids.
if [ "$(id -u)" != 0 ] && ! grep -q "^$(id -un):" /etc/subuid 2>/dev/null; then
  sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 "$(id -un)"
fi
# Ubuntu 24.04 forbids unprivileged user namespaces through AppArmor;
# mmdebstrap (bootstrapping a base nobody has cached yet) needs them.
userns=/proc/sys/kernel/apparmor_restrict_unprivileged_userns
if [ -r "$userns" ] && [ "$(cat "$userns")" = 1 ] && [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then
  sudo sysctl -q -w kernel.apparmor_restrict_unprivileged_userns=0
fi

# A fresh runner gets a fresh .venv (pip's cache makes it quick), installed
# from requirements/tool.lock with every hash checked (blob digests depend on
# the exact isal; see ci/setup.sh); a .venv installed from this very lock and
# pyproject.toml is kept as it is.
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.orchestrator-installed
want=$(cat pyproject.toml requirements/tool.lock | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the orchestrator package into .venv from requirements/tool.lock"
  .venv/bin/pip install -q --require-hashes -r requirements/tool.lock
  .venv/bin/pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
