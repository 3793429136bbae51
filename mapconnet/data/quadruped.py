"""A procedural quadruped body model: skeleton, template mesh, shape space, poses, skinning.

    model = load_model()                                  # built once per process (a few seconds)
    shapes = sample_identities(["cat", "horse"], rng)     # (2, K) shape coefficients
    angles = PoseSampler().sample(rng)                    # (J, 3) joint angles in degrees
    meshes = model.posed_vertices(shapes, angles[None])   # (2, 1, V, 3) float32

No SMAL file is needed (or used): the skeleton, the template and every number below are written
here. Frame: metres, Z up, the animal's front is -Y (its head points to -Y), its left is +X, as
in anny (docs/DESIGN.md section 7). The construction (docs/DESIGN.md, "Animal mode"):

- Skeleton: JOINTS, 31 joints (pelvis, three spine segments, two neck segments, head, snout, jaw,
  two ears, four tail segments, and four legs of girdle, upper, lower and paw). Every joint has a
  bone, a segment from its head to its tail, with a radius at each end.
- Template: the zero level set of a smooth union of tapered capsules (the bones and a few flesh
  pieces: chest, belly, haunches, feet, muzzle, ears) on a 1 cm grid, triangulated by marching
  tetrahedra (a closed manifold by construction), reduced by quadric decimation to 2V - 4 faces
  and completed by splitting the longest edges, so the vertex count is exactly V (3,889 by
  default, SMAL's count). Built once per process and cached.
- Skinning weights: a softmax over bones of each vertex's distance to the bone's segment divided
  by the bone's radius (a thick bone claims its own surface; a thin one does not reach into the
  body), at most four bones per vertex, rows summing to one.
- Identity: K = len(SHAPE_LABELS) coefficients. Coefficient k changes each bone's length, its
  attachment offset and its radius (per world axis) by fixed amounts per unit; every vertex is
  written relative to its bones (position along the bone, radial offset), so joints and vertices
  are linear in the coefficients: shaped = template + sum_k beta_k D_k (blend shapes D_k).
  FAMILIES (cat, dog, horse, cow, hippo) are a mean and a spread of the coefficients each.
- Pose: per joint (pitch about X, roll about Y, yaw about Z) in degrees, R = Rz Ry Rx, in the
  world-aligned rest frame of the joint, within JOINT_RANGES. Positive pitch swings a limb that
  hangs down backward, tips a forward-pointing bone (neck, head) down and lifts the tail.
  Forward kinematics and linear blend skinning in torch, batched over identities x poses.
- Self-intersection: `collisions` tests bone capsules (see its docstring for what it catches).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

MODEL_VERSION = "1"  # bump whenever the template, weights, shape space or pose sampler change
SPECIES = ("human", "quadruped")  # the body models of mapconnet.data
NUM_VERTICES = 3889  # SMAL's vertex count
RESOLUTION = "smal"  # the template's own resolution, the only one quadrupeds have
GRID = 0.01  # marching-tetrahedra cell (m): thin parts (ears, tail tip) need about two cells


def check_species(species: str, option: str = "--species") -> None:
    """Raise ValueError naming `option` when `species` is not a body model of mapconnet.data."""
    if species not in SPECIES:
        raise ValueError(f"{option} must be one of {list(SPECIES)}, got {species!r}")


def _p(forward: float, up: float, left: float = 0.0) -> tuple[float, float, float]:
    """A rest position given as (forward, up, left) metres; the model's frame has its front at -Y."""
    return (left, -forward, up)


# ---------------------------------------------------------------- skeleton

# name: (parent, head, tail, radius at head, radius at tail, cross-section scale per world axis).
# Positions are (forward, up, left) in metres for a generic medium animal (the template, beta = 0);
# left-side joints end in _L and are mirrored to _R below. The torso's axis is its centre line,
# not the anatomical spine, so a bone's capsule is the flesh around it.
_LEFT_AND_AXIAL = {
    "pelvis": (None, _p(-0.38, 0.64), _p(-0.14, 0.63), 0.130, 0.140, (0.80, 1, 1.00)),
    "spine1": ("pelvis", _p(-0.14, 0.63), _p(0.10, 0.63), 0.140, 0.160, (0.80, 1, 1.00)),
    "spine2": ("spine1", _p(0.10, 0.63), _p(0.30, 0.65), 0.160, 0.150, (0.80, 1, 1.00)),
    "spine3": ("spine2", _p(0.30, 0.65), _p(0.44, 0.72), 0.150, 0.110, (0.80, 1, 1.00)),
    "neck1": ("spine3", _p(0.44, 0.72), _p(0.53, 0.85), 0.100, 0.080, (0.85, 1, 1.00)),
    "neck2": ("neck1", _p(0.53, 0.85), _p(0.60, 0.96), 0.080, 0.068, (0.85, 1, 1.00)),
    "head": ("neck2", _p(0.60, 0.96), _p(0.71, 0.97), 0.080, 0.068, (0.85, 1, 0.95)),
    "snout": ("head", _p(0.71, 0.97), _p(0.86, 0.925), 0.052, 0.036, (0.85, 1, 0.90)),
    "jaw": ("head", _p(0.64, 0.925), _p(0.83, 0.895), 0.040, 0.022, (0.80, 1, 0.80)),
    "ear_L": ("head", _p(0.63, 1.015, 0.040), _p(0.61, 1.11, 0.078), 0.044, 0.012, (1, 0.4, 1)),
    "tail1": ("pelvis", _p(-0.47, 0.66), _p(-0.57, 0.63), 0.042, 0.034, (1, 1, 1)),
    "tail2": ("tail1", _p(-0.57, 0.63), _p(-0.66, 0.56), 0.034, 0.028, (1, 1, 1)),
    "tail3": ("tail2", _p(-0.66, 0.56), _p(-0.73, 0.47), 0.028, 0.022, (1, 1, 1)),
    "tail4": ("tail3", _p(-0.73, 0.47), _p(-0.78, 0.37), 0.022, 0.014, (1, 1, 1)),
    # front leg: scapula, upper arm (shoulder to elbow), forearm (elbow to wrist), paw (wrist to toe)
    "girdle_FL": ("spine3", _p(0.31, 0.68, 0.05), _p(0.37, 0.50, 0.105), 0.075, 0.075, (1, 1, 1)),
    "upper_FL": ("girdle_FL", _p(0.37, 0.50, 0.105), _p(0.31, 0.34, 0.11), 0.066, 0.048, (1, 1, 1)),
    "lower_FL": ("upper_FL", _p(0.31, 0.34, 0.11), _p(0.31, 0.10, 0.11), 0.040, 0.028, (1, 1, 1)),
    "paw_FL": ("lower_FL", _p(0.31, 0.10, 0.11), _p(0.33, 0.03, 0.11), 0.028, 0.030, (1, 1, 1)),
    # hind leg: haunch, thigh (hip to stifle), shank (stifle to hock), paw (hock to toe)
    "girdle_HL": ("pelvis", _p(-0.30, 0.65, 0.05), _p(-0.34, 0.53, 0.10), 0.090, 0.085, (1, 1, 1)),
    "upper_HL": ("girdle_HL", _p(-0.34, 0.53, 0.10), _p(-0.24, 0.33, 0.11), 0.080, 0.052, (1, 1, 1)),
    "lower_HL": ("upper_HL", _p(-0.24, 0.33, 0.11), _p(-0.36, 0.14, 0.11), 0.042, 0.028, (1, 1, 1)),
    "paw_HL": ("lower_HL", _p(-0.36, 0.14, 0.11), _p(-0.33, 0.03, 0.11), 0.028, 0.030, (1, 1, 1)),
}


