"""Split one installed dependency layer into several, by a stated size policy.

The policy: every distribution whose installed files take at least
`own_mb` MB gets a layer of its own, largest first, until the lock has
`max_layers` layers; everything else (the small distributions, files no
RECORD claims or more than one claims, empty directories) shares the last
one. So adding or bumping a small package re-sends only the small-package
layer, and a big wheel's layer keeps its digest while its neighbours move.

Runs inside the layer's BuildKit stage, on the build platform, with the
build base's python3 (stdlib only), after pip has installed the lock into
/out<site>: it writes each group as /parts/<NN>-<name>/<same paths>, which
the export stage sends as one tar whose top-level directories are the
groups, in order (orchestrator/layers.write_layers cuts it apart). The
function `plan_groups` is the policy and has no effects; the rest is
filesystem work.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import stat
import sys

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


def _place(src: str, dst: str, top: str) -> None:
    """dst gets src's file (a hard link where that is safe, else a copy); its parents get src's parents' modes."""
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        os.makedirs(parent)
        # Parents as in the source tree (mode), up to the group's root.
        s, d = os.path.dirname(src), parent
        while os.path.abspath(d) != os.path.abspath(top):
            os.chmod(d, stat.S_IMODE(os.lstat(s).st_mode))
            s, d = os.path.dirname(s), os.path.dirname(d)
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISDIR(st.st_mode):
        os.mkdir(dst)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    elif st.st_nlink > 1:
        # Already linked elsewhere: a copy, so no two names in /parts share an inode
        # (a hard link between two groups would point out of its layer).
        shutil.copy2(src, dst, follow_symlinks=False)
    else:
        os.link(src, dst)


def split(root: str, site_rel: str, out: str, own_bytes: int, max_layers: int) -> list[tuple[str, tuple[str, ...]]]:
    """Write root's tree (the layer's /out) into out/<group>/..., site files by owner, the rest to the shared group."""
    site = os.path.join(root, site_rel)
    owner, sizes = owners(site) if os.path.isdir(site) else ({}, {})
    groups = plan_groups(sizes, own_bytes, max_layers)
    group_of = {d: g for g, dists in groups for d in dists}
    placed: list[tuple[str, str | None]] = []  # (path relative to root, group; None: the shared one)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        # Files, symlinks (to directories too: walk does not enter them), and empty directories.
        names = sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in names or ([""] if not dirnames else []):
            rel = os.path.normpath(os.path.join(rel_dir, name))
            in_site = os.path.relpath(rel, site_rel)
            dist = owner.get(in_site) if not in_site.startswith("..") else None
            placed.append((rel, group_of.get(dist) if dist is not None and not group_of[dist].endswith("-" + REST)
                           else None))
    if any(g is None for _, g in placed) and not groups[-1][0].endswith("-" + REST):
        # Files of no package and every package in a layer of its own: they get the shared layer after all.
        groups.append((f"{len(groups):02d}-{REST}", ()))
    shared = groups[-1][0]
    for rel, group in placed:
        top = os.path.join(out, group or shared)
        dst = os.path.join(top, rel)
        if not os.path.lexists(dst):
            _place(os.path.join(root, rel), dst, top)
    for group, _ in groups:
        os.makedirs(os.path.join(out, group), exist_ok=True)
    return groups


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="the layer's tree (/out)")
    ap.add_argument("--site", required=True, help="the site dir inside it (opt/site/<layer>)")
    ap.add_argument("--out", required=True, help="where the groups go (/parts)")
    ap.add_argument("--own-mb", type=float, required=True, help="installed MB from which a package gets its own layer")
    ap.add_argument("--max-layers", type=int, required=True, help="layers at most for this lock")
    a = ap.parse_args(argv)
    groups = split(a.root, a.site, a.out, int(a.own_mb * 1e6), a.max_layers)
    for group, dists in groups:
        print(f"layer {group}: {' '.join(dists) or '(files of no package)'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
