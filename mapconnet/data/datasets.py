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
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mapconnet.meshio import load_mesh


@dataclass
class MeshDataset:
    """Meshes of identities x poses sharing one topology.

    vertices: (I, P, V, 3) float32 array (np.memmap for generated data); faces: (F, 3) int64;
    test_lists: name -> list of [identity, identity_pose, pose_identity, pose].
    """
    vertices: np.ndarray
    faces: np.ndarray
    train_identities: list[int]
    train_poses: list[int]
    test_identities: list[int]
    test_poses: list[int]
    test_lists: dict[str, list[list[int]]]
    manifest: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_vertices(self) -> int:
        return self.vertices.shape[2]

    def mesh(self, identity: int, pose: int) -> np.ndarray:
        """(V, 3) float32 mesh of `identity` in `pose`, bounding-box centred."""
        v = np.asarray(self.vertices[identity, pose], dtype=np.float32)
        return v - (v.max(0) + v.min(0)) / 2


def open_dataset(path) -> MeshDataset:
    """Open a folder written by `python -m mapconnet.data.generate` (vertices are memory-mapped)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder {path} does not exist; build one with "
                                f"`python -m mapconnet.data.generate --out {path}`")
    for name in ("vertices.npy", "faces.npy", "manifest.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"dataset folder {path} has no {name}; expected generator output")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        vertices = np.load(path / "vertices.npy", mmap_mode="r")
        faces = np.load(path / "faces.npy")
    except (ValueError, OSError) as e:
        raise ValueError(f"dataset folder {path} is corrupt: {e}") from None
    if vertices.ndim != 4 or vertices.shape[-1] != 3:
        raise ValueError(f"{path / 'vertices.npy'} has shape {vertices.shape}; expected (I, P, V, 3)")
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.max() >= vertices.shape[2]:
        raise ValueError(f"{path / 'faces.npy'} (shape {faces.shape}) does not index the {vertices.shape[2]} vertices")
    keys = ("train_identities", "train_poses", "test_identities", "test_poses", "test_lists")
    missing = [k for k in keys if k not in manifest]
    if missing:
        raise ValueError(f"{path / 'manifest.json'} lacks {missing}")
    return MeshDataset(vertices, faces.astype(np.int64), *(manifest[k] for k in keys), manifest=manifest, path=path)


PUBLISHED_LAYOUTS = {"npt": re.compile(r"^id(\d+)_(\d+)\.obj$"), "smal": re.compile(r"^toy_(\d+)_(\d+)\.ply$")}


def read_published(folder, layout: str, test_list=None) -> MeshDataset:
    """Read a published layout: NPT/SMPL (`id{I}_{P}.obj`) or SMAL (`toy_{I}_{P}.ply`).

    Every file must share one vertex count and face list (checked, with the offending file named).
    `test_list` (optional) is a text file of lines `identity_file pose_file gt_file`; it becomes
    the "unseen" list. Without it every mesh is training data.
    """
    folder = Path(folder)
    if layout not in PUBLISHED_LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(PUBLISHED_LAYOUTS)}, got {layout!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"mesh folder {folder} does not exist")
    pattern = PUBLISHED_LAYOUTS[layout]
    found = {}
    for p in sorted(folder.iterdir()):
        m = pattern.match(p.name)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = p
    if not found:
        raise ValueError(f"mesh folder {folder} has no files named like {pattern.pattern}")
    ids = sorted({i for i, _ in found})
    poses = sorted({p for _, p in found})
    missing = [f"{i},{p}" for i in ids for p in poses if (i, p) not in found]
    if missing:
        raise ValueError(f"mesh folder {folder} lacks identity,pose combinations {missing[:5]}; expected a full grid")
    vertices, faces = None, None
    for (i, p), file in found.items():
        v, f = load_mesh(file, require_faces=True)
        if vertices is None:
            vertices = np.zeros((len(ids), len(poses), len(v), 3), dtype=np.float32)
            faces, first = f, file
        elif len(v) != vertices.shape[2] or not np.array_equal(f, faces):
            raise ValueError(f"mesh {file} has {len(v)} vertices / {len(f)} faces but {first} has "
                             f"{vertices.shape[2]} / {len(faces)}; expected one shared topology")
        vertices[ids.index(i), poses.index(p)] = v
    lists = {}
    if test_list is not None:
        lists["unseen"] = _read_test_list(Path(test_list), found, ids, poses)
    return MeshDataset(vertices, faces, list(range(len(ids))), list(range(len(poses))), [], [], lists, path=folder)


def _read_test_list(path: Path, found, ids, poses) -> list[list[int]]:
    if not path.is_file():
        raise FileNotFoundError(f"test list {path} does not exist")
    by_name = {p.name: key for key, p in found.items()}
    quads = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        names = line.split()
        if len(names) != 3:
            raise ValueError(f"{path}:{n}: expected 'identity pose gt' file names, got {line!r}")
        for name in names:
            if Path(name).name not in by_name:
                raise ValueError(f"{path}:{n}: {name} is not a mesh of the folder")
        (a, p), (b, q), _ = (by_name[Path(x).name] for x in names)
        quads.append([ids.index(a), poses.index(p), ids.index(b), poses.index(q)])
    if not quads:
        raise ValueError(f"test list {path} is empty")
    return quads


def _shuffle(faces: np.ndarray, rng: np.random.Generator, n: int):
    """A random permutation (shuffled = original[perm]) and the faces re-indexed for it."""
    perm = rng.permutation(n)
    inverse = np.empty(n, dtype=np.int64)
    inverse[perm] = np.arange(n)
    return perm, inverse[faces]


def _pick_two(rng, values):
    """Two different values when possible."""
    if len(values) < 2:
        return values[0], values[0]
    a, b = rng.choice(len(values), 2, replace=False)
    return values[a], values[b]


class _Samples(torch.utils.data.Dataset):
    def __init__(self, dataset: MeshDataset, identities, poses, length: int, seed: int):
        if not identities or not poses:
            raise ValueError(f"need at least one identity and one pose, got {len(identities)} and {len(poses)}")
        self.dataset, self.identities, self.poses = dataset, list(identities), list(poses)
        self.length, self.seed, self.epoch = int(length), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        return self.length

    def _rng(self, index):
        return np.random.default_rng([self.seed, self.epoch, index])

    def _item(self, rng, a, p, b, q, extra_pose_meshes=(), target=True):
        """Identity (a, p) and target (a, q) share a permutation; the pose (b, q) and extras another."""
        ds, V = self.dataset, self.dataset.num_vertices
        perm_i, faces_i = _shuffle(ds.faces, rng, V)
        perm_p, faces_p = _shuffle(ds.faces, rng, V)
        item = {"identity": torch.from_numpy(ds.mesh(a, p)[perm_i]), "pose": torch.from_numpy(ds.mesh(b, q)[perm_p]),
                "identity_faces": torch.from_numpy(faces_i), "pose_faces": torch.from_numpy(faces_p),
                "identity_perm": torch.from_numpy(perm_i), "pose_perm": torch.from_numpy(perm_p),
                "identity_index": a, "identity_pose": p, "pose_identity": b, "pose_index": q}
        if target:
            item["target"] = torch.from_numpy(ds.mesh(a, q)[perm_i])
        for key, (i, r) in extra_pose_meshes:
            item[key] = torch.from_numpy(ds.mesh(i, r)[perm_p])
        return item


class SupervisedPairs(_Samples):
    """(identity (a, p), pose (b, q), ground truth (a, q)); a may equal b, p != q when possible."""

    def __getitem__(self, index):
        rng = self._rng(index)
        a, b = self.identities[rng.integers(len(self.identities))], self.identities[rng.integers(len(self.identities))]
        p, q = _pick_two(rng, self.poses)
        return self._item(rng, int(a), int(p), int(b), int(q))


class UnlabelledTriplets(_Samples):
    """Identity (a, p), pose (b, q) and P2 = (b, r) with r != q; no ground truth.

    P and P2 share identity b and one vertex permutation (the cross-consistency target of
    G(P2, P) is P itself, vertex for vertex).
    """

    def __init__(self, dataset, identities, poses, length, seed):
        super().__init__(dataset, identities, poses, length, seed)
        if len(self.poses) < 2:
            raise ValueError("unlabelled triplets need at least two poses (P2 must differ from P)")

    def __getitem__(self, index):
        rng = self._rng(index)
        a, b = self.identities[rng.integers(len(self.identities))], self.identities[rng.integers(len(self.identities))]
        q, r = _pick_two(rng, self.poses)
        p = self.poses[rng.integers(len(self.poses))]
        item = self._item(rng, int(a), int(p), int(b), int(q), [("pose2", (int(b), int(r)))], target=False)
        item["pose2_index"] = int(r)
        return item


class TestPairs(_Samples):
    """The fixed triplets of test list `list_name`; the shuffle uses a fixed seed (deterministic)."""

    def __init__(self, dataset: MeshDataset, list_name: str, seed: int = 0):
        if list_name not in dataset.test_lists or not dataset.test_lists[list_name]:
            raise ValueError(f"dataset has no (or an empty) test list {list_name!r}; it has {sorted(dataset.test_lists)}")
        self.quads = dataset.test_lists[list_name]
        super().__init__(dataset, [0], [0], len(self.quads), seed)

    def __getitem__(self, index):
        a, p, b, q = self.quads[index]
        item = self._item(self._rng(index), a, p, b, q)
        item["pair"] = index
        return item


def semi_supervised_split(dataset: MeshDataset, percentage: float, seed: int) -> dict[str, list[int]]:
    """Label `percentage`% of the training identities and, independently, of the training poses."""
    if not 0 <= percentage <= 100:
        raise ValueError(f"percentage must be in [0, 100], got {percentage}")
    rng = np.random.default_rng([seed, 7])
    out = {}
    for kind, values in (("identities", dataset.train_identities), ("poses", dataset.train_poses)):
        order = [values[i] for i in rng.permutation(len(values))]
        k = int(round(len(values) * percentage / 100))
        out[f"labelled_{kind}"], out[f"unlabelled_{kind}"] = sorted(order[:k]), sorted(order[k:])
    return out
