"""KeOps backend (``backend="keops"``) of the correspondence softmax: lse, attend and argmax.

Why two formulas and a custom backward. KeOps compiles one shared library per formula x dtype x
variable dimensions with g++ (7-8 s each for the two below, 15-30 s for KeOps' autodiff formulas, on
a 2-core machine), and its own autodiff compiles one
more per differentiated variable: LogSumExp with gradients to q, k and bias is 4 modules,
SumSoftMaxWeight with v as well is 5, per (C, D). A cold CI run would spend most of its time in g++.
So everything here is built from two Genred formulas, over a batch dimension:

    row max   (m_o, argmax_o) = Max_ArgMax_r  <X_o, Y_r> + c_r
    row sum   out_o           = Sum_r  exp(<X_o, Y_r> + a_o + c_r) <F_o, H_r> W_r

With X = scale * q, Y = k, c = bias and m the row max:
  lse     L_i = m_i + log(row sum with a = -m, F = H = e1, W = 1) (the sum lies in [1, M], so
          neither the exp nor the log can overflow at any scale);
  attend  the row sum with W = [v, 1] gives sum_j exp(S_ij - m_i) [v_j, 1]; O = first D / last;
  argmax  the argmax of the row max.
Gradients are the flash-attention backward with P_ij = exp(S_ij - L_i) (never above 1), written as
row sums; key gradients swap the roles of i and j (X = k, a = bias, Y = scale * q, c = -L):
  lse     dq_i = g_i s sum_j P_ij k_j;      [dk_j, dbias_j] = sum_i P_ij g_i [s q_i, 1]
  attend  dS_ij = P_ij (<g_i, v_j> - delta_i) = P_ij <[g_i, -delta_i], [v_j, 1]>, delta_i = <g_i, O_i>:
          dq_i = sum_j dS_ij s k_j;  dk_j = sum_i dS_ij s q_i;  [dv_j, e_j] = sum_i P_ij [g_i, delta_i],
          dbias_j = sum_i dS_ij = <v_j, dv_j> - e_j (so that dbias rides on the dv pass: three passes,
          none wider than the C bucket when D < C).
Memory stays O(N + M): only the row max/LSE and the output are saved.

Buckets. X, Y and W are zero-padded to a C bucket (zero channels leave <q_i, k_j> unchanged) and
F, H to a bucket of D + 1 (lse uses the smallest, 4). Weights wider than the C bucket ([v, 1] or
[g, delta] when D + 1 > C bucket, lse's [s q, 1] when C fills its bucket, e.g. C = 256) are summed in
C-bucket-wide passes: the row sum is linear in W, so the passes reuse one module. A bias is always
passed (zeros when None).
Modules per dtype: one row max per C bucket, one row sum per (C bucket, F/H bucket); lse and attend
with D <= 3 share the F/H bucket 4, so lse + attend + argmax at one C with D <= 3 are 2 modules.

Masked keys: a -inf bias becomes -1e30. Every unmasked score is far below 1e29 in magnitude, so
exp(-1e30 + S - m) is exactly 0 in float32 and float64, as exp(-inf) would be, while the max, sums
and products stay finite: no inf - inf = NaN can arise inside KeOps. Gradients of masked keys are 0.

Dtypes: float32 and float64 run natively. float16 and bfloat16 are computed in float32 (KeOps has no
bfloat16, and float16 would add a third dtype of modules for little gain on CPU) and cast back;
autograd carries the casts.
"""
from __future__ import annotations

import functools

import pykeops
import torch
from pykeops.torch import Genred

from ._validate import accumulation_dtype

pykeops.set_verbose(False)  # one line per compiled module otherwise

MASKED_BIAS = -1e30
LSE_VALUE_BUCKET = 4  # width of F, H when there are no values (lse): the bucket of D + 1 for D <= 3


