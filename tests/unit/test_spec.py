"""The project file: what loads, and what each mistake in it is told.

Every malformed file must raise SpecError (exit code 2) whose message names
the file, the key path, and what was expected or found.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.project import validate
from orchestrator.project import spec
from orchestrator.common.errors import SpecError

REPO = Path(__file__).resolve().parents[2]

# A valid, minimal project: CUDA 12.4 + CPU backends, two services.
VALID = {
    "schema": 1,
    "project": "demo",
    "platforms": ["linux/amd64"],
    "cuda_libs": {"cuda": "12.4"},
    "backends": {"cuda": {"cuda": "12.4", "torch": "2.5.1"}, "cpu": {"torch": "2.13.0+cpu"}},
    "layers": {"shared": {"requirements": "requirements/shared.in"}},
    "services": {
        "tts": {"path": "services/tts", "requirements": "requirements/tts.in", "command": ["python3", "app.py"]},
        "stt": {"path": "services/stt", "requirements": "requirements/stt.in", "command": ["python3", "app.py"],
                "port": 8001},
    },
}


def write_project(root: Path, edit=None, text=None) -> Path:
    """Write VALID (after `edit(dict)` and then `text(yaml_text)`) with its dirs and files under root."""
    for d in ("services/tts", "services/stt", "requirements"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for name in ("shared", "tts", "stt"):
        (root / "requirements" / f"{name}.in").write_text("numpy\n")
    data = copy.deepcopy(VALID)
    if edit:
        edit(data)
    body = yaml.safe_dump(data, sort_keys=False)
    if text:
        body = text(body)
    path = root / "project.yaml"
    path.write_text(body)
    return path


def set_(dotted: str, value):
    def edit(d):
        *parents, last = dotted.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
    return edit


def drop(dotted: str):
    def edit(d):
        *parents, last = dotted.split(".")
        for p in parents:
            d = d[p]
        del d[last]
    return edit


def both(*edits):
    def edit(d):
        for e in edits:
            e(d)
    return edit


def rename_service(old: str, new):
    def edit(d):
        d["services"][new] = d["services"].pop(old)
    return edit


def case(id, key, *fragments, edit=None, text=None):
    return pytest.param(edit, text, key, fragments, id=id)


AMD, ARM = "linux/amd64", "linux/arm64"

MALFORMED = [
    # YAML itself
    case("invalid-yaml", "", "not valid YAML at line 2, column 14", "mapping values are not allowed",
         text=lambda t: "schema: 1\nproject: demo: x\n"),
    case("empty-file", "", "expected a mapping at the top level", "found nothing (null)", text=lambda t: ""),
    case("top-level-list", "", "expected a mapping at the top level", "found list", text=lambda t: "- a\n- b\n"),
    case("non-string-service-key", "services", "expected a string key", "found int 123",
         edit=rename_service("stt", 123)),
    # shape (JSON Schema)
    case("missing-services", "services", "is required but missing", edit=drop("services")),
    case("unknown-top-level-key", "servcies", "unknown key 'servcies'", "expected one of:", "services",
         edit=set_("servcies", {})),
    case("port-as-string", "services.tts.port", "expected integer", "found str '8000'",
         edit=set_("services.tts.port", "8000")),
    case("port-out-of-range", "services.tts.port", "expected maximum 65535", "found 70000",
         edit=set_("services.tts.port", 70000)),
    case("schema-2", "schema", "expected one of [1]", "found int 2", edit=set_("schema", 2)),
    case("empty-services", "services", "expected at least one entry", "found an empty mapping",
         edit=set_("services", {})),
    case("empty-command", "services.tts.command", "found an empty list", edit=set_("services.tts.command", [])),
    case("missing-command", "services.tts.command", "is required but missing", edit=drop("services.tts.command")),
    case("unknown-service-key", "services.tts.image", "unknown key 'image'", "expected one of:",
         edit=set_("services.tts.image", "x")),
    case("bad-policy", "services.tts.policy", "expected one of ['strict', 'fallback']", "found str 'always'",
         edit=set_("services.tts.policy", "always")),
    # platforms
    case("bad-platform", "platforms[0]", "expected linux/amd64 or linux/arm64", "found 'linux/x86'",
         edit=set_("platforms", ["linux/x86"])),
    case("platform-twice", "platforms[1]", "'linux/amd64' is listed twice", "first at platforms[0]",
         edit=set_("platforms", [AMD, AMD])),
    # backends
    case("backend-name-upper-case", "backends.ROCm", "backend name 'ROCm' must be lower-case",
         "it becomes part of image tags", edit=set_("backends.ROCm", {"torch": "2.5.1"})),
    case("backend-named-cuda-libs", "backends.cuda-libs", "not 'base' or 'cuda-libs'",
         edit=set_("backends.cuda-libs", {"torch": "2.5.1"})),
    case("cuda-packages-for-a-line-without-torch-less-backend", "cuda_libs.packages.12.4",
         "no torch-less backend uses CUDA 12.4",
         edit=set_("cuda_libs.packages", {"12.4": ["nvidia-cuda-runtime-cu12"], "13.0": ["nvidia-cuda-runtime"]})),
    case("cuda-packages-list-for-two-lines", "cuda_libs.packages", "one package list cannot serve CUDA lines",
         edit=lambda d: d["backends"].update({"cuda": {"cuda": "12.4", "torch": None}, "cuda13": {"cuda": "13.0", "torch": None}})
         or d.update({"cuda_libs": {"packages": ["nvidia-cuda-runtime-cu12"]}})),
    case("torch-cuda-pair-unknown", "backends.cuda.torch", "torch 2.13.0 is not built for CUDA 12.4",
         "use torch ['2.5.0', '2.5.1']", edit=set_("backends.cuda.torch", "2.13.0")),
    case("torch-not-in-compat", "backends.cuda.torch", "torch 9.9.9 is not in the compatibility data", "known:",
         edit=set_("backends.cuda.torch", "9.9.9")),
    case("torch-not-a-version", "backends.cpu.torch", "expected a torch version", "found 'latest'",
         edit=set_("backends.cpu.torch", "latest")),
    case("unknown-cuda-version", "backends.cuda.cuda", "unknown CUDA version '11.8'", "'12.4'",
         edit=set_("backends.cuda.cuda", "11.8")),
    case("unknown-cuda-libs-version", "cuda_libs.cuda", "unknown CUDA version '11.8'", "'12.4'",
         edit=both(set_("backends.cuda.cuda", "11.8"), set_("cuda_libs.cuda", "11.8"))),
    case("cuda-backend-without-cuda", "backends.cuda.cuda", "is required for the cuda backend",
         edit=drop("backends.cuda.cuda")),
    case("cuda-libs-disagrees", "backends.cuda.cuda", "CUDA 12.4 differs from cuda_libs.cuda 13.0",
         edit=set_("cuda_libs.cuda", "13.0")),
    case("cuda-on-arm64", "backends.cuda.platforms[1]", "cannot be built for linux/arm64",
         "lists wheels for ['linux/amd64'] only", "drop linux/arm64 from backends.cuda.platforms",
         edit=both(set_("platforms", [AMD, ARM]), set_("backends.cuda.platforms", [AMD, ARM]))),
    case("cuda-on-arm64-only-project", "backends.cuda", "cannot be built for any of the project's platforms",
         "['linux/amd64'] only", edit=set_("platforms", [ARM])),
    case("backend-platform-not-in-project", "backends.cpu.platforms[0]", "'linux/arm64' is not one of the project's",
         edit=set_("backends.cpu.platforms", [ARM])),
    # cuda_libs.packages
    case("cuda-libs-packages-with-torch", "cuda_libs.packages", "is only for CUDA backends without torch",
         "derived from torch's pins", edit=set_("cuda_libs.packages", ["nvidia-cudnn-cu12"])),
    case("cuda-libs-packages-unknown-wheel", "cuda_libs.packages[1]",
         "'nvidia-foo-cu12' is not a CUDA 12.4 library wheel", "nvidia-cudnn-cu12",
         edit=both(drop("backends.cuda.torch"), set_("cuda_libs.packages", ["nvidia-cudnn-cu12", "nvidia-foo-cu12"]))),
    case("cuda-without-torch-needs-packages", "cuda_libs.packages", "is required when backends.cuda (CUDA 12.4) has no torch",
         edit=drop("backends.cuda.torch")),
    # layers
    case("unknown-layer-gpu", "layers.gpu", "unknown layer 'gpu'", "['shared']",
         edit=set_("layers.gpu", {"requirements": "requirements/shared.in"})),
    case("missing-layer-requirements", "layers.shared.requirements", "'requirements/nope.in' does not exist",
         edit=set_("layers.shared.requirements", "requirements/nope.in")),
    # services
    case("missing-requirements-file", "services.tts.requirements",
         "requirements file 'requirements/nope.in' does not exist", edit=set_("services.tts.requirements",
                                                                               "requirements/nope.in")),
    case("missing-service-dir", "services.tts.path", "service directory 'services/nope' does not exist",
         edit=set_("services.tts.path", "services/nope")),
    case("service-path-is-file", "services.tts.path", "expected a directory, found a file",
         edit=set_("services.tts.path", "requirements/tts.in")),
    case("bad-service-name", "services.TTS!", "service name 'TTS!' must be lower-case",
         edit=rename_service("tts", "TTS!")),
    case("reserved-service-name", "services.cuda-libs", "not 'base' or 'cuda-libs'",
         edit=rename_service("tts", "cuda-libs")),
    case("service-backend-undefined", "services.tts.backends[1]", "unknown backend 'rocm'",
         "this project defines ['cuda', 'cpu']", edit=set_("services.tts.backends", ["cpu", "rocm"])),
    # paths stay inside the project; references follow the docker grammar; python matches the base
    case("service-path-escapes", "services.tts.path", "is outside the project directory",
         edit=set_("services.tts.path", "../..")),
    case("requirements-absolute-outside", "services.tts.requirements", "'/etc/hostname' is outside the project",
         edit=set_("services.tts.requirements", "/etc/hostname")),
    case("base-image-injection", "base.image", "is not an image reference", "';'",
         edit=set_("base.image", "python:3.11; rm -rf /")),
    case("registry-hub-namespace", "registry", "Docker Hub namespace", edit=set_("registry", "myregistry")),
    case("python-vs-suite", "python", "base.bootstrap.suite trixie", "python3 is 3.13",
         edit=both(set_("base.image", "debian:trixie-slim"), set_("base.bootstrap.suite", "trixie"))),
    case("python-vs-image-tag", "python", "whose tag is python 3.12",
         edit=set_("base.image", "python:3.12-slim-bookworm")),
    case("unknown-suite", "base.bootstrap.suite", "unknown Debian suite 'sid'",
         edit=set_("base.bootstrap.suite", "sid")),
    # system packages: Debian names and versions (whether they exist is known at `invoke lock`)
    case("system-package-upper-case", "system_packages[1]", "'FFmpeg' is not a Debian package name", "write 'ffmpeg'",
         edit=set_("system_packages", ["sox", "FFmpeg"])),
    case("system-package-shell", "services.stt.system_packages[0]", "'ffmpeg; rm -rf /' is not a Debian package name",
         edit=set_("services.stt.system_packages", ["ffmpeg; rm -rf /"])),
    case("system-package-bad-version", "system_packages[0]", "'latest' is not a Debian version",
         "ffmpeg=<version as `apt-cache policy ffmpeg` shows it>", edit=set_("system_packages", ["ffmpeg=latest"])),
    case("system-package-twice", "services.stt.system_packages[1]", "'sox' is listed twice",
         edit=set_("services.stt.system_packages", ["sox", "sox=14.4.2+git20190427-3.1"])),
    case("system-package-also-project-level", "services.stt.system_packages[0]",
         "'ffmpeg' is already in the project-level system_packages", "remove it from services.stt.system_packages",
         edit=both(set_("system_packages", ["ffmpeg"]), set_("services.stt.system_packages", ["ffmpeg"]))),
    case("system-packages-not-a-list", "system_packages", "expected array", "found str 'ffmpeg'",
         edit=set_("system_packages", "ffmpeg")),
    # allow_sdist: false, true or names
    case("allow-sdist-with-version", "allow_sdist[0]", "expected a Python package name, found 'openai-whisper==1'",
         edit=set_("allow_sdist", ["openai-whisper==1"])),
    case("allow-sdist-string", "allow_sdist", "expected false, true or a list of Python package names",
         "found str 'yes'", edit=set_("allow_sdist", "yes")),
]


@pytest.mark.parametrize("edit, text, key, fragments", MALFORMED)
def test_malformed_project_is_refused_with_file_key_and_reason(tmp_path, edit, text, key, fragments):
    path = write_project(tmp_path, edit, text)
    with pytest.raises(SpecError) as info:
        spec.load(path)
    err = info.value
    message = str(err)
    assert err.exit_code == 2
    assert err.file == str(path)
    assert err.key == key
    assert message.startswith(f"{path}: {key}: " if key else f"{path}: ")
    for fragment in fragments:
        assert fragment in message


def test_every_refusal_carries_a_hint(tmp_path):
    for param in MALFORMED:
        edit, text, key, _ = param.values
        root = tmp_path / param.id
        root.mkdir()
        with pytest.raises(SpecError) as info:
            spec.load(write_project(root, edit, text))
        assert info.value.hint, f"{param.id}: {info.value}"


@pytest.mark.parametrize("ref", [
    "python", "python:3.11-slim-bookworm", "docker.io/library/python:3.11", "localhost:5000/a/b:c",
    "127.0.0.1:5000/orch/base@sha256:" + "a" * 64, "ghcr.io/acme/img:v1.0_rc-1", "a__b/c-d.e:1",
    "[::1]:5000/x:y", "Registry.Example/x",
])
def test_valid_image_references(ref):
    assert validate.image_ref_problem(ref) is None


@pytest.mark.parametrize("ref, why", [
    ("python:3.11; rm -rf /", "';'"), ("Python:3.11", "must be lower-case"), ("python@sha256:abc", "64"),
    ("python:", "the tag ''"), ("python:-x", "the tag '-x'"), ("host:0/x", "port 0 is out of range"),
    ("a//b", "component ''"), ("a/b-", "component 'b-'"), ("", "empty"), ("x:1:2", "component 'x:1'"),
    ("reg.example/" + "a" * 260, "longer than 255"),
])
def test_invalid_image_references(ref, why):
    assert why in (validate.image_ref_problem(ref) or "")


@pytest.mark.parametrize("value, why", [
    ("127.0.0.1:5000", None), ("localhost:5000", None), ("ghcr.io/acme", None), ("registry.example", None),
    ("myregistry", "Docker Hub namespace"), ("host.example:70000", "out of range"), ("-x.example", "not a host"),
    ("ghcr.io/Acme", "lower-case"),
])
def test_registry_values(value, why):
    problem = validate.registry_problem(value)
    assert (problem is None) if why is None else (why in problem)


@pytest.mark.parametrize("text", [
    "numpy>=1.26,<3\n", "# comment\n\nsix==1.16.0 ; python_version >= '3.8'  # why\n",
    "uvicorn[standard]>=0.30\n", "six==1.16.0 \\\n    --hash=sha256:" + "a" * 64 + "\n",
])
def test_lockable_requirements_files_pass(tmp_path, text):
    f = tmp_path / "r.in"
    f.write_text(text)
    validate.check_requirements_file(str(tmp_path / "project.yaml"), "layers.shared.requirements", f)


@pytest.mark.parametrize("text, why", [
    ("six @ https://x.example/six.whl\n", "URL requirement"), ("-e .\n", "editable"),
    ("--index-url https://x\n", "not allowed"), ("-r other.in\n", "includes another file"),
    ("https://x.example/a.tar.gz\n", "URL or path"), ("six>=>1\n", "is not a requirement"),
])
def test_unlockable_requirements_files_are_refused(tmp_path, text, why):
    f = tmp_path / "r.in"
    f.write_text(text)
    with pytest.raises(SpecError, match=why) as info:
        validate.check_requirements_file(str(tmp_path / "project.yaml"), "services.x.requirements", f)
    assert info.value.key == "services.x.requirements" and "'r.in' line 1" in str(info.value)
    assert info.value.hint


def test_a_symlinked_service_dir_pointing_outside_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "proj"
    root.mkdir()
    path = write_project(root, set_("services.tts.path", "services/link"))
    (root / "services/link").symlink_to(outside)
    with pytest.raises(SpecError, match="resolves through a symlink to") as info:
        spec.load(path)
    assert info.value.key == "services.tts.path"


def test_a_symlink_inside_the_project_is_fine(tmp_path):
    path = write_project(tmp_path, set_("services.tts.path", "services/link"))
    (tmp_path / "services/link").symlink_to(tmp_path / "services/tts")
    assert spec.load(path).services["tts"].path == (tmp_path / "services/tts").resolve()


def test_a_bad_registry_from_the_environment_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_REGISTRY", "bad registry")
    with pytest.raises(SpecError, match=r"\(from \$ORCH_REGISTRY\)") as info:
        spec.load(write_project(tmp_path))
    assert info.value.key == "registry" and "ORCH_REGISTRY" in info.value.hint


def test_duplicate_service_names_the_key_path_and_both_lines(tmp_path):
    path = write_project(tmp_path, text=lambda t: t.replace("\n  stt:\n", "\n  tts:\n"))
    lines = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if line == "  tts:"]
    with pytest.raises(SpecError) as info:
        spec.load(path)
    assert info.value.key == "services.tts"
    assert f"{path}: services.tts: duplicate key 'tts' on line {lines[1]} (first defined on line {lines[0]})" \
        in str(info.value)


def test_duplicate_top_level_key_is_refused(tmp_path):
    path = write_project(tmp_path, text=lambda t: t + "schema: 1\n")
    with pytest.raises(SpecError, match=r"project\.yaml: schema: duplicate key 'schema' on line \d+ "
                                        r"\(first defined on line 1\)"):
        spec.load(path)


def test_missing_project_file_is_refused(tmp_path):
    with pytest.raises(SpecError, match="project file not found") as info:
        spec.load(tmp_path / "nope.yaml")
    assert info.value.exit_code == 2 and info.value.file == str(tmp_path / "nope.yaml")


# --- what a valid file means ----------------------------------------------

def test_minimal_project_loads_with_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("ORCH_REGISTRY", raising=False)
    p = spec.load(write_project(tmp_path))
    assert p.name == "demo" and p.version == "0.1.0" and p.python == "3.11"
    assert p.registry == spec.DEFAULT_REGISTRY and p.root == tmp_path.resolve()
    assert p.base.image == spec.DEFAULT_BASE_IMAGE and p.base.suite == "bookworm"
    assert p.cuda_libs == spec.CudaLibs(1, None, "12.4")
    assert p.cuda_libs.tag("12.4") == "cu124-v1" and p.cuda_lines() == ["12.4"]
    assert p.layers == {"shared": (tmp_path / "requirements/shared.in").resolve()}
    tts = p.services["tts"]
    assert (tts.port, tts.version, tts.backends, tts.policy) == (8000, "0.1.0", ("cuda", "cpu"), "fallback")
    assert tts.path == (tmp_path / "services/tts").resolve()
    assert p.services["stt"].port == 8001


def test_system_packages_are_kept_as_written_per_project_and_per_service(tmp_path):
    p = spec.load(write_project(tmp_path, both(set_("system_packages", ["libsndfile1"]),
                                               set_("services.stt.system_packages", ["ffmpeg=7:5.1.7-0+deb12u1"]))))
    assert p.system_packages == ("libsndfile1",)
    assert p.services["stt"].system_packages == ("ffmpeg=7:5.1.7-0+deb12u1",)
    assert p.services["tts"].system_packages == ()


def test_allow_sdist_defaults_to_refusing_and_takes_canonical_names(tmp_path):
    assert spec.load(write_project(tmp_path)).allow_sdist is False
    p = spec.load(write_project(tmp_path, set_("allow_sdist", ["Openai_Whisper", "openai-whisper"])))
    assert p.allow_sdist == ("openai-whisper",)
    assert spec.load(write_project(tmp_path, set_("allow_sdist", True))).allow_sdist is True


def test_registry_can_be_overridden_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_REGISTRY", "registry.example:5000")
    assert spec.load(write_project(tmp_path)).registry == "registry.example:5000"


def test_unlisted_backend_platforms_are_those_the_compat_data_can_build(tmp_path):
    # cu124 torch is x86_64-only; torch 2.13.0+cpu is an x86_64 build (PyPI's aarch64 2.13.0 is CUDA 13).
    p = spec.load(write_project(tmp_path, set_("platforms", [AMD, ARM])))
    assert p.backends["cuda"].platforms == (AMD,)
    assert p.backends["cpu"].platforms == (AMD,)


def test_torch_can_differ_per_platform(tmp_path):
    p = spec.load(write_project(tmp_path, both(set_("platforms", [AMD, ARM]),
                                               set_("backends.cpu.torch", {AMD: "2.13.0+cpu", ARM: "2.9.1"}))))
    assert p.backends["cpu"].platforms == (AMD, ARM)
    assert (p.backends["cpu"].torch_for(AMD), p.backends["cpu"].torch_for(ARM)) == ("2.13.0+cpu", "2.9.1")
    assert p.backends["cpu"].torch_summary() == "2.13.0+cpu (linux/amd64), 2.9.1 (linux/arm64)"


def test_cuda_libs_is_optional_and_each_cuda_line_gets_its_own_image(tmp_path):
    p = spec.load(write_project(tmp_path, lambda d: (d.pop("cuda_libs"), d["backends"].update(
        {"cuda13": {"cuda": "13.0", "torch": "2.13.0"}}))))
    assert p.cuda_libs.revision == 1
    assert p.cuda_lines() == ["13.0", "12.4"]  # newest first: the fallback order
    assert [p.cuda_libs.tag(c) for c in p.cuda_lines()] == ["cu130-v1", "cu124-v1"]
    assert p.backends["cuda13"].is_cuda and p.backends["cuda13"].platforms == (AMD,)


def test_torch_less_cuda_lines_list_their_wheels_per_line(tmp_path):
    def edit(d):
        d["cuda_libs"] = {"packages": {"12.4": ["nvidia-cuda-runtime-cu12"], "13.0": ["nvidia-cuda-runtime"]}}
        d["backends"] = {"cuda": {"cuda": "12.4", "torch": None}, "cuda13": {"cuda": "13.0", "torch": None},
                         "cpu": {"torch": None}}
    p = spec.load(write_project(tmp_path, edit))
    assert p.cuda_libs.packages_for("13.0") == ("nvidia-cuda-runtime",)
    assert p.cuda_libs.packages_for("12.4") == ("nvidia-cuda-runtime-cu12",)


def test_cuda_backend_without_torch_lists_its_cuda_libs(tmp_path):
    p = spec.load(write_project(tmp_path, both(drop("backends.cuda.torch"),
                                               set_("cuda_libs.packages", ["nvidia-cublas-cu12==12.4.5.8"]))))
    assert p.backends["cuda"].torch_for(AMD) is None and p.backends["cuda"].platforms == (AMD,)
    assert p.cuda_libs.packages_for("12.4") == ("nvidia-cublas-cu12==12.4.5.8",)


def test_example_project_at_repo_root_loads():
    p = spec.load(REPO / "project.yaml")
    assert set(p.services) == {"tts", "stt"}
    assert set(p.backends) == {"cuda13", "cuda", "cpu"}
    assert (p.backends["cuda"].torch_for("linux/amd64"), p.backends["cuda"].cuda) == ("2.5.1", "12.4")
    # The CUDA 13 line runs the same torch as the amd64 CPU variant, on both architectures.
    assert p.backends["cuda13"].torch_by_platform == (("linux/amd64", "2.13.0"), ("linux/arm64", "2.13.0"))
    assert p.cuda_lines() == ["13.0", "12.4"]
    assert p.backends["cpu"].cuda is None and not p.backends["cpu"].is_cuda
    assert p.cuda_libs.tag("12.4") == "cu124-v1"


# --- ${VAR} expansion in sources ---------------------------------------------

def test_sources_expand_default_when_var_unset_and_drop_empty_entries(monkeypatch):
    for var in ("IDX", "EXTRA", "FL"):
        monkeypatch.delenv(var, raising=False)
    s = spec.Sources("${IDX:-https://pypi.example/simple}", ("${EXTRA:-}", "https://x.example"),
                     ("${FL:-/opt/wheels /srv/wheels}",)).expanded()
    assert s == spec.Sources("https://pypi.example/simple", ("https://x.example",), ("/opt/wheels", "/srv/wheels"))


def test_sources_expand_set_vars_and_unset_index_becomes_none(monkeypatch):
    monkeypatch.delenv("IDX", raising=False)
    monkeypatch.setenv("EXTRA", "https://download.pytorch.org/whl/cpu")
    monkeypatch.setenv("FL", "/wheels")
    s = spec.Sources("${IDX}", ("${EXTRA:-}",), ("${FL:-/opt/wheels}",)).expanded()
    assert s == spec.Sources(None, ("https://download.pytorch.org/whl/cpu",), ("/wheels",))


def test_example_cpu_backend_sources_expand_to_the_local_wheelhouse(monkeypatch):
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("TORCH_CPU_INDEX_URL", raising=False)
    s = spec.load(REPO / "project.yaml").backends["cpu"].sources
    assert s.find_links == ("${PIP_FIND_LINKS:-/opt/wheels}",)  # stored as written
    assert s.expanded() == spec.Sources(None, (), ("/opt/wheels",))


# --- the CLI -------------------------------------------------------------------

def test_cli_reports_a_bad_project_without_a_traceback(tmp_path):
    bad = write_project(tmp_path, set_("services.tts.port", "8000"))
    r = subprocess.run([sys.executable, "-m", "invoke", "lock", "--check", "--project", str(bad)],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert re.search(rf"{re.escape(str(bad))}: services\.tts\.port: expected integer", out), out
    assert "Traceback" not in out
