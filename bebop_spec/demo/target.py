"""Train the demo target: a small Qwen3 (transformers `Qwen3ForCausalLM`) from scratch on CPU.

    from bebop_spec.demo.target import TargetConfig, train_target
    train_target(TargetConfig(), seed=0, corpus_dir=..., tokenizer_dir=..., out_dir=...)
    AutoModelForCausalLM.from_pretrained(out_dir)          # loads back (safetensors)

Data: every training dialogue rendered as ChatML, followed by <|endoftext|>, in a seeded
shuffled order, concatenated and cut into [steps * batch, seq_len] rows (packing; documents may
straddle rows, attention crosses document boundaries as in GPT-style pretraining). The loss is
next-token cross-entropy on every token. AdamW, linear warm-up then cosine decay.

Determinism: weights and data order are a function of the seed. Bitwise-identical weights also
need the same torch build, CPU kind and thread count (the reduction order of a matmul depends
on how many threads split it), which is why `num_threads` is part of the config.

Speed: on a busy machine, OpenMP threads that spin while waiting for a descheduled sibling made
a step 4x slower with 2 threads than with 1 (measured on 2 shared cores). Run with
`OMP_WAIT_POLICY=PASSIVE` in the environment (read when torch loads) or `num_threads=1` there.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen3Config, Qwen3ForCausalLM

from bebop_spec.demo.chat import ENDOFTEXT, IM_END
from bebop_spec.demo.corpus import DOMAINS, load_examples
from bebop_spec.hardware import cpu_has_bf16_units


@dataclass(frozen=True)
class TargetConfig:
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 768
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    seq_len: int = 512
    batch_size: int = 4
    steps: int = 720
    lr: float = 2e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # ~1.35x faster on CPUs with bf16 units (AMX / AVX-512-BF16), master weights fp32; where
    # bf16 is emulated (e.g. AVX2-only CPUs) it is ~50x slower, so it follows the hardware
    bf16_autocast: bool = field(default_factory=cpu_has_bf16_units)
    num_threads: int | None = None  # None: torch's default (one per core); see module doc

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.seq_len > self.max_position_embeddings:
            raise ValueError("seq_len must be <= max_position_embeddings")
        if min(self.steps, self.batch_size, self.seq_len, self.hidden_size) < 1:
            raise ValueError("steps, batch_size, seq_len and hidden_size must be positive")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError("warmup_steps must lie in [0, steps]")

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len


def qwen3_config(
    cfg: TargetConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[Qwen3Config, list[int]]:
    """The HF config, and the ids that end a generation (<|im_end|>, <|endoftext|>)."""
    eos, eot = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    ), [eos, eot]


def packed_rows(
    tokenizer: PreTrainedTokenizerBase, corpus_dir: Path, seed: int, rows: int, seq_len: int
) -> torch.Tensor:
    """[rows, seq_len] int64: shuffled training dialogues + <|endoftext|>, concatenated."""
    eot = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    texts = [e.text for d in DOMAINS for e in load_examples(corpus_dir, d, "train")]
    # The backend tokenizer: no "longer than model_max_length" warnings for long documents.
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    docs = [e.ids + [eot] for e in encoded]
    rng, need, stream = random.Random(f"{seed}:pack"), rows * seq_len, []
    while len(stream) < need:  # another epoch, freshly shuffled, if one is not enough
        order = list(range(len(docs)))
        rng.shuffle(order)
        for i in order:
            stream.extend(docs[i])
    return torch.tensor(stream[:need], dtype=torch.long).view(rows, seq_len)


def lr_at(step: int, cfg: TargetConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine down to cfg.lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: torch.nn.Module, cfg: TargetConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices (incl. embedding)
    rest = [p for p in model.parameters() if p.dim() < 2]  # norm scales
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": rest, "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def _train_loop(model, data, cfg: TargetConfig, log_path: Path, progress: bool) -> list[dict]:
    opt, log, start = make_optimizer(model, cfg), [], time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="target", disable=not progress, dynamic_ncols=True)
    with log_path.open("w") as f:
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            batch = data[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            rec = {"step": step + 1, "loss": round(loss.item(), 5), "lr": lr_at(step, cfg),
                   "grad_norm": round(grad_norm.item(), 4),
                   "tokens": (step + 1) * cfg.batch_size * cfg.seq_len,
                   "elapsed_s": round(time.perf_counter() - start, 2)}  # fmt: skip
            f.write(json.dumps(rec) + "\n")
            log.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.1e}")
    return log


def plot_curve(log: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    steps, loss = [r["step"] for r in log], [r["loss"] for r in log]
    ema, smooth = loss[0], []
    for x in loss:
        ema = 0.9 * ema + 0.1 * x
        smooth.append(ema)
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(steps, loss, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label="loss (EMA 0.9)")
    ax.set(xlabel="step", ylabel="train cross-entropy (nats/token)", title="demo target")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def train_target(
    cfg: TargetConfig,
    seed: int,
    corpus_dir: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    progress: bool = True,
) -> dict:
    """Train and `save_pretrained` model + tokenizer into `out_dir`; returns a summary."""
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = packed_rows(tokenizer, corpus_dir, seed, cfg.steps * cfg.batch_size, cfg.seq_len)
    hf_config, stop_ids = qwen3_config(cfg, tokenizer)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(hf_config)
    model.train()
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log = _train_loop(model, data, cfg, out_dir / "train_log.jsonl", progress)
    seconds = time.perf_counter() - start
    model.eval()
    model.generation_config.eos_token_id = stop_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out_dir)
    for f in Path(tokenizer_dir).iterdir():  # the tokenizer travels with the model
        shutil.copy2(f, out_dir / f.name)
    plot_curve(log, out_dir / "training_curve.png")
    tail = [r["loss"] for r in log[-max(1, len(log) // 20) :]]
    return {"params": sum(p.numel() for p in model.parameters()), "tokens": cfg.tokens,
            "train_seconds": round(seconds, 1), "final_loss": round(sum(tail) / len(tail), 4),
            "tokens_per_second": round(cfg.tokens / seconds)}  # fmt: skip
