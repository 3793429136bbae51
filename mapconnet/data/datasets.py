"""Datasets of meshes on one shared topology and the samples that training and evaluation draw.

A `MeshDataset` is an (identities x poses x V x 3) array (memory-mapped for generated anny data)
with one face list, the train/test split and the test lists. Samples:
- `SupervisedPairs`: identity mesh (a, p), pose mesh (b, q), ground truth (a, q).
- `UnlabelledTriplets`: identity (a, p), pose (b, q) and P2 = (b, r), r != q; no ground truth.
- `TestPairs`: the fixed triplets of a test list.
Every mesh is centred on its bounding-box centre and its vertices are shuffled per sample (the
identity mesh and its ground truth share one permutation, the pose mesh and P2 another), with
faces re-indexed, so a model cannot rely on vertex order. Item i depends only on (seed, epoch, i):
DataLoader workers agree and a resumed run draws the same samples.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mapconnet.files import sha256


@dataclass
class MeshDataset:
    """Meshes of identities x poses that share one topology.

    Attributes:
        vertices: (I, P, V, 3) float32 array, np.memmap for generated data (reading a mesh is a
            slice, not a file parse); vertices[i, p] is identity i in pose p.
        faces: (F, 3) int64 triangles indexing the V vertices, shared by every mesh.
        train_identities, train_poses, test_identities, test_poses: index lists into axes 0 and 1.
        test_lists: name ("unseen", "seen") -> list of [identity, identity_pose, pose_identity,
            pose] quadruples whose ground truth is vertices[identity, pose].
        manifest: the generator's manifest (or, for read folders, the source and labels).
        path: the folder it came from.
    """
    vertices: np.ndarray = field(repr=False)
    faces: np.ndarray = field(repr=False)
    train_identities: list[int] = field(repr=False)
    train_poses: list[int] = field(repr=False)
    test_identities: list[int] = field(repr=False)
    test_poses: list[int] = field(repr=False)
    test_lists: dict[str, list[list[int]]] = field(repr=False)
    manifest: dict = field(default_factory=dict, repr=False)
    path: Path | None = None

    @property
    def num_vertices(self) -> int:
        """V, the vertex count of every mesh."""
        return int(self.vertices.shape[2])

    @property
    def shape(self) -> tuple[int, int]:
        """(identities, poses) of the grid."""
        return int(self.vertices.shape[0]), int(self.vertices.shape[1])

    def __repr__(self) -> str:
        I, P = self.shape
        return (f"MeshDataset({self.path}, {I} identities x {P} poses x {self.num_vertices} vertices, "
                f"{len(self.faces)} faces, train {len(self.train_identities)}x{len(self.train_poses)}, "
                f"test {len(self.test_identities)}x{len(self.test_poses)}, lists "
                f"{ {k: len(v) for k, v in self.test_lists.items()} })")

    def mesh(self, identity: int, pose: int) -> np.ndarray:
        """(V, 3) float32 copy of `identity` in `pose`, centred on its bounding-box centre."""
        I, P = self.shape
        if not (0 <= identity < I and 0 <= pose < P):
            raise IndexError(f"mesh ({identity}, {pose}) is outside the {I} x {P} grid of {self.path}")
        return bbox_centred(self.vertices[identity, pose])

    def validate(self) -> MeshDataset:
        """Check shapes, index ranges and test lists; raise ValueError naming `path`. Returns self."""
        where = self.path if self.path is not None else "dataset"
        if self.vertices.ndim != 4 or self.vertices.shape[-1] != 3 or 0 in self.vertices.shape:
            raise ValueError(f"{where}: vertices have shape {self.vertices.shape}; expected (I, P, V, 3), non-empty")
        V = self.num_vertices
        if self.faces.ndim != 2 or self.faces.shape[1] != 3 or len(self.faces) == 0 or \
                self.faces.min() < 0 or self.faces.max() >= V:
            raise ValueError(f"{where}: faces of shape {self.faces.shape} must be (F, 3) indices into the {V} vertices")
        I, P = self.shape
        for name, values, n in (("train_identities", self.train_identities, I),
                                ("test_identities", self.test_identities, I),
                                ("train_poses", self.train_poses, P), ("test_poses", self.test_poses, P)):
            bad = [v for v in values if not (isinstance(v, int) and 0 <= v < n)]
            if bad:
                raise ValueError(f"{where}: {name} holds {bad[:5]}, outside [0, {n})")
        for name, quads in self.test_lists.items():
            if not quads:
                raise ValueError(f"{where}: test list {name!r} is empty")
            for k, quad in enumerate(quads):
                inside = (len(quad) == 4 and 0 <= quad[0] < I and 0 <= quad[1] < P
                          and 0 <= quad[2] < I and 0 <= quad[3] < P)
                if not inside:
                    raise ValueError(f"{where}: test list {name!r} entry {k} is {quad}; expected "
                                     f"[identity, identity_pose, pose_identity, pose] inside the {I} x {P} grid")
        return self


def open_dataset(path, *, verify: bool = False) -> MeshDataset:
    """Open a folder written by `python -m mapconnet.data.generate`; vertices are memory-mapped.

    Args:
        path: the dataset folder (holding vertices.npy, faces.npy, manifest.json).
        verify: also compare the files' SHA-256 with the manifest and check that every coordinate is
            finite (reads every byte: about a second per 400 MB).
    Returns:
        a validated MeshDataset.
    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        ValueError: a file is corrupt or disagrees with the manifest.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder {path} does not exist; build one with "
                                f"`python -m mapconnet.data.generate --out {path}`")
    for name in ("vertices.npy", "faces.npy", "manifest.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"dataset folder {path} has no {name}; expected the generator's output "
                                    f"(vertices.npy, faces.npy, manifest.json)")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (ValueError, OSError) as e:
        raise ValueError(f"{path / 'manifest.json'} is not readable JSON: {e}") from None
    try:
        vertices = np.load(path / "vertices.npy", mmap_mode="r")
    except (ValueError, OSError) as e:
        raise ValueError(f"{path / 'vertices.npy'} is not a readable .npy array: {e}") from None
    try:
        faces = np.load(path / "faces.npy")
    except (ValueError, OSError) as e:
        raise ValueError(f"{path / 'faces.npy'} is not a readable .npy array: {e}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path / 'manifest.json'} holds a {type(manifest).__name__}; expected an object")
    keys = ("train_identities", "train_poses", "test_identities", "test_poses", "test_lists")
    missing = [k for k in keys if k not in manifest]
    if missing:
        raise ValueError(f"{path / 'manifest.json'} lacks {missing}; expected the generator's manifest")
    if vertices.dtype != np.float32:
        raise ValueError(f"{path / 'vertices.npy'} has dtype {vertices.dtype}; expected float32")
    if "num_vertices" in manifest and vertices.ndim == 4 and vertices.shape[2] != manifest["num_vertices"]:
        raise ValueError(f"{path / 'vertices.npy'} has {vertices.shape[2]} vertices per mesh but the manifest "
                         f"says {manifest['num_vertices']}")
    if verify:
        for name, digest in manifest.get("sha256", {}).items():
            if sha256(path / name) != digest:
                raise ValueError(f"{path / name} does not match the checksum in the manifest (modified or corrupt)")
        for i in range(vertices.shape[0]):  # one identity's meshes at a time: memory stays small
            bad = ~np.isfinite(vertices[i]).all(axis=(-1, -2))
            if bad.any():
                raise ValueError(f"{path / 'vertices.npy'} holds NaN or inf coordinates (identity {i}, poses "
                                 f"{np.flatnonzero(bad)[:5].tolist()}); regenerate the dataset")
    ds = MeshDataset(vertices, faces.astype(np.int64, copy=False), *(manifest[k] for k in keys),
                     manifest=manifest, path=path)
    return ds.validate()