def _bucket(n: int) -> int:
    """Padded width compiled for n channels: 4, 8, 16, 32, 64, then multiples of 64."""
    if n <= 64:
        return max(4, 1 << (n - 1).bit_length())
    return -(-n // 64) * 64


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the last dim to `width`, contiguous (KeOps reads raw memory)."""
    if t.shape[-1] < width:
        t = torch.nn.functional.pad(t, (0, width - t.shape[-1]))
    return t.contiguous()


def _e1(like: torch.Tensor, width: int) -> torch.Tensor:
    """(B, n, width) rows (1, 0, ..., 0), for the factors of the row sum that a pass does not use."""
    out = like.new_zeros(like.shape[0], like.shape[1], width)
    out[..., 0] = 1
    return out


# ---------------------------------------------------------------------------------------------
# Launchers: the two Genred formulas. Inputs (B, No, .) are indexed by the output index o ("i"),
# (B, Nr, .) by the reduced index r ("j").


@functools.cache
def _max_op(cb: int) -> Genred:
    return Genred("(X | Y) + c", [f"X = Vi({cb})", f"Y = Vj({cb})", "c = Vj(1)"],
                  reduction_op="Max_ArgMax", axis=1)


@functools.cache
def _sum_op(cb: int, db: int) -> Genred:
    return Genred("Exp((X | Y) + a + c) * (F | H) * W",
                  [f"X = Vi({cb})", "a = Vi(1)", f"Y = Vj({cb})", "c = Vj(1)",
                   f"F = Vi({db})", f"H = Vj({db})", f"W = Vj({cb})"],
                  reduction_op="Sum", axis=1)


def _row_max(X, Y, c):
    """max_r and argmax_r of <X_o, Y_r> + c_r: (B, No) values and int64 indices.

    X (B, No, Cb), Y (B, Nr, Cb) padded to one bucket; c (B, Nr).
    """
    m, idx = _max_op(X.shape[-1])(X, Y, c.unsqueeze(-1).contiguous(), backend="auto")
    return m.squeeze(-1), idx.squeeze(-1)


def _row_sum(X, a, Y, c, F, H, W):
    """sum_r exp(<X_o, Y_r> + a_o + c_r) <F_o, H_r> W_r, shape (B, No, W.shape[-1]).

    X (B, No, Cb), Y (B, Nr, Cb) padded to the C bucket; a (B, No), c (B, Nr); F (B, No, Db),
    H (B, Nr, Db) padded to one bucket; W (B, Nr, K) any width, summed in Cb-wide passes.
    """
    cb, K = X.shape[-1], W.shape[-1]
    op = _sum_op(cb, F.shape[-1])
    a, c = a.unsqueeze(-1).contiguous(), c.unsqueeze(-1).contiguous()
    parts = [op(X, a, Y, c, F, H, _pad(W[..., s:s + cb], cb), backend="auto")[..., :min(cb, K - s)]
             for s in range(0, K, cb)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _operands(q, k, bias, scale):
    """X = scale * q and Y = k padded to the C bucket (B, N/M, Cb); c = bias with -inf -> -1e30."""
    cb = _bucket(q.shape[-1])
    return _pad(q * scale, cb), _pad(k, cb), bias.clamp(min=MASKED_BIAS)


def _key_gradients(X, Y, c, L, g, q, scale, need_k, need_bias):
    """lse's [dk_j, dbias_j] = sum_i P_ij g_i [s q_i, 1] (the i, j roles swapped); None if unused."""
    if not (need_k or need_bias):
        return None, None
    ones = torch.ones_like(q[..., :1])
    W = torch.cat([q * scale, ones], -1) if need_k and need_bias else (q * scale if need_k else ones)
    H_i = _pad(g.unsqueeze(-1), LSE_VALUE_BUCKET)  # <e1, H_i> = g_i
    out = _row_sum(Y, c, X, -L, _e1(Y, LSE_VALUE_BUCKET), H_i, W)  # (B, M, C + 1), (B, M, C) or (B, M, 1)
    return (out[..., :q.shape[-1]] if need_k else None), (out[..., -1] if need_bias else None)


# ---------------------------------------------------------------------------------------------
# autograd Functions: save tensors, call launchers. Inputs are float32 or float64.


class _LSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, bias, scale):
        X, Y, c = _operands(q, k, bias, scale)
        m, _ = _row_max(X, Y, c)
        e1_i, e1_j = _e1(q, LSE_VALUE_BUCKET), _e1(k, LSE_VALUE_BUCKET)
        s = _row_sum(X, -m, Y, c, e1_i, e1_j, torch.ones_like(k[..., :1]))[..., 0]  # in [1, M]
        L = m + torch.log(s)
        ctx.save_for_backward(q, k, bias, L)
        ctx.scale = scale
        return L

    @staticmethod
    def backward(ctx, g):
        q, k, bias, L = ctx.saved_tensors
        scale = ctx.scale
        X, Y, c = _operands(q, k, bias, scale)
        dq = None
        if ctx.needs_input_grad[0]:
            e1_i, e1_j = _e1(q, LSE_VALUE_BUCKET), _e1(k, LSE_VALUE_BUCKET)
            dq = g.unsqueeze(-1) * scale * _row_sum(X, -L, Y, c, e1_i, e1_j, k)  # (B, N, C)
        dk, dbias = _key_gradients(X, Y, c, L, g, q, scale, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return dq, dk, dbias, None


class _Attend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        X, Y, c = _operands(q, k, bias, scale)
        D, db = v.shape[-1], _bucket(v.shape[-1] + 1)
        m, _ = _row_max(X, Y, c)
        out = _row_sum(X, -m, Y, c, _e1(q, db), _e1(k, db), torch.cat([v, torch.ones_like(v[..., :1])], -1))
        den = out[..., D]  # sum_j exp(S_ij - m_i), in [1, M]
        O = out[..., :D] / den.unsqueeze(-1)  # (B, N, D)
        L = m + torch.log(den)
        ctx.save_for_backward(q, k, v, bias, O, L)
        ctx.scale = scale
        return O

    @staticmethod
    def backward(ctx, g):
        q, k, v, bias, O, L = ctx.saved_tensors
        scale = ctx.scale
        X, Y, c = _operands(q, k, bias, scale)
        db = _bucket(v.shape[-1] + 1)
        delta = (g * O).sum(-1, keepdim=True)  # (B, N, 1)
        F_i = _pad(torch.cat([g, -delta], -1), db)  # (B, N, Db): <F_i, H_j> = <g_i, v_j> - delta_i
        H_j = _pad(torch.cat([v, torch.ones_like(v[..., :1])], -1), db)  # (B, M, Db)
        dq = dk = dv = dbias = None
        if ctx.needs_input_grad[0]:
            dq = scale * _row_sum(X, -L, Y, c, F_i, H_j, k)  # (B, N, C)
        if ctx.needs_input_grad[1]:
            dk = _row_sum(Y, c, X, -L, H_j, F_i, q * scale)  # (B, M, C), roles swapped
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            out = _row_sum(Y, c, X, -L, _e1(k, db), _e1(q, db), torch.cat([g, delta], -1))  # (B, M, D + 1)
            dv = out[..., :-1]
            dbias = (v * dv).sum(-1) - out[..., -1] if ctx.needs_input_grad[3] else None
        return dq, dk, dv if ctx.needs_input_grad[2] else None, dbias, None


# ---------------------------------------------------------------------------------------------
# Backend entry points (validated (B, N, C) inputs of one dtype; see kernels.softmax for docs).


def _cast(q, k, bias):
    dtype = accumulation_dtype(q.dtype)
    bias = k.new_zeros(k.shape[:2], dtype=dtype) if bias is None else bias.to(dtype)
    return q.to(dtype), k.to(dtype), bias


def lse(q, k, scale, bias):
    """(B, N) row log-sum-exp in q.dtype; differentiable w.r.t. q, k and bias."""
    qc, kc, bc = _cast(q, k, bias)
    return _LSE.apply(qc, kc, bc, float(scale)).to(q.dtype)


def attend(q, k, v, scale, bias):
    """(B, N, D) softmax-weighted values in q.dtype; differentiable w.r.t. q, k, v and bias."""
    qc, kc, bc = _cast(q, k, bias)
    return _Attend.apply(qc, kc, v.to(qc.dtype), bc, float(scale)).to(q.dtype)


def argmax(q, k, scale, bias):
    """(B, N) int64 index of the largest score (no gradient)."""
    qc, kc, bc = _cast(q, k, bias)
    X, Y, c = _operands(qc, kc, bc, float(scale))
    return _row_max(X, Y, c)[1]
