"""Pictures of meshes and numbers with matplotlib (no display needed).

Meshes are drawn as flat-shaded triangles seen from the front (anny's frame: Z up, the body's
front is -Y); per-vertex values (e.g. errors) colour the faces through a colour map with a bar.
Every figure is written atomically (temporary name, then rename).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mpl_toolkits.mplot3d.art3d import Poly3DCollection  # noqa: E402

from mapconnet.files import replacing  # noqa: E402

LIGHT = np.array([0.3, -1.0, 0.6]) / np.linalg.norm([0.3, -1.0, 0.6])


def save_figure(fig, path) -> Path:
    """Save `fig` as PNG at `path` atomically and close it."""
    path = Path(path)
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return path


def draw_mesh(ax, vertices: np.ndarray, faces: np.ndarray, *, values: np.ndarray | None = None,
              vmax: float | None = None, cmap: str = "viridis", view: str = "front"):
    """Draw one mesh on a 3-D axis.

    Args:
        vertices: (V, 3) float array.  faces: (F, 3) int array.
        values: optional (V,) per-vertex values; faces take the mean of their vertices' values.
        vmax: upper end of the colour scale (default: max of values).
        view: "front" (looking along +Y) or "side" (looking along -X).
    Returns:
        the ScalarMappable of the colours (for a colour bar) or None.
    """
    tris = vertices[faces]  # (F, 3, 3)
    normals = np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    shade = 0.35 + 0.65 * np.abs(normals @ LIGHT)  # (F,)
    mappable = None
    if values is None:
        colors = np.outer(shade, [0.78, 0.80, 0.86])
    else:
        face_values = values[faces].mean(axis=1)
        norm = matplotlib.colors.Normalize(0.0, vmax if vmax is not None else float(values.max()) or 1.0)
        mappable = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
        colors = mappable.to_rgba(face_values)[:, :3] * (0.55 + 0.45 * shade[:, None])
    ax.add_collection3d(Poly3DCollection(tris, facecolors=np.clip(colors, 0, 1), edgecolors="none"))
    lo, hi = vertices.min(0), vertices.max(0)
    centre, half = (lo + hi) / 2, (hi - lo).max() / 2
    for setter, c in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), centre):
        setter(c - half, c + half)
    ax.view_init(elev=5, azim=-90 if view == "front" else 0)
    ax.set_box_aspect((1, 1, 1))
    ax.set_axis_off()
    return mappable


def mesh_panel(meshes, path, *, suptitle: str | None = None, colorbar_label: str = "") -> Path:
    """One row of meshes side by side, saved as PNG.

    Args:
        meshes: list of dicts with "vertices" (V, 3), "faces" (F, 3), "title", and optionally
            "values" (V,) and "vmax" for error colouring (a colour bar is added for those).
        path: output PNG path.
    """
    fig = plt.figure(figsize=(3.2 * len(meshes), 4.2))
    for i, m in enumerate(meshes):
        ax = fig.add_subplot(1, len(meshes), i + 1, projection="3d")
        mappable = draw_mesh(ax, np.asarray(m["vertices"]), np.asarray(m["faces"]),
                             values=m.get("values"), vmax=m.get("vmax"), view=m.get("view", "front"))
        ax.set_title(m["title"], fontsize=10)
        if mappable is not None:
            fig.colorbar(mappable, ax=ax, shrink=0.6, label=colorbar_label)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    return save_figure(fig, path)


def histogram(values, path, *, xlabel: str, title: str = "", bins: int = 30) -> Path:
    """A histogram of `values` saved as PNG."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.hist(np.asarray(values, dtype=float), bins=bins, color="#4c72b0", edgecolor="white")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)
