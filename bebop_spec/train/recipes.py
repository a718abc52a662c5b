"""Named head recipes: the exact settings that built a shipped head, so one command rebuilds it.

    bebop mtp recipe smollm2 --out DIR       # self-distil, warm up (FKL), train e2e-TV, export
    python -c "from bebop_spec.train.recipes import build; build('smollm2', 'DIR')"

A recipe is data: the keyword arguments of `train_demo_head` (which is the generic
data → warm-up → loss pipeline, despite its name). The shipped head's directory holds a copy of
its recipe (`recipe.json`), its training log and summary, so what shipped is what this
rebuilds.
"""

from __future__ import annotations

import json
from pathlib import Path

# SmolLM2-135M-Instruct's head, budgeted for a 2-core CPU with bf16 units (recipe v5): 768 demo
# prompts per domain (math / code / agent) sampled at T = 1 up to 160 tokens in bf16 (~289 k
# response tokens), then 1,440 steps of `nla` (−log Σ min(p, q), the objective that won the loss
# study from a fresh head: docs/head_study.md) at lr 1.5e-3 over γ = 3 chains, the target in
# bf16 and the head under bf16 autocast (fp32 master weights), drafting over the data's 8,192
# most frequent tokens, the target's hiddens cached once. The learning curve
# (benchmarks/learning_curve.py) showed 160 steps still climbing and 3× the data worth little
# at equal steps, hence more steps (v3: 480; v4: 3× that), and at 160 steps lr 1.5e-3 beat
# 5e-4 (and 3e-3) on held-out acceptance (docs/head_study.md, round 4). Recipe v5 then restarts
# the schedule once: 1,440 more `nla` steps at lr 1e-3 (new batch order, seed 3) from that head,
# since the training-batch acceptance was still rising at the end of the first run (round 5).
RECIPES: dict[str, dict] = {
    "smollm2": {
        "num_prompts": 768,
        "max_tokens": 160,
        "warm_steps": 0,
        "steps": 1440,
        "gamma": 3,
        "loss": "nla",
        "lr": 1.5e-3,
        "seed": 1,
        "draft_vocab_size": 8192,
        "cache_hiddens": True,
        "then": [{"loss": "nla", "steps": 1440, "lr": 1e-3, "seed": 3}],
        "data": {"max_num_seqs": 64, "max_model_len": 1024, "dtype": "bfloat16"},
        "train": {
            "batch_size": 8,
            "seq_len": 320,
            "max_chains": 384,
            "log_every": 5,
            "save_every": 0,
            "dtype": "bfloat16",
            "compute_dtype": "bfloat16",
        },  # fmt: skip
    },
}


def recipe_target(name: str) -> Path:
    """The target model a recipe trains a head for (converted on first use)."""
    if name != "smollm2":
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    from bebop_spec.models.default_model import ensure_smollm2

    return ensure_smollm2()


def build(name: str, out_dir: str | Path, dataset: str | Path | None = None,
          progress: bool = True) -> Path:  # fmt: skip
    """Run recipe `name` into out_dir (the head, recipe.json, logs, summary); returns out_dir."""
    from bebop_spec.train import train_demo_head

    recipe = RECIPES.get(name)
    if recipe is None:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    out = train_demo_head(recipe_target(name), out_dir, progress=progress, dataset=dataset,
                          **recipe)  # fmt: skip
    (Path(out) / "recipe.json").write_text(json.dumps({"name": name, **recipe}, indent=2) + "\n")
    return Path(out)


# Held-out data every head of the recipe is judged on: the demo corpus' held-out prompts,
# sampled at T = 1 with another seed than the training data.
HELDOUT: dict = {"num_prompts": 8, "max_tokens": 160, "seed": 1, "split": "heldout",
                 "max_num_seqs": 24, "max_model_len": 1024, "dtype": "float32"}  # fmt: skip


def evaluate_head(head_dir: str | Path, work_dir: str | Path, name: str = "smollm2",
                  dataset: str | Path | None = None, progress: bool = False) -> list[dict]:  # fmt: skip
    """Analytic held-out acceptance (rs and to, T = 0.7 and 1, γ = 3) of a head of recipe
    `name`; writes work_dir/eval.json (+ plot) and returns its rows. `dataset`: reuse held-out
    data made with HELDOUT (else it is sampled into work_dir/heldout)."""
    from bebop_spec.train.evaluate import EvalConfig, evaluate, write_results
    from bebop_spec.train.selfdistill import DataConfig, generate_dataset

    target, work = recipe_target(name), Path(work_dir)
    if dataset is None:
        dataset = work / "heldout"
        generate_dataset(DataConfig(model=str(target), out=str(dataset), temperature=1.0,
                                    **HELDOUT), progress=progress)  # fmt: skip
    cfg = EvalConfig(model=str(target), mtp=str(head_dir), data=str(dataset),
                     gamma=RECIPES[name]["gamma"], temperatures=(0.7, 1.0), measured=False)  # fmt: skip
    path = write_results(evaluate(cfg, progress=progress), cfg, work)
    return json.loads(path.read_text())["rows"]
