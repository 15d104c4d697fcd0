"""flake.nix and flake.lock, checked offline.

nixpkgs cannot be fetched here, so flake.nix is evaluated by Debian's
`nix-instantiate` against a small stand-in for nixpkgs (STAND_IN below): it
has the attributes the flake uses, and each "package" records the commands it
puts on PATH, as the real nixpkgs package does. The dev shell must carry
every external command the tasks call, and that list is checked against a
grep of orchestrator/, so a new tool without a shell entry fails here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from orchestrator.machine import preflight
from orchestrator.project import spec

from ..conftest import FIXTURES, ROOT, unavailable

FLAKE = ROOT / "flake.nix"
LOCK = ROOT / "flake.lock"
SYSTEMS = ["x86_64-linux", "aarch64-linux"]

# Every external command the tasks call, directly (subprocess, shutil.which
# in orchestrator/) or through another tool (mmdebstrap runs arch-test and,
# for a foreign architecture, QEMU), and why. The dev shell must put each on PATH.
SHELL_COMMANDS = {
    "python3": "the tasks themselves, pytest, and the .venv the shell hook creates",
    "uv": "invoke lock (uv pip compile --generate-hashes)",
    "docker": "BuildKit builds (engine.build_client), docker push",
    "dockerd": "engine.up starts the engine when none answers",
    "docker-registry": "engine.up starts the embedded registry; engine.gc runs garbage-collect",
    "mmdebstrap": "engine.up bootstraps the base when it cannot be pulled",
    "arch-test": "mmdebstrap's check that a foreign architecture runs",
    "qemu-aarch64-static": "engine.up (arm64 on amd64): bootstrap and containers under emulation",
    "qemu-x86_64-static": "the same for amd64 on an arm64 host",
    "update-binfmts": "engine.up registers QEMU with binfmt_misc",
    "mount": "engine.up mounts binfmt_misc when it is not mounted",
    "gpgv": "system packages: the Debian archive's InRelease signature (orchestrator/apt.py)",
    "hadolint": "tests: lint of the generated Dockerfiles",
    "skopeo": "inspecting and copying images in a registry by hand",
}
# Commands orchestrator/ calls that the dev shell deliberately does not carry.
NOT_IN_SHELL = {
    "apt-get": "Debian only: preflight installs missing tools with it; in the dev shell nothing is missing",
    "ldconfig": "probe falls back to the library paths (NixOS's /run/opengl-driver/lib included) without it",
}

# A stand-in for nixpkgs: just what flake.nix uses. `pkg NAME BINS` is a
# package whose bin/ holds BINS (as in the real nixpkgs package).
STAND_IN = r"""
let
  pkg = name: bins: {
    inherit name bins;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    overrideAttrs = f: pkg name bins // { overridden = f { installPhase = "wrapProgram $out/bin/mmdebstrap --set PATH /x"; }; };
  };
  lib = {
    genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = f n; }) names);
    optional = c: x: if c then [ x ] else [ ];
    optionals = c: xs: if c then xs else [ ];
    makeBinPath = ps: builtins.concatStringsSep ":" (map (p: "${p}/bin") ps);
    platforms.linux = [ "x86_64-linux" "aarch64-linux" ];
  };
  pyPkgs = builtins.listToAttrs (map (n: { name = n; value = pkg n [ ]; })
    [ "pip" "invoke" "docker" "pyyaml" "packaging" "requests" "jsonschema" "rich" "isal" "zstandard" "cyclonedx-python-lib" "cryptography" "pytest" "setuptools"
      "testcontainers" ]) // {
    buildPythonApplication = args: pkg args.pname [ (args.meta.mainProgram or args.pname) ] // { inherit args; };
  };
  python311 = pkg "python3-3.11.9" [ "python3" "python" "python3.11" ] // {
    pkgs = pyPkgs;
    interpreter = "/nix/store/00000000000000000000000000000000-python3-3.11.9/bin/python3.11";
    withPackages = f: pkg "python3-3.11.9-env" [ "python3" "python" "python3.11" ] // { pythonPackages = map (p: p.name) (f pyPkgs); };
  };
  pkgsFor = system: {
    inherit lib python311;
    python311Packages = pyPkgs;
    mkShell = args: args;
    writeShellScriptBin = name: text: pkg name [ name ] // { inherit text; };
    runCommand = name: env: script: { inherit name env script; };
    fetchurl = args: "/nix/store/00000000000000000000000000000000-${baseNameOf args.url}";
    stdenv.mkDerivation = args: pkg args.pname [ (args.meta.mainProgram or args.pname) ] // { inherit args; };
    uv = pkg "uv" [ "uv" ];
    docker = pkg "docker" [ "docker" "dockerd" "containerd" "runc" ];
    distribution = pkg "distribution" [ "registry" ];
    skopeo = pkg "skopeo" [ "skopeo" ];
    qemu = pkg "qemu" [ "qemu-aarch64" "qemu-x86_64" "qemu-system-aarch64" "qemu-system-x86_64" ];
    mmdebstrap = pkg "mmdebstrap" [ "mmdebstrap" ];
    util-linux = pkg "util-linux" [ "mount" "umount" ];
    procps = pkg "procps" [ "pkill" "ps" ];
    hadolint = pkg "hadolint" [ "hadolint" ];
    gnupg = pkg "gnupg" [ "gpg" "gpgv" ];
    dpkg = pkg "dpkg" [ "dpkg" "dpkg-deb" ];
    perl = pkg "perl" [ "perl" ];
    bash = pkg "bash" [ "bash" ];
    makeWrapper = pkg "make-wrapper-hook" [ ];
    cacert = pkg "nss-cacert" [ ];
  };
  nixpkgs = {
    inherit lib;
    legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] pkgsFor;
  };
  self = { outPath = "/nix/store/00000000000000000000000000000000-source"; };
  outputs = (import @FLAKE@).outputs { inherit self nixpkgs; };
  summary = p: { name = p.name; bins = p.bins or [ ]; };
