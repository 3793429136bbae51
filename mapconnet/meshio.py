"""Mesh files in and out through trimesh, keeping vertex order (process=False).

Pose transfer relies on vertex order (a mesh's i-th vertex is the same body point in every pose),
so nothing here merges, reorders or drops vertices. Errors name the file and what was wrong;
writes go to a temporary name in the same folder and are renamed, so a reader never sees half a
file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh

from mapconnet.files import replacing

MESH_SUFFIXES = (".obj", ".ply", ".off", ".stl", ".glb", ".gltf")


def load_mesh(path, *, require_faces: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read a mesh file (obj, ply, off, stl, glb/gltf; a scene's meshes are concatenated).

    Args:
        path: file to read (str or Path).
        require_faces: raise if the file holds no triangles (a point cloud).
    Returns:
        vertices: (V, 3) float64 array, in file order.
        faces: (F, 3) int64 array of vertex indices (F may be 0 unless require_faces).
    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unreadable or corrupt file, no vertices, NaN/inf coordinates, faces indexing
            missing vertices, non-triangle faces, or no faces when require_faces.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mesh file {path} does not exist")
    try:
        loaded = trimesh.load(path, process=False, maintain_order=True)
    except Exception as e:  # trimesh raises many types (IndexError, KeyError, ...) on corrupt files
        raise ValueError(f"cannot read mesh {path}: {type(e).__name__}: {e}") from None
    if isinstance(loaded, trimesh.Scene):
        geometries = [g for g in loaded.dump() if hasattr(g, "vertices")]
        loaded = trimesh.util.concatenate(geometries) if geometries else None
    vertices = np.asarray(getattr(loaded, "vertices", np.zeros((0, 3))), dtype=np.float64)
    faces = np.asarray(getattr(loaded, "faces", np.zeros((0, 3))), dtype=np.int64)
    if vertices.ndim != 2 or vertices.shape[0] == 0 or vertices.shape[1] != 3:
        raise ValueError(f"mesh {path} has no vertices (array of shape {vertices.shape}); expected (V, 3) "
                         f"coordinates: is the file empty or corrupt?")
    if not np.isfinite(vertices).all():
        bad = int((~np.isfinite(vertices)).any(1).sum())
        raise ValueError(f"mesh {path} has {bad} vertices with NaN or inf coordinates")
    if faces.size and (faces.ndim != 2 or faces.shape[1] != 3):
        raise ValueError(f"mesh {path} has faces of shape {faces.shape}; expected (F, 3) triangles")
    faces = faces.reshape(-1, 3)
    if require_faces and len(faces) == 0:
        raise ValueError(f"mesh {path} has no faces; a triangle mesh is needed here")
    if len(faces) and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError(f"mesh {path} has faces indexing vertices outside [0, {len(vertices)})")
    return vertices, faces


def save_mesh(path, vertices, faces) -> Path:
    """Write a triangle mesh as PLY or OBJ (chosen by the suffix), atomically, vertex order kept.

    Args:
        path: destination ending in .ply or .obj; its folder is created if needed.
        vertices: (V, 3) array-like (numpy or a CPU torch tensor).
        faces: (F, 3) integer array-like.
    Returns:
        the written path.
    """
    path = Path(path)
    if path.suffix.lower() not in (".ply", ".obj"):
        raise ValueError(f"cannot save mesh {path}: the suffix must be .ply or .obj")
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"cannot save mesh {path}: vertices have shape {vertices.shape}; expected (V, 3)")
    if faces.ndim != 2 or faces.shape[1] != 3 or (faces.size and (faces.min() < 0 or faces.max() >= len(vertices))):
        raise ValueError(f"cannot save mesh {path}: faces of shape {faces.shape} must be (F, 3) indices "
                         f"into the {len(vertices)} vertices")
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    with replacing(path) as tmp:
        if path.suffix.lower() == ".obj":
            # no normals or texture coordinates: nothing that could make a reader split vertices
            tmp.write_text(trimesh.exchange.obj.export_obj(mesh, include_normals=False, include_texture=False))
        else:
            mesh.export(tmp)
    return path
