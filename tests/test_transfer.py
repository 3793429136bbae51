"""The transfer command: any pair of meshes, different vertex counts, folders of frames, errors."""
import numpy as np
import pytest
import trimesh
from test_evaluate import tiny_checkpoint  # noqa: F401  (session fixture)

from mapconnet import transfer
from mapconnet.data import open_dataset
from mapconnet.meshio import save_mesh


@pytest.fixture()
def meshes(tiny_dataset, tmp_path):
    ds = open_dataset(tiny_dataset)
    identity = tmp_path / "identity.obj"
    save_mesh(identity, ds.mesh(0, 0) * 100, ds.faces)  # centimetres: normalised, then mapped back
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(ds.num_vertices, ds.num_vertices - 200, replace=False))
    pose_vertices = ds.mesh(1, 1)[keep][rng.permutation(len(keep))]  # another count and order
    pose = tmp_path / "pose.ply"
    trimesh.PointCloud(pose_vertices).export(pose)
    return ds, identity, pose


def test_transfer_keeps_identity_faces_and_frame(meshes, tiny_checkpoint, tmp_path):  # noqa: F811
    ds, identity, pose = meshes
    out = tmp_path / "out.ply"
    written = transfer.main(["--pose", str(pose), "--identity", str(identity), "--checkpoint", str(tiny_checkpoint),
                             "--out", str(out), "--warped", "--backend", "chunked"])
    assert written == [out, tmp_path / "out_warped.ply"]
    result = trimesh.load(out, process=False)
    assert len(result.vertices) == ds.num_vertices
    assert np.array_equal(np.asarray(result.faces), ds.faces)
    # mapped back into the identity's centimetre frame: the output is body-sized in cm
    assert 10 < np.ptp(np.asarray(result.vertices), axis=0).max() < 1000


def test_transfer_folder_of_frames(meshes, tiny_checkpoint, tmp_path):  # noqa: F811
    ds, identity, pose = meshes
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        save_mesh(frames / f"frame_{i:03d}.obj", ds.mesh(2, i), ds.faces)
    written = transfer.main(["--pose", str(frames), "--identity", str(identity), "--checkpoint", str(tiny_checkpoint),
                             "--out", str(tmp_path / "out")])
    assert [p.name for p in written] == ["frame_000.ply", "frame_001.ply", "frame_002.ply"]


def test_normalise_scales_into_training_heights():
    v = np.array([[0.0, 0, 0], [0, 0, 170], [10, 5, 85]])
    normalised, centre, scale = transfer.normalise(v)
    assert np.ptp(normalised[:, 2]) == pytest.approx(transfer.TRAIN_HEIGHT_RANGE[1])
    assert np.allclose(normalised / scale + centre, v)
    metres = v / 100
    assert transfer.normalise(metres)[2] == 1.0  # 1.7 m is already in range


def test_transfer_errors(meshes, tiny_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    ds, identity, pose = meshes
    args = lambda **kw: sum(([f"--{k}", str(v)] for k, v in {"pose": pose, "identity": identity,  # noqa: E731
                             "checkpoint": tiny_checkpoint, "out": tmp_path / "o.ply", **kw}.items()), [])
    corrupt = tmp_path / "corrupt.obj"
    corrupt.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="corrupt.obj"):
        transfer.main(args(identity=corrupt))
    with pytest.raises(ValueError, match="has no faces"):
        transfer.main(args(identity=pose))  # a point cloud cannot be the identity mesh
    nan_mesh = tmp_path / "nan.obj"
    v = ds.mesh(0, 0).copy()
    v[3] = np.nan
    nan_mesh.write_text("".join(f"v {a} {b} {c}\n" for a, b, c in v)
                        + "".join(f"f {a+1} {b+1} {c+1}\n" for a, b, c in ds.faces))
    with pytest.raises(ValueError, match="NaN"):
        transfer.main(args(identity=nan_mesh))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        transfer.main(args(pose=tmp_path / "missing.obj"))
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint|not a mapconnet checkpoint"):
        transfer.main(args(checkpoint=foreign))

    for inputs in ({"out": identity}, {"out": pose}):  # never overwrite an input
        with pytest.raises(ValueError, match="would overwrite the input"):
            transfer.main(args(**inputs))
    assert transfer.load_mesh(identity)[0].shape[0] > 0

    monkeypatch.setattr(transfer, "available_memory", lambda: 64 * 2**20)
    with pytest.raises(MemoryError, match="dense 'torch' backend fits about"):
        transfer.main(args(backend="torch"))


def test_command_line_errors_are_one_line(meshes, tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    """A user error prints `error: ...` on one line and exits 2; --debug shows the traceback."""
    _, identity, pose = meshes
    argv = ["--pose", str(tmp_path / "missing.obj"), "--identity", str(identity), "--checkpoint",
            str(tiny_checkpoint), "--out", str(tmp_path / "o.ply")]
    with pytest.raises(SystemExit) as done:
        transfer.cli(argv)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.obj" in err and err.count("\n") == 1
    with pytest.raises(FileNotFoundError, match="missing.obj"):
        transfer.cli([*argv, "--debug"])
    with pytest.raises(SystemExit) as done:
        transfer.cli(["--pose", str(pose), *argv[2:]])
    assert done.value.code == 0
