"""Peak memory of one supervised training step at N vertices, under an address-space cap.

    python -m bench.step_memory --backend chunked --vertices 13348 [--limit-gib 20] [--batch 2]
        [--checkpoint-decoder]

The step is training's own (`mapconnet.objective.supervised_losses` + `weighted_total`, backward,
the optimiser of `mapconnet.training`), built by `random_training_step` (bench/bench_train_step.py times the same step),
with the default model (eager) on random meshes and random faces (memory and time do not depend on
the geometry). RLIMIT_AS caps the process at --limit-gib, so a step that would not fit in that
much memory fails with an allocation error instead of swapping; the result is one line:
`OK|OOM backend=... n=... peak_rss=... GiB`. CPU only (the cap and ru_maxrss are host memory).
The table "How large a mesh trains" in README.md comes from this command.
"""
from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import torch

from bench._harness import _status_kb
from mapconnet.cli import POSITIVE, at_least, check_ranges, parse_dataclass, run_command
from mapconnet.losses import LossConfig
from mapconnet.model import MAPConNet, ModelConfig
from mapconnet.objective import supervised_losses, weighted_total
from mapconnet.training import make_optimizer


def peak_rss_gib() -> float:
    """This process's resident high-water mark. VmHWM where Linux has it: ru_maxrss survives exec, so
    a child started from a large parent (pytest after loading anny) would report the parent's peak."""
    kib = _status_kb("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20


def random_training_step(backend: str, n: int, batch: int, *, m: int | None = None, device="cpu",
                         checkpoint_decoder: bool = False):
    """One supervised step of the default model (eager) on random meshes (identity and target (batch, n, 3),
    pose (batch, m, 3), 2n random faces): returns (optimizer, step) where step() runs the forward, every
    loss term, the backward and the training optimiser's update. Memory and time do not depend on the geometry."""
    torch.manual_seed(0)
    model = MAPConNet(ModelConfig(backend=backend, checkpoint_decoder=checkpoint_decoder)).to(device).train()
    optimizer = make_optimizer(model, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    mesh = lambda rows: (torch.rand(batch, rows, 3, generator=gen) - 0.5).to(device)  # noqa: E731
    inputs = {"identity": mesh(n), "pose": mesh(n if m is None else m), "target": mesh(n),
              "identity_faces": torch.randint(0, n, (batch, 2 * n, 3), generator=gen).to(device)}
    loss_cfg = LossConfig()

    def step():
        weighted_total(supervised_losses(model, inputs, loss_cfg), loss_cfg).backward()
        optimizer.step()

    return optimizer, step


@dataclass
class StepMemoryConfig:
    vertices: int = field(metadata={"help": "mesh size N (identity = pose = target)"})
    backend: str = field(default="chunked", metadata={"help": "kernels backend: auto, torch, chunked, keops"})
    batch: int = 2
    limit_gib: float = field(default=20.0, metadata={"help": "address-space cap for the step"})
    checkpoint_decoder: bool = field(default=False, metadata={"help": "recompute decoder stages in backward"})

    def __post_init__(self):
        check_ranges(self, {"vertices": at_least(3), "batch": at_least(1), "limit_gib": POSITIVE})


def main(argv=None) -> str:
    args = parse_dataclass(StepMemoryConfig, argv, description=__doc__)

    n, b = args.vertices, args.batch
    _, step = random_training_step(args.backend, n, b, checkpoint_decoder=args.checkpoint_decoder)
    before = peak_rss_gib()
    cap = int(args.limit_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    start = time.perf_counter()
    try:
        step()
        status = "OK"
    except (MemoryError, RuntimeError) as err:  # torch reports a failed allocation as RuntimeError
        status = "OOM (" + str(err).splitlines()[0][:100] + ")"
    line = (f"{status} backend={args.backend} n={n} batch={b} checkpoint_decoder={args.checkpoint_decoder} "
            f"limit={args.limit_gib:g} GiB wall={time.perf_counter() - start:.0f} s "
            f"peak_rss={peak_rss_gib():.2f} GiB (before the step {before:.2f} GiB)")
    print(line, flush=True)
    return line


if __name__ == "__main__":
    run_command(main)
