"""Evaluate a pose-transfer checkpoint on a dataset's test lists: PMD and Chamfer distance.

    python evaluate.py --checkpoint runs/demo/checkpoint.pt --data data/demo --out runs/demo/eval
    python -m mapconnet.evaluation --checkpoint pretrained ...      # the same, from an installed package

For every (identity mesh, pose mesh, ground truth) triplet of the "unseen" and/or "seen" list the
model re-poses the identity mesh; the output and the ground truth are both bounding-box centred,
then PMD (mean squared per-vertex error) and CD (squared-distance Chamfer, both directions) are
computed with `kernels.pmd` / `kernels.chamfer`. The field reports both x 1e-4; the JSON keeps
the raw values too. Reference rows use the same pairs: the warped mesh alone (the learned
correspondence without the decoder's refinement), the identity mesh unchanged and, where the
identity and pose meshes share a topology (every anny dataset), the perfect warp: the pose mesh put
into the identity's vertex order by the true correspondence. The warped row's distance to the
perfect warp is the correspondence's error; a model below the perfect warp carries the identity's
body shape onto the pose, which a warp alone cannot.

Writes OUT/metrics.json, OUT/pairs.csv, OUT/results.md, OUT/pmd_hist_<list>.png,
OUT/pairs/<list>_<pair>.png (a few panels) and, with --save-outputs, OUT/outputs/*.ply.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import kernels
from mapconnet import render
from mapconnet.checkpoint import load_model, resolve
from mapconnet.cli import at_least, check_backend, check_device, check_ranges, parse_dataclass, run_command
from mapconnet.data import TestPairs, open_dataset
from mapconnet.files import sha256, write_text
from mapconnet.losses import centred
from mapconnet.meshio import save_mesh

REPORT_SCALE = 1e4  # the field's convention: PMD and CD are reported x 1e-4
ROWS = ("model", "warped", "identity", "perfect_warp")  # the model's output and the reference rows
ROW_TITLES = {"model": "MAPConNet output", "warped": "warped mesh only (no refinement)",
              "identity": "identity mesh unchanged",
              "perfect_warp": "perfect warp (pose mesh in identity order by the true correspondence)"}


@dataclass
class EvalConfig:
    checkpoint: str = "pretrained"  # a checkpoint written by train.py, or "pretrained" (ships with the package)
    data: str = "data/demo"  # dataset folder (mapconnet.data.generate output)
    out: str = "runs/demo/eval"  # output folder
    list: str = "all"  # unseen, seen or all
    max_pairs: int = 0  # evaluate at most this many pairs per list (0: all)
    save_outputs: bool = False  # write each output and warped mesh as PLY
    backend: str = "auto"  # kernels backend: auto, torch, chunked, keops, triton
    device: str = "cpu"
    batch_size: int = 4
    pictures: int = 4  # how many pairs per list get a picture panel

    def __post_init__(self):
        if self.list not in ("unseen", "seen", "all"):
            raise ValueError(f"--list must be unseen, seen or all, got {self.list!r}")
        check_ranges(self, {"max_pairs": at_least(0), "pictures": at_least(0), "batch_size": at_least(1)})
        check_device(self.device)
        check_backend(self.backend, self.device)


def perfect_warp(batch: dict) -> torch.Tensor:
    """The pose mesh in the identity mesh's vertex order by the true correspondence, (B, V, 3).

    Valid for items of one shared topology (identity and pose meshes of a MeshDataset): with
    shuffled = original[perm], the pose mesh's original vertex j is pose[inverse(pose_perm)[j]], and
    identity vertex i is original vertex identity_perm[i].
    """
    pose = batch["pose"]
    perm_p, perm_i = batch["pose_perm"].to(pose.device), batch["identity_perm"].to(pose.device)
    original = torch.empty_like(pose).scatter_(1, perm_p.unsqueeze(-1).expand_as(pose), pose)
    return original.gather(1, perm_i.unsqueeze(-1).expand(-1, -1, 3))


def candidates(model, batch: dict) -> dict[str, torch.Tensor]:
    """The model's output and every reference row for a batch of test items, each (B, V, 3)."""
    result = model(batch["identity"], batch["pose"])
    return {"model": result.output, "warped": result.warped, "identity": batch["identity"],
            "perfect_warp": perfect_warp(batch)}


