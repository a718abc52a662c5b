"""Pre-RL MTP head training on self-distillation data (DESIGN §2–3).

    cfg = TrainConfig(model="path/to/target", data="path/to/dataset", out="runs/mtp",
                      loss="e2e_tv", gamma=3, steps=2000)
    result = train_mtp(cfg)          # resumes from out/checkpoint if present
    plot_training_curve(result.log_path, result.out_dir / "training_curve.png")

The target is frozen (eval, requires_grad False, run under no_grad); only the head's
parameters are in the AdamW optimiser. Output directory:
    checkpoint/        head.safetensors, optimizer.safetensors, trainer_state.json, head/
    head/              the final head, saved in the serving layout (save_mtp_head)
    train_log.jsonl    one line per logged step: step, loss, alpha[γ], accepted_length, lr, ...
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bebop_spec.train.chain import CONTEXTS, teacher_forced_chain
from bebop_spec.train.checkpoint import load_checkpoint, save_checkpoint
from bebop_spec.train.data import Batch, DistillDataset, iterate_batches, read_dataset
from bebop_spec.train.distributed import (
    World,
    all_reduce_sum,
    close_world,
    init_world,
    shard_rows,
    sum_gradients,
)
from bebop_spec.train.losses import LOSSES, get_loss, soft_acceptance

LAYOUTS = ("qwen3_next", "deepseek_v3")
LOG_FILE = "train_log.jsonl"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainConfig:
    model: str  # target checkpoint directory (HF layout)
    data: str  # self-distillation dataset directory (train.data)
    out: str  # output directory (checkpoints, log, final head)
    loss: str = "e2e_tv"  # one of LOSSES: ce | fkl | rkl | tv | e2e_tv
    gamma: int = 3  # chain length trained (number of speculative tokens served)
    lr: float = 1e-4
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 2048  # sequences are truncated to this many tokens
    warmup: int = 50  # linear warmup steps, then cosine decay to min_lr_ratio·lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    seed: int = 0
    init_from: str | None = (
        None  # None: fresh head; "target": the checkpoint's own head; or a head dir
    )
    save_every: int = 200  # checkpoint every N steps (and at the end); 0: only at the end
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
            ("layout", self.layout in LAYOUTS, f"must be one of {LAYOUTS}"),
            ("chunk_size", self.chunk_size >= 1, "must be >= 1"),
            ("log_every", self.log_every >= 1, "must be >= 1"),
            ("num_layers", self.num_layers >= 1, "must be >= 1"),
            ("max_chains", self.max_chains >= 0, "must be >= 0 (0: all)"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("dtype", self.dtype in _DTYPES, f"must be one of {sorted(_DTYPES)}"),
            ("chain_context", self.chain_context in CONTEXTS, f"must be one of {CONTEXTS}"),
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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warmup, then cosine decay."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


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


def _build(cfg: TrainConfig):
    """(loaded target bundle, trainable head) per cfg.init_from, both validated."""
    from bebop_spec.models import init_mtp_head, load_model

    # init_from None: no head to load (mtp=False); "target": the checkpoint's own (mtp=None)
    mtp = {None: False, "target": None}.get(cfg.init_from, cfg.init_from)
    loaded = load_model(cfg.model, mtp=mtp, dtype=cfg.torch_dtype, device=cfg.device)
    _freeze(loaded.target)
    if cfg.init_from is None:
        head = init_mtp_head(loaded.config, cfg.layout, cfg.num_layers, cfg.seed)
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


# ---------------------------------------------------------------- one step


def chain_loss(
    cfg: TrainConfig, target: nn.Module, head: nn.Module, batch, step: int = 0
) -> tuple[Tensor, dict]:
    """The configured loss on one batch's complete chains, plus its diagnostics. The chain
    subset (cfg.max_chains) is drawn from a generator seeded by (cfg.seed, step)."""
    ids, mask = batch.input_ids.to(cfg.device), batch.loss_mask.to(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    chain = teacher_forced_chain(target, head, ids, mask, cfg.gamma, cfg.max_chains, gen,
                                 context=cfg.chain_context)  # fmt: skip
    loss = get_loss(cfg.loss)(
        chain.draft_logits, chain.target_logits, chain.labels, chain.mask, cfg.chunk_size
    )
    acc = soft_acceptance(chain.draft_logits, chain.target_logits, chain.mask, cfg.chunk_size)
    stats = {
        "loss": loss.item(),
        "alpha": [round(a, 6) for a in acc.alpha.tolist()],
        "accepted_length": acc.accepted_length.item(),
        "num_chains": chain.num_chains,
    }
    return loss, stats


@torch.no_grad()
def evaluate_head(
    cfg: TrainConfig, target: nn.Module, head: nn.Module, ds: DistillDataset, num_batches: int = 4
) -> dict:
    """Mean loss, α[γ] and accepted length over the first num_batches batches (seed cfg.seed)."""
    was_training = head.training
    head.eval()
    batches = iterate_batches(ds, cfg.batch_size, cfg.seq_len, cfg.seed, cfg.gamma)
    runs = [chain_loss(cfg, target, head, next(batches), i)[1] for i in range(num_batches)]
    head.train(was_training)
    gamma = cfg.gamma
    return {
        "loss": sum(r["loss"] for r in runs) / num_batches,
        "alpha": [sum(r["alpha"][i] for r in runs) / num_batches for i in range(gamma)],
        "accepted_length": sum(r["accepted_length"] for r in runs) / num_batches,
    }


# ---------------------------------------------------------------- loop


def _open_log(path: Path, keep_through: int) -> None:
    """Drop records past the resumed step (written after the last checkpoint of a crashed run)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln)["step"] <= keep_through]
    path.write_text("".join(ln + "\n" for ln in kept))


