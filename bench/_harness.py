"""Benchmark harness shared by every ``bench/bench_*.py`` file.

A *case* is one (op, provider, mode, N = M, C, B) point. :func:`run_case` decides first, from a
prediction, whether the case can run here at all (the dense N x M footprint against the memory
this shared machine can spare; the time per call against a cap), and records a benchmark entry
with ``extra_info["status"]`` either way, so that a provider that stops fitting shows up in the
results instead of being silently dropped. Runnable cases are warmed up (a tiny problem of the
same C, B and dtype first, which compiles KeOps modules / JITs Triton kernels, then one full-size
round when cheap), timed with ``benchmark.pedantic`` (CUDA synchronised inside the timed
function), and their peak memory is measured:

* CPU: in a fresh child process per case (``python -m bench._harness child CASE``), as the growth
  of the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs after the inputs
  exist; ru_maxrss growth where that file is not writable);
* CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call.

Modes: ``fwd`` is the forward with inputs that require grad (the forward of a training step, so
dense torch keeps its autograd buffers); ``bwd`` times only the backward of a forward run in the
untimed set-up (its peak memory is that of forward + backward); ``fwd+bwd`` both.
"""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

SOFTMAX_OPS = ("softmax_attend", "softmax_lse", "sinkhorn", "info_nce")
MODES = ("fwd", "bwd", "fwd+bwd")
TAU = 0.07          # temperature of the softmax-family cases (cosine features, |logit| <= 1/TAU)
SINKHORN_EPS, SINKHORN_ITERS = 0.03, 5
D_VALUES = 3        # value width of attend / sinkhorn (points)
GiB, MiB = 2.0 ** 30, 2.0 ** 20
SMOKE = os.environ.get("BENCH_SMOKE") == "1"   # debug the suite on tiny sizes: N -> N // 64


@dataclass(frozen=True)
class Case:
    op: str
    provider: str
    mode: str
    n: int
    c: int = 3
    b: int = 1

    @property
    def m(self) -> int:
        return self.n

    @property
    def pairs(self) -> int:
        """Scores (i, j) per call: B N M, twice for chamfer (both directions)."""
        return self.b * self.n * self.m * (2 if self.op == "chamfer" else 1)

    def id(self) -> str:
        return f"{self.provider}-{self.mode}-N{self.n}-C{self.c}-B{self.b}"


