"""Decode throughput: transformers.generate vs the embedded engine without / with speculation.

    python benchmarks/decode.py                      # demo model + its e2e-TV head
    python benchmarks/decode.py --model DIR --mtp DIR --batch-sizes 1 16 --max-tokens 128

For each batch size it times (i) `transformers` `generate` (sampling, same weights),
(ii) the engine without speculation, (iii) with `to`, (iv) with `rs` (both fixed γ = 3), (v)
`rs` under the auto policy (γ_t ∈ 0..3 chosen per step; its histogram is recorded); T = --temperature (1). For the
speculative rows it reports acceptance, E[accepted drafts per step], the measured draft/verify
cost ratio c, the bound (1 + E[A]) / (1 + γ·c), the measured verify/plain-step cost ratio r
(1 when verifying γ+1 tokens is as cheap as one, as on a GPU; larger on a CPU), the bound
divided by r, and the measured speedup over (ii).
Writes JSON (and a bar plot) under benchmarks/results/.

Workload: held-out chat prompts of the demo corpus (math, code, agent in turn), max(batch,
--min-prompts = 8) of them with at most `batch` running at once (transformers: `batch` per
generate call), so batch 1 measures eight answers one after another, not one; generation
stops at EOS or after --max-tokens, as rollouts do (all engines count the tokens up to and
including EOS). --ignore-eos forces exactly --max-tokens per sequence instead; past the answer
the demo model babbles, which no head predicts well.
Set OMP_WAIT_POLICY=PASSIVE before running (idle OpenMP threads spinning on a small CPU slow
every engine several-fold; `bebop` sets it itself). --threads sets torch's threads for all.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bebop_spec import LLM, SamplingParams
from bebop_spec.models import KVCache
from bebop_spec.models.defaults import resolve_model

RESULTS = Path(__file__).parent / "results"


def demo_prompts(tokenizer, count: int, seed: int) -> list[list[int]]:
    """Chat-formatted held-out prompts of the demo corpus (math, code, agent in turn)."""
    import random

    from bebop_spec.demo.build import DemoBuildConfig
    from bebop_spec.demo.corpus import load_examples

    corpus = DemoBuildConfig().corpus_dir
    pools = [load_examples(corpus, d, "heldout") for d in ("math", "code", "agent")]
    rng = random.Random(seed)
    for pool in pools:
        rng.shuffle(pool)
    picked = [pools[i % 3][i // 3] for i in range(count)]
    texts = [
        tokenizer.apply_chat_template(
            ex.prompt_messages, tokenize=False, add_generation_prompt=True
        )
        for ex in picked
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def time_engine(llm: LLM, prompts, params, repeats: int) -> tuple[float, int]:
    """Best tokens/s over `repeats` runs (seeded: every run samples the same tokens)."""
    llm.generate(prompts[:2], params)  # warm-up
    best, tokens = 0.0, 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        dt = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        best = max(best, tokens / dt)
    return best, tokens


def batch_workload(engines, tokenizer, batch: int, min_prompts: int, seed: int) -> list[list[int]]:
    """max(batch, min_prompts) demo prompts, every engine set to run at most `batch` of them
    at once (the scheduler's max_num_seqs, lowered)."""
    for llm in engines:
        llm.engine.scheduler.max_num_seqs = batch
    n = max(batch, min_prompts)
    return demo_prompts(tokenizer, n, seed) if tokenizer is not None else [[1, 2, 3]] * n


def time_hf(model_dir: str, prompts, max_tokens: int, repeats: int, ignore_eos: bool,
            dtype: str, device: str = "cpu", temperature: float = 1.0, batch: int = 0
            ) -> float:  # fmt: skip
    """Best tokens/s of `transformers.generate` over `repeats` runs, `batch` prompts a call
    (0: all of them at once)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = model.eval().to(device)
    step = batch or len(prompts)
    chunks = [prompts[i : i + step] for i in range(0, len(prompts), step)]
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0]], device=device), max_new_tokens=4, do_sample=True)
        best = 0.0
        for _ in range(repeats):
            t0, tokens = time.perf_counter(), 0
            for chunk in chunks:
                tokens += _hf_generate(model, chunk, max_tokens, ignore_eos, device, temperature)
            best = max(best, tokens / (time.perf_counter() - t0))
    return best


def _hf_generate(model, prompts, max_tokens: int, ignore_eos: bool, device: str,
                 temperature: float) -> int:  # fmt: skip
    """One left-padded, sampled `generate` over `prompts`; tokens generated up to each EOS."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    kw = dict(max_new_tokens=max_tokens, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
              pad_token_id=0)  # fmt: skip
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    if ignore_eos:
        kw["min_new_tokens"] = max_tokens
    out = model.generate(ids, attention_mask=mask, **kw)
    return sum(_len_to_eos(row, eos) for row in out[:, width:].tolist())


