"""End-to-end: one supervised training step of the default model (forward, every loss term,
backward, Adam step) at the `smpl`, `full` and `x4` resolutions (6,890, 13,348 and ~53k
vertices), dense torch backend vs the streaming ones (chunked on CPU, triton on CUDA).

The step is train.py's own, built by `bench.step_memory.random_training_step` on random meshes of
the given size with random faces: memory and time do not depend on the geometry.
"""
from __future__ import annotations

import pytest
import torch

from bench._harness import Case, grid, sync
from bench.step_memory import random_training_step

RESOLUTIONS = {"smpl": 6890, "full": 13348, "x4": 53_386}
PROVIDERS = ("torch", "chunked", "triton")


def training_step(case: Case, dev: torch.device):
    """(setup, target) timing one optimiser step at N = case.n vertices."""
    optimizer, step = random_training_step(case.provider, case.n, case.b, m=case.m, device=dev)

    def setup():
        optimizer.zero_grad(set_to_none=True)
        return (), {}

    def target():
        step()
        sync(dev)

    return setup, target


def quick(c):
    return False  # about a minute per step on 2 cores even at 6,890 vertices: `make bench-full` only


@pytest.mark.parametrize("case", grid("train_step", PROVIDERS, tuple(RESOLUTIONS.values()), (256,), (1,),
                                      ("fwd+bwd",), quick))
def test_train_step(run_case, case):
    run_case(case)
