"""Split one installed dependency layer into several, by a stated size policy.

The policy: every distribution whose installed files take at least
`own_mb` MB gets a layer of its own, largest first, until the lock has
`max_layers` layers; everything else (the small distributions, files no
RECORD claims or more than one claims, empty directories) shares the last
one. So adding or bumping a small package re-sends only the small-package
layer, and a big wheel's layer keeps its digest while its neighbours move.

The tool runs it on the tree uv installed a lock into
(orchestrator/build/pydeps.py, which writes each group as one layer):
`owners` reads every RECORD, `plan_groups` is the policy and has no
effects, `place` assigns every file of the tree to its group. Stdlib only.
"""

from __future__ import annotations

import csv
import os

REST = "small"


def plan_groups(sizes: dict[str, int], own_bytes: int, max_layers: int) -> list[tuple[str, tuple[str, ...]]]:
    """(group name, distributions) in layer order: the own layers by name, then the shared one.

    sizes: distribution name -> installed bytes. The group names sort in
    layer order ("00-torch" < "01-triton" < "02-small"), because the
    exported tar comes in sorted order and is cut where the name changes.
    """
    big = sorted((d for d, n in sizes.items() if n >= own_bytes), key=lambda d: (-sizes[d], d))
    own = sorted(big[:max(max_layers - 1, 0)])
    rest = tuple(sorted(d for d in sizes if d not in own))
    groups = [(name, (name,)) for name in own]
    if rest or not groups:
        groups.append((REST, rest))
    return [(f"{i:02d}-{name}", dists) for i, (name, dists) in enumerate(groups)]


def _dist_name(dist_info: str) -> str:
    # "ctranslate2-4.5.0.dist-info" -> "ctranslate2"; names in dist-info dirs have "-" as "_".
    return dist_info[: -len(".dist-info")].rsplit("-", 1)[0].lower().replace("_", "-")


def _record_paths(site: str, dist_info: str) -> list[str]:
    """Paths (relative to site) of the files a distribution installed, as its RECORD lists them."""
    out = []
    try:
        with open(os.path.join(site, dist_info, "RECORD"), newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except OSError:
        rows = []
    for row in rows:
        if not row or not row[0]:
            continue
        rel = os.path.normpath(row[0])
        if rel.startswith(".." + os.sep):
            # pip --target records scripts as ../../bin/<name> but puts them in <target>/bin.
            parts = rel.split(os.sep)
            if "bin" not in parts:
                continue
            rel = os.path.join("bin", *parts[parts.index("bin") + 1:])
        out.append(rel)
    # The dist-info directory is the distribution's whatever RECORD says.
    for root, _, files in os.walk(os.path.join(site, dist_info)):
        out += [os.path.relpath(os.path.join(root, f), site) for f in files]
    return out


def owners(site: str) -> tuple[dict[str, str], dict[str, int]]:
    """file (relative to site) -> the one distribution that installed it; and each distribution's size."""
    claims: dict[str, set[str]] = {}
    dists = sorted(d for d in os.listdir(site) if d.endswith(".dist-info"))
    for dist_info in dists:
        name = _dist_name(dist_info)
        for rel in _record_paths(site, dist_info):
            if os.path.lexists(os.path.join(site, rel)):
                claims.setdefault(rel, set()).add(name)
    owner = {rel: next(iter(names)) for rel, names in claims.items() if len(names) == 1}
    sizes = {_dist_name(d): 0 for d in dists}
    for rel, name in owner.items():
        sizes[name] += os.lstat(os.path.join(site, rel)).st_size
    return owner, sizes


def place(root: str, site_rel: str, own_bytes: int, max_layers: int, skip: tuple[str, ...] = ()
          ) -> list[tuple[str, tuple[str, ...], list[str]]]:
    """(group, its distributions, its paths relative to root) in layer order.

    Paths are files, symlinks and empty directories: a site file of a
    distribution with a layer of its own goes there; everything else (the
    small distributions, files no RECORD claims or more than one claims,
    empty directories) goes to the shared group, which is added when every
    distribution has its own. skip: top-level names of root left out.
    """
    site = os.path.normpath(os.path.join(root, site_rel))
    owner, sizes = owners(site) if os.path.isdir(site) else ({}, {})
    groups = plan_groups(sizes, own_bytes, max_layers)
    group_of = {d: g for g, dists in groups for d in dists}
    placed: list[tuple[str, str | None]] = []  # (path relative to root, group; None: the shared one)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            dirnames[:] = [d for d in dirnames if d not in skip]
            filenames = [f for f in filenames if f not in skip]
        # Files, symlinks (to directories too: walk does not enter them), and empty directories.
        names = sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in names or ([""] if not dirnames and rel_dir != "." else []):
            rel = os.path.normpath(os.path.join(rel_dir, name))
            in_site = os.path.relpath(rel, os.path.normpath(site_rel))
            dist = owner.get(in_site) if not in_site.startswith("..") else None
            placed.append((rel, group_of.get(dist) if dist is not None and not group_of[dist].endswith("-" + REST)
                           else None))
    if any(g is None for _, g in placed) and not groups[-1][0].endswith("-" + REST):
        # Files of no package and every package in a layer of its own: they get the shared layer after all.
        groups.append((f"{len(groups):02d}-{REST}", ()))
    shared = groups[-1][0]
    paths: dict[str, list[str]] = {g: [] for g, _ in groups}
    for rel, group in placed:
        paths[group or shared].append(rel)
    return [(g, dists, paths[g]) for g, dists in groups]