def _mirror(name: str) -> str:
    """The right-side twin of a left joint (left names end in "L", right ones in "R")."""
    return name[:-1] + "R" if _side(name) == 1 else name


def _side(name: str) -> int:
    """+1 for a left joint, -1 for a right one, 0 on the axis (axial names end in lowercase or a digit)."""
    return 1 if name.endswith("L") else -1 if name.endswith("R") else 0


def _flip(point) -> tuple[float, float, float]:
    return (-point[0], point[1], point[2])


def _skeleton() -> dict:
    """name -> (parent, head, tail, r0, r1, section) for both sides, every parent before its children."""
    rows = dict(_LEFT_AND_AXIAL)
    for name, (parent, head, tail, r0, r1, section) in _LEFT_AND_AXIAL.items():
        if _side(name) == 1:
            rows[_mirror(name)] = (_mirror(parent), _flip(head), _flip(tail), r0, r1, section)
    return rows


_ROWS = _skeleton()
JOINTS = tuple(_ROWS)
PARENTS = tuple(-1 if _ROWS[n][0] is None else JOINTS.index(_ROWS[n][0]) for n in JOINTS)
assert all(p < j for j, p in enumerate(PARENTS)), "every parent must come before its children"
REST_HEADS = np.array([_ROWS[n][1] for n in JOINTS], dtype=np.float64)  # (J, 3)
REST_TAILS = np.array([_ROWS[n][2] for n in JOINTS], dtype=np.float64)  # (J, 3)
RADII = np.array([(_ROWS[n][3], _ROWS[n][4]) for n in JOINTS], dtype=np.float64)  # (J, 2) at head and tail
SECTIONS = np.array([_ROWS[n][5] for n in JOINTS], dtype=np.float64)  # (J, 3)

# Extra flesh (not bones): the joint it belongs to, two ends as offsets (forward, up, left) from
# that joint's rest head, radii at the ends and a cross-section scale. Left-side pieces are
# mirrored to the right.
_FLESH = [
    ("spine3", (-0.04, -0.06, 0), (0.08, -0.06, 0), 0.125, 0.100, (0.75, 1, 1)),  # chest (brisket)
    ("spine1", (-0.20, -0.01, 0), (0.30, -0.03, 0), 0.140, 0.150, (0.82, 1, 1)),  # barrel: belly and ribs
    ("pelvis", (0.00, 0.01, 0), (-0.08, 0.00, 0), 0.115, 0.095, (0.85, 1, 1)),  # rump
    ("snout", (0.00, -0.005, 0), (0.135, -0.04, 0), 0.050, 0.040, (0.95, 1, 0.85)),  # muzzle, nose
    ("head", (-0.03, 0.0, 0), (0.05, 0.015, 0), 0.082, 0.074, (1.0, 1, 0.92)),  # cranium, cheeks
    ("upper_HL", (0.0, 0.0, 0.0), (0.07, -0.14, 0.005), 0.085, 0.060, (0.95, 1, 1)),  # thigh muscle
    ("girdle_FL", (0.00, 0.00, 0.0), (0.05, -0.14, 0.01), 0.070, 0.068, (0.9, 1, 1)),  # shoulder
    ("paw_FL", (-0.01, -0.07, 0.0), (0.05, -0.075, 0.0), 0.034, 0.030, (1, 1, 0.8)),  # front foot
    ("paw_HL", (0.02, -0.11, 0.0), (0.08, -0.115, 0.0), 0.034, 0.030, (1, 1, 0.8)),  # hind foot
]
BLEND = 0.04  # smooth-union radius (m): how far flesh pieces fillet into each other

# ---------------------------------------------------------------- shape space

# Coefficient name: ({joint name prefixes: change of the bone's length per unit}, {prefixes:
# change of its radius along each world axis (x, y, z) per unit}, {prefixes: displacement of the
# bone's tail (forward, up, left) in metres per unit, which turns the bone: faces pointing down,
# necks carried low, ears spread sideways}). A joint's head stays at the same relative place on
# its parent's bone, so lengths, radii and turns move every child with them.
_TORSO = ("pelvis", "spine")
_LIMB = ("upper_", "lower_", "paw_")
_HEAD = ("head", "snout", "jaw", "ear_")
SHAPES = {
    "size": ({("",): 1.0}, {("",): (1, 1, 1)}, {}),
    "body_length": ({_TORSO: 1.0}, {}, {}),
    "girth": ({("girdle_",): 0.8}, {_TORSO: (1, 1, 1), ("girdle_",): (1, 1, 1), ("neck1",): (0.5, 0.5, 0.5)}, {}),
    "width": ({}, {_TORSO: (1, 0, 0), ("girdle_",): (0.8, 0, 0)}, {}),
    "neck_length": ({("neck",): 1.0}, {}, {}),
    "neck_thickness": ({}, {("neck",): (1, 1, 1), ("head",): (0.3, 0.3, 0.3)}, {}),
    "neck_angle": ({}, {}, {("neck",): (0.05, -0.08, 0)}),
    "head_size": ({_HEAD: 1.0}, {_HEAD: (1, 1, 1)}, {}),
    "snout_length": ({("snout", "jaw"): 1.0}, {}, {}),
    "snout_width": ({}, {("snout", "jaw"): (1, 0.3, 0.5)}, {}),
    "face_angle": ({}, {}, {("head",): (-0.01, -0.03, 0), ("snout", "jaw"): (-0.03, -0.09, 0)}),
    "leg_length": ({_LIMB: 1.0}, {}, {}),
    "leg_thickness": ({}, {_LIMB: (1, 1, 1), ("girdle_",): (0.4, 0.4, 0.4)}, {}),
    "paw_size": ({}, {("paw_",): (1, 1, 1)}, {}),
    "tail_length": ({("tail",): 1.0}, {}, {}),
    "tail_thickness": ({}, {("tail",): (1, 1, 1)}, {}),
    "ear_size": ({("ear_",): 1.0}, {("ear_",): (1, 1, 1)}, {}),
    "ear_spread": ({}, {}, {("ear_",): (0.0, -0.06, 0.06)}),
}
SHAPE_LABELS = tuple(SHAPES)
SHAPE_RANGE = (-0.6, 1.4)  # every coefficient is clipped to this box

