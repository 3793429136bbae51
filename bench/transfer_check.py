"""One checkpoint across resolutions and kernels backends: the lite-trained model on the same
identities and poses at smpl (6,890) and full (13,348) vertices, and backend torch against chunked.

    python -m mapconnet.data.generate --out data/published-smpl --preset published --resolution smpl
    python -m mapconnet.data.generate --out data/published-full --preset published --resolution full
    python -m bench.transfer_check --checkpoint runs/long/checkpoint.pt --pairs 16

The three datasets share the generator's seed and sizes, so their test lists name the same bodies
in the same poses; only the mesh resolution differs. For every resolution the first `--pairs`
pairs of each list are evaluated with `evaluate.py`'s code (model and reference rows, PMD and CD
x 1e-4) once per backend; the largest relative difference of the model's PMD between backends is
reported. Writes `--out`/transfer-check.json and prints a markdown table.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mapconnet import evaluation
from mapconnet.cli import at_least, check_ranges, parse_dataclass, run_command
from mapconnet.files import write_text


@dataclass
class TransferCheckConfig:
    checkpoint: str = field(metadata={"help": "checkpoint to check (a path or a shipped name)"})
    data_prefix: str = field(default="data/published", metadata={
        "help": "datasets are PREFIX-lite, PREFIX-smpl, PREFIX-full (missing ones are skipped)"})
    resolutions: tuple[str, ...] = ("lite", "smpl", "full")
    backends: tuple[str, ...] = ("torch", "chunked")
    pairs: int = field(default=16, metadata={"help": "pairs per test list"})
    out: str = "runs/transfer-check"

    def __post_init__(self):
        check_ranges(self, {"pairs": at_least(1)})


def main(argv=None) -> dict:
    cfg = parse_dataclass(TransferCheckConfig, argv, description=__doc__)
    results = {}
    for resolution in cfg.resolutions:
        data = Path(f"{cfg.data_prefix}-{resolution}")
        if not data.is_dir():
            print(f"skipping {resolution}: {data} does not exist (see the commands in this module's docstring)")
            continue
        for backend in cfg.backends:
            metrics = evaluation.main(evaluation.EvalConfig(
                checkpoint=cfg.checkpoint, data=str(data), out=f"{cfg.out}/{resolution}-{backend}",
                max_pairs=cfg.pairs, backend=backend, pictures=0, batch_size=1))
            results[f"{resolution}/{backend}"] = {name: metrics[name] for name in ("unseen", "seen")}
    lines = ["| resolution | backend | list | model PMD | warped | identity | perfect warp | model CD |",
             "|---|---|---|---|---|---|---|---|"]
    for key, lists in results.items():
        resolution, backend = key.split("/")
        for name, res in lists.items():
            ref = res["references"]
            cells = [res["pmd"], ref["warped"]["pmd"], ref["identity"]["pmd"], ref["perfect_warp"]["pmd"], res["cd"]]
            lines.append(f"| {resolution} | {backend} | {name} | " + " | ".join(f"{c * 1e4:.2f}" for c in cells) + " |")
    spread = {}  # resolution -> largest |PMD(backend) - PMD(first backend)| / PMD(first backend)
    for resolution in cfg.resolutions:
        runs = [results.get(f"{resolution}/{backend}") for backend in cfg.backends]
        if len(runs) > 1 and all(runs):
            first = runs[0]
            spread[resolution] = max(abs(other[name]["pmd"] - first[name]["pmd"]) / first[name]["pmd"]
                                     for other in runs[1:] for name in ("unseen", "seen"))
    lines += ["", "largest relative difference of the model's PMD between backends: "
              + ", ".join(f"{r} {v:.1e}" for r, v in spread.items())]
    table = "\n".join(lines)
    print(table)
    summary = {"config": asdict(cfg), "results": results, "backend_spread": spread, "table": table}
    write_text(Path(cfg.out) / "transfer-check.json", json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    run_command(main)
