"""Readers for mesh folders in the published layouts and plain folders of meshes.

- NPT / SMPL (`id{I}_{P}.obj`, 6,890 vertices): `read_npt_folder`.
- SMAL animals (`toy_{I}_{P}.ply`, 3,889 vertices): `read_smal_folder`.
- Any folder of meshes that share one topology: `read_mesh_folder` (a file-name pattern with
  identity and pose groups, or every file one frame of one identity).
Test lists are text files with one triplet per line, `identity pose gt`, each a mesh file name of
the folder (a path or a name without suffix also works); the ground truth must be the identity
mesh's identity in the pose mesh's pose.

Every reader returns a `MeshDataset` (vertices loaded into memory as (I, P, V, 3) float32) that the
sample classes in `mapconnet.data.datasets` use unchanged. The published data keeps training and
test meshes in separate folders; read each with `split="train"` or `split="test"`.
Files are read with trimesh and `process=False`, so vertex order is kept.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mapconnet.meshio import MESH_SUFFIXES, load_mesh

from .datasets import MeshDataset

NPT_PATTERN = r"^id(?P<identity>\d+)_(?P<pose>\d+)\.obj$"
SMAL_PATTERN = r"^toy_(?P<identity>\d+)_(?P<pose>\d+)\.ply$"


def _natural_key(label: str):
    """Sort '10' after '9' and 'frame10' after 'frame9'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(label))]


def read_npt_folder(folder, *, test_list=None, split: str = "train", list_name: str = "unseen") -> MeshDataset:
    """Read an NPT/SMPL folder of `id{I}_{P}.obj` meshes (a full identities x poses grid).

    Args:
        folder: the folder.  test_list: optional text file of `identity pose gt` lines.
        split: "train" puts every identity and pose in the training lists, "test" in the test lists.
        list_name: the name the test list gets in `test_lists`.
    Returns:
        a validated MeshDataset; manifest["identity_labels"] / ["pose_labels"] give each grid row's
        and column's number in the file names.
    """
    return read_mesh_folder(folder, pattern=NPT_PATTERN, test_list=test_list, split=split,
                            list_name=list_name, source="npt")


def read_smal_folder(folder, *, test_list=None, split: str = "train", list_name: str = "unseen") -> MeshDataset:
    """Read a SMAL folder of `toy_{I}_{P}.ply` meshes; arguments and result as `read_npt_folder`."""
    return read_mesh_folder(folder, pattern=SMAL_PATTERN, test_list=test_list, split=split,
                            list_name=list_name, source="smal")


