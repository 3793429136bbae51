"""Registration of the anny body model to a raw scan: the fitting loop and synthetic scans.

LoopReg (NeurIPS 2020) registers a body model to an unregistered scan by optimising the model's
parameters against dense correspondences and the surface. This module is the optimisation half:
`fit` poses and shapes anny so that it covers a point cloud, from a neutral start, with or
without per-point correspondences (the network of `mapconnet.correspondence` supplies them;
without them this is the no-network baseline: Chamfer plus priors).

Frame: anny's (metres, Z up, the body's left +X, its front -Y). `prepare_scan` puts a scan into
it: a Y-up scan (taller along Y than along Z by 1.5x, as `mapconnet.transfer` reads meshes) is
rotated to Z up, and a scan whose height reads as centimetres or millimetres is converted to
metres; each change is a note. Nothing is centred or scaled otherwise: the fit lies where the
scan lies.

Body parameters (`BodyParams`): anny's 6 phenotype values (in [0, 1]), one axis-angle rotation
per fitted bone (`FIT_BONES`: the root, i.e. the global orientation, and the body bones the data
generator poses, plus the pelvis; fingers, toes, eyes, shoulder01 and the twist segments
upperarm02, upperleg02 and lowerleg02 stay at rest, as in the generator: the twist segments
repeat the twist of the bone above them), and a translation. Rotations are anny's `local-ref` deltas: in the
world-aligned axes of the rest pose, about the bone's head.

Loss, with squared distances in cm^2 so that the terms are O(1) near a fit:
- scan-to-model: mean over scan points of the squared distance to the nearest model vertex;
- model-to-scan: mean over model vertices of the squared distance to the nearest scan point;
  both through `kernels.nearest`, which streams (a KD-tree on CPU, Triton on CUDA): never an
  N x M matrix;
- correspondence (when given): weighted mean over scan points of the squared distance between the
  point and the posed template vertex it corresponds to;
- pose prior (`JointLimits`): squared excess, in radians, of each bone's rotation vector outside
  an anatomical box (anny_body's limits) in the bone's own frame; the root is free;
- phenotype range: squared excess of each phenotype value outside [0, 1].
Stages (`stages`): without correspondences, placement (translation), then the girdles (clavicles,
hips, shoulders), then every bone but the root, then everything with the global orientation and
the phenotype; with correspondences a correspondence-driven stage, then a surface-driven one.
L-BFGS with a strong-Wolfe line search (measured against Adam: see `fit`).

What the no-network baseline cannot do: find a limb far from where the neutral body has it (a
leg raised forward, an arm overhead); Chamfer's nearest neighbours then lock the body into a
wrong pose. That is what learned correspondences are for.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from tqdm import tqdm

import kernels
from mapconnet.data import anny_body
from mapconnet.data.resolution import resolution_map
from mapconnet.transfer import METRE_HEIGHTS, UNITS, Frame, up_rotation

FIT_RESOLUTIONS = ("lite", "smpl", "full")
MIN_POINTS = 100  # fewer points cannot constrain 28 bones and a body shape
# A scan whose second (third) principal spread is below this share of the first is a line (a
# plane); a standing body's thinnest spread is about 15% of its height's.
DEGENERATE_RATIO = 1e-3
CM2 = 1e4  # squared metres -> squared centimetres

AXIAL = ("spine05", "spine04", "spine03", "spine02", "spine01", "neck01", "neck02", "neck03", "head")
SIDE = ("pelvis", "upperleg01", "lowerleg01", "foot", "clavicle", "upperarm01", "lowerarm01", "lowerarm02", "wrist")
FIT_BONES = ("root", *AXIAL, *(f"{b}.{s}" for s in "LR" for b in SIDE))
# Bones the data generator leaves at rest (the pelvis) may still turn by this much; every other
# box is widened by it too, since a rotation vector's components only approximate the Euler
# angles and swings the limits are written in.
LIMIT_MARGIN_DEG = 5.0
# The shoulder's limits are written as an arm direction (elevation 10-150 degrees from straight
# down, plane -30..90) and a twist; as a rotation vector in the frame (twist about the rest arm
# direction a, lateral raise about -Y, forward swing about a x -Y) its range was measured on
# 5,000 PoseSampler poses (degrees: raise -46..109, swing -57..110; the twist stays within
# SHOULDER_TWIST), rounded here.
SHOULDER_RAISE, SHOULDER_SWING = (-45.0, 110.0), (-55.0, 110.0)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _frame(first, second=None) -> np.ndarray:
    """(3, 3) orthonormal rows: `first`, then `second` made orthogonal to it (default: the world
    axis least aligned with `first`), then their cross product."""
    a = _unit(first)
    b = np.eye(3)[np.argmin(np.abs(a))] if second is None else np.asarray(second, dtype=np.float64)
    b = _unit(b - (b @ a) * a)
    return np.stack([a, b, np.cross(a, b)])


@dataclass(frozen=True)
class JointLimits:
    """Anatomical boxes on the rotation vectors of FIT_BONES (left-side frames; a right bone's
    vector is mirrored first: M R M with M = diag(-1, 1, 1) turns r into (r_x, -r_y, -r_z)).

    frames (K, 3, 3): rows are the axes the box is written in; low, high (K, 3) radians (the
    root: -inf, inf); mirror (K, 3): the sign applied to each component before the frame.
    """
    frames: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    mirror: torch.Tensor

    def components(self, rotations: torch.Tensor) -> torch.Tensor:
        """(K, 3) rotation vectors -> (K, 3) components in each bone's limit frame (radians)."""
        return torch.einsum("kij,kj->ki", self.frames, rotations * self.mirror)

    def penalty(self, rotations: torch.Tensor) -> torch.Tensor:
        """Scalar: sum of squared excesses (rad^2) of the components outside their boxes."""
        c = self.components(rotations)
        return (torch.relu(self.low - c) ** 2 + torch.relu(c - self.high) ** 2).sum()


