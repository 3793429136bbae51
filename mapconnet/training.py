"""Train MAPConNet: supervised, unsupervised or semi-supervised (docs/DESIGN.md, "Training").

    python train.py                                     # demo: data/demo (built if missing), minutes on CPU
    python train.py --data stream --val-data DIR        # fresh anny bodies every step, no dataset on disk
    python train.py --data DIR --out DIR --epochs 200   # a dataset folder, supervised
    python train.py --percentage 0 --use-unlabelled     # unsupervised (cross- and self-consistency)
    python train.py --percentage 50 --use-unlabelled    # semi-supervised
    python -m mapconnet.training ...                    # the same, from an installed package

Samples: identity mesh I = (a, p), pose mesh P = (b, q), ground truth (a, q); unlabelled samples
add P2 = (b, r). The terms of each kind of step are in `mapconnet.objective`. Semi-supervised
training cycles six steps: labelled, cross (labelled identities x unlabelled poses), labelled,
cross (unlabelled identities x labelled poses), labelled, unlabelled; the cross and unlabelled
steps are unlabelled steps. With `--data stream` every sample shows new people in new poses
(`mapconnet.data.stream`), so the unlabelled kinds simply draw unlabelled triplets.

Writes OUT/checkpoint.pt (every --checkpoint-every steps and at the end), OUT/losses.csv (every
loss term, the gradient norm and the run's clock after every step), OUT/val.csv (validation PMD
of the model and of the warped mesh), and OUT/losses.png. --resume continues from
OUT/checkpoint.pt exactly: sample i of step s depends only on (seed, s, i).

Under torchrun (`mapconnet.distributed`) --batch-size is the global batch, split evenly over the
processes: 1 or N processes train the same model, and a run may resume with another number of
processes. Rank 0 alone validates, logs, plots and writes checkpoints.
"""
from __future__ import annotations

import csv
import math
import random
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import kernels
from mapconnet import checkpoint as ckpt
from mapconnet.cli import POSITIVE, at_least, check_backend, check_device, check_ranges, one_of
from mapconnet.data import SupervisedPairs, TestPairs, UnlabelledTriplets, open_dataset, semi_supervised_split
from mapconnet.data.quadruped import check_species
from mapconnet.data.stream import STREAM_RESOLUTIONS, BodyStream
from mapconnet.distributed import SOLO, ShardedCount, Team, from_leader, join, leave, local_batch, mean_over_ranks
from mapconnet.evaluation import candidates
from mapconnet.files import append_csv_row, folder_lock, keep_csv_rows
from mapconnet.losses import LossConfig, centred
from mapconnet.model import MAPConNet, ModelConfig
from mapconnet.objective import TERMS, step_losses, weighted_total
from mapconnet.resources import available_memory, training_step_bytes

STREAM = "stream"  # --data value for fresh anny bodies
DEMO_DATA = "data/demo"
DEMO_DATA_ARGS = ["--preset", "demo", "--seed", "0", "--resolution", "lite", "--preview"]


OPTIMIZERS = {"published": {"betas": (0.0, 0.9), "eps": 1e-3}, "adam": {"betas": (0.9, 0.999), "eps": 1e-8}}


