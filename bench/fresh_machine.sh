#!/usr/bin/env bash
# The README's first command on a really fresh Debian 12 root, in a container.
#
# This machine is not fresh (packages were installed by hand over time), so a
# missing install step in ci/setup.sh would hide here. This check:
#   1. bootstraps a fresh Debian 12 root with mmdebstrap (--variant=important:
#      Priority required + important, what debootstrap and a minimal Debian
#      install give; plus ca-certificates, which every Debian cloud image has;
#      no python3, no git, no docker) and `docker import`s it;
#   2. starts it with what dockerd inside needs (every capability this host
#      has, no seccomp, /proc unmasked, all devices, a private cgroup
#      namespace made writable; --privileged fails here, see "start") on the default bridge
#      network (its own loopback, so the inner dockerd, docker0 and the
#      registry on 127.0.0.1:5000 cannot clash with this host's), with a fresh
#      docker volume as /var/lib/docker (overlay2 does not nest on overlay);
#   3. gives it what a fresh machine *of this kind* has: the host CA bundle and
#      the intercepting proxy's CAs, the apt sources and apt.conf.d snippets,
#      pip's configuration (/etc/pip.conf, /etc/xdg/pip, ~/.config/pip) and
#      the wheelhouses it points at (/opt/wheels, /opt/pypi, /opt/pypi-more,
#      read-only), and the CA/pip environment variables this host's sessions
#      get (SSL_CERT_FILE, PIP_FIND_LINKS, ...); --bare-env leaves those out;
#   4. copies a clean `git clone` of this repository (HEAD: committed work
#      only) to /root/orchestrator and runs, each timed, exactly:
#        setup          bash ci/setup.sh
#        doctor.before  invoke doctor          (before engine.up: problems + fixes)
#        engine.up      invoke engine.up
#        doctor.after   invoke doctor          (after: all good)
#        main.mini      ORCH_PROJECT=tests/fixtures/mini/project.yaml bash ci/main.sh
#        test           bash ci/test.sh        (only with --tests)
#        main.example   bash ci/main.sh        (only with --full and enough disk)
#      With --first-run BACKENDS (e.g. cuda,cpu) it is instead the README's first
#      command as a newcomer meets it, nothing warmed up before: setup, doctor,
#      engine.up and main.example on the example project cut to those backends
#      (bench/cut_backends.py), no main.mini; the first run is setup + engine.up
#      + main.example.
#   5. prints a per-stage table, writes bench/out/fresh_machine.json, and
#      removes the container, its volume and the image it created.
#
# A watchdog stops the run (and cleans up) when this host's / falls below
# --min-free GB free (default 10).
#
# --variant minbase (Essential + apt: what a Debian container image has)
# instead of important is the harsher machine.
# --tests then runs the README's second command, `bash ci/test.sh` (the whole
# suite against the inner engine; it bootstraps the example project's bases
# first, arm64 under QEMU: long).
# --patch FILE applies a diff (git apply) to the clone first, to check a fix
# that is not committed yet; the JSON records it ("patched").
#
# Usage: bash bench/fresh_machine.sh [--full | --first-run BACKENDS] [--tests] [--bare-env] [--keep] [--min-free GB]
#                                    [--stage-timeout S] [--patch FILE] [--variant V] [--out FILE]
set -uo pipefail
{ # read the whole script before running it, so that editing it mid-run is safe
full=0; first_run=""; tests=0; bare=0; keep=0; patch=""; variant=important; min_free=10; stage_timeout=2400
root=$(cd "$(dirname "$0")/.." && pwd)
out_json=$root/bench/out/fresh_machine.json
while [ $# -gt 0 ]; do
  case "$1" in
    --full) full=1 ;;
    --first-run) first_run=$2; shift ;;
    --tests) tests=1 ;;
    --bare-env) bare=1 ;;
    --keep) keep=1 ;;
    --min-free) min_free=$2; shift ;;
    --stage-timeout) stage_timeout=$2; shift ;;
    --out) out_json=$2; shift ;;
    --patch) patch=$(realpath "$2"); shift ;;
    --variant) variant=$2; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || { echo "fresh_machine: run as root (mmdebstrap, docker --privileged)" >&2; exit 2; }