def effective(case: Case) -> Case:
    """The case actually run (BENCH_SMOKE=1 shrinks N for debugging the suite)."""
    if not SMOKE:
        return case
    return Case(case.op, case.provider, case.mode, max(64, case.n // 64), case.c, case.b)


# --------------------------------------------------------------------------------------------
# FLOP and memory models
# --------------------------------------------------------------------------------------------
def _lse_calls(op: str) -> int:
    return {"softmax_lse": 1, "info_nce": 1, "softmax_attend": 0,
            "sinkhorn": 2 * SINKHORN_ITERS - 1, "train_step": 2 * SINKHORN_ITERS}[op]


def matmul_flops(case: Case) -> float:
    """FLOPs of the matmul parts, algorithmic count (no recompute), identical for all providers.

    One LSE: forward 2NMC (scores), backward 4NMC (dq, dk). One attend: forward 2NM(C + D),
    backward 4NM(C + D) (dq, dk, dv, dP). Chamfer has no matmul part (0).
    """
    if case.op not in SOFTMAX_OPS + ("train_step",):
        return 0.0
    p, c, d = case.b * case.n * case.m, case.c, D_VALUES
    lse = _lse_calls(case.op)
    attend = 1 if case.op in ("softmax_attend", "sinkhorn", "train_step") else 0
    fwd = p * (2 * c * lse + 2 * (c + d) * attend)
    bwd = 2 * fwd
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[case.mode]


# Bytes per (i, j) pair that the dense torch reference keeps alive at its peak (forward + backward;
# the forward of a training step keeps nearly as much): measured with the child-process RSS on this
# machine at N = 1k..8k and rounded up (see RESULTS.md, "dense bytes per pair").
DENSE_BYTES_PER_PAIR = {
    "softmax_attend": 16,   # measured 12.5 at 4k^2 (fwd alone 8): scores, softmax P (saved), dP, dS
    "softmax_lse": 20,      # measured 15.5: scores (saved by logsumexp), exp, grad
    "info_nce": 20,         # measured 15.6
    "sinkhorn": 128,        # measured 115 at 2k^2: each of the 9 LSEs saves its (N, M) scores + temps
    "train_step": 128 + 20,  # Sinkhorn correspondence + point InfoNCE (the model's all-pairs parts)
    "chamfer": 28,          # measured 22.9 per B N M: (N, M, 3) differences, squares, (N, M) sums
}


def predicted_bytes(case: Case) -> float:
    """Peak extra memory of one call, predicted before trying it."""
    inputs = case.b * (case.n + case.m) * max(case.c, 3) * 4 * 3  # inputs, grads, outputs
    if case.op == "train_step":
        inputs += TRAIN_STEP_BYTES_PER_VERTEX * case.b * case.n  # per-vertex activations (C up to 1024)
    if case.provider == "torch":
        return DENSE_BYTES_PER_PAIR[case.op] * case.b * case.n * case.m + inputs
    if case.provider == "chunked":
        return 128 * MiB + inputs  # measured ~100 MB: a few live (rows, M) blocks of 4M fp32 scores
    return inputs + 16 * MiB


TRAIN_STEP_BYTES_PER_VERTEX = 100 * 1024   # encoder x3 + decoder (1024/512/256 wide) activations, guessed


def memory_budget_bytes() -> tuple[float, str]:
    """How much one case may use: 40% of what is available now, at most 6 GiB on CPU (the box is
    shared with other jobs, and must never be pushed into OOM); on CUDA 90% of the
    free device memory."""
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return 0.9 * free, f"{free / GiB:.0f} GB free of {total / GiB:.0f} GB on the GPU"
    try:
        import psutil
        vm = psutil.virtual_memory()
        avail, total = vm.available, vm.total
    except Exception:
        avail = total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(6 * GiB, 0.4 * avail), f"{avail / GiB:.0f} GB available of {total / GiB:.0f} GB, shared"


def predicted_seconds(case: Case) -> float:
    """Rough time of one call on this 2-core CPU, for skipping hopeless cases and choosing rounds.

    Fitted to single measurements here (torch 2.13, 2 shared cores): dense/chunked softmax
    forward ~3e-8 s per pair + C * 2.5e-11; KeOps SumSoftMaxWeight ~2.5e-7 + C * 6e-10 per pair
    (forward), backward ~4x; chamfer per pair: dense 2.5e-8, chunked 3e-9, KeOps 6e-10;
    cKDTree ~1.5e-6 s per point.
    """
    if case.op == "chamfer":
        if case.provider == "kdtree":
            return 1.5e-6 * 2 * case.b * case.n * (1.5 if case.mode != "fwd" else 1.0)
        per = {"torch": 2.5e-8, "chunked": 3e-9, "keops": 6e-10, "triton": 1e-7}.get(case.provider, 1e-8)
        return per * case.pairs
    p = case.b * case.n * case.m
    if case.op == "train_step":
        per_pair = 3e-8 + case.c * 2.5e-11 if case.provider != "keops" else 2.5e-7 + case.c * 6e-10
        return p * per_pair * (_lse_calls(case.op) * 0.8 + 1) * 2.3 + 3e-4 * case.b * case.n
    if case.provider == "keops":
        fwd, bwd = 2.5e-7 + case.c * 6e-10, 4.0
    elif case.provider == "triton":  # interpreter
        fwd, bwd = 5e-6 * (1 + case.c / 64), 3.0
    else:
        fwd, bwd = 3e-8 + case.c * 2.5e-11, 1.3
    calls = _lse_calls(case.op) * 0.8 + (1 if case.op in ("softmax_attend", "sinkhorn") else 0)
    factor = {"fwd": 1.0, "bwd": bwd, "fwd+bwd": 1.0 + bwd}[case.mode]
    return p * fwd * calls * factor


# --------------------------------------------------------------------------------------------
# Building and running a case
# --------------------------------------------------------------------------------------------
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def build(case: Case, dev: torch.device):
    """Inputs (leaves requiring grad) and the forward closure of one case."""
    import kernels

    gen = torch.Generator().manual_seed(0)
    B, N, M, C, be = case.b, case.n, case.m, case.c, case.provider

    def feats(rows):
        return F.normalize(torch.randn(B, rows, C, generator=gen), dim=-1).to(dev).requires_grad_()

    if case.op == "chamfer":
        x = torch.rand(B, N, 3, generator=gen).to(dev).requires_grad_()
        y = torch.rand(B, M, 3, generator=gen).to(dev).requires_grad_()
        return [x, y], lambda: kernels.chamfer(x, y, backend=be)
    q, k = feats(N), feats(M)
    if case.op == "softmax_lse":
        return [q, k], lambda: kernels.softmax_lse(q, k, scale=1 / TAU, backend=be)
    if case.op == "info_nce":
        return [q, k], lambda: kernels.info_nce(q, k, tau=TAU, backend=be)
    v = torch.randn(B, M, D_VALUES, generator=gen).to(dev).requires_grad_()
    if case.op == "softmax_attend":
        return [q, k, v], lambda: kernels.softmax_attend(q, k, v, scale=1 / TAU, backend=be)
    if case.op == "sinkhorn":
        return [q, k, v], lambda: kernels.sinkhorn_correspondence(
            q, k, v, eps=SINKHORN_EPS, iters=SINKHORN_ITERS, backend=be)
    raise ValueError(f"unknown op {case.op!r}")


def callables(case: Case, dev: torch.device):
    """(setup, target) for ``benchmark.pedantic``; the target synchronises the device."""
    if case.op == "train_step":
        from bench.bench_train_step import training_step
        return training_step(case, dev)
    leaves, forward = build(case, dev)
    grad_out: dict[str, torch.Tensor] = {}

    def grad_for(out):
        if "g" not in grad_out:
            gen = torch.Generator().manual_seed(1)
            grad_out["g"] = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
        return grad_out["g"]

    def clear():
        for t in leaves:
            t.grad = None

    if case.mode == "fwd":
        def target():
            out = forward()
            sync(dev)
            return out
        return None, target

    if case.mode == "bwd":
        def setup():
            clear()
            out = forward()
            sync(dev)
            return (out,), {}

        def target(out):
            out.backward(grad_for(out))
            sync(dev)
        return setup, target

    def setup():
        clear()
        return (), {}

    def target():
        out = forward()
        out.backward(grad_for(out))
        sync(dev)
    return setup, target


def run_once(case: Case, dev: torch.device) -> None:
    setup, target = callables(case, dev)
    args, kwargs = setup() if setup else ((), {})
    target(*args, **kwargs)


def tiny(case: Case) -> Case:
    return Case(case.op, case.provider, case.mode, min(case.n, 200), case.c, case.b)


# --------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _child(case_json: str) -> None:
    """Entry point of the memory child: run the case once, print its peak extra memory."""
    case = Case(**json.loads(case_json))
    dev = torch.device("cpu")
    run_once(tiny(case), dev)          # imports, KeOps module loads, allocator warm-up
    setup, target = callables(case, dev)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")               # reset VmHWM to the current RSS (inputs already exist)
        how = "VmHWM"
        base_kb = _status_kb("VmRSS")
    except OSError:
        how = "ru_maxrss"
        base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    args, kwargs = setup() if setup else ((), {})   # bwd: its forward is part of the peak too
    target(*args, **kwargs)
    elapsed = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mb": max(0, peak_kb - base_kb) / 1024, "method": how, "elapsed_s": elapsed}))


def child_peak(case: Case, timeout: float) -> dict:
    """Run the case in a fresh interpreter; {'peak_mb', 'method', 'elapsed_s'} or {'status': ...}."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        res = subprocess.run([sys.executable, "-m", "bench._harness", "child", json.dumps(asdict(case))],
                             cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"memory child timed out after {timeout:.0f} s"}
    if res.returncode in (-9, 137):
        return {"status": "out of memory (memory child killed)"}
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1][:200]
        return {"status": f"memory child failed: {tail}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def cuda_peak(case: Case, dev: torch.device) -> dict:
    setup, target = callables(case, dev)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    args, kwargs = setup() if setup else ((), {})   # bwd: its forward is part of the peak too
    target(*args, **kwargs)
    return {"peak_mb": (torch.cuda.max_memory_allocated() - base) / MiB, "method": "max_memory_allocated"}


# --------------------------------------------------------------------------------------------
# Environment description
# --------------------------------------------------------------------------------------------
def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "pykeops", "scipy", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            out[mod] = f"unavailable ({type(e).__name__})"
    return out


def blas_fp32_gflops(n: int = 2048, reps: int = 5) -> float:
    """Best-of fp32 matmul rate (GFLOP/s) on this device now: the CPU's hardware limit reference."""
    dev = device()
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    torch.mm(a, b)
    sync(dev)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


# --------------------------------------------------------------------------------------------
# Provider availability
# --------------------------------------------------------------------------------------------
def provider_status(op: str, provider: str, dev: torch.device) -> str | None:
    """None when the provider can run here; otherwise the reason recorded as the status."""
    import importlib

    from kernels import dispatch

    if provider == "triton" and dev.type != "cuda":
        return "not run: interpreter only, no GPU"
    if provider == "kdtree" and op != "chamfer":
        return "not applicable"
    if op == "train_step":
        try:
            importlib.import_module("bench.step_memory")
        except ImportError as e:
            return f"not run: mapconnet.model unavailable ({type(e).__name__}: {str(e)[:100]})"
    family = "nearest" if op == "chamfer" else "softmax"
    name = dispatch._MODULES.get((family, provider))
    if name is None:
        return "not applicable"
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - a backend still being written, or a missing library
        return f"not run: backend unavailable ({type(e).__name__}: {str(e)[:120]})"
    return None


def noop() -> None:
    return None


def grid(op, providers, ns, cs, bs, modes, quick):
    """pytest params for the product; cases for which ``quick(case)`` is false get the ``full`` mark."""
    import itertools

    import pytest

    out = []
    for provider, mode, n, c, b in itertools.product(providers, modes, ns, cs, bs):
        case = Case(op, provider, mode, n, c, b)
        marks = [] if quick(case) else [pytest.mark.full]
        out.append(pytest.param(case, id=case.id(), marks=marks))
    return out


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "child":
    _child(sys.argv[2])
