"""Train MAPConNet: supervised, unsupervised or semi-supervised (ARCHITECTURE.md s.6).

    python train.py                                    # demo: data/demo (built if missing), a few minutes on CPU
    python train.py --data DIR --out DIR --epochs 200  # supervised
    python train.py --percentage 0 --use-unlabelled    # unsupervised (cross- and self-consistency)
    python train.py --percentage 50 --use-unlabelled   # semi-supervised

Samples: identity mesh I = (a, p), pose mesh P = (b, q), ground truth (a, q); unlabelled samples
add P2 = (b, r). A supervised step is G(I, P) against (a, q). An unlabelled step sums three passes:
cross-consistency G(P2, P) must reproduce P; self-consistency Y1 = G(I, P) (contrastive terms
only, then detached) and G(P2, Y1) must reproduce P. Semi-supervised training cycles six steps:
labelled, cross (labelled identities x unlabelled poses), labelled, cross (unlabelled identities x
labelled poses), labelled, unlabelled; the cross and unlabelled steps are unlabelled steps.

Writes OUT/checkpoint.pt (every --checkpoint-every steps and at the end), OUT/losses.csv (every
loss term of every step), OUT/val.csv (validation PMD), OUT/losses.png. --resume continues from
OUT/checkpoint.pt exactly: sample i of step s depends only on (seed, s, i).
"""
from __future__ import annotations

import csv
import itertools
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import kernels
from mapconnet import checkpoint as ckpt
from mapconnet.cli import build_parser, split
from mapconnet.data import SupervisedPairs, TestPairs, UnlabelledTriplets, open_dataset, semi_supervised_split
from mapconnet.losses import (
    LossConfig,
    align,
    cross_triplets,
    edge,
    mesh_contrastive,
    point_contrastive,
    reconstruction,
    standard_triplets,
)
from mapconnet.model import MAPConNet, ModelConfig

DEMO_DATA_ARGS = ["--identities", "8", "--poses", "32", "--test-identities", "4", "--test-poses", "8",
                  "--seed", "0", "--resolution", "lite", "--test-pairs", "64", "--preview"]


@dataclass
class TrainConfig:
    data: str = "data/demo"  # dataset folder; the demo set is built if this default is missing
    out: str = "runs/demo"
    batch_size: int = 2
    epochs: int = 1
    # Sampled pairs per epoch: 4,000 for humans in the published setting; the default keeps
    # `python train.py` (48 steps) to a few minutes on a 2-core CPU (4-20 s per step at 1,723 vertices
    # and batch 2, depending on what else runs).
    pairs_per_epoch: int = 96
    max_steps: int = 0  # stop after this many optimizer steps (0: epochs * pairs_per_epoch / batch_size)
    percentage: float = 100.0  # % of training identities (and, independently, poses) that are labelled
    use_unlabelled: bool = False  # also train on unlabelled samples (needed when percentage < 100)
    lr: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    workers: int = 0  # DataLoader worker processes
    bf16: bool = False  # bf16 autocast on CUDA (kernels accumulate in fp32)
    checkpoint_every: int = 100
    val_every: int = 8
    val_pairs: int = 4  # held-out test pairs of each list ("unseen" and "seen") for the validation PMD
    resume: bool = False
    # leave after this many steps of this run (checkpointed; the schedule is the full run's),
    # e.g. to fit a job time limit
    stop_after: int = 0