def joint_limits(sampler: anny_body.PoseSampler) -> JointLimits:
    """The boxes of anny_body's limits, in degrees converted to radians, for FIT_BONES; the arm's
    hinge and twist axes come from the sampler's rest skeleton."""
    ab = anny_body
    zero = (0.0, 0.0)
    arm = sampler.upper_arm_rest
    # bone: (frame rows, (low, high) per row in degrees)
    left = {
        "pelvis": (np.eye(3), (zero, zero, zero)),
        # hip flexion is about -X, abduction about -Y, twist about Z (anny_body.PoseSampler)
        "upperleg01": (np.diag([-1.0, -1.0, 1.0]), (ab.HIP_FLEX, ab.HIP_ABDUCTION, ab.HIP_TWIST)),
        "lowerleg01": (np.eye(3), (ab.KNEE_FLEX, zero, zero)),
        "foot": (np.eye(3), (ab.ANKLE_PLANTARFLEXION, ab.ANKLE_INVERSION, ab.ANKLE_ROTATION)),
        # protraction about Z; elevation about -Y, up to a quarter of the arm's elevation above 80
        "clavicle": (np.array([[0.0, -1, 0], [0, 0, 1], [1, 0, 0]]),
                     ((ab.CLAVICLE_ELEVATION[0], ab.CLAVICLE_ELEVATION[1] + 0.25 * (ab.SHOULDER_ELEVATION[1] - 80)),
                      ab.CLAVICLE_PROTRACTION, zero)),
        "upperarm01": (_frame(arm, [0, -1, 0]), (ab.SHOULDER_TWIST, SHOULDER_RAISE, SHOULDER_SWING)),
        "lowerarm01": (_frame(sampler.elbow_hinge), (ab.ELBOW_FLEX, zero, zero)),
        "lowerarm02": (_frame(sampler.forearm_rest), (ab.FOREARM_TWIST, zero, zero)),
        "wrist": (np.eye(3), (ab.WRIST_FLEX, ab.WRIST_DEVIATION, zero)),
    }
    frames, low, high, mirror = [], [], [], []
    for bone in FIT_BONES:
        name, _, side = bone.partition(".")
        if bone == "root":
            rows, box = np.eye(3), ((-math.inf, math.inf),) * 3
        elif name in AXIAL:
            rows, box = np.eye(3), ab.AXIAL_LIMITS[name]
        else:
            rows, box = left[name]
        frames.append(rows)
        low.append([math.radians(lo - LIMIT_MARGIN_DEG) for lo, _ in box])
        high.append([math.radians(hi + LIMIT_MARGIN_DEG) for _, hi in box])
        mirror.append([1.0, -1.0, -1.0] if side == "R" else [1.0, 1.0, 1.0])
    as_tensor = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    return JointLimits(as_tensor(frames), as_tensor(low), as_tensor(high), as_tensor(mirror))


