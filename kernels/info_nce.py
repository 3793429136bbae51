"""Point-level InfoNCE with a streaming denominator."""
from __future__ import annotations

import torch

from . import _validate as check
from .dispatch import module, resolve


def info_nce(q, k, *, pos=None, tau=0.07, reduction="mean", backend="auto"):
    """InfoNCE of anchors q against all keys k, without an (N, M) logit matrix.

        loss_i = LSE_j(<q_i, k_j> / tau) - <q_i, k_pos(i)> / tau

    Every key other than the positive is a negative. Features are used as given (unit-normalise
    them first for the usual cosine form).

    Args:
        q: (B, N, C) or (N, C) anchors.  k: (B, M, C) or (M, C) keys, same dtype/device.
        pos: optional (B, N) (or (N,)) int64 index in [0, M) of each anchor's positive;
            None means pos_i = i, which needs N == M.
        tau: temperature > 0.
        reduction: "mean" (over batch and anchors), "sum" or "none" (the (B, N) losses).
        backend: "auto", "torch", "chunked", "keops" or "triton" (for the LSE).

    Returns:
        scalar, or (B, N) with reduction "none"; differentiable w.r.t. q and k.
    """
    q, unbatched = check.as_batched("q", q)
    k, k_unbatched = check.as_batched("k", k)
    if unbatched != k_unbatched:
        raise ValueError("q and k must both be batched (3-D) or both unbatched (2-D)")
    check.same_kind("q", q, k=k)
    check.channels_match(q, k)
    tau = check.positive_scalar("tau", tau)
    reduction = check.reduction_name(reduction)
    B, N, M = q.shape[0], q.shape[1], k.shape[1]
    if pos is None:
        if N != M:
            raise ValueError(f"pos=None pairs anchor i with key i and needs N == M, got N = {N}, M = {M}")
        positive = k
    else:
        if not isinstance(pos, torch.Tensor) or pos.dtype != torch.int64:
            raise TypeError(f"pos must be an int64 tensor, got {getattr(pos, 'dtype', type(pos).__name__)}")
        if unbatched and pos.dim() == 1:
            pos = pos.unsqueeze(0)
        if tuple(pos.shape) != (B, N):
            raise ValueError(f"pos must have shape (B, N) = {(B, N)}, got {tuple(pos.shape)}")
        if pos.device != q.device:
            raise ValueError(f"pos is on {pos.device} but q is on {q.device}; expected one device")
        if bool(((pos < 0) | (pos >= M)).any()):
            raise ValueError(f"pos values must lie in [0, M) = [0, {M}), "
                             f"got min {int(pos.min())}, max {int(pos.max())}")
        positive = k.gather(1, pos.unsqueeze(-1).expand(-1, -1, k.shape[-1]))  # (B, N, C)
    ops = module("softmax", resolve("softmax", backend, q.device, B * N * M))
    losses = ops.lse(q, k, 1.0 / tau, None) - (q * positive).sum(-1) / tau  # (B, N)
    if reduction == "none" and unbatched:
        return losses.squeeze(0)
    return check.reduce(losses, reduction)
