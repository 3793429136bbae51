"""The default training step, as `python train.py` runs it: `lite` bodies (1,723 vertices) from
the stream, batch 2, the default model, loss and training configs (compiled encoder and decoder,
the auto kernels backend), forward, every loss term, backward and the Adam update.

Part of `make bench` (quick): the warm-up rounds pay the compilation, the timed rounds are steps
on fresh batches. The target is 1.5 s a step on 2 CPU cores.
"""
from __future__ import annotations

import time

import torch

from bench._harness import sync
from mapconnet.data.stream import BodyStream
from mapconnet.losses import LossConfig
from mapconnet.model import MAPConNet, ModelConfig
from mapconnet.objective import supervised_losses, weighted_total
from mapconnet.training import TrainConfig, compile_for_training, make_optimizer

WARMUP, ROUNDS = 3, 8


def default_step():
    """A callable running one default training step on the next stream batch."""
    cfg, model_cfg, loss_cfg = TrainConfig(), ModelConfig(), LossConfig()
    torch.manual_seed(0)
    model = MAPConNet(model_cfg).train()
    if cfg.compile:
        compile_for_training(model)
    optimizer = make_optimizer(model, cfg.lr, cfg.optimizer)
    stream = BodyStream("labelled", cfg.stream_resolution, cfg.seed)
    counter = iter(range(0, 10**9, cfg.batch_size))

    def step():
        g = next(counter)
        batch = torch.utils.data.default_collate(stream.__getitems__(list(range(g, g + cfg.batch_size))))
        optimizer.zero_grad(set_to_none=True)
        weighted_total(supervised_losses(model, batch, loss_cfg), loss_cfg).backward()
        optimizer.step()
        sync(torch.device("cpu"))

    return step


def test_default_training_step(benchmark, machine):
    step = default_step()
    start = time.perf_counter()
    step()  # compiles
    first = time.perf_counter() - start
    benchmark.group = "default training step (lite, batch 2)"
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    stats = benchmark.stats.stats
    benchmark.extra_info.update({**machine, "op": "default_step", "provider": "auto", "N": 1723, "B": 2,
                                 "first_step_s": first, "median_s": stats.median, "min_s": stats.min,
                                 "status": "ok"})