def axis_angle_matrix(r: torch.Tensor) -> torch.Tensor:
    """Rodrigues: (..., 3) rotation vectors -> (..., 3, 3) rotations, with finite gradients at 0
    (the sin and cosine factors switch to their Taylor series below 1e-4 rad)."""
    theta2 = (r * r).sum(-1, keepdim=True)[..., None]  # (..., 1, 1)
    small = theta2 < 1e-8
    theta = torch.sqrt(torch.where(small, torch.ones_like(theta2), theta2))
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2.clamp_min(1e-8))
    x, y, z = r.unbind(-1)
    o = torch.zeros_like(x)
    K = torch.stack([o, -z, y, z, o, -x, -y, x, o], -1).reshape(*r.shape[:-1], 3, 3)
    return torch.eye(3, dtype=r.dtype, device=r.device) + a * K + b * (K @ K)


@dataclass
class BodyParams:
    """One body: phenotype (6,) in PHENOTYPES order, rotations (len(FIT_BONES), 3) axis-angle in
    local-ref axes, translation (3,) metres, added after posing (with a rest root the pelvis is at
    the origin)."""
    phenotype: torch.Tensor
    rotations: torch.Tensor
    translation: torch.Tensor

    @classmethod
    def neutral(cls, translation=(0.0, 0.0, 0.0)) -> BodyParams:
        """Rest pose, every phenotype value 0.5."""
        return cls(torch.full((len(anny_body.PHENOTYPES),), 0.5), torch.zeros(len(FIT_BONES), 3),
                   torch.as_tensor(translation, dtype=torch.float32).clone())

    def to_dict(self) -> dict:
        """JSON-ready: phenotype by name, rotations by bone name (radians), translation (metres)."""
        values = lambda t: [round(float(x), 6) for x in t.detach().reshape(-1)]  # noqa: E731
        return {"phenotype": dict(zip(anny_body.PHENOTYPES, values(self.phenotype))),
                "rotations": {bone: values(r) for bone, r in zip(FIT_BONES, self.rotations)},
                "translation": values(self.translation)}

    @classmethod
    def from_dict(cls, d: dict) -> BodyParams:
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
        return cls(as_tensor([d["phenotype"][p] for p in anny_body.PHENOTYPES]),
                   as_tensor([d["rotations"][b] for b in FIT_BONES]), as_tensor(d["translation"]))


# Body parts, the labels of correspondences (correspondences.npz `part`, the network's part
# accuracy): 14 rigid-ish segments, each the union of anny bones whose name holds one of the
# keywords (first match in PART_KEYWORDS' order; the side comes from the bone's ".L"/".R").
# A vertex's part is the one with the largest summed skinning weight.
PART_NAMES = ("head", "torso", *(f"{p}.{s}" for s in "LR" for p in ("upperarm", "lowerarm", "hand")),
              *(f"{p}.{s}" for s in "LR" for p in ("upperleg", "lowerleg", "foot")))
PART_KEYWORDS = (("hand", ("finger", "thumb", "metacarpal", "carpal", "wrist", "hand", "palm")),
                 ("foot", ("toe", "foot")), ("lowerleg", ("lowerleg",)), ("upperleg", ("upperleg",)),
                 ("lowerarm", ("lowerarm",)), ("upperarm", ("upperarm", "shoulder")),
                 ("head", ("neck", "head", "eye", "jaw", "tongue")),
                 ("torso", ("spine", "root", "pelvis", "clavicle", "breast")))


