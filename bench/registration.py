"""Synthetic benchmark of registration: fits to scans of held-out anny bodies with known truth.

    python -m bench.registration                       # 5 bodies x 4 conditions at lite (CPU: ~30 min)
    python -m bench.registration --bodies 2 --iterations 100 --out /tmp/reg   # a quick look
    python -m bench.registration --correspondences network --baseline bench/results/registration-baseline-cpu.json \
        --out bench/results/registration-cpu          # the shipped network's fits, in one table with the baseline
    python -m bench.registration --networks "100%=runs/a/checkpoint.pt" "10%=runs/b/checkpoint.pt" \
        --out bench/results/registration-correspondence-cpu   # correspondences only (no fits), several networks

Bodies: phenotypes from `sample_identities` (BMI-checked) and poses from `PoseSampler`, drawn from
a seed sequence no data generator, stream or correspondence training uses
(`correspondence.held_out_scan`), so no training body reappears. Each body gives a
scan of `--points` area-uniform samples of its full-resolution mesh in every condition: clean,
5 mm Gaussian noise, and partial (the front half, by the back-face rule of
`registration.synthetic_scan`), all fitted with the default weights, and the clean scan once more
with the model-to-scan weight `--compare-model-to-scan` (1: the weight before it was measured).
Every fit starts from the neutral body: with `--correspondences none` (the no-network baseline)
or with the correspondence network's matches (`--correspondences network`, `--network`; then the
model-to-scan comparison is left out).

Metrics per fit: vertex-to-vertex error against the true mesh at the fit resolution (cm: mean and
median over vertices), scan-to-model distance (point to the fitted surface, mm, mean) and
wall-clock seconds; per condition the mean and median over bodies and the share of fits with a
mean error under 5 cm. With the network also its correspondences, before the fit: the share of
scan points whose matched template vertex lies within 5 and 10 cm of the true one (distances on the
neutral template, canonical positions) and the share whose body part (14, registration.PART_NAMES)
is right. `--baseline` adds the rows of an earlier run's json to the table. Writes `--out`.json
and `--out`.md (a markdown table).

`--networks LABEL=PATH ...` measures correspondences only (no fits) of several networks on
`--held-out` bodies in each condition, for the comparison of training stages.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import kernels
from mapconnet import correspondence, registration
from mapconnet.cli import at_least, check_ranges, one_of, parse_dataclass, run_command
from mapconnet.files import write_text

SUCCESS_CM = 5.0


@dataclass
class RegistrationBenchConfig:
    bodies: int = 5
    resolution: str = "lite"
    iterations: int = registration.DEFAULT_ITERATIONS
    points: int = 30_000
    noise_mm: float = 5.0
    compare_model_to_scan: float = 1.0
    correspondences: str = "none"
    network: str = "pretrained"
    baseline: str = ""  # json of an earlier run whose rows join the table
    networks: tuple[str, ...] = ()  # LABEL=PATH: correspondences only, no fits
    held_out: int = 20  # bodies of the --networks comparison
    out: str = "bench/results/registration-baseline-cpu"

    def __post_init__(self):
        self.networks = tuple(self.networks)
        check_ranges(self, {"bodies": at_least(1), "resolution": one_of(registration.FIT_RESOLUTIONS),
                            "iterations": at_least(10), "points": at_least(registration.MIN_POINTS),
                            "noise_mm": at_least(0), "compare_model_to_scan": at_least(0),
                            "correspondences": one_of(("none", "network")), "held_out": at_least(1)})
        bad = [n for n in self.networks if "=" not in n]
        if bad:
            raise ValueError(f"--networks takes LABEL=PATH entries, got {bad[0]!r}")


def conditions(cfg: RegistrationBenchConfig) -> dict[str, dict]:
    """name -> synthetic_scan options and fit weights."""
    default = registration.FitWeights()
    out = {"clean": {"scan": {}, "weights": default},
           f"noise {cfg.noise_mm:g} mm": {"scan": {"noise": cfg.noise_mm / 1000}, "weights": default},
           "partial (front)": {"scan": {"partial": True}, "weights": default}}
    if cfg.correspondences == "none":
        out[f"clean, model-to-scan weight {cfg.compare_model_to_scan:g}"] = {
            "scan": {}, "weights": registration.FitWeights(model_to_scan=cfg.compare_model_to_scan)}
    return out


def run(cfg: RegistrationBenchConfig) -> dict:
    b = registration.body(cfg.resolution)
    net = correspondence.load(cfg.network) if cfg.correspondences == "network" else None
    fits = []
    for i in range(cfg.bodies):
        for name, c in conditions(cfg).items():
            points, true_vertex, full = correspondence.held_out_scan(i, cfg.points, **c["scan"])
            truth = b.reduce(torch.from_numpy(full)).numpy()
            row = {"body": i, "condition": name}
            start = time.perf_counter()
            pairs = None
            if net is not None:
                p = correspondence.predict(net, points)
                pairs = (p.template, p.weight)
                row.update(correspondence.summarise_errors([correspondence.correspondence_errors(net, points,
                                                                                                true_vertex)]))
            result = registration.fit(points, pairs, resolution=cfg.resolution, iterations=cfg.iterations,
                                      weights=c["weights"], progress=False)
            seconds = time.perf_counter() - start  # the network's prediction and the fit
            error = np.linalg.norm(result.vertices - truth, axis=1) * 100
            row.update(fitted_correspondences(result, points, true_vertex))
            to_surface = registration.surface_distance(points, result.vertices, result.faces) * 1000
            row.update({"v2v_mean_cm": float(error.mean()), "v2v_median_cm": float(np.median(error)),
                        "scan_to_model_mm": float(to_surface.mean()), "seconds": seconds,
                        "final_loss": result.losses[-1]["total"]})
            fits.append(row)
            extra = f", correspondences within 5 cm {row['within_5cm']:.1%}" if net is not None else ""
            print(f"body {i} {name}: v2v {error.mean():.2f} cm (median {np.median(error):.2f}), "
                  f"scan-to-model {row['scan_to_model_mm']:.1f} mm, {seconds:.0f} s{extra}", flush=True)
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
        keys = ("fit_within_5cm", "fit_within_10cm", "fit_part_accuracy")
        if net is not None:
            keys += ("within_5cm", "within_10cm", "part_accuracy")
        summary[name].update({k: statistics.mean(col(k)) for k in keys})
    return {"config": asdict(cfg), "machine": machine(), "summary": summary, "fits": fits}


def fitted_correspondences(result: registration.FitResult, points: np.ndarray, truth: np.ndarray) -> dict:
    """The correspondences registration writes (correspondences.npz: each point's nearest fitted
    vertex) against the truth: shares within 5 and 10 cm on the neutral template, and of right parts."""
    _, nearest = kernels.nearest(torch.from_numpy(points), torch.from_numpy(result.vertices))
    t = correspondence.template(result.resolution)
    truth = torch.from_numpy(truth)
    cm = (t.canonical[nearest] - t.full_canonical[truth]).norm(dim=-1) * 100
    return {"fit_within_5cm": float((cm < 5).float().mean()), "fit_within_10cm": float((cm < 10).float().mean()),
            "fit_part_accuracy": float((t.parts[nearest] == t.full_parts[truth]).float().mean())}


def machine() -> dict:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def method(cfg: dict) -> str:
    if cfg.get("correspondences", "none") == "none":
        return "baseline (no network)"
    return f"network `{cfg['network']}`"


def table(results: dict, baseline: dict | None = None) -> str:
    cfg = results["config"]
    runs = ([baseline] if baseline else []) + [results]
    pct = lambda s, k: f"{s[k]:.1%}" if k in s else "-"  # noqa: E731
    lines = [f"Registration of {cfg['bodies']} held-out anny bodies, {cfg['points']:,} points, `{cfg['resolution']}`, "
             f"{cfg['iterations']} iterations, neutral start; {results['machine']['cpus']} CPU cores. Correspondences "
             "(distances on the neutral template to the true vertex): the network's matches before the fit, and "
             "after it each point's nearest fitted vertex (what correspondences.npz holds).", "",
             "| method | condition | v2v mean (cm) | v2v median over bodies (cm) | per-vertex median (cm) "
             "| fits < 5 cm "
             "| network: within 5 cm | within 10 cm | part accuracy | after fit: within 5 cm | within 10 cm "
             "| part accuracy | scan-to-model (mm) | s / scan (min-max) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for name, s in r["summary"].items():
            lines.append(f"| {method(r['config'])} | {name} | {s['v2v_mean_cm']:.2f} | "
                         f"{s['v2v_median_over_bodies_cm']:.2f} | {s['v2v_median_cm']:.2f} | {s['under_5cm']:.0%} | "
                         f"{pct(s, 'within_5cm')} | {pct(s, 'within_10cm')} | {pct(s, 'part_accuracy')} | "
                         f"{pct(s, 'fit_within_5cm')} | {pct(s, 'fit_within_10cm')} | {pct(s, 'fit_part_accuracy')} | "
                         f"{s['scan_to_model_mm']:.1f} | {s['seconds_per_scan']:.0f} "
                         f"({s['seconds_min']:.0f}-{s['seconds_max']:.0f}) |")
    for r in runs:
        lines += ["", f"Per fit, {method(r['config'])} (v2v mean cm):", "",
                  "| body | " + " | ".join(r["summary"]) + " |",
                  "|---|" + "---|" * len(r["summary"])]
        for i in range(r["config"]["bodies"]):
            row = {f["condition"]: f["v2v_mean_cm"] for f in r["fits"] if f["body"] == i}
            lines.append(f"| {i} | " + " | ".join(f"{row[n]:.2f}" for n in r["summary"]) + " |")
    return "\n".join(lines) + "\n"


def compare_networks(cfg: RegistrationBenchConfig) -> dict:
    """Correspondences only (no fit) of every --networks entry on --held-out bodies per condition."""
    nets = {label: correspondence.load(path) for label, path in (n.split("=", 1) for n in cfg.networks)}
    scans = conditions(dataclasses.replace(cfg, correspondences="network"))  # no fit: no weight comparison
    errors = {label: {name: [] for name in scans} for label in nets}
    for i in range(cfg.held_out):
        for name, c in scans.items():
            points, truth, _ = correspondence.held_out_scan(i, cfg.points, **c["scan"])
            for label, net in nets.items():
                errors[label][name].append(correspondence.correspondence_errors(net, points, truth))
        print(f"body {i + 1} of {cfg.held_out}", flush=True)
    summary = {label: {name: correspondence.summarise_errors(e) for name, e in per.items()}
               for label, per in errors.items()}
    return {"config": asdict(cfg), "machine": machine(), "networks": summary}


def comparison_table(results: dict) -> str:
    cfg = results["config"]
    lines = [f"Correspondences of each network on {cfg['held_out']} held-out anny bodies (the registration "
             f"benchmark's), {cfg['points']:,} points per scan; distances on the neutral template between the "
             "matched and the true vertex.", "",
             "| network | condition | within 5 cm | within 10 cm | part accuracy | median (cm) | mean (cm) |",
             "|---|---|---|---|---|---|---|"]
    for label, per in results["networks"].items():
        for name, s in per.items():
            lines.append(f"| {label} | {name} | {s['within_5cm']:.1%} | {s['within_10cm']:.1%} | "
                         f"{s['part_accuracy']:.1%} | {s['median_cm']:.2f} | {s['mean_cm']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    cfg = parse_dataclass(RegistrationBenchConfig, argv, description=__doc__)
    if cfg.networks:
        results = compare_networks(cfg)
        text = comparison_table(results)
    else:
        baseline = json.loads(Path(cfg.baseline).read_text()) if cfg.baseline else None
        results = run(cfg)
        if baseline:
            results["baseline"] = baseline
        text = table(results, baseline)
    write_text(f"{cfg.out}.json", json.dumps(results, indent=1))
    write_text(f"{cfg.out}.md", text)
    print(text)
    return results


if __name__ == "__main__":
    run_command(main)