for t in docker mmdebstrap git python3; do
  command -v "$t" >/dev/null || { echo "fresh_machine: needs $t on this host" >&2; exit 2; }
done

id=$$-$(date +%s)
name=orch-fresh-$id
volume=orch-fresh-$id-docker
image=orch-fresh-debian12:$id
work=$(mktemp -d /tmp/orch-fresh.XXXXXX)
logs=$work/logs
mkdir -p "$logs"
rec=$work/stages.tsv   # name \t seconds \t rc \t log
: >"$rec"
aborted=""
full_result="not attempted (pass --full)"
commit=$(git -C "$root" rev-parse --short HEAD)

free_gb() { df -P --block-size=1G / | awk 'NR==2 {print $4}'; }
say() { echo "fresh_machine: $*" >&2; }

# report: the per-stage table and bench/out/fresh_machine.json (also after an early stop).
report() {
  [ -s "$rec" ] || return 1
  [ -e "$work/abort" ] && aborted=$(cat "$work/abort")
  local machine
  machine=$(tail -1 "$logs/provision.log" 2>/dev/null)
  python3 - "$rec" "$work" "$out_json" "$commit" "$bare" "$full_result" "$aborted" "$machine" "$patch" "$variant" "$first_run" <<'PY'
import json, os, re, sys, time
rec, work, out, commit, bare, full_result, aborted, machine, patch, variant, first_run = sys.argv[1:]
# the lines of a main job's log that say where its time went: bases, each image's layers, uploads, smoke
# loads (the "image" check line), and publish's closing lines: one per phase and the floor
KEY = re.compile(r"^(main:|\[base\]|base: |.*(gzip|zstd) in [0-9.]+ s|.*registry received|smoke |.*pull: pulled|"
                 r".*ok +image: engine image ID|.*/health: 200|uploaded [0-9,]+ bytes|where the time went|"
                 r" +(build|export|compress|hash|upload|smoke|promote|floor|total) +[0-9.]+ s)")
stages = []
for line in open(rec):
    name, secs, rc, log = line.rstrip("\n").split("\t")
    text = open(log, errors="replace").read() if os.path.exists(log) else ""
    stages.append({"stage": name, "seconds": float(secs),
                   "exit_code": int(rc) if rc.lstrip("-").isdigit() else rc,
                   "log_tail": text.splitlines()[-25:],
                   **({"key_lines": [x for x in text.splitlines() if KEY.match(x)]} if name.startswith("main.") else {})})
def doctor(which):
    path = os.path.join(work, f"doctor.{which}.json")
    try:
        data = json.load(open(path))
    except (OSError, ValueError):
        data = None
    log = os.path.join(work, "logs", f"doctor.{which}.log")
    text = open(log, errors="replace").read() if os.path.exists(log) else ""
    summary = None
    if isinstance(data, dict):
        f = data.get("findings", [])
        summary = {"ok": data.get("ok"), "checks": len(f),
                   "failed_required": [x["name"] for x in f if not x["ok"] and x.get("required")],
                   "failed_optional": [x["name"] for x in f if not x["ok"] and not x.get("required")]}
    return {"summary": summary, "output": text.splitlines(), "json": data}
# doctor before engine.up is expected to exit 1 (required checks fail, each with its fix)
ok = all(s["exit_code"] == (1 if s["stage"] == "doctor.before" else 0) for s in stages)
result = {
    "what": "bench/fresh_machine.sh: the README's first command on a fresh Debian 12 root in a container with its own dockerd and registry",
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "commit": commit,
    "patched": {"file": patch, "diff": open(patch).read().splitlines()} if patch else None,
    "rootfs": f"mmdebstrap --variant={variant} --include=ca-certificates bookworm (host apt sources), docker import",
    "machine": machine,
    "container": "--cap-add ALL --cap-drop SYS_RESOURCE, seccomp and /proc unconfined, all devices, private cgroupns (--privileged: runc cannot apply CAP_SYS_RESOURCE here)",
    "network": "default bridge (own loopback: inner dockerd and registry 127.0.0.1:5000 do not clash with the host's)",
    "machine_env": "none (--bare-env)" if bare == "1" else "host CA/pip environment variables passed",
    "copied_in": ["/etc/ssl/certs/ca-certificates.crt", "/usr/local/share/ca-certificates/*",
                  "/etc/apt/sources.list.d/*", "/etc/apt/apt.conf.d/99artifact-registry",
                  "/etc/apt/apt.conf.d/99farm-no-dep11", "/etc/pip.conf", "/etc/xdg/pip", "/root/.config/pip",
                  "/opt/wheels, /opt/pypi, /opt/pypi-more (read-only bind mounts)"],
    "stages": stages,
    "doctor_before_engine_up": doctor("before"),
    "doctor_after_engine_up": doctor("after"),
    "example_first_run": full_result,
    "first_run": None if not first_run else {
        "backends": first_run.split(","),
        "project": f"the example project cut to {first_run} (bench/cut_backends.py); no main.mini before it",
        "seconds": sum(s["seconds"] for s in stages if s["stage"] in ("setup", "engine.up", "main.example")),
        "stages": "setup + engine.up + main.example"},
    "aborted": aborted or None,
    "ok": ok and not aborted,
}
os.makedirs(os.path.dirname(out), exist_ok=True)
with open(out, "w") as fh:
    json.dump(result, fh, indent=1)
    fh.write("\n")
print(f"\nfresh machine (commit {commit}{', patched with ' + patch if patch else ''}): {machine}")
print(f"{'stage':<15} {'seconds':>8} {'exit':>6}")
for s in stages:
    print(f"{s['stage']:<15} {s['seconds']:>8.1f} {str(s['exit_code']):>6}")
for which in ("before", "after"):
    d = result[f"doctor_{which}_engine_up"]["summary"]
    if d:
        print(f"doctor {which} engine.up: {'all required checks pass' if d['ok'] else 'failed: ' + ', '.join(d['failed_required'])}"
              + (f" (optional: {', '.join(d['failed_optional'])})" if d["failed_optional"] else ""))
print(f"example first run: {full_result}")
if first_run:
    print(f"first run ({first_run}): {result['first_run']['seconds']:.1f} s (setup + engine.up + main.example)")
if aborted:
    print(f"ABORTED: {aborted}")
print(f"result: {'ok' if result['ok'] else 'FAILED'}; wrote {out}; logs in {os.path.join(work, 'logs')}")
sys.exit(0 if result["ok"] else 1)
PY
}

