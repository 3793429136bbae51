"""Throughput of multi-process training on one machine: the same cores as threads of one process
or as torchrun processes (gloo on CPU, NCCL on CUDA).

    python -m bench.distributed_scaling --data data/published-lite                  # CPU: 1 x 2 vs 2 x 1
    python -m bench.distributed_scaling --data DIR --device cuda --layouts 1x1 8x1  # GPUs: 1 vs 8 processes

A layout PxT is P processes of T threads each. Every run trains the default model (compiled) on
the dataset folder (not the stream, so that drawing bodies stays out of the figure) for `--steps`
steps of each global `--batch-sizes`, without validation; the figure is the median time per step
after the first `--warmup` steps (the first compiles), from losses.csv's per-step clock, and the
samples per second it gives. Writes `--out`/distributed-scaling.json and prints a markdown table.
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mapconnet.cli import at_least, check_ranges, parse_dataclass, run_command
from mapconnet.files import write_text

TRAIN = Path(__file__).resolve().parents[1] / "train.py"


@dataclass
class ScalingConfig:
    data: str = field(metadata={"help": "dataset folder to train on (e.g. data/published-lite)"})
    layouts: tuple[str, ...] = field(default=("1x2", "2x1"), metadata={
        "help": "PxT: P processes of T threads (CUDA: one GPU per process)"})
    batch_sizes: tuple[int, ...] = (2, 4)
    steps: int = 30
    warmup: int = 5
    device: str = "cpu"
    out: str = "bench/results"

    def __post_init__(self):
        check_ranges(self, {"steps": at_least(2), "warmup": at_least(1)})
        if self.warmup >= self.steps:
            raise ValueError(f"--warmup {self.warmup} leaves no measured step of --steps {self.steps}")
        for layout in self.layouts:
            parts = layout.split("x")
            if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
                raise ValueError(f"--layouts entry {layout!r} is not PxT (processes x threads, e.g. 2x1)")
        for b in self.batch_sizes:
            for layout in self.layouts:
                if b % int(layout.split("x")[0]):
                    raise ValueError(f"--batch-sizes {b} does not split evenly over layout {layout}'s processes")


def step_seconds(run: Path, warmup: int) -> float:
    """Median seconds per step of a run's losses.csv after its first `warmup` steps."""
    with open(run / "losses.csv") as f:
        clock = [float(r["seconds"]) for r in csv.DictReader(f)]
    return statistics.median(b - a for a, b in zip(clock[warmup - 1:], clock[warmup:]))


def run_layout(cfg: ScalingConfig, layout: str, batch: int, out: Path) -> float:
    processes, threads = (int(p) for p in layout.split("x"))
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [*launcher, str(TRAIN), "--data", cfg.data, "--out", str(out), "--batch-size", str(batch),
           "--max-steps", str(cfg.steps), "--val-pairs", "0", "--checkpoint-every", str(10 * cfg.steps),
           "--device", cfg.device]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
    return step_seconds(out, cfg.warmup)


def main(argv=None) -> dict:
    cfg = parse_dataclass(ScalingConfig, argv, description=__doc__)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in cfg.batch_sizes:
            for layout in cfg.layouts:
                seconds = run_layout(cfg, layout, batch, Path(tmp) / f"{layout}-b{batch}")
                rows.append({"layout": layout, "batch_size": batch, "seconds_per_step": seconds,
                             "samples_per_second": batch / seconds})
                print(f"{layout}, batch {batch}: {seconds:.3f} s/step, {batch / seconds:.2f} samples/s", flush=True)
    lines = ["| processes x threads | global batch | s / step (median) | samples / s |", "|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['batch_size']} | {r['seconds_per_step']:.3f} | {r['samples_per_second']:.2f} |"
              for r in rows]
    table = "\n".join(lines)
    print(table)
    summary = {"config": asdict(cfg), "rows": rows, "table": table}
    name = f"distributed-scaling-{cfg.device.split(':')[0]}.json"
    write_text(Path(cfg.out) / name, json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    run_command(main)
