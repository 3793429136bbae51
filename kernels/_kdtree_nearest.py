"""scipy cKDTree nearest neighbour (``backend="kdtree"``): O((N + M) log M) on the CPU.

Exact in float64 (coordinates are promoted), then indices are returned on the input's device.
Builds one tree per batch element and queries with every core (workers=-1).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree


def nearest_index(x, y):
    """(B, N) int64 index of each x_i's nearest y_j; x (B, N, 3), y (B, M, 3)."""
    xs = x.detach().to("cpu", torch.float64).numpy()
    ys = y.detach().to("cpu", torch.float64).numpy()
    idx = np.stack([cKDTree(yb).query(xb, k=1, workers=-1)[1] for xb, yb in zip(xs, ys)])
    return torch.from_numpy(idx.astype(np.int64)).to(x.device)