cleanup() {
  local status=$?
  report || status=1
  if [ -n "${watchdog:-}" ]; then kill "$watchdog" 2>/dev/null; wait "$watchdog" 2>/dev/null; fi
  if [ "$keep" = 1 ] && [ ! -e "$work/abort" ]; then
    say "kept: container $name, volume $volume, image $image (remove: docker rm -f $name; docker volume rm $volume; docker rmi $image)"
  else
    # retried: a container the watchdog is still removing keeps its volume and image in use
    for _ in 1 2 3 4 5 6; do
      docker rm -f "$name" >/dev/null 2>&1
      docker volume rm "$volume" >/dev/null 2>&1
      docker rmi "$image" >/dev/null 2>&1
      docker volume inspect "$volume" >/dev/null 2>&1 || docker image inspect "$image" >/dev/null 2>&1 || break
      sleep 5
    done
    docker volume inspect "$volume" >/dev/null 2>&1 && say "could not remove volume $volume"
    docker image inspect "$image" >/dev/null 2>&1 && say "could not remove image $image"
  fi
  rm -f "$work/rootfs.tar"
  rm -rf "$work/clone"
  exit $status
}
trap cleanup EXIT
trap 'aborted="interrupted"; exit 130' INT TERM

# run_stage NAME CMD...: time one stage, log its output, record seconds and exit code.
run_stage() {
  local stage=$1; shift
  local log=$logs/$stage.log t0 t1 rc
  if [ -e "$work/abort" ]; then
    printf '%s\t%s\t%s\t%s\n' "$stage" 0 skipped "$log" >>"$rec"; return 1
  fi
  say "stage $stage (log: $log; free on /: $(free_gb) GB)"
  t0=${EPOCHREALTIME/./}
  "$@" >"$log" 2>&1
  rc=$?
  t1=${EPOCHREALTIME/./}
  [ -e "$work/abort" ] && rc=aborted
  printf '%s\t%d.%d\t%s\t%s\n' "$stage" $(((t1 - t0) / 1000000)) $((((t1 - t0) / 100000) % 10)) "$rc" "$log" >>"$rec"
  say "stage $stage: exit $rc in $(tail -1 "$rec" | cut -f2) s"
  [ "$rc" = 0 ]
}

