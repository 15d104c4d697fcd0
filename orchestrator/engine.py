"""Effects at the edge: the Docker Engine, the build client, the embedded
registry and the base image.

`engine.up` makes a bare Debian machine ready and touches nothing on a
machine that already has a working engine and registry. Every step is
idempotent, so it is safe to run before every job.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import EnvironmentProblem
from .files import atomic_write, exclusive
from .registry import Registry, split_ref
from .spec import Project

CA_BUNDLE_CANDIDATES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")


def state_dir() -> Path:
    path = Path(os.environ.get("ORCH_STATE_DIR") or Path.home() / ".local/state/orchestrator")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _say(msg: str) -> None:
    print(f"[engine] {msg}", flush=True)


def _is_root() -> bool:
    return os.geteuid() == 0


def _apt_install(*packages: str) -> None:
    if not _is_root():
        raise EnvironmentProblem(f"{', '.join(packages)} missing and not running as root",
                                 f"install them: sudo apt-get install -y {' '.join(packages)}")
    _say(f"installing {' '.join(packages)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            raise EnvironmentProblem(f"apt-get install {' '.join(packages)} failed")


def ca_bundle() -> str:
    for c in (os.environ.get("SSL_CERT_FILE"), *CA_BUNDLE_CANDIDATES):
        if c and Path(c).is_file():
            return c
    raise EnvironmentProblem("no CA bundle found", "set SSL_CERT_FILE to your CA bundle (builds need it as a secret)")


# --- the engine ---------------------------------------------------------

def docker_client(timeout: int = 600):
    import docker  # local import: unit tests of pure stages need no docker-py

    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
        return client
    except Exception as e:  # noqa: BLE001 - docker-py raises several kinds
        raise EnvironmentProblem(f"no Docker Engine answers ({type(e).__name__})",
                                 "start one with `invoke engine.up` (as root) or set DOCKER_HOST") from None


def engine_running() -> bool:
    try:
        docker_client(timeout=5)
        return True
    except EnvironmentProblem:
        return False


def ensure_engine() -> str:
    if engine_running():
        return "running (left as it is)"
    if os.environ.get("DOCKER_HOST"):
        raise EnvironmentProblem(f"DOCKER_HOST={os.environ['DOCKER_HOST']} does not answer",
                                 "start that engine, or unset DOCKER_HOST to use the embedded one")
    if not shutil.which("dockerd"):
        _apt_install("docker.io")
    if not _is_root():
        raise EnvironmentProblem("dockerd is installed but not running", "start it (sudo dockerd &) or run as root")
    log = state_dir() / "dockerd.log"
    _say(f"starting dockerd (log: {log})")
    with open(log, "ab") as fh:
        subprocess.Popen(["dockerd"], stdout=fh, stderr=fh, start_new_session=True)
    for _ in range(120):
        if engine_running():
            return "started dockerd"
        time.sleep(0.5)
    raise EnvironmentProblem(f"dockerd did not come up within 60 s; see {log}")


@dataclass(frozen=True)
class BuildClient:
    argv: tuple[str, ...]  # e.g. ("docker", "buildx", "build", "--load") or ("/usr/bin/docker", "build")
    env: tuple[tuple[str, str], ...]
    description: str


def _client_major(docker_bin: str) -> int | None:
    try:
        out = subprocess.run([docker_bin, "version", "--format", "{{.Client.Version}}"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return int(out.split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def build_client() -> BuildClient:
    """A client that runs BuildKit builds.

    A docker CLI >= 23 without the buildx plugin refuses BuildKit builds;
    Debian's docker.io CLI (20.10) has BuildKit built in.
    """
    candidates = []
    for c in (shutil.which("docker"), "/usr/bin/docker", "/usr/local/bin/docker"):
        if c and Path(c).exists() and c not in candidates:
            candidates.append(c)
    for c in candidates:
        if subprocess.run([c, "buildx", "version"], capture_output=True).returncode == 0:
            return BuildClient((c, "buildx", "build", "--load"), (), f"{c} buildx")
    for c in candidates:
        major = _client_major(c)
        if major is not None and major < 23:
            return BuildClient((c, "build"), (("DOCKER_BUILDKIT", "1"),), f"{c} (built-in BuildKit, client {major}.x)")
    raise EnvironmentProblem("no docker client that can run BuildKit builds",
                             "install the buildx plugin, or Debian's docker.io (its 20.10 CLI has BuildKit built in)")


# --- the registry -------------------------------------------------------

REGISTRY_CONFIG = """version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: {addr}
"""


def ensure_registry(host: str) -> str:
    reg = Registry(host, retries=0, timeout=5)
    if reg.ping():
        return "answering (left as it is)"
    if not (host.startswith("127.0.0.1:") or host.startswith("localhost:")):
        raise EnvironmentProblem(f"registry {host} is unreachable",
                                 "check the address and your network, or use the embedded default 127.0.0.1:5000")
    if not shutil.which("docker-registry"):
        _apt_install("docker-registry")
    root = state_dir() / "registry"
    root.mkdir(parents=True, exist_ok=True)
    config = state_dir() / "registry.yml"
    config.write_text(REGISTRY_CONFIG.format(root=root / "data", addr=host.replace("localhost", "127.0.0.1")))
    log = state_dir() / "registry.log"
    _say(f"starting docker-registry on {host} (storage: {root / 'data'})")
    with open(log, "ab") as fh:
        subprocess.Popen(["docker-registry", "serve", str(config)], stdout=fh, stderr=fh, start_new_session=True)
    for _ in range(60):
        if reg.ping():
            return f"started docker-registry (storage {root / 'data'})"
        time.sleep(0.5)
    raise EnvironmentProblem(f"docker-registry did not answer on {host} within 30 s; see {log}")


# --- binfmt for running arm64 containers -------------------------------

def ensure_binfmt() -> str:
    if Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        return "qemu-aarch64 registered"
    if not Path("/usr/bin/qemu-aarch64-static").exists():
        _apt_install("qemu-user-static", "binfmt-support")
    if not Path("/proc/sys/fs/binfmt_misc/register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"], check=False)
    subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=False, capture_output=True)
    if Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        return "registered qemu-aarch64"
    raise EnvironmentProblem("could not register qemu-aarch64 with binfmt_misc",
                             "run as root: mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; "
                             "update-binfmts --enable qemu-aarch64")


# --- the base image -----------------------------------------------------

def _base_lock_file() -> Path:
    return state_dir() / "base-images.lock.json"


def _base_key(project: Project, platform: str) -> str:
    # Not keyed by project: projects with the same base share one image.
    b = project.base
    return json.dumps([project.registry, b.image, b.suite, sorted(b.include), platform])


def read_base_lock() -> dict:
    path = _base_lock_file()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as e:
        raise EnvironmentProblem(f"{path} is unreadable ({e})",
                                 "delete it and run `invoke engine.up` to pin the bases again") from None
    if not isinstance(data, dict):
        raise EnvironmentProblem(f"{path} is not a JSON object", "delete it and run `invoke engine.up`")
    return data


def _record_base(key: str, entry: dict) -> None:
    path = _base_lock_file()
    with exclusive(path):  # engine.up and test runs may pin bases at the same time
        data = read_base_lock()
        data[key] = entry
        atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def base_ref(project: Project, platform: str) -> str:
    """The digest-pinned base for a platform, as recorded by `engine.up`."""
    entry = read_base_lock().get(_base_key(project, platform))
    if not entry:
        raise EnvironmentProblem(f"no base image pinned for {platform}",
                                 "run `invoke engine.up` (it pulls or bootstraps the base and pins its digest)")
    return entry["ref"]


def _ref_available(ref: str) -> bool:
    host, name, reference = split_ref(ref)
    if host.startswith("127.") or host.startswith("localhost"):
        return Registry(host, retries=1).has_manifest(name, reference)
    try:
        docker_client().images.get(ref)
        return True
    except Exception:  # noqa: BLE001
        return False


def _try_pull(image: str, platform: str) -> str | None:
    client = docker_client()
    try:
        img = client.images.pull(image, platform=platform)
    except Exception:  # noqa: BLE001 - no route, no such image, no auth: all mean "bootstrap"
        return None
    host, name, _ = split_ref(image)
    repo = f"{host}/{name}"
    for rd in img.attrs.get("RepoDigests", []):
        if rd.split("@")[0] in (repo, repo.removeprefix("docker.io/library/"), repo.removeprefix("docker.io/")):
            return f"{repo}@{rd.split('@')[1]}"
    return None


def bootstrap_base(project: Project, platform: str) -> str:
    """Build a Debian base with mmdebstrap and push it to the project registry."""
    if not shutil.which("mmdebstrap"):
        _apt_install("mmdebstrap")
    arch = platform.split("/")[1]
    if arch != _host_arch():
        ensure_binfmt()
    include_hash = hashlib.sha256(",".join(sorted(project.base.include)).encode()).hexdigest()[:8]
    repo = f"{project.registry}/orchestrator/base-{project.base.suite}"
    ref = f"{repo}:{arch}-{include_hash}"
    with tempfile.TemporaryDirectory(prefix="orch-base-") as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        _say(f"bootstrapping {project.base.suite} for {platform} with mmdebstrap (30 s on amd64, minutes under QEMU)")
        cmd = ["mmdebstrap", "--variant=minbase", f"--arch={arch}",
               f"--include={','.join(project.base.include)}", project.base.suite, str(rootfs)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise EnvironmentProblem("mmdebstrap failed:\n" + proc.stderr[-2000:])
        (Path(tmp) / "Dockerfile").write_text('FROM scratch\nADD rootfs.tar /\nCMD ["python3"]\n')
        client = build_client()
        env = dict(os.environ, **dict(client.env))
        # FROM scratch + ADD with --platform gives a config with the right
        # architecture, which `docker import` does not.
        proc = subprocess.run([*client.argv, "--platform", platform, "-t", ref, tmp], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise EnvironmentProblem("building the base image failed:\n" + proc.stderr[-2000:])
    digest = push(ref)["digest"]
    return f"{repo}@{digest}"


def _host_arch() -> str:
    m = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(m, m)


def host_platform() -> str:
    return f"linux/{_host_arch()}"


def base_platforms(project: Project) -> list[str]:
    """The project's platforms plus this machine's: pip stages run on the build platform."""
    return list(dict.fromkeys([*project.platforms, host_platform()]))


def ensure_base(project: Project, platform: str) -> str:
    key = _base_key(project, platform)
    entry = read_base_lock().get(key)
    if entry and _ref_available(entry["ref"]):
        return f"{platform}: {entry['ref']} ({entry['source']}, pinned)"
    # The pinned digest first: re-pulling the tag could silently move the pin.
    pulled = (_try_pull(entry["ref"], platform) if entry and entry["source"] == "pulled" else None) \
        or _try_pull(project.base.image, platform)
    if pulled:
        ref, source = pulled, "pulled"
    else:
        _say(f"{project.base.image} cannot be pulled; bootstrapping a base instead")
        ref, source = bootstrap_base(project, platform), "mmdebstrap"
    _record_base(key, {"ref": ref, "source": source, "configured": project.base.image, "platform": platform,
                       "pinned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return f"{platform}: {ref} ({source}, newly pinned)"


# --- pushing ------------------------------------------------------------

def push(ref: str, on_event=None) -> dict:
    """docker push, returning the manifest digest and the bytes actually uploaded."""
    client = docker_client()
    repo, tag = ref.rsplit(":", 1)
    layers: dict[str, dict] = {}
    digest = None
    for ev in client.api.push(repo, tag=tag, stream=True, decode=True):
        if "error" in ev:
            raise EnvironmentProblem(f"push of {ref} failed: {ev['error']}")
        lid, status = ev.get("id"), ev.get("status", "")
        if lid and len(lid) == 12:
            info = layers.setdefault(lid, {"total": 0, "state": "?"})
            total = (ev.get("progressDetail") or {}).get("total")
            if total:
                info["total"] = max(info["total"], total)
            if status in ("Pushed", "Layer already exists") or status.startswith("Mounted from"):
                info["state"] = status
        if "aux" in ev and "Digest" in ev["aux"]:
            digest = ev["aux"]["Digest"]
        if on_event:
            on_event(ev)
    if not digest:
        raise EnvironmentProblem(f"push of {ref} reported no digest")
    # Push events name layers by the first 12 hex digits of their diffID and
    # count uncompressed bytes; the registry manifest has the real sizes.
    diff_ids = client.images.get(ref).attrs["RootFS"]["Layers"]
    host, name, _ = split_ref(ref)
    manifest = Registry(host).get_manifest(name, digest)
    sizes = {d.split(":")[1][:12]: layer["size"] for d, layer in zip(diff_ids, manifest.json["layers"])}
    pushed = [lid for lid, i in layers.items() if i["state"] == "Pushed"]
    uploaded = sum(sizes.get(lid, 0) for lid in pushed) + manifest.json["config"]["size"] + len(manifest.body)
    return {"digest": digest, "uploaded_bytes": uploaded,
            "pushed_layers": len(pushed), "reused_layers": len(layers) - len(pushed)}


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def gc(host: str) -> str:
    """Free blobs no manifest references (tests and re-builds leave them) in the embedded registry."""
    config = state_dir() / "registry.yml"
    data = state_dir() / "registry" / "data"
    if not config.exists() or not data.exists():
        return "the registry is not the embedded one; nothing to do (use your registry's own GC)"
    before = _tree_bytes(data)
    down()  # garbage-collect needs the registry stopped
    proc = subprocess.run(["docker-registry", "garbage-collect", str(config)], capture_output=True, text=True)
    ensure_registry(host)
    if proc.returncode != 0:
        raise EnvironmentProblem("docker-registry garbage-collect failed:\n" + proc.stderr[-1000:])
    return f"freed {(before - _tree_bytes(data)) / 1e6:,.0f} MB in {data}"


def status(project: Project) -> list[tuple[str, str]]:
    rows = []
    if engine_running():
        info = docker_client().info()
        rows.append(("engine", f"Docker {info.get('ServerVersion')} ({os.environ.get('DOCKER_HOST', 'unix:///var/run/docker.sock')})"))
        runtimes = ", ".join(sorted(info.get("Runtimes", {})))
        rows.append(("runtimes", runtimes + ("" if "nvidia" in runtimes else " (no NVIDIA runtime: GPU checks run as CPU fallback)")))
    else:
        rows.append(("engine", "not running (invoke engine.up)"))
    try:
        rows.append(("build client", build_client().description))
    except EnvironmentProblem as e:
        rows.append(("build client", str(e)))
    reg = Registry(project.registry, retries=0, timeout=5)
    rows.append(("registry", f"{project.registry} " + ("answering" if reg.ping() else "not answering (invoke engine.up)")))
    for platform in project.platforms:
        entry = read_base_lock().get(_base_key(project, platform))
        rows.append((f"base {platform}", f"{entry['ref']} ({entry['source']})" if entry else "not pinned (invoke engine.up)"))
    rows.append(("arm64 emulation", "qemu-aarch64 registered" if Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists()
                 else "not registered"))
    rows.append(("state", str(state_dir())))
    return rows


def down() -> list[str]:
    """Stop what engine.up started (the registry; dockerd only if we started it)."""
    done = []
    for name in ("docker-registry",):
        if subprocess.run(["pkill", "-f", f"{name} serve {state_dir()}"], capture_output=True).returncode == 0:
            done.append(f"stopped {name}")
    return done or ["nothing of ours was running"]