class CountFrom(torch.utils.data.Sampler):
    """Global sample indices start, start + 1, ... forever (Epochs folds them into epochs)."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


class Epochs(torch.utils.data.Dataset):
    """Global sample index g -> item g % len(samples) of epoch g // len(samples).

    The epoch is set per item, so DataLoader workers (each with its own copy) and a resumed run
    draw exactly what an uninterrupted single-process run draws.
    """

    def __init__(self, samples):
        self.samples = samples

    def __getitem__(self, g: int) -> dict:
        epoch, index = divmod(int(g), len(self.samples))
        self.samples.set_epoch(epoch)
        return self.samples[index]


def step_kinds(cfg: TrainConfig, sets: dict) -> list[str]:
    """The repeating cycle of step kinds."""
    if not cfg.use_unlabelled:
        return ["labelled"]
    if cfg.percentage == 0:
        return ["unlabelled"]
    cycle = ["labelled", "cross_a", "labelled", "cross_b", "labelled", "unlabelled"]
    return [k for k in cycle if k in sets]  # a cross set is empty when everything is labelled


def sample_sets(cfg: TrainConfig, dataset, length: int) -> dict:
    """The datasets each step kind draws from."""
    ids, poses = dataset.train_identities, dataset.train_poses
    if not cfg.use_unlabelled:
        return {"labelled": SupervisedPairs(dataset, ids, poses, length, cfg.seed)}
    if cfg.percentage == 0:
        return {"unlabelled": UnlabelledTriplets(dataset, ids, poses, length, cfg.seed)}
    s = semi_supervised_split(dataset, cfg.percentage, cfg.seed)
    sets = {"labelled": SupervisedPairs(dataset, s["labelled_identities"], s["labelled_poses"], length, cfg.seed)}
    for kind, (i, p) in {"cross_a": ("labelled_identities", "unlabelled_poses"),
                         "cross_b": ("unlabelled_identities", "labelled_poses"),
                         "unlabelled": ("unlabelled_identities", "unlabelled_poses")}.items():
        if s[i] and len(s[p]) >= 2:
            sets[kind] = UnlabelledTriplets(dataset, s[i], s[p], length, cfg.seed + 1 + len(sets))
    if "unlabelled" not in sets:  # too few unlabelled poses: fall back to all training data
        sets["unlabelled"] = UnlabelledTriplets(dataset, ids, poses, length, cfg.seed + 9)
    return sets


def check_config(cfg: TrainConfig) -> None:
    if not 0 <= cfg.percentage <= 100:
        raise ValueError(f"--percentage must be in [0, 100], got {cfg.percentage}")
    if cfg.percentage < 100 and not cfg.use_unlabelled:
        raise ValueError(f"--percentage {cfg.percentage:g} leaves data unlabelled but --use-unlabelled is off; "
                         "pass --use-unlabelled (or --percentage 100 for supervised training)")
    for name in ("batch_size", "pairs_per_epoch", "checkpoint_every", "val_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.epochs < 1 and cfg.max_steps < 1:
        raise ValueError("need --epochs >= 1 or --max-steps >= 1")
    if cfg.bf16 and not cfg.device.startswith("cuda"):
        raise ValueError("--bf16 autocast is for CUDA devices; on CPU train in float32")


def supervised_losses(model, batch, loss_cfg: LossConfig, backend: str) -> dict[str, torch.Tensor]:
    out = model(batch["identity"], batch["pose"])
    return {"rec": reconstruction(out.output, batch["target"]),
            "edge": edge(out.output, batch["identity"], batch["identity_faces"]),
            **_contrastive(out, loss_cfg, backend, cross=False)}


def unlabelled_losses(model, batch, loss_cfg: LossConfig, backend: str) -> dict[str, torch.Tensor]:
    identity, pose, pose2, faces = batch["identity"], batch["pose"], batch["pose2"], batch["pose_faces"]
    cc = model(pose2, pose)  # cross-consistency: P2 re-posed like P is P
    first = model(identity, pose)  # self-consistency pass 1: contrastive terms only
    sc = model(pose2, first.output.detach())  # pass 2: P2 re-posed like G(I, P) is P again
    terms = {"rec": reconstruction(cc.output, pose) + reconstruction(sc.output, pose),
             "edge": edge(cc.output, pose2, faces) + edge(sc.output, pose2, faces)}
    parts = [_contrastive(cc, loss_cfg, backend, cross=True), _contrastive(first, loss_cfg, backend, cross=False),
             _contrastive(sc, loss_cfg, backend, cross=False)]
    for key in ("mesh", "point"):
        terms[key] = sum(p[key] for p in parts)
    return terms


def _contrastive(out, loss_cfg: LossConfig, backend: str, cross: bool) -> dict[str, torch.Tensor]:
    fw, fi, fp = out.warped_features, out.identity_features, out.pose_features
    triplets = cross_triplets(fw, fi, fp) if cross else standard_triplets(fw, fi, align(fp, out.matching))
    return {"mesh": mesh_contrastive(*triplets, fw.shape[-1], loss_cfg.margin),
            "point": point_contrastive(fw, fi, loss_cfg, backend)}


def weighted_total(terms: dict, loss_cfg: LossConfig) -> torch.Tensor:
    weights = {"rec": loss_cfg.reconstruction, "edge": loss_cfg.edge, "mesh": loss_cfg.mesh_contrastive,
               "point": loss_cfg.point_contrastive}
    return sum(weights[k] * v for k, v in terms.items())


def make_optimizer(model, lr: float) -> torch.optim.Adam:
    """The one optimiser of training and the benchmarks: Adam, beta1 = 0, beta2 = 0.9, eps = 1e-3."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.0, 0.9), eps=1e-3)


