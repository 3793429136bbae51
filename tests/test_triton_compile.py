"""Every Triton kernel compiled for sm_80, sm_86, sm_89 and sm_90 on a machine without a GPU.

A kernel that needs more shared memory than one thread block may opt in to on the device, or more
than 255 registers per thread (65,536 per block), fails to launch. Kernels compile at their first
launch, so CPU-only runs (the interpreter) never see it. Triton's wheel bundles ptxas, so
`triton.compile` builds the cubin for any target here; the test compiles what the launchers pick
(`block_config`) and checks metadata.shared and the cubin's registers (cuobjdump) against
kernels/_triton_blocks.py's limits. docs/DESIGN.md 3.2 has the table of what each kernel needs.

Which configurations: `block_config` over a grid of shapes, for each dtype and device. Shared memory
grows with every block size and does not depend on the other constexprs (measured: the ONE_C /
ONE_D paths take the same bytes), so per kernel, dtype and device the largest configuration of the
grid bounds all the others and is the one compiled (`test_largest_configuration_bounds_the_grid`
checks that it exists). Values and bias are given (HAS_V, HAS_BIAS: the most code; lse and argmax
without a bias run subsets of it). Triton fixes shared memory in its GPU IR, which is one code path
for sm_80, sm_86 and sm_89 (Ampere and Ada; only ptxas differs, and ptxas keeps every target within
255 registers per thread), so a softmax kernel whose configuration on sm_80 or sm_89 is its sm_86 one
is compiled once, for sm_86, and checked against each device's limit. The nearest kernel, whose
only resource is registers, compiles for all four. That is 50 compiles, 150-180 CPU-seconds with a
cold Triton cache (~80 s on 2 idle cores; ~10 s warm); the full grid on every device would be ~1,300.

Triton's standard library (tl.zeros, tl.max, ...) is itself @triton.jit code, interpreted for
good once TRITON_INTERPRET=1 is set at import (conftest sets it on CPU-only machines), so the
compiling runs in a subprocess without it: this file run as a script (`python
tests/test_triton_compile.py OUT.json kernel:dtype:arch ...`). Launch arguments mirror the launchers' on meta tensors
(shapes, strides and dtypes; pointers read as 16-byte aligned, as CUDA allocations are), and
Triton's own binder specialises them, so the compiled variant is the launched one.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import triton
import triton.backends
from triton import knobs

from kernels import _triton_nearest, _triton_softmax
from kernels._triton_blocks import shared_memory_per_block

ARCHS = {"sm_80": (8, 0), "sm_86": (8, 6), "sm_89": (8, 9), "sm_90": (9, 0)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# (N, M, C, D): tiny xyz clouds, odd sizes, and a training-sized problem (C = 256 features, D = 130
# values: both wider than one chunk).
SHAPES = [(5, 7, 3, 3), (37, 1000, 64, 3), (4000, 3001, 256, 130)]
KERNELS = ("attend_fwd", "argmax_fwd", "bwd_dq", "bwd_dkv", "nearest_fwd")
BLOCKS = ("BLOCK_N", "BLOCK_M", "BLOCK_C", "BLOCK_D")
# Devices that share sm_86's Triton IR, hence its shared memory for the same configuration; the
# attend forward in fp32 (the kernel that outgrew sm_86) compiles for all three to check that.
SAME_IR_AS = {"sm_80": "sm_86", "sm_89": "sm_86"}
SAME_IR_CHECK = ("attend_fwd", "fp32")
MAX_REGISTERS_PER_THREAD = 255
REGISTERS_PER_BLOCK = 65536
B = 2


def _missing_toolchain() -> str | None:
    """Why cubins cannot be built here, or None."""
    if "nvidia" not in triton.backends.backends:
        return f"triton {triton.__version__} has no NVIDIA backend"
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        for arch in ARCHS.values():
            _ = get_ptxas(arch[0] * 10 + arch[1]).path  # raises RuntimeError when the binary is missing
        _ = knobs.nvidia.cuobjdump.path
    except RuntimeError as e:
        return f"triton {triton.__version__}: {e} (ptxas and cuobjdump come with triton's NVIDIA backend)"
    return None


# ------------------------------------------------------------------------------------------------
# Which configurations
# ------------------------------------------------------------------------------------------------
def _grid_configs(kernel: str, dtype: torch.dtype, arch: tuple[int, int]) -> list[tuple[tuple, dict]]:
    """((N, M, C, D), block configuration) that the launcher picks for each shape of the grid."""
    if kernel == "nearest_fwd":
        return [((N, M, 3, 3), _triton_nearest.block_config(N, M, dtype)) for N, M, _, _ in SHAPES]
    return [(shape, _triton_softmax.block_config(*shape, dtype, arch)) for shape in SHAPES]


def _largest(configs):
    """The (shape, configuration) of `configs` whose block sizes are all >= every other's, or None."""
    for shape, cfg in configs:
        if all(all(cfg.get(b, 0) >= other.get(b, 0) for b in BLOCKS) for _, other in configs):
            return shape, cfg
    return None


