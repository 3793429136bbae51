"""The transfer command: any pair of meshes, different vertex counts, folders of frames, errors."""
import numpy as np
import pytest
import torch
import trimesh
from test_evaluate import TINY, tiny_checkpoint  # noqa: F401  (session fixture)

from mapconnet import checkpoint as ckpt
from mapconnet import training as train
from mapconnet import transfer
from mapconnet.checkpoint import load_model
from mapconnet.data import open_dataset, quadruped
from mapconnet.losses import centred
from mapconnet.meshio import save_mesh
from mapconnet.model import ModelConfig

Y_UP = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])  # (x, y, z) -> (x, z, -y): a Z-up mesh written Y-up


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
    y_up = body @ Y_UP.T
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


# ---------------------------------------------------------------- animals


@pytest.fixture(scope="session")
def animal_checkpoint(animal_dataset, tmp_path_factory):
    """One step on the tiny quadruped set, trained as README's animal command does: a dataset folder
    and no --species (train.py records the folder's species)."""
    out = tmp_path_factory.mktemp("animal-run")
    train.main(train.TrainConfig(data=str(animal_dataset), out=str(out), batch_size=1, max_steps=1, val_pairs=0,
                                 compile=False),
               ModelConfig(**TINY))
    return out / "checkpoint.pt"


def test_animal_training_frame_is_the_quadruped_models():
    """TRAIN_ANIMAL_SIZE_RANGE (bounding-box diagonals) and the animal proportions are those of the
    training animals (every family, the generator's identity and pose samplers, poses that pass the
    collision test; metres, Z up, front -Y): the constants hold every sampled animal and are not
    much wider. Some animals are taller than long, so "auto" cannot tell an animal's up axis."""
    model = quadruped.load_model()
    rng = np.random.default_rng(1)
    extents = []
    for family in quadruped.FAMILIES:
        shapes = quadruped.sample_identities([family] * 6, rng)
        poses = np.stack([quadruped.PoseSampler().sample(rng) for _ in range(30)])
        meshes = model.posed_vertices(shapes, poses)[~model.collisions(shapes, poses)]  # (n, V, 3)
        extents.append(np.ptp(meshes.astype(np.float64), axis=1))
    width, length, height = np.concatenate(extents).T
    size = np.sqrt(width ** 2 + length ** 2 + height ** 2)
    for what, values, (lo, hi) in (("size", size, transfer.TRAIN_ANIMAL_SIZE_RANGE),
                                   ("width/length", width / length, transfer.TRAIN_ANIMAL_WIDTH_PER_LENGTH),
                                   ("height/length", height / length, transfer.TRAIN_ANIMAL_HEIGHT_PER_LENGTH)):
        assert lo <= values.min() and values.max() <= hi, (what, values.min(), values.max())
    # the sizes that are scaled into: no wider than the animals need (the proportions only feed a note,
    # and a sample this small does not reach their rare extremes)
    lo, hi = transfer.TRAIN_ANIMAL_SIZE_RANGE
    assert size.min() <= lo * 1.25 and size.max() >= hi / 1.25, (size.min(), size.max())
    assert 0.05 < (height > length).mean() < 0.5  # often taller than long, but mostly longer


def test_normalise_animals(animal_dataset):
    """An animal in centimetres, Y up (--up y) and off-centre comes back to the training frame
    exactly (the human rules would stand it on its tail); "auto" keeps Z up and says so;
    millimetres are read; a real cat's size is scaled into the training sizes; Frame.back
    inverts each; a size no animal has is refused."""
    animal = open_dataset(animal_dataset).mesh(0, 0).astype(np.float64)  # the training frame
    animal -= (animal.max(0) + animal.min(0)) / 2  # float64 centring of the float32-centred mesh
    diagonal = np.linalg.norm(np.ptp(animal, 0))
    normalised, frame, notices = transfer.normalise(animal, up="z", species="quadruped")
    np.testing.assert_allclose(normalised, animal, atol=1e-12)
    assert frame.scale == 1.0 and notices == []
    assert transfer.normalise(animal, species="quadruped")[2] == [transfer.ANIMAL_UP_NOTE]
    in_file = animal @ Y_UP.T * 100 + [20.0, 35.0, -10.0]
    normalised, frame, notices = transfer.normalise(in_file, up="y", species="quadruped")
    np.testing.assert_allclose(normalised, animal, atol=1e-12)
    assert notices == [f"mesh is {diagonal * 100:.4g} units across (bounding-box diagonal): read as centimetres "
                       f"({diagonal:.2f} m)"]
    np.testing.assert_allclose(frame.back(normalised), in_file, atol=1e-10)
    assert not np.allclose(transfer.normalise(in_file)[0], animal, atol=0.05)  # as a human: on its tail

    normalised, frame, notices = transfer.normalise(animal * 1000, up="z", species="quadruped")
    np.testing.assert_allclose(normalised, animal, atol=1e-9)
    assert len(notices) == 1 and "read as millimetres" in notices[0]
    cat = animal * (0.6 / diagonal)  # a real cat, 0.6 m across
    normalised, frame, notices = transfer.normalise(cat, up="z", species="quadruped")
    lo, hi = transfer.TRAIN_ANIMAL_SIZE_RANGE
    assert np.linalg.norm(np.ptp(normalised, 0)) == pytest.approx(lo)
    assert notices == [f"mesh is 0.60 m across (bounding-box diagonal), outside the training animals' sizes "
                       f"{lo}-{hi} m: scaled to {lo:.2f} m for the model, and the output back"]
    np.testing.assert_allclose(frame.back(normalised), cat, atol=1e-12)
    with pytest.raises(ValueError, match="no animal's size in metres, centimetres or millimetres"):
        transfer.normalise(animal * 8, up="z", species="quadruped")  # 16-24 m: no unit makes it an animal


