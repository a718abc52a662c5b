"""Offline mode: the frozen target's final hidden states, computed once and read from disk.

    bebop mtp train ... --cache-hiddens runs/cache    # builds it on the first run, then reads it

Training then runs no target forward (only its embedding and LM head), so repeated epochs cost
the head's passes and the logits. Built by every rank at once (rank r writes shards r, r+W, ..)
and usable at any world size. Layout:
    hiddens-{k:05d}.safetensors  hidden [tokens, H] (the forward's dtype), offsets [n+1] int64,
                                 index [n] int64: sequence index[j] is hidden[offsets[j]:..[j+1]]
    meta.json                    what it was built from; written last, so it marks a whole cache
Disk: Σ_i min(L_i, seq_len) tokens × H × bytes per element (cache_bytes); e.g. 200 M tokens of
a 4096-wide model in bfloat16 take 1.6 TB.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from bebop_spec.train.data import Batch, DistillDataset, collate
from bebop_spec.train.distributed import World, barrier
from bebop_spec.train.train_step import compute_context

META_FILE, SHARD_BYTES = "meta.json", 1 << 30  # about 1 GB per shard file


def cache_bytes(num_tokens: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Disk size of the cache: tokens × hidden × bytes per element."""
    return num_tokens * hidden_size * dtype.itemsize