def _compiled_for(kernel: str, dtype: str, arch: str) -> str:
    """The device whose compile answers for (kernel, dtype, arch): sm_86 for a softmax kernel on
    sm_80 or sm_89 with the same configuration as on sm_86, else `arch` itself."""
    same = SAME_IR_AS.get(arch)
    if kernel == "nearest_fwd" or same is None:
        return arch
    largest = _largest(_grid_configs(kernel, DTYPES[dtype], ARCHS[arch]))
    return same if largest == _largest(_grid_configs(kernel, DTYPES[dtype], ARCHS[same])) else arch


# ------------------------------------------------------------------------------------------------
# What the launchers launch, and compiling it (in the worker process)
# ------------------------------------------------------------------------------------------------
def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _softmax_launch(kernel: str, cfg: dict, N: int, M: int, C: int, D: int, dtype):
    """(kernel function, args, kwargs) as _softmax_fwd / _argmax_fwd / _softmax_bwd launch it on a GPU,
    with values and bias (operands in the input dtype; fp32 dots in IEEE precision, torch's default)."""
    ts = _triton_softmax
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = _meta(B, N, C, dtype=dtype), _meta(B, M, C, dtype=dtype), _meta(B, M, D, dtype=dtype)
    bias = _meta(B, M, dtype=dtype)
    hi, lo = ts._scale_pair(1 / 0.07)
    consts = dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], BLOCK_C=cfg["BLOCK_C"], HAS_BIAS=True,
                  DOT_DTYPE=ts._TL[dtype], DOT_PRECISION="ieee", ACC=ts._TL[acc],
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if kernel == "argmax_fwd":
        idx = _meta(B, N, dtype=torch.int64)
        args = (q, k, bias, idx, N, M, C, hi, lo, *q.stride(), *k.stride(), *bias.stride(), *idx.stride())
        return ts._argmax_fwd_kernel, args, consts
    consts.update(HAS_V=True, BLOCK_D=cfg["BLOCK_D"], IN_DTYPE=ts._TL[dtype])
    lse = _meta(B, N, dtype=acc)
    if kernel == "attend_fwd":
        out = _meta(B, N, D, dtype=acc)
        args = (q, k, v, bias, out, lse, N, M, C, D, hi, lo, *q.stride(), *k.stride(), *v.stride(),
                *bias.stride(), *out.stride(), *lse.stride())
        return ts._attend_fwd_kernel, args, dict(consts, ONE_D=cfg["ONE_D"])
    dout, delta = _meta(B, N, D, dtype=dtype), _meta(B, N, dtype=acc)
    inputs = (q, k, v, bias, dout, lse, delta)
    strides = tuple(s for t in inputs for s in t.stride())
    if kernel == "bwd_dq":
        dq = _meta(B, N, C, dtype=acc)
        args = (*inputs, dq, N, M, C, D, hi, lo, *strides, *dq.stride())
        return ts._softmax_bwd_dq_kernel, args, dict(consts, ONE_C=cfg["ONE_C"])
    dk, dv, db = _meta(B, M, C, dtype=acc), _meta(B, M, D, dtype=acc), _meta(B, M, dtype=acc)
    args = (*inputs, dk, dv, db, N, M, C, D, hi, lo, *strides, *dk.stride(), *dv.stride(), *db.stride())
    return ts._softmax_bwd_dkv_kernel, args, dict(consts, ONE_C=cfg["ONE_C"], ONE_D=cfg["ONE_D"])


def _nearest_launch(cfg: dict, N: int, M: int, dtype):
    """(kernel function, args, kwargs) as _nearest_fwd launches it."""
    x, y, idx = _meta(B, N, 3, dtype=dtype), _meta(B, M, 3, dtype=dtype), _meta(B, N, dtype=torch.int64)
    acc = triton.language.float64 if dtype == torch.float64 else triton.language.float32
    args = (x, y, idx, N, M, *x.stride(), *y.stride(), *idx.stride())
    return _triton_nearest._nearest_fwd_kernel, args, dict(BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"], ACC=acc,
                                                           num_warps=cfg["num_warps"])


def _compile(fn, arch: tuple[int, int], args, kwargs):
    """triton.compile of `fn` for `arch`, specialised by Triton's own launch binder exactly as
    `fn[grid](*args, **kwargs)` would be on that device."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch[0] * 10 + arch[1], 32)
    backend = make_backend(target)
    bind = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = bind(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _registers(compiled) -> tuple[int, int]:
    """(registers, stack bytes) per thread of a compiled kernel's cubin. The kernels have no local
    arrays and no calls, so their stack frame is register spills."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(cubin)],
                             capture_output=True, text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if usage is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{out}")
    return int(usage[1]), int(usage[2])


