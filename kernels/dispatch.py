"""Backend registry, availability and the ``backend="auto"`` rule.

Each backend is a private module exposing the same functions on validated (B, N, C) tensors:
  softmax family: ``lse(q, k, scale, bias)``, ``attend(q, k, v, scale, bias)``, ``argmax(q, k, scale, bias)``
  nearest family: ``nearest_index(x, y)`` (no gradient; distances are re-gathered in torch).
Modules are imported lazily so that a missing optional dependency only matters when asked for.
"""
from __future__ import annotations

import importlib
import os
import shutil

import torch

SOFTMAX_BACKENDS = ("torch", "chunked", "keops", "triton")
NEAREST_BACKENDS = ("torch", "chunked", "keops", "triton", "kdtree")

_MODULES = {
    ("softmax", "torch"): "kernels.reference",
    ("softmax", "chunked"): "kernels._chunked_softmax",
    ("softmax", "keops"): "kernels._keops_softmax",
    ("softmax", "triton"): "kernels._triton_softmax",
    ("nearest", "torch"): "kernels.reference",
    ("nearest", "chunked"): "kernels._chunked_nearest",
    ("nearest", "keops"): "kernels._keops_nearest",
    ("nearest", "triton"): "kernels._triton_nearest",
    ("nearest", "kdtree"): "kernels._kdtree_nearest",
}

# ---------------------------------------------------------------------------------------------
# The auto rule. Thresholds are pair counts B * N * M, measured with `make bench` on a 2-core CPU
# (torch 2.13 CPU, see bench/RESULTS.md):
# - softmax family on CPU: dense torch is faster than chunked while the (B, N, M) score matrix is
#   small enough to stay cheap to allocate; past ~4M pairs chunked matches it in time and wins in
#   memory (dense fwd+bwd keeps several N x M buffers).
# - nearest on CPU: the dense difference tensor (B, N, M, 3) is 12x the pair count in fp32; the
#   KD-tree (O(N log M)) beats it from ~1M pairs and KeOps on every size measured.
# - CUDA: Triton whenever it imports (fused, O(N + M) memory); dense torch only below ~1M pairs
#   where launch overhead dominates.
CPU_DENSE_MAX_PAIRS = 4 * 1024 * 1024
CPU_NEAREST_DENSE_MAX_PAIRS = 1024 * 1024
CUDA_DENSE_MAX_PAIRS = 1024 * 1024


def _triton_status(device: torch.device | None = None) -> tuple[bool, str]:
    try:
        importlib.import_module("triton")
    except Exception as e:  # ImportError, or a broken install
        return False, f"triton does not import: {e}"
    if device is not None and device.type == "cuda":
        return True, "CUDA device"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "CPU tensors run under TRITON_INTERPRET=1 (slow, for tests)"
    if device is None and torch.cuda.is_available():
        return True, "CUDA device"
    return False, "no CUDA device; CPU tensors need TRITON_INTERPRET=1 set before kernels is imported"


def _keops_status() -> tuple[bool, str]:
    try:
        importlib.import_module("pykeops")
    except Exception as e:
        return False, f"pykeops does not import: {e}"
    if shutil.which("g++") is None and not torch.cuda.is_available():
        return False, "pykeops needs g++ to compile its CPU kernels"
    return True, "compiles each formula on first use (15-30 s on CPU), then cached"


def available_backends() -> dict[str, str]:
    """Which backends work in this process, and why the others do not.

    Returns:
        dict mapping each backend name to a one-line reason; names whose reason starts with
        ``"ok:"`` are usable.
    """
    status = {"torch": (True, "dense reference, O(N M) memory"),
              "chunked": (True, "pure PyTorch row blocks, O(N + M) memory")}
    status["keops"] = _keops_status()
    status["triton"] = _triton_status()
    try:
        importlib.import_module("scipy.spatial")
        status["kdtree"] = (True, "scipy cKDTree on CPU, nearest/chamfer only")
    except Exception as e:
        status["kdtree"] = (False, f"scipy does not import: {e}")
    return {name: ("ok: " if ok else "unavailable: ") + why for name, (ok, why) in status.items()}


def _auto(family: str, device: torch.device, pairs: int) -> str:
    if device.type == "cuda":
        if pairs <= CUDA_DENSE_MAX_PAIRS:
            return "torch"
        if _triton_status(device)[0]:
            return "triton"
        return "chunked"
    if family == "nearest":
        return "torch" if pairs <= CPU_NEAREST_DENSE_MAX_PAIRS else "kdtree"
    return "torch" if pairs <= CPU_DENSE_MAX_PAIRS else "chunked"


def resolve(family: str, backend: str, device: torch.device, pairs: int) -> str:
    """Map a requested backend name to a concrete one, or raise a clear error."""
    names = SOFTMAX_BACKENDS if family == "softmax" else NEAREST_BACKENDS
    if not isinstance(backend, str) or (backend != "auto" and backend not in names):
        raise ValueError(f"backend must be 'auto' or one of {names}, got {backend!r}")
    if backend == "auto":
        return _auto(family, device, pairs)
    if backend == "triton":
        ok, why = _triton_status(device)
        if not ok:
            raise ValueError(f"backend 'triton' cannot run on {device}: {why}")
    elif backend == "keops":
        ok, why = _keops_status()
        if not ok:
            raise ValueError(f"backend 'keops' is unavailable: {why}")
    return backend


def module(family: str, backend: str):
    """The backend module implementing `family` ("softmax" or "nearest")."""
    return importlib.import_module(_MODULES[(family, backend)])
