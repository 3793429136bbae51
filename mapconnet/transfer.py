"""Re-pose any identity mesh into the pose of any pose mesh with a trained checkpoint.

    python -m mapconnet.transfer --pose POSE.obj --identity ID.obj --checkpoint C --out OUT.ply
    mapconnet-transfer --pose frames/ --identity ID.ply --checkpoint C --out out_frames/

The meshes may have different vertex counts and orders (obj/ply/off/glb, read with trimesh
without re-processing, so vertex order is kept). The output keeps the identity mesh's faces and
vertex order.

Normalisation (how the model was trained): the training meshes of both species lie in one frame,
metres, Z up, front toward -Y, left toward +X, bounding-box centred. Each input is rotated to Z up
if it is Y-up (detected, or --up), converted to metres, centred on its bounding-box centre and, if
its size lies outside the training sizes, scaled uniformly into them; each change is printed as a
note. The output is mapped back with the identity mesh's own frame, so it lies where the identity
mesh lies. What a body's up axis and size are depends on the species the checkpoint was trained
on (its train_config; --species overrides):

- human (anny bodies): Y-up when the extent along Y exceeds 1.5x that along Z (a standing body is
  far taller than it is deep); the size is the height (the extent along the up axis), read in m,
  cm or mm, and scaled into TRAIN_HEIGHT_RANGE (adult heights).
- quadruped (`mapconnet.data.quadruped` animals, toy-like in scale as SMAL's are: a cat as large
  as a small horse): the up axis is not detected, since a sitting or galloping animal may be
  taller than it is long (one sampled training animal in eight is); "auto" takes a mesh as Z-up
  and says so, and --up y turns a Y-up file (glTF: head toward +Z) into the training frame. The
  size is the bounding-box diagonal (the measure that changes least with the pose), read in m, cm
  or mm, and scaled into TRAIN_ANIMAL_SIZE_RANGE. A mesh far from the training animals'
  proportions in that frame (a person standing in a rest pose, an animal facing along X) gets a
  note that the output means nothing; the species of a mesh cannot be told reliably from its
  box, so that note is a hint only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mapconnet import checkpoint as ckpt
from mapconnet.checkpoint import load_model
from mapconnet.cli import check_backend, check_device, parse_dataclass, run_command
from mapconnet.data.quadruped import SPECIES, check_species
from mapconnet.losses import centred
from mapconnet.meshio import MESH_SUFFIXES, load_mesh, save_mesh
from mapconnet.resources import available_memory

# Heights of the default anny training identities (about 1.51-1.98 m, docs/DESIGN.md section 7).
TRAIN_HEIGHT_RANGE = (1.5, 2.0)
# Per-vertex activation bytes of one forward (decoder widths 1024/512/256 and the encoder, fp32,
# with a safety factor): what a mesh needs on top of the correspondence itself.
BYTES_PER_VERTEX = 64 * 1024
DENSE_BUFFERS = 4  # dense torch keeps scores, probabilities and two temporaries of size N_I x N_P


# A standing body's height in metres lies in this range; a height 100x or 1000x larger is read
# as centimetres or millimetres.
METRE_HEIGHTS = (0.3, 3.0)
UNITS = ((1.0, "metres"), (0.01, "centimetres"), (0.001, "millimetres"))
MIN_VERTICES = 100  # anny's coarsest body has 1,723; fewer is not a body
# Y-up files (glTF, many DCC tools) are rotated to Z up: (x, y, z) -> (x, -z, y).
UP_ROTATIONS = {"z": np.eye(3), "y": np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])}


def check_up(up: str) -> None:
    """Refuse an --up value other than auto, z or y."""
    if up not in ("auto", *UP_ROTATIONS):
        raise ValueError(f"--up must be auto, z or y, got {up!r}")


def up_rotation(extent: np.ndarray, up: str, name: str) -> tuple[np.ndarray, str | None]:
    """The rotation (3, 3) that makes a body with axis extents `extent` (3,) Z-up, and a note when
    "auto" found it Y-up (taller along Y than along Z by 1.5x), else None."""
    check_up(up)
    if up == "auto":
        up = "y" if extent[1] > 1.5 * extent[2] else "z"
        if up == "y":
            return UP_ROTATIONS["y"], (f"{name} looks Y-up (extent {extent[1]:.3g} along Y, {extent[2]:.3g} "
                                       "along Z): rotated to Z-up")
    return UP_ROTATIONS[up], None


# Quadrupeds (mapconnet.data.quadruped). Their size is the bounding-box diagonal: of the simple
# measures it changes least with the pose (at most 1.35x over one animal's sampled poses, against
# 1.5x for the largest extent and 2-3.6x for the length or the height) and needs no up axis.
# The training animals' diagonals, rounded outward: every family, the generator's identity and
# pose samplers, collision-free poses; six samples of ~7,000 meshes each gave 1.27-3.84 m (the
# sampled extremes move by a few percent between samples). The test
# test_animal_training_frame_is_the_quadruped_models samples them again from the model.
TRAIN_ANIMAL_SIZE_RANGE = (1.2, 4.0)
# A real animal's diagonal in metres, a small cat (~0.7 m) to a horse (~3 m) and the largest
# training animals; one 100x or 1000x larger is read as centimetres or millimetres (the three
# ranges do not overlap).
METRE_ANIMAL_SIZES = (0.5, 5.0)
# Proportions of the same training animals in the training frame (extents along X, Y and Z:
# width, length, height; sampled 0.115-0.920 and 0.239-2.260), rounded outward. An input beyond
# them by PROPORTION_MARGIN either way gets a note: a standing human, Z up, is much wider than it
# is deep, and much taller.
TRAIN_ANIMAL_WIDTH_PER_LENGTH = (0.11, 0.95)
TRAIN_ANIMAL_HEIGHT_PER_LENGTH = (0.22, 2.4)
PROPORTION_MARGIN = 1.5
# Why "auto" does not detect an animal's up axis: sitting, head-raised and galloping poses make
# about one sampled training animal in eight (Z up) taller than it is long, some 2.3x, and others
# 4x longer than tall; neither the extents nor the centroid's side of the box tell Y from Z.
ANIMAL_UP_NOTE = ("an animal's up axis is not detected (a sitting or galloping animal may be taller than it is "
                  "long, so its extents cannot tell): the meshes are taken as Z-up, the training frame; pass "
                  "--up y for Y-up files (glTF and most modelling tools), --up z to silence this")


def animal_up_rotation(up: str) -> tuple[np.ndarray, str | None]:
    """The rotation (3, 3) that makes an animal Z-up, and ANIMAL_UP_NOTE when `up` is "auto"
    (taken as Z-up), else None."""
    check_up(up)
    return (UP_ROTATIONS["z"], ANIMAL_UP_NOTE) if up == "auto" else (UP_ROTATIONS[up], None)


def animal_proportions_note(extent: np.ndarray, name: str) -> str | None:
    """A note when a mesh with training-frame extents `extent` (3,) (width along X, length along
    Y, height along Z, any unit) is far from the training animals' proportions, else None."""
    width, length, height = extent
    out_of = lambda v, r: not r[0] / PROPORTION_MARGIN <= v <= r[1] * PROPORTION_MARGIN  # noqa: E731
    if out_of(width / length, TRAIN_ANIMAL_WIDTH_PER_LENGTH) or \
            out_of(height / length, TRAIN_ANIMAL_HEIGHT_PER_LENGTH):
        return (f"{name} does not have a quadruped's proportions in the training frame (width/length "
                f"{width / length:.2f}, height/length {height / length:.2f}; the training animals' are "
                f"{TRAIN_ANIMAL_WIDTH_PER_LENGTH[0]}-{TRAIN_ANIMAL_WIDTH_PER_LENGTH[1]} and "
                f"{TRAIN_ANIMAL_HEIGHT_PER_LENGTH[0]}-{TRAIN_ANIMAL_HEIGHT_PER_LENGTH[1]}): this checkpoint was "
                "trained on quadrupeds, Z up (--up y for a Y-up file), left to right along X, head toward -Y; "
                "for a human, or an animal facing along X, its output means nothing")
    return None


