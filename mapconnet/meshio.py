"""Mesh files in and out through trimesh, keeping vertex order (process=False).

Errors name the file and what was wrong; writes go to a temporary name and are renamed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import trimesh


def load_mesh(path, *, require_faces: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read a mesh (obj, ply, off, stl, glb/gltf: a scene is flattened into one mesh).

    Returns:
        vertices: (V, 3) float64, in file order.  faces: (F, 3) int64 (F may be 0 for a point
        cloud unless require_faces).
    Raises:
        FileNotFoundError for a missing file; ValueError for an unreadable or corrupt file, no
        vertices, NaN/inf coordinates, or no faces when require_faces.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mesh file {path} does not exist")
    try:
        loaded = trimesh.load(path, process=False, force="mesh")
    except Exception as e:  # trimesh raises many types for corrupt files
        raise ValueError(f"cannot read mesh {path}: {type(e).__name__}: {e}") from None
    vertices = np.asarray(getattr(loaded, "vertices", np.zeros((0, 3))), dtype=np.float64)
    faces = np.asarray(getattr(loaded, "faces", np.zeros((0, 3))), dtype=np.int64).reshape(-1, 3)
    if vertices.ndim != 2 or vertices.shape[0] == 0 or vertices.shape[1] != 3:
        raise ValueError(f"mesh {path} has no vertices (shape {vertices.shape}); expected (V, 3)")
    if not np.isfinite(vertices).all():
        raise ValueError(f"mesh {path} has NaN or inf vertex coordinates")
    if require_faces and len(faces) == 0:
        raise ValueError(f"mesh {path} has no faces; a triangle mesh is needed here")
    if len(faces) and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError(f"mesh {path} has faces indexing vertices outside [0, {len(vertices)})")
    return vertices, faces


def save_mesh(path, vertices: np.ndarray, faces: np.ndarray) -> Path:
    """Write (V, 3) vertices and (F, 3) faces as PLY/OBJ (by suffix), atomically, order kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64), process=False)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    mesh.export(tmp)
    os.replace(tmp, path)
    return path
