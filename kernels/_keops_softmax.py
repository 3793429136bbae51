"""KeOps backend (``backend="keops"``): LazyTensor reductions on CPU (g++) or GPU (NVRTC).

Each formula is compiled once per dtype and dimension and cached in KeOps' per-user folder. To
keep that count small, C and D are zero-padded up to power-of-two buckets (zero channels leave
<q_i, k_j> unchanged; zero value columns are sliced off) and a bias is always passed (zeros when
None), so one module serves every size in a bucket with or without a bias.

KeOps turns a -inf inside its online log-sum-exp into NaN, so masked keys get a large finite
negative bias instead: exp(-1e30 + |S|) is exactly 0 in fp32 and fp64, so the result is the same.
16-bit inputs are computed in float32 (KeOps has no bfloat16) and cast back.
"""
from __future__ import annotations

import torch
import pykeops
from pykeops.torch import LazyTensor

pykeops.set_verbose(False)  # one line per compiled module otherwise

MASKED_BIAS = -1e30


def _bucket(n: int) -> int:
    """Smallest power of two >= n (>= 1): the padded width compiled for n."""
    return 1 << max(0, (n - 1).bit_length())


def _pad_last(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))


def _prepare(q, k, bias):
    """Lazy scores' operands: (B, N, 1, C') queries, (B, 1, M, C') keys, (B, 1, M, 1) bias."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    width = _bucket(q.shape[-1])
    q = _pad_last(q.to(dtype), width).contiguous()
    k = _pad_last(k.to(dtype), width).contiguous()
    if bias is None:
        bias = torch.zeros(k.shape[0], k.shape[1], dtype=dtype, device=k.device)
    else:
        bias = bias.to(dtype).clamp(min=MASKED_BIAS)
    return LazyTensor(q[:, :, None, :]), LazyTensor(k[:, None, :, :]), LazyTensor(bias[:, None, :, None].contiguous())


def _scores(q, k, scale, bias):
    qi, kj, bj = _prepare(q, k, bias)
    return (qi | kj) * scale + bj  # symbolic (B, N, M)


def lse(q, k, scale, bias):
    return _scores(q, k, scale, bias).logsumexp(dim=2).squeeze(-1).to(q.dtype)


def attend(q, k, v, scale, bias):
    S = _scores(q, k, scale, bias)
    D = v.shape[-1]
    vj = LazyTensor(_pad_last(v.to(torch.float64 if q.dtype == torch.float64 else torch.float32), _bucket(D))
                    .contiguous()[:, None, :, :])
    return S.sumsoftmaxweight(vj, dim=2)[..., :D].to(q.dtype)


def argmax(q, k, scale, bias):
    return _scores(q, k, scale, bias).argmax(dim=2).squeeze(-1).long()