def _len_to_eos(row: list[int], eos: set[int]) -> int:
    """Generated tokens up to and including the first EOS (all of them if none)."""
    return next((i + 1 for i, t in enumerate(row) if t in eos), len(row))


@torch.inference_mode()
def step_costs(llm: LLM, batch: int, gamma: int, ctx: int = 128, iters: int = 30
               ) -> tuple[float, float]:  # fmt: skip
    """(c, r): c = one MTP draft step (1 token/row) ÷ one target verify forward (γ+1 tokens/row);
    r = that verify forward ÷ a plain decode forward (1 token/row), both with LM head.

    The textbook bound (1 + E[A]) / (1 + γc) assumes r = 1 (verifying γ+1 tokens costs what one
    costs: memory-bound decoding, as on GPUs at moderate batch). Where the matmuls are
    compute-bound (a CPU at larger batch) r grows towards γ+1, and the bound becomes
    (1 + E[A]) / (r + γ·c·r)."""
    runner = llm.engine.runner
    mc = llm.engine.model_config
    target, mtp = runner.target, runner.mtp
    dev = runner.device
    slots = torch.arange(batch, device=dev)
    dtype = runner.cache.k.dtype
    cache = KVCache(mc.num_hidden_layers, batch, ctx + gamma + 2, mc.num_key_value_heads,
                    mc.head_dim, dtype, dev)  # fmt: skip
    mcache = KVCache(mtp.num_layers, batch, ctx + gamma + 2, mc.num_key_value_heads, mc.head_dim,
                     dtype, dev)  # fmt: skip
    ids = torch.randint(0, mc.vocab_size, (batch, gamma + 1), device=dev)
    pos = ctx + torch.arange(gamma + 1, device=dev)[None].expand(batch, -1)
    h = torch.randn(batch, 1, mc.hidden_size, dtype=dtype, device=dev)

    def verify():
        return target.compute_logits(target(ids, pos, cache, slots))

    def plain():
        return target.compute_logits(target(ids[:, :1], pos[:, :1], cache, slots))

    def draft():
        g = mtp(h, ids[:, :1], pos[:, :1], mcache, slots, embed=target.embed, step=0)
        return runner.draft_logits(g[:, -1])  # over the draft vocabulary when one is set

    def clock(fn):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        n = max(2, min(iters, int(0.3 / max(time.perf_counter() - t0, 1e-6))))  # ~0.3 s a block
        best = float("inf")
        for _ in range(3):  # best of 3 blocks: robust to a noisy neighbour
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(dev)
            best = min(best, (time.perf_counter() - t0) / n)
        return best

    t_verify = clock(verify)
    return clock(draft) / t_verify, t_verify / clock(plain)