def lr_at(step: int, total: int, base: float) -> float:
    """Constant for the first half, then linear decay to 0 at `total`."""
    half = total // 2
    return base if step < half else base * max(0.0, (total - step) / max(total - half, 1))


@torch.no_grad()
def validation_pmd(model, pairs, device) -> float:
    """Mean PMD (raw, not x 1e-4) over held-out test pairs, output and target bounding-box centred."""
    model.eval()
    centre = lambda x: x - (x.amax(1, keepdim=True) + x.amin(1, keepdim=True)) / 2  # noqa: E731
    values = []
    for item in pairs:
        out = model(item["identity"][None].to(device), item["pose"][None].to(device)).output
        values.append(float(kernels.pmd(centre(out), centre(item["target"][None].to(device)))))
    model.train()
    return float(np.mean(values))


def plot_curves(out: Path) -> None:
    import matplotlib.pyplot as plt

    from mapconnet.render import save_figure

    with open(out / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [int(r["step"]) for r in rows]
    for key in ("total", "rec", "edge", "mesh", "point"):
        axes[0].plot(steps, [float(r[key]) for r in rows], label=key, lw=1)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title("training losses (weighted total, raw terms)")
    axes[0].legend(fontsize=8)
    val_path = out / "val.csv"
    if val_path.exists():
        with open(val_path) as f:
            val = list(csv.DictReader(f))
        for key, label in (("pmd", "unseen"), ("pmd_seen", "seen")):
            if val and key in val[0]:
                axes[1].plot([int(r["step"]) for r in val], [float(r[key]) * 1e4 for r in val], marker="o",
                             label=label)
        axes[1].legend(fontsize=8)
    axes[1].set_yscale("log")  # the untrained model's step-0 value is ~100x the trained ones
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("PMD (x 1e-4)")
    axes[1].set_title("validation PMD (held-out test pairs)")
    save_figure(fig, out / "losses.png")


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_csv(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) < step]
    path.unlink()
    for r in rows:
        _append_csv(path, r)


