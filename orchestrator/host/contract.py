"""The runtime contract between an image built here and the host that starts it.

Where the service lives in the image, the one user it runs as, the only
paths it writes (declared in a label, so any host can give them a tmpfs
while the root stays read-only), and the label namespace. `build.plan`
writes these into every image; `invoke run`, smoke and the pytest plugin
start containers by them.
"""

from __future__ import annotations

SITE = "/opt/site"
APP_DIR = "/opt/app"
RUNTIME_DIR = "/opt/runtime"
APP_UID = 10001
LABEL_PREFIX = "io.orchestrator"
HOME_DIR = "/home/app"
# The only paths a service writes: everything else may be mounted read-only.
# Declared in a label, and `invoke run`/smoke mount a tmpfs on each.
WRITABLE_DIRS = ("/tmp", HOME_DIR)
WRITABLE_LABEL = f"{LABEL_PREFIX}.writable-dirs"
EX_CONFIG = 78  # what the entrypoint exits with when its backend cannot run here (strict policy)


# tmpfs mount options per writable dir: the home is the service user's alone.
TMPFS_OPTIONS = {"/tmp": "rw,nosuid,nodev,mode=1777",
                 HOME_DIR: f"rw,nosuid,nodev,uid={APP_UID},gid={APP_UID},mode=0700"}
OTHER_TMPFS = "rw,nosuid,nodev,mode=1777"


def run_options() -> dict:
    """docker-py run() arguments for a service container: read-only root, a tmpfs per declared writable dir."""
    return {"read_only": True, "tmpfs": {d: TMPFS_OPTIONS.get(d, OTHER_TMPFS) for d in WRITABLE_DIRS}}


def run_options_for(labels: dict | None) -> dict:
    """run_options() for an image as it declares itself: a tmpfs per dir its WRITABLE_LABEL names.

    An image without the label (not built by this tool) gets the contract's own dirs.
    """
    declared = [d for d in ((labels or {}).get(WRITABLE_LABEL) or "").split() if d.startswith("/")]
    declared = declared or list(WRITABLE_DIRS)
    return {"read_only": True, "tmpfs": {d: TMPFS_OPTIONS.get(d, OTHER_TMPFS) for d in declared}}
