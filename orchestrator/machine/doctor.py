"""`invoke doctor`: is this machine ready to build, push and run, and if not, what to do.

Each check returns a Finding; a failed *required* finding makes the task
exit 1. Informational findings (an NVIDIA driver, say) never do. Checks are
independent: one that raises becomes a failed finding, the others still run.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from orchestrator.common.errors import OrchestratorError
from orchestrator.common.hostinfo import CA_ENV, host_arch, is_loopback
from orchestrator.host import gpu_request, probe
from orchestrator.machine import daemon, kept, preflight
from orchestrator.oci.registry import Registry, registry_host
from orchestrator.project.spec import Project

# Free disk a build needs in the Docker data root, per backend and platform:
# image layers, BuildKit's pip cache and the exported image together. The
# CUDA image carries ~3 GB of nvidia wheels plus torch, unpacked and cached
# (BuildKit keeps each layer stage twice: installed, and copied for export).
# Measured: the example's fresh first run (3 CUDA backend x platforms, 2 cpu)
# peaked at about 56 GB (BENCHMARKS.md, "First run on a fresh Debian 12 root").
DISK_NEED_GB = {"cuda": 17, "cuda-libs-only": 1, "cpu": 3}
GB = 1000**3
PROBE_REPOSITORY = "doctor-probe"


@dataclass(frozen=True)
class Finding:
    name: str
    ok: bool
    required: bool
    detail: str
    fix: str = ""

    @property
    def status(self) -> str:
        if self.ok:
            return "ok"
        return "FAIL" if self.required else "no (optional)"


def failed_required(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.required and not f.ok]


def all_ok(findings: Iterable[Finding]) -> bool:
    return not failed_required(findings)


def exit_code(findings: Iterable[Finding]) -> int:
    return 0 if all_ok(findings) else 1


def report(findings: list[Finding]) -> dict:
    """The JSON report: every finding and whether all required ones pass."""
    return {"ok": all_ok(findings), "findings": [asdict(f) for f in findings]}


def rows(findings: list[Finding]) -> list[list[str]]:
    """Table rows: check, status, detail."""
    return [[f.name, f.status, f.detail] for f in findings]


def fixes(findings: list[Finding]) -> list[tuple[str, str]]:
    """(check, fix) for every finding that is not ok, required ones first."""
    bad = [f for f in findings if not f.ok and f.fix]
    return [(f.name, f.fix) for f in sorted(bad, key=lambda f: not f.required)]


# --- the checks -----------------------------------------------------------

def _guard(name: str, required: bool, fn: Callable[[], list[Finding]]) -> list[Finding]:
    try:
        return fn()
    except OrchestratorError as e:
        return [Finding(name, False, required, e.message, e.hint or "")]
    except Exception as e:  # noqa: BLE001 - a broken check must not hide the others
        return [Finding(name, False, required, f"check crashed: {type(e).__name__}: {e}",
                        "report this; the other findings are still valid")]


def _docker_info() -> dict | None:
    try:
        return daemon.docker_client(timeout=10).info()
    except OrchestratorError:
        return None


def check_engine() -> list[Finding]:
    import docker

    where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env(timeout=10)
        v = client.version()
    except Exception as e:  # noqa: BLE001 - docker-py raises several kinds
        return [Finding("docker engine", False, True, f"no Docker Engine answers at {where} ({type(e).__name__})",
                        "run `invoke engine.up` as root (starts dockerd), or set DOCKER_HOST to a running engine")]
    return [Finding("docker engine", True, True,
                    f"Docker {v.get('Version')}, API {v.get('ApiVersion')} (min {v.get('MinAPIVersion', '?')}) at {where}")]


def check_buildkit() -> list[Finding]:
    client = daemon.build_client()  # EnvironmentProblem -> failed finding with its hint
    return [Finding("buildkit", True, True, client.description)]


UNREACHABLE = ("connection refused", "no such host", "i/o timeout", "no route to host", "network is unreachable")


def check_builders(project: Project, connect: Callable | None = None) -> list[Finding]:
    """Each engine `builders:` names answers, what it runs natively, and that it reaches the registry.

    A builder pulls the build base from the project registry itself, so it is
    asked to resolve a manifest there (the engine's own distribution lookup):
    a 404 or 401 means it got through; a refused connection or an unknown
    host means it did not. connect(builder) -> docker-py client (tests fake it).
    """
    connect = connect or (lambda b: daemon.docker_client(timeout=10, builder=b))
    findings = []
    for platform, builder in project.builders.items():
        name = f"builder {platform}"
        try:
            client = connect(builder)
            native = daemon.engine_platform(client, builder.host)
            version = client.version().get("Version", "?")
        except OrchestratorError as e:
            findings.append(Finding(name, False, True, e.message, e.hint or ""))
            continue
        how = "native" if native == platform else f"its pip stages run on {native}: no emulation either way"
        findings.append(Finding(name, True, True, f"{builder}: Docker {version}, a {native} engine ({how})"))
        probe = f"{registry_host(project.registry)}/{project.name}/{PROBE_REPOSITORY}:absent"
        try:
            client.api.inspect_distribution(probe)
            problem = None
        except Exception as e:  # noqa: BLE001 - docker-py's APIError carries the engine's own words
            text = str(getattr(e, "explanation", None) or e)
            problem = text if any(u in text.lower() for u in UNREACHABLE) else None
        if problem:
            loop = (f" ({project.registry} is this machine's loopback; that engine looks on its own)"
                    if is_loopback(project.registry) and not daemon.is_local(builder) else "")
            findings.append(Finding(f"{name} reaches {project.registry}", False, True,
                                    f"{builder.host} cannot reach the registry{loop}: {problem[:200]}",
                                    "every builder pulls the build base from the registry: use a registry address "
                                    "every builder reaches (registry: in the project file, or ORCH_REGISTRY)"))
        else:
            findings.append(Finding(f"{name} reaches {project.registry}", True, True,
                                    "the engine resolves manifests there"))
    return findings


def tls_problem(host: str, timeout: float = 10) -> str | None:
    """Why HTTPS to host is not trusted, or None (also None when it is unreachable: check() says that)."""
    import requests

    try:
        requests.get(f"https://{registry_host(host)}/v2/", timeout=timeout)
    except requests.exceptions.SSLError as e:
        return str(e.__cause__ or e)[:300]
    except requests.RequestException:
        return None
    return None


def check_registry(host: str, probe_repository: str = PROBE_REPOSITORY,
                   tls: Callable[[str], str | None] = tls_problem, login=None) -> list[Finding]:
    """Reachable, TLS trusted, and writable with the configured credentials (a real upload).

    login: the environment's login (project.login), which applies to its own host only."""
    name = f"registry {host}"
    loopback = is_loopback(host)
    if not loopback:
        problem = tls(host)
        if problem:
            return [Finding(f"{name} tls", False, True, f"its TLS certificate is not trusted: {problem}",
                            "add the registry's CA to the bundle in SSL_CERT_FILE (tasks and builds) and to "
                            f"/etc/docker/certs.d/{registry_host(host)}/ca.crt (the engine)")]
    reg = Registry(host, retries=0, timeout=10, login=login)
    try:
        reg.check()
    except OrchestratorError as e:
        fix = "start the embedded registry: `invoke engine.up`" if loopback else (e.hint or "")
        return [Finding(f"{name} reachable", False, True, e.message, fix)]
    return [Finding(f"{name} reachable", True, True, "answers the registry API (GET /v2/)"),
            Finding(f"{name} tls", True, True,
                    "plain HTTP on loopback (Docker treats 127.0.0.0/8 as an insecure registry)" if loopback
                    else "HTTPS with a trusted certificate"),
            _write_probe(reg, host, probe_repository)]


def _write_probe(reg, host: str, repository: str) -> Finding:
    """Upload a tiny, unique blob: the only proof that the credentials may push."""
    name = f"registry {host} writable"
    data = f"orchestrator doctor write probe {uuid.uuid4()} {time.time()}\n".encode()
    try:
        reg.upload_blob(repository, data)
    except OrchestratorError as e:
        login = getattr(reg, "login", None)
        creds = ("no REGISTRY_USERNAME/REGISTRY_PASSWORD set" if login is None else
                 "REGISTRY_USERNAME/REGISTRY_PASSWORD" if login.applies_to(host) else
                 f"REGISTRY_USERNAME/REGISTRY_PASSWORD are for {login.host} only")
        return Finding(name, False, True, f"upload to {repository} failed: {e.message} ({creds})",
                       e.hint or "check that these credentials may push to this registry")
    return Finding(name, True, True, f"uploaded a {len(data)}-byte blob to {repository}")


def check_registries(project: Project) -> list[Finding]:
    # The project namespaces its repositories under its name; probe there.
    findings = []
    for host in dict.fromkeys([project.registry]):
        findings += _guard(f"registry {host}", True,
                           lambda h=host: check_registry(h, f"{project.name}/{PROBE_REPOSITORY}",
                                                         login=project.login))
    return findings


def check_binfmt(project: Project, arch: str | None = None,
                 binfmt_dir: Path = Path("/proc/sys/fs/binfmt_misc")) -> list[Finding]:
    findings = []
    arch = arch or host_arch()
    for foreign in preflight.foreign_arches(project, arch):
        q = preflight.QEMU_ARCH.get(foreign, foreign)
        entry = binfmt_dir / f"qemu-{q}"
        name = f"binfmt linux/{foreign}"
        fix = (f"run `invoke engine.up` as root, or: apt-get install qemu-user-static binfmt-support && "
               f"update-binfmts --enable qemu-{q}")
        try:
            text = entry.read_text()
        except OSError:
            findings.append(Finding(name, False, True, f"{entry} is not registered (linux/{foreign} is configured)",
                                    fix))
            continue
        lines = text.splitlines()
        flags = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("flags:")), "")
        interpreter = next((line.split(" ", 1)[1] for line in lines if line.startswith("interpreter ")), "?")
        if not lines or lines[0].strip() != "enabled":
            findings.append(Finding(name, False, True, f"{entry} is registered but disabled", fix))
        elif "F" not in flags:
            findings.append(Finding(name, False, True,
                                    f"{interpreter} registered without the F flag: containers cannot find it",
                                    "use Debian's qemu-user-static (registers with F): update-binfmts --enable "
                                    f"qemu-{q}"))
        else:
            findings.append(Finding(name, True, True, f"{interpreter} (flags {flags})"))
    return findings


