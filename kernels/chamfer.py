"""Nearest neighbours, Chamfer distance and per-vertex mean distance (PMD) on 3-D points."""
from __future__ import annotations

import torch

from . import _validate as check
from .dispatch import module, resolve


def _points(x, y):
    x, unbatched = check.as_batched("x", x, last_dim=3)
    y, y_unbatched = check.as_batched("y", y, last_dim=3)
    if unbatched != y_unbatched:
        raise ValueError("x and y must both be batched (B, N, 3) or both unbatched (N, 3)")
    check.same_kind("x", x, y=y)
    return x, y, unbatched


def _nearest(x, y, backend):
    """(sq_dist, idx) on validated (B, N, 3) / (B, M, 3) inputs."""
    name = resolve("nearest", backend, x.device, x.shape[0] * x.shape[1] * y.shape[1])
    with torch.no_grad():
        idx = module("nearest", name).nearest_index(x.detach(), y.detach())
    # The backends return indices only; the distance is re-gathered here so that autograd
    # carries the gradient to both x and y (and the index itself has none).
    matched = y.gather(1, idx.unsqueeze(-1).expand(-1, -1, 3))  # (B, N, 3)
    return ((x - matched) ** 2).sum(-1), idx


def nearest(x, y, *, backend="auto"):
    """Each x_i's nearest neighbour in y.

    Args:
        x: (B, N, 3) or (N, 3) points.  y: (B, M, 3) or (M, 3) points, same dtype/device.
        backend: "auto", "torch", "chunked", "keops", "triton" or "kdtree".

    Returns:
        sq_dist: (B, N) squared distance |x_i - y_idx(i)|^2, differentiable w.r.t. x and y.
        idx: (B, N) int64 index into y (no gradient).
    """
    x, y, unbatched = _points(x, y)
    d2, idx = _nearest(x, y, backend)
    return (d2.squeeze(0), idx.squeeze(0)) if unbatched else (d2, idx)


def chamfer(x, y, *, reduction="mean", backend="auto"):
    """Symmetric Chamfer distance with squared distances and mean reduction per direction:
        CD_b = mean_i min_j |x_i - y_j|^2 + mean_j min_i |x_i - y_j|^2.

    Args:
        x: (B, N, 3) or (N, 3).  y: (B, M, 3) or (M, 3).
        reduction: "mean" over the batch, "sum", or "none" for the (B,) values.
        backend: as in :func:`nearest`.

    Returns:
        scalar, or (B,) with reduction "none"; differentiable w.r.t. x and y.
    """
    reduction = check.reduction_name(reduction)
    x, y, _ = _points(x, y)
    per_batch = _nearest(x, y, backend)[0].mean(1) + _nearest(y, x, backend)[0].mean(1)  # (B,)
    return check.reduce(per_batch, reduction)


def pmd(x, y, *, reduction="mean"):
    """Point-wise mesh distance: mean over vertices and coordinates of (x - y)^2.

    Both meshes must share vertex order (same N). O(N); no kernel needed.

    Args:
        x, y: (B, N, 3) or (N, 3), same shape.
        reduction: "mean" over the batch, "sum", or "none" for the (B,) values.
    """
    reduction = check.reduction_name(reduction)
    x, y, _ = _points(x, y)
    if x.shape != y.shape:
        raise ValueError(f"pmd needs vertex-aligned meshes of one shape, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    return check.reduce(((x - y) ** 2).mean(dim=(1, 2)), reduction)