def _shuffle(faces: np.ndarray, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A random permutation perm (n,) int64 with shuffled = original[perm], and faces (F, 3)
    re-indexed so that they describe the same triangles on the shuffled vertices."""
    perm = rng.permutation(n)
    inverse = np.empty(n, dtype=np.int64)
    inverse[perm] = np.arange(n)  # original vertex j sits at inverse[j] after the shuffle
    return perm, inverse[faces]


def _pick_two(rng: np.random.Generator, values: list[int]) -> tuple[int, int]:
    """Two different entries of `values` (the same one twice only if there is one)."""
    if len(values) < 2:
        return values[0], values[0]
    a, b = rng.choice(len(values), 2, replace=False)
    return values[a], values[b]


class _Samples(torch.utils.data.Dataset):
    """Common part: item i is drawn from a generator seeded by (seed, epoch, i) only."""

    def __init__(self, dataset: MeshDataset, identities, poses, length: int, seed: int):
        self.dataset, self.identities, self.poses = dataset, [int(i) for i in identities], [int(p) for p in poses]
        I, P = dataset.shape
        if not self.identities or not self.poses:
            raise ValueError(f"{type(self).__name__} needs at least one identity and one pose, got "
                             f"{len(self.identities)} identities and {len(self.poses)} poses")
        bad = [i for i in self.identities if not 0 <= i < I] + [p for p in self.poses if not 0 <= p < P]
        if bad:
            raise ValueError(f"{type(self).__name__}: indices {bad[:5]} are outside the {I} x {P} grid")
        if length < 1:
            raise ValueError(f"{type(self).__name__}: length must be >= 1, got {length}")
        self.length, self.seed, self.epoch = int(length), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Draw a different (deterministic) set of samples for `epoch`; call before each epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.length:
            raise IndexError(f"{type(self).__name__} index {index} out of range [0, {self.length})")
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def _item(self, rng, a, p, b, q, extra_pose_meshes=(), target=True) -> dict:
        """Identity (a, p) and target (a, q) share a permutation; the pose (b, q) and extras another."""
        ds = self.dataset
        item = shuffled_item(rng, ds.faces, ds.mesh(a, p), ds.mesh(b, q), ds.mesh(a, q) if target else None,
                             {key: ds.mesh(i, r) for key, (i, r) in extra_pose_meshes})
        item.update(identity_index=a, identity_pose=p, pose_identity=b, pose_index=q)
        return item


def bbox_centred(vertices: np.ndarray) -> np.ndarray:
    """(..., V, 3) meshes moved so that each bounding-box centre is at the origin (float32 copy)."""
    v = np.array(vertices, dtype=np.float32)
    v -= (v.max(-2, keepdims=True) + v.min(-2, keepdims=True)) / 2
    return v


def shuffled_item(rng: np.random.Generator, faces: np.ndarray, identity: np.ndarray, pose: np.ndarray,
                  target: np.ndarray | None = None, extra_pose_meshes: dict | None = None) -> dict:
    """One training sample from centred (V, 3) meshes on the shared `faces` (F, 3).

    The identity mesh and its target share one random permutation, the pose mesh and every extra
    pose mesh (e.g. "pose2") another; faces are re-indexed for each. Returns the tensors of the item
    layout documented below (_ITEM_DOC), without the grid indices.
    """
    V = identity.shape[0]
    perm_i, faces_i = _shuffle(faces, rng, V)
    perm_p, faces_p = _shuffle(faces, rng, pose.shape[0])
    item = {"identity": torch.from_numpy(identity[perm_i]), "pose": torch.from_numpy(pose[perm_p]),
            "identity_faces": torch.from_numpy(faces_i), "pose_faces": torch.from_numpy(faces_p),
            "identity_perm": torch.from_numpy(perm_i), "pose_perm": torch.from_numpy(perm_p)}
    if target is not None:
        item["target"] = torch.from_numpy(target[perm_i])
    for key, mesh in (extra_pose_meshes or {}).items():
        item[key] = torch.from_numpy(mesh[perm_p])
    return item


_ITEM_DOC = """
    Item (a dict; a DataLoader stacks each entry along a new first axis):
        "identity": (V, 3) float32, identity a in pose p, shuffled by identity_perm.
        "pose": (V, 3) float32, identity b in pose q, shuffled by pose_perm.
        "identity_faces", "pose_faces": (F, 3) int64, the shared faces re-indexed for each shuffle.
        "identity_perm", "pose_perm": (V,) int64 with shuffled = original[perm].
        "identity_index" a, "identity_pose" p, "pose_identity" b, "pose_index" q: ints.
    Every mesh is centred on its bounding-box centre. Item i is a function of (seed, epoch, i) only,
    so DataLoader workers agree and a resumed run draws the same samples; see set_epoch.
"""


class SupervisedPairs(_Samples):
    """Supervised pairs: identity mesh (a, p), pose mesh (b, q) and ground truth (a, q).

    a and b are drawn independently from `identities` (b may equal a); p != q are drawn from
    `poses` (equal only if there is one pose). `length` items per epoch.
    """ + _ITEM_DOC + """        "target": (V, 3) float32, the ground truth (a, q), shuffled by identity_perm.
    """

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        a, b = self.identities[rng.integers(len(self.identities))], self.identities[rng.integers(len(self.identities))]
        p, q = _pick_two(rng, self.poses)
        return self._item(rng, a, p, b, q)


class UnlabelledTriplets(_Samples):
    """Unlabelled triplets: identity (a, p), pose (b, q) and P2 = (b, r) with r != q; no ground truth.

    P and P2 show the same identity b and share the pose mesh's permutation and faces, so the
    cross-consistency target of G(P2, P) is P itself, vertex for vertex. Needs >= 2 poses.
    """ + _ITEM_DOC + """        "pose2": (V, 3) float32, identity b in pose r, shuffled by pose_perm.
        "pose2_index": int r.
    """

    def __init__(self, dataset: MeshDataset, identities, poses, length: int, seed: int):
        super().__init__(dataset, identities, poses, length, seed)
        if len(self.poses) < 2:
            raise ValueError(f"UnlabelledTriplets needs at least two poses (P2 must differ from P), got {self.poses}")

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        a, b = self.identities[rng.integers(len(self.identities))], self.identities[rng.integers(len(self.identities))]
        q, r = _pick_two(rng, self.poses)
        p = self.poses[rng.integers(len(self.poses))]
        item = self._item(rng, a, p, b, q, [("pose2", (b, r))], target=False)
        item["pose2_index"] = r
        return item


class TestPairs(_Samples):
    """The fixed triplets of `dataset.test_lists[list_name]` ("unseen" or "seen"), in list order.

    The shuffles come from (seed, i) with a fixed seed, so evaluation is deterministic.
    """ + _ITEM_DOC + """        "target": (V, 3) float32, the ground truth (a, q), shuffled by identity_perm.
        "pair": int, the position i in the test list.
    """
    __test__ = False  # not a pytest class

    def __init__(self, dataset: MeshDataset, list_name: str, seed: int = 0):
        if list_name not in dataset.test_lists or not dataset.test_lists[list_name]:
            raise ValueError(f"dataset {dataset.path} has no (or an empty) test list {list_name!r}; "
                             f"it has {sorted(dataset.test_lists)}")
        self.list_name = list_name
        self.quads = [[int(x) for x in quad] for quad in dataset.test_lists[list_name]]
        ids = sorted({q[0] for q in self.quads} | {q[2] for q in self.quads})
        poses = sorted({q[1] for q in self.quads} | {q[3] for q in self.quads})
        super().__init__(dataset, ids, poses, len(self.quads), seed)

    def set_epoch(self, epoch: int) -> None:
        """Test items never change between epochs (a no-op kept for a uniform interface)."""

    def __getitem__(self, index: int) -> dict:
        a, p, b, q = self.quads[index] if 0 <= index < len(self.quads) else (None,) * 4
        item = self._item(self._rng(index), a, p, b, q)
        item["pair"] = int(index)
        return item


def semi_supervised_split(dataset: MeshDataset, percentage: float, seed: int) -> dict[str, list[int]]:
    """Label `percentage`% of the training identities and, independently, of the training poses.

    Args:
        dataset: a MeshDataset (its train_identities and train_poses are split).
        percentage: in [0, 100]; the labelled count is round(n * percentage / 100), at least 1
            when percentage > 0 and at most n - 1 when percentage < 100 (if n allows).
        seed: the split is a function of (seed, percentage, the lists) only.
    Returns:
        {"labelled_identities", "unlabelled_identities", "labelled_poses", "unlabelled_poses"}:
        sorted lists of int; labelled and unlabelled partition the training lists. Supervised pairs
        use the labelled identities x labelled poses; the rest feeds UnlabelledTriplets.
    """
    if not 0 <= percentage <= 100:
        raise ValueError(f"percentage must be in [0, 100], got {percentage}")
    rng = np.random.default_rng([int(seed), 7])
    out = {}
    for kind, values in (("identities", dataset.train_identities), ("poses", dataset.train_poses)):
        order = [int(values[i]) for i in rng.permutation(len(values))]
        k = int(round(len(values) * percentage / 100))
        if 0 < percentage < 100 and len(values) >= 2:
            k = min(max(k, 1), len(values) - 1)
        out[f"labelled_{kind}"], out[f"unlabelled_{kind}"] = sorted(order[:k]), sorted(order[k:])
    return out
