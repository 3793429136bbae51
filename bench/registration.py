"""Synthetic benchmark of registration: fits to scans of held-out anny bodies with known truth.

    python -m bench.registration                       # 5 bodies x 4 conditions at lite (CPU: ~30 min)
    python -m bench.registration --bodies 2 --iterations 100 --out /tmp/reg   # a quick look

Bodies: phenotypes from `sample_identities` (BMI-checked) and poses from `PoseSampler`, drawn from
a seed sequence no data generator or stream uses, so no training body reappears. Each body gives a
scan of `--points` area-uniform samples of its full-resolution mesh in every condition: clean,
5 mm Gaussian noise, and partial (the front half, by the back-face rule of
`registration.synthetic_scan`), all fitted with the default weights, and the clean scan once more
with the model-to-scan weight `--compare-model-to-scan` (1: the weight before it was measured).
Every fit starts from the neutral body (correspondences none: the no-network baseline).

Metrics per fit: vertex-to-vertex error against the true mesh at the fit resolution (cm: mean and
median over vertices), scan-to-model distance (point to the fitted surface, mm, mean) and
wall-clock seconds; per condition the mean and median over bodies and the share of fits with a
mean error under 5 cm. Writes `--out`.json and `--out`.md (a markdown table).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import asdict, dataclass

import numpy as np
import torch

from mapconnet import registration
from mapconnet.cli import at_least, check_ranges, one_of, parse_dataclass, run_command
from mapconnet.data import anny_body
from mapconnet.files import write_text

BENCH_SEED = (0xBE4C, 13)  # first entries of every body's seed sequence; training uses others
SUCCESS_CM = 5.0


@dataclass
class RegistrationBenchConfig:
    bodies: int = 5
    resolution: str = "lite"
    iterations: int = registration.DEFAULT_ITERATIONS
    points: int = 30_000
    noise_mm: float = 5.0
    compare_model_to_scan: float = 1.0
    out: str = "bench/results/registration-baseline-cpu"

    def __post_init__(self):
        check_ranges(self, {"bodies": at_least(1), "resolution": one_of(registration.FIT_RESOLUTIONS),
                            "iterations": at_least(10), "points": at_least(registration.MIN_POINTS),
                            "noise_mm": at_least(0), "compare_model_to_scan": at_least(0)})


def conditions(cfg: RegistrationBenchConfig) -> dict[str, dict]:
    """name -> synthetic_scan options and fit weights."""
    default = registration.FitWeights()
    return {"clean": {"scan": {}, "weights": default},
            f"noise {cfg.noise_mm:g} mm": {"scan": {"noise": cfg.noise_mm / 1000}, "weights": default},
            "partial (front)": {"scan": {"partial": True}, "weights": default},
            f"clean, model-to-scan weight {cfg.compare_model_to_scan:g}": {
                "scan": {}, "weights": registration.FitWeights(model_to_scan=cfg.compare_model_to_scan)}}


def held_out_body(model, sampler, index: int):
    """(phenotype (6,), pose (104, 4, 4), full-resolution vertices (13348, 3)) of benchmark body `index`."""
    rng = np.random.default_rng([*BENCH_SEED, index])
    phenotype = anny_body.sample_identities(model, 1, rng)[0][0]
    pose = sampler.sample(rng)
    return phenotype, pose, anny_body.posed_vertices(model, phenotype[None], pose[None])[0]


def run(cfg: RegistrationBenchConfig) -> dict:
    b = registration.body(cfg.resolution)
    sampler = anny_body.PoseSampler(b.model)
    faces = b.model.faces.numpy()
    fits = []
    for i in range(cfg.bodies):
        _, _, full = held_out_body(b.model, sampler, i)
        truth = b.reduce(torch.from_numpy(full)).numpy()
        for name, c in conditions(cfg).items():
            rng = np.random.default_rng([*BENCH_SEED, i, 1])  # the same scan points for every fit of a body
            points, _ = registration.synthetic_scan(full, faces, cfg.points, generator=rng, **c["scan"])
            result = registration.fit(points, resolution=cfg.resolution, iterations=cfg.iterations,
                                      weights=c["weights"], progress=False)
            error = np.linalg.norm(result.vertices - truth, axis=1) * 100
            to_surface = registration.surface_distance(points, result.vertices, result.faces) * 1000
            fits.append({"body": i, "condition": name, "v2v_mean_cm": float(error.mean()),
                         "v2v_median_cm": float(np.median(error)), "scan_to_model_mm": float(to_surface.mean()),
                         "seconds": result.seconds, "final_loss": result.losses[-1]["total"]})
            print(f"body {i} {name}: v2v {error.mean():.2f} cm (median {np.median(error):.2f}), "
                  f"scan-to-model {fits[-1]['scan_to_model_mm']:.1f} mm, {result.seconds:.0f} s", flush=True)
    summary = {}
    for name in conditions(cfg):
        rows = [f for f in fits if f["condition"] == name]
        col = lambda k, rows=rows: [r[k] for r in rows]  # noqa: E731
        summary[name] = {"fits": len(rows), "v2v_mean_cm": statistics.mean(col("v2v_mean_cm")),
                         "v2v_median_over_bodies_cm": statistics.median(col("v2v_mean_cm")),
                         "v2v_median_cm": statistics.mean(col("v2v_median_cm")),
                         "under_5cm": sum(v < SUCCESS_CM for v in col("v2v_mean_cm")) / len(rows),
                         "scan_to_model_mm": statistics.mean(col("scan_to_model_mm")),
                         "seconds_per_scan": statistics.mean(col("seconds")), "seconds_min": min(col("seconds")),
                         "seconds_max": max(col("seconds"))}
    return {"config": asdict(cfg), "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                               "platform": platform.platform()},
            "summary": summary, "fits": fits}


def table(results: dict) -> str:
    cfg = results["config"]
    lines = [f"Registration baseline (correspondences none: Chamfer + priors), {cfg['bodies']} held-out anny bodies, "
             f"{cfg['points']:,} points, `{cfg['resolution']}`, {cfg['iterations']} iterations, neutral start; "
             f"{results['machine']['cpus']} CPU cores.", "",
             "| condition | v2v mean (cm) | v2v median over bodies (cm) | per-vertex median (cm) | fits < 5 cm "
             "| scan-to-model (mm) | s / scan (min-max) |", "|---|---|---|---|---|---|---|"]
    for name, s in results["summary"].items():
        lines.append(f"| {name} | {s['v2v_mean_cm']:.2f} | {s['v2v_median_over_bodies_cm']:.2f} | "
                     f"{s['v2v_median_cm']:.2f} | {s['under_5cm']:.0%} | {s['scan_to_model_mm']:.1f} | "
                     f"{s['seconds_per_scan']:.0f} ({s['seconds_min']:.0f}-{s['seconds_max']:.0f}) |")
    lines += ["", "Per fit (v2v mean cm):", "", "| body | " + " | ".join(results["summary"]) + " |",
              "|---|" + "---|" * len(results["summary"])]
    for i in range(cfg["bodies"]):
        row = {f["condition"]: f["v2v_mean_cm"] for f in results["fits"] if f["body"] == i}
        lines.append(f"| {i} | " + " | ".join(f"{row[n]:.2f}" for n in results["summary"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    cfg = parse_dataclass(RegistrationBenchConfig, argv, description=__doc__)
    results = run(cfg)
    write_text(f"{cfg.out}.json", json.dumps(results, indent=1))
    text = table(results)
    write_text(f"{cfg.out}.md", text)
    print(text)
    return results


if __name__ == "__main__":
    run_command(main)