def plan_shards(lengths: list[int], num_shards: int) -> list[range]:
    """Contiguous runs of sequence indices with about equal token counts, num_shards of them
    (fewer if there are fewer sequences)."""
    total, bounds, acc = sum(lengths), [0], 0
    for i, n in enumerate(lengths):
        acc += n
        if acc >= total * len(bounds) / num_shards and len(bounds) < num_shards:
            bounds.append(i + 1)
    if bounds[-1] != len(lengths):
        bounds.append(len(lengths))
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def _meta(cfg, ds: DistillDataset, hidden_size: int, dtype: torch.dtype) -> dict:
    lengths = ds.lengths.clamp(max=cfg.seq_len)
    return {"model": str(Path(cfg.model).resolve()), "data": str(Path(cfg.data).resolve()),
            "seq_len": cfg.seq_len, "num_sequences": len(ds), "dataset_tokens": ds.meta.num_tokens,
            "num_tokens": int(lengths.sum()), "hidden_size": hidden_size,
            "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip


def open_hidden_cache(cfg, target: nn.Module, ds: DistillDataset, world: World) -> HiddenCache:
    """The cache at cfg.cache_hiddens for this target and data, built first if absent (all
    ranks take part); ValueError if the directory holds a cache of other inputs."""
    out = Path(cfg.cache_hiddens)
    hidden_size = target.config.hidden_size
    with torch.no_grad(), compute_context(cfg):  # the dtype the online forward would give
        dtype = target(torch.zeros(1, 1, dtype=torch.long, device=cfg.device),
                       torch.zeros(1, 1, dtype=torch.long, device=cfg.device)).dtype  # fmt: skip
    want = _meta(cfg, ds, hidden_size, dtype)
    if (out / META_FILE).is_file():
        have = json.loads((out / META_FILE).read_text())
        diff = [k for k in want if have.get(k) != want[k]]
        if diff:
            raise ValueError(f"--cache-hiddens {out} was built from other inputs ("
                             + ", ".join(f"{k}={have.get(k)!r}, now {want[k]!r}" for k in diff)
                             + "); use another directory")  # fmt: skip
        return HiddenCache(out)
    tokens, size = want["num_tokens"], cache_bytes(want["num_tokens"], hidden_size, dtype)
    if world.main:
        print(f"caching the target's hidden states: {tokens} tokens × {hidden_size} × "
              f"{dtype.itemsize} B = {size / 1e9:.3f} GB -> {out}", flush=True)  # fmt: skip
    shards = _build(cfg, target, ds, world, out, max(world.size, math.ceil(size / SHARD_BYTES)))
    barrier(world)
    if world.main:
        (out / META_FILE).write_text(json.dumps(want | {"bytes": size, "shards": shards},
                                                indent=2) + "\n")  # fmt: skip
    barrier(world)
    return HiddenCache(out)


def _build(cfg, target: nn.Module, ds: DistillDataset, world: World, out: Path,
           num_shards: int) -> list[str]:  # fmt: skip
    """Write this rank's shards (the target's forward over batch_size sequences at a time);
    returns the names of all ranks' shards. With a sharded target every rank runs the same
    number of forwards (FSDP2's all-gathers pair up)."""
    out.mkdir(parents=True, exist_ok=True)
    lengths = ds.lengths.clamp(max=cfg.seq_len).tolist()
    shards = plan_shards(lengths, num_shards)
    mine = list(range(world.rank, len(shards), world.size))
    per_rank = [sum(math.ceil(len(shards[k]) / cfg.batch_size)
                    for k in range(r, len(shards), world.size)) for r in range(world.size)]  # fmt: skip
    for k in mine:
        parts = []
        for a in range(shards[k].start, shards[k].stop, cfg.batch_size):
            rows = range(a, min(a + cfg.batch_size, shards[k].stop))
            batch = collate([ds.sequence(i) for i in rows], cfg.seq_len)
            hidden = _forward(cfg, target, batch)
            parts += [hidden[b, : int(n)] for b, n in enumerate(batch.lengths)]
        offsets = torch.cumsum(torch.tensor([0] + [p.shape[0] for p in parts]), 0)
        tensors = {"hidden": torch.cat(parts).contiguous(), "offsets": offsets,
                   "index": torch.tensor(list(shards[k]), dtype=torch.int64)}  # fmt: skip
        save_file(tensors, str(out / (_name(k) + ".tmp")))
        (out / (_name(k) + ".tmp")).rename(out / _name(k))
    if cfg.shard_target:
        done = sum(math.ceil(len(shards[k]) / cfg.batch_size) for k in mine)
        for _ in range(max(per_rank) - done):
            _forward(cfg, target, collate([ds.sequence(0)], 1))
    return [_name(k) for k in range(len(shards))]


def _name(shard: int) -> str:
    return f"hiddens-{shard:05d}.safetensors"


@torch.no_grad()
def _forward(cfg, target: nn.Module, batch: Batch) -> Tensor:
    """batch -> hidden [B, T, H] on the CPU, as the trainer's online forward computes it."""
    ids = batch.input_ids.to(cfg.device)
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    with compute_context(cfg):
        return target(ids, positions).cpu()


class HiddenCache:
    """Reads the hidden states of a batch's rows from the shard files (memory-mapped)."""

    def __init__(self, directory: str | Path) -> None:
        meta = json.loads((Path(directory) / META_FILE).read_text())
        self.hidden_size = meta["hidden_size"]
        self._handles, self._files, self._where = [], [], {}
        for name in meta["shards"]:
            f = safe_open(str(Path(directory) / name), framework="pt")
            offsets = f.get_tensor("offsets").tolist()
            for j, seq in enumerate(f.get_tensor("index").tolist()):
                self._where[seq] = (len(self._files), offsets[j], offsets[j + 1])
            self._handles.append(f)
            self._files.append(f.get_slice("hidden"))
        if len(self._where) != meta["num_sequences"]:
            raise ValueError(f"--cache-hiddens {directory}: {len(self._where)} sequences "
                             f"cached of {meta['num_sequences']}; delete it to rebuild")  # fmt: skip

    def __call__(self, batch: Batch) -> Tensor:
        """batch (rows index[B], lengths[B], width T) -> hidden [B, T, H], zeros past a row's end
        (causal attention never lets a chain start see them)."""
        if batch.index is None:
            raise ValueError("HiddenCache needs batches from iterate_batches (Batch.index)")
        b, t = batch.input_ids.shape
        out = None
        for r, (seq, n) in enumerate(zip(batch.index.tolist(), batch.lengths.tolist(),
                                         strict=True)):  # fmt: skip
            k, lo, _ = self._where[seq]
            h = self._files[k][lo : lo + n]
            if out is None:
                out = torch.zeros(b, t, self.hidden_size, dtype=h.dtype)
            out[r, :n] = h
        return out