@dataclass
class TrainConfig:
    data: str = DEMO_DATA  # dataset folder, or "stream"; the demo set is built if this default is missing
    val_data: str = ""  # dataset whose test lists validate (default: --data; needed with --data stream)
    # body model of --data stream: human (anny) or quadruped (mapconnet.data.quadruped); a run on a
    # dataset folder records the folder's species here (what mapconnet-transfer reads)
    species: str = "human"
    stream_resolution: str = ""  # mesh resolution of --data stream (default: lite for humans, smal for animals)
    out: str = "runs/demo"
    batch_size: int = 2
    epochs: int = 1
    # Sampled pairs per epoch: 4,000 for humans in the published setting; the default keeps
    # `python train.py` (48 steps) to a few minutes on a 2-core CPU.
    pairs_per_epoch: int = 96
    max_steps: int = 0  # stop after this many optimizer steps (0: epochs * pairs_per_epoch / batch_size)
    percentage: float = 100.0  # % of training identities (and, independently, poses) that are labelled
    use_unlabelled: bool = False  # also train on unlabelled samples (needed when percentage < 100)
    lr: float = 1e-4
    # raise the lr linearly from lr / warmup_steps to lr over the first warmup_steps steps. A fine-tune
    # (--init) starts Adam afresh, and Adam's first updates are about lr * sign(gradient) on every
    # weight whatever the gradient's size: from a trained model that first lurches away (the shipped
    # model fine-tuned on data/demo at lr 1e-5: validation PMD 8.2 -> 8.8 in 16 steps without warm-up)
    warmup_steps: int = 0
    # "adam": torch's defaults, beta1 = 0.9, beta2 = 0.999, eps = 1e-8; "published": beta1 = 0,
    # beta2 = 0.9, eps = 1e-3 (MAPConNet's GAN-style settings), which learned 2-3x slower per step
    # (README "Deviations from the paper")
    optimizer: str = "adam"
    # clip the gradient's global norm to this before each update (0: no clipping); the norm is
    # logged in losses.csv either way
    grad_clip: float = 0.0
    seed: int = 0
    device: str = "cpu"
    workers: int = 0  # DataLoader worker processes
    bf16: bool = False  # bf16 autocast on CUDA (kernels accumulate in fp32)
    # torch.compile the encoder and the decoder for training steps: about 2x faster on 2 CPU cores
    # (their many small per-vertex ops fuse); the first step compiles (~1-2 min cold, seconds once
    # inductor's cache in the temp folder is warm). Validation runs eager.
    compile: bool = True
    checkpoint_every: int = 100
    val_every: int = 8
    val_pairs: int = 4  # held-out test pairs of each list ("unseen" and "seen") for the validation PMD; 0: none
    resume: bool = False
    # resume even though data, sampling, optimiser or loss settings differ from the checkpoint's
    # (the architecture must still match): the run is then no longer one run, say so where you report it
    force_resume: bool = False
    # start afresh in an --out that holds a run, deleting that run's files (RUN_FILES, nothing else)
    overwrite: bool = False
    # start from the weights of this checkpoint ("pretrained" names the shipped model) with a fresh
    # optimiser and schedule: a fine-tune; the model config must describe the same architecture
    init: str = ""
    # leave after this many steps of this run (checkpointed; the schedule is the full run's),
    # e.g. to fit a job time limit
    stop_after: int = 0

    def __post_init__(self):
        """Every option is checked here, when it is parsed, before anything is read or written."""
        check_ranges(self, {**{n: at_least(1) for n in ("batch_size", "pairs_per_epoch", "checkpoint_every",
                                                        "val_every")},
                            **{n: at_least(0) for n in ("epochs", "max_steps", "stop_after", "val_pairs", "workers",
                                                        "grad_clip", "warmup_steps")},
                            "lr": POSITIVE, "percentage": ((lambda v: 0 <= v <= 100), "in [0, 100]"),
                            "optimizer": one_of(OPTIMIZERS)})
        if self.percentage < 100 and not self.use_unlabelled:
            raise ValueError(f"--percentage {self.percentage:g} leaves data unlabelled but --use-unlabelled is off; "
                             "pass --use-unlabelled (or --percentage 100 for supervised training)")
        if self.epochs < 1 and self.max_steps < 1:
            raise ValueError("need --epochs >= 1 or --max-steps >= 1")
        check_species(self.species)
        self.stream_resolution = self.stream_resolution or STREAM_RESOLUTIONS[self.species]
        check_device(self.device)
        if self.bf16 and not self.device.startswith("cuda"):
            raise ValueError("--bf16 autocast is for CUDA devices; on CPU train in float32")
        if self.data == STREAM and not self.val_data:
            raise ValueError("--data stream needs --val-data DIR, a dataset folder whose test lists validate the run "
                             "(e.g. one written by `python -m mapconnet.data.generate --preset published "
                             "--resolution lite`, or with `--species quadruped --preset published` for animals)")


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


