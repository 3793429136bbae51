"""Register the anny body model to a scan (a mesh or a point cloud) or to every scan of a folder,
and train the correspondence network that drives it.

    python -m mapconnet.register --scan S.ply --out DIR [--resolution lite|smpl|full] [--iterations N]
    mapconnet-register --scan scans/ --out fits/          # one subfolder per scan: fits/<scan name>/
    python -m mapconnet.register train --out runs/corr [--labelled 1000 --warm-steps 2000]
        [--unlabelled 200 --self-rounds 3] [--init CKPT] [--resume] [--stop-after N]

The scan's points are its vertices, in file order (a mesh's faces are not used), in metres,
centimetres or millimetres, Z or Y up (detected; each change is printed as a note). Writes, each
file under a temporary name and then renamed:
- fit.ply: the registered anny mesh at --resolution, with faces, in the scan's frame and units;
- params.json: phenotype, per-bone rotations (axis-angle, anny's local-ref axes, radians) and
  translation, in anny's frame (metres, Z up), and the frame that maps it to the scan's;
- correspondences.npz: per scan point (file order) the nearest fitted vertex (`vertex`), its body
  part (`part`, an index into `part_names`, registration.PART_NAMES: 14 parts from anny's skinning
  weights) and the distance to it (`distance`, metres); with the network also its own match
  (`template`: the full-resolution template vertex, `network_part`, `confidence` in (0, 1]);
- report.json: the options, the notes, the weighted loss terms of every loss evaluation and the
  final distances (mm: scan to the fitted surface and to the nearest fitted vertex, model to scan);
- fit.png: the scan coloured by the template position of its corresponding vertex, the fit, and
  both overlaid from the side.
--correspondences network (the default) predicts every point's template vertex with the
correspondence network (--network, default the one that ships in mapconnet/pretrained), and the
fit is correspondence-driven first, then surface-driven; --correspondences none is the no-network
baseline, Chamfer plus priors. `train` trains a network (`mapconnet.correspondence`): a warm start
on labelled synthetic scans, then LoopReg's self-supervised loop on unlabelled ones.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import kernels
from mapconnet import correspondence, registration
from mapconnet.cli import at_least, build_parser, check_ranges, one_of, parse_dataclass, run_command, split
from mapconnet.files import replacing, write_text
from mapconnet.meshio import MESH_SUFFIXES, load_mesh, save_mesh
from mapconnet.transfer import UP_ROTATIONS

OUTPUTS = ("fit.ply", "params.json", "correspondences.npz", "report.json", "fit.png")
CORRESPONDENCE_METHODS = ("network", "none")
PICTURE_POINTS = 4000  # scan points drawn in fit.png (a random subset; matplotlib is slow with more)


@dataclass
class RegisterConfig:
    scan: str = field(metadata={"help": "scan file (mesh or point cloud: ply, obj, off, stl, glb), or a folder"})
    out: str = field(metadata={"help": "output folder (a folder of scans: one subfolder per scan)"})
    resolution: str = field(default="lite", metadata={"help": "anny mesh to fit: lite (1,723 vertices), smpl "
                                                                "(6,890) or full (13,348)"})
    iterations: int = field(default=registration.DEFAULT_ITERATIONS, metadata={
        "help": "loss evaluations per scan (L-BFGS steps and their line searches)"})
    correspondences: str = field(default="network", metadata={
        "help": "where per-point correspondences come from: network (the correspondence network of --network), "
                "or none (Chamfer and priors only)"})
    network: str = field(default="pretrained", metadata={
        "help": "correspondence network: a checkpoint of `python -m mapconnet.register train`, or pretrained "
                "(the one that ships with the package)"})
    model_to_scan: float = field(default=registration.FitWeights.model_to_scan, metadata={
        "help": "weight of the model-to-scan term (the scan-to-model term's is 1)"})
    up: str = field(default="auto", metadata={"help": "the scan's up axis: z, y, or auto (Y when it is much "
                                                        "taller along Y than along Z)"})
    backend: str = field(default="auto", metadata={"help": "kernels backend of the nearest-neighbour searches: "
                                                             "auto, kdtree, chunked, keops, triton"})
    seed: int = field(default=0, metadata={"help": "seed of the picture's point subset"})

    def __post_init__(self):
        check_ranges(self, {"resolution": one_of(registration.FIT_RESOLUTIONS), "iterations": at_least(10),
                            "correspondences": one_of(CORRESPONDENCE_METHODS), "model_to_scan": at_least(0),
                            "up": one_of(("auto", *UP_ROTATIONS))})
        try:
            kernels.dispatch.resolve("nearest", self.backend, torch.device("cpu"), 1)
        except ValueError as e:
            raise ValueError(f"--backend {self.backend}: {e}") from None


def scan_files(path: Path) -> list[Path]:
    """One scan file, or every mesh file of a folder in name order."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in MESH_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"scan folder {path} holds no mesh or point cloud files "
                                    f"({', '.join(MESH_SUFFIXES)})")
        return files
    if not path.exists():
        raise FileNotFoundError(f"scan {path} does not exist")
    return [path]