def part_of_bone(bone: str) -> int:
    """Index into PART_NAMES of an anny bone (e.g. "lowerarm02.L" -> "lowerarm.L")."""
    name, _, side = bone.partition(".")
    for part, keywords in PART_KEYWORDS:
        if any(k in name.lower() for k in keywords):
            return PART_NAMES.index(part if part in ("head", "torso") else f"{part}.{side}")
    raise ValueError(f"anny bone {bone!r} belongs to no body part of PART_KEYWORDS; expected a bone name "
                     "holding one of their keywords (update PART_KEYWORDS for this anny version)")


def template_parts(model) -> torch.Tensor:
    """(13348,) int64 PART_NAMES index of every template vertex: the part with the largest summed
    skinning weight."""
    parts = torch.tensor([part_of_bone(b) for b in model.bone_labels])
    index, weight = model.vertex_bone_indices.long(), model.vertex_bone_weights.float()
    summed = torch.zeros(len(index), len(PART_NAMES)).scatter_add_(1, parts[index], weight)
    return summed.argmax(1)


class Body:
    """anny posed by BodyParams at one resolution, differentiable, float32 (CPU).

    Attributes: faces (F', 3) int64 numpy; num_vertices V'; parts (V',) int64 index into
    bone_names of each vertex's part (the bone with the largest skinning weight at the template
    vertex that carries most of it); body_parts (V',) and full_body_parts (13348,) int64 indices
    into PART_NAMES; limits (JointLimits).
    """

    def __init__(self, resolution: str = "lite"):
        if resolution not in FIT_RESOLUTIONS:
            raise ValueError(f"resolution must be one of {list(FIT_RESOLUTIONS)}, got {resolution!r}")
        self.model = anny_body.load_model()
        self.resolution = resolution
        self.bone_names = list(self.model.bone_labels)
        self.bone_index = torch.tensor([self.bone_names.index(b) for b in FIT_BONES])
        with torch.no_grad():
            rest = self.full_vertices(BodyParams.neutral())
        tag = f"anny{anny_body.anny_version()}-{anny_body.TOPOLOGY}"
        W, faces = resolution_map(resolution, rest.double().numpy(), self.model.faces.numpy().astype(np.int64), tag)
        self.faces = faces
        bones = self.model.vertex_bone_indices.gather(
            1, self.model.vertex_bone_weights.argmax(1, keepdim=True))[:, 0].long()  # (13348,)
        self.full_body_parts = template_parts(self.model)
        if W is None:
            self.W, self.parts, self.body_parts = None, bones, self.full_body_parts
        else:
            coo = W.tocoo()
            self.W = (torch.from_numpy(coo.row.astype(np.int64)), torch.from_numpy(coo.col.astype(np.int64)),
                      torch.from_numpy(coo.data.astype(np.float32))[:, None])
            heaviest = torch.from_numpy(np.asarray(W.argmax(1)).reshape(-1))  # the template vertex of each row
            self.parts, self.body_parts = bones[heaviest], self.full_body_parts[heaviest]
        self.num_vertices = len(self.parts)
        self.limits = joint_limits(anny_body.PoseSampler(self.model))

    def full_vertices(self, params: BodyParams) -> torch.Tensor:
        """(13348, 3) posed template vertices (the space correspondences index)."""
        pose = torch.eye(4).repeat(len(self.bone_names), 1, 1)
        pose[self.bone_index, :3, :3] = axis_angle_matrix(params.rotations)
        out = self.model(pose_parameters=pose[None], phenotype_kwargs=params.phenotype[None])
        return out["vertices"][0] + params.translation

    def reduce(self, full: torch.Tensor) -> torch.Tensor:
        """(13348, 3) template vertices -> (V', 3) at this resolution (a fixed sparse map)."""
        if self.W is None:
            return full
        rows, cols, values = self.W
        return full.new_zeros(len(self.parts), 3).index_add(0, rows, full[cols] * values)

    def vertices(self, params: BodyParams) -> torch.Tensor:
        """(V', 3) posed vertices at this resolution."""
        return self.reduce(self.full_vertices(params))


@lru_cache(maxsize=len(FIT_RESOLUTIONS))
def body(resolution: str = "lite") -> Body:
    """The shared Body of a resolution (built once per process: the anny model and the map)."""
    return Body(resolution)


