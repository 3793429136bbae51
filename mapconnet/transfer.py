"""Re-pose any identity mesh into the pose of any pose mesh with a trained checkpoint.

    python -m mapconnet.transfer --pose POSE.obj --identity ID.obj --checkpoint C --out OUT.ply
    mapconnet-transfer --pose frames/ --identity ID.ply --checkpoint C --out out_frames/

The meshes may have different vertex counts and orders (obj/ply/off/glb, read with trimesh
without re-processing, so vertex order is kept). The output keeps the identity mesh's faces and
vertex order.

Normalisation (how the model was trained): the training meshes are anny bodies in metres, Z up,
bounding-box centred, adult heights (bounding-box extent along Z) in TRAIN_HEIGHT_RANGE. Each
input is rotated to Z up if it is Y-up (detected, or --up), converted to metres (the unit is read
from its height: m, cm or mm), centred on its bounding-box centre and, if its height lies outside
that range (a child, a giant), scaled uniformly into it; each change is printed as a note. The
output is mapped back with the identity mesh's own frame, so it lies where the identity mesh lies.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mapconnet.checkpoint import load_model
from mapconnet.cli import check_backend, check_device, parse_dataclass, run_command
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


@dataclass
class Frame:
    """How a mesh was put into the training frame: model = ((v - centre) @ rotation.T) * scale."""
    centre: np.ndarray  # (3,) bounding-box centre in file coordinates
    rotation: np.ndarray  # (3, 3) file axes -> Z-up axes
    scale: float

    def back(self, model_vertices: np.ndarray) -> np.ndarray:
        """(V, 3) training-frame vertices -> the file's frame."""
        return (model_vertices / self.scale) @ self.rotation + self.centre


def normalise(vertices: np.ndarray, up: str = "auto", name: str = "mesh") -> tuple[np.ndarray, Frame, list[str]]:
    """Put a (V, 3) body into the training frame: Z up, metres, bounding-box centred, height in
    TRAIN_HEIGHT_RANGE.

    up: "z", "y", or "auto" (Y when the extent along Y exceeds 1.5x the extent along Z: a standing
    body is far taller than it is deep, and X is left-right in both conventions). The unit is read
    from the height (metres, centimetres or millimetres); a body outside the training heights (a
    child, a giant) is scaled uniformly into them. Returns (normalised (V, 3), Frame, notices: one
    line per change a user should know about). Raises ValueError for a mesh that is not a body.
    """
    if len(vertices) < MIN_VERTICES:
        raise ValueError(f"{name} has {len(vertices)} vertices; a body mesh needs at least {MIN_VERTICES} "
                         "(anny's coarsest has 1,723)")
    check_up(up)
    extent = np.ptp(vertices, axis=0)
    if (extent <= 0).any():
        raise ValueError(f"{name} is flat (extents {np.round(extent, 4).tolist()}); expected a 3-D body")
    rotation, note = up_rotation(extent, up, name)
    notices = [f"{note} for the model and back for the output (--up z keeps it as it is)"] if note else []
    centre = (vertices.max(0) + vertices.min(0)) / 2
    height = float(extent @ np.abs(rotation[2]))  # the extent along the up axis
    unit = next(((f, u) for f, u in UNITS if METRE_HEIGHTS[0] <= height * f <= METRE_HEIGHTS[1]), None)
    if unit is None:
        raise ValueError(f"{name} is {height:.4g} units tall, which is no standing body's height in metres, "
                         "centimetres or millimetres; expected a body standing along the up axis (see --up)")
    factor, unit_name = unit
    metres = height * factor
    lo, hi = TRAIN_HEIGHT_RANGE
    scale = factor * min(max(metres, lo), hi) / metres
    if factor != 1:
        notices.append(f"{name} is {height:.4g} units tall: read as {unit_name} ({metres:.2f} m)")
    if not lo <= metres <= hi:
        notices.append(f"{name} is {metres:.2f} m tall, outside the training heights {lo}-{hi} m: scaled to "
                       f"{min(max(metres, lo), hi):.2f} m for the model, and the output back")
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


def transfer(model, identity_vertices: np.ndarray, pose_vertices: np.ndarray, device="cpu", up: str = "auto"):
    """Re-pose one identity mesh (V_I, 3) into one pose mesh's pose (V_P, 3).

    Returns (output, warped, notices), output and warped (V_I, 3) in the identity mesh's frame and
    vertex order; notices: what `normalise` changed about either input.
    """
    ident, frame, notices = normalise(identity_vertices, up, "identity mesh")
    pose, _, pose_notices = normalise(pose_vertices, up, "pose mesh")
    as_batch = lambda v: torch.as_tensor(v, dtype=torch.float32, device=device)[None]  # noqa: E731
    with torch.no_grad():
        result = model(as_batch(ident), as_batch(pose))
    back = lambda t: frame.back(t[0].double().cpu().numpy())  # noqa: E731
    return back(result.output), back(result.warped), notices + pose_notices


@dataclass
class TransferConfig:
    pose: str = field(metadata={"help": "pose mesh, or a folder of pose meshes (frames)"})
    identity: str = field(metadata={"help": "identity mesh to re-pose (a triangle mesh)"})
    out: str = field(metadata={"help": "output mesh (.ply/.obj), or a folder when --pose is a folder"})
    checkpoint: str = field(default="pretrained", metadata={
        "help": "checkpoint written by train.py, or a shipped name (pretrained, pretrained-unsupervised, ...)"})
    warped: bool = field(default=False, metadata={"help": "also write the warped mesh (correspondence only)"})
    backend: str = field(default="auto", metadata={"help": "kernels backend: auto, torch, chunked, keops, triton"})
    device: str = "cpu"
    up: str = field(default="auto", metadata={
        "help": "the meshes' up axis: z, y, or auto (Y when a mesh is much taller along Y than along Z)"})

    def __post_init__(self):
        if self.up not in ("auto", *UP_ROTATIONS):
            raise ValueError(f"--up must be auto, z or y, got {self.up!r}")
        check_device(self.device)
        check_backend(self.backend, self.device)


def main(argv: list[str] | None = None) -> list[Path]:
    """Parse `argv` into a TransferConfig and re-pose; returns the written paths."""
    args = parse_dataclass(TransferConfig, argv, description=__doc__)
    identity_vertices, identity_faces = load_mesh(args.identity, require_faces=True)
    poses = pose_files(Path(args.pose))
    model = load_model(args.checkpoint, device=args.device, backend=args.backend)
    model.eval()
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
        output, warped, notices = transfer(model, identity_vertices, pose_vertices, args.device, args.up)
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
