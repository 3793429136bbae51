"""Pure-PyTorch streaming backend (``backend="chunked"``): row blocks at BLAS speed.

Scores are built one block of query rows at a time, (rows, M) with rows * M <= BLOCK_PAIRS, and
never kept: the forward saves only the row log-sum-exp L (and the output O for attend), and the
backward recomputes each block's probabilities P = exp(S - L) (flash-attention style). Memory is
O(N + M + BLOCK_PAIRS) per batch element whatever N and M are.

16-bit inputs are computed in float32 (CPU BLAS has no fast half GEMM, and the LSE needs fp32
range anyway); float64 stays float64 so that gradcheck can run.

Backward math, with S_ij = s <q_i, k_j> + b_j and P_ij = exp(S_ij - L_i):
  lse:    dS_ij = g_i P_ij                                  (g = dL)
  attend: dS_ij = P_ij (<dO_i, v_j> - delta_i),  delta_i = <dO_i, O_i>,  dv_j = sum_i P_ij dO_i
  both:   dq_i = s sum_j dS_ij k_j,  dk_j = s sum_i dS_ij q_i,  db_j = sum_i dS_ij
"""
from __future__ import annotations

import torch

from ._validate import accumulation_dtype

# 4M scores per block (16 MB in fp32): large enough that the GEMMs run at BLAS speed, small
# enough that the 3-4 live block buffers of the backward stay under ~64 MB.
BLOCK_PAIRS = 1 << 22


def _row_blocks(n: int, m: int):
    rows = max(1, min(n, BLOCK_PAIRS // max(m, 1)))
    for start in range(0, n, rows):
        yield start, min(start + rows, n)


def _block_scores(q_blk, k_b, scale, bias_b):
    """(rows, M) scores of one block; bias_b is (M,) or None."""
    if bias_b is None:
        return torch.mm(q_blk, k_b.t()).mul_(scale)
    return torch.addmm(bias_b.unsqueeze(0), q_blk, k_b.t(), alpha=scale)


def _grads_init(q, k, v, bias, need_q, need_k, need_v, need_bias):
    """Gradient buffers for the inputs that need one (None elsewhere)."""
    dq = torch.empty_like(q) if need_q else None
    dk = torch.zeros_like(k) if need_k else None
    dv = torch.zeros_like(v) if v is not None and need_v else None
    db = torch.zeros(k.shape[0], k.shape[1], dtype=k.dtype, device=k.device) if bias is not None and need_bias else None
    return dq, dk, dv, db


def _accumulate(dS, b, r0, r1, q, k, scale, dq, dk, db):
    if dq is not None:
        dq[b, r0:r1] = torch.mm(dS, k[b]).mul_(scale)
    if dk is not None:
        dk[b].addmm_(dS.t(), q[b, r0:r1], alpha=scale)
    if db is not None:
        db[b] += dS.sum(0)


class _LSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, bias, scale):
        B, N = q.shape[0], q.shape[1]
        out = torch.empty(B, N, dtype=q.dtype, device=q.device)
        for b in range(B):
            bias_b = None if bias is None else bias[b]
            for r0, r1 in _row_blocks(N, k.shape[1]):
                out[b, r0:r1] = torch.logsumexp(_block_scores(q[b, r0:r1], k[b], scale, bias_b), dim=-1)
        ctx.save_for_backward(q, k, bias, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, bias, lse = ctx.saved_tensors
        scale = ctx.scale
        need_q, need_k, need_bias, _ = ctx.needs_input_grad
        dq, dk, _, db = _grads_init(q, k, None, bias, need_q, need_k, False, need_bias)
        for b in range(q.shape[0]):
            bias_b = None if bias is None else bias[b]
            for r0, r1 in _row_blocks(q.shape[1], k.shape[1]):
                P = _block_scores(q[b, r0:r1], k[b], scale, bias_b).sub_(lse[b, r0:r1, None]).exp_()
                dS = P.mul_(g[b, r0:r1, None])  # (rows, M)
                _accumulate(dS, b, r0, r1, q, k, scale, dq, dk, db)
        return dq, dk, db, None


class _Attend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        B, N = q.shape[0], q.shape[1]
        out = torch.empty(B, N, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(B, N, dtype=q.dtype, device=q.device)
        for b in range(B):
            bias_b = None if bias is None else bias[b]
            for r0, r1 in _row_blocks(N, k.shape[1]):
                S = _block_scores(q[b, r0:r1], k[b], scale, bias_b)
                L = torch.logsumexp(S, dim=-1)
                lse[b, r0:r1] = L
                out[b, r0:r1] = torch.mm(S.sub_(L[:, None]).exp_(), v[b])
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, out, lse = ctx.saved_tensors
        scale = ctx.scale
        dq, dk, dv, db = _grads_init(q, k, v, bias, *ctx.needs_input_grad[:4])
        delta = (dout * out).sum(-1)  # (B, N)
        for b in range(q.shape[0]):
            bias_b = None if bias is None else bias[b]
            for r0, r1 in _row_blocks(q.shape[1], k.shape[1]):
                P = _block_scores(q[b, r0:r1], k[b], scale, bias_b).sub_(lse[b, r0:r1, None]).exp_()
                if dv is not None:
                    dv[b].addmm_(P.t(), dout[b, r0:r1])
                dP = torch.mm(dout[b, r0:r1], v[b].t())  # (rows, M)
                dS = P.mul_(dP.sub_(delta[b, r0:r1, None]))
                _accumulate(dS, b, r0, r1, q, k, scale, dq, dk, db)
        return dq, dk, dv, db, None


def _cast(dtype, *tensors):
    return [None if t is None else t.to(dtype) for t in tensors]


def lse(q, k, scale, bias):
    dtype = accumulation_dtype(q.dtype)
    return _LSE.apply(*_cast(dtype, q, k, bias), scale).to(q.dtype)


def attend(q, k, v, scale, bias):
    dtype = accumulation_dtype(q.dtype)
    return _Attend.apply(*_cast(dtype, q, k, v, bias), scale).to(q.dtype)


def argmax(q, k, scale, bias):
    q, k, bias = _cast(accumulation_dtype(q.dtype), q, k, bias)
    B, N = q.shape[0], q.shape[1]
    idx = torch.empty(B, N, dtype=torch.int64, device=q.device)
    for b in range(B):
        bias_b = None if bias is None else bias[b]
        for r0, r1 in _row_blocks(N, k.shape[1]):
            idx[b, r0:r1] = _block_scores(q[b, r0:r1], k[b], scale, bias_b).argmax(dim=-1)
    return idx
