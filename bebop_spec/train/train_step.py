"""One training step of the MTP head: draw chains, run the chain, weight the loss, update.

    loss, stats = chain_loss(cfg, target, head, batch, step)      # one process, whole batch
    stats = optimizer_step(cfg, target, head, opt, batch, step, world)

The chains of step s are drawn from the global batch with a generator seeded by (seed, s), on
every rank alike; each rank then trains on the chains in its rows (train/distributed.py), with
its loss weighted by its share of the chains so that the summed gradient is one process's.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from bebop_spec.train.chain import select_starts, teacher_forced_chain
from bebop_spec.train.data import Batch, DistillDataset, iterate_batches
from bebop_spec.train.distributed import World, all_reduce_sum, shard_batch, sum_gradients
from bebop_spec.train.losses import get_loss, soft_acceptance

if TYPE_CHECKING:
    from bebop_spec.train.trainer import TrainConfig

# (local batch) -> the target's hidden [B, T, H] for its rows, e.g. read from a cache
Hiddens = Callable[[Batch], Tensor]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warmup, then cosine decay."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def compute_context(cfg: TrainConfig):
    """Autocast context of the forward passes: bfloat16 matmuls over the float32 master weights
    (cfg.compute_dtype); the losses run outside it, on float32 logits."""
    if cfg.compute_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16)


@functools.lru_cache(maxsize=4)
def _draft_ids(directory: str, size: int, vocab: int) -> Tensor:
    from bebop_spec.models.mtp_io import load_draft_vocab

    return torch.tensor(load_draft_vocab(directory, size, vocab), dtype=torch.long)


def draft_ids(cfg: TrainConfig, vocab: int) -> Tensor | None:
    """The draft vocabulary's token ids [K] the head trains over (cfg.draft_vocab), or None."""
    if not cfg.draft_vocab:
        return None
    return _draft_ids(str(cfg.draft_vocab), cfg.draft_vocab_size, vocab).to(cfg.device)


def chain_loss(cfg: TrainConfig, target: nn.Module, head: nn.Module, batch: Batch,
               step: int = 0, world: World = World(),
               hiddens: Hiddens | None = None) -> tuple[Tensor, dict]:  # fmt: skip
    """The configured loss on this rank's chains of the global batch, plus diagnostics:
    num_chains (this rank's n), total_chains (the batch's N), tokens (the batch's). The subset
    (cfg.max_chains of the whole batch) is drawn from a generator seeded by (cfg.seed, step)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    rows, starts = select_starts(batch.loss_mask, cfg.gamma, cfg.max_chains, gen)
    total, tokens = rows.numel(), int(batch.lengths.sum())  # of the global batch
    batch, rows, starts = shard_batch(batch, rows, starts, world)
    dev = cfg.device
    ids, mask = batch.input_ids.to(dev), batch.loss_mask.to(dev)
    hidden = None if hiddens is None else hiddens(batch).to(dev)
    with compute_context(cfg):
        chain = teacher_forced_chain(target, head, ids, mask, cfg.gamma,
                                     context=cfg.chain_context, chains=(rows.to(dev),
                                     starts.to(dev)), hidden=hidden,
                                     draft_ids=draft_ids(cfg, target.config.vocab_size))  # fmt: skip
    loss = get_loss(cfg.loss)(
        chain.draft_logits, chain.target_logits, chain.labels, chain.mask, cfg.chunk_size
    )
    acc = soft_acceptance(chain.draft_logits, chain.target_logits, chain.mask, cfg.chunk_size)
    stats = {
        "loss": loss.item(),
        "alpha": [round(a, 6) for a in acc.alpha.tolist()],
        "accepted_length": acc.accepted_length.item(),
        "num_chains": chain.num_chains,
        "total_chains": total,
        "tokens": tokens,
    }
    return loss, stats


def optimizer_step(cfg: TrainConfig, target: nn.Module, head: nn.Module,
                   opt: torch.optim.Optimizer, batch: Batch, step: int, world: World = World(),
                   hiddens: Hiddens | None = None) -> dict:  # fmt: skip
    """One AdamW update of the head at step `step` (0-based) on the global `batch`; returns
    the step's stats over the whole batch (the values one process logs)."""
    lr = lr_at(step, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    loss, stats = chain_loss(cfg, target, head, batch, step, world, hiddens)
    share = stats["num_chains"] / max(1, stats["total_chains"])  # n_r / N; 1.0 for one process
    opt.zero_grad(set_to_none=True)
    (loss * share).backward()
    sum_gradients(head, world)
    norm = torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip or float("inf"))
    opt.step()
    return {**_global_stats(stats, share, world), "lr": lr, "grad_norm": norm.item()}


def _global_stats(stats: dict, share: float, world: World) -> dict:
    """Chain-weighted sums Σ_r (n_r / N)·x_r of the ranks' loss, α and accepted length: the
    one-process means over all N chains."""
    out = {k: v for k, v in stats.items() if k != "total_chains"}
    out["num_chains"] = stats["total_chains"]
    if world.size == 1:
        return out
    local = torch.tensor([stats["loss"], stats["accepted_length"], *stats["alpha"]],
                         dtype=torch.float64) * share  # fmt: skip
    mean = all_reduce_sum(local, world).tolist()
    return {**out, "loss": mean[0], "accepted_length": mean[1],
            "alpha": [round(a, 6) for a in mean[2:]]}  # fmt: skip


@torch.no_grad()
def evaluate_head(cfg: TrainConfig, target: nn.Module, head: nn.Module, ds: DistillDataset,
                  num_batches: int = 4, hiddens: Hiddens | None = None) -> dict:  # fmt: skip
    """Mean loss, α[γ] and accepted length over the first num_batches batches (seed cfg.seed),
    each rank on the whole batch."""
    was_training = head.training
    head.eval()
    batches = iterate_batches(ds, cfg.batch_size, cfg.seq_len, cfg.seed, cfg.gamma)
    runs = [chain_loss(cfg, target, head, next(batches), i, hiddens=hiddens)[1]
            for i in range(num_batches)]  # fmt: skip
    head.train(was_training)
    gamma = cfg.gamma
    return {
        "loss": sum(r["loss"] for r in runs) / num_batches,
        "alpha": [sum(r["alpha"][i] for r in runs) / num_batches for i in range(gamma)],
        "accepted_length": sum(r["accepted_length"] for r in runs) / num_batches,
    }
