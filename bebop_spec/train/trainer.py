"""Pre-RL MTP head training on self-distillation data (DESIGN §2–3).

    cfg = TrainConfig(model="path/to/target", data="path/to/dataset", out="runs/mtp",
                      loss="e2e_tv", gamma=3, steps=2000)
    result = train_mtp(cfg)          # resumes from out/checkpoint if present
    plot_training_curve(result.log_path, result.out_dir / "training_curve.png")

The target is frozen (eval, requires_grad False, run under no_grad); only the head's
parameters are in the AdamW optimiser. One step is train/train_step.py; under torchrun the
ranks train data-parallel on shards of each global batch (train/distributed.py), optionally
with the target's layers sharded over them (shard_target, FSDP2); cache_hiddens runs the
target once over the data and reads its hidden states from disk (train/hidden_cache.py).
Output directory (written by rank 0 only):
    checkpoint/        head.safetensors, optimizer.safetensors, trainer_state.json, head/
    head/              the final head, saved in the serving layout (save_mtp_head)
    train_log.jsonl    one line per logged step: step, loss, alpha[γ], accepted_length, lr, ...
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from bebop_spec.train.chain import CONTEXTS
from bebop_spec.train.checkpoint import load_checkpoint, save_checkpoint
from bebop_spec.train.data import DistillDataset, iterate_batches, read_dataset
from bebop_spec.train.distributed import World, close_world, init_world, shard_target
from bebop_spec.train.draft_vocab import copy_draft_vocab
from bebop_spec.train.losses import LOSSES
from bebop_spec.train.train_log import (
    LOG_FILE,
    append_record,
    plot_training_curve,
    read_log,
    truncate_log,
)
from bebop_spec.train.train_step import chain_loss, evaluate_head, lr_at, optimizer_step

LAYOUTS = ("qwen3_next", "deepseek_v3")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclass
class TrainConfig:
    model: str  # target checkpoint directory (HF layout)
    data: str  # self-distillation dataset directory (train.data)
    out: str  # output directory (checkpoints, log, final head)
    loss: str = "e2e_tv"  # one of LOSSES: ce | fkl | rkl | tv | e2e_tv | nla | lk
    gamma: int = 3  # chain length trained (number of speculative tokens served)
    lr: float = 1e-4
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 2048  # sequences are truncated to this many tokens
    warmup: int = 50  # linear warmup steps, then cosine decay to min_lr_ratio·lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    seed: int = 0
    # None: fresh head; "last_layer": the target's last layer (train/head_init.py);
    # "target": the checkpoint's own head; or a head dir
    init_from: str | None = None
    save_every: int = 200  # checkpoint every N steps (and at the end); 0: only at the end
    snapshot_every: int = 0  # also export the head to out/snapshots/step_N every N steps (0: none)
    layout: str = "qwen3_next"  # parameter layout of a fresh head
    chunk_size: int = 8192  # vocab chunk of the TV losses
    log_every: int = 10
    num_layers: int = 1  # decoder layers of a fresh head
    max_chains: int = 0  # chains per batch, drawn at random; 0: all complete chains
    weight_decay: float = 0.0
    min_lr_ratio: float = 0.1
    device: str = "cpu"
    dtype: str = "float32"  # target weights and the exported head; the head trains in float32
    chain_context: str = "serve"  # what the head's attention sees in the chain (train/chain.py)
    compute_dtype: str = "float32"  # forward matmuls; "bfloat16": autocast, fp32 master weights
    shard_target: bool = False  # under torchrun: FSDP2-shard the target's layers over the ranks
    cache_hiddens: str | None = None  # directory caching the target's hidden states (offline)
    # a directory with draft_vocab.json: the head trains drafting over its draft_vocab_size
    # most frequent tokens, q = 0 elsewhere, as the engine serves it (train/chain.py)
    draft_vocab: str | None = None
    draft_vocab_size: int = 8192

    def __post_init__(self) -> None:
        checks = [
            ("loss", self.loss in LOSSES, f"must be one of {sorted(LOSSES)}"),
            ("gamma", self.gamma >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("steps", self.steps >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("seq_len", self.seq_len >= self.gamma + 2, "must be >= gamma + 2"),
            ("warmup", self.warmup >= 0, "must be >= 0"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0"),
            ("save_every", self.save_every >= 0, "must be >= 0"),
            ("snapshot_every", self.snapshot_every >= 0, "must be >= 0"),
            ("layout", self.layout in LAYOUTS, f"must be one of {LAYOUTS}"),
            ("chunk_size", self.chunk_size >= 1, "must be >= 1"),
            ("log_every", self.log_every >= 1, "must be >= 1"),
            ("num_layers", self.num_layers >= 1, "must be >= 1"),
            ("max_chains", self.max_chains >= 0, "must be >= 0 (0: all)"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("dtype", self.dtype in _DTYPES, f"must be one of {sorted(_DTYPES)}"),
            ("chain_context", self.chain_context in CONTEXTS, f"must be one of {CONTEXTS}"),
            ("compute_dtype", self.compute_dtype in COMPUTE_DTYPES, f"must be in {COMPUTE_DTYPES}"),
            ("draft_vocab_size", self.draft_vocab_size >= 1, "must be >= 1"),
            (
                "chain_context",
                self.chain_context != "serve" or self.num_layers == 1,
                "needs a one-layer head (num_layers=1); use 'causal' for more layers",
            ),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} {why}")

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


@dataclass
class TrainResult:
    step: int  # optimiser steps done in total (including before a resume)
    loss: float  # last step's training loss
    alpha: list[float]  # last step's soft acceptance per position
    accepted_length: float  # last step's expected accepted drafts per chain
    out_dir: Path
    head_dir: Path  # final head in the serving layout
    log_path: Path
    head: nn.Module = field(repr=False)
    records: list[dict] = field(default_factory=list, repr=False)  # logged this call


# ---------------------------------------------------------------- setup


def _freeze(target: nn.Module) -> nn.Module:
    target.eval()
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def _check_head(head: nn.Module, config) -> None:
    """ValueError if the head's hidden size or vocabulary does not fit the target's."""
    for key in ("hidden_size", "vocab_size"):
        ours, theirs = getattr(config, key), getattr(head.config, key)
        if ours != theirs:
            raise ValueError(f"MTP head {key} {theirs} does not match the target's {ours}")
    fc = head.parts(0)[2].weight  # [H, 2H]: cat(embedding, hidden) -> hidden
    if tuple(fc.shape) != (config.hidden_size, 2 * config.hidden_size):
        raise ValueError(
            f"MTP head fc weight {list(fc.shape)} does not fit hidden size {config.hidden_size}"
        )


def _check_data(ds: DistillDataset, config) -> None:
    top = int(ds.input_ids.max())
    if top >= config.vocab_size:
        raise ValueError(
            f"dataset token id {top} is outside the target's vocabulary ({config.vocab_size})"
        )


def _build(cfg: TrainConfig, sharded: bool = False):
    """(loaded target bundle, trainable head) per cfg.init_from, both validated. A target to
    be sharded is loaded on the CPU: fully_shard moves it to the device a layer at a time."""
    from bebop_spec.models import init_mtp_head, load_model

    # init_from None / "last_layer": no head to load (mtp=False); "target": the checkpoint's
    mtp = {None: False, "last_layer": False, "target": None}.get(cfg.init_from, cfg.init_from)
    device = "cpu" if sharded else cfg.device
    loaded = load_model(cfg.model, mtp=mtp, dtype=cfg.torch_dtype, device=device)
    _freeze(loaded.target)
    if cfg.init_from in (None, "last_layer"):
        head = init_mtp_head(loaded.config, cfg.layout, cfg.num_layers, cfg.seed)
        if cfg.init_from == "last_layer":
            from bebop_spec.train.head_init import init_from_last_layer

            init_from_last_layer(head, loaded.target)
    else:
        head = loaded.mtp
        if head is None:
            raise ValueError(f"init_from={cfg.init_from!r}: no MTP head found to start from")
    head = head.to(device=cfg.device, dtype=torch.float32)
    _check_head(head, loaded.config)
    head.train()
    for p in head.parameters():
        p.requires_grad_(True)
    return loaded, head


# ---------------------------------------------------------------- loop


def train_mtp(cfg: TrainConfig) -> TrainResult:
    """Train (or resume training) an MTP head per cfg; see the module docstring. Under
    torchrun the ranks train data-parallel (train/distributed.py)."""
    world = init_world(cfg.device)
    if world.size > 1:
        if cfg.batch_size % world.size:
            raise ValueError(f"batch_size={cfg.batch_size} must be a multiple of the "
                             f"{world.size} ranks")  # fmt: skip
        cfg = dataclasses.replace(cfg, device=world.device)
    try:
        return _train(cfg, world)
    finally:
        close_world(world)


def _train(cfg: TrainConfig, world: World) -> TrainResult:
    torch.manual_seed(cfg.seed)
    ds = read_dataset(cfg.data)
    sharded = cfg.shard_target and world.size > 1
    loaded, head = _build(cfg, sharded)
    _check_data(ds, loaded.config)
    target = loaded.target
    if sharded:
        shard_target(target, world)
    hiddens = None
    if cfg.cache_hiddens:
        from bebop_spec.train.hidden_cache import open_hidden_cache

        hiddens = open_hidden_cache(cfg, target, ds, world)
    opt = torch.optim.AdamW(
        head.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
    )
    out = cfg.out_dir
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    start = load_checkpoint(ckpt, head, opt, cfg) if ckpt.exists() else 0
    log_path = out / LOG_FILE
    if world.main:
        truncate_log(log_path, start)
    batches = iterate_batches(ds, cfg.batch_size, cfg.seq_len, cfg.seed, cfg.gamma, start)

    records, stats = [], None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"mtp {cfg.loss}",
               disable=not world.main)  # fmt: skip
    t0 = time.perf_counter()
    for step in bar:
        stats = optimizer_step(cfg, target, head, opt, next(batches), step, world, hiddens)
        bar.set_postfix(_postfix(stats))
        done = step + 1
        if not world.main:
            continue
        if done % cfg.log_every == 0 or done == cfg.steps:
            rec = {"step": done, **stats, "elapsed_s": round(time.perf_counter() - t0, 3)}
            append_record(log_path, rec)
            records.append(rec)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            save_checkpoint(ckpt, head, opt, done, cfg, loaded.config)
        if cfg.snapshot_every and done % cfg.snapshot_every == 0:
            _export(head, snapshot_dir(out, done), cfg, loaded.config)
    bar.close()
    final = max(start, cfg.steps)
    head_dir = out / "head"
    if world.main:
        save_checkpoint(ckpt, head, opt, final, cfg, loaded.config)
        _export(head, head_dir, cfg, loaded.config)
    if stats is None:  # nothing left to do after a resume: report the head as it is
        stats = evaluate_head(cfg, target, head, ds, num_batches=1, hiddens=hiddens)
    return TrainResult(
        step=final,
        loss=stats["loss"],
        alpha=stats["alpha"],
        accepted_length=stats["accepted_length"],
        out_dir=out,
        head_dir=head_dir,
        log_path=log_path,
        head=head,
        records=records,
    )


def snapshot_dir(out: Path, step: int) -> Path:
    """Where TrainConfig.snapshot_every exports the head after `step` optimiser steps."""
    return Path(out) / "snapshots" / f"step_{step:06d}"


def _postfix(stats: dict) -> dict:
    return {"loss": f"{stats['loss']:.4f}", "α": "/".join(f"{a:.2f}" for a in stats["alpha"])}


def _export(head: nn.Module, head_dir: Path, cfg: TrainConfig, target_config) -> None:
    from bebop_spec.models import save_mtp_head

    layout = getattr(head, "layout", cfg.layout)
    save_mtp_head(head, head_dir, layout, target_config, cfg.torch_dtype)
    if cfg.draft_vocab:  # the head ships the vocabulary it was trained to draft over
        copy_draft_vocab(cfg.draft_vocab, head_dir, cfg.draft_vocab_size)


__all__ = [
    "LOG_FILE",
    "TrainConfig",
    "TrainResult",
    "chain_loss",
    "evaluate_head",
    "lr_at",
    "optimizer_step",
    "plot_training_curve",
    "read_log",
    "snapshot_dir",
    "train_mtp",
]
