"""Readers for NPT/SMAL/plain mesh folders and every bad-data error they raise (small files)."""
import numpy as np
import pytest
import torch

from mapconnet.data import (
    SupervisedPairs,
    TestPairs,
    UnlabelledTriplets,
    open_dataset,
    read_mesh_folder,
    read_npt_folder,
    read_smal_folder,
)
from mapconnet.meshio import save_mesh


@pytest.fixture(scope="module")
def source(tiny_dataset):
    """2 identities x 3 poses of the tiny anny set, uncentred, with its faces."""
    ds = open_dataset(tiny_dataset)
    return np.asarray(ds.vertices[:2, :3]), ds.faces


def _write(folder, source, name, suffix):
    vertices, faces = source
    for i in range(2):
        for p in range(3):
            save_mesh(folder / name.format(i=i, p=p), vertices[i, p], faces)
    return folder


@pytest.fixture
def npt(tmp_path, source):
    return _write(tmp_path / "npt", source, "id{i}_{p}.obj", ".obj")


def test_npt_folder_with_test_list(npt, source, tmp_path):
    vertices, faces = source
    (tmp_path / "list.txt").write_text("id0_1.obj id1_2.obj id0_2.obj\n\n# comment\nid1_0 id0_1 id1_1\n")
    ds = read_npt_folder(npt, test_list=tmp_path / "list.txt", split="test")
    assert ds.vertices.shape == (2, 3, len(vertices[0, 0]), 3) and ds.vertices.dtype == np.float32
    assert np.allclose(ds.vertices, vertices, atol=1e-6) and np.array_equal(ds.faces, faces)
    assert ds.test_identities == [0, 1] and ds.test_poses == [0, 1, 2] and ds.train_identities == []
    assert ds.test_lists == {"unseen": [[0, 1, 1, 2], [1, 0, 0, 1]]}
    assert ds.manifest["identity_labels"] == ["0", "1"] and ds.manifest["source"] == "npt"
    item = TestPairs(ds, "unseen")[0]
    assert torch.equal(item["target"], torch.from_numpy(ds.mesh(0, 2)[item["identity_perm"].numpy()]))
    train = read_npt_folder(npt)
    assert train.train_identities == [0, 1] and train.train_poses == [0, 1, 2] and train.test_lists == {}
    batch = SupervisedPairs(train, train.train_identities, train.train_poses, 4, 0)[1]
    assert batch["identity"].shape == (len(vertices[0, 0]), 3)
    assert "pose2" in UnlabelledTriplets(train, train.train_identities, train.train_poses, 4, 0)[0]


def test_smal_folder(tmp_path, source):
    folder = _write(tmp_path / "smal", source, "toy_{i}_{p}.ply", ".ply")
    ds = read_smal_folder(folder)
    assert ds.shape == (2, 3) and np.allclose(ds.vertices, source[0], atol=1e-6)
    assert ds.manifest["source"] == "smal"


def test_plain_folder_arrangements(tmp_path, source):
    vertices, faces = source
    folder = tmp_path / "frames"
    for k in (2, 10, 1):  # natural order: frame1, frame2, frame10
        save_mesh(folder / f"frame{k}.ply", vertices[0, k % 3], faces)
    (folder / "notes.txt").write_text("not a mesh")
    ds = read_mesh_folder(folder)
    assert ds.shape == (1, 3) and ds.manifest["pose_labels"] == ["frame1", "frame2", "frame10"]
    assert np.allclose(ds.vertices[0, 2], vertices[0, 1], atol=1e-6)
    assert read_mesh_folder(folder, arrange="identities").shape == (3, 1)
    grid = read_mesh_folder(_write(tmp_path / "grid", source, "s{i}-f{p}.obj", ".obj"),
                            pattern=r"s(?P<identity>\d+)-f(?P<pose>\d+)\.obj")
    assert grid.shape == (2, 3)
    with pytest.raises(ValueError, match="named groups"):
        read_mesh_folder(folder, pattern=r"frame(\d+)")


# ---------------------------------------------------------------- bad data


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_npt_folder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty has no files named like"):
        read_npt_folder(tmp_path / "empty")


def test_corrupt_mesh_is_named(npt):
    (npt / "id1_2.obj").write_text("v 0 0\nf 1 2 three\n")
    with pytest.raises(ValueError, match="id1_2.obj"):
        read_npt_folder(npt)


def test_vertex_count_differs(npt, source):
    vertices, faces = source
    save_mesh(npt / "id1_1.obj", np.concatenate([vertices[1, 1], [[0, 0, 0]]]), faces)
    with pytest.raises(ValueError, match=r"id1_1.obj has \d+ vertices but .* share one topology"):
        read_npt_folder(npt)


def test_faces_differ(npt, source):
    vertices, faces = source
    save_mesh(npt / "id0_2.obj", vertices[0, 2], faces[:, [0, 2, 1]])
    with pytest.raises(ValueError, match=r"id0_2.obj has different faces"):
        read_npt_folder(npt)


def test_nan_coordinates(npt, source):
    vertices, faces = source
    bad = vertices[1, 0].copy()
    bad[5, 1] = np.nan
    (npt / "id1_0.obj").write_text("".join(f"v {x} {y} {z}\n" for x, y, z in bad) +
                                   "".join(f"f {a + 1} {b + 1} {c + 1}\n" for a, b, c in faces))
    with pytest.raises(ValueError, match=r"id1_0.obj has 1 vertices with NaN"):
        read_npt_folder(npt)


def test_incomplete_grid(npt):
    (npt / "id1_2.obj").unlink()
    with pytest.raises(ValueError, match="identity 1 pose 2"):
        read_npt_folder(npt)


def test_bad_test_lists(npt, tmp_path):
    lst = tmp_path / "list.txt"
    with pytest.raises(FileNotFoundError, match="list.txt"):
        read_npt_folder(npt, test_list=lst)
    lst.write_text("\n  \n")
    with pytest.raises(ValueError, match="list.txt is empty"):
        read_npt_folder(npt, test_list=lst)
    lst.write_text("id0_1.obj id1_2.obj id0_2.obj\nid0_1.obj id7_2.obj id0_2.obj\n")
    with pytest.raises(ValueError, match=r"list.txt:2: id7_2.obj names no mesh file"):
        read_npt_folder(npt, test_list=lst)
    lst.write_text("id0_1.obj id1_2.obj\n")
    with pytest.raises(ValueError, match=r"list.txt:1: expected three"):
        read_npt_folder(npt, test_list=lst)
    lst.write_text("id0_1.obj id1_2.obj id1_2.obj\n")
    with pytest.raises(ValueError, match=r"list.txt:1: ground truth id1_2.obj should be identity 0 in pose 2"):
        read_npt_folder(npt, test_list=lst)


def test_point_cloud_is_rejected_where_faces_are_needed(npt, source):
    (npt / "id0_0.obj").write_text("".join(f"v {x} {y} {z}\n" for x, y, z in source[0][0, 0]))
    with pytest.raises(ValueError, match="id0_0.obj"):
        read_npt_folder(npt)
