"""A picture of a dataset: sampled bodies from the front and the side."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from mapconnet.render import draw_mesh, save_figure


def render_preview(vertices: np.ndarray, faces: np.ndarray, path, columns: int = 6):
    """Grid of (identity i, pose i) meshes: front views on the first row, side views on the second.

    Args: vertices (I, P, V, 3); faces (F, 3); path: PNG to write.
    """
    n = min(columns, vertices.shape[0], vertices.shape[1])
    fig = plt.figure(figsize=(2.4 * n, 6.4))
    for row, view in enumerate(("front", "side")):
        for i in range(n):
            ax = fig.add_subplot(2, n, row * n + i + 1, projection="3d")
            draw_mesh(ax, np.asarray(vertices[i, i]), faces, view=view)
            ax.set_title(f"identity {i}, pose {i}" if row == 0 else "side", fontsize=8)
    return save_figure(fig, path)