def _usage(key: tuple[str, str, str]) -> dict:
    """Compile the largest configuration of one (kernel, dtype, arch); what it uses, or the error."""
    kernel, dtype_name, arch_name = key
    dtype, arch = DTYPES[dtype_name], ARCHS[arch_name]
    (N, M, C, D), cfg = _largest(_grid_configs(kernel, dtype, arch))
    result = dict(key=key, shape=(N, M, C, D), blocks={b: cfg[b] for b in BLOCKS if b in cfg})
    try:
        fn, args, kwargs = (_nearest_launch(cfg, N, M, dtype) if kernel == "nearest_fwd"
                            else _softmax_launch(kernel, cfg, N, M, C, D, dtype))
        compiled = _compile(fn, arch, args, kwargs)
        registers, stack = _registers(compiled)
    except Exception:
        return dict(result, error=traceback.format_exc())
    return dict(result, shared=compiled.metadata.shared, registers=registers, stack=stack,
                threads=compiled.metadata.num_warps * 32)


def _worker(out: str, keys: list[str]):
    """Compile each "kernel:dtype:arch" of `keys` in parallel threads (ptxas and most of
    triton.compile run outside the GIL) and write the results to `out` as JSON."""
    if knobs.runtime.interpret:
        raise SystemExit("the compile worker needs TRITON_INTERPRET unset")
    keys = [tuple(key.split(":")) for key in keys]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        Path(out).write_text(json.dumps(list(pool.map(_usage, keys))))


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------
_MISSING = _missing_toolchain()
needs_toolchain = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


@pytest.fixture(scope="module")
def usage(request, tmp_path_factory):
    """{(kernel, dtype, arch): result of `_usage`} for the selected tests, from one worker process."""
    keys = set()
    for item in request.session.items:
        if item.originalname == "test_kernel_fits_device":
            p = item.callspec.params
            keys.add((p["kernel"], p["dtype"], _compiled_for(p["kernel"], p["dtype"], p["arch"])))
        elif item.originalname == "test_ampere_and_ada_share_shared_memory":
            keys |= {(*SAME_IR_CHECK, arch) for arch in ("sm_86", *SAME_IR_AS)}
    out = tmp_path_factory.mktemp("compile") / "usage.json"
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    command = [sys.executable, __file__, str(out), *(":".join(key) for key in sorted(keys))]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        pytest.fail(f"the compile worker failed (exit {done.returncode}):\n{done.stderr[-5000:]}")
    return {tuple(r["key"]): r for r in json.loads(out.read_text())}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_largest_configuration_bounds_the_grid(kernel, dtype, arch):
    """The compiled configuration has every block size >= those of all other shapes of the grid, so
    its shared memory bounds theirs."""
    configs = _grid_configs(kernel, DTYPES[dtype], ARCHS[arch])
    assert _largest(configs) is not None, f"no configuration bounds the others: {configs}"


@needs_toolchain
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_fits_device(usage, kernel, dtype, arch):
    compiled_for = _compiled_for(kernel, dtype, arch)
    r = usage[(kernel, dtype, compiled_for)]
    where = (f"{kernel} {dtype} on {arch} (compiled for {compiled_for}), shape (N, M, C, D) = {tuple(r['shape'])}, "
             f"blocks {r['blocks']}")
    if "error" in r:
        pytest.fail(f"{where} does not compile:\n{r['error']}")
    limit = shared_memory_per_block(ARCHS[arch])
    assert r["shared"] <= limit, (
        f"{where}: needs {r['shared']} bytes of shared memory, over the {limit} one block may use on {arch}; "
        "block_config must choose smaller tiles there")
    assert r["registers"] <= MAX_REGISTERS_PER_THREAD, f"{where}: {r['registers']} registers per thread"
    assert r["registers"] * r["threads"] <= REGISTERS_PER_BLOCK, (
        f"{where}: {r['registers']} registers x {r['threads']} threads exceed {REGISTERS_PER_BLOCK} per block")
    if kernel == "nearest_fwd":
        # Registers are nearest's only resource (no shared-memory tiles), and its tile is sized to fit them.
        assert r["stack"] == 0, f"{where}: spills {r['stack']} bytes per thread; its tile is too big"


@needs_toolchain
def test_ampere_and_ada_share_shared_memory(usage):
    """The premise of compiling sm_80 and sm_89 as sm_86: Triton gives them the same shared memory."""
    shared = {arch: usage[(*SAME_IR_CHECK, arch)].get("shared") for arch in ("sm_86", *SAME_IR_AS)}
    assert len(set(shared.values())) == 1, f"{SAME_IR_CHECK}: shared memory differs between devices: {shared}"


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2:])
