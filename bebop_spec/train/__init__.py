"""Pre-RL MTP head training: losses, self-distillation data, trainer, evaluation, export.

    bebop mtp data | train | eval | export ...          (bebop_spec.train.cli; docs/mtp_training.md)
    head_dir = train_demo_head(target_dir, out_dir)     # data + e2e-TV training for the demo model

Submodules are imported lazily: `import bebop_spec.train` stays cheap.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

# Demo-head budget, measured on 2 shared CPU cores with the demo target (docs/mtp_training.md):
# self-distil DEMO_PROMPTS prompts per domain, warm the fresh head up with DEMO_WARM_STEPS of
# forward KL (TV-type losses learn slowly from a random head: their gradient is bounded by q),
# then DEMO_STEPS steps of the chosen loss.
DEMO_STEPS = 60
DEMO_WARM_STEPS = 40
DEMO_PROMPTS = 64
DEMO_MAX_TOKENS = 192
DEMO_TRAIN = dict(batch_size=8, seq_len=384, log_every=5, save_every=0)
WARM_LOSS, WARM_LR, LR = "fkl", 2e-3, 1e-3


def _demo_corpus(target_dir: Path) -> Path | None:
    """The corpus built next to the demo target (`<root>/corpus`), if there is one."""
    sibling = target_dir.parent / "corpus"
    return sibling if any(sibling.glob("*.train.jsonl")) else None


def train_demo_head(
    target_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = DEMO_STEPS,
    warm_steps: int = DEMO_WARM_STEPS,
    loss: str = "e2e_tv",
    gamma: int = 3,
    num_prompts: int = DEMO_PROMPTS,
    max_tokens: int = DEMO_MAX_TOKENS,
    progress: bool = True,
    train: dict | None = None,
    data: dict | None = None,
    dataset: str | Path | None = None,
    lr: float = LR,
    init: str | None = None,
    draft_vocab_size: int | None = None,
    cache_hiddens: bool = False,
    then: list[dict] | None = None,
) -> Path:
    """Self-distil the demo target at T = 1, warm a fresh head up with forward KL for
    `warm_steps`, train it `steps` more with `loss`; returns out_dir, which
    then holds the head (config.json + model.safetensors, `LLM(target, mtp=out_dir)`), plus
    `data/`, `train_log.jsonl`, `training_curve.png` and `summary.json`. `train` / `data`
    override TrainConfig / DataConfig fields (a recipe, train/recipes.py); `dataset` reuses an
    existing self-distillation dataset instead of sampling one. `init` ("last_layer") is where
    the first stage starts (default: fresh); `draft_vocab_size` ranks the data's response
    tokens into out_dir/draft_vocab.json and trains drafting over the top ones;
    `cache_hiddens` runs the target once over the data (out_dir/hiddens, removed at the end);
    `then` lists further runs (each a dict of `loss`, `steps`, `lr`, `seed`), each starting
    from the head the one before it left with its own warm-up and cosine decay (a warm
    restart); the log and the curve cover every run, steps counted across runs."""
    from bebop_spec.train.selfdistill import DataConfig, generate_dataset
    from bebop_spec.train.train_log import read_log
    from bebop_spec.train.trainer import TrainConfig, plot_training_curve, train_mtp

    target_dir, out = Path(target_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    corpus = _demo_corpus(target_dir)
    data_cfg = DataConfig(model=str(target_dir), out=str(dataset or out / "data"),
                          num_prompts=num_prompts, temperature=1.0, max_tokens=max_tokens,
                          seed=seed, corpus=str(corpus) if corpus else None,
                          **(data or {}))  # fmt: skip
    if dataset is None:
        meta = generate_dataset(data_cfg, progress=progress)
    else:
        from bebop_spec.train.data import read_dataset

        meta = read_dataset(dataset).meta
    t_data = time.perf_counter() - t0
    common = dict(model=str(target_dir), data=data_cfg.out, gamma=gamma, seed=seed,
                  **{**DEMO_TRAIN, **(train or {})})  # fmt: skip
    if draft_vocab_size:
        from bebop_spec.models.loader import load_config
        from bebop_spec.train.draft_vocab import build_draft_vocab

        build_draft_vocab(data_cfg.out, out, load_config(target_dir).vocab_size)
        common.update(draft_vocab=str(out), draft_vocab_size=draft_vocab_size)
    if cache_hiddens:
        common["cache_hiddens"] = str(out / "hiddens")
    warm = None
    if warm_steps:
        warm_cfg = TrainConfig(out=str(out / "warm"), loss=WARM_LOSS, steps=warm_steps,
                               lr=WARM_LR, warmup=max(1, warm_steps // 10), init_from=init,
                               **common)  # fmt: skip
        warm = train_mtp(warm_cfg)
    runs = [dict(loss=loss, steps=steps, lr=lr, seed=seed), *(then or [])]
    start, records, done = str(warm.head_dir) if warm else init, [], 0
    for i, run in enumerate(runs):
        cfg = TrainConfig(out=str(out / f"run{i}"), loss=run["loss"], steps=run["steps"],
                          lr=run["lr"], warmup=2 if warm and not i else max(1, run["steps"] // 15),
                          init_from=start, **{**common, "seed": run.get("seed", seed)})  # fmt: skip
        result = train_mtp(cfg)
        records += [{**r, "step": r["step"] + done, "run": i} for r in read_log(result.log_path)]
        start, done = str(result.head_dir), done + result.step
    for f in result.head_dir.iterdir():  # the head itself lives at out_dir
        shutil.copy2(f, out / f.name)
    log_path = out / result.log_path.name
    log_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_training_curve(log_path, out / "training_curve.png")
    if warm is not None:
        shutil.copy2(warm.log_path, out / "warm_log.jsonl")
    for d in [*(f"run{i}" for i in range(len(runs))), "warm", "hiddens"]:
        shutil.rmtree(out / d, ignore_errors=True)  # optimiser state, duplicate heads, the cache
    summary = {
        "loss": loss, "gamma": gamma, "steps": done, "seed": seed, "then": then,
        "warm_start": {"loss": WARM_LOSS, "steps": warm_steps} if warm_steps else None,
        "init": init or "fresh", "draft_vocab_size": draft_vocab_size,
        "data": {"sequences": meta.num_sequences, "response_tokens": meta.num_response_tokens},
        "final_soft_alpha": result.alpha, "final_accepted_length": result.accepted_length,
        "seconds": {"data": round(t_data, 1), "total": round(time.perf_counter() - t0, 1)},
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out


def demo_head_stage(target_dir: Path, out_dir: Path) -> dict:
    """`train_head` hook for `bebop_spec.demo.build`: train_demo_head with its defaults; returns
    the JSON summary the build records."""
    train_demo_head(target_dir, out_dir)
    return json.loads((Path(out_dir) / "summary.json").read_text())


# The demo build retrains the head when this changes (see demo/build.py `_head_key`);
# v2: the chain trains in the serving attention context (train/chain.py, context="serve").
demo_head_stage.cache_key = (
    f"e2e_tv-g3-s{DEMO_STEPS}-w{DEMO_WARM_STEPS}-p{DEMO_PROMPTS}-t{DEMO_MAX_TOKENS}-serve-v2"
)

__all__ = ["DEMO_STEPS", "demo_head_stage", "train_demo_head"]
