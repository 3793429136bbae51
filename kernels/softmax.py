"""The correspondence softmax: streaming log-sum-exp, softmax-weighted sum and argmax.

Scores are S_ij = scale * <q_i, k_j> + bias_j between queries q (B, N, C) and keys k (B, M, C).
No backend but ``"torch"`` materialises the (B, N, M) matrix, forward or backward.
"""
from __future__ import annotations

import torch

from . import _validate as check
from .dispatch import module, resolve


def _prepare(q, k, scale, bias):
    q, unbatched = check.as_batched("q", q)
    k, k_unbatched = check.as_batched("k", k)
    if k_unbatched != unbatched:
        raise ValueError(f"q and k must both be batched (3-D) or both unbatched (2-D), got shapes "
                         f"{tuple(q.shape) if not unbatched else tuple(q.shape[1:])} and "
                         f"{tuple(k.shape) if not k_unbatched else tuple(k.shape[1:])}")
    check.same_kind("q", q, k=k)
    check.channels_match(q, k)
    scale = check.positive_scalar("scale", scale)
    bias = check.bias_for(bias, k, unbatched)
    return q, k, scale, bias, unbatched


def _backend(backend, q, k):
    return module("softmax", resolve("softmax", backend, q.device, q.shape[0] * q.shape[1] * k.shape[1]))


def _unbatch(out, unbatched):
    return out.squeeze(0) if unbatched else out


def softmax_lse(q, k, *, scale=1.0, bias=None, backend="auto"):
    """Row log-sum-exp of the scores, without building them.

    Args:
        q: (B, N, C) or (N, C) floating tensor of queries.
        k: (B, M, C) or (M, C) keys, same dtype and device as q.
        scale: positive float s in S_ij = s <q_i, k_j> + bias_j.
        bias: optional (B, M) (or (M,)) per-key bias; -inf masks a key.
        backend: "auto", "torch", "chunked", "keops" or "triton".

    Returns:
        (B, N) (or (N,)) tensor L_i = log sum_j exp(S_ij), differentiable w.r.t. q, k and bias.
        The column LSE is ``softmax_lse(k, q, ...)`` with a bias over q.
    """
    q, k, scale, bias, unbatched = _prepare(q, k, scale, bias)
    return _unbatch(_backend(backend, q, k).lse(q, k, scale, bias), unbatched)


def softmax_attend(q, k, v, *, scale=1.0, bias=None, backend="auto"):
    """Softmax-weighted sum of values (flash attention with any value width D).

    Args:
        q: (B, N, C) or (N, C) queries.  k: (B, M, C) or (M, C) keys.
        v: (B, M, D) or (M, D) values (D = 3 for points, or any width for carried attributes).
        scale, bias, backend: as in :func:`softmax_lse`.

    Returns:
        (B, N, D) (or (N, D)) tensor O_i = sum_j softmax_j(S_ij) v_j, differentiable w.r.t.
        q, k, v and bias, with O(N + M) memory in the streaming backends.
    """
    q, k, scale, bias, unbatched = _prepare(q, k, scale, bias)
    v, v_unbatched = check.as_batched("v", v)
    if v_unbatched != unbatched:
        raise ValueError("v must be batched (3-D) exactly when q and k are")
    check.same_kind("k", k, v=v)
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v must have one row per key: k has M = {k.shape[1]} keys but v has shape "
                         f"{tuple(v.shape)}; expected (B, M, D)")
    return _unbatch(_backend(backend, q, k).attend(q, k, v, scale, bias), unbatched)


def softmax_argmax(q, k, *, scale=1.0, bias=None, backend="auto"):
    """Hard matching: index of the largest score per query.

    Args: as in :func:`softmax_lse`.

    Returns:
        (B, N) (or (N,)) int64 tensor argmax_j S_ij. No gradient.
    """
    q, k, scale, bias, unbatched = _prepare(q, k, scale, bias)
    with torch.no_grad():
        idx = _backend(backend, q, k).argmax(q.detach(), k.detach(), scale,
                                             None if bias is None else bias.detach())
    return _unbatch(idx, unbatched)