def main(cfg: TrainConfig, model_cfg: ModelConfig | None = None, loss_cfg: LossConfig | None = None) -> dict:
    model_cfg, loss_cfg = model_cfg or ModelConfig(), loss_cfg or LossConfig()
    check_config(cfg)
    data = Path(cfg.data)
    if not data.exists() and cfg.data == TrainConfig.data:
        from mapconnet.data.generate import main as generate

        print(f"building the demo dataset in {data}")
        generate(["--out", str(data), *DEMO_DATA_ARGS])
    if not data.is_dir():
        raise ValueError(f"--data {data} does not exist or is not a folder; expected a dataset folder written by "
                         f"`python -m mapconnet.data.generate --out {data} ...` (or no --data for the demo set)")
    dataset = open_dataset(data)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = MAPConNet(model_cfg).to(device)
    optimizer = make_optimizer(model, cfg.lr)
    step = 0
    if cfg.resume:
        if not (out / "checkpoint.pt").is_file():
            raise ValueError(f"--resume needs {out / 'checkpoint.pt'}, which does not exist; expected the --out "
                             "folder of an earlier run (or leave out --resume to start afresh)")
        payload = ckpt.load(out / "checkpoint.pt")
        ckpt.check_compatible(payload, model_cfg, where=f"checkpoint {out / 'checkpoint.pt'}")
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        step = payload["step"]
        random.setstate(payload["rng"]["python"])
        np.random.set_state(payload["rng"]["numpy"])
        torch.set_rng_state(payload["rng"]["torch"])
        if payload["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
        for name in ("losses.csv", "val.csv"):
            _truncate_csv(out / name, step)
    else:
        for name in ("losses.csv", "val.csv"):
            (out / name).unlink(missing_ok=True)

    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * cfg.pairs_per_epoch / cfg.batch_size)
    sets = sample_sets(cfg, dataset, cfg.pairs_per_epoch)
    kinds = step_kinds(cfg, sets)
    # Each kind's stream starts where `step` steps of the cycle left it, so a resumed run draws the
    # same samples as an uninterrupted one.
    drawn = lambda k, steps: sum(1 for s in range(steps) if kinds[s % len(kinds)] == k) * cfg.batch_size  # noqa: E731
    streams = {k: iter(torch.utils.data.DataLoader(Epochs(ds), batch_size=cfg.batch_size,
                                                    sampler=CountFrom(drawn(k, step)), num_workers=cfg.workers))
               for k, ds in sets.items() if k in kinds}
    val_sets = {name: TestPairs(dataset, name) for name in ("unseen", "seen") if dataset.test_lists.get(name)}
    val_pairs = {name: [ds[i] for i in range(min(cfg.val_pairs, len(ds)))] for name, ds in val_sets.items()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 else nullcontext()

    def save_checkpoint():
        ckpt.save(out / "checkpoint.pt", {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_config": asdict(model_cfg),
            "loss_config": asdict(loss_cfg), "train_config": asdict(cfg), "step": step,
            "epoch": step * cfg.batch_size / cfg.pairs_per_epoch, "sampler": {k: drawn(k, step) for k in streams},
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}})

    def validate():
        pmd = {name: validation_pmd(model, pairs, device) for name, pairs in val_pairs.items()}
        _append_csv(out / "val.csv", {"step": step, "pmd": pmd.get("unseen", float("nan")),
                                      "pmd_seen": pmd.get("seen", float("nan"))})
        bar.write(f"step {step}: validation PMD x 1e-4: " + ", ".join(f"{k} {v * 1e4:.2f}" for k, v in pmd.items()))

    model.train()
    start = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc="train", unit="step")
    if step == 0:
        validate()  # the untrained model: the curve's starting point
    history = []
    last = min(total, step + cfg.stop_after) if cfg.stop_after > 0 else total
    while step < last:
        kind = kinds[step % len(kinds)]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(streams[kind]).items()}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, cfg.lr)
        with autocast:
            losses = (supervised_losses if kind == "labelled" else unlabelled_losses)(model, batch, loss_cfg,
                                                                                     model_cfg.backend)
            total_loss = weighted_total(losses, loss_cfg)
        if not torch.isfinite(total_loss):
            raise FloatingPointError(f"loss became {total_loss.item()} at step {step} ({kind} step)")
        optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        optimizer.step()
        row = {"step": step, "kind": kind, "lr": optimizer.param_groups[0]["lr"], "total": total_loss.item(),
               **{k: v.item() for k, v in losses.items()}}
        _append_csv(out / "losses.csv", row)
        history.append(row)
        step += 1
        bar.update(1)
        bar.set_postfix(total=f"{row['total']:.3f}", rec=f"{row['rec']:.4f}", kind=kind)
        if step % cfg.val_every == 0 or step == total:
            validate()
        if step % cfg.checkpoint_every == 0 or step == last:
            save_checkpoint()
    bar.close()
    plot_curves(out)
    print(f"trained {step} steps in {time.perf_counter() - start:.0f} s; checkpoint {out / 'checkpoint.pt'}, "
          f"losses {out / 'losses.csv'}, curve {out / 'losses.png'}")
    return {"step": step, "history": history, "out": out}


def read_validation(out) -> list[tuple[int, float]]:
    """(step, raw PMD on the "unseen" pairs) rows of OUT/val.csv (column "pmd_seen" has the "seen" ones)."""
    with open(Path(out) / "val.csv") as f:
        return [(int(r["step"]), float(r["pmd"])) for r in csv.DictReader(f)]


if __name__ == "__main__":
    parser = build_parser(TrainConfig, ModelConfig, LossConfig, description=__doc__)
    main(*split(parser.parse_args(), TrainConfig, ModelConfig, LossConfig))