def synthetic_scan(vertices, faces, count: int = 30_000, noise: float = 0.0, partial: bool = False,
                   generator: np.random.Generator | None = None, view=(0.0, 1.0, 0.0)):
    """Points sampled area-uniformly on a mesh, as a scanner would see it.

    Args:
        vertices: (V, 3) posed mesh (metres); faces: (F, 3) int.
        count: number of points returned.
        noise: standard deviation (metres) of isotropic Gaussian noise added to every coordinate.
        partial: sample only the triangles that face the camera: n . view < 0 for the triangle's
            outward normal n and the viewing direction `view` (from the camera toward the body;
            the default +Y looks at the body's front, which faces -Y). Self-occlusion is ignored
            (a back-face test only), so an arm in front of the chest does not hide it.
        generator: numpy random generator (default: a fresh unseeded one).
    Returns:
        points (count, 3) float32; template (count,) int64, for each point the corner of its
        triangle with the largest barycentric weight (the ground-truth correspondence).
    """
    rng = generator if generator is not None else np.random.default_rng()
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    tri = v[f]  # (F, 3, 3)
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area = np.linalg.norm(cross, axis=1) / 2
    if partial:
        area = np.where(cross @ np.asarray(view, dtype=np.float64) < 0, area, 0.0)
    chosen = rng.choice(len(f), size=count, p=area / area.sum())
    u, w = rng.random(count), rng.random(count)
    flip = u + w > 1  # fold the unit square onto the triangle: uniform barycentric samples
    u, w = np.where(flip, 1 - u, u), np.where(flip, 1 - w, w)
    bary = np.stack([1 - u - w, u, w], 1)  # (count, 3)
    points = (bary[:, :, None] * tri[chosen]).sum(1)
    if noise > 0:
        points = points + rng.normal(0.0, noise, points.shape)
    return points.astype(np.float32), f[chosen, bary.argmax(1)]


def prepare_scan(points, up: str = "auto", name: str = "scan") -> tuple[np.ndarray, Frame, list[str]]:
    """Check a scan and put it into anny's frame (metres, Z up); nothing else changes.

    Args: points (N, 3) array-like; up: "z", "y" or "auto" (Y when the extent along Y exceeds
    1.5x the extent along Z). The unit is read from the height along the up axis: metres,
    centimetres or millimetres (converted, with a note). Returns (points (N, 3) float32, Frame
    with file = frame.back(model), notes). Raises ValueError naming the problem: wrong shape,
    empty, non-finite, fewer than MIN_POINTS, all on a line or a plane, no body's height.
    """
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[-1] != 3:
        raise ValueError(f"{name} must be an (N, 3) array of points, got shape {p.shape}")
    if len(p) == 0:
        raise ValueError(f"{name} is empty (0 points)")
    bad = ~np.isfinite(p).all(1)
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} points with NaN or inf coordinates (of {len(p)})")
    if len(p) < MIN_POINTS:
        raise ValueError(f"{name} has {len(p)} points; registration needs at least {MIN_POINTS}")
    spread = np.linalg.svd(p - p.mean(0), compute_uv=False)
    if spread[1] <= DEGENERATE_RATIO * spread[0] or spread[2] <= DEGENERATE_RATIO * spread[0]:
        shape = "a line" if spread[1] <= DEGENERATE_RATIO * spread[0] else "a plane"
        raise ValueError(f"{name} is degenerate: its points lie on {shape} (principal spreads "
                         f"{np.round(spread / spread[0], 5).tolist()}); expected a 3-D body surface")
    extent = np.ptp(p, axis=0)
    rotation, note = up_rotation(extent, up, name)
    notes = [f"{note} for the fit; fit.ply is rotated back (--up z keeps it as it is)"] if note else []
    height = float(extent @ np.abs(rotation[2]))
    unit = next(((f, u) for f, u in UNITS if METRE_HEIGHTS[0] <= height * f <= METRE_HEIGHTS[1]), None)
    if unit is None:
        raise ValueError(f"{name} is {height:.4g} units tall, which is no standing body's height in metres, "
                         "centimetres or millimetres; expected a body standing along the up axis (see up)")
    scale, unit_name = unit
    if scale != 1:
        notes.append(f"{name} is {height:.4g} units tall: read as {unit_name} ({height * scale:.2f} m) and "
                     "converted to metres for the fit; fit.ply is in the scan's units")
    frame = Frame(np.zeros(3), rotation, scale)
    return ((p @ rotation.T) * scale).astype(np.float32), frame, notes


