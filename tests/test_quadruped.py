"""The procedural quadruped (animal mode): template, skinning, shape space, poses, collisions,
`generate --species quadruped` and the quadruped stream."""
import json

import numpy as np
import pytest
import torch
import trimesh

from mapconnet.data import open_dataset, quadruped
from mapconnet.data.generate import main as generate
from mapconnet.data.generate import parse_args
from mapconnet.data.stream import BodyStream

J, K = len(quadruped.JOINTS), len(quadruped.SHAPE_LABELS)
REST = np.zeros((1, J, 3))
TINY_ARGS = ["--species", "quadruped", "--identities", "5", "--poses", "3", "--test-identities", "2",
             "--test-poses", "2", "--seed", "0", "--test-pairs", "6"]


@pytest.fixture(scope="module")
def model():
    return quadruped.load_model()


@pytest.fixture(scope="module")
def families():
    """Every family's mean shape (5, K), in FAMILIES order."""
    return np.stack([quadruped.family_mean(name) for name in quadruped.FAMILIES])


def _pose(**joints) -> np.ndarray:
    """(1, J, 3) angles: the rest pose with the given joints set to (pitch, roll, yaw)."""
    angles = np.zeros((1, J, 3))
    for name, value in joints.items():
        angles[0, quadruped.JOINTS.index(name)] = value
    return angles


# ---------------------------------------------------------------- template and skinning


def test_template_is_one_closed_manifold_with_the_exact_vertex_count(model):
    vertices, faces = quadruped.build_template()
    assert vertices.shape == (quadruped.NUM_VERTICES, 3) and faces.dtype == np.int64
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0  # outward normals
    assert len(mesh.split(only_watertight=False)) == 1
    assert quadruped.is_closed_manifold(faces, len(vertices))  # and no two sheets meet at a vertex
    assert (mesh.area_faces > 1e-9).all()
    # the count is exact for other sizes too, and the build is deterministic (a second, uncached build)
    small_v, small_f = quadruped.build_template.__wrapped__(1500)
    assert small_v.shape == (1500, 3) and quadruped.is_closed_manifold(small_f, 1500)
    again_v, again_f = quadruped.build_template.__wrapped__(quadruped.NUM_VERTICES)
    assert again_v.tobytes() == vertices.tobytes() and again_f.tobytes() == faces.tobytes()
    with pytest.raises(ValueError, match="500..20000 vertices"):
        quadruped.build_template(100)


def test_closed_manifold_check_rejects_open_and_pinched_meshes():
    box = trimesh.creation.box()
    assert quadruped.is_closed_manifold(box.faces, 8)
    assert not quadruped.is_closed_manifold(box.faces[1:], 8)  # a hole
    two = np.concatenate([box.faces, box.faces + 8])
    two[two == 8] = 0  # two boxes sharing one vertex: closed, but not a manifold there
    assert not quadruped.is_closed_manifold(two, 15)


def test_skinning_weights(model):
    w = model.weights.numpy()
    assert w.shape == (quadruped.NUM_VERTICES, J) and (w >= 0).all()
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=0, atol=1e-12)
    assert ((w > 0).sum(1) <= quadruped.SKIN_BONES).all()
    # every bone moves some vertices, and the ear tip follows its ear
    assert (w.max(0) > 0.5).all()
    ear = quadruped.JOINTS.index("ear_L")
    tip = np.argmin(np.linalg.norm(model.template.numpy() - quadruped.REST_TAILS[ear], axis=1))
    assert w[tip, ear] > 0.9


# ---------------------------------------------------------------- shape space and kinematics


