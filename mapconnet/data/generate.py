"""Generate a pose-transfer dataset from the anny body model (or the procedural quadruped).

    python -m mapconnet.data.generate --out data/demo --identities 8 --poses 32 \\
        --test-identities 4 --test-poses 8 --seed 0 --resolution lite --test-pairs 64 --preview

Writes DIR/vertices.npy ((I + TI, P + TP, V, 3) float32, memory-mappable; identities and poses in
manifest order: training first, then test), DIR/faces.npy ((F, 3) int64) and DIR/manifest.json
(anny and generator versions, seed, phenotypes, pose parameters, splits, test lists, checksums,
rejection counts, timings), and DIR/preview.png with --preview. Everything is written into
DIR.partial-<pid> and renamed when complete, so an interrupted run leaves no half dataset (the
next run removes the partial folder of a dead process and starts again). Running again with the
same data arguments on a finished folder does nothing; other arguments need --overwrite.
The same seed and arguments give byte-identical vertices (on the same machine and torch build).

Sizes: `--preset demo` (the command above; a couple of minutes on 2 cores), `--preset published`
(16 x 400 train, 14 identities x 200 poses test, 400 test pairs: the published SMPL shape) and
`--preset large` (30 x 800). Explicit size flags override the preset.

Animals (`--species quadruped`, docs/DESIGN.md "Animal mode"): the same folder layout from
`mapconnet.data.quadruped`, identities drawn in turn from the families of `--family` (default all:
cat, dog, horse, cow, hippo), at the template's own resolution `smal` (3,889 vertices). The
presets are species-aware: with `--species quadruped`, `--preset published` is the published SMAL
shape (29 x 400 train, 12 identities x 200 poses test, 400 test pairs), `demo` is 10 x 32 and
5 x 8, `large` 60 x 800 and 12 x 200. Every quadruped pose is checked for self-intersection
(bone capsules) on every identity of the set, so --collision-identities applies to humans only.

    python -m mapconnet.data.generate --species quadruped --preset published --out data/published-animal
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mapconnet.cli import at_least, check_ranges, one_of, parse_dataclass, run_command
from mapconnet.files import folder_lock, sha256, write_text

from . import anny_body, quadruped
from .resolution import RESOLUTIONS, apply_map, resolution_map

GENERATOR_VERSION = "2"  # bump whenever the same arguments would give different data
POSE_CHUNK = 32  # meshes per anny forward


PRESETS = {
    # name: (identities, poses, test identities, test poses, test pairs)
    "demo": (8, 32, 4, 8, 64),  # CPU demo and smoke tests (a couple of minutes on 2 cores)
    "published": (16, 400, 14, 200, 400),  # the shape of the published SMPL set
    "large": (30, 800, 14, 200, 400),
}
ANIMAL_PRESETS = {  # the same names for --species quadruped
    "demo": (10, 32, 5, 8, 64),  # two of each family for training, one for test
    "published": (29, 400, 12, 200, 400),  # the shape of the published SMAL set
    "large": (60, 800, 12, 200, 400),
}
SIZE_FLAGS = ("identities", "poses", "test_identities", "test_poses", "test_pairs")
DEFAULTS = (8, 32, 4, 8, 400)
# Arguments that change the data; a finished folder made with the same ones is reused.
DATA_ARGUMENTS = SIZE_FLAGS + ("seed", "resolution", "collision_identities", "species", "family")
# Values of data arguments added later, for manifests written before them (human data, all families).
LEGACY_ARGUMENTS = {"species": "human", "family": quadruped.FAMILY_ALL}
DEFAULT_RESOLUTION = {"human": "smpl", "quadruped": quadruped.RESOLUTION}
DATASET_FILES = ("vertices.npy", "faces.npy", "manifest.json", "preview.png")  # all a dataset folder holds


@dataclass
class GenerateConfig:
    """What `python -m mapconnet.data.generate` accepts. Sizes left at None come from --preset, else DEFAULTS."""
    out: str = field(metadata={"help": "dataset folder to create"})
    preset: str | None = field(default=None, metadata={"help": f"sizes of a standard set, one of {sorted(PRESETS)} "
                                                                 "(explicit size options win; animal sizes with "
                                                                 "--species quadruped)"})
    identities: int | None = field(default=None, metadata={"help": f"training identities (else {DEFAULTS[0]})"})
    poses: int | None = field(default=None, metadata={"help": f"training poses (else {DEFAULTS[1]})"})
    test_identities: int | None = field(default=None, metadata={"help": f"unseen test identities (else {DEFAULTS[2]})"})
    test_poses: int | None = field(default=None, metadata={"help": f"unseen test poses (else {DEFAULTS[3]})"})
    test_pairs: int | None = field(default=None, metadata={"help": f"triplets in each test list (else {DEFAULTS[4]})"})
    seed: int = 0
    species: str = field(default="human", metadata={
        "help": f"body model, one of {list(quadruped.SPECIES)}: anny people or the procedural quadruped"})
    family: str = field(default=quadruped.FAMILY_ALL, metadata={
        "help": f"quadruped families drawn in turn: {quadruped.FAMILY_ALL!r} or a comma-separated subset of "
                f"{list(quadruped.FAMILIES)}"})
    resolution: str | None = field(default=None, metadata={
        "help": "vertex count of every mesh: humans lite 1,723; smpl 6,890 (default); full 13,348; x4 ~53k; "
                "x16 ~213k; quadrupeds smal 3,889 (their only one)"})
    collision_identities: int = field(default=3, metadata={
        "help": "a pose is kept only if collision-free on this many of the heaviest training identities (humans; "
                "an animal pose is checked on every identity)"})
    preview: bool = field(default=False, metadata={"help": "render a grid of sampled bodies to DIR/preview.png"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace an existing dataset folder of this generator (never a folder with other files)"})

    def __post_init__(self):
        quadruped.check_species(self.species)
        animal = self.species == "quadruped"
        if self.resolution is None:
            self.resolution = DEFAULT_RESOLUTION[self.species]
        if animal and self.resolution != quadruped.RESOLUTION:
            raise ValueError(f"--resolution for --species quadruped must be {quadruped.RESOLUTION!r} (the template's "
                             f"own {quadruped.NUM_VERTICES:,} vertices), got {self.resolution!r}; "
                             f"{sorted(RESOLUTIONS)} are resolutions of the human model")
        if not animal:
            check_ranges(self, {"resolution": one_of(RESOLUTIONS)})
            if self.family != quadruped.FAMILY_ALL:
                raise ValueError(f"--family {self.family!r} applies to --species quadruped only")
        quadruped.family_names(self.family)
        presets = ANIMAL_PRESETS if animal else PRESETS
        check_ranges(self, {"preset": one_of([None, *presets])})
        for name, default in zip(SIZE_FLAGS, presets[self.preset] if self.preset else DEFAULTS):
            if getattr(self, name) is None:
                setattr(self, name, default)
        check_ranges(self, {name: at_least(1) for name in SIZE_FLAGS + ("collision_identities",)})
        if self.test_identities < 2 or self.test_poses < 2:
            raise ValueError("--test-identities and --test-poses must be >= 2 (a test triplet needs two of each)")
        if self.poses < 2:
            raise ValueError("--poses must be >= 2 (a training pair needs two poses)")


def parse_args(argv: list[str] | None = None) -> GenerateConfig:
    """Parse the command line (no side effects; bad values raise ValueError naming the option)."""
    return parse_dataclass(GenerateConfig, argv, description=__doc__)


def _collides(detector, vertices: np.ndarray) -> bool:
    """Whether one (V, 3) full-resolution mesh intersects itself (anny's triangle-triangle test)."""
    return bool((detector.detect_self_intersections(torch.from_numpy(vertices)) >= 0).any())


def sample_poses(model, sampler, count, rng, check_phenotypes, detector) -> tuple[np.ndarray, int]:
    """Sample `count` poses, each collision-free on every check phenotype.

    Args: model (anny), sampler (anny_body.PoseSampler), rng, check_phenotypes (K, 6) float32,
    detector (anny SelfInterpenetrationModule). Returns ((count, 104, 4, 4) float32 poses, rejected).
    """
    kept, rejected = [], 0
    with tqdm(total=count, desc="sampling poses", unit="pose") as bar:
        while len(kept) < count:
            pose = sampler.sample(rng)
            meshes = anny_body.posed_vertices(model, check_phenotypes, pose[None].repeat(len(check_phenotypes), 0))
            if any(_collides(detector, m) for m in meshes):
                rejected += 1
                continue
            kept.append(pose)
            bar.update(1)
    return np.stack(kept), rejected


def test_lists(rng, train_ids, test_ids, test_poses, pairs) -> dict[str, list[list[int]]]:
    """[identity, identity_pose, pose_identity, pose] quadruples; ground truth (identity, pose).

    unseen: identities and poses both from the test split; seen: training identities in test poses.
    The identity and pose meshes show different people in different poses.
    """
    def draw(ids):
        a, b = rng.choice(ids, 2, replace=False) if len(ids) > 1 else (ids[0], ids[0])
        p, q = rng.choice(test_poses, 2, replace=False)
        return [int(a), int(p), int(b), int(q)]

    return {"unseen": [draw(test_ids) for _ in range(pairs)], "seen": [draw(train_ids) for _ in range(pairs)]}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(out: Path) -> None:
    """Remove DIR.partial-<pid> folders of runs that were interrupted (their process is gone)."""
    for stale in out.parent.glob(f"{out.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _existing(out: Path, args: GenerateConfig) -> bool:
    """True when `out` is a finished dataset made by this generator with the same data arguments.

    False when it is a dataset of this generator with other arguments and --overwrite is given.
    Raises FileExistsError when it holds anything else (a folder that is not such a dataset, or one
    with files the generator did not write, is never replaced) or --overwrite is not given.
    """
    manifest_path = out / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        old = manifest["arguments"]
        old = {**LEGACY_ARGUMENTS, **old}
        same = manifest["generator_version"] == GENERATOR_VERSION and all(
            old.get(k) == getattr(args, k) for k in DATA_ARGUMENTS)
    except (OSError, ValueError, KeyError, TypeError):
        same, old = False, None
    if same and not args.overwrite and (out / "vertices.npy").is_file() and (out / "faces.npy").is_file():
        return True
    if old is None:
        raise FileExistsError(f"{out} exists and is not a dataset this generator wrote ({manifest_path} missing or "
                              "unreadable); it is left alone: choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in DATASET_FILES)
    if foreign:
        raise FileExistsError(f"dataset folder {out} also holds files the generator did not write ({foreign[:5]}); "
                              "it is left alone: move them away or choose another --out")
    if args.overwrite:
        return False
    diff = {k: (old.get(k), getattr(args, k)) for k in DATA_ARGUMENTS if old.get(k) != getattr(args, k)}
    raise FileExistsError(f"dataset folder {out} already exists and was made with different arguments (old, new): "
                          f"{diff or 'generator version changed'}; pass --overwrite to replace it")


def _preview(out_png: Path, vertices: np.ndarray, faces: np.ndarray, resolution: str, template_faces,
             labels: list[str] | None = None) -> None:
    from .preview import render_animal_preview, render_preview

    if resolution == quadruped.RESOLUTION:
        render_animal_preview(vertices, faces, out_png, labels=labels)
        return
    if resolution in ("x4", "x16"):
        # Subdivision keeps the template's vertices first and unchanged: draw those with the
        # template's faces (matplotlib cannot draw 400k triangles per panel in reasonable time).
        vertices, faces = vertices[:, :, : int(template_faces.max()) + 1], template_faces
    render_preview(vertices, faces, out_png)


def main(argv: list[str] | None = None) -> Path:
    """Generate (or reuse) a dataset as described in the module docstring; returns its folder.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).
    Returns:
        the dataset folder (pathlib.Path). If it already holds a finished dataset made with the
        same data arguments, nothing is regenerated (a missing preview is rendered if asked).
    Raises:
        FileExistsError: the folder exists with other content and --overwrite was not given.
    """
    args = parse_args(argv)
    out = Path(args.out)
    with folder_lock(out, "generator", lock=out.parent / f".{out.name}.lock"):
        return _generate_into(out, args)


def _generate_into(out: Path, args: GenerateConfig) -> Path:
    if out.exists() and _existing(out, args):
        if args.preview and not (out / "preview.png").is_file():
            from .datasets import open_dataset

            ds = open_dataset(out)
            template_faces = ds.faces if args.species == "quadruped" else anny_body.load_model().faces.numpy()
            _preview(out / "preview.png", ds.vertices, ds.faces, args.resolution, template_faces,
                     ds.manifest.get("families"))
        print(f"{out} already holds this dataset (same arguments); nothing to do")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    work = out.parent / f"{out.name}.partial-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    try:
        manifest = _generate(args, work)
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # restart cleanly next time
        raise
    r = manifest["rejections"]
    print(f"wrote {out}: {manifest['num_identities']} identities x {manifest['num_poses']} poses x "
          f"{manifest['num_vertices']} vertices in {manifest['seconds']['total']} s; pose rejection "
          f"rate {r['pose_rejection_rate']:.1%} ({r['poses_collision']} of "
          f"{r['poses_collision'] + manifest['num_poses']})"
          + (f"; identity (BMI) rejections {r['identities_bmi']}" if "identities_bmi" in r else ""))
    return out


def _generate(args: GenerateConfig, work: Path) -> dict:
    """Write vertices.npy, faces.npy, manifest.json (and preview.png) into `work`; return the manifest."""
    if args.species == "quadruped":
        return _generate_quadruped(args, work)
    timings = {}
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)

    model = anny_body.load_model()
    from anny.utils.collision import SelfInterpenetrationModule

    detector = SelfInterpenetrationModule(model)
    n_ids, n_poses = args.identities + args.test_identities, args.poses + args.test_poses
    phenotypes, id_rejected = anny_body.sample_identities(model, n_ids, rng)
    # Weight drives the volume of soft tissue, hence contacts (arms against a belly, thighs).
    heaviest = np.argsort(-phenotypes[: args.identities, 3], kind="stable")[: args.collision_identities]
    sampler = anny_body.PoseSampler(model)
    t = time.perf_counter()
    poses, pose_rejected = sample_poses(model, sampler, n_poses, rng, phenotypes[heaviest], detector)
    timings["sampling_poses"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    neutral = np.full((1, len(anny_body.PHENOTYPES)), 0.5, dtype=np.float32)
    rest = anny_body.posed_vertices(model, neutral, np.eye(4, dtype=np.float32)[None, None].repeat(104, 1))
    tag = f"anny{anny_body.anny_version()}-{anny_body.TOPOLOGY}"
    template_faces = model.faces.numpy().astype(np.int64)
    W, faces = resolution_map(args.resolution, rest[0].astype(np.float64), template_faces, tag)
    V = W.shape[0] if W is not None else rest.shape[1]
    timings["resolution_map"] = round(time.perf_counter() - t, 2)

    def meshes_of(i):
        for p0 in range(0, n_poses, POSE_CHUNK):
            chunk = poses[p0:p0 + POSE_CHUNK]
            yield p0, apply_map(W, anny_body.posed_vertices(model, phenotypes[i:i + 1], chunk))  # (B, V, 3)

    vertices = _write_meshes(work, args, (n_ids, n_poses, V), faces, meshes_of, timings)
    body = {
        "anny_version": anny_body.anny_version(), "topology": anny_body.TOPOLOGY,
        "phenotype_labels": list(anny_body.PHENOTYPES), "phenotypes": phenotypes.tolist(),
        "pose_bones": list(model.bone_labels),
        "pose_parameters_note": "rotation part (3x3, local-ref, rounded to 1e-6) of each pose's 104 bone transforms",
        "pose_parameters": poses[:, :, :3, :3].round(6).tolist(),
        "collision_identities": [int(i) for i in heaviest]}
    preview = lambda path: _preview(path, vertices, faces, args.resolution, template_faces)  # noqa: E731
    return _finish(work, args, rng, vertices, body, {"identities_bmi": id_rejected}, pose_rejected, preview,
                   timings, start)


def _write_meshes(work: Path, args: GenerateConfig, shape: tuple[int, int, int], faces: np.ndarray, meshes_of,
                  timings: dict) -> np.ndarray:
    """Write vertices.npy ((I, P, V, 3) float32, memory-mapped) and faces.npy; `meshes_of(i)` yields
    (first pose, (B, V, 3) meshes) chunks of identity i in pose order. Returns the memory map."""
    t = time.perf_counter()
    n_ids, n_poses, V = shape
    vertices = np.lib.format.open_memmap(work / "vertices.npy", mode="w+", dtype=np.float32,
                                         shape=(n_ids, n_poses, V, 3))
    with tqdm(total=n_ids * n_poses, desc=f"meshes ({args.resolution}, {V} vertices)", unit="mesh") as bar:
        for i in range(n_ids):
            for p0, chunk in meshes_of(i):
                vertices[i, p0:p0 + len(chunk)] = chunk
                bar.update(len(chunk))
    vertices.flush()
    np.save(work / "faces.npy", faces.astype(np.int64))
    timings["meshes"] = round(time.perf_counter() - t, 2)
    return vertices


def _finish(work: Path, args: GenerateConfig, rng, vertices: np.ndarray, body: dict, rejections: dict,
            pose_rejected: int, preview, timings: dict, start: float) -> dict:
    """Write manifest.json (the splits, test lists, checksums and timings every dataset has, plus
    the body model's own entries `body`) and, with --preview, preview.png (`preview(path)`)."""
    n_ids, n_poses, V = vertices.shape[:3]
    train_ids, test_ids = list(range(args.identities)), list(range(args.identities, n_ids))
    train_poses, test_poses = list(range(args.poses)), list(range(args.poses, n_poses))
    manifest = {
        "generator_version": GENERATOR_VERSION, "species": args.species, "resolution": args.resolution,
        "num_vertices": int(V), "num_faces": int(len(np.load(work / "faces.npy", mmap_mode="r"))),
        "num_identities": n_ids, "num_poses": n_poses, "seed": args.seed,
        "arguments": {k: v for k, v in asdict(args).items() if k not in ("out", "overwrite")},
        **body,
        "train_identities": train_ids, "test_identities": test_ids,
        "train_poses": train_poses, "test_poses": test_poses,
        "test_lists": test_lists(rng, train_ids, test_ids, test_poses, args.test_pairs),
        "rejections": {**rejections, "poses_collision": pose_rejected,
                       "pose_rejection_rate": pose_rejected / (pose_rejected + n_poses)},
        "sha256": {name: sha256(work / name) for name in ("vertices.npy", "faces.npy")},
    }
    if args.preview:
        t = time.perf_counter()
        preview(work / "preview.png")
        timings["preview"] = round(time.perf_counter() - t, 2)
    timings["total"] = round(time.perf_counter() - start, 2)
    manifest["seconds"] = timings
    write_text(work / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest



ANIMAL_POSE_BATCH = 64  # candidate poses tested together (the kept sequence does not depend on it)


def sample_animal_poses(model, sampler, count: int, rng, shapes: np.ndarray) -> tuple[np.ndarray, int]:
    """`count` quadruped poses, each free of self-intersection on every identity of `shapes` (I, K).

    Returns ((count, J, 3) float64 angles in degrees, number rejected)."""
    kept, rejected = [], 0
    with tqdm(total=count, desc="sampling poses", unit="pose") as bar:
        while len(kept) < count:
            candidates = np.stack([sampler.sample(rng) for _ in range(ANIMAL_POSE_BATCH)])
            collides = model.collisions(shapes, candidates).any(0)  # (batch,)
            for pose, bad in zip(candidates, collides):
                if len(kept) == count:
                    break
                if bad:
                    rejected += 1
                else:
                    kept.append(pose)
                    bar.update(1)
    return np.stack(kept), rejected


def _generate_quadruped(args: GenerateConfig, work: Path) -> dict:
    """The quadruped counterpart of `_generate` (same files and manifest keys where they apply)."""
    timings = {}
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    model = quadruped.load_model()
    timings["template"] = round(time.perf_counter() - t, 2)

    names = quadruped.family_names(args.family)
    # families in turn within each split, so training and test both cover every family
    families = [names[i % len(names)] for i in range(args.identities)] + \
        [names[i % len(names)] for i in range(args.test_identities)]
    shapes = quadruped.sample_identities(families, rng)
    n_ids, n_poses = len(shapes), args.poses + args.test_poses
    t = time.perf_counter()
    poses, pose_rejected = sample_animal_poses(model, quadruped.PoseSampler(), n_poses, rng, shapes)
    timings["sampling_poses"] = round(time.perf_counter() - t, 2)

    V, faces = model.num_vertices, model.faces
    vertices = _write_meshes(work, args, (n_ids, n_poses, V), faces,
                             lambda i: [(0, model.posed_vertices(shapes[i:i + 1], poses)[0])], timings)

    body = {
        "quadruped_version": quadruped.MODEL_VERSION,
        "shape_labels": list(quadruped.SHAPE_LABELS), "shapes": shapes.round(6).tolist(), "families": families,
        "pose_joints": list(quadruped.JOINTS),
        "pose_parameters_note": "per joint (pitch about X, roll about Y, yaw about Z) in degrees, R = Rz Ry Rx in "
                                "the joint's world-aligned rest frame (mapconnet.data.quadruped), rounded to 1e-4",
        "pose_parameters": poses.round(4).tolist()}
    preview = lambda path: _preview(path, vertices, faces, args.resolution, faces, families)  # noqa: E731
    return _finish(work, args, rng, vertices, body, {}, pose_rejected, preview, timings, start)


if __name__ == "__main__":
    run_command(main)