@dataclass(frozen=True)
class FitWeights:
    """Weights of the loss terms (data terms in cm^2, priors in rad^2 and phenotype units^2); each
    stage scales them (see `stages`).

    model_to_scan is 0.1: it pulls every model vertex onto its nearest scan point, so a limb the
    neutral body has in the wrong place is dragged onto whatever scan part lies near it, and a
    partial scan's unseen side onto the seen one. Measured on the benchmark's held-out 30k-point
    scans (`bench/registration.py`, lite, 300 evaluations): at weight 1, 2 of 5 clean fits
    failed (14.3 and 30.0 cm mean vertex error) and 3 of 5 front-only scans; at 0.1 the two
    clean failures reach 1.13 and 1.28 cm (a success goes from 0.61 to 0.92 cm) and every
    front-only scan fits within 2.1 cm.
    """
    scan_to_model: float = 1.0
    model_to_scan: float = 0.1
    correspondence: float = 1.0
    pose_prior: float = 100.0
    phenotype_range: float = 100.0

    def __post_init__(self):
        for name, value in vars(self).items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"weight {name} must be a finite number >= 0, got {value!r}")


# Bone groups a stage can free (FIT_BONES rows): the trunk and the proximal limb bones move the
# most surface, so they are placed before the forearms, shins, hands and feet.
BONE_GROUPS = {
    "root": ("root",),
    "girdles": tuple(f"{b}.{s}" for s in "LR" for b in ("clavicle", "upperleg01", "upperarm01")),
    "rest": (*AXIAL, *(f"{b}.{s}" for s in "LR" for b in ("pelvis", "lowerleg01", "foot", "lowerarm01", "lowerarm02",
                                                          "wrist"))),
}


@dataclass(frozen=True)
class Stage:
    """A share of the iterations, what it optimises ("translation", "phenotype" and BONE_GROUPS
    names) and its term weights."""
    name: str
    share: float
    train: tuple[str, ...]
    weights: dict[str, float]


def stages(weights: FitWeights, with_correspondences: bool) -> tuple[Stage, ...]:
    """Correspondences place the body first and the surface refines it. Without them: placement
    (translation), the girdles, every bone but the root, then everything. The scan-to-model term
    is down-weighted in the first two: from the neutral pose, a raised arm's points have the
    head and shoulders as nearest vertices and would tilt the whole body toward them. The global
    orientation and the phenotype come last, once the limbs are near their places; earlier they
    turn, shrink or inflate the body to cover limbs that are still in the wrong place."""
    w = {k: getattr(weights, k) for k in ("scan_to_model", "model_to_scan", "correspondence", "pose_prior",
                                         "phenotype_range")}
    bones = ("root", "girdles", "rest")
    everything = ("translation", "phenotype", *bones)
    if with_correspondences:
        return (Stage("correspondence", 0.4, everything, {**w, "scan_to_model": 0.1 * w["scan_to_model"],
                                                          "model_to_scan": 0.1 * w["model_to_scan"]}),
                Stage("surface", 0.6, everything, {**w, "correspondence": 0.1 * w["correspondence"]}))
    w.pop("correspondence")
    reach = {**w, "scan_to_model": 0.1 * w["scan_to_model"]}
    return (Stage("placement", 0.1, ("translation",), reach),
            Stage("girdles", 0.25, ("translation", "girdles"), reach),
            Stage("limbs", 0.25, ("translation", "girdles", "rest"), w),
            Stage("shape", 0.4, everything, w))


DEFAULT_ITERATIONS = 300  # the loss-evaluation budget over all stages
LBFGS_HISTORY = 20