# in_box [TIMEOUT] CMD: a shell command in the container, as root, in the clone (the
# machine's environment comes from `docker run --env-file`).
in_box() {
  local limit=$stage_timeout
  [ $# -gt 1 ] && { limit=$1; shift; }
  timeout --kill-after=30 "$limit" docker exec -w /root/orchestrator "$name" bash -c "$1"
}

# --- 0. disk -----------------------------------------------------------------
free0=$(free_gb)
say "free on /: ${free0} GB (stop below ${min_free} GB)"
if [ "$free0" -lt $((min_free + 5)) ]; then
  say "not enough free disk to start (need at least $((min_free + 5)) GB)"; exit 1
fi
( while sleep 10; do
    if [ "$(free_gb)" -lt "$min_free" ]; then
      echo "free disk on / fell below ${min_free} GB" >"$work/abort"
      echo "fresh_machine: ABORT: free disk on / fell below ${min_free} GB; stopping the container" >&2
      docker rm -f "$name" >/dev/null 2>&1; exit 0
    fi
  done ) &
watchdog=$!

# --- 1. a fresh Debian 12 root -------------------------------------------------
# The host's own apt sources (deb822) and apt.conf.d snippets are handed to
# mmdebstrap, so it uses the same mirror this machine does.
aptopts=()
for f in /etc/apt/apt.conf.d/99artifact-registry /etc/apt/apt.conf.d/99farm-no-dep11; do
  [ -f "$f" ] && aptopts+=(--aptopt="$f")
done
sources=/etc/apt/sources.list.d/debian.sources
[ -f "$sources" ] || sources=http://deb.debian.org/debian
run_stage rootfs timeout 900 mmdebstrap --variant="$variant" --include=ca-certificates --mode=root \
    "${aptopts[@]}" bookworm "$work/rootfs.tar" "$sources" || { say "mmdebstrap failed"; exit 1; }
run_stage import docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["sleep", "infinity"]' "$work/rootfs.tar" "$image" || exit 1
rm -f "$work/rootfs.tar"

# --- 2. the machine ------------------------------------------------------------
envfile=$work/machine.env
: >"$envfile"
if [ "$bare" = 0 ]; then
  for v in SSL_CERT_FILE SSL_CERT_DIR REQUESTS_CA_BUNDLE CURL_CA_BUNDLE HTTPLIB2_CA_CERTS \
           PIP_CERT PIP_FIND_LINKS PIP_DEFAULT_TIMEOUT PIP_DISABLE_PIP_VERSION_CHECK \
           http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    [ -n "${!v:-}" ] && printf '%s=%s\n' "$v" "${!v}" >>"$envfile"
  done
fi
mounts=()
for d in /opt/wheels /opt/pypi /opt/pypi-more; do
  [ -d "$d" ] && mounts+=(-v "$d:$d:ro")
done
docker volume create "$volume" >/dev/null
# Not --privileged: this host's own bounding set lacks CAP_SYS_RESOURCE, and
# runc refuses to start a --privileged container here ("unable to apply caps:
# operation not permitted"; --cap-drop does not apply to --privileged). The
# same access without it: every capability this host has, no seccomp, /proc
# unmasked (binfmt_misc), every device allowed, a private cgroup namespace.
run_stage start docker run -d --name "$name" --hostname fresh-debian12 --init \
    --cap-add ALL --cap-drop SYS_RESOURCE --security-opt seccomp=unconfined \
    --security-opt systempaths=unconfined --device-cgroup-rule 'a *:* rwm' --cgroupns private \
    -v "$volume:/var/lib/docker" "${mounts[@]}" --env-file "$envfile" "$image" || exit 1
# What a booting machine's init does: /sys and the (private) cgroup v1
# hierarchies writable, so dockerd inside can create its containers' cgroups.
boot() {
  docker exec "$name" sh -ec 'mount -o remount,rw /sys
    for d in /sys/fs/cgroup/*; do mountpoint -q "$d" && mount -o remount,bind,rw "$d"; done
    mount | grep -E " /sys | /sys/fs/cgroup/"'
}
run_stage boot boot || exit 1

# Files a fresh machine of this kind has: CA bundle and the proxy's CAs, apt
# sources and snippets, pip configuration.
provision() (
  set -e
  docker exec "$name" mkdir -p /usr/local/share/ca-certificates /etc/apt/sources.list.d /etc/xdg /root/.config
  for f in /usr/local/share/ca-certificates/*; do [ -f "$f" ] && docker cp "$f" "$name:$f"; done
  docker cp /etc/ssl/certs/ca-certificates.crt "$name:/etc/ssl/certs/ca-certificates.crt"
  docker exec "$name" sh -c "rm -f /etc/apt/sources.list /etc/apt/sources.list.d/*"  # mmdebstrap's copy; the host's below
  for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/apt.conf.d/99artifact-registry \
           /etc/apt/apt.conf.d/99farm-no-dep11; do
    [ -f "$f" ] && docker cp "$f" "$name:$f"
  done
  [ -f /etc/pip.conf ] && docker cp /etc/pip.conf "$name:/etc/pip.conf"
  [ -d /etc/xdg/pip ] && docker cp /etc/xdg/pip "$name:/etc/xdg/pip"
  [ -d /root/.config/pip ] && docker cp /root/.config/pip "$name:/root/.config/pip"
  # what the fresh machine is, for the record
  docker exec "$name" bash -c 'echo "debian $(cat /etc/debian_version), $(dpkg -l | grep -c ^ii) packages;" \
    "python3: $(command -v python3 || echo none); git: $(command -v git || echo none); docker: $(command -v docker || echo none)"'
)
run_stage provision provision || exit 1
say "$(cat "$logs/provision.log" | tail -1)"

# --- 3. the repository -----------------------------------------------------------
clone() (
  set -e
  git clone -q "$root" "$work/clone"
  git -C "$work/clone" log -1 --format='commit %h %s'
  if [ -n "$patch" ]; then git -C "$work/clone" apply --stat "$patch"; git -C "$work/clone" apply "$patch"; fi
  if [ -n "$first_run" ]; then python3 "$root/bench/cut_backends.py" "$work/clone/project.yaml" "$first_run"; fi
  docker cp "$work/clone" "$name:/root/orchestrator"
)
run_stage clone clone || exit 1

# --- 4. the README's first command, in stages -------------------------------------
mini="export ORCH_PROJECT=tests/fixtures/mini/project.yaml;"
[ -n "$first_run" ] && mini=""  # the newcomer's first run: the example project from the start
run_stage setup in_box "bash ci/setup.sh"
# doctor exits 1 when a required check fails: expected before engine.up.
run_stage doctor.before in_box 600 "$mini .venv/bin/invoke doctor"
in_box 600 "$mini .venv/bin/invoke doctor --json" >"$work/doctor.before.json" 2>/dev/null
run_stage engine.up in_box "$mini .venv/bin/invoke engine.up"
run_stage doctor.after in_box 600 "$mini .venv/bin/invoke doctor"
in_box 600 "$mini .venv/bin/invoke doctor --json" >"$work/doctor.after.json" 2>/dev/null
[ -n "$first_run" ] || run_stage main.mini in_box "$mini bash ci/main.sh"

if [ "$tests" = 1 ]; then
  run_stage test in_box 5400 "bash ci/test.sh"
fi
if [ -n "$first_run" ]; then
  run_stage main.example in_box 5400 "bash ci/main.sh" && full_result="ran ($first_run)" || full_result="ran ($first_run), failed"
elif [ "$full" = 1 ]; then
  need=$((55 + min_free))
  if [ "$(free_gb)" -ge "$need" ]; then
    run_stage main.example in_box 5400 "bash ci/main.sh" && full_result="ran" || full_result="ran, failed"
  else
    full_result="not attempted: $(free_gb) GB free on /, the example needs ~55 GB plus ${min_free} GB kept free"
    say "$full_result"
  fi
fi
# cleanup (the EXIT trap) writes the report and removes the container, volume and image
exit
}