def test_checkpoint_species():
    """The recorded species decides; checkpoints of folder runs from before train.py recorded the
    folder's species fall back to the folder's manifest, and those from before animal mode, or
    whose folder is gone, are human."""
    assert transfer.trained_species({"train_config": {"data": "stream", "species": "quadruped"}}) == "quadruped"
    assert transfer.trained_species({"train_config": {"data": "/no/such/folder", "species": "human"}}) == "human"
    assert transfer.trained_species({}) == "human"
    assert transfer.trained_species(ckpt.load(ckpt.resolve("pretrained"))) == "human"
    with pytest.raises(ValueError, match="--species must be auto, human or quadruped, got 'fish'"):
        transfer.main(["--pose", "p.obj", "--identity", "i.obj", "--out", "o.ply", "--species", "fish"])


def test_transfer_with_an_animal_checkpoint(animal_dataset, animal_checkpoint, tmp_path, capsys):
    """A quadruped checkpoint normalises as animals: an identity in centimetres and a pose in
    millimetres, both Y-up (--up y), the identity off-centre, give the model the training-frame
    meshes, and the output (and warped mesh) land back in the identity's frame, with its faces."""
    ds = open_dataset(animal_dataset)
    payload = ckpt.load(animal_checkpoint)
    assert payload["train_config"]["species"] == "quadruped"  # recorded from the folder's manifest
    assert transfer.trained_species(payload) == "quadruped"
    identity, pose = (ds.mesh(i, p).astype(np.float64) for i, p in ((3, 3), (4, 4)))  # cat and dog, test poses
    offset = np.array([20.0, 35.0, -10.0])
    save_mesh(tmp_path / "cat.obj", identity @ Y_UP.T * 100 + offset, ds.faces)
    save_mesh(tmp_path / "dog.ply", pose @ Y_UP.T * 1000, ds.faces)
    out = tmp_path / "out.ply"
    transfer.main(["--pose", str(tmp_path / "dog.ply"), "--identity", str(tmp_path / "cat.obj"), "--checkpoint",
                   str(animal_checkpoint), "--out", str(out), "--warped", "--backend", "chunked", "--up", "y"])
    printed = capsys.readouterr().out
    assert "identity mesh is" in printed and "read as centimetres" in printed
    assert "pose mesh is" in printed and "read as millimetres" in printed
    assert "up axis is not detected" not in printed and "proportions" not in printed

    model = load_model(animal_checkpoint, backend="chunked")
    as_batch = lambda v: torch.as_tensor(v - (v.max(0) + v.min(0)) / 2, dtype=torch.float32)[None]  # noqa: E731
    with torch.no_grad():
        result = model(as_batch(identity), as_batch(pose))
    for path, mesh in ((out, centred(result.output)), (tmp_path / "out_warped.ply", result.warped)):
        written = trimesh.load(path, process=False)
        assert np.array_equal(np.asarray(written.faces), ds.faces)
        # in the identity's frame: centimetres, Y up, around its centre. Taken back to metres and Z up
        # it is the model's training-frame output, the re-posed body bounding-box centred like the
        # inputs (float32: assert_close's float32 tolerances)
        in_metres = (np.asarray(written.vertices) - offset) / 100 @ Y_UP
        torch.testing.assert_close(torch.as_tensor(in_metres, dtype=torch.float32), mesh[0])


def test_a_human_given_to_an_animal_checkpoint_gets_a_note(animal_dataset, animal_checkpoint, tmp_path, capsys):
    """A person standing in anny's rest pose (Z up, arms out: 2.5x wider and 3.8x taller than deep)
    has no quadruped's proportions in the animal frame: the transfer runs and says its output means
    nothing. The animal identity mesh gets no such note, and "auto" says it took both as Z-up. (A
    human in a random anny pose is often within the animals' wide proportions: the note is a hint.)"""
    from mapconnet.data import anny_body

    neutral = np.full((1, len(anny_body.PHENOTYPES)), 0.5, dtype=np.float32)
    person = anny_body.posed_vertices(anny_body.load_model(), neutral,
                                      np.eye(4, dtype=np.float32)[None, None].repeat(104, 1))[0]
    trimesh.PointCloud(person[::8]).export(tmp_path / "person.ply")  # a pose mesh may be a point cloud
    animals = open_dataset(animal_dataset)
    save_mesh(tmp_path / "dog.obj", animals.mesh(4, 4), animals.faces)
    transfer.main(["--pose", str(tmp_path / "person.ply"), "--identity", str(tmp_path / "dog.obj"), "--checkpoint",
                   str(animal_checkpoint), "--out", str(tmp_path / "out.ply"), "--backend", "chunked"])
    printed = capsys.readouterr().out
    assert "note: pose mesh does not have a quadruped's proportions" in printed
    assert "identity mesh does not have" not in printed
    assert printed.count(transfer.ANIMAL_UP_NOTE) == 1
