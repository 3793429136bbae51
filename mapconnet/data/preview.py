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


def render_animal_preview(vertices: np.ndarray, faces: np.ndarray, path, panels: int = 10, columns: int = 5,
                          labels: list[str] | None = None):
    """Grid of animals seen from the front left and a little above: panel k shows identity k in
    pose k * (P // panels), so the panels differ in both body and pose.

    Args: vertices (I, P, V, 3) (the model's frame: Z up, head toward -Y); faces (F, 3); path: PNG;
    labels: optional name of each identity (its family) for the titles.
    """
    n = min(panels, vertices.shape[0])
    step = max(1, vertices.shape[1] // n)
    rows = -(-n // columns)
    fig = plt.figure(figsize=(3.0 * min(n, columns), 2.6 * rows))
    for k in range(n):
        ax = fig.add_subplot(rows, min(n, columns), k + 1, projection="3d")
        pose = (k * step) % vertices.shape[1]
        draw_mesh(ax, np.asarray(vertices[k, pose]), faces)
        ax.view_init(elev=12, azim=-35)
        ax.set_box_aspect((1, 1, 1), zoom=1.5)  # draw_mesh's cube is sized for upright people
        name = f"{labels[k]} (identity {k})" if labels else f"identity {k}"
        ax.set_title(f"{name}, pose {pose}", fontsize=8)
    fig.subplots_adjust(wspace=0, hspace=0, left=0, right=1, bottom=0, top=0.95)
    return save_figure(fig, path)
