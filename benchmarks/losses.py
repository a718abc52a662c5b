"""The Bebop paper's Table 2 in miniature: which MTP training loss gives the best acceptance?

    python benchmarks/losses.py                          # demo model, ~15 min on 2 CPU cores
    python benchmarks/losses.py --steps 60 --losses ce e2e_tv    # quicker look
    python benchmarks/losses.py --model DIR --work DIR    # another target (needs its corpus)
    python benchmarks/losses.py --model ~/.cache/bebop/models/SmolLM2-135M-Instruct \
        --train-data D --heldout-data H --init last_layer --draft-vocab HEAD --warm-steps 0 \
        --temperatures 1.0 0.7 --no-measured    # the real model (docs/head_study.md)

One head per loss (ce, fkl, rkl, tv, e2e_tv, and the peers' nla and lk) is trained on the same self-distilled data (the
target sampled at T = 1 on demo-corpus train prompts) with the same budget, seed and
hyper-parameters, all starting from one shared warm-start head (--warm-steps of forward KL
from a random init; the paper fine-tunes existing heads, and TV-type losses learn slowly from a
random head because their gradient is bounded by q). --warm-steps 0 trains from scratch;
--init last_layer starts (the warm start or every head) from the target's last layer
(train/head_init.py); --draft-vocab trains every head over that head's draft vocabulary, as
the engine serves it. Each head is then scored at γ = 3, T = 1, per domain, under rejection
sampling (`rs`) and greedy drafting (`to`): analytically on the teacher-forced chains of
held-out self-distilled data (Σ min(p, q), p(argmax q)) and measured by the engine generating
from the held-out prompts. The headline number is the acceptance rate E[A] / γ (accepted /
drafted tokens, vLLM's definition) in percent.

Paper (DESIGN.md §6): e2e TV beats CE by 3-8 points under rs, TV in between, all losses within
0.3 points under to. The script prints how the run compares with those targets.
Data, heads and per-head eval JSON go to --work (default ~/.cache/bebop/bench_losses; reused
when the settings match); the summary JSON and the per-position plot to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see demo/target.py

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from bebop_spec.train.evaluate import AcceptanceRow, EvalConfig, evaluate  # noqa: E402
from bebop_spec.train.selfdistill import DataConfig, generate_dataset  # noqa: E402
from bebop_spec.train.trainer import TrainConfig, train_mtp  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LOSSES = ("ce", "fkl", "rkl", "tv", "e2e_tv", "nla", "lk")
GAMMA, TEMPERATURE = 3, 1.0  # TEMPERATURE: the data's and the headline table's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="target dir (default: the demo model)")
    p.add_argument("--work", default=None, help="data / heads dir (default: the bebop cache)")
    p.add_argument("--corpus", default=None,
                   help="demo corpus dir (default: MODEL/../corpus, else the demo cache's)")  # fmt: skip
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--steps", type=int, default=60, help="optimiser steps per head")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warm-steps", type=int, default=60, help="shared warm start (0: none)")
    p.add_argument("--warm-loss", default="fkl", choices=LOSSES)
    p.add_argument("--warm-lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=384)
    p.add_argument("--max-chains", type=int, default=0, help="chains per batch (0: all)")
    p.add_argument("--train-prompts", type=int, default=96, help="per domain")
    p.add_argument("--heldout-prompts", type=int, default=24, help="per domain")
    p.add_argument("--max-tokens", type=int, default=192, help="self-distilled response cap")
    p.add_argument("--measure-prompts", type=int, default=12, help="per domain, engine run")
    p.add_argument("--measure-tokens", type=int, default=96)
    p.add_argument("--no-measured", action="store_true", help="analytic acceptance only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-data", default=None, help="an existing `bebop mtp data` dir")
    p.add_argument("--heldout-data", default=None, help="an existing held-out dataset dir")
    p.add_argument("--init", default="fresh", choices=["fresh", "last_layer"])
    p.add_argument("--draft-vocab", default=None, metavar="DIR",
                   help="train over DIR/draft_vocab.json's top --draft-vocab-size tokens")  # fmt: skip
    p.add_argument("--draft-vocab-size", type=int, default=8192)
    p.add_argument("--temperatures", type=float, nargs="+", default=[TEMPERATURE],
                   help="evaluation temperatures (the first is the headline)")  # fmt: skip
    p.add_argument("--cache-hiddens", action="store_true",
                   help="cache the target's hiddens once under --work (offline mode)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS / "losses.json"))
    return p.parse_args(argv)


def _work_dir(args: argparse.Namespace) -> Path:
    if args.work:
        return Path(args.work)
    from bebop_spec.demo.build import default_cache_dir

    return default_cache_dir().parent / "bench_losses"


def ensure_data(model: str, out: Path, split: str, prompts: int, args) -> Path:
    """Self-distilled data for `split`, regenerated only when its settings changed."""
    want = {"model": model, "split": split, "prompts": prompts, "max_tokens": args.max_tokens,
            "seed": args.seed, "corpus": args.corpus}  # fmt: skip
    stamp = out / "bench_settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return out
    sibling = Path(model).parent / "corpus"  # the demo build's layout: <root>/{target,corpus}
    corpus = args.corpus or (str(sibling) if any(sibling.glob("*.jsonl")) else None)
    cfg = DataConfig(model=model, out=str(out), num_prompts=prompts, temperature=TEMPERATURE,
                     max_tokens=args.max_tokens, split=split, seed=args.seed,
                     corpus=corpus)  # fmt: skip
    print(f"self-distilling {split}: {prompts} prompts per domain, T={TEMPERATURE}")
    generate_dataset(cfg)
    stamp.write_text(json.dumps(want))
    return out


def train_head(
    model: str, data: Path, out: Path, loss: str, steps: int, lr: float, init: Path | None, args
) -> tuple[Path, float]:
    """Train (or resume / reuse) the head for one loss; returns (head dir, seconds spent)."""
    start = str(init) if init else (None if args.init == "fresh" else args.init)
    cache = _work_dir(args) / "hiddens" if args.cache_hiddens else None
    cfg = TrainConfig(model=model, data=str(data), out=str(out), loss=loss, gamma=GAMMA, lr=lr,
                      steps=steps, batch_size=args.batch_size, seq_len=args.seq_len,
                      warmup=max(1, steps // 15), seed=args.seed, max_chains=args.max_chains,
                      init_from=start, save_every=20, log_every=5,
                      cache_hiddens=str(cache) if cache else None, draft_vocab=args.draft_vocab,
                      draft_vocab_size=args.draft_vocab_size)  # fmt: skip
    state = out / "checkpoint" / "trainer_state.json"
    if state.is_file():
        saved = json.loads(state.read_text())
        if saved["config"] != asdict(cfg):  # other settings: start this head again
            shutil.rmtree(out)
        elif saved["step"] >= args.steps and (out / "head" / "config.json").is_file():
            return out / "head", 0.0
    t0 = time.perf_counter()
    train_mtp(cfg)
    return out / "head", time.perf_counter() - t0


def eval_head(model: str, head: Path, heldout: Path, args) -> list[AcceptanceRow]:
    cfg = EvalConfig(model=model, mtp=str(head), data=str(heldout), gamma=GAMMA,
                     temperatures=tuple(args.temperatures), modes=("rs", "to"),
                     seq_len=args.seq_len,
                     measured=not args.no_measured, measure_prompts=args.measure_prompts,
                     max_tokens=args.measure_tokens, seed=args.seed)  # fmt: skip
    return evaluate(cfg, progress=False)


# ---------------------------------------------------------------- report


def _at(results: dict[str, list[dict]], temperature: float) -> dict[str, list[dict]]:
    """The rows evaluated at one temperature."""
    return {k: [r for r in rows if abs(r["temperature"] - temperature) < 1e-9]
            for k, rows in results.items()}  # fmt: skip


def table(results: dict[str, list[dict]], domains: list[str],
          temperature: float = TEMPERATURE) -> str:  # fmt: skip
    """Acceptance % (E[A]/γ) per loss at one temperature: rs and to, analytic (measured),
    with Δ vs ce, and rs E[A] per domain."""
    cols = [(m, d) for m in ("rs", "to") for d in domains]
    head = " | ".join(f"{m + ':' + d:<18}" for m, d in cols)
    lines = [
        f"T = {temperature:g}: acceptance % = E[A]/γ: analytic [measured], Δ = analytic "
        "points vs ce; last columns: rs E[A] per domain",
        f"{'loss':<7}| {head} | " + " ".join(f"{d:>6}" for d in domains),
    ]
    results = _at(results, temperature)
    get = {
        (loss, r["mode"], r["domain"], r["source"]): 100 * r["acceptance_rate"]
        for loss, rows in results.items()
        for r in rows
    }
    for loss in results:
        cells = []
        for m, d in cols:
            a, me = get.get((loss, m, d, "analytic")), get.get((loss, m, d, "measured"))
            base = get.get(("ce", m, d, "analytic"))
            delta = f"{a - base:+5.1f}" if base is not None and loss != "ce" else "    ·"
            meas = f"[{me:5.1f}]" if me is not None else "       "
            cells.append(f"{a:5.1f}{meas} {delta}")
        ea = [get[(loss, "rs", d, "analytic")] * GAMMA / 100 for d in domains]
        lines.append(f"{loss:<7}| " + " | ".join(cells) + " | "
                     + " ".join(f"{e:6.3f}" for e in ea))  # fmt: skip
    return "\n".join(lines)


def check_targets(results: dict[str, list[dict]], domains: list[str]) -> dict[str, bool | None]:
    """The paper's qualitative claims, on the analytic acceptance rates at T = TEMPERATURE."""
    results = _at(results, TEMPERATURE)
    acc = {
        (loss, r["mode"], r["domain"]): 100 * r["acceptance_rate"]
        for loss, rows in results.items()
        for r in rows
        if r["source"] == "analytic"
    }
    out: dict[str, bool | None] = {}
    peers = [p for p in ("lk", "nla") if p in results]
    if "e2e_tv" in results and peers:
        wins = sum(acc["e2e_tv", "rs", d] - max(acc[p, "rs", d] for p in peers) >= 1.0
                   for d in domains)  # fmt: skip
        out[f"e2e_tv >= best of {'/'.join(peers)} + 1 (rs) on >= 2 domains"] = wins >= min(
            2, len(domains)
        )
    if {"ce", "e2e_tv"} <= results.keys():
        wins = sum(acc["e2e_tv", "rs", d] - acc["ce", "rs", d] >= 3.0 for d in domains)
        out["e2e_tv >= ce + 3 (rs) on >= 2 domains"] = wins >= min(2, len(domains))
    if {"ce", "tv", "e2e_tv"} <= results.keys():
        out["tv between ce and e2e_tv (rs, every domain)"] = all(
            acc["ce", "rs", d] <= acc["tv", "rs", d] <= acc["e2e_tv", "rs", d] for d in domains
        )
    spread = [max(acc[loss, "to", d] for loss in results) - min(acc[loss, "to", d]
              for loss in results) for d in domains]  # fmt: skip
    out["to: all losses within ~1 point"] = max(spread) <= 1.0 if len(results) > 1 else None
    return out


