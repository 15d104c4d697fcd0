"""Keep only some backends in a copy of the example project (what a first run of those backends builds).

Usage: python3 bench/cut_backends.py PROJECT_YAML cuda,cpu
Edits the file in place: every entry under `backends:` not named is removed, comments and the rest
kept. `invoke lock` then drops the removed backends' locks ("no longer used") and keeps the others
byte for byte, so the remaining images have the digests the full project gives them.
"""

from __future__ import annotations

import re
import sys


def cut(text: str, keep: set[str]) -> str:
    out, section, drop, seen = [], None, False, set()
    for line in text.split("\n"):
        if line and not line[0].isspace() and not line.startswith("#"):
            section, drop = line.split(":")[0], False
        elif section == "backends" and re.match(r"^  [A-Za-z0-9_.-]+:", line):
            name = line.strip().split(":")[0]
            seen.add(name)
            drop = name not in keep
        if not drop:
            out.append(line)
    if keep - seen:
        raise SystemExit(f"cut_backends: the project has no backend {sorted(keep - seen)} (it has {sorted(seen)})")
    return "\n".join(out)


if __name__ == "__main__":
    path, names = sys.argv[1], set(sys.argv[2].split(","))
    with open(path) as fh:
        text = fh.read()
    with open(path, "w") as fh:
        fh.write(cut(text, names))
