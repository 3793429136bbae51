"""The anny data generator, dataset folders, resolution maps and training samples (tiny sets)."""
import json
import math
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mapconnet.data import (
    SupervisedPairs,
    TestPairs,
    UnlabelledTriplets,
    anny_body,
    open_dataset,
    semi_supervised_split,
)
from mapconnet.data.generate import _remove_stale_partials, parse_args
from mapconnet.data.generate import main as generate
from mapconnet.data.resolution import decimate, subdivide

TINY_ARGS = ["--identities", "3", "--poses", "4", "--test-identities", "2", "--test-poses", "2", "--seed", "0",
             "--resolution", "lite", "--test-pairs", "6"]


@pytest.fixture(scope="module")
def ds(tiny_dataset):
    return open_dataset(tiny_dataset)


# ---------------------------------------------------------------- generator and folder


def test_folder_layout_and_manifest(tiny_dataset, ds):
    assert ds.vertices.shape == (5, 6, 1723, 3) and ds.vertices.dtype == np.float32
    assert isinstance(ds.vertices, np.memmap)
    assert ds.faces.dtype == np.int64 and ds.faces.shape[1] == 3
    assert ds.num_vertices == 1723 and ds.path == tiny_dataset
    m = ds.manifest
    assert m["resolution"] == "lite" and m["seed"] == 0 and m["anny_version"] == anny_body.anny_version()
    assert len(m["phenotypes"]) == 5 and len(m["pose_parameters"]) == 6
    assert 0 <= m["rejections"]["pose_rejection_rate"] < 1
    assert np.isfinite(np.asarray(ds.vertices)).all()
    # a rest-height body: every mesh is about 1.4-2.1 m tall (Z up, metres)
    heights = np.ptp(np.asarray(ds.vertices)[..., 2], axis=-1)
    assert (heights > 1.0).all() and (heights < 2.2).all()


def test_same_seed_same_bytes(tiny_dataset, tmp_path):
    again = generate(["--out", str(tmp_path / "again")] + TINY_ARGS)
    assert (again / "vertices.npy").read_bytes() == (tiny_dataset / "vertices.npy").read_bytes()
    assert (again / "faces.npy").read_bytes() == (tiny_dataset / "faces.npy").read_bytes()
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (again, tiny_dataset))
    assert a["test_lists"] == b["test_lists"] and a["sha256"] == b["sha256"]
    # a finished folder with the same arguments is reused; other arguments need --overwrite
    stamp = (again / "vertices.npy").stat().st_mtime_ns
    generate(["--out", str(again)] + TINY_ARGS)
    assert (again / "vertices.npy").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="poses"):
        generate(["--out", str(again)] + TINY_ARGS[:3] + ["5"] + TINY_ARGS[4:])
    assert not list(tmp_path.glob("again.partial-*"))