def plot(results: dict[str, list[dict]], domains: list[str], out_png: Path) -> None:
    """P(draft j accepted) per position at T = TEMPERATURE: a panel per (mode, domain), a
    line per loss."""
    results = _at(results, TEMPERATURE)
    from bebop_spec.plotting import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(2, len(domains), figsize=(4 * len(domains), 6.4), squeeze=False)
    for i, mode in enumerate(("rs", "to")):
        for j, d in enumerate(domains):
            ax = axes[i][j]
            for k, (loss, rows) in enumerate(results.items()):
                colour = f"C{k}"
                for r in rows:
                    if (r["mode"], r["domain"]) != (mode, d):
                        continue
                    style = "-o" if r["source"] == "analytic" else "--x"
                    label = loss if r["source"] == "analytic" else None
                    ax.plot(range(1, GAMMA + 1), r["per_pos"], style, color=colour, label=label)
            ax.set(title=f"{mode}, {d} (T={TEMPERATURE:g})", xlabel="draft position j",
                   ylabel="P(draft j accepted)", xticks=range(1, GAMMA + 1))  # fmt: skip
            ax.grid(alpha=0.3)
    axes[0][-1].legend(title="solid: analytic\ndashed: measured", fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if args.model is None:
        from bebop_spec.demo.build import ensure_demo

        args.model = str(ensure_demo())
    work = _work_dir(args)
    train = Path(args.train_data) if args.train_data else ensure_data(
        args.model, work / "data_train", "train", args.train_prompts, args)  # fmt: skip
    heldout = Path(args.heldout_data) if args.heldout_data else ensure_data(
        args.model, work / "data_heldout", "heldout", args.heldout_prompts, args)  # fmt: skip
    t_data = time.perf_counter() - t_start

    results: dict[str, list[dict]] = {}
    seconds: dict[str, dict[str, float]] = {}
    init = None
    if args.warm_steps:
        print(f"warm start: {args.warm_steps} steps of {args.warm_loss}")
        init, t_warm = train_head(args.model, train, work / "heads" / "_warm", args.warm_loss,
                                  args.warm_steps, args.warm_lr, None, args)  # fmt: skip
        seconds["_warm"] = {"train": round(t_warm, 1)}
        if t_warm > 0:  # a new warm start: heads fine-tuned from the old one are stale
            for loss in LOSSES:
                shutil.rmtree(work / "heads" / loss, ignore_errors=True)
    for loss in tqdm(args.losses, desc="losses"):
        head, t_train = train_head(args.model, train, work / "heads" / loss, loss, args.steps,
                                   args.lr, init, args)  # fmt: skip
        t0 = time.perf_counter()
        rows = eval_head(args.model, head, heldout, args)
        results[loss] = [r.to_json() for r in rows]
        seconds[loss] = {"train": round(t_train, 1), "eval": round(time.perf_counter() - t0, 1)}
        (work / "heads" / loss / "eval.json").write_text(json.dumps(results[loss], indent=2))

    domains = sorted({r["domain"] for rows in results.values() for r in rows})
    for t in args.temperatures:
        print(table(results, domains, t))
    targets = check_targets(results, domains)
    for claim, ok in targets.items():
        print(f"  {'PASS' if ok else 'MISS' if ok is not None else 'n/a '}  {claim}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "gamma": GAMMA, "temperature": TEMPERATURE, "metric": "acceptance_rate = E[A] / gamma",
        "torch_threads": torch.get_num_threads(),
        "seconds": {"data": round(t_data, 1), "per_loss": seconds,
                    "total": round(time.perf_counter() - t_start, 1)},
        "targets": targets, "results": results,
    }  # fmt: skip
    out.write_text(json.dumps(doc, indent=2) + "\n")
    png = out.with_name(out.stem + "_per_pos.png")
    plot(results, domains, png)
    print(f"results -> {out}, plot -> {png} ({doc['seconds']['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
