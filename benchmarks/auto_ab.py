"""Does speculation under `auto` ever lose? Interleaved A/B against plain decoding.

    python benchmarks/auto_ab.py                                 # SmolLM2 + its head, 1 4 16 64
    python benchmarks/auto_ab.py --model demo --batch-sizes 1 16 --rounds 6
    python benchmarks/auto_ab.py --engines none auto rs          # also fixed γ = 3

The decode benchmark times each engine once per batch size in a fixed order, which on a
small noisy CPU mixes warm-up and drift into the ratio. Here the engines (no speculation;
`rs` under spec_policy="auto"; optionally `rs` at fixed γ) run the same seeded prompts in
turn for `--rounds` rounds, the order reversed every other round (ABBA), after one warm-up
generation each. The figure of merit is the median over rounds of the paired ratio
auto ÷ plain (both timed within one round), with the best-of-rounds ratio beside it; the
table also gives acceptance, E[accepted drafts per drafting step] and the policy's γ_t
histogram for that batch size. Generation stops at EOS as rollouts do; under auto the samples
(and so their lengths) differ from plain decoding's, which on short answers makes the ratio
noisy: --ignore-eos times equal lengths. Writes JSON and a plot under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from decode import _delta, _snapshot, batch_workload  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from bebop_spec import LLM, SamplingParams  # noqa: E402
from bebop_spec.models.defaults import resolve_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def build(model: str, mtp: str | None, engines: list[str], seqs: int, gamma: int) -> dict:
    kw = dict(max_num_seqs=seqs, max_model_len=2048)
    spec = dict(mtp=mtp, num_speculative_tokens=gamma, **kw)
    make = {"none": lambda: LLM(model, draft_mode=None, **kw),
            "auto": lambda: LLM(model, spec_policy="auto", **spec),
            "rs": lambda: LLM(model, spec_policy="fixed", **spec)}  # fmt: skip
    return {name: make[name]() for name in engines}


def timed(llm: LLM, prompts, params) -> float:
    """Generated tokens per second of one generate() call."""
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    return sum(len(c.token_ids) for o in outs for c in o.outputs) / (time.perf_counter() - t0)


def run_batch(llms: dict, prompts, params, rounds: int, bar) -> dict:
    """Interleaved rounds at one batch size → per-engine tok/s lists and spec counters."""
    for llm in llms.values():
        llm.generate(prompts[: min(2, len(prompts))], params)  # warm-up: first shapes
    before = {n: (_snapshot(llm), _chosen(llm)) for n, llm in llms.items()}
    tps = {name: [] for name in llms}
    order = list(llms)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            tps[name].append(timed(llms[name], prompts, params))
            bar.update(1)
    row = {"tok_s": tps}
    for name, llm in llms.items():
        if name != "none":
            row[name] = _spec_row(llm, *before[name])
    return row


def _chosen(llm: LLM) -> list[int] | None:
    policy = llm.engine.gamma_policy
    return list(policy.chosen) if policy is not None else None


def _spec_row(llm: LLM, snapshot: dict, chosen: list[int] | None) -> dict:
    """Acceptance, E[accepted drafts per drafting step] and γ_t histogram since `snapshot`."""
    d = _delta(llm, snapshot)
    out = {"acceptance": d["accepted"] / max(1, d["draft_tokens"]),
           "e_accepted": d["accepted"] / d["drafts"] if d["drafts"] else 0.0}  # fmt: skip
    if chosen is not None:
        out["gamma_chosen"] = [y - x for x, y in zip(chosen, _chosen(llm), strict=True)]
    return out


def summarise(batch: int, row: dict) -> dict:
    tps = row["tok_s"]
    out = {"batch": batch, "tok_s": tps,
           "none_median": statistics.median(tps["none"])}  # fmt: skip
    for name in tps:
        if name == "none":
            continue
        paired = [a / b for a, b in zip(tps[name], tps["none"], strict=True)]
        out[name] = {**row[name], "median": statistics.median(tps[name]), "paired": paired,
                     "ratio_median": statistics.median(paired),
                     "ratio_best": max(tps[name]) / max(tps["none"])}  # fmt: skip
    return out


def print_table(rows: list[dict]) -> None:
    head = f"{'batch':>5} {'engine':<6} {'tok/s':>8} {'plain':>8} {'÷ plain':>8} " \
           f"{'best÷best':>9} {'accept':>7} {'E[A]':>5}  γ_t histogram (0..γ)"  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        for name, s in r.items():
            if not isinstance(s, dict) or "ratio_median" not in s:
                continue
            print(f"{r['batch']:>5} {name:<6} {s['median']:>8.1f} {r['none_median']:>8.1f} "
                  f"{s['ratio_median']:>7.3f}× {s['ratio_best']:>8.3f}× {s['acceptance']:>7.3f} "
                  f"{s['e_accepted']:>5.2f}  {s.get('gamma_chosen', '-')}")  # fmt: skip


def plot(rows: list[dict], path: Path, title: str) -> None:
    from bebop_spec.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [n for n in rows[0] if isinstance(rows[0][n], dict) and "paired" in rows[0][n]]
    for i, name in enumerate(names):
        xs = [j + 0.15 * (i - (len(names) - 1) / 2) for j in range(len(rows))]
        (line,) = ax.plot(xs, [r[name]["ratio_median"] for r in rows], "o-",
                          label=f"{name} (median; dots: rounds)")  # fmt: skip
        for x, r in zip(xs, rows, strict=True):
            ax.scatter([x] * len(r[name]["paired"]), r[name]["paired"], s=10, alpha=0.4,
                       color=line.get_color())  # fmt: skip
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(0.97, color="red", lw=0.8, ls="--", label="0.97 (never loses)")
    ax.set_xticks(range(len(rows)), [f"batch {r['batch']}" for r in rows])
    ax.set_ylabel("tokens/s ÷ plain decoding (paired, per round)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="target dir, or 'demo' (default: SmolLM2)")
    ap.add_argument("--mtp", default=None, help="MTP head dir (default: the model's head)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--gamma", type=int, default=3, help="γ_max under auto; γ of `rs`")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--ignore-eos", action="store_true",
                    help="always generate --max-tokens: every engine times the same lengths "
                         "(under auto the samples differ from plain decoding's, and so would "
                         "their lengths to EOS)")  # fmt: skip
    ap.add_argument(
        "--engines", nargs="+", default=["none", "auto"], choices=["none", "auto", "rs"]
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--min-prompts", type=int, default=8,
                    help="prompts per batch size: max(batch, this), at most `batch` at once")  # fmt: skip
    ap.add_argument("--out", default=str(RESULTS / "auto_ab.json"))
    args = ap.parse_args()
    omp = os.environ.get("OMP_WAIT_POLICY")  # as torch read it (set later, it does nothing)
    if "none" not in args.engines:
        ap.error("--engines must include none (the baseline)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, mtp = resolve_model(args.model, args.mtp)
    llms = build(model, mtp, list(dict.fromkeys(args.engines)), max(args.batch_sizes), args.gamma)
    tok = llms["none"].tokenizer
    rows = []
    bar = tqdm(total=len(args.batch_sizes) * args.rounds * len(llms), desc="auto A/B")
    for bs in args.batch_sizes:
        prompts = batch_workload(llms.values(), tok, bs, args.min_prompts, 0)
        params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                                ignore_eos=args.ignore_eos, seed=0)  # fmt: skip
        rows.append(summarise(bs, run_batch(llms, prompts, params, args.rounds, bar)))
    bar.close()
    print_table(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**vars(args), "model": model, "mtp": mtp, "dtype": llms["none"].engine.dtype,
            "omp_wait_policy": omp}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    plot(
        rows,
        out.with_suffix(".png"),
        f"auto vs plain, {Path(model).name}, T = {args.temperature:g}",
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
