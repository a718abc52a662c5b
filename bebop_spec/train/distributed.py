"""Data-parallel head training under torchrun: process group, sharding, gradient averaging.

    torchrun --nproc-per-node 2 -m bebop_spec.cli mtp train --model M --data D --out O ...

Every rank holds the frozen target and the head, builds the same global batch (the batch of
step s depends only on (seed, s)) and takes its rows rank, rank + W, ... . The gradient of
the global loss — the mean over all the batch's chains — is Σ_r (n_r / N) ∇ loss_r, where
rank r's loss_r is the mean over its n_r chains and N = Σ n_r: each rank scales its loss by
n_r / N and the gradients are summed with one all-reduce, so W ranks take the same optimiser
step as one process on the whole batch (up to float summation order). The optimiser state is
then identical on every rank and a checkpoint is independent of W: a run resumes at any
world size. Only rank 0 writes logs, checkpoints and the exported head. gloo on CPU, nccl on
CUDA (each rank on cuda:LOCAL_RANK).

The gradient all-reduce is explicit rather than torch's DDP wrapper: the head runs γ chained
forwards per step, which DDP's one-forward-per-backward hooks do not model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world(device: str) -> World:
    """The torchrun world from its environment (WORLD_SIZE, RANK, LOCAL_RANK), or one process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    dist.barrier()  # rank 0 may have cleared the out directory (--overwrite) just before
    return World(rank, size, device)


def shard_rows(t: torch.Tensor, world: World) -> torch.Tensor:
    """Rows rank, rank + W, ... of a global batch tensor [B, ...]."""
    return t[world.rank :: world.size]


def all_reduce_sum(x: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(x)
    return x


def sum_gradients(module: nn.Module, world: World) -> None:
    """Sum every parameter's gradient over the ranks, as one flat buffer (one all-reduce)."""
    if world.size == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