def step_kinds(cfg: TrainConfig) -> list[str]:
    """The repeating cycle of step kinds."""
    if not cfg.use_unlabelled:
        return ["labelled"]
    if cfg.percentage == 0:
        return ["unlabelled"]
    return ["labelled", "cross_a", "labelled", "cross_b", "labelled", "unlabelled"]


def sample_sets(cfg: TrainConfig, dataset) -> dict:
    """The samples each step kind draws from, indexable by a global sample index."""
    kinds = step_kinds(cfg)
    if dataset is None:  # the stream: every kind its own seed, unlabelled kinds unlabelled triplets
        return {k: BodyStream("labelled" if k == "labelled" else "unlabelled", cfg.stream_resolution,
                              cfg.seed + i, species=cfg.species) for i, k in enumerate(dict.fromkeys(kinds))}
    ids, poses, length = dataset.train_identities, dataset.train_poses, cfg.pairs_per_epoch
    if kinds == ["labelled"]:
        return {"labelled": Epochs(SupervisedPairs(dataset, ids, poses, length, cfg.seed))}
    if kinds == ["unlabelled"]:
        return {"unlabelled": Epochs(UnlabelledTriplets(dataset, ids, poses, length, cfg.seed))}
    s = semi_supervised_split(dataset, cfg.percentage, cfg.seed)
    sets = {"labelled": SupervisedPairs(dataset, s["labelled_identities"], s["labelled_poses"], length, cfg.seed)}
    for kind, (i, p) in {"cross_a": ("labelled_identities", "unlabelled_poses"),
                         "cross_b": ("unlabelled_identities", "labelled_poses"),
                         "unlabelled": ("unlabelled_identities", "unlabelled_poses")}.items():
        if s[i] and len(s[p]) >= 2:
            sets[kind] = UnlabelledTriplets(dataset, s[i], s[p], length, cfg.seed + 1 + len(sets))
    if "unlabelled" not in sets:  # too few unlabelled poses: fall back to all training data
        sets["unlabelled"] = UnlabelledTriplets(dataset, ids, poses, length, cfg.seed + 9)
    return {k: Epochs(v) for k, v in sets.items()}


def active_kinds(cfg: TrainConfig, sets: dict) -> list[str]:
    """The cycle without the kinds that have no samples (a cross set is empty when all is labelled)."""
    return [k for k in step_kinds(cfg) if k in sets]


# TrainConfig fields that define what a run learns from: --resume refuses to change them (the
# others, such as --max-steps, --val-every or --workers, may change between the parts of a run).
RUN_FIELDS = ("data", "val_data", "species", "stream_resolution", "batch_size", "pairs_per_epoch", "percentage",
              "use_unlabelled", "lr", "warmup_steps", "optimizer", "grad_clip", "seed", "init")


def check_same_run(payload: dict, cfg: TrainConfig, loss_cfg: LossConfig, where: str) -> None:
    """Raise ValueError if a resumed run would change its data, sampling, optimiser or loss weights."""
    saved_train, saved_loss = payload.get("train_config", {}), payload.get("loss_config", {})
    # runs from before animal mode trained humans; runs from before warm-up had none
    saved_train = {"species": "human", "warmup_steps": 0, **saved_train}
    saved_loss = {"centre_output": False, **saved_loss}  # and before centre_output, the raw output
    if cfg.data != STREAM:  # the folder decides the species (and runs before this recorded "human")
        saved_train.pop("species")
    diff = {f"--{k.replace('_', '-')}": (saved_train.get(k), getattr(cfg, k)) for k in RUN_FIELDS
            if k in saved_train and saved_train[k] != getattr(cfg, k)}
    diff.update({f"--{k.replace('_', '-')}": (v, getattr(loss_cfg, k)) for k, v in saved_loss.items()
                 if hasattr(loss_cfg, k) and v != getattr(loss_cfg, k)})
    if diff:
        listed = "; ".join(f"{k}: checkpoint {a!r}, given {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{where} belongs to a run with other settings ({listed}); resume with the run's own "
                         "settings, train into a new --out, or pass --force-resume to continue it anyway")


