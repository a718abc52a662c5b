"""What does more data buy? Held-out acceptance against training tokens, per dataset size.

    python benchmarks/learning_curve.py --model ~/.cache/bebop/models/SmolLM2-135M-Instruct \
        --train-data D1 [D2 ...] --heldout-data H --sizes 25000 50000 0 --steps 160 \
        --eval-every 40 --loss nla --draft-vocab bebop_spec/heads/smollm2-135m-instruct \
        --cache-hiddens                                       # docs/head_study.md

The training datasets (`bebop mtp data` dirs) are pooled and shuffled once (--seed); each size
in --sizes (response tokens; 0 = the whole pool) takes the shortest prefix of that order
holding at least that many response tokens, so the smaller sets are nested in the larger.
One head per size trains with the same objective, schedule and budget (--steps of
--batch-size sequences), exporting a snapshot every --eval-every steps
(TrainConfig.snapshot_every); every snapshot is scored on the held-out data analytically
(`train/evaluate.py`: Σ min(p, q) on teacher-forced γ = 3 chains) at each of --temperatures.

The x axis is the response tokens the head has been trained on so far (counted exactly by
replaying the trainer's batch stream, truncation included), so a size that runs out of data
shows as repeated epochs: a curve that keeps rising with the pool but flattens on a small set
says data, not steps, is what limits the head. Writes a table, JSON and a plot (one panel per
domain at the first temperature).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see demo/target.py

import torch  # noqa: E402

from bebop_spec.train.data import (  # noqa: E402
    DistillSample,
    iterate_batches,
    read_dataset,
    write_dataset,
)
from bebop_spec.train.evaluate import EvalConfig, evaluate  # noqa: E402
from bebop_spec.train.losses import LOSSES  # noqa: E402
from bebop_spec.train.trainer import TrainConfig, snapshot_dir, train_mtp  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GAMMA = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="target model dir")
    p.add_argument("--train-data", nargs="+", required=True, help="`bebop mtp data` dirs")
    p.add_argument("--heldout-data", required=True)
    p.add_argument("--sizes", type=int, nargs="+", default=[0],
                   help="response tokens per training set (0: the whole pool)")  # fmt: skip
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--loss", default="nla", choices=sorted(LOSSES))
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=320)
    p.add_argument("--max-chains", type=int, default=384)
    p.add_argument("--init", default=None, help="None: fresh; 'last_layer'; or a head dir")
    p.add_argument("--draft-vocab", default=None, metavar="DIR")
    p.add_argument("--draft-vocab-size", type=int, default=8192)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    p.add_argument("--cache-hiddens", action="store_true", help="offline mode, per size")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the target's weights (and its cached hiddens)")  # fmt: skip
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the head's forward matmuls (bfloat16: autocast, fp32 master weights)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default=str(Path.home() / ".cache" / "bebop" / "learning_curve"))
    p.add_argument("--out", default=str(RESULTS / "learning_curve.json"))
    return p.parse_args(argv)


def pooled_order(dirs: list[str], seed: int) -> list[DistillSample]:
    """Every sequence of the datasets, in one seeded random order."""
    samples = []
    for d in dirs:
        ds = read_dataset(d)
        for i in range(len(ds)):
            ids, mask = ds.sequence(i)
            samples.append(DistillSample(ids.tolist(), mask.int().tolist(),
                                         ds.meta.domains[int(ds.domain[i])]))  # fmt: skip
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
    return [samples[int(i)] for i in order]


def prefix_for(samples: list[DistillSample], tokens: int) -> list[DistillSample]:
    """The shortest prefix holding >= `tokens` response tokens (0 or too many: all)."""
    total = 0
    for n, s in enumerate(samples, 1):
        total += sum(s.loss_mask)
        if tokens and total >= tokens:
            return samples[:n]
    return samples


def tokens_seen(data: Path, cfg: TrainConfig) -> list[int]:
    """Response tokens in the trainer's batches, cumulative after each step (exact: the same
    seeded stream, truncated to seq_len)."""
    batches = iterate_batches(read_dataset(data), cfg.batch_size, cfg.seq_len, cfg.seed, cfg.gamma)
    out, total = [], 0
    for _ in range(cfg.steps):
        total += int(next(batches).loss_mask.sum())
        out.append(total)
    return out


def run_size(args, samples: list[DistillSample], size: int, meta_model: str) -> list[dict]:
    """Train one head on the prefix for `size`; score each snapshot. Returns the rows."""
    subset = prefix_for(samples, size)
    n_resp = sum(sum(s.loss_mask) for s in subset)
    work = Path(args.work) / f"size_{n_resp}"
    data = work / "data"
    if not (data / "meta.json").is_file():
        write_dataset(data, subset, model=meta_model, temperature=1.0,
                      extra={"source": "learning_curve prefix", "pool": args.train_data,
                             "seed": args.seed})  # fmt: skip
    cfg = TrainConfig(model=args.model, data=str(data), out=str(work / "head"), loss=args.loss,
                      gamma=GAMMA, lr=args.lr, steps=args.steps, batch_size=args.batch_size,
                      seq_len=args.seq_len, warmup=max(1, args.steps // 15), seed=args.seed,
                      max_chains=args.max_chains, init_from=args.init, save_every=0,
                      snapshot_every=args.eval_every, log_every=5,
                      cache_hiddens=str(work / "hiddens") if args.cache_hiddens else None,
                      draft_vocab=args.draft_vocab,
                      draft_vocab_size=args.draft_vocab_size, dtype=args.dtype,
                      compute_dtype=args.compute_dtype)  # fmt: skip
    t0 = time.perf_counter()
    if not (snapshot_dir(cfg.out_dir, args.steps) / "config.json").is_file():
        train_mtp(cfg)
    t_train = time.perf_counter() - t0
    seen = tokens_seen(data, cfg)
    rows = []
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
        ev = EvalConfig(model=args.model, mtp=str(snapshot_dir(cfg.out_dir, step)),
                        data=args.heldout_data, gamma=GAMMA,
                        temperatures=tuple(args.temperatures), modes=("rs",),
                        measured=False, seq_len=args.seq_len)  # fmt: skip
        for r in evaluate(ev, progress=False):
            rows.append({"size_tokens": n_resp, "sequences": len(subset), "step": step,
                         "tokens_seen": seen[step - 1], "domain": r.domain,
                         "temperature": r.temperature, "accepted_length": r.accepted_length,
                         "per_pos": r.per_pos, "entropy": r.entropy})  # fmt: skip
    print(f"size {n_resp} ({len(subset)} sequences): trained in {t_train:.0f} s")
    return rows


def table(rows: list[dict], temperature: float) -> str:
    """rs E[A] per (size, step) and domain at one temperature."""
    domains = sorted({r["domain"] for r in rows})
    lines = [f"T = {temperature:g}: rs E[A] (γ = {GAMMA}, held-out, analytic)",
             f"{'size':>8} {'step':>5} {'seen':>8} " + " ".join(f"{d:>7}" for d in domains)]  # fmt: skip
    at = [r for r in rows if abs(r["temperature"] - temperature) < 1e-9]
    for key in sorted({(r["size_tokens"], r["step"]) for r in at}):
        cell = {r["domain"]: r for r in at if (r["size_tokens"], r["step"]) == key}
        seen = next(iter(cell.values()))["tokens_seen"]
        lines.append(f"{key[0]:>8} {key[1]:>5} {seen:>8} "
                     + " ".join(f"{cell[d]['accepted_length']:7.3f}" for d in domains))  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], temperature: float, out_png: Path) -> None:
    """rs E[A] against response tokens trained on: a panel per domain, a line per size."""
    from bebop_spec.plotting import pyplot

    plt = pyplot()
    at = [r for r in rows if abs(r["temperature"] - temperature) < 1e-9]
    domains = sorted({r["domain"] for r in at})
    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains), 3.6), squeeze=False)
    for ax, d in zip(axes[0], domains, strict=True):
        for k, size in enumerate(sorted({r["size_tokens"] for r in at})):
            pts = sorted((r["tokens_seen"], r["accepted_length"]) for r in at
                         if r["domain"] == d and r["size_tokens"] == size)  # fmt: skip
            ax.plot(*zip(*pts, strict=True), "-o", color=f"C{k}", label=f"{size / 1e3:.0f} k")
        ax.set(title=f"{d} (T = {temperature:g})", xlabel="response tokens trained on",
               ylabel=f"rs E[A], γ = {GAMMA}")  # fmt: skip
        ax.grid(alpha=0.3)
    axes[0][-1].legend(title="training set", fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    samples = pooled_order(args.train_data, args.seed)
    rows: list[dict] = []
    for size in args.sizes:
        rows += run_size(args, samples, size, read_dataset(args.train_data[0]).meta.model)
    for t in args.temperatures:
        print(table(rows, t))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "gamma": GAMMA,
           "metric": "rs accepted_length = E[A] (analytic, held-out)",
           "pool_response_tokens": sum(sum(s.loss_mask) for s in samples),
           "seconds": round(time.perf_counter() - t_start, 1), "rows": rows}  # fmt: skip
    out.write_text(json.dumps(doc, indent=2) + "\n")
    png = out.with_suffix(".png")
    plot(rows, args.temperatures[0], png)
    print(f"results -> {out}, plot -> {png} ({doc['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