def point_correspondences(result: registration.FitResult, points: np.ndarray, backend: str,
                          prediction: correspondence.Prediction | None = None) -> dict[str, np.ndarray]:
    """Per scan point (N, 3) in anny's frame: the nearest fitted vertex, its body part and the
    distance; with the network's `prediction` also its match, part and confidence."""
    b = registration.body(result.resolution)
    d2, vertex = kernels.nearest(torch.from_numpy(points), torch.from_numpy(result.vertices), backend=backend)
    pairs = {"vertex": vertex.numpy(), "part": b.body_parts[vertex].numpy().astype(np.int16),
             "distance": d2.sqrt().numpy().astype(np.float32), "part_names": np.array(registration.PART_NAMES)}
    if prediction is not None:
        pairs.update(template=prediction.template, network_part=prediction.part.astype(np.int16),
                     confidence=prediction.weight.astype(np.float32))
    return pairs


def final_distances(result: registration.FitResult, points: np.ndarray, distance: np.ndarray,
                    backend: str) -> dict[str, dict[str, float]]:
    """Distances in mm (mean, median, 95th percentile): scan points to the fitted surface and to
    the nearest fitted vertex, and fitted vertices to the nearest scan point."""
    d2, _ = kernels.nearest(torch.from_numpy(result.vertices), torch.from_numpy(points), backend=backend)
    stats = lambda d: {k: round(float(f(d)) * 1000, 2) for k, f in  # noqa: E731
                       (("mean", np.mean), ("median", np.median), ("p95", lambda x: np.percentile(x, 95)))}
    return {"scan_to_model_mm": stats(registration.surface_distance(points, result.vertices, result.faces)),
            "scan_to_vertex_mm": stats(distance), "model_to_scan_mm": stats(d2.sqrt().numpy())}


def picture(path: Path, result: registration.FitResult, points: np.ndarray, canonical: np.ndarray, seed: int) -> Path:
    """fit.png: the scan coloured by its corresponding rest-template position `canonical` (N, 3)
    (the same body point has the same colour in every scan), the fit, and both overlaid from the
    side."""
    import matplotlib.pyplot as plt

    from mapconnet.render import draw_mesh, save_figure

    rest = correspondence.template("lite").full_canonical.numpy()
    colours = np.clip((canonical - rest.min(0)) / np.ptp(rest, axis=0), 0, 1)  # rest x, y, z -> red, green, blue
    pick = np.random.default_rng(seed).permutation(len(points))[:PICTURE_POINTS]
    fig = plt.figure(figsize=(9.6, 4.4))
    for i, (title, mesh, view) in enumerate((("scan (colour: template position)", False, "front"),
                                             ("fit", True, "front"), ("overlay (side)", True, "side"))):
        ax = fig.add_subplot(1, 3, i + 1, projection="3d")
        # draw_mesh sets the limits and the view; the scan is drawn into them
        draw_mesh(ax, result.vertices, result.faces if mesh else result.faces[:0], view=view)
        if i != 1:
            p = points[pick]
            ax.scatter(p[:, 0], p[:, 1], p[:, 2], s=1, c=colours[pick], depthshade=False)
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def register_one(scan_path: Path, out: Path, cfg: RegisterConfig,
                 net: correspondence.CorrespondenceNet | None = None) -> list[Path]:
    """Fit one scan (with the correspondences of `net`, or none) and write OUTPUTS into `out`;
    nothing is written if the fit fails."""
    points, _ = load_mesh(scan_path)
    model_points, _, _ = registration.prepare_scan(points, cfg.up)
    prediction, pairs_in = None, None
    if net is not None:
        prediction = correspondence.predict(net, model_points)
        pairs_in = (prediction.template, prediction.weight)
    result = registration.fit(points, pairs_in, resolution=cfg.resolution, iterations=cfg.iterations, up=cfg.up,
                              backend=cfg.backend, weights=registration.FitWeights(model_to_scan=cfg.model_to_scan))
    for note in result.notes:
        tqdm.write(f"note: {note}")
    pairs = point_correspondences(result, model_points, cfg.backend, prediction)
    if prediction is not None:
        canonical = prediction.canonical
    else:
        canonical = correspondence.template(cfg.resolution).canonical.numpy()[pairs["vertex"]]
    params = {**result.params.to_dict(), "resolution": cfg.resolution, "bones": list(registration.FIT_BONES),
              "frame": {"rotation": result.frame.rotation.tolist(), "scale": result.frame.scale,
                        "rule": "scan = (anny vertices / scale) @ rotation"},
              "anny": registration.anny_body.anny_version()}
    report = {"scan": str(scan_path), "options": asdict(cfg), "notes": result.notes, "points": len(points),
              "seconds": round(result.seconds, 2), "final": final_distances(result, model_points, pairs["distance"],
                                                                            cfg.backend),
              "losses": result.losses}
    out.mkdir(parents=True, exist_ok=True)
    written = [save_mesh(out / "fit.ply", result.scan_vertices(), result.faces),
               write_text(out / "params.json", json.dumps(params, indent=1))]
    with replacing(out / "correspondences.npz") as tmp:
        np.savez_compressed(tmp, **pairs)
    written += [out / "correspondences.npz", write_text(out / "report.json", json.dumps(report, indent=1)),
                picture(out / "fit.png", result, model_points, canonical, cfg.seed)]
    return written