@dataclass
class FitResult:
    """What `fit` found, in anny's frame (metres, Z up).

    params: BodyParams; vertices (V', 3) float32 and faces (F', 3) at `resolution`; losses: one
    dict per iteration (stage, total and every weighted term); frame: maps the model frame back
    to the scan's (`scan_vertices`); notes: what `prepare_scan` changed; seconds: wall-clock.
    """
    params: BodyParams
    vertices: np.ndarray
    faces: np.ndarray
    resolution: str
    losses: list[dict] = field(repr=False)
    frame: Frame
    notes: list[str]
    seconds: float

    def scan_vertices(self) -> np.ndarray:
        """(V', 3) fitted vertices in the scan's own frame (units and up axis)."""
        return self.frame.back(self.vertices.astype(np.float64))


def check_correspondences(correspondences, count: int, vertices: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(template index (N,) int64 into the `vertices` template vertices, weight (N,) >= 0 or
    None) -> tensors; raises ValueError naming what does not fit the scan of `count` points."""
    try:
        index, weight = correspondences
    except (TypeError, ValueError):
        raise ValueError("correspondences must be a pair (template vertex index (N,), weight (N,) or None)") from None
    index = np.asarray(index)
    weight = np.ones(len(index)) if weight is None else np.asarray(weight, dtype=np.float64)
    if index.shape != (count,) or weight.shape != (count,):
        raise ValueError(f"correspondences need one template index and one weight per scan point ({count}), got "
                         f"shapes {index.shape} and {weight.shape}")
    if not np.issubdtype(index.dtype, np.integer) or index.min() < 0 or index.max() >= vertices:
        raise ValueError(f"correspondence indices must be integers in [0, {vertices}) (template vertices)")
    if not (np.isfinite(weight).all() and (weight >= 0).all() and weight.sum() > 0):
        raise ValueError("correspondence weights must be finite, >= 0 and not all 0")
    return torch.from_numpy(index.astype(np.int64)), torch.from_numpy(weight.astype(np.float32))


def loss_terms(b: Body, params: BodyParams, scan: torch.Tensor, correspondences=None,
               backend: str = "auto") -> dict[str, torch.Tensor]:
    """Unweighted loss terms (scalars) of `params` against scan (N, 3); see the module docstring."""
    full = b.full_vertices(params)
    v = b.reduce(full)
    terms = {"scan_to_model": kernels.nearest(scan, v, backend=backend)[0].mean() * CM2,
             "model_to_scan": kernels.nearest(v, scan, backend=backend)[0].mean() * CM2,
             "pose_prior": b.limits.penalty(params.rotations),
             "phenotype_range": (torch.relu(-params.phenotype) ** 2 + torch.relu(params.phenotype - 1) ** 2).sum()}
    if correspondences is not None:
        index, weight = correspondences
        d2 = ((full[index] - scan) ** 2).sum(-1)
        terms["correspondence"] = (weight * d2).sum() / weight.sum() * CM2
    return terms


def fit(scan_points, correspondences=None, resolution: str = "lite", iterations: int = DEFAULT_ITERATIONS, *,
        weights: FitWeights = FitWeights(), up: str = "auto", backend: str = "auto",
        progress: bool = True, init: BodyParams | None = None) -> FitResult:
    """Fit anny to a scan from a neutral body (rest pose, phenotype 0.5) at the scan's centroid,
    or from `init`.

    Args:
        scan_points: (N, 3) points, any order; metres, centimetres or millimetres; Z or Y up
            (see `prepare_scan`, which also rejects bad input).
        correspondences: None (the no-network baseline) or (template index (N,), weight (N,) or
            None): the template vertex (of 13,348) each scan point lies on, and a confidence.
        resolution: "lite", "smpl" or "full": the mesh the surface terms and the result use.
        iterations: loss evaluations over all stages (`stages` splits them); a stage stops
            early when L-BFGS converges, or over its share by at most its last line search.
        weights: FitWeights; up: "auto", "z" or "y"; backend: kernels backend of `nearest`.
        init: BodyParams in anny's frame to start from (e.g. an earlier fit of the same scan, as
            the correspondence network's self-supervised loop refits), not changed; None: neutral.
    Returns: FitResult; its losses hold one row per loss evaluation.

    Optimiser: L-BFGS with a strong-Wolfe line search, one run per stage with that stage's share
    of the evaluations. Measured against Adam (lr 0.02 rad / 0.01 m / 0.02, cosine decay per
    stage, 300 steps) on held-out clean 30k-point scans at `lite`: 0.54 vs 0.81 cm mean vertex
    error on one body, 0.60 vs 23.9 cm on another (Adam stuck with a raised leg unfound), in
    about half the time.
    """
    start = time.perf_counter()
    if not (isinstance(iterations, int) and iterations >= 10):
        raise ValueError(f"iterations must be an integer >= 10, got {iterations!r}")
    points, frame, notes = prepare_scan(scan_points, up)
    scan = torch.from_numpy(points)
    b = body(resolution)
    pairs = None if correspondences is None else check_correspondences(
        correspondences, len(points), len(b.model.template_vertices))
    if init is None:
        with torch.no_grad():
            rest = b.full_vertices(BodyParams.neutral())
        params = BodyParams.neutral(scan.mean(0) - rest.mean(0))
    else:
        params = BodyParams(*(t.detach().clone().float() for t in (init.phenotype, init.rotations, init.translation)))
    rows = {g: torch.tensor([n in names for n in FIT_BONES]) for g, names in BONE_GROUPS.items()}
    losses = []
    plan = stages(weights, pairs is not None)
    counts = [max(1, round(s.share * iterations)) for s in plan]
    counts[-1] = iterations - sum(counts[:-1])
    bar = tqdm(total=iterations, desc=f"fit {resolution}", unit="eval", disable=not progress)
    for stage, count in zip(plan, counts):
        free = torch.zeros(len(FIT_BONES), dtype=torch.bool)
        for g in BONE_GROUPS:
            free |= rows[g] & (g in stage.train)
        tensors = [params.rotations] + [getattr(params, n) for n in ("translation", "phenotype") if n in stage.train]
        for tensor in (params.rotations, params.translation, params.phenotype):
            tensor.requires_grad_(any(tensor is t for t in tensors))
        optimiser = torch.optim.LBFGS(tensors, lr=1, max_iter=count, max_eval=count, history_size=LBFGS_HISTORY,
                                      line_search_fn="strong_wolfe")

        def closure(stage=stage, free=free, optimiser=optimiser):
            optimiser.zero_grad()
            terms = loss_terms(b, params, scan, pairs, backend)
            weighted = {k: stage.weights[k] * v for k, v in terms.items()}
            total = sum(weighted.values())
            total.backward()
            params.rotations.grad[~free] = 0  # bones this stage keeps still
            losses.append({"stage": stage.name, "total": total.item(), **{k: v.item() for k, v in weighted.items()}})
            bar.set_postfix(loss=f"{total.item():.3g}", stage=stage.name)
            bar.update()
            return total

        optimiser.step(closure)
    bar.close()
    params = BodyParams(*(t.detach().clone() for t in (params.phenotype, params.rotations, params.translation)))
    with torch.no_grad():
        vertices = b.vertices(params).numpy()
    return FitResult(params, vertices, b.faces, resolution, losses, frame, notes, time.perf_counter() - start)


def surface_distance(points, vertices, faces, candidates: int = 16) -> np.ndarray:
    """(N,) distance (metres) from each point (N, 3) to the nearest point of a triangle mesh
    (vertices (V, 3), faces (F, 3)): exact among the `candidates` triangles with the nearest
    centroids, which holds wherever triangles are smaller than the distance to their neighbours'
    centroids (as on anny's meshes). A metric, not a loss: no gradient."""
    import trimesh
    from scipy.spatial import cKDTree

    p = np.asarray(points, dtype=np.float64)
    triangles = np.asarray(vertices, dtype=np.float64)[np.asarray(faces)]
    k = min(candidates, len(triangles))
    _, near = cKDTree(triangles.mean(1)).query(p, k=k)
    near = near.reshape(len(p), k)
    closest = trimesh.triangles.closest_point(triangles[near.reshape(-1)], np.repeat(p, k, axis=0))
    return np.linalg.norm(closest.reshape(len(p), k, 3) - p[:, None], axis=2).min(1)