def pair_metrics(output: torch.Tensor, target: torch.Tensor, backend: str) -> dict[str, torch.Tensor]:
    """Raw PMD and CD of each pair, both meshes bounding-box centred. Inputs (B, V, 3); returns (B,) each."""
    output, target = centred(output), centred(target)
    return {"pmd": kernels.pmd(output, target, reduction="none"),
            "cd": kernels.chamfer(output, target, reduction="none", backend=backend)}


def _original_order(shuffled: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Undo a vertex shuffle: shuffled = original[perm]  =>  original[perm] = shuffled."""
    original = np.empty_like(shuffled)
    original[perm] = shuffled
    return original


def evaluate_list(model, dataset, name: str, cfg: EvalConfig, out: Path):
    """Run the model over one test list; return (summary dict, per-pair rows)."""
    pairs = TestPairs(dataset, name)
    count = len(pairs) if cfg.max_pairs <= 0 else min(cfg.max_pairs, len(pairs))
    subset = torch.utils.data.Subset(pairs, range(count))
    loader = torch.utils.data.DataLoader(subset, batch_size=cfg.batch_size, shuffle=False)
    rows, sums = [], {row: {"pmd": 0.0, "cd": 0.0} for row in ROWS}
    device = torch.device(cfg.device)
    for batch in tqdm(loader, desc=f"evaluate {name}", unit="batch"):
        batch = {k: v.to(device) if k in ("identity", "pose", "target") else v for k, v in batch.items()}
        with torch.no_grad():
            meshes = candidates(model, batch)
        metrics = {row: pair_metrics(mesh, batch["target"], cfg.backend) for row, mesh in meshes.items()}
        for b in range(len(batch["pair"])):
            pair = int(batch["pair"][b])
            row = {"list": name, "pair": pair}
            for key in ("identity_index", "identity_pose", "pose_identity", "pose_index"):
                row[key.replace("_index", "")] = int(batch[key][b])
            for r in ROWS:
                prefix = "" if r == "model" else f"{r}_"
                for metric in ("pmd", "cd"):
                    value = float(metrics[r][metric][b])
                    row[prefix + metric] = value
                    sums[r][metric] += value
            rows.append(row)
            perm = batch["identity_perm"][b].numpy()
            if cfg.save_outputs:
                for kind, mesh in (("output", meshes["model"]), ("warped", meshes["warped"])):
                    save_mesh(out / "outputs" / f"{name}_{pair}_{kind}.ply",
                              _original_order(mesh[b].cpu().numpy(), perm), dataset.faces)
            if len(rows) <= cfg.pictures:
                _pair_picture(out / "pairs" / f"{name}_{pair}.png", batch, b, meshes, row, dataset.faces)
    summary = {row: {m: sums[row][m] / max(len(rows), 1) for m in ("pmd", "cd")} for row in ROWS}
    result = {"pmd": summary["model"]["pmd"], "cd": summary["model"]["cd"], "pairs": len(rows),
              "pmd_x1e4": summary["model"]["pmd"] * REPORT_SCALE, "cd_x1e4": summary["model"]["cd"] * REPORT_SCALE,
              "references": {r: summary[r] for r in ROWS if r != "model"}}
    render.histogram([r["pmd"] * REPORT_SCALE for r in rows], out / f"pmd_hist_{name}.png",
                     xlabel="PMD (x 1e-4)", title=f"per-pair PMD, {name} list ({len(rows)} pairs)")
    return result, rows


def _pair_picture(path, batch, b, meshes, row, faces):
    """Pose mesh, identity mesh, warped mesh (the correspondence alone), output, ground truth and the
    output coloured by its error. meshes: `candidates` of the batch; row: the pair's metrics."""
    perm_i, perm_p = batch["identity_perm"][b].numpy(), batch["pose_perm"][b].numpy()
    unshuffle = lambda mesh, perm: _original_order(centred(mesh[None].float().cpu())[0].numpy(), perm)  # noqa: E731
    out_v = unshuffle(meshes["model"][b], perm_i)
    gt_v = unshuffle(batch["target"][b], perm_i)
    error = np.sqrt(((out_v - gt_v) ** 2).sum(-1))  # (V,) metres
    panels = [
        {"vertices": unshuffle(batch["pose"][b], perm_p), "faces": faces, "title": "pose mesh"},
        {"vertices": unshuffle(batch["identity"][b], perm_i), "faces": faces, "title": "identity mesh"},
        {"vertices": unshuffle(meshes["warped"][b], perm_i), "faces": faces,
         "title": f"warped mesh (PMD {row['warped_pmd'] * REPORT_SCALE:.1f})"},
        {"vertices": out_v, "faces": faces, "title": f"output (PMD {row['pmd'] * REPORT_SCALE:.1f})"},
        {"vertices": gt_v, "faces": faces, "title": "ground truth"},
        {"vertices": out_v, "faces": faces, "title": "output error", "values": error * 100,
         "vmax": max(float(np.percentile(error * 100, 99)), 1e-3)},
    ]
    render.mesh_panel(panels, path, suptitle=f"PMD x 1e-4: output {row['pmd'] * REPORT_SCALE:.2f}, perfect warp "
                      f"{row['perfect_warp_pmd'] * REPORT_SCALE:.2f}", colorbar_label="error (cm)")


def markdown_table(results: dict) -> str:
    lines = ["| list | method | pairs | PMD (x 1e-4) | CD (x 1e-4) |", "|---|---|---|---|---|"]
    for name, res in results.items():
        for row in ROWS:
            m = res if row == "model" else res["references"][row]
            lines.append(f"| {name} | {ROW_TITLES[row]} | {res['pairs']} | {m['pmd'] * REPORT_SCALE:.3f} | "
                         f"{m['cd'] * REPORT_SCALE:.3f} |")
    return "\n".join(lines) + "\n"


def main(cfg: EvalConfig) -> dict:
    checkpoint = resolve(cfg.checkpoint)
    model = load_model(checkpoint, device=cfg.device, backend=cfg.backend)
    model.eval()
    dataset = open_dataset(cfg.data, verify=True)
    names = ["unseen", "seen"] if cfg.list == "all" else [cfg.list]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    results, all_rows = {}, []
    for name in names:
        if not dataset.test_lists.get(name):
            raise ValueError(f"dataset {cfg.data} has no (or an empty) test list {name!r}; "
                             f"it has {sorted(dataset.test_lists)}")
        results[name], rows = evaluate_list(model, dataset, name, cfg, out)
        all_rows += rows

    metrics = {**results, "config": asdict(cfg), "checkpoint_sha256": sha256(checkpoint),
               "manifest_sha256": sha256(Path(cfg.data) / "manifest.json")}
    write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(all_rows[0]))
    writer.writeheader()
    writer.writerows(all_rows)
    write_text(out / "pairs.csv", buffer.getvalue())
    table = markdown_table(results)
    write_text(out / "results.md", f"# Evaluation of {checkpoint}\n\nData: {cfg.data}\n\n{table}")
    print(table)
    print(f"metrics: {out / 'metrics.json'}; table: {out / 'results.md'}; pictures: {out / 'pairs'}/ and "
          f"{out}/pmd_hist_*.png")
    return metrics


def cli(argv: list[str] | None = None) -> None:
    """Parse the command line into an EvalConfig and evaluate; one-line user errors (`--debug` for tracebacks)."""
    run_command(lambda a: main(parse_dataclass(EvalConfig, a, description=__doc__)), argv)


if __name__ == "__main__":
    cli()
