"""The picture of the pretrained model's training run: validation PMD of every stage against steps
and against wall-clock, from the stage logs kept in mapconnet/pretrained/resume/.

    python -m bench.long_run [--logs mapconnet/pretrained/resume] [--out docs/long-run.png]

Each stage starts where its parent stage ended (a stage that was not kept branches off and leads
nowhere), so the x axes are the cumulative steps and seconds of the chain that produced it.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from mapconnet.cli import parse_dataclass

ROOT = Path(__file__).resolve().parent.parent
# (stage, label, parent stage or None); logs are stage{N}-val.csv. A label with "not kept" names a
# stage whose weights no later stage started from.
STAGES = (
    (1, "published Adam", None),
    (2, "Adam", 1),
    (3, "decay", 2),
    (4, "cycle", 3),
    (5, "half-lr cycle (not kept)", 4),
    (6, "decoder context", 4),
    (7, "centred loss", 6),
    (8, "encoder context", 7),
    (9, "global context (a no-op as built then)", 8),
    (10, "cycle", 9),
    (11, "decoder hops", 10),
    (12, "cycle", 11),
    (13, "global context (shipped without)", 12),
)


@dataclass
class LongRunConfig:
    logs: str = field(default=str(ROOT / "mapconnet" / "pretrained" / "resume"),
                      metadata={"help": "folder with the stage{N}-val.csv logs"})
    out: str = field(default=str(ROOT / "docs" / "long-run.png"), metadata={"help": "picture to write"})


def read_stage(path: Path) -> list[dict]:
    """Rows of one stage's val.csv as floats (step, seconds, pmd, warped_pmd, perfect_warp_pmd, ...)."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def chain(logs: Path) -> list[tuple[int, str, list[dict]]]:
    """(stage, label, rows with cumulative `step` and `hours`) of every stage whose log exists."""
    ends, stages = {}, []
    for stage, label, parent in STAGES:
        path = logs / f"stage{stage}-val.csv"
        if not path.is_file():
            continue
        step0, hours0 = ends.get(parent, (0.0, 0.0))
        rows = [dict(r, step=r["step"] + step0, hours=r["seconds"] / 3600 + hours0) for r in read_stage(path)]
        ends[stage] = (rows[-1]["step"], rows[-1]["hours"])
        stages.append((stage, label, rows))
    if not stages:
        raise FileNotFoundError(f"no stage logs (stage1-val.csv ...) in {logs}")
    return stages


def plot(stages, out) -> Path:
    import matplotlib.pyplot as plt

    from mapconnet.render import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    for ax, x, xlabel in ((axes[0], "step", "training steps (batch 2)"),
                          (axes[1], "hours", "training wall-clock (hours, 2 CPU cores)")):
        for i, (stage, label, rows) in enumerate(stages):
            colour = plt.cm.tab20(i % 20)  # more stages than the default cycle's 10 colours
            xs = [r[x] for r in rows]
            ax.plot(xs, [r["pmd"] * 1e4 for r in rows], "o-", color=colour, ms=3, label=f"{stage} {label}: model")
            ax.plot(xs, [r["warped_pmd"] * 1e4 for r in rows], ":", color=colour, label=f"{stage} {label}: warped mesh")
        perfect = stages[0][2][0]["perfect_warp_pmd"] * 1e4
        ax.axhline(perfect, color="k", ls="--", lw=1, label=f"perfect warp ({perfect:.1f})")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("unseen validation PMD (x 1e-4)")
    axes[0].legend(fontsize=7, ncol=2, loc="upper right")
    fig.suptitle("validation PMD (first 16 unseen pairs of the published lite set) against training steps and time")
    return save_figure(fig, out)


def main(argv=None) -> None:
    cfg = parse_dataclass(LongRunConfig, argv, description=__doc__)
    print(plot(chain(Path(cfg.logs)), cfg.out))


if __name__ == "__main__":
    main()
