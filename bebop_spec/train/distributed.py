"""Data-parallel head training under torchrun: process group, sharding, gradient sums.

    torchrun --nproc-per-node 2 -m bebop_spec.cli mtp train --model M --data D --out O ...

Every rank holds the frozen target and the head, builds the same global batch (the batch of
step s depends only on (seed, s)) and draws the same chains from it (train/train_step.py).
It then takes its rows rank, rank + W, ... and the chains that start in them. The loss of
one process is the mean over all N chains; its gradient is Σ_r (n_r / N) ∇ loss_r, where
rank r's loss_r is the mean over its n_r chains. So each rank scales its loss by n_r / N
(N is known on every rank: the chains are drawn from the global batch) and the gradients are
summed with one all-reduce: W ranks take the optimiser step one process takes on the whole
batch, up to float summation order. Plain averaging (weights 1 / W) is not that step when
the ranks hold different chain counts. The optimiser state is then identical on every rank
and a checkpoint is independent of W: a run resumes at any world size. Only rank 0 writes
logs, checkpoints and the exported head. gloo on CPU, nccl on CUDA (rank on cuda:LOCAL_RANK).

The gradient all-reduce is explicit rather than torch's DDP wrapper: the head runs γ chained
passes per step through its submodules (train/chain.py), which DDP's forward hooks do not see.

`shard_target` splits the frozen target's decoder layers over the ranks with FSDP2
(`fully_shard`, gloo on CPU or nccl on CUDA): each layer is all-gathered for its forward and
freed after it; the embedding, final norm and LM head stay whole on every rank, because the
chain calls them outside the target's forward (head inputs and logits).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bebop_spec.train.data import Batch


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


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def shard_batch(batch: Batch, rows: Tensor, starts: Tensor,
                world: World) -> tuple[Batch, Tensor, Tensor]:  # fmt: skip
    """Global batch [B, T] and its chains (rows[N], starts[N]) -> this rank's rows b ≡ rank
    (mod W) as a batch [B / W, T], and the chains starting in them (rows renumbered b // W)."""
    if world.size == 1:
        return batch, rows, starts
    part = slice(world.rank, None, world.size)
    index = None if batch.index is None else batch.index[part]
    local = Batch(batch.input_ids[part], batch.loss_mask[part], batch.lengths[part], index)
    mine = rows % world.size == world.rank
    return local, rows[mine] // world.size, starts[mine]


def all_reduce_sum(x: Tensor, world: World) -> Tensor:
    if world.size > 1:
        dist.all_reduce(x)
    return x


def sum_gradients(module: nn.Module, world: World) -> None:
    """Sum every parameter's gradient over the ranks, as one flat buffer (one all-reduce).
    A missing gradient (a rank whose rows hold no chain) counts as zeros."""
    if world.size == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def shard_target(target: nn.Module, world: World) -> None:
    """FSDP2 over the ranks, in place: each of target.model.layers holds 1/W of its weights;
    the root (embedding, final norm, LM head) is gathered once and kept whole. No-op at W=1."""
    if world.size == 1:
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(world.device).type, (world.size,))
    for layer in target.model.layers:
        fully_shard(layer, mesh=mesh)  # reshard after forward: one whole layer at a time
    fully_shard(target, mesh=mesh, reshard_after_forward=False)
    target.unshard()  # embed / compute_logits are called outside forward: keep them whole