@dataclass
class Frame:
    """How a mesh was put into the training frame: model = ((v - centre) @ rotation.T) * scale."""
    centre: np.ndarray  # (3,) bounding-box centre in file coordinates
    rotation: np.ndarray  # (3, 3) file axes -> Z-up axes
    scale: float

    def back(self, model_vertices: np.ndarray) -> np.ndarray:
        """(V, 3) training-frame vertices -> the file's frame."""
        return (model_vertices / self.scale) @ self.rotation + self.centre


def normalise(vertices: np.ndarray, up: str = "auto", name: str = "mesh",
              species: str = "human") -> tuple[np.ndarray, Frame, list[str]]:
    """Put a (V, 3) body of `species` into its training frame: Z up, metres, bounding-box centred,
    size in the training sizes (module docstring).

    up: "z", "y", or "auto". human: "auto" is Y when the extent along Y exceeds 1.5x the extent
    along Z (a standing body is far taller than it is deep, and X is left-right in both
    conventions); the size is the height, scaled into TRAIN_HEIGHT_RANGE (a child, a giant).
    quadruped: "auto" is Z, with a note (`animal_up_rotation`); the size is the bounding-box
    diagonal, scaled into TRAIN_ANIMAL_SIZE_RANGE. The unit (metres, centimetres or millimetres) is
    read from the size. Returns (normalised (V, 3), Frame, notices: one line per change a user
    should know about, and for a quadruped one when the proportions are far from an animal's).
    Raises ValueError for a mesh that is not a body.
    """
    check_species(species)
    if len(vertices) < MIN_VERTICES:
        raise ValueError(f"{name} has {len(vertices)} vertices; a body mesh needs at least {MIN_VERTICES} "
                         "(anny's coarsest has 1,723)")
    check_up(up)
    extent = np.ptp(vertices, axis=0)
    if (extent <= 0).any():
        raise ValueError(f"{name} is flat (extents {np.round(extent, 4).tolist()}); expected a 3-D body")
    animal = species == "quadruped"
    if animal:
        rotation, note = animal_up_rotation(up)
        notices = [note] if note else []
        size, what = float(np.linalg.norm(extent)), "across (bounding-box diagonal)"
        metre_range, (lo, hi), sizes = METRE_ANIMAL_SIZES, TRAIN_ANIMAL_SIZE_RANGE, "the training animals' sizes"
    else:
        rotation, note = up_rotation(extent, up, name)
        notices = [f"{note} for the model and back for the output (--up z keeps it as it is)"] if note else []
        size, what = float(extent @ np.abs(rotation[2])), "tall"  # the extent along the up axis
        metre_range, (lo, hi), sizes = METRE_HEIGHTS, TRAIN_HEIGHT_RANGE, "the training heights"
    centre = (vertices.max(0) + vertices.min(0)) / 2
    unit = next(((f, u) for f, u in UNITS if metre_range[0] <= size * f <= metre_range[1]), None)
    if unit is None and animal:
        raise ValueError(f"{name} is {size:.4g} units {what}, which is no animal's size in metres, centimetres or "
                         f"millimetres ({metre_range[0]}-{metre_range[1]} m); expected a quadruped")
    if unit is None:
        raise ValueError(f"{name} is {size:.4g} units tall, which is no standing body's height in metres, "
                         "centimetres or millimetres; expected a body standing along the up axis (see --up)")
    factor, unit_name = unit
    metres = size * factor
    scale = factor * min(max(metres, lo), hi) / metres
    if factor != 1:
        notices.append(f"{name} is {size:.4g} units {what}: read as {unit_name} ({metres:.2f} m)")
    if not lo <= metres <= hi:
        notices.append(f"{name} is {metres:.2f} m {what}, outside {sizes} {lo}-{hi} m: scaled to "
                       f"{min(max(metres, lo), hi):.2f} m for the model, and the output back")
    if animal:
        mismatch = animal_proportions_note(np.abs(rotation) @ extent, name)
        notices += [mismatch] if mismatch else []
    return ((vertices - centre) @ rotation.T) * scale, Frame(centre, rotation, scale), notices


