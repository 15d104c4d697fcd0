"""The package's layout is its architecture: rooms whose imports point one way, and no import cycles.

Both checks read the source (every import statement, those inside functions
included), so an import moved into a function to dodge a cycle is still seen.
ARCHITECTURE.md describes the rooms; this test keeps the code to it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "orchestrator"

# Lowest first: a room may import its own modules and the rooms before it, never one after it.
ROOMS = ("common", "oci", "project", "debian", "host", "machine", "build", "release")
# Above every room: the one module that chains the stages, and the command line over it.
TOP = ("flow", "cli", "pytest_plugin", "__main__")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))
            if "runtime" not in p.relative_to(PACKAGE).parts}  # runtime/ ships into images: stdlib only


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every orchestrator module this one imports, anywhere in the file."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            # `from pkg import sub` imports the module pkg.sub; `from mod import name`, the module mod.
            targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in known else src for a in node.names]
        for t in targets:
            if t in known and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_the_package_has_no_import_cycle_counting_imports_inside_functions():
    assert cycles(graph()) == []


def test_a_cycle_would_be_found():  # the checker itself, on a made-up graph
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_lives_in_a_room_or_is_one_of_the_top():
    loose = [m for m in modules() if room(m) not in (*ROOMS, *TOP, None)]
    assert loose == [], f"modules outside the rooms {ROOMS}: {loose}"


def test_each_room_imports_only_itself_and_the_rooms_below_it():
    upward = []
    for module, targets in graph().items():
        here = room(module)
        if here not in ROOMS:
            continue  # flow and the command line chain everything
        for target in sorted(targets):
            there = room(target)
            if there is None:
                continue  # the package's own __init__
            if there in TOP or ROOMS.index(there) > ROOMS.index(here):
                upward.append(f"{module} -> {target}")
    assert upward == [], "imports that point up the pipeline:\n" + "\n".join(upward)


# Each stage's entry: run by the flow, never by another stage (publish does not build, smoke does not build).
STAGES = {"orchestrator.project.lock", "orchestrator.debian.locks", "orchestrator.build.images",
          "orchestrator.release.smoke", "orchestrator.release.smoke.runner", "orchestrator.release.publish",
          "orchestrator.release.gc"}


def test_only_the_flow_chains_the_stages():
    chained = []
    for module, targets in graph().items():
        if room(module) in TOP:
            continue
        for target in sorted(targets & STAGES):
            if module.startswith(target + ".") or target.startswith(module + "."):
                continue  # a stage package and its own modules
            chained.append(f"{module} -> {target}")
    assert chained == [], "stages run by something other than orchestrator.flow:\n" + "\n".join(chained)
