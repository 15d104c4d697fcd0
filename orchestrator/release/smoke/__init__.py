"""Smoke tests: launch every built variant and check the runtime contract.

The manual checklist (torch.version.cuda, torch.cuda.is_available(), curl
/health on every service) as code, with testcontainers: start the image,
wait on /health, then check /ready, /info, torch inside the container, the
CUDA-libs layer, the arch list torch was built for, the non-root user, the
read-only root, labels and env defaults, and on a host without a GPU (or
one this CUDA line cannot drive) that a cuda image exits 78 under
BACKEND_POLICY=strict and serves on CPU under fallback, saying why in /info.

    variant.py  what is checked: a build's variants, and what this host should make of them
    checks.py   the checks, small functions over a running container or an image config
    runner.py   containers: one per variant, groups at once, a run stopped cleanly, each platform on its
                engine; what ran per variant ("ran", or "partial" when the service never started, and why)

This package's names are the smoke stage's public face (flow, tasks, tests).
"""

from orchestrator.release.smoke.checks import Check, arch_list_check, cuda_libs_check, system_packages_check
from orchestrator.release.smoke.runner import (READY_TIMEOUT, SERVICE_ENDPOINTS, Engine, Session, VariantResult,
                                               check_variant, run, strict_exit_check)
from orchestrator.release.smoke.variant import (DEFAULT_ENGINE, Variant, expected_cuda, gpu_for, host_gpu_request,
                                                host_has_gpu, same_torch, variant_label, variants_from_builds)

__all__ = ["DEFAULT_ENGINE", "READY_TIMEOUT", "SERVICE_ENDPOINTS", "Check", "Engine", "Session", "Variant",
           "VariantResult", "arch_list_check", "check_variant", "cuda_libs_check", "expected_cuda", "gpu_for",
           "host_gpu_request", "host_has_gpu", "run", "same_torch", "strict_exit_check", "system_packages_check",
           "variant_label", "variants_from_builds"]