def check_fits(n_identity: int, n_pose: int, backend: str) -> None:
    """Raise if one forward pass would not fit in the available memory, saying what would fit."""
    available = available_memory()
    need = (n_identity + n_pose) * BYTES_PER_VERTEX
    if backend == "torch":
        need += DENSE_BUFFERS * 4 * n_identity * n_pose
    if need > available:
        if backend == "torch":
            fit = int(np.sqrt(available / (DENSE_BUFFERS * 4)))
            hint = f"the dense 'torch' backend fits about {fit:,} vertices per mesh; use backend 'chunked' or 'auto'"
        else:
            hint = f"about {int(available / BYTES_PER_VERTEX / 2):,} vertices per mesh fit"
        raise MemoryError(f"meshes of {n_identity:,} and {n_pose:,} vertices need about {need / 2**30:.1f} GiB "
                          f"with backend {backend!r} but {available / 2**30:.1f} GiB is available; {hint}")


def pose_files(path: Path) -> list[Path]:
    """One pose mesh, or every mesh file of a folder in name order (e.g. frames of a motion)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in MESH_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"pose folder {path} holds no mesh files ({', '.join(MESH_SUFFIXES)})")
        return files
    if not path.exists():
        raise FileNotFoundError(f"pose mesh {path} does not exist")
    return [path]


def transfer(model, identity_vertices: np.ndarray, pose_vertices: np.ndarray, device="cpu", up: str = "auto",
             species: str = "human"):
    """Re-pose one identity mesh (V_I, 3) into one pose mesh's pose (V_P, 3) with a model trained
    on bodies of `species` ("human" or "quadruped": how the inputs are normalised).

    Returns (output, warped, notices), output and warped (V_I, 3) in the identity mesh's frame and
    vertex order; notices: what `normalise` changed about either input.
    """
    ident, frame, notices = normalise(identity_vertices, up, "identity mesh", species)
    pose, _, pose_notices = normalise(pose_vertices, up, "pose mesh", species)
    as_batch = lambda v: torch.as_tensor(v, dtype=torch.float32, device=device)[None]  # noqa: E731
    with torch.no_grad():
        result = model(as_batch(ident), as_batch(pose))
    back = lambda t: frame.back(t[0].double().cpu().numpy())  # noqa: E731
    # bounding-box centred, like the inputs: the frame training and evaluation compare the output in
    return back(centred(result.output)), back(result.warped), notices + pose_notices


def trained_species(payload: dict) -> str:
    """The species a checkpoint's model was trained on: "human" or "quadruped".

    train.py records --species, which chooses the body model of --data stream; a run on a dataset
    folder keeps the default "human" there whatever the folder holds, so for such a run the
    folder's manifest says, when it can still be read from here. Checkpoints from before animal
    mode trained humans."""
    train = payload.get("train_config") or {}
    species = train.get("species", "human")
    data = train.get("data", "")
    if species == "human" and data and data != "stream":
        try:
            species = json.loads((Path(data) / "manifest.json").read_text()).get("species", "human")
        except (OSError, ValueError):  # the folder is elsewhere now: keep what was recorded
            pass
    return species


@dataclass
class TransferConfig:
    pose: str = field(metadata={"help": "pose mesh, or a folder of pose meshes (frames)"})
    identity: str = field(metadata={"help": "identity mesh to re-pose (a triangle mesh)"})
    out: str = field(metadata={"help": "output mesh (.ply/.obj), or a folder when --pose is a folder"})
    checkpoint: str = field(default="pretrained", metadata={
        "help": "checkpoint written by train.py, or a shipped name: pretrained (human), pretrained-animal"})
    warped: bool = field(default=False, metadata={"help": "also write the warped mesh (correspondence only)"})
    backend: str = field(default="auto", metadata={"help": "kernels backend: auto, torch, chunked, keops, triton"})
    device: str = "cpu"
    up: str = field(default="auto", metadata={
        "help": "the meshes' up axis: z, y, or auto (humans: Y when a mesh is much taller along Y than along Z; "
                "animals: not detected, taken as Z with a note, so give y for a Y-up animal)"})
    species: str = field(default="auto", metadata={
        "help": "the bodies' species, which decides how inputs are normalised: human, quadruped, or auto (the "
                "species the checkpoint was trained on)"})

    def __post_init__(self):
        if self.up not in ("auto", *UP_ROTATIONS):
            raise ValueError(f"--up must be auto, z or y, got {self.up!r}")
        if self.species not in ("auto", *SPECIES):
            raise ValueError(f"--species must be auto, {' or '.join(SPECIES)}, got {self.species!r}")
        check_device(self.device)
        check_backend(self.backend, self.device)


def main(argv: list[str] | None = None) -> list[Path]:
    """Parse `argv` into a TransferConfig and re-pose; returns the written paths."""
    args = parse_dataclass(TransferConfig, argv, description=__doc__)
    identity_vertices, identity_faces = load_mesh(args.identity, require_faces=True)
    poses = pose_files(Path(args.pose))
    model = load_model(args.checkpoint, device=args.device, backend=args.backend)
    model.eval()
    species = trained_species(ckpt.load(ckpt.resolve(args.checkpoint))) if args.species == "auto" else args.species
    out = Path(args.out)
    targets = [out / f"{p.stem}.ply" for p in poses] if Path(args.pose).is_dir() else [out]
    inputs = {Path(p).resolve() for p in (args.identity, *poses)}
    outputs = targets + [t.with_name(f"{t.stem}_warped{t.suffix}") for t in targets]
    clash = [t for t in outputs if t.resolve() in inputs]
    if clash:
        raise ValueError(f"--out {args.out} would overwrite the input {clash[0]}; choose an output path that is "
                         "neither the identity mesh nor a pose mesh")
    if Path(args.pose).is_dir():
        out.mkdir(parents=True, exist_ok=True)
    written, shown = [], set()
    for pose_path, target in tqdm(list(zip(poses, targets)), desc="transfer", unit="mesh", disable=len(poses) == 1):
        pose_vertices, _ = load_mesh(pose_path)
        check_fits(len(identity_vertices), len(pose_vertices), args.backend)
        output, warped, notices = transfer(model, identity_vertices, pose_vertices, args.device, args.up,
                                           species)
        for line in dict.fromkeys(notices):
            if line not in shown:
                tqdm.write(f"note: {line}")
                shown.add(line)
        written.append(save_mesh(target, output, identity_faces))
        if args.warped:
            written.append(save_mesh(target.with_name(f"{target.stem}_warped{target.suffix}"), warped, identity_faces))
    for path in written:
        print(path)
    return written


def cli(argv: list[str] | None = None) -> None:
    """The `mapconnet-transfer` command: `main` with one-line user errors (`--debug` for tracebacks)."""
    run_command(main, argv)


if __name__ == "__main__":
    cli()
