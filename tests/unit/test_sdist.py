"""Source-only Python packages: the policy, uv's refusal read as ours, and the lock record of a built wheel.
(Resolving and building against PyPI and the engine: tests/integration/test_sdist.py.)"""

from __future__ import annotations

import shutil

import pytest

from orchestrator.project import lock
from orchestrator.project import sdists as sdist
from orchestrator.project import spec
from orchestrator.common.errors import UserError

from ..conftest import FIXTURES

UV_NO_WHEEL = """\
  x No solution found when resolving dependencies:
  `-> Because docopt==0.6.2 has no usable wheels and you require docopt==0.6.2, we can conclude that your
      requirements are unsatisfiable.

      hint: Wheels are required for `docopt` because building from source is disabled for all packages (i.e.,
      with `--no-build`)
"""
SDIST = "49b3a825280bd66b3aa83585ef59c4a8c82f2c8a522dbe754a8bc8d08c85c491"
WHEEL = "0b183314463ce90593bdd0c7e14fdb7ed741e90ce3996341266cfedfeaedc34b"


def test_uvs_no_wheel_error_names_the_package_and_version():
    assert sdist.missing_wheel(UV_NO_WHEEL) == ("docopt", "0.6.2")
    assert sdist.missing_wheel(UV_NO_WHEEL.replace("docopt==0.6.2 has no usable wheels",
                                                   "all versions of docopt have no usable wheels")) == ("docopt", None)
    assert sdist.missing_wheel("error: Because six==9 does not exist ...") is None


@pytest.mark.parametrize("allow, name, layer, ok", [
    (False, "docopt", "service-echo", False),
    ((), "docopt", "shared", False),
    (("docopt",), "docopt", "service-echo", True),
    (("docopt",), "six", "service-echo", False),
    (True, "anything", "shared", True),
    (True, "triton", "torch", False),  # the torch and CUDA layers stay wheel-only, whatever the project says
    (("nvidia-cuda-runtime-cu12",), "nvidia-cuda-runtime-cu12", "cuda-libs", False),
])
def test_which_packages_may_come_from_an_sdist(allow, name, layer, ok):
    assert sdist.allows(allow, name, layer) is ok


def test_the_refusal_names_the_package_the_layer_and_the_fix():
    err = sdist.refusal("docopt", "0.6.2", "service-echo", "linux/arm64", "project.yaml")
    assert isinstance(err, UserError) and err.exit_code == 2
    assert err.message.startswith("docopt 0.6.2 is published only as a source distribution for linux/arm64")
    assert "(layer service-echo)" in err.message and "`allow_sdist: [docopt]` to project.yaml" in err.hint
    torch = sdist.refusal("foo", None, "torch", "linux/amd64", "project.yaml")
    assert "the torch layer installs wheels only" in torch.message and "allow_sdist does not apply" in torch.hint


def test_a_built_wheel_replaces_the_sdist_hash_in_the_lock_and_names_the_sdist():
    block = f"docopt==0.6.2 \\\n    --hash=sha256:{SDIST}\n    # via -r requirements/echo.in\n"
    built = sdist.Built(SDIST, "docopt-0.6.2-py2.py3-none-any.whl", WHEEL)
    text = sdist.record(block, built)
    assert text == (f"docopt==0.6.2 \\\n    --hash=sha256:{WHEEL}\n"
                    f"    # sdist {SDIST} built by `invoke lock` into docopt-0.6.2-py2.py3-none-any.whl\n"
                    "    # via -r requirements/echo.in\n")
    (pin,) = lock.parse_pins(text)
    assert (pin.name, pin.version) == ("docopt", "0.6.2") and sdist.recorded(pin.block) == built
    assert sdist.recorded(block) is None  # a published file: nothing was built


def test_the_default_policy_leaves_every_lock_hash_as_it_was(tmp_path):
    # Projects that never mention allow_sdist keep their committed locks: `lock --check` stays clean.
    shutil.copytree(FIXTURES / "mini", tmp_path / "mini")
    assert lock.check(spec.load(tmp_path / "mini" / "project.yaml")) == []
    pf = tmp_path / "mini" / "project.yaml"
    pf.write_text(pf.read_text().replace("system_packages: [jq]\n", "system_packages: [jq]\nallow_sdist: [docopt]\n"))
    stale = {str(s.path) for s in lock.check(spec.load(pf))}
    # Every layer that may hold an sdist now, and none of the wheel-only CUDA-libs locks.
    assert stale and not any("cuda-libs" in s for s in stale)
    assert "locks/cpu-amd64/service-echo.txt" in stale and "locks/cuda13-arm64/shared.txt" in stale