in
builtins.mapAttrs (system: _: {
  shell = let s = outputs.devShells.${system}.default; in {
    packages = map summary s.packages;
    pythonPackages = (builtins.head s.packages).pythonPackages;
    shellHook = s.shellHook;
  };
  package = let p = outputs.packages.${system}.default; in {
    inherit (p.args) pname format version doCheck pythonRemoveDeps pythonImportsCheck makeWrapperArgs;
    propagated = map (d: d.name) p.args.propagatedBuildInputs;
    postInstall = p.args.postInstall or null;
    mainProgram = p.args.meta.mainProgram;
  };
  archTest = outputs.packages.${system}.arch-test.args.src;
  mmdebstrapInstall = (builtins.head (builtins.filter (p: p.name == "mmdebstrap") outputs.devShells.${system}.default.packages)).overridden.installPhase;
  updateBinfmts = (builtins.head (builtins.filter (p: p.name == "update-binfmts") outputs.devShells.${system}.default.packages)).text;
  checks = builtins.mapAttrs (n: c: { name = c.name; script = c.script or ""; }) outputs.checks.${system};
}) nixpkgs.legacyPackages
"""


def _nix(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("nix-instantiate")
    if exe is None:
        unavailable("nix-instantiate not installed (Debian: apt-get install nix-bin; ci/setup.sh does)")
    conf = tmp_path / "nix-conf"
    conf.mkdir(exist_ok=True)
    (conf / "nix.conf").write_text("build-users-group =\nexperimental-features =\n")
    # --readonly-mode: evaluate without a writable store or database.
    env = dict(os.environ, NIX_CONF_DIR=str(conf), NIX_REMOTE="", HOME=str(tmp_path))
    return subprocess.run([exe, "--readonly-mode", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nix")
    expr = STAND_IN.replace("@FLAKE@", str(FLAKE))
    proc = _nix("--eval", "--strict", "--json", "-E", expr, tmp_path=tmp)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_flake_parses(tmp_path):
    proc = _nix("--parse", str(FLAKE), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_outputs_exist_for_both_systems(evaluated):
    assert sorted(evaluated) == sorted(SYSTEMS)


@pytest.mark.parametrize("system", SYSTEMS)
def test_dev_shell_carries_every_command_the_tasks_call(evaluated, system):
    shell = evaluated[system]["shell"]
    on_path = {b for p in shell["packages"] for b in p["bins"]}
    missing = sorted(set(SHELL_COMMANDS) - on_path)
    assert not missing, f"devShells.{system}.default lacks {missing} (packages: {[p['name'] for p in shell['packages']]})"
    assert {"invoke", "docker", "pyyaml", "packaging", "requests", "jsonschema", "rich", "pytest", "pip"} \
        <= set(shell["pythonPackages"])
    assert shell["packages"][0]["name"].startswith("python3-3.11")
    for needle in ("SSL_CERT_FILE", ".venv", "pip install", "-e '.[test]'", "invoke doctor"):
        assert needle in shell["shellHook"], needle


@pytest.mark.parametrize("system", SYSTEMS)
def test_package_and_checks(evaluated, system):
    pkg = evaluated[system]["package"]
    assert (pkg["pname"], pkg["format"], pkg["version"]) == ("orchestrator", "pyproject", "0.1.0")
    assert {"invoke", "docker", "pyyaml", "packaging", "requests", "jsonschema", "rich"} <= set(pkg["propagated"])
    assert pkg["pythonRemoveDeps"] == ["uv"]  # the stand-in, like 24.05, has no python uv package
    checks = evaluated[system]["checks"]
    assert "pytest" in checks["unit"]["script"] and "tests/unit" in checks["unit"]["script"]


@pytest.mark.parametrize("system", SYSTEMS)
def test_package_binary_is_the_console_script(evaluated, system):
    """bin/orchestrator is what pip or uv installs: pyproject's entry point, not a wrapper around a checkout."""
    pkg = evaluated[system]["package"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"orchestrator": "orchestrator.cli:main"}
    assert pkg["mainProgram"] == "orchestrator"
    # No hand-written bin/orchestrator over a packaged tasks.py: buildPythonApplication makes the
    # console script and wraps it with makeWrapperArgs (uv on PATH for `orchestrator lock`).
    assert not pkg["postInstall"] or ("tasks.py" not in pkg["postInstall"]
                                      and "bin/orchestrator" not in pkg["postInstall"])
    assert pkg["makeWrapperArgs"][:3] == ["--prefix", "PATH", ":"] and pkg["makeWrapperArgs"][3].endswith("-uv/bin")
    assert "orchestrator.cli" in pkg["pythonImportsCheck"]