def test_shape_space_is_linear_and_families_differ(model, families):
    rng = np.random.default_rng(0)
    b1, b2 = rng.uniform(-0.5, 0.5, (2, 1, K))
    zero = np.zeros((1, K))
    f = model.shaped  # (vertices, joint heads, joint tails)
    for part in range(3):
        torch.testing.assert_close(f(b1 + b2)[part] + f(zero)[part], f(b1)[part] + f(b2)[part], rtol=0, atol=1e-12)
    torch.testing.assert_close(model.shaped(zero)[0][0], model.template)
    verts = model.posed_vertices(families, REST)[:, 0]  # (5, V, 3) in FAMILIES order
    cat, dog, horse, cow, hippo = (np.ptp(v, axis=0) for v in verts)  # extents (width, length, height)
    assert horse[2] > 1.3 * hippo[2] and hippo[0] > 1.3 * horse[0]  # tall and narrow vs low and wide
    assert cat[1] < dog[1] < horse[1]
    with pytest.raises(ValueError, match=rf"shapes must be \(I, {K}\) coefficients"):
        model.shaped(np.zeros((1, K + 1)))


def test_forward_kinematics(model, families):
    rest = model.posed_vertices(families[:1], REST)[0, 0]
    torch.testing.assert_close(torch.from_numpy(rest), model.shaped(families[:1])[0][0].float())
    # lifting the tail moves the tail tip and leaves the head where it was
    lifted = model.posed_vertices(families[:1], _pose(tail1=(60, 0, 0)))[0, 0]
    w = model.weights.numpy()
    still = w[:, [quadruped.JOINTS.index(f"tail{i}") for i in range(1, 5)]].sum(1) == 0
    tip = w[:, quadruped.JOINTS.index("tail4")] > 0.9
    assert still.sum() > 3000 and tip.any()
    np.testing.assert_array_equal(lifted[still], rest[still])
    assert (lifted[tip, 2] > rest[tip, 2] + 0.1).all()
    # every bone keeps its length in any pose
    heads, tails = model.posed_bones(families, np.stack([quadruped.PoseSampler().sample(
        np.random.default_rng(s)) for s in range(4)]))
    rest_heads, rest_tails = model.posed_bones(families, REST)
    torch.testing.assert_close((tails - heads).norm(dim=-1), (rest_tails - rest_heads).norm(dim=-1).expand(-1, 4, -1))


# ---------------------------------------------------------------- poses and collisions


def test_pose_sampler_respects_joint_ranges_and_is_deterministic():
    sampler = quadruped.PoseSampler()
    poses = np.stack([sampler.sample(np.random.default_rng([1, i])) for i in range(400)])
    lo, hi = quadruped.JOINT_RANGES[..., 0], quadruped.JOINT_RANGES[..., 1]
    assert ((poses >= lo) & (poses <= hi)).all()
    assert (poses.std(0)[hi > lo] > 1.0).all()  # every free angle varies
    assert (poses[:, quadruped.JOINTS.index("snout")] == 0).all()
    again = np.stack([sampler.sample(np.random.default_rng([1, i])) for i in range(400)])
    assert poses.tobytes() == again.tobytes()
    # the right side mirrors the left: same pitch range, roll and yaw ranges negated
    left, right = quadruped.JOINTS.index("upper_HL"), quadruped.JOINTS.index("upper_HR")
    np.testing.assert_array_equal(quadruped.JOINT_RANGES[right, 0], quadruped.JOINT_RANGES[left, 0])
    np.testing.assert_array_equal(quadruped.JOINT_RANGES[right, 1:], -quadruped.JOINT_RANGES[left, 1:, ::-1])


@pytest.mark.parametrize("case", ["legs_crossed", "head_through_chest", "tail_through_leg"])
def test_collision_test_catches_constructed_intersections(model, families, case):
    pose = {
        # the left foreleg swung inward under the body, through the right one
        "legs_crossed": _pose(upper_FL=(0, 60, 0), lower_FL=(0, 10, 0)),
        # the neck and head curled down and back, through the chest and forelegs
        "head_through_chest": _pose(neck1=(80, 0, 0), neck2=(60, 0, 0), head=(60, 0, 0)),
        # the tail swung down, to the side and forward, through the right hind leg
        "tail_through_leg": _pose(tail1=(-75, 0, -30), tail2=(-20, 0, 0), tail3=(-20, 0, 0)),
    }[case]
    assert model.collisions(families, pose).all(), case
    # the meshes agree: some vertices of the moved part lie inside another part of the surface
    # (winding number about 1.5 instead of the 0.5 of a point on the surface alone)
    moved = {"legs_crossed": "lower_FL", "head_through_chest": "snout", "tail_through_leg": "tail4"}[case]
    mesh = model.posed_vertices(families[1:2], pose)[0, 0].astype(np.float64)
    part = mesh[model.weights.numpy()[:, quadruped.JOINTS.index(moved)] > 0.5]
    assert (_winding_numbers(part, mesh, model.faces) > 1.2).any()
    rest = model.posed_vertices(families[1:2], REST)[0, 0].astype(np.float64)
    part = rest[model.weights.numpy()[:, quadruped.JOINTS.index(moved)] > 0.5]
    assert (_winding_numbers(part, rest, model.faces) < 0.8).all()