# Family: (mean coefficients by name, others 0; spread: the standard deviation of each coefficient).
FAMILIES = {
    "cat": ({"size": -0.15, "body_length": 0.05, "girth": -0.25, "width": -0.05, "neck_length": -0.45,
             "neck_thickness": -0.1, "neck_angle": 0.2, "head_size": 0.1, "snout_length": -0.7,
             "snout_width": 0.1, "leg_length": -0.15, "leg_thickness": -0.3, "paw_size": 0.1, "tail_length": 0.6,
             "tail_thickness": -0.2, "ear_size": 0.35}, 0.06),
    "dog": ({"snout_length": -0.2, "snout_width": 0.2, "tail_length": 0.1, "ear_size": 0.3, "ear_spread": 0.5,
             "neck_angle": 0.1, "face_angle": 0.1}, 0.1),
    "horse": ({"size": 0.3, "body_length": 0.15, "width": -0.15, "neck_length": 0.3, "neck_thickness": 0.35,
               "neck_angle": 0.0, "head_size": 0.2, "snout_length": 0.6, "snout_width": 0.35, "face_angle": 1.0,
               "leg_length": 0.55, "leg_thickness": -0.15, "paw_size": -0.15, "tail_length": -0.05,
               "tail_thickness": 0.5, "ear_size": -0.15}, 0.06),
    "cow": ({"size": 0.3, "body_length": 0.1, "girth": 0.4, "width": 0.15, "neck_length": -0.15,
             "neck_thickness": 0.45, "neck_angle": 0.6, "head_size": 0.4, "snout_length": -0.1, "snout_width": 0.9,
             "face_angle": 0.8, "leg_length": 0.0, "leg_thickness": 0.05, "paw_size": -0.1, "tail_length": 0.15,
             "tail_thickness": -0.35, "ear_size": 0.1, "ear_spread": 1.0}, 0.06),
    "hippo": ({"size": 0.3, "body_length": 0.15, "girth": 0.65, "width": 0.35, "neck_length": -0.5,
               "neck_thickness": 0.7, "neck_angle": 0.9, "head_size": 0.55, "snout_length": -0.1,
               "snout_width": 0.8, "face_angle": 0.2, "leg_length": -0.45, "leg_thickness": 0.5, "paw_size": 0.0,
               "tail_length": -0.55, "ear_size": -0.5, "ear_spread": 0.3}, 0.05),
}
FAMILY_ALL = "all"  # every family in turn


def _matching(prefixes: tuple[str, ...]) -> list[int]:
    """Indices of the joints whose names start with one of `prefixes` ("" matches every joint)."""
    return [j for j, n in enumerate(JOINTS) if n.startswith(prefixes)]


def _shape_matrices() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A (J, K): change of each bone's length per unit of each coefficient; C (J, K, 3): change of
    its radius along each world axis; E (J, K, 3): displacement of its tail in the model's frame
    (mirrored for right-side bones). Later entries of a coefficient's dict override earlier ones."""
    A = np.zeros((len(JOINTS), len(SHAPE_LABELS)))
    C = np.zeros((len(JOINTS), len(SHAPE_LABELS), 3))
    E = np.zeros((len(JOINTS), len(SHAPE_LABELS), 3))
    for k, (lengths, radii, turns) in enumerate(SHAPES.values()):
        for prefixes, value in lengths.items():
            A[_matching(prefixes), k] = value
        for prefixes, value in radii.items():
            C[_matching(prefixes), k] = value
        for prefixes, value in turns.items():
            for j in _matching(prefixes):
                E[j, k] = _flip(_p(*value)) if _side(JOINTS[j]) == -1 else _p(*value)
    return A, C, E


# ---------------------------------------------------------------- template mesh


def _group(name: str) -> str:
    """The chain a bone belongs to: its capsules join without a fillet (a smooth union would swell
    every joint of a chain into a bead)."""
    if name.startswith(("pelvis", "spine")):
        return "torso"
    if name.startswith(("head", "snout", "jaw")):
        return "head"
    if name.startswith(("neck", "tail")):
        return name.rstrip("0123456789")
    return name.split("_")[1] if name.startswith(_LIMB) else name


def _primitives() -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """The template's pieces, each a list of capsules (a (3,), b (3,), radii (2,), cross-section
    scales (3,)): one piece per chain of bones (see _group) and one per flesh piece."""
    pieces = {}
    for j, name in enumerate(JOINTS):
        pieces.setdefault(_group(name), []).append((REST_HEADS[j], REST_TAILS[j], RADII[j], SECTIONS[j]))
    flesh = []
    for joint, o0, o1, r0, r1, section in _FLESH:
        for name in (joint, _mirror(joint)) if _side(joint) == 1 else (joint,):
            head, mirrored = REST_HEADS[JOINTS.index(name)], _side(name) == -1
            a, b = (head + np.array(_flip(_p(*o)) if mirrored else _p(*o)) for o in (o0, o1))
            flesh.append([(a, b, np.array([r0, r1]), np.array(section, dtype=np.float64))])
    return list(pieces.values()) + flesh