def compile_for_training(model: MAPConNet) -> None:
    """torch.compile the encoder and decoder in place (parameter names, and so checkpoints, stay
    those of the plain model); the kernels' custom autograd Functions stay eager."""
    model.encoder.compile()
    model.decoder.compile()


def freeze_what_the_loss_cannot_see(model: MAPConNet, loss_cfg: LossConfig) -> None:
    """With the centred reconstruction (LossConfig.centre_output) no term sees a translation of the
    output, so the residual decoder's last bias (a translation) gets a gradient that is rounding
    noise, which Adam would turn into random lr-sized steps (and which makes 1- and N-process
    training differ, as the cancelled biases of `model.CANCELLED_BIAS` did). It keeps its value."""
    if loss_cfg.centre_output and model.decoder.residual:
        model.decoder.out.bias.requires_grad_(False)


def make_optimizer(model, lr: float, kind: str = "adam") -> torch.optim.Adam:
    """The one optimiser of training and the benchmarks: Adam with the settings OPTIMIZERS[kind]."""
    return torch.optim.Adam(model.parameters(), lr=lr, **OPTIMIZERS[kind])


def lr_at(step: int, total: int, base: float, warmup: int = 0) -> float:
    """Linear warm-up over the first `warmup` steps, constant to the half, then linear decay to 0
    at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    half = total // 2
    return base if step < half else base * max(0.0, (total - step) / max(total - half, 1))


@torch.no_grad()
def validation_pmd(model, pairs, device) -> dict[str, float]:
    """Mean raw PMD (not x 1e-4) of the model's output and of every reference row (`candidates`)
    over held-out test items, all bounding-box centred. Returns {"model", "warped", "identity",
    "perfect_warp"} -> float."""
    was_training = model.training
    model.eval()
    sums = {}
    with torch.compiler.set_stance("force_eager"):  # no recompilation for eval mode and batch 1
        for item in pairs:
            batch = {k: v[None].to(device) if torch.is_tensor(v) else v for k, v in item.items()}
            target = centred(batch["target"])
            for row, mesh in candidates(model, batch).items():
                sums[row] = sums.get(row, 0.0) + float(kernels.pmd(centred(mesh), target))
    model.train(was_training)
    return {row: value / len(pairs) for row, value in sums.items()}


def plot_curves(out: Path) -> None:
    """OUT/losses.png: the training losses and the validation PMD (model and warped mesh per list)."""
    import matplotlib.pyplot as plt

    from mapconnet.render import save_figure

    with open(out / "losses.csv") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [int(r["step"]) for r in rows]
    for key in ("total", *TERMS):
        axes[0].plot(steps, [float(r[key]) for r in rows], label=key, lw=1)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title("training losses (weighted total, raw terms)")
    axes[0].legend(fontsize=8)
    val = read_validation_rows(out)
    curves = (("pmd", "unseen", "o-"), ("pmd_seen", "seen", "s-"), ("warped_pmd", "unseen, warped mesh", "o:"),
              ("warped_pmd_seen", "seen, warped mesh", "s:"), ("perfect_warp_pmd", "unseen, perfect warp", "--"),
              ("perfect_warp_pmd_seen", "seen, perfect warp", "-."))
    for column, label, style in curves:
        if val and column in val[0]:
            axes[1].plot([int(r["step"]) for r in val], [float(r[column]) * 1e4 for r in val], style, ms=3, label=label)
    if val:
        axes[1].legend(fontsize=8)
    axes[1].set_yscale("log")  # the untrained model's step-0 value is far above the trained ones
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("PMD (x 1e-4)")
    axes[1].set_title("validation PMD (held-out test pairs)")
    fig.tight_layout()  # the log axis's minor tick labels otherwise run into the y label
    save_figure(fig, out / "losses.png")


def plot_runs(runs: dict[str, str], path, max_step: int = 0,
              starts: dict[str, tuple[int, float]] | None = None) -> Path:
    """Unseen validation PMD of several runs (label -> OUT folder) against training steps and
    against wall-clock hours, each run's warped-mesh curve dotted and the perfect warp as a
    reference line: the figure of merit of a CPU training recipe. `starts` maps the label of a run
    that began from another's weights (--init) to that run's (steps, seconds), added to its own;
    `max_step` > 0 cuts every run after that many steps. Writes and returns the PNG `path`."""
    import matplotlib.pyplot as plt

    from mapconnet.render import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    perfect = None
    for label, out in runs.items():
        rows = [r for r in read_validation_rows(out) if "seconds" in r]
        step0, seconds0 = (starts or {}).get(label, (0, 0.0))
        if max_step:
            rows = [r for r in rows if step0 + int(r["step"]) <= max_step]
        if not rows:
            continue
        xs = {"step": [step0 + int(r["step"]) for r in rows],
              "hours": [(seconds0 + float(r["seconds"])) / 3600 for r in rows]}
        for ax, key in zip(axes, ("step", "hours")):
            line, = ax.plot(xs[key], [float(r["pmd"]) * 1e4 for r in rows], "o-", ms=3, label=f"{label}: model")
            ax.plot(xs[key], [float(r["warped_pmd"]) * 1e4 for r in rows], ":", color=line.get_color(),
                    label=f"{label}: warped mesh")
        perfect = float(rows[0]["perfect_warp_pmd"]) * 1e4
    for ax, xlabel in zip(axes, ("training steps (batch 2)", "training wall-clock (hours, 2 CPU cores)")):
        if perfect is not None:
            ax.axhline(perfect, color="k", lw=0.8, ls="--", label=f"perfect warp ({perfect:.1f})")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("unseen validation PMD (x 1e-4)")
    axes[0].legend(fontsize=7)
    fig.suptitle("validation PMD against training steps and time")
    return save_figure(fig, path)


def prepare_demo_data(cfg: TrainConfig) -> None:
    """Build the demo dataset when a run uses the default --data (or --val-data) and it is missing."""
    if DEMO_DATA in (cfg.data, cfg.val_data) and not Path(DEMO_DATA).exists():
        from mapconnet.data.generate import main as generate

        print(f"building the demo dataset in {DEMO_DATA}")
        generate(["--out", DEMO_DATA, *DEMO_DATA_ARGS])


def _open_data(cfg: TrainConfig):
    """(training dataset or None for the stream, validation dataset)."""
    opened = {}
    for flag, folder in (("--data", cfg.data), ("--val-data", cfg.val_data or cfg.data)):
        if folder == STREAM:
            continue
        if not Path(folder).is_dir():
            raise ValueError(f"{flag} {folder} does not exist or is not a folder; expected a dataset folder written "
                             f"by `python -m mapconnet.data.generate --out {folder} ...`, or --data stream")
        opened[folder] = opened.get(folder) or open_dataset(folder, verify=True)
    if cfg.data != STREAM:
        folder_species = opened[cfg.data].manifest.get("species", "human")
        if cfg.species not in ("human", folder_species):  # "human" is the default: only a given value can clash
            raise ValueError(f"--species {cfg.species} but --data {cfg.data} holds {folder_species} bodies; a dataset "
                             "folder's own species is used (--species chooses the body model of --data stream)")
    if cfg.data == STREAM:
        val_species = opened[cfg.val_data].manifest.get("species", "human")
        if val_species != cfg.species:
            raise ValueError(f"--val-data {cfg.val_data} holds {val_species} bodies but --data stream draws "
                             f"--species {cfg.species}; validate on a dataset of the same species")
    return opened.get(cfg.data), opened[cfg.val_data or cfg.data]


def check_step_memory(cfg: TrainConfig, model_cfg: ModelConfig, kinds: list[str], vertices: int,
                      team: Team = SOLO) -> None:
    """Raise MemoryError, before anything is written, when a training step would not fit in the
    memory available now (CPU; estimate from `mapconnet.resources`), naming a batch size that fits.
    The processes of a team on one machine share its memory, so their shares of the batch add up."""
    if cfg.device != "cpu":
        return
    unlabelled = any(k != "labelled" for k in kinds)
    here = local_batch(team, cfg.batch_size) * team.local_world
    need = training_step_bytes(here, vertices, model_cfg.decoder_widths, unlabelled, model_cfg.decoder_neighbours,
                               model_cfg.decoder_hops)
    available = available_memory()
    if need > available:
        fit = available * cfg.batch_size // need
        hint = f"--batch-size {fit} fits" if fit >= 1 else "even --batch-size 1 does not fit: use a lower resolution"
        raise MemoryError(f"a training step of --batch-size {cfg.batch_size} on {vertices:,}-vertex meshes"
                          f"{' (unlabelled steps keep three passes)' if unlabelled else ''} needs about "
                          f"{need / 2**30:.1f} GiB but {available / 2**30:.1f} GiB is available; {hint}")


# What a training run writes into --out: what --overwrite deletes, and all it deletes.
RUN_FILES = ("checkpoint.pt", "losses.csv", "val.csv", "losses.png")


def main(cfg: TrainConfig, model_cfg: ModelConfig | None = None, loss_cfg: LossConfig | None = None) -> dict:
    """Train as described in the module docstring, holding OUT/.lock so that no other training
    writes into OUT meanwhile. Returns {"step", "history" (one dict per step of this run, losses
    averaged over the processes), "out" (Path)}."""
    model_cfg, loss_cfg = model_cfg or ModelConfig(), loss_cfg or LossConfig()
    team, device = join(cfg.device)
    try:
        check_backend(model_cfg.backend, device)
        local_batch(team, cfg.batch_size)
        from_leader(team, lambda: prepare_demo_data(cfg))
        dataset, val_dataset = _open_data(cfg)
        if dataset is not None:
            cfg = replace(cfg, species=dataset.manifest.get("species", "human"))
        return _train(cfg, model_cfg, loss_cfg, dataset, val_dataset, Path(cfg.out), team, torch.device(device))
    finally:
        leave(team)


def _claim(cfg: TrainConfig, model_cfg: ModelConfig, loss_cfg: LossConfig, out: Path, locks: ExitStack,
           kinds: list[str], vertices: int, team: Team) -> dict | None:
    """What rank 0 does before training: lock OUT (held until `locks` closes), refuse to lose a
    run, check the memory, read the checkpoint of --resume or --init and only then clear the
    files of --overwrite or the log rows a resumed run will write again. Returns the checkpoint
    payload, or None for a fresh start."""
    locks.enter_context(folder_lock(out, "training"))
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not cfg.resume and not cfg.overwrite:
        raise FileExistsError(f"--out {out} already holds a run ({', '.join(existing)}); pass --resume to continue "
                              "it, --overwrite to start afresh (deletes only those files), or choose another --out")
    check_step_memory(cfg, model_cfg, kinds, vertices, team)
    if cfg.resume:
        if not (out / "checkpoint.pt").is_file():
            raise ValueError(f"--resume needs {out / 'checkpoint.pt'}, which does not exist; expected the --out "
                             "folder of an earlier run (or leave out --resume to start afresh)")
        payload = ckpt.load(out / "checkpoint.pt")
        ckpt.check_compatible(payload, model_cfg, where=f"checkpoint {out / 'checkpoint.pt'}")
        if not cfg.force_resume:
            check_same_run(payload, cfg, loss_cfg, where=f"checkpoint {out / 'checkpoint.pt'}")
        keep_csv_rows(out / "losses.csv", payload["step"])  # row s is the update from step s to s + 1
        keep_csv_rows(out / "val.csv", payload["step"] + 1)  # row s was validated before checkpoint s was written
        return payload
    payload = None
    if cfg.init:
        payload = ckpt.load(ckpt.resolve(cfg.init))
        ckpt.check_compatible(payload, model_cfg, where=f"--init {cfg.init}", grow=True)
        payload = {"model": payload["model"]}
    for name in existing:  # --overwrite, checked above; only after the checkpoints were read
        (out / name).unlink()
    return payload


def _train(cfg: TrainConfig, model_cfg: ModelConfig, loss_cfg: LossConfig, dataset, val_dataset, out: Path,
           team: Team, device: torch.device) -> dict:
    sets = sample_sets(cfg, dataset)
    kinds = active_kinds(cfg, sets)
    vertices = dataset.num_vertices if dataset is not None else next(iter(sets.values())).num_vertices
    with ExitStack() as locks:
        payload = from_leader(team, lambda: _claim(cfg, model_cfg, loss_cfg, out, locks, kinds, vertices, team))
        return _loop(cfg, model_cfg, loss_cfg, sets, kinds, val_dataset, out, team, device, payload)


def _loop(cfg, model_cfg, loss_cfg, sets, kinds, val_dataset, out, team, device, payload) -> dict:
    """The training loop proper, on every rank; rank 0 also validates, logs and checkpoints."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = MAPConNet(model_cfg).to(device)
    freeze_what_the_loss_cannot_see(model, loss_cfg)
    optimizer = make_optimizer(model, cfg.lr, cfg.optimizer)
    step = 0
    if cfg.resume:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        step = payload["step"]
        ckpt.set_rng_state(payload["rng"])
    elif payload is not None:  # --init
        ckpt.load_grown(model, payload["model"])

    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * cfg.pairs_per_epoch / cfg.batch_size)
    # Each kind's stream starts where `step` steps of the cycle left it, so a resumed run draws the
    # same samples as an uninterrupted one.
    drawn = lambda k, steps: sum(1 for s in range(steps) if kinds[s % len(kinds)] == k) * cfg.batch_size  # noqa: E731
    streams = {k: iter(torch.utils.data.DataLoader(ds, batch_size=local_batch(team, cfg.batch_size),
                                                    sampler=ShardedCount(drawn(k, step), cfg.batch_size, team),
                                                    num_workers=cfg.workers))
               for k, ds in sets.items() if k in kinds}
    val_sets = {name: TestPairs(val_dataset, name) for name in ("unseen", "seen") if val_dataset.test_lists.get(name)}
    val_pairs = {name: [ds[i] for i in range(min(cfg.val_pairs, len(ds)))] for name, ds in val_sets.items()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 else nullcontext()

    def save_checkpoint():
        ckpt.save(out / "checkpoint.pt", {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_config": asdict(model_cfg),
            "loss_config": asdict(loss_cfg), "train_config": asdict(cfg), "step": step,
            "epoch": step * cfg.batch_size / cfg.pairs_per_epoch, "sampler": {k: drawn(k, step) for k in streams},
            "seconds": seconds_before + time.perf_counter() - start,
            "rng": ckpt.rng_state()})

    def validate():
        if not cfg.val_pairs or not team.leader:  # --val-pairs 0: no validation, and no val.csv
            return
        pmd = {name: validation_pmd(model, pairs, device) for name, pairs in val_pairs.items()}
        row = {"step": step, "seconds": round(seconds_before + time.perf_counter() - start, 1)}
        for name, suffix in (("unseen", ""), ("seen", "_seen")):
            for r in ("model", "warped", "perfect_warp"):
                row[("pmd" if r == "model" else f"{r}_pmd") + suffix] = pmd.get(name, {}).get(r, float("nan"))
        append_csv_row(out / "val.csv", row)
        bar.write(f"step {step}: validation PMD x 1e-4 (model / warped / perfect warp): " + ", ".join(
            f"{k} {v['model'] * 1e4:.2f} / {v['warped'] * 1e4:.2f} / {v['perfect_warp'] * 1e4:.2f}"
            for k, v in pmd.items()))

    model.train()
    if cfg.compile:
        compile_for_training(model)
    # the module the steps run: the model itself, or its DDP wrapper that averages the gradients
    net = torch.nn.parallel.DistributedDataParallel(model) if team.world > 1 else model
    seconds_before = payload.get("seconds", 0.0) if cfg.resume else 0.0
    start = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not team.leader)
    if step == 0:
        validate()  # the untrained model: the curve's starting point
    history = []
    last = min(total, step + cfg.stop_after) if cfg.stop_after > 0 else total
    while step < last:
        kind = kinds[step % len(kinds)]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(streams[kind]).items()}
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, cfg.lr, cfg.warmup_steps)
        with autocast:
            losses = step_losses(net, batch, kind, loss_cfg)
            total_loss = weighted_total(losses, loss_cfg)
        # the whole batch's values, so that every rank logs them and stops on the same step
        logged = mean_over_ranks(team, torch.stack([total_loss.detach(), *(v.detach() for v in losses.values())]))
        if not torch.isfinite(logged[0]):
            raise FloatingPointError(f"loss became {logged[0].item()} at step {step} ({kind} step)")
        optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        optimizer.step()
        row = {"step": step, "kind": kind, "lr": optimizer.param_groups[0]["lr"],
               **dict(zip(("total", *losses), logged.tolist())), "grad_norm": grad_norm.item(),
               "seconds": round(seconds_before + time.perf_counter() - start, 3)}  # the run's clock after the step
        if team.leader:
            append_csv_row(out / "losses.csv", row)
        history.append(row)
        step += 1
        bar.update(1)
        bar.set_postfix(total=f"{row['total']:.3f}", rec=f"{row['reconstruction']:.5f}", kind=kind)
        if step % cfg.val_every == 0 or step == total:
            validate()
        if team.leader and (step % cfg.checkpoint_every == 0 or step == last):
            save_checkpoint()
    bar.close()
    if team.leader:
        plot_curves(out)
        print(f"trained {step} steps in {time.perf_counter() - start:.0f} s; checkpoint {out / 'checkpoint.pt'}, "
              f"losses {out / 'losses.csv'}, curve {out / 'losses.png'}")
    return {"step": step, "history": history, "out": out}


def read_validation_rows(out) -> list[dict]:
    """The rows of OUT/val.csv as dicts of strings ([] when there is none)."""
    path = Path(out) / "val.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def read_validation(out) -> list[tuple[int, float]]:
    """(step, raw model PMD on the "unseen" pairs) rows of OUT/val.csv."""
    return [(int(r["step"]), float(r["pmd"])) for r in read_validation_rows(out)]


def parse_and_train(argv=None) -> dict:
    """Parse the command line (options generated from the config dataclasses) and train."""
    from mapconnet.cli import build_parser, split

    parser = build_parser(TrainConfig, ModelConfig, LossConfig, description=__doc__)
    return main(*split(parser.parse_args(argv), TrainConfig, ModelConfig, LossConfig))


def cli(argv=None) -> None:
    """The training command: `parse_and_train` with one-line user errors (`--debug` for tracebacks)."""
    from mapconnet.cli import run_command

    run_command(parse_and_train, argv)


if __name__ == "__main__":
    cli()