def _winding_numbers(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Generalised winding number (N,) of points (N, 3) about a closed mesh (solid angles of its
    triangles over 4 pi; van Oosterom and Strackee)."""
    a, b, c = (vertices[faces[:, k]][None] - points[:, None] for k in range(3))  # (N, F, 3)
    la, lb, lc = (np.linalg.norm(x, axis=-1) for x in (a, b, c))
    numerator = np.einsum("nfc,nfc->nf", a, np.cross(b, c))
    denominator = la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb
    return np.arctan2(numerator, denominator).sum(1) / (2 * np.pi)


def test_rest_and_calm_poses_pass_the_collision_test(model, families):
    rng = np.random.default_rng(0)
    shapes = quadruped.sample_identities(list(quadruped.FAMILIES) * 4, rng)
    assert not model.collisions(shapes, REST).any()
    walk = _pose(upper_FL=(-15, 0, 0), lower_FR=(40, 0, 0), upper_HL=(15, 0, 0), upper_HR=(-10, 0, 0),
                 neck1=(-20, 0, 0), tail1=(30, 0, 0))
    assert not model.collisions(shapes, walk).any()
    # most sampled poses pass on a single animal
    poses = np.stack([quadruped.PoseSampler().sample(rng) for _ in range(200)])
    assert model.collisions(families[1:2], poses).mean() < 0.35


def test_bad_names_give_clear_errors():
    with pytest.raises(ValueError, match=r"unknown animal family 'unicorn'; expected 'all' or a comma-separated"):
        quadruped.family_names("cat,unicorn")
    with pytest.raises(ValueError, match="unknown animal family"):
        quadruped.sample_identities(["dragon"], np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"--species must be one of \['human', 'quadruped'\], got 'fish'"):
        parse_args(["--out", "x", "--species", "fish"])
    with pytest.raises(ValueError, match="unknown animal family 'unicorn'"):
        parse_args(["--out", "x", "--species", "quadruped", "--family", "unicorn"])
    with pytest.raises(ValueError, match="--family 'cat' applies to --species quadruped only"):
        parse_args(["--out", "x", "--family", "cat"])
    with pytest.raises(ValueError, match="--resolution for --species quadruped must be 'smal'"):
        parse_args(["--out", "x", "--species", "quadruped", "--resolution", "lite"])
    with pytest.raises(ValueError, match="--preset must be one of"):
        parse_args(["--out", "x", "--species", "quadruped", "--preset", "published-smal"])
    with pytest.raises(ValueError, match="stream species must be one of"):
        BodyStream("labelled", "lite", 0, species="fish")
    with pytest.raises(ValueError, match="a quadruped stream has one resolution, 'smal'"):
        BodyStream("labelled", "lite", 0, species="quadruped")


# ---------------------------------------------------------------- generator and stream


def test_presets_are_species_aware():
    animal = parse_args(["--out", "x", "--species", "quadruped", "--preset", "published"])
    assert (animal.identities, animal.poses, animal.test_identities, animal.test_poses) == (29, 400, 12, 200)
    assert animal.resolution == "smal"
    human = parse_args(["--out", "x", "--preset", "published"])
    assert (human.identities, human.test_identities, human.resolution, human.species) == (16, 14, "smpl", "human")


def test_generate_quadruped_end_to_end(tmp_path):
    out = generate(["--out", str(tmp_path / "zoo"), "--preview"] + TINY_ARGS)
    ds = open_dataset(out, verify=True)
    assert ds.vertices.shape == (7, 5, quadruped.NUM_VERTICES, 3) and ds.faces.shape == (7774, 3)
    assert np.isfinite(np.asarray(ds.vertices)).all() and (out / "preview.png").stat().st_size > 10_000
    m = ds.manifest
    assert m["species"] == "quadruped" and m["resolution"] == "smal" and m["arguments"]["family"] == "all"
    assert m["families"] == ["cat", "dog", "horse", "cow", "hippo", "cat", "dog"]  # in turn, in each split
    assert np.asarray(m["pose_parameters"]).shape == (5, J, 3) and np.asarray(m["shapes"]).shape == (7, K)
    assert set(ds.train_identities).isdisjoint(ds.test_identities) and set(ds.train_poses).isdisjoint(ds.test_poses)
    for a, p, b, q in ds.test_lists["unseen"]:
        assert {a, b} <= set(ds.test_identities) and {p, q} <= set(ds.test_poses) and a != b and p != q
    # every mesh is the template's topology: a closed surface in every identity and pose
    for i, p in ((0, 0), (4, 3), (6, 4)):
        assert trimesh.Trimesh(ds.vertices[i, p], ds.faces, process=False).volume > 0
    # same seed, same bytes; the finished folder is reused; a changed family needs --overwrite
    again = generate(["--out", str(tmp_path / "again")] + TINY_ARGS)
    for name in ("vertices.npy", "faces.npy"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    assert json.loads((again / "manifest.json").read_text())["test_lists"] == m["test_lists"]
    stamp = (again / "vertices.npy").stat().st_mtime_ns
    generate(["--out", str(again)] + TINY_ARGS)
    assert (again / "vertices.npy").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="family"):
        generate(["--out", str(again), "--family", "cat,dog"] + TINY_ARGS)


def test_old_human_manifests_stay_valid(tmp_path):
    """A dataset written before --species existed is still recognised as the same human data."""
    from mapconnet.data.generate import GenerateConfig, _existing

    folder = tmp_path / "old"
    folder.mkdir()
    args = GenerateConfig(out=str(folder))
    arguments = {k: getattr(args, k) for k in ("identities", "poses", "test_identities", "test_poses", "test_pairs",
                                               "seed", "resolution", "collision_identities")}
    from mapconnet.data.generate import GENERATOR_VERSION

    (folder / "manifest.json").write_text(json.dumps({"generator_version": GENERATOR_VERSION, "arguments": arguments}))
    for name in ("vertices.npy", "faces.npy"):
        (folder / name).write_bytes(b"")
    assert _existing(folder, args)


@pytest.mark.parametrize("kind", ["labelled", "unlabelled"])
def test_quadruped_stream_items(kind):
    stream = BodyStream(kind, "smal", seed=3, species="quadruped")
    alone, in_batch = stream[5], stream.__getitems__([4, 5])[1]
    again = BodyStream(kind, "smal", seed=3, species="quadruped")[5]
    for key in alone:
        assert torch.equal(alone[key], in_batch[key]) and torch.equal(alone[key], again[key]), key
    assert not torch.equal(alone["identity"], stream[6]["identity"])
    V = quadruped.NUM_VERTICES
    meshes = ("identity", "pose", "target") if kind == "labelled" else ("identity", "pose", "pose2")
    assert all(alone[k].shape == (V, 3) and alone[k].dtype == torch.float32 for k in meshes)
    assert alone["identity_faces"].shape == (7774, 3) and stream.num_vertices == V
    original = np.empty((V, 3), dtype=np.float32)
    original[alone["identity_perm"].numpy()] = alone["identity"].numpy()
    np.testing.assert_allclose(original.max(0) + original.min(0), 0, atol=1e-6)  # bounding-box centred
    if kind == "labelled":  # one animal in two poses: the same bones, so nearly the same edge lengths
        f = alone["identity_faces"].numpy()
        edge = lambda v: np.linalg.norm(v[f] - v[np.roll(f, -1, 1)], axis=-1)  # noqa: E731
        ratio = edge(alone["target"].numpy()) / edge(alone["identity"].numpy())
        assert np.median(np.abs(ratio - 1)) < 0.05