def disk_need_per_variant(project: Project) -> dict[str, int]:
    """Gigabytes one platform of each backend needs."""
    out = {}
    for name, backend in project.backends.items():
        has_torch = any(t is not None for _, t in backend.torch_by_platform)
        out[name] = DISK_NEED_GB[("cuda" if has_torch else "cuda-libs-only") if backend.is_cuda else "cpu"]
    return out


def disk_need_gb(project: Project) -> tuple[int, str]:
    """Gigabytes a full build needs, and how that number is made up."""
    parts = []
    total = 0
    for name, backend in project.backends.items():
        # Names are free-form: size by what the backend carries (a torch-less CUDA line is only its wheels).
        per = disk_need_per_variant(project)[name]
        n = len(backend.platforms)
        total += per * n
        parts.append(f"{name} {per} GB x {n} platform{'s' if n != 1 else ''}")
    return total, " + ".join(parts)


def docker_root(info: dict | None) -> str:
    for c in ((info or {}).get("DockerRootDir"), "/var/lib/docker", "/"):
        if c and Path(c).is_dir():
            return c
    return "/"


def check_disk(project: Project, info: dict | None = None,
               usage: Callable[[str], tuple] = shutil.disk_usage) -> list[Finding]:
    root = docker_root(info)
    need, how = disk_need_gb(project)
    largest = max(disk_need_per_variant(project).values(), default=0)
    free = usage(root)[2]
    detail = f"{free / GB:.1f} GB free in {root}; a full build from empty caches needs ~{need} GB ({how})"
    fix = (f"free {need - free / GB:.1f} GB more in {root} (`docker system prune`, `invoke engine.gc`) "
           "or move the Docker data root (data-root in /etc/docker/daemon.json)")
    # Required only below what one variant needs: caches and a registry that already hold
    # layers make the full figure an upper bound, so between the two it is a warning.
    return [Finding("disk", free >= need * GB, free < largest * GB, detail
                    + ("" if free >= need * GB or free < largest * GB else "; enough for one backend at a time"), fix)]


