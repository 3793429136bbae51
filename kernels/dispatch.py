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
# The auto rule. Thresholds are pair counts B * N * M per call, set from `make bench`
# (bench/results/cpu-quick.json, tables in bench/RESULTS.md "The auto rule and the data behind it";
# 2 shared CPU cores, torch 2.13 CPU, fp32, forward + backward):
# - softmax family on CPU (quiet run of 2026-12-02, BLAS 150 GFLOP/s): at 1M pairs (N = M = 1024)
#   dense wins a single attend / info_nce by 5-6 ms (18.5 vs 24.6 ms; 16.1 vs 19.2 ms) while chunked
#   already wins lse (0.89x) and Sinkhorn (0.84x; 9 LSEs + attend, the model's main all-pairs call);
#   at 4M pairs a single attend is 1.2-1.5x slower chunked (42.6 vs 52.4 ms at C = 64) while Sinkhorn
#   ties (1.01x); at 16M everything ties or favours chunked (attend 0.98-0.99x, info_nce 0.72x, lse
#   0.62x) and at 67M chunked is faster (attend 8192^2, C = 256: 0.72x, 179 MB vs 785 MB). Dense
#   keeps ~12-16 bytes per pair alive (Sinkhorn ~115), so the threshold is 1M pairs: the price is
#   up to ~30 ms (1.5x) on a lone attend at 1M-4M pairs, the gain memory that stays O(N + M).
# - Sinkhorn on CPU (2026-12-03, 2 quiet cores, C = 256, fwd + bwd, best of 3): the dense path
#   builds the score matrix once for all 2 * iters passes (kernels.reference.sinkhorn) while the
#   streaming one recomputes it per pass, so dense wins far beyond the single-op threshold:
#   2 x 1723^2 (the `lite` training step) 0.30 s vs 0.84 s chunked; 2048^2 0.19 vs 0.56 s;
#   2 x 2900^2 (16.8M pairs) 1.61 vs 2.55 s; 4096^2 ties (3.00 vs 2.94 s); 2 x 6890^2 ties
#   (19.6 vs 19.2 s). Autograd keeps ~2 score matrices per pass (~1 GB at the 12.6M-pair
#   threshold), which is what the threshold caps.
# - nearest on CPU: the KD-tree ties dense chamfer at 256^2 = 65,536 pairs per direction and is
#   2.4x faster at 512^2, 5x at 1024^2, 64x at 4096^2 (dense: ~23 bytes per pair; 100k points would
#   need ~260 GB; kdtree does 100k in 0.22 s, KeOps in ~14 s).
# - CUDA: not measured yet (no GPU in the benchmarking session); 1M pairs is the prior: dense torch
#   only where launch overhead dominates, Triton above (fused, O(N + M) memory).
CPU_DENSE_MAX_PAIRS = 1024 * 1024
CPU_NEAREST_DENSE_MAX_PAIRS = 256 * 256
CPU_SINKHORN_DENSE_MAX_PAIRS = 12 * 2**20
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
    if family == "sinkhorn":
        return "torch" if pairs <= CPU_SINKHORN_DENSE_MAX_PAIRS else "chunked"
    return "torch" if pairs <= CPU_DENSE_MAX_PAIRS else "chunked"


def resolve(family: str, backend: str, device: torch.device, pairs: int) -> str:
    """Map a requested backend name to a concrete one, or raise a clear error."""
    names = NEAREST_BACKENDS if family == "nearest" else SOFTMAX_BACKENDS
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
