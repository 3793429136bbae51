"""Pure-PyTorch streaming nearest neighbour (``backend="chunked"``): blocks of query rows.

Squared distances are summed coordinate by coordinate from direct differences (no
|x|^2 - 2<x, y> + |y|^2 expansion: its cancellation error exceeds near-neighbour distances on
unit-scale meshes), one (rows, M) block at a time.
"""
from __future__ import annotations

import torch

from ._chunked_softmax import _row_blocks


def nearest_index(x, y):
    """(B, N) int64 index of each x_i's nearest y_j; x (B, N, 3), y (B, M, 3)."""
    B, N = x.shape[0], x.shape[1]
    idx = torch.empty(B, N, dtype=torch.int64, device=x.device)
    for b in range(B):
        yt = y[b].t()  # (3, M)
        for r0, r1 in _row_blocks(N, y.shape[1]):
            xb = x[b, r0:r1]  # (rows, 3)
            d2 = (xb[:, 0:1] - yt[0:1]).square_()
            for c in range(1, x.shape[-1]):
                d2.add_((xb[:, c:c + 1] - yt[c:c + 1]).square_())
            idx[b, r0:r1] = d2.argmin(dim=-1)
    return idx