def check_smoke_images(info: dict | None) -> list[Finding]:
    """What smoke keeps loaded in this engine, against its disk budget (informational)."""
    used, count, words = kept.summary((info or {}).get("ID") or "engine")
    return [Finding("smoke images", True, False,
                    f"{used / GB:.1f} GB of unpacked layers in {count} image(s) kept in the engine by smoke; budget "
                    f"{words}; beyond it the least recently used are untagged")]


def check_ca_bundle() -> list[Finding]:
    path = daemon.ca_bundle()  # EnvironmentProblem -> failed finding with its hint
    source = next((k for k in CA_ENV if os.environ.get(k) == path), "system")
    return [Finding("ca bundle", True, True, f"{path} ({source}; passed to pip builds as a BuildKit secret)")]


def check_nvidia(info: dict | None) -> list[Finding]:
    host = probe.probe()
    if host.driver_version:
        gpus = ", ".join(f"{g.label} {g.sm or 'cc unknown'}" for g in host.gpus) or f"{len(host.devices)} device(s)"
        detail = f"driver {host.driver_version} ({host.driver_source}), libcuda {host.libcuda or 'not found'}, {gpus}"
        gpu = Finding("nvidia driver", True, False, detail)
    else:
        gpu = Finding("nvidia driver", False, False, "no NVIDIA driver: cuda images run as CPU fallback here",
                      "informational: install the NVIDIA driver on GPU hosts")

    runtimes = sorted((info or {}).get("Runtimes", {}))
    # What `invoke run` and smoke would ask the engine for: the nvidia runtime, or CDI where configured.
    request = gpu_request.decide(gpu_request.host_facts(info))
    if request.requested:
        rt = Finding("nvidia container runtime", True, False, request.description)
    elif "nvidia" in runtimes:
        rt = Finding("nvidia container runtime", True, False, f"docker runtimes: {', '.join(runtimes)}")
    else:
        rt = Finding("nvidia container runtime", False, False,
                     f"docker runtimes: {', '.join(runtimes) or 'unknown (no engine)'}; no nvidia",
                     "informational: install the NVIDIA Container Toolkit on GPU hosts "
                     "(nvidia-ctk runtime configure --runtime=docker)")
    return [gpu, rt]


