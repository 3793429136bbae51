"""Mesh I/O: order-preserving round trips, atomic writes and clear errors."""
import numpy as np
import pytest
import torch

from mapconnet.meshio import load_mesh, save_mesh


def _mesh(n=40, seed=0):
    rng = np.random.default_rng(seed)
    vertices = rng.normal(size=(n, 3))
    faces = np.stack([rng.permutation(n)[:3] for _ in range(2 * n)])
    return vertices, faces


@pytest.mark.parametrize("suffix", [".ply", ".obj"])
def test_round_trip_keeps_order(tmp_path, suffix):
    vertices, faces = _mesh()
    vertices[7] = vertices[3]  # duplicates must not be merged
    faces[:, 0] = faces[:, 0] % 20  # some vertices unused by faces must be kept too
    path = save_mesh(tmp_path / "sub" / f"m{suffix}", vertices, faces)
    v, f = load_mesh(path)
    assert v.shape == vertices.shape and v.dtype == np.float64 and f.dtype == np.int64
    assert np.allclose(v, vertices, atol=1e-6) and np.array_equal(f, faces)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_save_accepts_tensors_and_replaces(tmp_path):
    vertices, faces = _mesh()
    path = save_mesh(tmp_path / "m.ply", torch.from_numpy(vertices).float(), torch.from_numpy(faces))
    save_mesh(path, vertices + 1, faces)
    assert np.allclose(load_mesh(path)[0], vertices + 1, atol=1e-5)


def test_save_errors(tmp_path):
    vertices, faces = _mesh()
    with pytest.raises(ValueError, match="suffix"):
        save_mesh(tmp_path / "m.xyz", vertices, faces)
    with pytest.raises(ValueError, match=r"\(V, 3\)"):
        save_mesh(tmp_path / "m.ply", vertices[:, :2], faces)
    with pytest.raises(ValueError, match="indices"):
        save_mesh(tmp_path / "m.ply", vertices, faces + 100)
    assert not list(tmp_path.iterdir())


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.obj"):
        load_mesh(tmp_path / "missing.obj")
    (tmp_path / "garbage.ply").write_text("this is not a ply file\n")
    with pytest.raises(ValueError, match="garbage.ply"):
        load_mesh(tmp_path / "garbage.ply")
    (tmp_path / "empty.obj").write_text("")
    with pytest.raises(ValueError, match="empty.obj has no vertices"):
        load_mesh(tmp_path / "empty.obj")
    (tmp_path / "nan.obj").write_text("v 0 0 0\nv nan 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(ValueError, match="nan.obj has 1 vertices with NaN"):
        load_mesh(tmp_path / "nan.obj")
    (tmp_path / "points.ply").write_text("ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\n"
                                         "property float y\nproperty float z\nend_header\n0 0 0\n1 0 0\n")
    v, f = load_mesh(tmp_path / "points.ply")
    assert v.shape == (2, 3) and f.shape == (0, 3)
    with pytest.raises(ValueError, match="points.ply has no faces"):
        load_mesh(tmp_path / "points.ply", require_faces=True)