def test_helpers_for_debian_tools(evaluated):
    for system in SYSTEMS:
        e = evaluated[system]
        assert e["archTest"].endswith("arch-test_0.20-1_all.deb")
        assert "--prefix PATH : " in e["mmdebstrapInstall"] and "--set PATH" not in e["mmdebstrapInstall"]
        assert ":qemu-aarch64:M::" in e["updateBinfmts"] and ":FP'" in e["updateBinfmts"]


def test_pyproject_dependencies_are_all_in_the_flake():
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"dependencies = \[(.*?)\]", text, re.S).group(1)
    names = [re.split(r"[<>=! ]", d.strip().strip('",'))[0] for d in deps.split("\n") if d.strip()]
    flake = FLAKE.read_text()
    runtime = re.search(r"runtimeDeps = ps: (.*)", flake).group(1)
    for name in names:
        assert re.search(rf"\b{re.escape(name)}\b", runtime), f"flake.nix runtimeDeps lacks {name}"


# --- the list above against the code ---------------------------------------

def _commands_in_code() -> dict[str, str]:
    """External commands named in orchestrator/: shutil.which("x") and subprocess argv[0] literals."""
    found: dict[str, str] = {}
    patterns = [r"shutil\.which\(\s*\"([^\"]+)\"",
                r"subprocess\.(?:run|Popen|call|check_call|check_output)\(\s*\[\s*\"([^\"]+)\"",
                r"\bcmd\s*=\s*\[\s*\"([^\"]+)\"",
                r"\[\s*\"(apt-get)\""]
    for path in sorted((ROOT / "orchestrator").rglob("*.py")):
        if "runtime" in path.parts:  # runs inside the images, not on the host
            continue
        text = path.read_text()
        for pat in patterns:
            for m in re.finditer(pat, text):
                found.setdefault(m.group(1), str(path.relative_to(ROOT)))
    # What engine.up calls, directly or through mmdebstrap, for every foreign arch.
    project = spec.load(FIXTURES / "mini" / "project.yaml")
    for arch in ("amd64", "arm64"):
        for tool in preflight.required_tools(dataclasses.replace(project, platforms=("linux/amd64", "linux/arm64")),
                                             arch):
            found.setdefault(tool.command, "orchestrator/preflight.py")
    return found


def test_every_command_in_the_code_is_in_the_shell_list():
    found = _commands_in_code()
    assert {"dockerd", "docker-registry", "mmdebstrap", "update-binfmts", "arch-test"} <= set(found), found
    unlisted = {c: where for c, where in found.items() if c not in SHELL_COMMANDS and c not in NOT_IN_SHELL}
    assert not unlisted, ("commands called in orchestrator/ but not in test_flake.SHELL_COMMANDS (add them to the "
                          f"dev shell in flake.nix and to the list): {unlisted}")


# --- flake.lock ----------------------------------------------------------------

def test_flake_lock_pins_nixpkgs():
    lock = json.loads(LOCK.read_text())
    assert lock["version"] == 7 and lock["root"] == "root"
    node = lock["nodes"][lock["nodes"]["root"]["inputs"]["nixpkgs"]]
    locked, original = node["locked"], node["original"]
    assert locked["type"] == "github" and (locked["owner"], locked["repo"]) == ("NixOS", "nixpkgs")
    assert re.fullmatch(r"[0-9a-f]{40}", locked["rev"])
    assert re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", locked["narHash"])
    assert isinstance(locked["lastModified"], int) and locked["lastModified"] > 1_700_000_000
    # The lock must answer the input flake.nix declares, or nix re-locks it.
    url = re.search(r'inputs\.nixpkgs\.url = "github:([^/]+)/([^/]+)/([^"]+)"', FLAKE.read_text()).groups()
    assert (original["type"], original["owner"], original["repo"], original["ref"]) == ("github", *url)


def test_flake_declares_the_dev_shell():
    text = FLAKE.read_text()
    for needle in ("devShells", "mkShell", "python311", "genAttrs", "x86_64-linux", "aarch64-linux",
                   "shellHook", ".venv", "pip install -e '.[test]'", "packages", "buildPythonApplication",
                   "checks"):
        assert needle in text, f"flake.nix no longer mentions {needle!r}"
