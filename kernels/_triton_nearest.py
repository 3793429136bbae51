"""Triton backend of the nearest-neighbour index (``backend="triton"``) for 3-D points.

``nearest_index(x, y)`` returns, for each x_i (B, N, 3), the index of its nearest y_j (B, M, 3).
It runs under ``torch.no_grad()``: the public op re-gathers the distance in torch, which carries
the gradient (CONVENTIONS.md item 6), so there is no backward kernel.

Distances are |x_i - y_j|^2 from direct coordinate differences, never |x|^2 - 2 x.y + |y|^2: the
expansion's cancellation error (~5e-4 |x|^2 in tf32, ~1e-7 |x|^2 in fp32) exceeds the squared
distance between near neighbours on a unit-scale mesh. Arithmetic is fp32 (fp64 for fp64 inputs);
with D = 3 there is no matmul, only 3 subtractions and 3 FMAs per pair on the CUDA cores.

``TRITON_INTERPRET=1`` must be set before this module is imported (``triton.jit`` reads it at
decoration time); ``tests/conftest.py`` sets it on machines without CUDA.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._triton_blocks import pow2_block
from ._validate import accumulation_dtype

# A program holds a (BLOCK_N, BLOCK_M) tile of distances in registers (no shared-memory tiles: the
# arithmetic runs on the CUDA cores), BLOCK_N * BLOCK_M / 128 values per thread with 4 warps.
# Compiled for sm_80-sm_90 (tests/test_triton_compile.py), 128 x 32 takes 166-233 registers per
# thread in fp32 and 64 x 32 168-219 in fp64, without spills; 128 x 64 spilled 224-456 bytes per
# thread in fp32 and ~2 KB in fp64.
MAX_BLOCK_N = 128
MAX_BLOCK_M = 32


def block_config(N: int, M: int, dtype: torch.dtype) -> dict:
    """BLOCK_N, BLOCK_M and warps for queries (B, N, 3) and candidates (B, M, 3) of `dtype`.

    fp64 distances take two registers each, so fp64 halves BLOCK_N. The device does not enter: the
    kernel keeps no tiles in shared memory, and the tile fits the registers of every NVIDIA GPU.
    """
    max_n = MAX_BLOCK_N // 2 if accumulation_dtype(dtype) == torch.float64 else MAX_BLOCK_N
    return dict(BLOCK_N=pow2_block(N, max_n), BLOCK_M=pow2_block(M, MAX_BLOCK_M), num_warps=4)


@triton.jit
def _nearest_fwd_kernel(
    x_ptr,        # queries (B, N, 3)
    y_ptr,        # candidates (B, M, 3)
    idx_ptr,      # output (B, N) int64
    N, M,
    stride_xb, stride_xn, stride_xc,
    stride_yb, stride_ym, stride_yc,
    stride_ib, stride_in,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr,
):
    """One program per (query block, batch element), streaming y tiles. Running (min, argmin);
    ties go to the smallest j like torch.argmin: first index within a tile, and a later tile wins
    only if strictly closer. Padded candidates get distance +inf."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    x_ptr += pid_b * stride_xb
    y_ptr += pid_b * stride_yb
    idx_ptr += pid_b * stride_ib
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    x0 = tl.load(x_ptr + offs_n * stride_xn, mask=n_mask, other=0.0).to(ACC)
    x1 = tl.load(x_ptr + offs_n * stride_xn + stride_xc, mask=n_mask, other=0.0).to(ACC)
    x2 = tl.load(x_ptr + offs_n * stride_xn + 2 * stride_xc, mask=n_mask, other=0.0).to(ACC)

    best = tl.full([BLOCK_N], float("inf"), dtype=ACC)
    best_j = tl.zeros([BLOCK_N], dtype=tl.int64)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_mask = offs_m < M
        y0 = tl.load(y_ptr + offs_m * stride_ym, mask=m_mask, other=0.0).to(ACC)
        y1 = tl.load(y_ptr + offs_m * stride_ym + stride_yc, mask=m_mask, other=0.0).to(ACC)
        y2 = tl.load(y_ptr + offs_m * stride_ym + 2 * stride_yc, mask=m_mask, other=0.0).to(ACC)
        d0 = x0[:, None] - y0[None, :]
        d1 = x1[:, None] - y1[None, :]
        d2 = x2[:, None] - y2[None, :]
        dist = d0 * d0 + d1 * d1 + d2 * d2  # (BLOCK_N, BLOCK_M)
        dist = tl.where(m_mask[None, :], dist, float("inf"))
        tile_min = tl.min(dist, 1)
        tile_j = tl.argmin(dist, 1, tie_break_left=True).to(tl.int64) + m0
        closer = tile_min < best
        best = tl.where(closer, tile_min, best)
        best_j = tl.where(closer, tile_j, best_j)
    tl.store(idx_ptr + offs_n * stride_in, best_j, mask=n_mask)


def _nearest_fwd(x, y):
    """Check, allocate and launch. x (B, N, 3), y (B, M, 3), same dtype and device."""
    if x.shape[-1] != 3 or y.shape[-1] != 3 or x.shape[0] != y.shape[0]:
        raise ValueError(f"triton nearest: expected x (B, N, 3) and y (B, M, 3), got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"triton nearest: x on {x.device} but y on {y.device}; expected one device")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"triton nearest: tensors on {x.device} need CUDA or TRITON_INTERPRET=1 set "
                         "before kernels is imported")
    B, N, _ = x.shape
    M = y.shape[1]
    if B > 65535:
        raise ValueError(f"triton nearest: batch size {B} exceeds the grid limit 65535")
    idx = torch.empty(B, N, dtype=torch.int64, device=x.device)
    cfg = block_config(N, M, x.dtype)
    _nearest_fwd_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), B)](
        x, y, idx, N, M,
        x.stride(0), x.stride(1), x.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        idx.stride(0), idx.stride(1),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_M=cfg["BLOCK_M"],
        ACC=tl.float64 if accumulation_dtype(x.dtype) == torch.float64 else tl.float32,
        num_warps=cfg["num_warps"],
    )
    return idx


def nearest_index(x, y):
    """(B, N) int64: index of each x_i's nearest y_j (validated (B, N, 3) / (B, M, 3) inputs)."""
    return _nearest_fwd(x, y)