def _draft_vocab(engines: dict[str, LLM]) -> int | None:
    """Tokens the speculative engines draft over (None: the full vocabulary)."""
    ids = [e.engine.runner.draft_ids for k, e in engines.items() if k != "none"]
    return None if not ids or ids[0] is None else int(ids[0].numel())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="target dir, or 'demo' (default: SmolLM2-135M-Instruct)")  # fmt: skip
    ap.add_argument("--mtp", default=None, help="MTP head dir (default: the model's Bebop head)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=2048,
                    help="engine context (prompt + generation); sizes the KV cache")  # fmt: skip
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--draft-vocab-size", type=int, default=None,
                    help="draft over the head's K most frequent tokens (its draft_vocab.json)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--min-prompts", type=int, default=8,
                    help="prompts per batch size: max(batch, this), at most `batch` running at "
                    "once (one prompt says little about a head's acceptance)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="weights and activations, for every engine",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i], for every engine")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, all")
    ap.add_argument("--engines", nargs="+", default=["to", "rs", "rs-auto"],
                    choices=["to", "rs", "rs-auto"], help="speculative rows (none always runs)")  # fmt: skip
    ap.add_argument("--out", default=str(RESULTS / "decode.json"))
    args = ap.parse_args()

    model, mtp = resolve_model(args.model, args.mtp)  # None: SmolLM2 + head; "demo"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    common = dict(dtype=args.dtype, device=args.device, max_num_seqs=max(args.batch_sizes),
                  max_model_len=args.max_model_len)  # fmt: skip
    spec = dict(mtp=mtp, num_speculative_tokens=args.gamma, draft_vocab_size=args.draft_vocab_size,
                **common)  # fmt: skip
    kinds = {"to": ("to", "fixed"), "rs": ("rs", "fixed"), "rs-auto": ("rs", "auto")}
    spec_modes = [m for m in kinds if m in args.engines]
    engines = {"none": LLM(model, draft_mode=None, **common)}
    for m in spec_modes:
        engines[m] = LLM(model, draft_mode=kinds[m][0], spec_policy=kinds[m][1], **spec)
    tok = engines["none"].tokenizer
    dtype = engines["none"].engine.dtype  # what "auto" resolved to, for transformers too
    rows = []
    bar = tqdm(total=len(args.batch_sizes) * (2 + len(spec_modes)), desc="decode bench")
    for bs in args.batch_sizes:
        prompts = batch_workload(engines.values(), tok, bs, args.min_prompts, args.seed)
        params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                                ignore_eos=args.ignore_eos, seed=args.seed)  # fmt: skip
        hf = None if args.skip_hf else time_hf(model, prompts, args.max_tokens, args.repeats,
                                                args.ignore_eos, dtype, args.device,
                                                args.temperature, batch=bs)  # fmt: skip
        bar.update(1)
        base, _ = time_engine(engines["none"], prompts, params, args.repeats)
        bar.update(1)
        rows.append({"batch": bs, "engine": "transformers", "tok_s": hf})
        rows.append({"batch": bs, "engine": "bebop-none", "tok_s": base,
                     "vs_transformers": base / hf if hf else None})  # fmt: skip
        for mode in spec_modes:
            llm = engines[mode]
            s0 = _snapshot(llm)
            tps, _ = time_engine(llm, prompts, params, args.repeats)
            s = _delta(llm, s0)
            e_acc = s["accepted"] / s["drafts"] if s["drafts"] else 0.0
            policy = llm.engine.gamma_policy
            c, r = step_costs(llm, bs, args.gamma)
            bound = (1 + e_acc) / (1 + args.gamma * c)
            bound_r = bound / r
            rows.append({"batch": bs, "engine": f"bebop-{mode}", "tok_s": tps,
                         "acceptance": s["accepted"] / max(1, s["draft_tokens"]),
                         "gamma_chosen": list(policy.chosen) if policy else None,
                         "per_position": [a / max(1, s["drafts"]) for a in s["per_pos"]],
                         "e_accepted": e_acc, "c": c, "bound": bound, "r": r,
                         "bound_r": bound_r, "speedup": tps / base,
                         "of_bound": tps / base / bound})  # fmt: skip
            bar.update(1)
    bar.close()
    _print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": model, "mtp": mtp, "gamma": args.gamma, "max_tokens": args.max_tokens,
            "min_prompts": args.min_prompts,
            "temperature": args.temperature,
            "draft_vocab_size": _draft_vocab(engines),
            "ignore_eos": args.ignore_eos, "dtype": dtype, "threads": torch.get_num_threads(), "device": args.device,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    _plot(rows, out.with_suffix(".png"), args.temperature)
    print(f"wrote {out}")


def _snapshot(llm: LLM) -> dict:
    s = llm.spec_stats
    return {"drafts": s.num_drafts, "accepted": s.num_accepted_tokens,
            "draft_tokens": s.num_draft_tokens, "per_pos": list(s.accepted_per_pos)}  # fmt: skip


def _delta(llm: LLM, before: dict) -> dict:
    now = _snapshot(llm)
    per = [a - b for a, b in zip(now["per_pos"], before["per_pos"] + [0] * 8, strict=False)]
    return {"drafts": now["drafts"] - before["drafts"],
            "draft_tokens": now["draft_tokens"] - before["draft_tokens"],
            "accepted": now["accepted"] - before["accepted"], "per_pos": per}  # fmt: skip


def _print_table(rows: list[dict]) -> None:
    head = f"{'batch':>5} {'engine':<14} {'tok/s':>9} {'accept':>7} {'E[A]':>5} {'c':>5} " \
           f"{'bound':>6} {'r':>5} {'bound/r':>7} {'speedup':>8} {'of bound':>8}"  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        f = functools.partial(_cell, r)

        print(f"{r['batch']:>5} {r['engine']:<14} {f('tok_s', '9.1f'):>9} "
              f"{f('acceptance', '7.3f'):>7} {f('e_accepted', '5.2f'):>5} {f('c', '5.2f'):>5} "
              f"{f('bound', '6.2f'):>6} {f('r', '5.2f'):>5} {f('bound_r', '7.2f'):>7} "
              f"{f('speedup', '8.2f'):>8} {f('of_bound', '8.2f'):>8}")  # fmt: skip


def _cell(r: dict, key: str, fmt: str) -> str:
    v = r.get(key)
    return format(v, fmt) if isinstance(v, float) else "-"


def _plot(rows: list[dict], path: Path, temperature: float = 1.0) -> None:
    from bebop_spec.plotting import pyplot

    plt = pyplot()

    batches = sorted({r["batch"] for r in rows})
    engines = ["transformers", "bebop-none", "bebop-to", "bebop-rs", "bebop-rs-auto"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.16
    for i, eng in enumerate(engines):
        vals = [next((r["tok_s"] or 0 for r in rows if r["batch"] == b and r["engine"] == eng), 0)
                for b in batches]  # fmt: skip
        ax.bar([j + i * width for j in range(len(batches))], vals, width, label=eng)
    ax.set_xticks([j + 2 * width for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("generated tokens / s (CPU)")
    ax.set_title(f"Decode throughput, T = {temperature:g}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
