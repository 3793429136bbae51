"""Entropic optimal-transport correspondence (log-domain Sinkhorn) composed from streaming LSEs."""
from __future__ import annotations

import math

import torch

from . import _validate as check
from .dispatch import module, resolve


def sinkhorn_correspondence(q, k, v, *, eps=0.03, iters=5, backend="auto", return_bias=False):
    """Warp values v (on the keys) into the queries' order through an entropic transport plan.

    With cost matrix C_ij = <q_i, k_j> (cosine similarity for unit-normalised features),
    log K_ij = (C_ij - 1) / eps and uniform marginals mu = 1/N, nu = 1/M, runs `iters` log-domain
    Sinkhorn iterations (docs/DESIGN.md section 3.1), then normalises the plan's rows:
        W_i = sum_j softmax_j(C_ij / eps + log b_j) v_j.
    Each iteration is two streaming LSEs; no (N, M) matrix is built outside backend "torch".
    The a-update after the last b-update is skipped: the row normalisation cancels it.

    Args:
        q: (B, N, C) or (N, C) query features (identity mesh).
        k: (B, M, C) or (M, C) key features (pose mesh), same dtype/device.
        v: (B, M, D) or (M, D) values on the keys (pose vertices for the warp).
        eps: entropic regularisation > 0 (logits are C / eps, so eps = 0.01 gives |S| <= 100).
        iters: number of Sinkhorn iterations >= 0 (0 is the plain softmax correspondence).
        backend: "auto", "torch", "chunked", "keops" or "triton".
        return_bias: also return log b.

    Returns:
        (B, N, D) warped values, differentiable through every iteration; with ``return_bias`` also
        the final column bias log b of shape (B, M), so that
        ``softmax_argmax(q, k, scale=1/eps, bias=log_b)`` is the hard matching of the final plan.
    """
    q, unbatched = check.as_batched("q", q)
    k, k_unbatched = check.as_batched("k", k)
    v, v_unbatched = check.as_batched("v", v)
    if not unbatched == k_unbatched == v_unbatched:
        raise ValueError(f"q, k and v must all be batched (3-D) or all unbatched (2-D), got q {q.dim() - unbatched}-D, "
                         f"k {k.dim() - k_unbatched}-D, v {v.dim() - v_unbatched}-D")
    check.same_kind("q", q, k=k, v=v)
    check.channels_match(q, k)
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v must have one row per key: k has M = {k.shape[1]} keys but v has shape "
                         f"{tuple(v.shape)}; expected (B, M, D)")
    eps = check.positive_scalar("eps", eps)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an integer >= 0, got {iters!r}")
    B, N, M = q.shape[0], q.shape[1], k.shape[1]
    name = resolve("sinkhorn", backend, q.device, B * N * M)
    ops = module("softmax", name)
    scale = 1.0 / eps
    if name == "torch":  # dense: the score matrix is built once for every pass
        out, log_b = ops.sinkhorn(q, k, v, scale, iters)
    else:
        log_b = torch.zeros(B, M, dtype=q.dtype, device=q.device)  # any constant: softmax ignores it
        if iters > 0:
            log_mu, log_nu = -math.log(N), -math.log(M)
            log_a = torch.full((B, N), log_mu, dtype=q.dtype, device=q.device)
            for it in range(iters):
                if it > 0:
                    log_a = log_mu - ops.lse(q, k, scale, log_b)
                log_b = log_nu - ops.lse(k, q, scale, log_a)
        out = ops.attend(q, k, v, scale, log_b)
    if unbatched:
        out, log_b = out.squeeze(0), log_b.squeeze(0)
    return (out, log_b) if return_bias else out
