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


@pytest.fixture
def body(tiny_dataset):
    return open_dataset(tiny_dataset).mesh(0, 0).astype(np.float64)  # metres, Z up, about 1.5-2 m tall


def test_normalise_reads_units_and_maps_back(body):
    """A body in metres is only centred; in centimetres or millimetres it is converted to its true
    height (not clamped to the range's edge); a child-sized body is scaled into the training
    heights; every change is a notice, and Frame.back inverts it."""
    height = np.ptp(body[:, 2])
    normalised, frame, notices = transfer.normalise(body)
    assert frame.scale == 1.0 and notices == []
    for factor, unit in ((100, "centimetres"), (1000, "millimetres")):
        normalised, frame, notices = transfer.normalise(body * factor)
        assert np.ptp(normalised[:, 2]) == pytest.approx(height)
        assert any(unit in n for n in notices)
        np.testing.assert_allclose(frame.back(normalised), body * factor, atol=1e-9 * factor)
    child = body * 0.6
    normalised, frame, notices = transfer.normalise(child)
    assert np.ptp(normalised[:, 2]) == pytest.approx(transfer.TRAIN_HEIGHT_RANGE[0])
    assert any("outside the training heights" in n for n in notices)
    np.testing.assert_allclose(frame.back(normalised), child, atol=1e-9)


def test_normalise_detects_y_up(body):
    y_up = body @ np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]).T  # (x, y, z) -> (x, z, -y): Y is up
    normalised, frame, notices = transfer.normalise(y_up)
    z_up, _, _ = transfer.normalise(body)
    np.testing.assert_allclose(normalised, z_up, atol=1e-9)
    assert any("looks Y-up" in n for n in notices)
    np.testing.assert_allclose(frame.back(normalised), y_up, atol=1e-9)
    np.testing.assert_allclose(transfer.normalise(y_up, up="z")[1].rotation, np.eye(3))


def test_normalise_refuses_what_is_not_a_body(body):
    with pytest.raises(ValueError, match="has 3 vertices; a body mesh needs at least 100"):
        transfer.normalise(body[:3])
    flat = body.copy()
    flat[:, 1] = 0
    with pytest.raises(ValueError, match="is flat"):
        transfer.normalise(flat)
    with pytest.raises(ValueError, match="no standing body's height"):
        transfer.normalise(body * 8)  # 14 m: neither metres, centimetres nor millimetres


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