def _capsule_distance(points: np.ndarray, a, b, radii, section) -> np.ndarray:
    """Approximate signed distance (..., ) of points (..., 3) to one tapered capsule whose
    cross-section is scaled per world axis by `section` (3,) (negative inside)."""
    ab = b - a
    t = np.clip(((points - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
    d = (points - (a + t[..., None] * ab)) / section
    # scaling by the smallest section factor keeps the value a lower bound of the true distance
    return (np.linalg.norm(d, axis=-1) - (radii[0] + t * (radii[1] - radii[0]))) * section.min()


def _field(origin: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The template's implicit function on a grid of GRID cells: (nx, ny, nz) float64, negative
    inside. Capsules of a piece join by min(); pieces by a smooth minimum whose radius is BLEND
    or, for thin pieces, half their thinnest radius (so an ear does not fill up with fillet)."""
    axes = [origin[i] + GRID * np.arange(shape[i]) for i in range(3)]
    field = np.full(shape, 1.0)
    for piece in _primitives():
        k = min(BLEND, 0.5 * min(r.min() for _, _, r, _ in piece))
        ends = np.array([e for a, b, _, _ in piece for e in (a, b)])
        reach = max(r.max() for _, _, r, _ in piece) + 2 * k + GRID
        lo = np.floor((ends.min(0) - reach - origin) / GRID).astype(int).clip(0)
        hi = np.ceil((ends.max(0) + reach - origin) / GRID).astype(int) + 1
        box = tuple(slice(lo[i], hi[i]) for i in range(3))
        grid = np.stack(np.meshgrid(axes[0][box[0]], axes[1][box[1]], axes[2][box[2]], indexing="ij"), axis=-1)
        d = np.min([_capsule_distance(grid, *capsule) for capsule in piece], axis=0)
        old = field[box]
        # polynomial smooth minimum: equal to min() once the two are k apart
        h = np.clip(k - np.abs(old - d), 0.0, None) / k
        field[box] = np.minimum(old, d) - h * h * k / 4
    return field


_TET_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def _tet_table() -> list[list[tuple[int, int, int]]]:
    """For each 4-bit inside mask of a tetrahedron, its triangles as triples of _TET_EDGES indices."""
    edge = {frozenset(e): i for i, e in enumerate(_TET_EDGES)}
    table = []
    for code in range(16):
        inside = [i for i in range(4) if code >> i & 1]
        outside = [i for i in range(4) if not code >> i & 1]
        if len(inside) in (0, 4):
            table.append([])
        elif len(inside) in (1, 3):
            lone, rest = (inside[0], outside) if len(inside) == 1 else (outside[0], inside)
            table.append([tuple(edge[frozenset((lone, o))] for o in rest)])
        else:  # a quad whose corners lie on edges ac, ad, bd, bc (consecutive ones share a face)
            (a, b), (c, d) = inside, outside
            q = [edge[frozenset(e)] for e in ((a, c), (a, d), (b, d), (b, c))]
            table.append([(q[0], q[1], q[2]), (q[0], q[2], q[3])])
    return table


def marching_tetrahedra(values: np.ndarray, origin: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Triangulate the zero level set of a grid function (negative inside).

    Each cube is cut into the six tetrahedra around its main diagonal (the same cut in every
    cube, so neighbours agree on shared faces); the level set of the piecewise-linear
    interpolant is then a closed 2-manifold wherever no grid value is exactly zero (zeros are
    nudged outward) and the surface stays inside the grid.

    Args: values (nx, ny, nz) float; origin (3,) position of values[0, 0, 0]; spacing: cell size.
    Returns: vertices (V, 3) float64 on grid edges; faces (F, 3) int64, outward (counter-clockwise
    seen from outside).
    """
    values = np.where(values == 0, 1e-12, values)
    nx, ny, nz = values.shape
    inside = values < 0
    corners = np.array([(c & 1, c >> 1 & 1, c >> 2 & 1) for c in range(8)])  # (8, 3) corner offsets
    count = sum(inside[dx:nx - 1 + dx, dy:ny - 1 + dy, dz:nz - 1 + dz].astype(np.int8) for dx, dy, dz in corners)
    cubes = np.argwhere((count > 0) & (count < 8))  # (M, 3) cubes the surface crosses
    grid_ids = lambda ijk: (ijk[..., 0] * ny + ijk[..., 1]) * nz + ijk[..., 2]  # noqa: E731
    ids = grid_ids(cubes[:, None, :] + corners[None])  # (M, 8)
    tets = []
    for first in range(3):
        for second in range(3):
            if second != first:
                c1 = 1 << first
                tets.append((0, c1, c1 | 1 << second, 7))
    tet_ids = ids[:, np.array(tets)].reshape(-1, 4)  # (6M, 4)
    flat = values.reshape(-1)
    tet_values = flat[tet_ids]
    codes = ((tet_values < 0) * (1 << np.arange(4))).sum(1)
    ends = np.array(_TET_EDGES)
    tri_ends, tri_tet = [], []
    for code, triangles in enumerate(_tet_table()):
        members = np.nonzero(codes == code)[0]
        for triangle in triangles:
            tri_ends.append(ends[list(triangle)][None].repeat(len(members), 0))  # (n, 3, 2) tet corners
            tri_tet.append(members)
    tri_ends, tri_tet = np.concatenate(tri_ends), np.concatenate(tri_tet)
    ends_ids = np.take_along_axis(tet_ids[tri_tet][:, None, :].repeat(3, 1), tri_ends, axis=2)  # (T, 3, 2)
    keys = np.sort(ends_ids, axis=2).reshape(-1, 2)  # one vertex per grid edge, interpolated from its lower id
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    lo, hi = unique[:, 0], unique[:, 1]
    position = lambda g: origin + spacing * np.stack(np.unravel_index(g, values.shape), -1)  # noqa: E731
    frac = flat[lo] / (flat[lo] - flat[hi])
    vertices = position(lo) + frac[:, None] * (position(hi) - position(lo))
    faces = inverse.reshape(-1, 3)
    # orient each triangle from inside to outside of its tetrahedron
    tri = vertices[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    corner_pos = position(tet_ids[tri_tet])  # (T, 4, 3)
    inner = tet_values[tri_tet] < 0
    outward = (corner_pos * ~inner[..., None]).sum(1) / (~inner).sum(1, keepdims=True) - \
        (corner_pos * inner[..., None]).sum(1) / inner.sum(1, keepdims=True)
    flip = (normal * outward).sum(1) < 0
    faces[flip] = faces[flip][:, ::-1]
    return vertices, faces.astype(np.int64)


def _largest_component(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep the connected component with the most faces (drops specks the grid might leave)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(len(vertices),) * 2)
    _, label = connected_components(graph, directed=False)
    keep = label == np.bincount(label[faces[:, 0]]).argmax()
    new_index = np.cumsum(keep) - 1
    faces = faces[keep[faces[:, 0]]]
    return vertices[keep], new_index[faces]


def _taubin_smooth(vertices: np.ndarray, faces: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Taubin's lambda/mu smoothing (no shrinkage): removes the grid's terraces before decimation."""
    from scipy.sparse import coo_matrix, diags

    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    adjacency = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(len(vertices),) * 2).tocsr()
    adjacency.data[:] = 1.0
    mean = diags(1.0 / np.asarray(adjacency.sum(1)).ravel()) @ adjacency  # average of the neighbours
    for _ in range(rounds):
        for step in (0.5, -0.53):
            vertices = vertices + step * (mean @ vertices - vertices)
    return vertices


def is_closed_manifold(faces: np.ndarray, num_vertices: int) -> bool:
    """Whether faces (F, 3) form a closed, consistently oriented 2-manifold on all `num_vertices`
    vertices: every directed edge appears once and its reverse once, and the faces around every
    vertex form a single fan (no two surfaces touching at a vertex)."""
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    as_keys = directed[:, 0] * num_vertices + directed[:, 1]
    reverse = directed[:, 1] * num_vertices + directed[:, 0]
    if len(np.unique(as_keys)) != len(as_keys) or not np.isin(reverse, as_keys).all():
        return False
    if len(np.unique(faces)) != num_vertices or (faces[:, 0] == faces[:, 1]).any() or \
            (faces[:, 1] == faces[:, 2]).any() or (faces[:, 2] == faces[:, 0]).any():
        return False
    # Around vertex v, each face (v, a, b) links a -> b; one fan is one cycle through every link.
    rolled = np.concatenate([faces, faces[:, [1, 2, 0]], faces[:, [2, 0, 1]]])  # (3F, 3): (v, a, b)
    order = np.argsort(rolled[:, 0], kind="stable")
    rolled = rolled[order]
    starts = np.searchsorted(rolled[:, 0], np.arange(num_vertices + 1))
    for v in range(num_vertices):
        links = dict(zip(rolled[starts[v]:starts[v + 1], 1].tolist(), rolled[starts[v]:starts[v + 1], 2].tolist()))
        first = next(iter(links))
        node, steps = links[first], 1
        while node != first and steps <= len(links):
            node, steps = links.get(node, first), steps + 1
        if steps != len(links):
            return False
    return True


def _split_longest_edges(vertices: np.ndarray, faces: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Add vertices by splitting the longest edge at its midpoint (a closed manifold stays one)
    until there are `count`."""
    vertices, faces = list(vertices), faces.copy()
    while len(vertices) < count:
        pts = np.asarray(vertices)
        directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
        k = int(np.argmax(np.linalg.norm(pts[directed[:, 0]] - pts[directed[:, 1]], axis=1)))
        a, b = directed[k]
        m = len(vertices)
        vertices.append((pts[a] + pts[b]) / 2)
        new = []
        for f, (u, v) in ((k % len(faces), (a, b)), (None, (b, a))):
            if f is None:  # the face holding the reverse edge
                f = int(np.nonzero((directed[:, 0] == u) & (directed[:, 1] == v))[0][0]) % len(faces)
            w = int(np.setdiff1d(faces[f], (u, v))[0])
            # (u, v, w) in the face's own winding: replace it by (u, m, w) and (m, v, w)
            faces[f] = (u, m, w)
            new.append((m, v, w))
        faces = np.concatenate([faces, np.array(new)])
    return np.asarray(vertices), faces


@lru_cache(maxsize=4)
def build_template(num_vertices: int = NUM_VERTICES) -> tuple[np.ndarray, np.ndarray]:
    """The rest mesh (beta = 0) with exactly `num_vertices` vertices, deterministic, cached.

    Returns: vertices (V, 3) float64; faces (F, 3) int64, a closed oriented 2-manifold.
    Raises ValueError when `num_vertices` is outside [500, 20000] (the 1 cm grid's reach).
    """
    import fast_simplification

    if not 500 <= num_vertices <= 20000:
        raise ValueError(f"a quadruped template has 500..20000 vertices (1 cm grid), got {num_vertices}")
    capsules = [c for piece in _primitives() for c in piece]
    ends = np.array([e for a, b, _, _ in capsules for e in (a, b)])
    reach = max(r.max() for _, _, r, _ in capsules) + 3 * GRID
    origin = ends.min(0) - reach
    shape = tuple(np.ceil((ends.max(0) + reach - origin) / GRID).astype(int) + 1)
    raw_vertices, raw_faces = _largest_component(*marching_tetrahedra(_field(origin, shape), origin, GRID))
    raw_vertices = _taubin_smooth(raw_vertices, raw_faces)
    # A closed genus-0 surface has F = 2V - 4 faces, so decimating to that count lands on V or a
    # little below; some aggressiveness settings leave a non-manifold spot, so try others.
    for agg in (7, 5, 3, 9):
        points, faces = fast_simplification.simplify(raw_vertices, raw_faces, target_count=2 * num_vertices - 4,
                                                     agg=agg)
        points, faces = _largest_component(points, faces.astype(np.int64))
        if len(points) <= num_vertices and is_closed_manifold(faces, len(points)):
            break
    else:
        raise RuntimeError("decimation of the quadruped template did not give a closed manifold")
    points, faces = _split_longest_edges(points, faces, num_vertices)
    return points, faces.astype(np.int64)


# ---------------------------------------------------------------- skinning and shape space

SKIN_TEMPERATURE = 0.15  # softmax temperature on radius-relative bone distances
SKIN_BONES = 4  # bones per vertex


def _bone_coordinates(points: np.ndarray, heads: np.ndarray, tails: np.ndarray):
    """Each point relative to each bone: position t (N, J) along the bone (unclamped, 0 at the
    head, 1 at the tail) and the radial remainder r (N, J, 3)."""
    bone = tails - heads  # (J, 3)
    t = np.einsum("njc,jc->nj", points[:, None] - heads[None], bone) / (bone * bone).sum(1)
    r = points[:, None] - heads[None] - t[..., None] * bone[None]
    return t, r


def skinning_weights(points: np.ndarray) -> np.ndarray:
    """(N, J) float64 skinning weights of rest points (N, 3): a softmax over bones of minus the
    distance to the bone's segment (cross-section scaled) over its radius there, SKIN_BONES
    largest kept, rows summing to one."""
    t, _ = _bone_coordinates(points, REST_HEADS, REST_TAILS)
    t = t.clip(0, 1)
    closest = REST_HEADS[None] + t[..., None] * (REST_TAILS - REST_HEADS)[None]
    distance = np.linalg.norm((points[:, None] - closest) / SECTIONS[None], axis=-1)
    radius = RADII[None, :, 0] + t * (RADII[None, :, 1] - RADII[None, :, 0])
    logits = -distance / radius / SKIN_TEMPERATURE
    w = np.exp(logits - logits.max(1, keepdims=True))
    dropped = np.argsort(-w, axis=1, kind="stable")[:, SKIN_BONES:]  # exactly SKIN_BONES kept, ties too
    np.put_along_axis(w, dropped, 0.0, axis=1)
    return w / w.sum(1, keepdims=True)


def _joint_coordinates() -> tuple[np.ndarray, np.ndarray]:
    """Each joint's head relative to its parent's bone: t (J,) and r (J, 3) (root: zeros)."""
    t, r = np.zeros(len(JOINTS)), np.zeros((len(JOINTS), 3))
    for j, p in enumerate(PARENTS):
        if p >= 0:
            tt, rr = _bone_coordinates(REST_HEADS[j:j + 1], REST_HEADS[p:p + 1], REST_TAILS[p:p + 1])
            t[j], r[j] = tt[0, 0], rr[0, 0]
    return t, r


def shape_space(vertices: np.ndarray, weights: np.ndarray):
    """Blend shapes of the joints and vertices: every quantity is linear in the coefficients.

    A joint's head sits at fixed (t, r) on its parent's bone, a bone's tail at its head plus the
    rest bone times (1 + A beta) plus E beta, and a vertex at the weighted mean over its bones of
    head + t (tail - head) + r (1 + C beta): at beta = 0 each term is the rest vertex itself.
    Returns: dH, dT (K, J, 3) joint head and tail directions; dV (K, V, 3) vertex directions.
    """
    A, C, E = _shape_matrices()
    K, J = len(SHAPE_LABELS), len(JOINTS)
    jt, jr = _joint_coordinates()
    bone = REST_TAILS - REST_HEADS
    dH, dT = np.zeros((K, J, 3)), np.zeros((K, J, 3))
    for j, p in enumerate(PARENTS):
        if p >= 0:
            dH[:, j] = dH[:, p] + jt[j] * (dT[:, p] - dH[:, p]) + jr[j] * C[p]
        dT[:, j] = dH[:, j] + bone[j] * A[j][:, None] + E[j]
    t, r = _bone_coordinates(vertices, REST_HEADS, REST_TAILS)  # (V, J), (V, J, 3)
    per_bone = dH[:, None] + t[None, ..., None] * (dT - dH)[:, None] + r[None] * C.transpose(1, 0, 2)[:, None]
    dV = np.einsum("vj,kvjc->kvc", weights, per_bone)
    return dH, dT, dV


# ---------------------------------------------------------------- identities


def family_names(family: str) -> list[str]:
    """Families named by `family`: "all" or a comma-separated subset of FAMILIES (e.g. "cat,dog").

    Raises ValueError naming the unknown names and the known ones."""
    names = list(FAMILIES) if family == FAMILY_ALL else [f.strip() for f in str(family).split(",")]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"unknown animal family {', '.join(map(repr, unknown)) or repr(family)}; expected "
                         f"{FAMILY_ALL!r} or a comma-separated subset of {list(FAMILIES)}")
    return names


def family_mean(name: str) -> np.ndarray:
    """(K,) float64 mean shape coefficients of family `name` (ValueError for an unknown name)."""
    family_names(name)
    return np.array([FAMILIES[name][0].get(k, 0.0) for k in SHAPE_LABELS])


def sample_identities(families: list[str], rng: np.random.Generator) -> np.ndarray:
    """Shape coefficients of one identity per entry of `families` (names of FAMILIES).

    Each is its family's mean plus Gaussian noise of the family's spread (truncated at two
    spreads), clipped to SHAPE_RANGE. Returns (len(families), K) float64."""
    out = [np.clip(family_mean(name) + np.clip(rng.standard_normal(len(SHAPE_LABELS)), -2, 2) * FAMILIES[name][1],
                   *SHAPE_RANGE) for name in families]
    return np.stack(out) if out else np.zeros((0, len(SHAPE_LABELS)))


# ---------------------------------------------------------------- poses

# Per joint (pitch about X, roll about Y, yaw about Z) ranges in degrees for the axial joints and
# the left side; a right joint mirrors its left twin (roll and yaw change sign). On the left, a
# negative roll moves a limb outward. Snout and the root's roll and yaw stay at rest (no global
# turn, as in the published data); the root's pitch lifts the front for sitting.
_LEFT_RANGES = {
    "pelvis": ((-50, 8), (0, 0), (0, 0)),
    "spine1": ((-12, 12), (-6, 6), (-12, 12)),
    "spine2": ((-12, 12), (-6, 6), (-12, 12)),
    "spine3": ((-12, 14), (-6, 6), (-10, 10)),
    "neck1": ((-45, 70), (-15, 15), (-40, 40)),
    "neck2": ((-35, 50), (-15, 15), (-35, 35)),
    "head": ((-40, 55), (-20, 20), (-30, 30)),
    "snout": ((0, 0), (0, 0), (0, 0)),
    "jaw": ((0, 28), (0, 0), (0, 0)),
    "ear_L": ((-35, 35), (-25, 25), (-30, 30)),
    "tail1": ((-50, 75), (-10, 10), (-45, 45)),
    **{f"tail{i}": ((-40, 45), (-10, 10), (-40, 40)) for i in (2, 3, 4)},
    "girdle_FL": ((-25, 25), (-8, 8), (-8, 8)),
    "upper_FL": ((-70, 70), (-20, 10), (-15, 15)),
    "lower_FL": ((-15, 125), (-6, 6), (-8, 8)),
    "paw_FL": ((-25, 120), (-8, 8), (-8, 8)),
    "girdle_HL": ((-15, 15), (-6, 6), (-6, 6)),
    "upper_HL": ((-95, 55), (-32, 10), (-15, 15)),
    "lower_HL": ((-20, 130), (-6, 6), (-8, 8)),
    "paw_HL": ((-130, 35), (-8, 8), (-8, 8)),
}


def _joint_ranges() -> np.ndarray:
    """(J, 3, 2) float64 (lo, hi) in degrees of (pitch, roll, yaw) of every joint."""
    out = np.zeros((len(JOINTS), 3, 2))
    for j, name in enumerate(JOINTS):
        left = name[:-1] + "L" if _side(name) == -1 else name
        out[j] = np.array(_LEFT_RANGES[left], dtype=np.float64)
        if _side(name) == -1:
            out[j, 1:] = -out[j, 1:, ::-1]
    return out


JOINT_RANGES = _joint_ranges()
MIRROR_SIGNS = np.array([[1, -1, -1] if _side(n) == -1 else [1, 1, 1] for n in JOINTS], dtype=np.float64)  # (J, 3)

# Gaits: (probability, upper-limb swing amplitude front and hind, flexion in swing of elbow,
# wrist, stifle and hock, phase of each leg FL, FR, HL, HR as a fraction of the stride).
GAITS = {
    "walk": (0.2, (18, 22), (50, 60, 45, 45), (0.25, 0.75, 0.0, 0.5)),
    "trot": (0.15, (20, 24), (65, 75, 50, 50), (0.0, 0.5, 0.5, 0.0)),
    "gallop": (0.2, (32, 34), (80, 90, 65, 60), (0.45, 0.55, 0.0, 0.1)),
}
POSE_KINDS = {"stand": 0.2, **{k: v[0] for k, v in GAITS.items()}, "sit": 0.25}
NOISE = 4.0  # degrees of Gaussian noise on every free angle


class PoseSampler:
    """Samples (J, 3) joint angles in degrees, clamped to JOINT_RANGES.

    A pose mixes a body template (stand; walk, trot or gallop at a random point of the stride;
    sit), a head action (look ahead, turn, graze, look up; the jaw sometimes open), a tail action
    (hang, level, raised, swung to a side, curled), ear angles and Gaussian noise.
    """

    def __init__(self):
        self.index = {n: j for j, n in enumerate(JOINTS)}

    def _set(self, angles, name, pitch=None, roll=None, yaw=None):
        j = self.index[name]
        for axis, value in enumerate((pitch, roll, yaw)):
            if value is not None:
                angles[j, axis] = value * MIRROR_SIGNS[j, axis]

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """One pose: (J, 3) float64 angles (pitch, roll, yaw) in degrees."""
        angles = np.zeros((len(JOINTS), 3))
        kinds = list(POSE_KINDS)
        kind = kinds[rng.choice(len(kinds), p=np.array(list(POSE_KINDS.values())) / sum(POSE_KINDS.values()))]
        if kind in GAITS:
            self._gait(angles, rng, *GAITS[kind][1:], spine=kind == "gallop")
        elif kind == "sit":
            self._sit(angles, rng)
        else:
            for leg in ("FL", "FR", "HL", "HR"):  # weight shifts
                self._set(angles, f"upper_{leg}", pitch=rng.uniform(-10, 10), roll=rng.uniform(-8, 3))
        self._head(angles, rng)
        self._tail(angles, rng)
        for ear in ("ear_L", "ear_R"):
            self._set(angles, ear, *(rng.uniform(-0.7, 0.7, 3) * [35, 25, 30]))
        free = JOINT_RANGES[..., 1] > JOINT_RANGES[..., 0]
        angles = angles + free * rng.normal(0.0, NOISE, angles.shape)
        return np.clip(angles, JOINT_RANGES[..., 0], JOINT_RANGES[..., 1])

    def _gait(self, angles, rng, swing, flexion, phases, spine):
        start = rng.uniform()
        elbow, wrist, stifle, hock = flexion
        for leg, phase in zip(("FL", "FR", "HL", "HR"), phases):
            phi = 2 * np.pi * (start + phase)
            reach = -np.cos(phi)  # -1: reaching forward, +1: pushed back
            lift = max(0.0, np.sin(phi))  # the swing half of the stride lifts the paw
            amplitude = swing[0] if leg[0] == "F" else swing[1]
            # hind legs pass a little outside the forelegs, as they do in a fast gait
            self._set(angles, f"upper_{leg}", pitch=amplitude * reach, roll=-12 * (amplitude > 30) * (leg[0] == "H"))
            self._set(angles, f"girdle_{leg}", pitch=0.3 * amplitude * reach)
            if leg[0] == "F":
                self._set(angles, f"lower_{leg}", pitch=elbow * lift)
                self._set(angles, f"paw_{leg}", pitch=wrist * lift)
            else:
                self._set(angles, f"lower_{leg}", pitch=stifle * lift)
                self._set(angles, f"paw_{leg}", pitch=-hock * lift + 10 * max(0.0, reach))
        if spine:  # the back flexes and extends with the stride
            bend = 10 * np.cos(2 * np.pi * start)
            for name in ("spine1", "spine2", "spine3"):
                self._set(angles, name, pitch=bend)

    def _sit(self, angles, rng):
        tilt = -rng.uniform(30, 45)  # front up
        self._set(angles, "pelvis", pitch=tilt)
        for side in ("L", "R"):
            self._set(angles, f"upper_F{side}", pitch=-tilt + rng.uniform(-10, 5))  # forelegs stay upright
            self._set(angles, f"upper_H{side}", pitch=-45 - tilt * 0.3 + rng.uniform(-5, 5), roll=-rng.uniform(10, 20))
            self._set(angles, f"lower_H{side}", pitch=rng.uniform(100, 125))
            self._set(angles, f"paw_H{side}", pitch=-rng.uniform(90, 120))
        self._set(angles, "neck1", pitch=-tilt * 0.5 - rng.uniform(0, 15))

    def _head(self, angles, rng):
        action = rng.choice(["ahead", "turn", "graze", "up"], p=[0.35, 0.35, 0.15, 0.15])
        if action == "turn":
            side = rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 0.6)
            for name, limit in (("neck1", 40), ("neck2", 35), ("head", 30), ("spine3", 8), ("spine2", 8)):
                self._set(angles, name, yaw=side * limit)
            self._set(angles, "head", roll=rng.uniform(-15, 15))
        elif action == "graze":
            self._set(angles, "neck1", pitch=rng.uniform(20, 45))
            self._set(angles, "neck2", pitch=rng.uniform(5, 25))
            self._set(angles, "head", pitch=rng.uniform(-30, 0))  # the face stays near level
        elif action == "up":
            self._set(angles, "neck1", pitch=-rng.uniform(15, 35))
            self._set(angles, "neck2", pitch=-rng.uniform(5, 25))
            self._set(angles, "head", pitch=-rng.uniform(0, 25))
        if rng.random() < 0.3:
            self._set(angles, "jaw", pitch=rng.uniform(8, 28))

    def _tail(self, angles, rng):
        action = rng.choice(["hang", "level", "raised", "side", "curl"], p=[0.3, 0.2, 0.2, 0.15, 0.15])
        root, bend = {"hang": (-15, 0), "level": (15, 5), "raised": (55, 15), "side": (10, 0),
                      "curl": (45, 30)}[action]
        self._set(angles, "tail1", pitch=root + rng.uniform(-10, 10))
        wag = rng.uniform(-30, 30) if action == "side" else rng.uniform(-8, 8)
        for i in (2, 3, 4):
            self._set(angles, f"tail{i}", pitch=bend + rng.uniform(-8, 8), yaw=wag)
        if action == "side":
            self._set(angles, "tail1", yaw=1.3 * wag)


def rotation_matrices(angles: torch.Tensor) -> torch.Tensor:
    """Rotations R = Rz(yaw) Ry(roll) Rx(pitch) of angles (..., 3) in degrees (pitch, roll, yaw):
    a tensor (..., 3, 3) of the same dtype."""
    a = torch.deg2rad(angles)
    cx, cy, cz = torch.cos(a).unbind(-1)
    sx, sy, sz = torch.sin(a).unbind(-1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    Rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).unflatten(-1, (3, 3))
    Ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).unflatten(-1, (3, 3))
    Rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).unflatten(-1, (3, 3))
    return Rz @ Ry @ Rx


# ---------------------------------------------------------------- the model

COLLISION_SHRINK = 0.8  # capsules are tested at this fraction of the bones' radii (contact is allowed)
# The girdles are flesh of the torso and the upper legs' first part lies inside it: neither is
# tested (a thigh drawn forward against the belly is contact, not a collision).
COLLISION_BONES = tuple(j for j, n in enumerate(JOINTS) if not n.startswith("girdle_"))
COLLISION_FROM = np.array([0.4 if n.startswith("upper_") else 0.0 for n in JOINTS])  # start of the tested part
# Contacts, not collisions: the chin and the ears may touch the base of the neck, and a hanging
# tail lies against the rump.
COLLISION_CONTACTS = (("neck1", "jaw"), ("neck1", "ear_L"), ("neck1", "ear_R"), ("pelvis", "tail2"),
                      ("pelvis", "tail3"))


class QuadrupedModel:
    """Template, skinning weights and shape space of the quadruped; poses meshes in torch.

    Attributes (torch float64 unless stated):
        template (V, 3), faces (F, 3) int64 (numpy), weights (V, J): rest mesh and skinning weights.
        shape_dirs (K, V, 3), head_dirs (K, J, 3), tail_dirs (K, J, 3): blend shapes.
        radius_dirs (K, J): change of each bone's radii (mean over the axes) per unit of each coefficient.
    """

    def __init__(self, num_vertices: int = NUM_VERTICES):
        vertices, faces = build_template(num_vertices)
        weights = skinning_weights(vertices)
        dH, dT, dV = shape_space(vertices, weights)
        _, C, _ = _shape_matrices()
        as_t = lambda x: torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))  # noqa: E731
        self.faces = faces
        self.template, self.weights = as_t(vertices), as_t(weights)
        self.shape_dirs, self.head_dirs, self.tail_dirs = as_t(dV), as_t(dH), as_t(dT)
        self.rest_heads, self.rest_tails = as_t(REST_HEADS), as_t(REST_TAILS)
        self.radius_dirs = as_t(C.mean(-1).T)  # (K, J)
        # radii at the start and the end of the part of each bone that the collision test uses
        start = RADII[:, 0] + COLLISION_FROM * (RADII[:, 1] - RADII[:, 0])
        self.collision_radii = as_t(np.stack([start, RADII[:, 1]], 1))  # (J, 2)
        self.parents = PARENTS
        self._pairs = self._candidate_pairs()

    @property
    def num_vertices(self) -> int:
        return int(self.template.shape[0])

    def shaped(self, shapes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rest meshes and bones of identities `shapes` (I, K): vertices (I, V, 3), heads and
        tails (I, J, 3), float64."""
        beta = self._shapes(shapes)
        blend = lambda rest, dirs: rest + torch.einsum("ik,k...->i...", beta, dirs)  # noqa: E731
        return (blend(self.template, self.shape_dirs), blend(self.rest_heads, self.head_dirs),
                blend(self.rest_tails, self.tail_dirs))

    def _shapes(self, shapes) -> torch.Tensor:
        beta = torch.as_tensor(np.asarray(shapes), dtype=torch.float64)
        if beta.ndim != 2 or beta.shape[1] != len(SHAPE_LABELS):
            raise ValueError(f"shapes must be (I, {len(SHAPE_LABELS)}) coefficients {SHAPE_LABELS}, "
                             f"got shape {tuple(beta.shape)}")
        return beta

    @staticmethod
    def _angles(angles) -> torch.Tensor:
        a = torch.as_tensor(np.asarray(angles), dtype=torch.float64)
        if a.ndim != 3 or a.shape[1:] != (len(JOINTS), 3):
            raise ValueError(f"poses must be (P, {len(JOINTS)}, 3) angles in degrees, got shape {tuple(a.shape)}")
        return a

    def _kinematics(self, heads, angles):
        """Global rotations (P, J, 3, 3) and posed heads (I, P, J, 3) by forward kinematics.

        Each joint rotates about its head in world-aligned rest axes and carries its children."""
        local = rotation_matrices(angles)  # (P, J, 3, 3)
        rot, pos = [None] * len(JOINTS), [None] * len(JOINTS)
        for j, p in enumerate(self.parents):
            if p < 0:
                rot[j], pos[j] = local[:, j], heads[:, None, j].expand(-1, local.shape[0], -1)
            else:
                rot[j] = rot[p] @ local[:, j]
                pos[j] = pos[p] + torch.einsum("pab,ib->ipa", rot[p], heads[:, j] - heads[:, p])
        return torch.stack(rot, 1), torch.stack(pos, 2)

    def posed_bones(self, shapes, angles) -> tuple[torch.Tensor, torch.Tensor]:
        """Bone heads and tails (I, P, J, 3) float64 of identities (I, K) in poses (P, J, 3)."""
        _, heads, tails = self.shaped(shapes)
        rot, posed = self._kinematics(heads, self._angles(angles))
        return posed, posed + torch.einsum("pjab,ijb->ipja", rot, tails - heads)

    def posed_vertices(self, shapes, angles, chunk: int = 32) -> np.ndarray:
        """Meshes of identities `shapes` (I, K) in poses `angles` (P, J, 3) degrees by linear
        blend skinning: (I, P, V, 3) float32 (computed in float64)."""
        vertices, heads, _ = self.shaped(shapes)
        angles = self._angles(angles)
        out = np.empty((len(vertices), len(angles), self.num_vertices, 3), dtype=np.float32)
        with torch.no_grad():
            for p0 in range(0, len(angles), chunk):
                rot, posed = self._kinematics(heads, angles[p0:p0 + chunk])
                # v' = sum_j w_vj (R_j v + posed_j - R_j head_j)
                shift = posed - torch.einsum("pjab,ijb->ipja", rot, heads)  # (I, P, J, 3)
                blended = torch.einsum("vj,pjab->pvab", self.weights, rot)  # (P, V, 3, 3)
                out[:, p0:p0 + chunk] = (torch.einsum("pvab,ivb->ipva", blended, vertices)
                                         + torch.einsum("vj,ipja->ipva", self.weights, shift)).numpy()
        return out

    def _candidate_pairs(self) -> torch.Tensor:
        """(N, 2) bone pairs more than two joints apart in the skeleton (closer ones always touch)."""
        J = len(JOINTS)
        hops = np.full((J, J), 99)
        tested = np.isin(np.arange(J), COLLISION_BONES)
        for j in range(J):
            hops[j, j] = 0
        for j, p in enumerate(self.parents):
            if p >= 0:
                hops[j, p] = hops[p, j] = 1
        for k in range(J):  # Floyd-Warshall on 31 joints
            hops = np.minimum(hops, hops[:, k:k + 1] + hops[k:k + 1, :])
        for pair in COLLISION_CONTACTS:
            hops[JOINTS.index(pair[0]), JOINTS.index(pair[1])] = 0
        a, b = np.nonzero(np.triu(hops > 2) & tested[:, None] & tested[None, :])
        return torch.from_numpy(np.stack([a, b], 1))

    def collisions(self, shapes, angles) -> np.ndarray:
        """Which poses make which identities pass through themselves: (I, P) bool.

        A coarse but real test on a tapered capsule per bone (its posed segment from
        COLLISION_FROM on, its shaped radii times COLLISION_SHRINK; girdles are not tested): two
        bones more than two joints apart (COLLISION_CONTACTS aside) collide when the closest
        points of their segments are nearer than the sum of the radii there, unless they already
        are in the rest pose of that identity. It catches legs crossing each other (left through
        right, fore through hind), a lower leg or paw through the chest, belly or rump, the head,
        snout or jaw through a leg or the body, and the tail through a hind leg. It misses
        contacts between bones two joints apart or fewer (a paw folded onto its own forearm is
        allowed) and flesh that bulges past the capsules (a fat belly grazed by a knee).
        """
        beta = self._shapes(shapes)
        start = torch.from_numpy(COLLISION_FROM)[:, None]
        heads, tails = self.posed_bones(beta, angles)
        heads = heads + start * (tails - heads)
        radii = self.collision_radii * ((1 + beta @ self.radius_dirs) * COLLISION_SHRINK)[..., None]  # (I, J, 2)
        a, b = self._pairs[:, 0], self._pairs[:, 1]

        def overlapping(heads, tails, radii):  # heads, tails (I, ..., J, 3), radii (I, ..., J, 2)
            distance, s, t = _closest_points(heads[..., a, :], tails[..., a, :], heads[..., b, :], tails[..., b, :])
            ra, rb = radii[..., a, :], radii[..., b, :]
            return distance < ra[..., 0] + s * (ra[..., 1] - ra[..., 0]) + rb[..., 0] + t * (rb[..., 1] - rb[..., 0])

        _, rest_heads, rest_tails = self.shaped(beta)
        at_rest = overlapping(rest_heads + start * (rest_tails - rest_heads), rest_tails, radii)  # (I, N)
        posed = overlapping(heads, tails, radii[:, None])  # (I, P, N)
        return (posed & ~at_rest[:, None]).any(-1).numpy()


def _closest_points(p0, p1, q0, q1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closest points of segments [p0, p1] and [q0, q1] (..., 3) each: their distance (...) and
    their parameters s, t (...) in [0, 1] along each segment."""
    d1, d2, r = p1 - p0, q1 - q0, p0 - q0
    a, e = (d1 * d1).sum(-1).clamp_min(1e-12), (d2 * d2).sum(-1).clamp_min(1e-12)
    b, c, f = (d1 * d2).sum(-1), (d1 * r).sum(-1), (d2 * r).sum(-1)
    denom = (a * e - b * b).clamp_min(1e-12)
    s = ((b * f - c * e) / denom).clamp(0, 1)  # closest point on the infinite lines, clamped
    t = (b * s + f) / e
    # where t leaves [0, 1], clamp it and recompute s for that end of the second segment
    t_clamped = t.clamp(0, 1)
    s = torch.where(t != t_clamped, ((b * t_clamped - c) / a).clamp(0, 1), s)
    return (p0 + s[..., None] * d1 - q0 - t_clamped[..., None] * d2).norm(dim=-1), s, t_clamped


@lru_cache(maxsize=2)
def load_model(num_vertices: int = NUM_VERTICES) -> QuadrupedModel:
    """The quadruped model with a `num_vertices`-vertex template, built once per process."""
    return QuadrupedModel(num_vertices)