def read_mesh_folder(folder, *, pattern: str | None = None, arrange: str = "poses", test_list=None,
                     split: str = "train", list_name: str = "unseen", source: str = "folder") -> MeshDataset:
    """Read a folder of meshes that share one topology into a MeshDataset.

    Args:
        folder: the folder (not searched recursively).
        pattern: a regular expression with named groups `identity` and `pose` matched against each
            file name; the matching files must form a full identities x poses grid. Without it,
            every mesh file (suffixes .obj .ply .off .stl .glb .gltf) counts, in natural name order.
        arrange: without a pattern, "poses" makes the files the poses of one identity (frames of a
            sequence): grid (1, N); "identities" makes them N identities in one pose: grid (N, 1).
        test_list: optional text file of `identity pose gt` file-name lines.
        split: "train" or "test": which lists of the dataset get the grid's identities and poses.
        list_name: key of the test list in `test_lists`.
        source: recorded in the manifest.
    Returns:
        a validated MeshDataset with vertices (I, P, V, 3) float32 and faces (F, 3) int64.
    Raises:
        FileNotFoundError: missing folder or test list.
        ValueError: no matching files, an incomplete grid, an unreadable mesh, a mesh whose vertex
            count or faces differ from the first one, NaN coordinates, an empty test list, a list
            line naming a file that is not in the folder, or a wrong ground truth.
    """
    folder = Path(folder)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if arrange not in ("poses", "identities"):
        raise ValueError(f"arrange must be 'poses' or 'identities', got {arrange!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"mesh folder {folder} does not exist")
    files = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: _natural_key(p.name))
    found: dict[tuple[str, str], Path] = {}
    if pattern is not None:
        regex = re.compile(pattern)
        if not {"identity", "pose"} <= set(regex.groupindex):
            raise ValueError(f"pattern {pattern!r} needs named groups (?P<identity>...) and (?P<pose>...)")
        for p in files:
            m = regex.match(p.name)
            if m:
                found[(m.group("identity"), m.group("pose"))] = p
        expected = f"files named like {pattern}"
    else:
        meshes = [p for p in files if p.suffix.lower() in MESH_SUFFIXES]
        for p in meshes:
            found[("0", p.stem) if arrange == "poses" else (p.stem, "0")] = p
        expected = f"mesh files ({', '.join(MESH_SUFFIXES)})"
    if not found:
        raise ValueError(f"mesh folder {folder} has no {expected}")
    ids = sorted({i for i, _ in found}, key=_natural_key)
    poses = sorted({p for _, p in found}, key=_natural_key)
    missing = [f"identity {i} pose {p}" for i in ids for p in poses if (i, p) not in found]
    if missing:
        raise ValueError(f"mesh folder {folder} lacks {len(missing)} meshes of its {len(ids)} x {len(poses)} "
                         f"identities x poses grid, e.g. {missing[:3]}; expected a full grid")
    row, col = {i: k for k, i in enumerate(ids)}, {p: k for k, p in enumerate(poses)}
    vertices = faces = first = None
    for (i, p), file in tqdm(found.items(), desc=f"reading {folder.name}", unit="mesh", disable=len(found) < 200):
        v, f = load_mesh(file, require_faces=True)
        if vertices is None:
            vertices = np.empty((len(ids), len(poses), len(v), 3), dtype=np.float32)
            faces, first = f, file
        elif len(v) != vertices.shape[2]:
            raise ValueError(f"mesh {file} has {len(v)} vertices but {first} has {vertices.shape[2]}; "
                             f"every mesh of a folder must share one topology")
        elif not np.array_equal(f, faces):
            raise ValueError(f"mesh {file} has different faces from {first} ({len(f)} vs {len(faces)} triangles"
                             f"{'' if len(f) != len(faces) else ', same count, different indices'}); "
                             f"every mesh of a folder must share one topology")
        vertices[row[i], col[p]] = v
    lists = {}
    if test_list is not None:
        lists[list_name] = _read_test_list(Path(test_list), found, row, col)
    all_ids, all_poses = list(range(len(ids))), list(range(len(poses)))
    train = (all_ids, all_poses) if split == "train" else ([], [])
    test = (all_ids, all_poses) if split == "test" else ([], [])
    manifest = {"source": source, "folder": str(folder), "identity_labels": ids, "pose_labels": poses,
                "num_vertices": int(vertices.shape[2]),
                "files": {f"{row[i]},{col[p]}": f.name for (i, p), f in found.items()}}
    ds = MeshDataset(vertices, faces, train[0], train[1], test[0], test[1], lists, manifest=manifest, path=folder)
    return ds.validate()


def _read_test_list(path: Path, found: dict, row: dict, col: dict) -> list[list[int]]:
    """Parse `identity pose gt` lines into [identity, identity_pose, pose_identity, pose] grid indices."""
    if not path.is_file():
        raise FileNotFoundError(f"test list {path} does not exist")
    by_name = {}
    for key, p in found.items():
        by_name[p.name] = key
        by_name.setdefault(p.stem, key)
    quads = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        names = line.split()
        if len(names) != 3:
            raise ValueError(f"{path}:{n}: expected three mesh file names 'identity pose gt', got {line!r}")
        keys = []
        for name in names:
            key = by_name.get(Path(name).name, by_name.get(Path(name).stem))
            if key is None:
                folder = next(iter(found.values())).parent
                raise ValueError(f"{path}:{n}: {name} names no mesh file of the folder {folder}")
            keys.append(key)
        (a, p), (b, q), gt = keys
        if gt != (a, q):
            raise ValueError(f"{path}:{n}: ground truth {names[2]} should be identity {a} in pose {q} "
                             f"(the identity mesh's identity in the pose mesh's pose)")
        quads.append([row[a], col[p], row[b], col[q]])
    if not quads:
        raise ValueError(f"test list {path} is empty; expected lines 'identity pose gt'")
    return quads