def held_out_scan_file(path, index: int = 0, points: int = 30_000) -> Path:
    """Write the clean scan of benchmark body `index` (`correspondence.held_out_scan`: a phenotype
    and pose no training scan has) as a PLY point cloud, e.g. for the demo; returns the path."""
    import trimesh

    scan, _, _ = correspondence.held_out_scan(index, points)
    with replacing(path) as tmp:
        trimesh.PointCloud(scan).export(tmp)
    return Path(path)


def train_main(argv: list[str] | None = None) -> dict:
    """`python -m mapconnet.register train ...`: train a correspondence network (see
    mapconnet.correspondence); returns what `correspondence.train` returns."""
    parser = build_parser(correspondence.CorrespondenceTrainConfig, correspondence.NetConfig,
                          description=correspondence.__doc__)
    parser.prog = "python -m mapconnet.register train"
    cfg, net_cfg = split(parser.parse_args(argv), correspondence.CorrespondenceTrainConfig, correspondence.NetConfig)
    return correspondence.train(cfg, net_cfg)


def main(argv: list[str] | None = None) -> list[Path]:
    """Parse `argv` into a RegisterConfig and register every scan; returns the written paths.
    `train ...` trains a correspondence network instead (`train_main`)."""
    argv = list(argv) if argv is not None else None
    if argv and argv[0] == "train":
        return train_main(argv[1:])
    cfg = parse_dataclass(RegisterConfig, argv, description=__doc__)
    scans = scan_files(Path(cfg.scan))
    out = Path(cfg.out)
    targets = [out / p.stem for p in scans] if Path(cfg.scan).is_dir() else [out]
    if len(set(targets)) < len(targets):
        raise ValueError(f"scan folder {cfg.scan} holds scans that share a name ({[p.name for p in scans]}); "
                         "each scan's subfolder of --out is named after it")
    inputs = {p.resolve() for p in scans}
    clash = [t / name for t in targets for name in OUTPUTS if (t / name).resolve() in inputs]
    if clash:
        raise ValueError(f"--out {cfg.out} would overwrite the scan {clash[0]}; choose another output folder")
    # read and check every scan (and the network) before the first (minutes-long) fit, so a bad
    # file fails at once
    net = correspondence.load(cfg.network) if cfg.correspondences == "network" else None
    for path in scans:
        registration.prepare_scan(load_mesh(path)[0], cfg.up, name=f"scan {path}")
    written = []
    for path, target in tqdm(list(zip(scans, targets)), desc="register", unit="scan", disable=len(scans) == 1):
        written += register_one(path, target, cfg, net)
    for path in written:
        print(path)
    return written


def cli(argv: list[str] | None = None) -> None:
    """The `mapconnet-register` command: `main` with one-line user errors (`--debug` for tracebacks)."""
    run_command(main, argv)


if __name__ == "__main__":
    cli()