def check_tools(project: Project) -> list[Finding]:
    missing = preflight.check(project)
    if not missing:
        return [Finding("bootstrap tools", True, True,
                        ", ".join(t.command for t in preflight.required_tools(
                            project, host_arch(), os.environ.get("DOCKER_HOST"))))]
    pkgs = preflight.packages(missing)
    return [Finding("bootstrap tools", False, True, f"missing: {preflight.describe(missing)}",
                    f"`invoke engine.up` as root installs them, or: {preflight.apt_command(pkgs)}")]


def run(project: Project | None, project_error: OrchestratorError | None = None) -> list[Finding]:
    """Every check, in the order a fresh machine would fix them."""
    findings: list[Finding] = []
    if project is None:
        err = project_error
        findings.append(Finding("project", False, True, err.message if err else "no project file",
                                (err.hint if err else "") or "fix the project file (see README)"))
    findings += _guard("docker engine", True, check_engine)
    info = _docker_info()
    findings += _guard("buildkit", True, check_buildkit)
    if project is not None:
        findings += check_registries(project)
        findings += _guard("builders", True, lambda: check_builders(project))
        findings += _guard("binfmt", True, lambda: check_binfmt(project))
        findings += _guard("disk", True, lambda: check_disk(project, info))
        findings += _guard("smoke images", False, lambda: check_smoke_images(info))
    findings += _guard("ca bundle", True, check_ca_bundle)
    findings += _guard("nvidia", False, lambda: check_nvidia(info))
    if project is not None:
        findings += _guard("bootstrap tools", True, lambda: check_tools(project))
    return findings
