"""The correspondence network of registration (LoopReg's learned half) and its two training stages.

Every scan point gets a feature f_i (`CorrespondenceNet.scan_features`), every vertex of the anny
template at the network's resolution a learned feature g_j (a parameter table, `template_features`),
both unit-normalised. Point i's soft correspondence is p_ij = softmax_j(s <f_i, g_j>) with a learned
scale s = 1 / tau; it carries any per-vertex attribute a_j (canonical position, part one-hot, posed
vertices) to the point as sum_j p_ij a_j (`transfer`, through `kernels.softmax_attend`: streamed,
never an N x M matrix, forward or backward); the hard correspondence is argmax_j <f_i, g_j>
(`match`, `kernels.softmax_argmax`). Nothing here depends on the scan's point count or order.

Scan encoder (a two-level PointNet with kNN context, all per point, channel-last):
1. a context set: `context_points` points of the scan drawn at random (all when fewer), centred on
   their mean. Every neighbourhood is taken among the context points, so a neighbourhood has the
   same extent on a 2,000-point training scan and a 30,000-point scan: the features do not depend
   on the sampling density;
2. context features: an EdgeConv over each context point's `neighbours` nearest context points,
   max(MLP([x_j, 20 (x_l - x_j)])), then a per-point layer, and a global max-pool (the whole body);
3. every scan point i: max over its nearest context points l of relu(W [20 (x_l - x_i), h_l]) (a
   set abstraction around i), concatenated with the global feature and x_i, then a three-layer
   head to `feature_dim`. Queries are encoded in blocks of QUERY_ROWS, so a 30k-point scan needs
   tens of MB. Offsets are scaled by 20 so that a 5 cm offset reads as 1, like the coordinates.
Scans are in anny's frame (metres, Z up, facing -Y, as `registration.prepare_scan` and the fit's
neutral start assume); training rotates them by up to YAW_DEG about the vertical.

Training (`train`, the `python -m mapconnet.register train` command):
- warm start: labelled synthetic scans (`synthetic_scans`: random anny phenotypes and poses from
  `mapconnet.data.anny_body`, area-uniform points, some noisy, some seen from one side only) with
  the true template vertex of every point, supervised by point-level InfoNCE
  (`kernels.info_nce` with pos = the true vertex's template key) at the learned temperature;
- self-supervised (LoopReg's loop): on unlabelled scans (their labels are never generated), in
  rounds: fit anny to every scan with the current network's correspondences (`registration.fit`,
  `fit_iterations` evaluations, warm-started from the scan's previous fit, no gradient), then
  train the network for `self_epochs` passes with one of two losses (`self_target`):
  "landing" (LoopReg's): every point lands on its soft-corresponding posed template vertex,
  mean_i |x_i - sum_j p_ij v_j(params)|^2 (cm^2);
  "fit" (the default): the same objective minimised over the correspondence with the fitted body
  held fixed, i.e. each point labelled with the key of the fitted vertex nearest it (`fit_labels`;
  points the fit does not explain are left out), learned by the warm start's InfoNCE.

Template keys: the vertices of `template` (default lite, 1,723). A scan point's label is the key
nearest (on the neutral rest body) to the full-resolution vertex the point was sampled at; a key's
full-resolution vertex (for `registration.fit`, which indexes the 13,348-vertex template) is the
full vertex nearest to it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.spatial import cKDTree
from tqdm import tqdm

import kernels
from mapconnet import registration
from mapconnet.checkpoint import read_tensor_file
from mapconnet.cli import POSITIVE, at_least, check_ranges, one_of
from mapconnet.data import anny_body
from mapconnet.files import append_csv_row, folder_lock, keep_csv_rows, replacing

FORMAT = "mapconnet-correspondence-v1"
PRETRAINED = Path(__file__).parent / "pretrained" / "correspondence.pt"
OFFSET_SCALE = 20.0  # neighbour offsets in metres x 20: 5 cm reads as 1
QUERY_ROWS = 4096  # scan points encoded at once: (rows, neighbours, width) edge tensors of ~10-30 MB
SCALE_RANGE = (1.0, 200.0)  # the learned 1 / tau stays in here (tau 0.005 .. 1)
CONFIDENCE_CM = 5.0  # see `predict`
YAW_DEG = 15.0  # training scans turn by up to this about the vertical
WITHIN_CM = (5.0, 10.0)
# Seed sequences of the synthetic scans; the benchmark's held-out bodies (`held_out_scan`) use
# HELD_OUT_SEED, which no training scan uses.
SEEDS = {"labelled": (0xC0DE, 13, 0), "unlabelled": (0xC0DE, 13, 1), "validation": (0xC0DE, 13, 2)}
HELD_OUT_SEED = (0xBE4C, 13)


@dataclass
class NetConfig:
    template: str = field(default="lite", metadata={"help": "template whose vertices are the correspondence "
                                                              "targets: lite (1,723), smpl (6,890) or full (13,348)"})
    vertices: int = field(default=0, metadata={"help": "template vertices (0: the count of --template)"})
    feature_dim: int = field(default=64, metadata={"help": "feature channels of scan points and template vertices"})
    widths: tuple[int, int] = field(default=(64, 128), metadata={"help": "encoder widths: edge layers, point layers"})
    context_points: int = field(default=1024, metadata={"help": "context points drawn from a scan"})
    neighbours: int = field(default=16, metadata={"help": "nearest context points of each point"})
    tau: float = field(default=0.07, metadata={"help": "initial softmax temperature (learned)"})
    backend: str = field(default="auto", metadata={"help": "kernels backend of the correspondence softmax"})

    def __post_init__(self):
        self.widths = tuple(self.widths)
        check_ranges(self, {"template": one_of(registration.FIT_RESOLUTIONS), "vertices": at_least(0),
                            "feature_dim": at_least(2), "context_points": at_least(1), "neighbours": at_least(1),
                            "tau": POSITIVE,
                            "widths": ((lambda w: len(w) == 2 and all(c >= 1 for c in w)), "two widths >= 1")})
        if self.backend != "auto" and self.backend not in kernels.dispatch.SOFTMAX_BACKENDS:
            raise ValueError(f"--backend must be 'auto' or one of {kernels.dispatch.SOFTMAX_BACKENDS}, "
                             f"got {self.backend!r}")


def _batched(x: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {type(x).__name__} "
                        f"{getattr(x, 'dtype', '')}".rstrip())
    if x.dim() == 2:
        return x[None], True
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (N, D) or (B, N, D), got {tuple(x.shape)}")
    return x, False


class CorrespondenceNet(nn.Module):
    """Scan features against learned template features; see the module docstring."""

    def __init__(self, cfg: NetConfig):
        super().__init__()
        if cfg.vertices < 1:
            raise ValueError("NetConfig.vertices must be the template's vertex count (>= 1); build the network "
                             "with `build(cfg)`, which reads it from the body model")
        self.cfg = cfg
        w1, w2 = cfg.widths
        self.context_edge = nn.Sequential(nn.Linear(6, w1), nn.ReLU(), nn.Linear(w1, w1), nn.ReLU())
        self.context_point = nn.Sequential(nn.Linear(w1 + 3, w2), nn.ReLU())
        self.query_from_context = nn.Linear(3 + w2, w1)  # reads [20 x_l, h_l]; 20 x_i is subtracted per query
        # one layer before the max over neighbours: its (rows, k, w1) tensors are the encoder's largest, and
        # a second per-edge layer there tripled the time of a training step's backward (measured on 2 cores)
        self.head = nn.Sequential(nn.Linear(w1 + w2 + 3, w2), nn.ReLU(), nn.Linear(w2, w2), nn.ReLU(),
                                  nn.Linear(w2, cfg.feature_dim))
        self.template = nn.Parameter(F.normalize(torch.randn(cfg.vertices, cfg.feature_dim), dim=-1))
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.tau)))

    def scale(self) -> torch.Tensor:
        """The learned softmax scale 1 / tau (a scalar tensor, clamped to SCALE_RANGE)."""
        return self.log_scale.exp().clamp(*SCALE_RANGE)

    def template_features(self) -> torch.Tensor:
        """(V, C) unit-normalised template vertex features."""
        return F.normalize(self.template, dim=-1)

    def scan_features(self, points: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, 3) or (B, N, 3) scan points (anny's frame, metres) -> (N, C) or (B, N, C) unit
        features. `generator` draws the context points (default: seeded 0, so a scan always gets
        the same features)."""
        x, unbatched = _batched(points, "points")
        if x.shape[-1] != 3:
            raise ValueError(f"points must have 3 coordinates per point, got shape {tuple(points.shape)}")
        if x.shape[1] == 0:
            raise ValueError("points is empty (0 points); expected a scan")
        if not torch.isfinite(x).all():
            raise ValueError("points has NaN or inf coordinates; expected finite points (registration.prepare_scan "
                             "checks a scan)")
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        out = torch.stack([self._encode(s.float(), generator) for s in x])
        return out[0] if unbatched else out

    def _encode(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = len(x)
        m = min(self.cfg.context_points, n)
        k = min(self.cfg.neighbours, m)
        context = x[torch.randperm(n, generator=generator)[:m]]
        centre = context.mean(0)
        x, context = x - centre, context - centre
        tree = cKDTree(context.detach().numpy())
        neighbours = lambda p: torch.from_numpy(tree.query(p.detach().numpy(), k)[1].reshape(len(p), k))  # noqa: E731
        near = neighbours(context)  # (m, k)
        edges = torch.cat([context[:, None].expand(-1, k, -1), (context[near] - context[:, None]) * OFFSET_SCALE], -1)
        h = self.context_point(torch.cat([self.context_edge(edges).amax(1), context], -1))  # (m, w2)
        whole = h.amax(0)  # (w2,) the whole body
        u = self.query_from_context(torch.cat([context * OFFSET_SCALE, h], -1))  # (m, w1)
        w_x = self.query_from_context.weight[:, :3]
        rows = []
        for s in range(0, n, QUERY_ROWS):
            q = x[s:s + QUERY_ROWS]
            # W [20 x_l, h_l] - W_x 20 x_i = W [20 (x_l - x_i), h_l]: the offset enters relative to the query
            local = torch.relu(u[neighbours(q)] - (q * OFFSET_SCALE @ w_x.T)[:, None]).amax(1)  # (rows, w1)
            rows.append(self.head(torch.cat([local, whole.expand(len(q), -1), q], -1)))
        return F.normalize(torch.cat(rows), dim=-1)

    def _keys(self, features: torch.Tensor, values: torch.Tensor | None = None):
        f, unbatched = _batched(features, "features")
        g = self.template_features().to(f.dtype)
        if f.shape[-1] != g.shape[-1]:
            raise ValueError(f"features have {f.shape[-1]} channels but the template has {g.shape[-1]}")
        g = g.expand(len(f), -1, -1)
        if values is not None:
            v, v_unbatched = _batched(values, "values")
            if v.shape[1] != g.shape[1]:
                raise ValueError(f"values must have one row per template vertex ({g.shape[1]}), got shape "
                                 f"{tuple(values.shape)}")
            if v_unbatched or len(v) == 1:
                v = v.expand(len(f), -1, -1)
            elif len(v) != len(f):
                raise ValueError(f"values has batch {len(v)} but features has {len(f)}")
            values = v.to(f.dtype)
        return f, g, values, unbatched

    def transfer(self, features: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Carry per-vertex attributes to scan points through the soft correspondence.

        features (N, C) or (B, N, C) from `scan_features`; values (V, D) or (B, V, D) (any D: a
        canonical position, a part one-hot, posed vertices). Returns (N, D) or (B, N, D):
        sum_j softmax_j(s <f_i, g_j>) values_j, differentiable in features, values and the
        network's template features and scale; streamed by `kernels.softmax_attend`."""
        f, g, v, unbatched = self._keys(features, values)
        out = kernels.softmax_attend(f * self.scale(), g, v, backend=self.cfg.backend)
        return out[0] if unbatched else out

    def match(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) or (B, N) int64: the template vertex with the largest score of each point (no grad)."""
        f, g, _, unbatched = self._keys(features)
        idx = kernels.softmax_argmax(f, g, backend=self.cfg.backend)
        return idx[0] if unbatched else idx

    def info_nce(self, features: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Point-level InfoNCE: features (B, N, C), keys (B, N) int64 true template vertex -> scalar."""
        f, g, _, _ = self._keys(features)
        keys = keys if keys.dim() == 2 else keys[None]
        return kernels.info_nce(f * self.scale(), g, pos=keys, tau=1.0, backend=self.cfg.backend)


@dataclass(frozen=True)
class Template:
    """The network's targets at one resolution, from the neutral rest body (phenotype 0.5).

    canonical (V, 3) key positions; parts (V,) PART_NAMES index; full_canonical (13348, 3) and
    full_parts (13348,) the same at full resolution; full_of_key (V,) the full vertex nearest each
    key; key_of_full (13348,) the key nearest each full vertex (a point's label)."""
    canonical: torch.Tensor
    parts: torch.Tensor
    full_canonical: torch.Tensor
    full_parts: torch.Tensor
    full_of_key: torch.Tensor
    key_of_full: torch.Tensor


@lru_cache(maxsize=len(registration.FIT_RESOLUTIONS))
def template(resolution: str = "lite") -> Template:
    b = registration.body(resolution)
    with torch.no_grad():
        full = b.full_vertices(registration.BodyParams.neutral())
        keys = b.reduce(full)
    full_of_key = torch.from_numpy(cKDTree(full.numpy()).query(keys.numpy())[1].astype(np.int64))
    key_of_full = torch.from_numpy(cKDTree(keys.numpy()).query(full.numpy())[1].astype(np.int64))
    return Template(keys, b.body_parts, full, b.full_body_parts, full_of_key, key_of_full)


def build(cfg: NetConfig | None = None) -> CorrespondenceNet:
    """A new (untrained) network, its vertex count read from the body model at cfg.template."""
    cfg = cfg or NetConfig()
    vertices = registration.body(cfg.template).num_vertices
    if cfg.vertices not in (0, vertices):
        raise ValueError(f"NetConfig.vertices is {cfg.vertices} but the {cfg.template} template has {vertices}")
    return CorrespondenceNet(NetConfig(**{**asdict(cfg), "vertices": vertices}))


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
def save(path, payload: dict) -> Path:
    """torch.save {format, **payload} under a temporary name, then rename."""
    with replacing(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)
    return Path(path)


def resolve(path) -> Path:
    """"pretrained" -> the network that ships with the package; anything else is a path."""
    if str(path) == "pretrained":
        if not PRETRAINED.is_file():
            raise FileNotFoundError(f"the pretrained correspondence network {PRETRAINED} does not ship with this "
                                    "install; train one (python -m mapconnet.register train) or use "
                                    "--correspondences none")
        return PRETRAINED
    return Path(path)


def load_payload(path) -> dict:
    path = resolve(path)
    payload = read_tensor_file(path, "correspondence network",
                               "a correspondence network written by `python -m mapconnet.register train`")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or "model" not in payload \
            or "net_config" not in payload:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not a correspondence network (format {found!r}; expected {FORMAT!r} with "
                         "\"model\" and \"net_config\")")
    return payload


def load(path="pretrained", backend: str | None = None) -> CorrespondenceNet:
    """The network of a checkpoint (a path or "pretrained") in eval mode."""
    payload = load_payload(path)
    cfg = NetConfig(**{**payload["net_config"], **({"backend": backend} if backend else {})})
    net = CorrespondenceNet(cfg)
    try:
        net.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise ValueError(f"{resolve(path)} does not fit its own network config ({str(e).splitlines()[0]})") from None
    return net.eval()


# ------------------------------------------------------------------------------------------------
# Synthetic scans
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanSpec:
    """How `synthetic_scans` samples: points per scan; the share of noisy scans and their noise's
    largest standard deviation (metres, uniform up to it); the share seen from one side only (the
    back-face rule of `registration.synthetic_scan`, from a random horizontal direction)."""
    points: int = 2048
    noisy: float = 0.5
    max_noise: float = 0.006
    partial: float = 0.2


def synthetic_scans(kind: str, count: int, spec: ScanSpec = ScanSpec(), labels: bool = True,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """`count` scans of random anny bodies; scan i depends only on (kind, i), so the first tenth of
    1,000 labelled scans are the 100 labelled scans.

    kind: a SEEDS name. Returns points (count, spec.points, 3) float32 in anny's frame and, with
    `labels`, the full-resolution template vertex of every point (count, spec.points) int64 (None
    without: unlabelled scans never hold their truth)."""
    if kind not in SEEDS:
        raise ValueError(f"kind must be one of {list(SEEDS)}, got {kind!r}")
    model = anny_body.load_model()
    sampler = _sampler()
    rngs = [np.random.default_rng([*SEEDS[kind], i]) for i in range(count)]
    phenotypes: list[np.ndarray | None] = [None] * count
    pending = list(range(count))
    while pending:  # each scan redraws from its own generator until its BMI is in range
        candidates = np.stack([anny_body.sample_phenotype(rngs[i]) for i in pending])
        ok = np.concatenate([anny_body.bmi_in_range(model, candidates[s:s + 128])
                             for s in range(0, len(pending), 128)])
        for i, c, keep in zip(pending, candidates, ok):
            if keep:
                phenotypes[i] = c
        pending = [i for i, keep in zip(pending, ok) if not keep]
    poses = np.stack([sampler.sample(r) for r in rngs]) if count else np.zeros((0, 104, 4, 4), np.float32)
    faces = model.faces.numpy()
    points = np.zeros((count, spec.points, 3), np.float32)
    truth = np.zeros((count, spec.points), np.int64)
    for s in tqdm(range(0, count, 64), desc=f"{kind} scans", unit="x64", disable=not progress):
        meshes = anny_body.posed_vertices(model, np.stack(phenotypes[s:s + 64]), poses[s:s + 64])
        for j, vertices in enumerate(meshes):
            rng = rngs[s + j]
            noise = rng.uniform(0, spec.max_noise) if rng.random() < spec.noisy else 0.0
            partial = bool(rng.random() < spec.partial)
            angle = rng.uniform(-math.pi, math.pi)
            points[s + j], truth[s + j] = registration.synthetic_scan(
                vertices, faces, spec.points, noise=noise, partial=partial, generator=rng,
                view=(math.sin(angle), math.cos(angle), 0.0))
    return points, (truth if labels else None)


def held_out_body(index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(phenotype (6,), pose (104, 4, 4), full-resolution vertices (13348, 3)) of benchmark body
    `index` (`bench/registration.py`): phenotypes and poses no training scan has."""
    model = anny_body.load_model()
    rng = np.random.default_rng([*HELD_OUT_SEED, index])
    phenotype = anny_body.sample_identities(model, 1, rng)[0][0]
    pose = _sampler().sample(rng)
    return phenotype, pose, anny_body.posed_vertices(model, phenotype[None], pose[None])[0]


def held_out_scan(index: int, points: int = 30_000, **options) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scan points (points, 3), true full-resolution vertex per point, the body's full vertices)
    of benchmark body `index`; options go to `registration.synthetic_scan` (noise, partial). The
    points are the same in every condition of a body (one seed per body)."""
    full = held_out_body(index)[2]
    rng = np.random.default_rng([*HELD_OUT_SEED, index, 1])
    scan, truth = registration.synthetic_scan(full, anny_body.load_model().faces.numpy(), points, generator=rng,
                                              **options)
    return scan, truth, full


@lru_cache(maxsize=1)
def _sampler() -> anny_body.PoseSampler:
    return anny_body.PoseSampler(anny_body.load_model())


def yaw(points: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate (B, N, 3) points by (B,) degrees about the vertical (Z) axis."""
    a = torch.deg2rad(degrees)
    c, s, o, one = a.cos(), a.sin(), torch.zeros_like(a), torch.ones_like(a)
    R = torch.stack([c, -s, o, s, c, o, o, o, one], -1).reshape(-1, 3, 3)
    return points @ R.transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# Prediction and metrics
# ------------------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """Per scan point: key (N,) the matched template key; template (N,) its full-resolution vertex
    (what `registration.fit` indexes); canonical (N, 3) the soft-corresponding neutral rest position;
    part (N,) PART_NAMES index of the key; weight (N,) confidence in (0, 1]."""
    key: np.ndarray
    template: np.ndarray
    canonical: np.ndarray
    part: np.ndarray
    weight: np.ndarray


@torch.no_grad()
def predict(net: CorrespondenceNet, points, generator: torch.Generator | None = None) -> Prediction:
    """Correspondences of a scan (N, 3) in anny's frame.

    The confidence is exp(-d^2 / (2 sigma^2)), sigma = CONFIDENCE_CM, with d the distance between
    the soft correspondence's canonical position and the hard match's: near 1 where the softmax
    has one mode, small where it hesitates between distant body parts (a left and a right hand),
    so such points barely pull the fit."""
    t = template(net.cfg.template)
    features = net.scan_features(torch.as_tensor(np.asarray(points), dtype=torch.float32), generator)
    key = net.match(features)
    canonical = net.transfer(features, t.canonical)
    d2 = ((canonical - t.canonical[key]) ** 2).sum(-1) * registration.CM2
    weight = torch.exp(-d2 / (2 * CONFIDENCE_CM**2))
    return Prediction(key.numpy(), t.full_of_key[key].numpy(), canonical.numpy(), t.parts[key].numpy(),
                      weight.numpy())


def correspondence_errors(net: CorrespondenceNet, points, truth, generator=None) -> dict[str, np.ndarray]:
    """Per point of one scan: distance (cm) on the neutral template between the hard match and the
    true vertex `truth` (N,) (full resolution), and whether the parts agree."""
    t = template(net.cfg.template)
    p = predict(net, points, generator)
    truth = torch.as_tensor(np.asarray(truth))
    cm = (t.canonical[p.key] - t.full_canonical[truth]).norm(dim=-1).numpy() * 100
    return {"cm": cm, "part_ok": p.part == t.full_parts[truth].numpy()}


def summarise_errors(errors: list[dict[str, np.ndarray]]) -> dict[str, float]:
    cm = np.concatenate([e["cm"] for e in errors])
    out = {f"within_{w:g}cm": float((cm < w).mean()) for w in WITHIN_CM}
    return {**out, "median_cm": float(np.median(cm)), "mean_cm": float(cm.mean()),
            "part_accuracy": float(np.concatenate([e["part_ok"] for e in errors]).mean())}


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
@dataclass
class CorrespondenceTrainConfig:
    out: str = field(default="runs/correspondence", metadata={"help": "run folder (checkpoint.pt, losses.csv, "
                                                                         "val.csv)"})
    labelled: int = field(default=1000, metadata={"help": "labelled synthetic scans of the warm start"})
    unlabelled: int = field(default=0, metadata={"help": "unlabelled synthetic scans of the self-supervised stage"})
    points: int = field(default=2048, metadata={"help": "points per training scan"})
    batch_size: int = field(default=4, metadata={"help": "scans per step"})
    warm_steps: int = field(default=2000, metadata={"help": "warm-start steps (InfoNCE on labelled scans)"})
    self_rounds: int = field(default=0, metadata={"help": "self-supervised rounds (fit every unlabelled scan, "
                                                            "then --self-epochs passes)"})
    self_epochs: int = field(default=4, metadata={"help": "passes over the unlabelled scans per round"})
    fit_iterations: int = field(default=40, metadata={"help": "loss evaluations of each fit in the loop"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the warm start"})
    self_lr: float = field(default=2e-4, metadata={"help": "Adam learning rate of the self-supervised stage"})
    self_target: str = field(default="fit", metadata={
        "help": "the self-supervised loss: 'landing' (LoopReg's: each point's soft-corresponding posed template "
                "vertex lands on it) or 'fit' (InfoNCE towards the fitted body's vertex nearest each point)"})
    fit_label_cm: float = field(default=3.0, metadata={
        "help": "with --self-target fit: points farther than this from the fitted body get no label"})
    val_scans: int = field(default=16, metadata={"help": "validation scans (their own seed)"})
    val_every: int = field(default=200, metadata={"help": "validate every this many steps"})
    checkpoint_every: int = field(default=100, metadata={"help": "checkpoint every this many steps"})
    seed: int = field(default=0, metadata={"help": "seed of the sampling order, context points and rotations"})
    init: str = field(default="", metadata={"help": "start from this network's weights (a checkpoint or "
                                                      "'pretrained'), e.g. a warm start for the self-supervised stage"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --out from its checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "start afresh in an --out that holds a run"})
    stop_after: int = field(default=0, metadata={"help": "leave after this many steps of this invocation "
                                                           "(checkpointed)"})

    def __post_init__(self):
        check_ranges(self, {**{n: at_least(0) for n in ("labelled", "unlabelled", "warm_steps", "self_rounds",
                                                        "val_scans", "stop_after")},
                            **{n: at_least(1) for n in ("batch_size", "self_epochs", "val_every",
                                                        "checkpoint_every")},
                            "points": at_least(registration.MIN_POINTS), "fit_iterations": at_least(10),
                            "lr": POSITIVE, "self_lr": POSITIVE, "fit_label_cm": POSITIVE,
                            "self_target": one_of(SELF_TARGETS)})
        if self.warm_steps and not self.labelled:
            raise ValueError(f"--warm-steps {self.warm_steps} needs labelled scans; pass --labelled N (>= 1) or "
                             "--warm-steps 0")
        if self.self_rounds and not self.unlabelled:
            raise ValueError(f"--self-rounds {self.self_rounds} needs unlabelled scans; pass --unlabelled N (>= 1) "
                             "or --self-rounds 0")
        if not self.warm_steps and not self.self_rounds:
            raise ValueError("nothing to train: pass --warm-steps N and/or --self-rounds N")
        if self.resume and self.init:
            raise ValueError("--resume continues a run from its own checkpoint; --init starts a new one: pass one")


SELF_TARGETS = ("landing", "fit")
BEFORE_SELF_TARGET = {"self_target": "landing", "fit_label_cm": 3.0}  # what runs saved before the option trained
RUN_FILES = ("checkpoint.pt", "losses.csv", "val.csv")
# settings a resumed run may not change (the run would no longer be one run)
SAME_RUN = ("labelled", "unlabelled", "points", "batch_size", "warm_steps", "self_rounds", "self_epochs",
            "fit_iterations", "lr", "self_lr", "self_target", "fit_label_cm", "seed")


def _order(seed: int, count: int, draw: int, salt: int) -> int:
    """Index of the `draw`-th scan drawn from `count` scans: a fresh seeded permutation per epoch."""
    epoch, position = divmod(draw, count)
    return int(np.random.default_rng([seed, salt, epoch]).permutation(count)[position])


def _lr(step: int, total: int, base: float) -> float:
    """Constant for the first half, then linear decay to 0 at `total` (train.py's schedule)."""
    from mapconnet.training import lr_at

    return lr_at(step, total, base)


def fit_scan(net: CorrespondenceNet, points: np.ndarray, iterations: int, init=None) -> registration.FitResult:
    """Fit anny at the network's template resolution to one scan (anny's frame) with the network's
    correspondences (no gradient into the network)."""
    p = predict(net, points)
    return registration.fit(points, correspondences=(p.template, p.weight), resolution=net.cfg.template,
                            iterations=iterations, up="z", progress=False, init=init)


def fit_labels(b: registration.Body, t: Template, params: list[registration.BodyParams], points: torch.Tensor,
               within_cm: float) -> tuple[torch.Tensor, float]:
    """Labels of unlabelled scans from their fits (`--self-target fit`): each point gets the key of
    the fitted full-resolution vertex nearest it, as a warm-start label is the key of the vertex a
    point was sampled at; points farther than `within_cm` from every fitted vertex (which the fit
    does not explain) get -1. points (B, N, 3) -> keys (B, N) int64 and the labelled share.

    This is the loop's own objective (each point near its corresponding posed vertex) minimised over
    the correspondence with the body fixed: the fit labels the scan, the network learns the labels."""
    keys = torch.full(points.shape[:2], -1, dtype=torch.int64)
    with torch.no_grad():
        for row, (p, x) in enumerate(zip(params, points)):
            distance, nearest = cKDTree(b.full_vertices(p).numpy()).query(x.numpy())
            near = torch.from_numpy(distance * 100 <= within_cm)
            keys[row, near] = t.key_of_full[torch.from_numpy(nearest)[near]]
    share = float((keys >= 0).float().mean())
    if share == 0:
        raise ValueError(f"no point of the batch lies within --fit-label-cm {within_cm} of its fitted body; "
                         "the fits failed (raise --fit-iterations) or the threshold is too tight")
    return keys, share


def train(cfg: CorrespondenceTrainConfig, net_cfg: NetConfig | None = None) -> dict:
    """Run the warm start and the self-supervised stage (module docstring) into cfg.out, holding
    OUT/.lock. Returns {"step", "out", "validation" (the last row of val.csv)}."""
    net_cfg = net_cfg or NetConfig()
    out = Path(cfg.out)
    with folder_lock(out, "correspondence training"):
        existing = [n for n in RUN_FILES if (out / n).exists()]
        if existing and not cfg.resume and not cfg.overwrite:
            raise FileExistsError(f"--out {out} already holds a run ({', '.join(existing)}); pass --resume to continue "
                                  "it, --overwrite to start afresh, or choose another --out")
        payload = None
        if cfg.resume:
            if not (out / "checkpoint.pt").is_file():
                raise ValueError(f"--resume needs {out / 'checkpoint.pt'}, which does not exist; expected the --out "
                                 "of an earlier run")
            payload = load_payload(out / "checkpoint.pt")
            before = {**BEFORE_SELF_TARGET, **payload["train_config"]}
            changed = {k: (before.get(k), getattr(cfg, k)) for k in SAME_RUN if before.get(k) != getattr(cfg, k)}
            if changed:
                raise ValueError("--resume with other settings than the run's: " + "; ".join(
                    f"{k} was {a!r}, given {b!r}" for k, (a, b) in changed.items()))
            net_cfg = NetConfig(**payload["net_config"])
        elif cfg.init:
            init = load_payload(cfg.init)
            net_cfg = NetConfig(**{**init["net_config"], "backend": net_cfg.backend})
        for name in existing if not cfg.resume else ():
            (out / name).unlink()
        return _train(cfg, net_cfg, out, payload, None if cfg.resume or not cfg.init else init)


def _train(cfg, net_cfg, out, payload, init) -> dict:
    net = build(net_cfg) if payload is None and init is None else CorrespondenceNet(net_cfg)
    if init is not None:
        net.load_state_dict(init["model"])
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    steps_per_round = math.ceil(cfg.unlabelled * cfg.self_epochs / cfg.batch_size) if cfg.self_rounds else 0
    total = cfg.warm_steps + cfg.self_rounds * steps_per_round
    b = registration.body(net.cfg.template)
    t = template(net.cfg.template)
    fitted = torch.zeros(cfg.unlabelled, dtype=torch.int64)  # rounds each unlabelled scan was fitted for
    params = [None] * cfg.unlabelled
    step, seconds_before = 0, 0.0
    if payload is not None:
        net.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        step, seconds_before = payload["step"], payload.get("seconds", 0.0)
        loop = payload.get("loop")
        if loop is not None:
            fitted = loop["fitted"]
            params = [registration.BodyParams(ph, r, tr) if f > 0 else None
                      for ph, r, tr, f in zip(loop["phenotype"], loop["rotations"], loop["translation"], fitted)]
        keep_csv_rows(out / "losses.csv", step)
        keep_csv_rows(out / "val.csv", step + 1)
    spec = ScanSpec(points=cfg.points)
    labelled = synthetic_scans("labelled", cfg.labelled, spec, progress=True) if cfg.warm_steps else (None, None)
    unlabelled = synthetic_scans("unlabelled", cfg.unlabelled, spec, labels=False, progress=True)[0] \
        if cfg.self_rounds else None
    val_points, val_truth = synthetic_scans("validation", cfg.val_scans, spec)
    start = time.perf_counter()
    clock = lambda: round(seconds_before + time.perf_counter() - start, 1)  # noqa: E731

    def save_checkpoint():
        loop = None
        if cfg.self_rounds:
            neutral = registration.BodyParams.neutral()
            rows = [p or neutral for p in params]
            loop = {"fitted": fitted, "phenotype": torch.stack([p.phenotype for p in rows]),
                    "rotations": torch.stack([p.rotations for p in rows]),
                    "translation": torch.stack([p.translation for p in rows])}
        save(out / "checkpoint.pt", {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                                     "net_config": asdict(net.cfg), "train_config": asdict(cfg), "step": step,
                                     "seconds": clock(), "loop": loop})

    def validate():
        if not cfg.val_scans:
            return None
        net.eval()
        row = {"step": step, "seconds": clock(), **summarise_errors(
            [correspondence_errors(net, p, tr) for p, tr in zip(val_points, val_truth)])}
        net.train()
        append_csv_row(out / "val.csv", row)
        bar.write(f"step {step}: validation within 5 cm {row['within_5cm']:.1%}, within 10 cm "
                  f"{row['within_10cm']:.1%}, part accuracy {row['part_accuracy']:.1%}, "
                  f"median {row['median_cm']:.2f} cm")
        return row

    def refit(round_: int):
        """Fit every unlabelled scan not yet fitted for this round (resumable: checkpoints every 16)."""
        todo = [i for i in range(cfg.unlabelled) if fitted[i] <= round_]
        if not todo:
            return
        net.eval()
        for n, i in enumerate(tqdm(todo, desc=f"fit round {round_ + 1}", unit="scan", leave=False)):
            params[i] = fit_scan(net, unlabelled[i], cfg.fit_iterations, params[i]).params
            fitted[i] = round_ + 1
            if (n + 1) % 16 == 0:
                save_checkpoint()
        net.train()
        save_checkpoint()

    net.train()
    bar = tqdm(total=total, initial=step, desc="train correspondence", unit="step")
    # a run resumed at step 0 (stopped inside its first round of fits) logged this row before its checkpoint
    last_val = validate() if step == 0 and payload is None else None
    last = min(total, step + cfg.stop_after) if cfg.stop_after else total
    while step < last:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        turn = (torch.rand(cfg.batch_size, generator=gen) * 2 - 1) * YAW_DEG
        if step < cfg.warm_steps:
            kind, lr, used = "warm", _lr(step, cfg.warm_steps, cfg.lr), 1.0
            idx = [_order(cfg.seed, cfg.labelled, step * cfg.batch_size + j, 0) for j in range(cfg.batch_size)]
            x = yaw(torch.from_numpy(labelled[0][idx]), turn)
            keys = t.key_of_full[torch.from_numpy(labelled[1][idx])]
            loss = net.info_nce(net.scan_features(x, gen), keys)
        else:
            s = step - cfg.warm_steps
            round_ = s // steps_per_round
            refit(round_)
            kind, lr, used = "self", _lr(s, total - cfg.warm_steps, cfg.self_lr), 1.0
            idx = [_order(cfg.seed, cfg.unlabelled, s * cfg.batch_size + j, 1) for j in range(cfg.batch_size)]
            x = torch.from_numpy(unlabelled[idx])
            if cfg.self_target == "fit":
                keys, used = fit_labels(b, t, [params[i] for i in idx], x, cfg.fit_label_cm)
                f = net.scan_features(yaw(x, turn), gen)
                loss = net.info_nce(f[keys >= 0][None], keys[keys >= 0][None])
            else:
                with torch.no_grad():
                    posed = torch.stack([b.vertices(params[i]) for i in idx])  # (B, V, 3) fitted bodies
                posed, x = yaw(posed, turn), yaw(x, turn)  # the same turn: the loop's targets move with the scan
                landed = net.transfer(net.scan_features(x, gen), posed)
                loss = ((landed - x) ** 2).sum(-1).mean() * registration.CM2
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step} ({kind} step)")
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        append_csv_row(out / "losses.csv", {"step": step, "kind": kind, "lr": lr, "loss": loss.item(),
                                         "tau": 1 / net.scale().item(), "seconds": clock()})
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", kind=kind, points_used=f"{used:.0%}")
        if step % cfg.val_every == 0 or step == total:
            last_val = validate()
        if step % cfg.checkpoint_every == 0 or step == last:
            save_checkpoint()
    bar.close()
    print(f"trained to step {step} of {total} in {clock():.0f} s (this run's clock); "
          f"checkpoint {out / 'checkpoint.pt'}")
    return {"step": step, "out": out, "validation": last_val}


def export_weights(src, dst, **notes) -> Path:
    """The weights-only form of a training checkpoint (what ships in mapconnet/pretrained)."""
    payload = load_payload(src)
    keep = {k: payload[k] for k in ("model", "net_config", "train_config", "step", "seconds") if k in payload}
    return save(dst, {**keep, **notes})
