"""Multi-process training on torch.distributed (docs/DESIGN.md, "Distributed training").

    torchrun --standalone --nproc_per_node 2 train.py --batch-size 4 ...      # one machine
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 --rdzv-id RUN train.py ...                 # every machine

The training loop asks three things of this module: who it is (`Team`), which of the global
batch's samples are its own (`ShardedCount`), and to agree with rank 0 on what only rank 0 does
(`from_leader`: lock the run folder, read the checkpoint; its error becomes every rank's error, so
no rank waits in a collective for a rank that has already failed). Gradients are averaged by
DistributedDataParallel; every loss term is a mean over the samples of a batch, so the mean of the
ranks' equal shards is the single-process loss of the whole batch.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Team:
    """This process's place in the job: rank (0 .. world - 1) and its rank on its machine."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def leader(self) -> bool:
        """Rank 0 validates, logs, plots and writes checkpoints; the others only train."""
        return self.rank == 0


SOLO = Team()  # a plain `python train.py`


def join(device: str) -> tuple[Team, str]:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, ...) and
    return (team, this rank's device); a plain `python train.py` is a team of one and joins nothing.
    Backend nccl for CUDA, gloo for CPU; on CUDA each process takes the GPU of its local rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SOLO, device
    team = Team(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{team.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return team, device


def leave(team: Team) -> None:
    """Tear the process group down (after the last collective of the job)."""
    if team.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def from_leader(team: Team, fn):
    """Run `fn()` on rank 0 and give every rank its result (any picklable value). If it raises,
    rank 0 re-raises the error and every other rank raises RuntimeError naming it."""
    if team.world == 1:
        return fn()
    box, error = [None, None], None
    if team.leader:
        try:
            box[0] = fn()
        except Exception as e:  # noqa: BLE001 - handed to the other ranks, then re-raised below
            error, box[1] = e, f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise RuntimeError(f"rank 0 failed, so rank {team.rank} stops too: {box[1]}")
    return box[0]


def mean_over_ranks(team: Team, values: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over all ranks (the global batch's mean of per-shard means)."""
    if team.world == 1:
        return values
    values = values.detach().clone()
    dist.all_reduce(values)
    return values / team.world


def local_batch(team: Team, batch_size: int) -> int:
    """This rank's share of the global `batch_size`; ValueError when it does not split evenly."""
    if batch_size % team.world:
        raise ValueError(f"--batch-size is the global batch and {batch_size} does not split evenly over "
                         f"{team.world} processes; use a multiple of {team.world}")
    return batch_size // team.world


class ShardedCount(torch.utils.data.Sampler):
    """Global sample indices of consecutive global batches from `start`, this rank's share only.

    Global batch t holds indices start + t * batch_size + (0 .. batch_size - 1); rank r of W takes
    the r-th of W equal slices, so the W ranks together draw exactly what one process draws, and a
    run resumed with another number of processes continues the same sample sequence.
    """

    def __init__(self, start: int, batch_size: int, team: Team = SOLO):
        self.start, self.batch_size, self.team = start, batch_size, team
        self.share = local_batch(team, batch_size)

    def __iter__(self):
        first = self.start + self.team.rank * self.share
        for t in itertools.count():
            yield from range(first + t * self.batch_size, first + t * self.batch_size + self.share)