def _postfix(stats: dict) -> dict:
    return {"loss": f"{stats['loss']:.4f}", "α": "/".join(f"{a:.2f}" for a in stats["alpha"])}


def _optimizer_step(cfg: TrainConfig, target, head, opt, batch, step: int,
                    world: World = World()) -> dict:  # fmt: skip
    """One AdamW update of the head at step `step` (0-based) on the global `batch` (this rank
    takes its rows: train/distributed.py); returns the step's stats over the whole batch."""
    lr = lr_at(step, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    if world.size > 1:
        batch = Batch(*(shard_rows(t, world) for t in (batch.input_ids, batch.loss_mask,
                                                        batch.lengths)))  # fmt: skip
    loss, stats = chain_loss(cfg, target, head, batch, step)
    n = float(stats["num_chains"])
    total = float(all_reduce_sum(torch.tensor([n]), world)) if world.size > 1 else n
    opt.zero_grad(set_to_none=True)
    (loss * (n / total) if world.size > 1 else loss).backward()
    sum_gradients(head, world)
    norm = torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip or float("inf"))
    opt.step()
    return {**_global_stats(stats, n, total, world), "lr": lr, "grad_norm": norm.item()}


def _global_stats(stats: dict, n: float, total: float, world: World) -> dict:
    """Chain-weighted means of the ranks' loss, α and accepted length (the one-process values)."""
    if world.size == 1:
        return stats
    local = torch.tensor([stats["loss"], stats["accepted_length"], *stats["alpha"]],
                         dtype=torch.float64) * (n / total)  # fmt: skip
    mean = all_reduce_sum(local, world).tolist()
    return {**stats, "loss": mean[0], "accepted_length": mean[1],
            "alpha": [round(a, 6) for a in mean[2:]], "num_chains": int(total)}  # fmt: skip


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
    loaded, head = _build(cfg)
    _check_data(ds, loaded.config)
    target = loaded.target
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
        _open_log(log_path, start)
    batches = iterate_batches(ds, cfg.batch_size, cfg.seq_len, cfg.seed, cfg.gamma, start)

    records, stats = [], None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"mtp {cfg.loss}",
               disable=not world.main)  # fmt: skip
    t0 = time.perf_counter()
    for step in bar:
        stats = _optimizer_step(cfg, target, head, opt, next(batches), step, world)
        bar.set_postfix(_postfix(stats))
        done = step + 1
        if not world.main:
            continue
        if done % cfg.log_every == 0 or done == cfg.steps:
            rec = {"step": done, **stats, "elapsed_s": round(time.perf_counter() - t0, 3)}
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            records.append(rec)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            save_checkpoint(ckpt, head, opt, done, cfg, loaded.config)
    bar.close()
    final = max(start, cfg.steps)
    head_dir = out / "head"
    if world.main:
        save_checkpoint(ckpt, head, opt, final, cfg, loaded.config)
        _export(head, head_dir, cfg, loaded.config)
    if stats is None:  # nothing left to do after a resume: report the head as it is
        stats = evaluate_head(cfg, target, head, ds, num_batches=1)
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


def _export(head: nn.Module, head_dir: Path, cfg: TrainConfig, target_config) -> None:
    from bebop_spec.models import save_mtp_head

    layout = getattr(head, "layout", cfg.layout)
    save_mtp_head(head, head_dir, layout, target_config, cfg.torch_dtype)


# ---------------------------------------------------------------- plotting


def read_log(log_path: str | Path) -> list[dict]:
    """The JSONL training log as a list of records."""
    lines = Path(log_path).read_text().splitlines()
    return [json.loads(ln) for ln in lines if ln.strip()]


def plot_training_curve(log_path: str | Path, out_png: str | Path) -> Path:
    """Loss and per-position soft acceptance against step, from the JSONL log, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    if not records:
        raise ValueError(f"{log_path}: no records to plot")
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_alpha) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(steps, [r["loss"] for r in records])
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    for i in range(len(records[0]["alpha"])):
        ax_alpha.plot(steps, [r["alpha"][i] for r in records], label=f"α{i + 1}")
    ax_alpha.set(xlabel="step", ylabel="Σ min(p, q)", title="soft acceptance per position")
    ax_alpha.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


__all__ = [
    "TrainConfig",
    "TrainResult",
    "chain_loss",
    "evaluate_head",
    "lr_at",
    "plot_training_curve",
    "read_log",
    "train_mtp",
]
