"""Resolutions as sparse linear maps from the full anny template (13,348 vertices).

Every mesh of a dataset shares one topology, so a resolution is one sparse matrix W (V', 13348)
and faces F'; a posed full-resolution mesh v (13348, 3) becomes W @ v.
- `lite` (1,723) and `smpl` (6,890, SMPL's count): the template decimated once by quadric
  simplification; each kept vertex maps to its closest point on the template surface
  (barycentric weights of that triangle), so the map is exact on the template and follows the
  surface in every pose.
- `full`: the identity.
- `x4`, `x16`: one or two rounds of midpoint subdivision (each triangle into four; a new vertex is
  the mean of its edge's ends), so the original vertices are unchanged and planar patches stay planar.
Maps are built once and cached in ~/.cache/mapconnet (per anny version and resolution).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from mapconnet.files import replacing

# name: target vertex count for decimation, None for the template itself, or rounds of subdivision
RESOLUTIONS = {"lite": 1723, "smpl": 6890, "full": None, "x4": 1, "x16": 2}
MAP_VERSION = 2  # part of the cache key: bump when the construction of a map changes
CACHE = Path(os.environ.get("MAPCONNET_CACHE_DIR", Path.home() / ".cache" / "mapconnet"))


def subdivide(faces: np.ndarray, n_vertices: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """One round of midpoint subdivision of a triangle mesh.

    Args: faces (F, 3) int; n_vertices V. Returns: W, scipy CSR (V + E, V) float64 whose first V
    rows are the identity and whose row V + e averages the two ends of edge e; and (4F, 3) int64
    faces (each triangle split into three corner triangles and the middle one, orientation kept).
    """
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    unique, inverse = np.unique(edges, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    E = len(unique)
    rows = np.concatenate([np.arange(n_vertices), np.repeat(n_vertices + np.arange(E), 2)])
    cols = np.concatenate([np.arange(n_vertices), unique.reshape(-1)])
    vals = np.concatenate([np.ones(n_vertices), np.full(2 * E, 0.5)])
    W = sp.csr_matrix((vals, (rows, cols)), shape=(n_vertices + E, n_vertices))
    F = len(faces)
    m01, m12, m20 = (n_vertices + inverse[i * F:(i + 1) * F] for i in range(3))
    a, b, c = faces[:, 0], faces[:, 1], faces[:, 2]
    new_faces = np.concatenate([np.stack(t, 1) for t in ((a, m01, m20), (b, m12, m01), (c, m20, m12), (m01, m12, m20))])
    return W, new_faces


def decimate(vertices: np.ndarray, faces: np.ndarray, target: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """Quadric decimation of the template to `target` vertices, as a linear map.

    Args: vertices (V, 3) float64 template; faces (F, 3) int; target vertex count.
    Returns: W, scipy CSR (target, V) float64, each row the barycentric weights (3 non-zeros,
    summing to 1) of the decimated vertex's closest point on the template; and (F', 3) int64 faces.
    For a closed genus-0 template the face count 2 * target - 4 is requested and the result is
    checked to be one closed surface; otherwise the reduction ratio is bisected until the count is
    exactly `target` (the closest reachable count otherwise).
    """
    import fast_simplification
    import trimesh

    def closed_single_surface(points, new_faces):
        mesh = trimesh.Trimesh(points, new_faces, process=False)
        return mesh.is_watertight and len(mesh.split(only_watertight=False)) == 1

    template_closed = closed_single_surface(vertices, faces)
    best = None
    # A closed genus-0 surface has F = 2V - 4 (Euler), so asking for that face count gives the
    # vertex count directly. Some aggressiveness settings leave a non-manifold spot (two faces
    # glued back to back at 1,723 vertices with the default 7); try others until the result is,
    # like the template, one closed surface.
    for agg in (7, 5, 3, 9):
        points, new_faces = fast_simplification.simplify(vertices, faces, target_count=2 * target - 4, agg=agg)
        if len(points) == target and (not template_closed or closed_single_surface(points, new_faces)):
            best = (points, new_faces)
            break
    lo, hi = 0.0, 1.0
    for _ in range(40 if best is None else 0):  # other surfaces: bisect the reduction ratio
        ratio = (lo + hi) / 2
        points, new_faces = fast_simplification.simplify(vertices, faces, target_reduction=ratio)
        if best is None or abs(len(points) - target) < abs(len(best[0]) - target):
            best = (points, new_faces)
        if len(points) == target:
            break
        lo, hi = (ratio, hi) if len(points) > target else (lo, ratio)
    points, new_faces = best
    # Closest point on the template surface among the 16 triangles with the nearest centroids
    # (decimation moves a vertex by far less than a triangle's size).
    from scipy.spatial import cKDTree

    triangles = vertices[faces]  # (F, 3, 3)
    _, candidates = cKDTree(triangles.mean(1)).query(points, k=16)  # (V', 16)
    flat = candidates.reshape(-1)
    closest_all = trimesh.triangles.closest_point(triangles[flat], np.repeat(points, 16, axis=0)).reshape(-1, 16, 3)
    best_k = np.linalg.norm(closest_all - points[:, None], axis=2).argmin(1)
    rows_idx = np.arange(len(points))
    triangle = candidates[rows_idx, best_k]
    closest = closest_all[rows_idx, best_k]
    corners = faces[triangle]  # (V', 3)
    bary = trimesh.triangles.points_to_barycentric(vertices[corners], closest)
    bary = np.clip(bary, 0, None)
    bary /= bary.sum(1, keepdims=True)
    rows = np.repeat(np.arange(len(points)), 3)
    W = sp.csr_matrix((bary.reshape(-1), (rows, corners.reshape(-1))), shape=(len(points), len(vertices)))
    return W, new_faces.astype(np.int64)


def resolution_map(name: str, template_vertices: np.ndarray, template_faces: np.ndarray, tag: str):
    """(W, faces) of resolution `name` for the given full template, cached under `tag`.

    Args:
        template_vertices: (13348, 3) rest mesh; template_faces: (F, 3) int.
        tag: cache key (anny version and topology) so a new template never reuses an old map.
    Returns:
        W: scipy CSR (V', 13348) float64, or None for `full`; faces: (F', 3) int64.
    """
    if name not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {sorted(RESOLUTIONS)}, got {name!r}")
    faces = np.asarray(template_faces, dtype=np.int64)
    if name == "full":
        return None, faces
    path = CACHE / f"{tag}-{name}-v{MAP_VERSION}.npz"
    if path.exists():
        try:
            with np.load(path) as data:
                W = sp.csr_matrix((data["data"], data["indices"], data["indptr"]), shape=tuple(data["shape"]))
                cached_faces = data["faces"].astype(np.int64)
            if W.shape[1] == len(template_vertices):
                return W, cached_faces
        except (OSError, ValueError, KeyError):
            pass  # a corrupt or foreign cache file: rebuild it below
    if name in ("lite", "smpl"):
        W, faces = decimate(np.asarray(template_vertices, dtype=np.float64), faces, RESOLUTIONS[name])
    else:
        W = sp.identity(len(template_vertices), format="csr")
        for _ in range(RESOLUTIONS[name]):
            step, faces = subdivide(faces, W.shape[0])
            W = (step @ W).tocsr()
    with replacing(path) as tmp:
        np.savez(tmp, data=W.data, indices=W.indices, indptr=W.indptr, shape=np.array(W.shape), faces=faces)
    return W, faces


def apply_map(W, vertices: np.ndarray) -> np.ndarray:
    """Apply a resolution map: (B, V, 3) full-resolution meshes -> (B, V', 3) float32 (W None: copy)."""
    if W is None:
        return vertices.astype(np.float32)
    B, V, _ = vertices.shape
    flat = vertices.transpose(1, 0, 2).reshape(V, B * 3)  # (V, B*3)
    return np.asarray(W @ flat, dtype=np.float32).reshape(-1, B, 3).transpose(1, 0, 2)