def test_overwrite_never_deletes_what_the_generator_did_not_write(tiny_dataset, tmp_path):
    """--overwrite replaces only a dataset folder of this generator holding only its own files;
    an ordinary folder, or a dataset with a user's file in it, is refused and left as it was."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="is not a dataset this generator wrote .* left alone"):
        generate(["--out", str(mine), "--overwrite"] + TINY_ARGS)
    assert (mine / "thesis.tex").read_text() == "years of work"
    shutil.copytree(tiny_dataset, tmp_path / "set")
    (tmp_path / "set" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"files the generator did not write \(\['notes.txt'\]\)"):
        generate(["--out", str(tmp_path / "set"), "--overwrite"] + TINY_ARGS)
    assert (tmp_path / "set" / "notes.txt").read_text() == "keep"
    assert not list(tmp_path.glob(".*.lock"))


def test_parse_args_has_no_side_effects_and_checks_values(tmp_path):
    args = parse_args(["--out", str(tmp_path / "x"), "--preset", "published", "--poses", "10"])
    got = (args.identities, args.poses, args.test_identities, args.test_poses, args.test_pairs)
    assert got == (16, 10, 14, 200, 400)
    assert args.resolution == "smpl"
    assert parse_args(["--out", "y"]).test_pairs == 400
    assert not (tmp_path / "x").exists()
    for bad, message in ((["--identities", "0"], "--identities must be >= 1, got 0"),
                         (["--test-poses", "1"], "--test-poses must be >= 2"),
                         (["--resolution", "huge"], "--resolution must be one of"),
                         (["--poses", "1"], "--poses must be >= 2"), (["--preset", "tiny"], "--preset must be one of")):
        with pytest.raises(ValueError, match=message):
            parse_args(["--out", "z"] + bad)
    with pytest.raises(SystemExit):  # a missing required option is argparse's own error
        parse_args([])


def test_stale_partial_folders_are_removed(tmp_path):
    out = tmp_path / "set"
    dead = tmp_path / "set.partial-notapid"
    dead.mkdir()
    live = tmp_path / f"set.partial-{__import__('os').getpid()}"
    live.mkdir()
    _remove_stale_partials(out)
    assert not dead.exists() and live.exists()


def test_splits_disjoint_and_test_lists_well_formed(ds):
    I, P = ds.shape
    assert sorted(ds.train_identities + ds.test_identities) == list(range(I))
    assert sorted(ds.train_poses + ds.test_poses) == list(range(P))
    assert not set(ds.train_identities) & set(ds.test_identities)
    assert not set(ds.train_poses) & set(ds.test_poses)
    for name, ids in (("unseen", ds.test_identities), ("seen", ds.train_identities)):
        quads = ds.test_lists[name]
        assert len(quads) == 6
        for a, p, b, q in quads:
            assert a in ids and b in ids and a != b
            assert p in ds.test_poses and q in ds.test_poses and p != q


def test_shared_topology_is_one_closed_surface(ds):
    import trimesh

    mesh = trimesh.Trimesh(ds.mesh(0, 0), ds.faces, process=False)
    assert mesh.is_watertight
    assert len(mesh.split(only_watertight=False)) == 1
    assert ds.faces.max() == ds.num_vertices - 1  # no unused vertices at the end


def test_open_dataset_errors(tiny_dataset, tmp_path):
    import shutil

    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset, broken)
    (broken / "faces.npy").unlink()
    with pytest.raises(FileNotFoundError, match="faces.npy"):
        open_dataset(broken)
    shutil.copy(tiny_dataset / "faces.npy", broken / "faces.npy")
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json"):
        open_dataset(broken)
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    manifest["test_lists"]["unseen"][0] = [0, 99, 1, 0]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="unseen"):
        open_dataset(broken)
    manifest["test_lists"]["unseen"] = []
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="empty"):
        open_dataset(broken)
    (broken / "manifest.json").write_text((tiny_dataset / "manifest.json").read_text())
    assert open_dataset(broken, verify=True).shape == (5, 6)
    with open(broken / "vertices.npy", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x7f")
    with pytest.raises(ValueError, match="checksum"):
        open_dataset(broken, verify=True)
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    del manifest["sha256"]  # a folder without checksums (e.g. written by hand): the NaN is still found
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"NaN or inf coordinates \(identity 4, poses \[5\]\)"):
        open_dataset(broken, verify=True)


def test_preview_png(ds, tmp_path):
    from mapconnet.data.preview import render_preview

    out = render_preview(ds.vertices, ds.faces, tmp_path / "preview.png", columns=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- anatomical limits


def _zyx(R):
    """(flex about X, lateral about Y, twist about Z) degrees with R = Rz @ Ry @ Rx."""
    return (math.degrees(math.atan2(R[2, 1], R[2, 2])), math.degrees(-math.asin(np.clip(R[2, 0], -1, 1))),
            math.degrees(math.atan2(R[1, 0], R[0, 0])))


def _axis_angle(R):
    angle = math.degrees(math.acos(np.clip((np.trace(R) - 1) / 2, -1, 1)))
    axis = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    n = np.linalg.norm(axis)
    return (axis / n if n > 1e-9 else np.zeros(3)), angle


def _within(value, lo_hi, tol=1e-3):
    return lo_hi[0] - tol <= value <= lo_hi[1] + tol


def test_sampled_poses_respect_anatomical_limits():
    model = anny_body.load_model()
    sampler = anny_body.PoseSampler(model)
    rng = np.random.default_rng(1)
    bones = sampler.bones
    driven = set(anny_body.AXIAL_LIMITS) | {f"{b}.{s}" for s in "LR" for b in (
        "clavicle", "upperarm01", "lowerarm01", "lowerarm02", "wrist", "upperleg01", "lowerleg01", "foot")}
    M = anny_body.MIRROR
    for _ in range(150):
        pose = sampler.sample(rng).astype(np.float64)
        assert pose.shape == (104, 4, 4)
        assert np.allclose(pose[:, :3, 3], 0) and np.allclose(pose[:, 3], [0, 0, 0, 1])  # no translation
        for name, i in bones.items():
            R = pose[i, :3, :3]
            assert np.allclose(R @ R.T, np.eye(3), atol=1e-5) and np.linalg.det(R) > 0
            if name not in driven:  # root, fingers, toes, eyes, twist segments: at rest
                assert np.allclose(R, np.eye(3), atol=1e-6), name
        for name, limits in anny_body.AXIAL_LIMITS.items():
            angles = _zyx(pose[bones[name], :3, :3])
            assert all(_within(a, lim) for a, lim in zip(angles, limits)), (name, angles)
        for side in "LR":
            R = {b: pose[bones[f"{b}.{side}"], :3, :3] for b in (
                "clavicle", "upperarm01", "lowerarm01", "lowerarm02", "wrist", "upperleg01", "lowerleg01", "foot")}
            if side == "R":
                R = {b: M @ r @ M for b, r in R.items()}  # right = mirrored left
            arm = R["upperarm01"] @ sampler.upper_arm_rest
            elevation = math.degrees(math.acos(-arm[2]))
            assert _within(elevation, anny_body.SHOULDER_ELEVATION)
            if elevation > 15:
                assert _within(math.degrees(math.atan2(-arm[1], arm[0])), anny_body.SHOULDER_PLANE, tol=0.5)
            axis, angle = _axis_angle(R["lowerarm01"])
            signed = angle * np.sign(axis @ sampler.elbow_hinge) if angle > 1e-6 else 0.0
            assert _within(signed, anny_body.ELBOW_FLEX, tol=0.01)
            assert angle < 1e-3 or abs(abs(axis @ sampler.elbow_hinge) - 1) < 1e-4
            axis, angle = _axis_angle(R["lowerarm02"])
            assert angle <= anny_body.FOREARM_TWIST[1] + 1e-3
            assert angle < 1e-3 or abs(abs(axis @ sampler.forearm_rest) - 1) < 1e-4
            flex, lateral, twist = _zyx(R["upperleg01"])
            assert _within(-flex, anny_body.HIP_FLEX) and _within(-lateral, anny_body.HIP_ABDUCTION)
            assert _within(twist, anny_body.HIP_TWIST)
            knee, lateral, twist = _zyx(R["lowerleg01"])
            assert _within(knee, anny_body.KNEE_FLEX) and abs(lateral) < 1e-3 and abs(twist) < 1e-3
            plantar, inversion, rotation = _zyx(R["foot"])
            assert _within(plantar, anny_body.ANKLE_PLANTARFLEXION) and _within(inversion, anny_body.ANKLE_INVERSION)
            assert _within(rotation, anny_body.ANKLE_ROTATION)
            flex, deviation, _ = _zyx(R["wrist"])
            assert _within(flex, anny_body.WRIST_FLEX) and _within(deviation, anny_body.WRIST_DEVIATION)
            _, up, protraction = _zyx(R["clavicle"])
            assert _within(-up, (anny_body.CLAVICLE_ELEVATION[0], anny_body.CLAVICLE_ELEVATION[1] + 0.25 * 70))
            assert _within(protraction, anny_body.CLAVICLE_PROTRACTION)


def test_sampled_identities_are_adults_in_range(ds):
    ph = np.asarray(ds.manifest["phenotypes"])
    for column, lo_hi in zip(range(1, 6), (anny_body.AGE, anny_body.MUSCLE, anny_body.WEIGHT, anny_body.HEIGHT,
                                             anny_body.PROPORTIONS)):
        assert ((ph[:, column] >= lo_hi[0]) & (ph[:, column] <= lo_hi[1])).all()
    assert ((ph[:, 0] >= 0) & (ph[:, 0] <= 1)).all()


# ---------------------------------------------------------------- resolution maps


def test_subdivision_keeps_original_vertices_and_planes():
    # a tilted planar grid patch: 4 x 4 vertices, 18 triangles
    u, v = np.meshgrid(np.linspace(0, 1, 4), np.linspace(0, 2, 4))
    points = np.stack([u.ravel(), v.ravel(), 0.3 * u.ravel() - 0.7 * v.ravel() + 0.1], 1)
    faces = []
    for r in range(3):
        for c in range(3):
            k = 4 * r + c
            faces += [[k, k + 1, k + 5], [k, k + 5, k + 4]]
    faces = np.array(faces)
    W, new_faces = subdivide(faces, 16)
    edges = 33  # 3*4 horizontal + 3*4 vertical + 9 diagonals
    assert W.shape == (16 + edges, 16) and new_faces.shape == (4 * len(faces), 3)
    dense = W.toarray()
    assert np.array_equal(dense[:16], np.eye(16))
    assert np.allclose(dense.sum(1), 1)
    fine = W @ points
    assert np.allclose(fine[:, 2], 0.3 * fine[:, 0] - 0.7 * fine[:, 1] + 0.1)  # still on the plane
    area = lambda p, f: np.linalg.norm(np.cross(p[f[:, 1]] - p[f[:, 0]], p[f[:, 2]] - p[f[:, 0]]), axis=1).sum() / 2  # noqa
    assert math.isclose(area(fine, new_faces), area(points, faces), rel_tol=1e-12)
    # orientation kept: every fine normal points the same way as the coarse ones
    n = np.cross(fine[new_faces[:, 1]] - fine[new_faces[:, 0]], fine[new_faces[:, 2]] - fine[new_faces[:, 0]])
    assert (n @ np.array([-0.3, 0.7, 1.0]) > 0).all() or (n @ np.array([-0.3, 0.7, 1.0]) < 0).all()


def test_decimation_map_on_a_sphere():
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=3)  # 642 vertices on the unit sphere
    W, faces = decimate(np.asarray(sphere.vertices), np.asarray(sphere.faces), 300)
    assert W.shape == (300, 642) and faces.max() == 299
    assert np.allclose(np.asarray(W.sum(1)).ravel(), 1) and (W.data >= 0).all()
    assert (np.diff(W.indptr) <= 3).all()
    radius = np.linalg.norm(W @ sphere.vertices, axis=1)
    assert (radius <= 1 + 1e-9).all() and (radius > 0.97).all()  # on the template's surface
    assert trimesh.Trimesh(W @ sphere.vertices, faces, process=False).is_watertight


@pytest.mark.parametrize("name, count", [("lite", 1723), ("smpl", 6890), ("x4", 53386)])
def test_resolution_maps_on_the_template(name, count):
    from mapconnet.data.resolution import resolution_map

    model = anny_body.load_model()
    rest = anny_body.posed_vertices(model, np.full((1, 6), 0.5, np.float32),
                                    np.eye(4, dtype=np.float32)[None, None].repeat(104, 1))[0].astype(np.float64)
    W, faces = resolution_map(name, rest, model.faces.numpy(), f"anny{anny_body.anny_version()}-{anny_body.TOPOLOGY}")
    assert isinstance(W, sp.csr_matrix) and W.shape == (count, 13348)
    assert np.allclose(np.asarray(W.sum(1)).ravel(), 1)
    assert faces.dtype == np.int64 and faces.max() == count - 1
    if name == "x4":
        assert (W[:13348] != sp.identity(13348, format="csr")).nnz == 0
    else:  # every decimated vertex lies on the template surface, within a few mm of a template vertex
        from scipy.spatial import cKDTree

        d, _ = cKDTree(rest).query(W @ rest)
        assert d.max() < 0.03
    assert resolution_map("full", rest, model.faces.numpy(), "unused")[0] is None


# ---------------------------------------------------------------- samples


def _check_item(ds, item, keys_from_identity, keys_from_pose):
    perm_i, perm_p = item["identity_perm"].numpy(), item["pose_perm"].numpy()
    for perm in (perm_i, perm_p):
        assert sorted(perm.tolist()) == list(range(ds.num_vertices))
    for key, (i, p) in keys_from_identity.items():
        assert torch.equal(item[key], torch.from_numpy(ds.mesh(i, p)[perm_i])), key
    for key, (i, p) in keys_from_pose.items():
        assert torch.equal(item[key], torch.from_numpy(ds.mesh(i, p)[perm_p])), key
    # the re-indexed faces describe the same triangles on the shuffled vertices
    for verts, faces, perm in ((item["identity"], item["identity_faces"], perm_i),
                               (item["pose"], item["pose_faces"], perm_p)):
        original = verts.numpy()[np.argsort(perm)]
        assert np.array_equal(verts.numpy()[faces.numpy()], original[ds.faces])
    for key in list(keys_from_identity) + list(keys_from_pose):
        v = item[key].numpy()
        assert v.dtype == np.float32 and v.shape == (ds.num_vertices, 3)
        assert np.allclose((v.max(0) + v.min(0)) / 2, 0, atol=1e-6)  # bounding-box centred


def test_supervised_pairs(ds):
    data = SupervisedPairs(ds, ds.train_identities, ds.train_poses, length=8, seed=3)
    assert len(data) == 8
    for i in range(8):
        it = data[i]
        a, p, b, q = it["identity_index"], it["identity_pose"], it["pose_identity"], it["pose_index"]
        assert a in ds.train_identities and b in ds.train_identities and p != q
        assert {p, q} <= set(ds.train_poses)
        assert it["identity_faces"].dtype == torch.int64 and it["identity_perm"].dtype == torch.int64
        _check_item(ds, it, {"identity": (a, p), "target": (a, q)}, {"pose": (b, q)})
    again = SupervisedPairs(ds, ds.train_identities, ds.train_poses, length=8, seed=3)
    assert all(torch.equal(again[5][k], data[5][k]) for k in ("identity", "pose", "target", "identity_perm"))
    before = [data[i]["identity_perm"] for i in range(4)]
    data.set_epoch(1)
    assert any(not torch.equal(before[i], data[i]["identity_perm"]) for i in range(4))
    data.set_epoch(0)
    assert torch.equal(before[0], data[0]["identity_perm"])
    with pytest.raises(IndexError):
        data[8]
    with pytest.raises(ValueError, match="at least one"):
        SupervisedPairs(ds, [], ds.train_poses, 4, 0)
    with pytest.raises(ValueError, match="outside"):
        SupervisedPairs(ds, [99], ds.train_poses, 4, 0)


def test_unlabelled_triplets(ds):
    data = UnlabelledTriplets(ds, ds.train_identities, ds.train_poses, length=6, seed=0)
    for i in range(6):
        it = data[i]
        assert "target" not in it
        keys = ("identity_index", "identity_pose", "pose_identity", "pose_index", "pose2_index")
        a, p, b, q, r = (it[k] for k in keys)
        assert r != q and {p, q, r} <= set(ds.train_poses)
        _check_item(ds, it, {"identity": (a, p)}, {"pose": (b, q), "pose2": (b, r)})
    with pytest.raises(ValueError, match="two poses"):
        UnlabelledTriplets(ds, ds.train_identities, ds.train_poses[:1], 4, 0)


def test_test_pairs_are_fixed(ds):
    for name in ("unseen", "seen"):
        data = TestPairs(ds, name)
        assert len(data) == len(ds.test_lists[name])
        for i in range(len(data)):
            it = data[i]
            a, p, b, q = ds.test_lists[name][i]
            assert it["pair"] == i
            assert (it["identity_index"], it["identity_pose"], it["pose_identity"], it["pose_index"]) == (a, p, b, q)
            _check_item(ds, it, {"identity": (a, p), "target": (a, q)}, {"pose": (b, q)})
        other = TestPairs(ds, name)
        other.set_epoch(5)
        assert torch.equal(other[2]["pose_perm"], data[2]["pose_perm"])
    with pytest.raises(ValueError, match="no .*test list"):
        TestPairs(ds, "missing")


def test_dataloader_workers_agree(ds):
    data = SupervisedPairs(ds, ds.train_identities, ds.train_poses, length=6, seed=0)
    data.set_epoch(2)
    direct = torch.stack([data[i]["identity"] for i in range(6)])
    loader = torch.utils.data.DataLoader(data, batch_size=3, num_workers=2)
    batches = list(loader)
    assert batches[0]["identity"].shape == (3, ds.num_vertices, 3)
    assert batches[0]["identity_faces"].shape == (3, len(ds.faces), 3)
    assert torch.equal(torch.cat([b["identity"] for b in batches]), direct)


@pytest.mark.parametrize("percentage", [0, 25, 50, 100])
def test_semi_supervised_split(ds, percentage):
    split = semi_supervised_split(ds, percentage, seed=1)
    assert split == semi_supervised_split(ds, percentage, seed=1)
    for kind in ("identities", "poses"):
        lab, unl = split[f"labelled_{kind}"], split[f"unlabelled_{kind}"]
        assert sorted(lab + unl) == sorted(getattr(ds, f"train_{kind}")) and not set(lab) & set(unl)
        n = len(getattr(ds, f"train_{kind}"))
        if percentage == 0:
            assert lab == []
        elif percentage == 100:
            assert unl == []
        else:
            assert 1 <= len(lab) <= n - 1
    with pytest.raises(ValueError, match="percentage"):
        semi_supervised_split(ds, 101, 0)
