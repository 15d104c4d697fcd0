#!/usr/bin/env bash
# Register QEMU for the foreign platform with binfmt_misc, as
# docker/setup-qemu-action does (tonistiigi/binfmt, entries with the F flag,
# so containers and BuildKit on this kernel use them). Needs a privileged
# container or root on the host; a no-op where it is registered already.
# engine.up falls back to Debian's qemu-user-static when this cannot run.
set -euo pipefail
case "$(uname -m)" in
  x86_64) want=aarch64; platform=arm64 ;;
  aarch64) want=x86_64; platform=amd64 ;;
  *) echo "binfmt: unknown host $(uname -m); nothing registered" >&2; exit 0 ;;
esac
binfmt=/proc/sys/fs/binfmt_misc
[ -e "$binfmt/register" ] || mount -t binfmt_misc binfmt_misc "$binfmt" 2>/dev/null || true
if [ -e "$binfmt/qemu-$want" ]; then
  echo "binfmt: qemu-$want registered"
  exit 0
fi
docker run --privileged --rm "${BINFMT_IMAGE:-docker.io/tonistiigi/binfmt:qemu-v7.0.0-28}" --install "$platform"
