"""End-to-end: one supervised training step of the full model (forward, every loss term,
backward, Adam step) at the `smpl`, `full` and `x4` resolutions (6,890, 13,348 and ~53k
vertices), dense torch backend vs the streaming ones (chunked on CPU, triton on CUDA).

The step is train.py's own (`train.supervised_losses` + `train.weighted_total`) on random meshes
of the given size with random faces: memory and time do not depend on the geometry.
"""
from __future__ import annotations

import pytest
import torch

import train
from bench._harness import Case, grid, sync
from mapconnet.losses import LossConfig
from mapconnet.model import MAPConNet, ModelConfig

RESOLUTIONS = {"smpl": 6890, "full": 13348, "x4": 53_386}
PROVIDERS = ("torch", "chunked", "triton")


def training_step(case: Case, dev: torch.device):
    """(setup, target) timing one optimiser step at N = case.n vertices."""
    model = MAPConNet(ModelConfig(backend=case.provider)).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.0, 0.9), eps=1e-3)
    gen = torch.Generator().manual_seed(0)
    mesh = lambda n: (torch.rand(case.b, n, 3, generator=gen) - 0.5).to(dev)  # noqa: E731
    batch = {"identity": mesh(case.n), "pose": mesh(case.m), "target": mesh(case.n),
             "identity_faces": torch.randint(0, case.n, (case.b, 2 * case.n, 3), generator=gen).to(dev)}
    loss_cfg = LossConfig()

    def setup():
        opt.zero_grad(set_to_none=True)
        return (), {}

    def target():
        train.weighted_total(train.supervised_losses(model, batch, loss_cfg, case.provider), loss_cfg).backward()
        opt.step()
        sync(dev)

    return setup, target


def quick(c):
    return False  # about a minute per step on 2 cores even at 6,890 vertices: `make bench-full` only


@pytest.mark.parametrize("case", grid("train_step", PROVIDERS, tuple(RESOLUTIONS.values()), (256,), (1,),
                                      ("fwd+bwd",), quick))
def test_train_step(run_case, case):
    run_case(case)
