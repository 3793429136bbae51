"""KeOps nearest neighbour (``backend="keops"``): ArgMin of the squared distance.

SqDist(x, y) is |x - y|^2 from direct differences (not |x|^2 - 2<x, y> + |y|^2, whose cancellation
error exceeds near-neighbour distances on unit-scale meshes). KeOps' Min has no autodiff, so only
indices come back and the public op re-gathers distances in torch. One module per dtype (D = 3);
float16/bfloat16 points are compared in float32.
"""
from __future__ import annotations

import functools

import pykeops
from pykeops.torch import Genred

from ._validate import accumulation_dtype

pykeops.set_verbose(False)  # one line per compiled module otherwise


@functools.cache
def _argmin_op() -> Genred:
    return Genred("SqDist(X, Y)", ["X = Vi(3)", "Y = Vj(3)"], reduction_op="ArgMin", axis=1)


def nearest_index(x, y):
    """(B, N) int64 index of each x_i's nearest y_j; x (B, N, 3), y (B, M, 3), no gradient."""
    dtype = accumulation_dtype(x.dtype)
    idx = _argmin_op()(x.to(dtype).contiguous(), y.to(dtype).contiguous(), backend="auto")  # (B, N, 1)
    return idx.squeeze(-1).long()
