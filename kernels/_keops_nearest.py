"""KeOps nearest neighbour (``backend="keops"``): ArgMin of direct squared differences.

KeOps' Min has no autodiff, so only indices come back; the public op re-gathers distances in torch.
"""
from __future__ import annotations

import torch
import pykeops
from pykeops.torch import LazyTensor

pykeops.set_verbose(False)  # one line per compiled module otherwise


def nearest_index(x, y):
    """(B, N) int64 index of each x_i's nearest y_j; x (B, N, 3), y (B, M, 3)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xi = LazyTensor(x.to(dtype).contiguous()[:, :, None, :])
    yj = LazyTensor(y.to(dtype).contiguous()[:, None, :, :])
    return ((xi - yj) ** 2).sum(-1).argmin(dim=2).squeeze(-1).long()
