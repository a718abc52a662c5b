"""Paged KV cache on the real model: prefix sharing, and RL batches under a memory budget.

    python benchmarks/kv_cache.py                       # both experiments, default model
    python benchmarks/kv_cache.py --only prefix --prompts 8 --n 8 --prompt-tokens 300

prefix: P prompts × n samples, each prompt ~`--prompt-tokens` long (a few-shot block of demo
    examples, then a held-out question: how RL prompts with a long instruction look), one new
    token each, so the run is the prefill. Timed with prefix caching on and off in the same
    run (best of `--repeats`); the ratio is the sharing speedup.
memory: `--rl-prompts` prompts × `--rl-n` samples at T = 1 to EOS (≤ `--rl-max-tokens`),
    with the model's full context (`--max-model-len`) and `--max-num-seqs` places, once per
    KV budget in `--budgets-mib`, each in a fresh process so its peak RSS (VmHWM) is its own:
    wall time, tokens, preemptions, prefix hits, KV blocks, peak RSS.
Prints tables; writes JSON and a plot under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent))


def long_prompts(tokenizer, count: int, tokens: int, seed: int) -> list[list[int]]:
    """`count` chat prompts of about `tokens` tokens: a few-shot block of demo examples
    (question and answer) as the system message, then a held-out question."""
    import random

    from bebop_spec.demo.build import DemoBuildConfig
    from bebop_spec.demo.corpus import load_examples

    corpus = DemoBuildConfig().corpus_dir
    train = load_examples(corpus, "math", "train")
    held = load_examples(corpus, "math", "heldout")
    rng = random.Random(seed)
    rng.shuffle(held)
    out = []
    for i in range(count):
        shots, system = [], "Solve the problems. Examples:\n"
        for ex in train[i * 7 :]:
            answer = ex.messages[len(ex.prompt_messages)]["content"]
            shot = f"Q: {ex.prompt_messages[-1]['content']}\nA: {answer}\n"
            if len(tokenizer(system + "".join(shots) + shot)["input_ids"]) > tokens - 40:
                break
            shots.append(shot)
        msgs = [{"role": "system", "content": system + "".join(shots)},
                *held[i].prompt_messages[-1:]]  # fmt: skip
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def prefix_experiment(args) -> list[dict]:
    from tqdm.auto import tqdm

    from bebop_spec import LLM, SamplingParams
    from bebop_spec.models.defaults import resolve_model

    model, _ = resolve_model(args.model, None)
    common = dict(draft_mode=None, max_num_seqs=args.prompts * args.n, dtype=args.dtype)
    llms = {on: LLM(model, enable_prefix_caching=on, **common) for on in (True, False)}
    prompts = long_prompts(llms[True].tokenizer, args.prompts, args.prompt_tokens, args.seed)
    params = SamplingParams(temperature=1.0, max_tokens=1, n=args.n, seed=args.seed)
    best = {True: float("inf"), False: float("inf")}
    for _ in tqdm(range(args.repeats), desc="prefix sharing"):
        for on, llm in llms.items():
            llm.engine.blocks.invalidate()  # each run starts cold: sharing within the batch
            t0 = time.perf_counter()
            llm.generate(prompts, params)
            best[on] = min(best[on], time.perf_counter() - t0)
    tokens = sum(len(p) for p in prompts) * args.n
    stats = llms[True].engine.blocks.stats
    return [{"experiment": "prefix", "prefix_caching": on, "prompts": args.prompts, "n": args.n,
             "mean_prompt_tokens": tokens / args.n / args.prompts, "seconds": best[on],
             "prefill_tok_s": tokens / best[on], "speedup": best[False] / best[on],
             "hit_rate": stats.hit_tokens / max(1, stats.queried_tokens) if on else 0.0}
            for on in (True, False)]  # fmt: skip


def memory_run(args) -> dict:
    """One budget, in this process (the parent reads our peak RSS from the JSON we print)."""
    from decode import demo_prompts

    from bebop_spec import LLM, SamplingParams

    llm = LLM(args.model, draft_mode=None if args.no_spec else "rs", dtype=args.dtype,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              kv_cache_memory_gb=args.budget_mib / 1024)  # fmt: skip
    prompts = demo_prompts(llm.tokenizer, args.rl_prompts, args.seed)
    params = SamplingParams(temperature=1.0, max_tokens=args.rl_max_tokens, n=args.rl_n,
                            seed=args.seed)  # fmt: skip
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    eng = llm.engine
    done = [c for o in outs for c in o.outputs]
    return {"experiment": "memory", "budget_mib": args.budget_mib,
            "max_model_len": eng.max_model_len, "max_num_seqs": args.max_num_seqs,
            "kv_blocks": eng.blocks.num_blocks, "samples": len(done),
            "completed": sum(c.finish_reason in ("stop", "length") for c in done),
            "tokens": sum(len(c.token_ids) for c in done), "seconds": wall,
            "tok_s": sum(len(c.token_ids) for c in done) / wall,
            "preemptions": eng.scheduler.num_preemptions,
            "prefix_hit_rate": eng.blocks.stats.hit_tokens / max(1, eng.blocks.stats.queried_tokens),
            "peak_rss_mib": _vm_hwm_mib()}  # fmt: skip


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_experiment(args) -> list[dict]:
    rows = []
    for mib in args.budgets_mib:
        cmd = [sys.executable, __file__, "--child-budget-mib", str(mib), *_child_flags(args)]
        print(f"memory: budget {mib} MiB ...", flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def _child_flags(args) -> list[str]:
    flags = ["--rl-prompts", str(args.rl_prompts), "--rl-n", str(args.rl_n),
             "--rl-max-tokens", str(args.rl_max_tokens), "--max-model-len",
             str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs), "--dtype",
             args.dtype, "--seed", str(args.seed)]  # fmt: skip
    if args.model:
        flags += ["--model", args.model]
    return flags + (["--no-spec"] if args.no_spec else [])


def _print(rows: list[dict]) -> None:
    for exp in ("prefix", "memory"):
        sub = [r for r in rows if r["experiment"] == exp]
        if not sub:
            continue
        keys = [k for k in sub[0] if k != "experiment"]
        print("\n" + " ".join(f"{k:>14}" for k in keys))
        for r in sub:
            print(" ".join(f"{v:>14.3f}" if isinstance(v, float) else f"{v!s:>14}"
                           for v in (r[k] for k in keys)))  # fmt: skip


def _plot(rows: list[dict], path: Path) -> None:
    from bebop_spec.plotting import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    pre = [r for r in rows if r["experiment"] == "prefix"]
    if pre:
        axes[0].bar(["sharing" if r["prefix_caching"] else "no sharing" for r in pre],
                    [r["prefill_tok_s"] for r in pre], color=["tab:green", "tab:gray"])  # fmt: skip
        axes[0].set_ylabel("prefill tokens / s")
        axes[0].set_title(f"prefix sharing: {pre[0]['speedup']:.1f}×")
    mem = [r for r in rows if r["experiment"] == "memory"]
    if mem:
        labels = [f"{r['budget_mib']} MiB" for r in mem]
        axes[1].bar(labels, [r["tok_s"] for r in mem], color="tab:blue")
        for i, r in enumerate(mem):
            axes[1].text(i, r["tok_s"], f"{r['preemptions']} preempt.\n{r['peak_rss_mib']:.0f} MiB",
                         ha="center", va="bottom", fontsize=8)  # fmt: skip
        axes[1].set_ylabel("generated tokens / s")
        axes[1].set_title("RL batch under a KV budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])  # fmt: skip
    ap.add_argument("--model", default=None, help="target dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--only", choices=["prefix", "memory"], default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--rl-prompts", type=int, default=16)
    ap.add_argument("--rl-n", type=int, default=8)
    ap.add_argument("--rl-max-tokens", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--budgets-mib", type=int, nargs="+", default=[4096, 64])
    ap.add_argument("--no-spec", action="store_true", help="memory runs without speculation")
    ap.add_argument("--child-budget-mib", dest="budget_mib", type=int, default=None,
                    help=argparse.SUPPRESS)  # fmt: skip
    ap.add_argument("--out", default=str(RESULTS / "kv_cache.json"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.budget_mib is not None:  # a memory child
        print(json.dumps(memory_run(args)))
        return 0
    rows = []
    if args.only in (None, "prefix"):
        rows += prefix_experiment(args)
    if args.only in (None, "memory"):
        rows += memory_experiment(args)
    _print(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": vars(args), "rows": rows}, indent=2))
    _plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
