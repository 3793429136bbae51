"""Triton backend of the correspondence softmax (``backend="triton"``): lse, attend, argmax.

Scores S_ij = s <q_i, k_j> + b_j between queries q (B, N, C) and keys k (B, M, C) are computed one
(BLOCK_N, BLOCK_M) tile at a time and never stored: the forward keeps a running row max and row sum
(online softmax) and saves only the row log-sum-exp L (and the output O for attend); the backward
recomputes P_ij = exp(S_ij - L_i) tile by tile (flash-attention style). Memory is O(N + M) beyond
the inputs and outputs.

Layering (Liger / flash-attention): ``@triton.jit`` kernels ``_<op>_fwd_kernel`` /
``_<op>_bwd_*_kernel``; host launchers ``_<op>_fwd`` / ``_softmax_bwd`` that check, allocate and
launch; ``autograd.Function`` classes that only save tensors and call launchers; and the module
functions ``lse`` / ``attend`` / ``argmax`` that the public ops in ``kernels/softmax.py`` call on
validated (B, N, C) tensors.

Numerics:
- Accumulation (scores, running max/sum, outputs, gradients) is float32 for fp16/bf16/fp32
  inputs and float64 for fp64 inputs (so that ``gradcheck`` can run). Outputs and gradients are
  returned in the input dtype.
- On a GPU, ``tl.dot`` operands stay in the input dtype (tensor cores for fp16/bf16; the
  probabilities P and dS are rounded to that dtype before their matmuls, as in flash attention).
  fp32 dots use ``input_precision="ieee"`` unless ``torch.backends.cuda.matmul.allow_tf32`` is set,
  so the kernels follow the same TF32 switch as torch. fp64 dots are fp64 ``tl.dot`` (Triton's
  NVIDIA backend accepts 64-bit operands, min K = 4; lowered to FMA/DMMA; slow, meant for checks).
- Under the interpreter (``TRITON_INTERPRET=1``) ``tl.dot`` is ``np.matmul`` and multiplies bf16's
  raw uint16 bits, so operands are first rounded to the input dtype (same rounding as the GPU) and
  then widened to the accumulation dtype before every dot.
- Logits up to |S| = 100 (scale 100, unit-norm features) cannot overflow: only exp(S - max) and
  exp(S - L) are ever formed. A tile whose keys are all masked (bias -inf) leaves the running max at
  -inf; the max is then replaced by 0 for the exponentials so that exp(-inf - (-inf)) = NaN never
  occurs.
- The scale is passed as a float32 pair (hi, lo) with hi + lo == scale to ~48 bits, because Triton
  passes Python floats as fp32; fp64 kernels add the pair, fp32 kernels use hi.

Feature width C and value width D are arbitrary: contractions over C (and over D for dP) loop over
BLOCK_C (BLOCK_D) chunks accumulating in fp32. Outputs over C or D (O, dq, dk, dv) are kept in
registers when they fit in one chunk; wider ones are accumulated in an fp32 output buffer that the
owning program reads, updates and writes back per key (query) tile. Each program owns its rows of
that buffer, so no atomics are needed; a ``tl.debug_barrier()`` after each write orders the
read-modify-write across the program's threads on a GPU (the interpreter runs programs
sequentially and never exercises it).

``TRITON_INTERPRET=1`` must be set before this module is imported: ``triton.jit`` reads it when the
kernels are decorated (import time), not when they are launched. ``tests/conftest.py`` sets it on
machines without CUDA.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._triton_blocks import NUM_STAGES, chunk_block, device_capability, pow2_block
from ._validate import accumulation_dtype

# Block-size caps. BLOCK_N (queries) and BLOCK_M (keys) are 64 on a GPU-sized problem (the usual
# flash-attention tile; 16 for tiny N or M so the dot shapes stay legal and little is padded).
# BLOCK_C / BLOCK_D chunk the contractions and the wide outputs; on a GPU `block_config` may
# choose a smaller chunk so that the tiles fit the device's shared memory.
MAX_BLOCK_N = 64
MAX_BLOCK_M = 64
MAX_BLOCK_C = 128
MAX_BLOCK_D = 128


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
       torch.float64: tl.float64}


def block_config(N: int, M: int, C: int, D: int, dtype: torch.dtype, capability: tuple[int, int] | None) -> dict:
    """Block sizes, warps and pipeline depth of the softmax kernels for queries (B, N, C), keys
    (B, M, C) and values (B, M, D) (D = 1 without values) of `dtype`, on a CUDA device of
    `capability` (major, minor), or None off a GPU (the interpreter), where only the shape caps apply.

    Shared memory holds the dot operands in flight: each step of the contraction over C loads a
    (BLOCK_N, BLOCK_C) and a (BLOCK_C, BLOCK_M) tile (q and k; k and q in the dk kernel), each step
    over D a (BLOCK_N, BLOCK_D) and a (BLOCK_D, BLOCK_M) tile (dO and v), and Triton pipelines up to
    NUM_STAGES steps: NUM_STAGES * (BLOCK_N + BLOCK_M) * chunk * itemsize bytes. The chunks are sized
    for the largest tiles (64 + 64 rows), so they depend on dtype and device only: 128 for 16-bit
    inputs; for fp32 128 on sm_90 and 64 on sm_80/86/89 (fp32 at 128 took 128 KiB, over the 99 KiB of
    sm_86/89; the 3 copies of the estimate would exceed sm_80's 163 KiB too); for fp64 64 on sm_90 and
    32 elsewhere. Results depend on the chunks only through the order of the fp32 (fp64) sums.
    """
    rows = MAX_BLOCK_N + MAX_BLOCK_M
    BLOCK_C = chunk_block(C, MAX_BLOCK_C, rows * dtype.itemsize, capability)
    BLOCK_D = chunk_block(D, MAX_BLOCK_D, rows * dtype.itemsize, capability)
    return dict(
        BLOCK_N=pow2_block(N, MAX_BLOCK_N), BLOCK_M=pow2_block(M, MAX_BLOCK_M), BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D,
        ONE_C=C <= BLOCK_C, ONE_D=D <= BLOCK_D,
        # 8 warps spread the wide (BLOCK_C = 128) tiles' registers over twice the threads.
        num_warps=8 if BLOCK_C >= 128 else 4, num_stages=NUM_STAGES,
    )


def _meta(q, k, d=1):
    """Compile-time parameters of a launch: blocks by shape, dtype and device; dtypes by input dtype."""
    acc = accumulation_dtype(q.dtype)
    meta = block_config(q.shape[1], k.shape[1], q.shape[2], d, q.dtype, device_capability(q.device))
    meta.update(
        IN_DTYPE=_TL[q.dtype], ACC=_TL[acc],
        # The interpreter's dot is np.matmul: widen operands (bf16 would multiply raw bits).
        DOT_DTYPE=_TL[acc] if _interpreting() else _TL[q.dtype],
        # tf32 only for fp32 operands and only when torch itself allows it (off by default).
        DOT_PRECISION="tf32" if (q.is_cuda and q.dtype == torch.float32
                                 and torch.backends.cuda.matmul.allow_tf32) else "ieee",
    )
    return meta


def _scale_pair(scale: float) -> tuple[float, float]:
    hi = float(torch.tensor(scale, dtype=torch.float32))
    return hi, float(scale - hi)


def _check(*tensors):
    ref = tensors[0]
    for t in tensors:
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"triton softmax: tensors on {t.device} and {ref.device}; expected one device")
        if t.device.type != "cuda" and not _interpreting():
            raise ValueError(f"triton softmax: tensors on {t.device} need CUDA or TRITON_INTERPRET=1 set "
                             "before kernels is imported")


def _grid_batch_ok(B: int):
    if B > 65535:
        raise ValueError(f"triton softmax: batch size {B} exceeds the grid limit 65535")


# ----------------------------------------------------------------------------------------------
# Shared tile helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _row_dots(a_ptr, offs_a, A, stride_an, stride_ac,
              b_ptr, offs_b, Bn, stride_bn, stride_bc, C,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
              DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    """(BLOCK_A, BLOCK_B) tile of sum_c a[i, c] b[j, c], looping over C in BLOCK_C chunks.

    Rows past A or B and channels past C load as 0, so padded entries are 0.
    """
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        a = tl.load(a_ptr + offs_a[:, None] * stride_an + offs_c[None, :] * stride_ac,
                    mask=(offs_a[:, None] < A) & (offs_c[None, :] < C), other=0.0)
        bt = tl.load(b_ptr + offs_b[None, :] * stride_bn + offs_c[:, None] * stride_bc,
                     mask=(offs_b[None, :] < Bn) & (offs_c[:, None] < C), other=0.0)  # (BLOCK_C, BLOCK_B)
        acc = tl.dot(a.to(DOT_DTYPE), bt.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _tile_matmul(x, y_ptr, offs_k, K, stride_yk, stride_yc, c0, W,
                 BLOCK_W: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 ACC: tl.constexpr):
    """x (R, BLOCK_K) @ y[offs_k, c0:c0 + BLOCK_W] -> (R, BLOCK_W); x already in the input dtype."""
    offs_c = c0 + tl.arange(0, BLOCK_W)
    y = tl.load(y_ptr + offs_k[:, None] * stride_yk + offs_c[None, :] * stride_yc,
                mask=(offs_k[:, None] < K) & (offs_c[None, :] < W), other=0.0)
    return tl.dot(x.to(DOT_DTYPE), y.to(DOT_DTYPE), input_precision=DOT_PRECISION, out_dtype=ACC)


@triton.jit
def _buffer_update(o_ptr, offs_r, R, stride_or, stride_oc, alpha, x, y_ptr, offs_k, K, stride_yk,
                   stride_yc, W, RESCALE: tl.constexpr, BLOCK_W: tl.constexpr,
                   DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    """o[offs_r, :W] = (alpha * o[offs_r, :W] if RESCALE) + x @ y[offs_k, :W], chunk by chunk.

    The calling program owns rows offs_r of o (an ACC-dtype buffer), so no atomics; the barrier
    orders this write before the next read of the same elements by other threads of the program.
    """
    for c0 in range(0, W, BLOCK_W):
        offs_c = c0 + tl.arange(0, BLOCK_W)
        o_ptrs = o_ptr + offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc
        o_mask = (offs_r[:, None] < R) & (offs_c[None, :] < W)
        o = tl.load(o_ptrs, mask=o_mask, other=0.0)
        if RESCALE:
            o = o * alpha[:, None]
        o += _tile_matmul(x, y_ptr, offs_k, K, stride_yk, stride_yc, c0, W,
                          BLOCK_W, DOT_DTYPE, DOT_PRECISION, ACC)
        tl.store(o_ptrs, o, mask=o_mask)
        tl.debug_barrier()


@triton.jit
def _masked_scores(q_ptr, offs_n, N, stride_qn, stride_qc, k_ptr, offs_m, M, stride_km, stride_kc,
                   bias_ptr, stride_bm, C, scale,
                   HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_C: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   ACC: tl.constexpr):
    """(BLOCK_N, BLOCK_M) scores s <q_i, k_j> + b_j, -inf on padded keys and masked keys."""
    s = _row_dots(q_ptr, offs_n, N, stride_qn, stride_qc, k_ptr, offs_m, M, stride_km, stride_kc, C,
                  BLOCK_N, BLOCK_M, BLOCK_C, DOT_DTYPE, DOT_PRECISION, ACC) * scale
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_m * stride_bm, mask=offs_m < M, other=float("-inf")).to(ACC)
        s += b[None, :]
    return tl.where(offs_m[None, :] < M, s, float("-inf"))


# ----------------------------------------------------------------------------------------------
# Forward: lse and attend share one kernel (HAS_V)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attend_fwd_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr,   # inputs: q (B, N, C), k (B, M, C), v (B, M, D), bias (B, M)
    out_ptr,                          # output (B, N, D), ACC dtype, zero-filled (also the workspace)
    lse_ptr,                          # output (B, N), ACC dtype: row log-sum-exp
    N, M, C, D, scale_hi, scale_lo,
    stride_qb, stride_qn, stride_qc,
    stride_kb, stride_km, stride_kc,
    stride_vb, stride_vm, stride_vd,
    stride_bb, stride_bm,
    stride_ob, stride_on, stride_od,
    stride_lb, stride_ln,
    HAS_V: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    IN_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """One program per (query block, batch element): streams every key tile through an online
    softmax. m_i is the running max, l_i the running sum of exp(S - m_i), acc the running
    unnormalised output; a new tile rescales them by alpha = exp(m_old - m_new)."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    q_ptr += pid_b * stride_qb
    k_ptr += pid_b * stride_kb
    v_ptr += pid_b * stride_vb
    bias_ptr += pid_b * stride_bb
    out_ptr += pid_b * stride_ob
    lse_ptr += pid_b * stride_lb
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_N], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_N], dtype=ACC)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        s = _masked_scores(q_ptr, offs_n, N, stride_qn, stride_qc, k_ptr, offs_m, M, stride_km, stride_kc,
                           bias_ptr, stride_bm, C, scale, HAS_BIAS, BLOCK_N, BLOCK_M, BLOCK_C,
                           DOT_DTYPE, DOT_PRECISION, ACC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Guard: while every key seen so far is masked, m_new is -inf; shift by 0 instead.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_V:
            p_in = p.to(IN_DTYPE)
            if ONE_D:
                acc = acc * alpha[:, None] + _tile_matmul(p_in, v_ptr, offs_m, M, stride_vm, stride_vd, 0, D,
                                                          BLOCK_D, DOT_DTYPE, DOT_PRECISION, ACC)
            else:
                _buffer_update(out_ptr, offs_n, N, stride_on, stride_od, alpha, p_in, v_ptr, offs_m, M,
                               stride_vm, stride_vd, D, True, BLOCK_D, DOT_DTYPE, DOT_PRECISION, ACC)
        m_i = m_new

    # At least one key per batch element is unmasked, so m_i is finite and l_i >= 1 here.
    tl.store(lse_ptr + offs_n * stride_ln, m_i + tl.log(l_i), mask=offs_n < N)
    if HAS_V:
        inv_l = 1.0 / l_i
        if ONE_D:
            offs_d = tl.arange(0, BLOCK_D)
            tl.store(out_ptr + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od,
                     acc * inv_l[:, None], mask=(offs_n[:, None] < N) & (offs_d[None, :] < D))
        else:
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                o_ptrs = out_ptr + offs_n[:, None] * stride_on + offs_d[None, :] * stride_od
                o_mask = (offs_n[:, None] < N) & (offs_d[None, :] < D)
                tl.store(o_ptrs, tl.load(o_ptrs, mask=o_mask, other=0.0) * inv_l[:, None], mask=o_mask)


@triton.jit
def _argmax_fwd_kernel(
    q_ptr, k_ptr, bias_ptr,   # inputs: q (B, N, C), k (B, M, C), bias (B, M)
    idx_ptr,                  # output (B, N) int64
    N, M, C, scale_hi, scale_lo,
    stride_qb, stride_qn, stride_qc,
    stride_kb, stride_km, stride_kc,
    stride_bb, stride_bm,
    stride_ib, stride_in,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """Running (max, argmax) per query row. Ties go to the smallest j like torch.argmax: the
    first index within a tile, and a later tile replaces the running max only if strictly larger."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    q_ptr += pid_b * stride_qb
    k_ptr += pid_b * stride_kb
    bias_ptr += pid_b * stride_bb
    idx_ptr += pid_b * stride_ib
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)

    best = tl.full([BLOCK_N], float("-inf"), dtype=ACC)
    best_j = tl.zeros([BLOCK_N], dtype=tl.int64)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        s = _masked_scores(q_ptr, offs_n, N, stride_qn, stride_qc, k_ptr, offs_m, M, stride_km, stride_kc,
                           bias_ptr, stride_bm, C, scale, HAS_BIAS, BLOCK_N, BLOCK_M, BLOCK_C,
                           DOT_DTYPE, DOT_PRECISION, ACC)
        tile_max = tl.max(s, 1)
        tile_j = tl.argmax(s, 1, tie_break_left=True).to(tl.int64) + m0
        better = tile_max > best
        best = tl.where(better, tile_max, best)
        best_j = tl.where(better, tile_j, best_j)
    tl.store(idx_ptr + offs_n * stride_in, best_j, mask=offs_n < N)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
# With S_ij = s <q_i, k_j> + b_j and the saved row LSE L_i, the probabilities are recomputed as
# P_ij = exp(S_ij - L_i) (0 for masked and padded keys, and for padded query rows, whose L is
# loaded as +inf). The score gradient dS_ij = dLoss/dS_ij is
#   attend (upstream dO, output O):  dP_ij = <dO_i, v_j>,  delta_i = <dO_i, O_i>,
#                                    dS_ij = P_ij (dP_ij - delta_i)
#   lse    (upstream g):             dS_ij = g_i P_ij
# and the input gradients are
#   dq_i = s sum_j dS_ij k_j,   dk_j = s sum_i dS_ij q_i,   dv_j = sum_i P_ij dO_i,   db_j = sum_i dS_ij.
# The kernels accumulate the unscaled sums; the launcher multiplies dq and dk by s once (one
# rounding instead of one per pair).
# dq is a reduction over keys and dk, dv, db are reductions over queries, so two kernels each own
# their output rows: _softmax_bwd_dq_kernel (one program per query block, looping over key tiles)
# and _softmax_bwd_dkv_kernel (one program per key block, looping over query tiles, working in the
# transposed orientation S^T so that every product is a plain dot). Both recompute the scores, so
# the backward costs about 2x the forward's score matmuls plus the gradient matmuls, and no atomics.
# `rowvec` holds delta (attend) or g (lse), both (B, N) in the ACC dtype.

@triton.jit
def _softmax_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr,   # inputs: q (B, N, C), k (B, M, C), v (B, M, D), bias (B, M)
    do_ptr,                          # upstream dO (B, N, D) (attend only)
    lse_ptr, rowvec_ptr,             # saved L (B, N) and delta or g (B, N), ACC dtype
    dq_ptr,                          # output dq (B, N, C), ACC dtype, zero-filled
    N, M, C, D, scale_hi, scale_lo,
    stride_qb, stride_qn, stride_qc,
    stride_kb, stride_km, stride_kc,
    stride_vb, stride_vm, stride_vd,
    stride_bb, stride_bm,
    stride_dob, stride_don, stride_dod,
    stride_lb, stride_ln,
    stride_rb, stride_rn,
    stride_dqb, stride_dqn, stride_dqc,
    HAS_V: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_C: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    IN_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    q_ptr += pid_b * stride_qb
    k_ptr += pid_b * stride_kb
    v_ptr += pid_b * stride_vb
    bias_ptr += pid_b * stride_bb
    do_ptr += pid_b * stride_dob
    lse_ptr += pid_b * stride_lb
    rowvec_ptr += pid_b * stride_rb
    dq_ptr += pid_b * stride_dqb
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    L = tl.load(lse_ptr + offs_n * stride_ln, mask=offs_n < N, other=float("inf"))
    r = tl.load(rowvec_ptr + offs_n * stride_rn, mask=offs_n < N, other=0.0)

    dq = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        s = _masked_scores(q_ptr, offs_n, N, stride_qn, stride_qc, k_ptr, offs_m, M, stride_km, stride_kc,
                           bias_ptr, stride_bm, C, scale, HAS_BIAS, BLOCK_N, BLOCK_M, BLOCK_C,
                           DOT_DTYPE, DOT_PRECISION, ACC)
        p = tl.exp(s - L[:, None])
        if HAS_V:
            dp = _row_dots(do_ptr, offs_n, N, stride_don, stride_dod, v_ptr, offs_m, M, stride_vm, stride_vd, D,
                           BLOCK_N, BLOCK_M, BLOCK_D, DOT_DTYPE, DOT_PRECISION, ACC)
            ds = p * (dp - r[:, None])
        else:
            ds = p * r[:, None]
        ds_in = ds.to(IN_DTYPE)
        if ONE_C:
            dq += _tile_matmul(ds_in, k_ptr, offs_m, M, stride_km, stride_kc, 0, C,
                               BLOCK_C, DOT_DTYPE, DOT_PRECISION, ACC)
        else:
            _buffer_update(dq_ptr, offs_n, N, stride_dqn, stride_dqc, L, ds_in, k_ptr, offs_m, M,
                           stride_km, stride_kc, C, False, BLOCK_C, DOT_DTYPE, DOT_PRECISION, ACC)
    if ONE_C:
        offs_c = tl.arange(0, BLOCK_C)
        tl.store(dq_ptr + offs_n[:, None] * stride_dqn + offs_c[None, :] * stride_dqc, dq,
                 mask=(offs_n[:, None] < N) & (offs_c[None, :] < C))


@triton.jit
def _softmax_bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr,   # inputs: q (B, N, C), k (B, M, C), v (B, M, D), bias (B, M)
    do_ptr,                          # upstream dO (B, N, D) (attend only)
    lse_ptr, rowvec_ptr,             # saved L (B, N) and delta or g (B, N), ACC dtype
    dk_ptr, dv_ptr, dbias_ptr,       # outputs dk (B, M, C), dv (B, M, D), dbias (B, M): ACC, zero-filled
    N, M, C, D, scale_hi, scale_lo,
    stride_qb, stride_qn, stride_qc,
    stride_kb, stride_km, stride_kc,
    stride_vb, stride_vm, stride_vd,
    stride_bb, stride_bm,
    stride_dob, stride_don, stride_dod,
    stride_lb, stride_ln,
    stride_rb, stride_rn,
    stride_dkb, stride_dkm, stride_dkc,
    stride_dvb, stride_dvm, stride_dvd,
    stride_dbb, stride_dbm,
    HAS_V: tl.constexpr, HAS_BIAS: tl.constexpr, ONE_C: tl.constexpr, ONE_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    IN_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
    q_ptr += pid_b * stride_qb
    k_ptr += pid_b * stride_kb
    v_ptr += pid_b * stride_vb
    bias_ptr += pid_b * stride_bb
    do_ptr += pid_b * stride_dob
    lse_ptr += pid_b * stride_lb
    rowvec_ptr += pid_b * stride_rb
    dk_ptr += pid_b * stride_dkb
    dv_ptr += pid_b * stride_dvb
    dbias_ptr += pid_b * stride_dbb
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_m * stride_bm, mask=offs_m < M, other=float("-inf")).to(ACC)

    dk = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    dv = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    db = tl.zeros([BLOCK_M], dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        L = tl.load(lse_ptr + offs_n * stride_ln, mask=offs_n < N, other=float("inf"))
        r = tl.load(rowvec_ptr + offs_n * stride_rn, mask=offs_n < N, other=0.0)
        st = _row_dots(k_ptr, offs_m, M, stride_km, stride_kc, q_ptr, offs_n, N, stride_qn, stride_qc, C,
                       BLOCK_M, BLOCK_N, BLOCK_C, DOT_DTYPE, DOT_PRECISION, ACC) * scale  # (BLOCK_M, BLOCK_N)
        if HAS_BIAS:
            st += b[:, None]
        st = tl.where(offs_m[:, None] < M, st, float("-inf"))
        pt = tl.exp(st - L[None, :])
        if HAS_V:
            pt_in = pt.to(IN_DTYPE)
            if ONE_D:
                dv += _tile_matmul(pt_in, do_ptr, offs_n, N, stride_don, stride_dod, 0, D,
                                   BLOCK_D, DOT_DTYPE, DOT_PRECISION, ACC)
            else:
                _buffer_update(dv_ptr, offs_m, M, stride_dvm, stride_dvd, L, pt_in, do_ptr, offs_n, N,
                               stride_don, stride_dod, D, False, BLOCK_D, DOT_DTYPE, DOT_PRECISION, ACC)
            dpt = _row_dots(v_ptr, offs_m, M, stride_vm, stride_vd, do_ptr, offs_n, N, stride_don, stride_dod, D,
                            BLOCK_M, BLOCK_N, BLOCK_D, DOT_DTYPE, DOT_PRECISION, ACC)
            dst = pt * (dpt - r[None, :])
        else:
            dst = pt * r[None, :]
        if HAS_BIAS:
            db += tl.sum(dst, 1)
        dst_in = dst.to(IN_DTYPE)
        if ONE_C:
            dk += _tile_matmul(dst_in, q_ptr, offs_n, N, stride_qn, stride_qc, 0, C,
                               BLOCK_C, DOT_DTYPE, DOT_PRECISION, ACC)
        else:
            _buffer_update(dk_ptr, offs_m, M, stride_dkm, stride_dkc, L, dst_in, q_ptr, offs_n, N,
                           stride_qn, stride_qc, C, False, BLOCK_C, DOT_DTYPE, DOT_PRECISION, ACC)

    if ONE_C:
        offs_c = tl.arange(0, BLOCK_C)
        tl.store(dk_ptr + offs_m[:, None] * stride_dkm + offs_c[None, :] * stride_dkc, dk,
                 mask=(offs_m[:, None] < M) & (offs_c[None, :] < C))
    if HAS_V:
        if ONE_D:
            offs_d = tl.arange(0, BLOCK_D)
            tl.store(dv_ptr + offs_m[:, None] * stride_dvm + offs_d[None, :] * stride_dvd, dv,
                     mask=(offs_m[:, None] < M) & (offs_d[None, :] < D))
    if HAS_BIAS:
        tl.store(dbias_ptr + offs_m * stride_dbm, db, mask=offs_m < M)


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
def _strides2(t):
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def _strides3(t):
    return (0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2))


def _softmax_fwd(q, k, v, bias, scale):
    """Launch the forward. Returns (out (B, N, D) or None, lse (B, N)), both in the ACC dtype."""
    _check(q, k, v, bias)
    B, N, C = q.shape
    M = k.shape[1]
    _grid_batch_ok(B)
    D = v.shape[2] if v is not None else 1
    meta = _meta(q, k, D)
    acc = accumulation_dtype(q.dtype)
    lse_out = torch.empty(B, N, dtype=acc, device=q.device)
    out = torch.zeros(B, N, D, dtype=acc, device=q.device) if v is not None else None
    hi, lo = _scale_pair(scale)
    grid = (triton.cdiv(N, meta["BLOCK_N"]), B)
    _attend_fwd_kernel[grid](
        q, k, v if v is not None else q, bias if bias is not None else q,
        out if out is not None else lse_out, lse_out,
        N, M, C, D, hi, lo,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides2(bias), *_strides3(out), *_strides2(lse_out),
        HAS_V=v is not None, HAS_BIAS=bias is not None, ONE_D=meta["ONE_D"],
        BLOCK_N=meta["BLOCK_N"], BLOCK_M=meta["BLOCK_M"], BLOCK_C=meta["BLOCK_C"], BLOCK_D=meta["BLOCK_D"],
        IN_DTYPE=meta["IN_DTYPE"], DOT_DTYPE=meta["DOT_DTYPE"], DOT_PRECISION=meta["DOT_PRECISION"],
        ACC=meta["ACC"], num_warps=meta["num_warps"], num_stages=meta["num_stages"],
    )
    return out, lse_out


def _softmax_bwd(q, k, v, bias, scale, lse_saved, rowvec, dout, need_q, need_kvb):
    """Launch the two backward kernels. rowvec is delta (attend) or g (lse), (B, N) in ACC dtype.

    Returns dq, dk, dv, dbias in the ACC dtype (None where not requested / not applicable).
    """
    B, N, C = q.shape
    M = k.shape[1]
    D = v.shape[2] if v is not None else 1
    meta = _meta(q, k, D)
    acc = accumulation_dtype(q.dtype)
    hi, lo = _scale_pair(scale)
    common = dict(HAS_V=v is not None, HAS_BIAS=bias is not None, ONE_C=meta["ONE_C"],
                  BLOCK_N=meta["BLOCK_N"], BLOCK_M=meta["BLOCK_M"], BLOCK_C=meta["BLOCK_C"],
                  BLOCK_D=meta["BLOCK_D"], IN_DTYPE=meta["IN_DTYPE"], DOT_DTYPE=meta["DOT_DTYPE"],
                  DOT_PRECISION=meta["DOT_PRECISION"], ACC=meta["ACC"], num_warps=meta["num_warps"],
                  num_stages=meta["num_stages"])
    v_arg = v if v is not None else q
    bias_arg = bias if bias is not None else q
    do_arg = dout if dout is not None else q
    dq = dk = dv = db = None
    if need_q:
        dq = torch.zeros(B, N, C, dtype=acc, device=q.device)
        _softmax_bwd_dq_kernel[(triton.cdiv(N, meta["BLOCK_N"]), B)](
            q, k, v_arg, bias_arg, do_arg, lse_saved, rowvec, dq,
            N, M, C, D, hi, lo,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides2(bias), *_strides3(dout),
            *_strides2(lse_saved), *_strides2(rowvec), *_strides3(dq),
            **common,
        )
    if need_kvb:
        dk = torch.zeros(B, M, C, dtype=acc, device=q.device)
        dv = torch.zeros(B, M, D, dtype=acc, device=q.device) if v is not None else None
        db = torch.zeros(B, M, dtype=acc, device=q.device) if bias is not None else None
        _softmax_bwd_dkv_kernel[(triton.cdiv(M, meta["BLOCK_M"]), B)](
            q, k, v_arg, bias_arg, do_arg, lse_saved, rowvec,
            dk, dv if dv is not None else dk, db if db is not None else dk,
            N, M, C, D, hi, lo,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides2(bias), *_strides3(dout),
            *_strides2(lse_saved), *_strides2(rowvec), *_strides3(dk), *_strides3(dv), *_strides2(db),
            ONE_D=meta["ONE_D"], **common,
        )
    if dq is not None:
        dq.mul_(scale)
    if dk is not None:
        dk.mul_(scale)
    return dq, dk, dv, db


def _argmax_fwd(q, k, bias, scale):
    _check(q, k, bias)
    B, N, C = q.shape
    M = k.shape[1]
    _grid_batch_ok(B)
    meta = _meta(q, k)
    idx = torch.empty(B, N, dtype=torch.int64, device=q.device)
    hi, lo = _scale_pair(scale)
    _argmax_fwd_kernel[(triton.cdiv(N, meta["BLOCK_N"]), B)](
        q, k, bias if bias is not None else q, idx,
        N, M, C, hi, lo,
        *_strides3(q), *_strides3(k), *_strides2(bias), *_strides2(idx),
        HAS_BIAS=bias is not None, BLOCK_N=meta["BLOCK_N"], BLOCK_M=meta["BLOCK_M"], BLOCK_C=meta["BLOCK_C"],
        DOT_DTYPE=meta["DOT_DTYPE"], DOT_PRECISION=meta["DOT_PRECISION"], ACC=meta["ACC"],
        num_warps=meta["num_warps"], num_stages=meta["num_stages"],
    )
    return idx


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


# ----------------------------------------------------------------------------------------------
# autograd Functions
# ----------------------------------------------------------------------------------------------
class _LSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, bias, scale):
        _, lse_acc = _softmax_fwd(q, k, None, bias, scale)
        ctx.save_for_backward(q, k, bias, lse_acc)
        ctx.scale = scale
        return lse_acc.to(q.dtype)

    @staticmethod
    def backward(ctx, g):
        q, k, bias, lse_acc = ctx.saved_tensors
        need_q, need_k, need_b, _ = ctx.needs_input_grad
        dq, dk, _, db = _softmax_bwd(q, k, None, bias, ctx.scale, lse_acc, g.to(lse_acc.dtype), None,
                                     need_q, need_k or need_b)
        return (_cast(dq, q.dtype) if need_q else None, _cast(dk, k.dtype) if need_k else None,
                _cast(db, bias.dtype) if need_b else None, None)


class _Attend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        out_acc, lse_acc = _softmax_fwd(q, k, v, bias, scale)
        ctx.save_for_backward(q, k, v, bias, out_acc, lse_acc)
        ctx.scale = scale
        return out_acc.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, out_acc, lse_acc = ctx.saved_tensors
        need_q, need_k, need_v, need_b, _ = ctx.needs_input_grad
        delta = (dout.to(out_acc.dtype) * out_acc).sum(-1)  # (B, N): <dO_i, O_i>
        dq, dk, dv, db = _softmax_bwd(q, k, v, bias, ctx.scale, lse_acc, delta, dout,
                                      need_q, need_k or need_v or need_b)
        return (_cast(dq, q.dtype) if need_q else None, _cast(dk, k.dtype) if need_k else None,
                _cast(dv, v.dtype) if need_v else None, _cast(db, bias.dtype) if need_b else None, None)


# ----------------------------------------------------------------------------------------------
# Backend entry points (validated (B, N, C) inputs; see kernels/softmax.py for the docstrings)
# ----------------------------------------------------------------------------------------------
def lse(q, k, scale, bias):
    """(B, N) in q.dtype: L_i = log sum_j exp(scale <q_i, k_j> + bias_j)."""
    return _LSE.apply(q, k, bias, float(scale))


def attend(q, k, v, scale, bias):
    """(B, N, D) in q.dtype: sum_j softmax_j(S_ij) v_j."""
    return _Attend.apply(q, k, v, bias, float(scale))


def argmax(q, k, scale, bias):
    """(B, N) int64: argmax_j S_ij, ties to the smallest j."""
    return _argmax_fwd(q, k, bias, float(scale))
